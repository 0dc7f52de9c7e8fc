//! The routes, declared once in [`ROUTES`]: the router, the 405 `Allow` lists, the metrics
//! labels, the thread a request runs on (bin/server/http.rs) and the OpenAPI document
//! (bin/server/openapi.rs) all read that table. Then the handlers: each reads its input,
//! authenticates, calls one library function and shapes the answer. No SQL here.

use super::error::ApiError;
use super::http::{json_body, json_body_up_to, path, query, token, App, Reply};
use super::openapi::{self, Op, Who, PAGED};
use super::pages;
use coupons::auth::{self, Principal};
use coupons::codes::{self, CodeStatus, NewCodes};
use coupons::coupon::{self, AdminFilter, CouponChange, NewCoupon, RulesChange};
use coupons::idempotency::{Answer, IdempotencyKey};
use coupons::webhooks;
use coupons::{
    claim, db, life, Amount, ClaimId, CouponCode, CouponId, Currency, Email, Error, HoldSeconds,
    Label, Metadata, OrderId, Page, Password, PerUserLimit, PercentOff, Status, Stock, Timestamp,
    UserId,
};
use serde::Deserialize;
use serde_json::json;
use tiny_http::{Method, Request};

type Result<T> = std::result::Result<T, ApiError>;

/// One route.
pub struct Route {
    /// Method and path pattern, which is also the route's label in metrics. `{id}` in the
    /// pattern stands for one segment, of the type [`Route::id`] names.
    pub name: &'static str,
    /// What `{id}` is, for a pattern that has one.
    pub id: Option<Id>,
    /// The thread it runs on.
    pub class: Class,
    /// Called with the request's URL and its `{id}`, parsed.
    pub handler: fn(&App, &mut Request, &str, Params) -> Result<Reply>,
    /// Its operation in the OpenAPI document.
    pub doc: Op,
}

/// Where a request runs; bin/server/http.rs picks the thread from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// On the worker that took it.
    Inline,
    /// On a bcrypt thread, at low priority: bcrypt takes about 0.3 s of CPU.
    Bcrypt,
    /// A claim: read on its worker, answered by whichever thread runs its batch.
    Claim,
    /// A confirm: read on its connection's thread or its worker, answered by whichever thread
    /// runs its batch.
    Grouped,
}

/// What a pattern's `{id}` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Id {
    /// A coupon: a [`CouponId`].
    Coupon,
    /// A claim: a [`ClaimId`].
    Claim,
    /// A static file of a page, by name (`{file}`): bin/server/pages.rs looks it up.
    File,
    /// A webhook: its number.
    Webhook,
}

/// A request's `{id}`, parsed as its route's pattern types it. An id that names nothing is
/// kept as its not-found error, which the handler raises once it has checked the caller.
#[derive(Debug)]
pub enum Params {
    /// The pattern has no `{id}`.
    None,
    /// A coupon's id, or `CouponNotFound`.
    Coupon(std::result::Result<CouponId, Error>),
    /// A claim's id, or `ClaimNotFound`.
    Claim(std::result::Result<ClaimId, Error>),
    /// A file's name, as sent.
    File(String),
    /// A webhook's id, or `WebhookNotFound`.
    Webhook(std::result::Result<u64, Error>),
}

impl Params {
    /// The coupon the path names.
    pub fn coupon(self) -> std::result::Result<CouponId, Error> {
        match self {
            Params::Coupon(id) => id,
            _ => Err(Error::CouponNotFound),
        }
    }

    /// The claim the path names.
    pub fn claim(self) -> std::result::Result<ClaimId, Error> {
        match self {
            Params::Claim(id) => id,
            _ => Err(Error::ClaimNotFound),
        }
    }

    /// The webhook the path names.
    pub fn webhook(self) -> std::result::Result<u64, Error> {
        match self {
            Params::Webhook(id) => id,
            _ => Err(Error::WebhookNotFound),
        }
    }
}

impl Route {
    /// The method, e.g. `POST`.
    pub fn method(&self) -> &'static str {
        self.name.split_once(' ').map_or("", |(method, _)| method)
    }

    /// The path pattern, e.g. `/coupons/{id}/claim`.
    pub fn path(&self) -> &'static str {
        self.name.split_once(' ').map_or("", |(_, path)| path)
    }

    /// Whether `path` fits the pattern, segment by segment (strict: `/login/` and `//login`
    /// are not `/login`), and if so the segment standing for `{id}` (or `{file}`), if any. No
    /// allocation: this runs on every request, twice.
    fn matches<'p>(&self, path: &'p str) -> Option<Option<&'p str>> {
        let path = path.strip_prefix('/').unwrap_or(path);
        let (mut pattern, mut segments) = (self.path()[1..].split('/'), path.split('/'));
        let mut id = None;
        loop {
            match (pattern.next(), segments.next()) {
                (None, None) => return Some(id),
                (Some(p), Some(segment)) if p.starts_with('{') => id = Some(segment),
                (Some(a), Some(b)) if a == b => {}
                _ => return None,
            }
        }
    }

    /// The `{id}` segment parsed as this route's pattern types it.
    fn params(&self, id: Option<&str>) -> Params {
        match (self.id, id) {
            (Some(Id::Coupon), Some(id)) => Params::Coupon(id.parse()),
            (Some(Id::Claim), Some(id)) => Params::Claim(id.parse()),
            (Some(Id::File), Some(name)) => Params::File(name.to_owned()),
            (Some(Id::Webhook), Some(id)) => Params::Webhook(
                id.parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(Error::WebhookNotFound),
            ),
            _ => Params::None,
        }
    }
}

/// The route for `method` on `path` (a URL without its query), with its `{id}` parsed. `HEAD`
/// finds the `GET` route: it is answered as the `GET` would be, and tiny_http sends the
/// headers without the body (RFC 9110, 9.3.2). A path that routes have with other methods is a
/// 405 naming those (`HEAD` after each `GET`), in table order; any other a 404.
pub fn find(method: &Method, path: &str) -> Result<(&'static Route, Params)> {
    let method = match method {
        Method::Head => "GET",
        other => other.as_str(),
    };
    let hit = ROUTES
        .iter()
        .filter(|route| route.method() == method)
        .find_map(|route| Some((route, route.matches(path)?)));
    if let Some((route, id)) = hit {
        return Ok((route, route.params(id)));
    }
    let allow: Vec<&str> = ROUTES
        .iter()
        .filter(|route| route.matches(path).is_some())
        .flat_map(|route| {
            let method = route.method();
            std::iter::once(method).chain((method == "GET").then_some("HEAD"))
        })
        .collect();
    if allow.is_empty() {
        Err(ApiError::RouteNotFound)
    } else {
        Err(ApiError::MethodNotAllowed(allow.join(", ")))
    }
}

/// The route a request matched, as a metrics label; anything else is `unmatched`, so a scan of
/// random paths cannot grow the label set.
pub fn route_name(method: &Method, url: &str) -> &'static str {
    find(method, path(url)).map_or("unmatched", |(route, _)| route.name)
}

/// Routes a request: 503 until the schema is applied, then its handler, a 405 or a 404.
pub fn route(app: &App, rq: &mut Request) -> Result<Reply> {
    ready(app)?;
    let url = rq.url().to_owned();
    let (route, params) = find(rq.method(), path(&url))?;
    (route.handler)(app, rq, &url, params)
}

/// 503 until the schema is applied (a service started before its database).
fn ready(app: &App) -> Result<()> {
    if !app.ready.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::Unavailable("the schema is not applied yet".into()).into());
    }
    Ok(())
}

/// Every route. Where a path has several methods, their order here is the order of its 405's
/// `Allow` list.
pub static ROUTES: &[Route] = &[
    Route {
        name: "POST /register",
        id: None,
        class: Class::Bcrypt,
        handler: register,
        doc: Op {
            summary: "Register a user (JSON body, or ?email=&password=)",
            who: Who::Anyone,
            body: Some("Credentials"),
            params: &["seed email", "seed password"],
            ok: (201, "User"),
            headers: &[],
            errors: &[400, 409, 411, 413, 415, 422, 429],
        },
    },
    Route {
        name: "POST /login",
        id: None,
        class: Class::Bcrypt,
        handler: login,
        doc: Op {
            summary: "Log in and get a token",
            who: Who::Anyone,
            body: Some("Credentials"),
            params: &["seed email", "seed password"],
            ok: (200, "Token"),
            headers: &[],
            errors: &[400, 401, 411, 413, 415, 422, 429],
        },
    },
    Route {
        name: "GET /coupons",
        id: None,
        class: Class::Inline,
        handler: list,
        doc: Op {
            summary: "Claimable coupons (paged); with a token, each says limit_reached",
            who: Who::Anyone,
            body: None,
            params: PAGED,
            ok: (200, "CouponList"),
            headers: &["Link"],
            errors: &[422],
        },
    },
    Route {
        name: "POST /coupons/{id}/claim",
        id: Some(Id::Coupon),
        class: Class::Claim,
        handler: claim,
        doc: Op {
            summary: "Claim one unit, or hold it with hold_seconds (Idempotency-Key optional)",
            who: Who::User,
            body: Some("ClaimOptions?"),
            params: &["Idempotency-Key"],
            ok: (201, "ClaimResult"),
            headers: &[],
            errors: &[400, 401, 404, 409, 411, 413, 415, 422, 429],
        },
    },
    Route {
        name: "POST /claims",
        id: None,
        class: Class::Claim,
        handler: claim,
        doc: Op {
            summary: "Claim (or hold) one unit of the coupon with this code, in any case (Idempotency-Key optional)",
            who: Who::User,
            body: Some("ClaimByCode"),
            params: &["Idempotency-Key"],
            ok: (201, "ClaimResult"),
            headers: &[],
            errors: &[400, 401, 404, 409, 411, 413, 415, 422, 429],
        },
    },
    Route {
        name: "POST /claims/{id}/confirm",
        id: Some(Id::Claim),
        class: Class::Grouped,
        handler: confirm,
        doc: Op {
            summary: "Confirm a held claim (the owner): it becomes claimed; again, the same answer",
            who: Who::User,
            body: None,
            params: &[],
            ok: (200, "ClaimRecord"),
            headers: &[],
            errors: &[401, 404, 409],
        },
    },
    Route {
        name: "POST /claims/{id}/release",
        id: Some(Id::Claim),
        class: Class::Inline,
        handler: release,
        doc: Op {
            summary: "Release a held claim (the owner or an admin): its unit goes back, exactly once",
            who: Who::User,
            body: None,
            params: &[],
            ok: (200, "ClaimRecord"),
            headers: &[],
            errors: &[401, 404, 409],
        },
    },
    Route {
        name: "POST /claims/{id}/redeem",
        id: Some(Id::Claim),
        class: Class::Inline,
        handler: redeem,
        doc: Op {
            summary: "Redeem a claim against an order (the owner or an admin), exactly once: the same order again gets the same answer",
            who: Who::User,
            body: Some("RedeemRequest"),
            params: &[],
            ok: (200, "Redemption"),
            headers: &[],
            errors: &[400, 401, 404, 409, 411, 413, 415, 422],
        },
    },
    Route {
        name: "GET /coupons/{id}/eligibility",
        id: Some(Id::Coupon),
        class: Class::Inline,
        handler: eligibility,
        doc: Op {
            summary: "Whether the caller could claim the coupon now, and why not; writes nothing",
            who: Who::User,
            body: None,
            params: &[],
            ok: (200, "Eligibility"),
            headers: &[],
            errors: &[401, 404],
        },
    },
    Route {
        name: "GET /users/me/history",
        id: None,
        class: Class::Inline,
        handler: history,
        doc: Op {
            summary: "The caller's claims, newest first (paged)",
            who: Who::User,
            body: None,
            params: PAGED,
            ok: (200, "History"),
            headers: &["Link"],
            errors: &[401, 422],
        },
    },
    Route {
        name: "GET /admin/coupons",
        id: None,
        class: Class::Inline,
        handler: admin_list,
        doc: Op {
            summary: "Every coupon, deleted too, with claimed counts (paged; ?status=&q=)",
            who: Who::Admin,
            body: None,
            params: &["limit", "after", "status", "q"],
            ok: (200, "AdminCouponList"),
            headers: &["Link"],
            errors: &[401, 403, 422],
        },
    },
    Route {
        name: "POST /admin/coupons",
        id: None,
        class: Class::Inline,
        handler: create,
        doc: Op {
            summary: "Create a coupon (Idempotency-Key optional)",
            who: Who::Admin,
            body: Some("NewCoupon"),
            params: &[
                "Idempotency-Key",
                "seed code",
                "seed available_count",
                "seed status",
            ],
            ok: (201, "Coupon"),
            headers: &["ETag"],
            errors: &[400, 401, 403, 409, 411, 413, 415, 422, 429],
        },
    },
    Route {
        name: "GET /admin/coupons/{id}",
        id: Some(Id::Coupon),
        class: Class::Inline,
        handler: admin_get,
        doc: Op {
            summary: "One coupon, with its ETag",
            who: Who::Admin,
            body: None,
            params: &[],
            ok: (200, "AdminCoupon"),
            headers: &["ETag"],
            errors: &[401, 403, 404],
        },
    },
    Route {
        name: "PUT /admin/coupons/{id}",
        id: Some(Id::Coupon),
        class: Class::Inline,
        handler: update,
        doc: Op {
            summary: "Change a coupon (If-Match optional; null removes a rule)",
            who: Who::Admin,
            body: Some("CouponChange"),
            params: &[
                "If-Match",
                "seed code",
                "seed available_count",
                "seed status",
            ],
            ok: (200, "Coupon"),
            headers: &["ETag"],
            errors: &[400, 401, 403, 404, 409, 411, 412, 413, 415, 422],
        },
    },
    Route {
        name: "DELETE /admin/coupons/{id}",
        id: Some(Id::Coupon),
        class: Class::Inline,
        handler: delete,
        doc: Op {
            summary: "Soft-delete a coupon; its claims stay",
            who: Who::Admin,
            body: None,
            params: &[],
            ok: (200, "Detail"),
            headers: &[],
            errors: &[401, 403, 404],
        },
    },
    Route {
        name: "GET /admin/coupons/{id}/claims",
        id: Some(Id::Coupon),
        class: Class::Inline,
        handler: admin_claims,
        doc: Op {
            summary: "A coupon's claims, with who claimed (paged)",
            who: Who::Admin,
            body: None,
            params: PAGED,
            ok: (200, "CouponClaims"),
            headers: &["Link"],
            errors: &[401, 403, 404, 422],
        },
    },
    Route {
        name: "POST /admin/coupons/{id}/codes",
        id: Some(Id::Coupon),
        class: Class::Inline,
        handler: add_codes,
        doc: Op {
            summary: "Generate (count, pattern, charset) or import (codes) up to 100,000 unique codes; all or none",
            who: Who::Admin,
            body: Some("NewCodes"),
            params: &[],
            ok: (201, "CodesAdded"),
            headers: &[],
            errors: &[400, 401, 403, 404, 409, 411, 413, 415, 422],
        },
    },
    Route {
        name: "GET /admin/coupons/{id}/codes",
        id: Some(Id::Coupon),
        class: Class::Inline,
        handler: list_codes,
        doc: Op {
            summary: "A coupon's unique codes (paged), or all of them as CSV (format=csv: code,status,claim_id)",
            who: Who::Admin,
            body: None,
            params: &["code status", "format", "limit", "after"],
            ok: (200, "CodeList|text/csv"),
            headers: &["Link"],
            errors: &[401, 403, 404, 422],
        },
    },
    Route {
        name: "POST /admin/claims/{id}/void",
        id: Some(Id::Claim),
        class: Class::Inline,
        handler: void,
        doc: Op {
            summary: "Void a claim: one unit back, exactly once",
            who: Who::Admin,
            body: Some("VoidRequest"),
            params: &[],
            ok: (200, "Voided"),
            headers: &[],
            errors: &[400, 401, 403, 404, 409, 411, 413, 415, 422],
        },
    },
    Route {
        name: "GET /admin/audit",
        id: None,
        class: Class::Inline,
        handler: audit_log,
        doc: Op {
            summary: "The audit log, newest first (paged)",
            who: Who::Admin,
            body: None,
            params: PAGED,
            ok: (200, "Audit"),
            headers: &["Link"],
            errors: &[401, 403, 422],
        },
    },
    Route {
        name: "GET /admin/events",
        id: None,
        class: Class::Inline,
        handler: events,
        doc: Op {
            summary: "The event feed, oldest first (paged; ?type= for one type): every committed change, none skipped",
            who: Who::Admin,
            body: None,
            params: &["limit", "after", "event type"],
            ok: (200, "Events"),
            headers: &["Link"],
            errors: &[401, 403, 422],
        },
    },
    Route {
        name: "POST /admin/webhooks",
        id: None,
        class: Class::Inline,
        handler: create_webhook,
        doc: Op {
            summary: "Add a webhook endpoint: the events it names are posted to it, signed; its secret is shown only here",
            who: Who::Admin,
            body: Some("NewWebhook"),
            params: &[],
            ok: (201, "CreatedWebhook"),
            headers: &[],
            errors: &[400, 401, 403, 411, 413, 415, 422],
        },
    },
    Route {
        name: "GET /admin/webhooks",
        id: None,
        class: Class::Inline,
        handler: list_webhooks,
        doc: Op {
            summary: "The webhook endpoints, oldest first (paged), without their secrets",
            who: Who::Admin,
            body: None,
            params: PAGED,
            ok: (200, "Webhooks"),
            headers: &["Link"],
            errors: &[401, 403, 422],
        },
    },
    Route {
        name: "DELETE /admin/webhooks/{id}",
        id: Some(Id::Webhook),
        class: Class::Inline,
        handler: delete_webhook,
        doc: Op {
            summary: "Delete a webhook endpoint: nothing more is delivered to it",
            who: Who::Admin,
            body: None,
            params: &[],
            ok: (200, "Detail"),
            headers: &[],
            errors: &[401, 403, 404],
        },
    },
    Route {
        name: "GET /admin/webhooks/{id}/deliveries",
        id: Some(Id::Webhook),
        class: Class::Inline,
        handler: webhook_deliveries,
        doc: Op {
            summary: "A webhook's delivery attempts, newest first (paged): time, status or error, next attempt",
            who: Who::Admin,
            body: None,
            params: PAGED,
            ok: (200, "Deliveries"),
            headers: &["Link"],
            errors: &[401, 403, 404, 422],
        },
    },
    Route {
        name: "GET /healthz",
        id: None,
        class: Class::Inline,
        handler: healthz,
        doc: Op {
            summary: "Whether the database answers",
            who: Who::Anyone,
            body: None,
            params: &[],
            ok: (200, "Health"),
            headers: &[],
            errors: &[],
        },
    },
    Route {
        name: "GET /metrics",
        id: None,
        class: Class::Inline,
        handler: metrics,
        doc: Op {
            summary: "Prometheus metrics (text); to anyone on METRICS_ADDR instead, if set",
            who: Who::Admin,
            body: None,
            params: &[],
            ok: (200, "text/plain"),
            headers: &[],
            errors: &[401, 403],
        },
    },
    Route {
        name: "GET /openapi.json",
        id: None,
        class: Class::Inline,
        handler: openapi_json,
        doc: Op {
            summary: "This document",
            who: Who::Anyone,
            body: None,
            params: &[],
            ok: (200, ""),
            headers: &[],
            errors: &[],
        },
    },
    Route {
        name: "GET /docs",
        id: None,
        class: Class::Inline,
        handler: pages::docs,
        doc: Op {
            summary: "This document in Swagger UI: authorize with a token, try a request (HTML)",
            who: Who::Anyone,
            body: None,
            params: &[],
            ok: (200, "text/html"),
            headers: &[],
            errors: &[],
        },
    },
    Route {
        name: "GET /docs/{file}",
        id: Some(Id::File),
        class: Class::Inline,
        handler: pages::docs_file,
        doc: Op {
            summary: "Swagger UI's files, served by the binary",
            who: Who::Anyone,
            body: None,
            params: &[],
            ok: (200, pages::FILE_TYPES),
            headers: &[],
            errors: &[404],
        },
    },
    Route {
        name: "GET /console",
        id: None,
        class: Class::Inline,
        handler: pages::console,
        doc: Op {
            summary: "The admin console: coupons, their stock and claims, a live chart, the audit log (HTML)",
            who: Who::Anyone,
            body: None,
            params: &[],
            ok: (200, "text/html"),
            headers: &[],
            errors: &[],
        },
    },
    Route {
        name: "GET /console/{file}",
        id: Some(Id::File),
        class: Class::Inline,
        handler: pages::console_file,
        doc: Op {
            summary: "The console's script and style",
            who: Who::Anyone,
            body: None,
            params: &[],
            ok: (200, pages::FILE_TYPES),
            headers: &[],
            errors: &[404],
        },
    },
];

fn healthz(app: &App, _: &mut Request, _: &str, _: Params) -> Result<Reply> {
    if app.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::ShuttingDown);
    }
    db::ping(&app.pool)?;
    Ok(Reply::json(200, &json!({"status": "ok"})))
}

/// `GET /metrics`: for admins here; for anyone on `METRICS_ADDR` (`http::serve_metrics`).
fn metrics(app: &App, rq: &mut Request, _: &str, _: Params) -> Result<Reply> {
    admin(app, rq)?;
    Ok(metrics_text(app))
}

/// The Prometheus text of this process's metrics.
pub fn metrics_text(app: &App) -> Reply {
    let mut reply = Reply::bytes(
        200,
        app.metrics
            .render(app.pool.stats(), app.claims.stats())
            .into_bytes(),
    );
    reply
        .headers
        .push(("Content-Type", "text/plain; version=0.0.4".into()));
    reply
}

fn openapi_json(_: &App, _: &mut Request, _: &str, _: Params) -> Result<Reply> {
    Ok(Reply::json(200, &openapi::document()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    email: String,
    password: String,
}

/// From the JSON body, or from the seed's `?email=...&password=...`.
fn credentials(rq: &mut Request, url: &str) -> Result<Credentials> {
    if let Some(c) = json_body(rq)? {
        return Ok(c);
    }
    let q = query(url);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    match (get("email"), get("password")) {
        (Some(email), Some(password)) => Ok(Credentials { email, password }),
        _ => Err(ApiError::InvalidBody(
            "email and password are required".into(),
        )),
    }
}

/// The client's address, for the brute-force limits.
fn client(app: &App, rq: &Request) -> String {
    super::limits::key(client_ip(app, rq))
}

/// The client's address (see `Limits::client_ip`), for the limits and its share of the server.
pub fn client_ip(app: &App, rq: &Request) -> Option<std::net::IpAddr> {
    let forwarded = rq
        .headers()
        .iter()
        .filter(|h| h.field.equiv("X-Forwarded-For"))
        .map(|h| h.value.as_str());
    app.limits
        .client_ip(rq.remote_addr().map(|a| a.ip()), forwarded)
}

/// The page a list request asks for (`?limit=&after=`).
fn page(url: &str) -> Result<Page> {
    let q = query(url);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    Ok(Page::parse(get("limit"), get("after"))?)
}

/// A page of a list: the array is the body, and a full page links to the next one
/// (`Link: <...&after=ID>; rel="next"`, keeping the other query parameters).
fn paged<T: serde::Serialize>(url: &str, page: Page, items: &[T], id: impl Fn(&T) -> u64) -> Reply {
    let mut reply = Reply::json(200, &items);
    if let Some(last) = items.last().filter(|_| items.len() == page.limit as usize) {
        let mut params: Vec<String> = query(url)
            .into_iter()
            .filter(|(k, _)| k != "after" && k != "limit")
            .map(|(k, v)| format!("{}={}", encode(&k), encode(&v)))
            .collect();
        params.push(format!("limit={}", page.limit));
        params.push(format!("after={}", id(last)));
        reply.headers.push((
            "Link",
            format!("<{}?{}>; rel=\"next\"", path(url), params.join("&")),
        ));
    }
    reply
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Claimable coupons; with a valid token, each also says whether the caller has reached its
/// per-user limit (a missing or invalid token just lists, as for anyone).
fn list(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    let page = page(url)?;
    let coupons = coupon::list_active(&app.pool, page)?;
    let Ok(who) = app.auth.authenticate(token(rq)) else {
        return Ok(paged(url, page, &coupons, |c| c.id.0));
    };
    let reached = coupon::limits_reached(&app.pool, who.user_id, &coupons)?;
    let items: Vec<serde_json::Value> = coupons
        .iter()
        .map(|c| {
            let mut v = json!(c);
            v["limit_reached"] = json!(reached.contains(&c.id));
            v
        })
        .collect();
    Ok(paged(url, page, &items, |v| v["id"].as_u64().unwrap_or(0)))
}

fn admin_list(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    admin(app, rq)?;
    let page = page(url)?;
    let q = query(url);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let filter = AdminFilter {
        status: get("status").as_deref().map(Status::parse).transpose()?,
        code_prefix: get("q"),
    };
    let items = coupon::admin_list(&app.pool, &filter, page)?;
    Ok(paged(url, page, &items, |c| c.coupon.id.0))
}

fn admin_get(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    admin(app, rq)?;
    let id = id.coupon()?;
    let c = coupon::admin_get(&app.pool, id)?;
    let mut reply = Reply::json(200, &c);
    reply.headers.push(("ETag", etag(c.coupon.version)));
    Ok(reply)
}

/// A coupon with its `ETag`: its version, which counts admin changes (not claims), so an
/// `If-Match` from a read still holds while claims come and go.
fn tagged(c: &coupon::Coupon) -> Reply {
    tagged_with(200, c)
}

fn tagged_with(status: u16, c: &coupon::Coupon) -> Reply {
    let mut reply = Reply::json(status, c);
    reply.headers.push(("ETag", etag(c.version)));
    reply
}

fn etag(version: u32) -> String {
    format!("\"v{version}\"")
}

/// The version an `If-Match` header asks for: `None` without one or with `*`.
fn if_match(rq: &Request) -> Result<Option<u32>> {
    let Some(h) = rq.headers().iter().find(|h| h.field.equiv("If-Match")) else {
        return Ok(None);
    };
    let value = h.value.as_str().trim();
    if value == "*" {
        return Ok(None);
    }
    // An ETag we never gave can only be stale.
    let version = value
        .strip_prefix("\"v")
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Some(version))
}

fn audit_log(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    admin(app, rq)?;
    let page = page(url)?;
    let items = coupons::audit::list(&app.pool, page)?;
    Ok(paged(url, page, &items, |e| e.id))
}

fn events(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    admin(app, rq)?;
    let page = page(url)?;
    let q = query(url);
    let kind = q
        .iter()
        .find(|(k, _)| k == "type")
        .map(|(_, t)| coupons::events::EventType::parse("type", t))
        .transpose()?;
    let items = coupons::events::list(&app.pool, page, kind)?;
    Ok(paged(url, page, &items, |e| e.id))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    description: Option<String>,
}

fn create_webhook(app: &App, rq: &mut Request, _: &str, _: Params) -> Result<Reply> {
    admin(app, rq)?;
    let body: WebhookBody = json_body(rq)?
        .ok_or_else(|| ApiError::InvalidBody("url and events are required".into()))?;
    let description = body
        .description
        .map(|d| Label::parse("description", &d, 500))
        .transpose()?;
    let new = webhooks::NewWebhook::parse(&body.url, &body.events, description)?;
    Ok(Reply::json(
        201,
        &webhooks::create(&app.pool, &new, app.webhooks)?,
    ))
}

fn list_webhooks(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    admin(app, rq)?;
    let page = page(url)?;
    let items = webhooks::list(&app.pool, page)?;
    Ok(paged(url, page, &items, |w| w.id))
}

fn delete_webhook(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    admin(app, rq)?;
    webhooks::delete(&app.pool, id.webhook()?)?;
    Ok(Reply::json(200, &json!({"detail": "Webhook deleted"})))
}

fn webhook_deliveries(app: &App, rq: &mut Request, url: &str, id: Params) -> Result<Reply> {
    admin(app, rq)?;
    let id = id.webhook()?;
    let page = page(url)?;
    let items = webhooks::deliveries(&app.pool, id, page)?;
    Ok(paged(url, page, &items, |d| d.id))
}

fn admin_claims(app: &App, rq: &mut Request, url: &str, id: Params) -> Result<Reply> {
    admin(app, rq)?;
    let id = id.coupon()?;
    let page = page(url)?;
    let items = claim::coupon_claims(&app.pool, id, page)?;
    Ok(paged(url, page, &items, |c| c.claim_id.0))
}

/// The most an import of codes may send: 100,000 codes of 64 characters, quoted.
const CODES_BODY_LIMIT: usize = 8 << 20;

/// Codes to add: `count` and `pattern` (and `charset`), or `codes`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodesBody {
    count: Option<i64>,
    pattern: Option<String>,
    charset: Option<String>,
    codes: Option<Vec<String>>,
}

fn add_codes(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let who = admin(app, rq)?;
    let id = id.coupon()?;
    let body: CodesBody = json_body_up_to(rq, CODES_BODY_LIMIT)?
        .ok_or_else(|| ApiError::InvalidBody("send count and pattern, or codes".into()))?;
    let new = match body {
        CodesBody {
            codes: Some(list),
            count: None,
            pattern: None,
            charset: None,
        } => NewCodes::import(&list)?,
        CodesBody {
            codes: None,
            count: Some(count),
            pattern: Some(pattern),
            charset,
        } => NewCodes::generate(count, &pattern, charset.as_deref())?,
        _ => {
            return Err(ApiError::InvalidBody(
                "send count and pattern (and charset), or codes alone".into(),
            ))
        }
    };
    Ok(Reply::json(
        201,
        &codes::add(&app.pool, who.user_id, id, &new)?,
    ))
}

fn list_codes(app: &App, rq: &mut Request, url: &str, id: Params) -> Result<Reply> {
    admin(app, rq)?;
    let id = id.coupon()?;
    let q = query(url);
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let status = get("status").map(CodeStatus::parse).transpose()?;
    // Checked for CSV too, which takes every code: a bad `limit` or `after` is refused either way.
    let page = page(url)?;
    match get("format") {
        None | Some("json") => {
            let items = codes::list(&app.pool, id, status, page)?;
            Ok(paged(url, page, &items, |c| c.id))
        }
        Some("csv") => {
            let mut reply = Reply::bytes(200, Vec::new());
            reply.stream = Some(Box::new(codes::csv(&app.pool, id, status)?));
            reply
                .headers
                .push(("Content-Type", "text/csv; charset=utf-8".into()));
            Ok(reply)
        }
        Some(_) => Err(Error::invalid("format", "must be json or csv").into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoidBody {
    reason: String,
}

fn void(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let who = admin(app, rq)?;
    let id = id.claim()?;
    let body: VoidBody =
        json_body(rq)?.ok_or_else(|| ApiError::InvalidBody("a reason is required".into()))?;
    if body.reason.trim().is_empty() {
        return Err(Error::invalid("reason", "must not be empty").into());
    }
    let reason = Label::parse("reason", &body.reason, 500)?;
    Ok(Reply::json(
        200,
        &life::void(&app.pool, who.user_id, id, &reason)?,
    ))
}

fn confirm(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let (owner, claim) = confirm_ticket(app, rq, id)?;
    confirm_reply(app.confirms.confirm(owner, claim))
}

/// Reads and checks a confirm request: whose, and which claim (the confirm itself is the
/// confirms' to make).
pub fn confirm_ticket(app: &App, rq: &mut Request, id: Params) -> Result<(UserId, ClaimId)> {
    ready(app)?;
    let who = principal(app, rq)?;
    Ok((who.user_id, id.claim()?))
}

pub fn confirm_reply(answer: std::result::Result<claim::ClaimRecord, Error>) -> Result<Reply> {
    Ok(Reply::json(200, &answer?))
}

fn release(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let by = actor(app, rq)?;
    let id = id.claim()?;
    Ok(Reply::json(200, &life::release(&app.pool, by, id)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedeemBody {
    order_id: String,
    order_amount: i64,
    currency: String,
}

fn redeem(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let by = actor(app, rq)?;
    let id = id.claim()?;
    let b: RedeemBody = json_body(rq)?
        .ok_or_else(|| ApiError::InvalidBody("order_id, order_amount and currency".into()))?;
    if !(0..=Amount::MAX).contains(&b.order_amount) {
        let why = format!("must be a whole number from 0 to {}", Amount::MAX);
        return Err(Error::invalid("order_amount", why).into());
    }
    let order = life::Order {
        id: OrderId::parse(&b.order_id)?,
        amount: b.order_amount as u64,
        currency: Currency::parse(&b.currency)?,
    };
    Ok(Reply::json(200, &life::redeem(&app.pool, by, id, &order)?))
}

fn eligibility(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let who = principal(app, rq)?;
    let id = id.coupon()?;
    Ok(Reply::json(
        200,
        &claim::eligibility(&app.pool, who.user_id, id)?,
    ))
}

/// The caller acting on a claim: an admin (as the database says, whatever the token) on
/// anyone's, anyone else on their own.
fn actor(app: &App, rq: &Request) -> Result<life::Actor> {
    let who = principal(app, rq)?;
    match auth::require_admin(&app.pool, &who) {
        Ok(()) => Ok(life::Actor::Admin(who.user_id)),
        Err(Error::NotAdmin) => Ok(life::Actor::Owner(who.user_id)),
        Err(e) => Err(e.into()),
    }
}

fn register(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    let ip = client(app, rq);
    let c = credentials(rq, url)?;
    let email = Email::parse(&c.email)?;
    let password = Password::parse(&c.password)?;
    let limit = &app.limits.registrations_per_ip;
    limit.take(&ip).map_err(ApiError::TooManyRequests)?;
    let user = app.auth.register(&app.pool, &email, &password)?;
    Ok(Reply::json(201, &user))
}

fn login(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    let ip = client(app, rq);
    let c = credentials(rq, url)?;
    // Taken before any bcrypt work and given back on success: guessing costs the guesser, and
    // parallel guesses cannot share the last attempt. The email bucket only exists for a
    // well-formed address (no bucket per 64 KiB of junk).
    let limits = &app.limits;
    let email = Email::parse(&c.email).ok();
    limits
        .login_fails_per_ip
        .take(&ip)
        .map_err(ApiError::TooManyRequests)?;
    if let Some(email) = &email {
        if let Err(wait) = limits.login_fails_per_email.take(email.as_str()) {
            limits.login_fails_per_ip.refund(&ip);
            return Err(ApiError::TooManyRequests(wait));
        }
    }
    let t = app
        .auth
        .login(&app.pool, &c.email, &c.password)
        .inspect(|_| {
            limits.login_fails_per_ip.refund(&ip);
            if let Some(email) = &email {
                limits.login_fails_per_email.refund(email.as_str());
            }
        })?;
    Ok(Reply::json(
        200,
        &json!({
            "token": t.token,
            "access_token": t.token,
            "token_type": "bearer",
            "expires_in": t.expires_in,
        }),
    ))
}

fn principal(app: &App, rq: &Request) -> Result<Principal> {
    Ok(app.auth.authenticate(token(rq))?)
}

fn admin(app: &App, rq: &Request) -> Result<Principal> {
    let who = principal(app, rq)?;
    auth::require_admin(&app.pool, &who)?;
    Ok(who)
}

/// The `Idempotency-Key` header, parsed, if sent.
fn idempotency_key(rq: &Request) -> Result<Option<IdempotencyKey>> {
    let value = rq
        .headers()
        .iter()
        .find(|h| h.field.equiv("Idempotency-Key"));
    Ok(value
        .map(|h| IdempotencyKey::parse(h.value.as_str()))
        .transpose()?)
}

/// The answer of a keyed request, marked when it is a replay (errors included).
fn answered<T>(answer: Answer<T>, ok: impl FnOnce(T) -> Reply) -> Result<Reply> {
    let mut reply = match answer.result {
        Ok(value) => ok(value),
        Err(e) if answer.replayed => ApiError::App(e).reply("replay"),
        Err(e) => return Err(e.into()),
    };
    if answer.replayed {
        reply.headers.push(("Idempotent-Replayed", "true".into()));
    }
    Ok(reply)
}

/// `POST /coupons/{id}/claim` and `POST /claims`, waiting for the answer. The server does not
/// wait: it hands the [`claim_ticket`] to `Claims::submit`, and the thread that runs the
/// claim's batch sends the [`claim_reply`] (bin/server/http.rs).
fn claim(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let t = claim_ticket(app, rq, id)?;
    claim_reply(app, app.claims.ask(&t.ask, t.key.as_ref()))
}

/// A claim request, read and checked: what it asks, with which key.
pub struct ClaimTicket {
    pub ask: claim::Ask,
    pub key: Option<IdempotencyKey>,
}

/// The body of a claim: by id, optional; by code (`POST /claims`, no `{id}`), required.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    code: Option<String>,
    hold_seconds: Option<i64>,
}

/// Reads and checks a claim request (the claim itself is the claims' to make). A claim by code
/// finds its coupon here, by a read. A keyed one takes one from its user's keyed-request
/// limit, last: a request refused before writes no key row. Without a body (all that a
/// connection's thread sends here), no read and no lock but a map look-up.
pub fn claim_ticket(app: &App, rq: &mut Request, id: Params) -> Result<ClaimTicket> {
    ready(app)?;
    let who = principal(app, rq)?;
    let by_code = matches!(id, Params::None);
    let body: ClaimBody = json_body(rq)?.unwrap_or_default();
    let hold = body.hold_seconds.map(HoldSeconds::parse).transpose()?;
    let (coupon, code) = match (by_code, body.code) {
        (false, None) => (id.coupon()?, None),
        (false, Some(_)) => return Err(Error::invalid("code", "goes to POST /claims").into()),
        (true, code) => {
            let code = CouponCode::parse(code.as_deref().unwrap_or_default())?;
            (coupon::id_for_code(&app.pool, &code)?, Some(code))
        }
    };
    let key = idempotency_key(rq)?;
    keyed_limit(app, who.user_id, key.as_ref())?;
    Ok(ClaimTicket {
        ask: claim::Ask {
            user: who.user_id,
            coupon,
            hold,
            code,
        },
        key,
    })
}

impl ClaimTicket {
    /// Gives back what [`claim_ticket`] took from the limit, for a request handed on to be
    /// read again (by a worker, after a connection's thread found its lane idle).
    pub fn put_back(&self, app: &App) {
        if self.key.is_some() {
            app.limits.keyed_per_user.refund(&self.ask.user);
        }
    }
}

/// With a key, one request from `user`'s `KEYED_CLAIMS_PER_USER_PER_MIN`, or 429: each keyed
/// request writes a key row, kept 24 hours, so the limit bounds an account's share of them.
/// Requests without a key write none and are not counted.
fn keyed_limit(app: &App, user: UserId, key: Option<&IdempotencyKey>) -> Result<()> {
    if key.is_some() {
        let limit = &app.limits.keyed_per_user;
        limit.take(&user).map_err(ApiError::TooManyRequests)?;
    }
    Ok(())
}

/// The answer to a claim request.
pub fn claim_reply(app: &App, answer: Answer<claim::Claimed>) -> Result<Reply> {
    match &answer.result {
        Ok(_) => app.metrics.claim("claimed"),
        Err(e) => app.metrics.claim(&super::error::app_parts(e).1),
    }
    // A struct, not `json!`: this answer is the hot path's, and a map costs an allocation a key.
    #[derive(serde::Serialize)]
    struct Claimed<'a> {
        message: &'static str,
        claim: &'a claim::Claim,
        available_count: u64,
    }
    answered(answer, |c| {
        let body = Claimed {
            message: "Coupon claimed successfully",
            claim: &c.claim,
            available_count: c.available_count,
        };
        Reply::json(201, &body)
    })
}

fn history(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    let who = principal(app, rq)?;
    let page = page(url)?;
    let items = claim::history(&app.pool, who.user_id, page)?;
    Ok(paged(url, page, &items, |h| h.claim_id.0))
}

/// A coupon as sent by an admin; every field optional here, required ones checked below.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CouponBody {
    // Absent or a value: `null` is refused (invalid_body), as the document says.
    #[serde(default, deserialize_with = "present")]
    code: Option<String>,
    #[serde(default, deserialize_with = "present")]
    available_count: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    status: Option<String>,
    // For these, `null` (Some(None)) removes the rule in an update; absent leaves it.
    #[serde(default, deserialize_with = "present")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    per_user_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    starts_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    ends_at: Option<Option<String>>,
    // Any JSON here, so that a mistyped value is `invalid_<field>` as a bad number is.
    #[serde(default, deserialize_with = "present")]
    percent_off: Option<Option<serde_json::Value>>,
    #[serde(default, deserialize_with = "present")]
    amount_off: Option<Option<serde_json::Value>>,
    #[serde(default, deserialize_with = "present")]
    currency: Option<Option<serde_json::Value>>,
    #[serde(default, deserialize_with = "present")]
    min_order_amount: Option<Option<serde_json::Value>>,
    #[serde(default, deserialize_with = "present")]
    metadata: Option<Option<serde_json::Value>>,
}

/// A JSON integer, or `invalid_<field>`.
fn whole(field: &'static str, v: &serde_json::Value) -> std::result::Result<i64, Error> {
    v.as_i64()
        .ok_or_else(|| Error::invalid(field, "must be a whole number"))
}

/// A field that is present, possibly `null`: `Some(value or None)`; absent fields stay `None`.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

impl CouponBody {
    /// The rules as sent, each parsed; `None` where absent, `Some(None)` where `null`.
    fn rules(&self) -> Result<RulesChange> {
        fn each<T, U>(
            v: &Option<Option<T>>,
            f: impl Fn(&T) -> std::result::Result<U, Error>,
        ) -> Result<Option<Option<U>>> {
            Ok(v.as_ref()
                .map(|o| o.as_ref().map(&f).transpose())
                .transpose()?)
        }
        Ok(RulesChange {
            name: each(&self.name, |n| Label::parse("name", n, 200))?,
            description: each(&self.description, |d| Label::parse("description", d, 2000))?,
            per_user_limit: each(&self.per_user_limit, |l| PerUserLimit::parse(*l))?,
            starts_at: each(&self.starts_at, |t| Timestamp::parse("starts_at", t))?,
            ends_at: each(&self.ends_at, |t| Timestamp::parse("ends_at", t))?,
            percent_off: each(&self.percent_off, |v| {
                PercentOff::parse(whole("percent_off", v)?)
            })?,
            amount_off: each(&self.amount_off, |v| Amount::off(whole("amount_off", v)?))?,
            currency: each(&self.currency, |v| {
                Currency::parse(v.as_str().unwrap_or_default())
            })?,
            min_order_amount: each(&self.min_order_amount, |v| {
                Amount::min_order(whole("min_order_amount", v)?)
            })?,
            metadata: each(&self.metadata, Metadata::parse)?,
        })
    }
}

/// From the JSON body, or from the seed's `?code=...&available_count=...&status=...`.
fn coupon_body(rq: &mut Request, url: &str) -> Result<CouponBody> {
    if let Some(b) = json_body(rq)? {
        return Ok(b);
    }
    let mut b = CouponBody::default();
    for (k, v) in query(url) {
        match k.as_str() {
            "code" => b.code = Some(v),
            "status" => b.status = Some(v),
            "available_count" => {
                let n = v
                    .trim()
                    .parse()
                    .map_err(|_| Error::invalid("available_count", "must be a whole number"))?;
                b.available_count = Some(n);
            }
            _ => {}
        }
    }
    Ok(b)
}

fn create(app: &App, rq: &mut Request, url: &str, _: Params) -> Result<Reply> {
    let who = admin(app, rq)?;
    let key = idempotency_key(rq)?;
    let b = coupon_body(rq, url)?;
    let new = NewCoupon {
        code: CouponCode::parse(b.code.as_deref().unwrap_or_default())?,
        available_count: Stock::parse(
            b.available_count
                .ok_or_else(|| Error::invalid("available_count", "is required"))?,
        )?,
        status: b
            .status
            .as_deref()
            .map_or(Ok(Status::Active), Status::parse)?,
        rules: b.rules()?.flatten(),
    };
    keyed_limit(app, who.user_id, key.as_ref())?;
    let answer = match key {
        Some(key) => coupon::create_once(&app.pool, who.user_id, &new, &key),
        None => Answer {
            result: coupon::create(&app.pool, who.user_id, &new),
            replayed: false,
        },
    };
    answered(answer, |c| tagged_with(201, &c))
}

fn update(app: &App, rq: &mut Request, url: &str, id: Params) -> Result<Reply> {
    let who = admin(app, rq)?;
    let if_version = if_match(rq)?;
    let id = id.coupon()?;
    let b = coupon_body(rq, url)?;
    let change = CouponChange {
        code: b.code.as_deref().map(CouponCode::parse).transpose()?,
        available_count: b.available_count.map(Stock::parse).transpose()?,
        status: b.status.as_deref().map(Status::parse).transpose()?,
        rules: b.rules()?,
        if_version,
    };
    Ok(tagged(&coupon::update(
        &app.pool,
        who.user_id,
        id,
        &change,
    )?))
}

fn delete(app: &App, rq: &mut Request, _: &str, id: Params) -> Result<Reply> {
    let who = admin(app, rq)?;
    let id = id.coupon()?;
    coupon::delete(&app.pool, who.user_id, id)?;
    Ok(Reply::json(200, &json!({"detail": "Coupon deleted"})))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `find` makes of a request line: the route, its class and its `{id}`; or the 405's
    /// `Allow`; or another status.
    #[track_caller]
    fn check(method: &str, path: &str, expected: &str) {
        let method: Method = method.parse().unwrap();
        let got = match find(&method, path) {
            Ok((route, id)) => format!("{} {:?} {id:?}", route.name, route.class),
            Err(ApiError::MethodNotAllowed(allow)) => format!("405 {allow}"),
            Err(e) => e.parts().0.to_string(),
        };
        assert_eq!(got, expected, "{method} {path}");
    }

    #[test]
    fn requests_find_their_route_class_and_id() {
        check("POST", "/register", "POST /register Bcrypt None");
        check("POST", "/login", "POST /login Bcrypt None");
        check("GET", "/coupons", "GET /coupons Inline None");
        let claim = "POST /coupons/{id}/claim Claim";
        check(
            "POST",
            "/coupons/7/claim",
            &format!("{claim} Coupon(Ok(CouponId(7)))"),
        );
        check(
            "POST",
            "/coupons/abc/claim",
            &format!("{claim} Coupon(Err(CouponNotFound))"),
        );
        check(
            "POST",
            "/coupons/0/claim",
            &format!("{claim} Coupon(Err(CouponNotFound))"),
        );
        check(
            "POST",
            "/coupons/+1/claim",
            &format!("{claim} Coupon(Err(CouponNotFound))"),
        );
        check(
            "POST",
            "/admin/claims/3/void",
            "POST /admin/claims/{id}/void Inline Claim(Ok(ClaimId(3)))",
        );
        check(
            "GET",
            "/admin/coupons/",
            "GET /admin/coupons/{id} Inline Coupon(Err(CouponNotFound))",
        );
        check("GET", "/openapi.json", "GET /openapi.json Inline None");
        check(
            "GET",
            "/console/console.js",
            "GET /console/{file} Inline File(\"console.js\")",
        );
        check("GET", "/console", "GET /console Inline None");
        check("GET", "/console/a/b", "404");
        check("GET", "/login", "405 POST");
        // HEAD is GET without the body, on every GET route and only there.
        check("HEAD", "/coupons", "GET /coupons Inline None");
        check(
            "HEAD",
            "/admin/coupons/5",
            "GET /admin/coupons/{id} Inline Coupon(Ok(CouponId(5)))",
        );
        check("HEAD", "/login", "405 POST");
        check("HEAD", "/coupons/1/claim", "405 POST");
        check("HEAD", "/nope", "404");
        check("PATCH", "/admin/coupons", "405 GET, HEAD, POST");
        check("POST", "/admin/coupons/1", "405 GET, HEAD, PUT, DELETE");
        check("get", "/coupons", "405 GET, HEAD");
        for path in [
            "/login/",
            "//login",
            "/coupons/",
            "/",
            "",
            "*",
            "/coupons/1/claim/x",
            "/nope",
        ] {
            check("POST", path, "404");
        }
    }

    #[test]
    fn each_route_is_declared_whole_and_once() {
        for (i, route) in ROUTES.iter().enumerate() {
            let name = route.name;
            assert!(
                !matches!(route.method().parse(), Ok(Method::NonStandard(_)) | Err(_)),
                "{name}: a method tiny_http knows"
            );
            assert!(route.path().starts_with('/'), "{name}: a path");
            assert_eq!(
                route.path().contains('{'),
                route.id.is_some(),
                "{name}: {{id}} typed"
            );
            assert!(ROUTES[..i].iter().all(|r| r.name != name), "{name}: twice");
        }
    }
}

//! The routes: each handler reads its input, authenticates, calls one library function and
//! shapes the answer. No SQL here.

use super::error::ApiError;
use super::http::{json_body, path, query, token, App, Reply};
use coupons::auth::{self, Principal};
use coupons::coupon::{self, AdminFilter, CouponChange, NewCoupon, Rules, RulesChange};
use coupons::idempotency::{Answer, IdempotencyKey};
use coupons::{
    claim, db, ClaimId, CouponCode, CouponId, Email, Error, Label, Page, Password, PerUserLimit,
    Status, Stock, Timestamp,
};
use serde::Deserialize;
use serde_json::json;
use tiny_http::{Method, Request};

type Result<T> = std::result::Result<T, ApiError>;

/// Every route: method, path (`{id}` stands for a number) and its metrics label. The router
/// below and the OpenAPI document (bin/server/openapi.rs) are checked against this list in tests.
pub const ROUTES: &[(&str, &str, &str)] = &[
    ("POST", "/register", "POST /register"),
    ("POST", "/login", "POST /login"),
    ("GET", "/coupons", "GET /coupons"),
    ("POST", "/coupons/{id}/claim", "POST /coupons/{id}/claim"),
    ("GET", "/users/me/history", "GET /users/me/history"),
    ("POST", "/admin/coupons", "POST /admin/coupons"),
    ("GET", "/admin/coupons", "GET /admin/coupons"),
    ("GET", "/admin/coupons/{id}", "GET /admin/coupons/{id}"),
    ("PUT", "/admin/coupons/{id}", "PUT /admin/coupons/{id}"),
    (
        "DELETE",
        "/admin/coupons/{id}",
        "DELETE /admin/coupons/{id}",
    ),
    (
        "GET",
        "/admin/coupons/{id}/claims",
        "GET /admin/coupons/{id}/claims",
    ),
    (
        "POST",
        "/admin/claims/{id}/void",
        "POST /admin/claims/{id}/void",
    ),
    ("GET", "/admin/audit", "GET /admin/audit"),
    ("GET", "/healthz", "GET /healthz"),
    ("GET", "/metrics", "GET /metrics"),
    ("GET", "/openapi.json", "GET /openapi.json"),
    ("GET", "/docs", "GET /docs"),
];

/// The route a request matched, as a metrics label; anything else is `unmatched`, so a scan of
/// random paths cannot grow the label set.
pub fn route_name(method: &Method, url: &str) -> &'static str {
    let p = path(url);
    let p = p.strip_prefix('/').unwrap_or(p);
    // Compared segment by segment, without allocating: this runs on every request.
    let matches = |template: &str| {
        let (mut t, mut s) = (template[1..].split('/'), p.split('/'));
        loop {
            match (t.next(), s.next()) {
                (None, None) => return true,
                (Some(a), Some(b)) if a == "{id}" || a == b => {}
                _ => return false,
            }
        }
    };
    ROUTES
        .iter()
        .find(|(m, template, _)| *m == method.as_str() && matches(template))
        .map_or("unmatched", |(_, _, label)| label)
}

/// Dispatches on method and path; a known path with another method is a 405 naming the
/// allowed ones, anything else a 404.
pub fn route(app: &App, rq: &mut Request) -> Result<Reply> {
    if !app.ready.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::Unavailable("the schema is not applied yet".into()).into());
    }
    let url = rq.url().to_owned();
    // Strict: `/login/` and `//login` are not `/login`.
    let p = path(&url);
    let segments: Vec<&str> = p.strip_prefix('/').unwrap_or(p).split('/').collect();
    let method = rq.method().clone();
    use Method::{Delete, Get, Post, Put};
    match (segments.as_slice(), &method) {
        (["register"], Post) => register(app, rq, &url),
        (["login"], Post) => login(app, rq, &url),
        (["coupons"], Get) => list(app, rq, &url),
        (["coupons", id, "claim"], Post) => claim(app, rq, id),
        (["users", "me", "history"], Get) => history(app, rq, &url),
        (["admin", "coupons"], Post) => create(app, rq, &url),
        (["admin", "coupons"], Get) => admin_list(app, rq, &url),
        (["admin", "coupons", id], Get) => admin_get(app, rq, id),
        (["admin", "coupons", id], Put) => update(app, rq, &url, id),
        (["admin", "coupons", id], Delete) => delete(app, rq, id),
        (["admin", "coupons", id, "claims"], Get) => admin_claims(app, rq, &url, id),
        (["admin", "claims", id, "void"], Post) => void(app, rq, id),
        (["admin", "audit"], Get) => audit_log(app, rq, &url),
        (["openapi.json"], Get) => Ok(Reply::json(200, &super::openapi::document())),
        (["docs"], Get) => Ok(Reply {
            status: 200,
            body: super::openapi::DOCS_HTML.as_bytes().to_vec(),
            headers: vec![("Content-Type", "text/html; charset=utf-8".into())],
        }),
        (["metrics"], Get) => Ok(Reply {
            status: 200,
            body: app.metrics.render(app.pool.stats()).into_bytes(),
            headers: vec![("Content-Type", "text/plain; version=0.0.4".into())],
        }),
        (["healthz"], Get) => {
            db::ping(&app.pool)?;
            Ok(Reply::json(200, &json!({"status": "ok"})))
        }
        (
            ["register"] | ["login"] | ["coupons", _, "claim"] | ["admin", "claims", _, "void"],
            _,
        ) => Err(ApiError::MethodNotAllowed("POST")),
        (
            ["coupons"]
            | ["users", "me", "history"]
            | ["healthz"]
            | ["admin", "coupons", _, "claims"]
            | ["admin", "audit"]
            | ["metrics"]
            | ["openapi.json"]
            | ["docs"],
            _,
        ) => Err(ApiError::MethodNotAllowed("GET")),
        (["admin", "coupons"], _) => Err(ApiError::MethodNotAllowed("GET, POST")),
        (["admin", "coupons", _], _) => Err(ApiError::MethodNotAllowed("GET, PUT, DELETE")),
        _ => Err(ApiError::RouteNotFound),
    }
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
    let forwarded: Vec<&str> = rq
        .headers()
        .iter()
        .filter(|h| h.field.equiv("X-Forwarded-For"))
        .map(|h| h.value.as_str())
        .collect();
    app.limits
        .client(rq.remote_addr().map(|a| a.ip()), &forwarded)
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
fn list(app: &App, rq: &Request, url: &str) -> Result<Reply> {
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

fn admin_list(app: &App, rq: &Request, url: &str) -> Result<Reply> {
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

fn admin_get(app: &App, rq: &Request, id: &str) -> Result<Reply> {
    admin(app, rq)?;
    let id: CouponId = id.parse()?;
    let c = coupon::admin_get(&app.pool, id)?;
    let mut reply = Reply::json(200, &c);
    reply.headers.push(("ETag", etag(c.coupon.version)));
    Ok(reply)
}

/// A coupon with its `ETag`: its version, which counts admin changes (not claims), so an
/// `If-Match` from a read still holds while claims come and go.
fn tagged(c: &coupon::Coupon) -> Reply {
    let mut reply = Reply::json(200, c);
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

fn audit_log(app: &App, rq: &Request, url: &str) -> Result<Reply> {
    admin(app, rq)?;
    let page = page(url)?;
    let items = coupons::audit::list(&app.pool, page)?;
    Ok(paged(url, page, &items, |e| e.id))
}

fn admin_claims(app: &App, rq: &Request, url: &str, id: &str) -> Result<Reply> {
    admin(app, rq)?;
    let id: CouponId = id.parse()?;
    let page = page(url)?;
    let items = claim::coupon_claims(&app.pool, id, page)?;
    Ok(paged(url, page, &items, |c| c.claim_id.0))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoidBody {
    reason: String,
}

fn void(app: &App, rq: &mut Request, id: &str) -> Result<Reply> {
    let who = admin(app, rq)?;
    let id: ClaimId = id.parse()?;
    let body: VoidBody =
        json_body(rq)?.ok_or_else(|| ApiError::InvalidBody("a reason is required".into()))?;
    if body.reason.trim().is_empty() {
        return Err(Error::invalid("reason", "must not be empty").into());
    }
    let reason = Label::parse("reason", &body.reason, 500)?;
    Ok(Reply::json(
        200,
        &claim::void(&app.pool, who.user_id, id, &reason)?,
    ))
}

fn register(app: &App, rq: &mut Request, url: &str) -> Result<Reply> {
    let ip = client(app, rq);
    let c = credentials(rq, url)?;
    let email = Email::parse(&c.email)?;
    let password = Password::parse(&c.password)?;
    let limit = &app.limits.registrations_per_ip;
    limit.take(&ip).map_err(ApiError::TooManyRequests)?;
    let user = app.auth.register(&app.pool, &email, &password)?;
    Ok(Reply::json(201, &user))
}

fn login(app: &App, rq: &mut Request, url: &str) -> Result<Reply> {
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

fn claim(app: &App, rq: &Request, id: &str) -> Result<Reply> {
    let who = principal(app, rq)?;
    let id: CouponId = id.parse()?;
    let answer = match idempotency_key(rq)? {
        Some(key) => claim::claim_once(&app.pool, who.user_id, id, &key),
        None => Answer {
            result: claim::claim(&app.pool, who.user_id, id),
            replayed: false,
        },
    };
    let outcome = match &answer.result {
        Ok(_) => "claimed".to_owned(),
        Err(e) => super::error::app_parts(e).1,
    };
    app.metrics.claim(&outcome);
    answered(answer, |c| {
        Reply::json(
            201,
            &json!({
                "message": "Coupon claimed successfully",
                "claim": c.claim,
                "available_count": c.available_count,
            }),
        )
    })
}

fn history(app: &App, rq: &Request, url: &str) -> Result<Reply> {
    let who = principal(app, rq)?;
    let page = page(url)?;
    let items = claim::history(&app.pool, who.user_id, page)?;
    Ok(paged(url, page, &items, |h| h.claim_id.0))
}

/// A coupon as sent by an admin; every field optional here, required ones checked below.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CouponBody {
    code: Option<String>,
    available_count: Option<i64>,
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

fn create(app: &App, rq: &mut Request, url: &str) -> Result<Reply> {
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
        rules: {
            let r = b.rules()?;
            Rules {
                name: r.name.flatten(),
                description: r.description.flatten(),
                per_user_limit: r.per_user_limit.flatten(),
                starts_at: r.starts_at.flatten(),
                ends_at: r.ends_at.flatten(),
            }
        },
    };
    let answer = match key {
        Some(key) => coupon::create_once(&app.pool, who.user_id, &new, &key),
        None => Answer {
            result: coupon::create(&app.pool, who.user_id, &new),
            replayed: false,
        },
    };
    answered(answer, |c| Reply::json(201, &c))
}

fn update(app: &App, rq: &mut Request, url: &str, id: &str) -> Result<Reply> {
    let who = admin(app, rq)?;
    let if_version = if_match(rq)?;
    let id: CouponId = id.parse()?;
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

fn delete(app: &App, rq: &Request, id: &str) -> Result<Reply> {
    let who = admin(app, rq)?;
    let id: CouponId = id.parse()?;
    coupon::delete(&app.pool, who.user_id, id)?;
    Ok(Reply::json(200, &json!({"detail": "Coupon deleted"})))
}

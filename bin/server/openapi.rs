//! The OpenAPI 3.1 document of every route (`GET /openapi.json`), built from the route table's
//! operations. Swagger UI renders it on `GET /docs` (bin/server/pages.rs).

use super::routes::{Id, ROUTES};
use serde_json::{json, Map, Value};

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq)]
pub enum Who {
    Anyone,
    User,
    Admin,
}

/// A route's operation: summary, caller, request body schema, parameters, success and error
/// statuses, and the headers of its success.
pub struct Op {
    pub summary: &'static str,
    pub who: Who,
    /// The request body's schema, by name in [`schemas`], ending in `?` when the body may be
    /// left out; `None` for no body.
    pub body: Option<&'static str>,
    /// Query and header parameters, by key in [`parameter`].
    pub params: &'static [&'static str],
    /// The success status and its body: a schema name in [`schemas`], a media type (with a
    /// `/`) for a body that is not JSON, or `""` for a JSON document of any shape.
    pub ok: (u16, &'static str),
    /// Headers of the success answer, by name in [`header`] (`X-Request-Id` is on every answer).
    pub headers: &'static [&'static str],
    pub errors: &'static [u16],
}

/// The parameters of a paged list.
pub const PAGED: &[&str] = &["limit", "after"];

/// What every string a person wrote (a name, a reason) must match: no control character but
/// a line feed (`Label::parse`).
/// The largest amount of money, in minor units (`coupons::Amount::MAX`).
const AMOUNT_MAX: i64 = coupons::Amount::MAX;
const NO_CONTROL: &str = r"^[^\x00-\x09\x0b-\x1f\x7f-\x9f]*$";

/// A status, `ACTIVE` or `INACTIVE` in any case (`Status::parse`).
fn status_schema() -> Value {
    json!({"type": "string", "pattern": "^([Aa][Cc][Tt][Ii][Vv][Ee]|[Ii][Nn][Aa][Cc][Tt][Ii][Vv][Ee])$",
        "description": "ACTIVE or INACTIVE, in any case"})
}

/// A query or header parameter, by its key in `Op::params`. A `seed ` key is the original
/// service's query form of a body field: read only when no body is sent, so anything goes
/// beside a body.
fn parameter(key: &str) -> Value {
    let text = json!({"type": "string"});
    let (name, place, schema, description) = match key {
        "limit" => ("limit", "query", json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
            "Items on the page"),
        "after" => ("after", "query", json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}),
            "The cursor from a Link: rel=\"next\" header"),
        "status" => ("status", "query", status_schema(), "Only coupons with this status"),
        "code status" => ("status", "query", json!({"enum": ["unassigned", "assigned"]}),
            "Only codes with this status"),
        "format" => ("format", "query", json!({"enum": ["json", "csv"], "default": "json"}),
            "csv: every code (with status, if given) as text/csv (code,status,claim_id), streamed"),
        "q" => ("q", "query", text, "Only coupons whose code starts with this"),
        "event type" => ("type", "query", json!({"enum": coupons::events::TYPES}), "Only events of this type"),
        "Idempotency-Key" => ("Idempotency-Key", "header",
            json!({"type": "string", "pattern": "^[ -~]{0,254}[!-~]$"}),
            "1 to 255 printable ASCII characters, not ending in a space; a retry with the same key gets the same answer"),
        "If-Match" => ("If-Match", "header", text, "An ETag from a read: 412 if the coupon has changed since"),
        seed if seed.starts_with("seed ") => (&seed[5..], "query", text,
            "The original service's form of the body field: read only when no body is sent"),
        other => panic!("no parameter {other}"),
    };
    json!({"name": name, "in": place, "schema": schema, "description": description})
}

/// A response header, by name in `Op::headers`: whether every such answer has it, and its
/// schema.
fn header(name: &str) -> Value {
    let (required, schema) = match name {
        "X-Request-Id" => (
            true,
            json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}),
        ),
        "Retry-After" => (true, json!({"type": "integer", "minimum": 0})),
        "WWW-Authenticate" => (true, json!({"const": "Bearer"})),
        "ETag" => (true, json!({"type": "string", "pattern": "^\"v[0-9]+\"$"})),
        "Link" => (
            false,
            json!({"type": "string", "description": "<URL>; rel=\"next\" on a full page"}),
        ),
        "Idempotent-Replayed" => (
            false,
            json!({"const": "true", "description": "The answer repeats the key's first one"}),
        ),
        other => panic!("no header {other}"),
    };
    json!({"required": required, "schema": schema})
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Malformed JSON (malformed_json)",
        401 => "No, bad, expired or foreign token; unknown user (missing_token, invalid_token, token_expired, unknown_user, invalid_credentials)",
        403 => "Not an admin (admin_required)",
        404 => "No such coupon, claim or file, or an id that is not a number",
        409 => "Conflict: sold_out, inactive, not_started, expired, limit_reached, code_taken, code_used, code_locked, terms_locked, stock_from_codes, email_taken, already_voided, hold_expired, not_active, already_redeemed, order_below_minimum",
        411 => "Chunked body; send a Content-Length (length_required)",
        412 => "If-Match names an older version (precondition_failed)",
        413 => "Body over 64 KiB, 8 MiB for an import of codes (payload_too_large)",
        415 => "Body is not application/json (unsupported_media_type)",
        422 => "Invalid input (invalid_<field>, invalid_body, invalid_value, idempotency_key_reused, order_mismatch, currency_mismatch, pattern_exhausted)",
        429 => "Too many attempts; see Retry-After (too_many_requests)",
        503 => "Database unavailable, busy, overloaded or shutting down; see Retry-After",
        _ => "",
    }
}

/// The headers an error status always carries.
fn error_headers(status: u16) -> &'static [&'static str] {
    match status {
        401 => &["WWW-Authenticate"],
        429 | 503 => &["Retry-After"],
        _ => &[],
    }
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A request body's object: exactly these properties, `required` among them.
fn body(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "additionalProperties": false, "required": required, "properties": properties})
}

fn schemas() -> Value {
    let ts = json!({"type": "string", "format": "date-time"});
    let nts = json!({"type": ["string", "null"], "format": "date-time"});
    let nstr = json!({"type": ["string", "null"]});
    let label =
        |max: u32| json!({"type": ["string", "null"], "maxLength": max, "pattern": NO_CONTROL});
    let coupon = json!({"type": "object", "properties": {
        "id": {"type": "integer"}, "code": {"type": "string"},
        "available_count": {"type": "integer"}, "total_count": {"type": "integer"},
        "status": {"enum": ["ACTIVE", "INACTIVE"]}, "name": nstr, "description": nstr,
        "per_user_limit": {"type": ["integer", "null"]}, "starts_at": nts, "ends_at": nts,
        "version": {"type": "integer"}, "limit_reached": {"type": "boolean"},
        "code_count": {"type": "integer", "description": "Its unique codes; 0 for a plain coupon"},
        "percent_off": {"type": ["integer", "null"]}, "amount_off": {"type": ["integer", "null"]},
        "currency": nstr, "min_order_amount": {"type": ["integer", "null"]},
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}}}});
    // A coupon as an admin sends it (`CouponBody`): the limits of Stock, CouponCode, Label,
    // PerUserLimit and Timestamp.
    let coupon_fields = json!({
        "code": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "available_count": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
        "status": status_schema(),
        "name": label(200),
        "description": label(2000),
        "per_user_limit": {"type": ["integer", "null"], "minimum": 1, "maximum": 1_000_000},
        "starts_at": nts, "ends_at": nts,
        "percent_off": {"type": ["integer", "null"], "minimum": 1, "maximum": 100},
        "amount_off": {"type": ["integer", "null"], "minimum": 1, "maximum": AMOUNT_MAX},
        "currency": {"type": ["string", "null"], "pattern": "^[A-Z]{3}$"},
        "min_order_amount": {"type": ["integer", "null"], "minimum": 0, "maximum": AMOUNT_MAX},
        "metadata": {"type": ["object", "null"], "maxProperties": 50,
            "propertyNames": {"minLength": 1, "maxLength": 40},
            "additionalProperties": {"type": "string", "maxLength": 500}}});
    // A new coupon's value: never both percent_off and amount_off; a currency with an amount.
    let value_rules = json!({"allOf": [
        {"not": {"required": ["percent_off", "amount_off"],
            "properties": {"percent_off": {"type": "integer"}, "amount_off": {"type": "integer"}}}},
        {"if": {"required": ["amount_off"], "properties": {"amount_off": {"type": "integer"}}},
            "then": {"required": ["currency"], "properties": {"currency": {"type": "string"}}}},
        {"if": {"required": ["min_order_amount"], "properties": {"min_order_amount": {"type": "integer"}}},
            "then": {"required": ["currency"], "properties": {"currency": {"type": "string"}}}}]});
    let mut new_coupon = body(&["code", "available_count"], coupon_fields.clone());
    if let (Some(o), Some(rules)) = (new_coupon.as_object_mut(), value_rules.as_object()) {
        o.extend(rules.clone());
    }
    // A change's value is checked against the stored coupon too; only "never both" is the
    // request's own.
    let mut change = body(&[], coupon_fields);
    if let Some(o) = change.as_object_mut() {
        o.insert("not".into(), value_rules["allOf"][0]["not"].clone());
    }
    let claim_status =
        json!({"enum": ["held", "claimed", "redeemed", "released", "expired", "voided"]});
    let claim_props = json!({"id": {"type": "integer"}, "coupon_id": {"type": "integer"},
        "code": {"type": "string"}, "name": nstr, "claimed_at": ts, "status": claim_status, "expires_at": nts,
        "assigned_code": {"type": ["string", "null"], "description": "The unique code it was given; kept after it ends"}});
    let claim = json!({"type": "object", "properties": claim_props});
    let nint = json!({"type": ["integer", "null"]});
    let mut record_props = claim_props.clone();
    if let Some(p) = record_props.as_object_mut() {
        for (k, v) in [
            ("user_id", json!({"type": "integer"})),
            ("redeemed_at", nts.clone()),
            ("order_id", nstr.clone()),
            ("order_amount", nint.clone()),
            ("order_currency", nstr.clone()),
            ("discount_amount", nint.clone()),
            ("voided_at", nts.clone()),
            ("void_reason", nstr.clone()),
        ] {
            p.insert(k.into(), v);
        }
    }
    let record = json!({"type": "object", "properties": record_props});
    let with_claim_id = |extra: Value| {
        let mut props = record_props.clone();
        if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
            p.insert("claim_id".into(), json!({"type": "integer"}));
            p.extend(e.clone());
        }
        json!({"type": "object", "properties": props})
    };
    let history_entry = with_claim_id(json!({}));
    // null: no hold, as when left out.
    let hold = json!({"type": ["integer", "null"], "minimum": 1, "maximum": 86400});
    let count = json!({"type": "integer"});
    let admin_coupon = json!({"allOf": [schema_ref("Coupon"), {"type": "object", "properties": {
        "held": count, "claimed": count, "redeemed": count, "voided": count, "released": count,
        "expired": count, "deleted_at": nts}}]});
    let list = |item: &str| json!({"type": "array", "items": schema_ref(item)});
    let codes = json!({
        // Closed, with exactly one of: count and pattern (and charset), or codes alone.
    "NewCodes": {"type": "object", "additionalProperties": false,
        "properties": {
            "count": {"type": "integer", "minimum": 1, "maximum": 100_000},
            "pattern": {"type": "string", "allOf": [{"pattern": "^[A-Za-z0-9_#-]{1,64}$"},
                {"pattern": "#"}], "description": "Each # is a character of charset; at least one #"},
            "charset": {"type": "string", "pattern": "^[A-Za-z0-9_-]{2,64}$",
                "default": coupons::codes::DEFAULT_CHARSET,
                "description": "Distinct characters, case-insensitively"},
            "codes": {"type": "array", "minItems": 1, "maxItems": 100_000,
                "items": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}},
        "oneOf": [
            {"required": ["count", "pattern"], "not": {"required": ["codes"]}},
            {"required": ["codes"], "not": {"anyOf": [{"required": ["count"]},
                {"required": ["pattern"]}, {"required": ["charset"]}]}}]},
    "CodesAdded": {"type": "object", "properties": {"coupon_id": {"type": "integer"},
        "added": {"type": "integer"}, "total_codes": {"type": "integer"},
        "available_count": {"type": "integer"}}},
    "Code": {"type": "object", "properties": {"id": {"type": "integer"},
        "code": {"type": "string"}, "status": {"enum": ["unassigned", "assigned"]},
        "claim_id": {"type": ["integer", "null"]}}},
    "CodeList": list("Code"),
    });
    let mut all = json!({
        "Error": {"type": "object", "required": ["detail", "code"], "properties": {
            "detail": {"type": "string"}, "code": {"type": "string"}}},
        "Credentials": body(&["email", "password"], json!({
            "email": {"type": "string", "format": "email", "maxLength": 254},
            "password": {"type": "string", "minLength": 8, "maxLength": 72, "description": "8 to 72 bytes"}})),
        "User": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"},
            "role": {"enum": ["USER", "ADMIN"]}}},
        "Token": {"type": "object", "properties": {"token": {"type": "string"}, "access_token": {"type": "string"},
            "token_type": {"const": "bearer"}, "expires_in": {"type": "integer"}}},
        "Coupon": coupon,
        "CouponList": list("Coupon"),
        "NewCoupon": new_coupon,
        "CouponChange": change,
        "AdminCoupon": admin_coupon,
        "AdminCouponList": list("AdminCoupon"),
        "Claim": claim,
        "ClaimResult": {"type": "object", "properties": {"message": {"type": "string"},
            "claim": schema_ref("Claim"), "available_count": {"type": "integer"}}},
        "HistoryEntry": history_entry,
        "History": list("HistoryEntry"),
        "CouponClaim": with_claim_id(json!({"email": {"type": "string"}})),
        "ClaimRecord": record,
        "ClaimOptions": body(&[], json!({"hold_seconds": hold})),
        "ClaimByCode": body(&["code"], json!({
            "code": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "hold_seconds": hold})),
        "Eligibility": {"type": "object", "properties": {"coupon_id": {"type": "integer"},
            "eligible": {"type": "boolean"},
            "reason": {"enum": [null, "sold_out", "inactive", "not_started", "expired", "limit_reached"]},
            "available_count": {"type": "integer"}, "claimed_by_you": {"type": "integer"}}},
        "CouponClaims": list("CouponClaim"),
        "RedeemRequest": body(&["order_id", "order_amount", "currency"], json!({
            "order_id": {"type": "string", "pattern": "^[ -~]{1,64}$"},
            "order_amount": {"type": "integer", "minimum": 0, "maximum": AMOUNT_MAX},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}})),
        "Redemption": {"type": "object", "properties": {"claim_id": {"type": "integer"},
            "coupon_id": {"type": "integer"}, "status": {"const": "redeemed"},
            "order_id": {"type": "string"}, "order_amount": {"type": "integer"},
            "currency": {"type": "string"}, "discount_amount": {"type": "integer"},
            "redeemed_at": ts}},
        // Not only white space (the void handler), and a `Label` of at most 500.
        "VoidRequest": body(&["reason"], json!({"reason": {"type": "string", "minLength": 1, "maxLength": 500,
            "allOf": [{"pattern": NO_CONTROL}, {"pattern": r"\S"}]}})),
        "Voided": {"type": "object", "properties": {"claim_id": {"type": "integer"}, "coupon_id": {"type": "integer"},
            "voided_at": ts, "voided_by": {"type": "integer"}, "reason": {"type": "string"}}},
        "AuditEntry": {"type": "object", "properties": {"id": {"type": "integer"}, "actor_id": {"type": "integer"},
            "action": {"type": "string"}, "coupon_id": {"type": ["integer", "null"]}, "claim_id": {"type": ["integer", "null"]},
            "detail": {}, "created_at": ts}},
        "Audit": list("AuditEntry"),
        "Detail": {"type": "object", "properties": {"detail": {"type": "string"}}},
        "Health": {"type": "object", "properties": {"status": {"const": "ok"}}},
    });
    for more in [codes, event_schemas()] {
        if let (Some(all), Some(more)) = (all.as_object_mut(), more.as_object()) {
            all.extend(more.clone());
        }
    }
    all
}

/// The event feed's and webhooks' schemas.
fn event_schemas() -> Value {
    let ts = json!({"type": "string", "format": "date-time"});
    let list = |item: &str| json!({"type": "array", "items": schema_ref(item)});
    json!({
        "Event": {"type": "object", "required": ["id", "type", "created_at", "data"], "properties": {
            "id": {"type": "integer", "description": "Rising in commit order: ask for after=<the last id seen>"},
            "type": {"enum": coupons::events::TYPES}, "created_at": ts,
            "data": {"type": "object", "description": "The coupon, the claim (with coupon_id and status) or the codes added, as the change left it"}}},
        "Events": list("Event"),
        "NewWebhook": body(&["url", "events"], json!({
            "url": {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
                "description": "http or https; a private, loopback or link-local address is refused (422 webhook_url_not_allowed) unless WEBHOOK_ALLOW_PRIVATE=on"},
            "events": {"type": "array", "minItems": 1, "maxItems": 20,
                "items": {"enum": coupons::events::TYPES.iter().copied().chain(["*"]).collect::<Vec<_>>()}},
            "description": {"type": ["string", "null"], "maxLength": 500, "pattern": NO_CONTROL}})),
        "Webhook": {"type": "object", "properties": {"id": {"type": "integer"}, "url": {"type": "string"},
            "events": {"type": "array", "items": {"type": "string"}}, "description": {"type": ["string", "null"]},
            "created_at": ts}},
        "CreatedWebhook": {"type": "object", "required": ["id", "url", "events", "secret"], "properties": {
            "id": {"type": "integer"}, "url": {"type": "string"},
            "events": {"type": "array", "items": {"type": "string"}}, "description": {"type": ["string", "null"]},
            "created_at": ts, "secret": {"type": "string", "pattern": "^whsec_[0-9a-f]{64}$",
                "description": "Signs deliveries (Coupons-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">); shown only here"}}},
        "Webhooks": list("Webhook"),
        "Delivery": {"type": "object", "properties": {"id": {"type": "integer"}, "event_id": {"type": "integer"},
            "event_type": {"type": "string"}, "attempted_at": ts, "status_code": {"type": ["integer", "null"]},
            "error": {"type": ["string", "null"]}, "outcome": {"enum": ["delivered", "failed", "gave_up"]},
            "next_attempt_at": {"anyOf": [ts, {"type": "null"}]}}},
        "Deliveries": list("Delivery"),
    })
}

/// A response: its description, its body (a schema name, a media type, or `""` for any JSON)
/// and its headers, `X-Request-Id` first.
fn response(description: &str, body: &str, headers: &[&str]) -> Value {
    let content = match body {
        "" => json!({"application/json": {"schema": {}}}),
        // A schema and a media type: JSON, or that media type (e.g. a `format=csv`).
        both if both.contains('|') => {
            let (name, media) = both.split_once('|').unwrap_or((both, ""));
            json!({"application/json": {"schema": schema_ref(name)},
                media: {"schema": {"type": "string"}}})
        }
        // One media type, or several (`text/css,image/png`), e.g. a page's files.
        media if media.contains('/') => media
            .split(',')
            .map(|m| (m.to_owned(), json!({"schema": {"type": "string"}})))
            .collect::<Map<String, Value>>()
            .into(),
        name => json!({"application/json": {"schema": schema_ref(name)}}),
    };
    let headers: Map<String, Value> = std::iter::once(&"X-Request-Id")
        .chain(headers)
        .map(|h| (h.to_string(), header(h)))
        .collect();
    json!({"description": description, "content": content, "headers": headers})
}

/// The OpenAPI 3.1 document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let op = &route.doc;
        // A keyed request's answer, success or refusal, may be a replay.
        let keyed = op.params.contains(&"Idempotency-Key");
        let replayed: &[&str] = if keyed { &["Idempotent-Replayed"] } else { &[] };
        let mut responses = Map::new();
        let ok_headers: Vec<&str> = op.headers.iter().chain(replayed).copied().collect();
        responses.insert(op.ok.0.to_string(), response("OK", op.ok.1, &ok_headers));
        for &status in op.errors.iter().chain(&[503]) {
            let headers: Vec<&str> = error_headers(status)
                .iter()
                .chain(replayed)
                .copied()
                .collect();
            responses.insert(
                status.to_string(),
                response(reason(status), "Error", &headers),
            );
        }
        let mut operation = json!({"summary": op.summary, "responses": responses});
        let mut parameters: Vec<Value> = op.params.iter().map(|p| parameter(p)).collect();
        let id = json!({"type": "integer", "minimum": 1, "maximum": u64::MAX});
        let path_param = match route.id {
            Some(Id::Coupon | Id::Claim | Id::Webhook) => Some(("id", id)),
            Some(Id::File) => Some(("file", json!({"enum": super::pages::files(route.path())}))),
            None => None,
        };
        if let Some((name, schema)) = path_param {
            parameters.insert(
                0,
                json!({"name": name, "in": "path", "required": true, "schema": schema}),
            );
        }
        if !parameters.is_empty() {
            operation["parameters"] = json!(parameters);
        }
        if let Some(body) = op.body {
            let (name, required) = body.strip_suffix('?').map_or((body, true), |n| (n, false));
            operation["requestBody"] = json!({"required": required, "content": {"application/json": {"schema": schema_ref(name)}}});
        }
        if op.who != Who::Anyone {
            operation["security"] = json!([{"bearer": []}, {"token": []}]);
        }
        if op.who == Who::Admin {
            operation["description"] =
                json!("Admins only: the role is checked in the database on every request.");
        }
        let entry = paths.entry(route.path()).or_insert_with(|| json!({}));
        entry[route.method().to_ascii_lowercase()] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "coupons", "version": env!("CARGO_PKG_VERSION"),
            "description": "A concurrency-safe coupon service. Every error is {detail, code}."},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "token": {"type": "apiKey", "in": "header", "name": "token"}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_referred_to_exists() {
        let doc = document();
        let text = doc.to_string();
        for name in text.split("#/components/schemas/").skip(1) {
            let name = name.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "missing schema {name}"
            );
        }
    }
}

//! The OpenAPI 3.1 document of every route (`GET /openapi.json`), built from the route table's
//! operations, and a page that renders it for people (`GET /docs`), self-contained: no script
//! or style from elsewhere.

use super::routes::ROUTES;
use serde_json::{json, Map, Value};

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq)]
pub enum Who {
    Anyone,
    User,
    Admin,
}

/// A route's operation: summary, caller, request body schema, success and error statuses.
/// A summary that says `paged`, `Idempotency-Key` or `If-Match` documents those parameters.
pub struct Op {
    pub summary: &'static str,
    pub who: Who,
    pub body: Option<&'static str>,
    pub ok: (u16, &'static str),
    pub errors: &'static [u16],
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Malformed JSON (malformed_json)",
        401 => "No, bad, expired or foreign token; unknown user (missing_token, invalid_token, token_expired, unknown_user, invalid_credentials)",
        403 => "Not an admin (admin_required)",
        404 => "No such coupon or claim, or an id that is not a number",
        409 => "Conflict: sold_out, inactive, not_started, expired, limit_reached, code_taken, code_locked, email_taken, already_voided, hold_expired, not_active, already_redeemed, order_below_minimum",
        411 => "Chunked body; send a Content-Length (length_required)",
        412 => "If-Match names an older version (precondition_failed)",
        413 => "Body over 64 KiB (payload_too_large)",
        415 => "Body is not application/json (unsupported_media_type)",
        422 => "Invalid input (invalid_<field>, invalid_body, idempotency_key_reused, order_mismatch, currency_mismatch)",
        429 => "Too many attempts; see Retry-After (too_many_requests)",
        _ => "",
    }
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn schemas() -> Value {
    let ts = json!({"type": "string", "format": "date-time"});
    let nts = json!({"type": ["string", "null"], "format": "date-time"});
    let nstr = json!({"type": ["string", "null"]});
    let coupon = json!({"type": "object", "properties": {
        "id": {"type": "integer"}, "code": {"type": "string"},
        "available_count": {"type": "integer"}, "total_count": {"type": "integer"},
        "status": {"enum": ["ACTIVE", "INACTIVE"]}, "name": nstr, "description": nstr,
        "per_user_limit": {"type": ["integer", "null"]}, "starts_at": nts, "ends_at": nts,
        "version": {"type": "integer"}, "limit_reached": {"type": "boolean"}}});
    let rules = json!({
        "name": nstr, "description": nstr, "per_user_limit": {"type": ["integer", "null"], "minimum": 1},
        "starts_at": nts, "ends_at": nts});
    let mut new_coupon = json!({"type": "object", "required": ["code", "available_count"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "available_count": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
        "status": {"enum": ["ACTIVE", "INACTIVE"]}}});
    let mut change = new_coupon.clone();
    change.as_object_mut().map(|o| o.remove("required"));
    for s in [&mut new_coupon, &mut change] {
        if let (Some(props), Some(extra)) = (s["properties"].as_object_mut(), rules.as_object()) {
            props.extend(extra.clone());
        }
    }
    let claim_status =
        json!({"enum": ["held", "claimed", "redeemed", "released", "expired", "voided"]});
    let claim_props = json!({"id": {"type": "integer"}, "coupon_id": {"type": "integer"},
        "code": {"type": "string"}, "name": nstr, "claimed_at": ts, "status": claim_status, "expires_at": nts});
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
    let hold = json!({"type": "integer", "minimum": 1, "maximum": 86400});
    let admin_coupon = json!({"allOf": [schema_ref("Coupon"), {"type": "object", "properties": {
        "claimed": {"type": "integer"}, "deleted_at": nts}}]});
    let list = |item: &str| json!({"type": "array", "items": schema_ref(item)});
    json!({
        "Error": {"type": "object", "required": ["detail", "code"], "properties": {
            "detail": {"type": "string"}, "code": {"type": "string"}}},
        "Credentials": {"type": "object", "required": ["email", "password"], "properties": {
            "email": {"type": "string", "format": "email"},
            "password": {"type": "string", "minLength": 8, "description": "8 to 72 bytes"}}},
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
        "ClaimOptions": {"type": "object", "properties": {"hold_seconds": hold}},
        "ClaimByCode": {"type": "object", "required": ["code"], "properties": {
            "code": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "hold_seconds": hold}},
        "Eligibility": {"type": "object", "properties": {"coupon_id": {"type": "integer"},
            "eligible": {"type": "boolean"},
            "reason": {"enum": [null, "sold_out", "inactive", "not_started", "expired", "limit_reached"]},
            "available_count": {"type": "integer"}, "claimed_by_you": {"type": "integer"}}},
        "CouponClaims": list("CouponClaim"),
        "VoidRequest": {"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string", "maxLength": 500}}},
        "Voided": {"type": "object", "properties": {"claim_id": {"type": "integer"}, "coupon_id": {"type": "integer"},
            "voided_at": ts, "voided_by": {"type": "integer"}, "reason": {"type": "string"}}},
        "AuditEntry": {"type": "object", "properties": {"id": {"type": "integer"}, "actor_id": {"type": "integer"},
            "action": {"type": "string"}, "coupon_id": {"type": ["integer", "null"]}, "claim_id": {"type": ["integer", "null"]},
            "detail": {}, "created_at": ts}},
        "Audit": list("AuditEntry"),
        "Detail": {"type": "object", "properties": {"detail": {"type": "string"}}},
        "Health": {"type": "object", "properties": {"status": {"const": "ok"}}},
    })
}

/// The OpenAPI 3.1 document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let op = &route.doc;
        let mut responses = Map::new();
        let ok = if op.ok.1.is_empty() {
            json!({"description": "OK"})
        } else {
            json!({"description": "OK", "content": {"application/json": {"schema": schema_ref(op.ok.1)}}})
        };
        responses.insert(op.ok.0.to_string(), ok);
        let mut errors: Vec<u16> = op.errors.to_vec();
        errors.push(503);
        for status in errors {
            let description = if status == 503 {
                "Database unavailable, busy, overloaded or shutting down; see Retry-After"
            } else {
                reason(status)
            };
            responses.insert(
                status.to_string(),
                json!({"description": description, "content": {"application/json": {"schema": schema_ref("Error")}}}),
            );
        }
        let mut operation = json!({"summary": op.summary, "responses": responses});
        let mut parameters = Vec::new();
        if route.id.is_some() {
            parameters.push(json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1}}));
        }
        if op.summary.contains("paged") {
            parameters.push(json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}));
            parameters.push(json!({"name": "after", "in": "query", "description": "The cursor from a Link: rel=\"next\" header", "schema": {"type": "string"}}));
        }
        if op.summary.contains("Idempotency-Key") {
            parameters.push(json!({"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "minLength": 1, "maxLength": 255}}));
        }
        if op.summary.contains("If-Match") {
            parameters
                .push(json!({"name": "If-Match", "in": "header", "schema": {"type": "string"}}));
        }
        if !parameters.is_empty() {
            operation["parameters"] = json!(parameters);
        }
        if let Some(body) = op.body {
            operation["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema_ref(body)}}});
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

/// A page that renders the document: a section per operation, with its parameters, body and
/// responses. Everything is inline.
pub const DOCS_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>coupons API</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{margin-bottom:.2rem} .op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.6rem 1rem}
.m{font-weight:bold;display:inline-block;min-width:4.5rem} .GET{color:#1a7f37}.POST{color:#0550ae}
.PUT{color:#9a6700}.DELETE{color:#cf222e} code,pre{background:#f6f8fa;border-radius:4px;padding:.1rem .3rem}
pre{padding:.5rem;overflow:auto;font-size:.85rem} .r{margin:.1rem 0}
</style></head><body>
<h1>coupons API</h1><p id="desc">Loading /openapi.json …</p><div id="ops"></div>
<script>
fetch('/openapi.json').then(r => r.json()).then(doc => {
  document.getElementById('desc').textContent = doc.info.description + ' (OpenAPI ' + doc.openapi + ')';
  const ops = document.getElementById('ops');
  const resolve = s => s && s.$ref ? doc.components.schemas[s.$ref.split('/').pop()] : s;
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const div = document.createElement('div'); div.className = 'op';
      const m = method.toUpperCase();
      div.innerHTML = '<div><span class="m ' + m + '">' + m + '</span><code class="path"></code></div><p class="summary"></p>';
      div.querySelector('.path').textContent = path;
      div.querySelector('.summary').textContent = op.summary + (op.security ? ' (token required)' : '');
      if (op.parameters) {
        const p = document.createElement('p');
        p.textContent = 'Parameters: ' + op.parameters.map(x => x.name + ' (' + x.in + ')').join(', ');
        div.appendChild(p);
      }
      if (op.requestBody) {
        const pre = document.createElement('pre');
        pre.textContent = 'Body: ' + JSON.stringify(resolve(op.requestBody.content['application/json'].schema), null, 2);
        div.appendChild(pre);
      }
      for (const [status, r] of Object.entries(op.responses)) {
        const line = document.createElement('div'); line.className = 'r';
        line.textContent = status + ' ' + r.description;
        div.appendChild(line);
      }
      ops.appendChild(div);
    }
  }
  document.body.setAttribute('data-rendered', String(ops.children.length));
});
</script></body></html>
"#;

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

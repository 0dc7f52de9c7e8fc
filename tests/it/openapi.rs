//! The OpenAPI document against the server: each limit the document declares is sent at its
//! edge and just past it, and the server must agree (Schemathesis, tests/schemathesis/, fuzzes
//! the rest). What Schemathesis found the server doing wrong is pinned here too.

use crate::support::{Resp, Service, TestDb, JSON};
use mysql::prelude::Queryable;
use serde_json::{json, Value};

struct Fixture {
    svc: Service,
    doc: Value,
    auth: String,
    _db: TestDb,
}

impl Fixture {
    fn new() -> Fixture {
        let db = TestDb::new();
        let svc = Service::start(&db);
        let token = svc.register("admin@example.com");
        db.conn()
            .exec_drop("UPDATE users SET role = 'ADMIN'", ())
            .unwrap();
        let doc = svc.call("GET", "/openapi.json", &[], None).body;
        let auth = format!("Bearer {token}");
        Fixture {
            svc,
            doc,
            auth,
            _db: db,
        }
    }

    /// A request as the admin, with a JSON body and `extra` headers.
    fn admin(&self, method: &str, path: &str, extra: &[(&str, &str)], body: &Value) -> Resp {
        let mut headers = vec![JSON, ("Authorization", self.auth.as_str())];
        headers.extend_from_slice(extra);
        self.svc
            .call(method, path, &headers, Some(&body.to_string()))
    }

    /// A property of a body schema in the document.
    fn prop(&self, schema: &str, prop: &str) -> &Value {
        &self.doc["components"]["schemas"][schema]["properties"][prop]
    }

    /// A parameter of an operation in the document.
    fn param(&self, method: &str, path: &str, name: &str) -> &Value {
        let params = self.doc["paths"][path][method]["parameters"].as_array();
        let found = params.and_then(|ps| ps.iter().find(|p| p["name"] == name));
        &found.unwrap_or_else(|| panic!("{method} {path} documents no {name}"))["schema"]
    }
}

/// `r` is `status`, and a refusal names `code`.
#[track_caller]
fn expect(r: &Resp, status: u16, code: &str, case: &str) {
    assert_eq!(r.status, status, "{case}: {}", r.body);
    if !code.is_empty() {
        assert_eq!(r.body["code"], code, "{case}");
    }
}

#[test]
fn each_documented_limit_is_the_servers() {
    let f = Fixture::new();
    let mut n = 0;
    let mut create = |field: &str, value: Value| {
        n += 1;
        let mut body = json!({"code": format!("C{n}"), "available_count": 1});
        body[field] = value;
        f.admin("POST", "/admin/coupons", &[], &body)
    };
    // Numbers: the documented minimum and maximum pass, one beyond each is refused.
    for field in ["available_count", "per_user_limit"] {
        let schema = f.prop("NewCoupon", field);
        let (min, max) = (schema["minimum"].as_i64(), schema["maximum"].as_i64());
        let (min, max) = (min.unwrap(), max.unwrap());
        expect(&create(field, json!(min)), 201, "", field);
        expect(&create(field, json!(max)), 201, "", field);
        let invalid = format!("invalid_{field}");
        expect(&create(field, json!(min - 1)), 422, &invalid, field);
        expect(&create(field, json!(max + 1)), 422, &invalid, field);
    }
    // Text: the documented maximum length passes, one more is refused; a line feed passes the
    // documented pattern and the server, any other control character neither.
    for field in ["name", "description"] {
        let max = f.prop("NewCoupon", field)["maxLength"].as_u64().unwrap() as usize;
        let pattern = f.prop("NewCoupon", field)["pattern"].as_str().unwrap();
        assert_eq!(pattern, r"^[^\x00-\x09\x0b-\x1f\x7f-\x9f]*$", "{field}");
        let invalid = format!("invalid_{field}");
        expect(&create(field, json!("é".repeat(max))), 201, "", field);
        expect(
            &create(field, json!("é".repeat(max + 1))),
            422,
            &invalid,
            field,
        );
        expect(&create(field, json!("two\nlines")), 201, "", field);
        for bad in ["\u{0}", "\t", "\r", "\u{1b}", "\u{7f}", "\u{85}", "\u{9f}"] {
            expect(
                &create(field, json!(format!("a{bad}b"))),
                422,
                &invalid,
                field,
            );
        }
        expect(&create(field, json!("\u{a0}ok")), 201, "", field);
    }
    let code = f.prop("NewCoupon", "code")["pattern"].as_str().unwrap();
    assert_eq!(code, "^[A-Za-z0-9_-]{1,64}$");
    expect(&create("code", json!("a".repeat(64))), 201, "", "code");
    expect(
        &create("code", json!("a".repeat(65))),
        422,
        "invalid_code",
        "code",
    );
    // Status: the documented pattern takes any case.
    expect(&create("status", json!("inActive")), 201, "", "status");
    expect(
        &create("status", json!("ACTIVE ")),
        422,
        "invalid_status",
        "status",
    );
    // `null` is no value for a field the document does not make nullable (it was taken as
    // absent: a 201 or 200).
    for field in ["code", "available_count", "status"] {
        let types = &f.prop("NewCoupon", field)["type"];
        assert!(!types.to_string().contains("null"), "{field}: {types}");
        expect(&create(field, Value::Null), 422, "invalid_body", field);
        let r = f.admin("PUT", "/admin/coupons/1", &[], &json!({ field: null }));
        expect(&r, 422, "invalid_body", field);
    }
}

#[test]
fn a_void_reason_is_what_the_document_says() {
    let f = Fixture::new();
    let reason = f.prop("VoidRequest", "reason");
    assert_eq!(reason["minLength"], 1);
    let max = reason["maxLength"].as_u64().unwrap() as usize;
    // Not only white space: the document's `\S`.
    assert!(
        reason.to_string().contains(r#""pattern":"\\S""#),
        "{reason}"
    );
    let coupon = f.admin(
        "POST",
        "/admin/coupons",
        &[],
        &json!({"code": "V", "available_count": 9}),
    );
    let void = |text: &str| {
        let claim = f.svc.call(
            "POST",
            &format!("/coupons/{}/claim", coupon.body["id"]),
            &[("Authorization", &f.auth)],
            None,
        );
        let id = &claim.body["claim"]["id"];
        f.admin(
            "POST",
            &format!("/admin/claims/{id}/void"),
            &[],
            &json!({ "reason": text }),
        )
    };
    for bad in ["", " \n\t", &"x".repeat(max + 1), "bad\u{1}"] {
        expect(&void(bad), 422, "invalid_reason", &format!("{bad:?}"));
    }
    expect(&void(&"x".repeat(max)), 200, "", "maximum");
}

#[test]
fn documented_parameters_are_the_servers() {
    let f = Fixture::new();
    let auth = ("Authorization", f.auth.as_str());
    // A paging cursor is a whole number: an empty or non-numeric one is refused.
    let after = f.param("get", "/coupons", "after");
    assert_eq!(after["type"], "integer");
    assert_eq!(after["minimum"], 0);
    assert_eq!(after["maximum"], u64::MAX);
    for (query, status) in [
        ("after=0", 200),
        (&format!("after={}", u64::MAX), 200),
        ("after=", 422),
        ("after=x1", 422),
        ("after=-1", 422),
        ("after=18446744073709551616", 422),
    ] {
        let r = f.svc.call("GET", &format!("/coupons?{query}"), &[], None);
        expect(&r, status, "", query);
    }
    let limit = f.param("get", "/admin/audit", "limit");
    let max = limit["maximum"].as_u64().unwrap();
    for (n, status) in [(1, 200), (max, 200), (0, 422), (max + 1, 422)] {
        let r = f
            .svc
            .call("GET", &format!("/admin/audit?limit={n}"), &[auth], None);
        expect(&r, status, "", &format!("limit={n}"));
    }
    // `q` is any text: one no code can start with finds nothing (it was a 500: the code
    // column's ASCII collation against an emoji).
    for q in ["%F0%9F%98%8D", "%C3%A9", "a%20", "%25"] {
        let r = f
            .svc
            .call("GET", &format!("/admin/coupons?q={q}"), &[auth], None);
        expect(&r, 200, "", q);
        assert_eq!(r.body, json!([]), "{q}");
    }
    // Idempotency-Key: 1 to 255 printable ASCII, not ending in a space; a tab is refused.
    let key = f.param("post", "/admin/coupons", "Idempotency-Key");
    assert_eq!(key["pattern"], "^[ -~]{0,254}[!-~]$");
    let long = "k".repeat(255);
    for (n, (key, status)) in [
        (long.as_str(), 201),
        (&"k".repeat(256), 422),
        ("a\tb", 422),
        ("a b", 201),
        ("~", 201),
    ]
    .into_iter()
    .enumerate()
    {
        let body = json!({"code": format!("K{n}"), "available_count": 1});
        let r = f.admin("POST", "/admin/coupons", &[("Idempotency-Key", key)], &body);
        let code = if status == 422 {
            "invalid_idempotency_key"
        } else {
            ""
        };
        expect(&r, status, code, &format!("{key:?}"));
    }
}

#[test]
fn a_password_of_72_bytes_registers_and_logs_in() {
    let f = Fixture::new();
    let password = f.prop("Credentials", "password");
    assert_eq!(password["maxLength"], 72);
    // 72 bytes was a 500: the bcrypt crate's non-truncating hash counts the NUL it appends.
    let last_byte_counts = ["é".repeat(35) + "ab", "é".repeat(35) + "ac"];
    let body = |p: &str| json!({"email": "long@example.com", "password": p}).to_string();
    let r = f.svc.call(
        "POST",
        "/register",
        &[JSON],
        Some(&body(&last_byte_counts[0])),
    );
    expect(&r, 201, "", "72 bytes");
    let r = f
        .svc
        .call("POST", "/login", &[JSON], Some(&body(&last_byte_counts[0])));
    expect(&r, 200, "", "login");
    for wrong in [&last_byte_counts[1], &(last_byte_counts[0].clone() + "x")] {
        let r = f.svc.call("POST", "/login", &[JSON], Some(&body(wrong)));
        expect(&r, 401, "invalid_credentials", wrong);
    }
    let r = f
        .svc
        .call("POST", "/register", &[JSON], Some(&body(&"x".repeat(73))));
    expect(&r, 422, "invalid_password", "73 bytes");
}

#[test]
fn every_request_body_is_closed_and_unknown_fields_are_refused() {
    let f = Fixture::new();
    let cases = [
        (
            "POST",
            "/register",
            "Credentials",
            json!({"email": "u@example.com", "password": "password123"}),
        ),
        (
            "POST",
            "/admin/coupons",
            "NewCoupon",
            json!({"code": "X", "available_count": 1}),
        ),
        (
            "PUT",
            "/admin/coupons/1",
            "CouponChange",
            json!({"name": "x"}),
        ),
        (
            "POST",
            "/admin/claims/1/void",
            "VoidRequest",
            json!({"reason": "x"}),
        ),
        (
            "POST",
            "/coupons/1/claim",
            "ClaimOptions",
            json!({"hold_seconds": 5}),
        ),
        ("POST", "/claims", "ClaimByCode", json!({"code": "X"})),
        (
            "POST",
            "/admin/coupons/1/codes",
            "NewCodes",
            json!({"codes": ["X"]}),
        ),
        (
            "POST",
            "/claims/1/redeem",
            "RedeemRequest",
            json!({"order_id": "A-1", "order_amount": 1, "currency": "EUR"}),
        ),
        (
            "POST",
            "/admin/webhooks",
            "NewWebhook",
            json!({"url": "https://shop.example/hook", "events": ["*"]}),
        ),
    ];
    // Every body the document names is a case here.
    let mut named: Vec<&str> = f.doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|ops| ops.as_object().unwrap().values())
        .filter_map(|op| {
            op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str()
        })
        .map(|r| r.trim_start_matches("#/components/schemas/"))
        .collect();
    named.sort();
    named.dedup();
    let mut covered: Vec<&str> = cases.iter().map(|c| c.2).collect();
    covered.sort();
    assert_eq!(named, covered);
    for (method, path, schema, mut body) in cases {
        let s = &f.doc["components"]["schemas"][schema];
        assert_eq!(s["additionalProperties"], false, "{schema}");
        body["unknown"] = json!(1);
        let r = f.admin(method, path, &[], &body);
        expect(&r, 422, "invalid_body", schema);
    }
}

#[test]
fn documented_response_headers_are_sent() {
    let f = Fixture::new();
    // The document: X-Request-Id on every response, Retry-After on every 429 and 503.
    for (path, ops) in f.doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                let headers = &response["headers"];
                let case = format!("{method} {path} {status}");
                assert_eq!(headers["X-Request-Id"]["required"], true, "{case}");
                if status == "429" || status == "503" {
                    assert_eq!(headers["Retry-After"]["required"], true, "{case}");
                }
            }
        }
    }
    let coupon = &f.doc["paths"]["/admin/coupons/{id}"];
    assert_eq!(
        coupon["get"]["responses"]["200"]["headers"]["ETag"]["required"],
        true
    );
    assert_eq!(
        coupon["put"]["responses"]["200"]["headers"]["ETag"]["required"],
        true
    );
    // The server: X-Request-Id on successes and refusals alike, an ETag of the documented
    // form, a Link on a full page.
    let auth = ("Authorization", f.auth.as_str());
    for code in ["E1", "E2"] {
        let body = json!({"code": code, "available_count": 1});
        expect(
            &f.admin("POST", "/admin/coupons", &[], &body),
            201,
            "",
            code,
        );
    }
    for (path, status) in [
        ("/admin/coupons/1", 200),
        ("/admin/coupons/999", 404),
        ("/admin/coupons?limit=1", 200),
        ("/admin/coupons?limit=0", 422),
    ] {
        let r = f.svc.call("GET", path, &[auth], None);
        expect(&r, status, "", path);
        let id = &r.headers["x-request-id"];
        assert!(!id.is_empty() && id.len() <= 128, "{path}: {id}");
    }
    let etag = &f.svc.call("GET", "/admin/coupons/1", &[auth], None).headers["etag"];
    assert!(etag.starts_with("\"v") && etag.ends_with('"'), "{etag}");
    let page = f.svc.call("GET", "/admin/coupons?limit=1", &[auth], None);
    assert!(page.headers["link"].ends_with(r#">; rel="next""#));
}

//! The real binary over HTTP: the seed's two scenarios, every route and every error status.

use crate::library::{forge, forge_claims};
use crate::support::{request, send, Resp, Service, TestDb, JSON, SECRET};
use mysql::prelude::Queryable;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread;

pub(crate) fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

/// Promotes through SQL, as the seed's README does.
pub(crate) fn make_admin(db: &TestDb, svc: &Service, email: &str) -> String {
    let token = svc.register(email);
    db.conn()
        .exec_drop("UPDATE users SET role = 'ADMIN' WHERE email = ?", (email,))
        .unwrap();
    token
}

fn create_coupon(svc: &Service, admin: &str, code: &str, stock: i64) -> u64 {
    let body = format!(r#"{{"code":"{code}","available_count":{stock}}}"#);
    let auth = bearer(admin);
    let r = svc.call(
        "POST",
        "/admin/coupons",
        &[JSON, (auth.0, &auth.1)],
        Some(&body),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_u64().unwrap()
}

/// Claims in parallel, one request per token, and returns the statuses.
fn claim_in_parallel(svc: &Service, coupon: u64, tokens: &[String]) -> Vec<u16> {
    thread::scope(|s| {
        let handles: Vec<_> = tokens
            .iter()
            .map(|t| {
                let path = format!("/coupons/{coupon}/claim");
                // The seed's own header.
                s.spawn(move || svc.call("POST", &path, &[("token", t)], None))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                if r.status == 409 {
                    assert_eq!(r.body["code"], "sold_out", "{}", r.body);
                }
                r.status
            })
            .collect()
    })
}

fn count(statuses: &[u16], f: impl Fn(u16) -> bool) -> usize {
    statuses.iter().filter(|s| f(**s)).count()
}

#[test]
fn seed_scenario_one_token_ten_parallel_claims_stock_three() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@gmail.com");
    let coupon = create_coupon(&svc, &admin, "SEED1", 3);
    let user = svc.register("user@example.com");
    let statuses = claim_in_parallel(&svc, coupon, &vec![user; 10]);
    assert_eq!(count(&statuses, |s| s == 201), 3, "{statuses:?}");
    assert_eq!(count(&statuses, |s| s == 409), 7, "{statuses:?}");
    assert_eq!(count(&statuses, |s| s >= 500), 0, "{statuses:?}");
    assert_eq!(db.stock(coupon), (0, 3, 3));
}

#[test]
fn seed_scenario_five_users_stock_three() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@gmail.com");
    let coupon = create_coupon(&svc, &admin, "SEED2", 3);
    let users: Vec<String> = (0..5)
        .map(|i| svc.register(&format!("u{i}@example.com")))
        .collect();
    let statuses = claim_in_parallel(&svc, coupon, &users);
    assert_eq!(
        (
            count(&statuses, |s| s == 201),
            count(&statuses, |s| s == 409),
            count(&statuses, |s| s >= 500)
        ),
        (3, 2, 0),
        "{statuses:?}"
    );
    assert_eq!(db.stock(coupon), (0, 3, 3));
    assert_eq!(db.scalar("SELECT COUNT(DISTINCT user_id) FROM claims"), 3);
}

#[test]
fn many_users_claim_over_http() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let coupon = create_coupon(&svc, &admin, "DROP", 40);
    let users: Vec<String> = (0..20)
        .map(|i| svc.register(&format!("m{i}@example.com")))
        .collect();
    let tokens: Vec<String> = users.iter().cycle().take(100).cloned().collect();
    let statuses = claim_in_parallel(&svc, coupon, &tokens);
    assert_eq!(
        (
            count(&statuses, |s| s == 201),
            count(&statuses, |s| s == 409)
        ),
        (40, 60)
    );
    assert_eq!(db.stock(coupon), (0, 40, 40));
}

#[test]
fn a_hot_coupon_over_http_is_combined_and_exact() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let coupon = create_coupon(&svc, &admin, "HOTDROP", 200);
    let users: Vec<String> = (0..30)
        .map(|i| svc.register(&format!("h{i}@example.com")))
        .collect();
    let metrics = |svc: &Service| -> String {
        let r = svc.call("GET", "/metrics", &[("token", &admin)], None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.body.as_str().unwrap_or_default().to_owned()
    };
    let queued = |svc: &Service| metric(&metrics(svc), "coupons_claims_queued");
    // Hold the coupon so that the claims pile up behind the first, then let go.
    let mut holder = db.conn();
    holder.query_drop("START TRANSACTION").unwrap();
    holder
        .exec_drop("SELECT id FROM coupons WHERE id = ? FOR UPDATE", (coupon,))
        .unwrap();
    let answers: Vec<(u16, serde_json::Value)> = thread::scope(|s| {
        let handles: Vec<_> = (0..300)
            .map(|i| {
                let (svc, token) = (&svc, &users[i % users.len()]);
                s.spawn(move || {
                    let path = format!("/coupons/{coupon}/claim");
                    let r = svc.call("POST", &path, &[("token", token)], None);
                    (r.status, r.body)
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // A queued claim holds no thread: it waits in its lane, and so can many.
        while queued(&svc) < 50 {
            assert!(std::time::Instant::now() < deadline, "claims never queued");
            thread::sleep(std::time::Duration::from_millis(10));
        }
        holder.query_drop("ROLLBACK").unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(
        (
            count(&statuses, |s| s == 201),
            count(&statuses, |s| s == 409)
        ),
        (200, 100),
        "{statuses:?}"
    );
    // Every success has its own claim and saw its own count of what was left.
    let mut ids: Vec<u64> = answers
        .iter()
        .filter_map(|a| a.1["claim"]["id"].as_u64())
        .collect();
    let mut left: Vec<u64> = answers
        .iter()
        .filter_map(|a| a.1["available_count"].as_u64())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    left.sort_unstable();
    assert_eq!(ids.len(), 200);
    assert_eq!(left, (0..200).collect::<Vec<u64>>());
    assert_eq!(db.stock(coupon), (0, 200, 200));
    let m = metrics(&svc);
    assert!(metric(&m, "coupons_claims_combined_total") >= 50, "{m}");
}

#[test]
fn pipelined_requests_never_wedge_the_lanes() {
    use std::io::{Read, Write};
    let db = TestDb::new();
    let svc = Service::spawn(&[
        ("DATABASE_URL", db.url.as_str()),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
        ("LOGIN_FAILS_PER_EMAIL_PER_MIN", "0"),
        ("LOGIN_FAILS_PER_IP_PER_MIN", "0"),
    ]);
    // Three logins (each for the bcrypt threads) pipelined on one connection, from 8
    // connections at once, 300 times: each connection gets its three answers. (Passed to the
    // lanes out of order, this wedged the bcrypt threads within a few hundred rounds.)
    let body = r#"{"email":"nobody@example.com","password":"wrong-password"}"#;
    let one = |close: bool| {
        format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    let three = format!("{}{}{}", one(false), one(false), one(true));
    for round in 0..300 {
        thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let mut c = std::net::TcpStream::connect(&svc.addr).unwrap();
                    c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                        .unwrap();
                    c.write_all(three.as_bytes()).unwrap();
                    let mut answer = String::new();
                    let _ = c.read_to_string(&mut answer);
                    let n = answer.matches("HTTP/1.1 401").count();
                    assert_eq!(n, 3, "round {round}: {answer:?}");
                });
            }
        });
    }
}

/// A metric's value in a Prometheus text page.
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {page}"))
}

/// One case of the route table: a request and the status and error code it must get.
#[track_caller]
fn check(
    svc: &Service,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    status: u16,
    code: &str,
) -> Resp {
    let r = svc.call(method, path, headers, body);
    let case = format!("{method} {path} {body:?}");
    assert_eq!(r.status, status, "{case}: {}", r.body);
    if !code.is_empty() {
        assert_eq!(r.body["code"], code, "{case}: {}", r.body);
        assert!(r.body["detail"].is_string(), "{case}: {}", r.body);
    }
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some("application/json"),
        "{case}"
    );
    r
}

#[test]
fn every_route_and_error_status() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let s = &svc;
    let admin_tok = make_admin(&db, s, "admin@example.com");
    let admin_h = bearer(&admin_tok);
    let admin = [JSON, (admin_h.0, admin_h.1.as_str())];

    // Register.
    let r = check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(r#"{"email":"ada@example.com","password":"password123"}"#),
        201,
        "",
    );
    assert_eq!(r.body["email"], "ada@example.com");
    assert_eq!(r.body["role"], "USER");
    assert!(r.body.get("password_hash").is_none() && !r.body.to_string().contains("$2b$"));
    check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(r#"{"email":"ADA@example.com","password":"password123"}"#),
        409,
        "email_taken",
    );
    check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(r#"{"email":"nope","password":"password123"}"#),
        422,
        "invalid_email",
    );
    check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(r#"{"email":"b@example.com","password":"short"}"#),
        422,
        "invalid_password",
    );
    let long = format!(
        r#"{{"email":"b@example.com","password":"{}"}}"#,
        "p".repeat(73)
    );
    check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(&long),
        422,
        "invalid_password",
    );
    check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(r#"{"email":"b@example.com"}"#),
        422,
        "invalid_body",
    );
    check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(r#"{"email":"b@example.com","password":"password123","role":"ADMIN"}"#),
        422,
        "invalid_body",
    );
    check(
        s,
        "POST",
        "/register",
        &[JSON],
        Some(r#"{"email":"#),
        400,
        "malformed_json",
    );
    check(
        s,
        "POST",
        "/register",
        &[("Content-Type", "text/plain")],
        Some(r#"{"email":"b@example.com","password":"password123"}"#),
        415,
        "unsupported_media_type",
    );
    check(s, "POST", "/register", &[], None, 422, "invalid_body");
    // The seed's query-string form.
    check(
        s,
        "POST",
        "/register?email=seed%40example.com&password=password123",
        &[],
        None,
        201,
        "",
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM users WHERE role = 'ADMIN'"),
        1
    );

    // Login.
    let r = check(
        s,
        "POST",
        "/login",
        &[JSON],
        Some(r#"{"email":"ada@example.com","password":"password123"}"#),
        200,
        "",
    );
    assert_eq!(r.body["token"], r.body["access_token"]);
    assert_eq!(
        (r.body["token_type"].as_str(), r.body["expires_in"].as_u64()),
        (Some("bearer"), Some(7200))
    );
    let ada = r.body["token"].as_str().unwrap().to_owned();
    check(
        s,
        "POST",
        "/login?email=seed@example.com&password=password123",
        &[],
        None,
        200,
        "",
    );
    let wrong = check(
        s,
        "POST",
        "/login",
        &[JSON],
        Some(r#"{"email":"ada@example.com","password":"password124"}"#),
        401,
        "invalid_credentials",
    );
    let unknown = check(
        s,
        "POST",
        "/login",
        &[JSON],
        Some(r#"{"email":"who@example.com","password":"password123"}"#),
        401,
        "invalid_credentials",
    );
    assert_eq!(wrong.body, unknown.body);

    // Admin routes: who may call them.
    let body = Some(r#"{"code":"W10","available_count":5}"#);
    let ada_h = bearer(&ada);
    let user = [JSON, (ada_h.0, ada_h.1.as_str())];
    check(
        s,
        "POST",
        "/admin/coupons",
        &[JSON],
        body,
        401,
        "missing_token",
    );
    check(
        s,
        "POST",
        "/admin/coupons",
        &user,
        body,
        403,
        "admin_required",
    );
    check(
        s,
        "POST",
        "/admin/coupons",
        &[JSON, ("token", &ada)],
        body,
        403,
        "admin_required",
    );
    let r = check(s, "POST", "/admin/coupons", &admin, body, 201, "");
    assert_eq!(
        r.body,
        serde_json::json!({"id": r.body["id"], "code": "W10", "available_count": 5, "total_count": 5, "status": "ACTIVE",
            "name": null, "description": null, "per_user_limit": null, "starts_at": null, "ends_at": null,
            "percent_off": null, "amount_off": null, "currency": null, "min_order_amount": null, "metadata": null,
            "version": 1, "code_count": 0})
    );
    let w10 = r.body["id"].as_u64().unwrap();
    check(
        s,
        "POST",
        "/admin/coupons",
        &admin,
        Some(r#"{"code":"w10","available_count":5}"#),
        409,
        "code_taken",
    );
    for (bad, code) in [
        (r#"{"code":"","available_count":5}"#, "invalid_code"),
        (
            &*format!(r#"{{"code":"{}","available_count":5}}"#, "X".repeat(65)),
            "invalid_code",
        ),
        (
            r#"{"code":"X' OR 1=1 --","available_count":5}"#,
            "invalid_code",
        ),
        (
            r#"{"code":"NEG","available_count":-1}"#,
            "invalid_available_count",
        ),
        (
            r#"{"code":"BIG","available_count":99999999999999999999}"#,
            "invalid_body",
        ),
        (r#"{"code":"STR","available_count":"5"}"#, "invalid_body"),
        (r#"{"code":"NOCOUNT"}"#, "invalid_available_count"),
        (
            r#"{"code":"ST","available_count":1,"status":"PAUSED"}"#,
            "invalid_status",
        ),
        (
            r#"{"code":"ST","available_count":1,"extra":1}"#,
            "invalid_body",
        ),
    ] {
        check(s, "POST", "/admin/coupons", &admin, Some(bad), 422, code);
    }
    check(
        s,
        "POST",
        "/admin/coupons?code=QS&available_count=2&status=INACTIVE",
        &[admin[1]],
        None,
        201,
        "",
    );
    check(
        s,
        "POST",
        "/admin/coupons?code=QS2&available_count=two",
        &[admin[1]],
        None,
        422,
        "invalid_available_count",
    );
    assert_eq!(db.scalar("SELECT COUNT(*) FROM coupons"), 2);

    // Listing shows active coupons only.
    let r = check(s, "GET", "/coupons", &[], None, 200, "");
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert_eq!(r.body[0]["code"], "W10");

    // Claims.
    let path = format!("/coupons/{w10}/claim");
    check(s, "POST", &path, &[], None, 401, "missing_token");
    let mut tampered = ada.clone();
    tampered.push('x');
    check(
        s,
        "POST",
        &path,
        &[("Authorization", &format!("Bearer {tampered}"))],
        None,
        401,
        "invalid_token",
    );
    let expired = forge(SECRET, 2, -3600, "HS256");
    check(
        s,
        "POST",
        &path,
        &[("Authorization", &format!("Bearer {expired}"))],
        None,
        401,
        "token_expired",
    );
    let foreign = forge("another-secret-another-secret-another", 2, 3600, "HS256");
    check(
        s,
        "POST",
        &path,
        &[("Authorization", &format!("Bearer {foreign}"))],
        None,
        401,
        "invalid_token",
    );
    let r = check(s, "POST", &path, &user, None, 201, "");
    assert_eq!(r.body["message"], "Coupon claimed successfully");
    assert_eq!(r.body["available_count"], 4);
    assert_eq!(r.body["claim"]["coupon_id"], w10);
    assert_eq!(r.body["claim"]["code"], "W10");
    assert!(r.body["claim"]["claimed_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let claim_id = r.body["claim"]["id"].clone();
    check(
        s,
        "POST",
        "/coupons/999999/claim",
        &user,
        None,
        404,
        "coupon_not_found",
    );
    for id in ["abc", "-1", "0", "1;DROP", "99999999999999999999"] {
        check(
            s,
            "POST",
            &format!("/coupons/{id}/claim"),
            &user,
            None,
            404,
            "coupon_not_found",
        );
    }
    let qs = db.scalar("SELECT id FROM coupons WHERE code = 'QS'");
    check(
        s,
        "POST",
        &format!("/coupons/{qs}/claim"),
        &user,
        None,
        409,
        "inactive",
    );

    // History.
    check(
        s,
        "GET",
        "/users/me/history",
        &[],
        None,
        401,
        "missing_token",
    );
    let r = check(s, "GET", "/users/me/history", &user, None, 200, "");
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert_eq!(r.body[0]["claim_id"], claim_id);
    assert_eq!(r.body[0]["code"], "W10");

    // Update.
    let upath = format!("/admin/coupons/{w10}");
    check(
        s,
        "PUT",
        &upath,
        &user,
        Some(r#"{"available_count":1}"#),
        403,
        "admin_required",
    );
    let r = check(
        s,
        "PUT",
        &upath,
        &admin,
        Some(r#"{"available_count":1}"#),
        200,
        "",
    );
    assert_eq!(
        (
            r.body["available_count"].as_u64(),
            r.body["total_count"].as_u64()
        ),
        (Some(1), Some(2))
    );
    check(
        s,
        "PUT",
        &upath,
        &admin,
        Some(r#"{"code":"qs"}"#),
        409,
        "code_locked",
    );
    check(
        s,
        "PUT",
        &format!("/admin/coupons/{qs}"),
        &admin,
        Some(r#"{"code":"w10"}"#),
        409,
        "code_taken",
    );
    check(
        s,
        "PUT",
        &upath,
        &admin,
        Some(r#"{"available_count":-5}"#),
        422,
        "invalid_available_count",
    );
    check(
        s,
        "PUT",
        &upath,
        &admin,
        Some(r#"{"status":"maybe"}"#),
        422,
        "invalid_status",
    );
    check(
        s,
        "PUT",
        "/admin/coupons/424242",
        &admin,
        Some(r#"{"status":"ACTIVE"}"#),
        404,
        "coupon_not_found",
    );
    check(
        s,
        "PUT",
        "/admin/coupons/x",
        &admin,
        Some(r#"{"status":"ACTIVE"}"#),
        404,
        "coupon_not_found",
    );
    check(
        s,
        "PUT",
        &format!("{upath}?status=INACTIVE"),
        &[admin[1]],
        None,
        200,
        "",
    );
    check(
        s,
        "PUT",
        &format!("{upath}?status=ACTIVE"),
        &[admin[1]],
        None,
        200,
        "",
    );
    check(s, "POST", &path, &user, None, 201, "");
    check(s, "POST", &path, &user, None, 409, "sold_out");
    assert_eq!(db.stock(w10), (0, 2, 2));

    // Delete: hidden, unclaimable, history kept.
    check(s, "DELETE", &upath, &user, None, 403, "admin_required");
    let r = check(s, "DELETE", &upath, &admin, None, 200, "");
    assert_eq!(r.body["detail"], "Coupon deleted");
    check(s, "DELETE", &upath, &admin, None, 404, "coupon_not_found");
    check(s, "POST", &path, &user, None, 404, "coupon_not_found");
    let r = check(s, "GET", "/coupons", &[], None, 200, "");
    assert_eq!(r.body, serde_json::json!([]));
    let r = check(s, "GET", "/users/me/history", &user, None, 200, "");
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM claims"), 2);

    // Health, unknown routes, wrong methods.
    let r = check(s, "GET", "/healthz", &[], None, 200, "");
    assert_eq!(r.body["status"], "ok");
    check(s, "GET", "/nope", &[], None, 404, "not_found");
    check(
        s,
        "GET",
        "/coupons/1/claim/extra",
        &[],
        None,
        404,
        "not_found",
    );
    for path in ["/login/", "//login", "/coupons/", "/"] {
        check(s, "POST", path, &[JSON], Some("{}"), 404, "not_found");
    }
    for (method, path, allow) in [
        ("GET", "/register", "POST"),
        ("DELETE", "/coupons", "GET, HEAD"),
        ("GET", "/coupons/1/claim", "POST"),
        ("POST", "/admin/coupons/1", "GET, HEAD, PUT, DELETE"),
        ("PATCH", "/users/me/history", "GET, HEAD"),
    ] {
        let r = check(s, method, path, &[], None, 405, "method_not_allowed");
        assert_eq!(r.headers["allow"], allow);
    }
}

#[test]
fn demotion_and_deleted_users_take_effect_at_once() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "boss@example.com");
    let auth = bearer(&admin);
    let headers = [JSON, (auth.0, auth.1.as_str())];
    let body = Some(r#"{"code":"A1","available_count":1}"#);
    check(&svc, "POST", "/admin/coupons", &headers, body, 201, "");
    db.conn()
        .query_drop("UPDATE users SET role = 'USER' WHERE email = 'boss@example.com'")
        .unwrap();
    // The same token still says ADMIN; the database says otherwise.
    check(
        &svc,
        "POST",
        "/admin/coupons",
        &headers,
        Some(r#"{"code":"A2","available_count":1}"#),
        403,
        "admin_required",
    );

    let ghost = svc.register("ghost@example.com");
    db.conn()
        .query_drop("DELETE FROM users WHERE email = 'ghost@example.com'")
        .unwrap();
    let h = [("token", ghost.as_str())];
    check(
        &svc,
        "GET",
        "/users/me/history",
        &h,
        None,
        401,
        "unknown_user",
    );
    let coupon = db.scalar("SELECT id FROM coupons");
    check(
        &svc,
        "POST",
        &format!("/coupons/{coupon}/claim"),
        &h,
        None,
        401,
        "unknown_user",
    );
    assert_eq!(db.stock(coupon as u64), (1, 0, 1));
}

#[test]
fn oversized_bodies_are_refused() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let big = format!(
        r#"{{"email":"a@example.com","password":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    check(
        &svc,
        "POST",
        "/register",
        &[JSON],
        Some(&big),
        413,
        "payload_too_large",
    );
    // Declared as 10 MB; the server answers without waiting for it.
    let head = "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n";
    let r = send(&svc.addr, head.as_bytes(), b"{");
    assert_eq!(r.status, 413);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM users"), 0);
}

#[test]
fn login_takes_as_long_for_unknown_emails() {
    let db = TestDb::new();
    // A real cost, so that a skipped hash would show.
    let svc = Service::spawn(&[
        ("DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "10"),
    ]);
    svc.register("known@example.com");
    let time = |email: &str| {
        let mut runs: Vec<f64> = (0..5)
            .map(|_| {
                let body = format!(r#"{{"email":"{email}","password":"password999"}}"#);
                let t = std::time::Instant::now();
                let r = request(&svc.addr, "POST", "/login", &[JSON], Some(&body));
                assert_eq!(r.status, 401);
                t.elapsed().as_secs_f64()
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[2]
    };
    let (known, unknown) = (time("known@example.com"), time("unknown@example.com"));
    // Same work either way; a missing hash would make the unknown case ~100x faster.
    assert!(
        unknown > known * 0.3,
        "known {known:.4}s, unknown {unknown:.4}s"
    );
}

#[test]
fn huge_declared_bodies_neither_crash_nor_stall_the_service() {
    let db = TestDb::new();
    // Two workers: a lost worker or a crash would show at once.
    let svc = Service::spawn(&[
        ("DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
        ("WORKERS", "2"),
    ]);
    for length in ["1099511627776", "18446744073709551615", "70000"] {
        for path in ["/register", "/coupons/1/claim", "/nope"] {
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
            );
            let r = send(&svc.addr, head.as_bytes(), b"{\"email\":");
            assert!(
                matches!(r.status, 413 | 404 | 401),
                "{path} {length}: {r:?}"
            );
        }
    }
    for _ in 0..4 {
        assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM users"), 0);
}

#[test]
fn a_burst_of_keep_alive_connections_is_served_at_once() {
    use std::io::{BufRead, BufReader, Read, Write};
    let db = TestDb::new();
    let svc = Service::start(&db);
    // 64 connections opened together, each kept open: every one must get its first answer
    // while the others stay open (tiny_http's task pool used to park some until others closed).
    let conns: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&svc.addr).unwrap())
        .collect();
    let mut readers: Vec<BufReader<std::net::TcpStream>> = conns
        .into_iter()
        .map(|mut c| {
            c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            BufReader::new(c)
        })
        .collect();
    for (i, r) in readers.iter_mut().enumerate() {
        let mut status = String::new();
        r.read_line(&mut status)
            .unwrap_or_else(|e| panic!("connection {i} got no answer: {e}"));
        assert!(status.contains(" 200 "), "connection {i}: {status}");
        let mut rest = [0u8; 256];
        let _ = r.get_mut().set_nonblocking(true);
        let _ = r.read(&mut rest);
    }
}

#[test]
fn idempotent_claims_over_http() {
    use std::io::Write;
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let coupon = create_coupon(&svc, &admin, "IDEM", 10);
    let user = svc.register("user@example.com");
    let auth = bearer(&user);
    let path = format!("/coupons/{coupon}/claim");

    // 50 parallel requests with one key: one claim, and every answer is that claim.
    let answers: Vec<Resp> = thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                s.spawn(|| {
                    svc.call(
                        "POST",
                        &path,
                        &[(auth.0, &auth.1), ("Idempotency-Key", "abc-1")],
                        None,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first_id = answers[0].body["claim"]["id"].clone();
    for a in &answers {
        assert_eq!(a.status, 201, "{}", a.body);
        assert_eq!(a.body["claim"]["id"], first_id);
    }
    let replayed = answers
        .iter()
        .filter(|a| a.headers.get("idempotent-replayed").map(String::as_str) == Some("true"))
        .count();
    assert_eq!(replayed, 49);
    assert_eq!(db.stock(coupon), (9, 1, 10));

    // The client sends a request and drops the connection before the answer; its retry with
    // the same key finds the claim.
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nIdempotency-Key: lost-answer\r\nContent-Length: 0\r\n\r\n",
        auth.1
    );
    let mut stream = std::net::TcpStream::connect(&svc.addr).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    drop(stream);
    // The server goes on with the request; once its claim is in, the retry must find it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db.scalar(&format!(
        "SELECT COUNT(*) FROM claims WHERE coupon_id = {coupon}"
    )) < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the cut-off request was never processed"
        );
        thread::sleep(std::time::Duration::from_millis(20));
    }
    let retry = svc.call(
        "POST",
        &path,
        &[(auth.0, &auth.1), ("Idempotency-Key", "lost-answer")],
        None,
    );
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(
        retry.headers.get("idempotent-replayed").map(String::as_str),
        Some("true")
    );
    assert_eq!(db.stock(coupon), (8, 2, 10));

    // Another user's same key is their own; the same key for another coupon is refused.
    let other = svc.register("other@example.com");
    let r = svc.call(
        "POST",
        &path,
        &[("token", &other), ("Idempotency-Key", "abc-1")],
        None,
    );
    assert_eq!(r.status, 201);
    assert!(!r.headers.contains_key("idempotent-replayed"));
    assert_ne!(r.body["claim"]["id"], first_id);
    let second = create_coupon(&svc, &admin, "IDEM2", 1);
    let r = svc.call(
        "POST",
        &format!("/coupons/{second}/claim"),
        &[(auth.0, &auth.1), ("Idempotency-Key", "abc-1")],
        None,
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    for bad in ["", &"k".repeat(256)] {
        let r = svc.call(
            "POST",
            &path,
            &[(auth.0, &auth.1), ("Idempotency-Key", bad)],
            None,
        );
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (422, Some("invalid_idempotency_key")),
            "{bad:?}"
        );
    }
    assert_eq!(db.stock(coupon), (7, 3, 10));
    assert_eq!(db.stock(second), (1, 0, 1));

    // Admin create: the same key and body give the same coupon; another body is refused.
    let h = bearer(&admin);
    let body = Some(r#"{"code":"KEYED","available_count":4}"#);
    let a = svc.call(
        "POST",
        "/admin/coupons",
        &[JSON, (h.0, &h.1), ("Idempotency-Key", "create-1")],
        body,
    );
    let b = svc.call(
        "POST",
        "/admin/coupons",
        &[JSON, (h.0, &h.1), ("Idempotency-Key", "create-1")],
        body,
    );
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(a.body["id"], b.body["id"]);
    assert_eq!(
        b.headers.get("idempotent-replayed").map(String::as_str),
        Some("true")
    );
    let c = svc.call(
        "POST",
        "/admin/coupons",
        &[JSON, (h.0, &h.1), ("Idempotency-Key", "create-1")],
        Some(r#"{"code":"OTHER","available_count":4}"#),
    );
    assert_eq!(
        (c.status, c.body["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM coupons WHERE code = 'KEYED'"),
        1
    );
}

/// Each keyed request writes a key row, kept 24 hours (issue 16: one account wrote 3,500 a
/// second). Past `KEYED_CLAIMS_PER_USER_PER_MIN`, an account's keyed claims and an admin's keyed
/// creates get 429 with `Retry-After` and write no row; its claims without a key, and another
/// account's keyed claims, go on. A parallel burst, queued on connections' threads or run by
/// workers, gets exactly what the bucket holds.
#[test]
fn keyed_claims_past_the_per_user_limit_get_429_and_write_no_key_row() {
    let db = TestDb::new();
    let svc = Service::start_with(&db, &[("KEYED_CLAIMS_PER_USER_PER_MIN", "5")]);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let coupon = create_coupon(&svc, &admin, "RUSH", 100);
    let (a, b, c) = (
        svc.register("a@example.com"),
        svc.register("b@example.com"),
        svc.register("c@example.com"),
    );
    let path = format!("/coupons/{coupon}/claim");
    let claim = |token: &str, key: Option<&str>| {
        let auth = bearer(token);
        let mut headers = vec![(auth.0, auth.1.as_str())];
        headers.extend(key.map(|k| ("Idempotency-Key", k)));
        svc.call("POST", &path, &headers, None)
    };
    let rows = |email: &str| {
        db.conn()
            .exec_first::<i64, _, _>(
                "SELECT COUNT(*) FROM idempotency_keys k JOIN users u ON u.id = k.user_id
                 WHERE u.email = ?",
                (email,),
            )
            .unwrap()
            .unwrap()
    };
    let refused = |r: &Resp, what: &str| {
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (429, Some("too_many_requests")),
            "{what}: {}",
            r.body
        );
        let wait: u64 = r.headers["retry-after"].parse().unwrap();
        assert!((1..=60).contains(&wait), "{what}: {wait}");
    };
    for i in 0..5 {
        let r = claim(&a, Some(&format!("a-{i}")));
        assert_eq!(r.status, 201, "keyed claim {i}: {}", r.body);
    }
    refused(&claim(&a, Some("a-5")), "the sixth keyed claim");
    assert_eq!(rows("a@example.com"), 5);
    for i in 0..10 {
        let r = claim(&a, None);
        assert_eq!(r.status, 201, "claim {i} without a key: {}", r.body);
    }
    let r = claim(&b, Some("b-0"));
    assert_eq!(r.status, 201, "another account: {}", r.body);
    assert_eq!(rows("b@example.com"), 1);

    // Ten at once: five through, whichever thread reads them.
    let started = std::time::Instant::now();
    let burst: Vec<Resp> = thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let claim = &claim;
                let c = &c;
                s.spawn(move || claim(c, Some(&format!("c-{i}"))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The bucket refills one every 12 s: a slow burst may see one more.
    let refilled = (started.elapsed().as_secs() / 12) as usize;
    let ok = burst.iter().filter(|r| r.status == 201).count();
    assert!((5..=5 + refilled).contains(&ok), "{ok} of 10 went through");
    for r in burst.iter().filter(|r| r.status != 201) {
        refused(r, "the burst");
    }
    assert_eq!(rows("c@example.com"), ok as i64);

    // An admin's keyed creates share the limit; creates without a key do not count.
    let h = bearer(&admin);
    let create = |i: usize| {
        let body = format!(r#"{{"code":"KEYED{i}","available_count":1}}"#);
        let key = format!("create-{i}");
        svc.call(
            "POST",
            "/admin/coupons",
            &[JSON, (h.0, &h.1), ("Idempotency-Key", &key)],
            Some(&body),
        )
    };
    for i in 0..5 {
        assert_eq!(create(i).status, 201, "keyed create {i}");
    }
    refused(&create(5), "the sixth keyed create");
    create_coupon(&svc, &admin, "UNKEYED", 1);
    assert_eq!(rows("admin@example.com"), 5);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM coupons WHERE code = 'KEYED5'"),
        0
    );
    assert_eq!(db.stock(coupon), (84 - ok as i64, 16 + ok as i64, 100));
}

/// A keyed claim on a coupon that does not exist (never did, or deleted) records nothing: its
/// answer depends on nothing stored, so its retry is the same 404, answered afresh. Refusals
/// that depend on the coupon's state (here `sold_out`) are still recorded and replayed.
#[test]
fn a_keyed_claim_on_no_coupon_leaves_no_key_row_and_its_retry_is_a_404() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let gone = create_coupon(&svc, &admin, "GONE", 5);
    let h = bearer(&admin);
    let path = format!("/admin/coupons/{gone}");
    assert_eq!(svc.call("DELETE", &path, &[(h.0, &h.1)], None).status, 200);
    let empty = create_coupon(&svc, &admin, "EMPTY", 0);
    let user = svc.register("user@example.com");
    let auth = bearer(&user);
    let claim = |coupon: u64, key: &str| {
        svc.call(
            "POST",
            &format!("/coupons/{coupon}/claim"),
            &[(auth.0, &auth.1), ("Idempotency-Key", key)],
            None,
        )
    };
    let replayed = |r: &Resp| {
        r.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    };
    for (coupon, key) in [(424_242, "nowhere"), (gone, "deleted")] {
        for attempt in ["first", "retry"] {
            let r = claim(coupon, key);
            assert_eq!(
                (r.status, r.body["code"].as_str(), replayed(&r)),
                (404, Some("coupon_not_found"), false),
                "{key}, {attempt}"
            );
        }
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency_keys"), 0);
    let first = claim(empty, "empty");
    let again = claim(empty, "empty");
    assert_eq!(
        (first.status, first.body["code"].as_str(), replayed(&first)),
        (409, Some("sold_out"), false)
    );
    assert_eq!(
        (again.status, again.body["code"].as_str(), replayed(&again)),
        (409, Some("sold_out"), true)
    );
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency_keys"), 1);
}

#[test]
fn every_bad_token_is_a_401_with_www_authenticate() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let good = svc.register("ada@example.com");
    let ghost = svc.register("ghost@example.com");
    db.conn()
        .query_drop("DELETE FROM users WHERE email = 'ghost@example.com'")
        .unwrap();
    let id = db.scalar("SELECT id FROM users WHERE email = 'ada@example.com'") as u64;
    let now = coupons::Timestamp::now().unix_secs();
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::json!({"iss": "coupons", "sub": id.to_string(), "role": "USER", "iat": now, "exp": now + 600});
        f(&mut c);
        c
    };
    let mut tampered_parts: Vec<String> = good.split('.').map(String::from).collect();
    let forged_payload = forge_claims(SECRET, &claims(&|c| c["sub"] = "1".into()), "HS256");
    tampered_parts[1] = forged_payload.split('.').nth(1).unwrap().to_owned();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            forge_claims(SECRET, &claims(&|_| {}), "none"),
            "invalid_token",
        ),
        (
            "HS512",
            forge_claims(SECRET, &claims(&|_| {}), "HS512"),
            "invalid_token",
        ),
        (
            "RS256 header",
            forge_claims(SECRET, &claims(&|_| {}), "RS256"),
            "invalid_token",
        ),
        (
            "another secret",
            forge_claims(
                "another-secret-another-secret-another",
                &claims(&|_| {}),
                "HS256",
            ),
            "invalid_token",
        ),
        (
            "tampered payload",
            tampered_parts.join("."),
            "invalid_token",
        ),
        (
            "expired",
            forge_claims(
                SECRET,
                &claims(&|c| c["exp"] = (now - 3600).into()),
                "HS256",
            ),
            "token_expired",
        ),
        (
            "no exp",
            forge_claims(
                SECRET,
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                "HS256",
            ),
            "invalid_token",
        ),
        (
            "no sub",
            forge_claims(
                SECRET,
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
                "HS256",
            ),
            "invalid_token",
        ),
        (
            "no iss",
            forge_claims(
                SECRET,
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("iss");
                }),
                "HS256",
            ),
            "invalid_token",
        ),
        (
            "another iss",
            forge_claims(SECRET, &claims(&|c| c["iss"] = "evil".into()), "HS256"),
            "invalid_token",
        ),
        (
            "sub not a number",
            forge_claims(SECRET, &claims(&|c| c["sub"] = "1;DROP".into()), "HS256"),
            "invalid_token",
        ),
        (
            "not valid yet (nbf ahead)",
            forge_claims(
                SECRET,
                &claims(&|c| c["nbf"] = (now + 3600).into()),
                "HS256",
            ),
            "invalid_token",
        ),
        (
            "nbf not a number",
            forge_claims(SECRET, &claims(&|c| c["nbf"] = "soon".into()), "HS256"),
            "invalid_token",
        ),
        ("deleted user", ghost, "unknown_user"),
        ("garbage", "not.a.token".into(), "invalid_token"),
    ];
    for (case, token, code) in cases {
        for headers in [
            vec![("Authorization", format!("Bearer {token}"))],
            vec![("token", token.clone())],
        ] {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = svc.call("GET", "/users/me/history", &h, None);
            assert_eq!(
                (r.status, r.body["code"].as_str()),
                (401, Some(code)),
                "{case}"
            );
            assert_eq!(
                r.headers.get("www-authenticate").map(String::as_str),
                Some("Bearer"),
                "{case}"
            );
        }
    }
    // And the good one still works, with either header; so does one whose `nbf` has passed.
    assert_eq!(
        svc.call("GET", "/users/me/history", &[("token", &good)], None)
            .status,
        200
    );
    let valid_since = forge_claims(SECRET, &claims(&|c| c["nbf"] = (now - 60).into()), "HS256");
    assert_eq!(
        svc.call("GET", "/users/me/history", &[("token", &valid_since)], None)
            .status,
        200
    );
}

/// `HEAD` on every `GET` route of the OpenAPI document answers as the `GET` does (status,
/// type, length), without the body; where the `GET` is refused, so is the `HEAD`.
#[test]
fn head_answers_every_get_route_without_its_body() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let id = create_coupon(&svc, &admin, "HEADS", 3).to_string();
    let auth = bearer(&admin);
    let doc = svc.call("GET", "/openapi.json", &[], None).body;
    let mut gets = 0;
    for (template, methods) in doc["paths"].as_object().unwrap() {
        if methods.get("get").is_none() {
            continue;
        }
        gets += 1;
        let path = template.replace("{id}", &id);
        for headers in [vec![(auth.0, auth.1.as_str())], vec![]] {
            let get = svc.call("GET", &path, &headers, None);
            let head = svc.call("HEAD", &path, &headers, None);
            let case = format!("{path} with {} headers", headers.len());
            assert_eq!(head.status, get.status, "{case}");
            assert_eq!(head.body, serde_json::json!(""), "{case}: a body was sent");
            assert_eq!(
                head.headers.get("content-type"),
                get.headers.get("content-type"),
                "{case}"
            );
            let length = |r: &Resp| r.headers.get("content-length").cloned();
            assert!(length(&head).is_some_and(|l| l != "0"), "{case}");
            // The metrics page counts the requests, so its length moves between two.
            if path != "/metrics" {
                assert_eq!(length(&head), length(&get), "{case}");
            }
        }
    }
    assert!(gets >= 10, "{gets} GET routes");
    // A HEAD where no GET is: the same 405 and 404 as for any other method.
    let r = svc.call("HEAD", "/login", &[], None);
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    assert_eq!(svc.call("HEAD", "/nope", &[], None).status, 404);
}

/// Look-alike addresses are one account: fullwidth letters, upper case, an accent composed
/// (NFC) or decomposed (NFD); an invisible format character is refused.
#[test]
fn look_alike_emails_are_one_account() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let send_credentials = |path: &str, email: &str| {
        let body = serde_json::json!({"email": email, "password": "password123"}).to_string();
        svc.call("POST", path, &[JSON], Some(&body))
    };
    for email in ["admin@example.com", "ren\u{e9}@example.com"] {
        assert_eq!(
            send_credentials("/register", email).status,
            201,
            "{email:?}"
        );
    }
    for (email, status, code) in [
        ("\u{ff41}dmin@example.com", 409, "email_taken"),
        ("\u{ff21}DMIN@EXAMPLE.COM", 409, "email_taken"),
        ("rene\u{301}@example.com", 409, "email_taken"),
        ("admin\u{200b}@example.com", 422, "invalid_email"),
        ("adm\u{200d}in@example.com", 422, "invalid_email"),
        ("admin\u{2066}@example.com", 422, "invalid_email"),
        ("admin@exa\u{ad}mple.com", 422, "invalid_email"),
    ] {
        let r = send_credentials("/register", email);
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (status, Some(code)),
            "{email:?}: {}",
            r.body
        );
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM users"), 2);
    // Each account answers to its look-alike spellings at login too.
    for email in ["\u{ff41}dmin@example.com", "rene\u{301}@example.com"] {
        let r = send_credentials("/login", email);
        assert_eq!(r.status, 200, "{email:?}: {}", r.body);
    }
}

/// A key records its request whole, however long: a keyed create with a 500-character
/// description (once a 500, `Data too long` for the text column) is created, replayed, and
/// told apart from one that differs only at its last character. Value and metadata are part of
/// the request: the same key with another amount, currency or metadata is refused too.
#[test]
fn a_keyed_create_with_a_long_description_is_recorded_whole() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let auth = bearer(&admin);
    let headers = [
        JSON,
        (auth.0, auth.1.as_str()),
        ("Idempotency-Key", "create-long"),
    ];
    let body = |last: char| {
        let description = format!("{}{last}", "d".repeat(499));
        serde_json::json!({"code": "LONG", "available_count": 5, "description": description})
            .to_string()
    };
    let first = svc.call("POST", "/admin/coupons", &headers, Some(&body('a')));
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let again = svc.call("POST", "/admin/coupons", &headers, Some(&body('a')));
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body["id"], first.body["id"]);
    let other = svc.call("POST", "/admin/coupons", &headers, Some(&body('b')));
    assert_eq!(
        (other.status, other.body["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{}",
        other.body
    );

    let headers = [
        JSON,
        (auth.0, auth.1.as_str()),
        ("Idempotency-Key", "create-worth"),
    ];
    let worth = serde_json::json!({"code": "WORTH", "available_count": 5, "amount_off": 500,
        "currency": "EUR", "metadata": {"a": "1"}});
    let first = svc.call("POST", "/admin/coupons", &headers, Some(&worth.to_string()));
    assert_eq!(first.status, 201, "{}", first.body);
    let again = svc.call("POST", "/admin/coupons", &headers, Some(&worth.to_string()));
    assert_eq!(
        (again.status, &again.headers["idempotent-replayed"]),
        (201, &"true".to_owned())
    );
    assert_eq!(again.body["id"], first.body["id"]);
    for (field, other) in [
        ("amount_off", serde_json::json!(600)),
        ("currency", serde_json::json!("USD")),
        ("metadata", serde_json::json!({"a": "2"})),
        ("metadata", serde_json::json!(null)),
        ("min_order_amount", serde_json::json!(0)),
    ] {
        let mut body = worth.clone();
        body[field] = other;
        let r = svc.call("POST", "/admin/coupons", &headers, Some(&body.to_string()));
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (422, Some("idempotency_key_reused")),
            "{body}: {}",
            r.body
        );
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM coupons"), 2);
}

/// Everything in the database, as one comparable value.
fn snapshot(db: &TestDb) -> Vec<(String, i64)> {
    db.conn()
        .query::<(String, Option<i64>), _>(
            "CHECKSUM TABLE users, coupons, claims, idempotency_keys",
        )
        .unwrap()
        .into_iter()
        .map(|(t, c)| (t, c.unwrap_or(-1)))
        .collect()
}

#[test]
fn hostile_and_malformed_requests_get_a_4xx_and_change_nothing() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let user = svc.register("user@example.com");
    let taken = create_coupon(&svc, &admin, "TAKEN", 5);
    let other = create_coupon(&svc, &admin, "OTHER", 5);
    let a = format!("Bearer {admin}");
    let u = format!("Bearer {user}");
    let admin_h = [JSON, ("Authorization", a.as_str())];
    let user_h = [("Authorization", u.as_str())];
    let long = |n: usize| "x".repeat(n);
    let nested = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let upd = format!("/admin/coupons/{other}");
    let claim = format!("/coupons/{taken}/claim");
    let long_key = "k".repeat(256);

    type Case<'a> = (
        &'a str,
        String,
        Vec<(&'a str, &'a str)>,
        Option<String>,
        u16,
    );
    let reg = |body: &str, status: u16| -> Case<'_> {
        (
            "POST",
            "/register".into(),
            vec![JSON],
            Some(body.to_owned()),
            status,
        )
    };
    let login = |body: &str, status: u16| -> Case<'_> {
        (
            "POST",
            "/login".into(),
            vec![JSON],
            Some(body.to_owned()),
            status,
        )
    };
    let create = |body: &str, status: u16| -> Case<'_> {
        (
            "POST",
            "/admin/coupons".into(),
            admin_h.to_vec(),
            Some(body.to_owned()),
            status,
        )
    };
    let update = |body: &str, status: u16| -> Case<'_> {
        (
            "PUT",
            upd.clone(),
            admin_h.to_vec(),
            Some(body.to_owned()),
            status,
        )
    };
    let cases: Vec<Case> = vec![
        reg(r#"{"email":"a@x.org","password":"password1""#, 400),
        reg("{", 400),
        reg(
            r#"{"email":"a@x.org","password":"password1"} trailing"#,
            400,
        ),
        reg(&nested, 422),
        reg("[]", 422),
        reg(r#""a string""#, 422),
        reg("null", 422),
        reg("42", 422),
        reg(r#"{"email":1,"password":"password1"}"#, 422),
        reg(r#"{"email":"a@x.org","password":12345678}"#, 422),
        reg(r#"{"email":"a@x.org"}"#, 422),
        reg(r#"{"password":"password1"}"#, 422),
        reg(
            r#"{"email":"a@x.org","password":"password1","role":"ADMIN"}"#,
            422,
        ),
        reg(
            r#"{"email":"a@x.org","password":"password1","is_admin":true}"#,
            422,
        ),
        reg(r#"{"email":"","password":"password1"}"#, 422),
        reg(r#"{"email":"a b@x.org","password":"password1"}"#, 422),
        reg(
            &format!(
                r#"{{"email":"{}@x.org","password":"password1"}}"#,
                long(300)
            ),
            422,
        ),
        reg(r#"{"email":"a\u0000@x.org","password":"password1"}"#, 422),
        reg(
            r#"{"email":"a@x.org' OR '1'='1","password":"password1"}"#,
            422,
        ),
        reg(
            r#"{"email":"'; DROP TABLE users; --@x.org","password":"password1"}"#,
            422,
        ),
        reg(r#"{"email":"a@x.org","password":"short"}"#, 422),
        reg(
            &format!(r#"{{"email":"a@x.org","password":"{}"}}"#, long(73)),
            422,
        ),
        reg(
            &format!(r#"{{"email":"a@x.org","password":"{}"}}"#, "€".repeat(25)),
            422,
        ),
        reg(
            r#"{"email":"user@example.com","password":"password1"}"#,
            409,
        ),
        (
            "POST",
            "/register".into(),
            vec![("Content-Type", "text/plain")],
            Some(r#"{"email":"a@x.org","password":"password1"}"#.into()),
            415,
        ),
        (
            "POST",
            "/register".into(),
            vec![("Content-Type", "application/x-www-form-urlencoded")],
            Some("email=a%40x.org&password=password1".into()),
            415,
        ),
        (
            "POST",
            "/register".into(),
            vec![JSON],
            Some(format!(
                r#"{{"email":"a@x.org","password":"{}"}}"#,
                long(100 * 1024)
            )),
            413,
        ),
        (
            "POST",
            "/register?email=a%40x.org".into(),
            vec![],
            None,
            422,
        ),
        (
            "POST",
            "/register?email=a%40x.org&password=short".into(),
            vec![],
            None,
            422,
        ),
        login("{", 400),
        login(r#"{"email":"user@example.com"}"#, 422),
        login(r#"{"email":"' OR 1=1 --","password":"password1"}"#, 401),
        login(
            r#"{"email":"user@example.com","password":"' OR '1'='1"}"#,
            401,
        ),
        login(
            &format!(
                r#"{{"email":"user@example.com","password":"{}"}}"#,
                long(1000)
            ),
            401,
        ),
        create(r#"{"code":"","available_count":1}"#, 422),
        create(
            &format!(r#"{{"code":"{}","available_count":1}}"#, long(65)),
            422,
        ),
        create(r#"{"code":"has space","available_count":1}"#, 422),
        create(r#"{"code":"ÄBC","available_count":1}"#, 422),
        create(r#"{"code":"A\u0007B","available_count":1}"#, 422),
        create(
            r#"{"code":"x'; DROP TABLE coupons; --","available_count":1}"#,
            422,
        ),
        create(r#"{"code":"NEG","available_count":-1}"#, 422),
        create(r#"{"code":"FLT","available_count":1e3}"#, 422),
        create(r#"{"code":"FLT","available_count":3.5}"#, 422),
        create(r#"{"code":"STR","available_count":"10"}"#, 422),
        create(
            r#"{"code":"BIG","available_count":99999999999999999999}"#,
            422,
        ),
        create(r#"{"code":"BIG","available_count":1000000001}"#, 422),
        create(r#"{"code":"NUL","available_count":null}"#, 422),
        create(
            r#"{"code":"ST","available_count":1,"status":"DELETED"}"#,
            422,
        ),
        create(r#"{"code":"ST","available_count":1,"status":1}"#, 422),
        create(r#"{"code":"TC","available_count":1,"total_count":99}"#, 422),
        create(r#"{"available_count":1}"#, 422),
        create("[]", 422),
        create(r#"{"code":"taken","available_count":1}"#, 409),
        (
            "POST",
            "/admin/coupons".into(),
            vec![JSON],
            Some(r#"{"code":"NT","available_count":1}"#.into()),
            401,
        ),
        (
            "POST",
            "/admin/coupons".into(),
            vec![JSON, ("Authorization", u.as_str())],
            Some(r#"{"code":"UT","available_count":1}"#.into()),
            403,
        ),
        (
            "POST",
            "/admin/coupons".into(),
            vec![JSON, ("Authorization", "Bearer garbage")],
            Some(r#"{"code":"GT","available_count":1}"#.into()),
            401,
        ),
        (
            "POST",
            "/admin/coupons".into(),
            vec![JSON, ("Authorization", "Basic YWRtaW46YWRtaW4=")],
            Some(r#"{"code":"BT","available_count":1}"#.into()),
            401,
        ),
        update(r#"{"available_count":-5}"#, 422),
        update(r#"{"status":"nope"}"#, 422),
        update(r#"{"code":"TAKEN"}"#, 409),
        update(r#"{"code":""}"#, 422),
        update(r#"{"available_count":1,"id":1}"#, 422),
        update("{", 400),
        (
            "PUT",
            "/admin/coupons/abc".into(),
            admin_h.to_vec(),
            Some(r#"{"status":"ACTIVE"}"#.into()),
            404,
        ),
        (
            "PUT",
            "/admin/coupons/-1".into(),
            admin_h.to_vec(),
            Some(r#"{"status":"ACTIVE"}"#.into()),
            404,
        ),
        (
            "PUT",
            "/admin/coupons/1;DROP".into(),
            admin_h.to_vec(),
            Some(r#"{"status":"ACTIVE"}"#.into()),
            404,
        ),
        (
            "PUT",
            "/admin/coupons/99999999999999999999".into(),
            admin_h.to_vec(),
            Some(r#"{"status":"ACTIVE"}"#.into()),
            404,
        ),
        (
            "PUT",
            "/admin/coupons/0".into(),
            admin_h.to_vec(),
            Some(r#"{"status":"ACTIVE"}"#.into()),
            404,
        ),
        (
            "DELETE",
            "/admin/coupons/1%3BDROP".into(),
            admin_h.to_vec(),
            None,
            404,
        ),
        (
            "POST",
            "/coupons/abc/claim".into(),
            user_h.to_vec(),
            None,
            404,
        ),
        (
            "POST",
            "/coupons/1%3BDROP%20TABLE%20claims/claim".into(),
            user_h.to_vec(),
            None,
            404,
        ),
        (
            "POST",
            "/coupons/%E2%82%AC/claim".into(),
            user_h.to_vec(),
            None,
            404,
        ),
        (
            "POST",
            "/coupons/424242/claim".into(),
            user_h.to_vec(),
            None,
            404,
        ),
        (
            "POST",
            claim.clone(),
            vec![
                ("Authorization", u.as_str()),
                ("Idempotency-Key", long_key.as_str()),
            ],
            None,
            422,
        ),
        ("POST", claim.clone(), vec![], None, 401),
        (
            "PATCH",
            "/admin/coupons".into(),
            admin_h.to_vec(),
            None,
            405,
        ),
        (
            "GET",
            "/users/me/history/../../admin".into(),
            vec![],
            None,
            404,
        ),
    ];
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let before = snapshot(&db);
    for (method, path, headers, body, status) in &cases {
        let r = svc.call(method, path, headers, body.as_deref());
        let case = format!(
            "{method} {path} {:?}",
            body.as_deref()
                .map(|b| b.chars().take(80).collect::<String>())
        );
        assert_eq!(r.status, *status, "{case}: {}", r.body);
        assert!(
            r.body["code"].is_string() && r.body["detail"].is_string(),
            "{case}: {}",
            r.body
        );
        assert_eq!(snapshot(&db), before, "{case} changed the database");
    }
    // A header of 64 KiB: refused or cut off, never a 5xx, and the service goes on.
    let head = format!(
        "GET /coupons HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        long(64 * 1024)
    );
    let mut stream = std::net::TcpStream::connect(&svc.addr).unwrap();
    use std::io::{Read, Write};
    let _ = stream.write_all(head.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 5"));
    assert_eq!(svc.call("GET", "/healthz", &[], None).status, 200);
    // Injection strings are stored literally where they are valid input.
    let sneaky = r#"{"email":"o'brien+x@example.com","password":"'; DROP TABLE users; --"}"#;
    assert_eq!(
        svc.call("POST", "/register", &[JSON], Some(sneaky)).status,
        201
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM users WHERE email = 'o''brien+x@example.com'"),
        1
    );
    let r = svc.call("POST", "/login", &[JSON], Some(sneaky));
    assert_eq!(r.status, 200);
}

#[test]
fn claims_in_flight_at_sigterm_are_answered_and_kept() {
    let db = TestDb::new();
    // Four workers: most of the claims wait in the queue, not in a worker, at the signal.
    let svc = Service::spawn(&[
        ("DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
        ("WORKERS", "4"),
    ]);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let coupon = create_coupon(&svc, &admin, "LASTCALL", 100);
    let users: Vec<String> = (0..12)
        .map(|i| svc.register(&format!("u{i}@example.com")))
        .collect();
    // Hold the coupon's row lock so that every claim is still in flight at the signal.
    let mut holder = db.conn();
    holder.query_drop("START TRANSACTION").unwrap();
    holder
        .exec_drop("SELECT id FROM coupons WHERE id = ? FOR UPDATE", (coupon,))
        .unwrap();
    let path = format!("/coupons/{coupon}/claim");
    let statuses: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = users
            .iter()
            .map(|t| s.spawn(|| svc.call("POST", &path, &[("token", t)], None).status))
            .collect();
        thread::sleep(std::time::Duration::from_millis(300));
        svc.sigterm();
        thread::sleep(std::time::Duration::from_millis(300));
        // Draining, the service tells a load balancer to send new clients elsewhere.
        let health = svc.call("GET", "/healthz", &[], None);
        assert_eq!(
            (health.status, health.body["code"].as_str()),
            (503, Some("shutting_down"))
        );
        assert_eq!(health.headers["retry-after"], "1");
        holder.query_drop("ROLLBACK").unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    assert!(svc.stop().success());
    assert_eq!(db.stock(coupon), (88, 12, 100));
}

/// What one client saw: each answer (when, status, code), and when a request it sent got none.
type Seen = (
    Vec<(std::time::Instant, u16, serde_json::Value)>,
    Vec<std::time::Instant>,
);

/// Claims on one kept-alive connection (a new one when it fails) until `exited`.
fn claim_until(addr: &str, path: &str, token: &str, exited: &AtomicBool) -> Seen {
    use std::io::{BufRead, BufReader, Read, Write};
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\ntoken: {token}\r\nContent-Length: 0\r\n\r\n"
    );
    let (mut answers, mut unanswered) = (Vec::new(), Vec::new());
    let mut conn: Option<BufReader<std::net::TcpStream>> = None;
    while !exited.load(SeqCst) {
        let Some(c) = conn.as_mut() else {
            match std::net::TcpStream::connect(addr) {
                Ok(stream) => {
                    // A service that stops answering fails the test rather than hang it.
                    let timeout = Some(std::time::Duration::from_secs(30));
                    stream.set_read_timeout(timeout).unwrap();
                    conn = Some(BufReader::new(stream));
                }
                Err(_) => thread::sleep(std::time::Duration::from_millis(10)),
            }
            continue;
        };
        if c.get_mut().write_all(request.as_bytes()).is_err() {
            conn = None;
            continue;
        }
        let mut answer = || -> std::io::Result<(u16, serde_json::Value)> {
            let mut line = String::new();
            c.read_line(&mut line)?;
            let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
            let mut length = 0;
            loop {
                line.clear();
                c.read_line(&mut line)?;
                let Some((name, value)) = line.trim_end().split_once(':') else {
                    break;
                };
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            c.read_exact(&mut body)?;
            let status = status.ok_or(std::io::ErrorKind::InvalidData)?;
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            Ok((status, body["code"].clone()))
        };
        match answer() {
            Ok((status, code)) => answers.push((std::time::Instant::now(), status, code)),
            Err(_) => {
                unanswered.push(std::time::Instant::now());
                conn = None;
            }
        }
    }
    (answers, unanswered)
}

#[test]
fn a_stop_ends_while_clients_keep_claiming_and_keeps_every_answered_claim() {
    let db = TestDb::new();
    // Small batches: 32 clients keep the lane's queue from ever running dry.
    let mut svc = Service::start_with(&db, &[("CLAIM_BATCH_MAX", "4")]);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let stock = 1_000_000;
    let coupon = create_coupon(&svc, &admin, "NONSTOP", stock);
    let users: Vec<String> = (0..32)
        .map(|i| svc.register(&format!("u{i}@example.com")))
        .collect();
    let path = format!("/coupons/{coupon}/claim");
    let exited = AtomicBool::new(false);
    let addr = svc.addr.clone();
    let (signalled, stopped_in, status, seen) = thread::scope(|s| {
        // Clients that claim without pause, each on a connection of its own kept open: a lane
        // fed this way never goes idle by itself.
        let clients: Vec<_> = users
            .iter()
            .map(|t| {
                let (addr, path, exited) = (&addr, &path, &exited);
                s.spawn(move || claim_until(addr, path, t, exited))
            })
            .collect();
        thread::sleep(std::time::Duration::from_secs(2));
        svc.sigterm();
        let signalled = std::time::Instant::now();
        // The drain is 10 s, then refusals until no claim is pending; a stop that waits for
        // the clients to leave never comes.
        let status = loop {
            if let Some(status) = svc.child.try_wait().unwrap() {
                break Some(status);
            }
            if signalled.elapsed() > std::time::Duration::from_secs(30) {
                let _ = svc.child.kill();
                break None;
            }
            thread::sleep(std::time::Duration::from_millis(20));
        };
        let stopped_in = signalled.elapsed();
        exited.store(true, SeqCst);
        let seen: Vec<Seen> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (signalled, stopped_in, status, seen)
    });
    let status = status.unwrap_or_else(|| panic!("still serving {stopped_in:?} after SIGTERM"));
    assert!(status.success(), "{status:?}");
    let answers: Vec<_> = seen.iter().flat_map(|(a, _)| a).collect();
    // A request goes unanswered only at the exit itself, as the connections close after the
    // last answer (seen here: all within 30 ms of the exit), never while others are answered.
    let last = answers.iter().map(|(at, _, _)| *at).max().unwrap();
    let early: Vec<_> = seen
        .iter()
        .flat_map(|(_, at)| at)
        .filter(|at| **at + std::time::Duration::from_secs(1) < last)
        .map(|at| last - *at)
        .collect();
    assert!(
        early.is_empty(),
        "unanswered this long before the last answer: {early:?}"
    );
    let refused: Vec<_> = answers.iter().filter(|(_, s, _)| *s != 201).collect();
    assert!(
        refused.iter().all(|(_, s, _)| *s == 503),
        "{:?}",
        &refused[..refused.len().min(10)]
    );
    // Claims were served during the drain, and refused after it while clients kept sending.
    assert!(answers
        .iter()
        .any(|(at, s, _)| *s == 201 && *at > signalled + std::time::Duration::from_secs(1)));
    assert!(refused.iter().any(|(_, _, code)| code == "shutting_down"));
    // Every claim answered is kept, and no claim was made that was not answered.
    let claimed = answers.iter().filter(|(_, s, _)| *s == 201).count() as i64;
    assert_eq!(db.stock(coupon), (stock - claimed, claimed, stock));
}

#[test]
fn brute_force_limits_answer_429_and_let_a_burst_of_new_users_through() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    // A few hundred distinct users from one address within a minute: none refused.
    for i in 0..300 {
        let body = format!(r#"{{"email":"office{i}@example.com","password":"password123"}}"#);
        let r = svc.call("POST", "/register", &[JSON], Some(&body));
        assert_eq!(r.status, 201, "registration {i}: {}", r.body);
    }
    let login = |email: &str, password: &str| {
        let body = format!(r#"{{"email":"{email}","password":"{password}"}}"#);
        svc.call("POST", "/login", &[JSON], Some(&body))
    };
    // Password guessing on one account: five failures, then 429 even for the right password.
    for _ in 0..5 {
        assert_eq!(login("office1@example.com", "guess-guess").status, 401);
    }
    let r = login("office1@example.com", "password123");
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (429, Some("too_many_requests"))
    );
    let wait: u64 = r.headers["retry-after"].parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Other accounts from the same office still log in.
    assert_eq!(login("office2@example.com", "password123").status, 200);

    // Per address, and X-Forwarded-For only from a trusted proxy.
    let db2 = TestDb::new();
    let limited = |trusted: &str| {
        Service::spawn(&[
            ("DATABASE_URL", &db2.url),
            ("JWT_SECRET", SECRET),
            ("BCRYPT_COST", "4"),
            ("REGISTRATIONS_PER_IP_PER_MIN", "3"),
            ("LOGIN_FAILS_PER_IP_PER_MIN", "4"),
            ("TRUSTED_PROXIES", trusted),
        ])
    };
    let svc = limited("");
    let register = |svc: &Service, i: usize, xff: &str| {
        let body = format!(r#"{{"email":"n{i}@example.com","password":"password123"}}"#);
        svc.call(
            "POST",
            "/register",
            &[JSON, ("X-Forwarded-For", xff)],
            Some(&body),
        )
        .status
    };
    let statuses: Vec<u16> = (0..4)
        .map(|i| register(&svc, i, &format!("198.51.100.{i}")))
        .collect();
    assert_eq!(
        statuses,
        vec![201, 201, 201, 429],
        "an untrusted X-Forwarded-For must not help"
    );
    for i in 0..4 {
        let body = format!(r#"{{"email":"spray{i}@example.com","password":"password123"}}"#);
        assert_eq!(svc.call("POST", "/login", &[JSON], Some(&body)).status, 401);
    }
    let body = r#"{"email":"n0@example.com","password":"password123"}"#;
    assert_eq!(svc.call("POST", "/login", &[JSON], Some(body)).status, 429);
    drop(svc);
    let svc = limited("127.0.0.1");
    let statuses: Vec<u16> = (10..14)
        .map(|i| register(&svc, i, &format!("198.51.100.{i}")))
        .collect();
    assert_eq!(
        statuses,
        vec![201, 201, 201, 201],
        "behind a trusted proxy each client has its own limit"
    );
    let statuses: Vec<u16> = (20..24)
        .map(|i| register(&svc, i, "198.51.100.99"))
        .collect();
    assert_eq!(statuses, vec![201, 201, 201, 429]);
}

#[test]
fn coupon_rules_over_http() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let h = bearer(&admin);
    let admin_h = [JSON, (h.0, h.1.as_str())];
    let body = r#"{"code":"RULED","available_count":10,"name":"Winter sale","description":"10% off",
        "per_user_limit":1,"starts_at":"2020-01-01T00:00:00Z","ends_at":"2999-01-01T00:00:00+01:00"}"#;
    let r = check(
        &svc,
        "POST",
        "/admin/coupons",
        &admin_h,
        Some(body),
        201,
        "",
    );
    assert_eq!(r.body["name"], "Winter sale");
    assert_eq!(r.body["per_user_limit"], 1);
    assert_eq!(r.body["ends_at"], "2998-12-31T23:00:00.000000Z");
    let id = r.body["id"].as_u64().unwrap();
    let future = r#"{"code":"SOON","available_count":1,"starts_at":"2999-01-01T00:00:00Z"}"#;
    let soon = check(
        &svc,
        "POST",
        "/admin/coupons",
        &admin_h,
        Some(future),
        201,
        "",
    )
    .body["id"]
        .as_u64()
        .unwrap();
    for (bad, code) in [
        (
            r#"{"code":"B1","available_count":1,"per_user_limit":0}"#,
            "invalid_per_user_limit",
        ),
        (
            r#"{"code":"B2","available_count":1,"starts_at":"tomorrow"}"#,
            "invalid_starts_at",
        ),
        (
            r#"{"code":"B3","available_count":1,"starts_at":"2030-01-01T00:00:00Z","ends_at":"2029-01-01T00:00:00Z"}"#,
            "invalid_ends_at",
        ),
        (
            r#"{"code":"B4","available_count":1,"name":"bad\u0007name"}"#,
            "invalid_name",
        ),
    ] {
        check(
            &svc,
            "POST",
            "/admin/coupons",
            &admin_h,
            Some(bad),
            422,
            code,
        );
    }

    let user = svc.register("user@example.com");
    let u = [("token", user.as_str())];
    let r = check(
        &svc,
        "POST",
        &format!("/coupons/{id}/claim"),
        &u,
        None,
        201,
        "",
    );
    assert_eq!(r.body["claim"]["name"], "Winter sale");
    check(
        &svc,
        "POST",
        &format!("/coupons/{id}/claim"),
        &u,
        None,
        409,
        "limit_reached",
    );
    check(
        &svc,
        "POST",
        &format!("/coupons/{soon}/claim"),
        &u,
        None,
        409,
        "not_started",
    );
    // The listing hides the coupon not started yet, and tells the caller about its limit.
    let r = check(&svc, "GET", "/coupons", &u, None, 200, "");
    let items = r.body.as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["limit_reached"], true);
    let anon = check(&svc, "GET", "/coupons", &[], None, 200, "");
    assert!(anon.body[0].get("limit_reached").is_none());
    // `null` removes a rule; absent leaves it.
    let r = check(
        &svc,
        "PUT",
        &format!("/admin/coupons/{id}"),
        &admin_h,
        Some(r#"{"per_user_limit":null}"#),
        200,
        "",
    );
    assert_eq!(
        (r.body["per_user_limit"].is_null(), r.body["name"].as_str()),
        (true, Some("Winter sale"))
    );
    check(
        &svc,
        "POST",
        &format!("/coupons/{id}/claim"),
        &u,
        None,
        201,
        "",
    );
    assert_eq!(db.stock(id), (8, 2, 10));
    // A limit set again counts the claims made without one: 2 held, limit 2, none more.
    check(
        &svc,
        "PUT",
        &format!("/admin/coupons/{id}"),
        &admin_h,
        Some(r#"{"per_user_limit":2}"#),
        200,
        "",
    );
    check(
        &svc,
        "POST",
        &format!("/coupons/{id}/claim"),
        &u,
        None,
        409,
        "limit_reached",
    );
    assert_eq!(db.stock(id), (8, 2, 10));
}

/// Value and metadata: each field shown (`null` when unset) wherever a coupon is; each bad one
/// a 422 naming it; the combination checked on the coupon as an update would leave it; metadata
/// replaced whole or cleared; the terms locked once the coupon has claims, metadata not.
#[test]
fn coupon_value_and_metadata_over_http() {
    use serde_json::json;
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let h = bearer(&admin);
    let admin_h = [JSON, (h.0, h.1.as_str())];
    let value_fields = [
        "percent_off",
        "amount_off",
        "currency",
        "min_order_amount",
        "metadata",
    ];
    let create = |body: serde_json::Value| {
        let r = check(
            &svc,
            "POST",
            "/admin/coupons",
            &admin_h,
            Some(&body.to_string()),
            201,
            "",
        );
        r.body
    };
    let put = |id: u64, body: serde_json::Value, status: u16, code: &str| {
        let path = format!("/admin/coupons/{id}");
        check(
            &svc,
            "PUT",
            &path,
            &admin_h,
            Some(&body.to_string()),
            status,
            code,
        )
        .body
    };
    let shown = |c: &serde_json::Value| value_fields.map(|f| c[f].clone());

    let plain = create(json!({"code": "PLAIN", "available_count": 5}));
    for f in value_fields {
        assert!(plain[f].is_null() && plain.get(f).is_some(), "{f}: {plain}");
    }
    let percent = create(
        json!({"code": "TENOFF", "available_count": 5, "percent_off": 10,
        "metadata": {"campaign": "winter", "channel": "email"}}),
    );
    assert_eq!(
        shown(&percent),
        [
            json!(10),
            json!(null),
            json!(null),
            json!(null),
            json!({"campaign": "winter", "channel": "email"})
        ]
    );
    let amount = create(
        json!({"code": "FIVEOFF", "available_count": 5, "amount_off": 500,
        "currency": "EUR", "min_order_amount": 2000}),
    );
    assert_eq!(
        shown(&amount),
        [
            json!(null),
            json!(500),
            json!("EUR"),
            json!(2000),
            json!(null)
        ]
    );
    let (percent, amount) = (
        percent["id"].as_u64().unwrap(),
        amount["id"].as_u64().unwrap(),
    );
    let plain_id = plain["id"].as_u64().unwrap();

    let fifty_one: serde_json::Map<String, serde_json::Value> =
        (0..51).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (extra, code) in [
        (json!({"percent_off": 0}), "invalid_percent_off"),
        (json!({"percent_off": 101}), "invalid_percent_off"),
        (json!({"percent_off": 12.5}), "invalid_percent_off"),
        (json!({"percent_off": "10"}), "invalid_percent_off"),
        (
            json!({"amount_off": 0, "currency": "EUR"}),
            "invalid_amount_off",
        ),
        (
            json!({"amount_off": -5, "currency": "EUR"}),
            "invalid_amount_off",
        ),
        (
            json!({"amount_off": 1_000_000_000_001_i64, "currency": "EUR"}),
            "invalid_amount_off",
        ),
        (
            json!({"amount_off": 18_446_744_073_709_551_615_u64, "currency": "EUR"}),
            "invalid_amount_off",
        ),
        (
            json!({"amount_off": 1e30, "currency": "EUR"}),
            "invalid_amount_off",
        ),
        (
            json!({"amount_off": 5, "currency": "eur"}),
            "invalid_currency",
        ),
        (
            json!({"amount_off": 5, "currency": "EURO"}),
            "invalid_currency",
        ),
        (
            json!({"amount_off": 5, "currency": 978}),
            "invalid_currency",
        ),
        (
            json!({"min_order_amount": -1, "currency": "EUR"}),
            "invalid_min_order_amount",
        ),
        (
            json!({"percent_off": 10, "amount_off": 5, "currency": "EUR"}),
            "invalid_value",
        ),
        (json!({"amount_off": 5}), "invalid_value"),
        (json!({"min_order_amount": 100}), "invalid_value"),
        (
            json!({"percent_off": 10, "min_order_amount": 100}),
            "invalid_value",
        ),
        (json!({"metadata": {"n": 1}}), "invalid_metadata"),
        (json!({"metadata": {"n": null}}), "invalid_metadata"),
        (json!({"metadata": {"o": {"x": "y"}}}), "invalid_metadata"),
        (json!({"metadata": ["a"]}), "invalid_metadata"),
        (json!({"metadata": "text"}), "invalid_metadata"),
        (json!({"metadata": {"": "x"}}), "invalid_metadata"),
        (
            json!({"metadata": {"k".repeat(41): "x"}}),
            "invalid_metadata",
        ),
        (
            json!({"metadata": {"k": "v".repeat(501)}}),
            "invalid_metadata",
        ),
        (json!({"metadata": fifty_one}), "invalid_metadata"),
    ] {
        let mut body = json!({"code": "BAD", "available_count": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let body = body.to_string();
        check(
            &svc,
            "POST",
            "/admin/coupons",
            &admin_h,
            Some(&body),
            422,
            code,
        );
        // So is an update of a coupon without value, which it leaves as it was.
        put(plain_id, extra, 422, code);
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM coupons"), 3);
    // At the edges: 50 keys, keys of 40 characters, values of 500; the largest amount.
    let fifty: serde_json::Map<String, serde_json::Value> = (0..50)
        .map(|i| (format!("{i:02}{}", "k".repeat(38)), json!("v".repeat(500))))
        .collect();
    let edge = create(
        json!({"code": "EDGE", "available_count": 1, "metadata": fifty,
        "amount_off": 1_000_000_000_000_i64, "currency": "JPY", "min_order_amount": 0}),
    );
    assert_eq!(edge["metadata"], json!(fifty));
    assert_eq!(edge["amount_off"], 1_000_000_000_000_i64);

    // Every representation shows the fields: the public list, the admin list and read.
    let user = svc.register("user@example.com");
    let u = [("token", user.as_str())];
    for (path, headers) in [
        ("/coupons", &u[..]),
        ("/coupons", &[][..]),
        ("/admin/coupons", &admin_h[..]),
    ] {
        let list = check(&svc, "GET", path, headers, None, 200, "").body;
        let by_code = |code: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|c| c["code"] == code)
                .unwrap_or_else(|| panic!("{path}: no {code}"))
                .clone()
        };
        assert_eq!(shown(&by_code("PLAIN")), shown(&plain), "{path}");
        assert_eq!(by_code("TENOFF")["percent_off"], 10, "{path}");
        assert_eq!(by_code("FIVEOFF")["currency"], "EUR", "{path}");
    }
    let read = check(
        &svc,
        "GET",
        &format!("/admin/coupons/{amount}"),
        &admin_h,
        None,
        200,
        "",
    );
    assert_eq!(
        shown(&read.body),
        [
            json!(null),
            json!(500),
            json!("EUR"),
            json!(2000),
            json!(null)
        ]
    );

    // The combination is the coupon's as the change leaves it.
    put(percent, json!({"amount_off": 300}), 422, "invalid_value");
    put(
        percent,
        json!({"amount_off": 300, "currency": "EUR"}),
        422,
        "invalid_value",
    );
    put(amount, json!({"percent_off": 5}), 422, "invalid_value");
    put(amount, json!({"currency": null}), 422, "invalid_value");
    // Without claims the terms change freely; a field left out stays.
    let c = put(
        percent,
        json!({"percent_off": null, "amount_off": 300, "currency": "EUR"}),
        200,
        "",
    );
    assert_eq!(
        shown(&c)[..4],
        [json!(null), json!(300), json!("EUR"), json!(null)]
    );
    let c = put(amount, json!({"amount_off": 700}), 200, "");
    assert_eq!(
        shown(&c)[..4],
        [json!(null), json!(700), json!("EUR"), json!(2000)]
    );
    // Metadata is replaced whole, left alone when absent, cleared by null.
    let c = put(percent, json!({"metadata": {"channel": "sms"}}), 200, "");
    assert_eq!(c["metadata"], json!({"channel": "sms"}));
    let c = put(percent, json!({"name": "Renamed"}), 200, "");
    assert_eq!(c["metadata"], json!({"channel": "sms"}));
    let c = put(percent, json!({"metadata": null}), 200, "");
    assert!(c["metadata"].is_null() && c.get("metadata").is_some());
    let c = put(percent, json!({"metadata": {}}), 200, "");
    assert_eq!(c["metadata"], json!({}));

    // Once claimed, the terms are locked; the same values are no change, metadata is free.
    check(
        &svc,
        "POST",
        &format!("/coupons/{amount}/claim"),
        &u,
        None,
        201,
        "",
    );
    for change in [
        json!({"amount_off": 800}),
        json!({"currency": "USD"}),
        json!({"min_order_amount": 1}),
        json!({"min_order_amount": null}),
        json!({"amount_off": null, "percent_off": 5}),
    ] {
        put(amount, change, 409, "terms_locked");
    }
    let c = put(
        amount,
        json!({"amount_off": 700, "currency": "EUR", "min_order_amount": 2000,
            "percent_off": null, "metadata": {"batch": "7"}}),
        200,
        "",
    );
    assert_eq!(
        shown(&c),
        [
            json!(null),
            json!(700),
            json!("EUR"),
            json!(2000),
            json!({"batch": "7"})
        ]
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM coupons WHERE id = {amount} AND amount_off = 700
             AND currency = 'EUR' AND min_order_amount = 2000 AND percent_off IS NULL"
        )),
        1
    );

    // The audit log shows the new coupon whole and each change as [old, new].
    let log = check(&svc, "GET", "/admin/audit", &admin_h, None, 200, "").body;
    let entries = log.as_array().unwrap();
    let created = entries
        .iter()
        .find(|e| e["action"] == "coupon.create" && e["coupon_id"] == amount)
        .unwrap();
    assert_eq!(
        shown(&created["detail"]),
        [
            json!(null),
            json!(500),
            json!("EUR"),
            json!(2000),
            json!(null)
        ]
    );
    let last = entries
        .iter()
        .find(|e| e["action"] == "coupon.update" && e["coupon_id"] == amount)
        .unwrap();
    assert_eq!(
        last["detail"],
        json!({"metadata": [null, {"batch": "7"}]}),
        "the same terms are no change"
    );
    let cleared = entries
        .iter()
        .filter(|e| e["action"] == "coupon.update" && e["coupon_id"] == percent)
        .nth(1)
        .unwrap();
    assert_eq!(
        cleared["detail"]["metadata"],
        json!([{"channel": "sms"}, null])
    );
}

#[test]
fn admin_views_paging_and_voids_over_http() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let h = bearer(&admin);
    let admin_h = [JSON, (h.0, h.1.as_str())];
    let ids: Vec<u64> = (0..5)
        .map(|i| create_coupon(&svc, &admin, &format!("PAGE{i}"), 3))
        .collect();
    let other = create_coupon(&svc, &admin, "ZED", 1);
    check(
        &svc,
        "DELETE",
        &format!("/admin/coupons/{other}"),
        &admin_h,
        None,
        200,
        "",
    );

    // Public listing, two at a time, following Link headers.
    let mut seen = Vec::new();
    let mut next = Some("/coupons?limit=2".to_owned());
    while let Some(url) = next.take() {
        let r = check(&svc, "GET", &url, &[], None, 200, "");
        seen.extend(
            r.body
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_u64().unwrap()),
        );
        next = r.headers.get("link").map(|l| {
            assert!(l.ends_with(r#">; rel="next""#), "{l}");
            l[1..l.find('>').unwrap()].to_owned()
        });
    }
    assert_eq!(seen, ids);
    check(
        &svc,
        "GET",
        "/coupons?limit=0",
        &[],
        None,
        422,
        "invalid_limit",
    );
    check(
        &svc,
        "GET",
        "/coupons?limit=1001",
        &[],
        None,
        422,
        "invalid_limit",
    );
    check(
        &svc,
        "GET",
        "/coupons?after=abc",
        &[],
        None,
        422,
        "invalid_after",
    );

    // Admin listing: deleted ones too, with filters and claimed counts.
    let user = svc.register("user@example.com");
    let u = [("token", user.as_str())];
    let r = check(
        &svc,
        "POST",
        &format!("/coupons/{}/claim", ids[0]),
        &u,
        None,
        201,
        "",
    );
    let claim_id = r.body["claim"]["id"].as_u64().unwrap();
    let r = check(
        &svc,
        "GET",
        "/admin/coupons?q=pAgE&limit=1000",
        &admin_h,
        None,
        200,
        "",
    );
    assert_eq!(r.body.as_array().unwrap().len(), 5);
    assert_eq!(r.body[0]["claimed"], 1);
    let r = check(&svc, "GET", "/admin/coupons?q=ZED", &admin_h, None, 200, "");
    assert!(r.body[0]["deleted_at"].is_string());
    check(
        &svc,
        "GET",
        "/admin/coupons?status=INACTIVE",
        &admin_h,
        None,
        200,
        "",
    );
    check(
        &svc,
        "GET",
        "/admin/coupons",
        &u,
        None,
        403,
        "admin_required",
    );
    let r = check(
        &svc,
        "GET",
        &format!("/admin/coupons/{other}"),
        &admin_h,
        None,
        200,
        "",
    );
    assert_eq!(r.body["code"], "ZED");
    let r = check(
        &svc,
        "GET",
        &format!("/admin/coupons/{}/claims", ids[0]),
        &admin_h,
        None,
        200,
        "",
    );
    assert_eq!(r.body[0]["email"], "user@example.com");
    check(
        &svc,
        "GET",
        "/admin/coupons/424242/claims",
        &admin_h,
        None,
        404,
        "coupon_not_found",
    );

    // Voids: once, with a reason; shown in the user's history.
    let path = format!("/admin/claims/{claim_id}/void");
    check(
        &svc,
        "POST",
        &path,
        &admin_h,
        Some(r#"{"reason":""}"#),
        422,
        "invalid_reason",
    );
    check(&svc, "POST", &path, &admin_h, None, 422, "invalid_body");
    check(
        &svc,
        "POST",
        &path,
        &[JSON, ("token", user.as_str())],
        Some(r#"{"reason":"x"}"#),
        403,
        "admin_required",
    );
    let r = check(
        &svc,
        "POST",
        &path,
        &admin_h,
        Some(r#"{"reason":"duplicate order"}"#),
        200,
        "",
    );
    assert_eq!(r.body["reason"], "duplicate order");
    check(
        &svc,
        "POST",
        &path,
        &admin_h,
        Some(r#"{"reason":"again"}"#),
        409,
        "already_voided",
    );
    check(
        &svc,
        "POST",
        "/admin/claims/424242/void",
        &admin_h,
        Some(r#"{"reason":"x"}"#),
        404,
        "claim_not_found",
    );
    let r = check(&svc, "GET", "/users/me/history", &u, None, 200, "");
    assert_eq!(r.body[0]["void_reason"], "duplicate order");
    assert_eq!(db.stock(ids[0]), (3, 0, 3));
}

#[test]
fn etags_stop_lost_updates_and_the_audit_log_records_changes() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let h = bearer(&admin);
    let admin_h = [JSON, (h.0, h.1.as_str())];
    let id = create_coupon(&svc, &admin, "TAGGED", 5);
    let path = format!("/admin/coupons/{id}");
    let read = check(&svc, "GET", &path, &admin_h, None, 200, "");
    let etag = read.headers["etag"].clone();
    // A claim does not change the ETag: stock moves, the admin's view of the coupon does not.
    let user = svc.register("user@example.com");
    check(
        &svc,
        "POST",
        &format!("/coupons/{id}/claim"),
        &[("token", user.as_str())],
        None,
        201,
        "",
    );
    assert_eq!(
        check(&svc, "GET", &path, &admin_h, None, 200, "").headers["etag"],
        etag
    );
    // Two admins read the same version; the first write wins, the second is told.
    let first = [JSON, (h.0, h.1.as_str()), ("If-Match", etag.as_str())];
    let r = check(
        &svc,
        "PUT",
        &path,
        &first,
        Some(r#"{"name":"First"}"#),
        200,
        "",
    );
    assert_ne!(r.headers["etag"], etag);
    check(
        &svc,
        "PUT",
        &path,
        &first,
        Some(r#"{"name":"Second"}"#),
        412,
        "precondition_failed",
    );
    check(
        &svc,
        "PUT",
        &path,
        &[JSON, (h.0, h.1.as_str()), ("If-Match", "\"bogus\"")],
        Some("{}"),
        412,
        "precondition_failed",
    );
    let r = check(
        &svc,
        "PUT",
        &path,
        &[JSON, (h.0, h.1.as_str()), ("If-Match", "*")],
        Some(r#"{"available_count":9}"#),
        200,
        "",
    );
    assert_eq!(r.body["name"], "First");

    let claim_id = db.scalar("SELECT id FROM claims");
    check(
        &svc,
        "POST",
        &format!("/admin/claims/{claim_id}/void"),
        &admin_h,
        Some(r#"{"reason":"test"}"#),
        200,
        "",
    );
    check(&svc, "DELETE", &path, &admin_h, None, 200, "");
    let log = check(&svc, "GET", "/admin/audit", &admin_h, None, 200, "");
    let actions: Vec<&str> = log
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "coupon.delete",
            "claim.void",
            "coupon.update",
            "coupon.update",
            "coupon.create"
        ]
    );
    let update = &log.body[3];
    assert_eq!(update["detail"]["name"], serde_json::json!([null, "First"]));
    assert_eq!(log.body[1]["detail"]["reason"], "test");
    let admin_id = db.scalar("SELECT id FROM users WHERE email = 'admin@example.com'");
    assert!(log
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor_id"] == admin_id));
    check(
        &svc,
        "GET",
        "/admin/audit",
        &[("token", user.as_str())],
        None,
        403,
        "admin_required",
    );
}

#[test]
fn metrics_request_ids_and_the_access_log() {
    use std::io::BufRead;
    let db = TestDb::new();
    let mut child = crate::support::coupons_command(&[
        ("DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
        ("ACCESS_LOG", "on"),
        ("BIND_ADDR", "127.0.0.1:0"),
        ("METRICS_ADDR", "127.0.0.1:0"),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = |prefix: &str| loop {
        let line = out.next().unwrap().unwrap();
        if let Some(a) = line.strip_prefix(prefix) {
            break a.to_owned();
        }
    };
    let addr = printed("coupons: listening on http://");
    let metrics_addr = printed("coupons: metrics on http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let log = std::io::BufReader::new(child.stderr.take().unwrap());
    let call = |m: &str, p: &str, h: &[(&str, &str)], b: Option<&str>| {
        crate::support::request(&addr, m, p, h, b)
    };

    let r = call(
        "GET",
        "/healthz",
        &[("X-Request-Id", "trace-abc.123")],
        None,
    );
    assert_eq!(r.headers["x-request-id"], "trace-abc.123");
    let r = call(
        "GET",
        "/healthz",
        &[("X-Request-Id", "bad id with spaces")],
        None,
    );
    assert_ne!(r.headers["x-request-id"], "bad id with spaces");
    assert!(!r.headers["x-request-id"].is_empty());
    // The seed's query-string login: the password must not reach the log.
    call(
        "POST",
        "/register?email=log%40example.com&password=sup3r-secret-pw",
        &[],
        None,
    );
    let r = call(
        "POST",
        "/login?email=log%40example.com&password=sup3r-secret-pw",
        &[],
        None,
    );
    let token = r.body["token"].as_str().unwrap().to_owned();
    call("POST", "/coupons/1/claim", &[("token", &token)], None);
    call("POST", "/coupons/abc/claim", &[("token", &token)], None);
    // tiny_http passes ESC, a lone CR and a lone LF through in the request line: they reach the
    // log escaped, so they neither start a forged line nor drive the terminal showing it.
    for line in [
        "GET /x\x1b[2K\rFORGED\nFORGED\x7f HTTP/1.1",
        "G\x1bET /healthz HTTP/1.1",
    ] {
        let head = format!("{line}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        crate::support::send(&addr, head.as_bytes(), b"");
    }

    // On the main address, metrics are for admins; on METRICS_ADDR, for any scraper, and
    // nothing else is served there.
    let r = call("GET", "/metrics", &[], None);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = call("GET", "/metrics", &[("token", &token)], None);
    assert_eq!(r.status, 403, "{}", r.body);
    let on_metrics = |p: &str| crate::support::request(&metrics_addr, "GET", p, &[], None);
    assert_eq!(on_metrics("/healthz").status, 404);
    let r = on_metrics("/metrics");
    assert_eq!(r.status, 200);
    let text = r.body.as_str().unwrap().to_owned();
    for needle in [
        "coupons_http_requests_total{route=\"GET /healthz\",status=\"200\"} 2",
        "coupons_http_requests_total{route=\"POST /coupons/{id}/claim\",status=\"404\"} 2",
        "coupons_http_request_duration_seconds_bucket{route=\"GET /healthz\",le=\"+Inf\"} 2",
        "coupons_claims_total{outcome=\"coupon_not_found\"} 1",
        "# TYPE coupons_db_connections_in_use gauge",
        "coupons_db_connections_waiting 0",
        "coupons_db_retries_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let lines: Vec<String> = log.lines().map_while(Result::ok).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("trace-abc.123 GET /healthz 200 ")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains(" POST /login 200 ")),
        "{lines:?}"
    );
    let all = lines.join("\n");
    assert!(
        !all.contains("sup3r-secret-pw") && !all.contains(&token),
        "a secret reached the log"
    );
    assert!(
        all.bytes()
            .all(|b| b == b'\n' || (b' '..=b'~').contains(&b)),
        "a control character reached the log: {lines:?}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("FORGED")), "{lines:?}");
    for logged in [
        r" GET /x\x1b[2K\x0dFORGED\x0aFORGED\x7f 404 ",
        r" G\x1bET /healthz 405 ",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(logged)),
            "{logged} in {lines:?}"
        );
    }
}

#[test]
fn the_openapi_document_matches_the_routes() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let doc = check(&svc, "GET", "/openapi.json", &[], None, 200, "").body;
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 14);
    for (template, methods) in paths {
        let path = template.replace("{id}", "1");
        // A page's `{file}`: the first file the document names.
        let file = &methods["get"]["parameters"][0]["schema"]["enum"][0];
        let path = path.replace("{file}", file.as_str().unwrap_or("{file}"));
        let mut documented: Vec<String> = methods
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        // HEAD goes with every GET without an operation of its own.
        if documented.iter().any(|m| m == "GET") {
            documented.push("HEAD".into());
        }
        documented.sort();
        // A method the document does not list is a 405 naming exactly the documented ones.
        let r = svc.call("PATCH", &path, &[], None);
        assert_eq!(r.status, 405, "{template}");
        let mut allowed: Vec<String> = r.headers["allow"].split(", ").map(String::from).collect();
        allowed.sort();
        assert_eq!(allowed, documented, "{template}");
        // And every documented operation is routed (never the router's 404).
        for method in &documented {
            let r = svc.call(method, &path, &[], None);
            assert_ne!(
                r.body["code"], "not_found",
                "{method} {template} is documented but not routed"
            );
        }
    }
    let page = svc.call("GET", "/docs", &[], None);
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].starts_with("text/html"));
    let html = page.body.as_str().unwrap();
    assert!(
        html.contains("/docs/swagger-initializer.js")
            && !html.contains("http://")
            && !html.contains("https://")
    );
}

#[test]
fn a_created_coupon_carries_its_etag() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "tagger@example.com");
    let auth = bearer(&admin);
    let headers = [JSON, (auth.0, auth.1.as_str())];
    let body = r#"{"code":"TAGGED","available_count":1}"#;
    let created = svc.call("POST", "/admin/coupons", &headers, Some(body));
    assert_eq!(created.status, 201, "{}", created.body);
    let path = format!("/admin/coupons/{}", created.body["id"]);
    let read = svc.call("GET", &path, &[(auth.0, auth.1.as_str())], None);
    assert!(
        created.headers.contains_key("etag"),
        "{:?}",
        created.headers
    );
    assert_eq!(created.headers.get("etag"), read.headers.get("etag"));
}

//! Unique codes: generation and import, each code handed to one live claim at a time under a
//! rush, by id or by the code itself, given back when a claim ends; the admin list and CSV.

use crate::http::{bearer, make_admin};
use crate::library::{new_coupon, new_users, threads};
use crate::support::{auth, Service, TestDb, JSON};
use coupons::claim::Ask;
use coupons::codes::{self, NewCodes};
use coupons::{coupon, life, ClaimStatus, CouponCode, CouponId, Error, HoldSeconds, Label, UserId};
use mysql::prelude::Queryable;
use rayon::prelude::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A coupon with `n` generated codes and no other stock.
fn coded(db: &TestDb, code: &str, n: i64) -> CouponId {
    let c = new_coupon(db, code, 0);
    let new = NewCodes::generate(n, &format!("{code}-######"), None).unwrap();
    let added = codes::add(&db.pool, UserId(0), c, &new).unwrap();
    assert_eq!((added.added, added.available_count), (n as u64, n as u64));
    c
}

/// Checks in the database: every assigned code has one live claim and that claim shows it,
/// every live claim holds one code, and unassigned codes + live claims == codes ==
/// total_count, unassigned == available_count. Returns (unassigned, live claims).
#[track_caller]
fn codes_agree(db: &TestDb, c: CouponId) -> (i64, i64) {
    let mut conn = db.conn();
    let one = |conn: &mut mysql::Conn, sql: &str| -> i64 {
        conn.exec_first(sql, (c.0,)).unwrap().unwrap()
    };
    let orphans = one(
        &mut conn,
        "SELECT COUNT(*) FROM coupon_codes cc LEFT JOIN claims cl ON cl.id = cc.claim_id
         WHERE cc.coupon_id = ? AND cc.claim_id IS NOT NULL
           AND (cl.id IS NULL OR cl.status NOT IN ('held', 'claimed', 'redeemed')
                OR cl.assigned_code <> cc.code)",
    );
    assert_eq!(
        orphans, 0,
        "codes assigned to no live claim, or another code"
    );
    let codeless = one(
        &mut conn,
        "SELECT COUNT(*) FROM claims cl LEFT JOIN coupon_codes cc ON cc.claim_id = cl.id
         WHERE cl.coupon_id = ? AND cl.status IN ('held', 'claimed', 'redeemed') AND cc.id IS NULL",
    );
    assert_eq!(codeless, 0, "live claims without a code");
    let unassigned = one(
        &mut conn,
        "SELECT COUNT(*) FROM coupon_codes WHERE coupon_id = ? AND claim_id IS NULL",
    );
    let all = one(
        &mut conn,
        "SELECT COUNT(*) FROM coupon_codes WHERE coupon_id = ?",
    );
    let code_count = one(&mut conn, "SELECT code_count FROM coupons WHERE id = ?");
    // Behind the cursor, the unassigned codes are exactly the returned ones, counted.
    let behind = one(
        &mut conn,
        "SELECT COUNT(*) FROM coupon_codes cc JOIN coupons co ON co.id = cc.coupon_id
         WHERE cc.coupon_id = ? AND cc.claim_id IS NULL AND cc.id <= co.code_cursor",
    );
    let returned = one(
        &mut conn,
        "SELECT COUNT(*) FROM returned_codes r JOIN coupon_codes cc ON cc.id = r.code_id
         WHERE r.coupon_id = ? AND cc.claim_id IS NULL AND cc.coupon_id = r.coupon_id",
    );
    let rows = one(
        &mut conn,
        "SELECT COUNT(*) FROM returned_codes WHERE coupon_id = ?",
    );
    let counted = one(&mut conn, "SELECT codes_returned FROM coupons WHERE id = ?");
    assert_eq!(
        (behind, returned, rows),
        (counted, counted, counted),
        "returned codes"
    );
    let (available, live, total) = db.stock(c.0);
    assert_eq!(unassigned + live, all, "unassigned + live claims == codes");
    assert_eq!(
        (all, all),
        (total, code_count),
        "codes == total_count == code_count"
    );
    assert_eq!(unassigned, available, "unassigned == available_count");
    (unassigned, live)
}

#[test]
fn three_thousand_claims_on_a_thousand_codes_give_each_code_once() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 16);
    let c = coded(&db, "RUSH", 1000);
    let won: Vec<String> = threads(16).install(|| {
        (0..3000)
            .into_par_iter()
            .filter_map(|i| match db.claims.claim(users[i % 16], c) {
                Ok(won) => Some(won.claim.assigned_code.expect("a code")),
                Err(Error::SoldOut) => None,
                Err(e) => panic!("unexpected {e}"),
            })
            .collect()
    });
    assert_eq!(won.len(), 1000);
    let distinct: HashSet<String> = won.iter().map(|c| c.to_ascii_lowercase()).collect();
    assert_eq!(distinct.len(), 1000, "two claims got the same code");
    assert_eq!(codes_agree(&db, c), (0, 1000));
}

#[test]
fn codes_come_back_once_from_holds_expiring_and_voids_during_the_rush() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 16);
    let c = coded(&db, "EBB", 1000);
    let stop = AtomicBool::new(false);
    let reason = Label::parse("reason", "test", 500).unwrap();
    let (won, voided) = std::thread::scope(|s| {
        // A sweeper expiring holds all through the run.
        let sweeper = s.spawn(|| {
            let mut expired = 0;
            while !stop.load(Ordering::SeqCst) {
                expired += life::expire_due(&db.pool).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            expired
        });
        // Stops the sweeper however the run ends, so a failure fails and never hangs.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let stopping = Stop(&stop);
        let results: Vec<(bool, bool)> = threads(14).install(|| {
            (0..3000)
                .into_par_iter()
                .map(|i| {
                    let ask = Ask {
                        hold: (i % 2 == 0).then(|| HoldSeconds::parse(1).unwrap()),
                        ..Ask::new(users[i % 16], c)
                    };
                    match db.claims.ask(&ask, None).result {
                        Ok(won) => {
                            let void = i % 5 == 1;
                            if void {
                                life::void(&db.pool, UserId(0), won.claim.id, &reason).unwrap();
                            }
                            (true, void)
                        }
                        Err(Error::SoldOut) => (false, false),
                        Err(e) => panic!("unexpected {e}"),
                    }
                })
                .collect()
        });
        drop(stopping);
        sweeper.join().unwrap();
        let won = results.iter().filter(|r| r.0).count();
        let voided = results.iter().filter(|r| r.1).count();
        (won, voided)
    });
    assert!(voided > 0, "some claims were voided during the run");
    assert!(
        won > 1000,
        "codes given back were claimed again: {won} claims"
    );
    codes_agree(&db, c);
    // Every hold runs out: all their codes come back, and only the outright claims keep one.
    std::thread::sleep(Duration::from_millis(1100));
    while life::expire_due(&db.pool).unwrap() > 0 {}
    let kept: i64 = db
        .conn()
        .exec_first(
            "SELECT COUNT(*) FROM claims WHERE coupon_id = ? AND status = 'claimed'",
            (c.0,),
        )
        .unwrap()
        .unwrap();
    assert_eq!(codes_agree(&db, c), (1000 - kept, kept));
    let held: i64 = db.scalar("SELECT COUNT(*) FROM claims WHERE status = 'held'");
    assert_eq!(held, 0);
}

#[test]
fn fifty_users_racing_for_one_printed_code_one_wins() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 50);
    let c = new_coupon(&db, "CARDS", 0);
    let printed: Vec<String> = (0..20).map(|i| format!("CARD-{i:04}")).collect();
    codes::add(&db.pool, UserId(0), c, &NewCodes::import(&printed).unwrap()).unwrap();
    // Typed in lower case: codes compare case-insensitively.
    let typed = CouponCode::parse("card-0007").unwrap();
    assert_eq!(coupon::id_for_code(&db.pool, &typed).unwrap(), c);
    let results: Vec<Result<String, Error>> = threads(16).install(|| {
        users
            .par_iter()
            .map(|&user| {
                let ask = Ask {
                    code: Some(typed.clone()),
                    ..Ask::new(user, c)
                };
                db.claims
                    .ask(&ask, None)
                    .result
                    .map(|won| won.claim.assigned_code.unwrap())
            })
            .collect()
    });
    let wins: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        wins,
        vec!["CARD-0007"],
        "exactly one wins, with that very code"
    );
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, Error::CodeUsed)),
        "the others are code_used"
    );
    assert_eq!(codes_agree(&db, c), (19, 1));
    // Voided, the code is claimable by its name again, once.
    let claim: u64 = db.scalar("SELECT id FROM claims") as u64;
    let reason = Label::parse("reason", "lost card", 500).unwrap();
    life::void(&db.pool, UserId(0), coupons::ClaimId(claim), &reason).unwrap();
    assert_eq!(codes_agree(&db, c), (20, 0));
    let ask = Ask {
        code: Some(typed),
        ..Ask::new(users[1], c)
    };
    let again = db.claims.ask(&ask, None).result.unwrap();
    assert_eq!(again.claim.assigned_code.as_deref(), Some("CARD-0007"));
    assert_eq!(again.claim.status, ClaimStatus::Claimed);
    // Claims by id pass over it (assigned by name, ahead of the cursor) to the other 19.
    let others: HashSet<String> = (0..19)
        .map(|i| {
            db.claims
                .claim(users[i], c)
                .unwrap()
                .claim
                .assigned_code
                .unwrap()
        })
        .collect();
    assert_eq!(others.len(), 19);
    assert!(!others.contains("CARD-0007"));
    assert!(matches!(db.claims.claim(users[0], c), Err(Error::SoldOut)));
    // Given back behind the cursor, it is handed out again, by id.
    life::void(&db.pool, UserId(0), again.claim.id, &reason).unwrap();
    assert_eq!(codes_agree(&db, c), (1, 19));
    let last = db.claims.claim(users[2], c).unwrap();
    assert_eq!(last.claim.assigned_code.as_deref(), Some("CARD-0007"));
    assert_eq!(codes_agree(&db, c), (0, 20));
}

#[test]
fn a_full_pattern_is_exhausted_at_once_and_a_nearly_full_one_fills_exactly() {
    let db = TestDb::new();
    let c = new_coupon(&db, "TINY", 0);
    let add = |n: i64| {
        let new = NewCodes::generate(n, "Q-##", Some("abcd")).unwrap();
        codes::add(&db.pool, UserId(0), c, &new)
    };
    // 4^2 = 16 codes in the space.
    assert!(matches!(add(17), Err(Error::PatternExhausted)));
    assert_eq!(add(10).unwrap().total_codes, 10);
    // Six left: enumerated, not searched for.
    assert_eq!(add(6).unwrap().total_codes, 16);
    assert!(matches!(add(1), Err(Error::PatternExhausted)));
    let all: Vec<String> = db
        .conn()
        .query("SELECT LOWER(code) FROM coupon_codes")
        .unwrap();
    let distinct: HashSet<String> = all.into_iter().collect();
    assert_eq!(distinct.len(), 16);
    assert!(distinct.iter().all(|c| c.len() == 4 && c.starts_with("q-")));
    codes_agree(&db, c);
}

/// A chunked body, joined (tiny_http streams the CSV so).
fn dechunk(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

#[test]
fn codes_over_http_import_claim_list_and_csv() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let ada = svc.register("ada@example.com");
    let bob = svc.register("bob@example.com");
    let (a, ad, b) = (bearer(&admin), bearer(&ada), bearer(&bob));
    let call = |who: &(&str, String), method: &str, path: &str, body: Option<&str>| {
        svc.call(method, path, &[JSON, (who.0, &who.1)], body)
    };
    let r = call(
        &a,
        "POST",
        "/admin/coupons",
        Some(r#"{"code":"MAIL","available_count":0}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_u64().unwrap();
    let plain = call(
        &a,
        "POST",
        "/admin/coupons",
        Some(r#"{"code":"PLAIN","available_count":5}"#),
    );
    let plain = plain.body["id"].as_u64().unwrap();
    let codes_path = format!("/admin/coupons/{id}/codes");
    let r = call(
        &a,
        "POST",
        &codes_path,
        Some(r#"{"codes":["M-1","M-2","M-3"]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body,
        serde_json::json!({"coupon_id": id, "added": 3, "total_codes": 3, "available_count": 3})
    );
    // Duplicates add nothing and name the first: within the request, with a code in use
    // (in any case), with a live coupon's own code.
    for (body, first) in [
        (r#"{"codes":["M-4","M-5","m-4"]}"#, "m-4"),
        (r#"{"codes":["M-6","m-2","plain"]}"#, "m-2"),
        (r#"{"codes":["M-7","plain"]}"#, "plain"),
    ] {
        let r = call(&a, "POST", &codes_path, Some(body));
        assert_eq!(r.status, 409, "{body}: {}", r.body);
        assert_eq!(r.body["code"], "code_taken", "{body}");
        assert!(
            r.body["detail"].as_str().unwrap().contains(first),
            "{body}: {}",
            r.body
        );
    }
    assert_eq!(codes_agree(&db, CouponId(id)), (3, 0));
    // A coupon's own code may not be a unique code either.
    let r = call(
        &a,
        "POST",
        "/admin/coupons",
        Some(r#"{"code":"m-3","available_count":1}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("code_taken"))
    );
    // The same with a key: the refusal is recorded and replayed, and no coupon is left behind
    // (the insert came before the check and was committed with the key once).
    let coupons_before: i64 = db.scalar("SELECT COUNT(*) FROM coupons");
    for replay in ["false", "true"] {
        let r = svc.call(
            "POST",
            "/admin/coupons",
            &[JSON, (a.0, &a.1), ("Idempotency-Key", "own-code-m3")],
            Some(r#"{"code":"m-3","available_count":1}"#),
        );
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (409, Some("code_taken"))
        );
        let replayed = r.headers.get("idempotent-replayed").map(String::as_str);
        assert_eq!(replayed.unwrap_or("false"), replay);
    }
    let coupons_after: i64 = db.scalar("SELECT COUNT(*) FROM coupons");
    assert_eq!(coupons_after, coupons_before);
    let r = call(
        &a,
        "PUT",
        &format!("/admin/coupons/{plain}"),
        Some(r#"{"code":"M-3"}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("code_taken"))
    );
    // Stock comes from codes only.
    let r = call(
        &a,
        "PUT",
        &format!("/admin/coupons/{id}"),
        Some(r#"{"available_count":9}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("stock_from_codes"))
    );
    let r = call(
        &a,
        "POST",
        &format!("/admin/coupons/{plain}/codes"),
        Some(r#"{"codes":["P-1"]}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("stock_from_codes"))
    );
    let r = call(
        &a,
        "POST",
        &codes_path,
        Some(r#"{"count":5,"pattern":"Z#","charset":"AB"}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (422, Some("pattern_exhausted"))
    );
    let r = call(
        &a,
        "POST",
        &codes_path,
        Some(r#"{"count":5,"codes":["X"]}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (422, Some("invalid_body"))
    );
    // A printed code claims that very code; again it is code_used.
    let r = call(&ad, "POST", "/claims", Some(r#"{"code":"m-2"}"#));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["claim"]["assigned_code"], "M-2");
    let r = call(&b, "POST", "/claims", Some(r#"{"code":"M-2"}"#));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("code_used"))
    );
    // By id, or by the coupon's own code: any unassigned code.
    let r = call(&b, "POST", &format!("/coupons/{id}/claim"), None);
    assert_eq!(r.status, 201, "{}", r.body);
    let by_id = r.body["claim"]["assigned_code"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(by_id == "M-1" || by_id == "M-3", "{by_id}");
    let r = call(&b, "POST", "/claims", Some(r#"{"code":"MAIL"}"#));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["available_count"], 0);
    let r = call(&b, "POST", "/claims", Some(r#"{"code":"MAIL"}"#));
    assert_eq!((r.status, r.body["code"].as_str()), (409, Some("sold_out")));
    // A plain coupon's claim has none.
    let r = call(&ad, "POST", &format!("/coupons/{plain}/claim"), None);
    assert_eq!(r.body["claim"]["assigned_code"], serde_json::Value::Null);
    // The history and the admin's claims show them.
    let r = call(&ad, "GET", "/users/me/history", None);
    let shown: Vec<&serde_json::Value> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["assigned_code"])
        .collect();
    assert_eq!(shown, [&serde_json::Value::Null, &serde_json::json!("M-2")]);
    let r = call(&a, "GET", &format!("/admin/coupons/{id}/claims"), None);
    let mut shown: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["assigned_code"].as_str().unwrap())
        .collect();
    shown.sort();
    assert_eq!(shown, ["M-1", "M-2", "M-3"]);
    codes_agree(&db, CouponId(id));
    // The list, paged and filtered.
    let r = call(&a, "GET", &format!("{codes_path}?limit=2"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    assert!(r.headers["link"].contains("after="), "{:?}", r.headers);
    let r = call(&a, "GET", &format!("{codes_path}?status=unassigned"), None);
    assert_eq!(r.body, serde_json::json!([]));
    let r = call(&a, "GET", &format!("{codes_path}?status=assigned"), None);
    let items = r.body.as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items
        .iter()
        .all(|c| c["status"] == "assigned" && c["claim_id"].is_u64()));
    let r = call(&a, "GET", &format!("{codes_path}?status=other"), None);
    assert_eq!(r.status, 422);
    let r = call(&ad, "GET", &codes_path, None);
    assert_eq!(r.status, 403);
    // CSV: every code, a line each.
    let r = call(&a, "GET", &format!("{codes_path}?format=csv"), None);
    assert_eq!(r.status, 200);
    assert!(
        r.headers["content-type"].starts_with("text/csv"),
        "{:?}",
        r.headers
    );
    let raw = r.body.as_str().unwrap();
    let text = if r.headers.contains_key("transfer-encoding") {
        dechunk(raw)
    } else {
        raw.to_owned()
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "code,status,claim_id");
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.split(',').nth(1) == Some("assigned")),
        "{text}"
    );
    let r = call(&a, "GET", "/admin/coupons/999999/codes?format=csv", None);
    assert_eq!(r.status, 404);
    // A bad page is refused for CSV as for JSON (found by Schemathesis), not ignored.
    for bad in ["limit=0", "after=x"] {
        let r = call(&a, "GET", &format!("{codes_path}?format=csv&{bad}"), None);
        assert!(r.status == 400 || r.status == 422, "{bad}: {}", r.status);
    }
}

#[test]
fn a_csv_of_many_codes_streams_every_page() {
    let db = TestDb::new();
    let c = coded(&db, "BULK", 2500);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut codes::csv(&db.pool, c, None).unwrap(), &mut text).unwrap();
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(lines.len(), 2500);
    let distinct: HashSet<&str> = lines.iter().map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(distinct.len(), 2500);
    assert!(lines.iter().all(|l| l.ends_with(",unassigned,")));
}

#[test]
fn claims_go_on_while_an_add_of_codes_is_in_flight() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 4);
    let c = coded(&db, "BUSY", 100);
    let other = new_coupon(&db, "OTHER", 10);
    // An add in flight, as `codes::add` is until its last statement: its codes inserted and
    // not committed, the coupon's row not locked.
    let mut conn = db.conn();
    let mut tx = conn.start_transaction(Default::default()).unwrap();
    tx.exec_drop(
        "INSERT INTO code_adds (coupon_id) VALUES (?) ON DUPLICATE KEY UPDATE coupon_id = coupon_id",
        (c.0,),
    )
    .unwrap();
    tx.exec_drop(
        "INSERT INTO coupon_codes (coupon_id, code) VALUES (?, 'LATE-1'), (?, 'LATE-2')",
        (c.0, c.0),
    )
    .unwrap();
    // Every claim is answered meanwhile (waiting for those rows would be a lock-wait timeout,
    // then `busy`), the last ones reading up to the rows in flight, which they never get.
    let won: Vec<String> = (0..100)
        .map(|i| {
            let claim = db.claims.claim(users[i % 4], c).unwrap().claim;
            claim.assigned_code.unwrap()
        })
        .collect();
    assert!(won.iter().all(|code| !code.starts_with("LATE")));
    assert!(matches!(db.claims.claim(users[0], c), Err(Error::SoldOut)));
    db.claims.claim(users[1], other).unwrap();
    tx.rollback().unwrap();
    assert_eq!(codes_agree(&db, c), (0, 100));
}

//! A claim's life: holds, confirm, release, expiry, voids, redemption, claim by code and
//! eligibility; each race run with rayon and checked in the database afterwards.

use crate::http::{bearer, make_admin};
use crate::library::{new_coupon, new_users, threads};
use crate::support::{auth, Service, TestDb, JSON};
use coupons::claim::{self, Ask, Claimed};
use coupons::coupon::{self, CouponChange, RulesChange};
use coupons::life::{self, Actor};
use coupons::{
    ClaimId, ClaimStatus, CouponCode, CouponId, Error, HoldSeconds, Label, PerUserLimit, UserId,
};
use mysql::prelude::Queryable;
use rayon::prelude::*;
use std::time::{Duration, Instant};

fn hold(user: UserId, coupon: CouponId, secs: i64) -> Ask {
    Ask {
        hold: Some(HoldSeconds::parse(secs).unwrap()),
        ..Ask::new(user, coupon)
    }
}

/// Claims of `coupon` by status, from the claim rows.
fn statuses(db: &TestDb, coupon: CouponId) -> Vec<(String, i64)> {
    db.conn()
        .exec(
            "SELECT status, COUNT(*) FROM claims WHERE coupon_id = ? GROUP BY status ORDER BY status",
            (coupon.0,),
        )
        .unwrap()
}

/// Checks the invariant and the per-user counters in the database.
#[track_caller]
fn balanced(db: &TestDb, coupon: CouponId) -> (i64, i64, i64) {
    let mismatches = crate::support::counter_mismatches(&mut db.conn());
    assert!(mismatches.is_empty(), "per-user counts: {mismatches:?}");
    db.stock(coupon.0)
}

fn limit(db: &TestDb, coupon: CouponId, n: i64) {
    let change = CouponChange {
        rules: RulesChange {
            per_user_limit: Some(Some(PerUserLimit::parse(n).unwrap())),
            ..Default::default()
        },
        ..Default::default()
    };
    coupon::update(&db.pool, UserId(0), coupon, &change).unwrap();
}

#[test]
fn holds_and_claims_racing_sell_out_exactly_the_stock() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 8);
    let c = new_coupon(&db, "HOLDRUSH", 40);
    let won: Vec<ClaimStatus> = threads(16).install(|| {
        (0..400)
            .into_par_iter()
            .filter_map(|i| {
                let user = users[i % 8];
                let ask = match i % 2 {
                    0 => hold(user, c, 600),
                    _ => Ask::new(user, c),
                };
                match db.claims.ask(&ask, None).result {
                    Ok(won) => Some(won.claim.status),
                    Err(Error::SoldOut) => None,
                    Err(e) => panic!("unexpected {e}"),
                }
            })
            .collect()
    });
    assert_eq!(won.len(), 40);
    let held = won.iter().filter(|s| **s == ClaimStatus::Held).count() as i64;
    assert!(held > 0 && held < 40, "{held} held of 40");
    assert_eq!(balanced(&db, c), (0, 40, 40));
    assert_eq!(
        statuses(&db, c),
        vec![("held".into(), held), ("claimed".into(), 40 - held)]
    );
    let admin = coupon::admin_get(&db.pool, c).unwrap();
    assert_eq!(
        (admin.claims.held, admin.claims.claimed),
        (held as u64, 40 - held as u64)
    );
}

#[test]
fn per_user_limits_count_holds_and_a_release_frees_one() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 4);
    let c = new_coupon(&db, "HOLDLIMIT", 100);
    limit(&db, c, 2);
    let won: Vec<(usize, Claimed)> = threads(16).install(|| {
        (0..80)
            .into_par_iter()
            .filter_map(|i| {
                let ask = match i % 3 {
                    0 => Ask::new(users[i % 4], c),
                    _ => hold(users[i % 4], c, 600),
                };
                match db.claims.ask(&ask, None).result {
                    Ok(won) => Some((i % 4, won)),
                    Err(Error::LimitReached) => None,
                    Err(e) => panic!("unexpected {e}"),
                }
            })
            .collect()
    });
    for u in 0..4 {
        assert_eq!(won.iter().filter(|(w, _)| *w == u).count(), 2, "user {u}");
    }
    assert_eq!(balanced(&db, c), (92, 8, 100));
    // A released hold no longer counts: its owner may claim once more, and only once.
    let (u, held) = won
        .iter()
        .find(|(_, w)| w.claim.status == ClaimStatus::Held)
        .expect("some hold");
    let released = life::release(&db.pool, Actor::Owner(users[*u]), held.claim.id).unwrap();
    assert_eq!(released.claim.status, ClaimStatus::Released);
    db.claims.claim(users[*u], c).unwrap();
    assert!(matches!(
        db.claims.claim(users[*u], c),
        Err(Error::LimitReached)
    ));
    assert_eq!(balanced(&db, c), (92, 8, 100));
    let e = claim_eligibility(&db, users[*u], c);
    assert_eq!(
        (e.eligible, e.reason, e.claimed_by_you),
        (false, Some("limit_reached"), 2)
    );
}

fn claim_eligibility(db: &TestDb, user: UserId, c: CouponId) -> coupons::claim::Eligibility {
    coupons::claim::eligibility(&db.pool, user, c).unwrap()
}

#[test]
fn confirm_release_void_and_expiry_racing_end_each_hold_once() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 3);
    let c = new_coupon(&db, "HOLDRACE", 60);
    let holds: Vec<ClaimId> = (0..60)
        .map(|i| {
            let won = db.claims.ask(&hold(users[i % 3], c, 1), None).result;
            won.unwrap().claim.id
        })
        .collect();
    let reason = Label::parse("reason", "race", 500).unwrap();
    // Start around the end of the holds, so some confirms and releases come before it and some
    // after, while two sweepers run.
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(900));
    threads(16).install(|| {
        (0..60 * 5).into_par_iter().for_each(|i| {
            let id = holds[i / 5];
            let owner = users[(i / 5) % 3];
            let result = match i % 5 {
                0 => life::confirm(&db.pool, owner, id).map(|_| ()),
                1 => life::release(&db.pool, Actor::Owner(owner), id).map(|_| ()),
                2 => life::void(&db.pool, users[0], id, &reason).map(|_| ()),
                _ => life::expire_due(&db.pool).map(|_| ()),
            };
            match result {
                Ok(()) | Err(Error::HoldExpired | Error::NotActive | Error::AlreadyVoided) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        })
    });
    // Whatever is still held ran out by now: swept, it ends too.
    let wait = Duration::from_millis(1100).saturating_sub(started.elapsed());
    std::thread::sleep(wait);
    while life::expire_due(&db.pool).unwrap() > 0 {}
    let by_status = statuses(&db, c);
    assert!(!by_status.iter().any(|(s, _)| s == "held"), "{by_status:?}");
    let live: i64 = by_status
        .iter()
        .filter(|(s, _)| s == "claimed")
        .map(|(_, n)| n)
        .sum();
    // Every ended hold gave its unit back once: the invariant, and the audit log's count.
    assert_eq!(balanced(&db, c), (60 - live, live, 60));
    let ended = db.scalar(
        "SELECT COUNT(*) FROM audit_log
         WHERE action IN ('claim.release', 'claim.void', 'claim.expire')",
    );
    assert_eq!(ended, 60 - live);
}

#[test]
fn two_sweepers_expire_each_hold_once_and_in_time() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 4);
    let c = new_coupon(&db, "SWEEP", 500);
    let held: usize = threads(8).install(|| {
        (0..400)
            .into_par_iter()
            .map(|i| {
                let won = db.claims.ask(&hold(users[i % 4], c, 1), None).result;
                won.map(|_| 1).unwrap()
            })
            .sum()
    });
    assert_eq!(held, 400);
    assert_eq!(balanced(&db, c), (100, 400, 500));
    // Two sweepers, as two service processes would run, each with its own pool.
    let other = coupons::db::pool(
        coupons::db::opts_from_url(&db.url).unwrap(),
        4,
        coupons::db::CHECKOUT_TIMEOUT,
    )
    .unwrap();
    let every = Duration::from_millis(200);
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = |errors: &std::sync::Arc<std::sync::Mutex<Vec<String>>>| {
        let errors = std::sync::Arc::clone(errors);
        move |e: &Error| errors.lock().unwrap().push(e.to_string())
    };
    let a = life::Sweeper::start(db.pool.clone(), every, log(&errors)).unwrap();
    let b = life::Sweeper::start(other, every, log(&errors)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    while db.stock(c.0).0 < 500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((a, b));
    assert_eq!(*errors.lock().unwrap(), Vec::<String>::new());
    assert_eq!(balanced(&db, c), (500, 0, 500));
    assert_eq!(statuses(&db, c), vec![("expired".into(), 400)]);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'claim.expire'"),
        400
    );
}

#[test]
fn a_claim_by_code_is_checked_again_under_the_lock() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let c = new_coupon(&db, "Welcome10", 5);
    let typed = CouponCode::parse("WELCOME10").unwrap();
    assert_eq!(coupon::id_for_code(&db.pool, &typed).unwrap(), c);
    // The code changed after it was looked up: the claim finds no coupon with it.
    let renamed = CouponChange {
        code: Some(CouponCode::parse("SPRING").unwrap()),
        ..Default::default()
    };
    coupon::update(&db.pool, UserId(0), c, &renamed).unwrap();
    let ask = Ask {
        code: Some(typed.clone()),
        ..Ask::new(users[0], c)
    };
    assert!(matches!(
        db.claims.ask(&ask, None).result,
        Err(Error::CouponNotFound)
    ));
    assert!(matches!(
        coupon::id_for_code(&db.pool, &typed),
        Err(Error::CouponNotFound)
    ));
    let spring = Ask {
        code: Some(CouponCode::parse("spring").unwrap()),
        ..Ask::new(users[0], c)
    };
    assert!(db.claims.ask(&spring, None).result.is_ok());
    assert_eq!(balanced(&db, c), (4, 1, 5));
}

/// A service with an admin and a user, and a coupon of `stock`.
struct Shop {
    db: TestDb,
    svc: Service,
    admin: String,
    user: String,
    coupon: u64,
}

fn shop(stock: u32) -> Shop {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let user = svc.register("user@example.com");
    let body = format!(r#"{{"code":"Welcome10","available_count":{stock}}}"#);
    let auth = bearer(&admin);
    let headers = [JSON, (auth.0, auth.1.as_str())];
    let r = svc.call("POST", "/admin/coupons", &headers, Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);
    let coupon = r.body["id"].as_u64().unwrap();
    Shop {
        db,
        svc,
        admin,
        user,
        coupon,
    }
}

impl Shop {
    fn post(&self, token: &str, path: &str, body: Option<&str>) -> crate::support::Resp {
        let auth = bearer(token);
        let headers = [JSON, (auth.0, auth.1.as_str())];
        self.svc.call("POST", path, &headers, body)
    }

    fn get(&self, token: &str, path: &str) -> crate::support::Resp {
        let auth = bearer(token);
        self.svc
            .call("GET", path, &[(auth.0, auth.1.as_str())], None)
    }
}

#[test]
fn holds_over_http_confirm_release_and_show_their_status() {
    let s = shop(3);
    let claim_path = format!("/coupons/{}/claim", s.coupon);
    let r = s.post(&s.user, &claim_path, Some(r#"{"hold_seconds": 600}"#));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["claim"]["status"], "held");
    assert!(r.body["claim"]["expires_at"].is_string());
    assert_eq!(r.body["available_count"], 2);
    let held = r.body["claim"]["id"].as_u64().unwrap();
    for (body, code) in [
        (r#"{"hold_seconds": 0}"#, "invalid_hold_seconds"),
        (r#"{"hold_seconds": 86401}"#, "invalid_hold_seconds"),
        (r#"{"hold": 5}"#, "invalid_body"),
        (r#"{"code": "Welcome10"}"#, "invalid_code"),
    ] {
        let r = s.post(&s.user, &claim_path, Some(body));
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (422, Some(code)),
            "{body}"
        );
    }
    // Someone else's claim is no claim to them.
    let other = s.svc.register("other@example.com");
    let r = s.post(&other, &format!("/claims/{held}/confirm"), None);
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("claim_not_found"))
    );
    let r = s.post(&other, &format!("/claims/{held}/release"), None);
    assert_eq!(r.status, 404);
    // Confirmed, and again: the same answer.
    for _ in 0..2 {
        let r = s.post(&s.user, &format!("/claims/{held}/confirm"), None);
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (200, Some("claimed")),
            "{}",
            r.body
        );
        assert_eq!(r.body["id"].as_u64(), Some(held));
    }
    let r = s.post(&s.user, &format!("/claims/{held}/release"), None);
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("not_active"))
    );
    // A second hold, released by an admin: its unit comes back.
    let r = s.post(&s.user, &claim_path, Some(r#"{"hold_seconds": 600}"#));
    let second = r.body["claim"]["id"].as_u64().unwrap();
    let r = s.post(&s.admin, &format!("/claims/{second}/release"), None);
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("released")),
        "{}",
        r.body
    );
    let r = s.post(&s.user, &format!("/claims/{second}/confirm"), None);
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("not_active"))
    );
    assert_eq!(s.db.stock(s.coupon), (2, 1, 3));
    // The history, the admin's views and the audit log show it all.
    let r = s.get(&s.user, "/users/me/history");
    let got: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["released", "claimed"]);
    let r = s.get(&s.admin, &format!("/admin/coupons/{}", s.coupon));
    assert_eq!(
        (
            r.body["held"].as_u64(),
            r.body["claimed"].as_u64(),
            r.body["released"].as_u64()
        ),
        (Some(0), Some(1), Some(1)),
        "{}",
        r.body
    );
    let r = s.get(&s.admin, &format!("/admin/coupons/{}/claims", s.coupon));
    assert_eq!(r.body[1]["status"], "released");
    assert_eq!(
        s.db.scalar(
            "SELECT COUNT(*) FROM audit_log WHERE action IN ('claim.confirm', 'claim.release')"
        ),
        2
    );
}

#[test]
fn a_hold_left_alone_expires_within_seconds_with_two_services() {
    let s = shop(2);
    let second = Service::start(&s.db);
    let r = s.post(
        &s.user,
        &format!("/coupons/{}/claim", s.coupon),
        Some(r#"{"hold_seconds": 1}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["claim"]["id"].as_u64().unwrap();
    let held_until = Instant::now() + Duration::from_secs(1);
    let r = s.get(&s.user, "/coupons");
    assert_eq!(r.body[0]["available_count"], 1);
    // Back in the listing within 5 s of its end, and expired exactly once.
    loop {
        let r = s.get(&s.user, "/coupons");
        if r.body[0]["available_count"] == 2 {
            break;
        }
        assert!(
            Instant::now() < held_until + Duration::from_secs(5),
            "not back in 5 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(second);
    assert_eq!(s.db.stock(s.coupon), (2, 0, 2));
    let r = s.post(&s.user, &format!("/claims/{id}/confirm"), None);
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("not_active"))
    );
    assert_eq!(
        s.db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'claim.expire'"),
        1
    );
}

#[test]
fn claims_by_code_over_http_are_claims_of_that_coupon() {
    let s = shop(5);
    let r = s.post(&s.user, "/claims", Some(r#"{"code": "welcome10"}"#));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["claim"]["coupon_id"].as_u64(), Some(s.coupon));
    assert_eq!(r.body["claim"]["status"], "claimed");
    let r = s.post(
        &s.user,
        "/claims",
        Some(r#"{"code": "WELCOME10", "hold_seconds": 60}"#),
    );
    assert_eq!(
        (r.status, r.body["claim"]["status"].as_str()),
        (201, Some("held"))
    );
    for (body, status, code) in [
        (r#"{"code": "nope"}"#, 404, "coupon_not_found"),
        (r#"{"code": "bad code!"}"#, 422, "invalid_code"),
        (r#"{}"#, 422, "invalid_code"),
        (r#"{"code": "welcome10", "extra": 1}"#, 422, "invalid_body"),
    ] {
        let r = s.post(&s.user, "/claims", Some(body));
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    // Idempotency keys: the same answer again, never a second claim.
    let auth = bearer(&s.user);
    let headers = [
        JSON,
        (auth.0, auth.1.as_str()),
        ("Idempotency-Key", "by-code-1"),
    ];
    let first = s.svc.call(
        "POST",
        "/claims",
        &headers,
        Some(r#"{"code": "Welcome10"}"#),
    );
    let again = s.svc.call(
        "POST",
        "/claims",
        &headers,
        Some(r#"{"code": "Welcome10"}"#),
    );
    assert_eq!(first.status, 201);
    assert_eq!(
        again.headers.get("idempotent-replayed").map(String::as_str),
        Some("true")
    );
    assert_eq!(first.body["claim"]["id"], again.body["claim"]["id"]);
    // A deleted coupon's code names nothing.
    let auth = bearer(&s.admin);
    let r = s.svc.call(
        "DELETE",
        &format!("/admin/coupons/{}", s.coupon),
        &[(auth.0, auth.1.as_str())],
        None,
    );
    assert_eq!(r.status, 200);
    let r = s.post(&s.user, "/claims", Some(r#"{"code": "welcome10"}"#));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("coupon_not_found"))
    );
    assert_eq!(s.db.stock(s.coupon), (2, 3, 5));
}

#[test]
fn eligibility_says_why_without_writing() {
    let s = shop(1);
    let path = format!("/coupons/{}/eligibility", s.coupon);
    let r = s.get(&s.user, &path);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (
            &r.body["eligible"],
            &r.body["reason"],
            &r.body["available_count"],
            &r.body["claimed_by_you"]
        ),
        (&true.into(), &serde_json::Value::Null, &1.into(), &0.into())
    );
    let r = s.post(
        &s.user,
        &format!("/coupons/{}/claim", s.coupon),
        Some(r#"{"hold_seconds": 60}"#),
    );
    assert_eq!(r.status, 201);
    let r = s.get(&s.user, &path);
    assert_eq!(
        (&r.body["reason"], &r.body["claimed_by_you"]),
        (&"sold_out".into(), &1.into())
    );
    let other = s.svc.register("other@example.com");
    let r = s.get(&other, &path);
    assert_eq!(
        (&r.body["eligible"], &r.body["claimed_by_you"]),
        (&false.into(), &0.into())
    );
    let r = s.get(&s.user, "/coupons/999999/eligibility");
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("coupon_not_found"))
    );
    let r = s.svc.call("GET", &path, &[], None);
    assert_eq!(r.status, 401);
    assert_eq!(s.db.scalar("SELECT COUNT(*) FROM claims"), 1);
}

fn order(id: &str, amount: u64, currency: &str) -> life::Order {
    life::Order {
        id: coupons::OrderId::parse(id).unwrap(),
        amount,
        currency: coupons::Currency::parse(currency).unwrap(),
    }
}

#[test]
fn parallel_redeems_of_one_claim_redeem_it_once() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 2);
    let c = new_coupon(&db, "REDEEMRACE", 10);
    let change = CouponChange {
        rules: RulesChange {
            percent_off: Some(Some(coupons::PercentOff::parse(15).unwrap())),
            ..Default::default()
        },
        ..Default::default()
    };
    coupon::update(&db.pool, UserId(0), c, &change).unwrap();
    // Twenty orders for one claim: one wins, the others are told it went to another order.
    let claimed = db.claims.claim(users[0], c).unwrap().claim.id;
    let owner = Actor::Owner(users[0]);
    let results: Vec<Result<life::Redemption, Error>> = threads(20).install(|| {
        (0..20)
            .into_par_iter()
            .map(|i| {
                life::redeem(
                    &db.pool,
                    owner,
                    claimed,
                    &order(&format!("A-{i}"), 12_000, "EUR"),
                )
            })
            .collect()
    });
    let won: Vec<&life::Redemption> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    assert_eq!(won[0].discount_amount, 1_800);
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(_) | Err(Error::AlreadyRedeemed))));
    // The same order twenty times, held first: one redemption, the same answer to all.
    let held = db
        .claims
        .ask(&hold(users[1], c, 600), None)
        .result
        .unwrap()
        .claim
        .id;
    let same: Vec<life::Redemption> = threads(20).install(|| {
        (0..20)
            .into_par_iter()
            .map(|_| {
                life::redeem(
                    &db.pool,
                    Actor::Admin(users[0]),
                    held,
                    &order("B-1", 999, "USD"),
                )
                .unwrap()
            })
            .collect()
    });
    assert!(same.iter().all(|r| *r == same[0]), "{same:?}");
    assert_eq!(same[0].discount_amount, 149);
    let again = life::redeem(
        &db.pool,
        Actor::Owner(users[1]),
        held,
        &order("B-1", 1_000, "USD"),
    );
    assert!(matches!(again, Err(Error::OrderMismatch)));
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'claim.redeem'"),
        2
    );
    assert_eq!(statuses(&db, c), vec![("redeemed".into(), 2)]);
    // Redeemed claims still hold their units; a void gives one back.
    assert_eq!(balanced(&db, c), (8, 2, 10));
    let reason = Label::parse("reason", "refund", 500).unwrap();
    life::void(&db.pool, users[0], held, &reason).unwrap();
    assert!(matches!(
        life::redeem(&db.pool, owner, held, &order("B-1", 999, "USD")),
        Err(Error::ClaimNotFound)
    ));
    assert!(matches!(
        life::redeem(
            &db.pool,
            Actor::Owner(users[1]),
            held,
            &order("B-1", 999, "USD")
        ),
        Err(Error::NotActive)
    ));
    assert_eq!(balanced(&db, c), (9, 1, 10));
}

#[test]
fn redemption_over_http_applies_the_coupons_terms() {
    let s = shop(5);
    let auth = bearer(&s.admin);
    let headers = [JSON, (auth.0, auth.1.as_str())];
    let body = r#"{"amount_off": 500, "currency": "EUR", "min_order_amount": 1000}"#;
    let r = s.svc.call(
        "PUT",
        &format!("/admin/coupons/{}", s.coupon),
        &headers,
        Some(body),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let claim_path = format!("/coupons/{}/claim", s.coupon);
    let r = s.post(&s.user, &claim_path, Some(r#"{"hold_seconds": 600}"#));
    let id = r.body["claim"]["id"].as_u64().unwrap();
    let redeem = format!("/claims/{id}/redeem");
    for (body, status, code) in [
        (
            r#"{"order_id": "A-1", "order_amount": 999, "currency": "EUR"}"#,
            409,
            "order_below_minimum",
        ),
        (
            r#"{"order_id": "A-1", "order_amount": 5000, "currency": "USD"}"#,
            422,
            "currency_mismatch",
        ),
        (
            r#"{"order_id": "", "order_amount": 5000, "currency": "EUR"}"#,
            422,
            "invalid_order_id",
        ),
        (
            r#"{"order_id": "A\u0001", "order_amount": 5000, "currency": "EUR"}"#,
            422,
            "invalid_order_id",
        ),
        (
            r#"{"order_id": "A-1", "order_amount": -1, "currency": "EUR"}"#,
            422,
            "invalid_order_amount",
        ),
        (
            r#"{"order_id": "A-1", "order_amount": 5000, "currency": "eur"}"#,
            422,
            "invalid_currency",
        ),
        (
            r#"{"order_id": "A-1", "order_amount": 5000}"#,
            422,
            "invalid_body",
        ),
    ] {
        let r = s.post(&s.user, &redeem, Some(body));
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (status, Some(code)),
            "{body}: {}",
            r.body
        );
    }
    let other = s.svc.register("other@example.com");
    let good = r#"{"order_id": "A-1001", "order_amount": 12000, "currency": "EUR"}"#;
    let r = s.post(&other, &redeem, Some(good));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("claim_not_found"))
    );
    // A hold redeemed directly; the same order again is the same answer.
    let first = s.post(&s.user, &redeem, Some(good));
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(
        (
            &first.body["status"],
            &first.body["discount_amount"],
            &first.body["order_id"]
        ),
        (&"redeemed".into(), &500.into(), &"A-1001".into())
    );
    let again = s.post(&s.user, &redeem, Some(good));
    assert_eq!((again.status, &again.body), (200, &first.body));
    let r = s.post(
        &s.user,
        &redeem,
        Some(r#"{"order_id": "A-1002", "order_amount": 12000, "currency": "EUR"}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("already_redeemed"))
    );
    let r = s.post(
        &s.user,
        &redeem,
        Some(r#"{"order_id": "A-1001", "order_amount": 12001, "currency": "EUR"}"#),
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (422, Some("order_mismatch"))
    );
    // The history and the admin's views show the redemption.
    let r = s.get(&s.user, "/users/me/history");
    assert_eq!(
        (
            &r.body[0]["status"],
            &r.body[0]["order_id"],
            &r.body[0]["discount_amount"]
        ),
        (&"redeemed".into(), &"A-1001".into(), &500.into())
    );
    let r = s.get(&s.admin, &format!("/admin/coupons/{}", s.coupon));
    assert_eq!(r.body["redeemed"], 1);
    // An admin may redeem anyone's claim; a hold that ran out may not be redeemed.
    let r = s.post(&s.user, &claim_path, Some(r#"{"hold_seconds": 1}"#));
    let short = r.body["claim"]["id"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let r = s.post(&s.admin, &format!("/claims/{short}/redeem"), Some(good));
    assert!(
        matches!(r.body["code"].as_str(), Some("hold_expired" | "not_active")),
        "{}",
        r.body
    );
    let r = s.post(&s.user, &claim_path, None);
    let plain = r.body["claim"]["id"].as_u64().unwrap();
    let r = s.post(&s.admin, &format!("/claims/{plain}/redeem"), Some(good));
    assert_eq!(
        (r.status, &r.body["discount_amount"]),
        (200, &500.into()),
        "{}",
        r.body
    );
    balanced(&s.db, CouponId(s.coupon));
    let r = s.get(&s.admin, &format!("/admin/coupons/{}", s.coupon));
    assert_eq!(r.body["redeemed"], 2);
}

/// Four users, a coupon of stock `n`, and `n` holds of 600 s on it, the users taking turns:
/// (users, coupon, [(owner, hold)]).
fn held_by_four(
    db: &TestDb,
    code: &str,
    n: usize,
) -> (Vec<UserId>, CouponId, Vec<(UserId, ClaimId)>) {
    let users = new_users(db, &auth(), 4);
    let c = new_coupon(db, code, n as i64);
    let holds = (0..n)
        .map(|i| {
            let won = db.claims.ask(&hold(users[i % 4], c, 600), None).result;
            (users[i % 4], won.unwrap().claim.id)
        })
        .collect();
    (users, c, holds)
}

#[test]
fn confirms_combined_each_confirm_once_and_answer_each_their_own() {
    let db = TestDb::new();
    let (users, c, holds) = held_by_four(&db, "CONFIRMS", 200);
    let confirms = life::Confirms::new(db.pool.clone());
    // Each hold confirmed twice at once, and by someone else once: shared transactions, each
    // request decided alone.
    let answers: Vec<(usize, Result<ClaimStatus, Error>)> = threads(32).install(|| {
        (0..600)
            .into_par_iter()
            .map(|i| {
                let (owner, id) = holds[i / 3];
                let who = if i % 3 == 2 {
                    users[(i / 3 + 1) % 4]
                } else {
                    owner
                };
                (i, confirms.confirm(who, id).map(|r| r.claim.status))
            })
            .collect()
    });
    for (i, answer) in answers {
        match (i % 3, answer) {
            (0 | 1, Ok(ClaimStatus::Claimed)) | (2, Err(Error::ClaimNotFound)) => {}
            (_, other) => panic!("request {i}: {other:?}"),
        }
    }
    assert_eq!(statuses(&db, c), vec![("claimed".into(), 200)]);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'claim.confirm'"),
        200
    );
    assert_eq!(balanced(&db, c), (0, 200, 200));
}

#[test]
fn confirms_left_as_callbacks_are_answered_once_beside_waiting_ones() {
    let db = TestDb::new();
    let (users, c, holds) = held_by_four(&db, "CALLBACKS", 300);
    let confirms = life::Confirms::new(db.pool.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    // Each hold confirmed twice at once: by a caller that waits, and by one that leaves a
    // callback (which may run batches, or only queue while one is in flight); and by someone
    // else once, through a callback.
    threads(32).install(|| {
        (0..900).into_par_iter().for_each(|i| {
            let (owner, id) = holds[i / 3];
            let who = if i % 3 == 2 {
                users[(i / 3 + 1) % 4]
            } else {
                owner
            };
            let sent = tx.clone();
            let reply = move |a: Result<claim::ClaimRecord, Error>| {
                sent.send((i, a.map(|r| r.claim.status))).unwrap()
            };
            if i % 3 == 0 {
                tx.send((i, confirms.confirm(who, id).map(|r| r.claim.status)))
                    .unwrap();
            } else if let Err(reply) = confirms.confirm_with(who, id, i % 2 == 0, reply) {
                // The lane was idle and this caller may not run it: it was given back.
                reply(confirms.confirm(who, id));
            }
        })
    });
    drop(tx);
    let mut answered = vec![0; 900];
    for (i, answer) in rx {
        answered[i] += 1;
        match (i % 3, answer) {
            (0 | 1, Ok(ClaimStatus::Claimed)) | (2, Err(Error::ClaimNotFound)) => {}
            (_, other) => panic!("request {i}: {other:?}"),
        }
    }
    assert!(answered.iter().all(|&n| n == 1), "answers: {answered:?}");
    assert_eq!(statuses(&db, c), vec![("claimed".into(), 300)]);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'claim.confirm'"),
        300
    );
    assert_eq!(balanced(&db, c), (0, 300, 300));
}

#[test]
fn parallel_confirms_over_http_are_each_answered_with_their_own_claim() {
    let s = shop(120);
    let users: Vec<String> = (0..6)
        .map(|i| s.svc.register(&format!("buyer{i}@example.com")))
        .collect();
    let claim_path = format!("/coupons/{}/claim", s.coupon);
    let holds: Vec<(usize, u64)> = threads(24).install(|| {
        (0..120)
            .into_par_iter()
            .map(|i| {
                let r = s.post(&users[i % 6], &claim_path, Some(r#"{"hold_seconds": 600}"#));
                assert_eq!(r.status, 201, "{}", r.body);
                (i % 6, r.body["claim"]["id"].as_u64().unwrap())
            })
            .collect()
    });
    // Each hold confirmed twice at once by its owner, and once by someone else: connection
    // threads queue confirms while a batch is in flight, and the batch's thread answers them.
    let answers: Vec<(usize, u16, serde_json::Value)> = threads(48).install(|| {
        (0..360)
            .into_par_iter()
            .map(|i| {
                let (owner, id) = holds[i / 3];
                let who = if i % 3 == 2 { (owner + 1) % 6 } else { owner };
                let r = s.post(&users[who], &format!("/claims/{id}/confirm"), None);
                (i, r.status, r.body)
            })
            .collect()
    });
    for (i, status, body) in answers {
        let id = holds[i / 3].1;
        match (i % 3, status) {
            (0 | 1, 200) => {
                assert_eq!(body["id"], id, "request {i}: {body}");
                assert_eq!(body["status"], "claimed", "request {i}: {body}");
            }
            (2, 404) => assert_eq!(body["code"], "claim_not_found", "request {i}: {body}"),
            _ => panic!("request {i}: {status} {body}"),
        }
    }
    let c = CouponId(s.coupon);
    assert_eq!(statuses(&s.db, c), vec![("claimed".into(), 120)]);
    assert_eq!(
        s.db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'claim.confirm'"),
        120
    );
    assert_eq!(balanced(&s.db, c), (0, 120, 120));
}

/// Migration 012 moved the counts by status from an index over the claims to `claim_counts`:
/// run over claims made before it, it counts each status, and the admin's view agrees.
#[test]
fn the_counts_migration_counts_the_claims_made_before_it() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 2);
    let c = new_coupon(&db, "BEFORE12", 20);
    let held = |secs| {
        db.claims
            .ask(&hold(users[0], c, secs), None)
            .result
            .unwrap()
    };
    let made: Vec<ClaimId> = (0..6)
        .map(|i| held(if i == 5 { 1 } else { 600 }).claim.id)
        .collect();
    db.claims.claim(users[1], c).unwrap();
    life::confirm(&db.pool, users[0], made[0]).unwrap();
    life::redeem(
        &db.pool,
        Actor::Owner(users[0]),
        made[1],
        &order("B-1", 500, "EUR"),
    )
    .unwrap();
    life::release(&db.pool, Actor::Owner(users[0]), made[2]).unwrap();
    let reason = Label::parse("reason", "test", 500).unwrap();
    life::void(&db.pool, users[0], made[3], &reason).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(life::expire_due(&db.pool).unwrap(), 1);
    // Back to how a database stood before 012: no kept counts, the old index.
    let mut conn = db.conn();
    conn.query_drop("DELETE FROM claim_counts").unwrap();
    conn.query_drop("DELETE FROM schema_migrations WHERE version = 12")
        .unwrap();
    conn.query_drop("ALTER TABLE claims ADD KEY claims_by_coupon_status (coupon_id, status)")
        .unwrap();
    assert_eq!(crate::support::miscounted(&mut conn).len(), 1);
    coupons::db::migrate(&db.pool).unwrap();
    assert_eq!(crate::support::miscounted(&mut conn), vec![]);
    let index: i64 = db.scalar(
        "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE()
         AND index_name = 'claims_by_coupon_status'",
    );
    assert_eq!(index, 0);
    let seen = coupon::admin_get(&db.pool, c).unwrap().claims;
    // held: made[4]; claimed: made[0] and users[1]'s; one each of the rest.
    let expected = coupon::StatusCounts {
        held: 1,
        claimed: 2,
        redeemed: 1,
        voided: 1,
        released: 1,
        expired: 1,
    };
    assert_eq!(seen, expected);
    assert_eq!(balanced(&db, c), (20 - 4, 4, 20));
}

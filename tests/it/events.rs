//! The event feed and webhooks: an event for every committed change and none for a refused or
//! rolled-back one; a feed read by "after the last id" that never skips, with writers on
//! several service processes; signed webhook deliveries, retried, in order, surviving a kill.

use crate::http::{bearer, make_admin};
use crate::library::{new_coupon, new_users, threads};
use crate::support::{auth, Service, TestDb, JSON};
use coupons::claim::Ask;
use coupons::codes::{self, NewCodes};
use coupons::coupon::{self, CouponChange};
use coupons::events::{self, EventType};
use coupons::life::{self, Actor, Order};
use coupons::{CouponCode, Currency, Error, HoldSeconds, Label, OrderId, Page, UserId};
use mysql::prelude::Queryable;
use rayon::prelude::*;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The whole feed, oldest first, as (type, data).
fn feed(db: &TestDb) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = Page { limit: 1000, after };
        let got = events::list(&db.pool, page, None).unwrap();
        let Some(last) = got.last() else {
            return out;
        };
        after = Some(last.id);
        out.extend(got.into_iter().map(|e| (e.kind, e.data)));
    }
}

fn types(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(t, _)| t.as_str()).collect()
}

#[test]
fn every_committed_change_has_its_event_and_a_refused_one_none() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 2);
    let c = new_coupon(&db, "EVENTS", 3);
    let other = new_coupon(&db, "TAKEN", 1);
    let hold = |secs| Ask {
        hold: Some(HoldSeconds::parse(secs).unwrap()),
        ..Ask::new(users[0], c)
    };
    // Refused after its UPDATE ran (a unique key): rolled back, no event.
    let clash = CouponChange {
        code: Some(CouponCode::parse("TAKEN").unwrap()),
        ..Default::default()
    };
    let refused = coupon::update(&db.pool, UserId(0), c, &clash);
    assert!(matches!(refused, Err(Error::CodeTaken)), "{refused:?}");
    let held = db.claims.ask(&hold(600), None).result.unwrap().claim;
    let outright = db.claims.claim(users[1], c).unwrap().claim;
    let short = db.claims.ask(&hold(1), None).result.unwrap().claim;
    // Refused: sold out.
    assert!(matches!(db.claims.claim(users[1], c), Err(Error::SoldOut)));
    life::confirm(&db.pool, users[0], held.id).unwrap();
    let order = Order {
        id: OrderId::parse("O-1").unwrap(),
        amount: 1000,
        currency: Currency::parse("EUR").unwrap(),
    };
    life::redeem(&db.pool, Actor::Owner(users[0]), held.id, &order).unwrap();
    // The same order again changes nothing: no event.
    life::redeem(&db.pool, Actor::Owner(users[0]), held.id, &order).unwrap();
    let why = Label::parse("reason", "test", 500).unwrap();
    life::void(&db.pool, UserId(0), outright.id, &why).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(life::expire_due(&db.pool).unwrap(), 1);
    let again = db.claims.ask(&hold(600), None).result.unwrap().claim;
    life::release(&db.pool, Actor::Owner(users[0]), again.id).unwrap();
    // A release of a released claim is refused: no event.
    assert!(life::release(&db.pool, Actor::Owner(users[0]), again.id).is_err());
    let coded = new_coupon(&db, "CODED", 0);
    let new = NewCodes::Import(vec![CouponCode::parse("ONE-1").unwrap()]);
    codes::add(&db.pool, UserId(0), coded, &new).unwrap();
    // Refused: the code is in use.
    assert!(codes::add(&db.pool, UserId(0), coded, &new).is_err());
    coupon::delete(&db.pool, UserId(0), other).unwrap();

    let all = feed(&db);
    assert_eq!(
        types(&all),
        [
            "coupon.created",
            "coupon.created",
            "claim.created",
            "claim.created",
            "claim.created",
            "claim.confirmed",
            "claim.redeemed",
            "claim.voided",
            "claim.expired",
            "claim.created",
            "claim.released",
            "coupon.created",
            "codes.added",
            "coupon.deleted",
        ]
    );
    let claim = |i: usize| (all[i].1["id"].as_u64(), all[i].1["status"].as_str());
    assert_eq!(claim(2), (Some(held.id.0), Some("held")));
    assert_eq!(claim(3), (Some(outright.id.0), Some("claimed")));
    assert_eq!(claim(5), (Some(held.id.0), Some("claimed")));
    assert_eq!(claim(6), (Some(held.id.0), Some("redeemed")));
    assert_eq!(claim(7), (Some(outright.id.0), Some("voided")));
    assert_eq!(claim(8), (Some(short.id.0), Some("expired")));
    assert_eq!(claim(10), (Some(again.id.0), Some("released")));
    assert_eq!(all[2].1["coupon_id"].as_u64(), Some(c.0));
    assert_eq!(all[6].1["order_id"], "O-1");
    assert_eq!(all[0].1["code"], "EVENTS");
    assert_eq!(all[12].1["added"], 1);
    assert_eq!(all[13].1["id"].as_u64(), Some(other.0));
    // Rows and feed agree: every event numbered once.
    let numbered = db.scalar("SELECT COUNT(DISTINCT seq) FROM events WHERE seq IS NOT NULL");
    assert_eq!(
        (db.scalar("SELECT COUNT(*) FROM events"), numbered),
        (14, 14)
    );

    // One type, paged.
    let created = EventType::parse("type", "claim.created").unwrap();
    let first = events::list(
        &db.pool,
        Page {
            limit: 2,
            after: None,
        },
        Some(created),
    )
    .unwrap();
    let rest = events::list(
        &db.pool,
        Page {
            limit: 2,
            after: Some(first[1].id),
        },
        Some(created),
    )
    .unwrap();
    let ids: Vec<u64> = first
        .iter()
        .chain(&rest)
        .map(|e| e.data["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [held.id.0, outright.id.0, short.id.0, again.id.0]);
    assert!(EventType::parse("type", "claim.eaten").is_err());
}

/// A reader polling `after=<last id>` on one service while writers claim, hold and release on
/// three services: it sees every event exactly once, in rising order, and the claim events
/// match the claim rows one to one.
#[test]
fn the_feed_never_skips_with_writers_on_three_services() {
    let db = TestDb::new();
    let services: Vec<Service> = (0..3).map(|_| Service::start(&db)).collect();
    let admin = make_admin(&db, &services[0], "admin@example.com");
    let tokens: Vec<String> = (0..6)
        .map(|i| services[i % 3].register(&format!("u{i}@example.com")))
        .collect();
    let hot = new_coupon(&db, "HOT", 300);
    let spread: Vec<_> = (0..8)
        .map(|i| new_coupon(&db, &format!("SPREAD{i}"), 40))
        .collect();
    let writing = AtomicBool::new(true);
    let (seen, polls) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let h = bearer(&admin);
            let mut seen: Vec<(u64, String, Value)> = Vec::new();
            let mut polls = 0;
            // Once more after the writers stop: then everything has committed.
            let mut last_round = false;
            loop {
                let done = !writing.load(Ordering::SeqCst);
                let after = seen.last().map_or(0, |e| e.0);
                let r = services[0].call(
                    "GET",
                    &format!("/admin/events?after={after}&limit=1000"),
                    &[(h.0, &h.1)],
                    None,
                );
                assert_eq!(r.status, 200, "{}", r.body);
                polls += 1;
                let page = r.body.as_array().unwrap();
                for e in page {
                    seen.push((
                        e["id"].as_u64().unwrap(),
                        e["type"].as_str().unwrap().to_owned(),
                        e["data"].clone(),
                    ));
                }
                if page.len() == 1000 {
                    continue;
                }
                if last_round {
                    return (seen, polls);
                }
                last_round = done;
            }
        });
        threads(24).install(|| {
            (0..1200).into_par_iter().for_each(|i| {
                let svc = &services[i % 3];
                let t = bearer(&tokens[i % tokens.len()]);
                let auth = [JSON, (t.0, t.1.as_str())];
                let (coupon, body) = match i % 4 {
                    0 | 1 => (hot, r#"{}"#),
                    2 => (spread[i % 8], r#"{"hold_seconds":600}"#),
                    _ => (spread[(i / 4) % 8], r#"{}"#),
                };
                let r = svc.call(
                    "POST",
                    &format!("/coupons/{}/claim", coupon.0),
                    &auth,
                    Some(body),
                );
                assert!(
                    r.status == 201 || r.status == 409,
                    "{} {}",
                    r.status,
                    r.body
                );
                // Some holds let go again: more events, from another service.
                if r.status == 201 && i % 8 == 2 {
                    let id = r.body["claim"]["id"].as_u64().unwrap();
                    let path = format!("/claims/{id}/release");
                    let r = services[(i + 1) % 3].call("POST", &path, &auth, None);
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            })
        });
        writing.store(false, Ordering::SeqCst);
        reader.join().unwrap()
    });
    assert!(polls > 2, "the reader polled while writers ran");
    let ids: Vec<u64> = seen.iter().map(|e| e.0).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids rise, never repeat"
    );
    let total = db.scalar("SELECT COUNT(*) FROM events");
    assert_eq!(ids.len() as i64, total, "every event read once");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM events WHERE seq IS NULL"),
        0
    );
    let created: HashSet<u64> = seen
        .iter()
        .filter(|e| e.1 == "claim.created")
        .map(|e| e.2["id"].as_u64().unwrap())
        .collect();
    let created_n = seen.iter().filter(|e| e.1 == "claim.created").count();
    let rows: Vec<u64> = db.conn().query("SELECT id FROM claims").unwrap();
    assert_eq!(created_n, rows.len(), "one claim.created per claim row");
    assert_eq!(created, rows.into_iter().collect::<HashSet<u64>>());
    let released: Vec<u64> = db
        .conn()
        .query("SELECT id FROM claims WHERE status = 'released' ORDER BY id")
        .unwrap();
    let mut released_events: Vec<u64> = seen
        .iter()
        .filter(|e| e.1 == "claim.released")
        .map(|e| e.2["id"].as_u64().unwrap())
        .collect();
    released_events.sort_unstable();
    assert!(!released.is_empty());
    assert_eq!(released_events, released);
    // Stock, claims and counters agree.
    for c in spread.iter().chain([&hot]) {
        db.stock(c.0);
    }
    let mismatches = crate::support::counter_mismatches(&mut db.conn());
    assert!(mismatches.is_empty(), "{mismatches:?}");

    // Over HTTP: one type, paged by Link; a bad type or a user is refused.
    let h = bearer(&admin);
    let r = services[1].call(
        "GET",
        "/admin/events?type=claim.released&limit=1",
        &[(h.0, &h.1)],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body[0]["type"], "claim.released");
    assert!(r.headers["link"].contains("type=claim.released"));
    let r = services[1].call("GET", "/admin/events?type=nope", &[(h.0, &h.1)], None);
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (422, Some("invalid_type")),
        "{}",
        r.body
    );
    let u = bearer(&tokens[0]);
    let r = services[1].call("GET", "/admin/events", &[(u.0, &u.1)], None);
    assert_eq!(r.status, 403);
}

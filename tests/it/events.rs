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

/// Events stored, and rows not numbered yet.
fn stored(db: &TestDb) -> (i64, i64) {
    (
        db.scalar("SELECT CAST(COALESCE(SUM(n), 0) AS SIGNED) FROM events"),
        db.scalar("SELECT COUNT(*) FROM events WHERE seq_last IS NULL"),
    )
}

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
    // The confirm as it left the claim: not yet redeemed, though it is now.
    assert!(all[5].1["order_id"].is_null(), "{:?}", all[5].1);
    assert_eq!(all[5].1["expires_at"], all[2].1["expires_at"]);
    let confirmed = EventType::parse("type", "claim.confirmed").unwrap();
    let page = Page {
        limit: 10,
        after: None,
    };
    let only = events::list(&db.pool, page, Some(confirmed)).unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].data, all[5].1);
    assert_eq!(all[0].1["code"], "EVENTS");
    assert_eq!(all[12].1["added"], 1);
    assert_eq!(all[13].1["id"].as_u64(), Some(other.0));
    // Rows and feed agree: every event numbered, once.
    assert_eq!(stored(&db), (14, 0));

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
    let (total, unnumbered) = stored(&db);
    assert_eq!(unnumbered, 0);
    assert_eq!(ids.len() as i64, total, "every event read once");
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

/// A delivery the test receiver got.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    event_id: u64,
    kind: String,
    status: u16,
    signed: bool,
}

#[derive(Default)]
struct Got {
    hits: Vec<Hit>,
    /// Secrets by path, set once each webhook is made.
    secrets: std::collections::HashMap<String, String>,
    /// Answer 500 to this many requests first.
    fail_first: usize,
    /// Hold the first request this long before answering, and say when it came.
    hold_first: Option<(Duration, std::sync::mpsc::Sender<()>)>,
    in_flight: std::collections::HashMap<String, usize>,
    most_in_flight: usize,
}

/// A webhook receiver on 127.0.0.1: checks signatures, answers 500 to the first requests, then
/// 200, and counts.
struct Receiver {
    addr: String,
    got: std::sync::Arc<std::sync::Mutex<Got>>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Got {
            fail_first,
            ..Default::default()
        }));
        let state = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || receive(stream, &state));
            }
        });
        Receiver { addr, got }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.got.lock().unwrap().hits.clone()
    }
}

fn receive(mut stream: std::net::TcpStream, state: &std::sync::Mutex<Got>) {
    use hmac::{Hmac, Mac};
    use std::io::{BufRead, BufReader, Read, Write};
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let n: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0; n];
    reader.read_exact(&mut body).unwrap();
    let body = String::from_utf8(body).unwrap();
    let event: Value = serde_json::from_str(&body).unwrap();
    let (status, hold) = {
        let mut g = state.lock().unwrap();
        let in_flight = g.in_flight.entry(path.clone()).or_insert(0);
        *in_flight += 1;
        let now = *in_flight;
        g.most_in_flight = g.most_in_flight.max(now);
        let status = if g.fail_first > 0 {
            g.fail_first -= 1;
            500
        } else {
            200
        };
        (status, g.hold_first.take())
    };
    if let Some((wait, tell)) = hold {
        let _ = tell.send(());
        std::thread::sleep(wait);
    }
    // The receiver's check, as the README shows it: t within 5 minutes, v1 the HMAC of
    // "<t>.<body>" with the secret.
    let mut g = state.lock().unwrap();
    let signed = (|| {
        let secret = g.secrets.get(&path)?;
        let sig = headers.get("coupons-signature")?;
        let (t, v1) = sig.split_once(",v1=")?;
        let t: i64 = t.strip_prefix("t=")?.parse().ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs() as i64;
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).ok()?;
        mac.update(format!("{t}.{body}").as_bytes());
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(want == v1 && (now - t).abs() < 300)
    })()
    .unwrap_or(false);
    let event_id = event["id"].as_u64().unwrap();
    assert_eq!(
        headers.get("coupons-event-id").map(String::as_str),
        Some(event_id.to_string().as_str())
    );
    g.hits.push(Hit {
        path: path.clone(),
        event_id,
        kind: event["type"].as_str().unwrap().to_owned(),
        status,
        signed,
    });
    *g.in_flight.get_mut(&path).unwrap() -= 1;
    drop(g);
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

/// Waits until `done` holds, for at most `secs`.
#[track_caller]
fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited {secs} s for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every event id of the feed of the given types (all when empty), oldest first.
fn event_ids(db: &TestDb, kinds: &[&str]) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = Page { limit: 1000, after };
        let got = events::list(&db.pool, page, None).unwrap();
        let Some(last) = got.last() else {
            return ids;
        };
        after = Some(last.id);
        ids.extend(
            got.iter()
                .filter(|e| kinds.is_empty() || kinds.contains(&e.kind.as_str()))
                .map(|e| e.id),
        );
    }
}

/// Checks what `path` received: every wanted event delivered with a 200, each attempt signed,
/// in feed order (a retry repeats the event it retries, never an older one), nothing else.
#[track_caller]
fn check_deliveries(hits: &[Hit], path: &str, wanted: &[u64]) {
    let mine: Vec<&Hit> = hits.iter().filter(|h| h.path == path).collect();
    assert!(mine.iter().all(|h| h.signed), "unsigned: {mine:?}");
    let ids: Vec<u64> = mine.iter().map(|h| h.event_id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] <= w[1]),
        "out of order: {ids:?}"
    );
    let mut delivered: Vec<u64> = mine
        .iter()
        .filter(|h| h.status == 200)
        .map(|h| h.event_id)
        .collect();
    delivered.dedup();
    assert_eq!(delivered, wanted, "{path}");
    let all: HashSet<u64> = ids.into_iter().collect();
    assert_eq!(
        all,
        wanted.iter().copied().collect::<HashSet<u64>>(),
        "{path}: nothing else"
    );
}

fn create_webhook(svc: &Service, admin: &str, url: &str, events: &str) -> crate::support::Resp {
    let h = bearer(admin);
    let body = format!(r#"{{"url":"{url}","events":{events},"description":"test"}}"#);
    svc.call("POST", "/admin/webhooks", &[JSON, (h.0, &h.1)], Some(&body))
}

#[test]
fn webhooks_are_signed_retried_and_delivered_in_order() {
    let db = TestDb::new();
    let receiver = Receiver::start(3);
    let env = [
        ("WEBHOOK_ALLOW_PRIVATE", "on"),
        ("WEBHOOK_FIRST_RETRY_MS", "100"),
    ];
    let svc = Service::start_with(&db, &env);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let h = bearer(&admin);
    let before = new_coupon(&db, "BEFORE", 1);
    let all = create_webhook(&svc, &admin, &receiver.url("/all"), r#"["*"]"#);
    assert_eq!(all.status, 201, "{}", all.body);
    let secret = all.body["secret"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("whsec_") && secret.len() == 6 + 64,
        "{secret}"
    );
    let voids = create_webhook(
        &svc,
        &admin,
        &receiver.url("/voids"),
        r#"["claim.voided", "claim.voided"]"#,
    );
    assert_eq!(voids.status, 201, "{}", voids.body);
    assert_eq!(voids.body["events"], serde_json::json!(["claim.voided"]));
    {
        let mut g = receiver.got.lock().unwrap();
        g.secrets.insert("/all".into(), secret.clone());
        g.secrets.insert(
            "/voids".into(),
            voids.body["secret"].as_str().unwrap().into(),
        );
    }
    let first_event = event_ids(&db, &[]).last().copied().unwrap_or(0);
    // The secret is shown once: never in the list.
    let listed = svc.call("GET", "/admin/webhooks", &[(h.0, &h.1)], None);
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body.as_array().unwrap().len(), 2);
    assert!(!listed.body.to_string().contains("whsec_"));

    // Changes: claims racing for 20 units (the rest refused: no events), voids, a coupon.
    let users = new_users(&db, &auth(), 4);
    let c = new_coupon(&db, "HOOKED", 20);
    let won: Vec<u64> = threads(8).install(|| {
        (0..60)
            .into_par_iter()
            .filter_map(|i| match db.claims.claim(users[i % 4], c) {
                Ok(won) => Some(won.claim.id.0),
                Err(Error::SoldOut) => None,
                Err(e) => panic!("{e}"),
            })
            .collect()
    });
    assert_eq!(won.len(), 20);
    let why = Label::parse("reason", "test", 500).unwrap();
    for id in &won[..3] {
        life::void(&db.pool, UserId(0), coupons::ClaimId(*id), &why).unwrap();
    }
    coupon::delete(&db.pool, UserId(0), before).unwrap();
    events::sequence(&db.pool).unwrap();
    let wanted: Vec<u64> = event_ids(&db, &[])
        .into_iter()
        .filter(|&id| id > first_event)
        .collect();
    let wanted_voids: Vec<u64> = event_ids(&db, &["claim.voided"]);
    assert_eq!((wanted.len(), wanted_voids.len()), (1 + 20 + 3 + 1, 3));
    wait_for(60, "every delivery", || {
        let hits = receiver.hits();
        let done = |path: &str, n: usize| {
            hits.iter()
                .filter(|h| h.path == path && h.status == 200)
                .count()
                >= n
        };
        done("/all", wanted.len()) && done("/voids", wanted_voids.len())
    });
    let hits = receiver.hits();
    check_deliveries(&hits, "/all", &wanted);
    check_deliveries(&hits, "/voids", &wanted_voids);
    assert_eq!(hits.iter().filter(|h| h.status == 500).count(), 3);
    let created = hits
        .iter()
        .filter(|h| h.path == "/all" && h.status == 200 && h.kind == "claim.created")
        .count();
    assert_eq!(created as i64, db.scalar("SELECT COUNT(*) FROM claims"));
    assert!(receiver.got.lock().unwrap().most_in_flight <= 1);
    db.stock(c.0);

    // Each attempt is listed, newest first: the failures with their status and next attempt.
    let id = all.body["id"].as_u64().unwrap();
    let mut attempts: Vec<Value> = Vec::new();
    let mut after = String::new();
    loop {
        let r = svc.call(
            "GET",
            &format!("/admin/webhooks/{id}/deliveries?limit=10{after}"),
            &[(h.0, &h.1)],
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.body.as_array().unwrap().clone();
        let Some(last) = page.last() else { break };
        after = format!("&after={}", last["id"]);
        attempts.extend(page);
    }
    let failed: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["outcome"] == "failed")
        .collect();
    let tried = hits.iter().filter(|h| h.path == "/all").count();
    assert_eq!(attempts.len(), tried, "one row per attempt");
    assert!(failed
        .iter()
        .all(|a| a["status_code"] == 500 && a["next_attempt_at"].is_string()));
    assert_eq!(
        attempts
            .iter()
            .filter(|a| a["outcome"] == "delivered")
            .count(),
        wanted.len()
    );
    assert!(!attempts.iter().any(|a| a.to_string().contains("whsec_")));

    // Deleted: 404 after, and nothing more goes to it.
    let path = format!("/admin/webhooks/{id}");
    assert_eq!(svc.call("DELETE", &path, &[(h.0, &h.1)], None).status, 200);
    assert_eq!(svc.call("DELETE", &path, &[(h.0, &h.1)], None).status, 404);
    let r = svc.call("GET", &format!("{path}/deliveries"), &[(h.0, &h.1)], None);
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("webhook_not_found"))
    );
    assert_eq!(
        svc.call("DELETE", "/admin/webhooks/x", &[(h.0, &h.1)], None)
            .status,
        404
    );
    let u = bearer(&svc.register("user@example.com"));
    let r = svc.call("GET", "/admin/webhooks", &[(u.0, &u.1)], None);
    assert_eq!(r.status, 403);
}

#[test]
fn webhook_urls_to_internal_addresses_are_refused() {
    let db = TestDb::new();
    let svc = Service::start(&db);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let refused = [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "https://10.0.0.8/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/",
        "http://[fd00::1]/",
        "http://2130706433/",
    ];
    for url in refused {
        let r = create_webhook(&svc, &admin, url, r#"["*"]"#);
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (422, Some("webhook_url_not_allowed")),
            "{url}: {}",
            r.body
        );
    }
    for (url, events, code) in [
        ("ftp://example.com/", r#"["*"]"#, "invalid_url"),
        ("not a url", r#"["*"]"#, "invalid_url"),
        ("https://example.com/", r#"[]"#, "invalid_events"),
        (
            "https://example.com/",
            r#"["claim.eaten"]"#,
            "invalid_events",
        ),
    ] {
        let r = create_webhook(&svc, &admin, url, events);
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (422, Some(code)),
            "{url} {events}"
        );
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM webhooks"), 0);
}

/// A service killed with SIGKILL in the middle of a delivery loses none: its lease runs out
/// and the services that remain deliver everything, one at a time per endpoint.
#[test]
fn a_service_killed_mid_delivery_loses_no_event() {
    let db = TestDb::new();
    let receiver = Receiver::start(1);
    let (tell, came) = std::sync::mpsc::channel();
    receiver.got.lock().unwrap().hold_first = Some((Duration::from_secs(3), tell));
    let env = [
        ("WEBHOOK_ALLOW_PRIVATE", "on"),
        ("WEBHOOK_FIRST_RETRY_MS", "100"),
    ];
    let mut doomed = Service::start_with(&db, &env);
    let admin = make_admin(&db, &doomed, "admin@example.com");
    let hook = create_webhook(&doomed, &admin, &receiver.url("/hook"), r#"["*"]"#);
    assert_eq!(hook.status, 201, "{}", hook.body);
    receiver
        .got
        .lock()
        .unwrap()
        .secrets
        .insert("/hook".into(), hook.body["secret"].as_str().unwrap().into());
    let first_event = event_ids(&db, &[]).last().copied().unwrap_or(0);
    let users = new_users(&db, &auth(), 2);
    let c = new_coupon(&db, "KILLED", 50);
    for i in 0..10 {
        db.claims.claim(users[i % 2], c).unwrap();
    }
    came.recv_timeout(Duration::from_secs(20))
        .expect("a delivery began");
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    // Two services take over; more changes meanwhile.
    let others: Vec<Service> = (0..2).map(|_| Service::start_with(&db, &env)).collect();
    for i in 0..10 {
        db.claims.claim(users[i % 2], c).unwrap();
    }
    events::sequence(&db.pool).unwrap();
    let wanted: Vec<u64> = event_ids(&db, &[])
        .into_iter()
        .filter(|&id| id > first_event)
        .collect();
    assert_eq!(wanted.len(), 1 + 20);
    wait_for(90, "every delivery after the kill", || {
        let hits = receiver.hits();
        let mut ok: Vec<u64> = hits
            .iter()
            .filter(|h| h.status == 200)
            .map(|h| h.event_id)
            .collect();
        ok.dedup();
        ok.len() >= wanted.len()
    });
    check_deliveries(&receiver.hits(), "/hook", &wanted);
    assert_eq!(
        receiver.got.lock().unwrap().most_in_flight,
        1,
        "one delivery at a time"
    );
    drop(others);
    db.stock(c.0);
}

/// An event failing for 24 hours is given up, listed so, and the next one goes.
#[test]
fn an_event_failing_for_a_day_is_given_up_and_the_next_goes() {
    let db = TestDb::new();
    let receiver = Receiver::start(usize::MAX);
    let env = [
        ("WEBHOOK_ALLOW_PRIVATE", "on"),
        ("WEBHOOK_FIRST_RETRY_MS", "100"),
    ];
    let svc = Service::start_with(&db, &env);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let hook = create_webhook(
        &svc,
        &admin,
        &receiver.url("/down"),
        r#"["coupon.created"]"#,
    );
    assert_eq!(hook.status, 201, "{}", hook.body);
    receiver
        .got
        .lock()
        .unwrap()
        .secrets
        .insert("/down".into(), hook.body["secret"].as_str().unwrap().into());
    new_coupon(&db, "FIRST", 1);
    new_coupon(&db, "SECOND", 1);
    let ids = event_ids(&db, &["coupon.created"]);
    let (first, second) = (ids[ids.len() - 2], ids[ids.len() - 1]);
    wait_for(30, "a failed attempt", || {
        receiver.hits().iter().any(|h| h.event_id == first)
    });
    // A day of failures, as if it had been so since yesterday.
    db.conn()
        .query_drop(
            "UPDATE webhooks SET failing_since = failing_since - INTERVAL 25 HOUR
             WHERE failing_since IS NOT NULL",
        )
        .unwrap();
    wait_for(30, "the next event tried", || {
        receiver.hits().iter().any(|h| h.event_id == second)
    });
    let h = bearer(&admin);
    let id = hook.body["id"].as_u64().unwrap();
    let r = svc.call(
        "GET",
        &format!("/admin/webhooks/{id}/deliveries?limit=1000"),
        &[(h.0, &h.1)],
        None,
    );
    let outcomes: Vec<(u64, String)> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["event_id"].as_u64().unwrap(),
                d["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let gave_up: Vec<u64> = outcomes
        .iter()
        .filter(|(_, o)| o == "gave_up")
        .map(|(e, _)| *e)
        .collect();
    assert_eq!(gave_up, [first], "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|(e, o)| o != "delivered" && (*e == first || *e == second)));
    assert!(receiver.hits().iter().all(|h| h.signed && h.status == 500));
}

/// A receiver that takes connections and never answers holds up only its own deliveries: the
/// other endpoint gets every event and claims go on, while its attempts time out one at a time.
#[test]
fn a_dead_receiver_holds_up_only_its_own_deliveries() {
    let db = TestDb::new();
    // Bound and listening, never accepted: a request is sent and no answer ever comes.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/dead", dead.local_addr().unwrap());
    let alive = Receiver::start(0);
    let env = [
        ("WEBHOOK_ALLOW_PRIVATE", "on"),
        ("WEBHOOK_FIRST_RETRY_MS", "100"),
    ];
    let svc = Service::start_with(&db, &env);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let stuck = create_webhook(&svc, &admin, &dead_url, r#"["*"]"#);
    assert_eq!(stuck.status, 201, "{}", stuck.body);
    let ok = create_webhook(&svc, &admin, &alive.url("/alive"), r#"["*"]"#);
    assert_eq!(ok.status, 201, "{}", ok.body);
    alive
        .got
        .lock()
        .unwrap()
        .secrets
        .insert("/alive".into(), ok.body["secret"].as_str().unwrap().into());
    let first_event = event_ids(&db, &[]).last().copied().unwrap_or(0);
    let tokens: Vec<String> = (0..4)
        .map(|i| svc.register(&format!("u{i}@example.com")))
        .collect();
    let c = new_coupon(&db, "DEADLINE", 100);
    let won = threads(8).install(|| {
        (0..120)
            .into_par_iter()
            .filter(|i| {
                let t = bearer(&tokens[i % 4]);
                let r = svc.call(
                    "POST",
                    &format!("/coupons/{}/claim", c.0),
                    &[JSON, (t.0, t.1.as_str())],
                    None,
                );
                assert!(
                    r.status == 201 || r.status == 409,
                    "{} {}",
                    r.status,
                    r.body
                );
                r.status == 201
            })
            .count()
    });
    assert_eq!(won, 100);
    events::sequence(&db.pool).unwrap();
    let wanted: Vec<u64> = event_ids(&db, &[])
        .into_iter()
        .filter(|&id| id > first_event)
        .collect();
    assert_eq!(wanted.len(), 1 + 100);
    // Well within one 10 s timeout of the dead endpoint's first attempt.
    wait_for(8, "the live endpoint's deliveries", || {
        alive.hits().iter().filter(|h| h.status == 200).count() >= wanted.len()
    });
    check_deliveries(&alive.hits(), "/alive", &wanted);
    // The dead one's first attempt times out and is listed with its error.
    let h = bearer(&admin);
    let id = stuck.body["id"].as_u64().unwrap();
    let path = format!("/admin/webhooks/{id}/deliveries");
    wait_for(20, "the dead endpoint's timeout", || {
        let r = svc.call("GET", &path, &[(h.0, &h.1)], None);
        !r.body.as_array().unwrap().is_empty()
    });
    let r = svc.call("GET", &path, &[(h.0, &h.1)], None);
    let last = &r.body[0];
    assert_eq!(last["outcome"], "failed", "{last}");
    assert!(
        last["status_code"].is_null() && last["error"].is_string(),
        "{last}"
    );
    assert_eq!(last["event_id"].as_u64(), Some(wanted[0]));
    db.stock(c.0);
    drop(dead);
}

#[test]
fn a_claim_created_event_keeps_the_claim_as_made_when_its_coupon_changes() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let c = new_coupon(&db, "UNNAMED", 5);
    let made = db.claims.claim(users[0], c).unwrap().claim;
    assert_eq!(made.name, None);
    // Named after the claim: the claim's event still says what the claim said.
    let named = CouponChange {
        rules: coupon::RulesChange {
            name: Some(Some(Label::parse("name", "Named later", 200).unwrap())),
            ..Default::default()
        },
        ..Default::default()
    };
    coupon::update(&db.pool, UserId(0), c, &named).unwrap();
    let created: Vec<Value> = feed(&db)
        .into_iter()
        .filter(|(t, _)| t == "claim.created")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["id"], made.id.0);
    assert_eq!(created[0]["name"], Value::Null, "{}", created[0]);
    assert_eq!(created[0]["status"], "claimed");
}

#[test]
fn a_deleted_webhook_gets_nothing_after_the_delivery_in_flight() {
    let db = TestDb::new();
    let receiver = Receiver::start(0);
    let (tell, arrived) = std::sync::mpsc::channel();
    receiver.got.lock().unwrap().hold_first = Some((Duration::from_secs(2), tell));
    let svc = Service::start_with(&db, &[("WEBHOOK_ALLOW_PRIVATE", "on")]);
    let admin = make_admin(&db, &svc, "admin@example.com");
    let hook = create_webhook(&svc, &admin, &receiver.url("/gone"), r#"["*"]"#);
    assert_eq!(hook.status, 201, "{}", hook.body);
    for i in 0..5 {
        new_coupon(&db, &format!("GONE{i}"), 1);
    }
    // The first delivery is held at the receiver; the endpoint is deleted meanwhile.
    arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("a first delivery");
    let h = bearer(&admin);
    let id = hook.body["id"].as_u64().unwrap();
    let r = svc.call(
        "DELETE",
        &format!("/admin/webhooks/{id}"),
        &[(h.0, &h.1)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Its run had four more events in hand: none of them goes.
    std::thread::sleep(Duration::from_secs(4));
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
}

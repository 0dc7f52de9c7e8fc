//! Claim combining: concurrent claims of one lane share one transaction, and claims of a
//! coupon locked elsewhere share one per coupon. Each test makes the batches it needs by holding
//! a row lock from a second connection while claims queue behind it: a coupon's (its claims
//! queue by coupon) or an idempotency key's (the lane's transaction waits for it, and claims
//! queue in the lane). Then it checks the database.

use crate::library::{limited_coupon, new_coupon, new_users};
use crate::support::{auth, counter_mismatches, TestDb};
use coupons::claim::Ask;
use coupons::idempotency::{Answer, IdempotencyKey};
use coupons::{claim, coupon, CouponId, Error, UserId};
use mysql::prelude::Queryable;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// A connection holding `coupon`'s row lock in an open transaction (rolled back on drop).
fn hold(db: &TestDb, coupon: CouponId) -> mysql::Conn {
    let mut conn = db.conn();
    conn.query_drop("START TRANSACTION").unwrap();
    conn.exec_drop(
        "SELECT id FROM coupons WHERE id = ? FOR UPDATE",
        (coupon.0,),
    )
    .unwrap();
    conn
}

/// Waits until `done` holds (at most 10 s), then says so; panics with `what` otherwise.
#[track_caller]
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A connection holding `user`'s idempotency key `key` as if a request with it were in flight
/// (rolled back on drop): a claim with that key waits for it.
fn hold_key(db: &TestDb, user: UserId, key: &str) -> mysql::Conn {
    let mut conn = db.conn();
    conn.query_drop("START TRANSACTION").unwrap();
    conn.exec_drop(
        "INSERT INTO idempotency_keys (user_id, idem_key, request_sha256, outcome, created_at)
         VALUES (?, ?, 'held', 'pending', NOW())",
        (user.0, key),
    )
    .unwrap();
    conn
}

/// Server connection ids of this test database's statements that wait for a row lock: with the
/// coupon held, any `FOR UPDATE` still running is waiting. (Not `information_schema.innodb_trx`:
/// the server refreshes it only after 100 ms without a read, so polling would freeze it.)
fn lock_waiters(db: &TestDb) -> Vec<u64> {
    waiting(db, "%FOR UPDATE")
}

/// Server connection ids of this test database's statements running now whose text is `like`.
fn waiting(db: &TestDb, like: &str) -> Vec<u64> {
    db.conn()
        .exec(
            "SELECT id FROM information_schema.processlist
             WHERE db = ? AND info LIKE ? AND id <> CONNECTION_ID() ORDER BY id",
            (&db.name, like),
        )
        .unwrap()
}

/// Claims in one lane over a pool of their own whose statements wait up to 60 s for a row lock
/// (not 2 s), so that a claim held up for the whole of a test on a slow machine still waits,
/// instead of timing out and being retried.
fn patient(db: &TestDb) -> claim::Claims {
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}lock_wait_timeout=60", db.url);
    let opts = coupons::db::opts_from_url(&url).unwrap();
    let pool = coupons::db::pool(opts, 16, coupons::db::CHECKOUT_TIMEOUT).unwrap();
    claim::Claims::new(pool).with_lanes(1)
}

/// What a test holds so that claims queue.
#[derive(Clone, Copy)]
enum Hold {
    /// The first claim's coupon: its claims queue by coupon, waiting for the lock.
    Coupon,
    /// The first claim's key: the lane's transaction waits for it, and claims of the lane's
    /// coupons queue in the lane.
    Key,
}

/// Claims by `users` (one thread each) while the coupon is held: the first claim waits on the
/// lock alone, all the others queue behind it; then the lock is let go. Returns the answers
/// in `users` order. `keys[i]`, if given, is claim i's idempotency key.
fn queued_claims(
    db: &TestDb,
    coupon: CouponId,
    users: &[UserId],
    keys: &[Option<&str>],
    while_held: impl FnOnce(),
) -> Vec<Answer<claim::Claimed>> {
    let claims: Vec<(UserId, CouponId)> = users.iter().map(|&u| (u, coupon)).collect();
    queued_claims_on(db, Hold::Coupon, &claims, keys, while_held)
}

/// [`queued_claims`] with a coupon for each claim and a choice of what is held. With a key
/// held (`keys[0]`), the others queue only if their coupons are in the first claim's lane.
fn queued_claims_on(
    db: &TestDb,
    held: Hold,
    claims: &[(UserId, CouponId)],
    keys: &[Option<&str>],
    while_held: impl FnOnce(),
) -> Vec<Answer<claim::Claimed>> {
    let (mut holder, waits_with) = match held {
        Hold::Coupon => (hold(db, claims[0].1), "%FOR UPDATE"),
        Hold::Key => {
            let key = keys[0].expect("the first claim's key to hold");
            (
                hold_key(db, claims[0].0, key),
                "INSERT INTO idempotency_keys%",
            )
        }
    };
    let queued_before = db.claims.stats().queued;
    let answers = std::thread::scope(|s| {
        let run = |i: usize| {
            let (user, coupon) = claims[i];
            let key = keys.get(i).copied().flatten();
            let key = key.map(|k| IdempotencyKey::parse(k).unwrap());
            match &key {
                Some(k) => db.claims.claim_once(user, coupon, k),
                None => Answer {
                    result: db.claims.claim(user, coupon),
                    replayed: false,
                },
            }
        };
        let first = s.spawn(move || run(0));
        wait_until("the first claim to wait on the lock", || {
            waiting(db, waits_with).len() == 1
        });
        // One at a time, so that the queue's order is `claims` order.
        let rest: Vec<_> = (1..claims.len())
            .map(|i| {
                let h = s.spawn(move || run(i));
                wait_until("a claim to queue", || {
                    db.claims.stats().queued == queued_before + i as u64
                });
                h
            })
            .collect();
        while_held();
        holder.query_drop("ROLLBACK").unwrap();
        std::iter::once(first)
            .chain(rest)
            .map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(db.claims.stats().queued, 0);
    answers
}

#[test]
fn thousands_of_parallel_claims_on_stock_k_give_exactly_k() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 200);
    let stock = 1000;
    let coupon = new_coupon(&db, "DROP", stock);
    // 4,000 attempts from 48 threads, a third of them with idempotency keys.
    let outcomes: Vec<Result<u64, String>> = rayon::ThreadPoolBuilder::new()
        .num_threads(48)
        .build()
        .unwrap()
        .install(|| {
            (0..4000)
                .into_par_iter()
                .map(|i| {
                    let user = users[i % users.len()];
                    let result = if i % 3 == 0 {
                        let key = IdempotencyKey::parse(&format!("k{i}")).unwrap();
                        db.claims.claim_once(user, coupon, &key).result
                    } else {
                        db.claims.claim(user, coupon)
                    };
                    match result {
                        Ok(c) => Ok(c.available_count),
                        Err(Error::SoldOut) => Err("sold_out".to_owned()),
                        Err(e) => Err(format!("unexpected: {e}")),
                    }
                })
                .collect()
        });
    let unexpected: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .filter(|e| *e != "sold_out")
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    // Each success saw its own count of what was left: exactly 999, 998, ..., 0.
    let mut left: Vec<u64> = outcomes.iter().filter_map(|o| o.clone().ok()).collect();
    left.sort_unstable();
    assert_eq!(left, (0..stock as u64).collect::<Vec<_>>());
    assert_eq!(db.stock(coupon.0), (0, stock, stock));
    let distinct: i64 = db.scalar("SELECT COUNT(DISTINCT id) FROM claims");
    assert_eq!(distinct, stock);
    assert!(
        db.claims.stats().combined > 0,
        "no claims were combined: {:?}",
        db.pool.stats()
    );
}

#[test]
fn thousands_of_parallel_claims_over_many_coupons_in_two_lanes_keep_every_stock() {
    let mut db = TestDb::new();
    db.claims = db.claims.clone().with_lanes(2);
    let users = new_users(&db, &auth(), 100);
    // Ten coupons, stock 100 each; the odd ones allow one claim per user.
    let coupons: Vec<CouponId> = (0..10)
        .map(|i| match i % 2 {
            0 => new_coupon(&db, &format!("SPREAD{i}"), 100),
            _ => limited_coupon(&db, &format!("SPREAD{i}"), 100, 1),
        })
        .collect();
    // 3,000 attempts from 48 threads: 300 a coupon, by 100 users, 3 each.
    let outcomes: Vec<(UserId, usize, Result<claim::Claimed, String>)> =
        rayon::ThreadPoolBuilder::new()
            .num_threads(48)
            .build()
            .unwrap()
            .install(|| {
                (0..3000)
                    .into_par_iter()
                    .map(|i| {
                        let (user, c) = (users[i / 30], i % 10);
                        let result = match db.claims.claim(user, coupons[c]) {
                            Ok(got) => Ok(got),
                            Err(Error::SoldOut) => Err("sold_out".to_owned()),
                            Err(Error::LimitReached) => Err("limit".to_owned()),
                            Err(e) => Err(format!("unexpected: {e}")),
                        };
                        (user, c, result)
                    })
                    .collect()
            });
    // Every success names its own row: this user's claim of this coupon.
    let rows: std::collections::HashMap<u64, (u64, u64)> = db
        .conn()
        .query_map("SELECT id, user_id, coupon_id FROM claims", |(id, u, c)| {
            (id, (u, c))
        })
        .unwrap()
        .into_iter()
        .collect();
    for (user, c, result) in &outcomes {
        if let Ok(got) = result {
            assert_eq!(got.claim.coupon_id, coupons[*c]);
            assert_eq!(rows[&got.claim.id.0], (user.0, coupons[*c].0));
        }
    }
    for (c, &coupon) in coupons.iter().enumerate() {
        let mine = || {
            outcomes
                .iter()
                .filter(move |(_, i, _)| *i == c)
                .map(|(_, _, r)| r)
        };
        // Each success saw its own count of what was left: exactly 99, 98, ..., 0.
        let mut left: Vec<u64> = mine()
            .filter_map(|r| r.as_ref().ok().map(|g| g.available_count))
            .collect();
        left.sort_unstable();
        assert_eq!(left, (0..100).collect::<Vec<u64>>(), "coupon {c}");
        let refused = |what: &str| {
            mine()
                .filter(|r| r.as_ref().err().is_some_and(|e| e == what))
                .count()
        };
        if c % 2 == 0 {
            assert_eq!(refused("sold_out"), 200, "coupon {c}");
        } else {
            // A hundred users, one each: every user got one; the rest hit the limit or the end.
            let n = refused("sold_out") + refused("limit");
            assert_eq!(n, 200, "coupon {c}");
        }
        assert_eq!(db.stock(coupon.0), (0, 100, 100));
    }
    assert_eq!(rows.len(), 1000, "claim ids are distinct");
    let per_user: i64 = db.scalar(
        "SELECT COUNT(*) FROM (SELECT user_id, coupon_id FROM claims GROUP BY user_id, coupon_id
         HAVING COUNT(*) > 1 AND coupon_id IN (SELECT id FROM coupons WHERE per_user_limit = 1)) t",
    );
    assert_eq!(per_user, 0, "a user holds two of a one-each coupon");
    let mismatched = counter_mismatches(&mut db.conn());
    assert!(mismatched.is_empty(), "{mismatched:?}");
    assert!(db.claims.stats().combined > 0);
}

#[test]
fn per_user_limits_hold_inside_one_batch() {
    let mut db = TestDb::new();
    // One lane: the claims on both coupons queue behind the first, and share one batch.
    db.claims = db.claims.clone().with_lanes(1);
    let users = new_users(&db, &auth(), 10);
    let two = limited_coupon(&db, "TWOEACH", 100, 2);
    let one = limited_coupon(&db, "ONEEACH", 100, 1);
    // User 0 holds one of `two` already: one more is all they may have.
    db.claims.claim(users[0], two).unwrap();
    // The first claim (user 9 on `one`, its key held) runs alone; then sixty claims in one
    // batch: three rounds of ten users on `two`, three on `one`, interleaved.
    let claims: Vec<(UserId, CouponId)> = std::iter::once((users[9], one))
        .chain((0..60).map(|i| (users[i % 10], if (i / 10) % 2 == 0 { two } else { one })))
        .collect();
    let mut keys = vec![None; claims.len()];
    keys[0] = Some("first");
    let combined_before = db.claims.stats().combined;
    let answers = queued_claims_on(&db, Hold::Key, &claims, &keys, || {});
    assert_eq!(db.claims.stats().combined - combined_before, 60);
    assert!(answers[0].result.is_ok());
    for (u, user) in users.iter().enumerate() {
        for (coupon, limit, before) in
            [(two, 2, usize::from(u == 0)), (one, 1, usize::from(u == 9))]
        {
            let mine: Vec<&Answer<claim::Claimed>> = answers
                .iter()
                .zip(&claims)
                .skip(1)
                .filter(|(_, c)| **c == (*user, coupon))
                .map(|(a, _)| a)
                .collect();
            let won = mine.iter().filter(|a| a.result.is_ok()).count();
            let refused = mine
                .iter()
                .filter(|a| matches!(a.result, Err(Error::LimitReached)))
                .count();
            let expected = limit - before;
            assert_eq!(
                (won, refused),
                (expected, 3 - expected),
                "user {u}, {coupon}"
            );
        }
    }
    assert_eq!(db.stock(two.0), (80, 20, 100));
    assert_eq!(db.stock(one.0), (90, 10, 100));
    let mismatched = counter_mismatches(&mut db.conn());
    assert!(mismatched.is_empty(), "{mismatched:?}");
}

#[test]
fn a_batch_grants_in_arrival_order_until_sold_out() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 30);
    let coupon = new_coupon(&db, "FEW", 12);
    let answers = queued_claims(&db, coupon, &users, &[], || {});
    // The first 12 to arrive get the 12 units, each seeing what it left; the rest sell out.
    for (i, a) in answers.iter().enumerate() {
        match &a.result {
            Ok(c) if i < 12 => assert_eq!(c.available_count, 11 - i as u64, "claim {i}"),
            Err(Error::SoldOut) if i >= 12 => {}
            other => panic!("claim {i}: {other:?}"),
        }
    }
    assert_eq!(db.stock(coupon.0), (0, 12, 12));
    // Each granted claim's row is the one its answer names, for the user who asked.
    for (a, user) in answers.iter().zip(&users) {
        if let Ok(c) = &a.result {
            let owner: Option<u64> = db
                .conn()
                .exec_first("SELECT user_id FROM claims WHERE id = ?", (c.claim.id.0,))
                .unwrap();
            assert_eq!(owner, Some(user.0));
        }
    }
}

#[test]
fn same_key_in_one_queue_claims_once_and_replays() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 10);
    let coupon = new_coupon(&db, "KEYED", 100);
    // Four requests per user with that user's one key, plus a keyless first claim.
    let who: Vec<UserId> = std::iter::once(users[0])
        .chain((0..40).map(|i| users[i % 10]))
        .collect();
    let keys: Vec<Option<&str>> = std::iter::once(None)
        .chain((0..40).map(|_| Some("same-key")))
        .collect();
    let answers = queued_claims(&db, coupon, &who, &keys, || {});
    for user in &users {
        let mine: Vec<&Answer<claim::Claimed>> = answers
            .iter()
            .zip(&who)
            .skip(1)
            .filter(|(_, w)| *w == user)
            .map(|(a, _)| a)
            .collect();
        let ids: Vec<u64> = mine
            .iter()
            .map(|a| a.result.as_ref().expect("claimed").claim.id.0)
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(mine.iter().filter(|a| !a.replayed).count(), 1);
    }
    assert_eq!(db.stock(coupon.0), (89, 11, 100));
}

#[test]
fn a_batch_failing_for_one_request_answers_each_alone() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 12);
    let coupon = new_coupon(&db, "GONE", 50);
    let keys: Vec<String> = (0..12).map(|i| format!("gone-{i}")).collect();
    let keys: Vec<Option<&str>> = (0..12)
        .map(|i| (i % 2 == 0).then_some(keys[i].as_str()))
        .collect();
    // User 11 (no key) is deleted while queued: the batch's insert fails on its foreign key,
    // and each request then runs alone.
    let answers = queued_claims(&db, coupon, &users, &keys, || {
        db.conn()
            .exec_drop("DELETE FROM users WHERE id = ?", (users[11].0,))
            .unwrap();
    });
    for (i, a) in answers.iter().enumerate() {
        match (i, &a.result) {
            (11, Err(Error::Token(coupons::TokenProblem::UnknownUser))) => {}
            (11, other) => panic!("the deleted user got {other:?}"),
            (_, r) => assert!(r.is_ok(), "claim {i}: {r:?}"),
        }
    }
    assert_eq!(db.stock(coupon.0), (39, 11, 50));
    // The keyed ones recorded their claims, once each.
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM idempotency_keys WHERE outcome = 'claimed'"),
        6
    );
}

#[test]
fn a_batch_whose_connection_is_killed_answers_all_and_writes_nothing() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 21);
    let coupon = new_coupon(&db, "KILLED", 50);
    let keys: Vec<String> = (0..21).map(|i| format!("kill-{i}")).collect();
    let key_refs: Vec<Option<&str>> = keys.iter().map(|k| Some(k.as_str())).collect();
    let kill = |victim: u64| {
        db.conn()
            .query_drop(format!("KILL CONNECTION {victim}"))
            .unwrap()
    };
    let answers = queued_claims(&db, coupon, &users, &key_refs, || {
        // The first claim's connection, then the batch's, each while it waits on the lock.
        let first = lock_waiters(&db);
        kill(first[0]);
        wait_until(
            "the batch to wait on the lock",
            || matches!(lock_waiters(&db)[..], [id] if id != first[0]),
        );
        kill(lock_waiters(&db)[0]);
    });
    for (i, a) in answers.iter().enumerate() {
        assert!(
            matches!(a.result, Err(Error::Unavailable(_))),
            "claim {i}: {:?}",
            a.result
        );
    }
    assert_eq!(db.stock(coupon.0), (50, 0, 50));
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency_keys"), 0);
    // Nothing was recorded, so the same keys now claim for real, once each.
    let again: Vec<u64> = (0..21)
        .into_par_iter()
        .map(|i| {
            let key = IdempotencyKey::parse(&keys[i]).unwrap();
            let a = db.claims.claim_once(users[i], coupon, &key);
            assert!(!a.replayed);
            a.result.unwrap().claim.id.0
        })
        .collect();
    assert_eq!(again.len(), 21);
    assert_eq!(db.stock(coupon.0), (29, 21, 50));
}

#[test]
fn a_batch_chosen_as_deadlock_victim_is_retried_whole() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 9);
    let coupon = new_coupon(&db, "DEADLOCK", 50);
    let keys: Vec<String> = (0..9).map(|i| format!("dl-{i}")).collect();
    // Claim 0 is keyless; claims 1..9 are keyed and form the batch.
    let key_refs: Vec<Option<&str>> = std::iter::once(None)
        .chain(keys[1..].iter().map(|k| Some(k.as_str())))
        .collect();
    let retries_before = db.pool.stats().retries;
    let mut heavy = db.conn();
    let (db, users) = (&db, &users);
    let answers = std::thread::scope(|s| {
        let heavy = &mut heavy;
        queued_claims(db, coupon, users, &key_refs, || {
            // A heavier transaction queues for the coupon behind the first claim, so it holds
            // the lock when the batch (holding its key rows) asks for it; then it asks for one
            // of those key rows. InnoDB picks the lighter batch as the victim.
            heavy.query_drop("START TRANSACTION").unwrap();
            for _ in 0..200 {
                heavy
                    .query_drop("INSERT INTO audit_log (actor_id, action, detail, created_at) VALUES (0, 'test', '{}', NOW())")
                    .unwrap();
            }
            s.spawn(move || {
                heavy
                    .exec_drop("SELECT id FROM coupons WHERE id = ? FOR UPDATE", (coupon.0,))
                    .unwrap();
                // The first claim has committed: whoever waits now is the batch.
                wait_until("the batch to wait behind the heavy transaction", || {
                    !lock_waiters(db).is_empty()
                });
                let r = heavy.exec_drop(
                    "SELECT outcome FROM idempotency_keys WHERE user_id = ? AND idem_key = 'dl-1' FOR UPDATE",
                    (users[1].0,),
                );
                assert!(r.is_ok(), "the heavy transaction was the victim: {r:?}");
                heavy.query_drop("ROLLBACK").unwrap();
            });
            wait_until("the heavy transaction to queue", || {
                lock_waiters(db).len() == 2
            });
        })
    });
    for (i, a) in answers.iter().enumerate() {
        assert!(a.result.is_ok(), "claim {i}: {:?}", a.result);
    }
    assert!(
        db.pool.stats().retries > retries_before,
        "no retry happened"
    );
    assert_eq!(db.stock(coupon.0), (41, 9, 50));
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM idempotency_keys WHERE outcome = 'claimed'"),
        8
    );
}

#[test]
fn claims_on_many_coupons_share_a_batch_and_each_coupon_keeps_its_own_rules() {
    let mut db = TestDb::new();
    // One lane: every claim below queues behind the first, whatever its coupon.
    db.claims = db.claims.clone().with_lanes(1);
    let users = new_users(&db, &auth(), 12);
    let big = new_coupon(&db, "BIG", 100);
    let small = new_coupon(&db, "SMALL", 2);
    let limited = limited_coupon(&db, "ONEEACH", 100, 1);
    let gone = new_coupon(&db, "GONE", 5);
    coupon::delete(&db.pool, users[0], gone).unwrap();
    let mut claims = vec![(users[0], big)];
    for (i, &user) in users.iter().enumerate() {
        claims.extend([(user, small), (users[i % 3], limited), (user, big)]);
    }
    claims.push((users[1], gone));
    // Keys on a few. One is sent twice (the second replays, in a later batch), and once more
    // by the same user for another coupon (a key reused: refused).
    let mut keys: Vec<Option<&str>> = vec![None; claims.len()];
    keys[0] = Some("first");
    keys[1] = Some("small-1");
    keys[6] = Some("big-2");
    keys[9] = Some("big-3");
    claims.extend([claims[9], (claims[9].0, small)]);
    keys.extend([Some("big-3"), Some("big-3")]);
    let batches_before = db.claims.stats().batches;
    let answers = queued_claims_on(&db, Hold::Key, &claims, &keys, || {});
    assert_eq!(db.claims.stats().batches, batches_before + 1);
    let (n, reused) = (answers.len(), answers.last().unwrap());
    assert!(
        matches!(reused.result, Err(Error::KeyReused)),
        "{:?}",
        reused.result
    );
    let replay = &answers[n - 2];
    assert!(replay.replayed, "the repeated key replays");
    assert_eq!(
        replay.result.as_ref().unwrap().claim.id,
        answers[9].result.as_ref().unwrap().claim.id
    );
    // Per coupon, in arrival order: what each claim got. In the batch, ids rise in arrival
    // order, whatever the coupon.
    let mut left_seen: std::collections::HashMap<CouponId, Vec<u64>> = Default::default();
    let mut last_id = 0;
    for (i, (a, &(user, c))) in answers.iter().zip(&claims).enumerate().take(n - 2) {
        match &a.result {
            Ok(got) => {
                assert_eq!(got.claim.coupon_id, c, "claim {i}");
                let row: (u64, u64) = db
                    .conn()
                    .exec_first(
                        "SELECT user_id, coupon_id FROM claims WHERE id = ?",
                        (got.claim.id.0,),
                    )
                    .unwrap()
                    .unwrap();
                assert_eq!(row, (user.0, c.0), "claim {i}'s row");
                assert!(got.claim.id.0 > last_id, "claim {i}'s id rises");
                last_id = got.claim.id.0;
                left_seen.entry(c).or_default().push(got.available_count);
            }
            Err(Error::SoldOut) => assert_eq!(c, small, "claim {i}"),
            Err(Error::LimitReached) => assert_eq!(c, limited, "claim {i}"),
            Err(Error::CouponNotFound) => assert_eq!(c, gone, "claim {i}"),
            Err(e) => panic!("claim {i}: {e}"),
        }
    }
    assert_eq!(left_seen[&small], vec![1, 0]);
    assert_eq!(left_seen[&limited], vec![99, 98, 97]);
    assert_eq!(left_seen[&big], (87..100).rev().collect::<Vec<u64>>());
    assert_eq!(db.stock(big.0), (87, 13, 100));
    assert_eq!(db.stock(small.0), (0, 2, 2));
    assert_eq!(db.stock(limited.0), (97, 3, 100));
    assert_eq!(db.stock(gone.0), (5, 0, 5));
    let mismatched = counter_mismatches(&mut db.conn());
    assert!(mismatched.is_empty(), "{mismatched:?}");
}

#[test]
fn a_coupon_locked_elsewhere_holds_up_only_its_own_claims() {
    let mut db = TestDb::new();
    // Both "processes" wait for row locks as long as the test may take: with the 2 s default,
    // a slow machine would time a waiting claim out, and its retry could hand its key to the
    // other process's retry (a fair outcome, but not the one this test pins down).
    db.claims = patient(&db);
    let users = new_users(&db, &auth(), 8);
    let locked = new_coupon(&db, "LOCKED", 10);
    let free: Vec<CouponId> = (0..4)
        .map(|i| new_coupon(&db, &format!("FREE{i}"), 10))
        .collect();
    let keys: Vec<IdempotencyKey> = (0..3)
        .map(|i| IdempotencyKey::parse(&format!("locked-{i}")).unwrap())
        .collect();
    // A second pool on the same database: another process, with its own lanes.
    let other = patient(&db);
    let mut holder = hold(&db, locked);
    let (db, users, keys, other) = (&db, &users, &keys, &other);
    let (waited, retried) = std::thread::scope(|s| {
        // Keyed claims on the held coupon: the lane's batch skips it, and they wait for the
        // lock by coupon, the first alone, the others queued behind it.
        // The first (whose key the retry below sends again) is the one waiting for the lock.
        let queued_before = db.claims.stats().queued;
        let claim = |i: usize| s.spawn(move || db.claims.claim_once(users[i], locked, &keys[i]));
        let mut first = vec![claim(0)];
        wait_until("the first claim to wait for the held coupon", || {
            lock_waiters(db).len() == 1
        });
        first.extend([claim(1), claim(2)]);
        wait_until("the claims to wait for the held coupon", || {
            lock_waiters(db).len() == 1 && db.claims.stats().queued == queued_before + 2
        });
        // A client gives up on the first and retries through the other process, with its key
        // (reserved by the waiting claim): that lane's batch skips the coupon before it touches
        // the key, and the retry waits for the key by coupon.
        let key_waiters = || waiting(db, "INSERT INTO idempotency_keys%").len();
        let retry = s.spawn(move || other.claim_once(users[0], locked, &keys[0]));
        std::thread::sleep(Duration::from_secs(2));
        let rows: Vec<(u64, Option<String>, Option<String>)> = db
            .conn()
            .exec(
                "SELECT id, info, state FROM information_schema.processlist WHERE db = ?",
                (&db.name,),
            )
            .unwrap();
        eprintln!("DEBUG {rows:#?} retry finished: {}", retry.is_finished());
        wait_until("the retry to wait for the key", || key_waiters() == 1);
        // Meanwhile both processes' lanes serve every other coupon: nothing waits for the held
        // one (a batch that did would time out while it is held, and answer 503).
        let done: Vec<Result<claim::Claimed, Error>> = (0..40)
            .into_par_iter()
            .map(|i| {
                let claims = if i % 2 == 0 { &db.claims } else { other };
                claims.claim(users[i % 8], free[i % 4])
            })
            .collect();
        for (i, r) in done.iter().enumerate() {
            assert!(r.is_ok(), "claim {i}: {r:?}");
        }
        assert_eq!(
            (lock_waiters(db).len(), key_waiters()),
            (1, 1),
            "the held coupon's claims still wait"
        );
        holder.query_drop("ROLLBACK").unwrap();
        let waited: Vec<_> = first.into_iter().map(|h| h.join().unwrap()).collect();
        (waited, retry.join().unwrap())
    });
    for (i, a) in waited.iter().enumerate() {
        assert!(a.result.is_ok() && !a.replayed, "claim {i}: {a:?}");
        let again = db.claims.claim_once(users[i], locked, &keys[i]);
        assert!(again.replayed);
        assert_eq!(
            again.result.unwrap().claim.id,
            a.result.as_ref().unwrap().claim.id
        );
    }
    // The retry got the first request's claim, not a second one.
    assert!(retried.replayed, "{retried:?}");
    assert_eq!(
        retried.result.unwrap().claim.id,
        waited[0].result.as_ref().unwrap().claim.id
    );
    assert_eq!(db.stock(locked.0), (7, 3, 10));
    for c in free {
        assert_eq!(db.stock(c.0), (0, 10, 10));
    }
}

#[test]
fn of_two_queued_requests_with_one_key_the_first_to_arrive_goes_first() {
    let mut db = TestDb::new();
    db.claims = db.claims.clone().with_lanes(1);
    let users = new_users(&db, &auth(), 3);
    let busy = new_coupon(&db, "BUSY", 100);
    let other = new_coupon(&db, "OTHER", 100);
    // Behind the first claim: two on the busy coupon, then user 0's key on it (its third
    // turn), then the same key on the other coupon (its first turn, but it arrived later).
    let claims = [
        (users[2], busy),
        (users[1], busy),
        (users[2], busy),
        (users[0], busy),
        (users[0], other),
    ];
    let keys = [Some("first"), None, None, Some("k"), Some("k")];
    let answers = queued_claims_on(&db, Hold::Key, &claims, &keys, || {});
    assert!(answers[3].result.is_ok(), "{:?}", answers[3].result);
    assert!(
        matches!(answers[4].result, Err(Error::KeyReused)),
        "{:?}",
        answers[4].result
    );
    assert_eq!(db.stock(busy.0), (96, 4, 100));
    assert_eq!(db.stock(other.0), (100, 0, 100));
}

#[test]
fn a_busy_coupon_cannot_keep_a_quiet_one_out_of_the_next_batch() {
    let mut db = TestDb::new();
    // One lane, batches of four.
    db.claims = db.claims.clone().with_lanes(1).with_batching(4);
    let users = new_users(&db, &auth(), 8);
    let busy = new_coupon(&db, "BUSY", 100);
    let quiet = new_coupon(&db, "QUIET", 100);
    // Behind the first claim: seven on the busy coupon, then one on the quiet one.
    let claims: Vec<(UserId, CouponId)> = (0..8)
        .map(|i| (users[i], busy))
        .chain([(users[0], quiet)])
        .collect();
    let mut keys = vec![None; claims.len()];
    keys[0] = Some("first");
    let answers = queued_claims_on(&db, Hold::Key, &claims, &keys, || {});
    let id = |i: usize| answers[i].result.as_ref().unwrap().claim.id.0;
    // The next batch takes the busy coupon's first three and the quiet one's (their turns
    // come first), not the busy coupon's first four.
    assert!(id(8) < id(4), "the quiet claim went in the next batch");
    assert!(id(3) < id(8) && id(4) < id(5));
    assert_eq!(db.stock(busy.0), (92, 8, 100));
    assert_eq!(db.stock(quiet.0), (99, 1, 100));
}

/// Claims left with a callback, as the server leaves them: `submit` returns without waiting
/// (unless its thread runs the lane's batches), and each answer reaches its callback once.
fn submitted(
    claims: &claim::Claims,
    requests: &[(UserId, CouponId, Option<IdempotencyKey>)],
) -> Vec<Answer<claim::Claimed>> {
    let (tx, rx) = std::sync::mpsc::channel();
    requests
        .par_iter()
        .enumerate()
        .for_each_with(tx, |tx, (i, (user, coupon, key))| {
            let tx = tx.clone();
            claims.submit(&Ask::new(*user, *coupon), key.as_ref(), move |answer| {
                tx.send((i, answer)).unwrap()
            });
        });
    let mut answers: Vec<Option<Answer<claim::Claimed>>> = requests.iter().map(|_| None).collect();
    for _ in requests {
        let (i, answer) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("every submitted claim is answered");
        assert!(
            answers[i].replace(answer).is_none(),
            "claim {i} answered twice"
        );
    }
    answers.into_iter().map(Option::unwrap).collect()
}

#[test]
fn claims_left_with_callbacks_give_exactly_the_stock_over_many_coupons() {
    let mut db = TestDb::new();
    db.claims = db.claims.clone().with_lanes(2);
    let users = new_users(&db, &auth(), 50);
    let coupons: Vec<CouponId> = (0..5)
        .map(|i| new_coupon(&db, &format!("CB{i}"), 300))
        .chain([limited_coupon(&db, "CBLIMIT", 300, 2)])
        .collect();
    // 3,000 requests over six coupons (one limited to two per user), each user 10 times on
    // each coupon, a fifth with keys; the first keyed request sent again last.
    let mut requests: Vec<(UserId, CouponId, Option<IdempotencyKey>)> = (0..3000)
        .map(|i| {
            let key = (i % 5 == 0).then(|| IdempotencyKey::parse(&format!("cb{i}")).unwrap());
            (users[(i / 6) % 50], coupons[i % 6], key)
        })
        .collect();
    requests.push(requests[0].clone());
    let answers = rayon::ThreadPoolBuilder::new()
        .num_threads(16)
        .build()
        .unwrap()
        .install(|| submitted(&db.claims, &requests));
    let ok = |c: CouponId| {
        answers
            .iter()
            .zip(&requests)
            .filter(|(a, r)| r.1 == c && a.result.is_ok() && !a.replayed)
            .count()
    };
    for (i, a) in answers.iter().enumerate() {
        match &a.result {
            Ok(_) | Err(Error::SoldOut | Error::LimitReached) => {}
            Err(e) => panic!("claim {i}: {e}"),
        }
    }
    // The repeated key (whichever came first) was decided once; the other replays that answer,
    // a claim or, when the coupon had sold out before the key's turn, the same refusal.
    let (first, again) = (&answers[0], &answers[3000]);
    assert!(first.replayed != again.replayed, "{first:?} {again:?}");
    match (&first.result, &again.result) {
        (Ok(a), Ok(b)) => assert_eq!(a.claim.id, b.claim.id),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("a replay differs from its answer: {first:?} {again:?}"),
    }
    // 500 requests each: 300 granted on the plain coupons; two per user (100) on the limited.
    for &c in &coupons[..5] {
        assert_eq!(ok(c), 300);
        assert_eq!(db.stock(c.0), (0, 300, 300));
    }
    assert_eq!(ok(coupons[5]), 100);
    assert_eq!(db.stock(coupons[5].0), (200, 100, 300));
    assert!(counter_mismatches(&mut db.conn()).is_empty());
    let distinct: i64 = db.scalar("SELECT COUNT(DISTINCT id) FROM claims");
    assert_eq!(distinct, 1600);
    assert!(db.claims.stats().combined > 0);
    assert_eq!(db.claims.stats().queued, 0);
}

#[test]
fn a_held_coupon_holds_up_only_its_own_callbacks() {
    let mut db = TestDb::new();
    db.claims = patient(&db);
    let users = new_users(&db, &auth(), 8);
    let locked = new_coupon(&db, "HELD", 10);
    let free = new_coupon(&db, "FREE", 100);
    let mut holder = hold(&db, locked);
    let (tx, rx) = std::sync::mpsc::channel();
    let send = |tx: &std::sync::mpsc::Sender<_>, tag: &'static str| {
        let tx = tx.clone();
        move |a: Answer<claim::Claimed>| tx.send((tag, a)).unwrap()
    };
    // Claims on the held coupon: the lane skips it, and they wait for the lock on a thread of
    // their own, never on the submitting thread (a wait for the lock would take 2 s at least).
    let quick = |what: &str, submit: &dyn Fn()| {
        let started = Instant::now();
        submit();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{what} waited {took:?}");
    };
    for &u in &users[..3] {
        quick("a held coupon's submit", &|| {
            db.claims
                .submit(&Ask::new(u, locked), None, send(&tx, "held"))
        });
    }
    wait_until("a claim to wait for the held coupon", || {
        lock_waiters(&db).len() == 1
    });
    // The lane goes on: claims on the free coupon are answered while the other is held.
    for &u in &users {
        quick("a free coupon's submit", &|| {
            db.claims
                .submit(&Ask::new(u, free), None, send(&tx, "free"))
        });
    }
    for _ in &users {
        let (tag, a) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(tag, "free", "{a:?}");
        assert!(a.result.is_ok(), "{a:?}");
    }
    // The held coupon's claims still wait (between two 2 s lock waits, look again).
    wait_until("the held coupon's claims to be waiting still", || {
        lock_waiters(&db).len() == 1
    });
    holder.query_drop("ROLLBACK").unwrap();
    for _ in 0..3 {
        let (tag, a) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(tag, "held");
        assert!(a.result.is_ok(), "{a:?}");
    }
    assert_eq!(db.stock(locked.0), (7, 3, 10));
    assert_eq!(db.stock(free.0), (92, 8, 100));
}

#[test]
fn with_combining_off_a_callback_is_answered_on_its_own_thread() {
    let mut db = TestDb::new();
    db.claims = db.claims.clone().with_batching(1);
    let users = new_users(&db, &auth(), 4);
    let coupon = new_coupon(&db, "ALONE", 2);
    let requests: Vec<_> = (0..8).map(|i| (users[i % 4], coupon, None)).collect();
    let answers = submitted(&db.claims, &requests);
    let granted = answers.iter().filter(|a| a.result.is_ok()).count();
    assert_eq!(granted, 2);
    assert_eq!(db.stock(coupon.0), (0, 2, 2));
    assert_eq!(db.claims.stats(), claim::ClaimStats::default());
}

#[test]
fn a_claim_is_queued_without_its_thread_only_behind_a_batch_in_flight() {
    let mut db = TestDb::new();
    db.claims = db.claims.clone().with_lanes(1);
    let users = new_users(&db, &auth(), 3);
    let (first, second) = (new_coupon(&db, "FIRST", 10), new_coupon(&db, "SECOND", 10));
    // An idle lane: the claim would run on this thread, so it is not taken.
    let refused = db.claims.queue(
        &Ask::new(users[1], first),
        None,
        |_: Answer<claim::Claimed>| {},
    );
    assert!(refused.is_err(), "an idle lane took a claim to queue");
    // A batch in flight, waiting for a key another connection holds: claims queue behind it.
    let mut holder = hold_key(&db, users[0], "held");
    let key = IdempotencyKey::parse("held").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let leader = s.spawn(|| db.claims.claim_once(users[0], first, &key));
        wait_until("the batch to wait for the held key", || {
            waiting(&db, "INSERT INTO idempotency_keys%").len() == 1
        });
        for (user, coupon) in [(users[1], first), (users[2], second)] {
            let tx = tx.clone();
            let queued = db
                .claims
                .queue(&Ask::new(user, coupon), None, move |a| tx.send(a).unwrap());
            assert!(
                queued.is_ok(),
                "a claim behind a batch in flight was not queued"
            );
        }
        assert_eq!(db.claims.stats().queued, 2);
        holder.query_drop("ROLLBACK").unwrap();
        assert!(leader.join().unwrap().result.is_ok());
    });
    for _ in 0..2 {
        let answer = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(answer.result.is_ok(), "{answer:?}");
    }
    assert_eq!(db.stock(first.0), (8, 2, 10));
    assert_eq!(db.stock(second.0), (9, 1, 10));
}

#[test]
fn a_claim_on_a_coupon_that_never_existed_is_answered_in_its_lane() {
    let mut db = TestDb::new();
    db.claims = db.claims.clone().with_lanes(1);
    let users = new_users(&db, &auth(), 2);
    let real = new_coupon(&db, "REAL", 10);
    let nowhere = CouponId(999_999);
    let key = IdempotencyKey::parse("nowhere").unwrap();
    // Alone, with a key, and beside a real coupon's claims in parallel: not found each time,
    // the key's answer kept nowhere (a retry finds the same), and no stock touched.
    let answers: Vec<Result<claim::Claimed, Error>> = (0..40)
        .into_par_iter()
        .map(|i| match i % 4 {
            0 => db.claims.claim(users[0], nowhere),
            1 => db.claims.claim_once(users[0], nowhere, &key).result,
            _ => db.claims.claim(users[1], real),
        })
        .collect();
    for (i, a) in answers.iter().enumerate() {
        match (i % 4, a) {
            (0 | 1, Err(Error::CouponNotFound)) => {}
            (2 | 3, Ok(_)) | (2 | 3, Err(Error::SoldOut)) => {}
            _ => panic!("claim {i}: {a:?}"),
        }
    }
    assert_eq!(db.stock(real.0), (0, 10, 10));
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency_keys"), 0);
    assert_eq!(db.claims.stats().queued, 0);
}

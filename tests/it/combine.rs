//! Claim combining: concurrent claims of one lane share one transaction. Each test makes the
//! batches it needs by holding a coupon's row lock from a second connection while claims queue
//! behind it, and checks the database afterwards.

use crate::library::{limited_coupon, new_coupon, new_users};
use crate::support::{auth, counter_mismatches, TestDb};
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

/// Server connection ids of this test database's statements that wait for a row lock: with the
/// coupon held, any `FOR UPDATE` still running is waiting. (Not `information_schema.innodb_trx`:
/// the server refreshes it only after 100 ms without a read, so polling would freeze it.)
fn lock_waiters(db: &TestDb) -> Vec<u64> {
    db.conn()
        .exec(
            "SELECT id FROM information_schema.processlist
             WHERE db = ? AND info LIKE '%FOR UPDATE' AND id <> CONNECTION_ID() ORDER BY id",
            (&db.name,),
        )
        .unwrap()
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
    queued_claims_on(db, &claims, keys, while_held)
}

/// [`queued_claims`] with a coupon for each claim: the first claim's coupon is held, and the
/// others queue only if their coupons are in its lane.
fn queued_claims_on(
    db: &TestDb,
    claims: &[(UserId, CouponId)],
    keys: &[Option<&str>],
    while_held: impl FnOnce(),
) -> Vec<Answer<claim::Claimed>> {
    let mut holder = hold(db, claims[0].1);
    let queued_before = db.pool.stats().claims_queued;
    let answers = std::thread::scope(|s| {
        let run = |i: usize| {
            let (user, coupon) = claims[i];
            let key = keys.get(i).copied().flatten();
            let key = key.map(|k| IdempotencyKey::parse(k).unwrap());
            match &key {
                Some(k) => claim::claim_once(&db.pool, user, coupon, k),
                None => Answer {
                    result: claim::claim(&db.pool, user, coupon),
                    replayed: false,
                },
            }
        };
        let first = s.spawn(move || run(0));
        wait_until("the first claim to wait on the lock", || {
            lock_waiters(db).len() == 1
        });
        // One at a time, so that the queue's order is `claims` order.
        let rest: Vec<_> = (1..claims.len())
            .map(|i| {
                let h = s.spawn(move || run(i));
                wait_until("a claim to queue", || {
                    db.pool.stats().claims_queued == queued_before + i as u64
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
    assert_eq!(db.pool.stats().claims_queued, 0);
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
                        claim::claim_once(&db.pool, user, coupon, &key).result
                    } else {
                        claim::claim(&db.pool, user, coupon)
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
        db.pool.stats().claims_combined > 0,
        "no claims were combined: {:?}",
        db.pool.stats()
    );
}

#[test]
fn thousands_of_parallel_claims_over_many_coupons_in_two_lanes_keep_every_stock() {
    let mut db = TestDb::new();
    db.pool = db.pool.clone().with_claim_lanes(2);
    let users = new_users(&db, &auth(), 100);
    // Ten coupons, stock 100 each; the odd ones allow one claim per user.
    let coupons: Vec<CouponId> = (0..10)
        .map(|i| match i % 2 {
            0 => new_coupon(&db, &format!("SPREAD{i}"), 100),
            _ => limited_coupon(&db, &format!("SPREAD{i}"), 100, 1),
        })
        .collect();
    // 3,000 attempts from 48 threads: 300 a coupon, by 100 users, 3 each.
    let outcomes: Vec<(usize, Result<(), String>)> = rayon::ThreadPoolBuilder::new()
        .num_threads(48)
        .build()
        .unwrap()
        .install(|| {
            (0..3000)
                .into_par_iter()
                .map(|i| {
                    let c = i % 10;
                    let result = match claim::claim(&db.pool, users[i / 30], coupons[c]) {
                        Ok(_) => Ok(()),
                        Err(Error::SoldOut) => Err("sold_out".to_owned()),
                        Err(Error::LimitReached) => Err("limit".to_owned()),
                        Err(e) => Err(format!("unexpected: {e}")),
                    };
                    (c, result)
                })
                .collect()
        });
    for (c, &coupon) in coupons.iter().enumerate() {
        let mine = || {
            outcomes
                .iter()
                .filter(move |(i, _)| *i == c)
                .map(|(_, r)| r)
        };
        let won = mine().filter(|r| r.is_ok()).count();
        let refused = |what: &str| {
            mine()
                .filter(|r| r.as_ref().err().is_some_and(|e| e == what))
                .count()
        };
        assert_eq!(won, 100, "coupon {c}");
        if c % 2 == 0 {
            assert_eq!(refused("sold_out"), 200, "coupon {c}");
        } else {
            // A hundred users, one each: every user got one; the rest hit the limit or the end.
            let n = refused("sold_out") + refused("limit");
            assert_eq!(n, 200, "coupon {c}");
        }
        assert_eq!(db.stock(coupon.0), (0, 100, 100));
    }
    let per_user: i64 = db.scalar(
        "SELECT COUNT(*) FROM (SELECT user_id, coupon_id FROM claims GROUP BY user_id, coupon_id
         HAVING COUNT(*) > 1 AND coupon_id IN (SELECT id FROM coupons WHERE per_user_limit = 1)) t",
    );
    assert_eq!(per_user, 0, "a user holds two of a one-each coupon");
    let mismatched = counter_mismatches(&mut db.conn());
    assert!(mismatched.is_empty(), "{mismatched:?}");
    assert!(db.pool.stats().claims_combined > 0);
}

#[test]
fn per_user_limits_hold_inside_one_batch() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 10);
    let coupon = limited_coupon(&db, "TWOEACH", 100, 2);
    // User 0 holds one already: one more is all they may have.
    claim::claim(&db.pool, users[0], coupon).unwrap();
    // Sixty claims, six per user, all in one batch behind the first.
    let who: Vec<UserId> = (0..60).map(|i| users[i % 10]).collect();
    let combined_before = db.pool.stats().claims_combined;
    let answers = queued_claims(&db, coupon, &who, &[], || {});
    assert_eq!(db.pool.stats().claims_combined - combined_before, 59);
    for (u, user) in users.iter().enumerate() {
        let mine: Vec<&Answer<claim::Claimed>> = answers
            .iter()
            .zip(&who)
            .filter(|(_, w)| *w == user)
            .map(|(a, _)| a)
            .collect();
        let won = mine.iter().filter(|a| a.result.is_ok()).count();
        let refused = mine
            .iter()
            .filter(|a| matches!(a.result, Err(Error::LimitReached)))
            .count();
        let expected = if u == 0 { 1 } else { 2 };
        assert_eq!((won, refused), (expected, 6 - expected), "user {u}");
    }
    assert_eq!(db.stock(coupon.0), (80, 20, 100));
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
            let a = claim::claim_once(&db.pool, users[i], coupon, &key);
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
    db.pool = db.pool.clone().with_claim_lanes(1);
    let users = new_users(&db, &auth(), 12);
    let held = new_coupon(&db, "HELD", 100);
    let small = new_coupon(&db, "SMALL", 2);
    let limited = limited_coupon(&db, "ONEEACH", 100, 1);
    let gone = new_coupon(&db, "GONE", 5);
    coupon::delete(&db.pool, users[0], gone).unwrap();
    let mut claims = vec![(users[0], held)];
    for (i, &user) in users.iter().enumerate() {
        claims.extend([(user, small), (users[i % 3], limited), (user, held)]);
    }
    claims.push((users[1], gone));
    // Keys on a few, one of them sent twice (the second must replay in a later batch).
    let mut keys: Vec<Option<&str>> = vec![None; claims.len()];
    keys[1] = Some("small-1");
    keys[6] = Some("held-2");
    keys[9] = Some("held-3");
    claims.push(claims[9]);
    keys.push(Some("held-3"));
    let batches_before = db.pool.stats().claim_batches;
    let answers = queued_claims_on(&db, &claims, &keys, || {});
    assert_eq!(db.pool.stats().claim_batches, batches_before + 1);
    // Per coupon, in arrival order: what each claim got.
    let mut left_seen: std::collections::HashMap<CouponId, Vec<u64>> = Default::default();
    for (i, (a, &(user, c))) in answers.iter().zip(&claims).enumerate() {
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
                if !a.replayed {
                    left_seen.entry(c).or_default().push(got.available_count);
                }
            }
            Err(Error::SoldOut) => assert_eq!(c, small, "claim {i}"),
            Err(Error::LimitReached) => assert_eq!(c, limited, "claim {i}"),
            Err(Error::CouponNotFound) => assert_eq!(c, gone, "claim {i}"),
            Err(e) => panic!("claim {i}: {e}"),
        }
    }
    let last = answers.last().unwrap();
    assert!(last.replayed, "the repeated key replays");
    assert_eq!(
        last.result.as_ref().unwrap().claim.id,
        answers[9].result.as_ref().unwrap().claim.id
    );
    assert_eq!(left_seen[&small], vec![1, 0]);
    assert_eq!(left_seen[&limited], vec![99, 98, 97]);
    assert_eq!(left_seen[&held], (87..100).rev().collect::<Vec<u64>>());
    assert_eq!(db.stock(held.0), (87, 13, 100));
    assert_eq!(db.stock(small.0), (0, 2, 2));
    assert_eq!(db.stock(limited.0), (97, 3, 100));
    assert_eq!(db.stock(gone.0), (5, 0, 5));
    let mismatched = counter_mismatches(&mut db.conn());
    assert!(mismatched.is_empty(), "{mismatched:?}");
}

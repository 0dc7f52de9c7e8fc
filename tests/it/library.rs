//! The library's public API, used as an embedding program would, against real MariaDB.

use crate::support::{auth, TestDb, SECRET};
use coupons::auth::{self as auth_mod, Auth, Principal, Secret};
use coupons::coupon::{self, CouponChange, NewCoupon};
use coupons::{
    claim, db, life, CouponCode, CouponId, Email, Error, Password, Role, Status, Stock,
    TokenProblem, UserId,
};
use rayon::prelude::*;

pub(crate) fn new_coupon(db: &TestDb, code: &str, stock: i64) -> CouponId {
    coupon::create(
        &db.pool,
        UserId(0),
        &NewCoupon {
            code: CouponCode::parse(code).unwrap(),
            available_count: Stock::parse(stock).unwrap(),
            status: Status::Active,
            rules: coupon::Rules::default(),
        },
    )
    .unwrap()
    .id
}

pub(crate) fn new_users(db: &TestDb, auth: &Auth, n: usize) -> Vec<UserId> {
    (0..n)
        .map(|i| {
            let email = Email::parse(&format!("user{i}@example.com")).unwrap();
            auth.register(&db.pool, &email, &Password::parse("password123").unwrap())
                .unwrap()
                .id
        })
        .collect()
}

/// A rayon pool no larger than the connection pool, so threads wait on the row lock and not
/// on `pool.get()`.
pub(crate) fn threads(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

/// T threads x M attempts against stock K: exactly min(K, T*M) successes, the rest sold out.
#[track_caller]
fn hammer(stock: i64, threads_n: usize, attempts: usize) {
    hammer_on(TestDb::new(), stock, threads_n, attempts)
}

#[track_caller]
fn hammer_on(db: TestDb, stock: i64, threads_n: usize, attempts: usize) {
    let users = new_users(&db, &auth(), threads_n);
    let coupon = new_coupon(&db, "HOT", stock);
    let outcomes: Vec<Result<u64, String>> = threads(threads_n).install(|| {
        (0..threads_n * attempts)
            .into_par_iter()
            .map(|i| match db.claims.claim(users[i % threads_n], coupon) {
                Ok(c) => Ok(c.claim.id.0),
                Err(Error::SoldOut) => Err("sold_out".into()),
                Err(e) => Err(format!("unexpected: {e}")),
            })
            .collect()
    });
    let total = (threads_n * attempts) as i64;
    let won: Vec<u64> = outcomes.iter().filter_map(|o| o.clone().ok()).collect();
    let unexpected: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .filter(|e| *e != "sold_out")
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert_eq!(won.len() as i64, stock.min(total));
    let mut distinct = won.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), won.len(), "a claim id was handed out twice");
    let (available, claims, total_count) = db.stock(coupon.0);
    assert_eq!(claims, stock.min(total));
    assert_eq!(available, (stock - total).max(0));
    assert_eq!(total_count, stock);
}

#[test]
fn parallel_claims_take_exactly_the_stock() {
    hammer(50, 8, 25);
}

#[test]
fn parallel_claims_below_the_stock_all_succeed() {
    hammer(500, 8, 25);
}

#[test]
fn parallel_claims_on_stock_of_one() {
    hammer(1, 8, 10);
}

#[test]
fn parallel_claims_without_combining_take_exactly_the_stock() {
    let mut db = TestDb::new();
    db.claims = db.claims.clone().with_batching(1);
    hammer_on(db, 50, 8, 25);
}

#[test]
fn parallel_claims_spread_over_many_coupons_and_users() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 40);
    let stocks: Vec<i64> = (0..12).map(|i| [0, 1, 3, 7, 20, 55][i % 6]).collect();
    let coupons: Vec<CouponId> = stocks
        .iter()
        .enumerate()
        .map(|(i, s)| new_coupon(&db, &format!("C{i}"), *s))
        .collect();
    let attempts = 1200;
    let results: Vec<(usize, bool)> = threads(12).install(|| {
        (0..attempts)
            .into_par_iter()
            .map(|i| {
                let c = (i * 7 + i / 13) % coupons.len();
                match db.claims.claim(users[i % users.len()], coupons[c]) {
                    Ok(_) => (c, true),
                    Err(Error::SoldOut) => (c, false),
                    Err(e) => panic!("unexpected {e}"),
                }
            })
            .collect()
    });
    for (c, id) in coupons.iter().enumerate() {
        let tried = results.iter().filter(|(x, _)| *x == c).count() as i64;
        let won = results.iter().filter(|(x, ok)| *x == c && *ok).count() as i64;
        assert_eq!(won, stocks[c].min(tried), "coupon {c}");
        let (available, claims, total) = db.stock(id.0);
        assert_eq!(
            (available, claims, total),
            (stocks[c] - won, won, stocks[c])
        );
    }
    // Every claim belongs to one of the users, and histories add up to all claims.
    let in_histories: usize = users
        .iter()
        .map(|u| {
            claim::history(&db.pool, *u, coupons::Page::first())
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(
        in_histories as i64,
        db.scalar("SELECT COUNT(*) FROM claims")
    );
}

#[test]
fn stock_changes_race_safely_with_claims() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 4);
    let coupon = new_coupon(&db, "RESTOCK", 10);
    let won: usize = threads(8).install(|| {
        (0..400)
            .into_par_iter()
            .map(|i| {
                if i % 10 == 0 {
                    let change = CouponChange {
                        available_count: Some(Stock::parse(5).unwrap()),
                        ..CouponChange::default()
                    };
                    coupon::update(&db.pool, UserId(0), coupon, &change).unwrap();
                    return 0;
                }
                match db.claims.claim(users[i % 4], coupon) {
                    Ok(_) => 1,
                    Err(Error::SoldOut) => 0,
                    Err(e) => panic!("unexpected {e}"),
                }
            })
            .sum()
    });
    // stock() asserts available + claims == total; total grew by every restock.
    let (available, claims, total) = db.stock(coupon.0);
    assert_eq!(claims, won as i64, "claims answered Ok != claim rows");
    assert!(available <= 5 && claims >= 10 && total == available + claims);
}

#[test]
fn register_and_login() {
    let db = TestDb::new();
    let auth = auth();
    let email = Email::parse("Ada@Example.com").unwrap();
    let pw = Password::parse("password123").unwrap();
    let user = auth.register(&db.pool, &email, &pw).unwrap();
    assert_eq!(
        (user.email.as_str(), user.role),
        ("ada@example.com", Role::User)
    );
    let again = Email::parse("ada@example.COM").unwrap();
    assert!(matches!(
        auth.register(&db.pool, &again, &pw),
        Err(Error::EmailTaken)
    ));

    let token = auth
        .login(&db.pool, "ADA@example.com", "password123")
        .unwrap();
    let who = auth.authenticate(Some(&token.token)).unwrap();
    assert_eq!(
        who,
        Principal {
            user_id: user.id,
            role: Role::User
        }
    );
    for (email, password) in [
        ("ada@example.com", "wrong-password"),
        ("nobody@example.com", "password123"),
        ("not an email", "password123"),
        ("ada@example.com", &"p".repeat(100)),
    ] {
        assert!(matches!(
            auth.login(&db.pool, email, password),
            Err(Error::BadCredentials)
        ));
    }
    let hash: String = {
        use mysql::prelude::Queryable;
        db.conn()
            .query_first("SELECT password_hash FROM users")
            .unwrap()
            .unwrap()
    };
    assert!(hash.starts_with("$2b$04$") && !hash.contains("password123"));
}

#[test]
fn tokens_are_checked() {
    let auth = auth();
    let token = auth.issue(UserId(7), Role::Admin).unwrap().token;
    assert_eq!(auth.authenticate(Some(&token)).unwrap().user_id, UserId(7));
    assert!(matches!(
        auth.authenticate(None),
        Err(Error::Token(TokenProblem::Missing))
    ));

    let mut tampered = token.clone();
    tampered.insert(tampered.len() - 3, 'x');
    let other = Auth::new(&Secret::parse(&"z".repeat(40)).unwrap(), 60, 4).unwrap();
    let foreign = other.issue(UserId(7), Role::Admin).unwrap().token;
    let expired = forge(SECRET, 7, -3600, "HS256");
    let wrong_alg = forge(SECRET, 7, 3600, "HS512");
    for bad in [tampered, foreign, wrong_alg, "abc".into(), String::new()] {
        assert!(
            matches!(
                auth.authenticate(Some(&bad)),
                Err(Error::Token(TokenProblem::Invalid))
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        auth.authenticate(Some(&expired)),
        Err(Error::Token(TokenProblem::Expired))
    ));
    assert!(Secret::parse(&"s".repeat(31)).is_err());
}

/// A token signed with `secret`, expiring `exp_in` seconds from now.
pub fn forge(secret: &str, user: u64, exp_in: i64, alg: &str) -> String {
    let now = coupons::Timestamp::now().unix_secs();
    let claims = serde_json::json!({"iss": "coupons", "sub": user.to_string(), "role": "ADMIN", "iat": now, "exp": now + exp_in});
    forge_claims(secret, &claims, alg)
}

/// A token with these claims, signed with `secret` (HS256 or HS512), or with header `alg` and
/// a garbage signature for any other algorithm (`none`, `RS256`).
pub fn forge_claims(secret: &str, claims: &serde_json::Value, alg: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    match alg {
        "HS256" | "HS512" => {
            let alg = if alg == "HS512" {
                Algorithm::HS512
            } else {
                Algorithm::HS256
            };
            encode(
                &Header::new(alg),
                claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        }
        other => {
            let b64 = |v: &serde_json::Value| base64url(v.to_string().as_bytes());
            let head = b64(&serde_json::json!({"alg": other, "typ": "JWT"}));
            let sig = if other == "none" {
                String::new()
            } else {
                base64url(b"not-a-signature")
            };
            format!("{head}.{}.{sig}", b64(claims))
        }
    }
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn roles_come_from_the_database() {
    let db = TestDb::new();
    let auth = auth();
    let email = Email::parse("boss@example.com").unwrap();
    let user = auth
        .register(&db.pool, &email, &Password::parse("password123").unwrap())
        .unwrap();
    let who = Principal {
        user_id: user.id,
        role: Role::Admin,
    };
    assert!(matches!(
        auth_mod::require_admin(&db.pool, &who),
        Err(Error::NotAdmin)
    ));
    auth_mod::set_role(&db.pool, &email, Role::Admin).unwrap();
    auth_mod::require_admin(&db.pool, &who).unwrap();
    auth_mod::set_role(&db.pool, &email, Role::User).unwrap();
    assert!(matches!(
        auth_mod::require_admin(&db.pool, &who),
        Err(Error::NotAdmin)
    ));
    let ghost = Principal {
        user_id: UserId(999_999),
        role: Role::Admin,
    };
    assert!(matches!(
        auth_mod::require_admin(&db.pool, &ghost),
        Err(Error::Token(TokenProblem::UnknownUser))
    ));
    let nobody = Email::parse("nobody@example.com").unwrap();
    assert!(matches!(
        auth_mod::set_role(&db.pool, &nobody, Role::Admin),
        Err(Error::UserNotFound)
    ));
}

#[test]
fn coupon_lifecycle() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let id = new_coupon(&db, "Summer-26", 2);
    // Codes are unique case-insensitively among live coupons.
    let dup = NewCoupon {
        code: CouponCode::parse("SUMMER-26").unwrap(),
        available_count: Stock::parse(1).unwrap(),
        status: Status::Active,
        rules: coupon::Rules::default(),
    };
    assert!(matches!(
        coupon::create(&db.pool, UserId(0), &dup),
        Err(Error::CodeTaken)
    ));

    db.claims.claim(users[0], id).unwrap();
    let change = CouponChange {
        available_count: Some(Stock::parse(10).unwrap()),
        status: Some(Status::Inactive),
        ..CouponChange::default()
    };
    let c = coupon::update(&db.pool, UserId(0), id, &change).unwrap();
    assert_eq!(
        (c.available_count, c.total_count, c.status),
        (10, 11, Status::Inactive)
    );
    assert!(coupon::list_active(&db.pool, coupons::Page::first())
        .unwrap()
        .is_empty());
    assert!(matches!(
        db.claims.claim(users[0], id),
        Err(Error::Inactive)
    ));

    let other = new_coupon(&db, "OTHER", 1);
    let rename = CouponChange {
        code: Some(CouponCode::parse("other").unwrap()),
        ..CouponChange::default()
    };
    // `id` has a claim: its code is locked. A coupon with none meets the uniqueness rule.
    assert!(matches!(
        coupon::update(&db.pool, UserId(0), id, &rename),
        Err(Error::CodeLocked)
    ));
    let fresh = new_coupon(&db, "FRESH", 1);
    assert!(matches!(
        coupon::update(&db.pool, UserId(0), fresh, &rename),
        Err(Error::CodeTaken)
    ));
    db.claims.claim(users[0], other).unwrap();
    assert!(matches!(
        db.claims.claim(users[0], other),
        Err(Error::SoldOut)
    ));

    coupon::delete(&db.pool, UserId(0), id).unwrap();
    assert!(matches!(
        coupon::delete(&db.pool, UserId(0), id),
        Err(Error::CouponNotFound)
    ));
    assert!(matches!(
        coupon::get(&db.pool, id),
        Err(Error::CouponNotFound)
    ));
    assert!(matches!(
        db.claims.claim(users[0], id),
        Err(Error::CouponNotFound)
    ));
    assert!(matches!(
        coupon::update(&db.pool, UserId(0), id, &rename),
        Err(Error::CouponNotFound)
    ));
    // The deleted coupon's claim stays in the history, and its code is free again.
    let history = claim::history(&db.pool, users[0], coupons::Page::first()).unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(
        (
            history[0].record.claim.code.as_str(),
            history[1].record.claim.code.as_str()
        ),
        ("OTHER", "Summer-26")
    );
    assert!(history[0].record.claim.claimed_at >= history[1].record.claim.claimed_at);
    new_coupon(&db, "summer-26", 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM claims"), 2);
    db.stock(id.0);
}

#[test]
fn migrating_twice_changes_nothing() {
    let db = TestDb::new();
    let schema = |db: &TestDb| -> Vec<(String, String)> {
        use mysql::prelude::Queryable;
        let mut conn = db.conn();
        let tables: Vec<String> = conn.query("SHOW TABLES").unwrap();
        tables
            .into_iter()
            .map(|t| {
                let (_, ddl): (String, String) = conn
                    .query_first(format!("SHOW CREATE TABLE `{t}`"))
                    .unwrap()
                    .unwrap();
                (t, ddl.split(" AUTO_INCREMENT=").next().unwrap().to_owned())
            })
            .collect()
    };
    let before = schema(&db);
    db::migrate(&db.pool).unwrap();
    db::migrate(&db.pool).unwrap();
    assert_eq!(schema(&db), before);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM schema_migrations"),
        crate::support::migrations()
    );
    // users, coupons, claims, idempotency_keys, user_coupon_claims, audit_log,
    // schema_migrations; coupon_codes, returned_codes, code_adds; events, event_sequence,
    // webhooks, webhook_deliveries; claim_counts.
    assert_eq!(before.len(), 15);
}

#[test]
fn the_schema_refuses_negative_stock() {
    use mysql::prelude::Queryable;
    let db = TestDb::new();
    let id = new_coupon(&db, "CHECKED", 1);
    let r = db.conn().exec_drop(
        "UPDATE coupons SET available_count = available_count - 2 WHERE id = ?",
        (id.0,),
    );
    assert!(r.is_err(), "the CHECK constraint let stock go negative");
    db.stock(id.0);
}

/// The schema's checks mirror the service's: a row with both values, an amount without a
/// currency, a percentage or amount out of range, a lower-case currency or metadata that is not
/// JSON cannot be written by hand either; a row within the rules can, and reads back.
#[test]
fn the_schema_refuses_what_the_value_rules_refuse() {
    use mysql::prelude::Queryable;
    let db = TestDb::new();
    let id = new_coupon(&db, "WORTH", 1);
    let mut conn = db.conn();
    for bad in [
        "percent_off = 0",
        "percent_off = 101",
        "percent_off = 10, amount_off = 5, currency = 'EUR'",
        "amount_off = 5",
        "amount_off = 0, currency = 'EUR'",
        "amount_off = 1000000000001, currency = 'EUR'",
        "min_order_amount = 5",
        "min_order_amount = -1, currency = 'EUR'",
        "currency = 'eur'",
        "currency = 'EU'",
        "currency = 'E1R'",
        "metadata = '{not json'",
    ] {
        let r = conn.exec_drop(format!("UPDATE coupons SET {bad} WHERE id = ?"), (id.0,));
        assert!(r.is_err(), "the schema let {bad} through");
    }
    conn.exec_drop(
        "UPDATE coupons SET amount_off = 1000000000000, currency = 'EUR', min_order_amount = 0,
             metadata = '{\"a\": \"b\"}' WHERE id = ?",
        (id.0,),
    )
    .unwrap();
    let c = coupon::get(&db.pool, id).unwrap();
    assert_eq!(
        (c.percent_off, c.amount_off, c.currency.as_deref()),
        (None, Some(1_000_000_000_000), Some("EUR"))
    );
    assert_eq!(c.min_order_amount, Some(0));
    assert_eq!(c.metadata.unwrap()["a"], "b");
}

/// Through the library: terms change freely until the first claim, then only to themselves;
/// metadata stays free.
#[test]
fn terms_lock_at_the_first_claim() {
    use coupons::{Amount, Currency, Metadata, PercentOff};
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let id = new_coupon(&db, "LOCKING", 5);
    let change = |rules: coupon::RulesChange| CouponChange {
        rules,
        ..Default::default()
    };
    let percent = |p: i64| coupon::RulesChange {
        percent_off: Some(Some(PercentOff::parse(p).unwrap())),
        ..Default::default()
    };
    let c = coupon::update(&db.pool, UserId(0), id, &change(percent(10))).unwrap();
    assert_eq!(c.percent_off, Some(10));
    db.claims.claim(users[0], id).unwrap();
    for locked in [
        percent(20),
        coupon::RulesChange {
            percent_off: Some(None),
            ..Default::default()
        },
        coupon::RulesChange {
            currency: Some(Some(Currency::parse("EUR").unwrap())),
            ..Default::default()
        },
        coupon::RulesChange {
            percent_off: Some(None),
            amount_off: Some(Some(Amount::off(5).unwrap())),
            currency: Some(Some(Currency::parse("EUR").unwrap())),
            ..Default::default()
        },
    ] {
        let r = coupon::update(&db.pool, UserId(0), id, &change(locked.clone()));
        assert!(matches!(r, Err(Error::TermsLocked)), "{locked:?}: {r:?}");
    }
    let tagged = coupon::RulesChange {
        metadata: Some(Some(
            Metadata::parse(&serde_json::json!({"k": "v"})).unwrap(),
        )),
        ..percent(10)
    };
    let c = coupon::update(&db.pool, UserId(0), id, &change(tagged)).unwrap();
    assert_eq!((c.percent_off, c.metadata.unwrap().len()), (Some(10), 1));
}

#[test]
fn a_held_row_lock_ends_in_busy_then_the_claim_goes_through() {
    use mysql::prelude::Queryable;
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let coupon = new_coupon(&db, "LOCKED", 3);
    let mut holder = db.conn();
    holder.query_drop("START TRANSACTION").unwrap();
    holder
        .exec_drop(
            "SELECT id FROM coupons WHERE id = ? FOR UPDATE",
            (coupon.0,),
        )
        .unwrap();
    let started = std::time::Instant::now();
    let r = db.claims.claim(users[0], coupon);
    let waited = started.elapsed();
    assert!(matches!(r, Err(Error::Busy)), "{r:?}");
    // Lock waits are bounded: a few 2 s waits, not the server's 50 s.
    assert!(waited < std::time::Duration::from_secs(15), "{waited:?}");
    holder.query_drop("ROLLBACK").unwrap();
    assert_eq!(db.stock(coupon.0), (3, 0, 3));
    db.claims.claim(users[0], coupon).unwrap();
    assert_eq!(db.stock(coupon.0), (2, 1, 3));
}

fn key(s: &str) -> coupons::idempotency::IdempotencyKey {
    coupons::idempotency::IdempotencyKey::parse(s).unwrap()
}

#[test]
fn fifty_parallel_claims_with_one_key_claim_once() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 2);
    let coupon = new_coupon(&db, "ONCE", 100);
    let k = key("order-7f3a");
    let answers: Vec<_> = threads(12).install(|| {
        (0..50)
            .into_par_iter()
            .map(|_| db.claims.claim_once(users[0], coupon, &k))
            .collect()
    });
    let ids: Vec<u64> = answers
        .iter()
        .map(|a| {
            a.result
                .as_ref()
                .expect("every answer is the claim")
                .claim
                .id
                .0
        })
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    assert_eq!(db.stock(coupon.0), (99, 1, 100));

    // The same key from another user is another request; from the same user for another
    // coupon it is refused.
    let other = db.claims.claim_once(users[1], coupon, &k);
    assert!(!other.replayed);
    assert_ne!(other.result.unwrap().claim.id.0, ids[0]);
    let second = new_coupon(&db, "ONCE2", 5);
    let reused = db.claims.claim_once(users[0], second, &k);
    assert!(matches!(reused.result, Err(Error::KeyReused)), "{reused:?}");
    assert_eq!(db.stock(coupon.0), (98, 2, 100));
    assert_eq!(db.stock(second.0), (5, 0, 5));
}

#[test]
fn a_refusal_is_replayed_too_and_keys_expire() {
    use mysql::prelude::Queryable;
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let coupon = new_coupon(&db, "EMPTY", 0);
    let first = db.claims.claim_once(users[0], coupon, &key("k1"));
    assert!(matches!(first.result, Err(Error::SoldOut)) && !first.replayed);
    let change = CouponChange {
        available_count: Some(Stock::parse(3).unwrap()),
        ..CouponChange::default()
    };
    coupon::update(&db.pool, UserId(0), coupon, &change).unwrap();
    // Same key: the same answer, even though stock came back.
    let again = db.claims.claim_once(users[0], coupon, &key("k1"));
    assert!(matches!(again.result, Err(Error::SoldOut)) && again.replayed);
    // A new key claims.
    assert!(db
        .claims
        .claim_once(users[0], coupon, &key("k2"))
        .result
        .is_ok());
    assert_eq!(db.stock(coupon.0), (2, 1, 3));

    db.conn()
        .query_drop("UPDATE idempotency_keys SET created_at = created_at - INTERVAL 25 HOUR WHERE idem_key = 'k1'")
        .unwrap();
    let purged = coupons::idempotency::purge(&db.pool, coupons::idempotency::KEEP_FOR).unwrap();
    assert_eq!(purged, 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency_keys"), 1);
    for bad in ["", &"k".repeat(256), "tab\there", "é", "trailing "] {
        assert!(
            coupons::idempotency::IdempotencyKey::parse(bad).is_err(),
            "{bad:?}"
        );
    }
}

/// A keyed claim refused as not found (no such coupon, or a deleted one) keeps no key row: its
/// answer depends on nothing stored, and a flood of them filled the disk. Its retries get the
/// same answer, not replayed, and leave nothing either, also when they race: in a lane (one
/// batch after another) and each in a transaction of its own, waiting on the reservation of
/// another request with the key, which is gone when that one commits.
#[test]
fn a_keyed_claim_on_no_coupon_keeps_no_key_even_when_its_retries_race() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let gone = new_coupon(&db, "GONE", 5);
    coupon::delete(&db.pool, UserId(0), gone).unwrap();
    let nowhere = CouponId(999_999);
    let lone = db.claims.clone().with_batching(1);
    for (case, claims, coupon) in [
        ("combined, no row", &db.claims, nowhere),
        ("alone, no row", &lone, nowhere),
        ("alone, deleted", &lone, gone),
    ] {
        let k = key(&format!("nowhere-{coupon}"));
        let answers: Vec<_> = threads(8).install(|| {
            (0..8)
                .into_par_iter()
                .map(|_| claims.claim_once(users[0], coupon, &k))
                .collect()
        });
        for a in answers {
            assert!(
                matches!(a.result, Err(Error::CouponNotFound)) && !a.replayed,
                "{case}: {a:?}"
            );
        }
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM idempotency_keys"),
            0,
            "{case}"
        );
    }
    assert_eq!(db.stock(gone.0), (5, 0, 5));
}

/// A key recorded as text, before keys kept their request's digest (sql/006), is converted by
/// that migration: its retry still replays, and it still refuses another coupon.
#[test]
fn a_key_recorded_as_text_still_replays_after_the_digest_migration() {
    use mysql::prelude::Queryable;
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let coupon = new_coupon(&db, "OLDKEY", 5);
    let first = db.claims.claim_once(users[0], coupon, &key("before-006"));
    let claimed = first.result.unwrap().claim.id;
    // Back to the schema before 006, with the key as it was recorded then.
    let mut conn = db.conn();
    conn.query_drop(
        "ALTER TABLE idempotency_keys CHANGE request_sha256 request VARCHAR(400) NOT NULL",
    )
    .unwrap();
    conn.exec_drop(
        "UPDATE idempotency_keys SET request = ?",
        (format!("claim {coupon}"),),
    )
    .unwrap();
    conn.query_drop("DELETE FROM schema_migrations WHERE version = 6")
        .unwrap();
    db::migrate(&db.pool).unwrap();
    let again = db.claims.claim_once(users[0], coupon, &key("before-006"));
    assert!(again.replayed, "{again:?}");
    assert_eq!(again.result.unwrap().claim.id, claimed);
    let other = new_coupon(&db, "OTHER", 5);
    let reused = db.claims.claim_once(users[0], other, &key("before-006"));
    assert!(matches!(reused.result, Err(Error::KeyReused)), "{reused:?}");
    assert_eq!(db.stock(coupon.0), (4, 1, 5));
}

pub(crate) fn limited_coupon(db: &TestDb, code: &str, stock: i64, limit: i64) -> CouponId {
    coupon::create(
        &db.pool,
        UserId(0),
        &NewCoupon {
            code: CouponCode::parse(code).unwrap(),
            available_count: Stock::parse(stock).unwrap(),
            status: Status::Active,
            rules: coupon::Rules {
                per_user_limit: Some(coupons::PerUserLimit::parse(limit).unwrap()),
                ..Default::default()
            },
        },
    )
    .unwrap()
    .id
}

#[test]
fn per_user_limits_hold_under_parallel_claims() {
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 20);
    // One user, 50 parallel claims, limit 1: exactly one.
    let one = limited_coupon(&db, "ONEEACH", 100, 1);
    let outcomes: Vec<bool> = threads(12).install(|| {
        (0..50)
            .into_par_iter()
            .map(|_| match db.claims.claim(users[0], one) {
                Ok(_) => true,
                Err(Error::LimitReached) => false,
                Err(e) => panic!("unexpected {e}"),
            })
            .collect()
    });
    assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1);
    assert_eq!(db.stock(one.0), (99, 1, 100));

    // Twenty users at once, ten claims each, limit 3: three each, and stock 50 caps the rest.
    let three = limited_coupon(&db, "THREEEACH", 50, 3);
    let won: Vec<(usize, bool)> = threads(12).install(|| {
        (0..200)
            .into_par_iter()
            .map(|i| match db.claims.claim(users[i % 20], three) {
                Ok(_) => (i % 20, true),
                Err(Error::LimitReached | Error::SoldOut) => (i % 20, false),
                Err(e) => panic!("unexpected {e}"),
            })
            .collect()
    });
    let total = won.iter().filter(|w| w.1).count();
    assert_eq!(total, 50, "stock 50 < 20 users x 3");
    for u in 0..20 {
        let n = won.iter().filter(|w| w.0 == u && w.1).count();
        assert!(n <= 3, "user {u} got {n}");
    }
    assert_eq!(db.stock(three.0), (0, 50, 50));
    // The counter rows agree with the claim rows, user by user.
    let mismatched = crate::support::counter_mismatches(&mut db.conn());
    assert!(mismatched.is_empty(), "{mismatched:?}");
}

#[test]
fn validity_windows_and_names_as_they_were() {
    use coupons::{Label, Timestamp};
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let hour = std::time::Duration::from_secs(3600);
    let now = Timestamp::now();
    let future = now.minus(std::time::Duration::ZERO).plus(hour);
    let make = |code: &str, starts: Option<Timestamp>, ends: Option<Timestamp>| {
        coupon::create(
            &db.pool,
            UserId(0),
            &NewCoupon {
                code: CouponCode::parse(code).unwrap(),
                available_count: Stock::parse(5).unwrap(),
                status: Status::Active,
                rules: coupon::Rules {
                    name: Some(Label::parse("name", &format!("{code} deal"), 200).unwrap()),
                    starts_at: starts,
                    ends_at: ends,
                    ..Default::default()
                },
            },
        )
    };
    let later = make("LATER", Some(future), None).unwrap().id;
    let over = make("OVER", Some(now.minus(hour * 2)), Some(now.minus(hour)))
        .unwrap()
        .id;
    let open = make("OPEN", Some(now.minus(hour)), Some(future))
        .unwrap()
        .id;
    assert!(matches!(
        make("BACKWARDS", Some(future), Some(now)),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        db.claims.claim(users[0], later),
        Err(Error::NotStarted)
    ));
    assert!(matches!(
        db.claims.claim(users[0], over),
        Err(Error::Expired)
    ));
    db.claims.claim(users[0], open).unwrap();
    let listed: Vec<CouponId> = coupon::list_active(&db.pool, coupons::Page::first())
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, vec![open]);
    // A window that ends before it starts is refused on update too; removing the end works.
    let change = CouponChange {
        rules: coupon::RulesChange {
            ends_at: Some(Some(now.minus(hour * 3))),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(matches!(
        coupon::update(&db.pool, UserId(0), open, &change),
        Err(Error::Invalid { .. })
    ));
    let rename = CouponChange {
        rules: coupon::RulesChange {
            name: Some(Some(Label::parse("name", "Renamed", 200).unwrap())),
            ends_at: Some(None),
            ..Default::default()
        },
        ..Default::default()
    };
    let c = coupon::update(&db.pool, UserId(0), open, &rename).unwrap();
    assert_eq!((c.name.as_deref(), c.ends_at), (Some("Renamed"), None));
    // The history shows the name as it was at claim time.
    let h = claim::history(&db.pool, users[0], coupons::Page::first()).unwrap();
    assert_eq!(h[0].record.claim.name.as_deref(), Some("OPEN deal"));
    assert_eq!(db.stock(open.0), (4, 1, 5));
}

#[test]
fn windows_at_the_calendar_edges_and_before_1970_read_back_unchanged() {
    use coupons::Timestamp;
    use mysql::prelude::Queryable;
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 1);
    let t = |s: &str| Timestamp::parse("starts_at", s).unwrap();
    // starts_at and ends_at as a client writes them, then as MariaDB holds them (UTC).
    let windows = [
        (
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "0001-01-01 00:00:00.000000",
            "9999-12-31 23:59:59.999999",
        ),
        (
            "0000-12-31T23:30:00-00:30",
            "9999-12-31T23:59:59+23:59",
            "0001-01-01 00:00:00.000000",
            "9999-12-31 00:00:59.000000",
        ),
        (
            "1969-07-20T21:17:40.123456+01:00",
            "1969-12-31T23:59:59.999999Z",
            "1969-07-20 20:17:40.123456",
            "1969-12-31 23:59:59.999999",
        ),
    ];
    let mut ids = Vec::new();
    for (i, (starts, ends, stored_starts, stored_ends)) in windows.into_iter().enumerate() {
        let window = (Some(t(starts)), Some(t(ends)));
        let id = coupon::create(
            &db.pool,
            UserId(0),
            &NewCoupon {
                code: CouponCode::parse(&format!("EDGE{i}")).unwrap(),
                available_count: Stock::parse(5).unwrap(),
                status: Status::Active,
                rules: coupon::Rules {
                    starts_at: window.0,
                    ends_at: window.1,
                    ..Default::default()
                },
            },
        )
        .unwrap()
        .id;
        let c = coupon::get(&db.pool, id).unwrap();
        assert_eq!((c.starts_at, c.ends_at), window, "{starts} .. {ends}");
        let a = coupon::admin_get(&db.pool, id).unwrap().coupon;
        assert_eq!((a.starts_at, a.ends_at), window, "{starts} .. {ends}");
        let stored: (String, String) = db
            .conn()
            .exec_first(
                "SELECT CAST(starts_at AS CHAR), CAST(ends_at AS CHAR) FROM coupons WHERE id = ?",
                (id.0,),
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            stored,
            (stored_starts.to_owned(), stored_ends.to_owned()),
            "{starts} .. {ends}"
        );
        ids.push(id);
    }
    // The text protocol reads a DATETIME as text; it converts the same way.
    let first: Option<Timestamp> = db
        .conn()
        .query_first("SELECT starts_at FROM coupons ORDER BY id LIMIT 1")
        .unwrap();
    assert_eq!(first, Some(t("0001-01-01T00:00:00Z")));
    // The widest window is open now (it once read back as year -1 and expired); the one that
    // ended before 1970 is over.
    db.claims.claim(users[0], ids[0]).unwrap();
    db.claims.claim(users[0], ids[1]).unwrap();
    assert!(matches!(
        db.claims.claim(users[0], ids[2]),
        Err(Error::Expired)
    ));
    // An update writes and reads back the edges too.
    let reopen = CouponChange {
        rules: coupon::RulesChange {
            starts_at: Some(Some(t("0001-01-01T00:00:00.000001Z"))),
            ends_at: Some(Some(t("9999-12-31T23:59:59.999999Z"))),
            ..Default::default()
        },
        ..Default::default()
    };
    let updated = coupon::update(&db.pool, UserId(0), ids[2], &reopen).unwrap();
    let window = (
        Some(t("0001-01-01T00:00:00.000001Z")),
        Some(t("9999-12-31T23:59:59.999999Z")),
    );
    assert_eq!((updated.starts_at, updated.ends_at), window);
    let c = coupon::get(&db.pool, ids[2]).unwrap();
    assert_eq!((c.starts_at, c.ends_at), window);
    db.claims.claim(users[0], ids[2]).unwrap();
}

#[test]
fn parallel_voids_of_one_claim_return_one_unit() {
    use coupons::Label;
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 2);
    let c = limited_coupon(&db, "VOIDME", 3, 1);
    let claimed = db.claims.claim(users[0], c).unwrap();
    assert!(matches!(
        db.claims.claim(users[0], c),
        Err(Error::LimitReached)
    ));
    let reason = Label::parse("reason", "fraud check", 500).unwrap();
    let results: Vec<bool> = threads(12).install(|| {
        (0..30)
            .into_par_iter()
            .map(
                |_| match life::void(&db.pool, users[1], claimed.claim.id, &reason) {
                    Ok(_) => true,
                    Err(Error::AlreadyVoided) => false,
                    Err(e) => panic!("unexpected {e}"),
                },
            )
            .collect()
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), 1);
    // One unit back, the claim row kept and marked, counted out of the invariant.
    assert_eq!(db.stock(c.0), (3, 0, 3));
    assert_eq!(db.scalar("SELECT COUNT(*) FROM claims"), 1);
    let h = claim::history(&db.pool, users[0], coupons::Page::first()).unwrap();
    assert_eq!(h[0].record.void_reason.as_deref(), Some("fraud check"));
    assert!(h[0].record.voided_at.is_some());
    // The user's count went down with it: they may claim again.
    db.claims.claim(users[0], c).unwrap();
    assert_eq!(db.stock(c.0), (2, 1, 3));
    assert!(matches!(
        life::void(&db.pool, users[1], coupons::ClaimId(999_999), &reason),
        Err(Error::ClaimNotFound)
    ));
}

#[test]
fn claims_and_voids_racing_keep_the_invariant() {
    use coupons::Label;
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 8);
    let c = new_coupon(&db, "CHURN", 20);
    let reason = Label::parse("reason", "test", 500).unwrap();
    threads(8).install(|| {
        (0..300)
            .into_par_iter()
            .for_each(|i| match db.claims.claim(users[i % 8], c) {
                Ok(won) if i % 3 == 0 => {
                    life::void(&db.pool, users[0], won.claim.id, &reason).unwrap();
                }
                Ok(_) | Err(Error::SoldOut) => {}
                Err(e) => panic!("unexpected {e}"),
            })
    });
    let (available, live, total) = db.stock(c.0);
    assert_eq!((available + live, total), (20, 20));
}

#[test]
fn a_limit_set_later_does_not_count_voided_claims() {
    use coupons::Label;
    let db = TestDb::new();
    let users = new_users(&db, &auth(), 2);
    let c = new_coupon(&db, "LATERLIMIT", 5);
    let first = db.claims.claim(users[0], c).unwrap();
    let reason = Label::parse("reason", "returned", 500).unwrap();
    life::void(&db.pool, users[1], first.claim.id, &reason).unwrap();
    let limit_one = CouponChange {
        rules: coupon::RulesChange {
            per_user_limit: Some(Some(coupons::PerUserLimit::parse(1).unwrap())),
            ..Default::default()
        },
        ..Default::default()
    };
    coupon::update(&db.pool, UserId(0), c, &limit_one).unwrap();
    // The voided claim is not held: one claim is still allowed, and only one.
    db.claims.claim(users[0], c).unwrap();
    assert!(matches!(
        db.claims.claim(users[0], c),
        Err(Error::LimitReached)
    ));
    assert_eq!(db.stock(c.0), (4, 1, 5));
}

//! `coupons bench-db`: the library's claim function called by T threads in this process, no
//! HTTP, on a throwaway private MariaDB (or `DATABASE_URL`). The yardstick for `loadtest`.

use super::stats::{self, Record};
use coupons::auth::{Auth, Secret};
use coupons::coupon::{self, NewCoupon};
use coupons::embedded::EmbeddedServer;
use coupons::{claim, db, CouponCode, CouponId, Email, Error, Password, Status, Stock, UserId};
use serde_json::json;
use std::time::{Duration, Instant};

pub const USAGE: &str =
    "coupons bench-db [--scenario hot|spread] [--threads T] [--duration 10s] [--coupons N] [--json]";

pub fn run(args: &[String]) -> Result<bool, String> {
    let (mut spread, mut threads, mut duration, mut count, mut as_json) =
        (false, 8usize, Duration::from_secs(10), 1000usize, false);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        let bad = |v: &str| format!("{flag}: {v:?} is not valid");
        match flag.as_str() {
            "--scenario" => {
                spread = match value()?.as_str() {
                    "hot" => false,
                    "spread" => true,
                    v => return Err(bad(v)),
                }
            }
            "--threads" => threads = value().and_then(|v| v.parse().map_err(|_| bad(&v)))?,
            "--duration" => duration = super::duration(&value()?)?,
            "--coupons" => count = value().and_then(|v| v.parse().map_err(|_| bad(&v)))?,
            "--json" => as_json = true,
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    let threads = threads.clamp(1, 900);
    let count = if spread { count.max(1) } else { 1 };

    let (url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let dir = std::env::temp_dir().join(format!("coupons-bench-db-{}", std::process::id()));
            let server = EmbeddedServer::start_ephemeral(&dir).map_err(|e| e.to_string())?;
            (server.url("coupons"), Some(server))
        }
    };
    let fail = |e: Error| e.to_string();
    let opts = db::opts_from_url(&url).map_err(fail)?;
    db::create_database(&opts).map_err(fail)?;
    let pool = db::pool(opts, threads as u32, db::CHECKOUT_TIMEOUT).map_err(fail)?;
    let claims = claim::Claims::new(pool.clone())
        .with_lanes(crate::server::config::claim_lanes()?)
        .with_batching(crate::server::config::claim_batch()?);
    db::migrate(&pool).map_err(fail)?;

    let auth = Auth::new(&Secret::generate().map_err(fail)?, 60, 4).map_err(fail)?;
    let tag = format!("{}", std::process::id());
    let password = Password::parse("bench-password").map_err(fail)?;
    let users: Vec<UserId> = (0..threads)
        .map(|i| {
            let email = Email::parse(&format!("bench{tag}-{i}@example.com"))?;
            Ok(auth.register(&pool, &email, &password)?.id)
        })
        .collect::<Result<_, Error>>()
        .map_err(fail)?;
    let coupons: Vec<CouponId> = (0..count)
        .map(|i| {
            let new = NewCoupon {
                code: CouponCode::parse(&format!("BENCH{tag}-{i}"))?,
                available_count: Stock::parse(Stock::MAX)?,
                status: Status::Active,
                rules: coupon::Rules::default(),
            };
            Ok(coupon::create(&pool, UserId(0), &new)?.id)
        })
        .collect::<Result<_, Error>>()
        .map_err(fail)?;

    let started = Instant::now();
    let deadline = started + duration;
    let record = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (claims, users, coupons) = (&claims, &users, &coupons);
                s.spawn(move || {
                    let mut record = Record::default();
                    let mut rng = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    while Instant::now() < deadline {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let c = coupons[rng as usize % coupons.len()];
                        let t = Instant::now();
                        let status = match claims.claim(users[i], c) {
                            Ok(_) => 201,
                            Err(Error::SoldOut | Error::Inactive) => 409,
                            Err(Error::Busy | Error::Unavailable(_)) => 503,
                            Err(_) => 500,
                        };
                        record.add(status, status == 201, t.elapsed(), started.elapsed());
                    }
                    record
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .fold(Record::default(), Record::merge)
    });
    let mut summary = record.summary(started.elapsed());
    summary["scenario"] = json!(if spread { "spread" } else { "hot" });
    summary["threads"] = json!(threads);
    let claim_stats = claims.stats();
    summary["claim_batch"] = json!(crate::server::config::claim_batch()?);
    summary["claims_combined"] = json!(claim_stats.combined);
    summary["claim_batches"] = json!(claim_stats.batches);
    let ok = summary["errors"] == 0;
    summary["invariant_ok"] = json!(ok);
    stats::print_human(
        &format!("bench-db {}, {threads} threads", summary["scenario"]),
        &summary,
    );
    if as_json {
        summary
            .as_object_mut()
            .map(|m| m.remove("latencies_ms_histogram"));
        println!("{summary}");
    }
    Ok(ok)
}

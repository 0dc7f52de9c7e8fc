//! Prometheus metrics, kept in this process: requests by route and status, a latency
//! histogram by route, claims by outcome, and the pool's numbers.

use coupons::claim::ClaimStats;
use coupons::db::PoolStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(&'static str, u16), u64>,
    latency: BTreeMap<&'static str, Histogram>,
    claims: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// One answered request.
    pub fn request(&self, route: &'static str, status: u16, secs: f64) {
        self.with(|m| {
            *m.requests.entry((route, status)).or_default() += 1;
            let h = m.latency.entry(route).or_default();
            for (i, upper) in BUCKETS.iter().enumerate() {
                if secs <= *upper {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        })
    }

    /// One claim's outcome: `claimed` or the error code it got.
    pub fn claim(&self, outcome: &str) {
        self.with(|m| match m.claims.get_mut(outcome) {
            Some(n) => *n += 1,
            None => {
                m.claims.insert(outcome.to_owned(), 1);
            }
        })
    }

    /// The Prometheus text format.
    pub fn render(&self, pool: PoolStats, claims: ClaimStats) -> String {
        let mut out = String::new();
        self.with(|m| {
            out += "# HELP coupons_http_requests_total HTTP requests answered by a handler, by route and status (not the 503s of a full queue or a stop).\n";
            out += "# TYPE coupons_http_requests_total counter\n";
            for ((route, status), n) in &m.requests {
                let _ = writeln!(out, "coupons_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
            out += "# HELP coupons_http_request_duration_seconds Seconds from a thread taking a request to its answer being ready (not the time queued or sending), by route.\n";
            out += "# TYPE coupons_http_request_duration_seconds histogram\n";
            for (route, h) in &m.latency {
                for (upper, n) in BUCKETS.iter().zip(h.counts) {
                    let _ = writeln!(out, "coupons_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{upper}\"}} {n}");
                }
                let _ = writeln!(out, "coupons_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "coupons_http_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
                let _ = writeln!(out, "coupons_http_request_duration_seconds_count{{route=\"{route}\"}} {}", h.count);
            }
            out += "# HELP coupons_claims_total Claim requests run or replayed (past authentication and the id and key checks), by outcome: claimed or the error code.\n";
            out += "# TYPE coupons_claims_total counter\n";
            for (outcome, n) in &m.claims {
                let _ = writeln!(out, "coupons_claims_total{{outcome=\"{outcome}\"}} {n}");
            }
        });
        let gauges = [
            (
                "coupons_db_connections_in_use",
                "Database connections lent out.",
                pool.in_use as u64,
            ),
            (
                "coupons_db_connections_idle",
                "Database connections open and idle.",
                pool.idle as u64,
            ),
            (
                "coupons_db_connections_waiting",
                "Threads waiting now for a database connection (at most DB_POOL_WAIT_MS each).",
                pool.waiting,
            ),
            (
                "coupons_claims_queued",
                "Claims queued now behind the claim transaction in flight of their lane (or of their coupon).",
                claims.queued,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        }
        let counters = [
            (
                "coupons_db_errors_total",
                "Database operations that failed: no connection in time, the server unreachable, or a statement failed (conflicts that were retried included).",
                pool.errors,
            ),
            (
                "coupons_db_retries_total",
                "Transaction attempts failed on a deadlock, lock-wait timeout, Galera conflict or Galera node not ready; each retried while attempts and time are left.",
                pool.retries,
            ),
            (
                "coupons_claims_combined_total",
                "Claims put in a batch with other claims of their lane (or of their coupon), run as one transaction.",
                claims.combined,
            ),
            (
                "coupons_claim_batches_total",
                "Batches of two or more claims, each run as one transaction (its retries not counted).",
                claims.batches,
            ),
        ];
        for (name, help, v) in counters {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        }
        out
    }
}

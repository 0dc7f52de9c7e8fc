//! Brute-force limits: failed logins per email and per client address, registrations per
//! client address. Token buckets in this process's memory (each service process keeps its
//! own). A request past a limit gets 429 with `Retry-After`, before any bcrypt work.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// One limit: `per_minute` events, refilled evenly; 0 turns it off.
pub struct Limit {
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Entries kept before full buckets are swept out.
const SWEEP_AT: usize = 100_000;

impl Limit {
    pub fn new(per_minute: u32) -> Limit {
        Limit {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let cap = f64::from(self.per_minute);
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * cap / 60.0).min(cap);
        b.at = now;
    }

    /// `Err(seconds)` to wait when `key` has no event left; nothing is taken.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = buckets.get_mut(key) else {
            return Ok(());
        };
        self.refill(b, now);
        if b.tokens >= 1.0 {
            Ok(())
        } else {
            Err(((1.0 - b.tokens) * 60.0 / f64::from(self.per_minute))
                .ceil()
                .max(1.0) as u64)
        }
    }

    /// Counts one event for `key`.
    pub fn take(&self, key: &str) {
        if self.per_minute == 0 {
            return;
        }
        let now = Instant::now();
        let cap = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, b| {
                let full = b.tokens + now.duration_since(b.at).as_secs_f64() * cap / 60.0 >= cap;
                !full
            });
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

/// The limits of one service, and which proxies' `X-Forwarded-For` to believe.
pub struct Limits {
    pub login_fails_per_email: Limit,
    pub login_fails_per_ip: Limit,
    pub registrations_per_ip: Limit,
    pub trusted_proxies: Vec<IpAddr>,
}

impl Limits {
    /// The client's address: the peer's, or, when the peer is a trusted proxy, the nearest
    /// address in `X-Forwarded-For` that is not one of ours.
    pub fn client(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> String {
        let Some(peer) = peer else {
            return "unknown".into();
        };
        if !self.trusted_proxies.contains(&peer) {
            return peer.to_string();
        }
        let hops = forwarded_for.unwrap_or("").split(',').rev();
        let client = hops
            .filter_map(|h| h.trim().parse::<IpAddr>().ok())
            .find(|ip| !self.trusted_proxies.contains(ip));
        client.unwrap_or(peer).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_empties_and_says_how_long_to_wait() {
        let l = Limit::new(3);
        for _ in 0..3 {
            assert!(l.check("a").is_ok());
            l.take("a");
        }
        let wait = l.check("a").unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(l.check("b").is_ok());
        let off = Limit::new(0);
        for _ in 0..100 {
            off.take("a");
        }
        assert!(off.check("a").is_ok());
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let limits = Limits {
            login_fails_per_email: Limit::new(1),
            login_fails_per_ip: Limit::new(1),
            registrations_per_ip: Limit::new(1),
            trusted_proxies: vec!["10.0.0.1".parse().unwrap()],
        };
        let proxy = Some("10.0.0.1".parse().unwrap());
        let stranger = Some("203.0.113.9".parse().unwrap());
        assert_eq!(
            limits.client(proxy, Some("198.51.100.7, 10.0.0.1")),
            "198.51.100.7"
        );
        assert_eq!(
            limits.client(proxy, Some("1.2.3.4, 198.51.100.7")),
            "198.51.100.7"
        );
        assert_eq!(limits.client(proxy, None), "10.0.0.1");
        assert_eq!(limits.client(stranger, Some("198.51.100.7")), "203.0.113.9");
    }
}

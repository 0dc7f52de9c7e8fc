//! Limits: failed logins per email and per client address, registrations per client address
//! (brute force), and keyed requests per user (each writes an idempotency key row, kept 24
//! hours). Token buckets in this process's memory (each service process keeps its own). A
//! request past a limit gets 429 with `Retry-After`, before any bcrypt or database work.

use coupons::UserId;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// One limit: `per_minute` events per key (an email, an address, a user), refilled evenly; 0
/// turns it off.
pub struct Limit<K = String> {
    per_minute: u32,
    buckets: Mutex<HashMap<K, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Entries kept before full buckets are swept out.
const SWEEP_AT: usize = 20_000;

impl<K: Hash + Eq> Limit<K> {
    pub fn new(per_minute: u32) -> Limit<K> {
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

    /// Takes one event for `key` now, or `Err(seconds)` to wait when none is left. Taking
    /// before the work (not after) means parallel attempts cannot share the last event.
    pub fn take<Q>(&self, key: &Q) -> Result<(), u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if self.per_minute == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let cap = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= SWEEP_AT {
            // Full buckets carry no information: dropping them frees the memory of past keys.
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * cap / 60.0 < cap
            });
            if buckets.len() >= SWEEP_AT {
                // Still full of live keys (a flood): forget the oldest half rather than grow.
                let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
                ages.sort();
                let cutoff = ages[ages.len() / 2];
                buckets.retain(|_, b| b.at > cutoff);
            }
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) * 60.0 / cap).ceil().max(1.0) as u64)
        }
    }

    /// Gives back an event taken for work that turned out not to count (a good password).
    pub fn refund<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let cap = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(cap);
        }
    }
}

/// The limits of one service, and which proxies' `X-Forwarded-For` to believe.
pub struct Limits {
    pub login_fails_per_email: Limit,
    pub login_fails_per_ip: Limit,
    pub registrations_per_ip: Limit,
    /// Claims and admin creates with an `Idempotency-Key`, by user: each writes a key row.
    pub keyed_per_user: Limit<UserId>,
    pub trusted_proxies: Vec<IpAddr>,
}

impl Limits {
    /// The client's address: the peer's, or, when the peer is a trusted proxy, the nearest
    /// address in `X-Forwarded-For` that is not one of ours.
    pub fn client(&self, peer: Option<IpAddr>, forwarded_for: &[&str]) -> String {
        let Some(peer) = peer else {
            return "unknown".into();
        };
        if !self.trusted_proxies.contains(&peer) {
            return bucket(peer);
        }
        // Every header line, in order: a proxy may add a line rather than extend the last.
        let hops: Vec<&str> = forwarded_for.iter().flat_map(|l| l.split(',')).collect();
        let client = hops
            .iter()
            .rev()
            .filter_map(|h| h.trim().parse::<IpAddr>().ok())
            .find(|ip| !self.trusted_proxies.contains(ip));
        bucket(client.unwrap_or(peer))
    }
}

/// The key of an address: IPv4 as it is, IPv6 by its /64 (one client usually holds a whole /64).
fn bucket(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_empties_and_says_how_long_to_wait() {
        let l = Limit::new(3);
        for _ in 0..3 {
            assert!(l.take("a").is_ok());
        }
        let wait = l.take("a").unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        l.refund("a");
        assert!(l.take("a").is_ok());
        assert!(l.take("b").is_ok());
        let per_user: Limit<UserId> = Limit::new(1);
        assert!(per_user.take(&UserId(1)).is_ok());
        assert!(per_user.take(&UserId(1)).is_err());
        assert!(per_user.take(&UserId(2)).is_ok());
        let off: Limit = Limit::new(0);
        for _ in 0..100 {
            assert!(off.take("a").is_ok());
        }
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let limits = Limits {
            login_fails_per_email: Limit::new(1),
            login_fails_per_ip: Limit::new(1),
            registrations_per_ip: Limit::new(1),
            keyed_per_user: Limit::new(1),
            trusted_proxies: vec!["10.0.0.1".parse().unwrap()],
        };
        let proxy = Some("10.0.0.1".parse().unwrap());
        let stranger = Some("203.0.113.9".parse().unwrap());
        assert_eq!(
            limits.client(proxy, &["198.51.100.7, 10.0.0.1"]),
            "198.51.100.7"
        );
        assert_eq!(
            limits.client(proxy, &["1.2.3.4, 198.51.100.7"]),
            "198.51.100.7"
        );
        // A forged first line does not win over the proxy's own, added as a second line.
        assert_eq!(
            limits.client(proxy, &["6.6.6.6", "198.51.100.7"]),
            "198.51.100.7"
        );
        assert_eq!(limits.client(proxy, &[]), "10.0.0.1");
        assert_eq!(limits.client(stranger, &["198.51.100.7"]), "203.0.113.9");
        let v6 = Some("2001:db8:1:2:3:4:5:6".parse().unwrap());
        assert_eq!(limits.client(v6, &[]), "2001:db8:1:2::/64");
    }

    #[test]
    fn parallel_takes_cannot_share_the_last_event() {
        let l = std::sync::Arc::new(Limit::new(5));
        let granted: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..50)
                .map(|_| s.spawn(|| l.take("x").is_ok() as usize))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(granted, 5);
    }
}

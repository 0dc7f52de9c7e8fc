//! Limits: failed logins per email and per client address, registrations per client address
//! (brute force), and keyed requests per user (each writes an idempotency key row, kept 24
//! hours). Token buckets in this process's memory (each service process keeps its own). A
//! request past a limit gets 429 with `Retry-After`, before any bcrypt or database work. And
//! each client's share of the server ([`Shares`]): a cap on its requests in the server at once.

use coupons::UserId;
use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
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
    /// address in `X-Forwarded-For` (every header line, in order) that is not one of ours. An
    /// IPv6 one by its /64 (one client usually holds a whole /64), an IPv4-mapped one as IPv4.
    pub fn client_ip<'a>(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> Option<IpAddr> {
        let peer = peer?.to_canonical();
        if !self.trusted_proxies.contains(&peer) {
            return Some(prefix(peer));
        }
        // Every header line: a proxy may add a line rather than extend the last.
        let hops: Vec<&str> = forwarded_for.flat_map(|l| l.split(',')).collect();
        let client = hops
            .iter()
            .rev()
            .filter_map(|h| h.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .find(|ip| !self.trusted_proxies.contains(ip));
        Some(prefix(client.unwrap_or(peer)))
    }
}

/// IPv4 as it is, IPv6 cut to its /64.
fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

/// A client's key in the limits' buckets: IPv4 as it is, IPv6 as its /64.
pub fn key(client: Option<IpAddr>) -> String {
    match client {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        None => "unknown".into(),
    }
}

/// Each client's share of the server: at most `cap` of its requests in the server at once
/// (queued for or running on a worker or a bcrypt thread, or a claim waiting for its batch).
/// Past it, the connection's thread waits for one of them to be answered, reading nothing more
/// from that connection; waiting requests of one client are let in first come, first served.
/// Clients on loopback are not counted (see [`Shares::admit`]).
pub struct Shares {
    cap: usize,
    clients: Mutex<HashMap<IpAddr, Share>>,
}

#[derive(Default)]
struct Share {
    in_server: usize,
    waiting: VecDeque<Arc<Waiter>>,
}

struct Waiter {
    admitted: AtomicBool,
    thread: Thread,
}

/// One request's place in its client's share, given back when dropped.
pub struct Slot {
    shares: Arc<Shares>,
    client: IpAddr,
}

impl Shares {
    /// `cap` requests in the server per client; 0: no cap.
    pub fn new(cap: usize) -> Arc<Shares> {
        Arc::new(Shares {
            cap,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more request of `client`, once it has fewer than the cap in the server
    /// (this thread waits till then); `None` when it is not counted. Loopback clients are not:
    /// they share this host (a load generator, a proxy whose clients only `TRUSTED_PROXIES`
    /// tells apart) and could take its CPU anyway.
    pub fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Option<Slot> {
        let client = client.filter(|ip| self.cap > 0 && !ip.is_loopback())?;
        let slot = Slot {
            shares: Arc::clone(self),
            client,
        };
        let mut clients = self.lock();
        let share = clients.entry(client).or_default();
        if share.in_server < self.cap {
            share.in_server += 1;
            return Some(slot);
        }
        let me = Arc::new(Waiter {
            admitted: AtomicBool::new(false),
            thread: std::thread::current(),
        });
        share.waiting.push_back(Arc::clone(&me));
        drop(clients);
        // A place given back is handed to the first waiter directly (see `Slot`'s drop).
        while !me.admitted.load(Ordering::Acquire) {
            std::thread::park();
        }
        Some(slot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Share>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut clients = self.shares.lock();
        let Some(share) = clients.get_mut(&self.client) else {
            return;
        };
        if let Some(next) = share.waiting.pop_front() {
            next.admitted.store(true, Ordering::Release);
            next.thread.unpark();
        } else {
            share.in_server -= 1;
            if share.in_server == 0 {
                clients.remove(&self.client);
            }
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
        let client = |peer: Option<IpAddr>, lines: &[&str]| {
            key(limits.client_ip(peer, lines.iter().copied()))
        };
        let proxy = Some("10.0.0.1".parse().unwrap());
        let stranger = Some("203.0.113.9".parse().unwrap());
        assert_eq!(client(proxy, &["198.51.100.7, 10.0.0.1"]), "198.51.100.7");
        assert_eq!(client(proxy, &["1.2.3.4, 198.51.100.7"]), "198.51.100.7");
        // A forged first line does not win over the proxy's own, added as a second line.
        assert_eq!(client(proxy, &["6.6.6.6", "198.51.100.7"]), "198.51.100.7");
        assert_eq!(client(proxy, &[]), "10.0.0.1");
        assert_eq!(client(stranger, &["198.51.100.7"]), "203.0.113.9");
        let v6 = Some("2001:db8:1:2:3:4:5:6".parse().unwrap());
        assert_eq!(client(v6, &[]), "2001:db8:1:2::/64");
        // A dual-stack listener sees IPv4 peers so: they are not one /64 between them.
        let mapped = Some("::ffff:203.0.113.9".parse().unwrap());
        assert_eq!(client(mapped, &[]), "203.0.113.9");
        let proxy = Some("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(client(proxy, &["198.51.100.7"]), "198.51.100.7");
    }

    #[test]
    fn a_client_past_its_share_waits_its_turn() {
        let shares = Shares::new(2);
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        let (a, b) = (Some(ip), Some("203.0.113.2".parse().unwrap()));
        let first = shares.admit(a).unwrap();
        let _second = shares.admit(a).unwrap();
        // Another client, and loopback ones, are not held up.
        let _other = shares.admit(b).unwrap();
        let local = ["127.0.0.1", "127.0.0.2", "::1"].map(|ip| Some(ip.parse().unwrap()));
        assert!((0..10).all(|i| shares.admit(local[i % 3]).is_none()));
        // The third and fourth of `a` wait, and are let in in their order.
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for n in [3, 4] {
                let (shares, order) = (&shares, &order);
                s.spawn(move || {
                    let slot = shares.admit(a);
                    order.lock().unwrap().push(n);
                    drop(slot);
                });
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            assert!(order.lock().unwrap().is_empty(), "admitted past the cap");
            drop(first);
        });
        assert_eq!(*order.lock().unwrap(), [3, 4]);
        assert_eq!(shares.lock()[&ip].in_server, 1);
        assert!(Shares::new(0).admit(a).is_none());
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

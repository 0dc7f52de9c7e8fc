//! Webhooks: the event feed ([`crate::events`]) pushed to the shop's endpoints. Each delivery is
//! a `POST` of the event's JSON with `Coupons-Event-Id` and `Coupons-Signature: t=<unix
//! seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (Stripe's scheme), keyed with the endpoint's
//! secret. A 2xx within 10 s is success; anything else is retried after 5 s (by default), then
//! after twice as long each time (at most an hour apart), until a 2xx or 24 hours of failures,
//! when the event is given up (recorded) and the next one goes. One event at a time per
//! endpoint, in feed order, at least once: receivers deduplicate by event id.
//!
//! The delivery state is in the database (the endpoint's cursor, attempts and next attempt), so
//! a restart or a killed process loses nothing. A [`Deliverer`] in each process leases due
//! endpoints (`FOR UPDATE SKIP LOCKED`, then `leased_until`), so one process delivers an
//! endpoint at a time and a killed process's lease runs out; each leased endpoint is delivered
//! on a thread of its own, holding a connection only between HTTP calls, so a slow or dead
//! receiver holds up nothing but its own deliveries.

use crate::db::{transaction, with_conn, Pool};
use crate::events::{self, EventType};
use crate::random::{hex, Random};
use crate::ticker::Ticker;
use crate::{Error, Label, Page, Timestamp};
use hmac::{Hmac, Mac};
use mysql::prelude::Queryable;
use serde::Serialize;
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a receiver has to answer.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lease lasts: longer than one delivery, renewed after each.
const LEASE: Duration = Duration::from_secs(15);
/// Failures of one event are retried this long, then it is given up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The longest wait between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Endpoints delivered at once by one process, each on its own thread.
const MAX_IN_FLIGHT: usize = 32;
/// The longest URL taken.
const MAX_URL: usize = 2048;

/// Where webhooks may go, and how soon a failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Let URLs name private, loopback and link-local addresses (tests, a private network).
    pub allow_private: bool,
    /// The wait before the first retry; each later one waits twice the one before.
    pub first_retry: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            allow_private: false,
            first_retry: Duration::from_secs(5),
        }
    }
}

/// A webhook endpoint as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Webhook {
    /// Its id.
    pub id: u64,
    /// Where events are posted.
    pub url: String,
    /// The event types it gets, or `["*"]` for all.
    pub events: Vec<String>,
    /// What it is for.
    pub description: Option<String>,
    /// When it was made.
    pub created_at: Timestamp,
}

/// A webhook just made: the only time its secret is shown.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Created {
    /// The endpoint.
    #[serde(flatten)]
    pub webhook: Webhook,
    /// `whsec_` and 64 hex digits (32 random bytes): the key of its signatures.
    pub secret: String,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("webhook", &self.webhook)
            .field("secret", &"[hidden]")
            .finish()
    }
}

/// A new webhook: URL, event types (`*` for all) and description, parsed.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    url: url::Url,
    events: Vec<String>,
    description: Option<Label>,
}

impl NewWebhook {
    /// Parses a webhook: an `http` or `https` URL with a host, up to 2,048 characters; 1 to
    /// 20 event types ([`events::TYPES`]) or `*`. Errors: [`Error::Invalid`] on `url`,
    /// `events`. The address check is [`create`]'s.
    pub fn parse(
        url: &str,
        events: &[String],
        description: Option<Label>,
    ) -> Result<NewWebhook, Error> {
        let bad_url = |why: &str| Error::invalid("url", why.to_owned());
        if url.len() > MAX_URL {
            return Err(bad_url("is longer than 2048 characters"));
        }
        let parsed = url::Url::parse(url).map_err(|_| bad_url("is not a URL"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad_url("must be http or https"));
        }
        if parsed.host().is_none() {
            return Err(bad_url("has no host"));
        }
        // What is stored is the normalised URL: percent-encoding and punycode can make it
        // several times longer than what was sent.
        if parsed.as_str().len() > MAX_URL {
            return Err(bad_url("is longer than 2048 characters once normalised"));
        }
        if events.is_empty() || events.len() > 20 {
            return Err(Error::invalid("events", "must list 1 to 20 event types"));
        }
        let mut kinds: Vec<String> = Vec::new();
        for e in events {
            let kind = match e.as_str() {
                "*" => "*",
                other => EventType::parse("events", other)?.as_str(),
            };
            if !kinds.iter().any(|k| k == kind) {
                kinds.push(kind.to_owned());
            }
        }
        if kinds.iter().any(|k| k == "*") {
            kinds = vec!["*".to_owned()];
        }
        Ok(NewWebhook {
            url: parsed,
            events: kinds,
            description,
        })
    }
}

/// Whether a delivery may go to `ip`: not private, loopback, link-local, unspecified,
/// multicast, broadcast, shared (CGNAT), reserved or documentation space, nor an IPv6 form of
/// one (IPv4-mapped, -compatible or NAT64), unless `policy` allows private addresses.
pub fn address_allowed(ip: IpAddr, policy: Policy) -> bool {
    policy.allow_private || public(ip)
}

fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public_v4(v4);
            }
            let s = v6.segments();
            let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            // NAT64 (64:ff9b::/96) and IPv4-translated (::ffff:0:0/96) reach the IPv4 address
            // they embed.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..6] == [0, 0, 0, 0, 0xffff, 0] {
                return public_v4(v4);
            }
            // ::/96: unspecified, loopback and the deprecated IPv4-compatible form.
            if s[..6] == [0; 6] {
                return false;
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local NAT64 64:ff9b:1::/48
                || s[0] == 0x2002 // 6to4: reaches an IPv4 address of any kind
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

/// The addresses `host:port` resolves to that a delivery may use; an error when none.
fn resolve(netloc: &str, policy: Policy) -> std::io::Result<Vec<SocketAddr>> {
    let all: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
    let allowed: Vec<SocketAddr> = all
        .into_iter()
        .filter(|a| address_allowed(a.ip(), policy))
        .collect();
    if allowed.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the address is not allowed for webhooks",
        ));
    }
    Ok(allowed)
}

/// Makes a webhook. Its host is resolved now and refused ([`Error::WebhookUrlNotAllowed`]) if
/// any of its addresses is not allowed ([`address_allowed`]); each delivery checks again
/// (DNS may change). It gets the events that commit from now on.
pub fn create(pool: &Pool, new: &NewWebhook, policy: Policy) -> Result<Created, Error> {
    let host = new.url.host_str().unwrap_or_default();
    let port = new.url.port_or_known_default().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|_| Error::invalid("url", "has a host that does not resolve"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !address_allowed(a.ip(), policy)) {
        return Err(Error::WebhookUrlNotAllowed);
    }
    let mut random = Random::new()?;
    let bytes = random.bytes::<32>()?;
    let secret = format!("whsec_{}", hex(&bytes));
    let now = Timestamp::now();
    let events_json =
        serde_json::to_string(&new.events).map_err(|e| Error::Internal(e.to_string()))?;
    let description = new.description.as_ref().map(|d| d.as_str().to_owned());
    // Numbers what has committed, so that the new endpoint starts after it.
    events::sequence(pool)?;
    let id = transaction(pool, |tx| {
        let last = events::last_id(tx)?;
        tx.exec_drop(
            "INSERT INTO webhooks (url, events, description, secret, created_at, delivered_seq,
                 next_attempt_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                new.url.as_str(),
                &events_json,
                &description,
                &secret,
                now,
                last,
                now,
            ),
        )?;
        tx.last_insert_id()
            .ok_or(Error::Internal("no id for the webhook".into()))
    })?;
    Ok(Created {
        webhook: Webhook {
            id,
            url: new.url.as_str().to_owned(),
            events: new.events.clone(),
            description,
            created_at: now,
        },
        secret,
    })
}

/// The webhooks, oldest first, without their secrets.
pub fn list(pool: &Pool, page: Page) -> Result<Vec<Webhook>, Error> {
    with_conn(pool, |conn| {
        type Row = (u64, String, String, Option<String>, Timestamp);
        let rows: Vec<Row> = conn.exec(
            "SELECT id, url, events, description, created_at FROM webhooks
             WHERE deleted_at IS NULL AND id > ? ORDER BY id LIMIT ?",
            (page.after.unwrap_or(0), page.limit),
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, url, events, description, created_at)| Webhook {
                id,
                url,
                events: serde_json::from_str(&events).unwrap_or_default(),
                description,
                created_at,
            })
            .collect())
    })
}

/// Deletes a webhook: nothing more is delivered to it. [`Error::WebhookNotFound`] if none.
pub fn delete(pool: &Pool, id: u64) -> Result<(), Error> {
    with_conn(pool, |conn| {
        conn.exec_drop(
            "UPDATE webhooks SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL",
            (Timestamp::now(), id),
        )?;
        match conn.affected_rows() {
            0 => Err(Error::WebhookNotFound),
            _ => Ok(()),
        }
    })
}

/// One attempt at a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// The attempt's id.
    pub id: u64,
    /// The event's feed id.
    pub event_id: u64,
    /// The event's type.
    pub event_type: String,
    /// When it was tried.
    pub attempted_at: Timestamp,
    /// The receiver's status; `None` when none came (`error` says why).
    pub status_code: Option<u16>,
    /// Why it failed without a status (a timeout, a refused connection, a refused address).
    pub error: Option<String>,
    /// `delivered`, `failed` (retried at `next_attempt_at`) or `gave_up` (after 24 hours).
    pub outcome: String,
    /// When it is tried again, after a failure.
    pub next_attempt_at: Option<Timestamp>,
}

/// A webhook's delivery attempts, newest first. [`Error::WebhookNotFound`] if none.
pub fn deliveries(pool: &Pool, id: u64, page: Page) -> Result<Vec<Delivery>, Error> {
    with_conn(pool, |conn| {
        let found: Option<u64> = conn.exec_first(
            "SELECT id FROM webhooks WHERE id = ? AND deleted_at IS NULL",
            (id,),
        )?;
        found.ok_or(Error::WebhookNotFound)?;
        type Row = (
            u64,
            u64,
            String,
            Timestamp,
            Option<u16>,
            Option<String>,
            String,
            Option<Timestamp>,
        );
        let rows: Vec<Row> = conn.exec(
            "SELECT id, event_id, event_type, attempted_at, status_code, error, outcome,
                 next_attempt_at
             FROM webhook_deliveries WHERE webhook_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (id, page.after.unwrap_or(u64::MAX), page.limit),
        )?;
        Ok(rows
            .into_iter()
            .map(
                |(id, event_id, event_type, attempted_at, status_code, error, outcome, next)| {
                    Delivery {
                        id,
                        event_id,
                        event_type,
                        attempted_at,
                        status_code,
                        error,
                        outcome,
                        next_attempt_at: next,
                    }
                },
            )
            .collect())
    })
}

/// `Coupons-Signature` for `body` sent at `t` (unix seconds): `t=<t>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>" keyed with the secret>`.
pub fn signature(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex(&mac.finalize().into_bytes()))
}

/// The wait after the `attempts`-th failure in a row: `first`, then twice as long each time,
/// at most an hour.
fn delay(first: Duration, attempts: u32) -> Duration {
    first
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(MAX_DELAY)
}

/// A thread that delivers the due webhooks of `pool` (see the module's doc), until dropped.
/// Any number of processes may run one over the same database.
pub struct Deliverer {
    // Held for its Drop, which stops the thread.
    _ticker: Ticker,
}

impl Deliverer {
    /// Starts delivering every `every`; errors (the database away) are retried at the next
    /// turn, and `log` hears of them (never of a secret).
    pub fn start(
        pool: Pool,
        policy: Policy,
        every: Duration,
        log: impl Fn(&Error) + Send + Sync + 'static,
    ) -> Result<Deliverer, Error> {
        let agent = ureq::AgentBuilder::new()
            .timeout(DELIVERY_TIMEOUT)
            .redirects(0)
            .user_agent("coupons-webhooks/1")
            // Every delivery resolves afresh and goes only to an allowed address (DNS rebinding).
            .resolver(move |netloc: &str| resolve(netloc, policy))
            .build();
        let log = Arc::new(log);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let turn = move |stopping: &Arc<AtomicBool>| {
            let free = MAX_IN_FLIGHT.saturating_sub(in_flight.load(Ordering::SeqCst));
            let leased = match lease(&pool, free) {
                Ok(leased) => leased,
                Err(e) => {
                    log(&e);
                    return false;
                }
            };
            for (id, token) in leased {
                let slot = Slot::take(&in_flight);
                let (pool, agent, log) = (pool.clone(), agent.clone(), Arc::clone(&log));
                let stop = Arc::clone(stopping);
                // If the thread cannot start, its slot is given back here and the lease runs
                // out for another turn to take.
                let _ = std::thread::Builder::new()
                    .name("webhook-delivery".into())
                    .spawn(move || {
                        let _slot = slot;
                        let run = Run {
                            pool: &pool,
                            agent: &agent,
                            policy,
                            id,
                            token,
                        };
                        if let Err(e) = run.deliver(&stop) {
                            log(&e);
                        }
                    });
            }
            false
        };
        Ok(Deliverer {
            _ticker: Ticker::start("webhook-leases", every, turn)?,
        })
    }
}

/// A delivery thread's place among [`MAX_IN_FLIGHT`], given back when dropped: when the thread
/// ends, by a panic too.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(in_flight: &Arc<AtomicUsize>) -> Slot {
        in_flight.fetch_add(1, Ordering::SeqCst);
        Slot(Arc::clone(in_flight))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Leases up to `max` due endpoints that have events to deliver, each with a token of its own;
/// endpoints another process is leasing now are skipped, not waited for.
fn lease(pool: &Pool, max: usize) -> Result<Vec<(u64, u64)>, Error> {
    if max == 0 {
        return Ok(Vec::new());
    }
    // Read first, apart: the lease's locking read must not lock the sequencer's row.
    let last = with_conn(pool, |conn| events::last_id(&mut **conn))?;
    transaction(pool, |tx| {
        let now = Timestamp::now();
        let due: Vec<u64> = tx.exec(
            "SELECT id FROM webhooks
             WHERE next_attempt_at <= ? AND deleted_at IS NULL AND delivered_seq < ?
               AND (leased_until IS NULL OR leased_until <= ?)
             ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED",
            (now, last, now, max as u64),
        )?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut random = Random::new()?;
        let mut leased = Vec::with_capacity(due.len());
        for id in due {
            let token = u64::from_le_bytes(random.bytes::<8>()?);
            tx.exec_drop(
                "UPDATE webhooks SET lease = ?, leased_until = ? WHERE id = ?",
                (token, now.plus(LEASE), id),
            )?;
            leased.push((id, token));
        }
        Ok(leased)
    })
}

/// One leased endpoint's deliveries.
struct Run<'a> {
    pool: &'a Pool,
    agent: &'a ureq::Agent,
    policy: Policy,
    id: u64,
    token: u64,
}

/// What the endpoint's row says, read under the lease.
struct Endpoint {
    url: String,
    events: Vec<String>,
    secret: String,
    delivered_seq: u64,
    attempts: u32,
    failing_since: Option<Timestamp>,
}

impl Run<'_> {
    /// Delivers the endpoint's events in order until none is left or one fails (then the next
    /// attempt is set), renewing the lease after each; stops early if the lease was lost.
    fn deliver(&self, stopping: &AtomicBool) -> Result<(), Error> {
        loop {
            let Some(e) = self.endpoint()? else {
                return Ok(());
            };
            let last = with_conn(self.pool, |conn| events::last_id(&mut **conn))?;
            let pending = self.next_events(&e, last)?;
            if pending.is_empty() {
                // Nothing it subscribed to up to `last`: done up to there.
                return self.finish(last, Timestamp::now());
            }
            let mut e = e;
            for event in pending {
                if stopping.load(Ordering::Relaxed) {
                    return self.finish(e.delivered_seq, Timestamp::now());
                }
                // A lease that ran out (a slow receiver before) or a deleted endpoint: stop.
                if !self.renew()? {
                    return Ok(());
                }
                if !self.send(&e, &event)? {
                    return Ok(());
                }
                (e.delivered_seq, e.attempts, e.failing_since) = (event.id, 0, None);
            }
        }
    }

    /// One attempt at delivering `event`, recorded; `true` when it was delivered (or given up)
    /// and this run still holds the lease, so the next event may go.
    fn send(&self, e: &Endpoint, event: &events::Event) -> Result<bool, Error> {
        let body = serde_json::to_string(event).map_err(|e| Error::Internal(e.to_string()))?;
        let now = Timestamp::now();
        let sent = self
            .agent
            .post(&e.url)
            .set("Content-Type", "application/json")
            .set("Coupons-Event-Id", &event.id.to_string())
            .set(
                "Coupons-Signature",
                &signature(&e.secret, now.unix_secs(), &body),
            )
            .send_string(&body);
        let (status, error) = match sent {
            Ok(r) => (Some(r.status()), None),
            Err(ureq::Error::Status(code, _)) => (Some(code), None),
            Err(ureq::Error::Transport(t)) => (None, Some(transport_error(&t))),
        };
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        self.record(e, event, now, status, error, ok)
    }

    /// Extends this run's lease to a whole [`LEASE`] from now, so that the delivery about to
    /// start (at most [`DELIVERY_TIMEOUT`]) ends inside it; `false` when the lease has run out
    /// (another process may hold it now) or the endpoint was deleted.
    fn renew(&self) -> Result<bool, Error> {
        let now = Timestamp::now();
        with_conn(self.pool, |conn| {
            conn.exec_drop(
                "UPDATE webhooks SET leased_until = ?
                 WHERE id = ? AND lease = ? AND deleted_at IS NULL AND leased_until > ?",
                (now.plus(LEASE), self.id, self.token, now),
            )?;
            Ok(conn.affected_rows() == 1)
        })
    }

    /// The endpoint, if this run still holds its lease and it is not deleted.
    fn endpoint(&self) -> Result<Option<Endpoint>, Error> {
        with_conn(self.pool, |conn| {
            type Row = (String, String, String, u64, u32, Option<Timestamp>);
            let row: Option<Row> = conn.exec_first(
                "SELECT url, events, secret, delivered_seq, attempts, failing_since FROM webhooks
                 WHERE id = ? AND lease = ? AND deleted_at IS NULL",
                (self.id, self.token),
            )?;
            Ok(row.map(
                |(url, events, secret, delivered_seq, attempts, failing_since)| Endpoint {
                    url,
                    events: serde_json::from_str(&events).unwrap_or_default(),
                    secret,
                    delivered_seq,
                    attempts,
                    failing_since,
                },
            ))
        })
    }

    /// The next events after the endpoint's cursor, up to `last`, of the types it subscribed
    /// to: a hundred at most, delivered one by one.
    fn next_events(&self, e: &Endpoint, last: u64) -> Result<Vec<events::Event>, Error> {
        let kinds: Vec<&str> = e.events.iter().map(String::as_str).collect();
        let kinds = (!kinds.contains(&"*")).then_some(kinds.as_slice());
        events::read(self.pool, e.delivered_seq, last, 100, kinds)
    }

    /// Done up to `seq`: the cursor moves there and the lease ends.
    fn finish(&self, seq: u64, now: Timestamp) -> Result<(), Error> {
        with_conn(self.pool, |conn| {
            conn.exec_drop(
                "UPDATE webhooks SET delivered_seq = GREATEST(delivered_seq, ?), lease = NULL,
                     leased_until = NULL, next_attempt_at = ?
                 WHERE id = ? AND lease = ?",
                (seq, now, self.id, self.token),
            )?;
            Ok(())
        })
    }

    /// Records an attempt and moves the endpoint on: past the event when it was delivered (or
    /// given up after 24 hours of failures), else to its next attempt, ending the lease.
    /// `true` when the endpoint moved past the event; `false` when it waits for a retry, or the
    /// lease was lost meanwhile (another process took over: nothing written).
    fn record(
        &self,
        e: &Endpoint,
        event: &events::Event,
        now: Timestamp,
        status: Option<u16>,
        error: Option<String>,
        ok: bool,
    ) -> Result<bool, Error> {
        let failing_since = e.failing_since.unwrap_or(now);
        let give_up = !ok && now >= failing_since.plus(GIVE_UP_AFTER);
        let attempts = e.attempts + 1;
        let next = (!ok && !give_up).then(|| now.plus(delay(self.policy.first_retry, attempts)));
        let outcome = match (ok, give_up) {
            (true, _) => "delivered",
            (false, true) => "gave_up",
            (false, false) => "failed",
        };
        transaction(self.pool, |tx| {
            let moved = match next {
                None => {
                    tx.exec_drop(
                        "UPDATE webhooks SET delivered_seq = ?, attempts = 0, failing_since = NULL,
                             leased_until = ?
                         WHERE id = ? AND lease = ? AND deleted_at IS NULL",
                        (event.id, now.plus(LEASE), self.id, self.token),
                    )?;
                    tx.affected_rows()
                }
                Some(at) => {
                    tx.exec_drop(
                        "UPDATE webhooks SET attempts = ?, failing_since = ?, next_attempt_at = ?,
                             lease = NULL, leased_until = NULL
                         WHERE id = ? AND lease = ? AND deleted_at IS NULL",
                        (attempts, failing_since, at, self.id, self.token),
                    )?;
                    tx.affected_rows()
                }
            };
            if moved == 0 {
                return Ok(false);
            }
            tx.exec_drop(
                "INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, attempted_at,
                     status_code, error, outcome, next_attempt_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.id,
                    event.id,
                    event.kind.as_str(),
                    now,
                    status,
                    error.as_deref(),
                    outcome,
                    next,
                ),
            )?;
            Ok(next.is_none())
        })
    }
}

/// A transport failure, for the deliveries list: its kind and message, never a secret (the
/// request's headers are not part of it).
fn transport_error(t: &ureq::Transport) -> String {
    let text = t.to_string();
    text.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused() {
        let strict = Policy::default();
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "fec0::1",
            "::ffff:0:a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
        ];
        for ip in refused {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!address_allowed(ip, strict), "{ip} allowed");
            assert!(address_allowed(
                ip,
                Policy {
                    allow_private: true,
                    ..strict
                }
            ));
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(address_allowed(ip, strict), "{ip} refused");
        }
    }

    #[test]
    fn signatures_are_stripes_scheme() {
        // HMAC-SHA256 keyed "key" of "1.body", computed with Python's hmac module.
        let s = signature("key", 1, "body");
        assert_eq!(
            s,
            "t=1,v1=91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5"
        );
        assert_ne!(signature("key", 2, "body"), s);
        assert_ne!(signature("other", 1, "body"), s);
    }

    #[test]
    fn retries_wait_longer_each_time() {
        let first = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=6).map(|n| delay(first, n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160]);
        assert_eq!(delay(first, 40), MAX_DELAY);
    }

    #[test]
    fn webhooks_parse() {
        let all = ["*".to_owned()];
        assert!(NewWebhook::parse("https://shop.example/hook", &all, None).is_ok());
        for bad in ["ftp://x/y", "not a url", "file:///etc/passwd", "http://"] {
            assert!(NewWebhook::parse(bad, &all, None).is_err(), "{bad}");
        }
        let none: [String; 0] = [];
        assert!(NewWebhook::parse("https://a.example/", &none, None).is_err());
        let bad = ["claim.eaten".to_owned()];
        assert!(NewWebhook::parse("https://a.example/", &bad, None).is_err());
        let mixed = ["claim.created".to_owned(), "*".to_owned()];
        let w = NewWebhook::parse("https://a.example/", &mixed, None).unwrap();
        assert_eq!(w.events, ["*"]);
        // Within 2,048 as sent, over it once percent-encoded (an 'é' becomes six characters).
        let long = format!("https://a.example/{}", "é".repeat(1000));
        assert!(long.len() <= MAX_URL);
        assert!(NewWebhook::parse(&long, &all, None).is_err());
    }
}

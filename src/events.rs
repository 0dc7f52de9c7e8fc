//! The event feed: every change tells the shop's other systems what happened. Each event is
//! written in the transaction of its change ([`record_many`]), so an event exists exactly when
//! its change committed; [`sequence`] then numbers committed events in commit order, so that a
//! reader asking for the events after the last id it saw never skips one. Webhooks
//! ([`crate::webhooks`]) deliver the same feed.
//!
//! Why a sequencer: auto-increment ids are taken at INSERT and commits land in another order,
//! so "after id N" would skip an event committed late with a smaller id. An event is inserted
//! with `seq` NULL; [`sequence`], under the one `event_sequence` row's lock, reads the
//! committed unsequenced events with a plain (non-locking) read, which never waits on a claim
//! in flight, and gives them the next numbers by primary key. A run that sees an event's
//! commit numbers it after every event numbered before, and readers see a run's numbers all at
//! once (one commit), so the numbers a reader sees only ever grow.

use crate::db::{padded, placeholders, transaction, with_conn, Pool};
use crate::{Error, Page, Timestamp};
use mysql::prelude::Queryable;
use mysql::Value;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Every type of event, as the feed names them.
pub const TYPES: &[&str] = &[
    "coupon.created",
    "coupon.updated",
    "coupon.deleted",
    "claim.created",
    "claim.confirmed",
    "claim.released",
    "claim.expired",
    "claim.redeemed",
    "claim.voided",
    "codes.added",
];

/// One event of the feed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Its place in the feed: rising in commit order (not the row's insert id).
    pub id: u64,
    /// One of [`TYPES`].
    #[serde(rename = "type")]
    pub kind: String,
    /// When its change was made.
    pub created_at: Timestamp,
    /// The object as the change left it: the coupon, or the claim (with its coupon id and
    /// status), or the codes added.
    pub data: serde_json::Value,
}

/// An event type named by a caller: one of [`TYPES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventType(&'static str);

impl EventType {
    /// `s` if it is one of [`TYPES`]; [`Error::Invalid`] on `field` otherwise.
    pub fn parse(field: &'static str, s: &str) -> Result<EventType, Error> {
        TYPES
            .iter()
            .find(|t| **t == s)
            .map(|t| EventType(t))
            .ok_or_else(|| Error::invalid(field, "is not an event type"))
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// An event to write: its type and its data, serialized.
pub(crate) type Pending = (&'static str, String);

/// Writes one event, in the caller's transaction.
pub(crate) fn record(
    tx: &mut impl Queryable,
    kind: &'static str,
    data: &impl Serialize,
) -> Result<(), Error> {
    record_many(tx, &[pending(kind, data)?])
}

/// An event of `kind` with `data`, to write with [`record_many`].
pub(crate) fn pending(kind: &'static str, data: &impl Serialize) -> Result<Pending, Error> {
    let data = serde_json::to_string(data).map_err(|e| Error::Internal(e.to_string()))?;
    Ok((kind, data))
}

/// Writes events, in the caller's transaction, in a few multi-row INSERTs (chunks of 64, 32,
/// ..., 1 rows, so that few statements are prepared): a claim batch's events cost one or two
/// statements, not one per claim.
pub(crate) fn record_many(tx: &mut impl Queryable, events: &[Pending]) -> Result<(), Error> {
    let now = Timestamp::now();
    let mut rest = events;
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(1 << rest.len().min(64).ilog2());
        let sql = format!(
            "INSERT INTO events (type, data, created_at) VALUES {}",
            placeholders(chunk.len(), "(?, ?, ?)")
        );
        let params: Vec<Value> = chunk
            .iter()
            .flat_map(|(kind, data)| [(*kind).into(), data.as_str().into(), now.into()])
            .collect();
        tx.exec_drop(sql, params)?;
        rest = more;
    }
    Ok(())
}

/// The most events one sequencing statement numbers.
const SEQUENCE_CHUNK: usize = 256;

/// Numbers the committed events not numbered yet, in id order, after every event numbered
/// before: the feed then shows them. Safe from any number of threads and processes at once
/// (they take turns on the `event_sequence` row). Returns how many it numbered.
pub fn sequence(pool: &Pool) -> Result<usize, Error> {
    let mut total = 0;
    loop {
        let n = transaction(pool, |tx| {
            let last: Option<u64> = tx.exec_first(
                "SELECT last_seq FROM event_sequence WHERE id = 1 FOR UPDATE",
                (),
            )?;
            let last = last.ok_or(Error::Internal("no event_sequence row".into()))?;
            // A plain read after the lock: committed events only, and no wait on (nor gap
            // lock before) the events of transactions in flight.
            let ids: Vec<u64> = tx.exec(
                "SELECT id FROM events WHERE seq IS NULL ORDER BY id LIMIT ?",
                (SEQUENCE_CHUNK as u64,),
            )?;
            if ids.is_empty() {
                return Ok(0);
            }
            let pairs = padded(ids.iter().zip(last + 1..).map(|(&id, s)| (id, s)).collect());
            let sql = format!(
                "UPDATE events SET seq = CASE id {} END WHERE id IN ({})",
                vec!["WHEN ? THEN ?"; pairs.len()].join(" "),
                placeholders(pairs.len(), "?")
            );
            let params: Vec<Value> = pairs
                .iter()
                .flat_map(|&(id, s)| [id.into(), s.into()])
                .chain(pairs.iter().map(|&(id, _)| id.into()))
                .collect();
            tx.exec_drop(sql, params)?;
            tx.exec_drop(
                "UPDATE event_sequence SET last_seq = ? WHERE id = 1",
                (last + ids.len() as u64,),
            )?;
            Ok(ids.len())
        })?;
        total += n;
        if n < SEQUENCE_CHUNK {
            return Ok(total);
        }
    }
}

/// The feed, oldest first: the events after `page.after` (an event id), of type `kind` if
/// given. Numbers what has committed first, so the page is current.
pub fn list(pool: &Pool, page: Page, kind: Option<EventType>) -> Result<Vec<Event>, Error> {
    sequence(pool)?;
    read(pool, page.after.unwrap_or(0), page.limit, kind)
}

/// The events numbered after `after`, oldest first, at most `limit`.
pub(crate) fn read(
    pool: &Pool,
    after: u64,
    limit: u32,
    kind: Option<EventType>,
) -> Result<Vec<Event>, Error> {
    with_conn(pool, |conn| {
        type Row = (u64, String, String, Timestamp);
        let rows: Vec<Row> = match kind {
            None => conn.exec(
                "SELECT seq, type, data, created_at FROM events
                 WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            )?,
            Some(k) => conn.exec(
                "SELECT seq, type, data, created_at FROM events
                 WHERE type = ? AND seq > ? ORDER BY seq LIMIT ?",
                (k.as_str(), after, limit),
            )?,
        };
        Ok(rows.into_iter().map(event).collect())
    })
}

fn event((id, kind, data, created_at): (u64, String, String, Timestamp)) -> Event {
    Event {
        id,
        kind,
        created_at,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
    }
}

/// A thread that runs [`sequence`] every `every`, until dropped, so the feed and webhooks stay
/// current without a reader. Any number of processes may run one over the same database.
pub struct Sequencer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sequencer {
    /// Starts sequencing `pool` every `every`; errors (the database away) are retried at the
    /// next turn, and `log` hears of them.
    pub fn start(
        pool: Pool,
        every: Duration,
        log: impl Fn(&Error) + Send + 'static,
    ) -> Result<Sequencer, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("event-sequencer".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    if let Err(e) = sequence(&pool) {
                        log(&e);
                    }
                    std::thread::park_timeout(every);
                }
            })
            .map_err(|e| Error::Internal(format!("could not start the event sequencer: {e}")))?;
        Ok(Sequencer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sequencer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

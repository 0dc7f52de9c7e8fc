//! The event feed: every change tells the shop's other systems what happened. Each event is
//! written in the transaction of its change ([`record_many`]), so an event exists exactly when
//! its change committed (one row for all the events of a transaction); [`sequence`] then
//! numbers committed events in commit order, so that a reader asking for the events after the
//! last id it saw never skips one. Webhooks ([`crate::webhooks`]) deliver the same feed.
//!
//! Why a sequencer: auto-increment ids are taken at INSERT and commits land in another order,
//! so "after id N" would skip an event committed late with a smaller id. An event is inserted
//! unnumbered; [`sequence`], under the one `event_sequence` row's lock, reads the committed
//! unnumbered rows with a plain (non-locking) read, which never waits on a claim in flight,
//! and gives their events the next numbers by primary key. A run that sees an event's
//! commit numbers it after every event numbered before, and readers see a run's numbers all at
//! once (one commit), so the numbers a reader sees only ever grow.

use crate::db::{padded, placeholders, transaction, with_conn, Pool};
use crate::ticker::Ticker;
use crate::{ClaimId, ClaimStatus, Error, Page, Timestamp};
use mysql::prelude::Queryable;
use mysql::Value;
use serde::Serialize;
use std::fmt::Write;
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

/// An event to write.
pub(crate) enum Pending {
    /// Its type and its data, serialized.
    Data(&'static str, String),
    /// `claim.created` for this claim. Its data is the claim as made, which the claim row's
    /// columns that never change say: the claim transaction writes only the id, and readers
    /// rebuild the rest ([`crate::claim::as_created`]), so a batch of claims stays cheap.
    ClaimCreated(ClaimId),
    /// `claim.confirmed` for this claim: the claim as made, now `claimed`, which the same
    /// columns say (nothing else changes at a confirm), so a batch of confirms stays cheap too.
    ClaimConfirmed(ClaimId),
}

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
    Ok(Pending::Data(kind, data))
}

/// Writes events, in the caller's transaction, as one row: a claim batch's events cost one
/// INSERT of one row, and later one number range, not a row and an update per claim.
pub(crate) fn record_many(tx: &mut impl Queryable, events: &[Pending]) -> Result<(), Error> {
    if events.is_empty() {
        return Ok(());
    }
    // The data is JSON already and the types are our own names: joined, not parsed again.
    let size = |p: &Pending| match p {
        Pending::Data(_, d) => d.len() + 32,
        Pending::ClaimCreated(_) | Pending::ClaimConfirmed(_) => 28,
    };
    let mut json = String::with_capacity(events.iter().map(size).sum::<usize>() + 2);
    json.push('[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        match event {
            Pending::Data(kind, data) => {
                json.push_str(r#"{"type":""#);
                json.push_str(kind);
                json.push_str(r#"","data":"#);
                json.push_str(data);
                json.push('}');
            }
            Pending::ClaimCreated(id) => {
                let _ = write!(json, r#"{{"claim":{}}}"#, id.0);
            }
            Pending::ClaimConfirmed(id) => {
                let _ = write!(json, r#"{{"confirmed":{}}}"#, id.0);
            }
        }
    }
    json.push(']');
    tx.exec_drop(
        "INSERT INTO events (n, events, created_at) VALUES (?, ?, ?)",
        (events.len() as u64, json, Timestamp::now()),
    )?;
    Ok(())
}

/// The most rows one sequencing transaction numbers.
const SEQUENCE_CHUNK: usize = 256;

/// Numbers the committed events not numbered yet, in row order, after every event numbered
/// before: the feed then shows them. Safe from any number of threads and processes at once
/// (they take turns on the `event_sequence` row). Returns how many rows it numbered.
pub fn sequence(pool: &Pool) -> Result<usize, Error> {
    let mut total = 0;
    loop {
        let n = transaction(pool, |tx| {
            let last: Option<u64> = tx.exec_first(
                "SELECT last_seq FROM event_sequence WHERE id = 1 FOR UPDATE",
                (),
            )?;
            let last = last.ok_or(Error::Internal("no event_sequence row".into()))?;
            // A plain read after the lock: committed rows only, and no wait on (nor gap lock
            // before) the rows of transactions in flight.
            let rows: Vec<(u64, u64)> = tx.exec(
                "SELECT id, n FROM events WHERE seq_last IS NULL ORDER BY id LIMIT ?",
                (SEQUENCE_CHUNK as u64,),
            )?;
            if rows.is_empty() {
                return Ok(0);
            }
            let mut next = last;
            let mut ranges = Vec::with_capacity(rows.len());
            for &(id, n) in &rows {
                ranges.push((id, next + 1, next + n));
                next += n;
            }
            let ranges = padded(ranges);
            let case = vec!["WHEN ? THEN ?"; ranges.len()].join(" ");
            let sql = format!(
                "UPDATE events SET seq_first = CASE id {case} END, seq_last = CASE id {case} END
                 WHERE id IN ({})",
                placeholders(ranges.len(), "?")
            );
            let params: Vec<Value> = ranges
                .iter()
                .flat_map(|&(id, first, _)| [id.into(), first.into()])
                .chain(ranges.iter().flat_map(|&(id, _, l)| [id.into(), l.into()]))
                .chain(ranges.iter().map(|&(id, _, _)| id.into()))
                .collect();
            tx.exec_drop(sql, params)?;
            tx.exec_drop(
                "UPDATE event_sequence SET last_seq = ? WHERE id = 1",
                (next,),
            )?;
            Ok(rows.len())
        })?;
        total += n;
        if n < SEQUENCE_CHUNK {
            return Ok(total);
        }
    }
}

/// The last feed id given, by a plain read (no lock: the sequencer's row stays free).
pub(crate) fn last_id(conn: &mut impl Queryable) -> Result<u64, Error> {
    let last: Option<u64> =
        conn.exec_first("SELECT last_seq FROM event_sequence WHERE id = 1", ())?;
    Ok(last.unwrap_or(0))
}

/// The feed, oldest first: the events after `page.after` (an event id), of type `kind` if
/// given. Numbers what has committed first, so the page is current.
pub fn list(pool: &Pool, page: Page, kind: Option<EventType>) -> Result<Vec<Event>, Error> {
    sequence(pool)?;
    let kinds = kind.map(|k| vec![k.as_str()]);
    read(
        pool,
        page.after.unwrap_or(0),
        u64::MAX,
        page.limit,
        kinds.as_deref(),
    )
}

/// The events numbered after `after` and up to `upto`, oldest first, at most `limit`, of the
/// types `kinds` if given. Reads rows a chunk at a time until it has `limit` events or none
/// is left.
pub(crate) fn read(
    pool: &Pool,
    after: u64,
    upto: u64,
    limit: u32,
    kinds: Option<&[&str]>,
) -> Result<Vec<Event>, Error> {
    let mut out = Vec::new();
    let mut from = after;
    with_conn(pool, |conn| loop {
        type Row = (u64, u64, String, Timestamp);
        let rows: Vec<Row> = conn.exec(
            "SELECT seq_first, seq_last, events, created_at FROM events
             WHERE seq_last > ? ORDER BY seq_last LIMIT ?",
            (from, READ_CHUNK),
        )?;
        let Some(&(_, end, _, _)) = rows.last() else {
            return Ok(out);
        };
        let mut parsed = Vec::with_capacity(rows.len());
        for (first, _, events, created_at) in rows {
            let events: Vec<Stored> = serde_json::from_str(&events)
                .map_err(|e| Error::Internal(format!("an events row: {e}")))?;
            parsed.push((first, events, created_at));
        }
        // The claims made, as made, for the claim.created and claim.confirmed events wanted.
        let wanted = |kind: &str| kinds.is_none_or(|k| k.contains(&kind));
        let ids: Vec<ClaimId> = parsed
            .iter()
            .flat_map(|(first, events, _)| (*first..).zip(events))
            .filter(|(id, _)| *id > after && *id <= upto)
            .filter_map(|(_, e)| match (e.claim, e.confirmed) {
                (Some(c), _) if wanted("claim.created") => Some(ClaimId(c)),
                (_, Some(c)) if wanted("claim.confirmed") => Some(ClaimId(c)),
                _ => None,
            })
            .collect();
        let made = crate::claim::as_created(&mut **conn, &ids)?;
        let rebuilt = |claim: u64, status: Option<ClaimStatus>| {
            made.get(&ClaimId(claim)).map(|r| {
                let mut r = r.clone();
                r.claim.status = status.unwrap_or(r.claim.status);
                serde_json::json!(r)
            })
        };
        for (first, events, created_at) in parsed {
            for (id, e) in (first..).zip(events) {
                let (kind, data) = match (e.claim, e.confirmed, e.kind) {
                    (Some(claim), _, _) => ("claim.created".to_owned(), rebuilt(claim, None)),
                    (_, Some(claim), _) => (
                        "claim.confirmed".to_owned(),
                        rebuilt(claim, Some(ClaimStatus::Claimed)),
                    ),
                    (None, None, Some(kind)) => (kind, e.data),
                    (None, None, None) => {
                        return Err(Error::Internal("an event without a type".into()))
                    }
                };
                if id <= after || !wanted(&kind) {
                    continue;
                }
                if id > upto || out.len() == limit as usize {
                    return Ok(out);
                }
                let data = data.ok_or(Error::Internal(format!("event {id}: no data")))?;
                out.push(Event {
                    id,
                    kind,
                    created_at,
                    data,
                });
            }
        }
        from = end;
    })
}

/// Rows read at a time: a claim batch's row holds up to 512 events.
const READ_CHUNK: u64 = 32;

/// An event as a row stores it: its type and data, or the claim it made or confirmed.
#[derive(serde::Deserialize)]
struct Stored {
    #[serde(rename = "type")]
    kind: Option<String>,
    data: Option<serde_json::Value>,
    claim: Option<u64>,
    confirmed: Option<u64>,
}

/// A thread that runs [`sequence`] every `every`, until dropped, so the feed and webhooks stay
/// current without a reader. Any number of processes may run one over the same database.
pub struct Sequencer {
    // Held for its Drop, which stops the thread.
    _ticker: Ticker,
}

impl Sequencer {
    /// Starts sequencing `pool` every `every`; errors (the database away) are retried at the
    /// next turn, and `log` hears of them.
    pub fn start(
        pool: Pool,
        every: Duration,
        log: impl Fn(&Error) + Send + 'static,
    ) -> Result<Sequencer, Error> {
        let turn = move |_: &_| {
            if let Err(e) = sequence(&pool) {
                log(&e);
            }
            false
        };
        Ok(Sequencer {
            _ticker: Ticker::start("event-sequencer", every, turn)?,
        })
    }
}

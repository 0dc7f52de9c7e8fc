//! Idempotency keys: a client that lost an answer retries with the same key and gets the same
//! answer, never a second claim. The key is reserved in the transaction of the work it guards
//! and its outcome is written in that same transaction, so both commit or neither does.
//!
//! A request whose key is in use by another request still in flight waits for it (on the key
//! row's lock, at most 2 s a try, within the transaction retries) and then replays its answer.

use crate::db::{with_conn, Pool};
use crate::error::{OnConstraint, TokenProblem};
use crate::{Error, Timestamp, UserId};
use mysql::prelude::Queryable;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// How long keys are kept at least.
pub const KEEP_FOR: Duration = Duration::from_secs(24 * 3600);

/// An `Idempotency-Key`: 1 to 255 printable ASCII characters, scoped to one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Refuses empty, over-long, or keys with characters outside space to `~`, and keys that
    /// end in a space (the column's collation would take "k" and "k " for one key).
    pub fn parse(s: &str) -> Result<IdempotencyKey, Error> {
        let printable = s.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if s.is_empty() || s.len() > 255 || !printable || s.ends_with(' ') {
            return Err(Error::invalid(
                "idempotency_key",
                "must be 1 to 255 printable ASCII characters",
            ));
        }
        Ok(IdempotencyKey(s.to_owned()))
    }

    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a keyed request asked, as its key records it: the SHA-256 of the request's canonical
/// text (e.g. `claim 42`), in hex. One size whatever the request, so a long one (a coupon with
/// a 2,000-character description) is never cut, and the same key with another request is
/// always told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestDigest(String);

impl RequestDigest {
    /// The digest of a request's canonical text.
    pub(crate) fn of(request: &str) -> RequestDigest {
        RequestDigest(crate::random::hex(&Sha256::digest(request.as_bytes())))
    }

    /// The digest in hex, as stored.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// An idempotency key with what its request asked, digested once when the request is read.
#[derive(Debug, Clone)]
pub(crate) struct Keyed {
    pub key: IdempotencyKey,
    pub request: RequestDigest,
}

/// An answer, and whether it replays the first answer given to the same idempotency key.
#[derive(Debug)]
pub struct Answer<T> {
    /// What the request got.
    pub result: Result<T, Error>,
    /// True when this repeats an earlier answer instead of doing the work again.
    pub replayed: bool,
}

impl<T> Answer<T> {
    /// A first answer (not a replay).
    pub fn new(result: Result<T, Error>) -> Answer<T> {
        Answer {
            result,
            replayed: false,
        }
    }
}

/// A key's first answer, as recorded.
pub(crate) struct Recorded {
    pub outcome: String,
    pub result_id: Option<u64>,
    pub result_count: Option<i64>,
}

/// Reserves `key` for `request` (its digest) in the caller's transaction. `None`: the key is new and this
/// transaction owns it. `Some`: it was used before, and this is its answer. The same key with
/// another request is [`Error::KeyReused`].
pub(crate) fn reserve(
    tx: &mut impl Queryable,
    user: UserId,
    key: &IdempotencyKey,
    request: &RequestDigest,
) -> Result<Option<Recorded>, Error> {
    // A request in flight with this key holds the row's lock: this insert waits for it.
    let inserted = tx
        .exec_drop(
            "INSERT INTO idempotency_keys (user_id, idem_key, request_sha256, outcome, created_at)
             VALUES (?, ?, ?, 'pending', ?)",
            (user.0, &key.0, request.as_str(), Timestamp::now()),
        )
        .map_err(Error::from)
        .on_foreign_key(Error::Token(TokenProblem::UnknownUser))
        .on_duplicate(Error::KeyReused);
    match inserted {
        Ok(()) => return Ok(None),
        Err(Error::KeyReused) => {}
        Err(e) => return Err(e),
    }
    type Row = (String, String, Option<u64>, Option<i64>);
    let row: Option<Row> = tx.exec_first(
        "SELECT request_sha256, outcome, result_id, result_count FROM idempotency_keys
         WHERE user_id = ? AND idem_key = ? LOCK IN SHARE MODE",
        (user.0, &key.0),
    )?;
    match row {
        Some((r, outcome, result_id, result_count)) if r == request.0 => Ok(Some(Recorded {
            outcome,
            result_id,
            result_count,
        })),
        _ => Err(Error::KeyReused),
    }
}

/// Records how the request that reserved `key` ended, in the same transaction.
pub(crate) fn record(
    tx: &mut impl Queryable,
    user: UserId,
    key: &IdempotencyKey,
    outcome: &str,
    result_id: Option<u64>,
    result_count: Option<i64>,
) -> Result<(), Error> {
    tx.exec_drop(
        "UPDATE idempotency_keys SET outcome = ?, result_id = ?, result_count = ?
         WHERE user_id = ? AND idem_key = ?",
        (outcome, result_id, result_count, user.0, &key.0),
    )?;
    Ok(())
}

/// Deletes keys older than `age`, a thousand at a time, and returns how many went. It walks
/// the `created_at` index, so it never waits on the rows that claims lock.
pub fn purge(pool: &Pool, age: Duration) -> Result<u64, Error> {
    let cutoff = Timestamp::now().minus(age);
    let mut total = 0;
    loop {
        let n = with_conn(pool, |conn| {
            conn.exec_drop(
                "DELETE FROM idempotency_keys WHERE created_at < ? ORDER BY created_at LIMIT 1000",
                (cutoff,),
            )?;
            Ok(conn.affected_rows())
        })?;
        total += n;
        if n < 1000 {
            return Ok(total);
        }
    }
}

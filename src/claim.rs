//! The claim: everything that decides whether a claim succeeds is in [`claim`].

use crate::audit;
use crate::combine::{Outcome, Ticket};
use crate::coupon::{lock_live, lock_many, Coupon, Lock};
use crate::db::{padded, placeholders, transaction, with_conn, Pool};
use crate::error::{OnConstraint, TokenProblem};
use crate::idempotency::{self, Answer, IdempotencyKey, Recorded};
use crate::{ClaimId, CouponId, Error, Label, Page, Timestamp, UserId};
use mysql::prelude::Queryable;
use mysql::{Transaction, Value};
use serde::Serialize;
use std::collections::HashMap;

/// One granted unit of a coupon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    /// The claim's id.
    pub id: ClaimId,
    /// The coupon claimed.
    pub coupon_id: CouponId,
    /// The coupon's code.
    pub code: String,
    /// The coupon's name when it was claimed, if it had one.
    pub name: Option<String>,
    /// When the claim committed (service clock, UTC).
    pub claimed_at: Timestamp,
}

/// A successful claim and the stock left right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The new claim.
    pub claim: Claim,
    /// Units left right after this claim.
    pub available_count: u64,
}

/// One line of a user's claim history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// The claim's id.
    pub claim_id: ClaimId,
    /// The coupon claimed.
    pub coupon_id: CouponId,
    /// The coupon's code when it was claimed.
    pub code: String,
    /// The coupon's name when it was claimed, if it had one.
    pub name: Option<String>,
    /// When the claim committed (UTC).
    pub claimed_at: Timestamp,
    /// When an admin voided it, if one did.
    pub voided_at: Option<Timestamp>,
    /// Why it was voided.
    pub void_reason: Option<String>,
}

/// Claims one unit of `coupon` for `user`, in one transaction that holds the coupon row's lock
/// from the check to the commit, so concurrent claims can never take more than the stock.
/// A user may claim the same coupon again while stock lasts.
///
/// Claims that arrive while a claim transaction of their lane is in flight in this process wait,
/// and then share the next transaction, whatever their coupons: it decides each of them in
/// arrival order, exactly as alone, and commits them together (see
/// [`crate::db::Pool::with_claim_batching`] and [`crate::db::Pool::with_claim_lanes`]). Claims
/// of a coupon that another transaction holds wait for it by coupon, not in the lane.
///
/// Errors: [`Error::CouponNotFound`] (unknown or deleted), [`Error::Inactive`],
/// [`Error::SoldOut`], [`Error::Token`] if the user no longer exists, [`Error::Busy`] if
/// deadlocks or lock-wait timeouts outlast the retries.
pub fn claim(pool: &Pool, user: UserId, coupon: CouponId) -> Result<Claimed, Error> {
    claim_keyed(pool, user, coupon, None).result
}

/// [`claim`] guarded by an idempotency key: the first request with `key` claims (or is refused)
/// and records its answer in the same transaction; every later one with the same key gets that
/// answer again (`replayed`), never a second claim. The key with another coupon is
/// [`Error::KeyReused`].
pub fn claim_once(
    pool: &Pool,
    user: UserId,
    coupon: CouponId,
    key: &IdempotencyKey,
) -> Answer<Claimed> {
    claim_keyed(pool, user, coupon, Some(key))
}

/// Whether a claim transaction of `coupon`'s lane is in flight in this process, so that a claim
/// now would wait to go in the next batch. A hint for scheduling (it may change at once); always
/// false with combining off.
pub fn in_flight(pool: &Pool, coupon: CouponId) -> bool {
    pool.combiners().is_some_and(|c| match &c.lanes {
        Some(lanes) => lanes.in_flight(coupon),
        None => c.per_coupon.in_flight(coupon),
    })
}

/// Whether claims of `coupon` itself are queued or in a transaction in this process now: a
/// claim now would wait behind them. A hint for scheduling, like [`in_flight`].
pub fn busy(pool: &Pool, coupon: CouponId) -> bool {
    pool.combiners().is_some_and(|c| {
        c.per_coupon.active(coupon) > 0 || c.lanes.as_ref().is_some_and(|l| l.active(coupon) > 0)
    })
}

fn claim_keyed(
    pool: &Pool,
    user: UserId,
    coupon: CouponId,
    key: Option<&IdempotencyKey>,
) -> Answer<Claimed> {
    let Some(combiners) = pool.combiners() else {
        return claim_alone(pool, user, coupon, key);
    };
    let ticket = || Ticket {
        coupon,
        user,
        key: key.cloned(),
    };
    // A lane's batch never waits for a coupon locked elsewhere (it would hold up the lane's
    // other coupons): it leaves those claims undecided, and they queue by coupon instead. While
    // claims of this coupon queue so, the next ones join them at once, in arrival order.
    let per_coupon = &combiners.per_coupon;
    if let Some(lanes) = combiners
        .lanes
        .as_ref()
        .filter(|_| per_coupon.active(coupon) == 0)
    {
        if let Some(answer) = lanes.submit(ticket(), |batch| claim_batch(pool, batch, Lock::Skip)) {
            return answer;
        }
    }
    let answer = per_coupon.submit(ticket(), |batch| match batch {
        [one] => vec![Some(claim_alone(
            pool,
            one.user,
            one.coupon,
            one.key.as_ref(),
        ))],
        _ => claim_batch(pool, batch, Lock::Wait),
    });
    answer.unwrap_or_else(|| Answer::new(Err(Error::Internal("claim left undecided".into()))))
}

/// What an idempotency key records as the request of a claim on `coupon`.
fn request_of(coupon: CouponId) -> String {
    format!("claim {coupon}")
}

/// One claim in its own transaction: the path of a claim that meets no other.
fn claim_alone(
    pool: &Pool,
    user: UserId,
    coupon: CouponId,
    key: Option<&IdempotencyKey>,
) -> Answer<Claimed> {
    let done = transaction(pool, |tx| {
        let Some(key) = key else {
            return Ok(Answer::new(Ok(take_one(tx, user, coupon)?)));
        };
        if let Some(first) = idempotency::reserve(tx, user, key, &request_of(coupon))? {
            return replay(tx, first);
        }
        let result = take_one(tx, user, coupon);
        // A refusal is an answer too: recorded, so that a retry gets the same one.
        let Some((outcome, id, count)) = to_record(&result) else {
            return Err(result.err().unwrap_or(Error::Busy));
        };
        idempotency::record(tx, user, key, outcome, id, count)?;
        Ok(Answer::new(result))
    });
    done.unwrap_or_else(|e| Answer::new(Err(e)))
}

/// Claims that met in one lane, in one transaction: one outcome each, in order. A fault of the
/// transaction is every request's answer, as it would be alone. Only a user deleted since their
/// token was checked fails the batch for one request (a foreign key): then each runs alone
/// (after the lane's batch, by coupon) and gets its own answer; nothing was written, the error
/// came before the commit.
fn claim_batch(pool: &Pool, batch: &[&Ticket], lock: Lock) -> Vec<Outcome> {
    let each = |f: &dyn Fn() -> Error| batch.iter().map(|_| Some(Answer::new(Err(f())))).collect();
    match transaction(pool, |tx| take_many(tx, batch, lock)) {
        Ok(answers) => answers,
        Err(Error::Token(TokenProblem::UnknownUser)) => match lock {
            Lock::Skip => batch.iter().map(|_| None).collect(),
            Lock::Wait => batch
                .iter()
                .map(|t| Some(claim_alone(pool, t.user, t.coupon, t.key.as_ref())))
                .collect(),
        },
        Err(Error::Busy) => each(&|| Error::Busy),
        Err(Error::Unavailable(e)) => each(&|| Error::Unavailable(e.clone())),
        Err(e) => {
            let e = e.to_string();
            each(&|| Error::Internal(format!("claim batch: {e}")))
        }
    }
}

/// Where a request of a batch stands.
enum Step {
    /// Still to be decided under its coupon's lock.
    Open,
    /// Its key was used before: replay that answer.
    Replay(Recorded),
    /// Decided.
    Done(Result<Claimed, Error>),
    /// Its coupon was locked by another transaction (or has no row): left, untouched, for a
    /// transaction that waits.
    Skipped,
}

/// The batch claim: the same decisions as [`take_one`], for each request in order, with each
/// coupon locked once, one write of each kind, and one commit.
///
/// With [`Lock::Wait`], keys are reserved first, then the coupons locked, waiting for them, as
/// a lone claim does. With [`Lock::Skip`] (a lane's batch), the coupons are locked first,
/// skipping those another transaction holds, and only the claims on coupons held reserve their
/// keys: a skipped claim is left undecided (`None`) having touched nothing, so a lane's batch
/// never waits for a coupon locked elsewhere, nor for the key of a claim waiting for one.
fn take_many(
    tx: &mut Transaction<'_>,
    batch: &[&Ticket],
    lock: Lock,
) -> Result<Vec<Outcome>, Error> {
    let mut steps: Vec<Step> = batch.iter().map(|_| Step::Open).collect();
    let mut coupons = None;
    if lock == Lock::Skip {
        let held = lock_many(tx, batch.iter().map(|t| t.coupon), Lock::Skip)?;
        for (i, t) in batch.iter().enumerate() {
            if !held.contains_key(&t.coupon) {
                steps[i] = Step::Skipped;
            }
        }
        coupons = Some(held);
    }
    // Keys are locked in one order (user, key), whatever the arrival order, so two batches
    // holding some of the same keys cannot deadlock on them.
    let mut keyed: Vec<(usize, &IdempotencyKey)> = (0..batch.len())
        .filter(|&i| matches!(steps[i], Step::Open))
        .filter_map(|i| batch[i].key.as_ref().map(|k| (i, k)))
        .collect();
    keyed.sort_by_key(|&(i, k)| (batch[i].user, k.as_str()));
    for (i, key) in keyed {
        let request = request_of(batch[i].coupon);
        steps[i] = match idempotency::reserve(tx, batch[i].user, key, &request) {
            Ok(None) => Step::Open,
            Ok(Some(first)) => Step::Replay(first),
            Err(e @ (Error::KeyReused | Error::Token(_))) => Step::Done(Err(e)),
            Err(e) => return Err(e),
        };
    }
    let open: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(steps[i], Step::Open))
        .collect();
    if !open.is_empty() {
        let coupons = match coupons {
            Some(held) => held,
            None => lock_many(tx, open.iter().map(|&i| batch[i].coupon), Lock::Wait)?,
        };
        decide(tx, batch, &open, &mut steps, &coupons)?;
        record_keys(tx, batch, &open, &steps)?;
    }
    // Replays read last: the per-user counts above must be the transaction's first plain read.
    let mut answers = Vec::with_capacity(batch.len());
    for step in steps {
        answers.push(match step {
            Step::Replay(first) => Some(replay(tx, first)?),
            Step::Done(result) => Some(Answer::new(result)),
            Step::Skipped => None,
            Step::Open => Some(Answer::new(Err(Error::Internal(
                "claim left undecided".into(),
            )))),
        });
    }
    Ok(answers)
}

/// Decides the `open` requests under their coupons' locks and writes the granted claims.
fn decide(
    tx: &mut Transaction<'_>,
    batch: &[&Ticket],
    open: &[usize],
    steps: &mut [Step],
    locked: &HashMap<CouponId, Option<Coupon>>,
) -> Result<(), Error> {
    // Live coupons only: a deleted one (locked all the same) or one with no row is not found.
    let coupons: HashMap<CouponId, &Coupon> = locked
        .iter()
        .filter_map(|(&id, c)| c.as_ref().map(|c| (id, c)))
        .collect();
    let now = Timestamp::now();
    // A plain read, after every lock: the snapshot starts here, and every change to these
    // counts is made under a lock we hold, so they are current.
    let limited = open
        .iter()
        .map(|&i| (batch[i].user, batch[i].coupon))
        .filter(|(_, c)| coupons.get(c).is_some_and(|c| c.per_user_limit.is_some()));
    let mut held = held_counts(tx, limited)?;
    let mut taken: HashMap<CouponId, u64> = HashMap::new();
    let mut granted = Vec::new();
    for &i in open {
        let (coupon, user) = (batch[i].coupon, batch[i].user);
        let Some(c) = coupons.get(&coupon) else {
            steps[i] = Step::Done(Err(Error::CouponNotFound));
            continue;
        };
        let n = taken.get(&coupon).copied().unwrap_or(0);
        let held = held.entry((user, coupon)).or_insert(0);
        let refusal = c.refusal_at(now).or_else(|| {
            if c.available_count == n {
                Some(Error::SoldOut)
            } else if c.per_user_limit.is_some_and(|l| *held >= i64::from(l)) {
                Some(Error::LimitReached)
            } else {
                None
            }
        });
        match refusal {
            Some(e) => steps[i] = Step::Done(Err(e)),
            None => {
                taken.insert(coupon, n + 1);
                *held += 1;
                granted.push(i);
            }
        }
    }
    if granted.is_empty() {
        return Ok(());
    }
    let counted: Vec<((UserId, CouponId), i64)> = granted
        .iter()
        .map(|&i| (batch[i].user, batch[i].coupon))
        .filter(|(_, coupon)| coupons[coupon].per_user_limit.is_some())
        .map(|pair| (pair, held[&pair]))
        .collect();
    write_counts(tx, counted)?;
    take_stock(tx, &taken)?;
    let rows: Vec<(UserId, &Coupon)> = granted
        .iter()
        .map(|&i| (batch[i].user, coupons[&batch[i].coupon]))
        .collect();
    let ids = insert_claims(tx, now, &rows)?;
    // Each coupon's stock right after each of its claims, in order.
    let mut left: HashMap<CouponId, u64> = HashMap::new();
    for (&i, id) in granted.iter().zip(ids) {
        let c = &coupons[&batch[i].coupon];
        let left = left.entry(c.id).or_insert(c.available_count);
        *left -= 1;
        steps[i] = Step::Done(Ok(Claimed {
            claim: Claim {
                id,
                coupon_id: c.id,
                code: c.code.clone(),
                name: c.name.clone(),
                claimed_at: now,
            },
            available_count: *left,
        }));
    }
    Ok(())
}

/// How many claims of the coupon each (user, coupon) pair holds, as the per-user counters say
/// (pairs with no counter are missing), in one statement.
fn held_counts(
    tx: &mut Transaction<'_>,
    pairs: impl Iterator<Item = (UserId, CouponId)>,
) -> Result<HashMap<(UserId, CouponId), i64>, Error> {
    let pairs: Vec<(UserId, CouponId)> = pairs.collect();
    if pairs.is_empty() {
        return Ok(HashMap::new());
    }
    let distinct = |mut ids: Vec<u64>| {
        ids.sort_unstable();
        ids.dedup();
        padded(ids)
    };
    let users = distinct(pairs.iter().map(|(u, _)| u.0).collect());
    let coupons = distinct(pairs.iter().map(|(_, c)| c.0).collect());
    // By the primary key (user_id, coupon_id): a point lookup for each combination.
    let sql = format!(
        "SELECT user_id, coupon_id, claimed FROM user_coupon_claims
         WHERE user_id IN ({}) AND coupon_id IN ({})",
        placeholders(users.len(), "?"),
        placeholders(coupons.len(), "?")
    );
    let params: Vec<Value> = users.into_iter().chain(coupons).map(Value::from).collect();
    let rows: Vec<(u64, u64, i64)> = tx.exec(sql, params)?;
    let wanted: std::collections::HashSet<(UserId, CouponId)> = pairs.into_iter().collect();
    Ok(rows
        .into_iter()
        .map(|(u, c, n)| ((UserId(u), CouponId(c)), n))
        .filter(|(pair, _)| wanted.contains(pair))
        .collect())
}

/// Sets per-user counters to their new counts, in one statement.
fn write_counts(
    tx: &mut Transaction<'_>,
    mut counts: Vec<((UserId, CouponId), i64)>,
) -> Result<(), Error> {
    if counts.is_empty() {
        return Ok(());
    }
    counts.sort_unstable();
    counts.dedup();
    let counts = padded(counts);
    let sql = format!(
        "INSERT INTO user_coupon_claims (user_id, coupon_id, claimed) VALUES {}
         ON DUPLICATE KEY UPDATE claimed = VALUES(claimed)",
        placeholders(counts.len(), "(?, ?, ?)")
    );
    let params: Vec<Value> = counts
        .iter()
        .flat_map(|&((user, coupon), n)| [user.0.into(), coupon.0.into(), n.into()])
        .collect();
    tx.exec_drop(sql, params)
        .map_err(Error::from)
        .on_foreign_key(Error::Token(TokenProblem::UnknownUser))?;
    Ok(())
}

/// Takes `taken[c]` units off each coupon `c`'s stock, in one statement.
fn take_stock(tx: &mut Transaction<'_>, taken: &HashMap<CouponId, u64>) -> Result<(), Error> {
    let mut taken: Vec<(u64, u64)> = taken.iter().map(|(c, &n)| (c.0, n)).collect();
    taken.sort_unstable();
    let taken = padded(taken);
    // A repeated pair changes nothing: CASE takes the first match, IN ignores repeats.
    let sql = format!(
        "UPDATE coupons SET available_count = available_count - CASE id {} END WHERE id IN ({})",
        vec!["WHEN ? THEN ?"; taken.len()].join(" "),
        placeholders(taken.len(), "?")
    );
    let params: Vec<Value> = taken
        .iter()
        .flat_map(|&(c, n)| [c.into(), n.into()])
        .chain(taken.iter().map(|&(c, _)| c.into()))
        .collect();
    tx.exec_drop(sql, params)?;
    Ok(())
}

/// Inserts one claim row per (user, coupon), in order, and returns their ids in the same order.
fn insert_claims(
    tx: &mut Transaction<'_>,
    now: Timestamp,
    rows: &[(UserId, &Coupon)],
) -> Result<Vec<ClaimId>, Error> {
    let mut first = None;
    let mut rest = rows;
    // In chunks of 32, 16, ..., 1 rows: a handful of statements to prepare and cache.
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(1 << rest.len().ilog2());
        let sql = format!(
            "INSERT INTO claims (user_id, coupon_id, claimed_at, code, name) VALUES {}",
            placeholders(chunk.len(), "(?, ?, ?, ?, ?)")
        );
        let params: Vec<Value> = chunk
            .iter()
            .flat_map(|&(u, c)| {
                [
                    u.0.into(),
                    c.id.0.into(),
                    now.into(),
                    c.code.as_str().into(),
                    c.name.as_deref().into(),
                ]
            })
            .collect();
        tx.exec_drop(sql, params)
            .map_err(Error::from)
            .on_foreign_key(Error::Token(TokenProblem::UnknownUser))?;
        first = first.or(tx.last_insert_id());
        rest = more;
    }
    let first = first.ok_or(Error::Internal("no id for the inserted claims".into()))?;
    if rows.len() == 1 {
        return Ok(vec![ClaimId(first)]);
    }
    let mut coupons: Vec<u64> = rows.iter().map(|(_, c)| c.id.0).collect();
    coupons.sort_unstable();
    coupons.dedup();
    let coupons = padded(coupons);
    // The ids rise in row order, but need not be consecutive (Galera steps them by the cluster
    // size, and other lanes' claims interleave). No other claim of these coupons can come
    // between: we hold their locks. By the primary key: the (coupon_id, id) index would be read
    // from each coupon's oldest claim.
    let sql = format!(
        "SELECT id FROM claims FORCE INDEX (PRIMARY) WHERE id >= ? AND coupon_id IN ({})
         ORDER BY id LIMIT ?",
        placeholders(coupons.len(), "?")
    );
    let params: Vec<Value> = std::iter::once(first)
        .chain(coupons)
        .chain(std::iter::once(rows.len() as u64))
        .map(Value::from)
        .collect();
    let ids: Vec<u64> = tx.exec(sql, params)?;
    if ids.len() != rows.len() {
        return Err(Error::Internal("claim ids not found after insert".into()));
    }
    Ok(ids.into_iter().map(ClaimId).collect())
}

/// What an idempotency key records of a claim's result: the outcome, the claim's id and the
/// stock left. `None` for an error that is no answer (the transaction fails with it instead).
fn to_record(result: &Result<Claimed, Error>) -> Option<(&'static str, Option<u64>, Option<i64>)> {
    match result {
        Ok(c) => Some((
            "claimed",
            Some(c.claim.id.0),
            Some(c.available_count as i64),
        )),
        Err(e) => e.outcome().map(|name| (name, None, None)),
    }
}

/// Records every keyed open request's answer in one statement (their rows are reserved).
fn record_keys(
    tx: &mut Transaction<'_>,
    batch: &[&Ticket],
    open: &[usize],
    steps: &[Step],
) -> Result<(), Error> {
    let now = Timestamp::now();
    let mut rows: Vec<[Value; 7]> = Vec::new();
    for &i in open {
        let (Some(key), Step::Done(result)) = (&batch[i].key, &steps[i]) else {
            continue;
        };
        let Some((outcome, id, count)) = to_record(result) else {
            let e = result
                .as_ref()
                .err()
                .map(Error::to_string)
                .unwrap_or_default();
            return Err(Error::Internal(format!("no outcome to record for {e}")));
        };
        rows.push([
            batch[i].user.0.into(),
            key.as_str().into(),
            request_of(batch[i].coupon).into(),
            outcome.into(),
            id.into(),
            count.into(),
            now.into(),
        ]);
    }
    if rows.is_empty() {
        return Ok(());
    }
    let rows = padded(rows);
    let sql = format!(
        "INSERT INTO idempotency_keys
           (user_id, idem_key, request, outcome, result_id, result_count, created_at)
         VALUES {}
         ON DUPLICATE KEY UPDATE outcome = VALUES(outcome), result_id = VALUES(result_id),
           result_count = VALUES(result_count)",
        placeholders(rows.len(), "(?, ?, ?, ?, ?, ?, ?)")
    );
    tx.exec_drop(sql, rows.concat())?;
    Ok(())
}

/// The claim itself: everything that decides whether it succeeds.
fn take_one(tx: &mut Transaction<'_>, user: UserId, coupon: CouponId) -> Result<Claimed, Error> {
    // From here to the commit, this coupon's row is ours: every check below stays true.
    let c = lock_live(tx, coupon)?.ok_or(Error::CouponNotFound)?;
    let claimed_at = Timestamp::now();
    if let Some(refusal) = c.refusal_at(claimed_at) {
        return Err(refusal);
    }
    if c.available_count == 0 {
        return Err(Error::SoldOut);
    }
    if let Some(limit) = c.per_user_limit {
        // One statement: count this claim unless the user already holds `limit`. No row is
        // changed (0 affected) exactly when the limit is reached.
        tx.exec_drop(
            "INSERT INTO user_coupon_claims (user_id, coupon_id, claimed) VALUES (?, ?, 1)
             ON DUPLICATE KEY UPDATE claimed = IF(claimed < ?, claimed + 1, claimed)",
            (user.0, coupon.0, limit),
        )
        .map_err(Error::from)
        .on_foreign_key(Error::Token(TokenProblem::UnknownUser))?;
        if tx.affected_rows() == 0 {
            return Err(Error::LimitReached);
        }
    }
    tx.exec_drop(
        "UPDATE coupons SET available_count = available_count - 1 WHERE id = ?",
        (coupon.0,),
    )?;
    tx.exec_drop(
        "INSERT INTO claims (user_id, coupon_id, claimed_at, code, name) VALUES (?, ?, ?, ?, ?)",
        (user.0, coupon.0, claimed_at, &c.code, &c.name),
    )
    .map_err(Error::from)
    .on_foreign_key(Error::Token(TokenProblem::UnknownUser))?;
    Ok(Claimed {
        claim: Claim {
            id: ClaimId(tx.last_insert_id().unwrap_or(0)),
            coupon_id: coupon,
            code: c.code,
            name: c.name,
            claimed_at,
        },
        available_count: c.available_count - 1,
    })
}

/// The answer recorded for an idempotency key, again.
fn replay(tx: &mut Transaction<'_>, first: Recorded) -> Result<Answer<Claimed>, Error> {
    let result = match (first.outcome.as_str(), first.result_id) {
        ("claimed", Some(id)) => {
            let row: Option<(u64, String, Option<String>, Timestamp)> = tx.exec_first(
                "SELECT cl.coupon_id, COALESCE(cl.code, co.code), COALESCE(cl.name, co.name), cl.claimed_at
                 FROM claims cl JOIN coupons co ON co.id = cl.coupon_id WHERE cl.id = ?",
                (id,),
            )?;
            let (coupon_id, code, name, claimed_at) =
                row.ok_or(Error::Internal("recorded claim is missing".into()))?;
            Ok(Claimed {
                claim: Claim {
                    id: ClaimId(id),
                    coupon_id: CouponId(coupon_id),
                    code,
                    name,
                    claimed_at,
                },
                available_count: first.result_count.unwrap_or(0).max(0) as u64,
            })
        }
        (outcome, _) => Err(Error::from_outcome(outcome)),
    };
    Ok(Answer {
        result,
        replayed: true,
    })
}

/// A claim an admin voided: when, by whom, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Voided {
    /// The claim.
    pub claim_id: ClaimId,
    /// Its coupon, which got the unit back.
    pub coupon_id: CouponId,
    /// When it was voided.
    pub voided_at: Timestamp,
    /// The admin who voided it.
    pub voided_by: UserId,
    /// Why.
    pub reason: String,
}

/// Voids a claim: marks it (the row stays) and returns its unit to the coupon's stock, exactly
/// once; a second void is [`Error::AlreadyVoided`]. The user's per-user count drops by one.
/// Runs under the coupon's row lock, like claims, so parallel voids of one claim return one unit.
pub fn void(pool: &Pool, admin: UserId, claim: ClaimId, reason: &Label) -> Result<Voided, Error> {
    transaction(pool, |tx| {
        let owner: Option<(u64, u64)> = tx.exec_first(
            "SELECT coupon_id, user_id FROM claims WHERE id = ?",
            (claim.0,),
        )?;
        let (coupon, user) = owner.ok_or(Error::ClaimNotFound)?;
        // The coupon first, then the claim: the order claims take locks in.
        tx.exec_drop("SELECT id FROM coupons WHERE id = ? FOR UPDATE", (coupon,))?;
        let voided: Option<Option<Timestamp>> = tx.exec_first(
            "SELECT voided_at FROM claims WHERE id = ? FOR UPDATE",
            (claim.0,),
        )?;
        if voided.flatten().is_some() {
            return Err(Error::AlreadyVoided);
        }
        let now = Timestamp::now();
        tx.exec_drop(
            "UPDATE claims SET voided_at = ?, voided_by = ?, void_reason = ? WHERE id = ?",
            (now, admin.0, reason.as_str(), claim.0),
        )?;
        tx.exec_drop(
            "UPDATE coupons SET available_count = available_count + 1 WHERE id = ?",
            (coupon,),
        )?;
        tx.exec_drop(
            "UPDATE user_coupon_claims SET claimed = GREATEST(claimed - 1, 0)
             WHERE user_id = ? AND coupon_id = ?",
            (user, coupon),
        )?;
        let detail = serde_json::json!({ "reason": reason.as_str(), "user_id": user });
        audit::record(
            tx,
            admin,
            "claim.void",
            Some(CouponId(coupon)),
            Some(claim),
            &detail,
        )?;
        Ok(Voided {
            claim_id: claim,
            coupon_id: CouponId(coupon),
            voided_at: now,
            voided_by: admin,
            reason: reason.as_str().to_owned(),
        })
    })
}

/// A claim as admins see it, with who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CouponClaim {
    /// The claim.
    pub claim_id: ClaimId,
    /// Who claimed.
    pub user_id: UserId,
    /// Their email.
    pub email: String,
    /// When.
    pub claimed_at: Timestamp,
    /// When it was voided, if it was.
    pub voided_at: Option<Timestamp>,
    /// Why it was voided.
    pub void_reason: Option<String>,
}

/// A coupon's claims, oldest first (voided ones included).
pub fn coupon_claims(pool: &Pool, coupon: CouponId, page: Page) -> Result<Vec<CouponClaim>, Error> {
    with_conn(pool, |conn| {
        let exists: Option<u64> =
            conn.exec_first("SELECT id FROM coupons WHERE id = ?", (coupon.0,))?;
        exists.ok_or(Error::CouponNotFound)?;
        type Row = (
            u64,
            u64,
            String,
            Timestamp,
            Option<Timestamp>,
            Option<String>,
        );
        let rows: Vec<Row> = conn.exec(
            "SELECT cl.id, cl.user_id, u.email, cl.claimed_at, cl.voided_at, cl.void_reason
             FROM claims cl JOIN users u ON u.id = cl.user_id
             WHERE cl.coupon_id = ? AND cl.id > ? ORDER BY cl.id LIMIT ?",
            (coupon.0, page.after.unwrap_or(0), page.limit),
        )?;
        Ok(rows
            .into_iter()
            .map(
                |(id, user, email, claimed_at, voided_at, void_reason)| CouponClaim {
                    claim_id: ClaimId(id),
                    user_id: UserId(user),
                    email,
                    claimed_at,
                    voided_at,
                    void_reason,
                },
            )
            .collect())
    })
}

/// The user's claims, newest first, including claims of coupons deleted since.
pub fn history(pool: &Pool, user: UserId, page: Page) -> Result<Vec<HistoryEntry>, Error> {
    with_conn(pool, |conn| {
        let exists: Option<u64> =
            conn.exec_first("SELECT id FROM users WHERE id = ?", (user.0,))?;
        if exists.is_none() {
            return Err(Error::Token(TokenProblem::UnknownUser));
        }
        type Row = (
            u64,
            u64,
            String,
            Option<String>,
            Timestamp,
            Option<Timestamp>,
            Option<String>,
        );
        let rows: Vec<Row> = conn.exec(
            "SELECT cl.id, cl.coupon_id, COALESCE(cl.code, co.code), COALESCE(cl.name, co.name),
                    cl.claimed_at, cl.voided_at, cl.void_reason
             FROM claims cl JOIN coupons co ON co.id = cl.coupon_id
             WHERE cl.user_id = ? AND cl.id < ? ORDER BY cl.id DESC LIMIT ?",
            (user.0, page.after.unwrap_or(u64::MAX), page.limit),
        )?;
        Ok(rows
            .into_iter()
            .map(
                |(id, coupon_id, code, name, claimed_at, voided_at, void_reason)| HistoryEntry {
                    claim_id: ClaimId(id),
                    coupon_id: CouponId(coupon_id),
                    code,
                    name,
                    claimed_at,
                    voided_at,
                    void_reason,
                },
            )
            .collect())
    })
}

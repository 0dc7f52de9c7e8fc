//! A claim's life after [`crate::claim`] made it: a hold confirmed, released or run out, a
//! claim redeemed against an order, or voided by an admin. [`next`] decides every change of
//! status; a change that ends a live claim gives its unit back, exactly once, under the
//! coupon's row lock, as claims take units under it.
//!
//! Locks: a change that gives a unit back locks the coupon, then the claim (the order claims
//! and every other such change lock in); confirming and redeeming lock only the claim, so
//! they never wait behind a hot coupon's claims.

use crate::audit;
use crate::claim::{self, ClaimRecord, Reply};
use crate::counts;
use crate::coupon::{self, Coupon};
use crate::db::{padded, placeholders, transaction, Pool};
use crate::events;
use crate::group::Group;
use crate::ticker::Ticker;
use crate::{ClaimId, ClaimStatus, CouponId, Currency, Error, Label, OrderId, Timestamp, UserId};
use mysql::prelude::Queryable;
use mysql::{Transaction, Value};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// What happens to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Its owner confirms a hold.
    Confirm,
    /// Its owner (or an admin) lets a hold go.
    Release,
    /// It is used against an order.
    Redeem,
    /// An admin cancels it.
    Void,
    /// Its hold ran out.
    Expire,
}

impl Action {
    /// The event feed's name for it ([`crate::events`]).
    fn event_name(self) -> &'static str {
        match self {
            Action::Confirm => "claim.confirmed",
            Action::Release => "claim.released",
            Action::Redeem => "claim.redeemed",
            Action::Void => "claim.voided",
            Action::Expire => "claim.expired",
        }
    }

    /// The audit log's name for it.
    fn audit_name(self) -> &'static str {
        match self {
            Action::Confirm => "claim.confirm",
            Action::Release => "claim.release",
            Action::Redeem => "claim.redeem",
            Action::Void => "claim.void",
            Action::Expire => "claim.expire",
        }
    }
}

/// Who acts on a claim: its owner, or an admin, who may act on anyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The claim's owner (anyone else's claim is [`Error::ClaimNotFound`] to them).
    Owner(UserId),
    /// An admin (checked by the caller, e.g. [`crate::auth::require_admin`]).
    Admin(UserId),
}

impl Actor {
    fn id(self) -> UserId {
        match self {
            Actor::Owner(id) | Actor::Admin(id) => id,
        }
    }

    fn may_touch(self, owner: UserId) -> bool {
        match self {
            Actor::Owner(id) => id == owner,
            Actor::Admin(_) => true,
        }
    }
}

/// The one decision of a claim's life: the status `action` takes a claim in `status` (a hold
/// ending at `expires_at`) to at `now`. `Ok(None)`: nothing changes (confirming a claim
/// confirmed already, redeeming one redeemed already: the caller compares the orders, expiring
/// one that is not a hold run out). Pure, so that every path decides alike.
pub fn next(
    status: ClaimStatus,
    expires_at: Option<Timestamp>,
    now: Timestamp,
    action: Action,
) -> Result<Option<ClaimStatus>, Error> {
    use ClaimStatus::*;
    let ran_out = status == Held && expires_at.is_none_or(|e| now >= e);
    match (action, status) {
        (Action::Expire, Held) if ran_out => Ok(Some(Expired)),
        (Action::Expire, _) => Ok(None),
        (Action::Void, Held | Claimed | Redeemed) => Ok(Some(Voided)),
        (Action::Void, Voided) => Err(Error::AlreadyVoided),
        (_, Released | Expired | Voided) => Err(Error::NotActive),
        (_, Held) if ran_out => Err(Error::HoldExpired),
        (Action::Confirm, Held) => Ok(Some(Claimed)),
        (Action::Confirm, Claimed | Redeemed) => Ok(None),
        (Action::Release, Held) => Ok(Some(Released)),
        (Action::Release, Claimed | Redeemed) => Err(Error::NotActive),
        (Action::Redeem, Held | Claimed) => Ok(Some(Redeemed)),
        (Action::Redeem, Redeemed) => Ok(None),
    }
}

/// Whether going from `from` to `to` gives the claim's unit back to the coupon.
fn gives_back(from: ClaimStatus, to: ClaimStatus) -> bool {
    from.is_live() && !to.is_live()
}

/// Confirms `claim`, a hold of `owner`'s: it becomes `claimed`. Confirming a claimed (or
/// redeemed) claim again changes nothing and answers the same. Errors: [`Error::ClaimNotFound`]
/// (none, or someone else's), [`Error::HoldExpired`], [`Error::NotActive`]. Alone; a server
/// confirms through [`Confirms`], which shares transactions.
pub fn confirm(pool: &Pool, owner: UserId, claim: ClaimId) -> Result<ClaimRecord, Error> {
    confirm_batch(pool, &[(owner, claim)])
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("confirm left unanswered".into())))
}

/// The most confirms in one transaction.
pub const CONFIRM_BATCH: usize = 64;

/// Confirms, combined: confirms that arrive while a confirm transaction is in flight share the
/// next one (one commit for all, each decided alone by [`next`]), run by one of their callers.
/// A hold-then-confirm checkout so costs a few statements a batch, not a transaction a request.
/// Confirms go in lanes by claim (as many as cores, as claim lanes), so that one batch commits
/// while the next runs. Cheap to clone; clones share the queues.
#[derive(Clone)]
pub struct Confirms {
    lanes: Arc<[ConfirmLane]>,
}

impl Confirms {
    /// Confirms over `pool`, in a lane per core.
    pub fn new(pool: Pool) -> Confirms {
        Confirms::with_lanes(pool, crate::claim::default_claim_lanes())
    }

    /// Confirms over `pool`, in `lanes` lanes (at least one). A lane busy with callbacks keeps
    /// the thread that found it idle running its batches ([`Confirms::confirm_with`]).
    pub fn with_lanes(pool: Pool, lanes: u64) -> Confirms {
        let lanes = lanes.max(1);
        let lane = |_| {
            let pool = pool.clone();
            let run = move |batch: &[(UserId, ClaimId)]| confirm_batch(&pool, batch);
            let failed = || Err(Error::Internal("confirm batch failed".into()));
            Group::new(CONFIRM_BATCH, run, failed)
        };
        Confirms {
            lanes: (0..lanes).map(lane).collect(),
        }
    }

    /// [`confirm`], sharing a transaction with the confirms waiting beside it.
    pub fn confirm(&self, owner: UserId, claim: ClaimId) -> Result<ClaimRecord, Error> {
        self.lane(claim).submit((owner, claim))
    }

    /// [`Confirms::confirm`], answered through `reply` on whichever thread runs its batch.
    /// Returns at once, unless this thread finds the claim's lane idle: then it runs the
    /// lane's batches until none is left queued. With `may_lead` false, a confirm that would
    /// run here is not taken: `reply` comes back, and nothing was done. A server's connection
    /// threads queue confirms so under load, and a worker runs them, with no thread waiting.
    pub fn confirm_with<R: Reply<Result<ClaimRecord, Error>>>(
        &self,
        owner: UserId,
        claim: ClaimId,
        may_lead: bool,
        reply: R,
    ) -> Result<(), R> {
        let mut reply = Some(reply);
        let taken = self.lane(claim).submit_with((owner, claim), may_lead, || {
            let reply = reply.take().expect("taken once");
            Box::new(move |answer| reply.send(answer))
        });
        match reply {
            Some(reply) if !taken => Err(reply),
            _ => Ok(()),
        }
    }

    fn lane(&self, claim: ClaimId) -> &ConfirmLane {
        &self.lanes[(claim.0 % self.lanes.len() as u64) as usize]
    }
}

/// One lane of confirms: an owner's confirm of a claim, answered with the claim.
type ConfirmLane = Group<(UserId, ClaimId), Result<ClaimRecord, Error>>;

/// Confirms in one transaction: one answer each, in order. A fault of the transaction is every
/// request's answer.
fn confirm_batch(pool: &Pool, batch: &[(UserId, ClaimId)]) -> Vec<Result<ClaimRecord, Error>> {
    match transaction(pool, |tx| confirm_many(tx, batch)) {
        Ok(answers) => answers,
        Err(e) => {
            let again = |e: &Error| match e {
                Error::Busy => Error::Busy,
                Error::Unavailable(why) => Error::Unavailable(why.clone()),
                other => Error::Internal(format!("confirm batch: {other}")),
            };
            batch.iter().map(|_| Err(again(&e))).collect()
        }
    }
}

/// Locks the batch's claims in id order (only their rows), decides each confirm in arrival
/// order, then writes the changes, their audit entries and reads the answers, a statement each.
fn confirm_many(
    tx: &mut Transaction<'_>,
    batch: &[(UserId, ClaimId)],
) -> Result<Vec<Result<ClaimRecord, Error>>, Error> {
    let ids: Vec<ClaimId> = batch.iter().map(|&(_, c)| c).collect();
    let mut locked = lock_claims(tx, &ids)?;
    let now = Timestamp::now();
    let mut changed: Vec<u64> = Vec::new();
    let mut moves = Vec::new();
    let mut audit = Vec::new();
    let decided: Vec<Result<ClaimId, Error>> = batch
        .iter()
        .map(|&(owner, id)| {
            let c = locked
                .get_mut(&id)
                .filter(|c| Actor::Owner(owner).may_touch(c.user))
                .ok_or(Error::ClaimNotFound)?;
            if let Some(to) = next(c.status, c.expires_at, now, Action::Confirm)? {
                changed.push(id.0);
                moves.push((c.coupon, Some(c.status), to));
                let detail = serde_json::json!({
                    "user_id": c.user.0, "from": c.status.as_str(), "to": to.as_str()
                });
                audit.push((
                    owner,
                    Action::Confirm.audit_name(),
                    Some(c.coupon),
                    Some(id),
                    detail,
                ));
                c.status = to;
            }
            Ok(id)
        })
        .collect();
    if let Some(&first) = changed.first() {
        counts::record(tx, counts::slot_of(ClaimId(first)), &moves)?;
        let ids = padded(changed.clone());
        tx.exec_drop(
            format!(
                "UPDATE claims SET status = 'claimed' WHERE id IN ({})",
                placeholders(ids.len(), "?")
            ),
            ids,
        )?;
        audit::record_many(tx, &audit)?;
    }
    // A plain read after the locks: current.
    let ok: Vec<ClaimId> = decided
        .iter()
        .filter_map(|d| d.as_ref().ok())
        .copied()
        .collect();
    let records = claim::read_many(tx, &ok)?;
    let confirmed: Vec<events::Pending> = changed
        .iter()
        .map(|&id| events::Pending::ClaimConfirmed(ClaimId(id)))
        .collect();
    events::record_many(tx, &confirmed)?;
    Ok(decided
        .into_iter()
        .map(|d| d.and_then(|id| records.get(&id).cloned().ok_or(Error::ClaimNotFound)))
        .collect())
}

/// Locks claims' rows (only theirs: not their coupons'), in id order, and reads them.
fn lock_claims(
    tx: &mut Transaction<'_>,
    ids: &[ClaimId],
) -> Result<HashMap<ClaimId, Locked>, Error> {
    let mut ids: Vec<u64> = ids.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let ids = padded(ids);
    let rows: Vec<(u64, u64, u64, String, Option<Timestamp>)> = tx.exec(
        format!(
            "SELECT id, user_id, coupon_id, status, expires_at FROM claims
             WHERE id IN ({}) ORDER BY id FOR UPDATE",
            placeholders(ids.len(), "?")
        ),
        ids,
    )?;
    rows.into_iter()
        .map(|(id, user, coupon, status, expires_at)| {
            let c = Locked {
                id: ClaimId(id),
                user: UserId(user),
                coupon: CouponId(coupon),
                status: ClaimStatus::from_db(&status)?,
                expires_at,
            };
            Ok((c.id, c))
        })
        .collect()
}

/// Releases `claim`, a hold: it becomes `released` and its unit goes back to the coupon,
/// exactly once. Errors: [`Error::ClaimNotFound`], [`Error::HoldExpired`], [`Error::NotActive`]
/// (anything but a hold).
pub fn release(pool: &Pool, by: Actor, claim: ClaimId) -> Result<ClaimRecord, Error> {
    end(pool, by, claim, Action::Release, &json_none())
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

/// Voids a held, claimed or redeemed claim: marks it (the row stays) and returns its unit to
/// the coupon, exactly once. Errors: [`Error::ClaimNotFound`], [`Error::AlreadyVoided`],
/// [`Error::NotActive`] (released or expired). `admin` must have been checked as one.
pub fn void(pool: &Pool, admin: UserId, claim: ClaimId, reason: &Label) -> Result<Voided, Error> {
    let detail = serde_json::json!({ "reason": reason.as_str() });
    let record = end(pool, Actor::Admin(admin), claim, Action::Void, &detail)?;
    Ok(Voided {
        claim_id: claim,
        coupon_id: record.claim.coupon_id,
        voided_at: record.voided_at.unwrap_or_else(Timestamp::now),
        voided_by: admin,
        reason: reason.as_str().to_owned(),
    })
}

/// An order a claim is redeemed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The shop's id for it.
    pub id: OrderId,
    /// Its amount, in minor units of `currency`.
    pub amount: u64,
    /// Its currency.
    pub currency: Currency,
}

/// A redeemed claim: the order, and the discount it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Redemption {
    /// The claim.
    pub claim_id: ClaimId,
    /// Its coupon.
    pub coupon_id: CouponId,
    /// `redeemed`.
    pub status: ClaimStatus,
    /// The order's id.
    pub order_id: String,
    /// The order's amount, in minor units.
    pub order_amount: u64,
    /// The order's currency.
    pub currency: String,
    /// What the coupon takes off the order, in minor units ([`coupon::discount`]).
    pub discount_amount: u64,
    /// When it was redeemed (the first time).
    pub redeemed_at: Timestamp,
}

/// The redemption decision, after [`next`] allowed it (`again`: the claim was redeemed
/// before, with `first`): the discount of a new redemption, or `None` to answer the first one
/// again. Pure, so it is table-tested; run under the claim's row lock, so one order wins.
pub fn redemption(
    first: Option<&Redemption>,
    coupon: &Coupon,
    order: &Order,
    now: Timestamp,
) -> Result<Option<u64>, Error> {
    if let Some(first) = first {
        return match first.order_id == order.id.as_str() {
            false => Err(Error::AlreadyRedeemed),
            true if first.order_amount == order.amount
                && first.currency == order.currency.as_str() =>
            {
                Ok(None)
            }
            true => Err(Error::OrderMismatch),
        };
    }
    if coupon.ends_at.is_some_and(|e| now >= e) {
        Err(Error::Expired)
    } else if coupon
        .currency
        .as_ref()
        .is_some_and(|c| c != order.currency.as_str())
    {
        Err(Error::CurrencyMismatch)
    } else if coupon.min_order_amount.is_some_and(|m| order.amount < m) {
        Err(Error::OrderBelowMinimum)
    } else {
        Ok(Some(coupon::discount(coupon, order.amount)))
    }
}

/// Redeems `claim` (held and not run out, or claimed) against `order`, exactly once: the same
/// order again gets the first answer, writing nothing. Locks only the claim's row. Errors:
/// [`Error::ClaimNotFound`] (none, or someone else's to an owner), [`Error::NotActive`],
/// [`Error::HoldExpired`], [`Error::AlreadyRedeemed`], [`Error::OrderMismatch`],
/// [`Error::Expired`] (the coupon ended), [`Error::CurrencyMismatch`],
/// [`Error::OrderBelowMinimum`].
pub fn redeem(pool: &Pool, by: Actor, claim: ClaimId, order: &Order) -> Result<Redemption, Error> {
    transaction(pool, |tx| {
        let c = lock_claim(tx, claim, by)?;
        let now = Timestamp::now();
        let to = next(c.status, c.expires_at, now, Action::Redeem)?;
        // Plain reads, after the lock: current.
        let first = match to {
            None => Some(redeemed(tx, &c)?),
            Some(_) => None,
        };
        let coupon = coupon::read(tx, c.coupon, false)?.ok_or(Error::ClaimNotFound)?;
        let Some(discount) = redemption(first.as_ref(), &coupon, order, now)? else {
            return first.ok_or(Error::Internal("no first redemption".into()));
        };
        tx.exec_drop(
            "UPDATE claims SET status = 'redeemed', order_id = ?, order_amount = ?,
                 order_currency = ?, discount_amount = ?, redeemed_at = ?
             WHERE id = ?",
            (
                order.id.as_str(),
                order.amount,
                order.currency.as_str(),
                discount,
                now,
                claim.0,
            ),
        )?;
        let moves = [(c.coupon, Some(c.status), ClaimStatus::Redeemed)];
        counts::record(tx, counts::slot_of(claim), &moves)?;
        let r = Redemption {
            claim_id: claim,
            coupon_id: c.coupon,
            status: ClaimStatus::Redeemed,
            order_id: order.id.as_str().to_owned(),
            order_amount: order.amount,
            currency: order.currency.as_str().to_owned(),
            discount_amount: discount,
            redeemed_at: now,
        };
        let detail = serde_json::json!({
            "user_id": c.user.0, "from": c.status.as_str(), "to": "redeemed",
            "order_id": r.order_id, "order_amount": r.order_amount, "currency": r.currency,
            "discount_amount": r.discount_amount,
        });
        audit::record(
            tx,
            by.id(),
            Action::Redeem.audit_name(),
            Some(c.coupon),
            Some(claim),
            &detail,
        )?;
        let record = claim::read(tx, claim)?.ok_or(Error::ClaimNotFound)?;
        events::record(tx, Action::Redeem.event_name(), &record)?;
        Ok(r)
    })
}

/// A redeemed claim's redemption, as recorded.
fn redeemed(tx: &mut Transaction<'_>, c: &Locked) -> Result<Redemption, Error> {
    type Row = (String, u64, String, u64, Timestamp);
    let row: Option<Row> = tx.exec_first(
        "SELECT order_id, order_amount, order_currency, discount_amount, redeemed_at
         FROM claims WHERE id = ? AND status = 'redeemed'",
        (c.id.0,),
    )?;
    let (order_id, order_amount, currency, discount_amount, redeemed_at) =
        row.ok_or(Error::Internal("a redeemed claim without its order".into()))?;
    Ok(Redemption {
        claim_id: c.id,
        coupon_id: c.coupon,
        status: ClaimStatus::Redeemed,
        order_id,
        order_amount,
        currency,
        discount_amount,
        redeemed_at,
    })
}

/// Release or void: a change that may give the unit back, under the coupon's lock.
fn end(
    pool: &Pool,
    by: Actor,
    claim: ClaimId,
    action: Action,
    detail: &serde_json::Value,
) -> Result<ClaimRecord, Error> {
    transaction(pool, |tx| {
        // The coupon first, then the claim: the order every change of stock locks in.
        let coupon: Option<u64> =
            tx.exec_first("SELECT coupon_id FROM claims WHERE id = ?", (claim.0,))?;
        let coupon = coupon.ok_or(Error::ClaimNotFound)?;
        tx.exec_drop("SELECT id FROM coupons WHERE id = ? FOR UPDATE", (coupon,))?;
        let c = lock_claim(tx, claim, by)?;
        if let Some(to) = next(c.status, c.expires_at, Timestamp::now(), action)? {
            set_status(tx, &c, to, action, by, detail)?;
            counts::record(
                tx,
                counts::slot_of(claim),
                &[(c.coupon, Some(c.status), to)],
            )?;
        }
        claim::read(tx, claim)?.ok_or(Error::ClaimNotFound)
    })
}

/// What a change of status needs to know of a claim, read under its row lock.
struct Locked {
    id: ClaimId,
    user: UserId,
    coupon: CouponId,
    status: ClaimStatus,
    expires_at: Option<Timestamp>,
}

/// Locks a claim's row (only its row: not its coupon's) and reads it; someone else's claim is
/// not found, unless `by` is an admin.
fn lock_claim(tx: &mut Transaction<'_>, id: ClaimId, by: Actor) -> Result<Locked, Error> {
    lock_claims(tx, &[id])?
        .remove(&id)
        .filter(|c| by.may_touch(c.user))
        .ok_or(Error::ClaimNotFound)
}

/// Moves a locked claim to `to`, gives its unit back if that ends it (the caller holds the
/// coupon's lock then), and records the change in the audit log and the event feed.
fn set_status(
    tx: &mut Transaction<'_>,
    c: &Locked,
    to: ClaimStatus,
    action: Action,
    by: Actor,
    detail: &serde_json::Value,
) -> Result<(), Error> {
    let now = Timestamp::now();
    if action == Action::Void {
        let reason = detail.get("reason").and_then(|r| r.as_str());
        tx.exec_drop(
            "UPDATE claims SET status = ?, voided_at = ?, voided_by = ?, void_reason = ?
             WHERE id = ?",
            (to.as_str(), now, by.id().0, reason, c.id.0),
        )?;
    } else {
        tx.exec_drop(
            "UPDATE claims SET status = ? WHERE id = ?",
            (to.as_str(), c.id.0),
        )?;
    }
    if gives_back(c.status, to) {
        give_back(tx, &[(c.coupon, c.user)])?;
        crate::codes::give_back(tx, c.id)?;
    }
    let mut detail = detail.clone();
    if let Some(d) = detail.as_object_mut() {
        d.insert("user_id".into(), c.user.0.into());
        d.insert("from".into(), c.status.as_str().into());
        d.insert("to".into(), to.as_str().into());
    }
    audit::record(
        tx,
        by.id(),
        action.audit_name(),
        Some(c.coupon),
        Some(c.id),
        &detail,
    )?;
    let record = claim::read(tx, c.id)?.ok_or(Error::ClaimNotFound)?;
    events::record(tx, action.event_name(), &record)
}

fn json_none() -> serde_json::Value {
    serde_json::json!({})
}

/// Gives one unit back to the coupon for each (coupon, user), and takes one off that user's
/// count of it, under the coupons' locks (held by the caller).
fn give_back(tx: &mut Transaction<'_>, ended: &[(CouponId, UserId)]) -> Result<(), Error> {
    for &(coupon, user) in ended {
        tx.exec_drop(
            "UPDATE coupons SET available_count = available_count + 1 WHERE id = ?",
            (coupon.0,),
        )?;
        tx.exec_drop(
            "UPDATE user_coupon_claims SET claimed = GREATEST(claimed - 1, 0)
             WHERE user_id = ? AND coupon_id = ?",
            (user.0, coupon.0),
        )?;
    }
    Ok(())
}

/// The most holds one sweep expires in one transaction.
pub const SWEEP_BATCH: usize = 256;

/// Expires holds that ran out by now, up to [`SWEEP_BATCH`] of them: each becomes `expired`
/// and its unit goes back, exactly once, however many processes sweep at once (each hold is
/// checked again under its coupon's lock). Returns how many it expired; call it again while
/// that is [`SWEEP_BATCH`].
pub fn expire_due(pool: &Pool) -> Result<usize, Error> {
    transaction(pool, |tx| {
        let now = Timestamp::now();
        let due: Vec<(u64, u64)> = tx.exec(
            "SELECT id, coupon_id FROM claims WHERE status = 'held' AND expires_at <= ?
             ORDER BY expires_at LIMIT ?",
            (now, SWEEP_BATCH as u64),
        )?;
        if due.is_empty() {
            return Ok(0);
        }
        let coupons = due.iter().map(|&(_, c)| CouponId(c));
        coupon::lock_many(tx, coupons, coupon::Lock::Wait)?;
        let ids = padded(due.iter().map(|&(id, _)| id).collect());
        // Under the locks, the holds still due: another sweep, a confirm or a release may
        // have come first.
        let still: Vec<(u64, u64, u64)> = tx.exec(
            format!(
                "SELECT id, user_id, coupon_id FROM claims
                 WHERE id IN ({}) AND status = 'held' AND expires_at <= ? ORDER BY id FOR UPDATE",
                placeholders(ids.len(), "?")
            ),
            ids.into_iter()
                .map(Value::from)
                .chain([now.into()])
                .collect::<Vec<Value>>(),
        )?;
        let mut moves = Vec::with_capacity(still.len());
        for &(id, user, coupon) in &still {
            let c = Locked {
                id: ClaimId(id),
                user: UserId(user),
                coupon: CouponId(coupon),
                status: ClaimStatus::Held,
                expires_at: Some(now),
            };
            if let Some(to) = next(c.status, c.expires_at, now, Action::Expire)? {
                set_status(
                    tx,
                    &c,
                    to,
                    Action::Expire,
                    Actor::Admin(UserId(0)),
                    &json_none(),
                )?;
                moves.push((c.coupon, Some(c.status), to));
            }
        }
        // Once, after every claim's lock: counts rows are the last a transaction locks.
        if let Some(&(first, _, _)) = still.first() {
            counts::record(tx, counts::slot_of(ClaimId(first)), &moves)?;
        }
        Ok(still.len())
    })
}

/// A thread that expires holds that ran out ([`expire_due`]) every `every`, until dropped.
/// Any number of processes may run one over the same database.
pub struct Sweeper {
    // Held for its Drop, which stops the thread.
    _ticker: Ticker,
}

impl Sweeper {
    /// Starts sweeping `pool` every `every`; errors (the database away) are retried at the next
    /// turn, and `log` hears of them.
    pub fn start(
        pool: Pool,
        every: Duration,
        log: impl Fn(&Error) + Send + 'static,
    ) -> Result<Sweeper, Error> {
        let turn = move |_: &_| match expire_due(&pool) {
            Ok(n) => n == SWEEP_BATCH,
            Err(e) => {
                log(&e);
                false
            }
        };
        Ok(Sweeper {
            _ticker: Ticker::start("hold-sweeper", every, turn)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClaimStatus::*;

    #[test]
    fn next_decides_every_change_of_a_claims_life() {
        let now = Timestamp::now();
        let hour = Duration::from_secs(3600);
        let (later, gone) = (Some(now.plus(hour)), Some(now));
        type Case = (
            Action,
            ClaimStatus,
            Option<Timestamp>,
            Result<Option<ClaimStatus>, &'static str>,
        );
        let cases: &[Case] = &[
            (Action::Confirm, Held, later, Ok(Some(Claimed))),
            (Action::Confirm, Held, gone, Err("hold_expired")),
            (Action::Confirm, Claimed, None, Ok(None)),
            (Action::Confirm, Redeemed, None, Ok(None)),
            (Action::Confirm, Released, later, Err("not_active")),
            (Action::Confirm, Expired, gone, Err("not_active")),
            (Action::Confirm, Voided, None, Err("not_active")),
            (Action::Release, Held, later, Ok(Some(Released))),
            (Action::Release, Held, gone, Err("hold_expired")),
            (Action::Release, Claimed, None, Err("not_active")),
            (Action::Release, Redeemed, None, Err("not_active")),
            (Action::Release, Released, later, Err("not_active")),
            (Action::Release, Voided, None, Err("not_active")),
            (Action::Redeem, Held, later, Ok(Some(Redeemed))),
            (Action::Redeem, Held, gone, Err("hold_expired")),
            (Action::Redeem, Claimed, None, Ok(Some(Redeemed))),
            (Action::Redeem, Redeemed, None, Ok(None)),
            (Action::Redeem, Expired, gone, Err("not_active")),
            (Action::Redeem, Voided, None, Err("not_active")),
            (Action::Void, Held, later, Ok(Some(Voided))),
            (Action::Void, Held, gone, Ok(Some(Voided))),
            (Action::Void, Claimed, None, Ok(Some(Voided))),
            (Action::Void, Redeemed, None, Ok(Some(Voided))),
            (Action::Void, Voided, None, Err("already_voided")),
            (Action::Void, Released, later, Err("not_active")),
            (Action::Void, Expired, gone, Err("not_active")),
            (Action::Expire, Held, gone, Ok(Some(Expired))),
            (Action::Expire, Held, later, Ok(None)),
            (Action::Expire, Claimed, None, Ok(None)),
            (Action::Expire, Released, later, Ok(None)),
        ];
        for &(action, status, expires_at, want) in cases {
            let got = next(status, expires_at, now, action).map_err(|e| match e {
                Error::HoldExpired => "hold_expired",
                Error::NotActive => "not_active",
                Error::AlreadyVoided => "already_voided",
                _ => "other",
            });
            assert_eq!(got, want, "{action:?} on {status:?}");
        }
        // Exactly the changes that end a live claim give its unit back.
        assert!(gives_back(Held, Released) && gives_back(Held, Expired));
        assert!(gives_back(Claimed, Voided) && gives_back(Redeemed, Voided));
        assert!(!gives_back(Held, Claimed) && !gives_back(Claimed, Redeemed));
    }

    #[test]
    fn redemption_decides_each_order_once() {
        let now = Timestamp::now();
        let hour = Duration::from_secs(3600);
        let mut c = crate::coupon::tests::example();
        c.percent_off = Some(15);
        let order = |id: &str, amount: u64, currency: &str| Order {
            id: OrderId::parse(id).unwrap(),
            amount,
            currency: Currency::parse(currency).unwrap(),
        };
        let a = order("A-1", 12_000, "EUR");
        let first = Redemption {
            claim_id: ClaimId(1),
            coupon_id: c.id,
            status: Redeemed,
            order_id: "A-1".into(),
            order_amount: 12_000,
            currency: "EUR".into(),
            discount_amount: 1_800,
            redeemed_at: now,
        };
        let name = |r: Result<Option<u64>, Error>| {
            r.map_err(|e| match e {
                Error::AlreadyRedeemed => "already_redeemed",
                Error::OrderMismatch => "order_mismatch",
                Error::Expired => "expired",
                Error::CurrencyMismatch => "currency_mismatch",
                Error::OrderBelowMinimum => "order_below_minimum",
                _ => "other",
            })
        };
        assert_eq!(name(redemption(None, &c, &a, now)), Ok(Some(1_800)));
        assert_eq!(name(redemption(Some(&first), &c, &a, now)), Ok(None));
        let other = order("A-2", 12_000, "EUR");
        assert_eq!(
            name(redemption(Some(&first), &c, &other, now)),
            Err("already_redeemed")
        );
        let changed = order("A-1", 12_001, "EUR");
        assert_eq!(
            name(redemption(Some(&first), &c, &changed, now)),
            Err("order_mismatch")
        );
        let usd = order("A-1", 12_000, "USD");
        assert_eq!(
            name(redemption(Some(&first), &c, &usd, now)),
            Err("order_mismatch")
        );
        // A coupon without a currency takes any; with one, only its own.
        assert_eq!(name(redemption(None, &c, &usd, now)), Ok(Some(1_800)));
        let mut euros = c.clone();
        (euros.percent_off, euros.amount_off) = (None, Some(5_000));
        (euros.currency, euros.min_order_amount) = (Some("EUR".into()), Some(10_000));
        assert_eq!(
            name(redemption(None, &euros, &usd, now)),
            Err("currency_mismatch")
        );
        assert_eq!(name(redemption(None, &euros, &a, now)), Ok(Some(5_000)));
        let small = order("A-3", 9_999, "EUR");
        assert_eq!(
            name(redemption(None, &euros, &small, now)),
            Err("order_below_minimum")
        );
        let tiny = order("A-4", 10_000, "EUR");
        assert_eq!(name(redemption(None, &euros, &tiny, now)), Ok(Some(5_000)));
        let mut ended = c.clone();
        ended.ends_at = Some(now.minus(hour));
        assert_eq!(name(redemption(None, &ended, &a, now)), Err("expired"));
        // The first answer stands after the coupon ends.
        assert_eq!(name(redemption(Some(&first), &ended, &a, now)), Ok(None));
        let plain = crate::coupon::tests::example();
        assert_eq!(name(redemption(None, &plain, &a, now)), Ok(Some(0)));
    }
}

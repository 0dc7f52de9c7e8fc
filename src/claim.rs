//! The claim: [`Claims`] makes every claim, alone or combined with others (see
//! `combine.rs`), in one claim transaction; [`verdict`] decides each one.

use crate::codes;
use crate::combine::{Combiner, Leader, Outcome, Run, Ticket};
use crate::counts;
use crate::coupon::{self, lock_many, Coupon, Lock};
use crate::db::{padded, placeholders, transaction, with_conn, Pool};
use crate::error::{OnConstraint, TokenProblem};
use crate::events;
use crate::idempotency::{self, Answer, IdempotencyKey, Keyed, Recorded, RequestDigest};
use crate::{
    ClaimId, ClaimStatus, CouponCode, CouponId, Error, HoldSeconds, Page, Status, Timestamp, UserId,
};
use mysql::prelude::Queryable;
use mysql::{Transaction, Value};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    /// `held` or `claimed` when made; see [`crate::life`] for the rest of its life.
    pub status: ClaimStatus,
    /// When a hold runs out; `None` for a claim made without one.
    pub expires_at: Option<Timestamp>,
    /// The unique code it was given ([`crate::codes`]); `None` for a coupon without codes.
    /// An ended claim still shows the code it had; the code itself went back.
    pub assigned_code: Option<String>,
}

/// What a claim asks for: one unit of `coupon` for `user`, held for a while or claimed
/// outright, named by its id or by its code.
#[derive(Debug, Clone)]
pub struct Ask {
    /// Who claims.
    pub user: UserId,
    /// The coupon.
    pub coupon: CouponId,
    /// Hold the unit this long, to be confirmed, released or left to expire
    /// ([`crate::life`]); `None` claims it outright.
    pub hold: Option<HoldSeconds>,
    /// The code the claimer typed, when the coupon was found by it
    /// ([`crate::coupon::id_for_code`]): checked again under the coupon's lock, so a code
    /// changed or freed in between is [`Error::CouponNotFound`], never another coupon. The
    /// coupon's own code claims any of its units; one of its unique codes claims that code.
    pub code: Option<CouponCode>,
}

impl Ask {
    /// One unit of `coupon` for `user`, outright.
    pub fn new(user: UserId, coupon: CouponId) -> Ask {
        Ask {
            user,
            coupon,
            hold: None,
            code: None,
        }
    }
}

/// A successful claim and the stock left right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The new claim.
    pub claim: Claim,
    /// Units left right after this claim.
    pub available_count: u64,
}

/// The most claims combined into one transaction, unless told otherwise.
pub const CLAIM_BATCH: usize = 64;
/// The most claims combined into one transaction at all: a batch's statements list up to this
/// many values (padded to a power of two), and MariaDB turns `IN` lists of 1,000 and more into
/// a join.
pub const CLAIM_BATCH_LIMIT: usize = 512;

/// Claim lanes, unless told otherwise: this machine's cores. Fewer lanes make bigger batches and
/// fewer transactions; more let a larger database run more of them at once. Measured on two
/// cores (BENCHMARKS.md): 2 lanes did best, 8 gave 30% fewer claims/s over 1,000 coupons.
pub fn default_claim_lanes() -> u64 {
    std::thread::available_parallelism().map_or(2, |n| n.get() as u64)
}

/// How claims are made: the pool, and the combining of concurrent claims into shared
/// transactions. Every claim goes through [`Claims::claim_once`]'s path, alone or combined,
/// and is decided by [`verdict`]. Cheap to clone; clones share their queues, so a process
/// should make one and share it.
///
/// Claims that arrive while a claim transaction of their lane is in flight wait, and then
/// share the next transaction, whatever their coupons: it decides each of them in arrival
/// order, exactly as alone, and commits them together. A lane's transaction never waits for a
/// coupon locked elsewhere (another process, an admin's change): those claims wait by coupon
/// instead, so one locked coupon holds up only its own claims.
#[derive(Clone)]
pub struct Claims {
    pool: Pool,
    max: usize,
    lanes: u64,
    /// `None`: combining off, every claim a batch of one on its caller's thread.
    combining: Option<Combining>,
}

#[derive(Clone)]
struct Combining {
    /// `None`: a lane per coupon (only the per-coupon queues).
    lanes: Option<Arc<Combiner>>,
    /// Claims of coupons a lane's batch found locked elsewhere, waiting for the lock.
    per_coupon: Arc<Combiner>,
}

/// What the claim combining has been doing, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClaimStats {
    /// Claims queued now behind a transaction in flight in their lane.
    pub queued: u64,
    /// Claims so far that shared a transaction with others.
    pub combined: u64,
    /// Transactions so far that carried two or more claims.
    pub batches: u64,
}

impl Claims {
    /// Claims over `pool`, combined in batches of up to [`CLAIM_BATCH`] in
    /// [`default_claim_lanes`] lanes.
    pub fn new(pool: Pool) -> Claims {
        Claims {
            pool,
            max: CLAIM_BATCH,
            lanes: default_claim_lanes(),
            combining: None,
        }
        .with_batching(CLAIM_BATCH)
    }

    /// These claims with batches of at most `max` claims, up to [`CLAIM_BATCH_LIMIT`]; `max`
    /// of 0 or 1 turns combining off, so every claim runs in a transaction of its own (the same
    /// code, a batch of one). Starts new queues: keep the result, not a mix of both.
    pub fn with_batching(mut self, max: usize) -> Claims {
        self.max = max.min(CLAIM_BATCH_LIMIT);
        let run = |lock: Lock| -> Box<Run> {
            let pool = self.pool.clone();
            Box::new(move |batch: &[&Ticket]| claim_batch(&pool, batch, lock))
        };
        self.combining = (self.max > 1).then(|| Combining {
            lanes: (self.lanes > 0).then(|| {
                let lanes = Some(self.lanes);
                Arc::new(Combiner::new(
                    self.max,
                    lanes,
                    Leader::Here,
                    run(Lock::Skip),
                ))
            }),
            // Behind lanes, a coupon's queue waits for a lock held elsewhere: never on the
            // thread of a lane (or of a caller that would not wait). Without lanes, it is the
            // lane.
            per_coupon: Arc::new(Combiner::new(
                self.max,
                None,
                if self.lanes > 0 {
                    Leader::Spawn
                } else {
                    Leader::Here
                },
                run(Lock::Wait),
            )),
        });
        self
    }

    /// These claims in `lanes` lanes: at most that many claim transactions in flight at once
    /// (and those waiting for a coupon locked elsewhere), each for any claims of its lane's
    /// coupons (a coupon is always in the same lane). 0 gives each coupon a lane of its own, so
    /// only claims of one coupon combine. Starts new queues, as [`Claims::with_batching`].
    pub fn with_lanes(mut self, lanes: u64) -> Claims {
        self.lanes = lanes;
        let max = self.max;
        self.with_batching(max)
    }

    /// The pool these claims use.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Claims one unit of `coupon` for `user`, in a transaction that holds the coupon row's
    /// lock from the decision to the commit, so concurrent claims can never take more than the
    /// stock. A user may claim the same coupon again while stock lasts and their limit allows.
    ///
    /// Errors: [`Error::CouponNotFound`] (unknown or deleted), [`Error::Inactive`],
    /// [`Error::NotStarted`], [`Error::Expired`], [`Error::SoldOut`], [`Error::LimitReached`],
    /// [`Error::Token`] if the user no longer exists, [`Error::Busy`] if deadlocks or lock-wait
    /// timeouts outlast the retries, [`Error::Unavailable`] without a database.
    pub fn claim(&self, user: UserId, coupon: CouponId) -> Result<Claimed, Error> {
        self.wait_for(ticket(&Ask::new(user, coupon), None)).result
    }

    /// Any claim: [`Claims::claim`] as `ask` says (held, or by code), guarded by an idempotency
    /// key if one is given (as [`Claims::claim_once`]).
    pub fn ask(&self, ask: &Ask, key: Option<&IdempotencyKey>) -> Answer<Claimed> {
        self.wait_for(ticket(ask, key))
    }

    /// [`Claims::claim`] guarded by an idempotency key: the first request with `key` claims (or
    /// is refused) and records its answer in the same transaction; every later one with the
    /// same key gets that answer again (`replayed`), never a second claim. The key with another
    /// coupon is [`Error::KeyReused`]. [`Error::CouponNotFound`] is not recorded (it depends on
    /// nothing stored): the key stays unused, and a retry is answered afresh.
    pub fn claim_once(
        &self,
        user: UserId,
        coupon: CouponId,
        key: &IdempotencyKey,
    ) -> Answer<Claimed> {
        self.wait_for(ticket(&Ask::new(user, coupon), Some(key)))
    }

    /// [`Claims::claim_once`] (or [`Claims::claim`] without a key) for a caller that does not
    /// wait: `reply` gets the answer, on whichever thread runs the claim's batch. Returns at
    /// once, unless this thread finds the claim's lane idle: then it runs the lane's batches
    /// until no claim is left queued in it. A server answers requests so without a thread per
    /// waiting claim.
    pub fn submit(&self, ask: &Ask, key: Option<&IdempotencyKey>, reply: impl Reply) {
        let ticket = ticket(ask, key);
        if let Err(reply) = self.hand_in(ticket.clone(), reply, true) {
            reply.send(alone(&self.pool, &ticket));
        }
    }

    /// [`Claims::submit`], but only when the claim waits anyway, because its lane has a
    /// batch in flight: then it is queued (`Ok`) and this thread never runs a batch. Otherwise
    /// `reply` comes back, and nothing was done. A server's connection threads queue claims so
    /// under load, without waking a worker to do it.
    pub fn queue<R: Reply>(
        &self,
        ask: &Ask,
        key: Option<&IdempotencyKey>,
        reply: R,
    ) -> Result<(), R> {
        self.hand_in(ticket(ask, key), reply, false)
    }

    /// Leaves `ticket` with its lane's queue (or its coupon's, while that coupon's claims wait
    /// for a lock held elsewhere). `reply` comes back when combining is off, or when the lane
    /// is idle and this thread may not run its batches.
    fn hand_in<R: Reply>(&self, ticket: Ticket, reply: R, may_lead: bool) -> Result<(), R> {
        let Some(c) = &self.combining else {
            return Err(reply);
        };
        let mut reply = Some(reply);
        let by_lane = c
            .lanes
            .as_ref()
            .filter(|_| c.per_coupon.active(ticket.coupon) == 0);
        let taken = match by_lane {
            Some(lanes) => {
                let (per_coupon, again) = (Arc::clone(&c.per_coupon), ticket.clone());
                lanes.submit_with(ticket, may_lead, || {
                    let reply = reply.take().expect("taken once");
                    Box::new(move |outcome: Outcome| match outcome {
                        Some(answer) => reply.send(answer),
                        None => by_coupon(&per_coupon, again, reply),
                    })
                })
            }
            None => c.per_coupon.submit_with(ticket, may_lead, || {
                let reply = reply.take().expect("taken once");
                Box::new(move |o: Outcome| reply.send(o.unwrap_or_else(undecided)))
            }),
        };
        match reply {
            Some(reply) if !taken => Err(reply),
            _ => Ok(()),
        }
    }

    fn wait_for(&self, ticket: Ticket) -> Answer<Claimed> {
        let Some(c) = &self.combining else {
            return alone(&self.pool, &ticket);
        };
        // A lane's batch never waits for a coupon locked elsewhere (it would hold up the lane's
        // other coupons): it leaves those claims undecided, and they queue by coupon instead.
        // While claims of this coupon queue so, the next ones join them at once, in order.
        if let Some(lanes) = c
            .lanes
            .as_ref()
            .filter(|_| c.per_coupon.active(ticket.coupon) == 0)
        {
            if let Some(answer) = lanes.submit(ticket.clone()) {
                return answer;
            }
        }
        c.per_coupon.submit(ticket).unwrap_or_else(undecided)
    }

    /// What the combining has done so far.
    pub fn stats(&self) -> ClaimStats {
        let Some(c) = &self.combining else {
            return ClaimStats::default();
        };
        let all = || c.lanes.iter().chain([&c.per_coupon]);
        let sum = |counter: fn(&Combiner) -> &AtomicU64| {
            all().map(|c| counter(c).load(Ordering::Relaxed)).sum()
        };
        ClaimStats {
            queued: sum(|c| &c.queued),
            combined: sum(|c| &c.combined),
            batches: sum(|c| &c.batches),
        }
    }
}

/// Where an answer goes when its caller does not wait for it (a claim's from
/// [`Claims::submit`], a confirm's from [`crate::life::Confirms::confirm_with`]): a closure,
/// or a type of the caller's that [`Claims::queue`] can give back whole.
pub trait Reply<A = Answer<Claimed>>: Send + 'static {
    /// Takes the answer.
    fn send(self, answer: A);
}

impl<A, F: FnOnce(A) + Send + 'static> Reply<A> for F {
    fn send(self, answer: A) {
        self(answer)
    }
}

/// A claim a lane's batch skipped (its coupon locked elsewhere): it waits by coupon, on a
/// thread of its own, never on the lane's.
fn by_coupon(per_coupon: &Arc<Combiner>, ticket: Ticket, reply: impl Reply) {
    per_coupon.submit_with(ticket, true, || {
        Box::new(move |o: Outcome| reply.send(o.unwrap_or_else(undecided)))
    });
}

fn undecided() -> Answer<Claimed> {
    Answer::new(Err(Error::Internal("claim left undecided".into())))
}

/// A claim request; its idempotency key with what it asks, `claim {coupon}` (and `hold {n}`),
/// digested once. By id or by code, the request is the coupon's.
fn ticket(ask: &Ask, key: Option<&IdempotencyKey>) -> Ticket {
    let request = match ask.hold {
        None => format!("claim {}", ask.coupon),
        Some(h) => format!("claim {} hold {}", ask.coupon, h.get()),
    };
    Ticket {
        coupon: ask.coupon,
        user: ask.user,
        hold: ask.hold,
        code: ask.code.clone(),
        key: key.map(|key| Keyed {
            key: key.clone(),
            request: RequestDigest::of(&request),
        }),
    }
}

/// A claim that meets no other: a batch of one, waiting for its coupon's lock.
fn alone(pool: &Pool, ticket: &Ticket) -> Answer<Claimed> {
    claim_batch(pool, &[ticket], Lock::Wait)
        .pop()
        .flatten()
        .unwrap_or_else(undecided)
}

/// Claims in one transaction: one outcome each, in order. A fault of the transaction is every
/// request's answer, as it would be alone. Only a user deleted since their token was checked
/// fails a batch of several for one request (a foreign key): then each runs alone (after a
/// lane's batch, by coupon) and gets its own answer; nothing was written, the error came
/// before the commit.
fn claim_batch(pool: &Pool, batch: &[&Ticket], lock: Lock) -> Vec<Outcome> {
    let each = |f: &dyn Fn() -> Error| batch.iter().map(|_| Some(Answer::new(Err(f())))).collect();
    match transaction(pool, |tx| take_many(tx, batch, lock)) {
        Ok(answers) => answers,
        Err(Error::Token(TokenProblem::UnknownUser)) if batch.len() > 1 => match lock {
            Lock::Skip => batch.iter().map(|_| None).collect(),
            Lock::Wait => batch.iter().map(|t| Some(alone(pool, t))).collect(),
        },
        Err(Error::Busy) => each(&|| Error::Busy),
        Err(Error::Unavailable(e)) => each(&|| Error::Unavailable(e.clone())),
        Err(Error::Token(p)) => each(&|| Error::Token(p)),
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
    /// Its coupon was locked by another transaction: left, untouched, for a
    /// transaction that waits.
    Skipped,
}

/// The claim transaction, for one request or many: [`verdict`] for each request in order, with
/// each coupon locked once, one write of each kind, and one commit.
///
/// With [`Lock::Wait`] (a lone claim, or a coupon's queue), keys are reserved first, then the
/// coupons locked, waiting for them. With [`Lock::Skip`] (a lane's batch), the coupons are locked first,
/// skipping those another transaction holds, and only the claims on coupons held reserve their
/// keys: a skipped claim is left undecided (`None`) having touched nothing, so a lane's batch
/// never waits for a coupon locked elsewhere, nor for the key of a claim on it (but for a key
/// that such a claim reserved first, sent again with another coupon: see the README).
fn take_many(
    tx: &mut Transaction<'_>,
    batch: &[&Ticket],
    lock: Lock,
) -> Result<Vec<Outcome>, Error> {
    let mut steps: Vec<Step> = batch.iter().map(|_| Step::Open).collect();
    let mut coupons = None;
    if lock == Lock::Skip {
        let held = lock_many(tx, batch.iter().map(|t| t.coupon), Lock::Skip)?;
        let missing = batch
            .iter()
            .map(|t| t.coupon)
            .filter(|c| !held.contains_key(c));
        // Not held: locked elsewhere, or no such coupon (decided here, as not found). A plain
        // read, after every lock, so the snapshot it starts is current for what we hold.
        let elsewhere = coupon::existing(tx, missing)?;
        for (i, t) in batch.iter().enumerate() {
            if elsewhere.contains(&t.coupon) {
                steps[i] = Step::Skipped;
            }
        }
        coupons = Some(held);
    }
    // Keys are locked in one order (user, key), whatever the arrival order, so two batches
    // holding some of the same keys cannot deadlock on them.
    let mut keyed: Vec<(usize, &Keyed)> = (0..batch.len())
        .filter(|&i| matches!(steps[i], Step::Open))
        .filter_map(|i| batch[i].key.as_ref().map(|k| (i, k)))
        .collect();
    keyed.sort_by_key(|&(i, k)| (batch[i].user, k.key.as_str()));
    for (i, k) in keyed {
        steps[i] = match idempotency::reserve(tx, batch[i].user, &k.key, &k.request) {
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
    // Replays read last: no plain read may come before the coupon locks (see `decide`).
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

/// The unique code a claim names, as found under its coupon's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    /// None: any unit (and, for a coupon with codes, any unassigned code).
    Any,
    /// A code of the coupon no live claim holds (nor one granted earlier in the batch).
    Free,
    /// A code of the coupon a live claim holds.
    Used,
}

/// The decision, the only one: whether `user` gets one more unit of `coupon` at `now`, given
/// the claims they hold of it (`held`, counting those granted earlier in the same batch), the
/// units the batch has granted of it so far (`taken`) and the unique code the claim names.
/// `None`: no live coupon. Pure, so that a lone claim and every claim of a batch are decided
/// alike, under the coupon's lock.
pub fn verdict(
    coupon: Option<&Coupon>,
    now: Timestamp,
    held: u64,
    taken: u64,
    named: Named,
) -> Result<(), Error> {
    let c = coupon.ok_or(Error::CouponNotFound)?;
    if c.status != Status::Active {
        Err(Error::Inactive)
    } else if c.starts_at.is_some_and(|s| now < s) {
        Err(Error::NotStarted)
    } else if c.ends_at.is_some_and(|e| now >= e) {
        Err(Error::Expired)
    } else if named == Named::Used {
        Err(Error::CodeUsed)
    } else if c.available_count <= taken {
        Err(Error::SoldOut)
    } else if limit_reached(c, held) {
        Err(Error::LimitReached)
    } else {
        Ok(())
    }
}

/// Whether a user holding `held` claims of `c` has reached its per-user limit.
pub(crate) fn limit_reached(c: &Coupon, held: u64) -> bool {
    c.per_user_limit.is_some_and(|l| held >= u64::from(l))
}

/// Decides the `open` requests in order under their coupons' locks, then writes the granted
/// claims.
fn decide(
    tx: &mut Transaction<'_>,
    batch: &[&Ticket],
    open: &[usize],
    steps: &mut [Step],
    locked: &HashMap<CouponId, Option<Coupon>>,
) -> Result<(), Error> {
    // Live coupons only: a deleted one (locked all the same) or one with no row is not found;
    // so is one whose code is no longer the one the claimer typed (its own, or one of its
    // unique codes).
    let live = |i: usize| locked.get(&batch[i].coupon).and_then(Option::as_ref);
    let typed_unique = |i: usize| {
        let (c, typed) = (live(i)?, batch[i].code.as_ref()?);
        (c.code_count > 0 && !typed.as_str().eq_ignore_ascii_case(&c.code)).then_some(typed)
    };
    let typed: Vec<&str> = open
        .iter()
        .filter_map(|&i| typed_unique(i))
        .map(CouponCode::as_str)
        .collect();
    let named = match typed.is_empty() {
        true => HashMap::new(),
        false => codes::named(tx, &typed)?,
    };
    let unique = |i: usize| {
        let code = typed_unique(i)?.as_str().to_ascii_lowercase();
        named
            .get(&code)
            .filter(|n| Some(n.coupon) == live(i).map(|c| c.id))
    };
    let coupon = |i: usize| {
        let typed = batch[i].code.as_ref();
        live(i).filter(|c| {
            typed.is_none_or(|t| t.as_str().eq_ignore_ascii_case(&c.code)) || unique(i).is_some()
        })
    };
    let now = Timestamp::now();
    // A plain read, after every lock: the snapshot starts here, and every change to these
    // counts is made under a lock we hold, so they are current.
    let limited = open
        .iter()
        .filter(|&&i| coupon(i).is_some_and(|c| c.per_user_limit.is_some()))
        .map(|&i| (batch[i].user, batch[i].coupon));
    let mut held = held_counts(tx, limited)?;
    let mut taken: HashMap<CouponId, u64> = HashMap::new();
    let mut granted = Vec::new();
    // Unique codes granted in this batch, by id.
    let mut given: HashSet<u64> = HashSet::new();
    for &i in open {
        let pair = (batch[i].user, batch[i].coupon);
        let n = taken.get(&pair.1).copied().unwrap_or(0);
        let held = held.entry(pair).or_insert(0);
        let code = unique(i);
        let state = match code {
            None => Named::Any,
            Some(c) if c.used || given.contains(&c.id) => Named::Used,
            Some(_) => Named::Free,
        };
        match verdict(coupon(i), now, *held, n, state) {
            Ok(()) => {
                taken.insert(pair.1, n + 1);
                *held += 1;
                given.extend(code.map(|c| c.id));
                granted.push((i, coupon(i).ok_or(Error::CouponNotFound)?, code));
            }
            Err(refusal) => steps[i] = Step::Done(Err(refusal)),
        }
    }
    if granted.is_empty() {
        return Ok(());
    }
    let assigned = assign_codes(tx, &granted, &given)?;
    let counted: Vec<((UserId, CouponId), u64)> = granted
        .iter()
        .filter(|(_, c, _)| c.per_user_limit.is_some())
        .map(|&(i, _, _)| (batch[i].user, batch[i].coupon))
        .map(|pair| (pair, held[&pair]))
        .collect();
    write_counts(tx, counted)?;
    take_stock(tx, &taken)?;
    let rows: Vec<NewClaim> = granted
        .iter()
        .zip(&assigned)
        .map(|(&(i, c, _), code)| NewClaim {
            user: batch[i].user,
            coupon: c,
            expires_at: batch[i].hold.map(|h| now.plus(h.duration())),
            assigned_code: code.as_ref().map(|(_, code)| code.as_str()),
        })
        .collect();
    let moves: Vec<_> = rows
        .iter()
        .map(|r| (r.coupon.id, None, r.status()))
        .collect();
    counts::record(tx, counts::NEW_CLAIMS, &moves)?;
    let ids = insert_claims(tx, now, &rows)?;
    let pairs: Vec<(u64, ClaimId)> = assigned
        .iter()
        .zip(&ids)
        .filter_map(|(code, &id)| code.as_ref().map(|&(code, _)| (code, id)))
        .collect();
    codes::assign(tx, &pairs)?;
    // Each coupon's stock right after each of its claims, in order.
    let mut left: HashMap<CouponId, u64> = HashMap::new();
    let mut created = Vec::with_capacity(granted.len());
    for ((&(i, c, _), row), id) in granted.iter().zip(&rows).zip(ids) {
        let left = left.entry(c.id).or_insert(c.available_count);
        *left -= 1;
        let claim = Claim {
            id,
            coupon_id: c.id,
            code: c.code.clone(),
            name: c.name.clone(),
            claimed_at: now,
            status: row.status(),
            expires_at: row.expires_at,
            assigned_code: row.assigned_code.map(str::to_owned),
        };
        created.push(events::Pending::ClaimCreated(id));
        steps[i] = Step::Done(Ok(Claimed {
            claim,
            available_count: *left,
        }));
    }
    // The batch's events in one row, in this transaction: one each exactly when its claim
    // commits (each only its claim's id: the rest is in the claim row).
    events::record_many(tx, &created)
}

/// The code (id, code) each granted claim gets, in order: the unique code it named, or for a
/// coupon with codes one of its unassigned ones not named in the batch (`given`), those that
/// came back first, then fresh ones in id order; `None` for a coupon without codes, which
/// reads and writes nothing here. Moves the cursors: a constant number of statements for the
/// whole batch.
fn assign_codes(
    tx: &mut Transaction<'_>,
    granted: &[(usize, &Coupon, Option<&codes::Named>)],
    given: &HashSet<u64>,
) -> Result<Vec<Option<(u64, String)>>, Error> {
    let mut wants: Vec<(&Coupon, u64)> = Vec::new();
    for &(_, c, named) in granted {
        if c.code_count > 0 && named.is_none() {
            match wants.iter_mut().find(|(w, _)| w.id == c.id) {
                Some(w) => w.1 += 1,
                None => wants.push((c, 1)),
            }
        }
    }
    // Named codes the cursor has passed are among the returned ones: taken off them too.
    let named_back: Vec<(CouponId, u64)> = granted
        .iter()
        .filter_map(|&(_, c, named)| named.map(|n| (c, n)))
        .filter(|(c, n)| n.id <= c.cursor.handed_out_to)
        .map(|(c, n)| (c.id, n.id))
        .collect();
    if wants.is_empty() && named_back.is_empty() {
        return Ok(granted
            .iter()
            .map(|(_, _, named)| named.map(|n| (n.id, n.code.clone())))
            .collect());
    }
    let mut picked = codes::pick(tx, &wants, given)?;
    let mut moves: Vec<(CouponId, u64, u64)> = Vec::new();
    let mut returned: Vec<u64> = Vec::new();
    for (c, _) in &wants {
        let p = &picked[&c.id];
        let back = named_back.iter().filter(|(id, _)| *id == c.id).count();
        moves.push((c.id, p.cursor, (p.returned.len() + back) as u64));
        returned.extend(&p.returned);
    }
    for &(coupon, code) in &named_back {
        returned.push(code);
        if !wants.iter().any(|(c, _)| c.id == coupon) {
            let at = granted.iter().find(|g| g.1.id == coupon);
            let cursor = at.map_or(0, |g| g.1.cursor.handed_out_to);
            match moves.iter_mut().find(|m| m.0 == coupon) {
                Some(m) => m.2 += 1,
                None => moves.push((coupon, cursor, 1)),
            }
        }
    }
    codes::advance(tx, &moves, &returned)?;
    for p in picked.values_mut() {
        p.codes.reverse();
    }
    granted
        .iter()
        .map(|&(_, c, named)| match named {
            Some(n) => Ok(Some((n.id, n.code.clone()))),
            None if c.code_count == 0 => Ok(None),
            None => picked
                .get_mut(&c.id)
                .and_then(|p| p.codes.pop())
                .map(Some)
                .ok_or_else(|| Error::Internal("fewer unassigned codes than units".into())),
        })
        .collect()
}

/// How many claims of the coupon each (user, coupon) pair holds, as the per-user counters say
/// (pairs with no counter are missing), in one statement.
fn held_counts(
    tx: &mut Transaction<'_>,
    pairs: impl Iterator<Item = (UserId, CouponId)>,
) -> Result<HashMap<(UserId, CouponId), u64>, Error> {
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
    // By the primary key (user_id, coupon_id): a point lookup for each combination. Forced:
    // MariaDB may choose the coupon's index instead and test every user of a hot coupon
    // against the list, a batch's cost growing with the coupon's users.
    let sql = format!(
        "SELECT user_id, coupon_id, claimed FROM user_coupon_claims FORCE INDEX (PRIMARY)
         WHERE user_id IN ({}) AND coupon_id IN ({})",
        placeholders(users.len(), "?"),
        placeholders(coupons.len(), "?")
    );
    let params: Vec<Value> = users.into_iter().chain(coupons).map(Value::from).collect();
    let rows: Vec<(u64, u64, u64)> = tx.exec(sql, params)?;
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
    mut counts: Vec<((UserId, CouponId), u64)>,
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

/// A claim row to insert: held until `expires_at`, or claimed outright.
struct NewClaim<'a> {
    user: UserId,
    coupon: &'a Coupon,
    expires_at: Option<Timestamp>,
    assigned_code: Option<&'a str>,
}

impl NewClaim<'_> {
    fn status(&self) -> ClaimStatus {
        match self.expires_at {
            Some(_) => ClaimStatus::Held,
            None => ClaimStatus::Claimed,
        }
    }
}

/// Inserts the claim rows, in order, and returns their ids in the same order.
fn insert_claims(
    tx: &mut Transaction<'_>,
    now: Timestamp,
    rows: &[NewClaim],
) -> Result<Vec<ClaimId>, Error> {
    let mut first = None;
    let mut rest = rows;
    // In chunks of 32, 16, ..., 1 rows: a handful of statements to prepare and cache.
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(1 << rest.len().ilog2());
        let sql = format!(
            "INSERT INTO claims (user_id, coupon_id, claimed_at, code, name, status, expires_at,
                 assigned_code)
             VALUES {}",
            placeholders(chunk.len(), "(?, ?, ?, ?, ?, ?, ?, ?)")
        );
        let params: Vec<Value> = chunk
            .iter()
            .flat_map(|r| {
                [
                    r.user.0.into(),
                    r.coupon.id.0.into(),
                    now.into(),
                    r.coupon.code.as_str().into(),
                    r.coupon.name.as_deref().into(),
                    r.status().as_str().into(),
                    r.expires_at.into(),
                    r.assigned_code.into(),
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
    let mut coupons: Vec<u64> = rows.iter().map(|r| r.coupon.id.0).collect();
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
        let why = format!(
            "{} of {} claim rows from id {first} found after their insert",
            ids.len(),
            rows.len()
        );
        // None of them: the transaction was rolled back under us, and a retry is clean. Some:
        // not a rollback we know, and a retry might claim twice; an error, not retried.
        return Err(if ids.is_empty() {
            Error::rolled_back(&why)
        } else {
            Error::Internal(why)
        });
    }
    Ok(ids.into_iter().map(ClaimId).collect())
}

/// What an idempotency key keeps of a claim's answer.
enum Kept {
    /// The outcome, the claim's id and the stock left: replayed to every retry.
    Answer(&'static str, Option<u64>, Option<i64>),
    /// Nothing: the answer depends on nothing stored (no such coupon, or a deleted one, which
    /// stays deleted), so a retry gets it again anyway. The reserved row is deleted, so a flood
    /// of claims on made-up coupons leaves no rows behind.
    Nothing,
}

/// What an idempotency key keeps of a claim's result. `None` for an error that is no answer
/// (the transaction fails with it instead).
fn to_record(result: &Result<Claimed, Error>) -> Option<Kept> {
    match result {
        Ok(c) => Some(Kept::Answer(
            "claimed",
            Some(c.claim.id.0),
            Some(c.available_count as i64),
        )),
        Err(Error::CouponNotFound) => Some(Kept::Nothing),
        Err(e) => e.outcome().map(|name| Kept::Answer(name, None, None)),
    }
}

/// Records every keyed open request's answer in one statement (their rows are reserved), and
/// deletes in another the reservations of answers not kept ([`Kept::Nothing`]): in this
/// transaction, which holds their rows' locks from the reservation, so no row is left after
/// the commit. A request with the same key waiting on the row then reserves it afresh (two
/// or more waiting may deadlock on the freed row: the database picks one, which is retried).
fn record_keys(
    tx: &mut Transaction<'_>,
    batch: &[&Ticket],
    open: &[usize],
    steps: &[Step],
) -> Result<(), Error> {
    let now = Timestamp::now();
    let mut rows: Vec<[Value; 7]> = Vec::new();
    let mut forget: Vec<[Value; 2]> = Vec::new();
    for &i in open {
        let (Some(k), Step::Done(result)) = (&batch[i].key, &steps[i]) else {
            continue;
        };
        let (user, key) = (batch[i].user.0.into(), k.key.as_str().into());
        match to_record(result) {
            Some(Kept::Answer(outcome, id, count)) => rows.push([
                user,
                key,
                k.request.as_str().into(),
                outcome.into(),
                id.into(),
                count.into(),
                now.into(),
            ]),
            Some(Kept::Nothing) => forget.push([user, key]),
            None => {
                let e = result
                    .as_ref()
                    .err()
                    .map(Error::to_string)
                    .unwrap_or_default();
                return Err(Error::Internal(format!("no outcome to record for {e}")));
            }
        }
    }
    if !rows.is_empty() {
        let rows = padded(rows);
        let sql = format!(
            "INSERT INTO idempotency_keys
               (user_id, idem_key, request_sha256, outcome, result_id, result_count, created_at)
             VALUES {}
             ON DUPLICATE KEY UPDATE outcome = VALUES(outcome), result_id = VALUES(result_id),
               result_count = VALUES(result_count)",
            placeholders(rows.len(), "(?, ?, ?, ?, ?, ?, ?)")
        );
        tx.exec_drop(sql, rows.concat())?;
    }
    if !forget.is_empty() {
        // By the primary key (user_id, idem_key): a point delete for each.
        let forget = padded(forget);
        let sql = format!(
            "DELETE FROM idempotency_keys WHERE {}",
            vec!["(user_id = ? AND idem_key = ?)"; forget.len()].join(" OR ")
        );
        tx.exec_drop(sql, forget.concat())?;
    }
    Ok(())
}

/// The answer recorded for an idempotency key, again, with the claim as it is now.
fn replay(tx: &mut Transaction<'_>, first: Recorded) -> Result<Answer<Claimed>, Error> {
    let result = match (first.outcome.as_str(), first.result_id) {
        ("claimed", Some(id)) => Ok(Claimed {
            claim: read(tx, ClaimId(id))?
                .ok_or(Error::Internal("recorded claim is missing".into()))?
                .claim,
            available_count: first.result_count.unwrap_or(0).max(0) as u64,
        }),
        (outcome, _) => Err(Error::from_outcome(outcome)),
    };
    Ok(Answer {
        result,
        replayed: true,
    })
}

/// Whether a user may claim a coupon now, decided as a claim would be ([`verdict`]), without a
/// claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Eligibility {
    /// The coupon.
    pub coupon_id: CouponId,
    /// Whether a claim now would be granted (unless others take the stock first).
    pub eligible: bool,
    /// Why not: `sold_out`, `inactive`, `not_started`, `expired` or `limit_reached`.
    pub reason: Option<&'static str>,
    /// Units left.
    pub available_count: u64,
    /// The user's held, claimed and redeemed claims of it.
    pub claimed_by_you: u64,
}

/// [`Eligibility`] of `coupon` for `user`: reads only. [`Error::CouponNotFound`] for an
/// unknown or deleted coupon.
pub fn eligibility(pool: &Pool, user: UserId, coupon: CouponId) -> Result<Eligibility, Error> {
    with_conn(pool, |conn| {
        let c = coupon::read(&mut **conn, coupon, true)?.ok_or(Error::CouponNotFound)?;
        let held: Option<u64> = conn.exec_first(
            "SELECT COUNT(*) FROM claims WHERE user_id = ? AND coupon_id = ?
               AND status IN ('held', 'claimed', 'redeemed')",
            (user.0, coupon.0),
        )?;
        let held = held.unwrap_or(0);
        let reason = verdict(Some(&c), Timestamp::now(), held, 0, Named::Any)
            .err()
            .map(|e| e.outcome().unwrap_or("internal"));
        Ok(Eligibility {
            coupon_id: coupon,
            eligible: reason.is_none(),
            reason,
            available_count: c.available_count,
            claimed_by_you: held,
        })
    })
}

/// A claim with everything its life has recorded: who holds it, and its redemption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimRecord {
    /// The claim.
    #[serde(flatten)]
    pub claim: Claim,
    /// Who claimed.
    pub user_id: UserId,
    /// When it was redeemed, if it was.
    pub redeemed_at: Option<Timestamp>,
    /// The order it was redeemed against.
    pub order_id: Option<String>,
    /// The order's amount, in minor units.
    pub order_amount: Option<u64>,
    /// The order's currency.
    pub order_currency: Option<String>,
    /// The discount the order got, in minor units.
    pub discount_amount: Option<u64>,
    /// When an admin voided it, if one did.
    pub voided_at: Option<Timestamp>,
    /// Why it was voided.
    pub void_reason: Option<String>,
}

impl ClaimRecord {
    /// A claim just made by `user`: nothing recorded of its life yet.
    pub(crate) fn new(claim: Claim, user: UserId) -> ClaimRecord {
        ClaimRecord {
            claim,
            user_id: user,
            redeemed_at: None,
            order_id: None,
            order_amount: None,
            order_currency: None,
            discount_amount: None,
            voided_at: None,
            void_reason: None,
        }
    }
}

/// Claims as they were made (`held` or `claimed`, nothing of their life after), from the
/// columns of a claim row that never change: the data of their `claim.created` events.
pub(crate) fn as_created(
    conn: &mut impl Queryable,
    ids: &[ClaimId],
) -> Result<HashMap<ClaimId, ClaimRecord>, Error> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(CLAIM_BATCH_LIMIT) {
        let ids = padded(chunk.iter().map(|c| c.0).collect());
        type Row = (
            u64,
            u64,
            String,
            Option<String>,
            Timestamp,
            Option<Timestamp>,
            u64,
            Option<String>,
        );
        let rows: Vec<Row> = conn.exec(
            format!(
                // The claim's own name, NULL when its coupon had none then: the coupon's name
                // may be set later (its code may not, once claimed).
                "SELECT STRAIGHT_JOIN cl.id, cl.coupon_id, COALESCE(cl.code, co.code), cl.name,
                     cl.claimed_at, cl.expires_at, cl.user_id, cl.assigned_code
                 FROM claims cl FORCE INDEX (PRIMARY) JOIN coupons co ON co.id = cl.coupon_id
                 WHERE cl.id IN ({})",
                placeholders(ids.len(), "?")
            ),
            ids,
        )?;
        for (id, coupon, code, name, claimed_at, expires_at, user, assigned_code) in rows {
            let claim = Claim {
                id: ClaimId(id),
                coupon_id: CouponId(coupon),
                code,
                name,
                claimed_at,
                status: match expires_at {
                    Some(_) => ClaimStatus::Held,
                    None => ClaimStatus::Claimed,
                },
                expires_at,
                assigned_code,
            };
            out.insert(ClaimId(id), ClaimRecord::new(claim, UserId(user)));
        }
    }
    Ok(out)
}

/// The columns [`record`] reads, of `claims cl JOIN coupons co`.
const RECORD: &str = "cl.id, cl.coupon_id, COALESCE(cl.code, co.code), COALESCE(cl.name, co.name),
    cl.claimed_at, cl.status, cl.expires_at, cl.user_id, cl.redeemed_at, cl.order_id,
    cl.order_amount, cl.order_currency, cl.discount_amount, cl.voided_at, cl.void_reason,
    cl.assigned_code";

/// A row of [`RECORD`].
fn record(mut row: mysql::Row) -> Result<ClaimRecord, Error> {
    fn col<T: mysql::prelude::FromValue>(row: &mut mysql::Row, i: usize) -> Result<T, Error> {
        row.take_opt(i)
            .ok_or_else(|| Error::Internal(format!("claim row has no column {i}")))?
            .map_err(|e| Error::Internal(format!("claim row, column {i}: {e}")))
    }
    let r = &mut row;
    Ok(ClaimRecord {
        claim: Claim {
            id: ClaimId(col(r, 0)?),
            coupon_id: CouponId(col(r, 1)?),
            code: col(r, 2)?,
            name: col(r, 3)?,
            claimed_at: col(r, 4)?,
            status: ClaimStatus::from_db(&col::<String>(r, 5)?)?,
            expires_at: col(r, 6)?,
            assigned_code: col(r, 15)?,
        },
        user_id: UserId(col(r, 7)?),
        redeemed_at: col(r, 8)?,
        order_id: col(r, 9)?,
        order_amount: col(r, 10)?,
        order_currency: col(r, 11)?,
        discount_amount: col(r, 12)?,
        voided_at: col(r, 13)?,
        void_reason: col(r, 14)?,
    })
}

/// One claim, as it is now, by a plain read (no lock).
pub(crate) fn read(conn: &mut impl Queryable, id: ClaimId) -> Result<Option<ClaimRecord>, Error> {
    Ok(read_many(conn, &[id])?.remove(&id))
}

/// Claims, as they are now, by one plain read; ids with no claim are left out.
pub(crate) fn read_many(
    conn: &mut impl Queryable,
    ids: &[ClaimId],
) -> Result<HashMap<ClaimId, ClaimRecord>, Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut ids: Vec<u64> = ids.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let ids = padded(ids);
    // Claims first, by primary key. Left to itself, MariaDB may read the coupon first and then
    // every claim of it through (coupon_id, id), testing each against the list: on a hot
    // coupon that was half of the database's time in held-then-confirmed claims.
    let rows: Vec<mysql::Row> = conn.exec(
        format!(
            "SELECT STRAIGHT_JOIN {RECORD}
             FROM claims cl FORCE INDEX (PRIMARY) JOIN coupons co ON co.id = cl.coupon_id
             WHERE cl.id IN ({})",
            placeholders(ids.len(), "?")
        ),
        ids,
    )?;
    rows.into_iter()
        .map(|row| record(row).map(|r| (r.claim.id, r)))
        .collect()
}

/// A claim as admins see it, with who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CouponClaim {
    /// The claim's id.
    pub claim_id: ClaimId,
    /// Their email.
    pub email: String,
    /// The claim and its life.
    #[serde(flatten)]
    pub record: ClaimRecord,
}

/// A coupon's claims, oldest first (voided ones included).
pub fn coupon_claims(pool: &Pool, coupon: CouponId, page: Page) -> Result<Vec<CouponClaim>, Error> {
    with_conn(pool, |conn| {
        let exists: Option<u64> =
            conn.exec_first("SELECT id FROM coupons WHERE id = ?", (coupon.0,))?;
        exists.ok_or(Error::CouponNotFound)?;
        let rows: Vec<mysql::Row> = conn.exec(
            format!(
                "SELECT STRAIGHT_JOIN {RECORD}, u.email
                 FROM claims cl JOIN coupons co ON co.id = cl.coupon_id JOIN users u ON u.id = cl.user_id
                 WHERE cl.coupon_id = ? AND cl.id > ? ORDER BY cl.id LIMIT ?"
            ),
            (coupon.0, page.after.unwrap_or(0), page.limit),
        )?;
        rows.into_iter()
            .map(|mut row| {
                let email: String = row.take(16).unwrap_or_default();
                let record = record(row)?;
                Ok(CouponClaim {
                    claim_id: record.claim.id,
                    email,
                    record,
                })
            })
            .collect()
    })
}

/// One line of a user's claim history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// The claim's id.
    pub claim_id: ClaimId,
    /// The claim and its life.
    #[serde(flatten)]
    pub record: ClaimRecord,
}

/// The user's claims, newest first, including claims of coupons deleted since.
pub fn history(pool: &Pool, user: UserId, page: Page) -> Result<Vec<HistoryEntry>, Error> {
    with_conn(pool, |conn| {
        let exists: Option<u64> =
            conn.exec_first("SELECT id FROM users WHERE id = ?", (user.0,))?;
        if exists.is_none() {
            return Err(Error::Token(TokenProblem::UnknownUser));
        }
        let rows: Vec<mysql::Row> = conn.exec(
            format!(
                "SELECT STRAIGHT_JOIN {RECORD} FROM claims cl JOIN coupons co ON co.id = cl.coupon_id
                 WHERE cl.user_id = ? AND cl.id < ? ORDER BY cl.id DESC LIMIT ?"
            ),
            (user.0, page.after.unwrap_or(u64::MAX), page.limit),
        )?;
        rows.into_iter()
            .map(|row| {
                let record = record(row)?;
                Ok(HistoryEntry {
                    claim_id: record.claim.id,
                    record,
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn coupon() -> Coupon {
        crate::coupon::tests::example()
    }

    #[track_caller]
    fn check(
        case: &str,
        c: Option<&Coupon>,
        now: Timestamp,
        held: u64,
        taken: u64,
        want: Result<(), &str>,
    ) {
        let got = verdict(c, now, held, taken, Named::Any)
            .map_err(|e| e.outcome().unwrap_or("no outcome"));
        assert_eq!(got, want, "{case}");
    }

    #[test]
    fn the_verdict_decides_every_claim_the_same_way() {
        let now = Timestamp::now();
        let hour = Duration::from_secs(3600);
        let with = |f: &dyn Fn(&mut Coupon)| {
            let mut c = coupon();
            f(&mut c);
            c
        };
        let plain = coupon();
        let inactive = with(&|c| c.status = Status::Inactive);
        let later = with(&|c| c.starts_at = Some(now.plus(hour)));
        let started = with(&|c| c.starts_at = Some(now));
        let ended = with(&|c| c.ends_at = Some(now));
        let ending = with(&|c| c.ends_at = Some(now.plus(hour)));
        let limited = with(&|c| c.per_user_limit = Some(2));
        let empty = with(&|c| c.available_count = 0);
        // Inactive and outside the window beat sold out; sold out beats the user's limit.
        let inactive_empty = with(&|c| {
            c.status = Status::Inactive;
            c.available_count = 0
        });
        let ended_empty = with(&|c| {
            c.ends_at = Some(now.minus(hour));
            c.available_count = 0
        });
        let empty_limited = with(&|c| {
            c.available_count = 0;
            c.per_user_limit = Some(1)
        });
        check("no live coupon", None, now, 0, 0, Err("coupon_not_found"));
        check("plain", Some(&plain), now, 0, 0, Ok(()));
        check("plain, held many", Some(&plain), now, 99, 0, Ok(()));
        check("the last unit", Some(&plain), now, 0, 2, Ok(()));
        check(
            "sold out in the batch",
            Some(&plain),
            now,
            0,
            3,
            Err("sold_out"),
        );
        check("sold out", Some(&empty), now, 0, 0, Err("sold_out"));
        check("inactive", Some(&inactive), now, 0, 0, Err("inactive"));
        check("not started", Some(&later), now, 0, 0, Err("not_started"));
        check("starts now", Some(&started), now, 0, 0, Ok(()));
        check("ends now", Some(&ended), now, 0, 0, Err("expired"));
        check("ends later", Some(&ending), now, 0, 0, Ok(()));
        check("under the limit", Some(&limited), now, 1, 0, Ok(()));
        check(
            "at the limit",
            Some(&limited),
            now,
            2,
            0,
            Err("limit_reached"),
        );
        check(
            "over the limit",
            Some(&limited),
            now,
            3,
            1,
            Err("limit_reached"),
        );
        check(
            "inactive first",
            Some(&inactive_empty),
            now,
            0,
            0,
            Err("inactive"),
        );
        check(
            "expired first",
            Some(&ended_empty),
            now,
            0,
            0,
            Err("expired"),
        );
        check(
            "sold out first",
            Some(&empty_limited),
            now,
            5,
            0,
            Err("sold_out"),
        );
    }
}

//! Claim combining: concurrent claims share one transaction.
//!
//! A hot coupon is one row, and one transaction at a time can hold its lock; per-claim
//! transactions are capped by how fast that row is locked, changed and committed. Claims spread
//! over many coupons are capped by the database's cost per transaction. So claims go in lanes
//! (a coupon is always in the same lane), and a lane has at most one claim transaction in
//! flight. The first claim in an idle lane runs at once (a quiet service waits for nothing).
//! Claims that arrive while its transaction is in flight queue; when it ends, the next
//! transaction takes them all (up to the limit), in arrival order, whatever their coupons. No
//! timer, no window.
//!
//! This is the only place a claim waits. A request either waits on its own thread (a blocking
//! caller), or leaves a callback and its thread goes on (the server). A batch runs on a thread
//! that is there anyway: the one that found the lane idle, or a waiting caller of the batch.
//! When only callbacks are queued, the thread that ran the last batch runs the next one, and
//! so on until the lane is idle; a combiner whose batches may wait for a lock
//! ([`Leader::Spawn`]) starts a thread for that instead of taking the caller's.

use crate::claim::Claimed;
use crate::idempotency::{Answer, Keyed};
use crate::{CouponCode, CouponId, Error, HoldSeconds, UserId};
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a claim request gets from its batch: an answer, or `None` when the batch left it
/// undecided (its coupon was locked by another transaction, and the batch did not wait).
pub(crate) type Outcome = Option<Answer<Claimed>>;

/// Where an answer goes when its caller did not wait for it.
pub(crate) type Callback = Box<dyn FnOnce(Outcome) + Send>;

/// Runs one batch: a claim transaction for the tickets, one outcome each, in order.
pub(crate) type Run = dyn Fn(&[&Ticket]) -> Vec<Outcome> + Send + Sync;

/// One claim request: which coupon, who, how (see [`crate::claim::Ask`]), and the idempotency
/// key it came with.
#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    pub coupon: CouponId,
    pub user: UserId,
    pub hold: Option<HoldSeconds>,
    pub code: Option<CouponCode>,
    pub key: Option<Keyed>,
}

/// Which thread runs a batch when only callbacks are there to run it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leader {
    /// The caller's: a lane's batches never wait for a lock held elsewhere.
    Here,
    /// A new thread: these batches wait for locks, and the caller may be a lane's leader.
    Spawn,
}

/// The queues of claims waiting for their lane's transaction in flight.
pub(crate) struct Combiner {
    max: usize,
    /// `None`: a lane per coupon.
    lanes: Option<u64>,
    leader: Leader,
    run: Box<Run>,
    inner: Mutex<Inner>,
    /// Claims in a queue now.
    pub queued: AtomicU64,
    /// Claims that went in a batch of two or more, so far.
    pub combined: AtomicU64,
    /// Batches of two or more, so far.
    pub batches: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// A lane has an entry exactly while a transaction of it is in flight.
    queues: HashMap<u64, Vec<Arc<Waiter>>>,
    /// Claims of each coupon in this combiner now, queued or in a transaction.
    active: HashMap<CouponId, usize>,
}

struct Waiter {
    ticket: Ticket,
    reply: Reply,
}

enum Reply {
    /// A caller waiting on its thread; it may be told to lead a batch.
    Thread {
        state: Mutex<State>,
        changed: Condvar,
    },
    /// A caller that went on; taken when the answer comes.
    Call(Mutex<Option<Callback>>),
}

enum State {
    Queued,
    Leads(Vec<Arc<Waiter>>),
    Answered(Outcome),
}

impl Combiner {
    /// Batches of at most `max` claims, in `lanes` lanes (`None`: a lane per coupon), each run
    /// by `run`.
    pub fn new(max: usize, lanes: Option<u64>, leader: Leader, run: Box<Run>) -> Combiner {
        Combiner {
            max: max.max(1),
            lanes: lanes.map(|n| n.max(1)),
            leader,
            run,
            inner: Mutex::default(),
            queued: AtomicU64::new(0),
            combined: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    fn lane(&self, coupon: CouponId) -> u64 {
        // Hashed: ids stepped by a cluster's auto_increment_increment would share a remainder.
        self.lanes.map_or(coupon.0, |n| {
            (coupon.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % n
        })
    }

    /// Runs `ticket` together with concurrent tickets of its lane, waiting for its answer.
    pub fn submit(&self, ticket: Ticket) -> Outcome {
        let me = Arc::new(Waiter {
            ticket,
            reply: Reply::Thread {
                state: Mutex::new(State::Queued),
                changed: Condvar::new(),
            },
        });
        let lane = self.lane(me.ticket.coupon);
        let batch = match self.enqueue(lane, &me) {
            Some(batch) => batch,
            None => match me.wait() {
                State::Leads(batch) => batch,
                State::Answered(answer) => return answer,
                State::Queued => unreachable!("wait returns only a decision"),
            },
        };
        self.lead(lane, batch, Some(&me))
    }

    /// Runs `ticket` together with concurrent tickets of its lane; the callback `reply` makes
    /// gets the answer. Returns at once, unless this thread is the one to run the lane's
    /// batches. With `may_lead` false, a ticket that would run here is not taken (`false`,
    /// and `reply` is not called).
    pub fn submit_with(
        self: &Arc<Self>,
        ticket: Ticket,
        may_lead: bool,
        reply: impl FnOnce() -> Callback,
    ) -> bool {
        let lane = self.lane(ticket.coupon);
        let mut inner = lock(&self.inner);
        let idle = !inner.queues.contains_key(&lane);
        if idle && !may_lead && self.leader == Leader::Here {
            return false;
        }
        let me = Arc::new(Waiter {
            ticket,
            reply: Reply::Call(Mutex::new(Some(reply()))),
        });
        *inner.active.entry(me.ticket.coupon).or_default() += 1;
        if idle {
            inner.queues.insert(lane, Vec::new());
            drop(inner);
            self.lead_callbacks(lane, vec![me]);
        } else {
            inner.queues.entry(lane).or_default().push(me);
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Queues `me` in `lane`; `Some` batch of it alone when the lane was idle (then the caller
    /// leads).
    fn enqueue(&self, lane: u64, me: &Arc<Waiter>) -> Option<Vec<Arc<Waiter>>> {
        let mut inner = lock(&self.inner);
        *inner.active.entry(me.ticket.coupon).or_default() += 1;
        match inner.queues.get_mut(&lane) {
            Some(queue) => {
                queue.push(Arc::clone(me));
                self.queued.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                inner.queues.insert(lane, Vec::new());
                Some(vec![Arc::clone(me)])
            }
        }
    }

    /// Runs a batch of callbacks only, here or on a new thread.
    fn lead_callbacks(self: &Arc<Self>, lane: u64, batch: Vec<Arc<Waiter>>) {
        match self.leader {
            Leader::Here => {
                self.lead(lane, batch, None);
            }
            Leader::Spawn => {
                let (this, mine) = (Arc::clone(self), batch.clone());
                let spawned = std::thread::Builder::new()
                    .name("coupons-claim-wait".into())
                    .spawn(move || this.lead(lane, mine, None));
                if spawned.is_err() {
                    // No thread to be had: these claims are answered with an error (and the
                    // queue behind them handed on) rather than wait for a lock on this thread.
                    drop(Lead::new(self, lane, batch));
                }
            }
        }
    }

    /// Runs `batch`, then the lane's next batches as long as no waiting caller is in them to
    /// run them; answers everyone but `me`, and returns `me`'s answer.
    fn lead(&self, lane: u64, batch: Vec<Arc<Waiter>>, me: Option<&Arc<Waiter>>) -> Outcome {
        let mut own = None;
        let mut lead = Lead::new(self, lane, batch);
        loop {
            let tickets: Vec<&Ticket> = lead.batch.iter().map(|w| &w.ticket).collect();
            // A panic in the batch is its requests' (each gets an internal error below); the
            // thread goes on, and so does the lane.
            let answers =
                catch_unwind(AssertUnwindSafe(|| (self.run)(&tickets))).unwrap_or_default();
            let (done, next) = lead.next();
            lead.batch = next.map(pass_on).unwrap_or_default();
            let mut answers = answers.into_iter();
            for w in done {
                let answer = answers.next().unwrap_or_else(missing);
                match me {
                    Some(me) if Arc::ptr_eq(me, &w) => own = Some(answer),
                    _ => w.answer(answer),
                }
            }
            if lead.batch.is_empty() {
                break;
            }
        }
        own.unwrap_or_else(missing)
    }

    /// Claims of `coupon` in this combiner now, queued or in a transaction.
    pub fn active(&self, coupon: CouponId) -> usize {
        lock(&self.inner).active.get(&coupon).copied().unwrap_or(0)
    }

    /// Counts `done` out of the active claims, and takes the lane's next batch from its queue,
    /// if any (else the lane is idle).
    fn hand_off(&self, lane: u64, done: &[Arc<Waiter>]) -> Option<Vec<Arc<Waiter>>> {
        let mut inner = lock(&self.inner);
        for w in done {
            let coupon = w.ticket.coupon;
            if let Some(n) = inner.active.get_mut(&coupon) {
                *n -= 1;
                if *n == 0 {
                    inner.active.remove(&coupon);
                }
            }
        }
        let queue = inner.queues.get_mut(&lane)?;
        if queue.is_empty() {
            inner.queues.remove(&lane);
            return None;
        }
        // Coupons take turns for places in the batch (a coupon's claims in arrival order), so
        // that a busy coupon cannot keep a quiet one out; the batch keeps arrival order.
        // Two requests with one user's key must not share a transaction (the second replays
        // the first's committed answer, or is refused): only the first to arrive may go.
        let mut keys = HashSet::new();
        let mut turn: HashMap<CouponId, usize> = HashMap::new();
        let mut by_turn: Vec<(usize, usize)> = Vec::with_capacity(queue.len());
        for (i, w) in queue.iter().enumerate() {
            let first_of_key = match &w.ticket.key {
                Some(k) => keys.insert((w.ticket.user, k.key.as_str())),
                None => true,
            };
            if first_of_key {
                let t = turn.entry(w.ticket.coupon).or_default();
                *t += 1;
                by_turn.push((*t, i));
            }
        }
        by_turn.sort_unstable();
        by_turn.truncate(self.max);
        let mut taken = vec![false; queue.len()];
        for (_, i) in by_turn {
            taken[i] = true;
        }
        let (batch, later): (Vec<_>, Vec<_>) =
            queue.drain(..).zip(taken).partition(|(_, taken)| *taken);
        let batch: Vec<Arc<Waiter>> = batch.into_iter().map(|(w, _)| w).collect();
        *queue = later.into_iter().map(|(w, _)| w).collect();
        self.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed);
        if batch.len() > 1 {
            self.combined
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.batches.fetch_add(1, Ordering::Relaxed);
        }
        Some(batch)
    }
}

impl Waiter {
    fn wait(&self) -> State {
        let Reply::Thread { state, changed } = &self.reply else {
            unreachable!("only a waiting caller waits");
        };
        let mut state = lock(state);
        while matches!(*state, State::Queued) {
            state = changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        std::mem::replace(&mut *state, State::Queued)
    }

    fn set(&self, decision: State) {
        if let Reply::Thread { state, changed } = &self.reply {
            *lock(state) = decision;
            changed.notify_one();
        }
    }

    fn answer(&self, outcome: Outcome) {
        match &self.reply {
            Reply::Thread { .. } => self.set(State::Answered(outcome)),
            Reply::Call(call) => {
                let call = lock(call).take();
                if let Some(call) = call {
                    // A callback's panic is its caller's; the lead thread goes on.
                    let _ = catch_unwind(AssertUnwindSafe(|| call(outcome)));
                }
            }
        }
    }
}

/// The batch a thread leads. Dropped before its batch was answered (a panic), it answers that
/// batch and the callbacks queued behind it with an error, or hands the lane to a waiting
/// caller, so no request waits for ever.
struct Lead<'a> {
    combiner: &'a Combiner,
    lane: u64,
    batch: Vec<Arc<Waiter>>,
}

impl<'a> Lead<'a> {
    fn new(combiner: &'a Combiner, lane: u64, batch: Vec<Arc<Waiter>>) -> Lead<'a> {
        Lead {
            combiner,
            lane,
            batch,
        }
    }

    /// The batch just run, to answer, and the lane's next one (taken first, so that a waiting
    /// caller told to run it starts while this one's answers go out).
    fn next(&mut self) -> (Vec<Arc<Waiter>>, Option<Vec<Arc<Waiter>>>) {
        let done = std::mem::take(&mut self.batch);
        let next = self.combiner.hand_off(self.lane, &done);
        (done, next)
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        while !self.batch.is_empty() {
            let (done, next) = self.next();
            for w in done {
                w.answer(missing());
            }
            if let Some(next) = next {
                self.batch = pass_on(next);
            }
        }
    }
}

/// A caller waiting on its thread runs its own batch: it is told so, and nothing is left here.
/// A batch of callbacks only is returned, to run on this thread.
fn pass_on(batch: Vec<Arc<Waiter>>) -> Vec<Arc<Waiter>> {
    match batch
        .iter()
        .find(|w| matches!(w.reply, Reply::Thread { .. }))
    {
        Some(waiter) => {
            let waiter = Arc::clone(waiter);
            waiter.set(State::Leads(batch));
            Vec::new()
        }
        None => batch,
    }
}

fn missing() -> Outcome {
    Some(Answer::new(Err(Error::Internal(
        "the claim batch ended without an answer".into(),
    ))))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

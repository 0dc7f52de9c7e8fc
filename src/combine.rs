//! Claim combining: concurrent claims in this process share one transaction.
//!
//! A hot coupon is one row, and one transaction at a time can hold its lock; per-claim
//! transactions are capped by how fast that row is locked, changed and committed. Claims spread
//! over many coupons are capped by the database's cost per transaction. So claims go in lanes
//! (a coupon is always in the same lane, picked by a hash of its id), and a lane has at most one
//! claim transaction in flight. The first claim in an idle lane runs at once (a quiet service
//! waits for nothing). Claims that arrive while its transaction is in flight queue; when it
//! ends, the first of them leads the next transaction for all of them (up to the limit), in
//! arrival order, whatever their coupons. No timer, no window. A combiner may also give each
//! coupon a lane of its own.
//!
//! Each request thread runs at most one transaction: the leader of a batch is one of its
//! requests, and it hands the queue to the next leader before it hands out the answers.

use crate::claim::Claimed;
use crate::idempotency::{Answer, IdempotencyKey};
use crate::{CouponId, Error, UserId};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a claim request gets from its batch: an answer, or `None` when the batch left it
/// undecided (its coupon was locked by another transaction, and the batch did not wait).
pub(crate) type Outcome = Option<Answer<Claimed>>;

/// One claim request: which coupon, who, and the idempotency key it came with.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub coupon: CouponId,
    pub user: UserId,
    pub key: Option<IdempotencyKey>,
}

/// The queues of claims waiting for their lane's transaction in flight.
pub(crate) struct Combiner {
    max: usize,
    /// `None`: a lane per coupon.
    lanes: Option<u64>,
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
    state: Mutex<State>,
    changed: Condvar,
}

enum State {
    Queued,
    Leads(Vec<Arc<Waiter>>),
    Answered(Outcome),
}

impl Combiner {
    /// Batches of at most `max` claims, in `lanes` lanes (`None`: a lane per coupon).
    pub fn new(max: usize, lanes: Option<u64>) -> Combiner {
        Combiner {
            max: max.max(1),
            lanes: lanes.map(|n| n.max(1)),
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

    /// Runs `ticket` together with concurrent tickets of its lane. `run` gets a batch in arrival
    /// order and returns one answer for each; it runs on one of the batch's threads.
    pub fn submit(&self, ticket: Ticket, run: impl FnOnce(&[&Ticket]) -> Vec<Outcome>) -> Outcome {
        let lane = self.lane(ticket.coupon);
        let me = Arc::new(Waiter {
            ticket,
            state: Mutex::new(State::Queued),
            changed: Condvar::new(),
        });
        let leads_now = {
            let mut inner = lock(&self.inner);
            *inner.active.entry(me.ticket.coupon).or_default() += 1;
            match inner.queues.get_mut(&lane) {
                Some(queue) => {
                    queue.push(Arc::clone(&me));
                    self.queued.fetch_add(1, Ordering::Relaxed);
                    false
                }
                None => {
                    inner.queues.insert(lane, Vec::new());
                    true
                }
            }
        };
        let batch = if leads_now {
            vec![me]
        } else {
            match me.wait() {
                State::Leads(batch) => batch,
                State::Answered(answer) => return answer,
                State::Queued => unreachable!("wait returns only a decision"),
            }
        };
        let mut lead = Lead {
            combiner: self,
            lane,
            batch,
        };
        let tickets: Vec<&Ticket> = lead.batch.iter().map(|w| &w.ticket).collect();
        let answers = run(&tickets);
        lead.finish(answers)
    }

    /// Whether a transaction of `coupon`'s lane is in flight: a claim now would queue.
    pub fn in_flight(&self, coupon: CouponId) -> bool {
        lock(&self.inner).queues.contains_key(&self.lane(coupon))
    }

    /// Claims of `coupon` in this combiner now, queued or in a transaction.
    pub fn active(&self, coupon: CouponId) -> usize {
        lock(&self.inner).active.get(&coupon).copied().unwrap_or(0)
    }

    /// Counts `done` out of the active claims, and passes the lane's queue, if any, to its first
    /// request as the next batch.
    fn hand_off(&self, lane: u64, done: &[Arc<Waiter>]) {
        let next = {
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
            let Some(queue) = inner.queues.get_mut(&lane) else {
                return;
            };
            if queue.is_empty() {
                inner.queues.remove(&lane);
                return;
            }
            // Coupons take turns for places in the batch (a coupon's claims in arrival order), so
            // that a busy coupon cannot keep a quiet one out; the batch keeps arrival order.
            // Two requests with one user's key must not share a transaction (the second replays
            // the first's committed answer, or is refused): only the first to arrive may go.
            let mut keys = HashSet::new();
            let first_of_key: Vec<bool> = queue
                .iter()
                .map(|w| match &w.ticket.key {
                    Some(key) => keys.insert((w.ticket.user, key.as_str())),
                    None => true,
                })
                .collect();
            let mut turn: HashMap<CouponId, usize> = HashMap::new();
            let mut by_turn: Vec<(usize, usize)> = (0..queue.len())
                .filter(|&i| first_of_key[i])
                .map(|i| {
                    let t = turn.entry(queue[i].ticket.coupon).or_default();
                    *t += 1;
                    (*t, i)
                })
                .collect();
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
            batch
        };
        let leader = Arc::clone(&next[0]);
        leader.decide(State::Leads(next));
    }
}

impl Waiter {
    fn wait(&self) -> State {
        let mut state = lock(&self.state);
        while matches!(*state, State::Queued) {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        std::mem::replace(&mut *state, State::Queued)
    }

    fn decide(&self, decision: State) {
        *lock(&self.state) = decision;
        self.changed.notify_one();
    }
}

/// The batch a thread leads. Dropped without `finish` (a panic), it still hands off the queue
/// and answers every other request, so no thread waits for ever.
struct Lead<'a> {
    combiner: &'a Combiner,
    lane: u64,
    batch: Vec<Arc<Waiter>>,
}

impl Lead<'_> {
    /// Hands off the queue, then gives each request its answer; returns the leader's own.
    fn finish(&mut self, answers: Vec<Outcome>) -> Outcome {
        let batch = std::mem::take(&mut self.batch);
        self.combiner.hand_off(self.lane, &batch);
        // `run` owes one answer per request; should one be missing, that request still gets one.
        let mut answers = answers.into_iter();
        let own = answers.next().unwrap_or_else(missing);
        for waiter in batch.iter().skip(1) {
            waiter.decide(State::Answered(answers.next().unwrap_or_else(missing)));
        }
        own
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.combiner.hand_off(self.lane, &self.batch);
        for waiter in self.batch.iter().skip(1) {
            waiter.decide(State::Answered(missing()));
        }
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

//! Group commit for requests that each lock a row of their own (confirms): callers that arrive
//! while a transaction of theirs is in flight queue, and the next transaction takes them all,
//! on the thread of one of the waiting callers. Claims have their own, richer scheme
//! (combine.rs: lanes by coupon, callbacks); this is the plain form.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

type Run<T, R> = dyn Fn(&[T]) -> Vec<R> + Send + Sync;

/// Runs requests of type `T` in batches of at most `max`, one batch at a time; `run` answers a
/// batch with one `R` per request, in order. Each waiting caller is woken alone: with its
/// answer, or to run the next batch.
pub(crate) struct Group<T, R> {
    max: usize,
    run: Box<Run<T, R>>,
    state: Mutex<State<T, R>>,
}

struct State<T, R> {
    queue: VecDeque<(T, Arc<Slot<R>>)>,
    /// A batch is in flight (or its leader is picking the next).
    running: bool,
}

/// Where one caller waits.
struct Slot<R> {
    state: Mutex<Turn<R>>,
    changed: Condvar,
}

enum Turn<R> {
    Waiting,
    Lead,
    Done(R),
}

impl<T, R> Group<T, R> {
    pub(crate) fn new(max: usize, run: impl Fn(&[T]) -> Vec<R> + Send + Sync + 'static) -> Self {
        Group {
            max: max.max(1),
            run: Box::new(run),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                running: false,
            }),
        }
    }

    /// `request`'s answer: from a batch this thread runs (when none is in flight, or when the
    /// last leader hands over), or from one another caller runs. `failed` answers a batch
    /// whose run panicked.
    pub(crate) fn submit(&self, request: T, failed: impl Fn() -> R) -> R {
        let me = Arc::new(Slot {
            state: Mutex::new(Turn::Waiting),
            changed: Condvar::new(),
        });
        let lead = {
            let mut s = lock(&self.state);
            s.queue.push_back((request, Arc::clone(&me)));
            !std::mem::replace(&mut s.running, true)
        };
        if !lead {
            let mut turn = lock(&me.state);
            while matches!(*turn, Turn::Waiting) {
                turn = me.changed.wait(turn).unwrap_or_else(|e| e.into_inner());
            }
            if let Turn::Done(_) = &*turn {
                let Turn::Done(answer) = std::mem::replace(&mut *turn, Turn::Waiting) else {
                    unreachable!("matched above")
                };
                return answer;
            }
        }
        self.lead(&me, failed)
    }

    /// Runs batches until `me` is answered, then hands the lead to the next waiting caller.
    fn lead(&self, me: &Arc<Slot<R>>, failed: impl Fn() -> R) -> R {
        loop {
            let batch: Vec<(T, Arc<Slot<R>>)> = {
                let mut s = lock(&self.state);
                let n = s.queue.len().min(self.max);
                s.queue.drain(..n).collect()
            };
            let (requests, slots): (Vec<T>, Vec<Arc<Slot<R>>>) = batch.into_iter().unzip();
            // A panic in `run` answers the batch with `failed`, never leaves its callers waiting.
            let answers = catch_unwind(AssertUnwindSafe(|| (self.run)(&requests)))
                .ok()
                .filter(|a| a.len() == slots.len())
                .unwrap_or_else(|| slots.iter().map(|_| failed()).collect());
            let mut mine = None;
            for (slot, answer) in slots.into_iter().zip(answers) {
                if Arc::ptr_eq(&slot, me) {
                    mine = Some(answer);
                } else {
                    *lock(&slot.state) = Turn::Done(answer);
                    slot.changed.notify_one();
                }
            }
            let Some(answer) = mine else { continue };
            let mut s = lock(&self.state);
            match s.queue.front() {
                Some((_, next)) => {
                    *lock(&next.state) = Turn::Lead;
                    next.changed.notify_one();
                }
                None => s.running = false,
            }
            return answer;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_request_gets_its_own_answer_and_waiting_ones_share_batches() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&batches);
        let group = Arc::new(Group::new(8, move |batch: &[u32]| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            batch.iter().map(|n| n * 10).collect::<Vec<u32>>()
        }));
        let threads: Vec<_> = (0..64u32)
            .map(|n| {
                let group = Arc::clone(&group);
                std::thread::spawn(move || (n, group.submit(n, || 0)))
            })
            .collect();
        for t in threads {
            let (n, answer) = t.join().unwrap();
            assert_eq!(answer, n * 10);
        }
        let batches = batches.load(Ordering::SeqCst);
        assert!(
            (8..64).contains(&batches),
            "{batches} batches for 64 requests"
        );
    }

    #[test]
    fn a_panicking_batch_is_answered_as_failed() {
        let group = Group::new(4, |_: &[u32]| -> Vec<u32> { panic!("boom") });
        assert_eq!(group.submit(1, || 99), 99);
        // The group goes on.
        assert_eq!(group.submit(2, || 98), 98);
    }
}

//! Group commit for requests that each lock a row of their own (confirms): requests that
//! arrive while a transaction of theirs is in flight queue, and the next transaction takes
//! them all. A request either waits on its own thread, or leaves a callback and its thread goes
//! on (the server: no thread is held, and none is woken, to wait for an answer). A batch runs on
//! a thread that is there anyway: the one that found the group idle, or a waiting caller in the
//! batch; a batch of callbacks only runs on the thread that ran the last one, until the group is
//! idle. Claims have their own, richer scheme (combine.rs: lanes by coupon); this is the plain
//! form.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

type Run<T, R> = dyn Fn(&[T]) -> Vec<R> + Send + Sync;

/// Where an answer goes when its caller did not wait for it.
pub(crate) type Callback<R> = Box<dyn FnOnce(R) + Send>;

/// Runs requests of type `T` in batches of at most `max`, one batch at a time; `run` answers a
/// batch with one `R` per request, in order, and `failed` each request of a batch whose run
/// panicked. Each waiting caller is woken alone: with its answer, or to run the next batch.
pub(crate) struct Group<T, R> {
    max: usize,
    run: Box<Run<T, R>>,
    failed: fn() -> R,
    state: Mutex<State<T, R>>,
}

struct State<T, R> {
    queue: VecDeque<(T, Sink<R>)>,
    /// A batch is in flight (or its leader is picking the next).
    running: bool,
}

enum Sink<R> {
    /// A caller waiting on its thread.
    Thread(Arc<Slot<R>>),
    /// A caller that went on.
    Call(Callback<R>),
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
    pub(crate) fn new(
        max: usize,
        run: impl Fn(&[T]) -> Vec<R> + Send + Sync + 'static,
        failed: fn() -> R,
    ) -> Self {
        Group {
            max: max.max(1),
            run: Box::new(run),
            failed,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                running: false,
            }),
        }
    }

    /// `request`'s answer: from a batch this thread runs (when none is in flight, or when the
    /// last leader hands over), or from one another thread runs.
    pub(crate) fn submit(&self, request: T) -> R {
        let me = Arc::new(Slot {
            state: Mutex::new(Turn::Waiting),
            changed: Condvar::new(),
        });
        let lead = {
            let mut s = lock(&self.state);
            s.queue.push_back((request, Sink::Thread(Arc::clone(&me))));
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
        self.lead(Some(&me)).unwrap_or_else(self.failed)
    }

    /// `request`, answered through the callback `reply` makes, on whichever thread runs its
    /// batch. Returns at once, unless the group is idle: then this thread runs batches until
    /// it is idle again (or a waiting caller takes over); with `may_lead` false, nothing is
    /// done then (`false`, and `reply` is not called).
    pub(crate) fn submit_with(
        &self,
        request: T,
        may_lead: bool,
        reply: impl FnOnce() -> Callback<R>,
    ) -> bool {
        let lead = {
            let mut s = lock(&self.state);
            let idle = !s.running;
            if idle && !may_lead {
                return false;
            }
            s.queue.push_back((request, Sink::Call(reply())));
            s.running = true;
            idle
        };
        if lead {
            self.lead(None);
        }
        true
    }

    /// Runs batches until `me` (if any) is answered and no batch of callbacks only is left;
    /// hands the lead to a waiting caller in the next batch, if there is one. Answers everyone
    /// but `me`, and returns `me`'s answer.
    fn lead(&self, me: Option<&Arc<Slot<R>>>) -> Option<R> {
        let mut mine = None;
        loop {
            let batch: Vec<(T, Sink<R>)> = {
                let mut s = lock(&self.state);
                let n = s.queue.len().min(self.max);
                s.queue.drain(..n).collect()
            };
            let (requests, sinks): (Vec<T>, Vec<Sink<R>>) = batch.into_iter().unzip();
            // A panic in `run` answers the batch with `failed`, never leaves its callers waiting.
            let answers = catch_unwind(AssertUnwindSafe(|| (self.run)(&requests)))
                .ok()
                .filter(|a| a.len() == sinks.len())
                .unwrap_or_else(|| sinks.iter().map(|_| (self.failed)()).collect());
            for (sink, answer) in sinks.into_iter().zip(answers) {
                match sink {
                    Sink::Thread(slot) if me.is_some_and(|me| Arc::ptr_eq(&slot, me)) => {
                        mine = Some(answer);
                    }
                    Sink::Thread(slot) => {
                        *lock(&slot.state) = Turn::Done(answer);
                        slot.changed.notify_one();
                    }
                    // A callback's panic is its caller's; this thread goes on.
                    Sink::Call(call) => {
                        let _ = catch_unwind(AssertUnwindSafe(|| call(answer)));
                    }
                }
            }
            if me.is_some() && mine.is_none() {
                continue;
            }
            let s = &mut *lock(&self.state);
            let waiting = s
                .queue
                .iter()
                .take(self.max)
                .find_map(|(_, sink)| match sink {
                    Sink::Thread(slot) => Some(slot),
                    Sink::Call(_) => None,
                });
            match waiting {
                Some(next) => {
                    *lock(&next.state) = Turn::Lead;
                    next.changed.notify_one();
                }
                None if s.queue.is_empty() => s.running = false,
                None => continue,
            }
            return mine;
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
    use std::sync::mpsc;
    use std::time::Duration;

    /// A group whose batches take 2 ms and answer ten times each request, counting batches.
    fn slow_group(batches: &Arc<AtomicUsize>) -> Arc<Group<u32, u32>> {
        let counted = Arc::clone(batches);
        let run = move |batch: &[u32]| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            batch.iter().map(|n| n * 10).collect::<Vec<u32>>()
        };
        Arc::new(Group::new(8, run, || 0))
    }

    #[test]
    fn every_request_gets_its_own_answer_and_waiting_ones_share_batches() {
        let batches = Arc::new(AtomicUsize::new(0));
        let group = slow_group(&batches);
        let threads: Vec<_> = (0..64u32)
            .map(|n| {
                let group = Arc::clone(&group);
                std::thread::spawn(move || (n, group.submit(n)))
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
    fn callbacks_and_waiting_callers_are_each_answered_once_in_shared_batches() {
        let batches = Arc::new(AtomicUsize::new(0));
        let group = slow_group(&batches);
        let (tx, rx) = mpsc::channel();
        let threads: Vec<_> = (0..96u32)
            .map(|n| {
                let (group, tx) = (Arc::clone(&group), tx.clone());
                std::thread::spawn(move || match n % 3 {
                    // Waits on its thread.
                    0 => tx.send((n, group.submit(n))).unwrap(),
                    // Leaves a callback, and may run batches.
                    1 => {
                        let reply = move || -> Callback<u32> {
                            Box::new(move |a| tx.send((n, a)).unwrap())
                        };
                        assert!(group.submit_with(n, true, reply));
                    }
                    // Leaves a callback only while a batch is in flight, else does it itself.
                    _ => {
                        let sent = tx.clone();
                        let reply = move || -> Callback<u32> {
                            Box::new(move |a| sent.send((n, a)).unwrap())
                        };
                        if !group.submit_with(n, false, reply) {
                            tx.send((n, group.submit(n))).unwrap();
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        for t in threads {
            t.join().unwrap();
        }
        let mut answers: Vec<(u32, u32)> = rx.iter().collect();
        answers.sort_unstable();
        let expected: Vec<(u32, u32)> = (0..96).map(|n| (n, n * 10)).collect();
        assert_eq!(answers, expected);
        let batches = batches.load(Ordering::SeqCst);
        assert!(batches < 96, "{batches} batches for 96 requests");
    }

    #[test]
    fn an_idle_group_takes_no_callback_it_may_not_run() {
        let group = Group::new(4, |b: &[u32]| b.to_vec(), || 0);
        let reply = || -> Callback<u32> { panic!("not asked for") };
        assert!(!group.submit_with(1, false, reply));
        // And runs one it may, here.
        let (tx, rx) = mpsc::channel();
        assert!(group.submit_with(2, true, || Box::new(move |a| tx.send(a).unwrap())));
        assert_eq!(rx.try_recv(), Ok(2));
    }

    #[test]
    fn a_panicking_batch_is_answered_as_failed() {
        let group = Group::new(4, |_: &[u32]| -> Vec<u32> { panic!("boom") }, || 99);
        assert_eq!(group.submit(1), 99);
        // The group goes on.
        assert_eq!(group.submit(2), 99);
    }
}

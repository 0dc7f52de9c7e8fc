//! First come, first served: at most `size` callers use the database at once, and the others
//! wait in arrival order. r2d2's own wait lets a caller that just arrived take a connection
//! that was just returned, ahead of callers that have waited longer; under load a few callers
//! then wait many turns, and they are the latency's tail.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub(crate) struct Gate {
    state: Mutex<State>,
}

struct State {
    free: usize,
    queue: VecDeque<Arc<Turn>>,
}

#[derive(Default)]
struct Turn {
    granted: Mutex<bool>,
    changed: Condvar,
}

/// A caller's place inside; dropping it lets the next one in.
pub(crate) struct Pass<'a> {
    gate: &'a Gate,
}

impl Gate {
    pub fn new(size: usize) -> Gate {
        Gate {
            state: Mutex::new(State {
                free: size.max(1),
                queue: VecDeque::new(),
            }),
        }
    }

    /// Waits for a place, at most `timeout`; `None` if none came.
    pub fn enter(&self, timeout: Duration) -> Option<Pass<'_>> {
        let turn = {
            let mut s = lock(&self.state);
            if s.free > 0 && s.queue.is_empty() {
                s.free -= 1;
                return Some(Pass { gate: self });
            }
            let turn = Arc::new(Turn::default());
            s.queue.push_back(Arc::clone(&turn));
            turn
        };
        let deadline = Instant::now() + timeout;
        let mut granted = lock(&turn.granted);
        while !*granted {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            granted = turn
                .changed
                .wait_timeout(granted, left)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        if *granted {
            return Some(Pass { gate: self });
        }
        drop(granted);
        let mut s = lock(&self.state);
        match s.queue.iter().position(|t| Arc::ptr_eq(t, &turn)) {
            Some(at) => {
                s.queue.remove(at);
                None
            }
            // Let in just as the wait ended: the place is ours.
            None => Some(Pass { gate: self }),
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.gate.state);
        match s.queue.pop_front() {
            Some(next) => {
                *lock(&next.granted) = true;
                next.changed.notify_one();
            }
            None => s.free += 1,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_get_in_in_arrival_order_and_time_out() {
        let gate = Gate::new(1);
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let first = gate.enter(Duration::from_secs(1)).unwrap();
            let waiters: Vec<_> = (0..4)
                .map(|i| {
                    let h = s.spawn({
                        let (gate, order) = (&gate, &order);
                        move || {
                            let _pass = gate.enter(Duration::from_secs(5)).unwrap();
                            lock(order).push(i);
                        }
                    });
                    // Let each one queue before the next arrives.
                    while lock(&gate.state).queue.len() <= i {
                        std::thread::yield_now();
                    }
                    h
                })
                .collect();
            assert!(gate.enter(Duration::from_millis(20)).is_none());
            assert_eq!(lock(&gate.state).queue.len(), 4, "a timed-out caller left");
            drop(first);
            waiters.into_iter().for_each(|h| h.join().unwrap());
        });
        assert_eq!(*lock(&order), vec![0, 1, 2, 3]);
        assert_eq!(lock(&gate.state).free, 1);
    }
}

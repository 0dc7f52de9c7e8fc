//! coupons patch: a channel for one value, in one plain allocation. tiny_http hands a
//! connection's reader, its writer's turn, a body's end and a request's answer on through four
//! channels a request, each sending once; `std::sync::mpsc` allocates a cache-aligned channel
//! and, for its first value, a block of 31 slots (about 2 KiB for a reader) each time.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::mpsc::RecvError;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A new channel: its sending half and its receiving half.
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(Slot {
            value: State::Empty,
            waiting: false,
        }),
        changed: Condvar::new(),
    });
    (Sender(Arc::clone(&shared)), Receiver(shared, PhantomData))
}

struct Shared<T> {
    state: Mutex<Slot<T>>,
    changed: Condvar,
}

struct Slot<T> {
    value: State<T>,
    /// The receiver sleeps on `changed`: only then is a wake-up (a system call) sent. Most
    /// values here are sent before anyone asks for them.
    waiting: bool,
}

enum State<T> {
    Empty,
    Full(T),
    /// Sent and taken, or the sender gone without sending.
    Closed,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Slot<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fills an empty slot with `value`, waking the receiver if it sleeps; `Err` if not empty.
    fn fill(&self, value: State<T>) -> Result<(), State<T>> {
        let mut slot = self.lock();
        if !matches!(slot.value, State::Empty) {
            return Err(value);
        }
        slot.value = value;
        let wake = slot.waiting;
        drop(slot);
        if wake {
            self.changed.notify_one();
        }
        Ok(())
    }
}

/// Sends one value; a second, or one after the receiver is gone, is given back.
pub struct Sender<T>(Arc<Shared<T>>);

impl<T> Sender<T> {
    pub fn send(&self, value: T) -> Result<(), T> {
        if Arc::strong_count(&self.0) == 1 {
            return Err(value);
        }
        self.0.fill(State::Full(value)).map_err(|v| match v {
            State::Full(value) => value,
            _ => unreachable!("given back as given"),
        })
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let _ = self.0.fill(State::Closed);
    }
}

/// Receives the one value, or an error once the sender is gone without sending. One thread
/// receives (not `Sync`, as std's receiver): the sender wakes one waiter.
pub struct Receiver<T>(Arc<Shared<T>>, PhantomData<Cell<()>>);

impl<T> Receiver<T> {
    pub fn recv(&self) -> Result<T, RecvError> {
        let mut slot = self.0.lock();
        while matches!(slot.value, State::Empty) {
            slot.waiting = true;
            slot = self.0.changed.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
        slot.waiting = false;
        match std::mem::replace(&mut slot.value, State::Closed) {
            State::Full(value) => Ok(value),
            _ => Err(RecvError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::channel;

    #[test]
    fn one_value_across_threads_then_closed() {
        let (tx, rx) = channel();
        let t = std::thread::spawn(move || rx.recv());
        tx.send(7).unwrap();
        assert_eq!(t.join().unwrap(), Ok(7));
        let (tx, rx) = channel::<u8>();
        drop(tx);
        assert!(rx.recv().is_err());
        let (tx, rx) = channel();
        assert_eq!(tx.send(1), Ok(()));
        assert_eq!(tx.send(2), Err(2));
        assert_eq!(rx.recv(), Ok(1));
        assert!(rx.recv().is_err());
        drop(rx);
        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(tx.send(3), Err(3));
    }

    #[test]
    fn a_waiting_receiver_is_woken_by_a_sender_dropped_without_sending() {
        let (tx, rx) = channel::<u8>();
        let t = std::thread::spawn(move || rx.recv());
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(tx);
        assert!(t.join().unwrap().is_err());
    }
}

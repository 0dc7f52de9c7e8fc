//! A background thread that does a turn of work every so often until it is dropped: the hold
//! sweeper, the event sequencer and the webhook leases are each one.

use crate::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Runs its turns on a thread of its own; dropping it stops the thread (waking it from its
/// wait) and joins it.
pub(crate) struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts a thread named `name` that calls `turn` and then waits `every`; a turn that
    /// answers `true` has more to do and runs again at once. `turn` gets the stop flag, for
    /// work it hands to threads of its own.
    pub(crate) fn start(
        name: &str,
        every: Duration,
        mut turn: impl FnMut(&Arc<AtomicBool>) -> bool + Send + 'static,
    ) -> Result<Ticker, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    if !turn(&stopping) {
                        std::thread::park_timeout(every);
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("could not start the {name} thread: {e}")))?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

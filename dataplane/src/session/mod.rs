//! What both sides of a migration share: the fact sink, the stop switch and cancel handle
//! (`stop.rs`), the counters that fill `RamStats` (`stats.rs`), the handshake (`handshake.rs`),
//! and how a session starts its threads.

mod handshake;
mod stats;
mod stop;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use ramjet_control::Fact;

use crate::error::Error;

pub(crate) use handshake::{accept_hello, greet, read_hello, refuse, session_id};
pub use stats::{Counters, Stats};
pub use stop::CancelHandle;
pub(crate) use stop::Stop;

/// Where a session reports its facts: the caller feeds them to a
/// [`ramjet_control::Machine`]. Implemented for any `Fn(Fact) + Send + Sync`, e.g.
/// `move |fact| { let _ = tx.send(fact); }`.
pub trait FactSink: Send + Sync {
    /// Reports one fact. Must not block for long: it is called from the data path.
    fn fact(&self, fact: Fact);
}

impl<F: Fn(Fact) + Send + Sync> FactSink for F {
    fn fact(&self, fact: Fact) {
        self(fact);
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts a thread of a session, named `name` (Linux shows the first 15 bytes, so names say
/// what the thread is and which channel or worker in that many: `ramjet-send-3`). A thread
/// that cannot be started fails the session with [`Error::Spawn`] naming `what`.
pub(crate) fn spawn(
    name: String,
    what: &'static str,
    stop: &Stop,
    f: impl FnOnce() + Send + 'static,
) -> Option<JoinHandle<()>> {
    match thread::Builder::new().name(name).spawn(f) {
        Ok(handle) => Some(handle),
        Err(source) => {
            stop.fail(Error::Spawn { what, source });
            None
        }
    }
}

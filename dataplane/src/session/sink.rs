//! Where a session's facts go ([`FactSink`]), and the lock every part of a session uses.

use std::sync::{Mutex, MutexGuard, PoisonError};

use ramjet_control::Fact;

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

/// Locks `mutex`, taking the value over from a thread that panicked while holding it: what the
/// sessions guard (an error slot, a socket list, a rate bucket) stays usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

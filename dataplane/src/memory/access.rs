//! Who may touch guest memory now: the protocol behind [`Frozen`](super::Frozen) and the
//! receive lease (`lease.rs`).
//!
//! Three kinds of parties use a [`GuestMemory`]:
//!
//! - safe readers and writers (`GuestMemory::read`, `write`, `fill`, `prefault`, the sender's codec
//!   workers), whose accesses are atomic word copies and may race each other harmlessly;
//! - a **freeze** ([`GuestMemory::freeze`](super::GuestMemory::freeze)), which lends pages out as `&[u8]` for a sender's
//!   final round: while it lasts no safe writer may run, so the bytes cannot change;
//! - a **receive lease**, which lends pages out as `&mut [u8]`, one page to one thread: while it
//!   lasts nobody else may touch the memory at all, and there is at most one lease.
//!
//! And once memory is **handed over** to another process (a same-host migration passed its
//! descriptors), every party is refused for good: the destination runs the guest on it now.
//!
//! Each party raises its own counter before it looks at the others', with sequentially
//! consistent operations, so of two racing parties at least one sees the other and backs off;
//! a freeze or a lease then waits for the safe accesses already in progress, which are single
//! copies, to finish.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::error::MemoryError;

/// The counters of the protocol (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Access {
    /// Live [`Frozen`](super::Frozen) guards.
    pub(super) frozen: AtomicUsize,
    /// Safe writes in progress.
    pub(super) writes: AtomicUsize,
    /// Safe reads in progress.
    pub(super) reads: AtomicUsize,
    /// Receive leases: 0 or 1.
    pub(super) receiving: AtomicUsize,
    /// Postcopy placing claims (a receive lease turned into one): 0 or 1. Safe reads and
    /// writes go on (the guest runs), but no freeze and no second receive session.
    pub(super) placing: AtomicUsize,
    /// Non-zero once the memory is being handed over to another process: nothing here may
    /// touch it again. [`HANDING_OVER`] while the accesses in progress are waited for, then
    /// [`HANDED_OVER`], from which the mappings may be revoked.
    pub(super) handed_over: AtomicUsize,
}

/// [`Access::handed_over`]: new accesses are refused, those in progress may still run.
pub(super) const HANDING_OVER: usize = 1;
/// [`Access::handed_over`]: no access is in progress any more (but a freeze may lend pages).
pub(super) const HANDED_OVER: usize = 2;

/// A safe access in progress: the counter it raised, lowered when dropped.
#[derive(Debug)]
pub(crate) struct AccessGuard<'a>(&'a AtomicUsize);

impl Drop for AccessGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Access {
    /// Starts a safe read; refused while a receive session holds the memory.
    pub(super) fn begin_read(&self) -> Result<AccessGuard<'_>, MemoryError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let guard = AccessGuard(&self.reads);
        self.check_not_handed_over()?;
        if self.receiving.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Receiving { op: "read" });
        }
        Ok(guard)
    }

    /// Starts a safe write; refused while the memory is frozen or a receive session holds it.
    pub(super) fn begin_write(&self) -> Result<AccessGuard<'_>, MemoryError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let guard = AccessGuard(&self.writes);
        self.check_not_handed_over()?;
        if self.frozen.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Frozen);
        }
        if self.receiving.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Receiving { op: "written" });
        }
        Ok(guard)
    }

    /// Refuses every access once the memory was handed over.
    pub(super) fn check_not_handed_over(&self) -> Result<(), MemoryError> {
        if self.handed_over.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::HandedOver);
        }
        Ok(())
    }

    pub(super) fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst) != 0
    }
}

/// Waits until `counter` is zero: the safe accesses in progress, each a single copy, are done.
pub(super) fn wait_for(counter: &AtomicUsize) {
    while counter.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

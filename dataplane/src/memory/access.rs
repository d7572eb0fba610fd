//! Who may touch guest memory now: the protocol behind [`Frozen`] and the receive lease.
//!
//! Three kinds of parties use a [`GuestMemory`]:
//!
//! - safe readers and writers ([`GuestMemory::read`], [`write`](GuestMemory::write),
//!   [`fill`](GuestMemory::fill), [`prefault`](GuestMemory::prefault), the sender's codec
//!   workers), whose accesses are atomic word copies and may race each other harmlessly;
//! - a **freeze** ([`GuestMemory::freeze`]), which lends pages out as `&[u8]` for a sender's
//!   final round: while it lasts no safe writer may run, so the bytes cannot change;
//! - a **receive lease**, which lends pages out as `&mut [u8]`, one page to one thread: while it
//!   lasts nobody else may touch the memory at all, and there is at most one lease.
//!
//! Each party raises its own counter before it looks at the others', with sequentially
//! consistent operations, so of two racing parties at least one sees the other and backs off;
//! a freeze or a lease then waits for the safe accesses already in progress, which are single
//! copies, to finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{GuestMemory, MemoryError, PAGE_SIZE, PAGE_SIZE_U64};

/// The counters of the protocol (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Access {
    /// Live [`Frozen`] guards.
    frozen: AtomicUsize,
    /// Safe writes in progress.
    writes: AtomicUsize,
    /// Safe reads in progress.
    reads: AtomicUsize,
    /// Receive leases: 0 or 1.
    receiving: AtomicUsize,
}

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
        if self.receiving.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Receiving { op: "read" });
        }
        Ok(guard)
    }

    /// Starts a safe write; refused while the memory is frozen or a receive session holds it.
    pub(super) fn begin_write(&self) -> Result<AccessGuard<'_>, MemoryError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let guard = AccessGuard(&self.writes);
        if self.frozen.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Frozen);
        }
        if self.receiving.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Receiving { op: "written" });
        }
        Ok(guard)
    }

    pub(super) fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst) != 0
    }
}

/// Waits until `counter` is zero: the safe accesses in progress, each a single copy, are done.
fn wait_for(counter: &AtomicUsize) {
    while counter.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

/// A receive session's exclusive claim on the memory it writes (see the module docs): while it
/// lives, nothing else may read, write or freeze the memory, and no second lease is granted.
#[derive(Debug)]
pub(crate) struct ReceiveLease(Arc<GuestMemory>);

impl Drop for ReceiveLease {
    fn drop(&mut self) {
        self.0.access.receiving.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ReceiveLease {
    /// The leased memory.
    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        &self.0
    }

    /// The guest page `page` of region `region` as a mutable slice.
    ///
    /// # Safety
    ///
    /// For as long as the slice lives, no other thread may access this page (the lease keeps
    /// every safe accessor out; the receiver's protocol checks keep its own threads apart:
    /// each page belongs to one channel, is written at most once per round, and rounds are
    /// separated by a barrier).
    #[expect(
        clippy::mut_from_ref,
        reason = "guest memory is shared mutable memory behind raw pointers, like an UnsafeCell"
    )]
    pub(crate) unsafe fn page_mut(
        &self,
        region: usize,
        page: u64,
    ) -> Result<&mut [u8], MemoryError> {
        let offset = page.saturating_mul(PAGE_SIZE_U64);
        let p = self.0.ptr(region, offset, PAGE_SIZE)?;
        // SAFETY: `ptr` checked that the page lies inside the mapping, which lives as long as
        // the lease's `Arc`, and so as long as the borrow of `self`. The lease keeps every safe
        // reader and writer of this process away (they are refused while it lives), and the
        // caller guarantees that none of the session's own threads touches the page meanwhile,
        // so this is the only access to these bytes while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, PAGE_SIZE) })
    }
}

/// Frozen guest memory (see [`GuestMemory::freeze`]): its pages can be read in place. Clones
/// share one freeze, which ends when the last of them is dropped.
#[derive(Debug, Clone)]
pub struct Frozen(Arc<FreezeGuard>);

#[derive(Debug)]
struct FreezeGuard(Arc<GuestMemory>);

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        self.0.access.frozen.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Frozen {
    /// The frozen memory.
    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        &(self.0).0
    }

    /// The guest page `page` of region `region`, in place.
    pub fn page(&self, region: usize, page: u64) -> Result<&[u8], MemoryError> {
        let memory = self.memory();
        let p = memory.ptr(region, page.saturating_mul(PAGE_SIZE_U64), PAGE_SIZE)?;
        // SAFETY: `ptr` checked that the page lies inside the mapping, which lives as long as
        // `memory`, and so as long as `self`. While `self` lives the memory is frozen: every
        // safe writer in this process is refused and no receive lease is granted (see
        // `Access`), and safe readers only read, so the bytes cannot change for as long as the
        // slice borrows `self`. Writers outside the process's view are the embedder's to stop
        // (pausing the guest), as the module documentation explains.
        Ok(unsafe { std::slice::from_raw_parts(p, PAGE_SIZE) })
    }
}

impl GuestMemory {
    /// Freezes the memory: until every clone of the returned guard is dropped, this process
    /// can no longer write it ([`write`](Self::write), [`fill`](Self::fill) and
    /// [`prefault`](Self::prefault) fail with [`MemoryError::Frozen`], and no receive session
    /// can start on it), so its pages can be read in place ([`Frozen::page`]). Waits for writes
    /// in progress to finish. Fails if a receive session is writing the memory.
    ///
    /// A sender freezes its source at switchover, when the guest is paused.
    pub fn freeze(self: &Arc<Self>) -> Result<Frozen, MemoryError> {
        self.access.frozen.fetch_add(1, Ordering::SeqCst);
        let guard = Frozen(Arc::new(FreezeGuard(Arc::clone(self))));
        if self.access.receiving.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Receiving { op: "frozen" });
        }
        wait_for(&self.access.writes);
        Ok(guard)
    }

    /// Whether the memory is frozen now.
    pub fn is_frozen(&self) -> bool {
        self.access.is_frozen()
    }

    /// Claims the memory for a receive session, exclusively: fails if it is frozen or another
    /// session holds it; waits for safe reads and writes in progress to finish.
    pub(crate) fn lease_for_receiving(self: Arc<Self>) -> Result<ReceiveLease, MemoryError> {
        let access = &self.access;
        if access
            .receiving
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(MemoryError::Receiving {
                op: "received into twice",
            });
        }
        let lease = ReceiveLease(Arc::clone(&self));
        if access.is_frozen() {
            return Err(MemoryError::Frozen);
        }
        wait_for(&access.reads);
        wait_for(&access.writes);
        Ok(lease)
    }
}

//! The two claims that lend guest pages out as references: a receive session's exclusive
//! [`ReceiveLease`] (`&mut [u8]`, one page to one thread) and a sender's [`Frozen`] memory
//! (`&[u8]`, no writer). `access.rs` has the protocol that keeps them apart.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::access::wait_for;
use super::error::MemoryError;
use super::guest::GuestMemory;
use super::page::{PAGE_SIZE, PAGE_SIZE_U64};

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

    /// Ends the exclusive lease for postcopy: the guest runs on this memory from now on (safe
    /// reads and writes are allowed again, and fault on missing pages), while the session
    /// places the missing pages atomically through userfaultfd. The claim it returns still
    /// keeps freezes and other receive sessions out. Taking the lease by value proves that no
    /// page of it is lent out any more.
    pub(crate) fn into_placing(self) -> PlacingClaim {
        let memory = Arc::clone(&self.0);
        memory.access.placing.fetch_add(1, Ordering::SeqCst);
        drop(self);
        PlacingClaim(memory)
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

/// A postcopy receive session's claim on the memory it places pages into (see
/// [`ReceiveLease::into_placing`]): no freeze and no receive lease while it lives.
#[derive(Debug)]
pub(crate) struct PlacingClaim(Arc<GuestMemory>);

impl Drop for PlacingClaim {
    fn drop(&mut self) {
        self.0.access.placing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PlacingClaim {
    /// The claimed memory.
    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        &self.0
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
        if self.access.receiving.load(Ordering::SeqCst) != 0
            || self.access.placing.load(Ordering::SeqCst) != 0
        {
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
        if access.placing.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Receiving {
                op: "received into twice",
            });
        }
        wait_for(&access.reads);
        wait_for(&access.writes);
        Ok(lease)
    }
}

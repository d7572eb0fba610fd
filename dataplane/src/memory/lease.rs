//! The two claims that lend guest pages out as references: a receive session's exclusive
//! [`ReceiveLease`] (`&mut [u8]`, one page to one thread) and a sender's [`Frozen`] memory
//! (`&[u8]`, no writer). `access.rs` has the protocol that keeps them apart.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::access::{HANDED_OVER, wait_for};
use super::error::MemoryError;
use super::guest::GuestMemory;
use super::page::{PAGE_SIZE, PAGE_SIZE_U64};
use super::region::{Share, check_shared_fd};

/// A receive session's exclusive claim on the memory it writes (see the module docs): while it
/// lives, nothing else may read, write or freeze the memory, and no second lease is granted.
///
/// A same-host receive [adopts](ReceiveLease::adopt) the sender's memory in place of its own;
/// unless the session then [keeps](ReceiveLease::keep_adopted) it (the guest may run here, or
/// the receiver is in doubt and holds the complete state), the lease puts its own memory back
/// before it ends (its memfd or shared file, or fresh anonymous memory for private memory), so
/// that nothing of this process can ever write the memory of a guest the source kept.
#[derive(Debug)]
pub(crate) struct ReceiveLease {
    memory: Arc<GuestMemory>,
    /// Per region adopted, what it mapped before.
    adopted: Mutex<Vec<Option<Share>>>,
    /// The adopted memory stays when the lease ends.
    kept: AtomicBool,
}

impl Drop for ReceiveLease {
    fn drop(&mut self) {
        if !self.kept.load(Ordering::SeqCst) {
            self.detach();
        }
        self.memory.access.receiving.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ReceiveLease {
    /// The leased memory.
    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Takes a same-host sender's memory in place of this memory's own: each region's
    /// mapping is replaced, at the same address, by `fds[i]` mapped shared, after checking
    /// that every descriptor is memory of the region's exact length (see
    /// `region::check_shared_fd`). Fails, leaving the memory as it was, if any is not, or if
    /// a region's mapping is the embedder's (ramjet cannot replace it).
    ///
    /// Must be called before any page of the lease is lent out.
    pub(crate) fn adopt(&self, fds: Vec<OwnedFd>) -> Result<(), MemoryError> {
        let regions = self.memory.regions();
        if fds.len() != regions.len() {
            return Err(MemoryError::Adopt {
                id: regions.first().map_or(0, |r| r.layout().id()),
                reason: format!(
                    "{} descriptors came for {} regions",
                    fds.len(),
                    regions.len()
                ),
            });
        }
        let mut checked = Vec::with_capacity(fds.len());
        for (region, fd) in regions.iter().zip(fds) {
            let id = region.layout().id();
            if !region.is_own() {
                return Err(MemoryError::Adopt {
                    id,
                    reason: "this receiver's memory is mapped by its embedder, and ramjet \
                             cannot map another in its place"
                        .into(),
                });
            }
            let file = File::from(fd);
            let backing = check_shared_fd(&file, region.layout().len())
                .map_err(|reason| MemoryError::Adopt { id, reason })?;
            checked.push((file, backing));
        }
        for (index, (region, (file, backing))) in regions.iter().zip(checked).enumerate() {
            // SAFETY: the lease keeps every other accessor of this process away, and the
            // caller lends no page out before this returns; `check_shared_fd` made sure the
            // file is a regular file of exactly the region's length (and sealed a memfd
            // against shrinking; a plain file is, as with `Region::from_file`, trusted not to
            // be truncated by the process that handed it over).
            match unsafe { region.replace_with(file, backing) } {
                Ok(previous) => {
                    let mut adopted = self.adopted();
                    adopted.resize_with(regions.len(), || None);
                    adopted[index] = Some(previous);
                }
                Err(e) => {
                    self.detach();
                    return Err(MemoryError::Adopt {
                        id: region.layout().id(),
                        reason: format!("mapping it failed: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    fn adopted(&self) -> std::sync::MutexGuard<'_, Vec<Option<Share>>> {
        // Entries are replaced whole: a panic under the lock leaves nothing half-done.
        self.adopted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this memory could take a sender's in its place: every region's mapping is
    /// ramjet's own (not the embedder's); if not, why.
    pub(crate) fn adoptable(&self) -> Result<(), String> {
        match self.memory.regions().iter().find(|r| !r.is_own()) {
            None => Ok(()),
            Some(region) => Err(format!(
                "this receiver's region {} is mapped by its embedder, and ramjet cannot map \
                 the sender's memory in its place",
                region.layout().id()
            )),
        }
    }

    /// Keeps adopted memory when the lease ends: the receive holds the guest's state.
    pub(crate) fn keep_adopted(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }

    /// Puts this memory's own back in place of adopted memory. If that fails, the memory is
    /// refused to everyone for good, as handed over: this process must not write it.
    fn detach(&self) {
        let adopted = std::mem::take(&mut *self.adopted());
        for (region, previous) in self.memory.regions().iter().zip(adopted) {
            let Some(previous) = previous else {
                continue;
            };
            // SAFETY: the lease still keeps every other accessor away, and the session that
            // held it lends no page out any more (it is ending, or never started).
            if unsafe { region.restore(previous) }.is_err() {
                self.memory
                    .access
                    .handed_over
                    .store(HANDED_OVER, Ordering::SeqCst);
                // SAFETY: as above; every accessor is refused from now on.
                let _ = unsafe { region.revoke() };
            }
        }
    }

    /// Ends the exclusive lease for postcopy: the guest runs on this memory from now on (safe
    /// reads and writes are allowed again, and fault on missing pages), while the session
    /// places the missing pages atomically through userfaultfd. The claim it returns still
    /// keeps freezes and other receive sessions out. Taking the lease by value proves that no
    /// page of it is lent out any more.
    pub(crate) fn into_placing(self) -> PlacingClaim {
        let memory = Arc::clone(&self.memory);
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
        let p = self.memory.ptr(region, offset, PAGE_SIZE)?;
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
        let access = &self.0.access;
        // The last freeze of memory handed over meanwhile revokes its mappings, now that no
        // page is lent out (see `GuestMemory::hand_over`).
        if access.frozen.fetch_sub(1, Ordering::SeqCst) == 1
            && access.handed_over.load(Ordering::SeqCst) == HANDED_OVER
        {
            self.0.revoke();
        }
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
        self.access.check_not_handed_over()?;
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
        let lease = ReceiveLease {
            memory: Arc::clone(&self),
            adopted: Mutex::new(Vec::new()),
            kept: AtomicBool::new(false),
        };
        access.check_not_handed_over()?;
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

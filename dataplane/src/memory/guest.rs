//! [`GuestMemory`]: the regions of one guest, and the safe, copying ways into and out of them.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use super::access::{Access, AccessGuard, HANDED_OVER, HANDING_OVER, wait_for};
use super::atomic;
use super::error::MemoryError;
use super::page::{PAGE_SIZE, PAGE_SIZE_U64};
use super::region::{GuestAddr, Region, RegionLayout};

/// The guest RAM: one or more regions, addressed by their index in the list.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
    pub(super) access: Access,
}

/// A safe reader that holds its claim across many copies (a codec worker's batch), so the
/// protocol's counter is touched once per batch rather than once per page.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    memory: &'a GuestMemory,
    _guard: AccessGuard<'a>,
}

impl Reader<'_> {
    /// Copies guest bytes at `offset` of region `region` into `dst` (see [`GuestMemory::read`]).
    pub(crate) fn read(
        &self,
        region: usize,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), MemoryError> {
        let src = self.memory.ptr(region, offset, dst.len())?;
        // SAFETY: `ptr` checked that `dst.len()` bytes at `src` lie inside one mapping, which
        // lives as long as `self.memory`; regions are whole pages, so every word overlapping
        // the range does too. While this reader lives no receive lease exists (so no `&mut` to
        // these bytes), and every other access that may race is an atomic word copy or a read
        // through a freeze. `dst` is ours, outside any mapping we own.
        unsafe { atomic::load(src, dst) };
        Ok(())
    }
}

impl GuestMemory {
    /// Guest memory from regions, which must have distinct ids and must not overlap.
    pub fn new(regions: Vec<Region>) -> Result<Self, MemoryError> {
        if regions.is_empty() {
            return Err(MemoryError::Empty);
        }
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                let (a, b) = (a.layout(), b.layout());
                if a.id() == b.id() {
                    return Err(MemoryError::DuplicateId { id: a.id() });
                }
                let a_end = a.guest_base().0 + a.len();
                let b_end = b.guest_base().0 + b.len();
                if a.guest_base().0 < b_end && b.guest_base().0 < a_end {
                    return Err(MemoryError::Overlap {
                        first: a.id(),
                        second: b.id(),
                    });
                }
            }
        }
        Ok(GuestMemory {
            regions,
            access: Access::default(),
        })
    }

    /// One anonymous region of `len` bytes, id 0, at guest address 0.
    pub fn anonymous(len: u64) -> Result<Self, MemoryError> {
        GuestMemory::new(vec![Region::anonymous(0, GuestAddr(0), len)?])
    }

    /// Anonymous memory with the same layout as `layout`, e.g. for a receiver.
    pub fn anonymous_like(layout: &[RegionLayout]) -> Result<Self, MemoryError> {
        let regions = layout
            .iter()
            .map(|l| Region::anonymous(l.id(), l.guest_base(), l.len()))
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemory::new(regions)
    }

    /// One memfd region of `len` bytes, id 0, at guest address 0: guest RAM another process
    /// can map, so that a same-host migration hands it over instead of copying it.
    pub fn memfd(len: u64) -> Result<Self, MemoryError> {
        GuestMemory::new(vec![Region::memfd(0, GuestAddr(0), len)?])
    }

    /// Memfd memory with the same layout as `layout`.
    pub fn memfd_like(layout: &[RegionLayout]) -> Result<Self, MemoryError> {
        let regions = layout
            .iter()
            .map(|l| Region::memfd(l.id(), l.guest_base(), l.len()))
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemory::new(regions)
    }

    /// New descriptors of every region's memory, in index order, for another process to map
    /// (a same-host migration passes them over a Unix socket), or why this memory cannot be
    /// shared: a region is private (anonymous, or a private file mapping) or the embedder's.
    pub fn share_fds(&self) -> Result<Vec<OwnedFd>, String> {
        if let Some(why) = self.regions.iter().find_map(Region::unshareable) {
            return Err(why);
        }
        self.regions
            .iter()
            .map(|region| match region.try_clone_fd() {
                Ok(Some(fd)) => Ok(fd),
                Ok(None) => Err(format!("region {} has no descriptor", region.layout().id())),
                Err(e) => Err(format!(
                    "region {}'s descriptor cannot be duplicated: {e}",
                    region.layout().id()
                )),
            })
            .collect()
    }

    /// Hands the memory over for good (a same-host migration committed: another process runs
    /// the guest on the same memory now): from here every read, write, freeze and receive
    /// session in this process is refused with [`MemoryError::HandedOver`], and ramjet's own
    /// mappings are made inaccessible (`PROT_NONE`), so that a stale pointer or a vCPU of this
    /// process faults instead of writing the other process's guest. Waits for the safe reads and
    /// writes in progress; if pages are lent out under a freeze, the mappings are revoked when
    /// the last [`Frozen`](super::Frozen) guard goes. Memory the embedder mapped
    /// ([`Region::from_host`]) stays mapped: the embedder must stop touching it.
    pub fn hand_over(&self) {
        self.refuse_access();
        self.revoke_if_idle();
    }

    /// The first half of [`hand_over`](Self::hand_over), cheap: refuses every access from
    /// now on, once the accesses in progress are done.
    pub(crate) fn refuse_access(&self) {
        let access = &self.access;
        if access.handed_over.swap(HANDING_OVER, Ordering::SeqCst) != 0 {
            return;
        }
        wait_for(&access.reads);
        wait_for(&access.writes);
        // From here a freeze's last guard may revoke too (twice is harmless).
        access.handed_over.store(HANDED_OVER, Ordering::SeqCst);
    }

    /// The second half, which costs a walk of the page tables (about 80 ms for 2 GiB of 4 KiB
    /// pages here): revokes the mappings of memory whose access is refused, unless a freeze
    /// lends pages out (its last guard revokes them then).
    pub(crate) fn revoke_if_idle(&self) {
        let access = &self.access;
        if access.handed_over.load(Ordering::SeqCst) == HANDED_OVER
            && access.frozen.load(Ordering::SeqCst) == 0
        {
            self.revoke();
        }
    }

    /// Whether the memory was handed over to another process.
    pub fn is_handed_over(&self) -> bool {
        self.access.handed_over.load(Ordering::SeqCst) != 0
    }

    /// Makes every own mapping inaccessible, once handed over and nothing is lent out.
    pub(super) fn revoke(&self) {
        for region in &self.regions {
            // SAFETY: the memory was handed over, so every safe accessor is refused; the
            // accesses in progress were waited for, and no freeze lends pages out (the caller
            // saw none, or is the last one's drop). A failure (the kernel out of mapping
            // entries) leaves only stale pointers able to reach it: every accessor is refused
            // all the same.
            let _ = unsafe { region.revoke() };
        }
    }

    /// The regions, in index order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Every region's layout, in index order.
    pub fn layout(&self) -> Vec<RegionLayout> {
        self.regions.iter().map(Region::layout).collect()
    }

    /// Total bytes of guest RAM.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.layout().len()).sum()
    }

    /// Total pages of guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE_U64
    }

    /// Faults every page in for writing now (`MADV_POPULATE_WRITE`, or a touch per page on
    /// older kernels), as a VMM preallocates guest RAM at start-up, so that receiving a
    /// migration does not pay for page faults.
    pub fn prefault(&self) -> io::Result<()> {
        let _write = self.access.begin_write().map_err(io::Error::other)?;
        self.regions.iter().try_for_each(Region::prefault)
    }

    /// Starts a safe read that may make many copies; refused while a receive session holds
    /// the memory.
    pub(crate) fn reader(&self) -> Result<Reader<'_>, MemoryError> {
        Ok(Reader {
            memory: self,
            _guard: self.access.begin_read()?,
        })
    }

    /// Whether region `region` is known to be all zero, forgetting it: the caller is about to
    /// write the region (a receiver, whose zero pages then need no write).
    pub(crate) fn take_known_zero(&self, region: usize) -> bool {
        self.regions
            .get(region)
            .is_some_and(Region::take_known_zero)
    }

    fn forget_zero(&self, region: usize) {
        if let Some(r) = self.regions.get(region) {
            r.forget_zero();
        }
    }

    pub(super) fn ptr(
        &self,
        region: usize,
        offset: u64,
        len: usize,
    ) -> Result<*mut u8, MemoryError> {
        let len64 = len as u64;
        let out_of_bounds = || MemoryError::OutOfBounds {
            region,
            offset,
            len: len64,
        };
        self.regions
            .get(region)
            .ok_or_else(out_of_bounds)?
            .ptr_at(offset, len64)
            .map_err(|_| out_of_bounds())
    }

    /// Copies guest bytes at `offset` of region `region` into `dst`.
    ///
    /// The guest may be writing the same bytes meanwhile; the copy is then a mix of old and new
    /// words, which is fine for migration because such a write dirties the page again and it
    /// is sent again. Whatever is checksummed and sent is `dst`, never the guest page. Fails
    /// while a receive session holds the memory.
    pub fn read(&self, region: usize, offset: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.reader()?.read(region, offset, dst)
    }

    /// Copies `src` into guest memory at `offset` of region `region`. Fails while the memory is
    /// [frozen](Self::freeze) or a receive session holds it.
    pub fn write(&self, region: usize, offset: u64, src: &[u8]) -> Result<(), MemoryError> {
        let _write = self.access.begin_write()?;
        let dst = self.ptr(region, offset, src.len())?;
        self.forget_zero(region);
        // SAFETY: `ptr` checked the destination range, inside one mapping of whole pages; the
        // write guard keeps freezes and receive leases (the only holders of references to guest
        // bytes) away, and every other access that may race is an atomic word copy. `src` is
        // caller memory, not part of a mapping we own.
        unsafe { atomic::store(dst, src) };
        Ok(())
    }

    /// Sets `len` guest bytes at `offset` of region `region` to `byte`. Fails while the memory
    /// is [frozen](Self::freeze) or a receive session holds it.
    pub fn fill(
        &self,
        region: usize,
        offset: u64,
        len: usize,
        byte: u8,
    ) -> Result<(), MemoryError> {
        let _write = self.access.begin_write()?;
        let dst = self.ptr(region, offset, len)?;
        self.forget_zero(region);
        // SAFETY: as in `write`: a checked range, no references to it, only atomic racers.
        unsafe { atomic::fill(dst, byte, len) };
        Ok(())
    }

    /// Whether this memory has the same bytes as `other` (which must have the same layout),
    /// compared page by page. Meant for verification while neither side is being written.
    pub fn content_eq(&self, other: &GuestMemory) -> Result<bool, MemoryError> {
        Ok(self.first_difference(other)?.is_none())
    }

    /// The first page (region index, page) where this memory and `other` differ, or `None` if
    /// they are identical; an error if their layouts differ.
    pub fn first_difference(
        &self,
        other: &GuestMemory,
    ) -> Result<Option<(usize, u64)>, MemoryError> {
        if self.layout() != other.layout() {
            return Err(MemoryError::LayoutMismatch);
        }
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        let (mine, theirs) = (self.reader()?, other.reader()?);
        for (index, region) in self.regions.iter().enumerate() {
            for page in 0..region.layout().pages() {
                mine.read(index, page * PAGE_SIZE_U64, &mut a)?;
                theirs.read(index, page * PAGE_SIZE_U64, &mut b)?;
                if a != b {
                    return Ok(Some((index, page)));
                }
            }
        }
        Ok(None)
    }
}

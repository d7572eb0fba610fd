//! Guest memory: regions of guest RAM mapped into this process, by ramjet (anonymous, memfd, an
//! image file) or by the embedding VMM ([`Region::from_host`]).
//!
//! [`GuestMemory`] is the one type that owns the mappings and the raw pointers into them. Guest
//! pages are never handed out as `&[u8]` by the public API: on the source the guest keeps writing
//! them while they are read, so every read is a copy through a raw pointer into memory ramjet
//! owns ([`GuestMemory::read`]), and whatever is checksummed or sent is that copy. Every offset
//! that comes from a peer is bounds-checked here before any pointer is formed.
//!
//! The receiver writes pages through the crate-private `page_mut`, whose callers guarantee that
//! no two threads touch the same page at once (the wire protocol's page → channel assignment and
//! the once-per-round rule make that true even for a hostile peer; see `recv.rs`).
//!
//! The one exception to "always a copy" is memory that is [frozen](GuestMemory::freeze): the
//! sender freezes the source at switchover, once the guest is paused, and then checksums and
//! sends the final round straight from guest memory. While any [`Frozen`] guard lives, every
//! safe writer in this process ([`GuestMemory::write`], [`GuestMemory::fill`],
//! [`GuestMemory::prefault`], a receive session) is refused, so the pages it lends out as
//! `&[u8]` cannot change under them — from this process. Writers outside Rust's view (a vCPU
//! through KVM, another process sharing a memfd) are the embedder's to stop: that is what
//! pausing the guest means. If one keeps writing, the checksum no longer matches what was sent
//! and the receiver fails the migration.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use memmap2::{Advice, MmapOptions, MmapRaw};
use thiserror::Error;

/// Bytes per guest page. ramjet moves 4 KiB pages; larger host pages still hold 4 KiB guest
/// pages.
pub const PAGE_SIZE: usize = 4096;
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// A guest physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct GuestAddr(pub u64);

/// Where a region sits in the guest: its id, guest base address and length. Sender and receiver
/// must agree on every region's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionLayout {
    id: u32,
    guest_base: GuestAddr,
    len: u64,
}

impl RegionLayout {
    /// A layout; `len` must be a whole number of pages (checked by [`GuestMemory::new`]).
    pub const fn new(id: u32, guest_base: GuestAddr, len: u64) -> Self {
        RegionLayout {
            id,
            guest_base,
            len,
        }
    }

    /// The region's id.
    pub const fn id(&self) -> u32 {
        self.id
    }

    /// The guest address of its first byte.
    pub const fn guest_base(&self) -> GuestAddr {
        self.guest_base
    }

    /// Its length in bytes.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty (never true in a valid [`GuestMemory`]).
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its length in pages.
    pub const fn pages(&self) -> u64 {
        self.len / PAGE_SIZE_U64
    }
}

/// What backs a region's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory (with `MADV_HUGEPAGE`).
    Anonymous,
    /// A memory-image file mapped shared.
    File,
    /// A memfd, which another process can map too.
    Memfd,
    /// Memory the embedder mapped ([`Region::from_host`]).
    Host,
}

/// Errors from building or accessing guest memory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The kernel refused a mapping or a memfd.
    #[error("cannot map {what} of {len} bytes")]
    Map {
        /// What was being mapped.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A region length or guest base that is not page-aligned, or zero.
    #[error(
        "region {id}: base {base:#x} and length {len} must be non-zero multiples of {PAGE_SIZE}"
    )]
    Unaligned {
        /// The region id.
        id: u32,
        /// Its guest base.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Two regions with the same id.
    #[error("region id {id} is used twice")]
    DuplicateId {
        /// The id.
        id: u32,
    },
    /// Two regions that overlap in guest address space.
    #[error("regions {first} and {second} overlap in guest memory")]
    Overlap {
        /// The first region's id.
        first: u32,
        /// The second region's id.
        second: u32,
    },
    /// A memory with no region.
    #[error("guest memory needs at least one region")]
    Empty,
    /// Two memories compared page by page have different layouts.
    #[error("the guest memory layouts differ")]
    LayoutMismatch,
    /// A write to memory that a sender has frozen for its final round.
    #[error("guest memory is frozen: a sender is sending its final round from it")]
    Frozen,
    /// Freezing memory that a receive session is writing.
    #[error("guest memory cannot be frozen while a migration is being received into it")]
    Receiving,
    /// An access outside a region, or to a region that does not exist.
    #[error("{len} bytes at offset {offset:#x} of region index {region} are outside guest memory")]
    OutOfBounds {
        /// The region index.
        region: usize,
        /// The offset into it.
        offset: u64,
        /// The access length.
        len: u64,
    },
}

/// Where a region's bytes are mapped.
enum Mapping {
    /// A mapping the region made, and unmaps when dropped. `MmapRaw` never creates references
    /// to the mapped bytes.
    Own(MmapRaw),
    /// Memory the embedder mapped: `keep` holds whatever keeps it mapped.
    Host {
        ptr: ptr::NonNull<u8>,
        len: usize,
        _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
    },
}

// SAFETY: a host mapping is plain shared memory, like an `MmapRaw`: the region reaches it only
// through raw pointers, under the same rules as its own mappings (see the module docs), and
// `Region::from_host`'s caller guarantees it stays mapped for the region's life.
unsafe impl Send for Mapping {}
// SAFETY: as above; no `&`-access to the bytes is ever formed from a shared `Mapping`.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn as_mut_ptr(&self) -> *mut u8 {
        match self {
            Mapping::Own(map) => map.as_mut_ptr(),
            Mapping::Host { ptr, .. } => ptr.as_ptr(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Mapping::Own(map) => map.len(),
            Mapping::Host { len, .. } => *len,
        }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mapping::Own(map) => f.debug_tuple("Own").field(&map.as_ptr()).finish(),
            Mapping::Host { ptr, len, .. } => f
                .debug_struct("Host")
                .field("ptr", ptr)
                .field("len", len)
                .finish_non_exhaustive(),
        }
    }
}

/// One mapped region of guest RAM.
#[derive(Debug)]
pub struct Region {
    layout: RegionLayout,
    /// The mapping, reached only through raw pointers.
    map: Mapping,
    backing: Backing,
    /// Whether every byte is known to be zero (fresh anonymous or memfd memory that nothing has
    /// written yet).
    known_zero: AtomicBool,
    /// The memfd, kept open so the region can be shared.
    memfd: Option<File>,
}

impl Region {
    /// Fresh anonymous memory, zero-filled, with transparent huge pages requested.
    pub fn anonymous(id: u32, guest_base: GuestAddr, len: u64) -> Result<Self, MemoryError> {
        let layout = checked_layout(id, guest_base, len)?;
        let map_len = map_len(len)?;
        let map = MmapOptions::new()
            .len(map_len)
            .map_anon()
            .map_err(|source| MemoryError::Map {
                what: "anonymous memory",
                len,
                source,
            })?;
        // Huge pages make faults and TLB misses cheaper; without THP this is refused, harmlessly.
        let _ = map.advise(Advice::HugePage);
        Ok(Region {
            layout,
            map: Mapping::Own(MmapRaw::from(map)),
            backing: Backing::Anonymous,
            known_zero: AtomicBool::new(true),
            memfd: None,
        })
    }

    /// A new memfd of `len` bytes, zero-filled, mapped shared.
    pub fn memfd(id: u32, guest_base: GuestAddr, len: u64) -> Result<Self, MemoryError> {
        let layout = checked_layout(id, guest_base, len)?;
        let map_err = |source| MemoryError::Map {
            what: "a memfd",
            len,
            source,
        };
        // SAFETY: the name is a NUL-terminated C string literal; the call has no other inputs.
        let fd = unsafe { libc::memfd_create(c"ramjet-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(map_err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).map_err(map_err)?;
        let map = MmapOptions::new()
            .len(map_len(len)?)
            .map_raw(&file)
            .map_err(map_err)?;
        Ok(Region {
            layout,
            map: Mapping::Own(map),
            backing: Backing::Memfd,
            known_zero: AtomicBool::new(true),
            memfd: Some(file),
        })
    }

    /// Maps a memory-image file shared: writes go to the file. Its length must be a whole
    /// number of pages.
    ///
    /// # Safety
    ///
    /// While the region lives, no other process or thread may truncate the file (accessing a
    /// truncated mapping raises `SIGBUS`), and on a receiver nothing else may write the file
    /// (the receiver verifies checksums over the bytes it wrote). This is memmap2's contract for
    /// file mappings.
    pub unsafe fn from_file(
        id: u32,
        guest_base: GuestAddr,
        file: &File,
    ) -> Result<Self, MemoryError> {
        let len = file
            .metadata()
            .map_err(|source| MemoryError::Map {
                what: "an image file",
                len: 0,
                source,
            })?
            .len();
        let layout = checked_layout(id, guest_base, len)?;
        let map = MmapOptions::new()
            .len(map_len(len)?)
            .map_raw(file)
            .map_err(|source| MemoryError::Map {
                what: "an image file",
                len,
                source,
            })?;
        Ok(Region {
            layout,
            map: Mapping::Own(map),
            backing: Backing::File,
            known_zero: AtomicBool::new(false),
            memfd: None,
        })
    }

    /// A region over guest RAM the embedder has mapped itself (a VMM's own guest memory):
    /// `len` bytes at `ptr`, page-aligned. `keep` is held for the region's life, for whatever
    /// keeps the mapping alive (the VMM's memory object, say).
    ///
    /// # Safety
    ///
    /// `ptr .. ptr + len` must be one readable and writable mapping that stays mapped, and is
    /// not truncated if file-backed, for as long as the region lives. The guest may write it
    /// at any time, as it may write any region; but once a sender has frozen the memory for
    /// its final round, nothing may write it until the freeze ends (see the module docs).
    pub unsafe fn from_host(
        id: u32,
        guest_base: GuestAddr,
        ptr: *mut u8,
        len: u64,
        keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Self, MemoryError> {
        let layout = checked_layout(id, guest_base, len)?;
        let map_len = map_len(len)?;
        let ptr = ptr::NonNull::new(ptr)
            .filter(|p| (p.as_ptr() as usize).is_multiple_of(PAGE_SIZE))
            .ok_or(MemoryError::Unaligned {
                id,
                base: ptr as u64,
                len,
            })?;
        Ok(Region {
            layout,
            map: Mapping::Host {
                ptr,
                len: map_len,
                _keep: keep,
            },
            backing: Backing::Host,
            known_zero: AtomicBool::new(false),
            memfd: None,
        })
    }

    /// Where the region sits in the guest.
    pub const fn layout(&self) -> RegionLayout {
        self.layout
    }

    /// What backs it.
    pub const fn backing(&self) -> Backing {
        self.backing
    }

    /// The memfd behind a [`Backing::Memfd`] region, to share it with another process.
    pub fn memfd_fd(&self) -> Option<BorrowedFd<'_>> {
        self.memfd.as_ref().map(AsFd::as_fd)
    }

    /// Faults every page in for writing now (`MADV_POPULATE_WRITE`, or a touch per page on
    /// older kernels).
    fn prefault(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping, which stays alive for the call;
        // MADV_POPULATE_WRITE only faults pages in and does not change their contents.
        let ret = unsafe {
            libc::madvise(
                self.map.as_mut_ptr().cast(),
                self.map.len(),
                libc::MADV_POPULATE_WRITE,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
        // Kernels before 5.14: touch one byte per page, atomically, so a concurrent writer
        // never loses a write.
        for page in 0..self.layout.pages() {
            let offset = page * PAGE_SIZE_U64;
            let p = self
                .ptr_at(offset, 1)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `p` is in bounds and aligned for u8; an atomic add of zero keeps the value.
            let atomic = unsafe { AtomicU8::from_ptr(p) };
            atomic.fetch_add(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The host address and length of the mapping, for the kernel interfaces that track it
    /// (userfaultfd, `PAGEMAP_SCAN`); never dereferenced.
    pub(crate) fn host_range(&self) -> (usize, usize) {
        (self.map.as_mut_ptr() as usize, self.map.len())
    }

    /// A pointer to `len` bytes at `offset`, after checking they lie inside the region.
    fn ptr_at(&self, offset: u64, len: u64) -> Result<*mut u8, (u64, u64)> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout.len => {
                // The bounds check above keeps `offset` below the mapping length, a usize.
                let offset = usize::try_from(offset).map_err(|_| (offset, len))?;
                // SAFETY: offset + len <= the mapping length, so the result stays within (or one
                // past the end of) the mapping.
                Ok(unsafe { self.map.as_mut_ptr().add(offset) })
            }
            _ => Err((offset, len)),
        }
    }
}

fn checked_layout(id: u32, guest_base: GuestAddr, len: u64) -> Result<RegionLayout, MemoryError> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE_U64) || !guest_base.0.is_multiple_of(PAGE_SIZE_U64)
    {
        return Err(MemoryError::Unaligned {
            id,
            base: guest_base.0,
            len,
        });
    }
    if guest_base.0.checked_add(len).is_none() {
        return Err(MemoryError::Unaligned {
            id,
            base: guest_base.0,
            len,
        });
    }
    Ok(RegionLayout::new(id, guest_base, len))
}

fn map_len(len: u64) -> Result<usize, MemoryError> {
    usize::try_from(len).map_err(|_| MemoryError::Map {
        what: "memory",
        len,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// The guest RAM: one or more regions, addressed by their index in the list.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
    access: Access,
}

/// Who may write the memory now: frozen memory refuses writers, and freezing waits for the
/// writes in progress. Each side raises its own counter before it looks at the other's, with
/// sequentially consistent operations, so at least one of two racing parties sees the other.
#[derive(Debug, Default)]
struct Access {
    /// Live [`Frozen`] guards.
    frozen: AtomicUsize,
    /// Safe writes in progress.
    writes: AtomicUsize,
    /// Receive sessions writing the memory.
    receivers: AtomicUsize,
}

/// A write in progress (see [`Access`]).
struct WriteGuard<'a>(&'a AtomicUsize);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A receive session's claim on the memory it writes: while it lives, the memory cannot be
/// frozen.
#[derive(Debug)]
pub(crate) struct ReceiveLease(Arc<GuestMemory>);

impl Drop for ReceiveLease {
    fn drop(&mut self) {
        self.0.access.receivers.fetch_sub(1, Ordering::SeqCst);
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
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &(self.0).0
    }

    /// The guest page `page` of region `region`, in place.
    pub fn page(&self, region: usize, page: u64) -> Result<&[u8], MemoryError> {
        let memory = self.memory();
        let p = memory.ptr(region, page.saturating_mul(PAGE_SIZE_U64), PAGE_SIZE)?;
        // SAFETY: `ptr` checked that the page lies inside the mapping, which lives as long as
        // `memory`, and so as long as `self`. While `self` lives the memory is frozen: every
        // safe writer in this process is refused (see `Access`), so the bytes cannot change
        // for as long as the slice borrows `self`. Writers outside the process's view are the
        // embedder's to stop (pausing the guest), as the module documentation explains.
        Ok(unsafe { std::slice::from_raw_parts(p, PAGE_SIZE) })
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
                let (a, b) = (a.layout, b.layout);
                if a.id == b.id {
                    return Err(MemoryError::DuplicateId { id: a.id });
                }
                let a_end = a.guest_base.0 + a.len;
                let b_end = b.guest_base.0 + b.len;
                if a.guest_base.0 < b_end && b.guest_base.0 < a_end {
                    return Err(MemoryError::Overlap {
                        first: a.id,
                        second: b.id,
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
            .map(|l| Region::anonymous(l.id, l.guest_base, l.len))
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemory::new(regions)
    }

    /// The regions, in index order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Every region's layout, in index order.
    pub fn layout(&self) -> Vec<RegionLayout> {
        self.regions.iter().map(|r| r.layout).collect()
    }

    /// Total bytes of guest RAM.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.layout.len).sum()
    }

    /// Total pages of guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE_U64
    }

    /// Faults every page in for writing now (`MADV_POPULATE_WRITE`, or a touch per page on
    /// older kernels), as a VMM preallocates guest RAM at start-up, so that receiving a
    /// migration does not pay for page faults.
    pub fn prefault(&self) -> io::Result<()> {
        let _write = self.begin_write().map_err(io::Error::other)?;
        self.regions.iter().try_for_each(Region::prefault)
    }

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
        if self.access.receivers.load(Ordering::SeqCst) != 0 {
            return Err(MemoryError::Receiving);
        }
        // Writes are single copies, so this wait is short.
        while self.access.writes.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        Ok(guard)
    }

    /// Whether the memory is frozen now.
    pub fn is_frozen(&self) -> bool {
        self.access.frozen.load(Ordering::SeqCst) != 0
    }

    /// Claims the memory for a receive session; fails if it is frozen.
    pub(crate) fn lease_for_receiving(self: &Arc<Self>) -> Result<ReceiveLease, MemoryError> {
        self.access.receivers.fetch_add(1, Ordering::SeqCst);
        let lease = ReceiveLease(Arc::clone(self));
        if self.is_frozen() {
            return Err(MemoryError::Frozen);
        }
        Ok(lease)
    }

    fn begin_write(&self) -> Result<WriteGuard<'_>, MemoryError> {
        self.access.writes.fetch_add(1, Ordering::SeqCst);
        let guard = WriteGuard(&self.access.writes);
        if self.is_frozen() {
            return Err(MemoryError::Frozen);
        }
        Ok(guard)
    }

    /// Whether region `region` is known to be all zero, forgetting it: the caller is about to
    /// write the region (a receiver, whose zero pages then need no write).
    pub(crate) fn take_known_zero(&self, region: usize) -> bool {
        self.regions
            .get(region)
            .is_some_and(|r| r.known_zero.swap(false, Ordering::Relaxed))
    }

    fn forget_zero(&self, region: usize) {
        if let Some(r) = self.regions.get(region) {
            r.known_zero.store(false, Ordering::Relaxed);
        }
    }

    fn ptr(&self, region: usize, offset: u64, len: usize) -> Result<*mut u8, MemoryError> {
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
    /// bytes, which is fine for migration because such a write dirties the page again and it is
    /// sent again. Whatever is checksummed and sent is `dst`, never the guest page.
    pub fn read(&self, region: usize, offset: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.ptr(region, offset, dst.len())?;
        // SAFETY: `ptr` checked that `dst.len()` bytes at `src` lie inside the mapping, which
        // lives as long as `self`; `dst` is ours and cannot overlap a mapping we own. No
        // reference to guest memory is formed: the bytes are copied through the raw pointer.
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into guest memory at `offset` of region `region`.
    /// Fails while the memory is [frozen](Self::freeze).
    pub fn write(&self, region: usize, offset: u64, src: &[u8]) -> Result<(), MemoryError> {
        let _write = self.begin_write()?;
        let dst = self.ptr(region, offset, src.len())?;
        self.forget_zero(region);
        // SAFETY: `ptr` checked the destination range; `src` is caller memory, not part of a
        // mapping we own, so the ranges do not overlap.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// Sets `len` guest bytes at `offset` of region `region` to `byte`. Fails while the memory
    /// is [frozen](Self::freeze).
    pub fn fill(
        &self,
        region: usize,
        offset: u64,
        len: usize,
        byte: u8,
    ) -> Result<(), MemoryError> {
        let _write = self.begin_write()?;
        let dst = self.ptr(region, offset, len)?;
        self.forget_zero(region);
        // SAFETY: `ptr` checked that the `len` bytes at `dst` lie inside the mapping.
        unsafe { ptr::write_bytes(dst, byte, len) };
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
        for (index, region) in self.regions.iter().enumerate() {
            for page in 0..region.layout.pages() {
                self.read(index, page * PAGE_SIZE_U64, &mut a)?;
                other.read(index, page * PAGE_SIZE_U64, &mut b)?;
                if a != b {
                    return Ok(Some((index, page)));
                }
            }
        }
        Ok(None)
    }

    /// The guest page `page` of region `region` as a mutable slice.
    ///
    /// # Safety
    ///
    /// For as long as the slice lives, no other thread or process may read or write this page
    /// (the receiver's protocol checks guarantee that: each page belongs to one channel, is
    /// written at most once per round, and rounds are separated by a barrier).
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
        let p = self.ptr(region, offset, PAGE_SIZE)?;
        // SAFETY: `ptr` checked that the page lies inside the mapping, which outlives the borrow
        // of `self`; the caller guarantees exclusive access for the slice's lifetime.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, PAGE_SIZE) })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A read-write file of `len` bytes that is already unlinked: gone when dropped.
    pub(crate) fn scratch_file(tag: &str, len: u64) -> File {
        let path = std::env::temp_dir().join(format!(
            "ramjet-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn anonymous_memory_is_zero_and_holds_writes() {
        let memory = GuestMemory::anonymous(16 * PAGE_SIZE_U64).unwrap();
        assert_eq!(memory.total_pages(), 16);
        assert!(memory.take_known_zero(0));
        assert!(!memory.take_known_zero(0), "taken");
        let mut page = vec![1u8; PAGE_SIZE];
        memory.read(0, 5 * PAGE_SIZE_U64, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        memory.write(0, 5 * PAGE_SIZE_U64 + 10, b"ramjet").unwrap();
        memory.read(0, 5 * PAGE_SIZE_U64, &mut page).unwrap();
        assert_eq!(&page[10..16], b"ramjet");
        memory.fill(0, 0, PAGE_SIZE, 0xAB).unwrap();
        memory.read(0, 0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xAB));
        memory.prefault().unwrap();
    }

    #[test]
    fn frozen_memory_refuses_writers_and_lends_its_pages() {
        let memory = Arc::new(GuestMemory::anonymous(4 * PAGE_SIZE_U64).unwrap());
        memory.fill(0, PAGE_SIZE_U64, PAGE_SIZE, 7).unwrap();
        let frozen = memory.freeze().unwrap();
        let again = frozen.clone();
        drop(frozen);
        assert!(memory.is_frozen(), "a clone keeps the freeze");
        assert!(again.page(0, 1).unwrap().iter().all(|&b| b == 7));
        assert!(again.page(0, 4).is_err(), "bounds are checked");
        assert!(again.page(1, 0).is_err());
        assert!(matches!(memory.write(0, 0, b"x"), Err(MemoryError::Frozen)));
        assert!(matches!(memory.fill(0, 0, 1, 1), Err(MemoryError::Frozen)));
        assert!(memory.prefault().is_err());
        assert!(matches!(
            memory.lease_for_receiving(),
            Err(MemoryError::Frozen)
        ));
        drop(again);
        assert!(!memory.is_frozen());
        memory.write(0, 0, b"x").unwrap();
        // A receive session and a freeze exclude each other both ways.
        let lease = memory.lease_for_receiving().unwrap();
        assert!(matches!(memory.freeze(), Err(MemoryError::Receiving)));
        assert!(!memory.is_frozen(), "a failed freeze leaves nothing behind");
        drop(lease);
        drop(memory.freeze().unwrap());
    }

    #[test]
    fn a_freeze_waits_for_racing_writers_and_then_nothing_changes() {
        let memory = Arc::new(GuestMemory::anonymous(PAGE_SIZE_U64).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicUsize::new(0));
        let writer = {
            let (memory, stop, written) =
                (Arc::clone(&memory), Arc::clone(&stop), Arc::clone(&written));
            std::thread::spawn(move || {
                let mut byte = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    byte = byte.wrapping_add(1);
                    match memory.fill(0, 0, PAGE_SIZE, byte) {
                        Ok(()) => written.fetch_add(1, Ordering::Relaxed),
                        Err(MemoryError::Frozen) => 0,
                        Err(e) => panic!("{e}"),
                    };
                }
            })
        };
        // The writer is running before the first freeze.
        while written.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        for _ in 0..200 {
            let frozen = memory.freeze().unwrap();
            let first = frozen.page(0, 0).unwrap().to_vec();
            std::thread::yield_now();
            assert_eq!(
                frozen.page(0, 0).unwrap(),
                &first[..],
                "a frozen page changed"
            );
            assert!(first.iter().all(|&b| b == first[0]), "a write was torn");
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn every_access_is_bounds_checked() {
        let memory = GuestMemory::anonymous(4 * PAGE_SIZE_U64).unwrap();
        let mut buf = [0u8; 8];
        for (region, offset) in [
            (0, 4 * PAGE_SIZE_U64 - 4),
            (0, 4 * PAGE_SIZE_U64),
            (0, u64::MAX - 2),
            (1, 0),
            (usize::MAX, 0),
        ] {
            let err = memory.read(region, offset, &mut buf).unwrap_err();
            assert!(matches!(err, MemoryError::OutOfBounds { .. }), "{err}");
            assert!(memory.write(region, offset, &buf).is_err());
            assert!(memory.fill(region, offset, 8, 0).is_err());
        }
        // SAFETY: the call fails its bounds check before forming any slice.
        let err = unsafe { memory.page_mut(0, 4) }.unwrap_err();
        assert!(err.to_string().contains("outside guest memory"), "{err}");
        // SAFETY: as above; the multiplication overflows and is refused.
        assert!(unsafe { memory.page_mut(0, u64::MAX) }.is_err());
    }

    #[test]
    fn host_mappings_are_shared_and_checked() {
        let mut host = memmap2::MmapMut::map_anon(2 * PAGE_SIZE).unwrap();
        host[PAGE_SIZE] = 7;
        let ptr = host.as_mut_ptr();
        let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(std::sync::Mutex::new(host));
        // SAFETY: `keep` holds the mapping for as long as the region lives.
        let region =
            unsafe { Region::from_host(4, GuestAddr(0), ptr, 2 * PAGE_SIZE_U64, Some(keep)) }
                .unwrap();
        assert_eq!(region.backing(), Backing::Host);
        let memory = GuestMemory::new(vec![region]).unwrap();
        let mut byte = [0u8; 1];
        memory.read(0, PAGE_SIZE_U64, &mut byte).unwrap();
        assert_eq!(byte, [7]);
        memory.prefault().unwrap();
        // SAFETY: both calls fail their checks before any access.
        let null = unsafe { Region::from_host(0, GuestAddr(0), ptr::null_mut(), 4096, None) };
        assert!(matches!(null, Err(MemoryError::Unaligned { .. })));
        // SAFETY: as above.
        let odd = unsafe { Region::from_host(0, GuestAddr(0), ptr.wrapping_add(1), 4096, None) };
        assert!(matches!(odd, Err(MemoryError::Unaligned { .. })));
    }

    #[test]
    fn layouts_are_validated() {
        let r = |id, base, len| Region::anonymous(id, GuestAddr(base), len);
        assert!(matches!(r(0, 0, 100), Err(MemoryError::Unaligned { .. })));
        assert!(matches!(r(0, 1, 4096), Err(MemoryError::Unaligned { .. })));
        assert!(matches!(r(0, 0, 0), Err(MemoryError::Unaligned { .. })));
        assert!(matches!(GuestMemory::new(vec![]), Err(MemoryError::Empty)));
        let dup = GuestMemory::new(vec![r(1, 0, 4096).unwrap(), r(1, 8192, 4096).unwrap()]);
        assert!(matches!(dup, Err(MemoryError::DuplicateId { id: 1 })));
        let overlap = GuestMemory::new(vec![r(1, 0, 8192).unwrap(), r(2, 4096, 4096).unwrap()]);
        assert!(matches!(
            overlap,
            Err(MemoryError::Overlap {
                first: 1,
                second: 2
            })
        ));
        let ok =
            GuestMemory::new(vec![r(1, 0, 8192).unwrap(), r(2, 1 << 32, 4096).unwrap()]).unwrap();
        assert_eq!(ok.total_pages(), 3);
        let like = GuestMemory::anonymous_like(&ok.layout()).unwrap();
        assert_eq!(like.layout(), ok.layout());
        assert!(like.content_eq(&ok).unwrap());
    }

    #[test]
    fn memfd_and_file_regions_share_their_bytes() {
        let region = Region::memfd(3, GuestAddr(0), 2 * PAGE_SIZE_U64).unwrap();
        assert_eq!(region.backing(), Backing::Memfd);
        let fd = region.memfd_fd().unwrap().try_clone_to_owned().unwrap();
        let memory = GuestMemory::new(vec![region]).unwrap();
        memory.write(0, PAGE_SIZE_U64, b"shared").unwrap();
        // Map the same memfd as a file: it sees the write.
        let file = File::from(fd);
        // SAFETY: the memfd is private to this test and never truncated.
        let again = unsafe { Region::from_file(3, GuestAddr(0), &file) }.unwrap();
        assert_eq!(again.backing(), Backing::File);
        let other = GuestMemory::new(vec![again]).unwrap();
        let mut buf = [0u8; 6];
        other.read(0, PAGE_SIZE_U64, &mut buf).unwrap();
        assert_eq!(&buf, b"shared");
        assert!(memory.content_eq(&other).unwrap());
        other.write(0, PAGE_SIZE_U64 + 1, b"x").unwrap();
        memory.read(0, PAGE_SIZE_U64, &mut buf).unwrap();
        assert_eq!(&buf, b"sxared");
        let unshared = GuestMemory::new(vec![
            Region::anonymous(3, GuestAddr(0), 2 * PAGE_SIZE_U64).unwrap(),
        ])
        .unwrap();
        assert_eq!(memory.first_difference(&unshared).unwrap(), Some((0, 1)));
        let other_layout = GuestMemory::anonymous(8192).unwrap();
        assert!(matches!(
            memory.first_difference(&other_layout),
            Err(MemoryError::LayoutMismatch)
        ));
    }
}

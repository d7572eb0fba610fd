//! Regions: where each piece of guest RAM sits in the guest ([`RegionLayout`]), what backs it
//! ([`Backing`]), and the one type that owns its mapping and the raw pointers into it
//! ([`Region`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(not(miri))]
use memmap2::Advice;
use memmap2::{MmapOptions, MmapRaw};

use super::atomic;
use super::error::MemoryError;
use super::page::{PAGE_SIZE, PAGE_SIZE_U64};

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
    /// A layout; `len` must be a whole number of pages (checked by
    /// [`GuestMemory::new`](super::GuestMemory::new)).
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

    /// Whether it is empty (never true in a valid [`GuestMemory`](super::GuestMemory)).
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
    /// Under Miri, which cannot `mmap` files or `madvise`: page-aligned zeroed heap memory,
    /// freed when dropped. Reached only through raw pointers, like a mapping.
    #[cfg(miri)]
    Heap(heap::Pages),
}

// SAFETY: every variant is plain memory that no thread owns: the region reaches it only through
// raw pointers, under the rules of the module docs (races go through `atomic`; references are
// formed only under a freeze or a receive lease), and `Region::from_host`'s caller guarantees a
// host mapping stays mapped for the region's life.
unsafe impl Send for Mapping {}
// SAFETY: as above. Shared use from several threads is what the mapping is for: the `Access`
// protocol of `GuestMemory` decides who may form references to its bytes (a `Frozen` guard:
// shared ones, no writer; the receive lease: exclusive ones, one page to one thread), and every
// other access is an atomic word copy.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn as_mut_ptr(&self) -> *mut u8 {
        match self {
            Mapping::Own(map) => map.as_mut_ptr(),
            Mapping::Host { ptr, .. } => ptr.as_ptr(),
            #[cfg(miri)]
            Mapping::Heap(pages) => pages.as_mut_ptr(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Mapping::Own(map) => map.len(),
            Mapping::Host { len, .. } => *len,
            #[cfg(miri)]
            Mapping::Heap(pages) => pages.len(),
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
            #[cfg(miri)]
            Mapping::Heap(pages) => f.debug_tuple("Heap").field(&pages.len()).finish(),
        }
    }
}

/// The Miri backing: Miri runs the unit tests of memory, dirty, wire and codec, but has no
/// `mmap` of files and no `madvise`, so anonymous regions are heap pages there.
#[cfg(miri)]
mod heap {
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::ptr::NonNull;

    use super::PAGE_SIZE;

    /// Zeroed, page-aligned heap memory.
    pub(super) struct Pages {
        ptr: NonNull<u8>,
        layout: Layout,
    }

    impl Pages {
        pub(super) fn zeroed(len: usize) -> Option<Pages> {
            let layout = Layout::from_size_align(len, PAGE_SIZE).ok()?;
            if layout.size() == 0 {
                return None;
            }
            // SAFETY: the layout has a non-zero size.
            let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
            Some(Pages { ptr, layout })
        }

        pub(super) fn as_mut_ptr(&self) -> *mut u8 {
            self.ptr.as_ptr()
        }

        pub(super) fn len(&self) -> usize {
            self.layout.size()
        }
    }

    impl Drop for Pages {
        fn drop(&mut self) {
            // SAFETY: allocated by `alloc_zeroed` with this layout, freed once.
            unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
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
        let map = anonymous_mapping(len)?;
        Ok(Region {
            layout,
            map,
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

    /// Maps a memory-image file private (copy-on-write), as QEMU's `memory-backend-file` with
    /// `share=off`: the guest starts from the file's pages and its writes stay in this
    /// process, never reaching the file, which may be read-only. Pages are read from the file
    /// as they are first touched, so mapping a large image costs nothing up front. Its length
    /// must be a whole number of pages.
    ///
    /// # Safety
    ///
    /// While the region lives, no other process or thread may truncate the file (accessing a
    /// truncated mapping raises `SIGBUS`) or write the pages the guest has not written yet
    /// (a private mapping shows other writers' changes until its own first write to a page).
    /// This is memmap2's contract for file mappings.
    pub unsafe fn from_file_private(
        id: u32,
        guest_base: GuestAddr,
        file: &File,
    ) -> Result<Self, MemoryError> {
        let map_err = |len, source| MemoryError::Map {
            what: "an image file",
            len,
            source,
        };
        let len = file.metadata().map_err(|e| map_err(0, e))?.len();
        let layout = checked_layout(id, guest_base, len)?;
        // SAFETY: the caller keeps the file from being truncated or written meanwhile, as this
        // function's contract says; the mapping is private, so nothing here writes the file.
        let map = unsafe { MmapOptions::new().len(map_len(len)?).map_copy(file) }
            .map_err(|e| map_err(len, e))?;
        Ok(Region {
            layout,
            map: Mapping::Own(MmapRaw::from(map)),
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
    pub(super) fn prefault(&self) -> io::Result<()> {
        // Miri has no madvise: touch the pages.
        #[cfg(not(miri))]
        {
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
        }
        // Kernels before 5.14: touch one word per page, atomically, so a concurrent writer
        // never loses a write.
        for page in 0..self.layout.pages() {
            let p = self
                .ptr_at(page * PAGE_SIZE_U64, 1)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `p` is inside the mapping, whose words are only accessed atomically
            // while others may access them (see `atomic`).
            unsafe { atomic::touch(p) };
        }
        Ok(())
    }

    /// The host address and length of the mapping, for the kernel interfaces that track it
    /// (userfaultfd, `PAGEMAP_SCAN`); never dereferenced.
    pub(crate) fn host_range(&self) -> (usize, usize) {
        (self.map.as_mut_ptr() as usize, self.map.len())
    }

    /// Whether every byte is known to be zero, forgetting it (see `GuestMemory::take_known_zero`).
    pub(super) fn take_known_zero(&self) -> bool {
        self.known_zero.swap(false, Ordering::Relaxed)
    }

    /// Forgets that the region is all zero: it is being written.
    pub(super) fn forget_zero(&self) {
        self.known_zero.store(false, Ordering::Relaxed);
    }

    /// A pointer to `len` bytes at `offset`, after checking they lie inside the region.
    pub(super) fn ptr_at(&self, offset: u64, len: u64) -> Result<*mut u8, (u64, u64)> {
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

/// Anonymous private memory of `len` bytes, zero-filled, with transparent huge pages asked for.
#[cfg(not(miri))]
fn anonymous_mapping(len: u64) -> Result<Mapping, MemoryError> {
    let map = MmapOptions::new()
        .len(map_len(len)?)
        .map_anon()
        .map_err(|source| MemoryError::Map {
            what: "anonymous memory",
            len,
            source,
        })?;
    // Huge pages make faults and TLB misses cheaper; without THP this is refused, harmlessly.
    let _ = map.advise(Advice::HugePage);
    Ok(Mapping::Own(MmapRaw::from(map)))
}

/// Miri's stand-in for an anonymous mapping: zeroed heap pages.
#[cfg(miri)]
fn anonymous_mapping(len: u64) -> Result<Mapping, MemoryError> {
    heap::Pages::zeroed(map_len(len)?)
        .map(Mapping::Heap)
        .ok_or(MemoryError::Map {
            what: "anonymous memory",
            len,
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        })
}

fn map_len(len: u64) -> Result<usize, MemoryError> {
    usize::try_from(len).map_err(|_| MemoryError::Map {
        what: "memory",
        len,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

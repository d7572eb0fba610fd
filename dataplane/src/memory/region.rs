//! Regions: where each piece of guest RAM sits in the guest ([`RegionLayout`]), what backs it
//! ([`Backing`]), and the one type that owns its mapping and the raw pointers into it
//! ([`Region`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    /// A memfd (or another shared-memory file), which another process can map too.
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
    /// What backs it; a receiver that takes a same-host sender's memory changes it.
    share: Mutex<Share>,
    /// Whether every byte is known to be zero (fresh anonymous or memfd memory that nothing has
    /// written yet).
    known_zero: AtomicBool,
}

/// What backs a region, and the file that another process can map to share it.
#[derive(Debug)]
pub(super) struct Share {
    backing: Backing,
    /// The memfd, or the file of a shared file mapping, kept open so the region can be shared;
    /// `None` for private memory.
    fd: Option<File>,
}

impl Share {
    fn new(backing: Backing, fd: Option<File>) -> Mutex<Share> {
        Mutex::new(Share { backing, fd })
    }
}

impl Region {
    /// Fresh anonymous memory, zero-filled, with transparent huge pages requested.
    pub fn anonymous(id: u32, guest_base: GuestAddr, len: u64) -> Result<Self, MemoryError> {
        let layout = checked_layout(id, guest_base, len)?;
        let map = anonymous_mapping(len)?;
        Ok(Region {
            layout,
            map,
            share: Share::new(Backing::Anonymous, None),
            known_zero: AtomicBool::new(true),
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
        let fd = unsafe {
            libc::memfd_create(
                c"ramjet-guest".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
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
            share: Share::new(Backing::Memfd, Some(file)),
            known_zero: AtomicBool::new(true),
        })
    }

    /// Maps a memory-image file shared: writes go to the file. Its length must be a whole
    /// number of pages. The region keeps a handle to the file, so that a same-host migration
    /// can hand it to another process.
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
        let fd = file.try_clone().map_err(|source| MemoryError::Map {
            what: "an image file",
            len,
            source,
        })?;
        Ok(Region {
            layout,
            map: Mapping::Own(map),
            share: Share::new(Backing::File, Some(fd)),
            known_zero: AtomicBool::new(false),
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
            share: Share::new(Backing::File, None),
            known_zero: AtomicBool::new(false),
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
            share: Share::new(Backing::Host, None),
            known_zero: AtomicBool::new(false),
        })
    }

    /// Where the region sits in the guest.
    pub const fn layout(&self) -> RegionLayout {
        self.layout
    }

    /// What backs it.
    pub fn backing(&self) -> Backing {
        self.share().backing
    }

    fn share(&self) -> std::sync::MutexGuard<'_, Share> {
        // A panic under the lock cannot leave `Share` half-changed: it is replaced whole.
        self.share.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new descriptor of the file behind a shareable region (a memfd, or a file mapped
    /// shared), to share it with another process; `None` for private memory.
    pub fn try_clone_fd(&self) -> io::Result<Option<OwnedFd>> {
        self.share()
            .fd
            .as_ref()
            .map(|file| file.try_clone().map(OwnedFd::from))
            .transpose()
    }

    /// Why this region cannot be handed to another process by descriptor, if it cannot.
    pub(super) fn unshareable(&self) -> Option<String> {
        let share = self.share();
        let id = self.layout.id;
        match (share.backing, &share.fd) {
            (_, Some(_)) => None,
            (Backing::Anonymous, None) => Some(format!(
                "region {id} is anonymous private memory, which no other process can map (a \
                 memfd or a shared file mapping can be handed over)"
            )),
            (Backing::File, None) => Some(format!(
                "region {id} is a private (copy-on-write) mapping of a file: the guest's writes \
                 are in this process only (map it shared to hand it over)"
            )),
            (Backing::Host, None) => Some(format!(
                "region {id} is mapped by the embedder, and ramjet has no descriptor for it"
            )),
            (Backing::Memfd, None) => Some(format!("region {id} lost its memfd")),
        }
    }

    /// Whether this region's mapping is ramjet's own (and so may be replaced by another).
    pub(super) fn is_own(&self) -> bool {
        matches!(self.map, Mapping::Own(_))
    }

    /// Replaces this region's pages with `file`'s, mapped shared at the same address, so every
    /// pointer into the region now reaches the file's memory; `backing` says what the file is.
    ///
    /// # Safety
    ///
    /// Nothing may access the region's bytes during the call (the caller holds the memory's
    /// receive lease, and none of its pages is lent out); `file` must be a regular file of at
    /// least the region's length ([`check_shared_fd`]), which nobody truncates while it is
    /// mapped.
    pub(super) unsafe fn replace_with(&self, file: File, backing: Backing) -> io::Result<Share> {
        // SAFETY: the caller's guarantee; `file` is a regular file at least the region's
        // length.
        unsafe { self.map_over(libc::MAP_SHARED, file.as_raw_fd()) }?;
        let previous = std::mem::replace(
            &mut *self.share(),
            Share {
                backing,
                fd: Some(file),
            },
        );
        self.known_zero.store(false, Ordering::Relaxed);
        Ok(previous)
    }

    /// Maps `fd` (or anonymous memory) with `flags` over exactly this region's own mapping,
    /// read-write, in place (`MAP_FIXED`).
    ///
    /// # Safety
    ///
    /// As for [`replace_with`](Self::replace_with): nothing may access the region's bytes
    /// during the call, and a file `fd` is at least the region's length and never truncated
    /// while mapped.
    unsafe fn map_over(&self, flags: libc::c_int, fd: libc::c_int) -> io::Result<()> {
        if !self.is_own() {
            return Err(io::Error::other("the region's mapping is not ramjet's"));
        }
        let (addr, len) = (self.map.as_mut_ptr(), self.map.len());
        // SAFETY: `addr .. addr + len` is exactly this region's own mapping, which stays
        // reserved for the region's life (MAP_FIXED replaces it in place, atomically, with the
        // same protection), and the caller guarantees nothing touches it meanwhile and that a
        // file is long enough.
        let mapped = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts back what a [`replace_with`](Self::replace_with) replaced: the region's own memfd or
    /// shared file, mapped again with its content, or, for private memory (whose pages are
    /// gone), fresh anonymous memory.
    ///
    /// # Safety
    ///
    /// As for [`replace_with`](Self::replace_with): nothing may access the region's bytes
    /// during the call.
    pub(super) unsafe fn restore(&self, previous: Share) -> io::Result<()> {
        match previous {
            Share {
                backing,
                fd: Some(file),
            } => {
                // SAFETY: the caller's guarantee; `file` is the file this region mapped before,
                // of its length.
                unsafe { self.replace_with(file, backing) }.map(drop)
            }
            // SAFETY: the caller's guarantee.
            Share { fd: None, .. } => unsafe { self.replace_with_anonymous() },
        }
    }

    /// Replaces this region's pages with fresh anonymous private memory at the same address,
    /// zero-filled: whatever it mapped before (another process's memory) is gone from here.
    ///
    /// # Safety
    ///
    /// As for [`replace_with`](Self::replace_with): nothing may access the region's bytes
    /// during the call.
    pub(super) unsafe fn replace_with_anonymous(&self) -> io::Result<()> {
        // SAFETY: the caller's guarantee.
        unsafe { self.map_over(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1) }?;
        let (addr, len) = (self.map.as_mut_ptr(), self.map.len());
        // SAFETY: the same range, just mapped; the advice only asks for huge pages.
        let _ = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
        *self.share() = Share {
            backing: Backing::Anonymous,
            fd: None,
        };
        self.known_zero.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Makes this region's own mapping inaccessible: any access from this process, through a
    /// stale pointer or a vCPU, faults instead of reaching the memory. Memory the embedder
    /// mapped is left alone (it is the embedder's to stop touching).
    ///
    /// # Safety
    ///
    /// No access to the region's bytes may be in progress or start afterwards (the memory was
    /// handed over: every safe accessor is refused, and no page is lent out).
    pub(super) unsafe fn revoke(&self) -> io::Result<()> {
        if !self.is_own() {
            return Ok(());
        }
        // SAFETY: the range is exactly this region's own mapping; the caller guarantees no
        // access to it is in progress or will start, so nothing can fault on it.
        let ret = unsafe {
            libc::mprotect(
                self.map.as_mut_ptr().cast(),
                self.map.len(),
                libc::PROT_NONE,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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

/// Checks that `file`, a descriptor a same-host sender handed over for a region of `len`
/// bytes, is memory this process may map shared in its place: a regular file (a memfd, or a
/// file on a file system) of exactly `len` bytes, open for reading and writing, not sealed
/// against writes. Returns what backs it, or why it is refused. A memfd that allows sealing is
/// sealed against shrinking, so that nobody can truncate it under the mapping.
pub(super) fn check_shared_fd(file: &File, len: u64) -> Result<Backing, String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata().map_err(|e| format!("fstat failed: {e}"))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_fifo() {
            "a pipe"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else {
            "not a regular file"
        };
        return Err(format!(
            "it is {what}, not memory (a memfd or a regular file)"
        ));
    }
    if meta.len() != len {
        return Err(format!(
            "it holds {} bytes, and the region {len}",
            meta.len()
        ));
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(format!(
            "its flags cannot be read: {}",
            io::Error::last_os_error()
        ));
    }
    if flags & libc::O_ACCMODE != libc::O_RDWR {
        return Err("it is not open for reading and writing".into());
    }
    // SAFETY: F_GET_SEALS only reads the file's seals (and fails on files without any).
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        return Ok(Backing::File);
    }
    if seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 {
        return Err("it is sealed against writes".into());
    }
    if seals & libc::F_SEAL_SEAL == 0 {
        // SAFETY: F_ADD_SEALS only adds a seal to the file; failing leaves it as it was.
        let _ = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    }
    Ok(Backing::Memfd)
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

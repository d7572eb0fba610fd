//! The destination's page placement in postcopy: which pages are still missing, and how one
//! becomes current without the running guest ever seeing a half-written page.
//!
//! At the start of postcopy the pages the source still has to send (the *wanted* pages: never
//! received, or dirtied on the source after they were sent) are made absent and the memory is
//! registered with userfaultfd, so that any access to them faults to us:
//!
//! - **Anonymous memory** (missing mode): the wanted pages are dropped (`MADV_DONTNEED`), a
//!   page is placed with `UFFDIO_COPY` from a buffer (a zero page with `UFFDIO_ZEROPAGE`),
//!   which maps it atomically and wakes the threads waiting on it. A copy onto a page that is
//!   there already is refused by the kernel (`EEXIST`): nothing is ever placed twice.
//! - **memfd memory** (minor mode): the wanted pages' mappings are dropped (`MADV_DONTNEED` on a
//!   shared mapping keeps the page cache), so an access is a minor fault (or a missing fault,
//!   for a page that was never populated). A page is written through a second mapping of the
//!   same memfd that nobody else uses, then mapped with `UFFDIO_CONTINUE` if a thread waits on
//!   it; no page is allocated or copied twice. One thread at a time writes a page (a claim
//!   bit), and only before it is current, so the guest's writes are never overwritten.
//!
//! A page is *received* once current; the fault handler asks the source only for pages that
//! are neither received nor already asked for. Between the two sides of a fault (the guest
//! waits, the page arrives) the `requested` and `received` bits are set with sequentially
//! consistent read-modify-writes and each side then reads the other's bit, so at least one of
//! them sees both and maps the page: no fault is ever left waiting.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use super::latency::Latency;
use crate::dirty::DirtySet;
use crate::memory::{Backing, GuestMemory, PAGE_SIZE};
use crate::uffd::{
    UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_THREAD_ID,
    UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, Userfault,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// Why postcopy cannot run on this memory, or a placement failed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The memory or the kernel cannot do postcopy.
    #[error("postcopy is not possible here: {why}")]
    Unsupported {
        /// What is missing.
        why: String,
        /// The kernel's answer, if it gave one.
        #[source]
        source: Option<io::Error>,
    },
    /// A kernel call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The peer named a page the destination does not have.
    #[error("page {page} is outside region {region}")]
    OutOfRange {
        /// The region index.
        region: usize,
        /// The page.
        page: u64,
    },
}

fn unsupported(why: impl Into<String>, source: Option<io::Error>) -> PlaceError {
    PlaceError::Unsupported {
        why: why.into(),
        source,
    }
}

/// How a region's pages are placed.
enum Mode {
    /// Missing-page mode: `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
    Copy,
    /// Minor-fault mode: written through `alias`, a second mapping of the memfd, then
    /// `UFFDIO_CONTINUE`.
    Continue { alias: MmapRaw },
}

/// One registered region.
struct Placing {
    /// Host address and length of the guest's mapping.
    base: u64,
    len: u64,
    mode: Mode,
    /// Pages the source still had to send when postcopy started.
    wanted: Vec<AtomicU64>,
    /// Pages that are current here (every page that was not wanted, from the start).
    received: Vec<AtomicU64>,
    /// Pages a thread faulted on (asked for, or mapped at once).
    requested: Vec<AtomicU64>,
    /// Minor mode: pages a thread is writing or has written through the alias.
    claimed: Vec<AtomicU64>,
}

impl Placing {
    fn pages(&self) -> u64 {
        self.len / PAGE
    }
}

/// What to do about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Ask the source for this page (region index, page): it is missing and not asked for yet.
    Request(usize, u64),
    /// It is asked for already; the placement will wake the thread.
    Pending,
    /// It is here (now mapped, or the thread woken).
    Resolved,
}

/// The destination's placement of postcopy pages (see the module docs); shared by the threads
/// that receive pages and the one that reads faults.
pub(crate) struct Placer {
    uffd: Userfault,
    regions: Vec<Placing>,
    /// Wanted pages not received yet.
    remaining: AtomicU64,
    /// When each outstanding request was made, for its latency.
    asked: Mutex<std::collections::HashMap<(usize, u64), Instant>>,
    latency: Latency,
}

impl std::fmt::Debug for Placer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placer")
            .field("regions", &self.regions.len())
            .field("remaining", &self.remaining())
            .finish_non_exhaustive()
    }
}

fn bitmap(words: &[u64]) -> Vec<AtomicU64> {
    words.iter().map(|&w| AtomicU64::new(w)).collect()
}

fn zeroed(pages: u64) -> Vec<AtomicU64> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

/// `(word, bit mask)` of `page`.
fn bit(page: u64) -> (usize, u64) {
    (
        usize::try_from(page / 64).unwrap_or(usize::MAX),
        1 << (page % 64),
    )
}

fn is_set(map: &[AtomicU64], page: u64) -> bool {
    let (word, mask) = bit(page);
    map.get(word)
        .is_some_and(|w| w.load(Ordering::SeqCst) & mask != 0)
}

/// Sets `page`'s bit; true if it was clear.
fn set(map: &[AtomicU64], page: u64) -> bool {
    let (word, mask) = bit(page);
    map.get(word)
        .is_some_and(|w| w.fetch_or(mask, Ordering::SeqCst) & mask == 0)
}

impl Placer {
    /// Makes the `wanted` pages of `memory` absent and registers every region, so that the guest
    /// faults on them (see the module docs). The guest must not run yet.
    pub(crate) fn new(memory: &GuestMemory, wanted: &DirtySet) -> Result<Placer, PlaceError> {
        if wanted.region_count() != memory.regions().len() {
            return Err(unsupported(
                "the pages to discard do not cover the guest memory",
                None,
            ));
        }
        let shmem = memory
            .regions()
            .iter()
            .any(|r| r.backing() == Backing::Memfd);
        let features = UFFD_FEATURE_THREAD_ID
            | if shmem {
                UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM
            } else {
                0
            };
        let uffd = Userfault::open(features, false).map_err(|e| match e {
            crate::uffd::OpenError::Create(e) => unsupported(
                "cannot create a userfaultfd for kernel and user faults (the kernel lacks it, or \
                 vm.unprivileged_userfaultfd, CAP_SYS_PTRACE and /dev/userfaultfd's permissions \
                 forbid it)",
                Some(e),
            ),
            crate::uffd::OpenError::Features(e) => unsupported(
                "the kernel lacks userfaultfd on shared memory (MISSING_SHMEM, MINOR_SHMEM)",
                Some(e),
            ),
        })?;
        let mut regions = Vec::with_capacity(memory.regions().len());
        let mut remaining = 0;
        for (index, region) in memory.regions().iter().enumerate() {
            let (base, len) = region.host_range();
            let (base, len) = (base as u64, len as u64);
            let mode = match region.backing() {
                Backing::Anonymous => Mode::Copy,
                Backing::Memfd => {
                    let fd = region
                        .try_clone_fd()
                        .map_err(|e| PlaceError::Io {
                            op: "duplicating the memfd",
                            source: e,
                        })?
                        .ok_or_else(|| unsupported("a memfd region without its memfd", None))?;
                    let alias = MmapOptions::new()
                        .len(usize::try_from(len).unwrap_or(usize::MAX))
                        .map_raw(std::os::fd::AsRawFd::as_raw_fd(&fd))
                        .map_err(|e| PlaceError::Io {
                            op: "mapping the memfd a second time",
                            source: e,
                        })?;
                    Mode::Continue { alias }
                }
                Backing::Host if is_private_anonymous(base, len)? => Mode::Copy,
                backing => {
                    return Err(unsupported(
                        format!(
                            "region {} is {backing:?} memory; postcopy needs anonymous private \
                             memory or a memfd",
                            region.layout().id()
                        ),
                        None,
                    ));
                }
            };
            let words = wanted.words(index);
            let pages = len / PAGE;
            let received: Vec<AtomicU64> = words
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let valid = pages.saturating_sub(i as u64 * 64).min(64);
                    let all = if valid == 64 {
                        u64::MAX
                    } else {
                        (1 << valid) - 1
                    };
                    AtomicU64::new(!w & all)
                })
                .collect();
            remaining += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            discard(base, words)?;
            let register = match mode {
                Mode::Copy => UFFDIO_REGISTER_MODE_MISSING,
                Mode::Continue { .. } => UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR,
            };
            // SAFETY: the range is a region's own mapping (or the embedder's, which it hands us
            // for exactly this), which the memory reaches only through raw pointers.
            unsafe { uffd.register(base, len, register) }.map_err(|e| {
                unsupported(
                    format!(
                        "cannot register region {} with userfaultfd",
                        region.layout().id()
                    ),
                    Some(e),
                )
            })?;
            regions.push(Placing {
                base,
                len,
                mode,
                wanted: bitmap(words),
                received,
                requested: zeroed(pages),
                claimed: zeroed(pages),
            });
        }
        Ok(Placer {
            uffd,
            regions,
            remaining: AtomicU64::new(remaining),
            asked: Mutex::new(std::collections::HashMap::new()),
            latency: Latency::default(),
        })
    }

    /// Wanted pages that are not here yet.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::SeqCst)
    }

    /// The fault latencies so far.
    pub(crate) fn latency(&self) -> &Latency {
        &self.latency
    }

    /// The region and page of host address `address`, if it is guest memory of ours.
    pub(crate) fn locate(&self, address: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (address >= r.base && address < r.base + r.len).then(|| (i, (address - r.base) / PAGE))
        })
    }

    fn region(&self, region: usize, page: u64) -> Result<&Placing, PlaceError> {
        self.regions
            .get(region)
            .filter(|r| page < r.pages())
            .ok_or(PlaceError::OutOfRange { region, page })
    }

    /// Whether `page` of `region` was wanted when postcopy started (a page the source may send).
    pub(crate) fn is_wanted(&self, region: usize, page: u64) -> bool {
        self.region(region, page)
            .is_ok_and(|r| is_set(&r.wanted, page))
    }

    /// Whether `page` of `region` is current here.
    pub(crate) fn is_received(&self, region: usize, page: u64) -> bool {
        self.region(region, page)
            .is_ok_and(|r| is_set(&r.received, page))
    }

    /// A thread faulted at host address `address`: decides whether to ask the source.
    pub(crate) fn fault(&self, address: u64) -> Result<Fault, PlaceError> {
        let (index, page) = self.locate(address).ok_or(PlaceError::OutOfRange {
            region: usize::MAX,
            page: address / PAGE,
        })?;
        let region = &self.regions[index];
        let first = set(&region.requested, page);
        if is_set(&region.received, page) {
            // Here already: map it (minor mode), or wake a thread that faulted just before
            // it was placed.
            self.map_or_wake(region, page)?;
            return Ok(Fault::Resolved);
        }
        if !first {
            return Ok(Fault::Pending);
        }
        if let Ok(mut asked) = self.asked.lock() {
            asked.insert((index, page), Instant::now());
        }
        Ok(Fault::Request(index, page))
    }

    /// Per region, the bitmap of the pages that are current here (recovery tells the source).
    pub(crate) fn received(&self) -> Vec<Vec<u64>> {
        self.regions
            .iter()
            .map(|r| {
                r.received
                    .iter()
                    .map(|w| w.load(Ordering::SeqCst))
                    .collect()
            })
            .collect()
    }

    /// A wanted page that is neither here nor asked for, if there is one.
    pub(crate) fn missing_unrequested(&self) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(index, region)| {
            region
                .received
                .iter()
                .zip(&region.requested)
                .enumerate()
                .find_map(|(word, (received, requested))| {
                    let received = received.load(Ordering::SeqCst);
                    let requested = requested.load(Ordering::SeqCst);
                    let valid = region.pages().saturating_sub(word as u64 * 64).min(64);
                    let all = if valid == 64 {
                        u64::MAX
                    } else {
                        (1 << valid) - 1
                    };
                    let missing = !received & !requested & all;
                    (missing != 0).then(|| {
                        (
                            index,
                            word as u64 * 64 + u64::from(missing.trailing_zeros()),
                        )
                    })
                })
        })
    }

    /// The pages asked for and not received yet, to ask again after a reconnection.
    pub(crate) fn outstanding(&self) -> Vec<(usize, u64)> {
        let mut out: Vec<(usize, u64)> = self
            .asked
            .lock()
            .map(|asked| asked.keys().copied().collect())
            .unwrap_or_default();
        out.retain(|&(region, page)| !self.is_received(region, page));
        out.sort_unstable();
        out
    }

    fn map_or_wake(&self, region: &Placing, page: u64) -> Result<(), PlaceError> {
        let at = region.base + page * PAGE;
        let io = |op| move |source| PlaceError::Io { op, source };
        match region.mode {
            Mode::Copy => self.uffd.wake(at, PAGE).map_err(io("UFFDIO_WAKE")),
            Mode::Continue { .. } => match self.uffd.continue_at(at, PAGE) {
                Ok(_) => Ok(()),
                // A page that is current but was never populated (a zero page the receiver
                // did not need to write) has no page cache to map: place zeros instead.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EFAULT)) => self
                    .uffd
                    .copy(at, &[0u8; PAGE_SIZE])
                    .map(drop)
                    .map_err(io("UFFDIO_COPY of a zero page")),
                Err(e) => Err(io("UFFDIO_CONTINUE")(e)),
            },
        }
    }

    /// Places `page` of `region` with `data` (a page) or, for `None`, zeros, unless it is
    /// current already. Returns whether this call made it current.
    pub(crate) fn place(
        &self,
        region_index: usize,
        page: u64,
        data: Option<&[u8; PAGE_SIZE]>,
    ) -> Result<bool, PlaceError> {
        let region = self.region(region_index, page)?;
        if is_set(&region.received, page) {
            return Ok(false);
        }
        let at = region.base + page * PAGE;
        let io = |op| move |source| PlaceError::Io { op, source };
        match &region.mode {
            Mode::Copy => {
                let placed = match data {
                    Some(bytes) => self.uffd.copy(at, bytes).map_err(io("UFFDIO_COPY"))?,
                    None => self
                        .uffd
                        .zeropage(at, PAGE)
                        .map_err(io("UFFDIO_ZEROPAGE"))?,
                };
                // `Already` means an earlier placement won (the guest cannot populate a
                // missing page): the page is current either way.
                let _ = placed;
            }
            Mode::Continue { alias } => {
                if !set(&region.claimed, page) {
                    // Another thread is writing it (or wrote it): it makes it current.
                    return Ok(false);
                }
                let offset = usize::try_from(page * PAGE).unwrap_or(usize::MAX);
                // SAFETY: `page` is inside the region (checked by `region`), so the page lies
                // inside the alias mapping, which is as long as the region's.
                let dst = unsafe { alias.as_mut_ptr().add(offset) };
                let src = data.map_or([0u8; PAGE_SIZE].as_ptr(), |bytes| bytes.as_ptr());
                // SAFETY: `dst` is a page of the alias mapping, which lives as long as `self`;
                // `src` a page-sized buffer. This thread alone writes the page (it won the
                // claim), nobody reads it through the alias, and the guest's mapping of it is
                // absent (dropped at the start, mapped again only after `received` is set
                // below), so no other access to these bytes exists meanwhile.
                unsafe { std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE) };
            }
        }
        let newly = set(&region.received, page);
        if newly && is_set(&region.wanted, page) {
            self.remaining.fetch_sub(1, Ordering::SeqCst);
        }
        if is_set(&region.requested, page) {
            if let Mode::Continue { .. } = region.mode {
                self.map_or_wake(region, page)?;
            }
            let asked = self
                .asked
                .lock()
                .ok()
                .and_then(|mut a| a.remove(&(region_index, page)));
            if let Some(at) = asked {
                self.latency.record(at.elapsed());
            }
        }
        Ok(newly)
    }

    /// Waits up to `timeout` for faults and reads them into `out`.
    pub(crate) fn read_faults(
        &self,
        out: &mut Vec<crate::uffd::Fault>,
        timeout: Duration,
    ) -> Result<usize, PlaceError> {
        let io = |op| move |source| PlaceError::Io { op, source };
        if !self
            .uffd
            .wait(timeout)
            .map_err(io("waiting for page faults"))?
        {
            out.clear();
            return Ok(0);
        }
        self.uffd
            .read_faults(out)
            .map_err(io("reading page faults"))
    }

    /// Every page is here: unregisters the memory, so faults are the kernel's again (minor
    /// faults map the page cache, which holds every page now).
    pub(crate) fn finish(&self) -> Result<(), PlaceError> {
        for region in &self.regions {
            self.uffd
                .unregister(region.base, region.len)
                .map_err(|source| PlaceError::Io {
                    op: "unregistering guest memory",
                    source,
                })?;
        }
        Ok(())
    }
}

/// Drops the pages set in `words` of the mapping at `base` (runs of them, one call each).
fn discard(base: u64, words: &[u64]) -> Result<(), PlaceError> {
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: (u64, u64)| -> Result<(), PlaceError> {
        let (first, count) = run;
        // SAFETY: the pages lie inside the region's mapping (the set is the region's size);
        // MADV_DONTNEED only drops their contents (anonymous pages read as missing, faulting
        // to the userfaultfd about to be registered; shared pages lose their mapping, not
        // their page cache). The guest does not run yet, and nothing else holds references to
        // guest pages (they are reached only through raw pointers).
        let ret = unsafe {
            libc::madvise(
                (base + first * PAGE) as *mut libc::c_void,
                usize::try_from(count * PAGE).unwrap_or(usize::MAX),
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(PlaceError::Io {
                op: "discarding the pages to be sent again",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    for (i, &word) in words.iter().enumerate() {
        for b in 0..64u64 {
            let page = i as u64 * 64 + b;
            if word >> b & 1 == 1 {
                run = match run {
                    Some((first, count)) if first + count == page => Some((first, count + 1)),
                    Some(done) => {
                        flush(done)?;
                        Some((page, 1))
                    }
                    None => Some((page, 1)),
                };
            }
        }
    }
    if let Some(done) = run {
        flush(done)?;
    }
    Ok(())
}

/// Whether `[start, start + len)` is anonymous private memory (`/proc/self/maps`: private,
/// no inode, no file).
fn is_private_anonymous(start: u64, len: u64) -> Result<bool, PlaceError> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|source| PlaceError::Io {
        op: "reading /proc/self/maps",
        source,
    })?;
    let end = start + len;
    let mut covered = start;
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_), Some(_), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = fields.next();
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        if hi <= covered || lo >= end {
            continue;
        }
        let anonymous = perms.as_bytes().get(3) == Some(&b'p') && inode == "0" && path.is_none();
        if lo > covered || !anonymous {
            return Ok(false);
        }
        covered = hi;
        if covered >= end {
            return Ok(true);
        }
    }
    Ok(false)
}

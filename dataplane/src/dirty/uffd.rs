//! Dirty tracking for memory this process maps, with userfaultfd write protection (see
//! [`UffdWp`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::bitmap::DirtySet;
use super::source::{DirtyError, DirtySource};
use crate::memory::{Backing, GuestMemory, PAGE_SIZE};

// From linux/userfaultfd.h.
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

// From linux/fs.h.
const PM_SCAN_WP_MATCHING: u64 = 1;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `_IOWR(kind, nr, size)` of asm-generic/ioctl.h.
const fn iowr(kind: u8, nr: u8, size: usize) -> libc::c_ulong {
    (3 << 30)
        | ((size as libc::c_ulong) << 16)
        | ((kind as libc::c_ulong) << 8)
        | nr as libc::c_ulong
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const UFFDIO_API: libc::c_ulong = iowr(0xAA, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = iowr(0xAA, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: libc::c_ulong = iowr(0xAA, 0x06, size_of::<UffdioWriteprotect>());
const PAGEMAP_SCAN: libc::c_ulong = iowr(b'f', 16, size_of::<PmScanArg>());

/// Ranges returned per `PAGEMAP_SCAN` call.
const SCAN_BATCH: usize = 512;

/// Tracks writes to memory this process maps (anonymous or memfd regions).
///
/// [`start`](DirtySource::start) opens a userfaultfd with `UFFD_FEATURE_WP_ASYNC` (the kernel
/// resolves a write fault on a protected page by itself and marks the page written, so no
/// thread has to serve faults) and `UFFD_FEATURE_WP_UNPOPULATED` (pages never touched count as
/// protected too), registers every region in write-protect mode and protects it. Each harvest is one
/// `PAGEMAP_SCAN` ioctl per region on `/proc/self/pagemap` with `PM_SCAN_WP_MATCHING |
/// PM_SCAN_CHECK_WPASYNC` and category `PAGE_IS_WRITTEN`: the kernel returns the ranges written
/// since the last scan and protects them again, page by page under the page-table lock, so a
/// write racing the scan lands in this harvest or the next, never in neither. When the output
/// fills, the scan continues from where the kernel stopped (`walk_end`).
///
/// Needs Linux 6.7 (`PAGEMAP_SCAN`), anonymous or memfd (shmem) memory, and permission to
/// create a userfaultfd (`vm.unprivileged_userfaultfd`, or `CAP_SYS_PTRACE`); each failure says
/// which. Huge pages are tracked whole, so a write may report its neighbours too: harmless,
/// they are sent again.
#[derive(Debug, Default)]
pub struct UffdWp {
    state: Option<Tracking>,
}

#[derive(Debug)]
struct Tracking {
    /// The userfaultfd; closing it ends the tracking and lifts the protection.
    _uffd: OwnedFd,
    pagemap: File,
    /// Per region index: host address and length.
    ranges: Vec<(u64, u64)>,
    scratch: Vec<PageRegion>,
}

fn unsupported(why: impl Into<String>, source: Option<io::Error>) -> DirtyError {
    DirtyError::Unsupported {
        what: "userfaultfd write protection",
        why: why.into(),
        source,
    }
}

/// `ioctl(fd, request, arg)`.
///
/// # Safety
///
/// `arg` must be the argument structure `request` expects.
unsafe fn ioctl<T>(fd: &impl AsRawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<i32> {
    // SAFETY: the caller passes the structure the request expects; it lives across the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

impl UffdWp {
    /// A tracker, not yet started.
    pub fn new() -> Self {
        UffdWp::default()
    }

    fn open(memory: &GuestMemory) -> Result<Tracking, DirtyError> {
        for r in memory.regions() {
            if r.backing() == Backing::File {
                return Err(unsupported(
                    format!(
                        "region {} maps an image file; only anonymous and memfd memory can be \
                         tracked",
                        r.layout().id()
                    ),
                    None,
                ));
            }
        }
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(unsupported(
                "cannot create a userfaultfd (the kernel lacks it, or the vm.unprivileged_\
                 userfaultfd sysctl and missing CAP_SYS_PTRACE forbid it)",
                Some(err),
            ));
        }
        let fd = i32::try_from(fd).map_err(|_| unsupported("bad descriptor", None))?;
        // SAFETY: `fd` was just returned by userfaultfd and is owned by nothing else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
        let shmem = memory
            .regions()
            .iter()
            .any(|r| matches!(r.backing(), Backing::Memfd | Backing::Host));
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC
                | UFFD_FEATURE_WP_UNPOPULATED
                | if shmem {
                    UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                } else {
                    0
                },
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        unsafe { ioctl(&uffd, UFFDIO_API, &mut api) }.map_err(|e| {
            unsupported(
                "the kernel lacks asynchronous write protection (UFFD_FEATURE_WP_ASYNC and \
                 WP_UNPOPULATED need Linux 6.7)",
                Some(e),
            )
        })?;
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| unsupported("cannot open /proc/self/pagemap", Some(e)))?;
        let ranges: Vec<(u64, u64)> = memory
            .regions()
            .iter()
            .map(|r| {
                let (start, len) = r.host_range();
                (start as u64, len as u64)
            })
            .collect();
        for &(start, len) in &ranges {
            let mut register = UffdioRegister {
                range: UffdioRange { start, len },
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER takes a uffdio_register; the range is one of our mappings.
            unsafe { ioctl(&uffd, UFFDIO_REGISTER, &mut register) }.map_err(|e| {
                unsupported("cannot register guest memory for write protection", Some(e))
            })?;
            let mut protect = UffdioWriteprotect {
                range: UffdioRange { start, len },
                mode: UFFDIO_WRITEPROTECT_MODE_WP,
            };
            // SAFETY: UFFDIO_WRITEPROTECT takes a uffdio_writeprotect over a registered range.
            unsafe { ioctl(&uffd, UFFDIO_WRITEPROTECT, &mut protect) }.map_err(|source| {
                DirtyError::Io {
                    op: "write-protecting guest memory",
                    source,
                }
            })?;
        }
        let tracking = Tracking {
            _uffd: uffd,
            pagemap,
            ranges,
            scratch: vec![PageRegion::default(); SCAN_BATCH],
        };
        Ok(tracking)
    }
}

impl Tracking {
    /// Scans region `region` for written pages, protects them again and adds them to `set`.
    fn scan(&mut self, region: usize, set: &mut DirtySet) -> Result<(), DirtyError> {
        let (base, len) = self.ranges[region];
        let end = base + len;
        let mut at = base;
        while at < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                vec: self.scratch.as_mut_ptr() as u64,
                vec_len: self.scratch.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN takes a pm_scan_arg whose `vec` points to `vec_len`
            // page_region entries, which `self.scratch` holds for the whole call.
            let found = unsafe { ioctl(&self.pagemap, PAGEMAP_SCAN, &mut arg) }.map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTTY) {
                    unsupported("the kernel lacks PAGEMAP_SCAN (Linux 6.7)", Some(e))
                } else {
                    DirtyError::Io {
                        op: "scanning guest memory for written pages",
                        source: e,
                    }
                }
            })?;
            let found = usize::try_from(found).unwrap_or(0).min(self.scratch.len());
            for range in &self.scratch[..found] {
                let first = range.start.saturating_sub(base) / PAGE_SIZE as u64;
                let last = range.end.saturating_sub(base).div_ceil(PAGE_SIZE as u64);
                set.insert_range(region, first, last.saturating_sub(first));
            }
            // The kernel stops early only when the output is full; it never goes backwards.
            if arg.walk_end <= at || arg.walk_end >= end {
                break;
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

impl DirtySource for UffdWp {
    fn name(&self) -> &'static str {
        "userfaultfd"
    }

    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        self.state = Some(UffdWp::open(memory)?);
        Ok(())
    }

    fn harvest(&mut self, memory: &GuestMemory) -> Result<DirtySet, DirtyError> {
        let tracking = self.state.as_mut().ok_or(DirtyError::WrongMemory)?;
        let same = tracking.ranges.len() == memory.regions().len()
            && memory
                .regions()
                .iter()
                .zip(&tracking.ranges)
                .all(|(r, &(start, len))| {
                    let (host, host_len) = r.host_range();
                    (host as u64, host_len as u64) == (start, len)
                });
        if !same {
            return Err(DirtyError::WrongMemory);
        }
        let mut set = DirtySet::none(memory);
        for region in 0..tracking.ranges.len() {
            tracking.scan(region, &mut set)?;
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::memory::{GuestAddr, Region};

    fn started(memory: &GuestMemory) -> Option<UffdWp> {
        let mut source = UffdWp::new();
        match source.start(memory) {
            Ok(()) => Some(source),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn pages(set: &DirtySet, region: usize) -> BTreeSet<u64> {
        let words = set.words(region);
        (0..words.len() as u64 * 64)
            .filter(|&page| words[(page / 64) as usize] >> (page % 64) & 1 == 1)
            .collect()
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
    fn written_pages_are_found_once_and_then_tracked_again() {
        // Anonymous memory, partly touched before tracking starts, and a memfd region.
        let memory = GuestMemory::new(vec![
            Region::anonymous(0, GuestAddr(0), 8 << 20).unwrap(),
            Region::memfd(1, GuestAddr(1 << 32), 1 << 20).unwrap(),
        ])
        .unwrap();
        memory.fill(0, 0, 1 << 20, 1).unwrap();
        let Some(mut source) = started(&memory) else {
            return;
        };
        assert_eq!(
            source.harvest(&memory).unwrap().count(),
            0,
            "nothing written yet"
        );
        // Touched and untouched pages, across huge-page boundaries, in both regions.
        let written = [0u64, 5, 6, 511, 512, 1500, 2047];
        for &page in &written {
            memory.write(0, page * 4096 + 100, b"guest").unwrap();
        }
        memory.write(1, 7 * 4096, b"guest").unwrap();
        let set = source.harvest(&memory).unwrap();
        let found = pages(&set, 0);
        for page in written {
            assert!(found.contains(&page), "page {page} missed: {found:?}");
        }
        assert!(pages(&set, 1).contains(&7));
        // Huge pages may report whole: never more than the 2 MiB units written.
        assert!(found.len() <= 4 * 512, "{} pages", found.len());
        assert_eq!(
            source.harvest(&memory).unwrap().count(),
            0,
            "protected again"
        );
        memory.write(0, 5 * 4096, b"again").unwrap();
        assert!(pages(&source.harvest(&memory).unwrap(), 0).contains(&5));
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
    fn a_scan_larger_than_its_output_continues_where_it_stopped() {
        let memory = GuestMemory::anonymous(16 << 20).unwrap();
        let Some(mut source) = started(&memory) else {
            return;
        };
        // More separate ranges than one scan returns: every other page.
        let count = (SCAN_BATCH as u64) * 3;
        for page in 0..count {
            memory.write(0, page * 2 * 4096, &[1]).unwrap();
        }
        let found = pages(&source.harvest(&memory).unwrap(), 0);
        for page in 0..count {
            assert!(found.contains(&(page * 2)), "page {} missed", page * 2);
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
    fn file_backed_memory_and_unstarted_sources_are_refused() {
        let file = crate::memory::tests::scratch_file("uffd", 4096);
        // SAFETY: the file is private to this test and never truncated.
        let region = unsafe { Region::from_file(0, GuestAddr(0), &file) }.unwrap();
        let memory = GuestMemory::new(vec![region]).unwrap();
        let err = UffdWp::new().start(&memory).unwrap_err();
        assert!(err.to_string().contains("image file"), "{err}");
        let other = GuestMemory::anonymous(4096).unwrap();
        assert!(matches!(
            UffdWp::new().harvest(&other),
            Err(DirtyError::WrongMemory)
        ));
    }
}

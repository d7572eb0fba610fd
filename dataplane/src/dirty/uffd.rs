//! Dirty tracking for memory this process maps, with userfaultfd write protection (see
//! [`UffdWp`]).

use std::fs::File;
use std::io;

use super::bitmap::DirtySet;
use super::source::{DirtyError, DirtySource};
use crate::memory::{Backing, GuestMemory, PAGE_SIZE};
use crate::uffd::{
    OpenError, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_UNPOPULATED,
    UFFDIO_REGISTER_MODE_WP, Userfault, ioctl, iowr,
};

// From linux/fs.h.
const PM_SCAN_WP_MATCHING: u64 = 1;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

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
    _uffd: Userfault,
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
        let shmem = memory
            .regions()
            .iter()
            .any(|r| matches!(r.backing(), Backing::Memfd | Backing::Host));
        let features = UFFD_FEATURE_WP_ASYNC
            | UFFD_FEATURE_WP_UNPOPULATED
            | if shmem {
                UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            } else {
                0
            };
        let uffd = Userfault::open(features, true).map_err(|e| match e {
            OpenError::Create(err) => unsupported(
                "cannot create a userfaultfd (the kernel lacks it, or the vm.unprivileged_\
                 userfaultfd sysctl and missing CAP_SYS_PTRACE forbid it)",
                Some(err),
            ),
            OpenError::Features(err) => unsupported(
                "the kernel lacks asynchronous write protection (UFFD_FEATURE_WP_ASYNC and \
                 WP_UNPOPULATED need Linux 6.7)",
                Some(err),
            ),
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
            // SAFETY: the range is a region's mapping, which the memory reaches only through
            // raw pointers; write protection never changes what the pages hold.
            unsafe { uffd.register(start, len, UFFDIO_REGISTER_MODE_WP) }.map_err(|e| {
                unsupported("cannot register guest memory for write protection", Some(e))
            })?;
            uffd.write_protect(start, len, true)
                .map_err(|source| DirtyError::Io {
                    op: "write-protecting guest memory",
                    source,
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

//! The placement of postcopy pages with real userfaultfd faults: a thread reads and writes guest
//! pages that are missing while another serves its faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use super::place::{Fault, Placer};
use crate::dirty::DirtySet;
use crate::memory::{GuestAddr, GuestMemory, PAGE_SIZE, Region};

const PAGES: u64 = 256;

/// The page the "source" holds for `page` of region `region`.
fn source_page(region: usize, page: u64) -> [u8; PAGE_SIZE] {
    let mut bytes = [0u8; PAGE_SIZE];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (page as usize * 7 + i + region * 13) as u8 | 1;
    }
    bytes
}

/// Two regions of the given kinds, each page holding "stale" bytes (what precopy left).
fn memory(memfd: bool) -> Arc<GuestMemory> {
    let make = |id, base, len| {
        if memfd {
            Region::memfd(id, GuestAddr(base), len)
        } else {
            Region::anonymous(id, GuestAddr(base), len)
        }
    };
    let memory = GuestMemory::new(vec![
        make(0, 0, PAGES * 4096).unwrap(),
        make(1, 1 << 32, PAGES * 4096).unwrap(),
    ])
    .unwrap();
    for region in 0..2 {
        memory.fill(region, 0, PAGES as usize * 4096, 0xee).unwrap();
    }
    Arc::new(memory)
}

/// Every third page of both regions is wanted, and the last one.
fn wanted(memory: &GuestMemory) -> DirtySet {
    let mut set = DirtySet::none(memory);
    for region in 0..2 {
        for page in (0..PAGES).step_by(3) {
            set.insert(region, page);
        }
        set.insert(region, PAGES - 1);
    }
    set
}

fn placer(memory: &GuestMemory, wanted: &DirtySet) -> Option<Placer> {
    match Placer::new(memory, wanted) {
        Ok(placer) => Some(placer),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Serves faults like the destination does, from `source_page`, until `done`; zero pages for
/// pages whose number is a multiple of 9.
fn serve(placer: &Placer, done: &AtomicBool) {
    let mut faults = Vec::new();
    while !done.load(Ordering::SeqCst) {
        placer
            .read_faults(&mut faults, Duration::from_millis(5))
            .unwrap();
        for fault in &faults {
            if let Fault::Request(region, page) = placer.fault(fault.address).unwrap() {
                let data = source_page(region, page);
                let zero = page.is_multiple_of(9);
                assert!(
                    placer
                        .place(region, page, (!zero).then_some(&data))
                        .unwrap()
                );
            }
        }
    }
}

fn expected(region: usize, page: u64, wanted: &DirtySet) -> [u8; PAGE_SIZE] {
    let is_wanted = wanted.words(region)[(page / 64) as usize] >> (page % 64) & 1 == 1;
    match (is_wanted, page.is_multiple_of(9)) {
        (false, _) => [0xee; PAGE_SIZE],
        (true, true) => [0; PAGE_SIZE],
        (true, false) => source_page(region, page),
    }
}

fn faults_are_served_and_nothing_is_placed_twice(memfd: bool) {
    let memory = memory(memfd);
    let wanted = wanted(&memory);
    let Some(placer) = placer(&memory, &wanted) else {
        return;
    };
    let placer = Arc::new(placer);
    let total = wanted.count();
    assert_eq!(placer.remaining(), total);
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let (placer, done) = (Arc::clone(&placer), Arc::clone(&done));
        thread::spawn(move || serve(&placer, &done))
    };
    // The guest reads every page of region 0 (faulting on the wanted ones), and writes one
    // word into each page of region 1.
    for page in 0..PAGES {
        let mut bytes = [0u8; PAGE_SIZE];
        memory.read(0, page * 4096, &mut bytes).unwrap();
        assert_eq!(bytes, expected(0, page, &wanted), "page {page} of region 0");
        memory.write(1, page * 4096 + 8, &[0x55; 8]).unwrap();
    }
    done.store(true, Ordering::SeqCst);
    server.join().unwrap();
    // Every wanted page of region 0 was faulted on and placed; those of region 1 too (each
    // was written). A background copy of any of them now is refused: the guest's write stays.
    assert_eq!(placer.remaining(), 0);
    for page in 0..PAGES {
        let data = source_page(1, page);
        assert!(!placer.place(1, page, Some(&data)).unwrap(), "page {page}");
        let mut bytes = [0u8; PAGE_SIZE];
        memory.read(1, page * 4096, &mut bytes).unwrap();
        let mut want = expected(1, page, &wanted);
        want[8..16].copy_from_slice(&[0x55; 8]);
        assert_eq!(bytes, want, "page {page} of region 1");
    }
    let latency = placer.latency().snapshot();
    assert_eq!(latency.count, total, "every request was timed");
    assert!(placer.outstanding().is_empty());
    placer.finish().unwrap();
    // Unregistered, the memory behaves as before.
    memory.write(0, 0, b"after").unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
fn anonymous_faults_are_served_with_copies() {
    faults_are_served_and_nothing_is_placed_twice(false);
}

#[test]
#[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
fn memfd_faults_are_served_with_continue() {
    faults_are_served_and_nothing_is_placed_twice(true);
}

/// Pages placed in the background, before any fault, are read without one; a page asked for
/// twice is requested once; placing a page never wanted changes nothing the guest sees.
fn background_pages_need_no_fault(memfd: bool) {
    let memory = memory(memfd);
    let wanted = wanted(&memory);
    let Some(placer) = placer(&memory, &wanted) else {
        return;
    };
    for region in 0..2 {
        for page in 0..PAGES {
            if placer.is_wanted(region, page) {
                let data = source_page(region, page);
                assert!(placer.place(region, page, Some(&data)).unwrap());
                assert!(!placer.place(region, page, Some(&data)).unwrap(), "twice");
            }
        }
    }
    assert_eq!(placer.remaining(), 0);
    // Faults still come (a memfd page written through the alias is mapped on the first
    // access), and are resolved without a request.
    let placer = Arc::new(placer);
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let (placer, done) = (Arc::clone(&placer), Arc::clone(&done));
        thread::spawn(move || serve(&placer, &done))
    };
    let mut bytes = [0u8; PAGE_SIZE];
    for page in 0..PAGES {
        memory.read(1, page * 4096, &mut bytes).unwrap();
        let want = if placer.is_wanted(1, page) {
            source_page(1, page)
        } else {
            [0xee; PAGE_SIZE]
        };
        assert_eq!(bytes, want, "page {page}");
    }
    done.store(true, Ordering::SeqCst);
    server.join().unwrap();
    assert!(
        placer.latency().snapshot().count == 0,
        "no page was asked for"
    );
    // A page outside the memory is refused.
    assert!(placer.place(0, PAGES, None).is_err());
    assert!(placer.place(2, 0, None).is_err());
    placer.finish().unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
fn anonymous_background_pages_need_no_fault() {
    background_pages_need_no_fault(false);
}

#[test]
#[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
fn memfd_background_pages_need_no_fault() {
    background_pages_need_no_fault(true);
}

#[test]
#[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
fn a_fault_on_an_asked_page_is_pending_until_it_is_placed() {
    let memory = memory(false);
    let wanted = wanted(&memory);
    let Some(placer) = placer(&memory, &wanted) else {
        return;
    };
    let (base, _) = memory.regions()[0].host_range();
    let at = base as u64 + 3 * 4096;
    assert_eq!(placer.fault(at).unwrap(), Fault::Request(0, 3));
    assert_eq!(placer.fault(at + 100).unwrap(), Fault::Pending);
    assert_eq!(placer.outstanding(), [(0, 3)]);
    // A page that is here needs no request.
    assert_eq!(placer.fault(base as u64 + 4096).unwrap(), Fault::Resolved);
    assert!(placer.fault(1).is_err(), "not guest memory");
    assert!(placer.place(0, 3, None).unwrap());
    assert!(placer.outstanding().is_empty());
    assert_eq!(placer.fault(at).unwrap(), Fault::Resolved);
}

#[test]
#[cfg_attr(miri, ignore = "Miri has no userfaultfd")]
fn file_backed_memory_is_refused() {
    let file = crate::memory::tests::scratch_file("postcopy", 4096);
    // SAFETY: the file is private to this test and never truncated.
    let region = unsafe { Region::from_file(0, GuestAddr(0), &file) }.unwrap();
    let memory = GuestMemory::new(vec![region]).unwrap();
    let err = Placer::new(&memory, &DirtySet::all(&memory)).unwrap_err();
    assert!(err.to_string().contains("File memory"), "{err}");
}

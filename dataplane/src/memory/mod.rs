//! Guest memory: regions of guest RAM mapped into this process, by ramjet (anonymous, memfd, an
//! image file) or by the embedding VMM ([`Region::from_host`]).
//!
//! [`GuestMemory`] (`guest.rs`) is the one type that owns the mappings and the raw pointers
//! into them ([`Region`], in `region.rs`). Guest pages are never handed out as `&[u8]` by the public API:
//! on the source the guest keeps writing them while they are read, so every read is a copy
//! ([`GuestMemory::read`]) made of relaxed atomic word loads (`atomic.rs` says why a plain copy
//! would be a data race), and whatever is checksummed or sent is that copy. Every offset that
//! comes from a peer is bounds-checked here before any pointer is formed.
//!
//! References to guest pages are formed only under the access protocol of `access.rs`, by the
//! two claims of `lease.rs`:
//!
//! - A **receive session** holds the memory's one exclusive lease, and writes pages through the
//!   lease's `page_mut`, whose callers guarantee that no two of the session's threads touch the
//!   same page at once (the wire protocol's page → channel assignment and the once-per-round
//!   rule make that true even for a hostile peer; see `recv/mod.rs`). While the lease lives,
//!   every other reader and writer of this process ([`GuestMemory::read`],
//!   [`GuestMemory::write`], [`GuestMemory::fill`], [`GuestMemory::prefault`], a freeze, a
//!   second receive session) is refused with [`MemoryError::Receiving`].
//! - Memory that is [frozen](GuestMemory::freeze) lends its pages out as `&[u8]`: the sender
//!   freezes the source at switchover, once the guest is paused, and then checksums and sends
//!   the final round straight from guest memory. While any [`Frozen`] guard lives, every safe
//!   writer in this process is refused, so the pages cannot change under them — from this
//!   process. Writers outside Rust's view (a vCPU through KVM, another process sharing a memfd)
//!   are the embedder's to stop: that is what pausing the guest means. If one keeps writing,
//!   the checksum no longer matches what was sent and the receiver fails the migration.

mod access;
mod atomic;
mod error;
mod guest;
mod lease;
mod page;
mod region;
#[cfg(feature = "vm-memory")]
mod vm_memory;

pub use error::MemoryError;
pub use guest::GuestMemory;
pub use lease::Frozen;
pub(crate) use lease::ReceiveLease;
pub use page::PAGE_SIZE;
pub use region::{Backing, GuestAddr, Region, RegionLayout};

#[cfg(test)]
pub(crate) mod tests {
    use std::fs::File;
    use std::ptr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::page::PAGE_SIZE_U64;
    use super::*;

    /// A read-write file of `len` bytes that is already unlinked: gone when dropped.
    pub(crate) fn scratch_file(tag: &str, len: u64) -> File {
        crate::testkit::scratch_file(tag, len).expect("scratch file")
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
            Arc::clone(&memory).lease_for_receiving(),
            Err(MemoryError::Frozen)
        ));
        drop(again);
        assert!(!memory.is_frozen());
        memory.write(0, 0, b"x").unwrap();
        // A receive session and a freeze exclude each other both ways.
        let lease = Arc::clone(&memory).lease_for_receiving().unwrap();
        assert!(matches!(
            memory.freeze(),
            Err(MemoryError::Receiving { op: "frozen" })
        ));
        assert!(!memory.is_frozen(), "a failed freeze leaves nothing behind");
        drop(lease);
        drop(memory.freeze().unwrap());
    }

    /// While a receive session holds the memory (and writes its pages through `&mut`), every
    /// other safe reader and writer is refused, and so is a second session; once the lease is
    /// gone, all of them work again.
    #[test]
    fn a_receive_lease_is_exclusive() {
        let memory = Arc::new(GuestMemory::anonymous(4 * PAGE_SIZE_U64).unwrap());
        let lease = Arc::clone(&memory).lease_for_receiving().unwrap();
        let refused = |err: MemoryError, op: &str| {
            assert!(
                matches!(err, MemoryError::Receiving { op: o } if o == op),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains("while a migration is being received into it"),
                "{err}"
            );
        };
        let mut buf = [0u8; 8];
        refused(memory.read(0, 0, &mut buf).unwrap_err(), "read");
        refused(memory.write(0, 0, &buf).unwrap_err(), "written");
        refused(memory.fill(0, 0, 8, 1).unwrap_err(), "written");
        refused(memory.reader().unwrap_err(), "read");
        refused(memory.freeze().unwrap_err(), "frozen");
        refused(
            Arc::clone(&memory).lease_for_receiving().unwrap_err(),
            "received into twice",
        );
        assert!(memory.prefault().is_err());
        assert!(memory.content_eq(&memory).is_err());
        // SAFETY: this thread alone touches the page while the slice lives.
        unsafe { lease.page_mut(0, 1) }.unwrap().fill(9);
        drop(lease);
        memory.read(0, PAGE_SIZE_U64, &mut buf).unwrap();
        assert_eq!(buf, [9; 8]);
        memory.write(0, 0, &buf).unwrap();
        drop(Arc::clone(&memory).lease_for_receiving().unwrap());
    }

    /// A lease waits for the reads and writes in progress, and refuses those that start
    /// after it: the two never overlap.
    #[test]
    fn a_lease_waits_for_racing_readers_and_writers() {
        let memory = Arc::new(GuestMemory::anonymous(PAGE_SIZE_U64).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let racers: Vec<_> = (0..2)
            .map(|i| {
                let (memory, stop, done) =
                    (Arc::clone(&memory), Arc::clone(&stop), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut page = vec![0u8; PAGE_SIZE];
                    while !stop.load(Ordering::Relaxed) {
                        let result = if i == 0 {
                            memory.read(0, 0, &mut page)
                        } else {
                            memory.fill(0, 0, PAGE_SIZE, 1)
                        };
                        match result {
                            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                            Err(MemoryError::Receiving { .. }) => 0,
                            Err(e) => panic!("{e}"),
                        };
                    }
                })
            })
            .collect();
        while done.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        for _ in 0..if cfg!(miri) { 3 } else { 200 } {
            let lease = Arc::clone(&memory).lease_for_receiving().unwrap();
            // SAFETY: the lease keeps the racers out while the slice lives.
            let page = unsafe { lease.page_mut(0, 0) }.unwrap();
            page.fill(0);
            std::thread::yield_now();
            assert!(page.iter().all(|&b| b == 0), "a racer wrote a leased page");
        }
        stop.store(true, Ordering::Relaxed);
        for racer in racers {
            racer.join().unwrap();
        }
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
        for _ in 0..if cfg!(miri) { 3 } else { 200 } {
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

    /// A vCPU-like writer and a codec-like reader on the same page at once: defined behaviour
    /// (Miri runs this; with the plain `copy_nonoverlapping` both used to do, it reports a data
    /// race), and the copy holds whole words of one write or another.
    #[test]
    fn a_page_read_while_it_is_written_is_no_data_race() {
        let memory = Arc::new(GuestMemory::anonymous(PAGE_SIZE_U64).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (memory, stop) = (Arc::clone(&memory), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut page = vec![0u8; PAGE_SIZE];
                while !stop.load(Ordering::Relaxed) {
                    page.iter_mut().for_each(|b| *b = b.wrapping_add(1));
                    memory.write(0, 0, &page).unwrap();
                }
            })
        };
        let mut copy = vec![0u8; PAGE_SIZE];
        for _ in 0..if cfg!(miri) { 3 } else { 1000 } {
            memory.read(0, 0, &mut copy).unwrap();
            for word in copy.chunks_exact(8) {
                assert!(word.iter().all(|&b| b == word[0]), "a word was torn");
            }
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
        let lease = Arc::new(memory).lease_for_receiving().unwrap();
        // SAFETY: the call fails its bounds check before forming any slice.
        let err = unsafe { lease.page_mut(0, 4) }.unwrap_err();
        assert!(err.to_string().contains("outside guest memory"), "{err}");
        // SAFETY: as above; the multiplication overflows and is refused.
        assert!(unsafe { lease.page_mut(0, u64::MAX) }.is_err());
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot mmap")]
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

    /// A private file mapping starts from the file's bytes and keeps its own writes: the file
    /// never changes.
    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot mmap files")]
    fn a_private_file_region_never_writes_its_file() {
        use std::io::{Read, Seek, Write};
        let mut file = scratch_file("private", 2 * PAGE_SIZE_U64);
        file.write_all(b"image").unwrap();
        // SAFETY: the file is private to this test and never truncated or written below.
        let region = unsafe { Region::from_file_private(0, GuestAddr(0), &file) }.unwrap();
        let memory = GuestMemory::new(vec![region]).unwrap();
        let mut buf = [0u8; 5];
        memory.read(0, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"image");
        memory.write(0, 0, b"guest").unwrap();
        memory.read(0, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"guest");
        file.rewind().unwrap();
        file.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"image", "the file is unchanged");
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no memfd_create and cannot mmap files")]
    fn memfd_and_file_regions_share_their_bytes() {
        let region = Region::memfd(3, GuestAddr(0), 2 * PAGE_SIZE_U64).unwrap();
        assert_eq!(region.backing(), Backing::Memfd);
        let fd = region.try_clone_fd().unwrap().unwrap();
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

    /// Memory handed over to another process refuses every access from this one, for good,
    /// and its own mappings are revoked; a freeze that lends pages out delays the revocation
    /// until its last guard goes, and its pages stay readable meanwhile.
    #[test]
    #[cfg_attr(miri, ignore = "Miri has no memfd_create or mprotect")]
    fn handed_over_memory_refuses_everyone() {
        let memory = Arc::new(GuestMemory::memfd(4 * PAGE_SIZE_U64).unwrap());
        memory.fill(0, 0, PAGE_SIZE, 9).unwrap();
        assert!(memory.share_fds().is_ok());
        let frozen = memory.freeze().unwrap();
        memory.hand_over();
        assert!(memory.is_handed_over());
        assert!(
            frozen.page(0, 0).unwrap().iter().all(|&b| b == 9),
            "lent out still"
        );
        let refused = |result: Result<(), MemoryError>| {
            assert!(matches!(result, Err(MemoryError::HandedOver)), "{result:?}");
        };
        let mut page = vec![0u8; PAGE_SIZE];
        refused(memory.read(0, 0, &mut page));
        refused(memory.write(0, 0, b"late vcpu"));
        refused(memory.fill(0, 0, 8, 1));
        refused(memory.freeze().map(drop));
        refused(Arc::clone(&memory).lease_for_receiving().map(drop));
        assert!(memory.prefault().is_err());
        let err = memory.write(0, 0, b"x").unwrap_err().to_string();
        assert!(err.contains("handed over to another process"), "{err}");
        drop(frozen);
        refused(memory.read(0, 0, &mut page));
        memory.hand_over();
        // The memfd still holds the guest for whoever maps it.
        let fd = memory.regions()[0].try_clone_fd().unwrap().unwrap();
        let file = File::from(fd);
        // SAFETY: the memfd is this test's and never truncated.
        let again = GuestMemory::new(vec![
            unsafe { Region::from_file(0, GuestAddr(0), &file) }.unwrap(),
        ])
        .unwrap();
        again.read(0, 0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 9));
    }

    /// Private memory cannot be shared, and says why.
    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot mmap files")]
    fn only_memfd_and_shared_file_memory_can_be_shared() {
        let anonymous = GuestMemory::anonymous(PAGE_SIZE_U64).unwrap();
        let why = anonymous.share_fds().unwrap_err();
        assert!(why.contains("anonymous private memory"), "{why}");
        let file = scratch_file("private", PAGE_SIZE_U64);
        // SAFETY: the file is this test's and never truncated.
        let private = unsafe { Region::from_file_private(0, GuestAddr(0), &file) }.unwrap();
        let why = GuestMemory::new(vec![private])
            .unwrap()
            .share_fds()
            .unwrap_err();
        assert!(why.contains("private (copy-on-write) mapping"), "{why}");
        // SAFETY: as above.
        let shared = unsafe { Region::from_file(0, GuestAddr(0), &file) }.unwrap();
        assert_eq!(
            GuestMemory::new(vec![shared])
                .unwrap()
                .share_fds()
                .unwrap()
                .len(),
            1
        );
    }

    /// A receive lease takes a sender's memory in place of its own (same addresses), keeps it
    /// if told to, and otherwise puts its own back (fresh anonymous memory for anonymous
    /// memory, its memfd with its content for a memfd), leaving the sender's alone.
    #[test]
    #[cfg_attr(miri, ignore = "Miri has no memfd_create")]
    fn a_lease_adopts_shared_memory_and_puts_its_own_back() {
        let source = GuestMemory::memfd(8 * PAGE_SIZE_U64).unwrap();
        source.fill(0, 3 * PAGE_SIZE_U64, PAGE_SIZE, 0x5a).unwrap();
        for keep in [false, true] {
            let dst = Arc::new(GuestMemory::anonymous(8 * PAGE_SIZE_U64).unwrap());
            dst.fill(0, 0, PAGE_SIZE, 1).unwrap();
            let before = dst.regions()[0].host_range();
            let lease = Arc::clone(&dst).lease_for_receiving().unwrap();
            lease.adoptable().unwrap();
            lease.adopt(source.share_fds().unwrap()).unwrap();
            if keep {
                lease.keep_adopted();
            }
            drop(lease);
            assert_eq!(dst.regions()[0].host_range(), before, "same addresses");
            if keep {
                assert_eq!(dst.regions()[0].backing(), Backing::Memfd);
                assert!(dst.content_eq(&source).unwrap());
                dst.write(0, 0, b"dest").unwrap();
                let mut word = [0u8; 4];
                source.read(0, 0, &mut word).unwrap();
                assert_eq!(&word, b"dest", "one memory");
            } else {
                assert_eq!(dst.regions()[0].backing(), Backing::Anonymous);
                assert!(dst.regions()[0].try_clone_fd().unwrap().is_none());
                let mut page = vec![1u8; PAGE_SIZE];
                dst.read(0, 3 * PAGE_SIZE_U64, &mut page).unwrap();
                assert!(page.iter().all(|&b| b == 0), "fresh memory");
                dst.write(0, 3 * PAGE_SIZE_U64, b"not the source").unwrap();
                source.read(0, 3 * PAGE_SIZE_U64, &mut page).unwrap();
                assert!(page.iter().all(|&b| b == 0x5a), "the source is untouched");
            }
        }
        let own = Arc::new(GuestMemory::memfd(8 * PAGE_SIZE_U64).unwrap());
        own.fill(0, 0, PAGE_SIZE, 0x11).unwrap();
        let lease = Arc::clone(&own).lease_for_receiving().unwrap();
        lease.adopt(source.share_fds().unwrap()).unwrap();
        drop(lease);
        assert_eq!(own.regions()[0].backing(), Backing::Memfd);
        let mut page = vec![0u8; PAGE_SIZE];
        own.read(0, 0, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 0x11),
            "its own memfd, content and all"
        );
        own.write(0, 3 * PAGE_SIZE_U64, b"mine").unwrap();
        source.read(0, 3 * PAGE_SIZE_U64, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x5a), "the source is untouched");
    }

    /// Descriptors that are not memory of the region's exact size are refused, each with its
    /// reason, and the receiver's memory stays its own.
    #[test]
    #[cfg_attr(miri, ignore = "Miri has no memfd_create, pipes or sockets")]
    fn adoption_refuses_what_is_not_region_memory() {
        use std::os::fd::OwnedFd;
        let len = 4 * PAGE_SIZE_U64;
        let memfd = |size: u64| -> OwnedFd {
            let region = Region::memfd(0, GuestAddr(0), size).unwrap();
            region.try_clone_fd().unwrap().unwrap()
        };
        let (pipe, _writer) = std::io::pipe().unwrap();
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let read_only = {
            let path = std::env::temp_dir().join(format!("ramjet-ro-{}", std::process::id()));
            std::fs::write(&path, vec![0u8; len as usize]).unwrap();
            let file = File::open(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            OwnedFd::from(file)
        };
        let sealed = {
            let fd = memfd(len);
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            // SAFETY: F_ADD_SEALS only adds a seal to this test's memfd.
            let sealed = unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
            assert_eq!(sealed, 0);
            fd
        };
        let directory = OwnedFd::from(File::open(std::env::temp_dir()).unwrap());
        let cases: Vec<(Vec<OwnedFd>, &str)> = vec![
            (
                vec![memfd(len + PAGE_SIZE_U64)],
                "holds 20480 bytes, and the region 16384",
            ),
            (vec![memfd(PAGE_SIZE_U64)], "holds 4096 bytes"),
            (vec![OwnedFd::from(pipe)], "it is a pipe, not memory"),
            (vec![OwnedFd::from(socket)], "it is a socket, not memory"),
            (vec![directory], "it is a directory, not memory"),
            (vec![read_only], "not open for reading and writing"),
            (vec![sealed], "sealed against writes"),
            (
                vec![memfd(len), memfd(len)],
                "2 descriptors came for 1 regions",
            ),
            (vec![], "0 descriptors came for 1 regions"),
        ];
        for (fds, expected) in cases {
            let dst = Arc::new(GuestMemory::anonymous(len).unwrap());
            dst.fill(0, 0, 4, 7).unwrap();
            let lease = Arc::clone(&dst).lease_for_receiving().unwrap();
            let err = lease.adopt(fds).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(
                err.starts_with("cannot take region 0's memory from the sender"),
                "{err}"
            );
            drop(lease);
            assert_eq!(dst.regions()[0].backing(), Backing::Anonymous, "{expected}");
            let mut word = [0u8; 4];
            dst.read(0, 0, &mut word).unwrap();
            assert_eq!(word, [7; 4], "{expected}: its own memory");
        }
        // An embedder's mapping cannot be replaced: the lease says so before anything is read.
        let mut host = memmap2::MmapMut::map_anon(PAGE_SIZE).unwrap();
        let ptr = host.as_mut_ptr();
        let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(std::sync::Mutex::new(host));
        // SAFETY: `keep` holds the mapping for as long as the region lives.
        let region = unsafe { Region::from_host(0, GuestAddr(0), ptr, PAGE_SIZE_U64, Some(keep)) };
        let memory = Arc::new(GuestMemory::new(vec![region.unwrap()]).unwrap());
        let lease = memory.lease_for_receiving().unwrap();
        let why = lease.adoptable().unwrap_err();
        assert!(why.contains("mapped by its embedder"), "{why}");
    }
}

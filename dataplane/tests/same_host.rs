//! Same-host migration over a Unix socket: the sender hands its guest memory over by
//! descriptor (`SCM_RIGHTS`) instead of copying it. Each case says who holds the memory
//! afterwards and what each side reported: the destination maps the source's very memory and
//! the source refuses every access to it; or, where it cannot be handed over, the pages are
//! copied and the reason is given; or the migration fails with a clear reason and the source
//! keeps the guest, the destination putting its own memory back.

mod common;

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Lines, Net};
use ramjet_dataplane::memory::{Backing, GuestAddr, GuestMemory, MemoryError, Region};
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::testkit::{self, Workload};
use ramjet_dataplane::transport::{Endpoint, Listener};
use ramjet_dataplane::{
    BoxError, Error, Everything, Guest, Handover, LiveOptions, MemoryTransfer, PAGE_SIZE,
    PreSwitchover, ReceiveOptions, Received, SameHost, SendOptions, Sender, SwitchoverReason,
    migrate_live, receive,
};

const BYTES: u64 = 8 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

fn receiver(
    memory: Arc<GuestMemory>,
    net: Net,
    same_host: SameHost,
) -> (Endpoint, JoinHandle<Result<Received, Error>>) {
    let listener = Listener::bind(&common::endpoint(net)).expect("bind");
    let at = listener.endpoint().clone();
    let options = ReceiveOptions {
        workers: 2,
        timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT),
        same_host,
        ..ReceiveOptions::default()
    };
    let handle = thread::spawn(move || receive(&listener, memory, &options, Arc::new(|_| {})));
    (at, handle)
}

/// The two ends of one migration: a receiver into `dst` on a fresh `net` endpoint (with
/// `same_host[1]`), and a sender of `src` connecting to it (with `same_host[0]`); the sender's
/// log lines go to the returned `Lines`.
struct Pair {
    sender: Result<Sender, Error>,
    receiving: JoinHandle<Result<Received, Error>>,
    log: Arc<Lines>,
}

fn pair(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    net: Net,
    same_host: [SameHost; 2],
) -> Pair {
    let (at, receiving) = receiver(Arc::clone(dst), net, same_host[1]);
    let log = Arc::new(Lines::default());
    let options = SendOptions {
        workers: 2,
        timeout: TIMEOUT,
        same_host: same_host[0],
        log: log.log(),
        ..SendOptions::default()
    };
    let sender = Sender::connect(Arc::clone(src), &at, &options, Arc::new(|_| {}));
    Pair {
        sender,
        receiving,
        log,
    }
}

/// A memfd guest of `bytes` with `kind` content.
fn memfd_guest(bytes: u64, kind: ImageKind) -> Arc<GuestMemory> {
    let memory = GuestMemory::memfd(bytes).expect("memfd");
    image::fill(&memory, kind, 3).expect("image");
    Arc::new(memory)
}

/// A copy of `memory`'s bytes, in memory of its own.
fn snapshot(memory: &GuestMemory) -> GuestMemory {
    let copy = GuestMemory::anonymous_like(&memory.layout()).expect("memory");
    let mut page = vec![0u8; PAGE_SIZE];
    for (index, region) in memory.regions().iter().enumerate() {
        for p in 0..region.layout().pages() {
            let at = p * PAGE_SIZE as u64;
            memory.read(index, at, &mut page).expect("read");
            copy.write(index, at, &page).expect("write");
        }
    }
    copy
}

fn assert_refused_here(memory: &GuestMemory) {
    let mut page = vec![0u8; PAGE_SIZE];
    assert!(matches!(
        memory.read(0, 0, &mut page),
        Err(MemoryError::HandedOver)
    ));
    assert!(matches!(
        memory.write(0, 0, b"late"),
        Err(MemoryError::HandedOver)
    ));
    assert!(memory.is_handed_over());
}

/// A paused guest of two regions (a memfd and a shared file mapping) is handed over: no page
/// crosses, both sides say so, the destination's regions now map the source's memory at the
/// same addresses (a write there is in the source's file), and the source refuses every
/// access to it from then on.
#[test]
fn a_paused_guest_is_handed_over_without_copying() {
    let file = testkit::scratch_file("share", 1 << 20).expect("file");
    let layout_of = |file: &File| {
        vec![
            Region::memfd(0, GuestAddr(0), BYTES).expect("memfd"),
            // SAFETY: this test's file, never truncated.
            unsafe { Region::from_file(1, GuestAddr(1 << 32), file) }.expect("file region"),
        ]
    };
    let src = Arc::new(GuestMemory::new(layout_of(&file)).expect("memory"));
    image::fill(&src, ImageKind::Mixed, 5).expect("image");
    let expected = snapshot(&src);
    let dst = Arc::new(GuestMemory::anonymous_like(&src.layout()).expect("memory"));
    let addresses: Vec<_> = dst.regions().iter().map(|r| format!("{r:?}")).collect();
    let Pair {
        sender,
        receiving,
        log,
    } = pair(&src, &dst, Net::Unix, [SameHost::Auto, SameHost::Auto]);
    let sender = sender.expect("connect");
    assert!(sender.shares_memory());
    let summary = sender
        .migrate_paused(b"device state", PreSwitchover::Skip)
        .expect("migrate");
    let received = receiving.join().expect("receiver").expect("received");
    assert_eq!(summary.memory, MemoryTransfer::Shared);
    assert_eq!(received.memory, MemoryTransfer::Shared);
    assert_eq!(received.handover, Handover::Go);
    assert_eq!(received.device_state, b"device state");
    assert_eq!(summary.stats.pages(), 0, "no page was sent");
    assert_eq!(received.stats.pages(), 0);
    assert!(log.all().is_empty(), "{:?}", log.all());
    assert!(
        dst.content_eq(&expected).expect("compare"),
        "the source's memory"
    );
    assert_eq!(dst.regions()[0].backing(), Backing::Memfd);
    assert_eq!(dst.regions()[1].backing(), Backing::File);
    for (region, before) in dst.regions().iter().zip(&addresses) {
        // The same mappings (Debug shows the pointer), now of the sender's memory.
        let now = format!("{region:?}");
        let pointer = |s: &str| s.split("Own(").nth(1).map(|p| p[..14].to_owned());
        assert!(pointer(before).is_some(), "{before}");
        assert_eq!(pointer(&now), pointer(before), "{now} / {before}");
    }
    dst.write(1, 0, b"written at the destination")
        .expect("write");
    let mut bytes = [0u8; 26];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).expect("read");
    assert_eq!(&bytes, b"written at the destination", "one memory");
    assert_refused_here(&src);
    assert!(src.freeze().is_err());
}

/// The toy guest that keeps writing until the pause, with a copy of its memory taken at the
/// pause.
struct Recorded {
    workload: Workload,
    at_pause: Arc<Mutex<Option<GuestMemory>>>,
    memory: Arc<GuestMemory>,
}

impl Guest for Recorded {
    fn pause(&mut self) -> Result<(), BoxError> {
        self.workload.pause()?;
        *self.at_pause.lock().expect("lock") = Some(snapshot(&self.memory));
        Ok(())
    }

    fn device_state(&mut self) -> Result<Vec<u8>, BoxError> {
        self.workload.device_state()
    }

    fn resume(&mut self) {
        self.workload.resume();
    }

    fn handed_over(&mut self, acknowledged: bool) {
        Guest::handed_over(&mut self.workload, acknowledged);
    }
}

/// A live guest, writing until the pause, is handed over at once (nothing to copy): the
/// destination sees exactly the source's memory at the pause, and a vCPU that starts writing
/// on the source afterwards (a VMM that resumes by mistake) gets no write through.
#[test]
fn a_live_guest_is_handed_over_at_the_pause() {
    let src = memfd_guest(BYTES, ImageKind::Random);
    let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
    let Pair {
        sender, receiving, ..
    } = pair(&src, &dst, Net::Unix, [SameHost::Auto, SameHost::Auto]);
    let sender = sender.expect("connect");
    let workload = Workload::start(&src, None, None, ImageKind::Mixed, 11);
    // Let it write for a while, as a running guest does before the migration.
    while workload.writes() < 500 {
        thread::sleep(Duration::from_millis(1));
    }
    let at_pause = Arc::new(Mutex::new(None));
    let mut guest = Recorded {
        workload,
        at_pause: Arc::clone(&at_pause),
        memory: Arc::clone(&src),
    };
    let report =
        migrate_live(sender, &mut Everything, &mut guest, &LiveOptions::default()).expect("live");
    let received = receiving.join().expect("receiver").expect("received");
    assert_eq!(report.reason, SwitchoverReason::SharedMemory);
    assert_eq!(report.summary.memory, MemoryTransfer::Shared);
    assert_eq!(report.summary.stats.pages(), 0);
    assert_eq!(received.handover, Handover::Go);
    assert!(guest.workload.writes() >= 500);
    assert_eq!(guest.workload.handed_over(), Some(true));
    let at_pause = at_pause.lock().expect("lock").take().expect("paused");
    assert!(
        dst.content_eq(&at_pause).expect("compare"),
        "the memory at the pause"
    );
    assert_refused_here(&src);
    // A vCPU resumed here by mistake: its first write is refused and it stops.
    let mut late = Workload::start(&src, None, None, ImageKind::Random, 12);
    thread::sleep(Duration::from_millis(20));
    let _ = late.pause();
    assert_eq!(late.writes(), 0, "no write reached the handed-over memory");
    assert!(dst.content_eq(&at_pause).expect("compare"), "unchanged");
}

/// One copying migration, with what each side said about the memory.
struct Copied {
    sender: MemoryTransfer,
    receiver: MemoryTransfer,
    log: Vec<String>,
}

fn copy_case(src: &Arc<GuestMemory>, net: Net, receiver_same_host: SameHost) -> Copied {
    let dst = Arc::new(GuestMemory::anonymous_like(&src.layout()).expect("memory"));
    let Pair {
        sender,
        receiving,
        log,
    } = pair(src, &dst, net, [SameHost::Auto, receiver_same_host]);
    let sender = sender.expect("connect");
    assert!(!sender.shares_memory());
    let summary = sender
        .migrate_paused(b"state", PreSwitchover::Skip)
        .expect("migrate");
    let received = receiving.join().expect("receiver").expect("received");
    assert_eq!(
        summary.stats.pages(),
        src.total_pages(),
        "every page copied"
    );
    assert!(dst.content_eq(src).expect("compare"));
    assert!(
        !src.is_handed_over(),
        "a copy leaves the source's memory its own"
    );
    assert_eq!(dst.regions()[0].backing(), Backing::Anonymous);
    Copied {
        sender: summary.memory,
        receiver: received.memory,
        log: log.all(),
    }
}

fn reason(transfer: &MemoryTransfer) -> &str {
    match transfer {
        MemoryTransfer::Copied(why) => why,
        MemoryTransfer::Shared => panic!("shared, not copied"),
    }
}

/// Where the memory cannot be handed over, `auto` copies it and says why: private memory (in
/// the sender's log line too, since the socket was a Unix one), a receiver whose same-host
/// setting is off, and a TCP endpoint (no log line: it never could have).
#[test]
fn the_fallbacks_copy_and_say_why() {
    let anonymous = common::guest(BYTES, common::Image::Random, 4);
    let case = copy_case(&anonymous, Net::Unix, SameHost::Auto);
    assert!(
        reason(&case.sender).contains("region 0 is anonymous private memory"),
        "{:?}",
        case.sender
    );
    assert_eq!(reason(&case.receiver), "the sender did not offer it");
    assert_eq!(case.log.len(), 1, "{:?}", case.log);
    assert!(
        case.log[0].starts_with("copying the guest memory, not handing it over: region 0"),
        "{:?}",
        case.log
    );

    let memfd = memfd_guest(BYTES, ImageKind::Random);
    let case = copy_case(&memfd, Net::Unix, SameHost::Off);
    assert_eq!(
        reason(&case.sender),
        "the receiver did not take it: this receiver's same-host setting is off"
    );
    assert_eq!(
        reason(&case.receiver),
        "this receiver's same-host setting is off"
    );
    assert_eq!(case.log.len(), 1, "{:?}", case.log);

    let case = copy_case(&memfd, Net::Tcp, SameHost::Auto);
    assert!(
        reason(&case.sender).starts_with("the endpoint is TCP"),
        "{:?}",
        case.sender
    );
    assert!(case.log.is_empty(), "{:?}", case.log);
}

/// `on` means hand over or fail: a sender whose memory is private fails before it sends
/// anything, and a receiver that requires it refuses a sender that copies, with the reason on
/// both sides. The source keeps its guest either way.
#[test]
fn same_host_on_fails_where_it_cannot_share() {
    let anonymous = common::guest(BYTES, common::Image::Random, 4);
    let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
    let Pair {
        sender, receiving, ..
    } = pair(&anonymous, &dst, Net::Unix, [SameHost::On, SameHost::Auto]);
    let err = sender.expect_err("private memory cannot be shared");
    let text = err.to_string();
    assert!(
        text.contains(
            "same-host is on, and the memory cannot be handed over: region 0 is anonymous"
        ),
        "{text}"
    );
    // The receiver saw its sender go before the data phase.
    assert!(receiving.join().expect("receiver").is_err());

    let Pair {
        sender, receiving, ..
    } = pair(&anonymous, &dst, Net::Unix, [SameHost::Auto, SameHost::On]);
    let err = sender.expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("takes the guest's memory only by descriptor"),
        "{text}"
    );
    let err = receiving.join().expect("receiver").expect_err("refused");
    assert!(
        err.to_string()
            .contains("takes the guest's memory only by descriptor"),
        "{err}"
    );
    assert!(!anonymous.is_handed_over());
}

/// A migration that fails after the receiver took the memory (the source keeps the guest):
/// the receiver puts fresh memory of its own back, so nothing it does later can touch the
/// source's guest, and the source's memory stays its own.
#[test]
fn a_failed_handover_gives_the_receiver_its_own_memory_back() {
    let src = memfd_guest(BYTES, ImageKind::Mixed);
    let expected = snapshot(&src);
    let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
    let Pair {
        sender, receiving, ..
    } = pair(&src, &dst, Net::Unix, [SameHost::Auto, SameHost::Auto]);
    let sender = sender.expect("connect");
    assert!(sender.shares_memory());
    let err = sender.fail_with(Error::Config("the VMM gave up".into()));
    assert!(err.to_string().contains("the VMM gave up"), "{err}");
    let err = receiving.join().expect("receiver").expect_err("failed");
    assert!(err.to_string().contains("the VMM gave up"), "{err}");
    assert_eq!(dst.regions()[0].backing(), Backing::Anonymous);
    assert!(dst.regions()[0].try_clone_fd().expect("fd").is_none());
    dst.fill(0, 0, PAGE_SIZE, 0xee)
        .expect("the receiver's own memory");
    assert!(
        src.content_eq(&expected).expect("compare"),
        "the source is untouched"
    );
    assert!(!src.is_handed_over());
    src.write(0, 0, b"the source runs on")
        .expect("the source keeps its guest");
}

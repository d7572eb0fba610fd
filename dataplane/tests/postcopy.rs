//! Postcopy over loopback: pre-copy, then the switch; the destination runs its guest (a thread
//! that reads every page, faulting on the missing ones) while the source pushes the rest and
//! serves the faults; at the end the destination's memory is the source's at the pause, byte
//! for byte, on every transport, TCP and Unix, one and four channels.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use common::{Facts, Image, Net, Rng, endpoint, guest, transports};
use ramjet_control::{Fact, Machine, Options, Profile, Side, Timestamp, Trigger};
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::memory::{GuestAddr, GuestMemory, PAGE_SIZE, Region};
use ramjet_dataplane::transport::{Listener, Transport};
use ramjet_dataplane::{PostcopyRun, ReceiveOptions, SendOptions, Sender, receive};

const BYTES: u64 = 32 << 20;

/// The statuses a control machine with `postcopy-ram` shows for `facts` (the source is told
/// `start-postcopy` first, as management software does).
fn statuses(side: Side, facts: &[Fact]) -> Vec<String> {
    let mut machine = Machine::new(side, Profile::Qemu10, Options::new().postcopy_ram(true));
    let now = Timestamp::from_unix_micros(1);
    let mut shown = Vec::new();
    let migrate = machine.step(Trigger::Migrate, now).expect("migrate");
    shown.extend(migrate.map(|e| e.kind().to_string()));
    if side == Side::Source {
        let _ = machine.step(Trigger::StartPostcopy, now);
    }
    for fact in facts {
        match machine.step(fact.clone(), now) {
            Ok(event) => shown.extend(event.map(|e| e.kind().to_string())),
            Err(e) => panic!("the {side:?} machine refused {fact}: {e} (facts {facts:?})"),
        }
    }
    shown
}

/// The destination's guest: reads every page once, in a scattered order (so that most reads
/// fault on a page the push has not brought yet), and keeps what it read.
fn reader_guest(memory: Arc<GuestMemory>, seen: Arc<Mutex<Option<Vec<u8>>>>) -> PostcopyRun {
    paced_reader_guest(memory, seen, Duration::ZERO)
}

/// [`reader_guest`], pausing `pause` after each page.
fn paced_reader_guest(
    memory: Arc<GuestMemory>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    pause: Duration,
) -> PostcopyRun {
    PostcopyRun::new(move |state: &[u8]| {
        if state.is_empty() {
            return Err("no device state".into());
        }
        let (memory, seen) = (Arc::clone(&memory), Arc::clone(&seen));
        thread::spawn(move || {
            let pages = memory.total_pages();
            let mut all = vec![0u8; memory.total_bytes() as usize];
            // A stride coprime to the page count visits every page once.
            let stride = 7919 % pages;
            let mut page = 0;
            for _ in 0..pages {
                let at = (page * PAGE_SIZE as u64) as usize;
                memory
                    .read(0, at as u64, &mut all[at..at + PAGE_SIZE])
                    .expect("read");
                page = (page + stride) % pages;
                if !pause.is_zero() {
                    thread::sleep(pause);
                }
            }
            *seen.lock().expect("seen") = Some(all);
        });
        Ok(())
    })
}

fn postcopy(transport: &Arc<dyn Transport>, net: Net, channels: u16, memfd: bool) {
    let what = format!(
        "{} {net:?} {channels} channels{}",
        transport.name(),
        if memfd { ", memfd destination" } else { "" }
    );
    let source = guest(BYTES, Image::Mixed, 5);
    // Anonymous memory takes pages with UFFDIO_COPY; a memfd (shared memory, as a VMM that
    // hands its RAM around has) with minor faults and UFFDIO_CONTINUE.
    let destination = Arc::new(if memfd {
        let region = Region::memfd(0, GuestAddr(0), BYTES).expect("memfd");
        GuestMemory::new(vec![region]).expect("memory")
    } else {
        GuestMemory::anonymous_like(&source.layout()).expect("memory")
    });
    let seen = Arc::new(Mutex::new(None));
    let listener = Listener::bind(&endpoint(net)).expect("bind");
    let at = listener.endpoint().clone();
    let receiver_facts = Arc::new(Facts::default());
    let options = ReceiveOptions {
        transport: Arc::clone(transport),
        postcopy: Some(reader_guest(Arc::clone(&destination), Arc::clone(&seen))),
        ..ReceiveOptions::default()
    };
    let (incoming, sink) = (Arc::clone(&destination), receiver_facts.sink());
    let receiver = thread::spawn(move || receive(&listener, incoming, &options, sink));

    let sender_facts = Arc::new(Facts::default());
    let options = SendOptions {
        channels,
        transport: Arc::clone(transport),
        postcopy: true,
        ..SendOptions::default()
    };
    let mut sender =
        Sender::connect(Arc::clone(&source), &at, &options, sender_facts.sink()).expect("connect");
    sender.round(&DirtySet::all(&source)).expect("round 1");
    // The guest writes a thousand pages after round 1: they are what postcopy fetches, with
    // the pages of a region the guest zeroed.
    let mut dirty = DirtySet::none(&source);
    let mut rng = Rng::new(9);
    let mut page = vec![0u8; PAGE_SIZE];
    for _ in 0..1000 {
        let at = rng.below(source.total_pages());
        rng.fill(&mut page);
        source
            .write(0, at * PAGE_SIZE as u64, &page)
            .expect("write");
        dirty.insert(0, at);
    }
    source.fill(0, 0, 64 * PAGE_SIZE, 0).expect("zero");
    dirty.insert_range(0, 0, 64);
    sender.switchover().expect("switchover");
    let running = sender
        .postcopy(&dirty, b"device state")
        .unwrap_or_else(|e| panic!("{what}: postcopy: {e}"));
    let summary = running
        .run()
        .unwrap_or_else(|e| panic!("{what}: postcopy run: {e}"));
    let received = receiver
        .join()
        .expect("receiver thread")
        .unwrap_or_else(|e| panic!("{what}: receive: {e}"));

    assert!(received.handover.may_run(), "{what}");
    assert_eq!(received.device_state, b"device state", "{what}");
    let ours = summary.postcopy.expect("postcopy stats");
    let theirs = received.postcopy.expect("postcopy stats");
    assert_eq!(ours.pages, dirty.count(), "{what}");
    assert_eq!(theirs.pages, dirty.count(), "{what}");
    // A request may still be on its way when the push brings the last page.
    assert!(
        ours.requests <= theirs.requests,
        "{what}: {ours:?} {theirs:?}"
    );
    // The destination's fault latencies reach the source with its done (a fault whose page
    // came last may be counted just after it).
    assert!(
        ours.latency.count <= theirs.latency.count
            && theirs.latency.count <= ours.latency.count + 1,
        "{what}: {ours:?} {theirs:?}"
    );

    assert!(
        source.content_eq(&destination).expect("compare"),
        "{what}: the destination differs from the source"
    );
    // The guest's own reads saw the source's pages too.
    let mut all = None;
    for _ in 0..500 {
        all = seen.lock().expect("seen").take();
        if all.is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let all = all.expect("the destination's guest finished reading");
    let mut expected = vec![0u8; source.total_bytes() as usize];
    source.read(0, 0, &mut expected).expect("read source");
    assert!(all == expected, "{what}: the guest read a wrong page");

    assert_eq!(
        statuses(Side::Source, &sender_facts.all()),
        [
            "setup",
            "active",
            "pass 1",
            "device",
            "postcopy-active",
            "completed"
        ],
        "{what}"
    );
    assert_eq!(
        statuses(Side::Destination, &receiver_facts.all()),
        ["setup", "active", "postcopy-active", "completed"],
        "{what}"
    );
}

#[test]
fn postcopy_into_shared_memory_ends_byte_identical() {
    for transport in transports() {
        postcopy(&transport, Net::Tcp, 2, true);
    }
}

#[test]
fn postcopy_ends_byte_identical_on_every_path() {
    for transport in transports() {
        for net in [Net::Tcp, Net::Unix] {
            for channels in [1, 4] {
                postcopy(&transport, net, channels, false);
            }
        }
    }
}

/// A live guest that writes faster than a capped link carries its pages: pre-copy stalls,
/// the policy switches to postcopy, and the migration completes with the destination holding
/// the source's memory at the pause. Then again switching straight after round 1.
#[test]
fn a_stalled_live_migration_switches_to_postcopy_and_completes() {
    use ramjet_dataplane::dirty::{CallerFed, DirtyBitmap};
    use ramjet_dataplane::testkit::Workload;
    use ramjet_dataplane::testkit::image::ImageKind;
    use ramjet_dataplane::{LiveOptions, StallPolicy, SwitchoverReason, migrate_live};

    const GUEST: u64 = 16 << 20;
    for after_first_round in [false, true] {
        let source = guest(GUEST, Image::Mixed, 11);
        let destination = Arc::new(GuestMemory::anonymous_like(&source.layout()).expect("memory"));
        let seen = Arc::new(Mutex::new(None));
        let listener = Listener::bind(&endpoint(Net::Tcp)).expect("bind");
        let at = listener.endpoint().clone();
        let options = ReceiveOptions {
            postcopy: Some(reader_guest(Arc::clone(&destination), Arc::clone(&seen))),
            ..ReceiveOptions::default()
        };
        let incoming = Arc::clone(&destination);
        let receiver =
            thread::spawn(move || receive(&listener, incoming, &options, Arc::new(|_| {})));
        let log: Arc<[DirtyBitmap]> = vec![DirtyBitmap::new(source.total_pages())].into();
        // Flat out: far more than the 8 MB/s link moves.
        let mut workload =
            Workload::start(&source, Some(Arc::clone(&log)), None, ImageKind::Random, 3);
        let mut dirty = CallerFed::from_bitmaps(log);
        let options = SendOptions {
            max_bandwidth: Some(8_000_000),
            postcopy: true,
            ..SendOptions::default()
        };
        let facts = Arc::new(Facts::default());
        let sender =
            Sender::connect(Arc::clone(&source), &at, &options, facts.sink()).expect("connect");
        let live = LiveOptions {
            stall_rounds: 2,
            on_stall: StallPolicy::Postcopy,
            postcopy_after_first_round: after_first_round,
            ..LiveOptions::default()
        };
        let report = migrate_live(sender, &mut dirty, &mut workload, &live).expect("migration");
        let received = receiver.join().expect("receiver").expect("received");
        let want = if after_first_round {
            SwitchoverReason::PostcopyRequested
        } else {
            SwitchoverReason::PostcopyStalled
        };
        assert_eq!(report.reason, want);
        assert!(after_first_round || report.stalled_syncs >= 1, "{report:?}");
        assert_eq!(workload.handed_over(), Some(true));
        assert_eq!(workload.resumes(), 0);
        let stats = report.summary.postcopy.expect("postcopy");
        assert!(stats.pages > 0 && received.postcopy.is_some(), "{stats:?}");
        assert_eq!(source.first_difference(&destination).expect("layout"), None);
        assert!(
            statuses(Side::Source, &facts.all()).ends_with(&[
                "device".to_owned(),
                "postcopy-active".to_owned(),
                "completed".to_owned()
            ]),
            "{:?}",
            facts.all()
        );
    }
}

/// Which way a cut breaks the link first.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Sender to receiver: the receiver sees its connections end.
    Up,
    /// Receiver to sender: the sender sees its connections end.
    Down,
    /// Both at once.
    Both,
}

/// A TCP proxy for the recovery tests: relays every connection byte for byte, and [`cut`]
/// breaks every connection open at that moment, one way or both, as a failed link does (a
/// connection cut one way soon ends both ways, as TCP's do); new connections are relayed
/// again.
///
/// [`cut`]: Proxy::cut
struct Proxy {
    at: ramjet_dataplane::Endpoint,
    /// Each connection as (the sender's end, the receiver's end).
    open: Arc<Mutex<Vec<(std::net::TcpStream, std::net::TcpStream)>>>,
}

impl Proxy {
    fn new(to: std::net::SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = ramjet_dataplane::Endpoint::Tcp(listener.local_addr().expect("addr"));
        let open: Arc<Mutex<Vec<(std::net::TcpStream, std::net::TcpStream)>>> = Arc::default();
        let sockets = Arc::clone(&open);
        thread::spawn(move || {
            for from in listener.incoming() {
                let Ok(from) = from else { return };
                let Ok(to) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                let mut sockets = sockets.lock().expect("open");
                for (src, dst) in [(&from, &to), (&to, &from)] {
                    let (Ok(mut src), Ok(mut dst)) = (src.try_clone(), dst.try_clone()) else {
                        continue;
                    };
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut src, &mut dst);
                        let _ = dst.shutdown(std::net::Shutdown::Both);
                        let _ = src.shutdown(std::net::Shutdown::Both);
                    });
                }
                sockets.push((from, to));
            }
        });
        Proxy { at, open }
    }

    fn cut(&self, how: Cut) {
        use std::net::Shutdown;
        for (sender, receiver) in self.open.lock().expect("open").drain(..) {
            let _ = match how {
                Cut::Up => receiver.shutdown(Shutdown::Write),
                Cut::Down => sender.shutdown(Shutdown::Write),
                Cut::Both => sender
                    .shutdown(Shutdown::Both)
                    .and_then(|()| receiver.shutdown(Shutdown::Both)),
            };
        }
    }
}

/// Waits until `facts` hold `want` more than `after` times.
fn wait_for(facts: &Facts, want: &Fact, after: usize) -> bool {
    for _ in 0..3000 {
        if facts.all().iter().filter(|f| *f == want).count() > after {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The link is cut three times during postcopy, at seeded moments: first the way to the
/// receiver, then the way back, then both; each time both sides pause, `recover`
/// reconnects, the receiver says which pages it holds, and the migration goes on; it ends
/// completed and byte-identical.
#[test]
fn postcopy_recovers_from_broken_links() {
    let source = guest(BYTES, Image::Mixed, 21);
    let destination = Arc::new(GuestMemory::anonymous_like(&source.layout()).expect("memory"));
    let seen = Arc::new(Mutex::new(None));
    let listener = Listener::bind(&endpoint(Net::Tcp)).expect("bind");
    let ramjet_dataplane::Endpoint::Tcp(addr) = listener.endpoint().clone() else {
        unreachable!("a TCP endpoint");
    };
    let proxy = Proxy::new(addr);
    let receiver_facts = Arc::new(Facts::default());
    let options = ReceiveOptions {
        // A guest that reads a page a millisecond: the push, not its faults, brings most.
        postcopy: Some(paced_reader_guest(
            Arc::clone(&destination),
            Arc::clone(&seen),
            Duration::from_millis(1),
        )),
        recover_wait: Some(Duration::from_secs(60)),
        timeout: Duration::from_secs(10),
        ..ReceiveOptions::default()
    };
    let (incoming, sink) = (Arc::clone(&destination), receiver_facts.sink());
    let receiver = thread::spawn(move || receive(&listener, incoming, &options, sink));

    let facts = Arc::new(Facts::default());
    let options = SendOptions {
        channels: 2,
        postcopy: true,
        // Slow enough that the push lasts about four seconds.
        max_bandwidth: Some(4_000_000),
        recover_wait: Some(Duration::from_secs(60)),
        timeout: Duration::from_secs(10),
        ..SendOptions::default()
    };
    let mut sender =
        Sender::connect(Arc::clone(&source), &proxy.at, &options, facts.sink()).expect("connect");
    let handle = sender.live_handle();
    sender.round(&DirtySet::all(&source)).expect("round 1");
    let mut dirty = DirtySet::none(&source);
    let mut rng = Rng::new(4);
    let mut page = vec![0u8; PAGE_SIZE];
    for _ in 0..4000 {
        let at = rng.below(source.total_pages());
        rng.fill(&mut page);
        source
            .write(0, at * PAGE_SIZE as u64, &page)
            .expect("write");
        dirty.insert(0, at);
    }
    sender.switchover().expect("switchover");
    let running = sender.postcopy(&dirty, b"device state").expect("postcopy");
    let run = thread::spawn(move || running.run());
    for (cut, how) in [Cut::Up, Cut::Down, Cut::Both].into_iter().enumerate() {
        thread::sleep(Duration::from_millis(100 + rng.below(300)));
        proxy.cut(how);
        assert!(
            wait_for(&facts, &Fact::ChannelLost, cut),
            "cut {cut}: the source paused: {:?}",
            facts.all()
        );
        handle.recover(None);
        assert!(
            wait_for(&facts, &Fact::Resumed, cut),
            "cut {cut}: the source resumed: {:?}",
            facts.all()
        );
    }
    let summary = run.join().expect("run").expect("postcopy completed");
    let received = receiver.join().expect("receiver").expect("received");
    assert!(received.handover.may_run());
    assert!(summary.postcopy.is_some());
    assert_eq!(source.first_difference(&destination).expect("layout"), None);
    for (side, facts) in [(Side::Source, &facts), (Side::Destination, &receiver_facts)] {
        let all = facts.all();
        let lost = all.iter().filter(|f| **f == Fact::ChannelLost).count();
        assert!(lost >= 3, "{side:?}: {all:?}");
        assert_eq!(all.last(), Some(&Fact::Drained), "{side:?}");
        assert!(all.contains(&Fact::Completed), "{side:?}");
        assert!(
            !all.iter().any(|f| matches!(f, Fact::Failed(_))),
            "{side:?}: {all:?}"
        );
    }
}

/// A `recover` aimed at a destination that lost the paused migration (a new receiver, no
/// memory of it) is refused with the reason; the source stays paused and, once its wait
/// ends, says so, and the guest runs on neither side.
#[test]
fn a_recover_to_a_destination_that_lost_its_memory_fails_cleanly() {
    let source = guest(BYTES, Image::Mixed, 22);
    let destination = Arc::new(GuestMemory::anonymous_like(&source.layout()).expect("memory"));
    let listener = Listener::bind(&endpoint(Net::Tcp)).expect("bind");
    let ramjet_dataplane::Endpoint::Tcp(addr) = listener.endpoint().clone() else {
        unreachable!("a TCP endpoint");
    };
    let proxy = Proxy::new(addr);
    let options = ReceiveOptions {
        // The destination's guest only starts: it never touches memory.
        postcopy: Some(PostcopyRun::new(|_| Ok(()))),
        recover_wait: Some(Duration::from_millis(300)),
        ..ReceiveOptions::default()
    };
    let incoming = Arc::clone(&destination);
    let receiver = thread::spawn(move || receive(&listener, incoming, &options, Arc::new(|_| {})));

    let facts = Arc::new(Facts::default());
    let options = SendOptions {
        channels: 1,
        postcopy: true,
        max_bandwidth: Some(4_000_000),
        recover_wait: Some(Duration::from_secs(2)),
        ..SendOptions::default()
    };
    let mut sender =
        Sender::connect(Arc::clone(&source), &proxy.at, &options, facts.sink()).expect("connect");
    let handle = sender.live_handle();
    sender.round(&DirtySet::all(&source)).expect("round 1");
    sender.switchover().expect("switchover");
    let running = sender
        .postcopy(&DirtySet::all(&source), b"device state")
        .expect("postcopy");
    let run = thread::spawn(move || running.run());
    thread::sleep(Duration::from_millis(200));
    proxy.cut(Cut::Both);
    assert!(wait_for(&facts, &Fact::ChannelLost, 0), "paused");
    // The destination gives up waiting and its process (here: its receive) ends.
    let err = receiver.join().expect("receiver").expect_err("paused");
    assert!(
        matches!(err, ramjet_dataplane::Error::PostcopyPaused { .. }),
        "{err}"
    );
    // A new receiver, which knows nothing of this migration, at a new address.
    let fresh = Arc::new(GuestMemory::anonymous_like(&source.layout()).expect("memory"));
    let listener = Listener::bind(&endpoint(Net::Tcp)).expect("bind");
    let at = listener.endpoint().clone();
    let options = ReceiveOptions {
        postcopy: Some(PostcopyRun::new(|_| Ok(()))),
        ..ReceiveOptions::default()
    };
    let other = thread::spawn(move || receive(&listener, fresh, &options, Arc::new(|_| {})));
    handle.recover(Some(at));
    let refused = other.join().expect("receiver").expect_err("refused");
    assert!(
        refused
            .chain()
            .contains("reconnects a paused postcopy migration"),
        "{}",
        refused.chain()
    );
    let err = run.join().expect("run").expect_err("still paused");
    assert!(
        err.chain()
            .contains("reconnects a paused postcopy migration"),
        "{}",
        err.chain()
    );
    let all = facts.all();
    assert!(matches!(all.last(), Some(Fact::Failed(_))), "{all:?}");
    assert!(
        !all.contains(&Fact::Completed) && !all.contains(&Fact::Drained),
        "{all:?}"
    );
}

/// A cancel cannot take postcopy back (QEMU refuses migrate_cancel there): cancelled on both
/// sides once the destination runs the guest, the migration goes on, unpaused, to the end.
#[test]
fn a_cancel_in_postcopy_changes_nothing() {
    let source = guest(BYTES, Image::Mixed, 31);
    let destination = Arc::new(GuestMemory::anonymous_like(&source.layout()).expect("memory"));
    let seen = Arc::new(Mutex::new(None));
    let listener = Listener::bind(&endpoint(Net::Tcp)).expect("bind");
    let at = listener.endpoint().clone();
    let receiver_cancel = ramjet_dataplane::CancelHandle::new();
    let options = ReceiveOptions {
        postcopy: Some(paced_reader_guest(
            Arc::clone(&destination),
            Arc::clone(&seen),
            Duration::from_micros(100),
        )),
        cancel: receiver_cancel.clone(),
        ..ReceiveOptions::default()
    };
    let receiver_facts = Arc::new(Facts::default());
    let (incoming, sink) = (Arc::clone(&destination), receiver_facts.sink());
    let receiver = thread::spawn(move || receive(&listener, incoming, &options, sink));
    let cancel = ramjet_dataplane::CancelHandle::new();
    let options = SendOptions {
        postcopy: true,
        max_bandwidth: Some(16_000_000),
        cancel: cancel.clone(),
        ..SendOptions::default()
    };
    let facts = Arc::new(Facts::default());
    let mut sender =
        Sender::connect(Arc::clone(&source), &at, &options, facts.sink()).expect("connect");
    sender.switchover().expect("switchover");
    let running = sender
        .postcopy(&DirtySet::all(&source), b"device state")
        .expect("postcopy");
    let run = thread::spawn(move || running.run());
    thread::sleep(Duration::from_millis(300));
    cancel.cancel();
    receiver_cancel.cancel();
    let summary = run
        .join()
        .expect("run")
        .expect("completed despite the cancel");
    let received = receiver.join().expect("receiver").expect("received");
    assert!(received.handover.may_run() && summary.acknowledged);
    assert_eq!(source.first_difference(&destination).expect("layout"), None);
    for all in [facts.all(), receiver_facts.all()] {
        assert!(!all.contains(&Fact::ChannelLost), "{all:?}");
        assert_eq!(all.last(), Some(&Fact::Drained), "{all:?}");
        assert!(all.contains(&Fact::Completed), "{all:?}");
    }
}

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
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
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
            }
            *seen.lock().expect("seen") = Some(all);
        });
        Ok(())
    })
}

fn postcopy(transport: &Arc<dyn Transport>, net: Net, channels: u16) {
    let what = format!("{} {net:?} {channels} channels", transport.name());
    let source = guest(BYTES, Image::Mixed, 5);
    let destination = Arc::new(GuestMemory::anonymous_like(&source.layout()).expect("memory"));
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
fn postcopy_ends_byte_identical_on_every_path() {
    for transport in transports() {
        for net in [Net::Tcp, Net::Unix] {
            for channels in [1, 4] {
                postcopy(&transport, net, channels);
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

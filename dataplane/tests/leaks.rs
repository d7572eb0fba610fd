//! Sessions leave nothing behind: after completed, failed and cancelled migrations the process
//! has the same open file descriptors and threads as before, even while the caller keeps the
//! options (and their cancel handles). A test binary of its own, so no other test's sockets
//! and threads come and go meanwhile.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Image, Net, Next, Plan, guest, migrate};
use ramjet_dataplane::Compression;
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::dirty::{CallerFed, DirtySource, UffdWp};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::Resources;
use ramjet_dataplane::transport::Listener;
use ramjet_dataplane::{
    BoxError, CancelHandle, Error, Fact, FactSink, Guest, LiveOptions, LiveReport, ReceiveOptions,
    SendOptions, Sender, migrate_live, receive,
};

#[test]
fn no_descriptors_or_threads_outlive_a_session() {
    let src = guest(8 << 20, Image::Mixed, 1);
    let dst = Arc::new(GuestMemory::anonymous(8 << 20).expect("memory"));
    // Warm up whatever the runtime opens once.
    let plan = Plan::new(Net::Unix, 2, Compression::Auto);
    let none = DirtySet::none(&src);
    let last = |_| Next::Final(none.clone());
    assert!(migrate(&src, &dst, &plan, last, b"").sent.is_ok());
    let before = Resources::now();

    let mut kept = Vec::new();
    for net in [Net::Tcp, Net::Unix] {
        // A paused guest: the sender freezes the memory and sends it in place.
        let plan = Plan {
            paused: true,
            ..Plan::new(net, 4, Compression::Lz4)
        };
        let outcome = migrate(&src, &dst, &plan, last, b"");
        assert!(outcome.sent.is_ok() && outcome.received.is_ok());
        assert!(!src.is_frozen(), "the freeze ends with the session");

        // A receiver whose layout differs: both sides fail.
        let other = Arc::new(GuestMemory::anonymous(4 << 20).expect("memory"));
        let listener = Listener::bind(&common::endpoint(net)).expect("bind");
        let at = listener.endpoint().clone();
        let receive_options = ReceiveOptions::default();
        let cancel = receive_options.cancel.clone();
        let receiver = std::thread::spawn(move || {
            receive(&listener, other, &receive_options, Arc::new(|_| {}))
        });
        let send_options = SendOptions {
            channels: 3,
            cancel: CancelHandle::new(),
            ..SendOptions::default()
        };
        let sent = Sender::connect(Arc::clone(&src), &at, &send_options, Arc::new(|_| {}))
            .and_then(|mut s| s.round(&DirtySet::all(&src)).map(|_| ()));
        assert!(sent.is_err());
        assert!(receiver.join().expect("receiver").is_err());
        kept.push((send_options, cancel));
    }
    // Live migrations: one cancelled mid-round, one completed with userfaultfd tracking.
    for cancel_at in [Some(3), None] {
        let outcome = live(&src, &dst, cancel_at);
        assert_eq!(outcome.is_err(), cancel_at.is_some(), "{outcome:?}");
    }
    // Threads that are exiting get up to 10 s to go; what stays is named.
    let leaks = before.leaks(Duration::from_secs(10));
    assert!(leaks.is_empty(), "{leaks:?}");
    drop(kept);
}

/// A guest whose vCPUs are stopped throughout.
struct Idle;

impl Guest for Idle {
    fn pause(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    fn device_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(Vec::new())
    }

    fn resume(&mut self) {}
}

/// A live migration of `src` into `dst`, cancelled at pass `cancel_at` (whose log says every
/// page is dirty, so it never converges) or run to completion with userfaultfd tracking.
fn live(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    cancel_at: Option<u64>,
) -> Result<LiveReport, Error> {
    let listener = Listener::bind(&common::endpoint(Net::Tcp)).expect("bind");
    let at = listener.endpoint().clone();
    let dst = Arc::clone(dst);
    let receiver = std::thread::spawn(move || {
        receive(&listener, dst, &ReceiveOptions::default(), Arc::new(|_| {}))
    });
    let cancel = CancelHandle::new();
    let watcher = cancel.clone();
    let sink: Arc<dyn FactSink> = Arc::new(move |fact: Fact| {
        if cancel_at.is_some_and(|n| fact == Fact::Pass(n)) {
            watcher.cancel();
        }
    });
    let options = SendOptions {
        cancel,
        ..SendOptions::default()
    };
    let mut source: Box<dyn DirtySource> = match cancel_at {
        Some(_) => Box::new(CallerFed::new(|_, words: &mut [u64]| {
            words.fill(u64::MAX);
            Ok(())
        })),
        None => Box::new(UffdWp::new()),
    };
    let live_options = LiveOptions {
        downtime_limit: if cancel_at.is_some() {
            Duration::from_micros(1)
        } else {
            LiveOptions::default().downtime_limit
        },
        ..LiveOptions::default()
    };
    let report = Sender::connect(Arc::clone(src), &at, &options, sink)
        .and_then(|sender| migrate_live(sender, source.as_mut(), &mut Idle, &live_options));
    drop(source);
    let _ = receiver.join().expect("receiver");
    report
}

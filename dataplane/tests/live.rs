//! Live migrations of a running guest: a workload thread keeps writing guest memory while it
//! is migrated over loopback TCP. Each test checks the destination against the source as it
//! was when the guest paused, and the status sequence a control machine shows for the facts.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Image, Net, guest};
use ramjet_control::{Input, Machine, Options, Profile, Side, Timestamp, Trigger};
use ramjet_dataplane::dirty::{CallerFed, DirtyBitmap, DirtyError, DirtySet, DirtySource, UffdWp};
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::testkit::Workload;
use ramjet_dataplane::testkit::image::ImageKind;
use ramjet_dataplane::transport::Listener;
use ramjet_dataplane::{
    Error, Fact, FactSink, LiveHandle, LiveOptions, LiveReport, ReceiveOptions, SendOptions,
    Sender, StallPolicy, SwitchoverReason, migrate_live, receive,
};

const BYTES: u64 = 64 << 20;

/// A guest of `bytes` holding `image`, the memory it migrates into, and the dirty log (one
/// bitmap) its workload marks.
fn guest_and_destination(
    bytes: u64,
    image: Image,
    seed: u64,
) -> (Arc<GuestMemory>, Arc<GuestMemory>, Arc<[DirtyBitmap]>) {
    let memory = guest(bytes, image, seed);
    let dst = Arc::new(GuestMemory::anonymous(bytes).expect("memory"));
    let log: Arc<[DirtyBitmap]> = vec![DirtyBitmap::new(memory.total_pages())].into();
    (memory, dst, log)
}

/// The toy guest: a vCPU thread writing random pages at `rate` (or flat out), marking `log`.
fn workload(
    memory: &Arc<GuestMemory>,
    log: Option<Arc<[DirtyBitmap]>>,
    rate: Option<u64>,
) -> Workload {
    Workload::start(memory, log, rate, ImageKind::Random, 99)
}

/// Facts and the user's triggers in the order they happened.
#[derive(Default)]
struct Inputs(Mutex<Vec<Input>>);

impl Inputs {
    fn push(&self, input: impl Into<Input>) {
        self.0.lock().expect("inputs").push(input.into());
    }

    /// What a source machine with `options` shows for them.
    fn statuses(&self, options: Options) -> String {
        let mut machine = Machine::new(Side::Source, Profile::Qemu10, options);
        let now = Timestamp::from_unix_micros(1);
        let mut shown: Vec<String> = machine
            .step(Trigger::Migrate, now)
            .expect("migrate")
            .map(|e| e.kind().to_string())
            .into_iter()
            .collect();
        for input in self.0.lock().expect("inputs").iter() {
            match machine.step(input.clone(), now) {
                Ok(event) => shown.extend(event.map(|e| e.kind().to_string())),
                Err(e) => panic!("the machine refused {input:?}: {e}"),
            }
        }
        assert!(
            !machine.is_running(),
            "the machine is still running: {shown:?}"
        );
        shown.join(" ")
    }
}

struct Live {
    report: Result<LiveReport, Error>,
    received: Result<ramjet_dataplane::Received, Error>,
    inputs: Arc<Inputs>,
    /// The sender's handle (none if it could not connect).
    handle: Option<LiveHandle>,
}

/// Migrates `memory` live to a receiver over loopback TCP.
fn live(
    memory: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    source: &mut dyn DirtySource,
    workload: &mut Workload,
    options: &LiveOptions,
    on_fact: impl Fn(&Fact, &LiveHandle) + Send + Sync + 'static,
) -> Live {
    live_limited(memory, dst, source, workload, options, None, on_fact)
}

/// [`live`] with the sender's rate limited to `max_bandwidth` bytes per second.
fn live_limited(
    memory: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    source: &mut dyn DirtySource,
    workload: &mut Workload,
    options: &LiveOptions,
    max_bandwidth: Option<u64>,
    on_fact: impl Fn(&Fact, &LiveHandle) + Send + Sync + 'static,
) -> Live {
    let listener = Listener::bind(&common::endpoint(Net::Tcp)).expect("bind");
    let at = listener.endpoint().clone();
    let receive_options = ReceiveOptions {
        timeout: Duration::from_secs(20),
        ..ReceiveOptions::default()
    };
    let dst = Arc::clone(dst);
    let receiver =
        thread::spawn(move || receive(&listener, dst, &receive_options, Arc::new(|_| {})));
    let inputs = Arc::new(Inputs::default());
    // The sender's handle, once it has connected (before that, only setup-done arrives).
    let slot: Arc<OnceLock<LiveHandle>> = Arc::default();
    let sink: Arc<dyn FactSink> = {
        let (inputs, slot) = (Arc::clone(&inputs), Arc::clone(&slot));
        Arc::new(move |fact: Fact| {
            inputs.push(fact.clone());
            if let Some(handle) = slot.get() {
                on_fact(&fact, handle);
            }
        })
    };
    let send_options = SendOptions {
        max_bandwidth,
        timeout: Duration::from_secs(20),
        ..SendOptions::default()
    };
    let report = Sender::connect(Arc::clone(memory), &at, &send_options, sink).and_then(|sender| {
        let _ = slot.set(sender.live_handle());
        migrate_live(sender, source, workload, options)
    });
    let received = receiver.join().expect("receiver thread");
    Live {
        report,
        received,
        inputs,
        handle: slot.get().cloned(),
    }
}

fn assert_identical(src: &GuestMemory, dst: &GuestMemory) {
    assert_eq!(
        src.first_difference(dst).expect("same layout"),
        None,
        "memory differs"
    );
}

/// Converges with the guest writing 2,000 pages a second, tracked by userfaultfd or fed by the
/// caller, and the destination ends as the source was when the guest paused.
#[test]
fn a_running_guest_converges_with_either_dirty_source() {
    for fed in [false, true] {
        let (memory, dst, log) = guest_and_destination(BYTES, Image::Mixed, 7);
        let mut source: Box<dyn DirtySource> = if fed {
            Box::new(CallerFed::from_bitmaps(Arc::clone(&log)))
        } else {
            let mut probe = UffdWp::new();
            if let Err(e) = probe.start(&memory) {
                eprintln!("userfaultfd case skipped: {e}");
                continue;
            }
            Box::new(UffdWp::new())
        };
        let mut workload = workload(&memory, fed.then(|| Arc::clone(&log)), Some(2_000));
        // Let it write before the migration starts, and during round 1.
        thread::sleep(Duration::from_millis(50));
        let outcome = live(
            &memory,
            &dst,
            source.as_mut(),
            &mut workload,
            &LiveOptions::default(),
            |_, _| {},
        );
        let report = outcome.report.as_ref().expect("live migration");
        assert!(outcome.received.is_ok(), "receiver");
        assert_eq!(report.reason, SwitchoverReason::Converged);
        assert!(report.rounds >= 2, "{report:?}");
        assert!(
            !workload.is_running() && workload.resumes() == 0,
            "the guest stays paused"
        );
        // The hooks say that the destination runs it now.
        assert_eq!(workload.handed_over(), Some(true));
        assert!(
            outcome
                .received
                .as_ref()
                .is_ok_and(|r| r.handover.may_run())
        );
        assert_identical(&memory, &dst);
        // query-migrate's figures add up.
        let handle = outcome.handle.as_ref().expect("the sender connected");
        let ram = handle.ram_stats().expect("ram stats");
        let stats = report.summary.stats;
        assert_eq!(ram.total, BYTES);
        assert_eq!(ram.dirty_sync_count, u64::from(report.rounds));
        assert_eq!(ram.duplicate + ram.normal, stats.pages());
        assert_eq!(ram.normal_bytes, ram.normal * PAGE_SIZE as u64);
        assert!(
            stats.pages() >= memory.total_pages(),
            "every page at least once"
        );
        assert_eq!(ram.downtime_bytes, report.downtime_bytes);
        assert!(
            ram.precopy_bytes > BYTES / 3,
            "round 1 is before the pause: {ram:?}"
        );
        assert!(ram.transferred >= ram.precopy_bytes + ram.downtime_bytes);
        assert_eq!(ram.remaining, 0, "nothing remains once completed");
        let statuses = outcome.inputs.statuses(Options::new());
        let passes = (1..=report.rounds)
            .map(|n| format!("pass {n}"))
            .collect::<Vec<_>>();
        let before = passes[..passes.len() - 1].join(" ");
        let last = passes.last().expect("a pass");
        assert_eq!(
            statuses,
            format!("setup active {before} device {last} completed"),
            "fed {fed}"
        );
    }
}

/// A guest that dirties all of its memory between any two syncs, faster than the link can
/// move it: its log says so every time (a superset of what the workload really wrote, so the
/// destination must still match).
struct Saturating(CallerFed);

impl DirtySource for Saturating {
    fn name(&self) -> &'static str {
        "saturating"
    }

    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        self.0.start(memory)
    }

    fn harvest(&mut self, memory: &GuestMemory) -> Result<DirtySet, DirtyError> {
        self.0.harvest(memory)?;
        Ok(DirtySet::all(memory))
    }
}

/// A guest that dirties faster than the link moves never converges: each stall policy does
/// what it says.
#[test]
fn a_guest_that_dirties_too_fast_triggers_the_stall_policy() {
    for policy in [
        StallPolicy::Continue,
        StallPolicy::Switchover,
        StallPolicy::Fail,
    ] {
        let (memory, dst, log) = guest_and_destination(8 << 20, Image::Random, 3);
        let mut source = Saturating(CallerFed::from_bitmaps(Arc::clone(&log)));
        let mut workload = workload(&memory, Some(Arc::clone(&log)), None);
        let options = LiveOptions {
            downtime_limit: Duration::from_micros(1),
            stall_rounds: 3,
            on_stall: policy,
            // The bound that ends a migration that goes on through a stall.
            max_rounds: Some(40),
            ..LiveOptions::default()
        };
        let outcome = live(
            &memory,
            &dst,
            &mut source,
            &mut workload,
            &options,
            |_, _| {},
        );
        let what = format!("{policy:?}");
        match policy {
            StallPolicy::Continue => {
                let report = outcome.report.expect(&what);
                assert_eq!(report.reason, SwitchoverReason::MaxRounds, "{what}");
                assert_eq!(report.rounds, 41, "forty live rounds and the final one");
                assert!(report.last.stalled, "{what}: {report:?}");
                assert_eq!(report.stalled_syncs, 40 - 3, "{what}");
                assert_identical(&memory, &dst);
            }
            StallPolicy::Switchover => {
                let report = outcome.report.expect(&what);
                assert_eq!(report.reason, SwitchoverReason::Stalled, "{what}");
                assert!(report.last.stalled && report.last.rounds_without_progress >= 3);
                assert_identical(&memory, &dst);
            }
            StallPolicy::Postcopy => unreachable!("tests/postcopy.rs runs the postcopy policy"),
            StallPolicy::Fail => {
                let err = outcome.report.expect_err(&what);
                assert!(matches!(err, Error::Stalled { .. }), "{}", err.chain());
                assert!(err.chain().contains("does not converge"), "{}", err.chain());
                let received = outcome.received.expect_err("the receiver fails too");
                assert!(
                    received.chain().contains("does not converge"),
                    "{}",
                    received.chain()
                );
                assert!(
                    workload.is_running() && workload.handed_over().is_none(),
                    "the guest keeps running on the source"
                );
                assert!(!memory.is_frozen());
                let statuses = outcome.inputs.statuses(Options::new());
                assert!(statuses.ends_with(" failed"), "{statuses}");
            }
        }
    }
}

/// With pause-before-switchover the source waits, paused, in `pre-switchover` until the user
/// continues.
#[test]
fn pause_before_switchover_waits_for_continue() {
    let (memory, dst, log) = guest_and_destination(BYTES, Image::Mixed, 5);
    let mut source = CallerFed::from_bitmaps(Arc::clone(&log));
    let mut workload = workload(&memory, Some(Arc::clone(&log)), Some(2_000));
    let options = LiveOptions {
        pause_before_switchover: true,
        ..LiveOptions::default()
    };
    let continued: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::default();
    let waiter = Arc::clone(&continued);
    // The user: once the source reports its switchover, look, then continue.
    let outcome = live(
        &memory,
        &dst,
        &mut source,
        &mut workload,
        &options,
        move |fact, handle| {
            if *fact == Fact::Switchover {
                let handle = handle.clone();
                *waiter.lock().expect("waiter") = Some(thread::spawn(move || {
                    while !handle.progress().paused {
                        thread::sleep(Duration::from_millis(1));
                    }
                    thread::sleep(Duration::from_millis(20));
                    handle.proceed();
                }));
            }
        },
    );
    if let Some(user) = continued.lock().expect("waiter").take() {
        user.join().expect("user thread");
    }
    outcome.report.expect("live migration");
    outcome.received.expect("receiver");
    assert_identical(&memory, &dst);
    // The user's continue comes after the switchover fact and before the final pass.
    let mut inputs = outcome.inputs.0.lock().expect("inputs");
    let at = inputs
        .iter()
        .position(|i| *i == Input::Fact(Fact::Switchover))
        .expect("switchover");
    inputs.insert(at + 1, Input::Trigger(Trigger::Continue));
    drop(inputs);
    let statuses = outcome
        .inputs
        .statuses(Options::new().pause_before_switchover(true));
    assert!(
        statuses.contains(" pre-switchover device pass ") && statuses.ends_with(" completed"),
        "{statuses}"
    );
}

/// A cancel in the middle of a round ends the migration cancelled, with the guest running.
#[test]
fn a_cancel_mid_round_ends_cancelled_with_the_guest_running() {
    let (memory, dst, log) = guest_and_destination(BYTES, Image::Random, 9);
    let mut source = Saturating(CallerFed::from_bitmaps(Arc::clone(&log)));
    let mut workload = workload(&memory, Some(Arc::clone(&log)), None);
    let options = LiveOptions {
        downtime_limit: Duration::from_micros(1),
        max_rounds: Some(1000),
        ..LiveOptions::default()
    };
    let outcome = live(
        &memory,
        &dst,
        &mut source,
        &mut workload,
        &options,
        |fact, handle| {
            if *fact == Fact::Pass(3) {
                handle.cancel();
            }
        },
    );
    let err = outcome.report.expect_err("cancelled");
    assert!(err.is_cancelled(), "{}", err.chain());
    assert!(outcome.received.is_err());
    assert!(workload.is_running(), "the guest runs on");
    assert!(!memory.is_frozen());
    let mut inputs = outcome.inputs.0.lock().expect("inputs");
    let at = inputs
        .iter()
        .position(|i| *i == Input::Fact(Fact::Pass(3)))
        .expect("pass 3");
    inputs.insert(at + 1, Input::Trigger(Trigger::Cancel));
    drop(inputs);
    let statuses = outcome.inputs.statuses(Options::new());
    assert_eq!(
        statuses,
        "setup active pass 1 pass 2 pass 3 cancelling cancelled"
    );
}

/// A real workload (20,000 pages a second, 80 MB/s) outpaces a link limited to 20 MB/s: its
/// 1 MiB stays dirty (50 ms at that rate, over the 10 ms downtime limit), the bytes still dirty
/// stop shrinking, and each stall policy does what it says.
#[test]
fn a_guest_outpacing_a_rate_limited_link_stalls() {
    for policy in [
        StallPolicy::Continue,
        StallPolicy::Switchover,
        StallPolicy::Fail,
    ] {
        let (memory, dst, log) = guest_and_destination(1 << 20, Image::Random, 4);
        let mut source = CallerFed::from_bitmaps(Arc::clone(&log));
        let mut workload = workload(&memory, Some(Arc::clone(&log)), Some(20_000));
        let options = LiveOptions {
            // 10 ms at 20 MB/s is 50 pages: far fewer than the guest dirties in any round.
            downtime_limit: Duration::from_millis(10),
            stall_rounds: 3,
            on_stall: policy,
            max_rounds: Some(30),
            ..LiveOptions::default()
        };
        let outcome = live_limited(
            &memory,
            &dst,
            &mut source,
            &mut workload,
            &options,
            Some(20 << 20),
            |_, _| {},
        );
        let what = format!("{policy:?}");
        match policy {
            StallPolicy::Continue => {
                let report = outcome.report.expect(&what);
                assert_eq!(report.reason, SwitchoverReason::MaxRounds, "{what}");
                assert!(report.stalled_syncs > 0, "{what}: {report:?}");
                assert_identical(&memory, &dst);
            }
            StallPolicy::Switchover => {
                let report = outcome.report.expect(&what);
                assert_eq!(
                    report.reason,
                    SwitchoverReason::Stalled,
                    "{what}: {report:?}"
                );
                assert_identical(&memory, &dst);
            }
            StallPolicy::Postcopy => unreachable!("tests/postcopy.rs runs the postcopy policy"),
            StallPolicy::Fail => {
                let err = outcome.report.expect_err(&what);
                assert!(matches!(err, Error::Stalled { .. }), "{}", err.chain());
                assert!(workload.is_running(), "the guest keeps running");
            }
        }
    }
}

/// A migration that does not converge switches over at its time bound.
#[test]
fn the_time_bound_forces_the_switchover() {
    let (memory, dst, log) = guest_and_destination(8 << 20, Image::Random, 6);
    let mut source = Saturating(CallerFed::from_bitmaps(Arc::clone(&log)));
    let mut workload = workload(&memory, Some(Arc::clone(&log)), Some(1_000));
    let options = LiveOptions {
        downtime_limit: Duration::from_micros(1),
        max_time: Some(Duration::from_millis(100)),
        ..LiveOptions::default()
    };
    let outcome = live(
        &memory,
        &dst,
        &mut source,
        &mut workload,
        &options,
        |_, _| {},
    );
    let report = outcome.report.expect("live migration");
    assert_eq!(report.reason, SwitchoverReason::MaxTime);
    assert!(report.rounds >= 2);
    assert_identical(&memory, &dst);
}

//! A running KVM guest migrated live over loopback TCP with ramjet, KVM's dirty log and the
//! vCPU state as the device state: it continues on the destination exactly where it stopped;
//! a guest that writes faster than the link meets the stall policy; a cancel leaves it
//! running on the source and the destination VM gone.

mod common;

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{booted, check_against_model, kvm_or_skip};
use ramjet_dataplane::{
    CancelHandle, Endpoint, Error, Fact, Listener, LiveOptions, PostcopyRun, ReceiveOptions,
    Received, SendOptions, Sender, StallPolicy, migrate_live, receive,
};
use ramjet_vmm::{LogMode, Machine, Vm};

fn quiet() -> Arc<dyn ramjet_dataplane::FactSink> {
    Arc::new(|_: Fact| {})
}

/// The destination VMM: a VM like the source's, its RAM prefaulted, receiving on loopback.
fn destination(bytes: u64) -> (Arc<Vm>, Endpoint, JoinHandle<Result<Received, Error>>) {
    let vm = Arc::new(Vm::new(bytes, LogMode::GetOnly).expect("destination VM"));
    vm.ram().prefault().expect("prefault");
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let at = listener.endpoint().clone();
    let ram = Arc::clone(vm.ram());
    let receiver =
        thread::spawn(move || receive(&listener, ram, &ReceiveOptions::default(), quiet()));
    (vm, at, receiver)
}

#[test]
fn a_running_guest_migrates_live_and_continues_where_it_stopped() {
    const BYTES: u64 = 1 << 30;
    const GRANT: u32 = 10;
    const RATE: u64 = 10_000;
    if !kvm_or_skip("a_running_guest_migrates_live_and_continues_where_it_stopped") {
        return;
    }
    let (mut source, workload) = booted(BYTES, GRANT, Some(RATE));
    thread::sleep(Duration::from_millis(200));
    let (vm, at, receiver) = destination(BYTES);

    let sender = Sender::connect(
        Arc::clone(source.vm().ram()),
        &at,
        &SendOptions::default(),
        quiet(),
    )
    .expect("connect");
    let mut dirty = source.vm().dirty_log().expect("dirty log");
    let report =
        migrate_live(sender, &mut dirty, &mut source, &LiveOptions::default()).expect("migration");
    let received = receiver.join().expect("receiver").expect("received");
    assert!(received.handover.may_run(), "{:?}", received.handover);
    assert!(
        !source.is_running(),
        "handed over: the source never runs it again"
    );
    let syncs = dirty.stats();
    assert!(syncs.syncs >= 2, "{syncs:?}");
    assert!(
        syncs.pages > 0,
        "the guest's writes reached the dirty log: {syncs:?}"
    );
    assert!(report.rounds >= 2, "{report:?}");

    // Only now may the destination run the guest.
    let destination = Machine::restore(vm, &received.device_state, Some(RATE)).expect("restore");
    destination.resume();
    thread::sleep(Duration::from_millis(300));
    let sum = destination
        .sum_and_pause(Duration::from_secs(120))
        .expect("sum");
    let counter = check_against_model(destination.vm(), workload, sum);

    let (before, after) = (source.progress(), destination.progress());
    assert_eq!((before.gaps, after.gaps), (0, 0), "{before:?} {after:?}");
    let stopped = before.last.expect("the source reported");
    assert_eq!(
        after.first,
        Some(stopped + GRANT),
        "the counter goes on from {stopped}: no step back, none lost"
    );
    assert!(after.reports > 1 && counter > stopped + GRANT, "{after:?}");
}

/// The guest dirties its memory far faster than an 8 MB/s link can carry it: with
/// [`StallPolicy::Fail`] the migration fails as stalled, the guest runs on at the source, and
/// the destination holds nothing it may run.
#[test]
fn a_guest_faster_than_the_link_meets_the_stall_policy() {
    const BYTES: u64 = 8 << 20;
    if !kvm_or_skip("a_guest_faster_than_the_link_meets_the_stall_policy") {
        return;
    }
    let (mut source, _) = booted(BYTES, 64, None);
    let (_vm, at, receiver) = destination(BYTES);
    let options = SendOptions {
        max_bandwidth: Some(8_000_000),
        ..SendOptions::default()
    };
    let sender =
        Sender::connect(Arc::clone(source.vm().ram()), &at, &options, quiet()).expect("connect");
    let handle = sender.live_handle();
    let mut dirty = source.vm().dirty_log().expect("dirty log");
    let live = LiveOptions {
        stall_rounds: 2,
        on_stall: StallPolicy::Fail,
        max_time: Some(Duration::from_secs(60)),
        ..LiveOptions::default()
    };
    let err = migrate_live(sender, &mut dirty, &mut source, &live).expect_err("stalled");
    assert!(matches!(err, Error::Stalled { .. }), "{err}");
    let progress = handle.progress();
    assert!(progress.stalled, "{progress:?}");
    assert!(
        progress.dirty_pages_rate > 0,
        "KVM's log saw the guest write: {progress:?}"
    );
    assert!(dirty.stats().syncs >= 2, "{:?}", dirty.stats());
    assert!(receiver.join().expect("receiver").is_err());
    let running = source.progress().reports;
    thread::sleep(Duration::from_millis(100));
    assert!(source.is_running() && source.progress().reports > running);
    assert_eq!(source.progress().gaps, 0);
}

/// Cancelled in its first round, the migration leaves the guest running on the source, and the
/// destination VMM destroys its VM.
#[test]
fn a_cancel_leaves_the_source_running_and_the_destination_destroyed() {
    const BYTES: u64 = 128 << 20;
    if !kvm_or_skip("a_cancel_leaves_the_source_running_and_the_destination_destroyed") {
        return;
    }
    let (mut source, workload) = booted(BYTES, 10, Some(10_000));
    let (vm, at, receiver) = destination(BYTES);
    let destroyed = Arc::downgrade(&vm);
    let cancel = CancelHandle::new();
    let options = SendOptions {
        max_bandwidth: Some(32_000_000),
        cancel: cancel.clone(),
        ..SendOptions::default()
    };
    let sender =
        Sender::connect(Arc::clone(source.vm().ram()), &at, &options, quiet()).expect("connect");
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(500));
        cancel.cancel();
    });
    let mut dirty = source.vm().dirty_log().expect("dirty log");
    let err = migrate_live(sender, &mut dirty, &mut source, &LiveOptions::default())
        .expect_err("cancelled");
    canceller.join().expect("canceller");
    assert!(err.is_cancelled(), "{err}");
    let received = receiver.join().expect("receiver");
    assert!(received.is_err(), "the destination has nothing to run");
    drop(vm);
    assert!(
        destroyed.upgrade().is_none(),
        "the destination VM is destroyed: nothing holds it, its KVM file descriptor is closed"
    );

    drop(dirty);
    let reports = source.progress().reports;
    thread::sleep(Duration::from_millis(100));
    assert!(source.is_running() && source.progress().reports > reports);
    let sum = source.sum_and_pause(Duration::from_secs(60)).expect("sum");
    check_against_model(source.vm(), workload, sum);
    assert_eq!(source.progress().gaps, 0);
}

/// Postcopy with a real vCPU: after round 1 the destination VMM restores the vCPU and runs it
/// at once; the pages still on their way are absent, so the vCPU's accesses (KVM's, through
/// its page tables) fault into userfaultfd and are fetched. The guest goes on from the same
/// counter, and its memory at the end is what the host's model says.
#[test]
fn a_running_guest_continues_in_postcopy() {
    const BYTES: u64 = 64 << 20;
    const GRANT: u32 = 10;
    const RATE: u64 = 20_000;
    if !kvm_or_skip("a_running_guest_continues_in_postcopy") {
        return;
    }
    let (mut source, workload) = booted(BYTES, GRANT, Some(RATE));
    thread::sleep(Duration::from_millis(100));
    let vm = Arc::new(Vm::new(BYTES, LogMode::GetOnly).expect("destination VM"));
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let at = listener.endpoint().clone();
    let (started_tx, started) = std::sync::mpsc::channel();
    let there = Arc::clone(&vm);
    let options = ReceiveOptions {
        postcopy: Some(PostcopyRun::new(move |state| {
            let machine = Machine::restore(Arc::clone(&there), state, Some(RATE))?;
            machine.resume();
            let _ = started_tx.send(machine);
            Ok(())
        })),
        ..ReceiveOptions::default()
    };
    let ram = Arc::clone(vm.ram());
    let receiver = thread::spawn(move || receive(&listener, ram, &options, quiet()));

    // A link slow enough that the guest runs on the destination for a while before the push
    // brings every page: it faults on many.
    let send = SendOptions {
        postcopy: true,
        max_bandwidth: Some(40_000_000),
        ..SendOptions::default()
    };
    let sender =
        Sender::connect(Arc::clone(source.vm().ram()), &at, &send, quiet()).expect("connect");
    let mut dirty = source.vm().dirty_log().expect("dirty log");
    let live = LiveOptions {
        postcopy_after_first_round: true,
        ..LiveOptions::default()
    };
    let report = migrate_live(sender, &mut dirty, &mut source, &live).expect("migration");
    let received = receiver.join().expect("receiver").expect("received");
    assert!(report.reason.is_postcopy(), "{report:?}");
    let stats = received.postcopy.expect("postcopy");
    eprintln!("postcopy of the KVM guest: {stats:?}");
    assert!(
        stats.requests > 0 && stats.latency.count > 0,
        "the vCPU faulted on absent pages and they were fetched: {stats:?}"
    );
    assert!(!source.is_running(), "handed over");

    let destination = started.recv().expect("the destination started the guest");
    thread::sleep(Duration::from_millis(200));
    let sum = destination
        .sum_and_pause(Duration::from_secs(120))
        .expect("sum");
    let counter = check_against_model(destination.vm(), workload, sum);
    let (before, after) = (source.progress(), destination.progress());
    assert_eq!((before.gaps, after.gaps), (0, 0), "{before:?} {after:?}");
    let stopped = before.last.expect("the source reported");
    assert_eq!(after.first, Some(stopped + GRANT), "the counter goes on");
    assert!(counter > stopped + GRANT, "{after:?}");
}

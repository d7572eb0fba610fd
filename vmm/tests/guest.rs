//! The guest on one VMM, without a migration: it runs as the host's model of it says, pauses
//! and resumes without losing a step, and is restored from its own state.

mod common;

use std::thread;
use std::time::Duration;

use common::{booted, check_against_model, kvm_or_skip};
use ramjet_dataplane::DirtySource as _;
use ramjet_vmm::guest::Workload;
use ramjet_vmm::{LogMode, Machine, Vm};
use vm_memory::Bytes as _;

const BYTES: u64 = 32 << 20;

#[test]
fn the_guest_runs_as_the_model_says() {
    if !kvm_or_skip("the_guest_runs_as_the_model_says") {
        return;
    }
    let (machine, workload) = booted(BYTES, 16, None);
    thread::sleep(Duration::from_millis(100));
    assert!(machine.is_running());
    let sum = machine.sum_and_pause(Duration::from_secs(10)).expect("sum");
    let counter = check_against_model(machine.vm(), workload, sum);
    let progress = machine.progress();
    assert!(counter > 1000, "the guest wrote {counter} pages");
    assert_eq!(progress.gaps, 0, "{progress:?}");
    assert_eq!(progress.first, Some(16));
    assert_eq!(progress.last, Some(counter));
}

#[test]
fn pauses_and_resumes_lose_no_step() {
    if !kvm_or_skip("pauses_and_resumes_lose_no_step") {
        return;
    }
    let (machine, workload) = booted(BYTES, 8, Some(200_000));
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(5));
        machine.pause().expect("pause");
        let blob = machine.device_state().expect("state");
        assert!(!blob.is_empty());
        machine.resume();
    }
    let sum = machine.sum_and_pause(Duration::from_secs(10)).expect("sum");
    check_against_model(machine.vm(), workload, sum);
    assert_eq!(machine.progress().gaps, 0);
}

/// The device state restores on a second VM of this host that shares nothing with the first
/// but a copy of its memory: the guest goes on there as if it had not moved.
#[test]
fn a_guest_restored_from_its_state_goes_on() {
    if !kvm_or_skip("a_guest_restored_from_its_state_goes_on") {
        return;
    }
    let (machine, workload) = booted(BYTES, 8, Some(100_000));
    thread::sleep(Duration::from_millis(50));
    machine.pause().expect("pause");
    let blob = machine.device_state().expect("state");
    let before = machine.progress();
    let copy = std::sync::Arc::new(Vm::new(BYTES, LogMode::GetOnly).expect("VM"));
    let mut page = vec![0u8; 4096];
    for index in 0..BYTES / 4096 {
        machine
            .vm()
            .ram()
            .read(0, index * 4096, &mut page)
            .expect("read");
        copy.ram().write(0, index * 4096, &page).expect("write");
    }
    machine.stop();
    let moved = Machine::restore(copy, &blob, Some(100_000)).expect("restore");
    assert!(!moved.is_running(), "restored paused");
    moved.resume();
    let sum = moved.sum_and_pause(Duration::from_secs(10)).expect("sum");
    check_against_model(moved.vm(), workload, sum);
    let after = moved.progress();
    assert_eq!(after.gaps, 0);
    let last = before.last.expect("reports on the source");
    assert_eq!(
        after.first,
        Some(last + 8),
        "the counter goes on from {last}"
    );
}

/// A sync finds both kinds of write: the guest's (KVM's dirty log) and the VMM's own (its
/// vm-memory bitmap), and forgets them once read.
#[test]
fn the_dirty_log_holds_the_guests_and_the_vmms_writes() {
    if !kvm_or_skip("the_dirty_log_holds_the_guests_and_the_vmms_writes") {
        return;
    }
    for mode in [LogMode::ManualClear, LogMode::GetOnly] {
        let vm = std::sync::Arc::new(Vm::new(BYTES, mode).expect("VM"));
        let workload = Workload::new(BYTES, 3, 4, 1).expect("workload");
        let machine =
            Machine::boot(std::sync::Arc::clone(&vm), workload, Some(20_000)).expect("boot");
        machine.pause().expect("pause");
        let mut log = vm.dirty_log().expect("dirty log");
        log.start(vm.ram()).expect("start");
        assert_eq!(
            log.harvest(vm.ram()).expect("harvest").count(),
            0,
            "{mode:?}"
        );
        // The VMM writes a page no guest instruction touches.
        let page = 5u64;
        vm.memory()
            .write_obj(0xfeed_u32, vm_memory::GuestAddress(page * 4096))
            .expect("write");
        let set = log.harvest(vm.ram()).expect("harvest");
        assert_eq!(set.count(), 1, "the VMM's write, {mode:?}");
        assert!(set.words(0)[0] & (1 << page) != 0);
        // The guest writes: its state page, the mailbox (the VMM's tick) and data pages.
        machine.resume();
        thread::sleep(Duration::from_millis(20));
        machine.pause().expect("pause");
        let set = log.harvest(vm.ram()).expect("harvest");
        let word = set.words(0)[0];
        assert!(word & (1 << 3) != 0, "the guest's state page, {mode:?}");
        assert!(
            word & (1 << 4) != 0,
            "the VMM's tick in the mailbox, {mode:?}"
        );
        assert!(set.count() > 3, "data pages, {mode:?}");
        assert_eq!(
            log.harvest(vm.ram()).expect("harvest").count(),
            0,
            "{mode:?}"
        );
        assert!(log.stats().syncs >= 4);
    }
}

/// Handed over in doubt, the guest stays paused: a resume does nothing until an operator
/// takes it back.
#[test]
fn a_guest_handed_over_in_doubt_stays_paused() {
    if !kvm_or_skip("a_guest_handed_over_in_doubt_stays_paused") {
        return;
    }
    let (mut machine, workload) = booted(BYTES, 8, Some(50_000));
    machine.pause().expect("pause");
    ramjet_dataplane::Guest::handed_over(&mut machine, false);
    machine.resume();
    let reports = machine.progress().reports;
    thread::sleep(Duration::from_millis(50));
    assert!(!machine.is_running());
    assert_eq!(machine.progress().reports, reports, "it did not run");
    machine.take_back();
    let sum = machine.sum_and_pause(Duration::from_secs(10)).expect("sum");
    check_against_model(machine.vm(), workload, sum);
    assert!(machine.progress().reports > reports);
}

#[test]
fn a_bad_device_state_is_refused() {
    if !kvm_or_skip("a_bad_device_state_is_refused") {
        return;
    }
    let vm = std::sync::Arc::new(Vm::new(BYTES, LogMode::GetOnly).expect("VM"));
    let err = Machine::restore(vm, b"device state", None).expect_err("refused");
    assert!(err.to_string().contains("device state is invalid"), "{err}");
}

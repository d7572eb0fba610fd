//! `ramjet demo --guest kvm`: the demo's migration with a real KVM guest, run by ramjet's
//! minimal VMM (`ramjet-vmm`): KVM's dirty log as the dirty source, the vCPU's state as the
//! device state, and the guest running on the destination only once the handover says so.

use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ramjet_dataplane::{DirtySource as _, PostcopyRun};
use ramjet_vmm::guest::Workload;
use ramjet_vmm::{LogMode, Machine, Vm, guest_state};

use crate::demo::{self, Config};
use crate::units::Bytes;

/// How long the guest runs on the destination before the demo checks it.
const RUN_ON: Duration = Duration::from_millis(300);

pub fn run(bytes: u64, rate: u64, mode: LogMode, mut config: Config) -> anyhow::Result<()> {
    ramjet_vmm::kvm_available().map_err(|why| {
        anyhow::anyhow!(
            "the KVM guest cannot run here: {why} (`ramjet demo` without `--guest kvm` runs a \
             guest that needs no KVM)"
        )
    })?;
    eprintln!(
        "preparing a {} KVM guest of mixed content and its destination VM...",
        Bytes(bytes)
    );
    let shown = demo::Preparing::new(bytes);
    let vm = Arc::new(Vm::new(bytes, mode)?);
    demo::fill(vm.ram(), &shown)?;
    // The VMM paces the guest once a millisecond: `grant` pages a batch.
    let grant = u32::try_from((rate / 1000).max(1)).unwrap_or(u32::MAX);
    let workload = Workload::new(bytes, 7, grant, Workload::DEFAULT_WORDS)?;
    let booted = Instant::now();
    let mut source = Machine::boot(Arc::clone(&vm), workload, Some(rate))?;
    shown.step("faulting in the destination VM's memory");
    let target = Arc::new(Vm::new(bytes, LogMode::GetOnly)?);
    target
        .ram()
        .prefault()
        .context("cannot prefault the destination")?;
    drop(shown);

    let mut dirty = vm.dirty_log()?;
    let tracking = dirty.name();
    // The destination VMM runs the guest as soon as the handover says it may: in pre-copy
    // once every page is there, in postcopy at once, its vCPU faulting on the pages that are
    // still on their way (KVM's own accesses fault through userfaultfd as the guest's do).
    let (started, restored) = mpsc::channel();
    let vm_there = Arc::clone(&target);
    let arrived: Option<demo::Arrived> = if config.send.postcopy {
        config.receive.postcopy = Some(PostcopyRun::new(move |device_state| {
            let restored = guest_state(&vm_there).and_then(|arrived| {
                let machine = Machine::restore(Arc::clone(&vm_there), device_state, Some(rate))?;
                machine.resume();
                Ok(Some((machine, arrived)))
            });
            let failed = restored.as_ref().err().map(ToString::to_string);
            let _ = started.send(restored);
            failed.map_or(Ok(()), |why| Err(why.into()))
        }));
        None
    } else {
        Some(Box::new(move |received| {
            let restored = if received.handover.may_run() {
                guest_state(&vm_there).and_then(|arrived| {
                    let machine = Machine::restore(vm_there, &received.device_state, Some(rate))?;
                    machine.resume();
                    Ok(Some((machine, arrived)))
                })
            } else {
                Ok(None)
            };
            let _ = started.send(restored);
        }))
    };
    let migrated = demo::migrate(
        &config,
        vm.ram(),
        target.ram(),
        &mut dirty,
        &mut source,
        arrived,
    )?;
    let handover = migrated.received.handover;
    let Some((destination, arrived)) = restored
        .recv()
        .context("the destination did not start the guest")??
    else {
        bail!("the destination may not run the guest ({handover:?})");
    };
    let at_pause = guest_state(&vm)?;
    if arrived != at_pause {
        bail!("the destination's guest state {arrived:?} is not the paused source's {at_pause:?}");
    }
    let syncs = dirty.stats();
    drop(dirty);
    let stopped = source.progress();
    migrated.print(&config.send, tracking, bytes);
    println!(
        "dirty syncs: {}, {:.0} µs per GiB of guest RAM each on average (KVM_GET_DIRTY_LOG{} and \
         the handoff; longest {:.2?})",
        syncs.syncs,
        syncs.micros_per_gib(bytes),
        match vm.log_mode() {
            LogMode::ManualClear => " + KVM_CLEAR_DIRTY_LOG",
            LogMode::GetOnly => "",
        },
        syncs.max
    );
    if let Some(paused) = source.paused_at() {
        let ran = paused.saturating_duration_since(booted).as_secs_f64();
        println!(
            "dirty rate:  {:.0} pages a second written by the guest until the pause (asked for \
             {rate})",
            f64::from(at_pause.0) / ran.max(1e-9)
        );
    }
    thread::sleep(RUN_ON);
    let sum = destination.sum_and_pause(Duration::from_secs(300))?;
    let after = destination.progress();
    if let (Some(paused), Some(running)) = (source.paused_at(), destination.resumed_at()) {
        println!(
            "guest down:  {:.1?} from the pause on the source to the guest running on the \
             destination",
            running.saturating_duration_since(paused)
        );
    }
    let (last, first) = (stopped.last.unwrap_or(0), after.first.unwrap_or(0));
    let host = target.host_sum(&workload)?;
    let (counter, _, checksum) = guest_state(&target)?;
    let continuous = stopped.gaps == 0 && after.gaps == 0 && first == last.wrapping_add(grant);
    if !continuous || host != sum {
        bail!(
            "the guest did not continue where it stopped: source reports up to {last}, \
             destination from {first} (batch {grant}, gaps {} and {}); sums {sum:#010x} (guest) \
             and {host:#010x} (host)",
            stopped.gaps,
            after.gaps
        );
    }
    println!(
        "guest:       continued on the destination from the same counter and checksum ({}, \
         {:#010x}): the source's last report was {last}, the destination's first {first}; {} \
         reports later it is at {counter} (checksum {checksum:#010x}), and its sum over its \
         memory, {sum:#010x}, is the host's",
        at_pause.0, at_pause.2, after.reports
    );
    Ok(())
}

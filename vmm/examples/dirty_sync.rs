//! The cost of one dirty sync of a running KVM guest: `KVM_GET_DIRTY_LOG` (with or without
//! `KVM_CLEAR_DIRTY_LOG`) plus the handoff to ramjet (the OR with the VMM's bitmap and the merge
//! into its dirty set), per GiB of guest RAM, for both log modes in one run.
//!
//! ```text
//! cargo run --release -p ramjet-vmm --example dirty_sync -- [GUEST_MIB] [PAGES_PER_SECOND] [SYNCS]
//! ```
//!
//! Defaults: a 1024 MiB guest dirtying 20,000 pages a second, 40 syncs 25 ms apart per mode.

use std::error::Error;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ramjet_dataplane::DirtySource as _;
use ramjet_vmm::guest::Workload;
use ramjet_vmm::{LogMode, Machine, Vm};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let rate: u64 = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let syncs: usize = args.next().map_or(Ok(40), |a| a.parse())?;
    let bytes = mib << 20;
    let gib = bytes as f64 / f64::from(1u32 << 30);
    if let Err(why) = ramjet_vmm::kvm_available() {
        return Err(format!("KVM is not available: {why}").into());
    }
    println!("{mib} MiB guest, {rate} pages/s asked, {syncs} syncs 25 ms apart per mode");
    for mode in [LogMode::GetOnly, LogMode::ManualClear] {
        let vm = Arc::new(Vm::new(bytes, mode)?);
        vm.ram().prefault()?;
        let grant = u32::try_from((rate / 1000).max(1))?;
        let workload = Workload::new(bytes, 1, grant, Workload::DEFAULT_WORDS)?;
        let machine = Machine::boot(Arc::clone(&vm), workload, Some(rate))?;
        let mut log = vm.dirty_log()?;
        let started = Instant::now();
        log.start(vm.ram())?;
        let start = started.elapsed();
        let mut times = Vec::with_capacity(syncs);
        let mut pages = 0;
        for _ in 0..syncs {
            thread::sleep(Duration::from_millis(25));
            let t = Instant::now();
            pages += log.harvest(vm.ram())?.count();
            times.push(t.elapsed());
        }
        machine.stop();
        times.sort();
        let micros = |d: Duration| d.as_secs_f64() * 1e6 / gib;
        let mean = times.iter().sum::<Duration>() / u32::try_from(times.len().max(1))?;
        println!(
            "{:<14} start {:>7.0} µs/GiB; sync median {:>5.0} µs/GiB, mean {:>5.0}, max {:>5.0}; \
             {:.0} dirty pages a sync",
            format!("{mode:?}"),
            micros(start),
            micros(times[times.len() / 2]),
            micros(mean),
            micros(times[times.len() - 1]),
            pages as f64 / syncs as f64
        );
    }
    Ok(())
}

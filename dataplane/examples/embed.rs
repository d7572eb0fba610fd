//! A minimal VMM embedding ramjet: its "guest" is a memory region and a vCPU thread that keeps
//! writing to it (ramjet's toy `Workload`, which implements the `Guest` hooks). It migrates
//! itself live over loopback TCP to a destination VMM in the same process, drives one
//! `ramjet-control` machine per side and prints their QMP-shaped events, then the figures a
//! management tool would ask for.
//!
//! ```text
//! cargo run --release -p ramjet-dataplane --example embed -- [GUEST_MIB] [PAGES_PER_SECOND]
//! ```
//!
//! Defaults: a 1024 MiB guest dirtying 20,000 pages a second. Writes are tracked with
//! userfaultfd write protection where the kernel allows it, else from a dirty bitmap the vCPU
//! marks itself (as KVM's dirty log would).

use std::error::Error;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use ramjet_control::{Input, Machine, Options, Profile, Side, Timestamp, Trigger};
use ramjet_dataplane::testkit::Workload;
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::{
    Fact, FactSink, GuestMemory, Listener, LiveOptions, ReceiveOptions, SendOptions, Sender,
    migrate_live, receive,
};

/// A control machine fed with one side's facts, printing what it emits.
fn machine(side: Side) -> (Arc<Mutex<Machine>>, Arc<dyn FactSink>) {
    let machine = Arc::new(Mutex::new(Machine::new(
        side,
        Profile::Qemu10,
        Options::new(),
    )));
    let fed = Arc::clone(&machine);
    let sink: Arc<dyn FactSink> = Arc::new(move |fact: Fact| step(&fed, side, fact));
    (machine, sink)
}

fn step(machine: &Mutex<Machine>, side: Side, input: impl Into<Input>) {
    let now = Timestamp::from(SystemTime::now());
    let mut machine = machine
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match machine.step(input, now) {
        Ok(Some(event)) => println!(
            "{:>11} {}.{:06} {event}",
            format!("{side:?}"),
            now.seconds(),
            now.subsec_micros()
        ),
        Ok(None) => {}
        Err(e) => eprintln!("{side:?} machine refused an input: {e}"),
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let pages_per_second: u64 = args.next().map_or(Ok(20_000), |a| a.parse())?;

    // The source VMM: guest RAM with an image in it, and a running vCPU.
    let memory = Arc::new(GuestMemory::anonymous(mib << 20)?);
    image::fill(&memory, ImageKind::Mixed, 7)?;
    let (mut vm, mut source, why) =
        Workload::start_tracked(&memory, Some(pages_per_second), ImageKind::Mixed, 1);
    if let Some(why) = why {
        println!("userfaultfd unavailable ({why}); the vCPU marks a dirty bitmap instead");
    }

    // The destination VMM: RAM allocated and faulted in at start-up, then `-incoming`.
    let incoming = Arc::new(GuestMemory::anonymous_like(&memory.layout())?);
    incoming.prefault()?;
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
    let at = listener.endpoint().clone();
    let (destination, destination_sink) = machine(Side::Destination);
    step(&destination, Side::Destination, Trigger::Migrate);
    let dst = Arc::clone(&incoming);
    let receiver = thread::spawn(move || {
        receive(&listener, dst, &ReceiveOptions::default(), destination_sink)
    });

    // `migrate`: connect and run the live loop; progress is sampled from another thread.
    let (source_machine, source_sink) = machine(Side::Source);
    step(&source_machine, Side::Source, Trigger::Migrate);
    let started = Instant::now();
    let sender = Sender::connect(
        Arc::clone(&memory),
        &at,
        &SendOptions::default(),
        source_sink,
    )?;
    // The handle steers and watches this sender's migration from other threads.
    let handle = sender.live_handle();
    let watcher = {
        let (handle, machine) = (handle.clone(), Arc::clone(&source_machine));
        thread::spawn(move || {
            let mut machine_running = true;
            while machine_running {
                thread::sleep(Duration::from_millis(100));
                let mut machine = machine
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(stats) = handle.ram_stats() {
                    machine.set_ram_stats(stats);
                }
                machine.set_expected_downtime(handle.progress().expected_downtime);
                machine_running = machine.is_running();
            }
        })
    };
    let report = migrate_live(sender, source.as_mut(), &mut vm, &LiveOptions::default());
    let received = receiver
        .join()
        .map_err(|_| "the receiver thread panicked")?;
    watcher.join().map_err(|_| "the watcher thread panicked")?;
    let report = report?;
    let received = received?;

    let guest = memory.total_bytes() as f64;
    println!();
    println!("dirty source:        {}", source.name());
    println!(
        "rounds:              {} ({:?})",
        report.rounds, report.reason
    );
    println!("total time:          {:.2?}", started.elapsed());
    println!("expected downtime:   {:.1?}", report.expected_downtime);
    println!(
        "measured downtime:   {:.1?} (pause to the go acknowledged)",
        report.downtime
    );
    println!(
        "bytes sent:          {} ({:.2}x the guest; {} while paused)",
        report.summary.stats.wire_bytes,
        report.summary.stats.wire_bytes as f64 / guest,
        report.downtime_bytes
    );
    println!(
        "device state:        {:?}",
        String::from_utf8_lossy(&received.device_state)
    );
    let identical = memory.first_difference(&incoming)?.is_none();
    println!("destination identical to the paused source: {identical}");
    if !identical {
        return Err("the destination differs from the source".into());
    }
    Ok(())
}

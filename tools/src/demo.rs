//! `ramjet demo`: the main job on built-in defaults. A guest of mixed content whose vCPU keeps
//! dirtying pages migrates live over loopback to a receiver in the same process, with progress,
//! both sides' events, and a summary that checks the destination.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ramjet_control::{Options, Side, Trigger};
use ramjet_dataplane::codec::Compression;
use ramjet_dataplane::image::{self, ImageKind};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::Listener;
use ramjet_dataplane::workload::Workload;
use ramjet_dataplane::{
    CancelHandle, LiveHandle, LiveOptions, ReceiveOptions, SendOptions, Sender, migrate_live,
    receive,
};

use crate::cli::{GuestSize, TransportKind, millis, transport_of};
use crate::events::{Events, Format};
use crate::progress::Watcher;
use crate::units::{Bytes, Rate};

/// Migrate a running guest over loopback and show how it goes.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    size: GuestSize,
    /// Channels (sockets).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    channels: u16,
    /// Transport; io_uring where the kernel allows it unless given.
    #[arg(long, value_enum)]
    transport: Option<TransportKind>,
    /// Page compression: off, lz4 or auto.
    #[arg(long, default_value = "auto")]
    compress: Compression,
    /// Pages the guest dirties per second.
    #[arg(long, default_value_t = 20_000)]
    dirty_rate: u64,
    /// The downtime limit of a live migration: 300ms, 1.5s, ...; a bare number is milliseconds.
    #[arg(long, default_value = "300ms", value_parser = millis)]
    downtime_limit: Duration,
    /// Limit the link, e.g. 200M/s.
    #[arg(long)]
    max_bandwidth: Option<Rate>,
    /// How events are printed.
    #[arg(long, value_enum, default_value = "text")]
    events: Format,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let bytes = args.size.bytes();
    let transport = transport_of(args.transport)?;

    eprintln!(
        "preparing a {} guest of mixed content and its destination...",
        Bytes(bytes)
    );
    let memory = Arc::new(GuestMemory::anonymous(bytes).context("cannot map the guest")?);
    image::fill(&memory, ImageKind::Mixed, 7)?;
    let incoming = Arc::new(GuestMemory::anonymous_like(&memory.layout())?);
    incoming
        .prefault()
        .context("cannot prefault the destination")?;

    // Dirty tracking: userfaultfd where the kernel allows it, else the vCPU's own bitmap.
    let (mut guest, mut source, why) =
        Workload::start_tracked(&memory, Some(args.dirty_rate), ImageKind::Mixed, 1);
    if let Some(why) = why {
        eprintln!("userfaultfd unavailable ({why}); the guest marks a dirty bitmap instead");
    }

    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().map_err(anyhow::Error::msg)?)?;
    let at = listener.endpoint().clone();
    let destination = Events::new(Side::Destination, Options::new(), args.events, true);
    let source_events = Events::new(Side::Source, Options::new(), args.events, true);
    destination.step(Trigger::Migrate);
    let receive_options = ReceiveOptions {
        transport: Arc::clone(&transport),
        ..ReceiveOptions::default()
    };
    let (dst, sink) = (Arc::clone(&incoming), destination.sink());
    let receiver = thread::spawn(move || receive(&listener, dst, &receive_options, sink));

    source_events.step(Trigger::Migrate);
    let cancel = CancelHandle::new();
    let handle = LiveHandle::new(cancel.clone());
    let send_options = SendOptions {
        channels: args.channels,
        compression: args.compress,
        transport: Arc::clone(&transport),
        max_bandwidth: args.max_bandwidth.map(|Rate(r)| r),
        cancel,
        ..SendOptions::default()
    };
    let live_options = LiveOptions {
        downtime_limit: args.downtime_limit,
        ..LiveOptions::default()
    };
    let started = Instant::now();
    let sender = Sender::connect(
        Arc::clone(&memory),
        &at,
        &send_options,
        source_events.sink(),
    )?;
    let watcher = Watcher::start(
        Some(handle.clone()),
        source_events.clone(),
        sender.counters(),
        args.channels,
    );
    let report = migrate_live(sender, source.as_mut(), &mut guest, &live_options, &handle);
    let total = started.elapsed();
    watcher.stop();
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
    let report = report.context("the migration failed")?;
    received.context("the receiver failed")?;

    let stats = report.summary.stats;
    let identical = memory.first_difference(&incoming)?.is_none();
    println!();
    println!(
        "transport:   {}, {} channels, {} tracking",
        transport.name(),
        args.channels,
        source.name()
    );
    println!("rounds:      {} ({:?})", report.rounds, report.reason);
    println!("total time:  {total:.2?}");
    println!(
        "downtime:    {:.1?} measured (pause to confirmation), {:.1?} expected",
        report.downtime, report.expected_downtime
    );
    println!(
        "guest RAM:   {} at {:.2} GB/s",
        Bytes(bytes),
        bytes as f64 / total.as_secs_f64() / 1e9
    );
    println!(
        "on the wire: {} ({} while paused)",
        Bytes(stats.wire_bytes),
        Bytes(report.downtime_bytes)
    );
    println!(
        "pages:       {} zero, {} raw, {} lz4",
        stats.pages_zero, stats.pages_raw, stats.pages_lz4
    );
    if !identical {
        bail!("verification failed: the destination differs from the paused source");
    }
    println!("verified: destination identical");
    Ok(())
}

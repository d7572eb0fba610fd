//! `ramjet send`: the source, like QEMU's `migrate`. Sending an image is a migration of a
//! paused guest; with `--live-dirty-rate` a vCPU thread keeps writing it while it moves.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ramjet_control::{Options, Side, Trigger};
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::memory::{GuestAddr, GuestMemory, PAGE_SIZE, Region};
use ramjet_dataplane::testkit::Workload;
use ramjet_dataplane::testkit::image::ImageKind;
use ramjet_dataplane::{
    Error, LiveHandle, LiveOptions, Negotiated, PostcopyStats, PreSwitchover, SendOptions, Sender,
    migrate_live,
};

use crate::cli::{GuestSize, MigrationArgs, Target, parse_target, tls_client};
use crate::events::Events;
use crate::postcopy::{self, Recoverer};
use crate::progress::Watcher;
use crate::signals;
use crate::units::Bytes;

/// Migrate a guest image to a receiver.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The receiver: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_parser = parse_target)]
    to: Target,
    /// The guest image (its size is the guest's RAM). It is mapped private as the guest's
    /// memory: never written (it may be read-only), and it must not be truncated or changed
    /// while ramjet send runs.
    #[arg(long)]
    image: PathBuf,
    #[command(flatten)]
    migration: MigrationArgs,
    /// Wait in pre-switchover, guest paused, until stdin gets a line (`continue`).
    #[arg(long)]
    pause_before_switchover: bool,
    /// Migrate live: a vCPU thread dirties this many pages a second meanwhile.
    #[arg(long)]
    live_dirty_rate: Option<u64>,
    /// Print a query-migrate JSON object at the end.
    #[arg(long)]
    query: bool,
    /// TLS 1.3 with mutual authentication on every channel, with the credentials in this
    /// directory, in QEMU's tls-creds-x509 layout: ca-cert.pem (the CA that signed the
    /// receiver's certificate), client-cert.pem and client-key.pem (this sender's). A directory
    /// holding all five files, as libvirt keeps them for QEMU, works as it is.
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// The name (DNS name or IP address) the receiver's certificate must be for, QEMU's
    /// tls-hostname: by default the host of --to; needed with a unix: socket.
    #[arg(long, value_name = "NAME")]
    tls_hostname: Option<String>,
}

/// What the flags ask of the library and of the source's control machine.
#[derive(Debug)]
struct Config {
    send: SendOptions,
    live: LiveOptions,
    control: Options,
}

impl TryFrom<&Args> for Config {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<Self> {
        let (mut send, mut live) = <(SendOptions, LiveOptions)>::try_from(&args.migration)?;
        send.tls = tls_client(
            args.tls_creds.as_deref(),
            args.tls_hostname.as_deref(),
            Some(&args.to),
        )?;
        live.pause_before_switchover = args.pause_before_switchover;
        let control = Options::new()
            .pause_before_switchover(args.pause_before_switchover)
            .postcopy_ram(send.postcopy);
        Ok(Config {
            send,
            live,
            control,
        })
    }
}

/// Maps the image private as the guest's RAM, as QEMU's `memory-backend-file` with
/// `share=off` does: migrating starts at once (pages are read as they are first sent), and the
/// guest's writes (`--live-dirty-rate`) stay in this process, never in the file.
fn load(path: &PathBuf) -> anyhow::Result<Arc<GuestMemory>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    if GuestSize::new(len).is_none() {
        bail!(
            "{} is {len} bytes; an image is a positive whole number of {PAGE_SIZE}-byte pages",
            path.display()
        );
    }
    // SAFETY: the image is the guest the user asks this process to migrate; `--image` says it
    // must not be truncated or written while `ramjet send` runs (as QEMU asks of a
    // memory-backend-file), and nothing in this process writes it (the mapping is private).
    let region = unsafe { Region::from_file_private(0, GuestAddr(0), &file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    Ok(Arc::new(GuestMemory::new(vec![region])?))
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let config = Config::try_from(args)?;
    let events = Events::new(Side::Source, config.control, args.migration.events, false);
    events.step(Trigger::Migrate);
    if config.send.postcopy {
        // As management software says migrate-start-postcopy: the switch happens when the
        // chosen moment comes.
        events.step(Trigger::StartPostcopy);
    }
    let cancel = config.send.cancel.clone();
    let user = events.clone();
    // Ctrl-C cancels from the start.
    signals::cancel_on_interrupt(cancel.clone(), move || user.step(Trigger::Cancel))?;
    let memory = load(&args.image)?;
    let started = Instant::now();
    let outcome = Sender::connect(
        Arc::clone(&memory),
        &args.to.endpoint,
        &config.send,
        events.sink(),
    )
    .and_then(|sender| {
        let handle = sender.live_handle();
        let live_handle = args.live_dirty_rate.map(|_| handle.clone());
        let counters = sender.counters();
        let channels = config.send.channels;
        let watcher = Watcher::start(live_handle, events.clone(), counters, channels);
        let recoverer = config
            .send
            .postcopy
            .then(|| Recoverer::start(handle.clone(), events.clone(), args.migration.recover_wait));
        let outcome = match args.live_dirty_rate {
            Some(rate) => live(sender, &memory, rate, &config.live, &events, &handle),
            None if config.send.postcopy => paused_postcopy(sender, &memory, &events),
            None => paused(sender, &memory, args, &events),
        };
        if let Some(recoverer) = recoverer {
            recoverer.stop();
        }
        watcher.stop();
        outcome
    });
    if args.query {
        println!("{}", serde_json::to_string(&events.query())?);
    }
    match outcome {
        Ok(Sent {
            rounds,
            wire,
            downtime,
            acknowledged,
            tls,
            postcopy,
        }) => {
            eprintln!(
                "ramjet: migrated {} in {:.2?} ({rounds} rounds, {} on the wire, downtime {downtime:.1?})",
                Bytes(memory.total_bytes()),
                started.elapsed(),
                Bytes(wire)
            );
            if let Some(stats) = postcopy {
                eprintln!("ramjet: postcopy: {}", postcopy::stats_line(&stats));
                eprintln!(
                    "ramjet: postcopy faults on the destination: {}",
                    postcopy::latency_line(&stats.latency)
                );
            }
            if let Some(tls) = tls {
                eprintln!("ramjet: every channel was encrypted: {tls}");
            }
            if !acknowledged {
                eprintln!(
                    "ramjet: handed over, but the destination never acknowledged it: it may be \
                     in doubt (then tell it that the source handed over), or its process died \
                     after it said it holds everything (then the image here is the only copy). \
                     The guest must not resume here unless the destination is known to be gone"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if e.is_cancelled() {
                eprintln!("ramjet: the migration was cancelled");
            } else {
                eprintln!("ramjet: the migration failed: {}", e.chain());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What a handed-over migration did.
struct Sent {
    rounds: u32,
    wire: u64,
    downtime: Duration,
    /// Whether the destination acknowledged the go.
    acknowledged: bool,
    /// What TLS settled, if it was on.
    tls: Option<Negotiated>,
    /// What postcopy did, if the migration switched to it.
    postcopy: Option<PostcopyStats>,
}

/// The user's `continue` for pause-before-switchover: a line on stdin.
fn wait_for_continue(events: &Events) {
    eprintln!("ramjet: paused before switchover; press Enter to continue");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    events.step(Trigger::Continue);
}

/// A paused guest: switchover first, then every page in place from the frozen memory.
fn paused(
    sender: Sender,
    memory: &Arc<GuestMemory>,
    args: &Args,
    events: &Events,
) -> Result<Sent, Error> {
    let started = Instant::now();
    let pre_switchover = if args.pause_before_switchover {
        continue_when_told(&sender.live_handle(), events);
        PreSwitchover::Wait
    } else {
        PreSwitchover::Skip
    };
    let summary = sender.migrate_paused(&[], pre_switchover)?;
    let stats = summary
        .stats
        .ram_stats(memory.total_bytes(), summary.elapsed);
    events.with(|m| m.set_ram_stats(stats));
    Ok(Sent {
        rounds: summary.rounds,
        wire: summary.stats.wire_bytes,
        downtime: started.elapsed(),
        acknowledged: summary.acknowledged,
        tls: summary.tls,
        postcopy: None,
    })
}

/// A paused guest in postcopy from the start: the destination runs it at once and fetches
/// every page (nothing is sent before the switch).
fn paused_postcopy(
    mut sender: Sender,
    memory: &Arc<GuestMemory>,
    events: &Events,
) -> Result<Sent, Error> {
    let started = Instant::now();
    sender.switchover()?;
    let postcopy = sender.postcopy(&DirtySet::all(memory), &[])?;
    let summary = postcopy.run()?;
    let mut stats = summary
        .stats
        .ram_stats(memory.total_bytes(), summary.elapsed);
    if let Some(postcopy) = summary.postcopy {
        stats.postcopy_requests = postcopy.requests;
        stats.postcopy_bytes = postcopy.bytes;
    }
    events.with(|m| m.set_ram_stats(stats));
    Ok(Sent {
        rounds: summary.rounds,
        wire: summary.stats.wire_bytes,
        downtime: summary.confirmed.saturating_duration_since(started),
        acknowledged: summary.acknowledged,
        tls: summary.tls,
        postcopy: summary.postcopy,
    })
}

/// Once the migration waits in `pre-switchover` (its guest paused), asks the user to
/// `continue`, then lets it go on: from a thread of its own, since the migration blocks.
fn continue_when_told(handle: &LiveHandle, events: &Events) {
    let (handle, events) = (handle.clone(), events.clone());
    std::thread::spawn(move || {
        while !handle.progress().paused {
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_for_continue(&events);
        handle.proceed();
    });
}

/// A running guest: a vCPU dirtying `rate` pages a second, tracked by userfaultfd (or its own
/// bitmap where that is unavailable), migrated with the live loop.
fn live(
    sender: Sender,
    memory: &Arc<GuestMemory>,
    rate: u64,
    options: &LiveOptions,
    events: &Events,
    handle: &LiveHandle,
) -> Result<Sent, Error> {
    let (mut guest, mut source, _) =
        Workload::start_tracked(memory, Some(rate), ImageKind::Mixed, 1);
    if options.pause_before_switchover {
        continue_when_told(handle, events);
    }
    let report = migrate_live(sender, source.as_mut(), &mut guest, options);
    if let Some(stats) = handle.ram_stats() {
        events.with(|m| {
            m.set_ram_stats(stats);
            m.set_expected_downtime(handle.progress().expected_downtime);
        });
    }
    let report = report?;
    Ok(Sent {
        rounds: report.rounds,
        wire: report.summary.stats.wire_bytes,
        downtime: report.downtime,
        acknowledged: report.summary.acknowledged,
        postcopy: report.summary.postcopy,
        tls: report.summary.tls,
    })
}

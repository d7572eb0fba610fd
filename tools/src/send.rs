//! `ramjet send`: the source, like QEMU's `migrate`. Sending an image is a migration of a
//! paused guest; with `--live-dirty-rate` a vCPU thread keeps writing it while it moves.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ramjet_control::{Options, Side, Trigger};
use ramjet_dataplane::dirty::{DirtySet, DirtySource};
use ramjet_dataplane::memory::{GuestAddr, GuestMemory, PAGE_SIZE, Region};
use ramjet_dataplane::testkit::Workload;
use ramjet_dataplane::testkit::image::ImageKind;
use ramjet_dataplane::transport::Endpoint;
use ramjet_dataplane::{
    Counters, Error, FactSink, LiveHandle, LiveOptions, MemoryTransfer, Negotiated, PostcopyStats,
    PreSwitchover, SendOptions, Sender, migrate_live,
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
    #[arg(long, value_parser = parse_target, required_unless_present = "qmp")]
    pub(crate) to: Option<Target>,
    /// Serve QMP on this socket (unix:PATH, or tcp:HOST:PORT; tcp::PORT listens on
    /// 127.0.0.1) and wait for management's commands, as QEMU does: `migrate` starts a
    /// migration (--to is then not needed), and the flags here are the initial capabilities
    /// and parameters. The process stays until `quit`.
    #[arg(long, value_name = "ADDRESS")]
    pub(crate) qmp: Option<crate::qmp::Address>,
    /// The guest image (its size is the guest's RAM). It is mapped private as the guest's
    /// memory: never written (it may be read-only), and it must not be truncated or changed
    /// while ramjet send runs.
    #[arg(long)]
    pub(crate) image: PathBuf,
    /// Map the image shared, as QEMU's memory-backend-file with share=on: the guest's writes
    /// (--live-dirty-rate) go to the file, and a migration to a receiver on this host hands
    /// the file over (--same-host) instead of copying its pages.
    #[arg(long)]
    pub(crate) share: bool,
    #[command(flatten)]
    pub(crate) migration: MigrationArgs,
    /// Wait in pre-switchover, guest paused, until stdin gets a line (`continue`).
    #[arg(long)]
    pub(crate) pause_before_switchover: bool,
    /// Migrate live: a vCPU thread dirties this many pages a second meanwhile.
    #[arg(long)]
    pub(crate) live_dirty_rate: Option<u64>,
    /// Print a query-migrate JSON object at the end.
    #[arg(long)]
    pub(crate) query: bool,
    /// TLS 1.3 with mutual authentication on every channel, with the credentials in this
    /// directory, in QEMU's tls-creds-x509 layout: ca-cert.pem (the CA that signed the
    /// receiver's certificate), client-cert.pem and client-key.pem (this sender's). A directory
    /// holding all five files, as libvirt keeps them for QEMU, works as it is.
    #[arg(long, value_name = "DIR")]
    pub(crate) tls_creds: Option<PathBuf>,
    /// The name (DNS name or IP address) the receiver's certificate must be for, QEMU's
    /// tls-hostname: by default the host of --to; needed with a unix: socket.
    #[arg(long, value_name = "NAME")]
    pub(crate) tls_hostname: Option<String>,
}

/// What the flags (or a QMP monitor's settings) ask of the library and of the source's
/// control machine.
#[derive(Debug)]
pub(crate) struct Config {
    pub send: SendOptions,
    pub live: LiveOptions,
    pub control: Options,
}

impl TryFrom<&Args> for Config {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<Self> {
        let (mut send, mut live) = <(SendOptions, LiveOptions)>::try_from(&args.migration)?;
        send.tls = tls_client(
            args.tls_creds.as_deref(),
            args.tls_hostname.as_deref(),
            args.to.as_ref(),
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

/// Maps the image as the guest's RAM, as QEMU's `memory-backend-file` does: migrating starts
/// at once (pages are read as they are first sent). Private (`share=off`): the guest's writes
/// (`--live-dirty-rate`) stay in this process, never in the file. Shared (`share`): they go to
/// the file, and a same-host migration can hand the file over.
pub(crate) fn load(path: &PathBuf, share: bool) -> anyhow::Result<Arc<GuestMemory>> {
    let file = File::options()
        .read(true)
        .write(share)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    if GuestSize::new(len).is_none() {
        bail!(
            "{} is {len} bytes; an image is a positive whole number of {PAGE_SIZE}-byte pages",
            path.display()
        );
    }
    let region = if share {
        // SAFETY: the image is the guest the user asks this process to migrate and to write;
        // `--image` says it must not be truncated or changed by others while `ramjet send`
        // runs (as QEMU asks of a memory-backend-file).
        unsafe { Region::from_file(0, GuestAddr(0), &file) }
    } else {
        // SAFETY: as above; and nothing in this process writes the file (the mapping is
        // private).
        unsafe { Region::from_file_private(0, GuestAddr(0), &file) }
    };
    let region = region.with_context(|| format!("cannot map {}", path.display()))?;
    Ok(Arc::new(GuestMemory::new(vec![region])?))
}

/// The guest's vCPU, while it runs: the toy workload writing pages, and the dirty tracking
/// that follows it.
pub(crate) struct Vcpu {
    pub guest: Workload,
    pub tracker: Box<dyn DirtySource>,
}

impl Vcpu {
    /// Starts a vCPU dirtying `rate` pages a second, tracked by userfaultfd (or its own bitmap
    /// where that is unavailable).
    pub fn start(memory: &Arc<GuestMemory>, rate: u64) -> Vcpu {
        let (guest, tracker, _) = Workload::start_tracked(memory, Some(rate), ImageKind::Mixed, 1);
        Vcpu { guest, tracker }
    }
}

/// One migration of a guest.
pub(crate) struct Job<'a> {
    pub memory: &'a Arc<GuestMemory>,
    pub to: &'a Endpoint,
    pub config: &'a Config,
    pub events: &'a Events,
    /// Where the data plane's facts go (the machine of `events`, perhaps through a filter).
    pub sink: Arc<dyn FactSink>,
    /// The guest's running vCPU, migrated live; `None`: the guest is paused.
    pub vcpu: Option<&'a mut Vcpu>,
    /// The command line's way: `continue` for pre-switchover is a line on stdin, and a
    /// paused postcopy reconnects by itself. Under QMP, management's commands do both.
    pub interactive: bool,
    /// A paused guest goes to postcopy at once (the destination runs it and fetches every
    /// page).
    pub postcopy_at_once: bool,
    /// Told the session's handle and counters once connected.
    pub connected: &'a dyn Fn(&LiveHandle, &Arc<Counters>),
}

/// Runs `job`: connects, migrates, and sets the source machine's final figures.
pub(crate) fn migrate(job: Job<'_>) -> Result<Sent, Error> {
    let config = job.config;
    let sender = Sender::connect(Arc::clone(job.memory), job.to, &config.send, job.sink)?;
    let handle = sender.live_handle();
    let counters = sender.counters();
    (job.connected)(&handle, &counters);
    let watcher = Watcher::start(
        job.vcpu.is_some().then(|| handle.clone()),
        job.events.clone(),
        counters,
        config.send.channels,
    );
    let recoverer = (job.interactive && config.send.postcopy).then(|| {
        let give_up = config.send.recover_wait.unwrap_or(Duration::MAX);
        Recoverer::start(handle.clone(), job.events.clone(), give_up)
    });
    let outcome = match job.vcpu {
        Some(vcpu) => live(sender, vcpu, job.interactive, config, job.events, &handle),
        None if job.postcopy_at_once => paused_postcopy(sender, job.memory, job.events),
        None => paused(sender, job.memory, job.interactive, config, job.events),
    };
    if let Some(recoverer) = recoverer {
        recoverer.stop();
    }
    watcher.stop();
    outcome
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(address) = &args.qmp {
        return crate::qmp::source::run(args, address);
    }
    let Some(target) = &args.to else {
        bail!("--to is needed unless --qmp is given");
    };
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
    let memory = load(&args.image, args.share)?;
    let started = Instant::now();
    let mut vcpu = args.live_dirty_rate.map(|rate| Vcpu::start(&memory, rate));
    let outcome = migrate(Job {
        memory: &memory,
        to: &target.endpoint,
        config: &config,
        events: &events,
        sink: events.sink(),
        vcpu: vcpu.as_mut(),
        interactive: true,
        postcopy_at_once: config.send.postcopy,
        connected: &|_, _| {},
    });
    if args.query {
        println!("{}", serde_json::to_string(&events.query())?);
    }
    Ok(report(outcome, &memory, started))
}

/// Says on stderr how a migration ended: its figures, or why it failed.
pub(crate) fn report(
    outcome: Result<Sent, Error>,
    memory: &GuestMemory,
    started: Instant,
) -> ExitCode {
    match outcome {
        Ok(Sent {
            rounds,
            wire,
            downtime,
            acknowledged,
            tls,
            postcopy,
            shared,
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
            if shared {
                eprintln!(
                    "ramjet: the guest's memory was handed over by file descriptor (same host): \
                     no page was copied, and this process no longer maps it"
                );
            }
            if !acknowledged {
                eprintln!(
                    "ramjet: handed over, but the destination never acknowledged it: it may be \
                     in doubt (then tell it that the source handed over), or its process died \
                     after it said it holds everything (then the image here is the only copy). \
                     The guest must not resume here unless the destination is known to be gone"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if e.is_cancelled() {
                eprintln!("ramjet: the migration was cancelled");
            } else {
                eprintln!("ramjet: the migration failed: {}", e.chain());
            }
            ExitCode::FAILURE
        }
    }
}

/// What a handed-over migration did.
pub(crate) struct Sent {
    rounds: u32,
    wire: u64,
    downtime: Duration,
    /// Whether the destination acknowledged the go.
    acknowledged: bool,
    /// What TLS settled, if it was on.
    tls: Option<Negotiated>,
    /// What postcopy did, if the migration switched to it.
    postcopy: Option<PostcopyStats>,
    /// Whether the memory was handed over by descriptor.
    shared: bool,
}

/// The user's `continue` for pause-before-switchover: a line on stdin.
fn wait_for_continue(events: &Events) {
    crate::console::err("ramjet: paused before switchover; press Enter to continue");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    events.step(Trigger::Continue);
}

/// A paused guest: switchover first, then every page in place from the frozen memory.
fn paused(
    sender: Sender,
    memory: &Arc<GuestMemory>,
    interactive: bool,
    config: &Config,
    events: &Events,
) -> Result<Sent, Error> {
    let started = Instant::now();
    let pre_switchover = if config.live.pause_before_switchover {
        if interactive {
            continue_when_told(&sender.live_handle(), events);
        }
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
        shared: summary.memory == MemoryTransfer::Shared,
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
        shared: false,
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

/// A running guest, migrated with the live loop.
fn live(
    sender: Sender,
    vcpu: &mut Vcpu,
    interactive: bool,
    config: &Config,
    events: &Events,
    handle: &LiveHandle,
) -> Result<Sent, Error> {
    let options = &config.live;
    if options.pause_before_switchover && interactive {
        continue_when_told(handle, events);
    }
    let report = migrate_live(sender, vcpu.tracker.as_mut(), &mut vcpu.guest, options);
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
        shared: report.summary.memory == MemoryTransfer::Shared,
    })
}

//! `ramjet demo`: the main job on built-in defaults. A guest of mixed content whose vCPU keeps
//! dirtying pages migrates live over loopback to a receiver in the same process, with progress,
//! both sides' events, and a summary that checks the destination. The guest is a thread of
//! this process, or with `--guest kvm` a KVM virtual machine (`crate::kvm`).

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ramjet_control::{Options, Side, Trigger};
use ramjet_dataplane::dirty::DirtyBitmap;
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::testkit::Workload;
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::testkit::pki::{self, Scratch};
use ramjet_dataplane::transport::Listener;
use ramjet_dataplane::{
    DirtySource, Error, Guest, LiveOptions, LiveReport, MemoryTransfer, PostcopyRun,
    ReceiveOptions, Received, SameHost, SendOptions, Sender, TlsClient, TlsServer, migrate_live,
    receive,
};

use crate::cli::{GuestSize, MigrationArgs};
use crate::console;
use crate::events::{Events, Format};
use crate::postcopy::{self, Recoverer};
use crate::progress::Watcher;
use crate::units::Bytes;

/// Migrate a running guest over loopback and show how it goes.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    size: GuestSize,
    #[command(flatten)]
    migration: MigrationArgs,
    /// Pages the guest dirties per second.
    #[arg(long, default_value_t = 20_000)]
    dirty_rate: u64,
    /// The guest: `thread` (a thread of this process writes the guest's memory), or `kvm` (a
    /// real KVM virtual machine, run by ramjet's minimal VMM, with KVM's dirty log; it needs
    /// /dev/kvm).
    #[arg(long, default_value = "thread")]
    guest: GuestKind,
    /// With `--guest kvm`, how KVM's dirty log is read: `clear` (KVM_GET_DIRTY_LOG without
    /// write protection, then KVM_CLEAR_DIRTY_LOG of exactly the pages read, as QEMU does;
    /// `get` where the kernel lacks it) or `get` (KVM_GET_DIRTY_LOG alone, as Cloud Hypervisor
    /// and Firecracker do).
    #[arg(long, default_value = "clear")]
    kvm_log: KvmLog,
    /// Encrypt and authenticate every channel with TLS 1.3, with a throwaway CA and
    /// certificates for both ends (in QEMU's tls-creds-x509 layout, in a temporary directory
    /// removed at the end).
    #[arg(long)]
    tls: bool,
}

/// Which guest the demo migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// A thread of this process writes the guest's memory.
    Thread,
    /// A KVM virtual machine.
    Kvm,
}

/// How the KVM guest's dirty log is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvmLog {
    /// Get, then clear what was read.
    Clear,
    /// Get (and write-protect) in one call.
    Get,
}

/// What the flags ask of the library, for both ends of the loopback.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) send: SendOptions,
    pub(crate) live: LiveOptions,
    pub(crate) receive: ReceiveOptions,
    /// Both control machines' options (postcopy-ram with --postcopy).
    control: Options,
    /// How both sides' events are printed.
    events: Format,
    /// The throwaway credentials of `--tls`, kept while the demo runs.
    _creds: Option<Scratch>,
}

impl TryFrom<&Args> for Config {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<Self> {
        let (mut send, live) = <(SendOptions, LiveOptions)>::try_from(&args.migration)?;
        // Both ends move bytes the same way.
        let mut receive = ReceiveOptions {
            transport: Arc::clone(&send.transport),
            recover_wait: send.recover_wait,
            same_host: send.same_host,
            ..ReceiveOptions::default()
        };
        let creds = if args.tls {
            let dir = Scratch::new("ramjet-demo-creds").context("cannot make a directory")?;
            pki::credentials(dir.path()).context("cannot make throwaway credentials")?;
            send.tls = Some(TlsClient::from_dir(dir.path())?);
            receive.tls =
                Some(TlsServer::from_dir(dir.path())?.allow_subjects([pki::SENDER_SUBJECT])?);
            Some(dir)
        } else {
            None
        };
        let control = Options::new().postcopy_ram(send.postcopy);
        Ok(Config {
            send,
            live,
            receive,
            control,
            events: args.migration.events,
            _creds: creds,
        })
    }
}

/// The guest and the destination's memory: a mixed-content source, a prefaulted copy target.
/// On a terminal, a line on stderr shows how far it got, and goes once it is done. For a
/// same-host handover the guest is a memfd, and the destination's memory is only reserved
/// (the source's takes its place).
fn prepare(bytes: u64, same_host: bool) -> anyhow::Result<(Arc<GuestMemory>, Arc<GuestMemory>)> {
    eprintln!(
        "preparing a {} guest of mixed content and its destination...",
        Bytes(bytes)
    );
    let shown = Preparing::new(bytes);
    let memory = if same_host {
        GuestMemory::memfd(bytes)
    } else {
        GuestMemory::anonymous(bytes)
    };
    let memory = Arc::new(memory.context("cannot map the guest")?);
    fill(&memory, &shown)?;
    if same_host {
        let incoming = GuestMemory::anonymous_like(&memory.layout())?;
        return Ok((memory, Arc::new(incoming)));
    }
    shown.step("faulting in the destination's memory");
    let incoming = Arc::new(GuestMemory::anonymous_like(&memory.layout())?);
    incoming
        .prefault()
        .context("cannot prefault the destination")?;
    Ok((memory, incoming))
}

/// The seed of the guest's mixed content.
const SEED: u64 = 7;

/// Pages filled between two advances of the preparing line (1 MiB): advancing it for each page
/// would cost more than the page.
const BATCH: u64 = 256;

/// Writes the guest's mixed content over `memory`: the bytes [`image::fill`] writes with
/// [`SEED`], page by page in the same order, advancing `shown` as it goes.
pub(crate) fn fill(memory: &GuestMemory, shown: &Preparing) -> anyhow::Result<()> {
    let mut rng = image::Rng::new(SEED);
    let mut page = vec![0u8; PAGE_SIZE];
    for (region, r) in memory.regions().iter().enumerate() {
        let pages = r.layout().pages();
        for index in 0..pages {
            image::fill_page(ImageKind::Mixed, &mut rng, &mut page);
            memory.write(region, index * PAGE_SIZE as u64, &page)?;
            if (index + 1) % BATCH == 0 || index + 1 == pages {
                shown.advance(((index % BATCH) + 1) * PAGE_SIZE as u64);
            }
        }
    }
    Ok(())
}

/// On a terminal, the line on stderr while a guest is prepared: a bar of the guest filled,
/// then what is being done after that, with a spinner that turns while it takes. Cleared when
/// dropped, whether preparing succeeded or not; nothing is shown when stderr is not a terminal.
pub(crate) struct Preparing(ProgressBar);

impl Preparing {
    /// The line for a guest of `bytes`, filling it first.
    pub(crate) fn new(bytes: u64) -> Self {
        // Set up before it joins the process's bars, so that nothing is drawn before.
        let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::hidden())
            .with_style(
                ProgressStyle::with_template(
                    "{prefix:>9} [{bar:32}] {percent:>3}%  {spinner} {msg} ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            )
            .with_prefix("preparing")
            .with_message("filling the guest");
        let bars = console::bars();
        let bar = bars.add(bar);
        if !bars.is_hidden() {
            // Redraws (the spinner turns) while a step shows no other progress.
            bar.enable_steady_tick(Duration::from_millis(100));
        }
        Preparing(bar)
    }

    /// `bytes` more of the guest were filled.
    pub(crate) fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    /// The guest is filled; `what` comes next.
    pub(crate) fn step(&self, what: &'static str) {
        self.0.set_position(self.0.length().unwrap_or_default());
        self.0.set_message(what);
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        self.0.disable_steady_tick();
        self.0.finish_and_clear();
        console::bars().remove(&self.0);
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let config = Config::try_from(args)?;
    if args.guest == GuestKind::Kvm {
        let mode = match args.kvm_log {
            KvmLog::Clear => ramjet_vmm::LogMode::ManualClear,
            KvmLog::Get => ramjet_vmm::LogMode::GetOnly,
        };
        return crate::kvm::run(args.size.bytes(), args.dirty_rate, mode, config);
    }
    let bytes = args.size.bytes();
    let same_host = config.send.same_host == SameHost::On;
    let (memory, incoming) = prepare(bytes, same_host)?;
    let mut config = config;
    // With postcopy, the guest runs on the destination from the switch on, writing as it did
    // on the source; its writes are logged, so that the check knows which pages are its own.
    let destination_guest = DestinationGuest::default();
    if config.send.postcopy {
        config.receive.postcopy = Some(destination_guest.starter(&incoming, args.dirty_rate));
    }

    // Dirty tracking: userfaultfd where the kernel allows it, else the vCPU's own bitmap.
    let (mut guest, mut source, why) =
        Workload::start_tracked(&memory, Some(args.dirty_rate), ImageKind::Mixed, 1);
    if let Some(why) = why {
        eprintln!("userfaultfd unavailable ({why}); the guest marks a dirty bitmap instead");
    }
    let migrated = migrate(
        &config,
        &memory,
        &incoming,
        source.as_mut(),
        &mut guest,
        None,
    )?;
    let written = destination_guest.stop()?;
    if migrated.report.summary.memory == MemoryTransfer::Shared {
        migrated.print(&config.send, "no", bytes);
        return verify_shared(&memory, &incoming, guest.writes());
    }
    let difference = first_difference_outside(&memory, &incoming, written.as_deref())?;
    migrated.print(&config.send, source.name(), bytes);
    if let Some(page) = difference {
        bail!("verification failed: page {page} of the destination differs from the paused source");
    }
    match written {
        Some(log) => println!(
            "verified: destination identical to the source at the pause, but for the {} pages \
             its guest wrote since",
            log.iter().map(DirtyBitmap::count).sum::<u64>()
        ),
        None => println!("verified: destination identical"),
    }
    Ok(())
}

/// Checks a same-host handover: the destination maps the source's very memory (the same memfd)
/// and the source refuses to touch it; the guest's writes up to the pause are there.
fn verify_shared(memory: &GuestMemory, incoming: &GuestMemory, writes: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let inode = |memory: &GuestMemory| -> anyhow::Result<(u64, u64)> {
        let fd = memory.regions()[0]
            .try_clone_fd()?
            .context("a region without its memfd")?;
        let meta = std::fs::File::from(fd).metadata()?;
        Ok((meta.dev(), meta.ino()))
    };
    let (source, destination) = (inode(memory)?, inode(incoming)?);
    if source != destination {
        bail!("verification failed: the destination maps other memory than the source's");
    }
    let mut page = vec![0u8; PAGE_SIZE];
    let refused = matches!(
        memory.read(0, 0, &mut page),
        Err(ramjet_dataplane::MemoryError::HandedOver)
    );
    if !refused {
        bail!("verification failed: the source can still read the memory it handed over");
    }
    println!(
        "verified: the destination maps the source's memfd itself (inode {}), with the guest's \
         {writes} page writes up to the pause; the source refuses to touch it",
        destination.1
    );
    Ok(())
}

/// The thread guest that runs on the destination in postcopy: started by the receiver's hook,
/// stopped after the migration.
#[derive(Default, Clone)]
struct DestinationGuest(Arc<Mutex<Option<Running>>>);

/// The destination's guest and the log of the pages it wrote.
type Running = (Workload, Arc<[DirtyBitmap]>);

impl DestinationGuest {
    /// The receiver's postcopy hook: starts the guest on `memory`, writing `rate` pages a
    /// second, each marked in a log.
    fn starter(&self, memory: &Arc<GuestMemory>, rate: u64) -> PostcopyRun {
        let (slot, memory) = (Arc::clone(&self.0), Arc::clone(memory));
        PostcopyRun::new(move |_device_state| {
            let log: Arc<[DirtyBitmap]> = vec![DirtyBitmap::new(memory.total_pages())].into();
            let workload = Workload::start(
                &memory,
                Some(Arc::clone(&log)),
                Some(rate),
                ImageKind::Mixed,
                2,
            );
            *slot.lock().map_err(|_| "the guest's slot is poisoned")? = Some((workload, log));
            Ok(())
        })
    }

    /// Pauses the guest if it ran; the pages it wrote.
    fn stop(&self) -> anyhow::Result<Option<Arc<[DirtyBitmap]>>> {
        let taken = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("the guest's slot is poisoned"))?
            .take();
        let Some((mut workload, log)) = taken else {
            return Ok(None);
        };
        Guest::pause(&mut workload).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Some(log))
    }
}

/// The first page (region 0) where `a` and `b` differ, leaving out the pages set in `skip`.
fn first_difference_outside(
    a: &GuestMemory,
    b: &GuestMemory,
    skip: Option<&[DirtyBitmap]>,
) -> anyhow::Result<Option<u64>> {
    let Some(skip) = skip else {
        return Ok(a.first_difference(b)?.map(|(_, at)| at / PAGE_SIZE as u64));
    };
    let (mut x, mut y) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for page in 0..a.total_pages() {
        if skip.first().is_some_and(|log| log.is_set(page)) {
            continue;
        }
        a.read(0, page * PAGE_SIZE as u64, &mut x)?;
        b.read(0, page * PAGE_SIZE as u64, &mut y)?;
        if x != y {
            return Ok(Some(page));
        }
    }
    Ok(None)
}

/// A demo migration that completed: what both ends said.
pub(crate) struct Migrated {
    pub(crate) report: LiveReport,
    pub(crate) received: Received,
    total: Duration,
    at: ramjet_dataplane::Endpoint,
}

/// Migrates `memory` live over loopback into `incoming`, with `source` tracking the guest's
/// writes and `guest` pausing it: both sides' events and progress on the terminal. `arrived`
/// runs on the destination's thread once it holds the state.
pub(crate) fn migrate(
    config: &Config,
    memory: &Arc<GuestMemory>,
    incoming: &Arc<GuestMemory>,
    source: &mut dyn DirtySource,
    guest: &mut dyn Guest,
    arrived: Option<Arrived>,
) -> anyhow::Result<Migrated> {
    // A same-host handover needs a Unix socket (descriptors do not cross TCP).
    let scratch;
    let endpoint = if config.send.same_host == SameHost::On {
        scratch = Scratch::new("ramjet-demo-socket").context("cannot make a directory")?;
        ramjet_dataplane::Endpoint::Unix(scratch.path().join("migration.sock"))
    } else {
        "tcp:127.0.0.1:0".parse().map_err(anyhow::Error::msg)?
    };
    let listener = Listener::bind(&endpoint)?;
    let at = listener.endpoint().clone();
    let format = config.events;
    let destination = Events::new(Side::Destination, config.control, format, true);
    let source_events = Events::new(Side::Source, config.control, format, true);
    destination.step(Trigger::Migrate);
    let receiver = start_receiver(
        listener,
        incoming,
        config.receive.clone(),
        &destination,
        arrived,
    );

    source_events.step(Trigger::Migrate);
    if config.send.postcopy {
        source_events.step(Trigger::StartPostcopy);
    }
    let started = Instant::now();
    let sender = Sender::connect(Arc::clone(memory), &at, &config.send, source_events.sink())?;
    let handle = sender.live_handle();
    let channels = config.send.channels;
    let recoverer = config.send.postcopy.then(|| {
        Recoverer::start(
            handle.clone(),
            source_events.clone(),
            config.send.recover_wait.unwrap_or(Duration::from_secs(60)),
        )
    });
    let watcher = Watcher::start(
        Some(handle.clone()),
        source_events,
        sender.counters(),
        channels,
    );
    let report = migrate_live(sender, source, guest, &config.live);
    let total = started.elapsed();
    watcher.stop();
    if let Some(recoverer) = recoverer {
        recoverer.stop();
    }
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
    let report = report.context("the migration failed")?;
    let received = received.context("the receiver failed")?;
    Ok(Migrated {
        report,
        received,
        total,
        at,
    })
}

impl Migrated {
    /// The closing lines: the summary, and the encryption when TLS was on.
    pub(crate) fn print(&self, send: &SendOptions, tracking: &str, bytes: u64) {
        print_summary(send, tracking, &self.report, bytes, self.total);
        if let Some(stats) = &self.report.summary.postcopy {
            println!("postcopy:    {}", postcopy::stats_line(stats));
        }
        if let Some(stats) = &self.received.postcopy {
            println!("faults:      {}", postcopy::latency_line(&stats.latency));
        }
        if let (Some(sent), Some(got)) = (&self.report.summary.tls, &self.received.tls) {
            println!(
                "encryption:  every channel TLS 1.3 ({}, {} key exchange), mutually authenticated: \
                 the sender checked the receiver's certificate for {}, the receiver the sender's \
                 ({}); zero-copy off ({} bytes sent zero-copy)",
                sent.suite,
                sent.key_exchange,
                match &self.at {
                    ramjet_dataplane::Endpoint::Tcp(addr) => addr.ip().to_string(),
                    other => other.to_string(),
                },
                got.peer_subject.as_deref().unwrap_or("no subject"),
                self.report.summary.stats.zero_copy_bytes,
            );
        }
    }
}

/// The destination's thread: one receive into `incoming`, its facts stepping `destination`.
/// `arrived` runs on that thread as soon as the receive returned the state (the destination
/// VMM starting the guest, say).
fn start_receiver(
    listener: Listener,
    incoming: &Arc<GuestMemory>,
    options: ReceiveOptions,
    destination: &Events,
    arrived: Option<Arrived>,
) -> JoinHandle<Result<Received, Error>> {
    let (dst, sink) = (Arc::clone(incoming), destination.recovering_sink());
    thread::spawn(move || {
        let received = receive(&listener, dst, &options, sink);
        if let (Ok(received), Some(arrived)) = (&received, arrived) {
            arrived(received);
        }
        received
    })
}

/// What the destination does with a completed receive, on the receiver's thread.
pub(crate) type Arrived = Box<dyn FnOnce(&Received) + Send>;

/// What the migration did, as the closing lines show it.
fn print_summary(
    send: &SendOptions,
    tracking: &str,
    report: &LiveReport,
    bytes: u64,
    total: Duration,
) {
    let stats = report.summary.stats;
    println!();
    println!(
        "transport:   {}, {} channels, {tracking} tracking",
        send.transport.name(),
        send.channels,
    );
    println!("rounds:      {} ({:?})", report.rounds, report.reason);
    if report.summary.memory == MemoryTransfer::Shared {
        println!("memory:      handed over by file descriptor (same host): no page copied");
    }
    println!("total time:  {total:.2?}");
    if report.reason.is_postcopy() {
        println!(
            "downtime:    {:.1?} measured (pause to the destination running the guest, pages \
             still to come)",
            report.downtime
        );
    } else {
        println!(
            "downtime:    {:.1?} measured (pause to the go acknowledged), {:.1?} expected",
            report.downtime, report.expected_downtime
        );
    }
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
        "pages:       {} zero, {} raw, {} lz4, {} zstd",
        stats.pages_zero, stats.pages_raw, stats.pages_lz4, stats.pages_zstd
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_is_filled_with_the_image_of_its_seed_and_counted_whole() {
        // Two regions, neither a whole number of batches.
        let pages = [BATCH + 3, 2 * BATCH + 1];
        let mut at = 0;
        let regions = pages
            .iter()
            .zip(0u32..)
            .map(|(&n, id)| {
                let len = n * PAGE_SIZE as u64;
                let region =
                    ramjet_dataplane::Region::anonymous(id, ramjet_dataplane::GuestAddr(at), len);
                at += len;
                region
            })
            .collect::<Result<Vec<_>, _>>()
            .expect("map the regions");
        let filled = GuestMemory::new(regions).expect("guest memory");
        let expected = GuestMemory::anonymous_like(&filled.layout()).expect("guest memory");
        let shown = Preparing::new(filled.total_bytes());
        fill(&filled, &shown).expect("fill");
        assert_eq!(shown.0.position(), filled.total_bytes());
        image::fill(&expected, ImageKind::Mixed, SEED).expect("fill");
        assert_eq!(filled.first_difference(&expected).expect("compare"), None);
    }
}

//! `ramjet stress`: many migrations between in-process senders and receivers through a
//! fault-injecting [proxy], several at once, each checked against what ramjet promises (see
//! [`check::check`]).
//!
//! Every run is drawn from the seed and its number ([`plan::Plan`]: socket, paused or live
//! guest, channels, compression, image, fault and where it strikes), so a violation is
//! replayed by `--seed S --first R --runs 1`.
//!
//! With `--tls` every run migrates over TLS 1.3 on both ends, with credentials made once for
//! the pass ([`creds`]); what each fault means then is in [`plan`]'s docs.

mod check;
mod creds;
mod plan;
mod processes;
mod proxy;
mod run;
mod tally;

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use ramjet_dataplane::testkit::Resources;
use ramjet_dataplane::testkit::pki::Scratch;

use crate::cli::seconds;
use plan::{Fault, Mode, Net, Plan};
use tally::{Report, Tally};

/// Run many migrations with injected faults and check every outcome.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many runs (default 100, or as many as --duration allows).
    #[arg(long)]
    runs: Option<u64>,
    /// Start no run after this long (90s, 20m, 1h).
    #[arg(long, value_parser = seconds)]
    duration: Option<Duration>,
    /// The seed every run is drawn from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The first run's number (to replay one run: --first R --runs 1).
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Runs at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Sockets to use: tcp, unix, or both.
    #[arg(long, value_delimiter = ',', default_value = "tcp,unix")]
    transports: Vec<Net>,
    /// Guests: paused, live (a vCPU thread writing during the migration), postcopy (live,
    /// switching to postcopy after round 1, recovered when a fault pauses it), or a list.
    /// --processes runs paused and live guests only.
    #[arg(long, value_delimiter = ',', default_value = "paused,live,postcopy")]
    modes: Vec<Mode>,
    /// Faults to choose from [default: all of them; with --tls all but version].
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<Fault>>,
    /// Migrate over TLS 1.3 on both ends, with throwaway credentials made for the pass (and
    /// removed after it). The proxy then sees records, not frames: drop, stall, slow and short
    /// count ciphertext bytes, the handshake included; flip strikes a record past the sealed
    /// hello and must end in a TLS error; handover and late find their message's record by
    /// its place and length; stray adds two TLS peers the receiver must refuse (a certificate
    /// from another CA, a subject not on its allow-list), and every stray must be dropped;
    /// version, which rewrites plaintext hello bytes, is not available.
    #[arg(long)]
    tls: bool,
    /// Run `ramjet send` and `ramjet recv` as child processes, and kill one of them with
    /// SIGKILL at a point drawn for each run (--faults does not apply; nor does --tls yet).
    #[arg(long, conflicts_with = "tls")]
    processes: bool,
}

/// Every fault, in the order `--faults` lists them by default.
const FAULTS: [Fault; 12] = [
    Fault::None,
    Fault::Drop,
    Fault::Flip,
    Fault::Stall,
    Fault::Slow,
    Fault::Short,
    Fault::Refuse,
    Fault::Version,
    Fault::Cancel,
    Fault::Handover,
    Fault::Late,
    Fault::Stray,
];

/// Whether `fault` can strike a TLS channel; see [`plan`]'s docs.
fn under_tls(fault: Fault) -> bool {
    fault != Fault::Version
}

/// A run taking longer than this is a hang.
const BOUND: Duration = Duration::from_secs(30);

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.processes {
        // clap refuses --processes with --tls: the children's TLS flags are not there yet.
        return processes::run(args);
    }
    let faults: Vec<Fault> = match &args.faults {
        Some(faults) => faults.clone(),
        None => FAULTS
            .into_iter()
            .filter(|&f| !args.tls || under_tls(f))
            .collect(),
    };
    if args.tls
        && let Some(fault) = faults.iter().find(|&&f| !under_tls(f))
    {
        bail!(
            "--faults {}: it rewrites plaintext hello bytes, which --tls encrypts (a rewritten \
             record is a flip); leave it out with --tls",
            format!("{fault:?}").to_lowercase()
        );
    }
    if args.transports.is_empty() || faults.is_empty() || args.modes.is_empty() {
        bail!("--transports, --modes and --faults need at least one value each");
    }
    // Made once for the pass; the directory goes when this function returns, whichever way
    // (hung runs' threads keep the loaded credentials, not the files).
    let scratch = args
        .tls
        .then(|| Scratch::new("ramjet-stress-tls"))
        .transpose()
        .context("cannot make a directory for the TLS credentials")?;
    let creds = scratch
        .as_ref()
        .map(|dir| creds::Credentials::new(dir.path()))
        .transpose()
        .context("cannot make the TLS credentials")?;
    let runs = args.runs.unwrap_or(if args.duration.is_some() {
        u64::MAX
    } else {
        100
    });
    let before = Resources::now();
    let started = Instant::now();
    let queue = Arc::new(Queue {
        next: AtomicU64::new(args.first),
        end: args.first.saturating_add(runs),
        stop_at: args.duration.map(|d| started + d),
        running: Mutex::default(),
    });
    let draw = Arc::new(Draw::new(args, faults, creds));
    let panics = Panics::watch(&queue);
    let (done, reports) = mpsc::channel();
    let workers: Vec<thread::JoinHandle<()>> = (0..args.jobs)
        .map(|job| {
            let (queue, draw, done) = (Arc::clone(&queue), Arc::clone(&draw), done.clone());
            thread::Builder::new()
                .name(format!("stress-job-{job}"))
                .spawn(move || work(&queue, &draw, &done))
        })
        .collect::<Result<_, _>>()?;
    drop(done);
    let mut tally = Tally::default();
    if let Err(hung) = collect(&reports, &queue, &mut tally, started) {
        for run in hung {
            let plan = draw.plan(run);
            tally.violations.push(format!(
                "run {run} ({plan:?}): still running after {BOUND:?}: a hang"
            ));
        }
        // The hung run's threads cannot be stopped: report and leave.
        tally.violations.extend(panics.stop());
        tally.print(args.seed, args.tls, started.elapsed());
        return Ok(ExitCode::FAILURE);
    }
    for worker in workers {
        let _ = worker.join();
    }
    // Threads on their way out get up to 10 s to go.
    tally
        .violations
        .extend(before.leaks(Duration::from_secs(10)));
    tally.violations.extend(panics.stop());
    tally.print(args.seed, args.tls, started.elapsed());
    Ok(if tally.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What every run is drawn from: the seed and the choices the flags allow, and the TLS
/// credentials under `--tls`.
struct Draw {
    seed: u64,
    nets: Vec<Net>,
    modes: Vec<Mode>,
    faults: Vec<Fault>,
    creds: Option<creds::Credentials>,
}

impl Draw {
    fn new(args: &Args, faults: Vec<Fault>, creds: Option<creds::Credentials>) -> Draw {
        Draw {
            seed: args.seed,
            nets: args.transports.clone(),
            modes: args.modes.clone(),
            faults,
            creds,
        }
    }

    fn plan(&self, run: u64) -> Plan {
        Plan::new(
            self.seed,
            run,
            &self.nets,
            &self.modes,
            &self.faults,
            self.creds.is_some(),
        )
    }
}

/// The runs still to start, and those under way with when they started.
struct Queue {
    next: AtomicU64,
    /// The first run number not to start.
    end: u64,
    /// Start no run after this.
    stop_at: Option<Instant>,
    running: Mutex<BTreeMap<u64, Instant>>,
}

impl Queue {
    /// The next run to start, unless time or the runs are up.
    fn take(&self) -> Option<u64> {
        if self.stop_at.is_some_and(|t| Instant::now() >= t) {
            return None;
        }
        let run = self.next.fetch_add(1, Ordering::Relaxed);
        (run < self.end).then_some(run)
    }

    /// The runs under way for longer than [`BOUND`]: hangs.
    fn hung(&self) -> Vec<u64> {
        lock(&self.running)
            .iter()
            .filter(|(_, began)| began.elapsed() > BOUND)
            .map(|(run, _)| *run)
            .collect()
    }
}

/// A worker: runs from the queue, one at a time, each reported (a panic too) when it ends.
fn work(queue: &Queue, draw: &Draw, done: &mpsc::Sender<Report>) {
    while let Some(run) = queue.take() {
        let plan = draw.plan(run);
        let began = Instant::now();
        lock(&queue.running).insert(run, began);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            run::run_one(&plan, draw.creds.as_ref())
        }))
        .map_err(|_| ());
        lock(&queue.running).remove(&run);
        let took = began.elapsed();
        if done.send(Report { plan, result, took }).is_err() {
            break;
        }
    }
}

/// Adds the workers' reports to `tally` until the last worker is done, with a word on stderr
/// every minute; `Err` with the runs that hung, as soon as one does.
fn collect(
    reports: &mpsc::Receiver<Report>,
    queue: &Queue,
    tally: &mut Tally,
    started: Instant,
) -> Result<(), Vec<u64>> {
    let mut last_word = Instant::now();
    loop {
        match reports.recv_timeout(Duration::from_secs(1)) {
            Ok(report) => tally.add(report),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        let hung = queue.hung();
        if !hung.is_empty() {
            return Err(hung);
        }
        if last_word.elapsed() > Duration::from_secs(60) {
            last_word = Instant::now();
            eprintln!(
                "stress: {} runs in {:.0?}, {} violations so far",
                tally.runs,
                started.elapsed(),
                tally.violations.len()
            );
        }
    }
}

/// Every panic in this process during a pass, on any thread: a run's own (also counted as
/// that run's violation) and those of the library's threads (a receiver's door, a codec
/// worker), which no run would see but which ramjet promises never to have.
struct Panics {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Panics {
    /// Records each panic, with the runs under way as it struck, and lets the default hook
    /// print it as before.
    fn watch(queue: &Arc<Queue>) -> Panics {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (queue, record) = (Arc::downgrade(queue), Arc::clone(&seen));
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            default(info);
            let thread = thread::current();
            let runs: Vec<u64> = queue
                .upgrade()
                .map(|q| lock(&q.running).keys().copied().collect())
                .unwrap_or_default();
            lock(&record).push(format!(
                "thread {:?} panicked while runs {runs:?} were under way: {info}",
                thread.name().unwrap_or("unnamed")
            ));
        }));
        Panics { seen }
    }

    /// Restores the default hook; the panics, one violation each.
    fn stop(self) -> Vec<String> {
        let _ = panic::take_hook();
        std::mem::take(&mut *lock(&self.seen))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

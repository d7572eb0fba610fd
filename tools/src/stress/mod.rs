//! `ramjet stress`: many migrations between in-process senders and receivers through a
//! fault-injecting [proxy], several at once, each checked against what ramjet promises (see
//! [`check::check`]).
//!
//! Every run is drawn from the seed and its number ([`plan::Plan`]: socket, paused or live
//! guest, channels, compression, image, fault and where it strikes), so a violation is
//! replayed by `--seed S --first R --runs 1`.

mod check;
mod plan;
mod proxy;

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::image::{self, ImageKind};
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::transport::{Endpoint, Listener};
use ramjet_dataplane::workload::Workload;
use ramjet_dataplane::{
    CancelHandle, Error, Fact, FactSink, Guest, LiveHandle, LiveOptions, ReceiveOptions,
    SendOptions, Sender, migrate_live, receive,
};

use check::{Evidence, Outcome};
use plan::{Fault, Mode, Net, Plan, Strike, When};
use proxy::Proxy;

/// Run many migrations with injected faults and check every outcome.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many runs (default 100, or as many as --duration allows).
    #[arg(long)]
    runs: Option<u64>,
    /// Start no run after this long (90s, 20m, 1h).
    #[arg(long, value_parser = parse_duration)]
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
    /// Guests: paused, live (a vCPU thread writing during the migration), or both.
    #[arg(long, value_delimiter = ',', default_value = "paused,live")]
    modes: Vec<Mode>,
    /// Faults to choose from.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,drop,flip,stall,slow,short,refuse,version,cancel"
    )]
    faults: Vec<Fault>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 90s, 20m or 1h)"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

/// Each side's timeout for a socket operation.
const TIMEOUT: Duration = Duration::from_millis(1500);
/// A run taking longer than this is a hang.
const BOUND: Duration = Duration::from_secs(30);

/// Facts as they come.
#[derive(Default)]
struct Facts(Mutex<Vec<Fact>>);

impl Facts {
    fn sink(self: &Arc<Self>) -> Arc<dyn FactSink> {
        let facts = Arc::clone(self);
        Arc::new(move |fact: Fact| {
            facts
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(fact);
        })
    }

    fn all(&self) -> Vec<Fact> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn endpoint(net: Net, tag: &str, run: u64) -> Endpoint {
    match net {
        Net::Tcp => Endpoint::Tcp(([127, 0, 0, 1], 0).into()),
        Net::Unix => Endpoint::Unix(std::env::temp_dir().join(format!(
            "ramjet-stress-{}-{run}-{tag}.sock",
            std::process::id()
        ))),
    }
}

/// What a run did.
struct Ran {
    outcome: Outcome,
    struck: bool,
    violations: Vec<String>,
}

/// Runs one migration as `plan` says, and checks it.
fn run_one(plan: &Plan) -> anyhow::Result<Ran> {
    let bytes = plan.pages * PAGE_SIZE as u64;
    let src = Arc::new(GuestMemory::anonymous(bytes)?);
    if plan.image != ImageKind::Zero {
        image::fill(&src, plan.image, plan.run)?;
    }
    let dst_bytes = match plan.strike {
        Strike::Refuse => bytes + PAGE_SIZE as u64,
        _ => bytes,
    };
    let dst = Arc::new(GuestMemory::anonymous(dst_bytes)?);
    let receiver_listener = Listener::bind(&endpoint(plan.net, "r", plan.run))?;
    let hello_len = 48 + 24 * src.regions().len() as u64;
    let proxy = Proxy::start(
        Listener::bind(&endpoint(plan.net, "p", plan.run))?,
        receiver_listener.endpoint().clone(),
        plan,
        hello_len,
        TIMEOUT,
    );
    let (source_facts, destination_facts) =
        (Arc::new(Facts::default()), Arc::new(Facts::default()));
    let receive_options = ReceiveOptions {
        timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT * 4),
        workers: 2,
        ..ReceiveOptions::default()
    };
    let receiver = {
        let (dst, sink) = (Arc::clone(&dst), destination_facts.sink());
        thread::spawn(move || {
            receive(&receiver_listener, dst, &receive_options, sink).map(|r| r.device_state)
        })
    };
    let cancel = CancelHandle::new();
    let canceller = match plan.strike {
        Strike::Cancel(When::BeforeConnect) => {
            cancel.cancel();
            None
        }
        Strike::Cancel(When::After(after)) => {
            let cancel = cancel.clone();
            Some(thread::spawn(move || {
                thread::sleep(after);
                cancel.cancel();
            }))
        }
        _ => None,
    };
    let at_switchover =
        matches!(plan.strike, Strike::Cancel(When::Switchover)).then(|| cancel.clone());
    let options = SendOptions {
        channels: plan.channels,
        compression: plan.compression,
        timeout: TIMEOUT,
        workers: 2,
        cancel: cancel.clone(),
        ..SendOptions::default()
    };
    let sink = source_facts.sink();
    let sent = match plan.mode {
        Mode::Paused => send_paused(&src, proxy.endpoint(), &options, sink, at_switchover),
        Mode::Live => send_live(&src, plan, proxy.endpoint(), &options, sink, at_switchover),
    };
    let cancelled_in_time = cancel.is_cancelled();
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    let struck = proxy.stop()
        || matches!(plan.strike, Strike::Refuse)
        || (plan.fault == Fault::Cancel && cancelled_in_time);
    if let Some(canceller) = canceller {
        let _ = canceller.join();
    }
    let (outcome, violations) = check::check(&Evidence {
        plan,
        src: &src,
        dst: &dst,
        sent: &sent,
        received: &received,
        source_facts: &source_facts.all(),
        destination_facts: &destination_facts.all(),
        struck,
    });
    Ok(Ran {
        outcome,
        struck,
        violations,
    })
}

/// A stopped guest: switchover first, then every page straight from the frozen memory.
fn send_paused(
    src: &Arc<GuestMemory>,
    to: &Endpoint,
    options: &SendOptions,
    sink: Arc<dyn FactSink>,
    cancel_at_switchover: Option<CancelHandle>,
) -> Result<Vec<u8>, Error> {
    const STATE: &[u8] = b"paused guest device state";
    let mut sender = Sender::connect(Arc::clone(src), to, options, sink)?;
    sender.switchover()?;
    if let Some(cancel) = cancel_at_switchover {
        cancel.cancel();
    }
    sender.round(&DirtySet::all(src))?;
    sender.finish(STATE)?;
    Ok(STATE.to_vec())
}

/// A running guest: a vCPU thread writes while live pre-copy rounds go out; it is paused for
/// the switchover (and resumed if the migration fails).
fn send_live(
    src: &Arc<GuestMemory>,
    plan: &Plan,
    to: &Endpoint,
    options: &SendOptions,
    sink: Arc<dyn FactSink>,
    cancel_at_switchover: Option<CancelHandle>,
) -> Result<Vec<u8>, Error> {
    let (workload, mut source, _) =
        Workload::start_tracked(src, Some(plan.dirty_rate), ImageKind::Mixed, plan.run);
    let mut guest = Hooks {
        workload,
        cancel_at_switchover,
        handed_over: None,
    };
    let sender = Sender::connect(Arc::clone(src), to, options, sink)?;
    let live = LiveOptions {
        max_rounds: Some(8),
        max_time: Some(Duration::from_secs(5)),
        ..LiveOptions::default()
    };
    let handle = LiveHandle::new(options.cancel.clone());
    migrate_live(sender, source.as_mut(), &mut guest, &live, &handle)?;
    guest
        .handed_over
        .ok_or_else(|| Error::Config("the migration completed without device state".into()))
}

/// The live guest's hooks: the workload's, plus a cancel as it pauses, and a record of the
/// device state handed over.
struct Hooks {
    workload: Workload,
    cancel_at_switchover: Option<CancelHandle>,
    handed_over: Option<Vec<u8>>,
}

impl Guest for Hooks {
    fn pause(&mut self) -> Result<(), String> {
        let paused = self.workload.pause();
        if let Some(cancel) = &self.cancel_at_switchover {
            cancel.cancel();
        }
        paused
    }

    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        let state = self.workload.device_state()?;
        self.handed_over = Some(state.clone());
        Ok(state)
    }

    fn resume(&mut self) {
        self.workload.resume();
    }
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(Iterator::count).unwrap_or(0)
}

/// Threads, once the kernel's io_uring workers (`iou-*`, ended asynchronously after their
/// ring closes) are gone: waits up to 10 s for them.
fn settled_threads() -> usize {
    let iou = || {
        std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| {
            tasks.filter_map(Result::ok).any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("iou-"))
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while iou() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    count("/proc/self/task")
}

/// One finished run, as a worker reports it.
struct Report {
    plan: Plan,
    result: Result<anyhow::Result<Ran>, ()>,
    took: Duration,
}

/// The tally: runs by row (a fault, or a mode) and outcome, and the violations.
#[derive(Default)]
struct Tally {
    by_fault: BTreeMap<Fault, Row>,
    by_mode: BTreeMap<Mode, Row>,
    runs: u64,
    violations: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Row {
    runs: u64,
    struck: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
}

impl Row {
    fn add(&mut self, ran: &Ran) {
        self.runs += 1;
        self.struck += u64::from(ran.struck);
        match ran.outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Cancelled => self.cancelled += 1,
        }
    }
}

impl Tally {
    fn add(&mut self, report: Report) {
        let Report { plan, result, took } = report;
        self.runs += 1;
        let mut violation = |v: String| {
            let v = format!("run {} ({plan:?}): {v}", plan.run);
            // At once too, for a long pass; the summary repeats it.
            eprintln!("stress: violation: {v}");
            self.violations.push(v);
        };
        match result {
            Ok(Ok(ran)) => {
                self.by_fault.entry(plan.fault).or_default().add(&ran);
                self.by_mode.entry(plan.mode).or_default().add(&ran);
                for v in ran.violations {
                    violation(v);
                }
            }
            Ok(Err(e)) => violation(format!("could not run: {e:#}")),
            Err(()) => violation("panicked".into()),
        }
        if took > BOUND {
            violation(format!("took {took:.1?}, over the {BOUND:?} bound"));
        }
    }

    fn print(&self, seed: u64, elapsed: Duration) {
        println!(
            "{:<8} {:>6} {:>7} {:>10} {:>7} {:>10}",
            "", "runs", "struck", "completed", "failed", "cancelled"
        );
        let line = |name: String, r: &Row| {
            println!(
                "{name:<8} {:>6} {:>7} {:>10} {:>7} {:>10}",
                r.runs, r.struck, r.completed, r.failed, r.cancelled
            );
        };
        for (fault, row) in &self.by_fault {
            line(format!("{fault:?}").to_lowercase(), row);
        }
        for (mode, row) in &self.by_mode {
            line(format!("{mode:?}").to_lowercase(), row);
        }
        println!(
            "{} runs in {:.1?}, seed {seed}: {} violations",
            self.runs,
            elapsed,
            self.violations.len()
        );
        for v in &self.violations {
            println!("violation: {v} (replay: --seed {seed} --first <run> --runs 1)");
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.transports.is_empty() || args.faults.is_empty() || args.modes.is_empty() {
        bail!("--transports, --modes and --faults need at least one value each");
    }
    let runs = args.runs.unwrap_or(if args.duration.is_some() {
        u64::MAX
    } else {
        100
    });
    let end = args.first.saturating_add(runs);
    let (fds, threads) = (count("/proc/self/fd"), settled_threads());
    let started = Instant::now();
    let stop_at = args.duration.map(|d| started + d);
    let next = Arc::new(AtomicU64::new(args.first));
    // Runs under way, with when they started: a run past the bound is a hang.
    let running: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let (done, reports) = mpsc::channel();
    let workers: Vec<_> = (0..args.jobs)
        .map(|_| {
            let (next, running, done) = (Arc::clone(&next), Arc::clone(&running), done.clone());
            let (seed, nets, modes, faults) = (
                args.seed,
                args.transports.clone(),
                args.modes.clone(),
                args.faults.clone(),
            );
            thread::spawn(move || {
                loop {
                    if stop_at.is_some_and(|t| Instant::now() >= t) {
                        break;
                    }
                    let run = next.fetch_add(1, Ordering::Relaxed);
                    if run >= end {
                        break;
                    }
                    let plan = Plan::new(seed, run, &nets, &modes, &faults);
                    let began = Instant::now();
                    lock(&running).insert(run, began);
                    let result =
                        panic::catch_unwind(AssertUnwindSafe(|| run_one(&plan))).map_err(|_| ());
                    lock(&running).remove(&run);
                    let took = began.elapsed();
                    if done.send(Report { plan, result, took }).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(done);
    let mut tally = Tally::default();
    let mut last_word = Instant::now();
    loop {
        match reports.recv_timeout(Duration::from_secs(1)) {
            Ok(report) => tally.add(report),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let hung: Vec<u64> = lock(&running)
            .iter()
            .filter(|(_, began)| began.elapsed() > BOUND)
            .map(|(run, _)| *run)
            .collect();
        if !hung.is_empty() {
            for run in hung {
                let plan = Plan::new(args.seed, run, &args.transports, &args.modes, &args.faults);
                tally.violations.push(format!(
                    "run {run} ({plan:?}): still running after {BOUND:?}: a hang"
                ));
            }
            // The hung run's threads cannot be stopped: report and leave.
            tally.print(args.seed, started.elapsed());
            return Ok(ExitCode::FAILURE);
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
    for worker in workers {
        let _ = worker.join();
    }
    let (fds_after, threads_after) = (count("/proc/self/fd"), settled_threads());
    if fds_after > fds {
        tally
            .violations
            .push(format!("{} file descriptors leaked", fds_after - fds));
    }
    if threads_after > threads {
        tally
            .violations
            .push(format!("{} threads leaked", threads_after - threads));
    }
    tally.print(args.seed, started.elapsed());
    Ok(if tally.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").unwrap_err().contains("not a duration"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("m").unwrap_err().contains("not a duration"));
    }
}

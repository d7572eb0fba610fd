//! `ramjet stress`: many migrations between in-process senders and receivers through a
//! fault-injecting proxy, each checked against what ramjet promises (see [`check`]).
//!
//! Every run is chosen from the seed (transport socket, channels, compression, image, fault,
//! where the fault strikes), so a violation is reproduced by `--seed S --runs 1 --first R`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;
use ramjet_control::{Machine, Options, Profile, Side, Status, Timestamp, Trigger};
use ramjet_dataplane::codec::Compression;
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::image::{self, ImageKind, Rng};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::{Endpoint, Listener, Stream};
use ramjet_dataplane::{
    CancelHandle, Error, Fact, FactSink, ReceiveOptions, SendOptions, Sender, receive,
};

/// Run many migrations with injected faults and check every outcome.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many runs.
    #[arg(long, default_value_t = 100)]
    runs: u64,
    /// The seed every run is chosen from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The first run's number (to replay one run: --first R --runs 1).
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Sockets to use: tcp, unix, or both.
    #[arg(long, value_delimiter = ',', default_value = "tcp,unix")]
    transports: Vec<Net>,
    /// Faults to choose from.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,drop,flip,stall,cancel"
    )]
    faults: Vec<Fault>,
}

/// A socket kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Net {
    /// Loopback TCP.
    Tcp,
    /// A Unix socket.
    Unix,
}

/// What the proxy (or the test) does to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Fault {
    /// Nothing: the run must complete.
    None,
    /// Close one channel's connection after some bytes.
    Drop,
    /// Flip one byte of one channel, sender to receiver.
    Flip,
    /// Stop forwarding one channel for longer than the timeout.
    Stall,
    /// Cancel the sender at a random moment.
    Cancel,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

/// What one run is.
#[derive(Debug, Clone, Copy)]
struct Plan {
    run: u64,
    net: Net,
    channels: u16,
    compression: Compression,
    image: ImageKind,
    pages: u64,
    fault: Fault,
    /// The channel the fault hits, and after how many of its bytes.
    channel: u16,
    at_byte: u64,
}

const TIMEOUT: Duration = Duration::from_millis(1500);
/// A run taking longer than this is a hang.
const BOUND: Duration = Duration::from_secs(30);

impl Plan {
    fn new(seed: u64, run: u64, nets: &[Net], faults: &[Fault]) -> Plan {
        let mut rng = Rng::new(seed ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let pick = |rng: &mut Rng, n: usize| usize::try_from(rng.below(n as u64)).unwrap_or(0);
        let channels = u16::try_from(rng.below(4) + 1).unwrap_or(1);
        let pages = 256 + rng.below(2048);
        Plan {
            run,
            net: nets[pick(&mut rng, nets.len())],
            channels,
            compression: [Compression::Off, Compression::Lz4, Compression::Auto][pick(&mut rng, 3)],
            image: [ImageKind::Random, ImageKind::Zero, ImageKind::Mixed][pick(&mut rng, 3)],
            pages,
            fault: faults[pick(&mut rng, faults.len())],
            channel: u16::try_from(rng.below(u64::from(channels))).unwrap_or(0),
            // Anywhere from the hello to well into the pages.
            at_byte: rng.below(pages * 4096 / u64::from(channels) + 64),
        }
    }
}

/// Forwards one connection, sender to receiver and back, applying `fault` to the sender's
/// bytes; returns when both directions are done. A direction that ends is half-closed, so the
/// other can still carry an answer (the receiver's error message, say); a dropped or stalled
/// connection is cut both ways, as a lost link is.
fn forward(from: &Stream, to: &Stream, fault: Option<(Fault, u64)>, stop: &AtomicBool) {
    let back = {
        let (to_r, from_w) = (to.try_clone(), from.try_clone());
        thread::spawn(move || {
            if let (Ok(mut to_r), Ok(mut from_w)) = (to_r, from_w) {
                let _ = std::io::copy(&mut to_r, &mut from_w);
                from_w.shutdown_write();
            }
        })
    };
    let cut = pump(from, to, fault, stop);
    if cut {
        from.shutdown();
        to.shutdown();
    } else {
        to.shutdown_write();
    }
    let _ = back.join();
}

/// Copies sender bytes to the receiver until either side ends; true if the fault cut the link.
fn pump(from: &Stream, to: &Stream, fault: Option<(Fault, u64)>, stop: &AtomicBool) -> bool {
    let (Ok(mut from_r), Ok(mut to_w)) = (from.try_clone(), to.try_clone()) else {
        return true;
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut seen = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = match from_r.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let (start, end) = (seen, seen + n as u64);
        seen = end;
        if let Some((fault, at)) = fault
            && (start..end).contains(&at)
        {
            let offset = usize::try_from(at - start).unwrap_or(0);
            match fault {
                Fault::Flip => chunk[offset] ^= 0x5A,
                Fault::Drop => {
                    let _ = to_w.write_all(&chunk[..offset]);
                    return true;
                }
                Fault::Stall => {
                    let _ = to_w.write_all(&chunk[..offset]);
                    // Longer than either side's timeout, then the link is gone.
                    let until = Instant::now() + TIMEOUT * 3;
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(10));
                    }
                    return true;
                }
                Fault::None | Fault::Cancel => {}
            }
        }
        if to_w.write_all(chunk).is_err() {
            return false;
        }
    }
    true
}

/// Facts as they come.
#[derive(Default)]
struct Facts(std::sync::Mutex<Vec<Fact>>);

impl Facts {
    fn sink(self: &Arc<Self>) -> Arc<dyn FactSink> {
        let facts = Arc::clone(self);
        Arc::new(move |fact: Fact| {
            facts
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(fact);
        })
    }

    fn all(&self) -> Vec<Fact> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What a run did.
struct Ran {
    outcome: Outcome,
    violations: Vec<String>,
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

/// Runs one migration as `plan` says.
fn run_one(plan: &Plan) -> anyhow::Result<Ran> {
    let bytes = plan.pages * 4096;
    let src = Arc::new(GuestMemory::anonymous(bytes)?);
    if plan.image != ImageKind::Zero {
        image::fill(&src, plan.image, plan.run)?;
    }
    let dst = Arc::new(GuestMemory::anonymous(bytes)?);
    let receiver_listener = Listener::bind(&endpoint(plan.net, "r", plan.run))?;
    let proxy_listener = Listener::bind(&endpoint(plan.net, "p", plan.run))?;
    let (real, front) = (
        receiver_listener.endpoint().clone(),
        proxy_listener.endpoint().clone(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // The proxy: one forwarder per accepted channel, the fault on one of them.
    let proxy = {
        let stop = Arc::clone(&stop);
        let plan = *plan;
        thread::spawn(move || {
            let mut forwarders = Vec::new();
            for channel in 0..plan.channels {
                let Ok(from) =
                    proxy_listener.accept(Some(TIMEOUT * 4), &|| stop.load(Ordering::Relaxed))
                else {
                    break;
                };
                let Ok(to) = Stream::connect(&real, TIMEOUT) else {
                    break;
                };
                let fault = (channel == plan.channel).then_some((plan.fault, plan.at_byte));
                let stop = Arc::clone(&stop);
                forwarders.push(thread::spawn(move || forward(&from, &to, fault, &stop)));
            }
            for f in forwarders {
                let _ = f.join();
            }
        })
    };
    let (source_facts, destination_facts) =
        (Arc::new(Facts::default()), Arc::new(Facts::default()));
    let receive_options = ReceiveOptions {
        timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT * 4),
        workers: 2,
        ..ReceiveOptions::default()
    };
    let (dst2, sink) = (Arc::clone(&dst), destination_facts.sink());
    let receiver = thread::spawn(move || receive(&receiver_listener, dst2, &receive_options, sink));
    let cancel = CancelHandle::new();
    let canceller = (plan.fault == Fault::Cancel).then(|| {
        let (cancel, after) = (cancel.clone(), Duration::from_micros(plan.at_byte % 20_000));
        thread::spawn(move || {
            thread::sleep(after);
            cancel.cancel();
        })
    });
    let options = SendOptions {
        channels: plan.channels,
        compression: plan.compression,
        timeout: TIMEOUT,
        workers: 2,
        cancel,
        ..SendOptions::default()
    };
    let sent = Sender::connect(Arc::clone(&src), &front, &options, source_facts.sink()).and_then(
        |mut sender| {
            sender.switchover()?;
            sender.round(&DirtySet::all(&src))?;
            sender.finish(b"device")
        },
    );
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    stop.store(true, Ordering::Relaxed);
    let _ = proxy.join();
    if let Some(canceller) = canceller {
        let _ = canceller.join();
    }
    Ok(check(
        plan,
        &src,
        &dst,
        &sent.map(|_| ()),
        &received.map(|_| ()),
        &source_facts.all(),
        &destination_facts.all(),
    ))
}

/// The promises: (1) each side's statuses are a path of its control graph ending in exactly
/// one terminal status; (2) `completed` means identical memory; (3) `failed` names the fault;
/// (4) `cancelled` only after a cancel; a fault-free run completes.
fn check(
    plan: &Plan,
    src: &GuestMemory,
    dst: &GuestMemory,
    sent: &Result<(), Error>,
    received: &Result<(), Error>,
    source_facts: &[Fact],
    destination_facts: &[Fact],
) -> Ran {
    let mut violations = Vec::new();
    let mut terminal = |side: Side, facts: &[Fact], cancelled: bool| {
        let mut machine = Machine::new(side, Profile::Qemu10, Options::new());
        let now = Timestamp::from_unix_micros(1);
        let mut ends = 0;
        let _ = machine.step(Trigger::Migrate, now);
        for fact in facts {
            if cancelled && *fact == Fact::Drained {
                let _ = machine.step(Trigger::Cancel, now);
            }
            match machine.step(fact.clone(), now) {
                Ok(Some(event)) if event.status().is_some_and(Status::is_terminal) => ends += 1,
                Ok(_) => {}
                Err(e) => {
                    violations.push(format!("{side:?}: the control machine refused {fact}: {e}"));
                }
            }
        }
        if ends != 1 {
            violations.push(format!(
                "{side:?}: {ends} terminal statuses (facts {facts:?})"
            ));
        }
    };
    let source_cancelled = matches!(sent, Err(e) if e.is_cancelled());
    terminal(Side::Source, source_facts, source_cancelled);
    terminal(Side::Destination, destination_facts, false);
    let outcome = match sent {
        Ok(()) => Outcome::Completed,
        Err(e) if e.is_cancelled() => Outcome::Cancelled,
        Err(_) => Outcome::Failed,
    };
    if outcome == Outcome::Completed {
        if received.is_err() {
            violations.push("the sender completed, the receiver did not".into());
        }
        match src.first_difference(dst) {
            Ok(None) => {}
            Ok(Some((region, page))) => {
                violations.push(format!(
                    "completed, but page {page} of region {region} differs"
                ));
            }
            Err(e) => violations.push(format!("cannot compare: {e}")),
        }
    }
    if outcome == Outcome::Cancelled && plan.fault != Fault::Cancel {
        violations.push("cancelled without a cancel".into());
    }
    if plan.fault == Fault::None && outcome != Outcome::Completed {
        violations.push("a run without a fault did not complete".into());
    }
    let error = sent.as_ref().err().map(Error::chain);
    if let (Outcome::Failed, Some(message)) = (outcome, &error) {
        let message = &message.to_lowercase();
        let named = match plan.fault {
            Fault::Drop => ["closed", "connection", "reset", "broken pipe", "timed out"]
                .iter()
                .any(|w| message.contains(w)),
            Fault::Flip => [
                "invalid data",
                "checksum",
                "refused",
                "not a ramjet peer",
                "the receiver failed",
            ]
            .iter()
            .any(|w| message.contains(w)),
            Fault::Stall => ["timed out", "closed", "the receiver failed"]
                .iter()
                .any(|w| message.contains(w)),
            Fault::None | Fault::Cancel => false,
        };
        if !named {
            violations.push(format!(
                "failed without naming the {:?} fault: {message}",
                plan.fault
            ));
        }
    }
    Ran {
        outcome,
        violations,
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

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.transports.is_empty() || args.faults.is_empty() {
        bail!("--transports and --faults need at least one value each");
    }
    let (fds, threads) = (count("/proc/self/fd"), settled_threads());
    let started = Instant::now();
    let mut table: BTreeMap<(Fault, Outcome), u64> = BTreeMap::new();
    let mut violations = Vec::new();
    for run in args.first..args.first + args.runs {
        let plan = Plan::new(args.seed, run, &args.transports, &args.faults);
        let began = Instant::now();
        let result = thread::spawn(move || run_one(&plan)).join();
        let took = began.elapsed();
        match result {
            Ok(Ok(ran)) => {
                *table.entry((plan.fault, ran.outcome)).or_default() += 1;
                for v in ran.violations {
                    violations.push(format!("run {run} ({plan:?}): {v}"));
                }
            }
            Ok(Err(e)) => violations.push(format!("run {run} ({plan:?}): could not run: {e:#}")),
            Err(_) => violations.push(format!("run {run} ({plan:?}): panicked")),
        }
        if took > BOUND {
            violations.push(format!(
                "run {run} ({plan:?}): took {took:.1?}, over {BOUND:?}"
            ));
        }
    }
    let (fds_after, threads_after) = (count("/proc/self/fd"), settled_threads());
    if fds_after > fds {
        violations.push(format!("{} file descriptors leaked", fds_after - fds));
    }
    if threads_after > threads {
        violations.push(format!("{} threads leaked", threads_after - threads));
    }
    println!(
        "{:<8} {:>10} {:>8} {:>10}",
        "fault", "completed", "failed", "cancelled"
    );
    for fault in &args.faults {
        let n = |o| table.get(&(*fault, o)).copied().unwrap_or(0);
        println!(
            "{:<8} {:>10} {:>8} {:>10}",
            format!("{fault:?}").to_lowercase(),
            n(Outcome::Completed),
            n(Outcome::Failed),
            n(Outcome::Cancelled)
        );
    }
    println!(
        "{} runs in {:.1?}, seed {}: {} violations",
        args.runs,
        started.elapsed(),
        args.seed,
        violations.len()
    );
    for v in &violations {
        println!(
            "violation: {v} (replay: --seed {} --first <run> --runs 1)",
            args.seed
        );
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

//! `ramjet stress --processes`: each run is a `ramjet recv` and a `ramjet send`, child
//! processes of this executable on loopback with the [proxy](super::proxy) between them, and
//! one of them is killed with SIGKILL at a point drawn from the seed: at a random moment, mid
//! round, at the switchover, or around each handover message (the proxy kills as it sees the
//! message pass, and then forwards it or not). The survivor must end within its timeout and
//! the decision or in-doubt window, and the pair must keep the ownership promise, judged from
//! the exit statuses, the children's stderr and the receiver's `--out`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ramjet_dataplane::Compression;
use ramjet_dataplane::internals::wire::{FrameKind, Hello};
use ramjet_dataplane::testkit::image::{self, ImageKind, Rng};
use ramjet_dataplane::transport::{Endpoint, Listener};

use super::Args;
use super::plan::{Fault, Mode, Net, Plan, Strike};
use super::proxy::{Passing, Proxy, Watch};
use super::run::{DECISION_TIMEOUT, IN_DOUBT_WAIT, TIMEOUT, endpoint};

/// Each child's guest RAM.
const IMAGE_BYTES: u64 = 4 << 20;

/// Longest a run may take before both children are killed and it counts as a hang.
const HANG: Duration = Duration::from_secs(30);

/// How long the survivor may take after the kill: its timeout to notice, the decision or
/// in-doubt window, and slack for a loaded machine.
fn survivor_bound() -> Duration {
    TIMEOUT * 2 + IN_DOUBT_WAIT.max(DECISION_TIMEOUT) + Duration::from_secs(3)
}

/// Which child is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Sender,
    Receiver,
}

/// When it is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum At {
    /// This long after the sender started.
    Moment(Duration),
    /// As the `nth` pages frame passes on channel 0 (it is forwarded).
    Pages(u64),
    /// As the sender reports the switchover (its `device` event).
    Switchover,
    /// As the handover message passes; `delivered` says whether it is forwarded after the
    /// kill (the victim sent it, or died sending it).
    Ready {
        delivered: bool,
    },
    Go {
        delivered: bool,
    },
    Decided {
        delivered: bool,
    },
}

impl At {
    fn name(self) -> String {
        let sign = |d: bool| if d { "+" } else { "-" };
        match self {
            At::Moment(_) => "moment".into(),
            At::Pages(_) => "mid-round".into(),
            At::Switchover => "switchover".into(),
            At::Ready { delivered } => format!("ready{}", sign(delivered)),
            At::Go { delivered } => format!("go{}", sign(delivered)),
            At::Decided { delivered } => format!("decided{}", sign(delivered)),
        }
    }
}

/// One run of the processes pass.
#[derive(Debug, Clone, Copy)]
struct ProcPlan {
    run: u64,
    net: Net,
    mode: Mode,
    channels: u16,
    image: usize,
    dirty_rate: u64,
    victim: Victim,
    at: At,
}

impl ProcPlan {
    fn new(seed: u64, run: u64, nets: &[Net], modes: &[Mode]) -> ProcPlan {
        let mut rng = Rng::new(seed ^ run.wrapping_mul(0xA24B_AED4_963E_E407) ^ 0x9C0C);
        let pick = |rng: &mut Rng, n: usize| usize::try_from(rng.below(n as u64)).unwrap_or(0);
        let net = nets[pick(&mut rng, nets.len())];
        let mode = modes[pick(&mut rng, modes.len())];
        let channels = u16::try_from(1 + rng.below(4)).unwrap_or(1);
        let image = pick(&mut rng, IMAGES.len());
        let dirty_rate = 1000 + rng.below(9000);
        let victim = if rng.below(2) == 0 {
            Victim::Sender
        } else {
            Victim::Receiver
        };
        let delivered = rng.below(2) == 1;
        let at = match rng.below(9) {
            0 => At::Moment(Duration::from_millis(rng.below(400))),
            1 => At::Pages(rng.below(3)),
            2 => At::Switchover,
            3 | 4 => At::Ready { delivered },
            5 | 6 => At::Go { delivered },
            _ => At::Decided { delivered },
        };
        ProcPlan {
            run,
            net,
            mode,
            channels,
            image,
            dirty_rate,
            victim,
            at,
        }
    }

    /// The plan the proxy forwards by: no fault of its own.
    fn proxy_plan(&self) -> Plan {
        Plan {
            run: self.run,
            net: self.net,
            mode: self.mode,
            channels: self.channels,
            compression: Compression::Auto,
            image: IMAGES[self.image],
            pages: IMAGE_BYTES / 4096,
            dirty_rate: self.dirty_rate,
            fault: Fault::None,
            strike: Strike::None,
            channel: 0,
            tls: false,
        }
    }
}

const IMAGES: [ImageKind; 3] = [ImageKind::Mixed, ImageKind::Random, ImageKind::Zero];

/// Who owns the guest at the end of a run with a killed child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    /// The source resumed it (exit 1), the destination discarded (exit 1).
    Source,
    /// The source handed over (0), the destination runs it (0).
    Destination,
    /// The source handed over (0), the destination in doubt (3).
    DoubtHandedOver,
    /// The source kept it (1), the destination in doubt (3).
    DoubtKept,
    /// The source was killed (never resumed); the destination discarded its copy.
    SourceGoneDiscarded,
    /// The source was killed; the destination holds the copy in doubt.
    SourceGoneInDoubt,
    /// The source was killed after its go reached the destination, which runs the guest.
    SourceGoneRuns,
    /// The destination was killed; the source kept the guest.
    DestinationGoneKept,
    /// The destination was killed after the handover: its copy is lost with its process.
    DestinationKilledAfterHandover,
    /// Broken promise: the source resumed and the destination runs.
    Both,
    /// Broken promise: nobody owns a guest that both processes lived to decide on, or the
    /// destination runs without a go.
    Nobody,
}

const OWNERS: [(&str, Owner); 11] = [
    ("src-owns", Owner::Source),
    ("dst-runs", Owner::Destination),
    ("doubt-ho", Owner::DoubtHandedOver),
    ("doubt-kept", Owner::DoubtKept),
    ("sgone-disc", Owner::SourceGoneDiscarded),
    ("sgone-doubt", Owner::SourceGoneInDoubt),
    ("sgone-runs", Owner::SourceGoneRuns),
    ("dgone-kept", Owner::DestinationGoneKept),
    ("dgone-after", Owner::DestinationKilledAfterHandover),
    ("both!", Owner::Both),
    ("nobody!", Owner::Nobody),
];

/// What a run did.
struct Ran {
    plan: ProcPlan,
    killed: bool,
    owner: Option<Owner>,
    violations: Vec<String>,
}

/// The processes pass.
pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    // The children's postcopy is not killed mid-way yet: paused and live guests only.
    let modes: Vec<Mode> = args
        .modes
        .iter()
        .copied()
        .filter(|&m| m != Mode::Postcopy)
        .collect();
    if args.transports.is_empty() || modes.is_empty() {
        bail!("--transports and --modes (paused or live) need at least one value each");
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let dir = std::env::temp_dir().join(format!("ramjet-stress-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let images = write_images(&dir)?;
    let runs = args.runs.unwrap_or(if args.duration.is_some() {
        u64::MAX
    } else {
        100
    });
    let started = Instant::now();
    let stop_at = args.duration.map(|d| started + d);
    let next = Arc::new(AtomicU64::new(args.first));
    let end = args.first.saturating_add(runs);
    let (done, reports) = mpsc::channel();
    let shared = Arc::new(Shared {
        exe,
        dir: dir.clone(),
        images,
        seed: args.seed,
        nets: args.transports.clone(),
        modes,
    });
    let workers: Vec<JoinHandle<()>> = (0..args.jobs)
        .map(|job| {
            let (next, done, shared) = (Arc::clone(&next), done.clone(), Arc::clone(&shared));
            thread::Builder::new()
                .name(format!("stress-proc-{job}"))
                .spawn(move || {
                    loop {
                        if stop_at.is_some_and(|t| Instant::now() >= t) {
                            break;
                        }
                        let run = next.fetch_add(1, Ordering::Relaxed);
                        if run >= end {
                            break;
                        }
                        let plan = ProcPlan::new(shared.seed, run, &shared.nets, &shared.modes);
                        let ran = run_one(&shared, plan).unwrap_or_else(|e| Ran {
                            plan,
                            killed: false,
                            owner: None,
                            violations: vec![format!("could not run: {e:#}")],
                        });
                        if done.send(ran).is_err() {
                            break;
                        }
                    }
                })
        })
        .collect::<Result<_, _>>()?;
    drop(done);
    let mut tally = Tally::default();
    let mut last_word = Instant::now();
    for ran in reports {
        tally.add(&ran);
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
    let _ = std::fs::remove_dir_all(&dir);
    tally.print(args.seed, started.elapsed());
    Ok(if tally.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What every run of the pass shares.
struct Shared {
    exe: PathBuf,
    dir: PathBuf,
    images: Vec<PathBuf>,
    seed: u64,
    nets: Vec<Net>,
    modes: Vec<Mode>,
}

/// One image file of [`IMAGE_BYTES`] per kind in [`IMAGES`].
fn write_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    IMAGES
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let path = dir.join(format!("image-{i}"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            image::write_file(&file, *kind, 17 + i as u64, IMAGE_BYTES)?;
            Ok(path)
        })
        .collect()
}

/// A child, its pid, and its stderr (and stdout, if it is not read otherwise) as it ends.
struct Kid {
    child: Child,
    pid: i32,
    stderr: JoinHandle<String>,
}

impl Kid {
    fn kill(&self) {
        // SAFETY: kill(2) only sends a signal; `pid` is our own child, not yet waited for
        // (so its pid cannot have been reused by another process).
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
    }
}

/// Reads `from` to its end in a thread of its own, so that the child never blocks on a full
/// pipe.
fn drain(mut from: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut all = String::new();
        let _ = from.read_to_string(&mut all);
        all
    })
}

/// Where the kill comes from, shared by the proxy's watch, the sender's event reader and the
/// timer.
#[derive(Default)]
struct Trigger {
    victim: Mutex<Option<i32>>,
    /// When it was sent.
    at: Mutex<Option<Instant>>,
    fired: AtomicBool,
    /// A decided passed on channel 0 before the kill (or without one).
    decided_seen: AtomicBool,
}

impl Trigger {
    fn fire(&self) {
        if self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        // The victim's pid is set right after it is spawned; wait for that if need be.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let victim = self.victim.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(pid) = *victim {
                // SAFETY: kill(2) only sends a signal. `pid` is our own child and not yet
                // reaped: `wait_both` reaps the victim only while holding this lock, and clears
                // the pid when it does, so its pid cannot have been reused.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                drop(victim);
                *self.at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                return;
            }
            drop(victim);
            if Instant::now() >= deadline {
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The proxy's watch: kills at the plan's frame, and forwards it or not.
fn watch(plan: ProcPlan, trigger: &Arc<Trigger>) -> Watch {
    let trigger = Arc::clone(trigger);
    Arc::new(move |p: Passing| {
        if p.kind == Some(FrameKind::Decided) && !trigger.fired.load(Ordering::Acquire) {
            trigger.decided_seen.store(true, Ordering::Release);
        }
        let (forward, kind, delivered) = match plan.at {
            At::Pages(nth) if p.nth == nth => (true, FrameKind::Pages, true),
            At::Ready { delivered } => (false, FrameKind::Ready, delivered),
            At::Go { delivered } => (true, FrameKind::Decision, delivered),
            At::Decided { delivered } => (false, FrameKind::Decided, delivered),
            _ => return true,
        };
        if (p.forward, p.kind) != (forward, Some(kind)) || trigger.fired.load(Ordering::Acquire) {
            return true;
        }
        if kind == FrameKind::Decided && delivered {
            trigger.decided_seen.store(true, Ordering::Release);
        }
        trigger.fire();
        delivered
    })
}

fn run_one(shared: &Shared, plan: ProcPlan) -> anyhow::Result<Ran> {
    let began = Instant::now();
    let out = shared.dir.join(format!("out-{}", plan.run));
    let _ = std::fs::remove_file(&out);
    let secs = |d: Duration| format!("{}ms", d.as_millis());
    let listen = match endpoint(plan.net, "pr", plan.run) {
        Endpoint::Tcp(_) => "tcp:127.0.0.1:0".to_string(),
        unix => unix.to_string(),
    };
    let mut receiver = Command::new(&shared.exe)
        .args(["recv", "--listen", &listen, "--memory", "4M", "--out"])
        .arg(&out)
        .args(["--timeout", &secs(TIMEOUT)])
        .args(["--in-doubt-wait", &secs(IN_DOUBT_WAIT)])
        .args(["--accept-timeout", &secs(TIMEOUT * 2)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start ramjet recv")?;
    let mut lines = BufReader::new(receiver.stderr.take().context("recv's stderr")?);
    let mut first = String::new();
    let mut at = None;
    while lines.read_line(&mut first).unwrap_or(0) > 0 {
        if let Some(endpoint) = first.trim().strip_prefix("ramjet: listening on ") {
            at = Some(endpoint.to_string());
            break;
        }
        first.clear();
    }
    let Some(real) = at.and_then(|at| at.parse::<Endpoint>().ok()) else {
        let _ = receiver.kill();
        let _ = receiver.wait();
        bail!("ramjet recv did not say where it listens: {first}");
    };
    let receiver = Kid {
        pid: i32::try_from(receiver.id())?,
        child: receiver,
        stderr: drain(lines),
    };
    let trigger = Arc::new(Trigger::default());
    let proxy = Proxy::start(
        Listener::bind(&endpoint(plan.net, "pp", plan.run))?,
        real,
        &plan.proxy_plan(),
        Hello::encoded_len(1) as u64,
        TIMEOUT,
        Some(watch(plan, &trigger)),
    );
    let mut send = Command::new(&shared.exe);
    send.args(["send", "--to", &proxy.endpoint().to_string(), "--image"])
        .arg(&shared.images[plan.image])
        .args(["--channels", &plan.channels.to_string()])
        .args(["--timeout", &secs(TIMEOUT)])
        .args(["--decision-timeout", &secs(DECISION_TIMEOUT)])
        .args(["--events", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if plan.mode == Mode::Live {
        send.args(["--live-dirty-rate", &plan.dirty_rate.to_string()]);
    }
    let mut sender = match send.spawn() {
        Ok(sender) => sender,
        Err(e) => {
            receiver.kill();
            let _ = receiver.stderr.join();
            proxy.stop();
            return Err(e).context("cannot start ramjet send");
        }
    };
    let sender_pid = i32::try_from(sender.id())?;
    let victim_pid = match plan.victim {
        Victim::Sender => sender_pid,
        Victim::Receiver => receiver.pid,
    };
    *trigger
        .victim
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(victim_pid);
    // The sender's events: its `device` event is the switchover.
    let events = sender.stdout.take().map(|stdout| {
        let trigger = Arc::clone(&trigger);
        let at_switchover = plan.at == At::Switchover;
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if at_switchover && line.contains("\"device\"") {
                    trigger.fire();
                }
            }
        })
    });
    let sender_stderr = sender.stderr.take().map(drain);
    let sender = Kid {
        child: sender,
        pid: sender_pid,
        stderr: sender_stderr.unwrap_or_else(|| thread::spawn(String::new)),
    };
    let timer = match plan.at {
        At::Moment(after) => {
            let trigger = Arc::clone(&trigger);
            Some(thread::spawn(move || {
                thread::sleep(after);
                trigger.fire();
            }))
        }
        _ => None,
    };
    let (mut sender, mut receiver) = (sender, receiver);
    let (sent, received, hung) = wait_both(&mut sender, &mut receiver, began, &trigger);
    if let Some(timer) = timer {
        let _ = timer.join();
    }
    // Nothing fires a kill after both ended: the pids are about to be reaped.
    trigger.fired.store(true, Ordering::Release);
    let go_delivered = proxy.seen().go_delivered.load(Ordering::Relaxed);
    proxy.stop();
    if let Some(events) = events {
        let _ = events.join();
    }
    let sender_said = sender.stderr.join().unwrap_or_default();
    let receiver_said = receiver.stderr.join().unwrap_or_default();
    let killed_at = *trigger.at.lock().unwrap_or_else(PoisonError::into_inner);
    let mut judge = Judge {
        plan,
        sent: sent.0,
        received: received.0,
        sender_said: &sender_said,
        receiver_said: &receiver_said,
        go_delivered,
        decided_seen: trigger.decided_seen.load(Ordering::Acquire),
        violations: Vec::new(),
    };
    if hung {
        judge.violations.push(format!(
            "still running after {HANG:?}: a hang (both killed)"
        ));
    }
    let owner = judge.owner();
    if let Some(owner) = owner {
        judge.memory(owner, &out, &shared.images[plan.image]);
    }
    if let Some(killed_at) = killed_at {
        let survivor_end = match plan.victim {
            Victim::Sender => received.1,
            Victim::Receiver => sent.1,
        };
        let took = survivor_end.saturating_duration_since(killed_at);
        if took > survivor_bound() {
            judge.violations.push(format!(
                "the survivor took {took:.1?} after the kill, over {:?}",
                survivor_bound()
            ));
        }
    }
    let _ = std::fs::remove_file(&out);
    let killed = [judge.sent, judge.received]
        .iter()
        .any(|s| s.signal() == Some(libc::SIGKILL));
    Ok(Ran {
        plan,
        killed,
        owner,
        violations: judge.violations,
    })
}

/// Waits for both children, each exit status with when it came; kills both after [`HANG`].
/// The victim is reaped only under the trigger's lock, which then forgets its pid.
fn wait_both(
    sender: &mut Kid,
    receiver: &mut Kid,
    began: Instant,
    trigger: &Trigger,
) -> ((ExitStatus, Instant), (ExitStatus, Instant), bool) {
    let mut ends: [Option<(ExitStatus, Instant)>; 2] = [None, None];
    let mut hung = false;
    loop {
        for (kid, end) in [&mut *sender, &mut *receiver]
            .into_iter()
            .zip(ends.iter_mut())
        {
            if end.is_some() {
                continue;
            }
            let mut victim = trigger
                .victim
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Ok(Some(status)) = kid.child.try_wait() {
                if *victim == Some(kid.pid) {
                    *victim = None;
                }
                *end = Some((status, Instant::now()));
            }
        }
        if let [Some(s), Some(r)] = ends {
            return (s, r, hung);
        }
        if began.elapsed() > HANG && !hung {
            hung = true;
            for (kid, end) in [&*sender, &*receiver].into_iter().zip(ends.iter()) {
                if end.is_none() {
                    kid.kill();
                }
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// What the children left, judged.
struct Judge<'a> {
    plan: ProcPlan,
    sent: ExitStatus,
    received: ExitStatus,
    sender_said: &'a str,
    receiver_said: &'a str,
    /// A go reached the receiver on channel 0.
    go_delivered: bool,
    /// A decided passed back on channel 0 before the kill.
    decided_seen: bool,
    violations: Vec<String>,
}

impl Judge<'_> {
    /// Who owns the guest, from the exit statuses; a violation for a status that is neither
    /// an exit code the tool documents nor the kill.
    fn owner(&mut self) -> Option<Owner> {
        let killed = |s: ExitStatus| s.signal() == Some(libc::SIGKILL);
        let (source, destination) = (self.sent, self.received);
        if killed(source) && killed(destination) {
            return None;
        }
        let send_code = source.code();
        let recv_code = destination.code();
        if !killed(source) && !matches!(send_code, Some(0 | 1)) {
            self.violations
                .push(format!("ramjet send ended {source}: {}", self.sender_said));
            return None;
        }
        if !killed(destination) && !matches!(recv_code, Some(0 | 1 | 3)) {
            self.violations.push(format!(
                "ramjet recv ended {destination}: {}",
                self.receiver_said
            ));
            return None;
        }
        let owner = if killed(source) {
            match recv_code {
                Some(1) => Owner::SourceGoneDiscarded,
                Some(3) => Owner::SourceGoneInDoubt,
                _ if self.go_delivered => Owner::SourceGoneRuns,
                _ => {
                    self.violations.push(format!(
                        "the source was killed before its go reached the destination, which \
                         runs the guest: {}",
                        self.receiver_said
                    ));
                    Owner::Nobody
                }
            }
        } else if killed(destination) {
            match send_code {
                Some(1) => Owner::DestinationGoneKept,
                _ => {
                    let unacknowledged = self.sender_said.contains("never acknowledged");
                    if !unacknowledged && !self.decided_seen {
                        self.violations.push(format!(
                            "the source handed over to a killed destination, acknowledged \
                             without a decided: {}",
                            self.sender_said
                        ));
                    }
                    Owner::DestinationKilledAfterHandover
                }
            }
        } else {
            match (send_code, recv_code) {
                (Some(1), Some(1)) => Owner::Source,
                (Some(0), Some(0)) => Owner::Destination,
                (Some(0), Some(3)) => Owner::DoubtHandedOver,
                (Some(1), Some(3)) => Owner::DoubtKept,
                (Some(1), _) => Owner::Both,
                _ => Owner::Nobody,
            }
        };
        match owner {
            Owner::Both => self.violations.push(format!(
                "the source kept the guest and the destination runs it: send said {}; recv \
                 said {}",
                self.sender_said, self.receiver_said
            )),
            Owner::Nobody if !killed(source) => self.violations.push(format!(
                "the source handed over and the destination discarded: send said {}; recv \
                 said {}",
                self.sender_said, self.receiver_said
            )),
            _ => {}
        }
        Some(owner)
    }

    /// A destination that runs the guest or keeps it in doubt wrote a complete copy: in a
    /// paused migration, byte-identical to the image.
    fn memory(&mut self, owner: Owner, out: &Path, image: &Path) {
        let kept = matches!(
            owner,
            Owner::Destination
                | Owner::DoubtHandedOver
                | Owner::DoubtKept
                | Owner::SourceGoneInDoubt
                | Owner::SourceGoneRuns
        );
        if !kept {
            return;
        }
        if matches!(
            owner,
            Owner::DoubtHandedOver | Owner::DoubtKept | Owner::SourceGoneInDoubt
        ) && !self.receiver_said.contains("in doubt: complete copy kept")
        {
            self.violations.push(format!(
                "in doubt, but recv did not say so: {}",
                self.receiver_said
            ));
        }
        let Ok(copy) = std::fs::read(out) else {
            self.violations
                .push(format!("{owner:?}, but recv wrote no {}", out.display()));
            return;
        };
        if copy.len() as u64 != IMAGE_BYTES {
            self.violations.push(format!(
                "{owner:?}, but recv's copy is {} bytes, not {IMAGE_BYTES}",
                copy.len()
            ));
        } else if self.plan.mode == Mode::Paused && std::fs::read(image).ok() != Some(copy) {
            self.violations
                .push(format!("{owner:?}, but recv's copy differs from the image"));
        }
    }
}

/// Runs by kill point and who owns the guest, and the violations.
#[derive(Default)]
struct Tally {
    rows: BTreeMap<(Victim, String), Row>,
    all: Row,
    runs: u64,
    violations: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Row {
    runs: u64,
    killed: u64,
    owners: [u64; 11],
}

impl Row {
    fn add(&mut self, ran: &Ran) {
        self.runs += 1;
        self.killed += u64::from(ran.killed);
        if let Some(owner) = ran.owner
            && let Some(i) = OWNERS.iter().position(|(_, o)| *o == owner)
        {
            self.owners[i] += 1;
        }
    }
}

impl Tally {
    fn add(&mut self, ran: &Ran) {
        self.runs += 1;
        let key = (ran.plan.victim, ran.plan.at.name());
        self.rows.entry(key).or_default().add(ran);
        self.all.add(ran);
        for v in &ran.violations {
            let v = format!("run {} ({:?}): {v}", ran.plan.run, ran.plan);
            eprintln!("stress: violation: {v}");
            self.violations.push(v);
        }
    }

    fn print(&self, seed: u64, elapsed: Duration) {
        print!("{:<20} {:>5} {:>6}", "killed at", "runs", "killed");
        for (heading, _) in OWNERS {
            print!(" {heading:>11}");
        }
        println!();
        let line = |name: &str, r: &Row| {
            print!("{name:<20} {:>5} {:>6}", r.runs, r.killed);
            for count in r.owners {
                print!(" {count:>11}");
            }
            println!();
        };
        for ((victim, at), row) in &self.rows {
            line(
                &format!("{}@{at}", format!("{victim:?}").to_lowercase()),
                row,
            );
        }
        line("all", &self.all);
        let in_doubt = [
            Owner::DoubtHandedOver,
            Owner::DoubtKept,
            Owner::SourceGoneInDoubt,
        ]
        .iter()
        .filter_map(|o| OWNERS.iter().position(|(_, x)| x == o))
        .map(|i| self.all.owners[i])
        .sum::<u64>();
        println!(
            "ownership: sgone = the sender was killed (the source never resumes), dgone = the \
             receiver was killed; dgone-after = the destination killed after the handover \
             ({in_doubt} in doubt); a + after the message: forwarded after the kill, - not"
        );
        println!(
            "{} runs in {:.1?}, seed {seed}: {} violations",
            self.runs,
            elapsed,
            self.violations.len()
        );
        for v in &self.violations {
            println!("violation: {v} (replay: --processes --seed {seed} --first <run> --runs 1)");
        }
    }
}

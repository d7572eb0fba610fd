//! One stress run: a sender and a receiver in this process, the tampering proxy between them,
//! the fault struck as the plan says, and what they left checked. Under `--tls` both ends use
//! the pass's [`Credentials`].

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use ramjet_dataplane::internals::wire::{FrameKind, Hello};
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE, RegionLayout};
use ramjet_dataplane::testkit::Workload;
use ramjet_dataplane::testkit::image::Rng;
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::transport::{Endpoint, Listener, Stream};
use ramjet_dataplane::{
    BoxError, CancelHandle, Error, Fact, FactSink, Guest, LiveOptions, PreSwitchover,
    ReceiveOptions, SendOptions, Sender, TlsClient, migrate_live, receive,
};

use super::check::{self, Evidence, Got, Sent, Verdict};
use super::creds::Credentials;
use super::plan::{Fault, Mode, Net, Plan, Stray, StrayWhen, Strike, When};
use super::proxy::{Passing, Proxy, Watch};

/// Each side's timeout for a socket operation.
pub(super) const TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a sender keeps delivering its go on new connections once channel 0 broke.
pub(super) const DECISION_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a receiver in doubt waits for the decision: a run in doubt costs the receiver its
/// timeout (to notice) and this.
pub(super) const IN_DOUBT_WAIT: Duration = Duration::from_secs(2);

/// How long a paused postcopy's sender waits for `recover`, and its receiver (a little longer)
/// for the reconnection.
const RECOVER_WAIT: Duration = Duration::from_secs(2);

/// How many times a run recovers a paused postcopy, as an operator would, before it leaves
/// it paused.
const RECOVERIES: usize = 4;

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

pub(super) fn endpoint(net: Net, tag: &str, run: u64) -> Endpoint {
    match net {
        Net::Tcp => Endpoint::Tcp(([127, 0, 0, 1], 0).into()),
        Net::Unix => Endpoint::Unix(std::env::temp_dir().join(format!(
            "ramjet-stress-{}-{run}-{tag}.sock",
            std::process::id()
        ))),
    }
}

/// What a run did.
pub(super) struct Ran {
    pub(super) verdict: Verdict,
    pub(super) struck: bool,
    pub(super) violations: Vec<String>,
}

/// What the sender left: its result, the device state it took, and its memory as it was when
/// the guest stopped, if the guest ran again after that (a live guest resumed on a failure).
struct Source {
    sent: Result<Sent, Error>,
    state: Option<Vec<u8>>,
    stopped: Option<GuestMemory>,
}

/// Runs one migration as `plan` says, with TLS on both ends if `creds` (the plan says so
/// too), and checks it.
pub(super) fn run_one(plan: &Plan, creds: Option<&Credentials>) -> anyhow::Result<Ran> {
    anyhow::ensure!(
        plan.tls == creds.is_some(),
        "run {}: a TLS plan needs credentials, and only it",
        plan.run
    );
    let (src, dst) = memories(plan)?;
    let receiver_listener = Listener::bind(&endpoint(plan.net, "r", plan.run))?;
    let real = receiver_listener.endpoint().clone();
    let hello_len = Hello::encoded_len(src.regions().len()) as u64;
    let strays = Strays::new(plan, &real, &dst.layout(), creds);
    let proxy = Proxy::start(
        Listener::bind(&endpoint(plan.net, "p", plan.run))?,
        real,
        plan,
        hello_len,
        TIMEOUT,
        strays.watch(),
    );
    let (source_facts, destination_facts) =
        (Arc::new(Facts::default()), Arc::new(Facts::default()));
    let receiver_cancel = CancelHandle::new();
    let guest_there = Reader::default();
    let receiver = start_receiver(
        receiver_listener,
        &dst,
        &destination_facts,
        &receiver_cancel,
        creds,
        (plan.mode == Mode::Postcopy).then_some(&guest_there),
    );
    if let Strike::Stray {
        kind,
        when: StrayWhen::Before,
    } = plan.strike
    {
        strays.fired.store(true, Ordering::Relaxed);
        if stray(
            kind,
            &strays.to,
            &strays.layout,
            plan.run,
            strays.intruder.clone(),
        ) {
            strays.admitted.store(true, Ordering::Relaxed);
        }
    }
    let cancel = CancelHandle::new();
    let canceller = arm_cancel(plan.strike, &cancel);
    let tls = creds.map(|c| c.client(plan.net));
    let source = send(
        &src,
        plan,
        proxy.endpoint(),
        &cancel,
        source_facts.sink(),
        tls,
    );
    let cancelled_in_time = cancel.is_cancelled();
    // A sender cancelled before it connected never comes: the operator cancels the receiver
    // too, rather than let it wait out its accept timeout.
    if matches!(plan.strike, Strike::Cancel(When::BeforeConnect)) {
        receiver_cancel.cancel();
    }
    let mut received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    // A paused postcopy keeps its missing pages absent while its guest may touch them: stop
    // the guest first, then let them go (which wakes it if it waits on one).
    let destination_started = guest_there.started();
    guest_there.quit();
    if let Err(Error::PostcopyPaused { absent, .. }) = &mut received {
        drop(absent.take());
    }
    guest_there.join();
    let struck = proxy.stop()
        || matches!(plan.strike, Strike::Refuse)
        || (plan.fault == Fault::Cancel && cancelled_in_time)
        || strays.fired.load(Ordering::Relaxed);
    strays.join();
    if let Some(canceller) = canceller {
        let _ = canceller.join();
    }
    let (verdict, mut violations) = check::check(&Evidence {
        plan,
        src: source.stopped.as_ref().unwrap_or(&src),
        dst: &dst,
        sent: &source.sent,
        source_state: source.state.as_deref(),
        received: &received,
        source_facts: &source_facts.all(),
        destination_facts: &destination_facts.all(),
        struck,
        destination_started,
    });
    if strays.admitted.load(Ordering::Relaxed) {
        violations.push(format!(
            "the receiver admitted a stray it must refuse ({:?})",
            plan.strike
        ));
    }
    Ok(Ran {
        verdict,
        struck,
        violations,
    })
}

/// A run's stray peer that comes at a message on channel 0: the proxy's watch starts it.
struct Strays {
    /// The receiver's own endpoint, where strays connect.
    to: Endpoint,
    layout: Vec<RegionLayout>,
    strike: Strike,
    run: u64,
    /// Under TLS, the intruder's credentials, for a stray that is a TLS peer.
    intruder: Option<TlsClient>,
    fired: Arc<AtomicBool>,
    /// A stray that must be refused was admitted.
    admitted: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Strays {
    fn new(
        plan: &Plan,
        to: &Endpoint,
        layout: &[RegionLayout],
        creds: Option<&Credentials>,
    ) -> Strays {
        let intruder = match plan.strike {
            Strike::Stray { kind, .. } => creds.and_then(|c| c.intruder(kind)),
            _ => None,
        };
        Strays {
            to: to.clone(),
            layout: layout.to_vec(),
            strike: plan.strike,
            run: plan.run,
            intruder,
            fired: Arc::default(),
            admitted: Arc::default(),
            thread: Arc::default(),
        }
    }

    /// The proxy's watch that starts the stray as its message passes.
    fn watch(&self) -> Option<Watch> {
        let Strike::Stray { kind, when } = self.strike else {
            return None;
        };
        let at = match when {
            StrayWhen::Before => return None,
            StrayWhen::During => (true, FrameKind::Pages),
            StrayWhen::After => (false, FrameKind::Ready),
        };
        let (to, layout, run) = (self.to.clone(), self.layout.clone(), self.run);
        let (fired, thread) = (Arc::clone(&self.fired), Arc::clone(&self.thread));
        let (admitted, intruder) = (Arc::clone(&self.admitted), self.intruder.clone());
        Some(Arc::new(move |passing: Passing| {
            if (passing.forward, passing.kind) == (at.0, Some(at.1))
                && !fired.swap(true, Ordering::Relaxed)
            {
                let (to, layout) = (to.clone(), layout.clone());
                let (admitted, intruder) = (Arc::clone(&admitted), intruder.clone());
                let stray = thread::spawn(move || {
                    if stray(kind, &to, &layout, run, intruder) {
                        admitted.store(true, Ordering::Relaxed);
                    }
                });
                *thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(stray);
            }
            true
        }))
    }

    fn join(&self) {
        let stray = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(stray) = stray {
            let _ = stray.join();
        }
    }
}

/// A stray peer: connects to the receiver at `to` and does what `kind` says; a receiver that
/// is gone is no matter. A stray that is a TLS peer comes with `intruder`, its credentials;
/// true if the receiver admitted it, which it must not.
fn stray(
    kind: Stray,
    to: &Endpoint,
    layout: &[RegionLayout],
    run: u64,
    intruder: Option<TlsClient>,
) -> bool {
    if let Some(tls) = intruder {
        return intrude(tls, to, layout);
    }
    let Ok(mut stream) = Stream::connect(to, TIMEOUT) else {
        return false;
    };
    let mut rng = Rng::new(run ^ 0x5354_5241_5900);
    let said = match kind {
        // A TLS peer without its credentials (not a TLS pass): nothing to do.
        Stray::Close | Stray::Untrusted | Stray::Unlisted => return false,
        Stray::Garbage => {
            // As long as a hello, and not ramjet's magic.
            let mut bytes: Vec<u8> = (0..Hello::FIXED_LEN)
                .map(|_| rng.next_u64().to_le_bytes()[0])
                .collect();
            bytes[0] = b'X';
            bytes
        }
        Stray::Http => b"GET / HTTP/1.1\r\nHost: ramjet\r\n\r\n".to_vec(),
        Stray::Layout => {
            let mut regions = layout.to_vec();
            if let Some(last) = regions.last_mut() {
                *last =
                    RegionLayout::new(last.id(), last.guest_base(), last.len() + PAGE_SIZE as u64);
            }
            let mut session = [0u8; 16];
            for byte in &mut session {
                *byte = rng.next_u64().to_le_bytes()[0];
            }
            Hello {
                flags: Default::default(),
                session,
                channel: 0,
                channels: 1,
                regions,
            }
            .encode()
        }
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    if stream.write_all(&said).is_ok() {
        // Whatever the receiver answers, until it closes.
        let mut buf = [0u8; 1024];
        while matches!(stream.read(&mut buf), Ok(1..)) {}
    }
    false
}

/// A stray that is a ramjet sender with TLS, for the receiver's memory layout, whose
/// certificate the receiver must refuse: it connects one channel (the TLS handshake, the
/// hello) and goes. True if the receiver admitted it.
fn intrude(tls: TlsClient, to: &Endpoint, layout: &[RegionLayout]) -> bool {
    let Ok(memory) = GuestMemory::anonymous_like(layout) else {
        return false;
    };
    let options = SendOptions {
        channels: 1,
        timeout: TIMEOUT,
        decision_timeout: DECISION_TIMEOUT,
        workers: 1,
        tls: Some(tls),
        ..SendOptions::default()
    };
    let admitted = Sender::connect(Arc::new(memory), to, &options, Arc::new(|_: Fact| {}));
    admitted.is_ok()
}

/// The source's memory, filled with the plan's image, and the destination's: a page larger
/// when the receiver is to refuse the layout.
fn memories(plan: &Plan) -> anyhow::Result<(Arc<GuestMemory>, Arc<GuestMemory>)> {
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
    Ok((src, dst))
}

/// The receiver's thread: it answers with the handover and the device state it got.
fn start_receiver(
    listener: Listener,
    dst: &Arc<GuestMemory>,
    facts: &Arc<Facts>,
    cancel: &CancelHandle,
    creds: Option<&Credentials>,
    postcopy: Option<&Reader>,
) -> JoinHandle<Result<Got, Error>> {
    let options = ReceiveOptions {
        cancel: cancel.clone(),
        timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT * 4),
        in_doubt_wait: IN_DOUBT_WAIT,
        workers: 2,
        tls: creds.map(Credentials::server),
        postcopy: postcopy.map(|reader| reader.starter(dst)),
        recover_wait: Some(RECOVER_WAIT + Duration::from_secs(1)),
        ..ReceiveOptions::default()
    };
    let (dst, sink) = (Arc::clone(dst), facts.sink());
    thread::spawn(move || {
        receive(&listener, dst, &options, sink).map(|r| Got {
            handover: r.handover,
            device_state: r.device_state,
        })
    })
}

/// A cancel the plan strikes before connecting (at once) or after a while (from a thread,
/// returned to be joined); one at the switchover is the sender's to strike.
fn arm_cancel(strike: Strike, cancel: &CancelHandle) -> Option<JoinHandle<()>> {
    match strike {
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
    }
}

/// Sends the plan's guest, paused or live, to the proxy at `to`, with `tls` if given.
fn send(
    src: &Arc<GuestMemory>,
    plan: &Plan,
    to: &Endpoint,
    cancel: &CancelHandle,
    sink: Arc<dyn FactSink>,
    tls: Option<TlsClient>,
) -> Source {
    let at_switchover =
        matches!(plan.strike, Strike::Cancel(When::Switchover)).then(|| cancel.clone());
    let options = SendOptions {
        channels: plan.channels,
        compression: plan.compression,
        timeout: TIMEOUT,
        decision_timeout: DECISION_TIMEOUT,
        workers: 2,
        cancel: cancel.clone(),
        tls,
        ..SendOptions::default()
    };
    match plan.mode {
        Mode::Paused => send_paused(src, to, &options, sink, at_switchover),
        Mode::Live | Mode::Postcopy => send_live(src, plan, to, &options, sink, at_switchover),
    }
}

/// A stopped guest: switchover first, then every page straight from the frozen memory.
fn send_paused(
    src: &Arc<GuestMemory>,
    to: &Endpoint,
    options: &SendOptions,
    sink: Arc<dyn FactSink>,
    cancel_at_switchover: Option<CancelHandle>,
) -> Source {
    const STATE: &[u8] = b"paused guest device state";
    // A cancel at the switchover strikes as the sender reports it, before the final round.
    let sink: Arc<dyn FactSink> = match cancel_at_switchover {
        Some(cancel) => Arc::new(move |fact: Fact| {
            if fact == Fact::Switchover {
                cancel.cancel();
            }
            sink.fact(fact);
        }),
        None => sink,
    };
    let sent = Sender::connect(Arc::clone(src), to, options, sink)
        .and_then(|sender| sender.migrate_paused(STATE, PreSwitchover::Skip))
        .map(|summary| Sent {
            device_state: STATE.to_vec(),
            acknowledged: summary.acknowledged,
        });
    Source {
        sent,
        state: Some(STATE.to_vec()),
        stopped: None,
    }
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
) -> Source {
    let (workload, mut source, _) =
        Workload::start_tracked(src, Some(plan.dirty_rate), ImageKind::Mixed, plan.run);
    let mut guest = Hooks {
        workload,
        memory: Arc::clone(src),
        cancel_at_switchover,
        handed_over: None,
        stopped: None,
    };
    let postcopy = plan.mode == Mode::Postcopy;
    let live = LiveOptions {
        max_rounds: Some(8),
        max_time: Some(Duration::from_secs(5)),
        postcopy_after_first_round: postcopy,
        ..LiveOptions::default()
    };
    let options = SendOptions {
        postcopy,
        recover_wait: Some(RECOVER_WAIT),
        ..options.clone()
    };
    // The operator of a postcopy run: says `recover` when it pauses.
    let (paused_tx, paused) = std::sync::mpsc::channel();
    let sink: Arc<dyn FactSink> = if postcopy {
        Arc::new(move |fact: Fact| {
            if matches!(fact, Fact::ChannelLost | Fact::Failed(_)) {
                let _ = paused_tx.send(());
            }
            sink.fact(fact);
        })
    } else {
        sink
    };
    let sent = Sender::connect(Arc::clone(src), to, &options, sink)
        .and_then(|sender| {
            let operator = postcopy.then(|| {
                let handle = sender.live_handle();
                thread::spawn(move || {
                    for _ in 0..RECOVERIES {
                        if paused.recv().is_err() {
                            return;
                        }
                        thread::sleep(Duration::from_millis(50));
                        handle.recover(None);
                    }
                })
            });
            let report = migrate_live(sender, source.as_mut(), &mut guest, &live);
            if let Some(operator) = operator {
                let _ = operator.join();
            }
            report
        })
        .and_then(|report| {
            let device_state = guest.handed_over.clone().ok_or_else(|| {
                Error::Config("the migration completed without device state".into())
            })?;
            Ok(Sent {
                device_state,
                acknowledged: report.summary.acknowledged,
            })
        });
    Source {
        sent,
        state: guest.handed_over.take(),
        stopped: guest.stopped.take(),
    }
}

/// The live guest's hooks: the workload's, plus a cancel as it pauses, a record of the device
/// state handed over, and a copy of its memory as it stopped, taken before it resumes.
struct Hooks {
    workload: Workload,
    memory: Arc<GuestMemory>,
    cancel_at_switchover: Option<CancelHandle>,
    handed_over: Option<Vec<u8>>,
    stopped: Option<GuestMemory>,
}

impl Guest for Hooks {
    fn pause(&mut self) -> Result<(), BoxError> {
        let paused = self.workload.pause();
        if let Some(cancel) = &self.cancel_at_switchover {
            cancel.cancel();
        }
        paused
    }

    fn device_state(&mut self) -> Result<Vec<u8>, BoxError> {
        let state = self.workload.device_state()?;
        self.handed_over = Some(state.clone());
        Ok(state)
    }

    fn resume(&mut self) {
        // The destination may hold what the guest was as it stopped, in doubt: keep that.
        if self.handed_over.is_some() {
            self.stopped = copy(&self.memory).ok();
        }
        self.workload.resume();
    }
}

/// A copy of `memory`.
fn copy(memory: &GuestMemory) -> Result<GuestMemory, BoxError> {
    let copy = GuestMemory::anonymous_like(&memory.layout())?;
    let mut buf = vec![0u8; 1 << 20];
    for (index, region) in memory.regions().iter().enumerate() {
        let len = region.layout().len();
        let mut at = 0;
        while at < len {
            let n = usize::try_from((len - at).min(buf.len() as u64))?;
            memory.read(index, at, &mut buf[..n])?;
            copy.write(index, at, &buf[..n])?;
            at += n as u64;
        }
    }
    Ok(copy)
}

/// The destination's guest in a postcopy run: a thread that reads every page of its memory
/// once, in a scattered order, so that many reads fault on pages still to come.
#[derive(Default, Clone)]
struct Reader {
    started: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Reader {
    /// The receiver's postcopy hook: starts the thread on `memory`.
    fn starter(&self, memory: &Arc<GuestMemory>) -> ramjet_dataplane::PostcopyRun {
        let (reader, memory) = (self.clone(), Arc::clone(memory));
        ramjet_dataplane::PostcopyRun::new(move |_| {
            reader.started.store(true, Ordering::SeqCst);
            let (quit, memory) = (Arc::clone(&reader.quit), Arc::clone(&memory));
            let thread = thread::spawn(move || {
                let pages = memory.total_pages();
                let mut page = [0u8; PAGE_SIZE];
                let stride = 7919 % pages.max(1);
                let mut at = 0;
                for _ in 0..pages {
                    if quit.load(Ordering::SeqCst) {
                        return;
                    }
                    let _ = memory.read(0, at * PAGE_SIZE as u64, &mut page);
                    at = (at + stride.max(1)) % pages;
                }
            });
            *reader.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(thread);
            Ok(())
        })
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Tells the thread to stop at its next page.
    fn quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
    }

    fn join(&self) {
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

//! One stress run: a sender and a receiver in this process, the tampering proxy between them,
//! the fault struck as the plan says, and what they left checked.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use ramjet_dataplane::internals::wire::Hello;
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::testkit::Workload;
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::transport::{Endpoint, Listener};
use ramjet_dataplane::{
    BoxError, CancelHandle, Error, Fact, FactSink, Guest, LiveOptions, PreSwitchover,
    ReceiveOptions, SendOptions, Sender, migrate_live, receive,
};

use super::check::{self, Evidence, Outcome};
use super::plan::{Fault, Mode, Net, Plan, Strike, When};
use super::proxy::Proxy;

/// Each side's timeout for a socket operation.
const TIMEOUT: Duration = Duration::from_millis(1500);

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
pub(super) struct Ran {
    pub(super) outcome: Outcome,
    pub(super) struck: bool,
    pub(super) violations: Vec<String>,
}

/// Runs one migration as `plan` says, and checks it.
pub(super) fn run_one(plan: &Plan) -> anyhow::Result<Ran> {
    let (src, dst) = memories(plan)?;
    let receiver_listener = Listener::bind(&endpoint(plan.net, "r", plan.run))?;
    let hello_len = Hello::encoded_len(src.regions().len()) as u64;
    let proxy = Proxy::start(
        Listener::bind(&endpoint(plan.net, "p", plan.run))?,
        receiver_listener.endpoint().clone(),
        plan,
        hello_len,
        TIMEOUT,
    );
    let (source_facts, destination_facts) =
        (Arc::new(Facts::default()), Arc::new(Facts::default()));
    let receiver = start_receiver(receiver_listener, &dst, &destination_facts);
    let cancel = CancelHandle::new();
    let canceller = arm_cancel(plan.strike, &cancel);
    let sent = send(&src, plan, proxy.endpoint(), &cancel, source_facts.sink());
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

/// The receiver's thread: it answers with the device state it got.
fn start_receiver(
    listener: Listener,
    dst: &Arc<GuestMemory>,
    facts: &Arc<Facts>,
) -> JoinHandle<Result<Vec<u8>, Error>> {
    let options = ReceiveOptions {
        timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT * 4),
        workers: 2,
        ..ReceiveOptions::default()
    };
    let (dst, sink) = (Arc::clone(dst), facts.sink());
    thread::spawn(move || receive(&listener, dst, &options, sink).map(|r| r.device_state))
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

/// Sends the plan's guest, paused or live, to the proxy at `to`.
fn send(
    src: &Arc<GuestMemory>,
    plan: &Plan,
    to: &Endpoint,
    cancel: &CancelHandle,
    sink: Arc<dyn FactSink>,
) -> Result<Vec<u8>, Error> {
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
    match plan.mode {
        Mode::Paused => send_paused(src, to, &options, sink, at_switchover),
        Mode::Live => send_live(src, plan, to, &options, sink, at_switchover),
    }
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
    let sender = Sender::connect(Arc::clone(src), to, options, sink)?;
    sender.migrate_paused(STATE, PreSwitchover::Skip)?;
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
    migrate_live(sender, source.as_mut(), &mut guest, &live)?;
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
        self.workload.resume();
    }
}

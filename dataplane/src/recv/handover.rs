//! The receiver's half of the handover (the protocol is in [`wire`](crate::wire)'s docs). Once
//! every page and the device state arrived and were verified, it says *ready* on channel 0 and
//! waits for the source's decision. It lets the guest run only on *go*; on *abort*, or the
//! sender's error, it discards. When channel 0 breaks first it is in doubt: the sender may have
//! decided either way, so it keeps the complete state, does not run it, and takes the decision
//! from a new connection of the same session, or from an operator ([`Operator`]), for at most
//! [`ReceiveOptions::in_doubt_wait`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use ramjet_control::Fact;

use super::accept::{Reply, Screened, Strays, Wait, screen};
use super::options::ReceiveOptions;
use crate::error::Error;
use crate::memory::RegionLayout;
use crate::session::{self, Counters, FactSink, Stop, Taken};
use crate::transport::{LinkReader, LinkWriter, Listener};
use crate::wire::{FrameHeader, FrameKind};

/// Who may run the guest after a receive that holds the complete, verified state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The source handed the guest over and said so (*go*): run it here.
    Go,
    /// An operator said the source handed it over ([`Operator::run_here`]): run it here.
    Operator,
    /// In doubt: the link broke after this side said *ready*, and neither the source's
    /// decision nor an operator's arrived within [`ReceiveOptions::in_doubt_wait`] (or the
    /// receive was cancelled while waiting). The source may have handed the guest over (then
    /// this is the only copy) or resumed it. Do not run it; keep the state, and let an operator
    /// decide from what the source reports: run it here if the source completed (handed
    /// over), discard it if the source failed (resumed).
    InDoubt,
}

impl Handover {
    /// Whether the guest may run here.
    pub fn may_run(self) -> bool {
        !matches!(self, Handover::InDoubt)
    }
}

const IDLE: u8 = 0;
const IN_DOUBT: u8 = 1;
const RUN: u8 = 2;
const DISCARD: u8 = 3;

/// An operator's word for a receiver in doubt (see [`Handover::InDoubt`]): put a clone in
/// [`ReceiveOptions::operator`] and keep one. It acts only while the receiver is in doubt; before,
/// the source alone decides, and afterwards the decision is made.
#[derive(Debug, Clone, Default)]
pub struct Operator {
    state: Arc<AtomicU8>,
}

impl Operator {
    /// A handle that has not decided anything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the receiver is in doubt now, waiting for a decision.
    pub fn is_in_doubt(&self) -> bool {
        self.state.load(Ordering::Acquire) == IN_DOUBT
    }

    /// The source handed the guest over (its own report says completed): the receiver in doubt
    /// completes with [`Handover::Operator`], and the guest may run here. Returns false, and
    /// does nothing, unless the receiver is in doubt.
    pub fn run_here(&self) -> bool {
        self.rule(RUN)
    }

    /// The source kept the guest (its own report says failed or cancelled, so it resumed):
    /// the receiver in doubt discards its copy and returns [`Error::Cancelled`]. Returns
    /// false, and does nothing, unless the receiver is in doubt.
    pub fn discard(&self) -> bool {
        self.rule(DISCARD)
    }

    fn rule(&self, ruling: u8) -> bool {
        self.state
            .compare_exchange(IN_DOUBT, ruling, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The operator's ruling, if one was made while in doubt.
    fn ruling(&self) -> Option<u8> {
        Some(self.state.load(Ordering::Acquire)).filter(|&s| s == RUN || s == DISCARD)
    }

    /// Ends the doubt for a decision of the receiver's own (the source's), unless the
    /// operator's ruling came first: returns that ruling then.
    fn settle(&self) -> Option<u8> {
        match self
            .state
            .compare_exchange(IN_DOUBT, IDLE, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => None,
            Err(ruling) => {
                self.state.store(IDLE, Ordering::Release);
                Some(ruling).filter(|&s| s == RUN || s == DISCARD)
            }
        }
    }
}

/// How the handover ended for the receiver.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The state is kept; the handover says whether it may run.
    Keep(Handover),
    /// The copy must not run: the source kept the guest, or the operator discarded it.
    Discard(Error),
}

/// What the handover needs of the receive session.
pub(super) struct Context<'a> {
    pub(super) listener: &'a Listener,
    pub(super) session: [u8; 16],
    pub(super) layout: Vec<RegionLayout>,
    pub(super) options: &'a ReceiveOptions,
    pub(super) stop: &'a Stop,
    pub(super) sink: &'a dyn FactSink,
    pub(super) counters: &'a Counters,
}

impl Context<'_> {
    fn log(&self, line: &str) {
        self.options.log.line(line);
    }

    /// Says *ready* on channel 0 (`writer`) and waits for the decision on `link`, then in
    /// doubt on the listener if channel 0 broke first.
    pub(super) fn hand_over(
        &self,
        writer: &mut dyn LinkWriter,
        link: &mut Option<Box<dyn LinkReader>>,
        ready: &[u8],
    ) -> Outcome {
        let timeout = self.options.timeout;
        // From ready on the source decides: a cancel no longer cuts the sockets. One that came
        // first still discards, since the sender has not seen ready.
        if !self.stop.commit() {
            return Outcome::Discard(self.stop.take_error());
        }
        if let Err(e) = writer.send(&[ready]) {
            // The sender acts only on a whole frame with its crc, and a failed send did not
            // put all of it on the wire: it cannot have seen *ready*, so it keeps the guest.
            return Outcome::Discard(Error::io(0, "sending ready", timeout, e));
        }
        self.counters.add_wire_bytes(ready.len() as u64);
        let why = match link.as_mut().map(|link| self.wait(&mut **link)) {
            Some(Ok(Taken::Decision(go))) => {
                let acknowledged = writer.send(&[&FrameHeader::decided(go)]);
                if acknowledged.is_ok() {
                    self.counters.add_wire_bytes(FrameHeader::LEN as u64);
                }
                return decided(go);
            }
            Some(Ok(Taken::Failed(message))) => return failed(&message),
            Some(Err(err)) => err.chain(),
            None => "channel 0 could not be read".to_owned(),
        };
        self.in_doubt(&why)
    }

    /// Waits on channel 0 for the sender's decision or its error.
    fn wait(&self, link: &mut dyn LinkReader) -> Result<Taken, Error> {
        let op = "waiting for the sender's decision";
        let timeout = self.options.timeout;
        let (header, payload) = session::read_control(&mut |buf| link.recv(buf))
            .map_err(|e| e.into_error(0, op, timeout))?;
        let taken = match header.kind {
            FrameKind::Decision => Taken::Decision(header.is_go()),
            FrameKind::Error => Taken::Failed(String::from_utf8_lossy(&payload).into_owned()),
            kind => {
                return Err(Error::protocol(
                    0,
                    format!("a {kind:?} frame arrived instead of the sender's decision"),
                ));
            }
        };
        self.counters
            .add_wire_bytes((FrameHeader::LEN + payload.len()) as u64);
        Ok(taken)
    }

    /// In doubt: keeps the state and takes the decision from a new connection of this session
    /// or from the operator, for at most `in_doubt_wait`.
    fn in_doubt(&self, why: &str) -> Outcome {
        let operator = &self.options.operator;
        operator.state.store(IN_DOUBT, Ordering::Release);
        self.sink.fact(Fact::InDoubt);
        let wait = self.options.in_doubt_wait;
        self.log(&format!(
            "in doubt after saying ready ({why}): the complete copy is kept and must not run \
             until the source's decision arrives; waiting up to {wait:?}"
        ));
        let deadline = Instant::now() + wait;
        loop {
            if let Some(ruling) = operator.ruling() {
                operator.state.store(IDLE, Ordering::Release);
                return ruled(ruling);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stop.is_cancelled() {
                if let Some(ruling) = operator.settle() {
                    return ruled(ruling);
                }
                let what = if left.is_zero() {
                    "no decision arrived in time"
                } else {
                    "the receive was cancelled"
                };
                self.log(&format!(
                    "in doubt: {what}; the complete copy is kept; the source's decision is \
                     unknown: run it only if the source handed over (its migration completed)"
                ));
                return Outcome::Keep(Handover::InDoubt);
            }
            let Some(taken) = self.next_decision(left) else {
                continue;
            };
            if let Some(ruling) = operator.settle() {
                return ruled(ruling);
            }
            return match taken {
                Taken::Decision(go) => {
                    self.log(&format!(
                        "in doubt resolved: the source's decision ({}) arrived on a new \
                         connection",
                        if go { "go" } else { "abort" }
                    ));
                    decided(go)
                }
                Taken::Failed(message) => failed(&message),
            };
        }
    }

    /// Waits up to `wait` for a connection of this session's sender and takes its decision.
    /// Strangers, and ramjet peers of another session or layout, are dropped with a log line;
    /// none of them ends the doubt, however many come.
    fn next_decision(&self, wait: Duration) -> Option<Taken> {
        let wait = Wait {
            deadline: Some(Instant::now() + wait),
            limit: wait,
            op: "waiting in doubt for the sender's decision",
            channel: 0,
        };
        // Counted per connection, so that no number of strays fails a receiver in doubt.
        let mut strays = Strays::new(self.options);
        let operator = &self.options.operator;
        let stopped = || self.stop.is_cancelled() || operator.ruling().is_some();
        let screened = match screen(self.listener, wait, self.options, &stopped, &mut strays) {
            Ok(screened) => screened,
            Err(Error::Timeout { .. } | Error::Cancelled) => return None,
            Err(err) => {
                self.log(&format!("in doubt: dropped a connection: {}", err.chain()));
                return None;
            }
        };
        let Screened {
            mut stream,
            hello,
            peer,
        } = screened;
        let problem = if hello.session != self.session {
            Some("it belongs to another migration than the one in doubt")
        } else if hello.regions != self.layout {
            Some("its memory layout differs")
        } else {
            None
        };
        if let Some(problem) = problem {
            let _ = strays.drop_stray(stream, &peer, problem, Reply::Refusal);
            return None;
        }
        match session::take(&mut stream, self.options.timeout.min(HELLO_TIMEOUT)) {
            Ok(taken) => Some(taken),
            Err(err) => {
                self.log(&format!(
                    "in doubt: dropped a connection from {peer}: {}",
                    err.chain()
                ));
                None
            }
        }
    }
}

/// How long a connection in doubt may take to greet and decide.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

fn decided(go: bool) -> Outcome {
    if go {
        Outcome::Keep(Handover::Go)
    } else {
        Outcome::Discard(Error::SourceKept {
            reason: "its decision was abort".to_owned(),
        })
    }
}

fn failed(message: &str) -> Outcome {
    Outcome::Discard(Error::SourceKept {
        reason: format!("it failed before handing over: {message}"),
    })
}

fn ruled(ruling: u8) -> Outcome {
    if ruling == RUN {
        Outcome::Keep(Handover::Operator)
    } else {
        Outcome::Discard(Error::Cancelled)
    }
}

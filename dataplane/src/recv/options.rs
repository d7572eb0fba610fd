//! What a receiver is told ([`ReceiveOptions`]) and what it reports ([`Received`]).

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::handover::{Handover, Operator};
use crate::session::{CancelHandle, Stats};
use crate::transport::Transport;

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// lz4 decode worker threads (at least 1).
    pub workers: usize,
    /// Limit for each read and write once connected: a sender that says nothing for this long
    /// fails the migration.
    pub timeout: Duration,
    /// How long to wait for the sender's first connection (`None`: forever, like
    /// `-incoming`).
    pub accept_timeout: Option<Duration>,
    /// How bytes move. The default, [`Auto`](crate::transport::Auto), is io_uring where the
    /// kernel allows it, else blocking sockets, chosen when the first channel is set up.
    pub transport: Arc<dyn Transport>,
    /// Cancels the session from another thread. Once this side said *ready*, a cancel no
    /// longer discards the copy (the source may have handed the guest over): the receive
    /// ends in doubt ([`Handover::InDoubt`]) instead, and the operator decides.
    pub cancel: CancelHandle,
    /// How long a receiver in doubt waits for the source's decision (which the source keeps
    /// trying to deliver for its [`SendOptions::decision_timeout`](crate::SendOptions)) or the
    /// operator's, before it gives up and returns [`Handover::InDoubt`].
    pub in_doubt_wait: Duration,
    /// The operator's word while in doubt.
    pub operator: Operator,
    /// Where the receiver's log lines go (connections it dropped, the doubt): nowhere by
    /// default, since the library never prints.
    pub log: Log,
}

/// A receiver's log: one line per event worth an operator's attention.
#[derive(Clone, Default)]
pub struct Log(Option<Arc<LogFn>>);

type LogFn = dyn Fn(&str) + Send + Sync;

impl Log {
    /// A log that hands each line to `f`.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Log(Some(Arc::new(f)))
    }

    /// Logs `line`.
    pub fn line(&self, line: &str) {
        if let Some(f) = &self.0 {
            f(line);
        }
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Log(..)"
        } else {
            "Log(none)"
        })
    }
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            workers: thread::available_parallelism().map_or(2, usize::from),
            timeout: Duration::from_secs(30),
            accept_timeout: None,
            transport: Arc::new(crate::transport::Auto),
            cancel: CancelHandle::new(),
            in_doubt_wait: Duration::from_secs(120),
            operator: Operator::new(),
            log: Log::default(),
        }
    }
}

/// What a receive that holds the complete, verified state produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Whether the guest may run here: always look before running it.
    pub handover: Handover,
    /// The sender's device-state blob.
    pub device_state: Vec<u8>,
    /// Rounds received.
    pub rounds: u32,
    /// Final counters.
    pub stats: Stats,
    /// From the first connection to the decision (or to giving up on it, in doubt).
    pub elapsed: Duration,
}

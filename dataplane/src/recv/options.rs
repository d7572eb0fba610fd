//! What a receiver is told ([`ReceiveOptions`]) and what it reports ([`Received`]).

use std::fmt;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::handover::{Handover, Operator};
use crate::session::{CancelHandle, MemoryTransfer, SameHost, Stats};
use crate::transport::Transport;

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// lz4 decode worker threads (at least 1).
    pub workers: usize,
    /// Limit for each read and write once connected: a sender that says nothing for this long
    /// fails the migration.
    pub timeout: Duration,
    /// How long to wait for the sender's first channel (`None`: forever, like `-incoming`).
    /// Each further channel must then connect within [`timeout`](Self::timeout) of the one
    /// before. Connections that are not the sender's never extend either wait.
    pub accept_timeout: Option<Duration>,
    /// How long a new connection may take to send its whole hello before it is dropped as a
    /// stranger, so that a stalled connection holds the real sender up for this long only.
    /// Never more than [`timeout`](Self::timeout) (a larger value counts as `timeout`); must be
    /// above zero.
    pub hello_timeout: Duration,
    /// How many connections that are not this migration's sender (port scanners, health
    /// checks, other programs, a sender of another migration) are dropped before the
    /// migration fails with [`Error::TooManyRefused`](crate::Error::TooManyRefused). 0: the
    /// first one fails it.
    pub max_refused: usize,
    /// Where the receiver tells about connections it dropped or refused and about a doubt,
    /// one line each; the library itself never prints. Default: nowhere.
    pub log: Log,
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
    /// TLS 1.3 on every connection (see [`tls`](crate::tls)): each must complete a handshake,
    /// proving itself with a client certificate the CA signed (and on the allow-list, if
    /// [`TlsServer::allow_subjects`](crate::TlsServer::allow_subjects) made one), before its
    /// hello is read; this receiver proves itself with its server certificate. `None`:
    /// plaintext.
    pub tls: Option<crate::tls::TlsServer>,
    /// Postcopy (QEMU's `postcopy-ram` on the destination): how to start the guest while pages
    /// are still missing. `None`: a sender that may switch to postcopy is refused.
    pub postcopy: Option<PostcopyRun>,
    /// How long a paused postcopy waits for its sender to reconnect before
    /// [`receive`](crate::receive) gives up and returns
    /// [`Error::PostcopyPaused`](crate::Error::PostcopyPaused) (the guest stays blocked on
    /// its missing pages). `None`: for ever, as QEMU does.
    pub recover_wait: Option<Duration>,
    /// Whether to take a same-host sender's memory by descriptor instead of receiving its
    /// pages (see [`SameHost`]). [`Auto`](SameHost::Auto), the default, takes it when the
    /// sender offers it (over a Unix socket) and this memory's regions are ramjet's own
    /// mappings: each is then replaced, at the same address, by the sender's memory mapped
    /// shared, and the guest's pointers stay valid. If the guest does not end up here (the
    /// source kept it, or the migration failed), its own memory is put back (its memfd or shared
    /// file with its content, or fresh memory for private memory). With
    /// [`On`](SameHost::On), a sender that does not offer its memory is refused; with
    /// [`Off`](SameHost::Off), the pages are always copied.
    pub same_host: SameHost,
}

/// The destination's hook for postcopy: called once the source handed the guest over with
/// pages still on their way, with the device state; it starts the guest (restores the device
/// state, runs the vCPUs) and returns. Pages the guest (or the hook itself) touches that are
/// not here yet fault, and the receiver fetches them: its fault service runs before the hook
/// is called. [`receive`](crate::receive) returns once every page is here.
/// An error fails the migration on this side (the source stays paused: the guest then runs
/// nowhere, as after a failed postcopy in QEMU).
#[derive(Clone)]
pub struct PostcopyRun(Arc<RunGuest>);

/// The guest starter inside a [`PostcopyRun`].
type RunGuest = dyn Fn(&[u8]) -> Result<(), crate::BoxError> + Send + Sync;

impl PostcopyRun {
    /// The hook `run`.
    pub fn new(run: impl Fn(&[u8]) -> Result<(), crate::BoxError> + Send + Sync + 'static) -> Self {
        PostcopyRun(Arc::new(run))
    }

    pub(crate) fn run(&self, device_state: &[u8]) -> Result<(), crate::BoxError> {
        (self.0)(device_state)
    }
}

impl fmt::Debug for PostcopyRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PostcopyRun(..)")
    }
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            workers: thread::available_parallelism().map_or(2, usize::from),
            timeout: Duration::from_secs(30),
            accept_timeout: None,
            hello_timeout: Duration::from_secs(5),
            max_refused: 64,
            log: Log::default(),
            transport: Arc::new(crate::transport::Auto),
            cancel: CancelHandle::new(),
            in_doubt_wait: Duration::from_secs(120),
            operator: Operator::new(),
            tls: None,
            postcopy: None,
            recover_wait: None,
            same_host: SameHost::Auto,
        }
    }
}

impl ReceiveOptions {
    /// The hello timeout in force: [`hello_timeout`](Self::hello_timeout), at most `timeout`.
    pub(super) fn hello_limit(&self) -> Duration {
        self.hello_timeout.min(self.timeout)
    }
}

/// Where a receiver's log lines go: a function of one line (no newline), called from the
/// receiving threads. Cheap to clone; the default drops every line.
///
/// ```
/// let log = ramjet_dataplane::Log::new(|line| eprintln!("ramjet: {line}"));
/// log.line("refused a connection from 192.0.2.7:51234: not a ramjet peer");
/// ```
#[derive(Clone)]
pub struct Log(Arc<dyn Fn(&str) + Send + Sync>);

impl Log {
    /// Sends every line to `f`.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Log {
        Log(Arc::new(f))
    }

    /// Logs one line.
    pub fn line(&self, line: &str) {
        (self.0)(line);
    }
}

impl Default for Log {
    /// Drops every line.
    fn default() -> Self {
        Log::new(|_| {})
    }
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Log(..)")
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
    /// What TLS settled on the channels (the same on each, the sender's subject included),
    /// `None` for plaintext.
    pub tls: Option<crate::tls::Negotiated>,
    /// What postcopy did, if the migration switched to it (the guest then ran here from the
    /// go on, and `elapsed` runs to the last page).
    pub postcopy: Option<crate::postcopy::PostcopyStats>,
    /// Whether the memory was handed over by descriptor (it now maps the sender's memory) or
    /// copied (and why).
    pub memory: MemoryTransfer,
}

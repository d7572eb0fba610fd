//! What a sender is told ([`SendOptions`]) and what it reports ([`RoundStats`], [`Summary`]).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::codec::Compression;
use crate::recv::Log;
use crate::session::{CancelHandle, MemoryTransfer, SameHost, Stats};
use crate::tls::{Negotiated, TlsClient};
use crate::transport::Transport;

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Number of channels (sockets), 1 to 64.
    pub channels: u16,
    /// Page compression.
    pub compression: Compression,
    /// Codec worker threads (at least 1).
    pub workers: usize,
    /// Limit for connecting, the handshake, each socket write and each wait on the receiver
    /// (its ready, its acknowledgement of the go).
    pub timeout: Duration,
    /// How bytes move. The default, [`Auto`](crate::transport::Auto), is io_uring where the
    /// kernel allows it, else blocking sockets, chosen when the first channel is set up.
    pub transport: Arc<dyn Transport>,
    /// Cancels the session from another thread.
    pub cancel: CancelHandle,
    /// The most bytes per second to send, every channel together (QEMU's `max-bandwidth`).
    pub max_bandwidth: Option<u64>,
    /// How long a sender that handed the guest over keeps trying to tell a receiver whose
    /// channel 0 broke, on new connections (the receiver waits in doubt meanwhile; keep this
    /// below its [`ReceiveOptions::in_doubt_wait`](crate::ReceiveOptions::in_doubt_wait)).
    pub decision_timeout: Duration,
    /// TLS 1.3 on every channel (see [`tls`](crate::tls)): the receiver must prove itself with
    /// a certificate for the endpoint's address (or [`TlsClient::with_hostname`]), and this
    /// sender proves itself with its client certificate. `None`: plaintext.
    pub tls: Option<TlsClient>,
    /// Whether the migration may switch to postcopy ([`Sender::postcopy`](crate::Sender::postcopy)):
    /// QEMU's `postcopy-ram` capability. It connects one more channel, the fault channel, on
    /// which the destination asks for the pages its guest faults on; the receiver must allow
    /// postcopy too ([`ReceiveOptions::postcopy`](crate::ReceiveOptions::postcopy)).
    pub postcopy: bool,
    /// How long a paused postcopy waits for
    /// [`LiveHandle::recover`](crate::LiveHandle::recover) before [`Postcopy::run`] gives up
    /// and returns (the guest stays paused: it runs nowhere until an operator recovers it by
    /// other means). `None`: for ever, as QEMU does.
    ///
    /// [`Postcopy::run`]: crate::Postcopy::run
    pub recover_wait: Option<Duration>,
    /// Whether to hand the guest's memory over by descriptor instead of copying it, to a
    /// receiver on this host (see [`SameHost`]). [`Auto`](SameHost::Auto), the default, does
    /// so over a Unix socket when the memory is shareable (memfd or shared file regions), TLS
    /// and postcopy are off, and the receiver takes it; otherwise it copies, and logs why when
    /// the endpoint is a Unix socket. [`Sender::memory_transfer`](crate::Sender::memory_transfer)
    /// says which it did.
    pub same_host: SameHost,
    /// Where the sender tells why it copies the memory where it could have handed it over.
    /// Default: nowhere.
    pub log: Log,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            channels: 2,
            compression: Compression::Auto,
            workers: thread::available_parallelism().map_or(2, usize::from),
            timeout: Duration::from_secs(30),
            transport: Arc::new(crate::transport::Auto),
            cancel: CancelHandle::new(),
            max_bandwidth: None,
            decision_timeout: Duration::from_secs(60),
            tls: None,
            postcopy: false,
            recover_wait: None,
            same_host: SameHost::Auto,
            log: Log::default(),
        }
    }
}

/// Whether a migration waits in `pre-switchover`, the guest paused and its memory frozen, until
/// told to go on ([`LiveHandle::proceed`](crate::LiveHandle::proceed)): QEMU's
/// `pause-before-switchover` capability, for management software that must act (say, on
/// storage) between the pause and the last round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreSwitchover {
    /// Go on at once.
    #[default]
    Skip,
    /// Wait for `proceed` (or a cancel, or a failure).
    Wait,
}

/// What one round sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    /// The round number, from 1.
    pub round: u32,
    /// Pages sent in it.
    pub pages: u64,
}

/// What a completed migration sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Rounds sent.
    pub rounds: u32,
    /// Final counters.
    pub stats: Stats,
    /// From connecting to `confirmed`.
    pub elapsed: Duration,
    /// When the receiver acknowledged the *go* (the guest may run there from then at the
    /// latest), or, unacknowledged, when the go was first sent.
    pub confirmed: Instant,
    /// Whether the receiver acknowledged the go. If not, it may be in doubt: holding the
    /// complete state without running it until an operator tells it this source handed over.
    /// Either way the guest belongs to the destination now and must not resume here.
    pub acknowledged: bool,
    /// What TLS settled on the channels (the same on each), `None` for plaintext.
    pub tls: Option<Negotiated>,
    /// What postcopy did, if the migration switched to it (then `confirmed` is when the
    /// destination started running the guest, and `elapsed` runs to the receiver's *done*).
    pub postcopy: Option<crate::postcopy::PostcopyStats>,
    /// Whether the memory was handed over by descriptor or copied (and why).
    pub memory: MemoryTransfer,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReceiveOptions;

    /// Making options sets nothing up: the transport is chosen (and io_uring probed) only
    /// when a session connects.
    #[test]
    fn default_options_leave_the_transport_to_be_chosen() {
        assert_eq!(format!("{:?}", SendOptions::default().transport), "Auto");
        assert_eq!(format!("{:?}", ReceiveOptions::default().transport), "Auto");
    }
}

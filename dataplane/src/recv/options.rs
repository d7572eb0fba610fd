//! What a receiver is told ([`ReceiveOptions`]) and what it reports ([`Received`]).

use std::sync::Arc;
use std::thread;
use std::time::Duration;

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
    /// Cancels the session from another thread.
    pub cancel: CancelHandle,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            workers: thread::available_parallelism().map_or(2, usize::from),
            timeout: Duration::from_secs(30),
            accept_timeout: None,
            transport: Arc::new(crate::transport::Auto),
            cancel: CancelHandle::new(),
        }
    }
}

/// What a completed receive produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The sender's device-state blob.
    pub device_state: Vec<u8>,
    /// Rounds received.
    pub rounds: u32,
    /// Final counters.
    pub stats: Stats,
    /// From the first connection to the confirmation.
    pub elapsed: Duration,
}

//! What every thread of a receive session shares.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use super::decode::LzBuf;
use crate::memory::ReceiveLease;
use crate::pool::Pool;
use crate::session::{Counters, FactSink, Stop};

/// How long a failed receiver keeps reading (and discarding) so that the sender gets its error
/// message instead of a connection reset.
pub(super) const LINGER: Duration = Duration::from_secs(1);

/// What every thread of a receive session shares.
pub(super) struct Shared {
    /// The memory, held exclusively: the only way to its pages as `&mut [u8]`.
    pub(super) lease: ReceiveLease,
    /// Per region, per page: the last round that wrote the page (0: never).
    pub(super) stamps: Vec<Vec<AtomicU32>>,
    /// Per region: whether it was all zero when the session started.
    pub(super) known_zero: Vec<bool>,
    pub(super) stop: Arc<Stop>,
    pub(super) counters: Arc<Counters>,
    pub(super) sink: Arc<dyn FactSink>,
    pub(super) channels: u16,
    /// Whether the migration may switch to postcopy.
    pub(super) postcopy: bool,
    /// Whether the memory is the sender's, taken by descriptor: then no page may arrive.
    pub(super) shared_memory: bool,
    pub(super) timeout: Duration,
    pub(super) pool: Pool<LzBuf>,
}

//! What both sides of a migration share: the fact sink (`sink.rs`), the stop switch and cancel
//! handle (`stop.rs`), the counters that fill `RamStats` (`stats.rs`), the handshake
//! (`handshake.rs`), the handover's decision frames (`decision.rs`), and how a session starts its threads.

mod decision;
mod handshake;
mod sink;
mod stats;
mod stop;

use std::thread::{self, JoinHandle};

use crate::error::Error;

pub(crate) use decision::{Taken, deliver, read_control, take};
pub(crate) use handshake::{
    Accepted, HelloError, accept_hello, greet, read_hello, read_memory, refuse, secure, session_id,
};
pub use sink::FactSink;
pub(crate) use sink::lock;
pub use stats::{Counters, Stats};
pub use stop::CancelHandle;
pub(crate) use stop::Stop;

/// Whether a migration between two processes on one host hands the guest's memory over by
/// descriptor instead of copying it (QEMU's `cpr-transfer`, Cloud Hypervisor's `local=on`):
/// over a Unix socket, when every region of the source is shareable (a memfd, or a file mapped
/// shared) and the receiver can map it in place of its own memory. Then no page is copied:
/// only the device state crosses, and the handover decides who runs the guest as always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SameHost {
    /// Hand the memory over where possible, else copy it (a sender says why in its
    /// [`Log`](crate::Log) when the endpoint is a Unix socket; [`MemoryTransfer`] always does).
    #[default]
    Auto,
    /// Hand it over, or fail the migration saying why not.
    On,
    /// Always copy.
    Off,
}

/// How the guest's memory reached the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryTransfer {
    /// Handed over by descriptor: no page was copied.
    Shared,
    /// Copied page by page; why it was not handed over.
    Copied(String),
}

/// Starts a thread of a session, named `name` (Linux shows the first 15 bytes, so names say
/// what the thread is and which channel or worker in that many: `ramjet-send-3`). A thread
/// that cannot be started fails the session with [`Error::Spawn`] naming `what`.
pub(crate) fn spawn(
    name: String,
    what: &'static str,
    stop: &Stop,
    f: impl FnOnce() + Send + 'static,
) -> Option<JoinHandle<()>> {
    match thread::Builder::new().name(name).spawn(f) {
        Ok(handle) => Some(handle),
        Err(source) => {
            stop.fail(Error::Spawn { what, source });
            None
        }
    }
}

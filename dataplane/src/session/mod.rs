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
    HelloError, accept_hello, greet, read_hello, refuse, secure, session_id,
};
pub use sink::FactSink;
pub(crate) use sink::lock;
pub use stats::{Counters, Stats};
pub use stop::CancelHandle;
pub(crate) use stop::Stop;

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

//! Transports: where channels connect ([`Endpoint`]), the sockets ([`Stream`], [`Listener`]),
//! and how bytes move over a connected channel ([`Transport`], [`LinkWriter`], [`LinkReader`]).
//!
//! [`Uring`] moves them with io_uring, lending each buffer to the kernel for one call only; how,
//! and why that keeps buffers in flight safe, is in the docs of `transport/uring/mod.rs`.
//! [`Blocking`] uses plain `std` sockets with vectored reads and writes: it is the reference the
//! io_uring transport is tested against, and the fallback where io_uring cannot be set up
//! ([`best`] says why). [`Auto`], the default, picks between them at the first connection.

mod blocking;
mod conn;
mod endpoint;
pub(crate) mod fds;
mod link;
mod uring;

use std::io;
use std::sync::{Arc, OnceLock};

pub use blocking::Blocking;
pub(crate) use conn::Conn;
pub use endpoint::{Endpoint, Listener, Stream};
pub(crate) use endpoint::{Queue, ReadStop, STEP, Wake, queued, read_stepped};
pub use link::{LinkReader, LinkWriter, Transport};
pub use uring::{Unavailable, Uring, ZeroCopy};

pub use crate::arena::Arena;

/// The best transport this machine supports: io_uring, or the blocking one with the reason
/// io_uring cannot be used. Probes the kernel (sets up a ring) at every call; [`Auto`] asks once.
pub fn best() -> (Arc<dyn Transport>, Option<Unavailable>) {
    match Uring::probe() {
        Ok(()) => (Arc::new(Uring::default()), None),
        Err(why) => (Arc::new(Blocking), Some(why)),
    }
}

/// The default transport: io_uring where this kernel allows it, else the blocking one, decided
/// when a channel is first set up (once per process, by [`best`]), not when the options that
/// hold it are made. [`Auto::unavailable`] says why io_uring is not used, if it is not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Auto;

impl Auto {
    /// The transport it stands for (probing the kernel on the first call).
    fn chosen() -> &'static (Arc<dyn Transport>, Option<Unavailable>) {
        static CHOSEN: OnceLock<(Arc<dyn Transport>, Option<Unavailable>)> = OnceLock::new();
        CHOSEN.get_or_init(best)
    }

    /// Why io_uring cannot be used here (`None`: it is used).
    pub fn unavailable() -> Option<&'static Unavailable> {
        Self::chosen().1.as_ref()
    }
}

impl Transport for Auto {
    fn name(&self) -> &'static str {
        Self::chosen().0.name()
    }

    fn split(&self, stream: &Stream) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
        Self::chosen().0.split(stream)
    }

    fn split_copied(
        &self,
        stream: &Stream,
    ) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
        Self::chosen().0.split_copied(stream)
    }
}

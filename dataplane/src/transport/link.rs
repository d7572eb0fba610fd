//! How bytes move over a connected channel: a [`Transport`] splits a [`Stream`] into the two
//! halves of one channel, a [`LinkWriter`] and a [`LinkReader`].

use std::fmt;
use std::io::{self, IoSliceMut};
use std::sync::Arc;

use super::endpoint::Stream;
use crate::arena::Arena;

/// The sending half of a channel.
pub trait LinkWriter: Send {
    /// Writes every byte of `bufs`, in order, before returning.
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()>;

    /// Offers the arena that most buffers passed to [`send`](Self::send) come from, for the
    /// link to register with the kernel (and keep alive). Links that cannot use it ignore it.
    fn register(&mut self, arena: &Arc<Arena>) -> io::Result<()> {
        let _ = arena;
        Ok(())
    }
}

/// The receiving half of a channel.
pub trait LinkReader: Send {
    /// Fills `buf` completely; `UnexpectedEof` if the peer closes first.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<()>;

    /// Fills every buffer of `bufs` completely, in order (page payloads straight into guest
    /// memory).
    fn recv_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()>;
}

/// A way to move bytes over connected channels.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Its name, for messages.
    fn name(&self) -> &'static str;

    /// Splits a connected stream into the writing and reading halves of one channel.
    fn split(&self, stream: &Stream) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)>;
}

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

    /// Whether its sends are zero-copy (the kernel reads the caller's buffers in place).
    fn zero_copy(&self) -> bool {
        false
    }

    /// Bytes it took that the peer has not yet acknowledged (TCP's `SIOCOUTQ`, see `tcp(7)`).
    /// Bytes sent less its growth are what the link carried, where a send's own time tells
    /// only how fast the socket's buffer took them. `None` where the link cannot tell (a Unix
    /// socket's `SIOCOUTQ` counts the memory its buffers take, not bytes).
    fn in_flight(&self) -> Option<u64> {
        None
    }

    /// Writes every byte of `bufs`, in order, like [`send`](Self::send), but a zero-copy link
    /// returns once the kernel has taken them, while it still reads them in place (until the
    /// peer acknowledged them, on TCP): the next send can go at once, instead of a round trip
    /// later. The send gets the next ticket ([`lent`](Self::lent) tells it, after the call).
    ///
    /// # Safety
    ///
    /// Every byte of `bufs` must stay valid and unchanged until [`released`](Self::released)
    /// returns the send's ticket or a later one, whether the send succeeded or failed; if the
    /// link is dropped before that, it must not be reused (a caller may still let bytes change
    /// whose later sending no longer matters: the kernel took its own references to the pages
    /// before the call returned, so nothing is freed under it).
    unsafe fn send_lent(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        self.send(bufs)
    }

    /// The ticket of the last [`send_lent`](Self::send_lent) (0 before the first).
    fn lent(&self) -> u64 {
        0
    }

    /// Every lent send up to this ticket is done with its buffers. Does not wait.
    fn released(&mut self) -> u64 {
        u64::MAX
    }

    /// Waits until every lent send up to `ticket` is done with its buffers, for at most the
    /// link's timeout (then `TimedOut`).
    fn wait_released(&mut self, ticket: u64) -> io::Result<()> {
        let _ = ticket;
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

    /// Reads at least `at_least` bytes into the start of `buf` (`at_least` is at least 1 and
    /// at most `buf.len()`), and as many more as have already arrived, up to `buf.len()`; how
    /// many. Fewer only if the peer closed first: then 0 if nothing came. For readers that read
    /// ahead of what they parse (TLS records). The default reads exactly `at_least`.
    fn recv_some(&mut self, buf: &mut [u8], at_least: usize) -> io::Result<usize> {
        let at_least = at_least.clamp(1, buf.len().max(1)).min(buf.len());
        match self.recv(&mut buf[..at_least]) {
            Ok(()) => Ok(at_least),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// A way to move bytes over connected channels.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Its name, for messages.
    fn name(&self) -> &'static str;

    /// Splits a connected stream into the writing and reading halves of one channel.
    fn split(&self, stream: &Stream) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)>;

    /// [`split`](Self::split), for a channel whose writer is only ever given buffers of its
    /// own (TLS records it sealed): zero-copy sends gain nothing there, so transports that have
    /// them leave them off. The default splits as usual.
    fn split_copied(
        &self,
        stream: &Stream,
    ) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
        self.split(stream)
    }
}

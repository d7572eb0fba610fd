//! The stop switch of a session ([`Stop`]) and the caller's handle on it ([`CancelHandle`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ramjet_control::Fact;

use super::sink::{FactSink, lock};
use crate::error::Error;
use crate::transport::{Queue, Stream, queued};

/// The stop switch of one session: whether it stopped, why, and the sockets to shut down.
#[derive(Debug, Default)]
pub(crate) struct Stop {
    stopped: AtomicBool,
    cancelled: AtomicBool,
    /// The handover is under way (see [`Stop::commit`]): a cancel no longer shuts sockets.
    /// Taken with `cancel` under this lock, so that one of the two comes first.
    committed: Mutex<bool>,
    error: Mutex<Option<Error>>,
    streams: Mutex<Vec<Stream>>,
}

impl Stop {
    /// Whether the session must stop (cancelled or failed).
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Records `err` as the reason, unless a better one is known, and stops. The sockets stay
    /// open so that an error message from the peer can still be read and ours sent; the
    /// session's clean-up shuts them down.
    pub(crate) fn fail(&self, err: Error) {
        {
            let mut slot = lock(&self.error);
            let replace = match &*slot {
                None => !self.cancelled.load(Ordering::Acquire),
                Some(old) => err.explains(old),
            };
            if replace {
                *slot = Some(err);
            }
        }
        self.stopped.store(true, Ordering::Release);
    }

    /// Stops at once: every socket is shut down so that blocked reads and writes return. Once
    /// the handover is under way ([`Stop::commit`]) it only records the cancel and stops
    /// nothing: the sockets carry the handover (and a postcopy), which no cancel can take back.
    pub(crate) fn cancel(&self) {
        let committed = lock(&self.committed);
        self.cancelled.store(true, Ordering::Release);
        if !*committed {
            self.stopped.store(true, Ordering::Release);
            self.shutdown_all();
        }
    }

    /// Enters the handover, after which a cancel no longer shuts the sockets down (a sender
    /// that committed, a receiver about to say ready). Returns false, and changes nothing, if
    /// the session has already stopped: then it must fail instead.
    pub(crate) fn commit(&self) -> bool {
        let mut committed = lock(&self.committed);
        if self.is_stopped() {
            return false;
        }
        *committed = true;
        true
    }

    /// Whether a cancel stopped the session (before any error).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) && lock(&self.error).is_none()
    }

    /// Keeps a handle to `stream` so that a stop can shut it down; shuts it down at once if
    /// the session was cancelled already.
    pub(crate) fn register(&self, stream: &Stream) -> std::io::Result<()> {
        let clone = stream.try_clone()?;
        if self.cancelled.load(Ordering::Acquire) {
            clone.shutdown();
        }
        lock(&self.streams).push(clone);
        Ok(())
    }

    /// Bytes written to the registered sockets that their peers have not taken yet.
    pub(crate) fn unsent(&self) -> u64 {
        lock(&self.streams)
            .iter()
            .filter_map(|s| queued(s.as_raw_fd(), Queue::Out).ok())
            .sum()
    }

    /// Shuts down every registered socket.
    pub(crate) fn shutdown_all(&self) {
        for stream in lock(&self.streams).iter() {
            stream.shutdown();
        }
    }

    /// Shuts down and closes every registered socket: the session is over, and the handle
    /// (which the caller may keep) must not hold its file descriptors.
    pub(crate) fn close_all(&self) {
        for stream in lock(&self.streams).drain(..) {
            stream.shutdown();
        }
    }

    /// The message of the error that stopped the session, without taking it.
    pub(crate) fn reason(&self) -> String {
        lock(&self.error)
            .as_ref()
            .map_or_else(|| Error::Cancelled.chain(), Error::chain)
    }

    /// Whether the error that stopped the session is the peer's own (which it need not be
    /// told about).
    pub(crate) fn peer_failed(&self) -> bool {
        matches!(&*lock(&self.error), Some(Error::PeerFailed { .. }))
    }

    /// The reason the session stopped: the first error, or [`Error::Cancelled`].
    pub(crate) fn take_error(&self) -> Error {
        lock(&self.error).take().unwrap_or(Error::Cancelled)
    }

    /// Ends a stopped session whose threads and sockets are all gone: reports `failed` with
    /// the reason (unless it was cancelled) and then `drained`, and returns the reason.
    pub(crate) fn end(&self, sink: &dyn FactSink) -> Error {
        let err = self.take_error();
        if !err.is_cancelled() {
            sink.fact(Fact::Failed(err.chain()));
        }
        sink.fact(Fact::Drained);
        err
    }
}

/// Cancels a send or receive session from any thread: every worker and socket stops promptly,
/// the session returns [`Error::Cancelled`] and reports `drained` (not `failed`). Create one,
/// put it in the session's options, keep a clone. One handle serves one session.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle {
    stop: Arc<Stop>,
}

impl CancelHandle {
    /// A handle that has not cancelled anything yet.
    pub fn new() -> Self {
        CancelHandle::default()
    }

    /// Cancels the session. Once the handover is under way (the receiver holds everything)
    /// it no longer stops the migration, since the source decides and its decision stands: a
    /// sender goes on handing over; a receiver waits for the decision and, if it is in doubt,
    /// stops waiting and keeps its copy ([`Handover::InDoubt`](crate::Handover::InDoubt)).
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Whether [`CancelHandle::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.stop.cancelled.load(Ordering::Acquire)
    }

    pub(crate) fn stop(&self) -> Arc<Stop> {
        Arc::clone(&self.stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_error_wins_unless_the_peer_explains_it() {
        let stop = Stop::default();
        assert!(!stop.is_stopped());
        stop.fail(Error::Closed {
            channel: 1,
            op: "sending frames",
        });
        stop.fail(Error::protocol(0, "later"));
        assert!(stop.is_stopped() && !stop.is_cancelled());
        stop.fail(Error::PeerFailed {
            peer: "receiver",
            message: "checksum mismatch".into(),
        });
        assert_eq!(
            stop.take_error().to_string(),
            "the receiver failed: checksum mismatch"
        );
    }

    #[test]
    fn a_cancel_is_not_an_error_but_an_earlier_error_stands() {
        let stop = Stop::default();
        stop.cancel();
        stop.fail(Error::protocol(0, "broken by the cancel"));
        assert!(stop.is_cancelled());
        assert!(stop.take_error().is_cancelled());

        let handle = CancelHandle::new();
        handle.stop().fail(Error::protocol(0, "first"));
        handle.cancel();
        assert!(handle.is_cancelled());
        assert!(!handle.stop().is_cancelled());
        assert_eq!(handle.stop().take_error().to_string(), "channel 0: first");
    }

    /// A cancel before the handover stops everything; once the handover is under way it is
    /// recorded but shuts no socket; and a stop that came first refuses the commit.
    #[test]
    fn a_cancel_cannot_take_back_a_handover() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let stop = Stop::default();
        stop.register(&Stream::Unix(ours)).expect("register");
        assert!(stop.commit());
        stop.cancel();
        assert!(stop.is_cancelled());
        assert!(!stop.is_stopped(), "the session goes on");
        theirs.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let still_open = matches!(
            theirs.read(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        assert!(still_open, "the cancel shut a socket of the handover");

        let stopped = Stop::default();
        stopped.cancel();
        assert!(!stopped.commit(), "a cancel that came first wins");
    }
}

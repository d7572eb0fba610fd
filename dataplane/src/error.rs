//! The sessions' error: what ended a migration, with the channel it happened on.

use std::fmt::Write as _;
use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::dirty::DirtyError;
use crate::memory::MemoryError;
use crate::wire::DecodeError;

/// An error from the embedder's code (a [`Guest`](crate::Guest) hook, a dirty log read), kept
/// with its own chain of causes.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a send or receive session failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The options make no sense (zero channels, say).
    #[error("invalid options: {0}")]
    Config(String),
    /// Connecting a channel failed.
    #[error("channel {channel}: cannot connect to {endpoint}")]
    Connect {
        /// The channel.
        channel: u16,
        /// Where to.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Binding or accepting failed.
    #[error("cannot listen on {endpoint}")]
    Listen {
        /// Where.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A channel's TLS handshake failed: the receiver's certificate, or this sender's,
    /// was refused, or one end does not use TLS.
    #[error("channel {channel}: {reason}")]
    Tls {
        /// The channel.
        channel: u16,
        /// Why, in words.
        reason: String,
    },
    /// A read or write failed.
    #[error("channel {channel}: {op} failed")]
    Io {
        /// The channel.
        channel: u16,
        /// What was being done, e.g. "receiving a frame header".
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer stopped answering.
    #[error("channel {channel}: timed out after {timeout:?} {op}")]
    Timeout {
        /// The channel.
        channel: u16,
        /// What was being waited for.
        op: &'static str,
        /// The timeout in force.
        timeout: Duration,
    },
    /// The peer closed the connection too early.
    #[error("channel {channel}: the peer closed the connection while {op}")]
    Closed {
        /// The channel.
        channel: u16,
        /// What was being done.
        op: &'static str,
    },
    /// Bytes that are not valid protocol (corruption, another program, a hostile peer).
    #[error("channel {channel}: invalid data from the peer")]
    Decode {
        /// The channel.
        channel: u16,
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// Valid frames in an invalid order or with invalid content.
    #[error("channel {channel}: {problem}")]
    Protocol {
        /// The channel.
        channel: u16,
        /// What was wrong.
        problem: String,
    },
    /// The receiver refused the hello.
    #[error("channel {channel}: the receiver refused the connection: {reason}")]
    Refused {
        /// The channel.
        channel: u16,
        /// The receiver's reason.
        reason: String,
    },
    /// More connections than [`max_refused`](crate::ReceiveOptions::max_refused) were not
    /// this migration's sender (strangers, or channels of another migration).
    #[error(
        "refused {count} connections that were not this migration's sender (at most {limit} \
         are tolerated); the last: {last}"
    )]
    TooManyRefused {
        /// Connections refused, this one included.
        count: usize,
        /// The limit.
        limit: usize,
        /// Who the last one was and why it was refused.
        last: String,
    },
    /// The peer reported that it failed.
    #[error("the {peer} failed: {message}")]
    PeerFailed {
        /// "sender" or "receiver".
        peer: &'static str,
        /// Its message.
        message: String,
    },
    /// The source kept the guest after this receiver said *ready*: it decided to resume it
    /// (its decision was *abort*, or it failed before deciding). The received copy must not
    /// run.
    #[error("the source kept the guest ({reason}); the received copy is discarded")]
    SourceKept {
        /// What the source said.
        reason: String,
    },
    /// Guest memory access failed (a page outside guest memory, say).
    #[error("channel {channel}: guest memory")]
    Memory {
        /// The channel.
        channel: u16,
        /// What was wrong.
        #[source]
        source: MemoryError,
    },
    /// The guest memory cannot take part: a sender froze it, or a receive session writes it.
    #[error("the guest memory is in use by another session")]
    MemoryInUse(#[source] MemoryError),
    /// Dirty pages could not be tracked or harvested.
    #[error("dirty page tracking failed")]
    Dirty(#[source] DirtyError),
    /// The embedder's guest hook failed.
    #[error("the guest could not {op}")]
    Guest {
        /// What it was asked to do.
        op: &'static str,
        /// The hook's error.
        #[source]
        source: BoxError,
    },
    /// The live migration stopped converging and the stall policy says to fail.
    #[error(
        "the migration does not converge: {remaining} bytes were still dirty after {rounds} \
         rounds (the guest dirties {dirty_rate} bytes/s, the link moves {bandwidth} bytes/s)"
    )]
    Stalled {
        /// Rounds sent.
        rounds: u32,
        /// Bytes dirty at the last sync.
        remaining: u64,
        /// The guest's dirty rate, bytes per second.
        dirty_rate: u64,
        /// The measured bandwidth, bytes per second.
        bandwidth: u64,
    },
    /// Postcopy cannot run on this side (the memory or the kernel cannot do it), or placing
    /// a page failed.
    #[error("postcopy failed")]
    Postcopy(#[source] crate::postcopy::PlaceError),
    /// Postcopy paused: a link broke (or the destination failed) after the guest was handed
    /// over, and no recovery came in time. The guest's memory is split between the two sides,
    /// so neither may run it on its own: the source keeps its frozen memory, the destination
    /// what it placed.
    #[error(
        "postcopy is paused: the guest runs on the destination but its memory is split between \
         both sides"
    )]
    PostcopyPaused {
        /// Why it paused.
        #[source]
        source: Box<Error>,
        /// On the destination: the pages still missing, kept absent (a thread touching one
        /// waits) for as long as this lives. Drop it only once the guest running on that
        /// memory has stopped: the kernel would then fill what is missing with zeros.
        absent: Option<crate::postcopy::AbsentPages>,
    },
    /// A migration in postcopy was paused on request (`migrate-pause`).
    #[error("paused on request")]
    Paused,
    /// The frame buffers could not be mapped.
    #[error("cannot map the frame buffers")]
    Buffers(#[source] io::Error),
    /// The session already ended (completed, failed or cancelled).
    #[error("the migration session has already ended")]
    Ended,
    /// The session was cancelled.
    #[error("the migration was cancelled")]
    Cancelled,
    /// A bug in ramjet, not the peer's doing: one of the session's own threads or queues
    /// stopped when it must not.
    #[error("channel {channel}: internal error: {what}")]
    Internal {
        /// The channel.
        channel: u16,
        /// What broke.
        what: &'static str,
    },
    /// A worker thread could not be started.
    #[error("cannot start a {what} thread")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Whether this is a checksum mismatch (data corrupted in transit).
    pub fn is_checksum(&self) -> bool {
        matches!(self, Error::Decode { source, .. } if source.is_checksum())
    }

    /// Whether the peer stopped answering.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether TLS ended it: a handshake refused (a certificate, an end without TLS) or a
    /// record that failed to open (tampered with on the way, say).
    pub fn is_tls(&self) -> bool {
        match self {
            Error::Tls { .. } => true,
            Error::Io { source, .. } => source
                .get_ref()
                .is_some_and(|e| e.is::<crate::tls::RecordError>()),
            _ => false,
        }
    }

    /// Whether this is a cancellation rather than a failure.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Error::Cancelled)
    }

    /// The message with every cause, `outer: inner: innermost`, for a `failed` fact.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let _ = write!(text, ": {cause}");
            source = cause.source();
        }
        text
    }

    /// Whether this error explains `earlier`: the peer's own failure message beats the broken
    /// connection it caused on our side.
    pub(crate) fn explains(&self, earlier: &Error) -> bool {
        matches!(self, Error::PeerFailed { .. })
            && matches!(
                earlier,
                Error::Io { .. } | Error::Closed { .. } | Error::Timeout { .. }
            )
    }

    /// Classifies an I/O error on `channel` while doing `op`.
    pub(crate) fn io(channel: u16, op: &'static str, timeout: Duration, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
                channel,
                op,
                timeout,
            },
            io::ErrorKind::UnexpectedEof => Error::Closed { channel, op },
            _ => Error::Io {
                channel,
                op,
                source,
            },
        }
    }

    pub(crate) fn protocol(channel: u16, problem: impl Into<String>) -> Self {
        Error::Protocol {
            channel,
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_read_as_one_message() {
        let err = Error::Decode {
            channel: 2,
            source: DecodeError::Checksum {
                what: "frame",
                expected: 1,
                actual: 2,
            },
        };
        assert!(err.is_checksum());
        assert_eq!(
            err.chain(),
            "channel 2: invalid data from the peer: frame checksum mismatch: header says \
             0x00000001, bytes give 0x00000002"
        );
        let timeout = Error::io(
            0,
            "waiting for the hello",
            Duration::from_secs(1),
            io::ErrorKind::WouldBlock.into(),
        );
        assert!(timeout.is_timeout());
        assert_eq!(
            timeout.to_string(),
            "channel 0: timed out after 1s waiting for the hello"
        );
        let eof = Error::io(
            1,
            "receiving a frame",
            Duration::ZERO,
            io::ErrorKind::UnexpectedEof.into(),
        );
        assert_eq!(
            eof.to_string(),
            "channel 1: the peer closed the connection while receiving a frame"
        );
    }
}

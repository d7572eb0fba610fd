//! The per-channel handshake, both halves: the sender [greets](greet) with a [`Hello`] and
//! reads the receiver's verdict; the receiver [reads the hello](read_hello), bounded by a
//! deadline, and [accepts] or [refuses] it with a [`HelloReply`]. The bytes are
//! [`wire`](crate::wire)'s.
//!
//! [accepts]: accept_hello
//! [refuses]: refuse

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::tls::TlsClient;
use crate::transport::{Conn, Endpoint, ReadStop, Stream};
use crate::wire::{DecodeError, Hello, HelloReply, MAGIC, MemoryFds, Verdict};

/// A new migration's session id, the same on each of its channels, so a receiver can tell its
/// channels from another migration's. Not a secret: only distinct. All of its entropy comes
/// from `RandomState`'s per-process random keys (fresh for each hasher); the time hashed in
/// with them only makes two ids of one process differ further.
pub(crate) fn session_id() -> [u8; 16] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let started = Instant::now();
    let mut id = [0u8; 16];
    for half in id.chunks_exact_mut(8) {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(started.elapsed().as_nanos());
        half.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    id
}

/// The sender's first step on a new connection `stream` to `endpoint` for `channel`: with
/// `tls`, the TLS handshake (giving up early once `stopped` says so); without, nothing.
pub(crate) fn secure(
    mut stream: Stream,
    endpoint: &Endpoint,
    tls: Option<&TlsClient>,
    channel: u16,
    timeout: Duration,
    stopped: &dyn Fn() -> bool,
) -> Result<Conn, Error> {
    let Some(tls) = tls else {
        return Ok(Conn::plain(stream));
    };
    let name = tls.server_name(endpoint)?;
    match crate::tls::connect(&mut stream, tls, name, timeout) {
        Ok(session) => Ok(Conn::secured(stream, session)),
        Err(_) if stopped() => Err(Error::Cancelled),
        Err(e) => Err(Error::Tls {
            channel,
            reason: e.reason("the receiver", timeout),
        }),
    }
}

/// How the receiver accepted a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// The hello offered no memory: pages will flow.
    Plain,
    /// It took the memory offered: no page is to be sent.
    Shared,
    /// It did not take the memory offered, for this reason: pages will flow.
    Copying(String),
}

/// The sender's half: sends the hello on `stream` (and, with flag `share`, the descriptors of
/// `memory` right after it) and reads the receiver's verdict.
pub(crate) fn greet(
    stream: &mut Conn,
    hello: &Hello,
    memory: Option<&[OwnedFd]>,
    timeout: Duration,
) -> Result<Accepted, Error> {
    let channel = hello.channel;
    let io = |op, e| Error::io(channel, op, timeout, e);
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| io("setting socket timeouts", e))?;
    let sent = stream
        .write_all(&hello.encode())
        .and_then(|()| match memory {
            Some(fds) if hello.flags.share => send_memory(stream, fds),
            _ => Ok(()),
        });
    if let Err(e) = sent {
        // A receiver that refuses a sender before its hello (a TLS receiver whose allow-list
        // does not name it) has closed by now; its reason may be waiting to be read.
        let _ = stream.set_read_timeout(Some(timeout.min(Duration::from_secs(1))));
        return match read_reply(stream, channel, timeout) {
            Err(refused @ (Error::Refused { .. } | Error::Tls { .. })) => Err(refused),
            _ => Err(io("sending the hello", e)),
        };
    }
    let verdict = read_reply(stream, channel, timeout)?;
    let accepted = match (verdict, hello.flags.share) {
        (Verdict::Accept, false) => Accepted::Plain,
        (Verdict::Shared, true) => Accepted::Shared,
        (Verdict::Copying(why), true) => Accepted::Copying(why),
        (verdict, share) => {
            return Err(Error::protocol(
                channel,
                format!(
                    "the receiver answered {verdict:?} to a hello that {} its memory",
                    if share { "offered" } else { "did not offer" }
                ),
            ));
        }
    };
    // The return path idles until the end: only writes keep a timeout.
    stream
        .set_read_timeout(None)
        .map_err(|e| io("setting socket timeouts", e))?;
    Ok(accepted)
}

/// Sends the memory descriptors message with `fds` attached (plaintext Unix sockets only).
fn send_memory(stream: &Conn, fds: &[OwnedFd]) -> io::Result<()> {
    let (Stream::Unix(socket), None) = (&**stream, stream.tls()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "memory descriptors travel only over a plaintext Unix socket",
        ));
    };
    let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    crate::transport::fds::send_with_fds(socket, &MemoryFds { count }.encode(), &borrowed)
}

/// The receiver's half for a hello with flag `share`: reads the memory descriptors message
/// that follows it, with its descriptors, one per region of `regions`. Every descriptor
/// received is closed again if anything is wrong; the error says what, for a refusal.
pub(crate) fn read_memory(stream: &Conn, regions: usize) -> Result<Vec<OwnedFd>, String> {
    let (Stream::Unix(socket), None) = (&**stream, stream.tls()) else {
        return Err(
            "it offered its memory by descriptor over TCP or TLS: descriptors travel \
                    only over a plaintext Unix socket"
                .into(),
        );
    };
    let mut message = [0u8; MemoryFds::LEN];
    let fds = crate::transport::fds::recv_with_fds(socket, &mut message, regions)
        .map_err(|e| format!("its memory descriptors could not be read: {e}"))?;
    let decoded = MemoryFds::decode(&message)
        .map_err(|e| format!("its memory descriptors message is invalid: {e}"))?;
    if decoded.count as usize != regions || fds.len() != regions {
        return Err(format!(
            "it sent {} memory descriptors (and said {}) for {regions} regions",
            fds.len(),
            decoded.count
        ));
    }
    Ok(fds)
}

/// Reads the receiver's hello reply: its verdict, unless it refused.
fn read_reply(stream: &mut Conn, channel: u16, timeout: Duration) -> Result<Verdict, Error> {
    let io = |op, e| Error::io(channel, op, timeout, e);
    let mut fixed = [0u8; HelloReply::FIXED_LEN];
    stream.read_exact(&mut fixed).map_err(|e| {
        refused_by_alert(channel, &e)
            .unwrap_or_else(|| io("waiting for the receiver's hello reply", e))
    })?;
    let decode = |source| Error::Decode { channel, source };
    let len = HelloReply::reason_len(&fixed).map_err(decode)?;
    let mut reason = vec![0u8; len];
    stream
        .read_exact(&mut reason)
        .map_err(|e| io("reading the hello reply", e))?;
    match HelloReply::decode(&fixed, &reason).map_err(decode)?.verdict {
        Verdict::Refuse(reason) => Err(Error::Refused { channel, reason }),
        verdict => Ok(verdict),
    }
}

/// A TLS receiver that refused this sender's certificate: its alert arrives once the sender's
/// side of the handshake is over (TLS 1.3 checks the client's certificate last), in place of
/// the hello reply.
fn refused_by_alert(channel: u16, e: &io::Error) -> Option<Error> {
    let record = e.get_ref()?.downcast_ref::<crate::tls::RecordError>()?;
    let crate::tls::RecordError::Alert(code) = record else {
        return None;
    };
    Some(Error::Tls {
        channel,
        reason: format!(
            "TLS: the receiver refused this sender with alert {}: it does not accept this \
             sender's certificate (client-cert.pem: from another CA, expired, not valid yet or \
             revoked)",
            crate::tls::alert_name(*code)
        ),
    })
}

/// Why no hello could be read from a connection.
#[derive(Debug)]
pub(crate) enum HelloError {
    /// The peer closed the connection after `bytes` bytes of its hello (0: before a word).
    Closed {
        /// How much of the hello arrived.
        bytes: usize,
    },
    /// No complete hello arrived before the deadline; `bytes` bytes of it did.
    Stalled {
        /// How much of the hello arrived.
        bytes: usize,
    },
    /// The caller's stop said to give up.
    Stopped,
    /// The socket failed (a reset, say).
    Io(io::Error),
    /// The bytes are not a valid hello: another program (bad magic, known as soon as the first
    /// bytes differ from it), another version, a corrupted or malformed hello.
    Invalid(DecodeError),
}

impl HelloError {
    /// Why a stepped read of the hello read nothing, `bytes` bytes into it.
    pub(crate) fn from_stop(stop: ReadStop, bytes: usize) -> Self {
        match stop {
            ReadStop::Closed => Self::Closed { bytes },
            ReadStop::Stalled => Self::Stalled { bytes },
            ReadStop::Stopped => Self::Stopped,
            ReadStop::Io(e) => Self::Io(e),
        }
    }
}

/// The receiver's half, first step: reads a hello, giving up at `deadline` or as soon as
/// `stopped` says so (checked every 50 ms), and as soon as the first bytes are not ramjet's
/// magic. Replies nothing: whether and how to refuse is the caller's decision. Leaves a short
/// read timeout on the socket, which the caller resets.
pub(crate) fn read_hello(
    stream: &mut Conn,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<Hello, HelloError> {
    let mut fixed = [0u8; Hello::FIXED_LEN];
    fill(stream, &mut fixed, 0, deadline, stopped)?;
    let len = Hello::table_len(&fixed).map_err(HelloError::Invalid)?;
    let mut table = vec![0u8; len];
    fill(stream, &mut table, Hello::FIXED_LEN, deadline, stopped)?;
    Hello::decode(&fixed, &table).map_err(HelloError::Invalid)
}

/// Fills `buf` from `stream`, the bytes at offset `at` of the hello; see [`read_hello`].
fn fill(
    stream: &mut Conn,
    buf: &mut [u8],
    at: usize,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<(), HelloError> {
    let mut got = 0;
    while got < buf.len() {
        got += crate::transport::read_stepped(deadline, stopped, |step| {
            stream.set_read_timeout(Some(step))?;
            stream.read(&mut buf[got..])
        })
        .map_err(|stop| HelloError::from_stop(stop, at + got))?;
        // The magic comes first: a peer that is not ramjet is known by its first bytes, without
        // waiting for 48 of them (an HTTP client may send fewer and wait for an answer).
        let magic = MAGIC.len().saturating_sub(at).min(got);
        if magic > 0 && buf[..magic] != MAGIC[at..at + magic] {
            let mut found = [0u8; 8];
            found[..magic].copy_from_slice(&buf[..magic]);
            return Err(HelloError::Invalid(DecodeError::BadMagic { found }));
        }
    }
    Ok(())
}

/// The receiver's half, second step: accepts the hello just read (with [`Verdict::Accept`],
/// or for a hello that offered its memory, [`Verdict::Shared`] or [`Verdict::Copying`]).
pub(crate) fn accept_hello(
    stream: &mut Conn,
    verdict: Verdict,
    channel: u16,
    timeout: Duration,
) -> Result<(), Error> {
    reply(stream, verdict, channel, timeout)
}

/// Refuses a hello, best effort: the connection is being dropped anyway.
pub(crate) fn refuse(stream: &mut Conn, reason: &str) {
    let _ = reply(
        stream,
        Verdict::Refuse(reason.to_owned()),
        0,
        Duration::ZERO,
    );
}

fn reply(
    stream: &mut Conn,
    verdict: Verdict,
    channel: u16,
    timeout: Duration,
) -> Result<(), Error> {
    stream
        .write_all(&HelloReply { verdict }.encode())
        .map_err(|e| Error::io(channel, "sending the hello reply", timeout, e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::memory::{GuestAddr, RegionLayout};

    fn hello(channel: u16) -> Hello {
        Hello {
            flags: Default::default(),
            session: session_id(),
            channel,
            channels: 2,
            regions: vec![RegionLayout::new(0, GuestAddr(0), 1 << 20)],
        }
    }

    fn pair() -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::plain(Stream::Unix(a)), Conn::plain(Stream::Unix(b)))
    }

    /// Both halves against each other over a socket pair: an accepted hello arrives as sent;
    /// a refused one fails the sender with the receiver's reason.
    #[test]
    fn the_halves_agree() {
        let timeout = Duration::from_secs(5);
        for accept in [true, false] {
            let (mut sender, mut receiver) = pair();
            let sent = hello(1);
            let expected = sent.clone();
            let peer = std::thread::spawn(move || {
                let got = read_hello(&mut receiver, Instant::now() + timeout, &|| false).unwrap();
                assert_eq!(got, expected);
                if accept {
                    accept_hello(&mut receiver, Verdict::Accept, got.channel, timeout).unwrap();
                } else {
                    refuse(&mut receiver, "not today");
                }
            });
            let result = greet(&mut sender, &sent, None, timeout);
            peer.join().unwrap();
            match (accept, result) {
                (true, Ok(Accepted::Plain)) => {}
                (false, Err(Error::Refused { channel: 1, reason })) => {
                    assert_eq!(reason, "not today");
                }
                (accept, other) => panic!("accept {accept}: {other:?}"),
            }
        }
        assert_ne!(session_id(), session_id(), "ids differ");
    }

    /// What a hello read ends in when the peer is not a sender: bad magic is known from the
    /// first bytes that differ (no wait for the rest); a close, a stall past the deadline and
    /// the caller's stop each say so, with how much of the hello arrived.
    #[test]
    fn a_hello_read_ends_early_for_strangers() {
        let later = || Instant::now() + Duration::from_secs(30);
        let (mut sender, mut receiver) = pair();
        sender.write_all(b"GET ").unwrap();
        let err = read_hello(&mut receiver, later(), &|| false).unwrap_err();
        assert!(
            matches!(&err, HelloError::Invalid(DecodeError::BadMagic { found }) if found[..4] == *b"GET "),
            "{err:?}"
        );

        let (mut sender, mut receiver) = pair();
        sender.write_all(&hello(0).encode()[..20]).unwrap();
        drop(sender);
        let err = read_hello(&mut receiver, later(), &|| false).unwrap_err();
        assert!(matches!(err, HelloError::Closed { bytes: 20 }), "{err:?}");

        let (mut sender, mut receiver) = pair();
        sender.write_all(&MAGIC).unwrap();
        let soon = Instant::now() + Duration::from_millis(120);
        let err = read_hello(&mut receiver, soon, &|| false).unwrap_err();
        assert!(matches!(err, HelloError::Stalled { bytes: 8 }), "{err:?}");
        let err = read_hello(&mut receiver, later(), &|| true).unwrap_err();
        assert!(matches!(err, HelloError::Stopped), "{err:?}");

        let (mut sender, mut receiver) = pair();
        let mut bad = hello(0).encode();
        bad[8] = 9;
        sender.write_all(&bad).unwrap();
        let err = read_hello(&mut receiver, later(), &|| false).unwrap_err();
        assert!(
            matches!(
                err,
                HelloError::Invalid(DecodeError::UnsupportedVersion { found: 9 })
            ),
            "{err:?}"
        );
    }
}

//! The handover's decision frames, both halves (the protocol is in [`wire`](crate::wire)'s
//! docs): reading one control frame on the return path or a decision connection, a sender
//! [delivering](deliver) its decision on a connection of its own once channel 0 broke, and a
//! receiver in doubt [taking](take) it.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::error::Error;
use crate::tls::TlsClient;
use crate::transport::{Conn, Endpoint, Stream};
use crate::wire::{DecodeError, FrameHeader, FrameKind, Hello, MAX_MESSAGE, Verdict};

use super::handshake::{accept_hello, greet, secure};

/// Why a control frame could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The socket failed, timed out or closed.
    Io(io::Error),
    /// The bytes are not a valid frame.
    Decode(DecodeError),
}

impl ReadError {
    /// The session error for this failure on `channel` while doing `op`.
    pub(crate) fn into_error(self, channel: u16, op: &'static str, timeout: Duration) -> Error {
        match self {
            ReadError::Io(e) => Error::io(channel, op, timeout, e),
            ReadError::Decode(source) => Error::Decode { channel, source },
        }
    }
}

/// Reads one frame that is not a pages frame through `recv` (which fills its buffer or fails)
/// and checks its crc. Pages frames, and payloads longer than an error message, are refused
/// before their payload is read.
pub(crate) fn read_control(
    recv: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
) -> Result<(FrameHeader, Vec<u8>), ReadError> {
    let mut fixed = [0u8; FrameHeader::LEN];
    recv(&mut fixed).map_err(ReadError::Io)?;
    let header = FrameHeader::decode(&fixed).map_err(ReadError::Decode)?;
    if header.kind == FrameKind::Pages || header.len > MAX_MESSAGE {
        return Err(ReadError::Decode(DecodeError::Invalid {
            what: "frame kind on the return path",
            value: header.kind as u64,
        }));
    }
    let mut payload = vec![0u8; header.len as usize];
    recv(&mut payload).map_err(ReadError::Io)?;
    let mut hasher = header.hasher();
    hasher.update(&payload);
    header.verify(hasher).map_err(ReadError::Decode)?;
    Ok((header, payload))
}

/// The sender's half: connects to `endpoint` (with `tls`, as the channels did), greets with
/// `hello` (the session's, channel 0), sends decision `go` and waits for the receiver's
/// acknowledgement. Every step is bounded by `timeout`.
pub(crate) fn deliver(
    endpoint: &Endpoint,
    tls: Option<&TlsClient>,
    hello: &Hello,
    go: bool,
    timeout: Duration,
) -> Result<(), Error> {
    let op = "delivering the decision on a new connection";
    let stream = Stream::connect(endpoint, timeout).map_err(|source| Error::Connect {
        channel: 0,
        endpoint: endpoint.to_string(),
        source,
    })?;
    let mut stream = secure(stream, endpoint, tls, 0, timeout, &|| false)?;
    // A decision connection offers no memory, whatever the session's channel 0 did.
    let mut hello = hello.clone();
    hello.flags.share = false;
    greet(&mut stream, &hello, None, timeout)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.write_all(&FrameHeader::decision(go)))
        .map_err(|e| Error::io(0, op, timeout, e))?;
    let (header, payload) = read_control(&mut |buf| stream.read_exact(buf))
        .map_err(|e| e.into_error(0, op, timeout))?;
    match header.kind {
        FrameKind::Decided if header.is_go() == go => Ok(()),
        FrameKind::Error => Err(Error::PeerFailed {
            peer: "receiver",
            message: String::from_utf8_lossy(&payload).into_owned(),
        }),
        kind => Err(Error::protocol(
            0,
            format!("the receiver answered the decision with a {kind:?} frame"),
        )),
    }
}

/// What a decision connection delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Taken {
    /// The sender's decision: go (true) or abort.
    Decision(bool),
    /// The sender's error message: it failed before it decided, so it keeps the guest.
    Failed(String),
}

/// The receiver's half, on a connection whose hello was read and belongs to the session in
/// doubt: accepts the hello, reads the decision and acknowledges it.
pub(crate) fn take(stream: &mut Conn, timeout: Duration) -> Result<Taken, Error> {
    let op = "receiving the decision on a new connection";
    accept_hello(stream, Verdict::Accept, 0, timeout)?;
    let (header, payload) = read_control(&mut |buf| stream.read_exact(buf))
        .map_err(|e| e.into_error(0, op, timeout))?;
    match header.kind {
        FrameKind::Decision => {
            let go = header.is_go();
            // Best effort: the decision holds whether or not the sender hears that it arrived.
            let _ = stream.write_all(&FrameHeader::decided(go));
            Ok(Taken::Decision(go))
        }
        FrameKind::Error => Ok(Taken::Failed(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        kind => Err(Error::protocol(
            0,
            format!("a decision connection sent a {kind:?} frame"),
        )),
    }
}

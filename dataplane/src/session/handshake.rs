//! The per-channel handshake, both halves: the sender [greets](greet) with a [`Hello`] and
//! reads the receiver's verdict; the receiver [reads the hello](read_hello) and [accepts] or
//! [refuses] it with a [`HelloReply`]. The bytes are [`wire`](crate::wire)'s.
//!
//! [accepts]: accept_hello
//! [refuses]: refuse

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::transport::Stream;
use crate::wire::{Hello, HelloReply, Verdict};

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

/// The sender's half: sends the hello on `stream` and reads the receiver's verdict.
pub(crate) fn greet(stream: &mut Stream, hello: &Hello, timeout: Duration) -> Result<(), Error> {
    let channel = hello.channel;
    let io = |op, e| Error::io(channel, op, timeout, e);
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| io("setting socket timeouts", e))?;
    stream
        .write_all(&hello.encode())
        .map_err(|e| io("sending the hello", e))?;
    let mut fixed = [0u8; HelloReply::FIXED_LEN];
    stream
        .read_exact(&mut fixed)
        .map_err(|e| io("waiting for the receiver's hello reply", e))?;
    let decode = |source| Error::Decode { channel, source };
    let len = HelloReply::reason_len(&fixed).map_err(decode)?;
    let mut reason = vec![0u8; len];
    stream
        .read_exact(&mut reason)
        .map_err(|e| io("reading the hello reply", e))?;
    match HelloReply::decode(&fixed, &reason).map_err(decode)?.verdict {
        Verdict::Accept => {}
        Verdict::Refuse(reason) => return Err(Error::Refused { channel, reason }),
    }
    // The return path idles until the end: only writes keep a timeout.
    stream
        .set_read_timeout(None)
        .map_err(|e| io("setting socket timeouts", e))
}

/// The receiver's half, first step: reads a hello; a malformed one is refused with the reason
/// before the error is returned.
pub(crate) fn read_hello(
    stream: &mut Stream,
    channel: u16,
    timeout: Duration,
) -> Result<Hello, Error> {
    let mut fixed = [0u8; Hello::FIXED_LEN];
    stream
        .read_exact(&mut fixed)
        .map_err(|e| Error::io(channel, "waiting for the hello", timeout, e))?;
    let len = Hello::table_len(&fixed).map_err(|source| {
        refuse(stream, &source.to_string());
        Error::Decode { channel, source }
    })?;
    let mut table = vec![0u8; len];
    stream
        .read_exact(&mut table)
        .map_err(|e| Error::io(channel, "receiving the hello's region table", timeout, e))?;
    Hello::decode(&fixed, &table).map_err(|source| {
        refuse(stream, &source.to_string());
        Error::Decode { channel, source }
    })
}

/// The receiver's half, second step: accepts the hello just read.
pub(crate) fn accept_hello(
    stream: &mut Stream,
    channel: u16,
    timeout: Duration,
) -> Result<(), Error> {
    reply(stream, Verdict::Accept, channel, timeout)
}

/// Refuses a hello, best effort: the connection is being dropped anyway.
pub(crate) fn refuse(stream: &mut Stream, reason: &str) {
    let _ = reply(
        stream,
        Verdict::Refuse(reason.to_owned()),
        0,
        Duration::ZERO,
    );
}

fn reply(
    stream: &mut Stream,
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
            session: session_id(),
            channel,
            channels: 2,
            regions: vec![RegionLayout::new(0, GuestAddr(0), 1 << 20)],
        }
    }

    /// Both halves against each other over a socket pair: an accepted hello arrives as sent;
    /// a refused one fails the sender with the receiver's reason; a malformed one is refused
    /// with what was wrong.
    #[test]
    fn the_halves_agree() {
        let timeout = Duration::from_secs(5);
        for accept in [true, false] {
            let (a, b) = UnixStream::pair().unwrap();
            let (mut sender, mut receiver) = (Stream::Unix(a), Stream::Unix(b));
            let sent = hello(1);
            let expected = sent.clone();
            let peer = std::thread::spawn(move || {
                let got = read_hello(&mut receiver, 0, timeout).unwrap();
                assert_eq!(got, expected);
                if accept {
                    accept_hello(&mut receiver, got.channel, timeout).unwrap();
                } else {
                    refuse(&mut receiver, "not today");
                }
            });
            let result = greet(&mut sender, &sent, timeout);
            peer.join().unwrap();
            match (accept, result) {
                (true, Ok(())) => {}
                (false, Err(Error::Refused { channel: 1, reason })) => {
                    assert_eq!(reason, "not today");
                }
                (accept, other) => panic!("accept {accept}: {other:?}"),
            }
        }
        let (a, b) = UnixStream::pair().unwrap();
        let (mut sender, mut receiver) = (Stream::Unix(a), Stream::Unix(b));
        let mut bad = hello(0).encode();
        bad[..4].copy_from_slice(b"QEMU");
        sender.write_all(&bad).unwrap();
        let err = read_hello(&mut receiver, 0, timeout).unwrap_err();
        assert!(err.chain().contains("bad magic"), "{}", err.chain());
        let mut fixed = [0u8; HelloReply::FIXED_LEN];
        sender.read_exact(&mut fixed).unwrap();
        let mut reason = vec![0u8; HelloReply::reason_len(&fixed).unwrap()];
        sender.read_exact(&mut reason).unwrap();
        let verdict = HelloReply::decode(&fixed, &reason).unwrap().verdict;
        assert!(matches!(verdict, Verdict::Refuse(r) if r.contains("bad magic")));
        assert_ne!(session_id(), session_id(), "ids differ");
    }
}

//! The receiver against a same-host sender that offers its memory wrongly: each bad offer is
//! refused with its reason (the migration fails, the sender is told why), and the receiver's
//! memory stays its own, untouched.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::memory::{Backing, GuestMemory, PAGE_SIZE};
use crate::transport::{Endpoint, Listener};
use crate::wire::{Hello, HelloFlags, HelloReply, MemoryFds, Verdict};
use crate::{Error, ReceiveOptions, receive};

const LEN: u64 = 16 * PAGE_SIZE as u64;

/// What the sender does after its hello with flag share.
enum Offer {
    /// The descriptors message (as given), with these descriptors over a Unix socket.
    Unix([u8; MemoryFds::LEN], Vec<OwnedFd>),
    /// The message over TCP, where no descriptor can travel.
    Tcp([u8; MemoryFds::LEN]),
}

fn endpoint(unix: bool) -> Endpoint {
    if unix {
        let path = std::env::temp_dir().join(format!(
            "ramjet-share-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        Endpoint::Unix(path)
    } else {
        "tcp:127.0.0.1:0".parse().unwrap()
    }
}

/// Runs a receive into fresh memory against `offer`; returns the receive's error, the reply
/// the sender read, and the memory.
fn offer(offer: Offer) -> (Error, Verdict, Arc<GuestMemory>) {
    let memory = Arc::new(GuestMemory::anonymous(LEN).unwrap());
    memory.fill(0, 0, 8, 0x33).unwrap();
    let listener = Listener::bind(&endpoint(matches!(offer, Offer::Unix(..)))).unwrap();
    let at = listener.endpoint().clone();
    let options = ReceiveOptions {
        workers: 1,
        timeout: Duration::from_secs(5),
        accept_timeout: Some(Duration::from_secs(5)),
        ..ReceiveOptions::default()
    };
    let hello = Hello {
        flags: HelloFlags {
            share: true,
            ..HelloFlags::default()
        },
        session: [7; 16],
        channel: 0,
        channels: 1,
        regions: memory.layout(),
    }
    .encode();
    let peer = std::thread::spawn(move || {
        let mut reply = Vec::new();
        match offer {
            Offer::Unix(message, fds) => {
                let Endpoint::Unix(path) = at else {
                    unreachable!()
                };
                let mut socket = UnixStream::connect(path).unwrap();
                socket.write_all(&hello).unwrap();
                if fds.is_empty() {
                    socket.write_all(&message).unwrap();
                } else {
                    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
                    crate::transport::fds::send_with_fds(&socket, &message, &borrowed).unwrap();
                }
                let _ = socket.read_to_end(&mut reply);
            }
            Offer::Tcp(message) => {
                let Endpoint::Tcp(addr) = at else {
                    unreachable!()
                };
                let mut socket = TcpStream::connect(addr).unwrap();
                socket.write_all(&hello).unwrap();
                socket.write_all(&message).unwrap();
                let _ = socket.read_to_end(&mut reply);
            }
        }
        let mut fixed = [0u8; HelloReply::FIXED_LEN];
        fixed.copy_from_slice(&reply[..HelloReply::FIXED_LEN]);
        HelloReply::decode(&fixed, &reply[HelloReply::FIXED_LEN..])
            .unwrap()
            .verdict
    });
    let err = receive(&listener, Arc::clone(&memory), &options, Arc::new(|_| {})).unwrap_err();
    (err, peer.join().unwrap(), memory)
}

fn memfd(len: u64) -> OwnedFd {
    let region = crate::memory::Region::memfd(0, crate::memory::GuestAddr(0), len).unwrap();
    region.try_clone_fd().unwrap().unwrap()
}

#[test]
#[cfg_attr(miri, ignore = "Miri has no sockets")]
fn bad_offers_are_refused_and_the_memory_stays() {
    let good = MemoryFds { count: 1 }.encode();
    let mut corrupt = good;
    corrupt[13] ^= 1;
    let (pipe, _writer) = std::io::pipe().unwrap();
    let cases = [
        (
            Offer::Unix(good, vec![]),
            "it sent 0 memory descriptors (and said 1) for 1 regions",
        ),
        (
            Offer::Unix(good, vec![memfd(LEN), memfd(LEN)]),
            "its memory descriptors could not be read: the peer sent more than 1 descriptors",
        ),
        (
            Offer::Unix(MemoryFds { count: 2 }.encode(), vec![memfd(LEN)]),
            "it sent 1 memory descriptors (and said 2) for 1 regions",
        ),
        (
            Offer::Unix(corrupt, vec![memfd(LEN)]),
            "its memory descriptors message is invalid",
        ),
        (
            Offer::Unix(good, vec![memfd(2 * LEN)]),
            "cannot take region 0's memory from the sender: it holds 131072 bytes, and the \
             region 65536",
        ),
        (
            Offer::Unix(good, vec![OwnedFd::from(pipe)]),
            "cannot take region 0's memory from the sender: it is a pipe, not memory",
        ),
        (
            Offer::Tcp(good),
            "it offered its memory by descriptor over TCP or TLS",
        ),
    ];
    for (case, expected) in cases {
        let (err, verdict, memory) = offer(case);
        assert!(
            matches!(&err, Error::Refused { channel: 0, reason } if reason.contains(expected)),
            "{expected}: {err}"
        );
        assert!(
            matches!(&verdict, Verdict::Refuse(reason) if reason.contains(expected)),
            "{expected}: {verdict:?}"
        );
        assert_eq!(memory.regions()[0].backing(), Backing::Anonymous);
        let mut word = [0u8; 8];
        memory.read(0, 0, &mut word).unwrap();
        assert_eq!(word, [0x33; 8], "{expected}: untouched");
    }
}

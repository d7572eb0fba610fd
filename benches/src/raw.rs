//! The baselines: plain copies of bytes between two mappings over as many sockets as ramjet
//! has channels, with large blocking writes and reads (or io_uring sends).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;

use io_uring::{IoUring, opcode, types};

/// The plain copies' write and read size.
pub const CHUNK: usize = 1 << 20;

/// How a plain copy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw {
    /// Blocking `write_all` of 1 MiB chunks.
    WriteRead,
    /// io_uring `Send` of at most 1 MiB, one at a time.
    UringSend,
}

impl Raw {
    /// Its name in the benches.
    pub fn name(self) -> &'static str {
        match self {
            Raw::WriteRead => "baseline_write_read",
            Raw::UringSend => "baseline_uring_send",
        }
    }
}

/// Where the plain copies connect.
#[derive(Debug)]
pub enum RawListener {
    /// TCP on loopback.
    Tcp(TcpListener),
    /// A Unix socket, and its path.
    Unix(UnixListener, PathBuf),
}

impl RawListener {
    /// A TCP listener on a free loopback port.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub fn tcp() -> RawListener {
        RawListener::Tcp(TcpListener::bind("127.0.0.1:0").expect("bind"))
    }

    /// A Unix socket listener at `path` (replacing what is there; removed on drop).
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub fn unix(path: PathBuf) -> RawListener {
        let _ = std::fs::remove_file(&path);
        RawListener::Unix(UnixListener::bind(&path).expect("bind"), path)
    }
}

impl Drop for RawListener {
    fn drop(&mut self) {
        if let RawListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Sends `part` on socket `fd` with io_uring `Send` operations of at most 1 MiB, one at a time.
fn uring_send(fd: RawFd, part: &[u8]) {
    let mut ring = IoUring::new(4).expect("ring");
    let fd = types::Fd(fd);
    let mut at = 0;
    while at < part.len() {
        let len = u32::try_from((part.len() - at).min(CHUNK)).expect("1 MiB fits");
        let entry = opcode::Send::new(fd, part[at..].as_ptr(), len).build();
        // SAFETY: `part` outlives the operation, which completes before the next loop.
        unsafe { ring.submission().push(&entry).expect("queue") };
        ring.submit_and_wait(1).expect("submit");
        let sent = ring.completion().next().expect("completion").result();
        assert!(sent > 0, "send failed: {sent}");
        at += sent as usize;
    }
}

fn send_part(mut stream: impl Write + AsRawFd, part: &[u8], how: Raw) {
    match how {
        Raw::UringSend => uring_send(stream.as_raw_fd(), part),
        Raw::WriteRead => {
            for chunk in part.chunks(CHUNK) {
                stream.write_all(chunk).expect("write");
            }
        }
    }
}

fn recv_part(mut stream: impl Read, part: &mut [u8]) {
    for chunk in part.chunks_mut(CHUNK) {
        stream.read_exact(chunk).expect("read");
    }
}

/// The baselines: `streams` connections to `listener`, each moving its share of `src` into
/// `dst` (sent as `how` says, received with `read_exact`, in 1 MiB pieces).
///
/// # Panics
///
/// On any failure.
pub fn raw_copy(listener: &RawListener, src: &[u8], dst: &mut [u8], streams: usize, how: Raw) {
    let share = src.len().div_ceil(streams);
    thread::scope(|scope| {
        for part in src.chunks(share) {
            scope.spawn(move || match listener {
                RawListener::Tcp(l) => {
                    let addr = l.local_addr().expect("address");
                    send_part(TcpStream::connect(addr).expect("connect"), part, how);
                }
                RawListener::Unix(_, path) => {
                    send_part(UnixStream::connect(path).expect("connect"), part, how);
                }
            });
        }
        for part in dst.chunks_mut(share) {
            match listener {
                RawListener::Tcp(l) => {
                    let stream = l.accept().expect("accept").0;
                    scope.spawn(move || recv_part(stream, part));
                }
                RawListener::Unix(l, _) => {
                    let stream = l.accept().expect("accept").0;
                    scope.spawn(move || recv_part(stream, part));
                }
            }
        }
    });
}

//! Where channels connect ([`Endpoint`]), the connected sockets ([`Stream`]) and the listening
//! one ([`Listener`]), and what a socket still has queued ([`queued`]).

use std::fmt;
use std::io::{self, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Where a receiver listens and a sender connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;

    /// `tcp:HOST:PORT` (`tcp:127.0.0.1:4444`, `tcp:[::1]:4444`, `tcp:localhost:4444`) or
    /// `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let resolved = addr
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr:?} resolves to no address"))?;
            return Ok(Endpoint::Tcp(resolved));
        }
        Err(format!("endpoint {s:?} must start with tcp: or unix:"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connected stream socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `endpoint`, giving up after `timeout` (TCP).
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect_timeout(addr, timeout)?;
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path)?;
                widen_send_buffer(stream.as_raw_fd());
                Ok(Stream::Unix(stream))
            }
        }
    }

    /// Whether the peer is on this machine (a Unix socket, or TCP over loopback): then the
    /// "link" is the same CPUs that would compress.
    pub fn is_local(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.peer_addr().is_ok_and(|a| a.ip().is_loopback()),
            Stream::Unix(_) => true,
        }
    }

    /// Who is at the other end, for a log line: a TCP peer's `ip:port`, or "a unix socket
    /// peer" (a connecting Unix socket is almost never bound to a path).
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "a TCP peer that already left".into(), |a| a.to_string()),
            Stream::Unix(_) => "a unix socket peer".into(),
        }
    }

    /// Copies bytes that have arrived into `buf` without taking them from the socket (blocking
    /// as a read does, within the read timeout).
    pub(crate) fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length for the whole call.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down: blocked reads and writes on any handle return at once.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Ends the writing direction only: the peer reads end of file, and can still answer.
    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// Bounds every read (`None`: wait forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// Bounds every write (`None`: wait forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }
}

/// How long one step of a [`read_stepped`] blocks before the deadline and the stop are
/// checked again.
pub(crate) const STEP: Duration = Duration::from_millis(50);

/// Why a [`read_stepped`] read nothing.
#[derive(Debug)]
pub(crate) enum ReadStop {
    /// The peer closed the connection.
    Closed,
    /// The deadline passed.
    Stalled,
    /// The caller's stop said to give up.
    Stopped,
    /// The socket failed (a reset, say).
    Io(io::Error),
}

/// One read of a peer that may be slow or silent, as the hellos, the first byte and the TLS
/// handshake are read: `read(timeout)` sets the socket's read timeout and reads (or peeks)
/// once, and is called again, [`STEP`] at a time, while it only runs out of its step's time
/// (or is interrupted), until it returns bytes, `deadline` passes or `stopped` says so.
/// Returns how many bytes it read (never 0).
pub(crate) fn read_stepped(
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
    mut read: impl FnMut(Duration) -> io::Result<usize>,
) -> Result<usize, ReadStop> {
    loop {
        if stopped() {
            return Err(ReadStop::Stopped);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadStop::Stalled);
        }
        match read(left.min(STEP)) {
            Ok(0) => return Err(ReadStop::Closed),
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ReadStop::Io(e)),
        }
    }
}

/// What a Unix socket's connecting end (the sender of a migration's pages) asks for as its send
/// buffer (the kernel caps it at `net.core.wmem_max`). A Unix stream socket's writer may have
/// only its send buffer's worth of bytes unread by the peer: with the default (208 KiB) each
/// 1 MiB write waits for the reader several times, and every wait is two wake-ups; with much
/// more (4 MiB) the bytes wait so long in the socket that the reader's copy no longer finds
/// them in the cache. Measured on two cores, 2 channels of random pages, paired against plain
/// copies: 4 MiB 0.75 of their speed, 512 KiB 0.86, 1 MiB 0.88-0.94.
const UNIX_SEND_BUFFER: libc::c_int = 1 << 20;

/// Asks for a send buffer of [`UNIX_SEND_BUFFER`] bytes on socket `fd`, best effort (the
/// default one is what the kernel falls back to).
fn widen_send_buffer(fd: RawFd) {
    // A c_int is 4 bytes.
    const LEN: libc::socklen_t = 4;
    const _: () = assert!(size_of::<libc::c_int>() == LEN as usize);
    let value = UNIX_SEND_BUFFER;
    // SAFETY: the option value is a c_int that lives across the call, and its length is
    // passed with it; a bad descriptor only makes the call fail.
    let _ = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const value).cast(),
            LEN,
        )
    };
}

/// Which of a socket's queues [`queued`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queue {
    /// Bytes received and not yet read (`FIONREAD`).
    In,
    /// Bytes written and not yet taken by the peer: unacknowledged on TCP, unread on a Unix
    /// socket (`TIOCOUTQ`, alias `SIOCOUTQ`).
    Out,
}

/// How many bytes wait in one of the queues of socket `fd` (see `tcp(7)`, `unix(7)`); how a
/// timeout tells a slow peer from a stopped one.
pub(crate) fn queued(fd: RawFd, queue: Queue) -> io::Result<u64> {
    let request = match queue {
        Queue::In => libc::FIONREAD,
        Queue::Out => libc::TIOCOUTQ,
    };
    let mut bytes: libc::c_int = 0;
    // SAFETY: both requests write one c_int, which lives across the call.
    if unsafe { libc::ioctl(fd, request, &raw mut bytes) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(bytes).unwrap_or(0))
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Unix(s) => s.read_vectored(bufs),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
    endpoint: Endpoint,
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds `endpoint`. A TCP port 0 picks a free port: see [`Listener::endpoint`].
    pub fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        let (inner, endpoint) = match endpoint {
            Endpoint::Tcp(addr) => {
                let listener = TcpListener::bind(addr)?;
                let local = listener.local_addr()?;
                (ListenerInner::Tcp(listener), Endpoint::Tcp(local))
            }
            Endpoint::Unix(path) => (
                ListenerInner::Unix(UnixListener::bind(path)?),
                endpoint.clone(),
            ),
        };
        Ok(Listener { inner, endpoint })
    }

    /// Where it listens (with the port the kernel chose).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Accepts one connection, waiting at most `timeout` (`None`: forever) and giving up early
    /// when `stop` returns true (checked every 50 ms).
    pub fn accept(&self, timeout: Option<Duration>, stop: &dyn Fn() -> bool) -> io::Result<Stream> {
        self.accept_or_wake(timeout, stop, None)
    }

    /// [`accept`](Self::accept), also giving up at once (`Interrupted`) when `wake` is woken.
    pub(crate) fn accept_or_wake(
        &self,
        timeout: Option<Duration>,
        stop: &dyn Fn() -> bool,
        wake: Option<&Wake>,
    ) -> io::Result<Stream> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let fd = match &self.inner {
            ListenerInner::Tcp(l) => l.as_raw_fd(),
            ListenerInner::Unix(l) => l.as_raw_fd(),
        };
        let interrupted = || io::Error::new(io::ErrorKind::Interrupted, "cancelled");
        loop {
            if stop() || wake.is_some_and(Wake::is_woken) {
                return Err(interrupted());
            }
            let mut wait = Duration::from_millis(50);
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
                }
                wait = wait.min(left);
            }
            let mut pfds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.map_or(-1, |w| w.fd.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(50).max(1);
            // SAFETY: `pfds` is a valid array of two pollfds for the duration of the call (a
            // negative fd is ignored by poll), and the count says two.
            let ready = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ready == 0 || pfds[0].revents == 0 {
                continue;
            }
            return match &self.inner {
                ListenerInner::Tcp(l) => {
                    let (stream, _) = l.accept()?;
                    stream.set_nodelay(true)?;
                    Ok(Stream::Tcp(stream))
                }
                ListenerInner::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
            };
        }
    }
}

/// Wakes a thread waiting in [`Listener::accept_or_wake`] at once (an eventfd in its poll).
#[derive(Debug)]
pub(crate) struct Wake {
    fd: OwnedFd,
    woken: std::sync::atomic::AtomicBool,
}

impl Wake {
    pub(crate) fn new() -> io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; the result is checked before it is used.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd, is valid, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Wake {
            fd,
            woken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Wakes the waiter, now and for every later wait.
    pub(crate) fn wake(&self) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is 8 readable bytes, as an eventfd write needs, for the whole call.
        // A failure (the counter full) still leaves the fd readable, which is all we need.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn is_woken(&self) -> bool {
        self.woken.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Endpoint::Unix(path) = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        let tcp: Endpoint = "tcp:127.0.0.1:4444".parse().unwrap();
        assert_eq!(tcp.to_string(), "tcp:127.0.0.1:4444");
        let v6: Endpoint = "tcp:[::1]:9".parse().unwrap();
        assert_eq!(v6.to_string(), "tcp:[::1]:9");
        let unix: Endpoint = "unix:/tmp/ramjet.sock".parse().unwrap();
        assert_eq!(unix, Endpoint::Unix("/tmp/ramjet.sock".into()));
        for bad in [
            "127.0.0.1:4444",
            "tcp:",
            "tcp:127.0.0.1",
            "unix:",
            "udp:1.2.3.4:5",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn accept_times_out_and_stops() {
        let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let err = listener
            .accept(Some(Duration::from_millis(60)), &|| false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let err = listener.accept(None, &|| true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }
}

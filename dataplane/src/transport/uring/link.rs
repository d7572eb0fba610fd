//! One direction of one channel: the socket registered in its ring, the iovecs of the batch in
//! hand, and the policy that turns one `send` or `recv` into as few operations as it can (the
//! receive low-water mark, the rest resubmitted after a short transfer, the registered arena
//! named as a fixed buffer).

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::op::Runner;
use crate::arena::Arena;
use crate::transport::ZeroCopy;
use crate::transport::endpoint::{Queue, Stream, queued};
use crate::transport::link::{LinkReader, LinkWriter};

/// `IORING_RECVSEND_POLL_FIRST` (linux/io_uring.h): wait for readiness before the first try.
const POLL_FIRST: u16 = 1;
/// `IORING_SEND_ZC_REPORT_USAGE` (linux/io_uring.h, Linux 6.2): a zero-copy send's
/// notification says whether the kernel copied its bytes after all.
const REPORT_USAGE: u16 = 8;
/// Zero-copy sends whose notifications an adapting link ([`ZeroCopy::Auto`]) reads before it
/// judges: if the kernel copied every one of them, it copies from then on.
pub(super) const JUDGED_SENDS: u64 = 8;
/// The largest receive low-water mark asked for; the kernel caps it at half the largest
/// receive buffer anyway.
const MAX_LOWAT: usize = 4 << 20;

/// One direction of one channel: a ring, the socket registered in it, reused scratch.
///
/// Drop order matters: fields drop in declaration order, so `runner` (and with it the ring)
/// goes first (closing it ends every registration, and no operation is ever in flight between
/// calls; a lent send's bytes, which the kernel may still read, are its caller's to keep), and
/// only then the socket and the arena that the ring had registered.
pub(super) struct Link {
    runner: Runner,
    /// Keeps the registered socket open for as long as the ring may use it.
    socket: OwnedFd,
    /// Whether the socket is TCP (else Unix).
    tcp: bool,
    zero_copy: bool,
    /// Whether to stop sending zero-copy once the kernel reports it copies anyway.
    adapt: bool,
    /// A TCP reader's `SO_RCVLOWAT`, as last set (see [`Link::set_lowat`]).
    lowat: Option<usize>,
    /// The arena registered as fixed buffer 0, kept alive as long as the ring (it is never
    /// unregistered before the ring is closed).
    registered: Option<Arc<Arena>>,
    /// Whether zero-copy sends from the arena name it as fixed buffer 0: cleared when the
    /// kernel refuses vectored fixed buffers, while the registration (and `registered`) stays.
    use_fixed: bool,
    /// Zero-copy sends made from the registered arena.
    fixed_sends: u64,
    /// Bytes the last `move_all` moved.
    moved: usize,
    iovecs: Vec<libc::iovec>,
    /// The ticket of the last lent send ([`LinkWriter::send_lent`]).
    tickets: u64,
    /// The operations of lent sends whose zero-copy notification has not come: (ticket,
    /// operation).
    lent: Vec<(u64, u64)>,
    /// Scratch for the operations whose notification came.
    notified: Vec<u64>,
}

// SAFETY: `iovecs` holds raw pointers only during a call on `&mut self`, which completes every
// operation that uses them before returning; between calls they are dangling but never read.
// The runner and its ring are `Send`.
unsafe impl Send for Link {}

impl Link {
    /// The writing half of a channel over `stream`, sending with `SENDMSG_ZC` unless
    /// `zero_copy` is `Off`; with `Auto`, only until the kernel reports that it copied the
    /// bytes of [`JUDGED_SENDS`] zero-copy sends in a row all the same.
    pub(super) fn writer(
        stream: &Stream,
        timeout: Option<Duration>,
        zero_copy: ZeroCopy,
    ) -> io::Result<Link> {
        let mut link = Link::new(stream, timeout, zero_copy != ZeroCopy::Off)?;
        link.adapt = zero_copy == ZeroCopy::Auto;
        Ok(link)
    }

    /// The reading half of a channel over `stream`; on TCP it receives with a low-water mark
    /// (see [`Link::set_lowat`]).
    pub(super) fn reader(stream: &Stream, timeout: Option<Duration>) -> io::Result<Link> {
        let mut reader = Link::new(stream, timeout, false)?;
        if reader.tcp {
            reader.lowat = Some(1);
        }
        Ok(reader)
    }

    fn new(stream: &Stream, timeout: Option<Duration>, zero_copy: bool) -> io::Result<Link> {
        let socket = match stream {
            Stream::Tcp(s) => OwnedFd::from(s.try_clone()?),
            Stream::Unix(s) => OwnedFd::from(s.try_clone()?),
        };
        let runner = Runner::new(timeout)?;
        runner.submitter().register_files(&[socket.as_raw_fd()])?;
        Ok(Link {
            runner,
            socket,
            tcp: matches!(stream, Stream::Tcp(_)),
            zero_copy,
            adapt: false,
            lowat: None,
            registered: None,
            use_fixed: false,
            fixed_sends: 0,
            moved: 0,
            iovecs: Vec::with_capacity(64),
            tickets: 0,
            lent: Vec::new(),
            notified: Vec::new(),
        })
    }

    /// Makes the socket report readable only once `want` bytes (at most [`MAX_LOWAT`]) are
    /// queued, so that a receive is woken once with all its bytes instead of at every arriving
    /// segment. Never more than the receive still needs, so it cannot wait for bytes that will
    /// not come.
    fn set_lowat(&mut self, want: usize) -> io::Result<()> {
        let want = want.clamp(1, MAX_LOWAT);
        if self.lowat == Some(want) {
            return Ok(());
        }
        let value = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
        // A c_int is 4 bytes.
        const LEN: libc::socklen_t = 4;
        const _: () = assert!(size_of::<libc::c_int>() == LEN as usize);
        // SAFETY: the option value is a c_int that lives across the call, and its length is
        // passed with it; the descriptor is our socket.
        let ret = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&raw const value).cast(),
                LEN,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        self.lowat = Some(want);
        Ok(())
    }

    /// Moves every byte described by `self.iovecs`, one operation at a time, each made by
    /// `make` for the bytes still to go; `at_zero` is the error when an operation moves nothing.
    /// With `lend`, zero-copy sends return before their notification, which is awaited under
    /// ticket `self.tickets`.
    ///
    /// # Safety
    ///
    /// The buffers in `self.iovecs` must stay valid until this returns; with `lend`, until
    /// every notification awaited under ticket `self.tickets` came, or for good if the link is
    /// dropped before.
    unsafe fn move_all(
        &mut self,
        make: impl Fn(*mut libc::msghdr, bool) -> squeue::Entry,
        at_zero: io::ErrorKind,
        lend: bool,
    ) -> io::Result<()> {
        let mut iovecs = std::mem::take(&mut self.iovecs);
        self.moved = 0;
        let result = (|| {
            let mut again = false;
            while !iovecs.is_empty() {
                if let Some(lowat) = self.lowat {
                    // Lowered before a first try too: a mark left high by a larger receive
                    // would keep this one from ever being woken.
                    let needed = iovecs.iter().map(|iov| iov.iov_len).sum();
                    if again || lowat > needed {
                        self.set_lowat(needed)?;
                    }
                }
                let mut msg = msghdr(&mut iovecs);
                let entry = make(&raw mut msg, again);
                let ran = if lend {
                    // SAFETY: `msg` and `iovecs` outlive `run_lent`; the caller keeps the bytes
                    // until the notification recorded in `self.lent` below came.
                    let ran = unsafe { self.runner.run_lent(entry) };
                    let op = match &ran {
                        Ok((_, op)) => *op,
                        Err(_) => self.runner.last_unnotified(),
                    };
                    if let Some(op) = op {
                        self.lent.push((self.tickets, op));
                    }
                    ran.map(|(moved, _)| moved)
                } else {
                    // SAFETY: the kernel uses `msg`, `iovecs` and the buffers they describe,
                    // which outlive `run`, and `run` returns only after the operation's last
                    // completion.
                    unsafe { self.runner.run(entry) }
                };
                let moved = match ran {
                    // A receive waiting for its low-water mark times out while bytes trickle
                    // in below it: those bytes are progress, so take them and wait again. (A
                    // cancelled MSG_WAITALL operation reports the bytes it moved itself.)
                    Err(e)
                        if e.kind() == io::ErrorKind::TimedOut
                            && self.lowat.is_some()
                            && queued(self.socket.as_raw_fd(), Queue::In).is_ok_and(|n| n > 0) =>
                    {
                        again = false;
                        continue;
                    }
                    other => other?,
                };
                again = true;
                if moved == 0 {
                    return Err(at_zero.into());
                }
                let moved = usize::try_from(moved).unwrap_or(0);
                self.moved += moved;
                advance(&mut iovecs, moved);
            }
            Ok(())
        })();
        self.iovecs = iovecs;
        result
    }

    /// Sends from the registered arena without naming it as a fixed buffer from now on. The
    /// registration stays in the ring until the ring is closed, so the link keeps the arena
    /// alive: dropping it here would let the kernel keep a registration of freed memory.
    fn stop_using_fixed(&mut self) {
        self.use_fixed = false;
    }
}

impl Link {
    /// Sends `bufs` (see [`LinkWriter::send`]), lent if `lend` (see [`LinkWriter::send_lent`]).
    ///
    /// # Safety
    ///
    /// With `lend`, as [`LinkWriter::send_lent`]; else the buffers must outlive the call.
    unsafe fn send_all(&mut self, bufs: &[&[u8]], lend: bool) -> io::Result<()> {
        self.iovecs.clear();
        for b in bufs {
            push_merged(&mut self.iovecs, b.as_ptr().cast_mut(), b.len());
        }
        // A zero-copy send whose every buffer is in the registered arena uses it, so the kernel
        // need not pin the pages again (vectored fixed buffers need Linux 6.15).
        let fixed = self.zero_copy
            && self.use_fixed
            && self
                .registered
                .as_ref()
                .is_some_and(|arena| bufs.iter().all(|b| arena.contains(b)));
        let (zero_copy, report) = (self.zero_copy, self.adapt);
        let make = |msg: *mut libc::msghdr, _again| {
            let (fd, flags) = (
                types::Fixed(0),
                (libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32,
            );
            if zero_copy {
                let send = opcode::SendMsgZc::new(fd, msg).flags(flags);
                let send = send.ioprio(if report { REPORT_USAGE } else { 0 });
                send.buf_index(fixed.then_some(0)).build()
            } else {
                opcode::SendMsg::new(fd, msg).flags(flags).build()
            }
        };
        // SAFETY: the caller's buffers outlive this call, or with `lend` the notifications
        // awaited under the current ticket.
        let sent = unsafe { self.move_all(make, io::ErrorKind::WriteZero, lend && zero_copy) };
        if self.adapt {
            self.judge_zero_copy();
        }
        match sent {
            // A kernel without vectored fixed buffers refuses the operation: stop naming the
            // registration, and send this batch unregistered if nothing of it went out.
            Err(e) if fixed && self.moved == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                self.stop_using_fixed();
                // SAFETY: as for this call.
                unsafe { self.send_all(bufs, lend) }
            }
            // Nor does one without usage reports (before Linux 6.2): send zero-copy without
            // asking, and keep to it.
            Err(e) if report && self.moved == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                self.adapt = false;
                // SAFETY: as for this call.
                unsafe { self.send_all(bufs, lend) }
            }
            Ok(()) if fixed => {
                self.fixed_sends += 1;
                Ok(())
            }
            other => other,
        }
    }

    /// Stops sending zero-copy once the kernel reported that it copied the bytes of the
    /// first [`JUDGED_SENDS`] zero-copy sends all the same; any send it did not copy keeps
    /// zero-copy on for good.
    fn judge_zero_copy(&mut self) {
        let (copied, in_place) = self.runner.zero_copy_usage();
        if in_place > 0 {
            self.adapt = false;
        } else if copied >= JUDGED_SENDS {
            self.adapt = false;
            self.zero_copy = false;
        }
    }
}

impl LinkWriter for Link {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        // SAFETY: not lent: the caller's buffers outlive the call, which is all it needs.
        unsafe { self.send_all(bufs, false) }
    }

    unsafe fn send_lent(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        self.tickets += 1;
        // SAFETY: the caller keeps the bytes until `released` reaches this ticket, which it
        // does only once every notification awaited under it came.
        unsafe { self.send_all(bufs, true) }
    }

    fn lent(&self) -> u64 {
        self.tickets
    }

    fn released(&mut self) -> u64 {
        if !self.lent.is_empty() {
            self.runner.take_notified(&mut self.notified);
            for op in self.notified.drain(..) {
                self.lent.retain(|&(_, o)| o != op);
            }
        }
        match self.lent.iter().map(|&(ticket, _)| ticket).min() {
            Some(oldest) => oldest - 1,
            None => self.tickets,
        }
    }

    fn wait_released(&mut self, ticket: u64) -> io::Result<()> {
        // No send has a later ticket than the last, and every one of them is awaited.
        let ticket = ticket.min(self.tickets);
        while self.released() < ticket {
            self.runner.wait_notified()?;
        }
        Ok(())
    }

    fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    fn in_flight(&self) -> Option<u64> {
        if self.tcp {
            queued(self.socket.as_raw_fd(), Queue::Out).ok()
        } else {
            None
        }
    }

    fn register(&mut self, arena: &Arc<Arena>) -> io::Result<()> {
        if !self.zero_copy || self.registered.is_some() {
            return Ok(());
        }
        let buffer = libc::iovec {
            iov_base: arena.as_ptr().cast_mut().cast(),
            iov_len: arena.len(),
        };
        // SAFETY: the arena's mapping stays valid for as long as the ring can use it: the link
        // keeps the arena alive in `registered`, which is set here and never cleared, and the
        // registration ends with the ring, which `runner` owns and which is dropped before
        // `registered` (see `Link`).
        unsafe { self.runner.submitter().register_buffers(&[buffer]) }?;
        self.registered = Some(Arc::clone(arena));
        self.use_fixed = true;
        Ok(())
    }
}

impl LinkReader for Link {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.recv_vectored(&mut [IoSliceMut::new(buf)])
    }

    fn recv_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.iovecs.clear();
        for b in bufs.iter_mut() {
            push_merged(&mut self.iovecs, b.as_mut_ptr(), b.len());
        }
        // On TCP the first try takes whatever has arrived; if that is not all, the low-water
        // mark (never above what is still needed) makes one wake-up bring every remaining
        // byte, where MSG_WAITALL would wake and copy at every arriving segment. Elsewhere
        // MSG_WAITALL has the kernel retry until the buffers are full.
        let lowat = self.lowat.is_some();
        let make = |msg: *mut libc::msghdr, again: bool| {
            let recv = opcode::RecvMsg::new(types::Fixed(0), msg);
            match (lowat, again) {
                (true, false) => recv.build(),
                (true, true) => recv.ioprio(POLL_FIRST).build(),
                (false, _) => recv.flags(libc::MSG_WAITALL as u32).build(),
            }
        };
        // SAFETY: the caller's buffers outlive this call.
        unsafe { self.move_all(make, io::ErrorKind::UnexpectedEof, false) }
    }

    fn recv_some(&mut self, buf: &mut [u8], at_least: usize) -> io::Result<usize> {
        let at_least = at_least.clamp(1, buf.len().max(1)).min(buf.len());
        let mut got = 0;
        let mut again = false;
        while got < at_least {
            let rest = &mut buf[got..];
            let mut iov = [libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            }];
            // On TCP, woken once the missing bytes are there (never waiting for more than
            // that); a receive takes whatever has arrived by then, up to the buffer's end.
            if let Some(lowat) = self.lowat {
                let needed = at_least - got;
                if again || lowat > needed {
                    self.set_lowat(needed)?;
                }
            }
            let mut msg = msghdr(&mut iov);
            let recv = opcode::RecvMsg::new(types::Fixed(0), &raw mut msg);
            let entry = if again && self.lowat.is_some() {
                recv.ioprio(POLL_FIRST).build()
            } else {
                recv.build()
            };
            // SAFETY: the kernel uses `msg`, `iov` and the part of `buf` they describe, which
            // outlive `run`, and `run` returns only after the operation's last completion.
            match unsafe { self.runner.run(entry) } {
                Err(e)
                    if e.kind() == io::ErrorKind::TimedOut
                        && self.lowat.is_some()
                        && queued(self.socket.as_raw_fd(), Queue::In).is_ok_and(|n| n > 0) =>
                {
                    again = false;
                }
                // What already arrived is the caller's: the error comes again on its next call.
                Err(_) if got > 0 => break,
                Err(e) => return Err(e),
                Ok(0) => break,
                Ok(n) => {
                    got += usize::try_from(n).unwrap_or(0);
                    again = true;
                }
            }
        }
        Ok(got)
    }
}

/// Appends the `len` bytes at `at` to `iovecs`, as part of the last iovec if they follow it
/// in memory: a frame's consecutive guest pages then go as one buffer, which the kernel copies
/// in one piece instead of a page at a time. Empty buffers are left out.
fn push_merged(iovecs: &mut Vec<libc::iovec>, at: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    if let Some(last) = iovecs.last_mut()
        && last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == at
    {
        last.iov_len += len;
        return;
    }
    iovecs.push(libc::iovec {
        iov_base: at.cast(),
        iov_len: len,
    });
}

/// Drops the first `n` bytes from a list of iovecs.
fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for iov in iovecs.iter_mut() {
        if n < iov.iov_len {
            // SAFETY: `n` is less than the buffer's length, so the result stays inside it.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
            iov.iov_len -= n;
            break;
        }
        n -= iov.iov_len;
        whole += 1;
    }
    iovecs.drain(..whole);
}

/// A message header over `iovecs`, at most 1024 of them (the kernel's `UIO_MAXIOV`): a short
/// transfer leaves the rest to the next operation.
fn msghdr(iovecs: &mut [libc::iovec]) -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovecs.as_mut_ptr();
    msg.msg_iovlen = iovecs.len().min(1024);
    msg
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::transport::uring::tests::{available, tcp_pair};
    use crate::transport::{Transport, Uring, ZeroCopy};

    /// A TCP link tells what the peer has not acknowledged (the blocking transport's test
    /// shows it counting a full window; the call is the same); a Unix socket does not tell.
    #[test]
    fn in_flight_is_what_the_peer_has_not_acknowledged() {
        if !available() {
            return;
        }
        let (a, _b) = UnixStream::pair().unwrap();
        let (mut unix, _) = Uring::default().split(&Stream::Unix(a)).unwrap();
        unix.send(&[&[3u8; 5000]]).unwrap();
        assert_eq!(unix.in_flight(), None);

        let (peer, ours) = tcp_pair();
        let (mut writer, _) = Uring::default().split(&Stream::Tcp(ours)).unwrap();
        assert_eq!(writer.in_flight(), Some(0));
        let len = 1u64 << 20;
        let got = read_from(peer, len);
        writer.send(&[&vec![5u8; len as usize]]).unwrap();
        assert!(writer.in_flight().is_some_and(|n| n <= len));
        assert_eq!(got.join().unwrap().len() as u64, len);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while writer.in_flight() != Some(0) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(writer.in_flight(), Some(0));
    }

    /// On TCP a receive raises the socket's low-water mark after a short first try; the mark
    /// never exceeds what the receive still needs, so a small receive after a large one, and
    /// bytes that trickle in, still complete, and a peer that closes early is an end of file.
    #[test]
    fn tcp_receives_complete_however_the_bytes_arrive() {
        if !available() {
            return;
        }
        let (peer, ours) = tcp_pair();
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (_, mut reader) = Uring::default().split(&Stream::Tcp(ours)).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let expected = big.clone();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut peer = peer;
            for piece in big.chunks(40_000) {
                peer.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            peer.write_all(b"small").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            peer.write_all(b"tail").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            peer.write_all(b"end").unwrap();
        });
        let mut out = vec![0u8; expected.len()];
        reader.recv(&mut out).unwrap();
        assert_eq!(out, expected);
        let mut small = [0u8; 5];
        reader.recv(&mut small).unwrap();
        assert_eq!(&small, b"small");
        let mut tail = [0u8; 4];
        reader.recv(&mut tail).unwrap();
        assert_eq!(&tail, b"tail");
        // Three bytes come, then the peer closes: an end of file, not a wait for the rest.
        let mut more = [0u8; 10];
        writer.join().unwrap();
        assert_eq!(
            reader.recv(&mut more).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// A receive lowers a mark that a larger one left high before it waits: otherwise it would
    /// sleep until its timeout.
    #[test]
    fn a_high_mark_from_a_larger_receive_is_lowered_first() {
        if !available() {
            return;
        }
        let (mut peer, ours) = tcp_pair();
        let timeout = Some(Duration::from_secs(2));
        let mut link = Link::new(&Stream::Tcp(ours), timeout, false).unwrap();
        link.lowat = Some(1);
        link.set_lowat(100_000).unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            // After the receive below has started waiting.
            std::thread::sleep(Duration::from_millis(50));
            peer.write_all(b"small").unwrap();
            peer
        });
        let mut small = [0u8; 5];
        // Without the lowering this times out.
        link.recv(&mut small).unwrap();
        assert_eq!(&small, b"small");
        drop(writer.join().unwrap());
    }

    /// A timeout means a peer that stopped, not a slow one: a receive completes while bytes
    /// keep trickling in (each well within the timeout, all of them well after it), on TCP with
    /// its low-water mark and on a Unix socket with MSG_WAITALL, and times out once they stop.
    #[test]
    fn a_trickling_peer_is_slow_not_stopped() {
        if !available() {
            return;
        }
        let (tcp, ours) = tcp_pair();
        let (unix, unix_ours) = UnixStream::pair().unwrap();
        let timeout = Some(Duration::from_millis(150));
        let cases: [(Stream, Stream, bool); 2] = [
            (Stream::Tcp(tcp), Stream::Tcp(ours), true),
            (Stream::Unix(unix), Stream::Unix(unix_ours), false),
        ];
        for (peer, ours, lowat) in cases {
            let mut link = Link::new(&ours, timeout, false).unwrap();
            if lowat {
                link.lowat = Some(1);
            }
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let mut peer = peer;
                for i in 0..20u8 {
                    std::thread::sleep(Duration::from_millis(25));
                    peer.write_all(&[i]).unwrap();
                }
                // Then silence, the socket left open.
                peer
            });
            let mut buf = [0u8; 20];
            link.recv(&mut buf).unwrap();
            assert_eq!(buf.to_vec(), (0..20u8).collect::<Vec<_>>());
            let err = link.recv(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "lowat {lowat}");
            drop(writer.join().unwrap());
        }
    }

    /// Whether this kernel sends zero-copy (printed where it does not).
    fn zero_copy_here() -> bool {
        let here = available() && Uring::default().supports_zero_copy();
        if !here {
            eprintln!("skipped: no SENDMSG_ZC");
        }
        here
    }

    /// A thread that reads `len` bytes from `peer` and returns them.
    fn read_from(peer: std::net::TcpStream, len: u64) -> std::thread::JoinHandle<Vec<u8>> {
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut got = Vec::new();
            (&peer).take(len).read_to_end(&mut got).unwrap();
            got
        })
    }

    /// Zero-copy sends from the registered arena use it as a fixed buffer; a batch with a
    /// buffer outside it is sent unregistered. Either way the bytes arrive in order.
    #[test]
    fn zero_copy_sends_use_the_registered_arena() {
        if !zero_copy_here() {
            return;
        }
        let (peer, ours) = tcp_pair();
        let timeout = Some(Duration::from_secs(10));
        let mut link = Link::new(&Stream::Tcp(ours), timeout, true).unwrap();
        let (arena, mut slots) = Arena::new(4, 64 << 10).unwrap();
        for (i, slot) in slots.iter_mut().enumerate() {
            slot.fill(i as u8 + 1);
        }
        link.register(&arena).unwrap();
        assert!(link.registered.is_some());
        let outside = vec![9u8; 1000];
        let reader = read_from(peer, 2 * 4 * (64 << 10) + 1000);
        let all: Vec<&[u8]> = slots.iter().map(|s| &s[..]).collect();
        link.send(&all).unwrap();
        let registered = link.fixed_sends;
        let mut mixed = all.clone();
        mixed.insert(2, &outside);
        link.send(&mixed).unwrap();
        assert_eq!(
            link.fixed_sends, registered,
            "a batch with an outside buffer is not fixed"
        );
        let got = reader.join().unwrap();
        let expected: Vec<u8> = all.concat().into_iter().chain(mixed.concat()).collect();
        assert!(got == expected, "the bytes arrived changed or out of order");
        // Linux 6.15 and later take vectored fixed buffers; older kernels fall back.
        if link.use_fixed {
            assert_eq!(registered, 1);
        }
    }

    /// Lent zero-copy sends return before the kernel let go of their bytes, each under the
    /// next ticket; once released, every byte arrived in order. Waiting for a ticket never
    /// issued waits only for those issued.
    #[test]
    fn lent_sends_are_released_in_order_and_arrive_whole() {
        if !zero_copy_here() {
            return;
        }
        let (peer, ours) = tcp_pair();
        let timeout = Some(Duration::from_secs(10));
        let mut link = Link::writer(&Stream::Tcp(ours), timeout, ZeroCopy::On).unwrap();
        // Leaked: lent bytes must outlive whatever the kernel does with them.
        let batches: &'static [Vec<u8>] = Vec::leak(
            (0..6u8)
                .map(|i| (0..256 << 10).map(|j: u32| (j % 251) as u8 ^ i).collect())
                .collect(),
        );
        let total = batches.iter().map(Vec::len).sum::<usize>();
        let reader = read_from(peer, total as u64);
        assert_eq!(link.lent(), 0);
        for (i, batch) in batches.iter().enumerate() {
            let (head, tail) = batch.split_at(1000);
            // SAFETY: the bytes are leaked, so they stay valid and unchanged for good.
            unsafe { link.send_lent(&[head, tail]) }.unwrap();
            assert_eq!(link.lent(), i as u64 + 1);
            assert!(link.released() <= link.lent());
        }
        link.wait_released(6).unwrap();
        assert_eq!(link.released(), 6);
        assert!(link.lent.is_empty(), "every notification came");
        // A ticket not issued yet waits for nothing more.
        link.wait_released(100).unwrap();
        let got = reader.join().unwrap();
        assert!(
            got == batches.concat(),
            "the bytes arrived changed or out of order"
        );
    }

    /// With `ZeroCopy::Auto` a link whose zero-copy sends the kernel copies anyway (here
    /// loopback, which `Transport::split` would not even try) copies after the sends it
    /// judges by; with `ZeroCopy::On` it keeps sending zero-copy.
    #[test]
    fn an_adapting_link_copies_once_the_kernel_says_it_copies_anyway() {
        if !zero_copy_here() {
            return;
        }
        for (mode, stays) in [(ZeroCopy::Auto, false), (ZeroCopy::On, true)] {
            let (peer, ours) = tcp_pair();
            let timeout = Some(Duration::from_secs(10));
            let mut link = Link::writer(&Stream::Tcp(ours), timeout, mode).unwrap();
            assert!(link.zero_copy());
            let sends = JUDGED_SENDS + 2;
            let reader = read_from(peer, sends * 4096);
            let page = [7u8; 4096];
            for _ in 0..sends {
                link.send(&[&page]).unwrap();
            }
            assert_eq!(link.zero_copy(), stays, "{mode:?}");
            let (copied, in_place) = link.runner.zero_copy_usage();
            if mode == ZeroCopy::Auto {
                assert_eq!((copied, in_place), (JUDGED_SENDS, 0), "loopback copies");
            }
            let got = reader.join().unwrap();
            assert!(got.iter().all(|&b| b == 7) && got.len() == 4096 * sends as usize);
        }
    }

    /// When the kernel refuses vectored fixed buffers, the link stops naming the arena in its
    /// sends but keeps it alive: the ring still has it registered until the ring is closed.
    #[test]
    fn falling_back_from_fixed_buffers_keeps_the_registered_arena_alive() {
        if !zero_copy_here() {
            return;
        }
        let (peer, ours) = tcp_pair();
        let timeout = Some(Duration::from_secs(10));
        let mut link = Link::new(&Stream::Tcp(ours), timeout, true).unwrap();
        let (arena, mut slots) = Arena::new(1, 4096).unwrap();
        slots[0].fill(5);
        link.register(&arena).unwrap();
        let held = Arc::strong_count(&arena);
        // What the EINVAL fallback does.
        link.stop_using_fixed();
        assert_eq!(
            Arc::strong_count(&arena),
            held,
            "the ring still has the arena registered: the link must keep it"
        );
        assert!(
            link.registered
                .as_ref()
                .is_some_and(|a| Arc::ptr_eq(a, &arena))
        );
        let before = link.fixed_sends;
        link.send(&[&slots[0][..]]).unwrap();
        assert_eq!(
            link.fixed_sends, before,
            "sent without naming the fixed buffer"
        );
        let mut got = vec![0u8; 4096];
        io::Read::read_exact(&mut &peer, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 5));
        // Dropping the caller's handles leaves the link's keep-alive, until the link goes.
        drop(slots);
        let weak = Arc::downgrade(&arena);
        drop(arena);
        assert!(weak.upgrade().is_some());
        drop(link);
        assert!(weak.upgrade().is_none());
    }
}

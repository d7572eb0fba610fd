//! The io_uring transport: each channel direction owns a small ring with its socket registered
//! as a fixed file. A send is one vectored `SENDMSG` (or `SENDMSG_ZC`, from the sender's
//! registered frame buffers where it can) of everything the writer batched, with `MSG_WAITALL`
//! so that the kernel itself finishes it. A receive is one `RECVMSG` straight into the
//! destination buffers (guest pages included); on TCP, when the first try finds only part of
//! the bytes, the socket's `SO_RCVLOWAT` is raised to what is still missing and the retry waits
//! for it (`IORING_RECVSEND_POLL_FIRST`), so a large receive is woken once rather than at every
//! arriving segment; elsewhere `MSG_WAITALL` does. Each operation is awaited with a timed wait
//! (when the time is up it is cancelled), resubmitted for the rest after a short transfer, and
//! awaited with all its completions before the call returns.
//!
//! Ownership of buffers in flight is therefore simple and strict: a buffer is lent to the kernel
//! only for the duration of one call, which does not return (not even on error) until the kernel
//! has posted every completion for it, the zero-copy notification included. Only then does the
//! caller give the buffer back to its pool. At most one operation is in flight per socket, so
//! bytes never reorder on the stream.
//!
//! The cut: this file probes the kernel and splits a stream into a [`Transport`]'s halves;
//! `op` runs one operation to its last completion (the only place that lends buffers to the
//! kernel); `link` is one channel direction, turning a `send` or `recv` into operations.
//!
//! Kernel behaviour: [io_uring(7)](https://man7.org/linux/man-pages/man7/io_uring.7.html);
//! `SENDMSG_ZC` needs Linux 6.1, and Unix sockets refuse it.

mod link;
mod op;

use std::io;
use std::sync::OnceLock;

use io_uring::{IoUring, opcode};

use self::link::Link;
use super::endpoint::Stream;
use super::link::{LinkReader, LinkWriter, Transport};

/// Whether sends use `SENDMSG_ZC`, which lets the NIC read the pages without a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroCopy {
    /// Always copy.
    Off,
    /// Zero-copy on TCP; fails on Unix sockets, which do not support it.
    On,
    /// Zero-copy on TCP to a peer that is not on this machine: loopback copies in the kernel
    /// anyway, and Unix sockets refuse it. A channel whose first zero-copy sends the kernel
    /// reports it copied all the same (a peer behind a veth pair or a bridge on this host)
    /// copies from then on: the kernel's copy costs as much, and the pinning and the
    /// notifications come on top.
    #[default]
    Auto,
}

/// The io_uring transport: a ring per channel direction, one vectored operation in flight per
/// socket, each awaited with every completion before its buffers go back to their owner.
#[derive(Debug, Clone, Copy, Default)]
pub struct Uring {
    /// Zero-copy sends.
    pub zero_copy: ZeroCopy,
}

/// Why io_uring cannot be used here.
#[derive(Debug, thiserror::Error)]
#[error(
    "io_uring is unavailable ({what}); check the kernel.io_uring_disabled sysctl, a seccomp \
     profile (containers often block io_uring_setup), or the kernel version (5.19 or newer)"
)]
pub struct Unavailable {
    what: String,
    #[source]
    source: Option<io::Error>,
}

impl Uring {
    /// Whether this kernel can send zero-copy (`SENDMSG_ZC`, Linux 6.1). The kernel is asked
    /// once per process.
    pub fn supports_zero_copy(&self) -> bool {
        zero_copy_supported()
    }

    /// Checks that rings can be set up and support the operations this transport uses.
    pub fn probe() -> Result<(), Unavailable> {
        let ring = IoUring::new(4).map_err(|e| Unavailable {
            what: "io_uring_setup failed".into(),
            source: Some(e),
        })?;
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| Unavailable {
                what: "the opcode probe failed".into(),
                source: Some(e),
            })?;
        if !ring.params().is_feature_ext_arg() {
            return Err(Unavailable {
                what: "the kernel lacks timed waits (IORING_FEAT_EXT_ARG)".into(),
                source: None,
            });
        }
        for (code, name) in [
            (opcode::SendMsg::CODE, "SENDMSG"),
            (opcode::RecvMsg::CODE, "RECVMSG"),
            (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        ] {
            if !probe.is_supported(code) {
                return Err(Unavailable {
                    what: format!("the kernel lacks {name}"),
                    source: None,
                });
            }
        }
        Ok(())
    }
}

/// Whether this kernel supports `SENDMSG_ZC`, asked of it once per process: its opcodes do not
/// change while the process runs, so splitting a channel need not set up a ring just to ask
/// again. If the first ask cannot set up a ring, the answer is no for the rest of the process.
fn zero_copy_supported() -> bool {
    static SENDMSG_ZC: OnceLock<bool> = OnceLock::new();
    *SENDMSG_ZC.get_or_init(|| supports(opcode::SendMsgZc::CODE))
}

/// Whether this kernel's io_uring supports `code`.
fn supports(code: u8) -> bool {
    let Ok(ring) = IoUring::new(2) else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok() && probe.is_supported(code)
}

impl Transport for Uring {
    fn name(&self) -> &'static str {
        match self.zero_copy {
            ZeroCopy::Off => "io_uring without zero-copy",
            ZeroCopy::On => "io_uring with zero-copy",
            ZeroCopy::Auto => "io_uring",
        }
    }

    fn split(&self, stream: &Stream) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
        let zero_copy = match self.zero_copy {
            ZeroCopy::Auto if stream.is_local() || !zero_copy_supported() => ZeroCopy::Off,
            mode => mode,
        };
        split(stream, zero_copy)
    }

    /// Refuses [`ZeroCopy::On`], which asked for what such a channel cannot do (QEMU refuses
    /// `zero-copy-send` with TLS too).
    fn split_copied(
        &self,
        stream: &Stream,
    ) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
        if self.zero_copy == ZeroCopy::On {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "zero-copy sends (ZeroCopy::On) are not available with TLS: every record is \
                 sealed into a buffer of the channel's own",
            ));
        }
        split(stream, ZeroCopy::Off)
    }
}

/// The halves of a channel over `stream`, the writer sending zero-copy as `zero_copy` says
/// (`Auto` here: zero-copy until the kernel reports that it copies anyway).
fn split(
    stream: &Stream,
    zero_copy: ZeroCopy,
) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
    let (read_timeout, write_timeout) = match stream {
        Stream::Tcp(s) => (s.read_timeout()?, s.write_timeout()?),
        Stream::Unix(s) => (s.read_timeout()?, s.write_timeout()?),
    };
    let writer = Link::writer(stream, write_timeout, zero_copy)?;
    let reader = Link::reader(stream, read_timeout)?;
    Ok((Box::new(writer), Box::new(reader)))
}

#[cfg(test)]
mod tests {
    use std::io::IoSliceMut;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::*;

    /// A connected loopback TCP pair: (peer, ours).
    pub(super) fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (peer, ours)
    }

    pub(super) fn available() -> bool {
        match Uring::probe() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("skipped: {e}");
                false
            }
        }
    }

    /// The answer kept for the process is the kernel's, asked again or not.
    #[test]
    fn the_kept_zero_copy_answer_is_the_kernels() {
        let asked = supports(opcode::SendMsgZc::CODE);
        assert_eq!(zero_copy_supported(), asked);
        assert_eq!(Uring::default().supports_zero_copy(), asked);
    }

    #[test]
    fn sends_and_receives_across_many_buffers() {
        if !available() {
            return;
        }
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (a, b) = (Stream::Unix(a), Stream::Unix(b));
        let (mut writer, _) = Uring::default().split(&a).unwrap();
        let (_, mut reader) = Uring::default().split(&b).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 700) as usize + 1])
            .collect();
        let total: usize = chunks.iter().map(Vec::len).sum();
        let sender = std::thread::spawn(move || {
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            writer.send(&refs).unwrap();
            chunks
        });
        let mut out = vec![0u8; total];
        let (x, y) = out.split_at_mut(total / 3);
        reader
            .recv_vectored(&mut [IoSliceMut::new(x), IoSliceMut::new(y)])
            .unwrap();
        let chunks = sender.join().unwrap();
        assert_eq!(out, chunks.concat());
        drop(a);
        let mut more = [0u8; 1];
        assert_eq!(
            reader.recv(&mut more).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_silent_peer_times_out_and_zero_copy_is_refused_on_unix() {
        if !available() {
            return;
        }
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let a = Stream::Unix(a);
        let (_, mut reader) = Uring::default().split(&a).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            reader.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        let b = Stream::Unix(b);
        let (mut writer, _) = Uring {
            zero_copy: ZeroCopy::On,
        }
        .split(&b)
        .unwrap();
        assert!(writer.send(&[b"zero copy"]).is_err());
    }
}

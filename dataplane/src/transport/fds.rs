//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`), for a same-host migration that
//! hands guest memory over instead of copying it: [`send_with_fds`] attaches descriptors to a
//! message's bytes, [`recv_with_fds`] reads exactly a message's bytes and takes the descriptors
//! that came with them. Both are blocking calls bounded by the socket's timeouts.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::{ptr, slice};

/// The most descriptors one message may carry (the wire's region limit).
pub const MAX_FDS: usize = crate::wire::MAX_REGIONS as usize;

/// Bytes of control buffer for `fds` descriptors, `cmsghdr`-aligned (u64 words).
fn control_words(fds: usize) -> usize {
    let bytes = fds * size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(u32::try_from(bytes).unwrap_or(u32::MAX)) } as usize;
    space.div_ceil(size_of::<u64>())
}

/// Sends all of `bytes` on `stream`, with `fds` attached to the first of them (1 to
/// 256 descriptors).
///
/// # Errors
///
/// Whatever `sendmsg` and the writes of the rest say, or `InvalidInput` for no descriptors,
/// too many, or no bytes.
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.is_empty() || fds.len() > MAX_FDS || bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "1 to 256 descriptors, with at least one byte",
        ));
    }
    let mut control = vec![0u64; control_words(fds.len())];
    let data_len = fds.len() * size_of::<RawFd>();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * size_of::<u64>();
    // SAFETY: `msg` points at `control`, which is large enough for one header with `fds`
    // descriptors (CMSG_SPACE), so CMSG_FIRSTHDR returns a header inside it.
    let header = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    if header.is_null() {
        return Err(io::Error::other("no room for the control message"));
    }
    // SAFETY: CMSG_LEN only computes a size.
    let cmsg_len = unsafe { libc::CMSG_LEN(u32::try_from(data_len).unwrap_or(u32::MAX)) };
    // SAFETY: `header` points into `control` (see above), aligned for cmsghdr (u64 words).
    unsafe {
        header.write(libc::cmsghdr {
            cmsg_len: cmsg_len as usize,
            cmsg_level: libc::SOL_SOCKET,
            cmsg_type: libc::SCM_RIGHTS,
        });
    }
    let raw: Vec<u8> = fds
        .iter()
        .flat_map(|fd| fd.as_raw_fd().to_ne_bytes())
        .collect();
    // SAFETY: CMSG_DATA of a header inside `control` points at its data area.
    let data = unsafe { libc::CMSG_DATA(header) };
    // SAFETY: CMSG_SPACE made room for `fds.len()` descriptors after the header, which is
    // `raw.len()` bytes; `raw` is ours and does not overlap `control`.
    unsafe { ptr::copy_nonoverlapping(raw.as_ptr(), data, raw.len()) };
    // SAFETY: `msg` and everything it points at (`iov` over `bytes`, `control`) live across
    // the call; the kernel only reads them.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    let sent = usize::try_from(sent).map_err(|_| io::Error::last_os_error())?;
    // The descriptors went with the first byte; the rest is plain.
    io::Write::write_all(&mut &*stream, &bytes[sent..])
}

/// Reads exactly `buf.len()` bytes from `stream`, and returns the descriptors that came with
/// them (at most `max_fds`; more is an error, and every descriptor received is closed). The
/// descriptors are close-on-exec.
///
/// # Errors
///
/// Whatever `recvmsg` says, `UnexpectedEof` if the peer closes first, or `InvalidData` for
/// more descriptors than `max_fds`.
pub fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Vec<OwnedFd>> {
    let max_fds = max_fds.clamp(1, MAX_FDS);
    let mut fds = Vec::new();
    let mut got = 0;
    let mut truncated = false;
    while got < buf.len() {
        let mut control = vec![0u64; control_words(max_fds)];
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        // SAFETY: all-zero is a valid empty msghdr.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * size_of::<u64>();
        // SAFETY: `msg` points at `iov` (over the unread part of `buf`) and `control`, both
        // live across the call and writable for their lengths.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        let n = match usize::try_from(n) {
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        // Take every descriptor that arrived before anything else, so none leaks.
        // SAFETY: the kernel filled `msg_control`/`msg_controllen` with complete headers.
        let mut header = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        while !header.is_null() {
            // SAFETY: `header` is a complete header inside `control` (CMSG_FIRSTHDR/NXTHDR
            // check its bounds against msg_controllen).
            let cmsg = unsafe { header.read_unaligned() };
            if cmsg.cmsg_level == libc::SOL_SOCKET && cmsg.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) only computes a size.
                let empty = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = cmsg.cmsg_len.saturating_sub(empty) / size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at the header's data area.
                let data = unsafe { libc::CMSG_DATA(header) };
                // SAFETY: the data area holds `count` descriptors (its length says so), inside
                // `control`, which lives across this borrow.
                let raw = unsafe { slice::from_raw_parts(data, count * size_of::<RawFd>()) };
                for bytes in raw.chunks_exact(size_of::<RawFd>()) {
                    let mut fd = [0u8; size_of::<RawFd>()];
                    fd.copy_from_slice(bytes);
                    // SAFETY: SCM_RIGHTS installed this descriptor in this process for us
                    // alone; it is owned by nothing else.
                    fds.push(unsafe { OwnedFd::from_raw_fd(RawFd::from_ne_bytes(fd)) });
                }
            }
            // SAFETY: as above, for the next header (null past the last).
            header = unsafe { libc::CMSG_NXTHDR(&raw const msg, header) };
        }
        truncated |= msg.msg_flags & libc::MSG_CTRUNC != 0;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        got += n;
    }
    if truncated || fds.len() > max_fds {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer sent more than {max_fds} descriptors"),
        ));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no sendmsg")]
    fn descriptors_travel_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile();
        file.write_all(b"ramjet").unwrap();
        send_with_fds(&a, b"hello", &[file.as_fd(), file.as_fd()]).unwrap();
        (&a).write_all(b"rest").unwrap();
        let mut buf = [0u8; 5];
        let fds = recv_with_fds(&b, &mut buf, 4).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(fds.len(), 2);
        let mut got = File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "ramjet", "the same file");
        let mut rest = [0u8; 4];
        (&b).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
    }

    /// More descriptors than expected: an error (those received are closed as they drop).
    #[test]
    #[cfg_attr(miri, ignore = "Miri has no sendmsg")]
    fn too_many_descriptors_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile();
        send_with_fds(&a, b"x", &[file.as_fd(), file.as_fd(), file.as_fd()]).unwrap();
        let mut buf = [0u8; 1];
        let err = recv_with_fds(&b, &mut buf, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // A closed peer before the whole message: an error, not a short read.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"ab").unwrap();
        drop(a);
        let mut buf = [0u8; 4];
        let err = recv_with_fds(&b, &mut buf, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    fn tempfile() -> File {
        crate::memory::tests::scratch_file("fds", 0)
    }
}

//! The blocking transport: `std` sockets, vectored `writev`/`readv` calls, one thread per
//! channel direction.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;

use super::endpoint::{Queue, Stream, queued};
use super::link::{LinkReader, LinkWriter, Transport};

/// Plain blocking sockets; see the [module docs](super).
#[derive(Debug, Clone, Copy, Default)]
pub struct Blocking;

impl Transport for Blocking {
    fn name(&self) -> &'static str {
        "blocking"
    }

    fn split(&self, stream: &Stream) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
        Ok((Box::new(stream.try_clone()?), Box::new(stream.try_clone()?)))
    }
}

/// The kernel's limit on buffers per `writev`/`readv`.
const IOV_MAX: usize = 1024;

impl LinkWriter for Stream {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        for group in bufs.chunks(IOV_MAX) {
            let mut slices: Vec<IoSlice<'_>> = group.iter().map(|b| IoSlice::new(b)).collect();
            let mut slices = &mut slices[..];
            IoSlice::advance_slices(&mut slices, 0);
            while !slices.is_empty() {
                match self.write_vectored(slices) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => IoSlice::advance_slices(&mut slices, n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn in_flight(&self) -> Option<u64> {
        match self {
            Stream::Tcp(s) => queued(s.as_raw_fd(), Queue::Out).ok(),
            Stream::Unix(_) => None,
        }
    }
}

impl LinkReader for Stream {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact(buf)
    }

    fn recv_some(&mut self, buf: &mut [u8], at_least: usize) -> io::Result<usize> {
        let at_least = at_least.clamp(1, buf.len().max(1)).min(buf.len());
        let mut got = 0;
        while got < at_least {
            match self.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // What already arrived is the caller's: the error comes again on its next call.
                Err(_) if got > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    fn recv_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut bufs = &mut bufs[..];
        IoSliceMut::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let limit = bufs.len().min(IOV_MAX);
            match self.read_vectored(&mut bufs[..limit]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn vectored_roundtrip_across_many_buffers() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Stream::Unix(a), Stream::Unix(b));
        let chunks: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize + 1])
            .collect();
        let total: usize = chunks.iter().map(Vec::len).sum();
        let sender = std::thread::spawn(move || {
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            LinkWriter::send(&mut a, &refs).unwrap();
            chunks
        });
        let mut out = vec![0u8; total];
        let (x, y) = out.split_at_mut(total / 3);
        LinkReader::recv_vectored(&mut b, &mut [IoSliceMut::new(x), IoSliceMut::new(y)]).unwrap();
        let chunks = sender.join().unwrap();
        assert_eq!(out, chunks.concat());
        drop(chunks);
        let mut more = [0u8; 1];
        let err = LinkReader::recv(&mut b, &mut more).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// On TCP what the peer has not acknowledged is in flight, which on loopback is only what
    /// its full window holds back; a Unix socket does not tell.
    #[test]
    fn in_flight_is_what_the_peer_has_not_acknowledged() {
        use std::io::Write;
        use std::net::{TcpListener, TcpStream};
        use std::time::{Duration, Instant};

        let (a, _b) = UnixStream::pair().unwrap();
        let mut a = Stream::Unix(a);
        LinkWriter::send(&mut a, &[&[7u8; 10_000]]).unwrap();
        assert_eq!(a.in_flight(), None);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let mut sent = 0usize;
        loop {
            match (&tcp).write(&[1u8; 1 << 16]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let ours = Stream::Tcp(tcp);
        let waiting = ours.in_flight().expect("a TCP socket tells");
        assert!(waiting > 0 && waiting <= sent as u64, "{waiting} of {sent}");
        io::copy(&mut (&mut peer).take(sent as u64), &mut io::sink()).unwrap();
        // The last acknowledgements follow the reads; nothing more is sent.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ours.in_flight() != Some(0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ours.in_flight(), Some(0));
    }
}

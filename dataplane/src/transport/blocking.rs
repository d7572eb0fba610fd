//! The blocking transport: `std` sockets, vectored `writev`/`readv` calls, one thread per
//! channel direction.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use super::endpoint::Stream;
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
}

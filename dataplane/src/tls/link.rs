//! A channel's two directions under TLS: a [`LinkWriter`] that seals what it is given into
//! records and sends them through the transport's own writer, and a [`LinkReader`] that reads
//! records ahead through the transport's reader and opens them.

use std::io::{self, IoSliceMut};

use super::record::{Cursor, MAX_FRAGMENT, MAX_SEALED, Opener, Sealer};
use crate::transport::{LinkReader, LinkWriter};

/// Plaintext sealed per write: 64 full records.
const BATCH: usize = 64 * MAX_FRAGMENT;

/// The sending direction: seals each batch into its own buffer and sends it in one write.
pub(crate) struct TlsWriter {
    inner: Box<dyn LinkWriter>,
    sealer: Sealer,
    /// Sealed records of the batch being sent; never grows past its first capacity.
    out: Vec<u8>,
}

impl TlsWriter {
    pub(crate) fn new(inner: Box<dyn LinkWriter>, sealer: Sealer) -> TlsWriter {
        TlsWriter {
            inner,
            sealer,
            // A key update's record besides the batch's.
            out: Vec::with_capacity((BATCH / MAX_FRAGMENT + 2) * MAX_SEALED),
        }
    }
}

impl LinkWriter for TlsWriter {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut from = Cursor::new(bufs);
        while from.left() > 0 {
            self.out.clear();
            self.sealer.seal(&mut from, BATCH, &mut self.out)?;
            self.inner.send(&[&self.out])?;
        }
        Ok(())
    }

    /// Sealed bytes, which the records' headers and tags make a little more than the plain
    /// ones sent: under 0.2 % at full records.
    fn in_flight(&self) -> Option<u64> {
        self.inner.in_flight()
    }
}

/// The receiving direction: reads ciphertext ahead and opens it in its own buffer.
pub(crate) struct TlsReader {
    inner: Box<dyn LinkReader>,
    opener: Opener,
}

impl TlsReader {
    pub(crate) fn new(inner: Box<dyn LinkReader>, opener: Opener) -> TlsReader {
        TlsReader { inner, opener }
    }

    fn fill(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        let inner = &mut self.inner;
        while got < out.len() {
            let n = self.opener.read(&mut out[got..], &mut |buf, at_least| {
                inner.recv_some(buf, at_least)
            })?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer ended the TLS stream",
                ));
            }
            got += n;
        }
        Ok(())
    }
}

impl LinkReader for TlsReader {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.fill(buf)
    }

    fn recv_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        for buf in bufs.iter_mut() {
            self.fill(buf)?;
        }
        Ok(())
    }
}

//! A connected channel before it is split: its socket and, with TLS, the session that seals and
//! opens its bytes. The hello, the handshake replies and the handover's decision frames are read
//! and written through it ([`Read`], [`Write`]); the data path [splits](Conn::split) it.

use std::io::{self, Read, Write};
use std::ops::Deref;

use super::endpoint::Stream;
use super::link::{LinkReader, LinkWriter, Transport};
use crate::tls::{Negotiated, Session, TlsReader, TlsWriter};

/// What protects a connection's bytes.
enum Protection {
    /// Nothing: plaintext.
    Plain,
    /// A TLS session.
    Tls(Box<Session>),
    /// Its TLS session went to the halves of a [`Conn::split`]: reading or writing here would
    /// bypass it, so both fail.
    Split(Negotiated),
}

/// A connected channel: the socket (its methods are reachable through `Deref`), and its TLS
/// session, if it has one.
pub(crate) struct Conn {
    stream: Stream,
    protection: Protection,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("stream", &self.stream)
            .field("tls", &self.tls())
            .finish()
    }
}

impl Conn {
    /// A plaintext connection.
    pub(crate) fn plain(stream: Stream) -> Conn {
        Conn {
            stream,
            protection: Protection::Plain,
        }
    }

    /// A connection whose TLS handshake gave `session`.
    pub(crate) fn secured(stream: Stream, session: Session) -> Conn {
        Conn {
            stream,
            protection: Protection::Tls(Box::new(session)),
        }
    }

    /// What its TLS handshake settled (`None`: plaintext).
    pub(crate) fn tls(&self) -> Option<&Negotiated> {
        match &self.protection {
            Protection::Plain => None,
            Protection::Tls(session) => Some(&session.negotiated),
            Protection::Split(negotiated) => Some(negotiated),
        }
    }

    /// The writing and reading halves of the channel, over `transport`; with TLS, they seal
    /// and open its records, and the connection itself can no longer be read or written.
    pub(crate) fn split(
        &mut self,
        transport: &dyn Transport,
    ) -> io::Result<(Box<dyn LinkWriter>, Box<dyn LinkReader>)> {
        match std::mem::replace(&mut self.protection, Protection::Plain) {
            Protection::Plain => transport.split(&self.stream),
            Protection::Tls(session) => {
                let Session {
                    sealer,
                    opener,
                    negotiated,
                    ..
                } = *session;
                self.protection = Protection::Split(negotiated);
                let (writer, reader) = transport.split_copied(&self.stream)?;
                Ok((
                    Box::new(TlsWriter::new(writer, sealer)),
                    Box::new(TlsReader::new(reader, opener)),
                ))
            }
            split @ Protection::Split(_) => {
                self.protection = split;
                Err(split_already())
            }
        }
    }
}

fn split_already() -> io::Error {
    io::Error::other("the connection's TLS session was handed to its halves")
}

impl Deref for Conn {
    type Target = Stream;

    fn deref(&self) -> &Stream {
        &self.stream
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.protection {
            Protection::Plain => self.stream.read(buf),
            Protection::Tls(session) => {
                let stream = &mut self.stream;
                session
                    .opener
                    .read(buf, &mut |ciphertext, _| stream.read(ciphertext))
            }
            Protection::Split(_) => Err(split_already()),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.protection {
            Protection::Plain => self.stream.write(buf),
            Protection::Tls(session) => {
                // Sealed and sent whole: a record cannot be written in part and resumed.
                let session = &mut **session;
                let bufs = [buf];
                let mut from = crate::tls::Cursor::new(&bufs);
                while from.left() > 0 {
                    session.out.clear();
                    session
                        .sealer
                        .seal(&mut from, crate::tls::MAX_FRAGMENT, &mut session.out)?;
                    self.stream.write_all(&session.out)?;
                }
                Ok(buf.len())
            }
            Protection::Split(_) => Err(split_already()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

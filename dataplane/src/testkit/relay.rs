//! A relay that loses one handover message, for the tests and the tools: it forwards every
//! connection message by message (the hello or its reply, then whole frames), and on the first
//! connection (a migration's channel 0) swallows or cuts at the chosen frame.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::transport::{Endpoint, Listener, Stream};
use crate::wire::{FrameHeader, FrameKind, Hello, HelloReply};

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Sender to receiver.
    Up,
    /// Receiver to sender.
    Down,
}

/// What happens to the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// It and everything after it in its direction are swallowed; the connection stays open.
    Stall,
    /// Channel 0 is closed, both ways, just before it.
    Cut,
}

/// One handover message lost.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// Which message: [`FrameKind::Ready`], [`FrameKind::Decision`] or [`FrameKind::Decided`]
    /// (any other kind of frame works too).
    pub kind: FrameKind,
    /// How it is lost.
    pub how: How,
    /// Whether connections made after the fault are relayed (else closed at once).
    pub reconnect: bool,
}

impl Fault {
    /// The way the message travels: a decision up, everything else down.
    pub fn dir(self) -> Dir {
        match self.kind {
            FrameKind::Decision => Dir::Up,
            _ => Dir::Down,
        }
    }
}

/// A relay in front of the receiver at `to`: relays every connection, and on the first
/// (channel 0) applies `fault`. Returns where it listens (loopback TCP). It runs until no
/// connection comes for 20 s.
pub fn relay(to: &Endpoint, fault: Fault) -> io::Result<Endpoint> {
    let listener = Listener::bind(&Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))))?;
    let at = listener.endpoint().clone();
    let to = to.clone();
    let struck = Arc::new(AtomicBool::new(false));
    thread::spawn(move || {
        let mut first = true;
        while let Ok(from) = listener.accept(Some(Duration::from_secs(20)), &|| false) {
            if struck.load(Ordering::Acquire) && !fault.reconnect {
                drop(from);
                continue;
            }
            let Ok(peer) = Stream::connect(&to, Duration::from_secs(5)) else {
                drop(from);
                continue;
            };
            let watched = std::mem::take(&mut first).then_some(fault);
            let pair = Arc::new(Mutex::new(Vec::new()));
            for (dir, src, dst) in [
                (Dir::Up, from.try_clone(), peer.try_clone()),
                (Dir::Down, peer.try_clone(), from.try_clone()),
            ] {
                let (Ok(src), Ok(dst)) = (src, dst) else {
                    continue;
                };
                let fault = watched.filter(|f| f.dir() == dir);
                let (pair, struck) = (Arc::clone(&pair), Arc::clone(&struck));
                if let Ok(clone) = src.try_clone() {
                    lock(&pair).push(clone);
                }
                thread::spawn(move || pump(dir, src, dst, fault, &pair, &struck));
            }
        }
    });
    Ok(at)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Forwards `src` to `dst` message by message (the hello or hello reply, then frames), until
/// `fault` strikes.
fn pump(
    dir: Dir,
    mut src: Stream,
    mut dst: Stream,
    fault: Option<Fault>,
    pair: &Mutex<Vec<Stream>>,
    struck: &AtomicBool,
) {
    let mut first = true;
    loop {
        let message = if std::mem::take(&mut first) {
            opening(dir, &mut src)
        } else {
            frame(&mut src)
        };
        let Some((kind, bytes)) = message else {
            break;
        };
        if let Some(fault) = fault.filter(|f| Some(f.kind) == kind) {
            struck.store(true, Ordering::Release);
            match fault.how {
                How::Stall => {
                    let mut sink = [0u8; 4096];
                    while matches!(src.read(&mut sink), Ok(1..)) {}
                }
                How::Cut => {
                    for stream in lock(pair).iter() {
                        stream.shutdown();
                    }
                    dst.shutdown();
                }
            }
            return;
        }
        if dst.write_all(&bytes).is_err() {
            break;
        }
    }
    dst.shutdown_write();
}

/// The hello (up) or the hello reply (down).
fn opening(dir: Dir, src: &mut Stream) -> Option<(Option<FrameKind>, Vec<u8>)> {
    let fixed = match dir {
        Dir::Up => Hello::FIXED_LEN,
        Dir::Down => HelloReply::FIXED_LEN,
    };
    let mut bytes = vec![0u8; fixed];
    src.read_exact(&mut bytes).ok()?;
    let rest = match dir {
        Dir::Up => Hello::table_len(bytes.as_slice().try_into().ok()?).ok()?,
        Dir::Down => HelloReply::reason_len(bytes.as_slice().try_into().ok()?).ok()?,
    };
    let mut tail = vec![0u8; rest];
    src.read_exact(&mut tail).ok()?;
    bytes.extend_from_slice(&tail);
    Some((None, bytes))
}

fn frame(src: &mut Stream) -> Option<(Option<FrameKind>, Vec<u8>)> {
    let mut fixed = [0u8; FrameHeader::LEN];
    src.read_exact(&mut fixed).ok()?;
    let header = FrameHeader::decode(&fixed).ok()?;
    let mut bytes = fixed.to_vec();
    bytes.resize(FrameHeader::LEN + header.len as usize, 0);
    src.read_exact(&mut bytes[FrameHeader::LEN..]).ok()?;
    Some((Some(header.kind), bytes))
}

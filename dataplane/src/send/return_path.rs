//! The return path: what the receiver sends back on each channel (the handover's *ready* and
//! *decided* on channel 0, or its error on any channel).

use std::time::Duration;

use crossbeam_channel as channel;

use crate::error::Error;
use crate::session::{Counters, Stop};
use crate::transport::LinkReader;
use crate::wire::{FrameHeader, FrameKind};

/// What the receiver said on channel 0.
#[derive(Debug, Clone)]
pub(super) enum Reply {
    /// *Ready*: it holds this many pages and bytes of device state, verified.
    Ready { pages: u64, device_state_len: u64 },
    /// *Decided*: the decision (go or abort) arrived.
    Decided(bool),
    /// Postcopy's *done*: every page is on the destination (this many placed in postcopy),
    /// with the destination's fault latencies.
    Done(u64, Box<crate::postcopy::LatencyDist>),
}

/// Reads the receiver's frames on one channel: an error message on any channel, the
/// handover's replies on channel 0. Ends at end of stream or on a socket error; only channel 0
/// reports a closed connection (as a missing reply), since the receiver closes every channel
/// once the handover is over.
pub(super) fn run(
    channel: u16,
    mut link: Box<dyn LinkReader>,
    stop: &Stop,
    counters: &Counters,
    confirm: Option<&channel::Sender<Result<Reply, Error>>>,
    timeout: Duration,
) {
    let mut payload = Vec::with_capacity(crate::wire::MAX_MESSAGE as usize);
    loop {
        let mut fixed = [0u8; FrameHeader::LEN];
        if let Err(e) = link.recv(&mut fixed) {
            if let Some(confirm) = confirm {
                let op = "waiting for the receiver's reply";
                let _ = confirm.send(Err(Error::io(channel, op, timeout, e)));
            }
            return;
        }
        let header = match FrameHeader::decode(&fixed) {
            Ok(header) => header,
            Err(source) => {
                stop.fail(Error::Decode { channel, source });
                return;
            }
        };
        payload.resize(header.len as usize, 0);
        if let Err(e) = link.recv(&mut payload) {
            stop.fail(Error::io(
                channel,
                "receiving the receiver's message",
                timeout,
                e,
            ));
            return;
        }
        let mut hasher = header.hasher();
        hasher.update(&payload);
        if let Err(source) = header.verify(hasher) {
            stop.fail(Error::Decode { channel, source });
            return;
        }
        counters.add_wire_bytes((FrameHeader::LEN + payload.len()) as u64);
        match (header.kind, confirm) {
            (FrameKind::Error, _) => {
                stop.fail(Error::PeerFailed {
                    peer: "receiver",
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
                return;
            }
            (FrameKind::Ready, Some(confirm)) => {
                let mut len = [0u8; 8];
                len.copy_from_slice(&payload[..8]);
                let _ = confirm.try_send(Ok(Reply::Ready {
                    pages: header.value,
                    device_state_len: u64::from_le_bytes(len),
                }));
            }
            (FrameKind::Decided, Some(confirm)) => {
                let _ = confirm.try_send(Ok(Reply::Decided(header.is_go())));
            }
            (FrameKind::Done, Some(confirm)) => {
                let latency = FrameHeader::done_words(&payload);
                let latency = Box::new(crate::postcopy::LatencyDist::from_words(&latency));
                let _ = confirm.try_send(Ok(Reply::Done(header.value, latency)));
            }
            (kind, _) => {
                let problem = format!("unexpected {kind:?} frame from the receiver");
                stop.fail(Error::protocol(channel, problem));
                return;
            }
        }
    }
}

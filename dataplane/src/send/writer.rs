//! The channel writers: each sends its channel's queued frames in large vectored writes and
//! gives their buffers back to the pool.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::outgoing::{FrameBuf, Outgoing, WRITE_BATCH_BYTES};
use super::rate::RateLimit;
use crate::arena::Arena;
use crate::error::Error;
use crate::pool::{Pool, recycle};
use crate::session::{Counters, Stop};
use crate::transport::LinkWriter;

/// What a channel writer needs.
pub(super) struct WriterContext {
    /// Where the frame buffers live, for the transport to register.
    pub(super) arena: Arc<Arena>,
    /// The session's rate limit, if any.
    pub(super) limit: Option<Arc<RateLimit>>,
    pub(super) channel: u16,
    pub(super) queue: Receiver<Outgoing>,
    pub(super) pool: Pool<FrameBuf>,
    pub(super) stop: Arc<Stop>,
    pub(super) counters: Arc<Counters>,
    pub(super) timeout: Duration,
}

impl WriterContext {
    /// Writes queued frames in large vectored writes until the queue closes. After a failure
    /// (its own or the session's) it keeps draining the queue, recycling buffers unsent, so
    /// that workers never wait on it.
    pub(super) fn run(self, mut link: Box<dyn LinkWriter>) {
        // Without registration the transport still sends, just less cheaply.
        let _ = link.register(&self.arena);
        let mut batch: Vec<Outgoing> = Vec::with_capacity(64);
        let mut spare: Vec<&[u8]> = Vec::with_capacity(64);
        let mut broken = false;
        while let Ok(first) = self.queue.recv() {
            let mut bytes = first.len();
            batch.push(first);
            while bytes < WRITE_BATCH_BYTES && batch.len() < 64 {
                match self.queue.try_recv() {
                    Ok(next) => {
                        bytes += next.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let stopping = self.stop.is_stopped();
            if !broken {
                let mut slices = recycle(std::mem::take(&mut spare));
                let listed = batch
                    .iter()
                    .filter(|o| !stopping || matches!(o, Outgoing::Farewell(_)))
                    .try_for_each(|o| o.slices(&mut slices));
                let written: usize = slices.iter().map(|s| s.len()).sum();
                let sent = match listed {
                    Err(source) => Err(Error::Memory {
                        channel: self.channel,
                        source,
                    }),
                    Ok(()) if slices.is_empty() => Ok(()),
                    Ok(()) => {
                        if let Some(limit) = &self.limit {
                            limit.wait(written, &self.stop);
                        }
                        link.send(&slices)
                            .map(|()| {
                                self.counters.add_sent(self.channel, written as u64);
                                if link.zero_copy() {
                                    self.counters.add_zero_copy_bytes(written as u64);
                                }
                            })
                            .map_err(|e| Error::io(self.channel, "sending frames", self.timeout, e))
                    }
                };
                if let Err(err) = sent {
                    broken = true;
                    self.stop.fail(err);
                }
                spare = recycle(slices);
            }
            for outgoing in batch.drain(..) {
                if let Some(frame) = outgoing.into_buffer() {
                    self.pool.give(frame);
                }
            }
        }
    }
}

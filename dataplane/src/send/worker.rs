//! The codec workers: each takes jobs, encodes each as one pages frame into a pooled buffer,
//! and queues the frame on its channel.

use std::sync::Arc;

use crossbeam_channel::{self as channel, Receiver};

use super::job::{CHUNK_LEN, Job};
use super::outgoing::{FrameBuf, Outgoing, QUEUE_FRAMES};
use super::rate::RateMeter;
use crate::codec::{Batch, Compression, Encoder, PageCompression};
use crate::error::Error;
use crate::memory::GuestMemory;
use crate::pool::Pool;
use crate::session::{Counters, Stop};
use crate::wire::CHUNK_PAGES;

/// `Compression::Auto` compresses only below this link rate per codec worker (lz4 compresses
/// text-like pages at about 0.65 GB/s per core).
pub(super) const AUTO_LZ4_BYTES_PER_WORKER: u64 = 650_000_000;

/// What a codec worker needs.
pub(super) struct WorkerContext {
    pub(super) meter: Arc<RateMeter>,
    /// `Compression::Auto` compresses below this wire rate (bytes per second).
    pub(super) auto_below: u64,
    pub(super) memory: Arc<GuestMemory>,
    pub(super) jobs: Receiver<Job>,
    pub(super) acks: channel::Sender<()>,
    pub(super) queues: Vec<channel::Sender<Outgoing>>,
    pub(super) pool: Pool<FrameBuf>,
    pub(super) stop: Arc<Stop>,
    pub(super) counters: Arc<Counters>,
    pub(super) compression: Compression,
}

impl WorkerContext {
    pub(super) fn run(self) {
        let mut codec = Codec::new(&self.memory, &self.pool, &self.stop, &self.counters);
        while let Ok(job) = self.jobs.recv() {
            if !self.stop.is_stopped()
                && let Some(queue) = self.queues.get(usize::from(job.channel))
                && let Some(outgoing) = codec.encode(&job, self.compression(queue))
                && let Err(e) = queue.send(outgoing)
                && let Some(frame) = e.into_inner().into_buffer()
            {
                self.pool.give(frame);
            }
            let _ = self.acks.send(());
        }
    }

    /// Whether the next job of the channel queue `queue` goes compressed.
    fn compression(&self, queue: &channel::Sender<Outgoing>) -> PageCompression {
        match self.compression {
            Compression::Off => PageCompression::Off,
            Compression::Lz4 => PageCompression::Lz4,
            Compression::Zstd => PageCompression::Zstd,
            // The link is the bottleneck while frames pile up in front of it, and compressing
            // pays only if it is slower than the workers compress.
            Compression::Auto
                if queue.len() * 2 >= QUEUE_FRAMES
                    && self.meter.sample(self.counters.wire_bytes()) < self.auto_below =>
            {
                PageCompression::Lz4
            }
            Compression::Auto => PageCompression::Off,
        }
    }
}

/// What encoding jobs takes, for one thread: a codec worker, or a channel writer that encodes
/// its channel's jobs itself (see [`Outgoing::Round`]).
pub(super) struct Codec<'a> {
    memory: &'a GuestMemory,
    pool: &'a Pool<FrameBuf>,
    stop: &'a Stop,
    counters: &'a Counters,
    encoder: Encoder,
    offsets: [u32; CHUNK_LEN],
}

impl<'a> Codec<'a> {
    pub(super) fn new(
        memory: &'a GuestMemory,
        pool: &'a Pool<FrameBuf>,
        stop: &'a Stop,
        counters: &'a Counters,
    ) -> Self {
        Codec {
            memory,
            pool,
            stop,
            counters,
            encoder: Encoder::new(),
            offsets: [0; CHUNK_LEN],
        }
    }

    /// Encodes `job` as one pages frame in a pool buffer, ready for its channel's writer:
    /// copied (live rounds) or in place (a frozen job). `None` after a failure, which it
    /// reports to the session's stop.
    pub(super) fn encode(&mut self, job: &Job, compression: PageCompression) -> Option<Outgoing> {
        let first = job.chunks().first().map_or(0, |&(chunk, _)| chunk) * CHUNK_PAGES;
        let mut count = 0;
        for &(chunk, mut mask) in job.chunks() {
            // `Job::fits` keeps every offset within a u32.
            let base = u32::try_from(chunk * CHUNK_PAGES - first).unwrap_or(u32::MAX);
            while mask != 0 && count < CHUNK_LEN {
                self.offsets[count] = base + mask.trailing_zeros();
                count += 1;
                mask &= mask - 1;
            }
        }
        let batch = Batch {
            region: job.region,
            first,
            offsets: &self.offsets[..count],
            round: job.round,
        };
        let Some(mut frame) = self.pool.take() else {
            self.stop.fail(Error::Internal {
                channel: job.channel,
                what: "the frame buffer pool broke",
            });
            return None;
        };
        let encoded = match &job.frozen {
            Some(memory) => self.encoder.encode_in_place(
                memory,
                &batch,
                compression,
                &mut frame.data,
                &mut frame.pieces,
            ),
            None => self
                .encoder
                .encode(self.memory, &batch, compression, &mut frame.data),
        };
        match encoded {
            Ok((len, counts)) => {
                self.counters.add_pages(counts);
                self.counters.add_queued(len as u64);
                Some(match &job.frozen {
                    Some(memory) => Outgoing::InPlace {
                        frame,
                        len,
                        region: batch.region as usize,
                        memory: memory.clone(),
                    },
                    None => Outgoing::Pooled(frame, len),
                })
            }
            Err(source) => {
                self.pool.give(frame);
                self.stop.fail(Error::Memory {
                    channel: job.channel,
                    source,
                });
                None
            }
        }
    }
}

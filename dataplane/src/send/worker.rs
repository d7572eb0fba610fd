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
        let mut encoder = Encoder::new();
        let mut offsets = [0u32; CHUNK_LEN];
        while let Ok(job) = self.jobs.recv() {
            if !self.stop.is_stopped() {
                self.encode(&mut encoder, &mut offsets, &job);
            }
            let _ = self.acks.send(());
        }
    }

    fn encode(&self, encoder: &mut Encoder, offsets: &mut [u32; CHUNK_LEN], job: &Job) {
        let Some(queue) = self.queues.get(usize::from(job.channel)) else {
            return;
        };
        let first = job.chunks().first().map_or(0, |&(chunk, _)| chunk) * CHUNK_PAGES;
        let mut count = 0;
        for &(chunk, mut mask) in job.chunks() {
            // `Job::fits` keeps every offset within a u32.
            let base = u32::try_from(chunk * CHUNK_PAGES - first).unwrap_or(u32::MAX);
            while mask != 0 && count < CHUNK_LEN {
                offsets[count] = base + mask.trailing_zeros();
                count += 1;
                mask &= mask - 1;
            }
        }
        let compression = match self.compression {
            Compression::Off => PageCompression::Off,
            Compression::Lz4 => PageCompression::Lz4,
            // The link is the bottleneck while frames pile up in front of it, and compressing
            // pays only if it is slower than the workers compress.
            Compression::Auto
                if queue.len() * 2 >= QUEUE_FRAMES
                    && self.meter.sample(self.counters.wire_bytes()) < self.auto_below =>
            {
                PageCompression::Lz4
            }
            Compression::Auto => PageCompression::Off,
        };
        let batch = Batch {
            region: job.region,
            first,
            offsets: &offsets[..count],
            round: job.round,
        };
        let Some(mut frame) = self.pool.take() else {
            self.stop.fail(Error::Internal {
                channel: job.channel,
                what: "the frame buffer pool broke",
            });
            return;
        };
        let encoded = match &job.frozen {
            Some(memory) => encoder.encode_in_place(
                memory,
                &batch,
                compression,
                &mut frame.data,
                &mut frame.pieces,
            ),
            None => encoder.encode(&self.memory, &batch, compression, &mut frame.data),
        };
        match encoded {
            Ok((len, counts)) => {
                self.counters.add_pages(counts);
                self.counters.add_queued(len as u64);
                let outgoing = match &job.frozen {
                    Some(memory) => Outgoing::InPlace {
                        frame,
                        len,
                        region: batch.region as usize,
                        memory: memory.clone(),
                    },
                    None => Outgoing::Pooled(frame, len),
                };
                if let Err(e) = queue.send(outgoing)
                    && let Some(frame) = e.into_inner().into_buffer()
                {
                    self.pool.give(frame);
                }
            }
            Err(source) => {
                self.pool.give(frame);
                self.stop.fail(Error::Memory {
                    channel: job.channel,
                    source,
                });
            }
        }
    }
}

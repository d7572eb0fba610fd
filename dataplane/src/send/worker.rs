//! The codec workers: each takes jobs, encodes each as one pages frame into a pooled buffer,
//! and queues the frame on its channel.

use std::sync::Arc;

use crossbeam_channel::{self as channel, Receiver};

use super::auto::Auto;
use super::job::{CHUNK_LEN, Job};
use super::outgoing::{FrameBuf, Holds, Outgoing};
use crate::codec::{Batch, Compression, Encoder, PageCompression};
use crate::error::Error;
use crate::memory::GuestMemory;
use crate::pool::Pool;
use crate::session::{Counters, Stop};
use crate::wire::CHUNK_PAGES;

/// What a codec worker needs.
pub(super) struct WorkerContext {
    /// `Compression::Auto`'s state, if that is the session's compression.
    pub(super) auto: Option<Arc<Auto>>,
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
        codec.auto = self.auto.as_deref();
        while let Ok(job) = self.jobs.recv() {
            if !self.stop.is_stopped()
                && let Some(queue) = self.queues.get(usize::from(job.channel))
                && let Some(outgoing) = codec.encode(&job, self.compression)
                && let Err(e) = queue.send(outgoing)
                && let Some(frame) = e.into_inner().into_buffer()
            {
                self.pool.give(frame);
            }
            let _ = self.acks.send(());
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
    /// `Compression::Auto`'s state: it picks each job's codec, and this measures for it.
    pub(super) auto: Option<&'a Auto>,
    /// Batches since its measurements were last folded into `auto`.
    unfolded: u32,
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
            auto: None,
            unfolded: 0,
        }
    }

    /// Batches between two folds of this encoder's measurements into the session's [`Auto`].
    const FOLD_EVERY: u32 = 8;

    /// Encodes `job` as one pages frame in a pool buffer, ready for its channel's writer:
    /// copied (live rounds) or in place (a frozen job), with `compression` (`Auto`: the codec
    /// its channel goes with now). `None` after a failure, which it reports to the session's
    /// stop.
    pub(super) fn encode(&mut self, job: &Job, compression: Compression) -> Option<Outgoing> {
        let compression = match (compression, self.auto) {
            (Compression::Auto, Some(auto)) => {
                self.encoder.measure();
                self.unfolded += 1;
                if self.unfolded >= Self::FOLD_EVERY {
                    self.unfolded = 0;
                    auto.fold(&self.encoder.take_tally());
                }
                auto.codec()
            }
            (Compression::Lz4, _) => PageCompression::Lz4,
            (Compression::Zstd, _) => PageCompression::Zstd,
            (Compression::Off | Compression::Auto, _) => PageCompression::Off,
        };
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
                frame.holds = Holds {
                    nonzero: u32::try_from(counts.pages() - counts.zero).unwrap_or(u32::MAX),
                    codec: compression,
                };
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

//! The sender's threads: codec workers that build frames, channel writers that send them, and
//! return-path readers that listen for the receiver's confirmation or error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{self as channel, Receiver};

use super::{CHUNK_LEN, Confirmation, FrameBuf, Job, Outgoing, QUEUE_FRAMES, WRITE_BATCH_BYTES};
use crate::arena::Arena;
use crate::codec::{Batch, Compression, Encoder, PageCompression};
use crate::error::Error;
use crate::memory::GuestMemory;
use crate::pool::Pool;
use crate::session::{Abort, Counters};
use crate::transport::{LinkReader, LinkWriter};
use crate::wire::{CHUNK_PAGES, FrameHeader, FrameKind};

/// `Compression::Auto` compresses only below this link rate per codec worker (lz4 compresses
/// text-like pages at about 0.65 GB/s per core).
pub(super) const AUTO_LZ4_BYTES_PER_WORKER: u64 = 650_000_000;

/// The wire rate of the last 100 ms or more, updated by whichever worker looks first.
#[derive(Debug)]
pub(super) struct RateMeter {
    origin: Instant,
    at_nanos: AtomicU64,
    at_bytes: AtomicU64,
    /// Bytes per second; `u64::MAX` until the first window is measured.
    rate: AtomicU64,
}

impl RateMeter {
    const WINDOW_NANOS: u64 = 100_000_000;

    pub(super) fn new() -> Self {
        RateMeter {
            origin: Instant::now(),
            at_nanos: AtomicU64::new(0),
            at_bytes: AtomicU64::new(0),
            rate: AtomicU64::new(u64::MAX),
        }
    }

    /// The rate, after folding in `bytes` sent so far. The first window starts at the first
    /// sample, when data flows, not when the session was set up.
    fn sample(&self, bytes: u64) -> u64 {
        let now = u64::try_from(self.origin.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .max(1);
        let last = self.at_nanos.load(Ordering::Relaxed);
        if last == 0 {
            if self
                .at_nanos
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.at_bytes.store(bytes, Ordering::Relaxed);
            }
            return self.rate.load(Ordering::Relaxed);
        }
        let span = now.saturating_sub(last);
        if span >= Self::WINDOW_NANOS
            && self
                .at_nanos
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let before = self.at_bytes.swap(bytes, Ordering::Relaxed);
            let rate = u128::from(bytes.saturating_sub(before)) * 1_000_000_000 / u128::from(span);
            self.rate
                .store(u64::try_from(rate).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        self.rate.load(Ordering::Relaxed)
    }
}

/// A session's send-rate limit (every channel together): a token bucket that refills at
/// `rate` bytes per second and holds at most 50 ms of it, so a send of `n` bytes waits until
/// the bucket has paid for it.
#[derive(Debug)]
pub(super) struct RateLimit {
    rate: u64,
    /// Tokens (bytes, negative while in debt) and when they were counted.
    state: std::sync::Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub(super) fn new(rate: u64) -> Self {
        Self::starting_at(rate, Instant::now())
    }

    /// A limit whose bucket is empty at `at`.
    fn starting_at(rate: u64, at: Instant) -> Self {
        RateLimit {
            rate: rate.max(1),
            state: std::sync::Mutex::new((0.0, at)),
        }
    }

    /// Charges `bytes` sent at `now`; returns how long to wait before sending them.
    fn charge(&self, bytes: usize, now: Instant) -> Duration {
        let rate = self.rate as f64;
        let mut state = crate::session::lock(&self.state);
        let (tokens, at) = *state;
        let refilled =
            (tokens + now.saturating_duration_since(at).as_secs_f64() * rate).min(rate * 0.05);
        let left = refilled - bytes as f64;
        *state = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / rate)
        }
    }

    /// Waits until `bytes` may be sent, or the session stops.
    pub(super) fn wait(&self, bytes: usize, abort: &Abort) {
        let until = Instant::now() + self.charge(bytes, Instant::now());
        while !abort.is_stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

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
    pub(super) abort: Arc<Abort>,
    pub(super) counters: Arc<Counters>,
    pub(super) compression: Compression,
}

impl WorkerContext {
    pub(super) fn run(self) {
        let mut encoder = Encoder::new();
        let mut offsets = [0u32; CHUNK_LEN];
        while let Ok(job) = self.jobs.recv() {
            if !self.abort.is_stopped() {
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
            self.abort.fail(Error::Internal {
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
                self.abort.fail(Error::Memory {
                    channel: job.channel,
                    source,
                });
            }
        }
    }
}

/// What a channel writer needs.
pub(super) struct WriterContext {
    /// Where the frame buffers live, for the transport to register.
    pub(super) arena: Arc<Arena>,
    /// The session's rate limit, if any.
    pub(super) limit: Option<Arc<RateLimit>>,
    pub(super) channel: u16,
    pub(super) queue: Receiver<Outgoing>,
    pub(super) pool: Pool<FrameBuf>,
    pub(super) abort: Arc<Abort>,
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
            let stopping = self.abort.is_stopped();
            if !broken {
                let mut slices = reuse_slices(std::mem::take(&mut spare));
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
                            limit.wait(written, &self.abort);
                        }
                        link.send(&slices)
                            .map(|()| self.counters.add_sent(self.channel, written as u64))
                            .map_err(|e| Error::io(self.channel, "sending frames", self.timeout, e))
                    }
                };
                if let Err(err) = sent {
                    broken = true;
                    self.abort.fail(err);
                }
                spare = reuse_slices(slices);
            }
            for outgoing in batch.drain(..) {
                if let Some(frame) = outgoing.into_buffer() {
                    self.pool.give(frame);
                }
            }
        }
    }
}

/// The same allocation, emptied and with a new lifetime, so the writer's slice list costs no
/// allocation per write.
fn reuse_slices<'b>(mut v: Vec<&[u8]>) -> Vec<&'b [u8]> {
    v.clear();
    v.into_iter().map(|_| &[][..]).collect()
}

/// Reads the receiver's frames on one channel: an error message on any channel, the
/// confirmation on channel 0. Ends at end of stream or on a socket error; only channel 0 reports
/// a closed connection (as a missing confirmation), since the receiver closes every channel once
/// it has confirmed.
pub(super) fn return_path(
    channel: u16,
    mut link: Box<dyn LinkReader>,
    abort: &Abort,
    counters: &Counters,
    confirm: Option<&channel::Sender<Result<Confirmation, Error>>>,
    timeout: Duration,
) {
    let mut payload = Vec::with_capacity(crate::wire::MAX_MESSAGE as usize);
    loop {
        let mut fixed = [0u8; FrameHeader::LEN];
        if let Err(e) = link.recv(&mut fixed) {
            if let Some(confirm) = confirm {
                let op = "waiting for the receiver's confirmation";
                let _ = confirm.send(Err(Error::io(channel, op, timeout, e)));
            }
            return;
        }
        let header = match FrameHeader::decode(&fixed) {
            Ok(header) => header,
            Err(source) => {
                abort.fail(Error::Decode { channel, source });
                return;
            }
        };
        payload.resize(header.len as usize, 0);
        if let Err(e) = link.recv(&mut payload) {
            abort.fail(Error::io(
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
            abort.fail(Error::Decode { channel, source });
            return;
        }
        counters.add_wire_bytes((FrameHeader::LEN + payload.len()) as u64);
        match (header.kind, confirm) {
            (FrameKind::Error, _) => {
                abort.fail(Error::PeerFailed {
                    peer: "receiver",
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
                return;
            }
            (FrameKind::Confirm, Some(confirm)) => {
                let mut len = [0u8; 8];
                len.copy_from_slice(&payload[..8]);
                let _ = confirm.try_send(Ok(Confirmation {
                    pages: header.value,
                    device_state_len: u64::from_le_bytes(len),
                }));
            }
            (kind, _) => {
                let problem = format!("unexpected {kind:?} frame from the receiver");
                abort.fail(Error::protocol(channel, problem));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    #[test]
    fn the_rate_limit_charges_sends_against_a_refilling_bucket() {
        let t0 = Instant::now();
        let limit = RateLimit::starting_at(1_000_000, t0);
        // An empty bucket: 100 KB at 1 MB/s wait 100 ms.
        assert_eq!(limit.charge(100_000, t0), Duration::from_millis(100));
        // The debt is paid by time: 100 ms later the bucket is empty again.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limit.charge(0, t1), Duration::ZERO);
        // Idle time fills it up to 50 ms worth (50 KB), no more.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(limit.charge(50_000, t2), Duration::ZERO);
        assert_eq!(limit.charge(10_000, t2), Duration::from_millis(10));
        // A second's worth of sends at once: the last may go a second later.
        let limit = RateLimit::starting_at(1_000_000, t0);
        let last = (0..100).map(|_| limit.charge(10_000, t0)).last();
        assert_eq!(last, Some(Duration::from_secs(1)));
    }

    #[test]
    fn the_rate_meter_measures_windows_from_the_first_sample() {
        let meter = RateMeter::new();
        thread::sleep(Duration::from_millis(20));
        // The first sample starts the first window: no rate yet, however long setup took.
        assert_eq!(meter.sample(1_000), u64::MAX);
        assert_eq!(meter.sample(5_000), u64::MAX, "the window is not over");
        thread::sleep(Duration::from_millis(110));
        let rate = meter.sample(1_000 + 100_000_000);
        // 100 MB in a little over 110 ms: below 1 GB/s, well above 0.5 GB/s.
        assert!((500_000_000..1_000_000_000).contains(&rate), "{rate}");
    }
}

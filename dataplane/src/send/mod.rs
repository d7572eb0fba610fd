//! The sending side of a migration.
//!
//! ```text
//!  caller ── round(dirty) ──> jobs ──> codec workers ──> per-channel queue ──> writer ──> socket
//!                              (one job per 64-page chunk)    (FIFO)                        │
//!  confirm <─────────────────────────────────────────────── return-path reader <───────────┘
//! ```
//!
//! A round splits the dirty set into 64-page chunks; each chunk is a job for the codec worker
//! pool, which copies the dirty pages out of guest memory into a pooled frame buffer, elides zero
//! pages, compresses what the gate lets through and seals the frame with its crc. The frame goes
//! to the queue of the chunk's fixed channel, whose writer sends queued frames in large vectored
//! writes and gives the buffers back to the pool. When every job of a round is encoded (a
//! barrier), an end-of-round frame is queued on each channel; since queues and sockets are FIFO,
//! every frame of round N reaches the receiver before any frame of round N+1 on that channel.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{self as channel, Receiver, RecvTimeoutError};
use ramjet_control::Fact;

mod pipeline;

use pipeline::{
    AUTO_LZ4_BYTES_PER_WORKER, RateLimit, RateMeter, WorkerContext, WriterContext, return_path,
};

use crate::arena::{Arena, Slot};
use crate::codec::Compression;
use crate::dirty::DirtySet;
use crate::error::Error;
use crate::memory::{Frozen, GuestMemory, MemoryError};
use crate::pool::Pool;
use crate::session::{Abort, CancelHandle, Counters, FactSink, Stats};
use crate::transport::{Endpoint, Stream, Transport};
use crate::wire::{
    CHUNK_PAGES, FrameHeader, Hello, HelloReply, MAX_CHANNELS, MAX_DEVICE_STATE, MAX_PAYLOAD,
    MAX_REGIONS, Piece, Verdict, channel_of, frame_capacity,
};

// A dirty-bitmap word is exactly one channel-assignment chunk, so a word becomes a job.
const _: () = assert!(CHUNK_PAGES == 64);
/// [`CHUNK_PAGES`] as an array length.
pub(super) const CHUNK_LEN: usize = 64;

/// Frames queued per channel before workers wait for its writer.
pub(super) const QUEUE_FRAMES: usize = 8;
/// A writer sends up to this many bytes in one vectored write.
pub(super) const WRITE_BATCH_BYTES: usize = 1 << 20;
/// How long the clean-up after a failure waits for the peer's own error message.
const GRACE: Duration = Duration::from_millis(500);

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Number of channels (sockets), 1 to 64.
    pub channels: u16,
    /// Page compression.
    pub compression: Compression,
    /// Codec worker threads (at least 1).
    pub workers: usize,
    /// Limit for connecting, the handshake, each socket write and the final confirmation.
    pub timeout: Duration,
    /// How bytes move (by default io_uring where the kernel allows it, else blocking).
    pub transport: Arc<dyn Transport>,
    /// Cancels the session from another thread.
    pub cancel: CancelHandle,
    /// The most bytes per second to send, every channel together (QEMU's `max-bandwidth`).
    pub max_bandwidth: Option<u64>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            channels: 2,
            compression: Compression::Auto,
            workers: thread::available_parallelism().map_or(2, usize::from),
            timeout: Duration::from_secs(30),
            transport: crate::transport::best().0,
            cancel: CancelHandle::new(),
            max_bandwidth: None,
        }
    }
}

/// What one round sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    /// The round number, from 1.
    pub round: u32,
    /// Pages sent in it.
    pub pages: u64,
}

/// What a completed migration sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Rounds sent.
    pub rounds: u32,
    /// Final counters.
    pub stats: Stats,
    /// From connecting to the receiver's confirmation.
    pub elapsed: Duration,
    /// When the receiver's confirmation arrived.
    pub confirmed: Instant,
}

/// What the receiver confirmed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Confirmation {
    pub(super) pages: u64,
    pub(super) device_state_len: u64,
}

/// A pool buffer for one pages frame: its bytes (a slot of the session's arena, which a
/// transport may register with the kernel) and, for a frame sent in place, its pieces.
#[derive(Debug)]
pub(super) struct FrameBuf {
    pub(super) data: Slot,
    pub(super) pieces: Vec<Piece>,
}

/// A frame on its way to a writer.
pub(super) enum Outgoing {
    /// A pages frame: the first `len` bytes of a pool buffer.
    Pooled(FrameBuf, usize),
    /// A pages frame of the paused final round, `len` bytes on the wire: the buffer's pieces,
    /// and raw pages of region `region` straight from the frozen memory.
    InPlace {
        frame: FrameBuf,
        len: usize,
        region: usize,
        memory: Frozen,
    },
    /// A control frame.
    Control(Vec<u8>),
    /// Our error message for the receiver: sent even while the session is stopping.
    Farewell(Vec<u8>),
}

impl Outgoing {
    /// Bytes on the wire.
    pub(super) fn len(&self) -> usize {
        match self {
            Outgoing::Pooled(_, len) | Outgoing::InPlace { len, .. } => *len,
            Outgoing::Control(frame) | Outgoing::Farewell(frame) => frame.len(),
        }
    }

    /// Appends the frame's bytes, in order, to `out`.
    pub(super) fn slices<'a>(&'a self, out: &mut Vec<&'a [u8]>) -> Result<(), MemoryError> {
        match self {
            Outgoing::Pooled(frame, len) => out.push(&frame.data[..*len]),
            Outgoing::InPlace {
                frame,
                region,
                memory,
                ..
            } => {
                for piece in &frame.pieces {
                    out.push(match *piece {
                        Piece::Buffer { start, len } => &frame.data[start..start + len],
                        Piece::Page(page) => memory.page(*region, page)?,
                    });
                }
            }
            Outgoing::Control(frame) | Outgoing::Farewell(frame) => out.push(frame),
        }
        Ok(())
    }

    /// The pool buffer, if it has one.
    pub(super) fn into_buffer(self) -> Option<FrameBuf> {
        match self {
            Outgoing::Pooled(frame, _) | Outgoing::InPlace { frame, .. } => Some(frame),
            Outgoing::Control(_) | Outgoing::Farewell(_) => None,
        }
    }
}

/// Where a round's jobs go: the codec workers, counted per channel and overall.
struct Dispatch<'a> {
    jobs: Option<&'a channel::Sender<Job>>,
    round_pages: &'a mut [u64],
    counters: &'a Counters,
    /// Pages of the round not yet handed out.
    remaining: u64,
    /// Jobs handed out, each to be acknowledged.
    dispatched: u64,
}

impl Dispatch<'_> {
    /// Hands `job` to the codec workers; false if they are gone.
    fn send(&mut self, job: Job) -> bool {
        let (channel, pages) = (usize::from(job.channel), u64::from(job.pages));
        if self.jobs.is_none_or(|jobs| jobs.send(job).is_err()) {
            return false;
        }
        self.round_pages[channel] += pages;
        self.remaining -= pages;
        self.counters.set_remaining_pages(self.remaining);
        self.dispatched += 1;
        true
    }
}

/// Dirty-bitmap words (64-page chunks) one job may gather.
pub(super) const JOB_WORDS: usize = 32;

/// The dirty pages of one frame: up to [`CHUNK_LEN`] pages from up to [`JOB_WORDS`] chunks of
/// one channel, in increasing order. Dense chunks make a job each; sparse ones, typical of
/// later rounds, share one, so a frame is never a page or two.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub(super) region: u32,
    /// (chunk, mask of its dirty pages), the first `words` of them in use.
    pub(super) chunks: [(u64, u64); JOB_WORDS],
    pub(super) words: usize,
    pub(super) pages: u32,
    pub(super) round: u32,
    pub(super) channel: u16,
    /// Set in the final round: the guest is paused and its memory frozen, so raw pages are
    /// sent in place instead of copied.
    pub(super) frozen: Option<Frozen>,
}

impl Job {
    /// Whether the dirty pages `mask` of chunk `chunk` still fit.
    fn fits(&self, chunk: u64, mask: u64) -> bool {
        let first = self.chunks[0].0;
        // Page offsets from the first chunk's first page must fit a u32.
        let span_ok = chunk.saturating_sub(first) < u64::from(u32::MAX) / CHUNK_PAGES;
        self.words < JOB_WORDS
            && u64::from(self.pages + mask.count_ones()) <= CHUNK_PAGES
            && span_ok
    }

    /// Adds the dirty pages `mask` of chunk `chunk` (which must [fit](Job::fits)).
    fn push(&mut self, chunk: u64, mask: u64) {
        self.chunks[self.words] = (chunk, mask);
        self.words += 1;
        self.pages += mask.count_ones();
    }

    /// The chunks in use.
    pub(super) fn chunks(&self) -> &[(u64, u64)] {
        &self.chunks[..self.words]
    }
}

/// A running send session: connected channels and the threads that feed them.
///
/// Facts: `setup-done` once every channel is connected, `pass N` as each round starts,
/// `switchover` from [`Sender::switchover`], `completed` once the receiver confirmed every page,
/// `failed` with the first error, and `drained` last, when every thread and socket of the
/// session has stopped. Dropping an unfinished sender cancels it.
pub struct Sender {
    memory: Arc<GuestMemory>,
    timeout: Duration,
    abort: Arc<Abort>,
    sink: Arc<dyn FactSink>,
    counters: Arc<Counters>,
    jobs: Option<channel::Sender<Job>>,
    acks: Receiver<()>,
    queues: Vec<channel::Sender<Outgoing>>,
    confirm: Receiver<Result<Confirmation, Error>>,
    reader_exits: Receiver<()>,
    workers: Vec<JoinHandle<()>>,
    writers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
    round: u32,
    /// Taken at switchover: the memory the final round sends in place.
    frozen: Option<Frozen>,
    round_pages: Vec<u64>,
    total_pages: Vec<u64>,
    started: Instant,
    ended: bool,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("channels", &self.queues.len())
            .field("round", &self.round)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

fn random_session_id() -> [u8; 16] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut id = [0u8; 16];
    for half in id.chunks_exact_mut(8) {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(Instant::now().elapsed().as_nanos());
        half.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    id
}

/// Sends the hello on `stream` and reads the receiver's verdict.
fn handshake(stream: &mut Stream, hello: &Hello, timeout: Duration) -> Result<(), Error> {
    use std::io::{Read, Write};
    let channel = hello.channel;
    let io = |op, e| Error::io(channel, op, timeout, e);
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| io("setting socket timeouts", e))?;
    stream
        .write_all(&hello.encode())
        .map_err(|e| io("sending the hello", e))?;
    let mut fixed = [0u8; HelloReply::FIXED_LEN];
    stream
        .read_exact(&mut fixed)
        .map_err(|e| io("waiting for the receiver's hello reply", e))?;
    let decode = |source| Error::Decode { channel, source };
    let len = HelloReply::reason_len(&fixed).map_err(decode)?;
    let mut reason = vec![0u8; len];
    stream
        .read_exact(&mut reason)
        .map_err(|e| io("reading the hello reply", e))?;
    match HelloReply::decode(&fixed, &reason).map_err(decode)?.verdict {
        Verdict::Accept => {}
        Verdict::Refuse(reason) => return Err(Error::Refused { channel, reason }),
    }
    // The return path idles until the end: only writes keep a timeout.
    stream
        .set_read_timeout(None)
        .map_err(|e| io("setting socket timeouts", e))
}

impl Sender {
    /// Connects every channel to `endpoint` and greets the receiver. Reports `setup-done` on
    /// success; on failure reports `failed` (unless cancelled) and `drained`.
    pub fn connect(
        memory: Arc<GuestMemory>,
        endpoint: &Endpoint,
        options: &SendOptions,
        sink: Arc<dyn FactSink>,
    ) -> Result<Sender, Error> {
        let abort = options.cancel.abort();
        let connected = Self::connect_streams(&memory, endpoint, options, &abort).and_then(|s| {
            let channels = s.len();
            let slots = channels * (QUEUE_FRAMES + 4) + options.workers * 2;
            let arena = Arena::new(slots, frame_capacity(CHUNK_LEN)).map_err(Error::Buffers)?;
            Ok((s, arena))
        });
        let (streams, (arena, slots)) = match connected {
            Ok(connected) => connected,
            Err(err) => {
                abort.fail(err);
                abort.close_all();
                let err = abort.take_error();
                if !err.is_cancelled() {
                    sink.fact(Fact::Failed(err.chain()));
                }
                sink.fact(Fact::Drained);
                return Err(err);
            }
        };
        let sender = Self::start(memory, &streams, options, &abort, sink, &arena, slots);
        sender.sink.fact(Fact::SetupDone);
        Ok(sender)
    }

    fn connect_streams(
        memory: &GuestMemory,
        endpoint: &Endpoint,
        options: &SendOptions,
        abort: &Abort,
    ) -> Result<Vec<Stream>, Error> {
        if options.channels == 0 || options.channels > MAX_CHANNELS {
            return Err(Error::Config(format!(
                "channels must be 1 to {MAX_CHANNELS}, not {}",
                options.channels
            )));
        }
        if options.workers == 0 {
            return Err(Error::Config("at least one codec worker is needed".into()));
        }
        if options.max_bandwidth == Some(0) {
            return Err(Error::Config("max-bandwidth must be above zero".into()));
        }
        if memory.regions().len() > MAX_REGIONS as usize {
            return Err(Error::Config(format!(
                "at most {MAX_REGIONS} memory regions can be migrated"
            )));
        }
        let session = random_session_id();
        let mut streams = Vec::with_capacity(usize::from(options.channels));
        for channel in 0..options.channels {
            if abort.is_stopped() {
                return Err(Error::Cancelled);
            }
            let mut stream =
                Stream::connect(endpoint, options.timeout).map_err(|source| Error::Connect {
                    channel,
                    endpoint: endpoint.to_string(),
                    source,
                })?;
            abort
                .register(&stream)
                .map_err(|e| Error::io(channel, "duplicating the socket", options.timeout, e))?;
            let hello = Hello {
                session,
                channel,
                channels: options.channels,
                regions: memory.layout(),
            };
            handshake(&mut stream, &hello, options.timeout)?;
            streams.push(stream);
        }
        Ok(streams)
    }

    /// Starts the workers, writers and return-path readers over connected streams.
    fn start(
        memory: Arc<GuestMemory>,
        streams: &[Stream],
        options: &SendOptions,
        abort: &Arc<Abort>,
        sink: Arc<dyn FactSink>,
        arena: &Arc<Arena>,
        slots: Vec<Slot>,
    ) -> Sender {
        let channels = streams.len();
        let counters = Arc::new(Counters::default());
        let pool = Pool::new(
            slots
                .into_iter()
                .map(|data| FrameBuf {
                    data,
                    pieces: Vec::with_capacity(CHUNK_LEN + 1),
                })
                .collect(),
        );
        let (jobs_tx, jobs_rx) = channel::bounded::<Job>(options.workers * 4);
        let (acks_tx, acks_rx) = channel::unbounded::<()>();
        let (confirm_tx, confirm_rx) = channel::bounded(2);
        let (exit_tx, exit_rx) = channel::unbounded();
        let mut queues = Vec::with_capacity(channels);
        let limit = options
            .max_bandwidth
            .map(|rate| Arc::new(RateLimit::new(rate)));
        let mut sender = Sender {
            memory: Arc::clone(&memory),
            timeout: options.timeout,
            abort: Arc::clone(abort),
            sink,
            counters: Arc::clone(&counters),
            jobs: Some(jobs_tx),
            acks: acks_rx,
            queues: Vec::new(),
            confirm: confirm_rx,
            reader_exits: exit_rx,
            workers: Vec::new(),
            writers: Vec::new(),
            readers: Vec::new(),
            round: 0,
            frozen: None,
            round_pages: vec![0; channels],
            total_pages: vec![0; channels],
            started: Instant::now(),
            ended: false,
        };
        for (index, stream) in streams.iter().enumerate() {
            let channel = u16::try_from(index).unwrap_or(u16::MAX);
            let (queue_tx, queue_rx) = channel::bounded(QUEUE_FRAMES);
            queues.push(queue_tx);
            let split = options.transport.split(stream);
            let (writer, reader) = match split {
                Ok(halves) => halves,
                Err(e) => {
                    abort.fail(Error::io(
                        channel,
                        "setting up the transport",
                        options.timeout,
                        e,
                    ));
                    continue;
                }
            };
            let ctx = WriterContext {
                arena: Arc::clone(arena),
                limit: limit.clone(),
                channel,
                queue: queue_rx,
                pool: pool.clone(),
                abort: Arc::clone(abort),
                counters: Arc::clone(&counters),
                timeout: options.timeout,
            };
            sender.spawn_into(true, "writer", move || ctx.run(writer));
            let confirm = (channel == 0).then(|| confirm_tx.clone());
            let (abort_r, exit) = (Arc::clone(abort), exit_tx.clone());
            let counters_r = Arc::clone(&counters);
            let timeout = options.timeout;
            sender.spawn_into(false, "return-path reader", move || {
                return_path(
                    channel,
                    reader,
                    &abort_r,
                    &counters_r,
                    confirm.as_ref(),
                    timeout,
                );
                let _ = exit.send(());
            });
        }
        let meter = Arc::new(RateMeter::new());
        let compression = match options.compression {
            Compression::Auto if streams.iter().any(Stream::is_local) => Compression::Off,
            other => other,
        };
        let auto_below = AUTO_LZ4_BYTES_PER_WORKER.saturating_mul(options.workers as u64);
        for _ in 0..options.workers {
            let ctx = WorkerContext {
                meter: Arc::clone(&meter),
                auto_below,
                memory: Arc::clone(&memory),
                jobs: jobs_rx.clone(),
                acks: acks_tx.clone(),
                queues: queues.clone(),
                pool: pool.clone(),
                abort: Arc::clone(abort),
                counters: Arc::clone(&counters),
                compression,
            };
            sender.spawn_worker(move || ctx.run());
        }
        sender.queues = queues;
        sender.memory = memory;
        sender
    }

    fn spawn_into(&mut self, writer: bool, what: &'static str, f: impl FnOnce() + Send + 'static) {
        match thread::Builder::new()
            .name(format!("ramjet-{what}"))
            .spawn(f)
        {
            Ok(handle) if writer => self.writers.push(handle),
            Ok(handle) => self.readers.push(handle),
            Err(source) => self.abort.fail(Error::Spawn { what, source }),
        }
    }

    fn spawn_worker(&mut self, f: impl FnOnce() + Send + 'static) {
        match thread::Builder::new().name("ramjet-codec".into()).spawn(f) {
            Ok(handle) => self.workers.push(handle),
            Err(source) => self.abort.fail(Error::Spawn {
                what: "codec worker",
                source,
            }),
        }
    }

    /// The guest memory it sends.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Ends the session with `err` (a failure outside the data plane, say a dirty log that
    /// could not be read): tells the receiver, stops every thread, reports `failed` and
    /// `drained`, and returns the error.
    pub fn fail_with(mut self, err: Error) -> Error {
        self.fail(err)
    }

    /// The live counters, to sample from another thread.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// The rounds sent so far.
    pub fn rounds(&self) -> u32 {
        self.round
    }

    /// Sends one round: every page in `dirty` (reports `pass N` first). Returns once every
    /// page of the round is encoded and queued; the sockets may still be sending.
    pub fn round(&mut self, dirty: &DirtySet) -> Result<RoundStats, Error> {
        self.check()?;
        if dirty.region_count() != self.memory.regions().len() {
            let err = Error::Config(format!(
                "the dirty set covers {} regions, the guest memory has {}",
                dirty.region_count(),
                self.memory.regions().len()
            ));
            return Err(self.fail(err));
        }
        self.round += 1;
        let round = self.round;
        self.sink.fact(Fact::Pass(u64::from(round)));
        self.counters.set_round(round);
        let remaining = dirty.count();
        self.counters.set_remaining_pages(remaining);
        self.round_pages.fill(0);
        let channels = u16::try_from(self.queues.len()).unwrap_or(MAX_CHANNELS);
        let mut out = Dispatch {
            // Borrowed, never cloned: the workers must see the queue close when the session
            // ends.
            jobs: self.jobs.as_ref(),
            round_pages: &mut self.round_pages,
            counters: &self.counters,
            remaining,
            dispatched: 0,
        };
        // A job being gathered per channel; never across regions.
        let mut gathering: Vec<Option<Job>> = vec![None; usize::from(channels)];
        'regions: for region in 0..dirty.region_count() {
            let region_index = u32::try_from(region).unwrap_or(u32::MAX);
            for (index, &mask) in dirty.words(region).iter().enumerate() {
                if mask == 0 {
                    continue;
                }
                if self.abort.is_stopped() {
                    break 'regions;
                }
                let chunk = index as u64;
                let channel = channel_of(chunk * CHUNK_PAGES, channels);
                let slot = &mut gathering[usize::from(channel)];
                if let Some(full) = slot.take_if(|job| !job.fits(chunk, mask))
                    && !out.send(full)
                {
                    break 'regions;
                }
                slot.get_or_insert_with(|| Job {
                    region: region_index,
                    chunks: [(0, 0); JOB_WORDS],
                    words: 0,
                    pages: 0,
                    round,
                    channel,
                    frozen: self.frozen.clone(),
                })
                .push(chunk, mask);
            }
            for job in gathering.iter_mut().filter_map(Option::take) {
                if !out.send(job) {
                    break 'regions;
                }
            }
        }
        let dispatched = out.dispatched;
        // The barrier: every job of this round is encoded and queued before its end marker.
        for _ in 0..dispatched {
            if self.acks.recv().is_err() {
                self.abort.fail(Error::Internal {
                    channel: 0,
                    what: "the codec workers stopped unexpectedly",
                });
                break;
            }
        }
        self.check()?;
        for (channel, queue) in self.queues.iter().enumerate() {
            let pages = self.round_pages[channel];
            self.total_pages[channel] += pages;
            let frame = FrameHeader::end_of_round(round, pages);
            self.counters.add_queued(frame.len() as u64);
            let _ = queue.send(Outgoing::Control(frame));
        }
        self.check()?;
        Ok(RoundStats {
            round,
            pages: self.round_pages.iter().sum(),
        })
    }

    /// Reports `switchover`: the caller has paused the guest, and the next round is the last.
    ///
    /// Freezes the guest memory ([`GuestMemory::freeze`]) until the session ends, so the final
    /// round checksums and sends raw pages straight from it instead of copying them; writes to
    /// it from this process fail meanwhile. Fails if the memory is being received into.
    pub fn switchover(&mut self) -> Result<(), Error> {
        self.check()?;
        if self.frozen.is_none() {
            match self.memory.freeze() {
                Ok(frozen) => self.frozen = Some(frozen),
                Err(e) => return Err(self.fail(Error::MemoryInUse(e))),
            }
        }
        self.sink.fact(Fact::Switchover);
        Ok(())
    }

    /// Sends the device state and the end of the stream, then waits for the receiver to
    /// confirm every page. Reports `completed` and then `drained`.
    pub fn finish(mut self, device_state: &[u8]) -> Result<Summary, Error> {
        self.check()?;
        if device_state.len() as u64 > MAX_DEVICE_STATE {
            let err = Error::Config(format!(
                "device state of {} bytes exceeds the limit of {MAX_DEVICE_STATE}",
                device_state.len()
            ));
            return Err(self.fail(err));
        }
        if let Some(first) = self.queues.first() {
            let mut offset = 0u64;
            for piece in device_state.chunks(MAX_PAYLOAD as usize) {
                let frame = FrameHeader::device_state(offset, piece);
                self.counters.add_queued(frame.len() as u64);
                let _ = first.send(Outgoing::Control(frame));
                offset += piece.len() as u64;
            }
        }
        for (channel, queue) in self.queues.iter().enumerate() {
            let frame = FrameHeader::end_of_stream(self.round, self.total_pages[channel]);
            self.counters.add_queued(frame.len() as u64);
            let _ = queue.send(Outgoing::Control(frame));
        }
        self.jobs = None;
        // The timeout runs from the last progress: on a slow link the frames still queued
        // here and in the sockets take a while to reach the receiver. Bytes leaving our queues
        // or the sockets' change these figures; a link that stopped leaves them still.
        let mut deadline = Instant::now() + self.timeout;
        let mut last = None;
        let confirmation = loop {
            if self.abort.is_stopped() {
                return Err(self.fail_stopped());
            }
            let remaining = Some((self.counters.in_flight(), self.abort.unsent()));
            if remaining != last {
                last = remaining;
                deadline = Instant::now() + self.timeout;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let err = Error::Timeout {
                    channel: 0,
                    op: "waiting for the receiver's confirmation",
                    timeout: self.timeout,
                };
                return Err(self.fail(err));
            }
            match self
                .confirm
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok(Ok(confirmation)) => break confirmation,
                Ok(Err(err)) => return Err(self.fail(err)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let err = Error::Closed {
                        channel: 0,
                        op: "waiting for the receiver's confirmation",
                    };
                    return Err(self.fail(err));
                }
            }
        };
        let sent: u64 = self.total_pages.iter().sum();
        if confirmation.pages != sent || confirmation.device_state_len != device_state.len() as u64
        {
            let err = Error::protocol(
                0,
                format!(
                    "the receiver confirmed {} pages and {} bytes of device state, {} and {} \
                     were sent",
                    confirmation.pages,
                    confirmation.device_state_len,
                    sent,
                    device_state.len()
                ),
            );
            return Err(self.fail(err));
        }
        self.counters
            .add_device_state_bytes(device_state.len() as u64);
        self.counters.set_remaining_pages(0);
        let confirmed = Instant::now();
        let elapsed = confirmed.duration_since(self.started);
        self.sink.fact(Fact::Completed);
        self.abort.close_all();
        self.stop_threads();
        self.ended = true;
        self.sink.fact(Fact::Drained);
        Ok(Summary {
            rounds: self.round,
            stats: self.counters.snapshot(),
            elapsed,
            confirmed,
        })
    }

    /// Fails with the stop reason if the session has stopped or ended.
    fn check(&mut self) -> Result<(), Error> {
        if self.ended {
            return Err(Error::Ended);
        }
        if self.abort.is_stopped() {
            return Err(self.fail_stopped());
        }
        Ok(())
    }

    fn fail(&mut self, err: Error) -> Error {
        self.abort.fail(err);
        self.fail_stopped()
    }

    /// Ends a stopped session: tells the receiver why, stops every thread, reports `failed`
    /// (unless cancelled) and `drained`, and returns the reason.
    fn fail_stopped(&mut self) -> Error {
        if self.ended {
            return Error::Ended;
        }
        self.ended = true;
        let cancelled = self.abort.is_cancelled();
        let err = self.abort.take_error();
        if !cancelled && !matches!(err, Error::PeerFailed { .. }) {
            let farewell = FrameHeader::error(&err.chain());
            for queue in &self.queues {
                let _ = queue.try_send(Outgoing::Farewell(farewell.clone()));
            }
        }
        self.jobs = None;
        self.queues.clear();
        // Give the receiver a moment to answer with its own error, then stop everything.
        let deadline = Instant::now() + GRACE;
        for _ in 0..self.readers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.reader_exits.recv_timeout(left).is_err() {
                break;
            }
        }
        self.abort.close_all();
        self.stop_threads();
        // A peer's message that arrived during the grace period explains a broken connection
        // better; it does not replace a failure of our own (which may have caused it).
        let err = match self.abort.take_error() {
            peer @ Error::PeerFailed { .. } if peer.explains(&err) => peer,
            _ => err,
        };
        if !cancelled {
            self.sink.fact(Fact::Failed(err.chain()));
        }
        self.sink.fact(Fact::Drained);
        err
    }

    /// Closes the job and frame queues and joins every thread.
    fn stop_threads(&mut self) {
        self.jobs = None;
        self.queues.clear();
        for handle in self
            .workers
            .drain(..)
            .chain(self.writers.drain(..))
            .chain(self.readers.drain(..))
        {
            let _ = handle.join();
        }
        // Every frame that lent out frozen pages is gone with the threads and queues.
        self.frozen = None;
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if !self.ended {
            self.abort.cancel();
            let _ = self.fail_stopped();
        }
    }
}

//! The sending side of a migration.
//!
//! ```text
//!  caller ── round(dirty) ──> jobs ──> codec workers ──> per-channel queue ──> writer ──> socket
//!                              (≤ 64 pages of one channel)      (FIFO)                      │
//!  handover <────────────────────────────────────────────── return-path reader <───────────┘
//! ```
//!
//! A round cuts the dirty set into jobs (`job.rs`): a dense 64-page chunk is a job of its own,
//! and sparse chunks of one channel share one, up to 64 pages. Each job goes to the codec worker
//! pool (`worker.rs`), which copies the dirty pages out of guest memory into a pooled frame
//! buffer, elides zero pages, compresses what the gate lets through and seals the frame with
//! its crc. The frame goes to the queue of its chunks' fixed channel, whose writer
//! (`writer.rs`) sends queued frames in large vectored writes and gives the buffers back to the
//! pool. Where nothing is compressed and the channels are Unix sockets (see `writers_encode`),
//! the round goes to each writer whole instead, and each plans and encodes its own channel's
//! jobs right before it sends them (no hand-off per frame). When every job of a round is
//! encoded (a barrier: one acknowledgement per job from a worker, or per round from a writer),
//! an end-of-round frame is queued on each channel; since queues and sockets are FIFO, every
//! frame of round N reaches the receiver before any frame of round N+1 on that channel.
//! The return-path readers (`return_path.rs`) listen for the receiver's handover replies or error;
//! `rate.rs` holds the rate policy (`max-bandwidth`, and the link rate `auto` compression
//! watches).
//!
//! [`Sender::finish`] ends with the handover (see [`wire`](crate::wire)): the receiver says
//! *ready*, the sender commits (from then on it never fails, and the guest must never resume
//! here) and says *go*, on channel 0 or, if that broke, on new connections for at most
//! [`SendOptions::decision_timeout`].

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{self as channel, Receiver, RecvTimeoutError};
use ramjet_control::Fact;

mod auto;
mod job;
mod options;
mod outgoing;
mod postcopy;
mod rate;
mod return_path;
mod worker;
mod writer;

pub use options::{PreSwitchover, RoundStats, SendOptions, Summary};
pub use postcopy::Postcopy;

use auto::Auto;
use job::{CHUNK_LEN, Job, RoundWork};
use outgoing::{FrameBuf, Holds, Outgoing, QUEUE_FRAMES};
use rate::RateLimit;
use return_path::Reply;
use worker::WorkerContext;
use writer::{LENT_FRAMES, WriterContext};

use crate::arena::Arena;
use crate::codec::{Compression, PageCompression};
use crate::dirty::DirtySet;
use crate::error::Error;
use crate::handle::LiveHandle;
use crate::memory::{Frozen, GuestMemory};
use crate::pool::Pool;
use crate::session::{self, Accepted, Counters, FactSink, MemoryTransfer, SameHost, Stop};
use crate::tls::{Negotiated, TlsClient};
use crate::transport::{Conn, Endpoint, Stream, Transport};
use crate::wire::{
    FrameHeader, Hello, HelloFlags, MAX_CHANNELS, MAX_DEVICE_STATE, MAX_PAYLOAD, MAX_REGIONS,
    frame_capacity,
};

/// How long the clean-up after a failure waits for the peer's own error message.
const GRACE: Duration = Duration::from_millis(500);
/// The longest a failed sender spends telling a receiver that may be in doubt that it keeps
/// the guest, on a new connection (the guest waits for it to resume).
const ABORT_BOUND: Duration = Duration::from_secs(2);

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

/// Whether the channel writers encode the rounds' jobs themselves ([`Outgoing::Round`]) instead
/// of the codec workers: when nothing is compressed, or `auto` decides (over a Unix socket, a
/// plain copy, that keeps to raw pages unless the link is capped), so that a job is a zero
/// check and a crc pass, best done right before the kernel copies the same pages while they
/// are in the cache; when there are at least as many writers as workers (so as many threads
/// encode); and when every channel is a plaintext Unix socket, whose send is one plain copy.
/// On TCP the send also carries the protocol's work (over loopback, the receive side's too),
/// and with TLS the sealing: there the workers' crc in parallel keeps the cores busier.
/// Measured on two cores (`benches/examples/probe.rs`, paired against plain copies): 2 Unix
/// channels 0.64 → 0.70 of the plain copy's speed; 1 Unix channel 1.17 → 0.80 and 2 TCP
/// channels 0.96 → 0.78 had the writers encoded.
fn writers_encode(compression: Compression, streams: &[Conn], workers: usize) -> bool {
    matches!(compression, Compression::Off | Compression::Auto)
        && streams.len() >= workers
        && streams
            .iter()
            .all(|c| c.tls().is_none() && matches!(**c, Stream::Unix(_)))
}

/// A running send session: connected channels and the threads that feed them.
///
/// Facts: `setup-done` once every channel is connected, `pass N` as each round starts,
/// `switchover` from [`Sender::switchover`], `completed` once the receiver said it holds every
/// page and the source committed to the handover (see [`Sender::finish`]), `failed` with the
/// first error, and `drained` last, when every thread and socket of the session has stopped.
/// Dropping an unfinished sender cancels it.
pub struct Sender {
    memory: Arc<GuestMemory>,
    timeout: Duration,
    stop: Arc<Stop>,
    /// The one handle of this session (see [`Sender::live_handle`]).
    handle: LiveHandle,
    sink: Arc<dyn FactSink>,
    counters: Arc<Counters>,
    jobs: Option<channel::Sender<Job>>,
    acks: Receiver<()>,
    queues: Vec<channel::Sender<Outgoing>>,
    /// Whether each writer encodes its channel's jobs of a round itself, instead of the codec
    /// workers (see [`Outgoing::Round`]).
    inline: bool,
    /// `Compression::Auto`'s measurements and choices, if that is the compression.
    auto: Option<Arc<Auto>>,
    confirm: Receiver<Result<Reply, Error>>,
    /// Where the receiver listens and this session's hello, for delivering the decision on a
    /// new connection.
    endpoint: Endpoint,
    hello: Hello,
    decision_timeout: Duration,
    /// The channels' TLS, for decision connections too.
    tls: Option<TlsClient>,
    /// What TLS settled on channel 0.
    negotiated: Option<Negotiated>,
    /// The end of stream is queued: the receiver may say *ready* (or may have said it) from
    /// now on, so a failure must tell it that the source keeps the guest.
    finishing: bool,
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
    /// The fault channel, connected with [`SendOptions::postcopy`] and idle until postcopy.
    fault: Option<Conn>,
    /// What the session was started with, for the fault channel's threads.
    transport: Arc<dyn Transport>,
    /// Committed to postcopy: from here a failure pauses the migration, and the receiver is
    /// never told that the source keeps the guest.
    postcopy: bool,
    /// What it was connected with, for reconnecting a paused postcopy.
    options: SendOptions,
    /// Whether the receiver took the memory by descriptor (then no page is sent), or why not.
    memory_transfer: MemoryTransfer,
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

/// What the threads of one session share, handed to each as it starts.
struct Wiring {
    memory: Arc<GuestMemory>,
    arena: Arc<Arena>,
    pool: Pool<FrameBuf>,
    counters: Arc<Counters>,
    stop: Arc<Stop>,
    limit: Option<Arc<RateLimit>>,
    timeout: Duration,
    /// One acknowledgement per job encoded, from a codec worker or a writer. Unbounded, but
    /// at most one ack per job of the round in flight: `round` hands out every job before it
    /// collects the acks, so a bounded channel could stall the workers.
    acks: (channel::Sender<()>, Receiver<()>),
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
        let stop = options.cancel.stop();
        let connected = Self::connect_streams(&memory, endpoint, options, &stop).and_then(
            |(streams, fault, hello, transfer)| {
                let shared = transfer == MemoryTransfer::Shared;
                let wiring = Self::wire_up(memory, &stop, streams.len(), shared, options)?;
                Ok((streams, fault, hello, wiring, transfer))
            },
        );
        let (mut streams, fault, hello, wiring, transfer) = match connected {
            Ok(connected) => connected,
            Err(err) => {
                stop.fail(err);
                stop.close_all();
                return Err(stop.end(sink.as_ref()));
            }
        };
        let mut sender = Self::start(&wiring, &mut streams, (endpoint, hello), options, sink);
        sender.fault = fault;
        sender.memory_transfer = transfer;
        sender.sink.fact(Fact::SetupDone);
        Ok(sender)
    }

    /// What the threads of a session over `channels` channels share: its frame buffers, its
    /// counters, its stop switch and rate limit. A session whose memory is `shared` sends no
    /// page, so it gets one frame buffer (which the transport would otherwise pin in vain).
    fn wire_up(
        memory: Arc<GuestMemory>,
        stop: &Arc<Stop>,
        channels: usize,
        shared: bool,
        options: &SendOptions,
    ) -> Result<Wiring, Error> {
        let slots = if shared {
            1
        } else {
            channels * (QUEUE_FRAMES + 4 + LENT_FRAMES) + options.workers * 2
        };
        let (arena, slots) =
            Arena::new(slots, frame_capacity(CHUNK_LEN)).map_err(Error::Buffers)?;
        let pool = Pool::new(
            slots
                .into_iter()
                .map(|data| FrameBuf {
                    data,
                    pieces: Vec::with_capacity(CHUNK_LEN + 1),
                    holds: Holds {
                        nonzero: 0,
                        codec: PageCompression::Off,
                    },
                })
                .collect(),
        );
        Ok(Wiring {
            memory,
            arena,
            pool,
            counters: Arc::new(Counters::default()),
            stop: Arc::clone(stop),
            limit: options
                .max_bandwidth
                .map(|rate| Arc::new(RateLimit::new(rate))),
            timeout: options.timeout,
            acks: channel::unbounded(),
        })
    }

    fn connect_streams(
        memory: &GuestMemory,
        endpoint: &Endpoint,
        options: &SendOptions,
        stop: &Stop,
    ) -> Result<(Vec<Conn>, Option<Conn>, Hello, MemoryTransfer), Error> {
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
        let mut hello = Hello {
            flags: HelloFlags {
                postcopy: options.postcopy,
                ..HelloFlags::default()
            },
            session: session::session_id(),
            channel: 0,
            channels: options.channels,
            regions: memory.layout(),
        };
        let offer = Self::memory_offer(memory, endpoint, options);
        let mut transfer = MemoryTransfer::Copied(String::new());
        let mut streams = Vec::with_capacity(usize::from(options.channels));
        for channel in 0..options.channels {
            hello.channel = channel;
            hello.flags.share = channel == 0 && offer.is_ok();
            let fds = offer.as_ref().ok().map(Vec::as_slice);
            let (conn, accepted) = Self::connect_one(endpoint, options, stop, &hello, fds)?;
            streams.push(conn);
            if channel == 0 {
                transfer = match (accepted, &offer) {
                    (Accepted::Shared, _) => MemoryTransfer::Shared,
                    (Accepted::Copying(why), _) => {
                        MemoryTransfer::Copied(format!("the receiver did not take it: {why}"))
                    }
                    (Accepted::Plain, Err(why)) => MemoryTransfer::Copied(why.clone()),
                    // `greet` refuses a plain acceptance of an offer; never reached.
                    (Accepted::Plain, Ok(_)) => {
                        MemoryTransfer::Copied("the receiver ignored the offer".into())
                    }
                };
            }
        }
        hello.flags.share = false;
        if let MemoryTransfer::Copied(why) = &transfer {
            if options.same_host == SameHost::On {
                return Err(Error::Config(format!(
                    "same-host is on, and the memory cannot be handed over: {why}"
                )));
            }
            if matches!(endpoint, Endpoint::Unix(_)) && options.same_host == SameHost::Auto {
                options.log.line(&format!(
                    "copying the guest memory, not handing it over: {why}"
                ));
            }
        }
        // The fault channel, last: idle until postcopy starts.
        let fault = if options.postcopy {
            let mut fault = hello.clone();
            fault.channel = options.channels;
            fault.flags.fault = true;
            Some(Self::connect_one(endpoint, options, stop, &fault, None)?.0)
        } else {
            None
        };
        hello.channel = 0;
        Ok((streams, fault, hello, transfer))
    }

    /// The descriptors of the memory to offer the receiver, or why it is not offered.
    fn memory_offer(
        memory: &GuestMemory,
        endpoint: &Endpoint,
        options: &SendOptions,
    ) -> Result<Vec<OwnedFd>, String> {
        let why = match options.same_host {
            SameHost::Off => Some("same-host is off".to_owned()),
            _ if !matches!(endpoint, Endpoint::Unix(_)) => Some(
                "the endpoint is TCP: memory is handed over only to a receiver on a Unix socket"
                    .to_owned(),
            ),
            _ if options.tls.is_some() => Some(
                "TLS is on: descriptors are passed only over a plaintext Unix socket".to_owned(),
            ),
            _ if options.postcopy => {
                Some("postcopy is on: a handed-over memory has no pages to fetch".to_owned())
            }
            _ => None,
        };
        match why {
            Some(why) => Err(why),
            None => memory.share_fds(),
        }
    }

    /// Connects, secures and greets one channel with `hello` (offering `memory` if the hello
    /// says so); returns how the receiver accepted it.
    fn connect_one(
        endpoint: &Endpoint,
        options: &SendOptions,
        stop: &Stop,
        hello: &Hello,
        memory: Option<&[OwnedFd]>,
    ) -> Result<(Conn, Accepted), Error> {
        let channel = hello.channel;
        if stop.is_stopped() {
            return Err(Error::Cancelled);
        }
        let stream =
            Stream::connect(endpoint, options.timeout).map_err(|source| Error::Connect {
                channel,
                endpoint: endpoint.to_string(),
                source,
            })?;
        stop.register(&stream)
            .map_err(|e| Error::io(channel, "duplicating the socket", options.timeout, e))?;
        let mut conn = session::secure(
            stream,
            endpoint,
            options.tls.as_ref(),
            channel,
            options.timeout,
            &|| stop.is_stopped(),
        )?;
        let accepted = session::greet(&mut conn, hello, memory, options.timeout)?;
        Ok((conn, accepted))
    }

    /// Starts the writers, return-path readers and codec workers over streams connected to
    /// `at.0` with hello `at.1` (channel 0's).
    fn start(
        wiring: &Wiring,
        streams: &mut [Conn],
        at: (&Endpoint, Hello),
        options: &SendOptions,
        sink: Arc<dyn FactSink>,
    ) -> Sender {
        let channels = streams.len();
        let (jobs_tx, jobs_rx) = channel::bounded::<Job>(options.workers * 4);
        let (acks_tx, acks_rx) = wiring.acks.clone();
        // Ready, decided, and a closed connection's error: each sent at most once.
        let (confirm_tx, confirm_rx) = channel::bounded(4);
        let (exit_tx, exit_rx) = channel::bounded(channels);
        let mut sender = Sender {
            memory: Arc::clone(&wiring.memory),
            timeout: options.timeout,
            stop: Arc::clone(&wiring.stop),
            handle: LiveHandle::new(Arc::clone(&wiring.stop)),
            sink,
            counters: Arc::clone(&wiring.counters),
            jobs: Some(jobs_tx),
            acks: acks_rx,
            queues: Vec::with_capacity(channels),
            inline: false,
            auto: None,
            confirm: confirm_rx,
            endpoint: at.0.clone(),
            hello: at.1,
            decision_timeout: options.decision_timeout,
            tls: options.tls.clone(),
            negotiated: streams.first().and_then(|c| c.tls().cloned()),
            finishing: false,
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
            fault: None,
            transport: Arc::clone(&options.transport),
            postcopy: false,
            options: options.clone(),
            memory_transfer: MemoryTransfer::Copied(String::new()),
        };
        let compression = options.compression;
        sender.inline = writers_encode(compression, streams, options.workers);
        if compression == Compression::Auto {
            sender.auto = Some(Arc::new(Auto::new(
                channels,
                options.workers + channels,
                sender.inline,
                options.log.clone(),
            )));
        }
        for (index, stream) in streams.iter_mut().enumerate() {
            let channel = u16::try_from(index).unwrap_or(u16::MAX);
            let confirm = (channel == 0).then(|| confirm_tx.clone());
            sender.start_channel(wiring, options, channel, stream, confirm, exit_tx.clone());
        }
        for worker in 0..options.workers {
            let ctx = WorkerContext {
                auto: sender.auto.clone(),
                memory: Arc::clone(&wiring.memory),
                jobs: jobs_rx.clone(),
                acks: acks_tx.clone(),
                queues: sender.queues.clone(),
                pool: wiring.pool.clone(),
                stop: Arc::clone(&wiring.stop),
                counters: Arc::clone(&wiring.counters),
                compression,
            };
            let name = format!("ramjet-codec-{worker}");
            let spawned = session::spawn(name, "codec worker", &wiring.stop, move || ctx.run());
            sender.workers.extend(spawned);
        }
        sender
    }

    /// Sets up channel `channel` on `stream`: its queue, its writer and its return-path reader
    /// (which reports its exit on `exit`, and the handover replies on `confirm` for channel 0).
    fn start_channel(
        &mut self,
        wiring: &Wiring,
        options: &SendOptions,
        channel: u16,
        stream: &mut Conn,
        confirm: Option<channel::Sender<Result<Reply, Error>>>,
        exit: channel::Sender<()>,
    ) {
        let (queue_tx, queue_rx) = channel::bounded(QUEUE_FRAMES);
        self.queues.push(queue_tx);
        let (writer, reader) = match stream.split(options.transport.as_ref()) {
            Ok(halves) => halves,
            Err(e) => {
                let op = "setting up the transport";
                wiring.stop.fail(Error::io(channel, op, options.timeout, e));
                return;
            }
        };
        let ctx = WriterContext {
            arena: Arc::clone(&wiring.arena),
            limit: wiring.limit.clone(),
            channel,
            queue: queue_rx,
            pool: wiring.pool.clone(),
            stop: Arc::clone(&wiring.stop),
            counters: Arc::clone(&wiring.counters),
            timeout: wiring.timeout,
            memory: Arc::clone(&wiring.memory),
            acks: wiring.acks.0.clone(),
            compression: options.compression,
            auto: self.auto.clone(),
        };
        let name = format!("ramjet-send-{channel}");
        let spawned = session::spawn(name, "channel writer", &wiring.stop, move || {
            ctx.run(writer);
        });
        self.writers.extend(spawned);
        let (stop, counters) = (Arc::clone(&wiring.stop), Arc::clone(&wiring.counters));
        let timeout = wiring.timeout;
        let name = format!("ramjet-rpath-{channel}");
        let spawned = session::spawn(name, "return-path reader", &wiring.stop, move || {
            return_path::run(channel, reader, &stop, &counters, confirm.as_ref(), timeout);
            let _ = exit.send(());
        });
        self.readers.extend(spawned);
    }

    /// The handle other threads steer and watch this session's live migration with
    /// ([`migrate_live`](crate::migrate_live)): its progress and `query-migrate` figures,
    /// `migrate-continue`, and cancel. Every clone is bound to this session, so a cancel through
    /// it always cancels this migration.
    pub fn live_handle(&self) -> LiveHandle {
        self.handle.clone()
    }

    /// Migrates a paused ("cold") guest in one call: the switchover (the memory is frozen, so
    /// every page is sent in place), optionally a wait in `pre-switchover` until
    /// [`LiveHandle::proceed`], one round of every page, then `device_state` and the handover
    /// ([`Sender::finish`]). The caller has stopped the guest (its vCPUs) before; on an error
    /// it resumes it, since the source kept it; on `Ok` it must never run it again. Reports
    /// `switchover`, `pass 1`, `completed` and `drained`, or `failed` (unless cancelled) and
    /// `drained`.
    pub fn migrate_paused(
        mut self,
        device_state: &[u8],
        pre_switchover: PreSwitchover,
    ) -> Result<Summary, Error> {
        self.handle.update(|p| p.paused = true);
        self.switchover()?;
        if pre_switchover == PreSwitchover::Wait && !self.handle.wait_to_proceed() {
            return Err(self.fail(Error::Cancelled));
        }
        let every_page = DirtySet::all(&self.memory);
        self.round(&every_page)?;
        self.finish(device_state)
    }

    /// The guest memory it sends.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Whether the receiver took the memory by descriptor (a same-host migration: no page is
    /// sent, and every round is empty), or why it is copied.
    pub fn memory_transfer(&self) -> &MemoryTransfer {
        &self.memory_transfer
    }

    /// Whether the memory is handed over by descriptor rather than copied.
    pub fn shares_memory(&self) -> bool {
        self.memory_transfer == MemoryTransfer::Shared
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
        self.counters.note_round(round);
        // Memory handed over by descriptor is the receiver's already: nothing to send.
        let shared = self.memory_transfer == MemoryTransfer::Shared;
        let remaining = if shared { 0 } else { dirty.count() };
        self.counters.set_remaining_pages(remaining);
        self.round_pages.fill(0);
        let channels = u16::try_from(self.queues.len()).unwrap_or(MAX_CHANNELS);
        let dispatched = if shared {
            0
        } else if self.inline {
            self.hand_round(dirty, channels, round)
        } else {
            let mut out = Dispatch {
                // Borrowed, never cloned: the workers must see the queue close when the
                // session ends.
                jobs: self.jobs.as_ref(),
                round_pages: &mut self.round_pages,
                counters: &self.counters,
                remaining,
                dispatched: 0,
            };
            for job in job::plan(dirty, channels, round, self.frozen.as_ref()) {
                if self.stop.is_stopped() || !out.send(job) {
                    break;
                }
            }
            out.dispatched
        };
        // The barrier: every job of this round is encoded and queued before its end marker.
        for _ in 0..dispatched {
            if self.acks.recv().is_err() {
                self.stop.fail(Error::Internal {
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

    /// Queues round `round` of `dirty` whole on every channel, for each writer to plan and
    /// encode its channel's jobs itself (see [`Outgoing::Round`]), and counts each channel's
    /// pages. Returns how many writers got it: each acknowledges it once, when it has encoded
    /// and sent its jobs (or given up on them: the session stopped).
    fn hand_round(&mut self, dirty: &DirtySet, channels: u16, round: u32) -> u64 {
        for job in job::plan(dirty, channels, round, None) {
            if let Some(pages) = self.round_pages.get_mut(usize::from(job.channel)) {
                *pages += u64::from(job.pages);
            }
        }
        // A copy of the bitmaps: a 64 KiB one per 2 GiB of guest.
        let work = Arc::new(RoundWork {
            dirty: dirty.clone(),
            channels,
            round,
            frozen: self.frozen.clone(),
        });
        let mut dispatched = 0;
        for queue in &self.queues {
            if self.stop.is_stopped() || queue.send(Outgoing::Round(Arc::clone(&work))).is_err() {
                break;
            }
            dispatched += 1;
        }
        self.counters.set_remaining_pages(0);
        dispatched
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

    /// Sends the device state and the end of the stream, then hands the guest over: waits for
    /// the receiver's *ready* (it holds every page and the device state, verified), commits,
    /// and says *go*. Reports `completed` and then `drained`.
    ///
    /// An error means the source keeps the guest: the caller resumes it (the receiver is told
    /// to discard its copy). Once the receiver said ready this returns `Ok`, whatever happens
    /// next: the guest belongs to the destination and must never resume here. If channel 0
    /// breaks before the receiver acknowledged *go*, the go is delivered on new connections
    /// for up to [`SendOptions::decision_timeout`];
    /// [`Summary::acknowledged`] says whether it arrived (if not, the destination is in doubt
    /// until an operator tells it that this source handed over).
    pub fn finish(mut self, device_state: &[u8]) -> Result<Summary, Error> {
        self.check()?;
        if device_state.len() as u64 > MAX_DEVICE_STATE {
            let err = Error::Config(format!(
                "device state of {} bytes exceeds the limit of {MAX_DEVICE_STATE}",
                device_state.len()
            ));
            return Err(self.fail(err));
        }
        self.jobs = None;
        self.end_and_await_ready(device_state, FrameHeader::end_of_stream)?;
        // The handover is decided: from here the source never resumes the guest, so nothing
        // below fails (a cancel no longer takes it back). A stop that came first wins.
        if !self.stop.commit() {
            return Err(self.fail_stopped());
        }
        if self.shares_memory() {
            // The destination may run the guest on this very memory once it hears the go:
            // nothing here may touch it from now on. (No frame lends its pages out: none was
            // sent, so the freeze can end.) Revoking the mappings walks the page tables, so it
            // waits until the go is out, the guest paused here meanwhile.
            self.frozen = None;
            self.memory.refuse_access();
        }
        self.counters
            .add_device_state_bytes(device_state.len() as u64);
        self.counters.set_remaining_pages(0);
        let go = Instant::now();
        let acknowledged = self.deliver_go();
        let confirmed = acknowledged.unwrap_or(go);
        self.sink.fact(Fact::Completed);
        if self.shares_memory() {
            // After `completed`: the migration is over, this is the source's clean-up.
            self.memory.revoke_if_idle();
        }
        self.stop.close_all();
        self.stop_threads();
        self.ended = true;
        self.sink.fact(Fact::Drained);
        Ok(Summary {
            rounds: self.round,
            stats: self.counters.snapshot(),
            elapsed: confirmed.duration_since(self.started),
            confirmed,
            acknowledged: acknowledged.is_some(),
            tls: self.negotiated.clone(),
            postcopy: None,
            memory: self.memory_transfer.clone(),
        })
    }

    /// Sends `device_state` (on channel 0) and each channel's end marker (`end(round, pages
    /// it sent)`), then waits for the receiver's *ready* and checks that it holds every page
    /// and byte sent. From the end markers on, a failure tells the receiver that the source
    /// keeps the guest.
    fn end_and_await_ready(
        &mut self,
        device_state: &[u8],
        end: fn(u32, u64) -> Vec<u8>,
    ) -> Result<(), Error> {
        self.queue_device_state(device_state);
        self.finishing = true;
        for (channel, queue) in self.queues.iter().enumerate() {
            let frame = end(self.round, self.total_pages[channel]);
            self.counters.add_queued(frame.len() as u64);
            let _ = queue.send(Outgoing::Control(frame));
        }
        let (pages, device_state_len) = self.wait_for_ready()?;
        let sent: u64 = self.total_pages.iter().sum();
        if pages != sent || device_state_len != device_state.len() as u64 {
            let err = Error::protocol(
                0,
                format!(
                    "the receiver holds {pages} pages and {device_state_len} bytes of device \
                     state, {sent} and {} were sent",
                    device_state.len()
                ),
            );
            return Err(self.fail(err));
        }
        Ok(())
    }

    /// Queues `device_state` on channel 0, in pieces.
    fn queue_device_state(&self, device_state: &[u8]) {
        if let Some(first) = self.queues.first() {
            let mut offset = 0u64;
            for piece in device_state.chunks(MAX_PAYLOAD as usize) {
                let frame = FrameHeader::device_state(offset, piece);
                self.counters.add_queued(frame.len() as u64);
                let _ = first.send(Outgoing::Control(frame));
                offset += piece.len() as u64;
            }
        }
    }

    /// Waits for the receiver's *ready*: the pages and device-state bytes it holds. The timeout
    /// runs from the last progress: on a slow link the frames still queued here and in the
    /// sockets take a while to reach the receiver. Bytes leaving our queues or the sockets'
    /// change these figures; a link that stopped leaves them still.
    fn wait_for_ready(&mut self) -> Result<(u64, u64), Error> {
        let op = "waiting for the receiver's ready";
        let mut deadline = Instant::now() + self.timeout;
        let mut last = None;
        loop {
            if self.stop.is_stopped() {
                return Err(self.fail_stopped());
            }
            let remaining = Some((self.counters.in_flight(), self.stop.unsent()));
            if remaining != last {
                last = remaining;
                deadline = Instant::now() + self.timeout;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let err = Error::Timeout {
                    channel: 0,
                    op,
                    timeout: self.timeout,
                };
                return Err(self.fail(err));
            }
            match self
                .confirm
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok(Ok(Reply::Ready {
                    pages,
                    device_state_len,
                })) => return Ok((pages, device_state_len)),
                Ok(Ok(reply @ (Reply::Decided(_) | Reply::Done(..)))) => {
                    let err =
                        Error::protocol(0, format!("the receiver said {reply:?} before ready"));
                    return Err(self.fail(err));
                }
                Ok(Err(err)) => return Err(self.fail(err)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.fail(Error::Closed { channel: 0, op }));
                }
            }
        }
    }

    /// Says *go* on channel 0 and waits for the receiver's acknowledgement; if channel 0 broke
    /// (or stays silent for the timeout), says it on new connections until one is acknowledged
    /// or the decision timeout passes. Returns when the go was acknowledged.
    fn deliver_go(&mut self) -> Option<Instant> {
        if let Ok(acknowledged) = self.say_go() {
            return Some(acknowledged);
        }
        // Shutting the old channels down ends a receiver's wait on them at once: it is in
        // doubt now, and accepts the decision on a new connection.
        self.stop.shutdown_all();
        let deadline = Instant::now() + self.decision_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = self.timeout.min(left).max(Duration::from_millis(1));
            let tls = self.tls.as_ref();
            if session::deliver(&self.endpoint, tls, &self.hello, true, timeout).is_ok() {
                return Some(Instant::now());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Says *go* on channel 0 and waits up to the timeout for *decided*; returns when it came,
    /// or why it did not.
    fn say_go(&mut self) -> Result<Instant, Error> {
        let op = "waiting for the receiver's acknowledgement of the go";
        let closed = Error::Closed { channel: 0, op };
        let first = self.queues.first().ok_or(Error::Ended)?;
        let frame = FrameHeader::decision(true);
        self.counters.add_queued(frame.len() as u64);
        // Sent even if the session is stopping (a cancel now, or another channel's error):
        // the go must get out whatever else is dropped.
        first.send(Outgoing::Farewell(frame)).map_err(|_| closed)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.confirm.recv_timeout(left) {
                Ok(Ok(Reply::Decided(true))) => return Ok(Instant::now()),
                // A stray ready or decided means a confused peer: wait on.
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(err),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        channel: 0,
                        op,
                        timeout: self.timeout,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Closed { channel: 0, op });
                }
            }
        }
    }

    /// Fails with the stop reason if the session has stopped or ended.
    fn check(&mut self) -> Result<(), Error> {
        if self.ended {
            return Err(Error::Ended);
        }
        if self.stop.is_stopped() {
            return Err(self.fail_stopped());
        }
        Ok(())
    }

    fn fail(&mut self, err: Error) -> Error {
        self.stop.fail(err);
        self.fail_stopped()
    }

    /// Ends a stopped session: tells the receiver why, stops every thread, reports `failed`
    /// (unless cancelled) and `drained`, and returns the reason.
    fn fail_stopped(&mut self) -> Error {
        if self.ended {
            return Error::Ended;
        }
        if self.postcopy {
            return self.pause();
        }
        self.ended = true;
        let cancelled = self.stop.is_cancelled();
        let err = self.stop.take_error();
        // Once the end of stream is queued the receiver may be waiting for our decision: even
        // a cancel is said, so that it discards its copy.
        if (!cancelled || self.finishing) && !matches!(err, Error::PeerFailed { .. }) {
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
        self.stop.close_all();
        self.stop_threads();
        // A peer's message that arrived during the grace period explains a broken connection
        // better; it does not replace a failure of our own (which may have caused it).
        let err = match self.stop.take_error() {
            peer @ Error::PeerFailed { .. } if peer.explains(&err) => peer,
            _ => err,
        };
        // A receiver that said ready over a link that then broke (or that a cancel shut) is in
        // doubt; the error frame may not have reached it, so the abort goes on a new
        // connection too (best effort: the receiver may be gone, and it would ask an operator
        // otherwise).
        if self.finishing
            && (cancelled
                || matches!(
                    err,
                    Error::Io { .. } | Error::Closed { .. } | Error::Timeout { .. }
                ))
        {
            let bound = self.timeout.min(ABORT_BOUND);
            let tls = self.tls.as_ref();
            let _ = session::deliver(&self.endpoint, tls, &self.hello, false, bound);
        }
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
        if self.postcopy {
            if !self.ended {
                let _ = self.pause();
            }
        } else if !self.ended {
            self.stop.cancel();
            let _ = self.fail_stopped();
        }
    }
}

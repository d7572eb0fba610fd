//! The receiving side of a migration.
//!
//! One reader thread per channel reads frame headers and page tables, checks every page
//! reference against guest memory and the protocol, then receives raw page payloads straight
//! into their destination pages with one vectored read, and lz4 payloads into a pooled buffer
//! that a decode worker expands in place. The crc covers the bytes as received; a frame that
//! fails it fails the migration.
//!
//! No two threads ever touch the same destination page at once, even with a hostile sender:
//! the session holds the memory's exclusive receive lease (no other reader or writer of this
//! process, and no second session, may use the memory meanwhile), a page is accepted only on
//! its fixed channel (see [`crate::wire::channel_of`]), at most once per round (a per-page round
//! stamp), and a channel's reader waits for its decode jobs at every end of round before it
//! reads the next round. That is what makes writing guest pages through `&mut [u8]` sound here.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{self as channel, Receiver};
use ramjet_control::Fact;

mod reader;

use reader::{ChannelDone, ChannelReader, DecodeJob, LzBuf, decode_worker};

use crate::error::Error;
use crate::memory::{GuestMemory, ReceiveLease, RegionLayout};
use crate::pool::Pool;
use crate::session::{Abort, CancelHandle, Counters, FactSink, Stats};
use crate::transport::{LinkWriter, Listener, Stream, Transport};
use crate::wire::{FrameHeader, Hello, HelloReply, Verdict};

/// How long a failed receiver keeps reading (and discarding) so that the sender gets its error
/// message instead of a connection reset.
const LINGER: Duration = Duration::from_secs(1);

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// lz4 decode worker threads (at least 1).
    pub workers: usize,
    /// Limit for each read and write once connected: a sender that says nothing for this long
    /// fails the migration.
    pub timeout: Duration,
    /// How long to wait for the sender's first connection (`None`: forever, like
    /// `-incoming`).
    pub accept_timeout: Option<Duration>,
    /// How bytes move (by default io_uring where the kernel allows it, else blocking).
    pub transport: Arc<dyn Transport>,
    /// Cancels the session from another thread.
    pub cancel: CancelHandle,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            workers: thread::available_parallelism().map_or(2, usize::from),
            timeout: Duration::from_secs(30),
            accept_timeout: None,
            transport: crate::transport::best().0,
            cancel: CancelHandle::new(),
        }
    }
}

/// What a completed receive produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The sender's device-state blob.
    pub device_state: Vec<u8>,
    /// Rounds received.
    pub rounds: u32,
    /// Final counters.
    pub stats: Stats,
    /// From the first connection to the confirmation.
    pub elapsed: Duration,
}

/// What every thread of a receive session shares.
struct Shared {
    /// The memory, held exclusively: the only way to its pages as `&mut [u8]`.
    lease: ReceiveLease,
    /// Per region, per page: the last round that wrote the page (0: never).
    stamps: Vec<Vec<AtomicU32>>,
    /// Per region: whether it was all zero when the session started.
    known_zero: Vec<bool>,
    abort: Arc<Abort>,
    counters: Arc<Counters>,
    sink: Arc<dyn FactSink>,
    channels: u16,
    timeout: Duration,
    pool: Pool<LzBuf>,
}

/// Receives one migration on `listener` into `memory`: accepts the sender's channels, checks
/// its hello against `memory`'s layout, applies every page, and confirms once everything has
/// arrived. Reports `setup-done`, `pass N` at the end of each round, `completed`, `failed` with
/// the first error, and `drained` last.
pub fn receive(
    listener: &Listener,
    memory: Arc<GuestMemory>,
    options: &ReceiveOptions,
    sink: Arc<dyn FactSink>,
) -> Result<Received, Error> {
    let abort = options.cancel.abort();
    if options.workers == 0 {
        abort.fail(Error::Config("at least one decode worker is needed".into()));
        return Err(end_failed(&abort, sink.as_ref()));
    }
    // Held until the session ends: nothing else in this process reads, writes or freezes the
    // memory while the session writes it.
    let lease = match memory.lease_for_receiving() {
        Ok(lease) => lease,
        Err(e) => {
            abort.fail(Error::MemoryInUse(e));
            return Err(end_failed(&abort, sink.as_ref()));
        }
    };
    let memory = Arc::clone(lease.memory());
    let streams = match accept_channels(listener, &memory, options, &abort) {
        Ok(streams) => streams,
        Err(err) => {
            abort.fail(err);
            abort.close_all();
            return Err(end_failed(&abort, sink.as_ref()));
        }
    };
    let started = Instant::now();
    // Whether each region is still all zero: then arriving zero pages need no write. Taken now,
    // since this session is about to write the memory.
    let known_zero = (0..memory.regions().len())
        .map(|region| memory.take_known_zero(region))
        .collect();
    sink.fact(Fact::SetupDone);
    let channels = u16::try_from(streams.len()).unwrap_or(u16::MAX);
    let shared = Arc::new(Shared {
        stamps: memory
            .regions()
            .iter()
            .map(|r| (0..r.layout().pages()).map(|_| AtomicU32::new(0)).collect())
            .collect(),
        lease,
        known_zero,
        abort: Arc::clone(&abort),
        counters: Arc::new(Counters::default()),
        sink,
        channels,
        timeout: options.timeout,
        pool: Pool::new(
            (0..usize::from(channels) * 2 + options.workers * 2)
                .map(|_| LzBuf::default())
                .collect(),
        ),
    });
    let mut session = Session::start(&shared, &streams, options);
    let outcome = session.collect();
    match outcome {
        Ok(mut done) => {
            let device_state = std::mem::take(&mut done.device_state);
            let confirm = FrameHeader::confirm(done.rounds, done.pages, device_state.len() as u64);
            let sent = session.writers.first_mut().map(|w| w.send(&[&confirm]));
            if let Some(Err(e)) = sent {
                abort.fail(Error::io(0, "sending the confirmation", options.timeout, e));
                session.stop(&abort);
                return Err(end_failed(&abort, shared.sink.as_ref()));
            }
            shared.counters.add_wire_bytes(confirm.len() as u64);
            shared.sink.fact(Fact::Completed);
            session.stop(&abort);
            shared.sink.fact(Fact::Drained);
            Ok(Received {
                device_state,
                rounds: done.rounds,
                stats: shared.counters.snapshot(),
                elapsed: started.elapsed(),
            })
        }
        Err(err) => {
            abort.fail(err);
            if !abort.is_cancelled() && !abort.peer_failed() {
                // Tell the sender why, on every channel, before closing.
                let message = FrameHeader::error(&abort.reason());
                for writer in &mut session.writers {
                    let _ = writer.send(&[&message]);
                }
            }
            session.linger();
            session.stop(&abort);
            Err(end_failed(&abort, shared.sink.as_ref()))
        }
    }
}

/// Reports `failed` (unless cancelled) and `drained`; returns the reason.
fn end_failed(abort: &Abort, sink: &dyn FactSink) -> Error {
    let cancelled = abort.is_cancelled();
    let err = abort.take_error();
    if !cancelled {
        sink.fact(Fact::Failed(err.chain()));
    }
    sink.fact(Fact::Drained);
    err
}

/// What every channel reported at its end of stream.
#[derive(Debug, Default)]
struct Done {
    pages: u64,
    rounds: u32,
    device_state: Vec<u8>,
}

/// The running threads of a receive session.
struct Session {
    writers: Vec<Box<dyn LinkWriter>>,
    results: Receiver<Result<ChannelDone, Error>>,
    pending: usize,
    readers: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl Session {
    fn start(shared: &Arc<Shared>, streams: &[Stream], options: &ReceiveOptions) -> Session {
        let (results_tx, results) = channel::unbounded();
        let (decode_tx, decode_rx) = channel::bounded::<DecodeJob>(options.workers * 2);
        let mut session = Session {
            writers: Vec::new(),
            results,
            pending: 0,
            readers: Vec::new(),
            workers: Vec::new(),
        };
        for _ in 0..options.workers {
            let (worker_shared, jobs) = (Arc::clone(shared), decode_rx.clone());
            let spawned = thread::Builder::new()
                .name("ramjet-decode".into())
                .spawn(move || decode_worker(&worker_shared, &jobs));
            match spawned {
                Ok(handle) => session.workers.push(handle),
                Err(source) => shared.abort.fail(Error::Spawn {
                    what: "decode worker",
                    source,
                }),
            }
        }
        for (index, stream) in streams.iter().enumerate() {
            let channel = u16::try_from(index).unwrap_or(u16::MAX);
            let (writer, link) = match options.transport.split(stream) {
                Ok(halves) => halves,
                Err(e) => {
                    let _ = results_tx.send(Err(Error::io(
                        channel,
                        "setting up the transport",
                        options.timeout,
                        e,
                    )));
                    session.pending += 1;
                    continue;
                }
            };
            session.writers.push(writer);
            let reader = ChannelReader::new(channel, link, Arc::clone(shared), decode_tx.clone());
            let results_tx = results_tx.clone();
            let spawned = thread::Builder::new()
                .name(format!("ramjet-recv-{channel}"))
                .spawn(move || {
                    let _ = results_tx.send(reader.run());
                });
            session.pending += 1;
            match spawned {
                Ok(handle) => session.readers.push(handle),
                Err(source) => {
                    session.pending -= 1;
                    shared.abort.fail(Error::Spawn {
                        what: "channel reader",
                        source,
                    });
                }
            }
        }
        session
    }

    /// Waits for every channel's end of stream; the first error ends the wait.
    fn collect(&mut self) -> Result<Done, Error> {
        let mut done = Done::default();
        while self.pending > 0 {
            let Ok(result) = self.results.recv() else {
                return Err(Error::Internal {
                    channel: 0,
                    what: "the channel readers stopped unexpectedly",
                });
            };
            self.pending -= 1;
            let channel = result?;
            done.pages += channel.pages;
            done.rounds = done.rounds.max(channel.rounds);
            if !channel.device_state.is_empty() {
                done.device_state = channel.device_state;
            }
        }
        if self.readers.is_empty() {
            return Err(Error::Internal {
                channel: 0,
                what: "no channel reader could be started",
            });
        }
        Ok(done)
    }

    /// After a failure: lets the readers read on (and discard) for a moment, so that the
    /// sender sees our error message rather than a reset connection.
    fn linger(&mut self) {
        let deadline = Instant::now() + LINGER;
        while self.pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.results.recv_timeout(left).is_err() {
                break;
            }
            self.pending -= 1;
        }
    }

    /// Shuts every socket down, joins every thread, and closes the sockets.
    fn stop(&mut self, abort: &Abort) {
        abort.close_all();
        for handle in self.readers.drain(..).chain(self.workers.drain(..)) {
            let _ = handle.join();
        }
    }
}

/// Accepts every channel of one migration and answers its hello.
fn accept_channels(
    listener: &Listener,
    memory: &GuestMemory,
    options: &ReceiveOptions,
    abort: &Abort,
) -> Result<Vec<Stream>, Error> {
    let mut slots: Vec<Option<Stream>> = Vec::new();
    let mut session = None;
    let mut accepted = 0usize;
    loop {
        let first = session.is_none();
        let (timeout, op) = if first {
            (options.accept_timeout, "waiting for the sender to connect")
        } else {
            (
                Some(options.timeout),
                "waiting for the other channels to connect",
            )
        };
        let channel = u16::try_from(accepted).unwrap_or(u16::MAX);
        let mut stream = listener
            .accept(timeout, &|| abort.is_stopped())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::Interrupted => Error::Cancelled,
                std::io::ErrorKind::TimedOut => Error::Timeout {
                    channel,
                    op,
                    timeout: timeout.unwrap_or_default(),
                },
                _ => Error::Listen {
                    endpoint: listener.endpoint().to_string(),
                    source: e,
                },
            })?;
        abort
            .register(&stream)
            .map_err(|e| Error::io(channel, "duplicating the socket", options.timeout, e))?;
        stream
            .set_read_timeout(Some(options.timeout))
            .and_then(|()| stream.set_write_timeout(Some(options.timeout)))
            .map_err(|e| Error::io(channel, "setting socket timeouts", options.timeout, e))?;
        let hello = read_hello(&mut stream, channel, options.timeout)?;
        let channel = hello.channel;
        let problem = match session {
            _ if hello.regions != memory.layout() => {
                Some(layout_mismatch(&hello.regions, &memory.layout()))
            }
            Some((id, count)) if hello.session != id || hello.channels != count => Some(format!(
                "channel {channel} belongs to another migration (session or channel count differs)"
            )),
            Some(_) if slots[usize::from(channel)].is_some() => {
                Some(format!("channel {channel} is already connected"))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            refuse(&mut stream, &problem);
            return Err(Error::Refused {
                channel,
                reason: problem,
            });
        }
        send_reply(&mut stream, &Verdict::Accept, channel, options.timeout)?;
        if first {
            session = Some((hello.session, hello.channels));
            slots.resize_with(usize::from(hello.channels), || None);
        }
        slots[usize::from(channel)] = Some(stream);
        accepted += 1;
        if accepted == slots.len() {
            return Ok(slots.into_iter().flatten().collect());
        }
    }
}

fn layout_mismatch(theirs: &[RegionLayout], ours: &[RegionLayout]) -> String {
    let show = |layout: &[RegionLayout]| {
        layout
            .iter()
            .map(|r| {
                format!(
                    "id {} at {:#x}, {} bytes",
                    r.id(),
                    r.guest_base().0,
                    r.len()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "the memory layouts differ: the sender has [{}], this receiver [{}]",
        show(theirs),
        show(ours)
    )
}

/// Reads a hello; a malformed one is refused with the reason before the error is returned.
fn read_hello(stream: &mut Stream, channel: u16, timeout: Duration) -> Result<Hello, Error> {
    use std::io::Read;
    let mut fixed = [0u8; Hello::FIXED_LEN];
    stream
        .read_exact(&mut fixed)
        .map_err(|e| Error::io(channel, "waiting for the hello", timeout, e))?;
    let len = Hello::table_len(&fixed).map_err(|source| {
        refuse(stream, &source.to_string());
        Error::Decode { channel, source }
    })?;
    let mut table = vec![0u8; len];
    stream
        .read_exact(&mut table)
        .map_err(|e| Error::io(channel, "receiving the hello's region table", timeout, e))?;
    Hello::decode(&fixed, &table).map_err(|source| {
        refuse(stream, &source.to_string());
        Error::Decode { channel, source }
    })
}

fn send_reply(
    stream: &mut Stream,
    verdict: &Verdict,
    channel: u16,
    timeout: Duration,
) -> Result<(), Error> {
    use std::io::Write;
    let reply = HelloReply {
        verdict: verdict.clone(),
    };
    stream
        .write_all(&reply.encode())
        .map_err(|e| Error::io(channel, "sending the hello reply", timeout, e))
}

/// Refuses a hello, best effort: the connection is being dropped anyway.
fn refuse(stream: &mut Stream, reason: &str) {
    let _ = send_reply(
        stream,
        &Verdict::Refuse(reason.to_owned()),
        0,
        Duration::ZERO,
    );
}

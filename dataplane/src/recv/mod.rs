//! The receiving side of a migration.
//!
//! First the sender's channels are told from strangers on the listener (`accept.rs`: strays
//! are dropped and logged, a broken sender fails the migration); while the session runs, a
//! door thread refuses newcomers (`door.rs`).
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
use std::time::Instant;

use crossbeam_channel::{self as channels, Receiver};
use ramjet_control::Fact;

mod accept;
mod channel;
mod decode;
mod door;
mod handover;
mod options;
mod postcopy;
#[cfg(test)]
mod same_host_tests;
mod shared;

pub use handover::{Handover, Operator};
pub use options::{Log, PostcopyRun, ReceiveOptions, Received};

use accept::{Accepted, accept_channels};
use channel::{ChannelDone, ChannelReader};
use decode::{DecodeJob, LzBuf};
use door::Door;
use handover::Outcome;
use shared::{LINGER, Shared};

use crate::error::Error;
use crate::memory::{GuestMemory, ReceiveLease};
use crate::pool::Pool;
use crate::session::{self, Counters, FactSink, MemoryTransfer, Stop};
use crate::transport::{Conn, LinkReader, LinkWriter, Listener};
use crate::wire::FrameHeader;

/// Receives one migration on `listener` into `memory`: accepts the sender's channels, checks
/// its hello against `memory`'s layout, applies every page, then hands over (see
/// [`Handover`]): says *ready* once everything arrived and was verified, and lets the guest run
/// only once the source said *go*.
///
/// Returns [`Received`] whenever it holds the complete, verified state; its
/// [`handover`](Received::handover) says whether the guest may run here (never run it in
/// doubt). Returns an error when the copy must not run: the migration failed before the
/// handover, the source kept the guest ([`Error::SourceKept`]), or it was cancelled or
/// discarded ([`Error::Cancelled`]).
///
/// Reports `setup-done`, `pass N` at the end of each round, `completed` once the guest may run
/// here, `in-doubt` when the link broke after *ready*, `failed` with the first error, and
/// `drained` last. A migration that switches to postcopy (which [`ReceiveOptions::postcopy`]
/// allows) reports `postcopy-started` when the guest starts here, `channel-lost` when a link
/// breaks, `reconnected` and `resumed` when the source reconnects, and `completed` once every
/// page is here; a postcopy that stays paused past [`ReceiveOptions::recover_wait`] returns
/// [`Error::PostcopyPaused`] without `failed` or `drained`.
///
/// Connections that are not the sender's are dropped on the way, each logged to
/// [`ReceiveOptions::log`] in one line, and the receiver waits on: one that closes, stalls past
/// [`hello_timeout`](ReceiveOptions::hello_timeout), sends something that is not ramjet (bad
/// magic: garbage, HTTP, TLS) or a corrupt or truncated hello, or greets for another session
/// while this one's channels are awaited. More than
/// [`max_refused`](ReceiveOptions::max_refused) of them fail the migration
/// ([`Error::TooManyRefused`]), and they never extend the accept timeouts. A peer that is a
/// ramjet sender but cannot be this migration's fails it, refused with the reason: another
/// protocol version, an invalid hello whose checksum holds, another memory layout, another
/// channel count for this session, or a channel that is already connected. Once every channel
/// is connected, further connections are refused without disturbing the session ("a migration
/// is already being received") until the data phase ends. The full list is in the docs of
/// `recv/accept.rs`.
pub fn receive(
    listener: &Listener,
    memory: Arc<GuestMemory>,
    options: &ReceiveOptions,
    sink: Arc<dyn FactSink>,
) -> Result<Received, Error> {
    let stop = options.cancel.stop();
    let invalid = if options.workers == 0 {
        Some("at least one decode worker is needed")
    } else if options.hello_timeout.is_zero() {
        Some("the hello timeout must be above zero")
    } else {
        None
    };
    if let Some(problem) = invalid {
        stop.fail(Error::Config(problem.into()));
        return Err(stop.end(sink.as_ref()));
    }
    // Held until the session ends: nothing else in this process reads, writes or freezes the
    // memory while the session writes it.
    let lease = match memory.lease_for_receiving() {
        Ok(lease) => lease,
        Err(e) => {
            stop.fail(Error::MemoryInUse(e));
            return Err(stop.end(sink.as_ref()));
        }
    };
    let accepted = match accept_channels(listener, &lease, options, &stop) {
        Ok(accepted) => accepted,
        Err(err) => {
            stop.fail(err);
            stop.close_all();
            return Err(stop.end(sink.as_ref()));
        }
    };
    // The door refuses newcomers from now until the data phase ends; the scope makes sure its
    // thread is gone before this returns, whatever happens.
    thread::scope(|scope| {
        let door = Door::open(scope, listener, options);
        run(lease, accepted, listener, options, &stop, sink, door)
    })
}

/// The session once every channel is connected: runs it, closes `door` when the data phase
/// ends, hands over (on `listener` too, in doubt) or tells the sender why not, and ends with
/// `drained`. A migration that switches to postcopy goes on in `postcopy.rs`.
fn run(
    lease: ReceiveLease,
    accepted: Accepted,
    listener: &Listener,
    options: &ReceiveOptions,
    stop: &Arc<Stop>,
    sink: Arc<dyn FactSink>,
    door: Door<'_>,
) -> Result<Received, Error> {
    let Accepted {
        mut streams,
        fault,
        session,
        memory: transfer,
    } = accepted;
    let streams = &mut streams[..];
    let at = (listener, session);
    let memory = Arc::clone(lease.memory());
    let started = Instant::now();
    // Whether each region is still all zero: then arriving zero pages need no write. Taken now,
    // since this session is about to write the memory.
    let known_zero = (0..memory.regions().len())
        .map(|region| memory.take_known_zero(region))
        .collect();
    sink.fact(Fact::SetupDone);
    let channels = u16::try_from(streams.len()).unwrap_or(u16::MAX);
    let negotiated = streams.first().and_then(|c| c.tls().cloned());
    let shared_memory = transfer == MemoryTransfer::Shared;
    let shared = Arc::new(Shared {
        // Memory taken by descriptor gets no page, so it needs no stamps.
        stamps: memory
            .regions()
            .iter()
            .map(|r| {
                let pages = if shared_memory { 0 } else { r.layout().pages() };
                (0..pages).map(|_| AtomicU32::new(0)).collect()
            })
            .collect(),
        lease,
        known_zero,
        stop: Arc::clone(stop),
        counters: Arc::new(Counters::default()),
        sink,
        channels,
        postcopy: fault.is_some(),
        shared_memory,
        timeout: options.timeout,
        pool: Pool::new(
            (0..usize::from(channels) * 2 + options.workers * 2)
                .map(|_| LzBuf::default())
                .collect(),
        ),
    });
    let mut running = Running::start(&shared, streams, options);
    let outcome = running.collect();
    // The data phase is over, however it ended: the listener is free again.
    door.close();
    match outcome {
        Ok(done) if done.postcopy => {
            let context = postcopy::Context {
                listener: at.0,
                session: at.1,
                options,
                stop,
                started,
                negotiated,
                channels,
            };
            context.run(shared, running, done, fault)
        }
        Ok(mut done) => {
            // Pre-copy to the end: the idle fault channel has nothing more to say.
            drop(fault);
            let device_state = std::mem::take(&mut done.device_state);
            let ready = FrameHeader::ready(done.rounds, done.pages, device_state.len() as u64);
            let context = handover::Context {
                listener: at.0,
                session: at.1,
                layout: memory.layout(),
                options,
                stop,
                sink: shared.sink.as_ref(),
                counters: &shared.counters,
            };
            let outcome = match running.writers.first_mut() {
                Some(writer) => context.hand_over(writer.as_mut(), &mut done.link, &ready),
                None => Outcome::Discard(Error::Internal {
                    channel: 0,
                    what: "channel 0 has no writer",
                }),
            };
            let handover = match outcome {
                Outcome::Keep(handover) => handover,
                Outcome::Discard(err) => {
                    stop.fail(err);
                    running.stop(stop);
                    return Err(stop.end(shared.sink.as_ref()));
                }
            };
            // The guest runs here, or may (in doubt, the complete state is kept): memory taken
            // from the sender stays.
            shared.lease.keep_adopted();
            if handover.may_run() {
                shared.sink.fact(Fact::Completed);
            }
            running.stop(stop);
            shared.sink.fact(Fact::Drained);
            Ok(Received {
                handover,
                device_state,
                rounds: done.rounds,
                stats: shared.counters.snapshot(),
                elapsed: started.elapsed(),
                tls: negotiated,
                postcopy: None,
                memory: transfer,
            })
        }
        Err(err) => Err(end_failed(&shared, running, stop, err)),
    }
}

/// Ends a session that failed before the handover: tells the sender why (on every channel),
/// stops everything, reports `failed` (unless cancelled) and `drained`.
fn end_failed(shared: &Shared, mut running: Running, stop: &Stop, err: Error) -> Error {
    stop.fail(err);
    if !stop.is_cancelled() && !stop.peer_failed() {
        let message = FrameHeader::error(&stop.reason());
        for writer in &mut running.writers {
            let _ = writer.send(&[&message]);
        }
    }
    running.linger();
    running.stop(stop);
    stop.end(shared.sink.as_ref())
}

/// What every channel reported at its end of stream (or, for postcopy, of pre-copy).
#[derive(Default)]
struct Done {
    pages: u64,
    rounds: u32,
    device_state: Vec<u8>,
    /// Channel 0's link, for the handover.
    link: Option<Box<dyn LinkReader>>,
    /// Postcopy: every channel ended pre-copy with a postcopy marker.
    postcopy: bool,
    /// Postcopy: every data channel's link but channel 0's, by channel (which postcopy
    /// pages arrive on).
    links: Vec<Option<Box<dyn LinkReader>>>,
    /// Postcopy: the pages to drop.
    discard: Option<crate::dirty::DirtySet>,
}

/// The running threads of a receive session.
struct Running {
    writers: Vec<Box<dyn LinkWriter>>,
    results: Receiver<Result<(u16, ChannelDone), Error>>,
    pending: usize,
    readers: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl Running {
    fn start(shared: &Arc<Shared>, streams: &mut [Conn], options: &ReceiveOptions) -> Running {
        // Unbounded, but each channel's reader sends exactly one result.
        let (results_tx, results) = channels::unbounded();
        let (decode_tx, decode_rx) = channels::bounded::<DecodeJob>(options.workers * 2);
        let mut running = Running {
            writers: Vec::new(),
            results,
            pending: 0,
            readers: Vec::new(),
            workers: Vec::new(),
        };
        for worker in 0..options.workers {
            let (worker_shared, jobs) = (Arc::clone(shared), decode_rx.clone());
            let name = format!("ramjet-decode-{worker}");
            let spawned = session::spawn(name, "decode worker", &shared.stop, move || {
                decode::run(&worker_shared, &jobs);
            });
            running.workers.extend(spawned);
        }
        for (index, stream) in streams.iter_mut().enumerate() {
            let channel = u16::try_from(index).unwrap_or(u16::MAX);
            running.pending += 1;
            let (writer, link) = match stream.split(options.transport.as_ref()) {
                Ok(halves) => halves,
                Err(e) => {
                    let op = "setting up the transport";
                    let _ = results_tx.send(Err(Error::io(channel, op, options.timeout, e)));
                    continue;
                }
            };
            running.writers.push(writer);
            let reader = ChannelReader::new(channel, link, Arc::clone(shared), decode_tx.clone());
            let results_tx = results_tx.clone();
            let name = format!("ramjet-recv-{channel}");
            let spawned = session::spawn(name, "channel reader", &shared.stop, move || {
                let _ = results_tx.send(reader.run().map(|done| (channel, done)));
            });
            match spawned {
                Some(handle) => running.readers.push(handle),
                None => running.pending -= 1,
            }
        }
        running
    }

    /// Waits for every channel's end of stream; the first error ends the wait.
    fn collect(&mut self) -> Result<Done, Error> {
        let mut done = Done::default();
        let mut markers = 0;
        let channels = self.pending;
        done.links.resize_with(channels, || None);
        while self.pending > 0 {
            let Ok(result) = self.results.recv() else {
                return Err(Error::Internal {
                    channel: 0,
                    what: "the channel readers stopped unexpectedly",
                });
            };
            self.pending -= 1;
            let (index, mut channel) = result?;
            markers += usize::from(channel.postcopy);
            if let Some(discard) = channel.discard.take() {
                done.discard = Some(discard);
            }
            if let Some(link) = channel.link.take() {
                if index == 0 {
                    done.link = Some(link);
                } else if let Some(slot) = done.links.get_mut(usize::from(index)) {
                    *slot = Some(link);
                }
            }
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
        match markers {
            0 => {}
            n if n == channels => done.postcopy = true,
            _ => {
                return Err(Error::protocol(
                    0,
                    "some channels ended pre-copy for postcopy, others ended the stream",
                ));
            }
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

    /// Joins the readers, which have returned, and the decode workers, which end once the
    /// readers' queue to them closes; the sockets stay open.
    fn join_threads(&mut self) {
        for handle in self.readers.drain(..).chain(self.workers.drain(..)) {
            let _ = handle.join();
        }
    }

    /// Shuts every socket down, joins every thread, and closes the sockets.
    fn stop(&mut self, stop: &Stop) {
        stop.close_all();
        for handle in self.readers.drain(..).chain(self.workers.drain(..)) {
            let _ = handle.join();
        }
    }
}

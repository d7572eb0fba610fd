//! The receiver's half of postcopy (the protocol is in [`wire`](crate::wire)'s docs).
//!
//! Every data channel ended pre-copy with a postcopy marker; channel 0 brought the discard
//! bitmaps and the device state. The receiver checks that every page either arrived in
//! pre-copy or is to be fetched (wanted), joins its pre-copy threads, turns its exclusive lease
//! into a placing claim (the guest will run on this memory) and makes the wanted pages absent
//! under userfaultfd ([`Placer`]). Then the handover: *ready*, and on *go* the guest starts
//! ([`ReceiveOptions::postcopy`]). From then on a reader per channel places the pushed pages,
//! the fault channel's reader the requested ones, and a fault thread turns the guest's faults
//! into requests. Once every wanted page is here, the memory is unregistered, *done* goes to
//! the source, and the migration completes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{self as channels, RecvTimeoutError};
use ramjet_control::Fact;

use super::accept::{Paused, Recovered, accept_recovery};
use super::handover::Handover;
use super::options::{ReceiveOptions, Received};
use super::shared::{LINGER, Shared};
use super::{Done, Running};
use crate::codec::{BatchCounts, Decoder};
use std::io::Write;

use crate::dirty::DirtySet;
use crate::error::Error;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::postcopy::place::{Fault, Placer};
use crate::postcopy::{AbsentPages, PostcopyStats};
use crate::session::{self, Counters, FactSink, Stop, Taken};
use crate::tls::Negotiated;
use crate::transport::{Conn, LinkReader, LinkWriter, Listener};
use crate::wire::{Encoding, FrameHeader, FrameKind, PageTable, channel_of};

/// What the postcopy phase needs of the receive session.
pub(super) struct Context<'a> {
    pub(super) listener: &'a Listener,
    pub(super) session: [u8; 16],
    pub(super) options: &'a ReceiveOptions,
    pub(super) stop: &'a Arc<Stop>,
    pub(super) started: Instant,
    pub(super) negotiated: Option<Negotiated>,
    /// Data channels.
    pub(super) channels: u16,
}

/// What the postcopy threads tell the coordinator.
enum Event {
    /// A data channel's push ended (its end of stream).
    Ended,
    /// The last wanted page was placed.
    Complete,
    /// A thread stopped on an error (recorded in the stop switch).
    Failed,
}

/// How the decision after *ready* went.
enum Decision {
    /// *Go*: the guest runs here from now on.
    Go,
    /// The source keeps the guest: discard.
    Discard(Error),
    /// Channel 0 broke first: in doubt until the source reconnects (it committed) or says
    /// abort on a new connection (it did not).
    Lost(Error),
}

/// One set of connections of a postcopy: the first is the migration's own, each recovery
/// makes a new one.
struct Epoch {
    stop: Arc<Stop>,
    /// Channel 0's writer, for *done*.
    writer: Box<dyn LinkWriter>,
    /// Every data channel's reader, by channel.
    links: Vec<Option<Box<dyn LinkReader>>>,
    fault: Option<Conn>,
}

/// What a postcopy receive keeps across its epochs.
struct Postcopy {
    placer: Arc<Placer>,
    memory: Arc<GuestMemory>,
    counters: Arc<Counters>,
    sink: Arc<dyn FactSink>,
    wanted: u64,
    rounds: u32,
    device_state: Vec<u8>,
    /// Whether the guest runs here (the go came, or a reconnection, which implies it).
    started: bool,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Context<'_> {
    /// Runs postcopy from the end of pre-copy to the last page (see the module docs).
    pub(super) fn run(
        &self,
        shared: Arc<Shared>,
        mut running: Running,
        done: Done,
        fault: Option<Conn>,
    ) -> Result<Received, Error> {
        let sink = Arc::clone(&shared.sink);
        let counters = Arc::clone(&shared.counters);
        let memory = Arc::clone(shared.lease.memory());
        let wanted = match check_discard(&shared, done.discard.as_ref()) {
            Ok(wanted) => wanted,
            Err(err) => return Err(super::end_failed(&shared, running, self.stop, err)),
        };
        // Pre-copy is over on every channel: its readers have returned, and its decode
        // workers end once their queue closes. Then the lease is ours alone.
        running.join_threads();
        let lease = match Arc::try_unwrap(shared) {
            Ok(shared) => shared.lease,
            Err(_) => {
                let err = Error::Internal {
                    channel: 0,
                    what: "a pre-copy thread outlived pre-copy",
                };
                self.stop.fail(err);
                running.stop(self.stop);
                return Err(self.stop.end(sink.as_ref()));
            }
        };
        let claim = lease.into_placing();
        let placer = match Placer::new(claim.memory(), &wanted) {
            Ok(placer) => Arc::new(placer),
            Err(source) => {
                let err = Error::Postcopy(source);
                return Err(self.refuse(&mut running, err, sink.as_ref()));
            }
        };
        let Done {
            pages,
            rounds,
            device_state,
            mut link,
            mut links,
            ..
        } = done;
        if running.writers.is_empty() {
            let _ = placer.finish();
            let err = Error::Internal {
                channel: 0,
                what: "channel 0 has no writer",
            };
            return Err(self.refuse(&mut running, err, sink.as_ref()));
        }
        let mut writer = running.writers.remove(0);
        let ready = FrameHeader::ready(rounds, pages, device_state.len() as u64);
        let decision = self.ready(&mut *writer, link.as_mut(), &ready, &counters);
        let mut postcopy = Postcopy {
            placer,
            memory,
            counters,
            sink,
            wanted: wanted.count(),
            rounds,
            device_state,
            started: false,
            requests: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
        };
        let mut epoch = match decision {
            Decision::Go => {
                if let Some(first) = links.first_mut() {
                    *first = link.take();
                }
                Some(Epoch {
                    stop: Arc::clone(self.stop),
                    writer,
                    links,
                    fault,
                })
            }
            Decision::Discard(err) => {
                let _ = postcopy.placer.finish();
                self.stop.fail(err);
                running.stop(self.stop);
                return Err(self.stop.end(postcopy.sink.as_ref()));
            }
            Decision::Lost(why) => {
                self.options.log.line(&format!(
                    "in doubt after saying ready for postcopy ({}): the guest does not run \
                     until the source reconnects or says abort",
                    why.chain()
                ));
                running.stop(self.stop);
                None
            }
        };
        drop(running);
        loop {
            if let Some(current) = epoch.take() {
                if self.run_epoch(&mut postcopy, current) {
                    drop(claim);
                    return Ok(self.complete(&postcopy));
                }
                postcopy.sink.fact(Fact::ChannelLost);
            }
            match self.await_recovery(&mut postcopy) {
                Ok(next) => epoch = next,
                Err(err) => return Err(err),
            }
        }
    }

    /// Says *ready* on channel 0 and reads the source's decision there.
    fn ready(
        &self,
        writer: &mut dyn LinkWriter,
        link: Option<&mut Box<dyn LinkReader>>,
        ready: &[u8],
        counters: &Counters,
    ) -> Decision {
        let timeout = self.options.timeout;
        if !self.stop.commit() {
            return Decision::Discard(self.stop.take_error());
        }
        if let Err(e) = writer.send(&[ready]) {
            // Not all of it went: the sender cannot have seen it, so it keeps the guest.
            return Decision::Discard(Error::io(0, "sending ready", timeout, e));
        }
        counters.add_wire_bytes(ready.len() as u64);
        let Some(link) = link else {
            return Decision::Lost(Error::Internal {
                channel: 0,
                what: "channel 0 has no reader",
            });
        };
        let op = "waiting for the sender's decision";
        let read = session::read_control(&mut |buf| link.recv(buf));
        let (header, payload) = match read {
            Ok(frame) => frame,
            Err(e) => return Decision::Lost(e.into_error(0, op, timeout)),
        };
        counters.add_wire_bytes((FrameHeader::LEN + payload.len()) as u64);
        match header.kind {
            FrameKind::Decision if header.is_go() => {
                let acknowledged = writer.send(&[&FrameHeader::decided(true)]);
                match acknowledged {
                    Ok(()) => counters.add_wire_bytes(FrameHeader::LEN as u64),
                    // The go is taken; the source pauses and reconnects.
                    Err(e) => self
                        .stop
                        .fail(Error::io(0, "acknowledging the go", timeout, e)),
                }
                Decision::Go
            }
            FrameKind::Decision => Decision::Discard(Error::SourceKept {
                reason: "its decision was abort".to_owned(),
            }),
            FrameKind::Error => Decision::Discard(Error::SourceKept {
                reason: format!(
                    "it failed before handing over: {}",
                    String::from_utf8_lossy(&payload)
                ),
            }),
            kind => Decision::Lost(Error::protocol(
                0,
                format!("a {kind:?} frame arrived instead of the sender's decision"),
            )),
        }
    }

    /// The source handed the guest over: runs it here.
    fn start_guest(&self, postcopy: &mut Postcopy) {
        postcopy.started = true;
        postcopy.sink.fact(Fact::PostcopyStarted);
        if let Some(run) = &self.options.postcopy
            && let Err(source) = run.run(&postcopy.device_state)
        {
            // The guest cannot run here; nothing more can be done for it on this side.
            self.options.log.line(&format!(
                "postcopy: the guest could not start here: {source}"
            ));
        }
    }

    /// Runs one epoch: its readers and fault handler until every page is here (true) or a
    /// connection breaks (false, with everything of the epoch stopped).
    fn run_epoch(&self, postcopy: &mut Postcopy, epoch: Epoch) -> bool {
        let Epoch {
            stop,
            mut writer,
            links,
            fault,
        } = epoch;
        let active = Active {
            placer: Arc::clone(&postcopy.placer),
            memory: Arc::clone(&postcopy.memory),
            stop: Arc::clone(&stop),
            counters: Arc::clone(&postcopy.counters),
            round: postcopy.rounds + 1,
            channels: u16::try_from(links.len()).unwrap_or(u16::MAX),
            timeout: self.options.timeout,
            requests: Arc::clone(&postcopy.requests),
            bytes: Arc::clone(&postcopy.bytes),
            quit: Arc::new(AtomicBool::new(false)),
        };
        let (events_tx, events) = channels::unbounded();
        let mut threads = active.start(links, fault, self.options, &events_tx);
        // The first epoch (or the first after a lost go) starts the guest, once its faults
        // are served: the hook may touch memory that is not here yet.
        if !postcopy.started {
            self.start_guest(postcopy);
        }
        let complete = active.wait(&events, threads.data).is_ok();
        if complete {
            // Every page is here: the memory is the kernel's again, and the source may stop.
            let _ = postcopy.placer.finish();
            let latency = postcopy.placer.latency().snapshot().to_words();
            let frame = FrameHeader::done(postcopy.wanted, &latency);
            if writer.send(&[&frame]).is_ok() {
                postcopy.counters.add_wire_bytes(FrameHeader::LEN as u64);
            }
            postcopy.sink.fact(Fact::Completed);
        }
        active.quit.store(true, Ordering::SeqCst);
        if complete {
            // The source closes once it read *done*: until then (or for a moment at most)
            // the readers take what it still sends, so it never sees a reset before the done.
            let deadline = Instant::now() + LINGER;
            while Instant::now() < deadline && threads.handles.iter().any(|t| !t.is_finished()) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        stop.close_all();
        for thread in threads.handles.drain(..) {
            let _ = thread.join();
        }
        complete
    }

    /// Paused: waits for the source to reconnect (or to say abort, if the guest never ran
    /// here) for at most [`ReceiveOptions::recover_wait`]; answers a reconnection with the
    /// bitmaps of the pages held here and returns its epoch.
    fn await_recovery(&self, postcopy: &mut Postcopy) -> Result<Option<Epoch>, Error> {
        let paused = Paused {
            listener: self.listener,
            layout: postcopy.memory.layout(),
            session: self.session,
            channels: self.channels,
            options: self.options,
        };
        let deadline = self.options.recover_wait.map(|w| Instant::now() + w);
        let stop = Arc::new(Stop::default());
        let recovered = match accept_recovery(&paused, &stop, deadline) {
            Ok(recovered) => recovered,
            Err(err) => return Err(self.give_up(postcopy, err)),
        };
        match recovered {
            // The go, on a connection of its own: the guest starts with the next epoch,
            // once there is a way to fetch its pages.
            Recovered::Decision(Taken::Decision(true)) => Ok(None),
            Recovered::Decision(taken) if !postcopy.started => {
                let reason = match taken {
                    Taken::Failed(message) => format!("it failed before handing over: {message}"),
                    Taken::Decision(_) => "its decision was abort".to_owned(),
                };
                let _ = postcopy.placer.finish();
                self.stop.fail(Error::SourceKept { reason });
                Err(self.stop.end(postcopy.sink.as_ref()))
            }
            Recovered::Decision(_) => {
                self.options.log.line(
                    "postcopy paused: a connection said abort, but the source handed the \
                     guest over already; ignored",
                );
                Ok(None)
            }
            Recovered::Channels { mut streams, fault } => {
                // A reconnection means the source committed: if the go it sent was lost, the
                // guest starts with this epoch.
                let resumed = postcopy.started;
                if resumed {
                    postcopy.sink.fact(Fact::Reconnected);
                }
                let told = match streams.first_mut() {
                    Some(first) => self.tell_received(first, postcopy),
                    None => Err(Error::Internal {
                        channel: 0,
                        what: "a reconnection without channel 0",
                    }),
                };
                let epoch = told.and_then(|()| self.split(&stop, streams, fault));
                match epoch {
                    Ok(epoch) => {
                        if resumed {
                            postcopy.sink.fact(Fact::Resumed);
                        }
                        Ok(Some(epoch))
                    }
                    Err(err) => {
                        stop.close_all();
                        postcopy.sink.fact(Fact::Failed(err.chain()));
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Sends the bitmaps of the pages held here, then *resume*, on a reconnected channel 0.
    fn tell_received(&self, first: &mut Conn, postcopy: &Postcopy) -> Result<(), Error> {
        let timeout = self.options.timeout;
        let per_piece = crate::wire::MAX_PAYLOAD as usize / 8;
        let mut held = 0u64;
        for (region, words) in postcopy.placer.received().iter().enumerate() {
            let region = u32::try_from(region).unwrap_or(u32::MAX);
            for (index, piece) in words.chunks(per_piece).enumerate() {
                if piece.iter().all(|&w| w == 0) {
                    continue;
                }
                held += piece.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                let word = (index * per_piece) as u64;
                let frame = FrameHeader::bitmap(FrameKind::Received, region, word, piece);
                first
                    .write_all(&frame)
                    .map_err(|e| Error::io(0, "sending the received bitmaps", timeout, e))?;
                postcopy.counters.add_wire_bytes(frame.len() as u64);
            }
        }
        let frame = FrameHeader::resume(held);
        first
            .write_all(&frame)
            .map_err(|e| Error::io(0, "sending resume", timeout, e))?;
        postcopy.counters.add_wire_bytes(frame.len() as u64);
        Ok(())
    }

    /// The halves of a reconnection's channels: an epoch.
    fn split(&self, stop: &Arc<Stop>, mut streams: Vec<Conn>, fault: Conn) -> Result<Epoch, Error> {
        let transport = self.options.transport.as_ref();
        let timeout = self.options.timeout;
        let mut writer = None;
        let mut links = Vec::with_capacity(streams.len());
        for (index, stream) in streams.iter_mut().enumerate() {
            let channel = u16::try_from(index).unwrap_or(u16::MAX);
            let (w, r) = stream
                .split(transport)
                .map_err(|e| Error::io(channel, "setting up the transport", timeout, e))?;
            if index == 0 {
                writer = Some(w);
            }
            links.push(Some(r));
        }
        let writer = writer.ok_or(Error::Internal {
            channel: 0,
            what: "a reconnection without channel 0",
        })?;
        Ok(Epoch {
            stop: Arc::clone(stop),
            writer,
            links,
            fault: Some(fault),
        })
    }

    /// No recovery came in time: the migration stays paused, and the caller gets the absent
    /// pages to keep while the guest may touch them (closing the userfaultfd would let the
    /// kernel fill them with zeros).
    fn give_up(&self, postcopy: &Postcopy, why: Error) -> Error {
        self.options.log.line(&format!(
            "postcopy paused: no reconnection came ({}); the guest waits for its missing pages",
            why.chain()
        ));
        Error::PostcopyPaused {
            source: Box::new(why),
            absent: Some(AbsentPages::new(Arc::clone(&postcopy.placer))),
        }
    }

    /// Every page is here: the result.
    fn complete(&self, postcopy: &Postcopy) -> Received {
        postcopy.sink.fact(Fact::Drained);
        let requests = postcopy.requests.load(Ordering::Relaxed);
        Received {
            handover: Handover::Go,
            device_state: postcopy.device_state.clone(),
            rounds: postcopy.rounds,
            stats: postcopy.counters.snapshot(),
            elapsed: self.started.elapsed(),
            tls: self.negotiated.clone(),
            postcopy: Some(PostcopyStats {
                pages: postcopy.wanted,
                requests,
                requested_pages: requests,
                bytes: postcopy.bytes.load(Ordering::Relaxed),
                latency: postcopy.placer.latency().snapshot(),
            }),
            memory: crate::MemoryTransfer::Copied(
                "postcopy fetches the pages the guest still needs: the memory is copied".into(),
            ),
        }
    }

    /// Before *ready*: the postcopy cannot start here; the sender is told why and keeps the
    /// guest.
    fn refuse(&self, running: &mut Running, err: Error, sink: &dyn FactSink) -> Error {
        self.stop.fail(err);
        let message = FrameHeader::error(&self.stop.reason());
        for writer in &mut running.writers {
            let _ = writer.send(&[&message]);
        }
        running.linger();
        running.stop(self.stop);
        self.stop.end(sink)
    }
}

/// The wanted pages: the discard set, after checking that every other page arrived in
/// pre-copy.
fn check_discard(shared: &Shared, discard: Option<&DirtySet>) -> Result<DirtySet, Error> {
    let memory = shared.lease.memory();
    let wanted = discard.cloned().unwrap_or_else(|| DirtySet::none(memory));
    for (region, stamps) in shared.stamps.iter().enumerate() {
        let words = wanted.words(region);
        for (page, stamp) in stamps.iter().enumerate() {
            let word = words.get(page / 64).copied().unwrap_or(0);
            if stamp.load(Ordering::Relaxed) == 0 && word >> (page % 64) & 1 == 0 {
                return Err(Error::protocol(
                    0,
                    format!(
                        "page {page} of region index {region} never arrived and is not to be \
                         fetched in postcopy"
                    ),
                ));
            }
        }
    }
    Ok(wanted)
}

/// What the postcopy threads share.
struct Active {
    placer: Arc<Placer>,
    memory: Arc<GuestMemory>,
    stop: Arc<Stop>,
    counters: Arc<Counters>,
    /// The round postcopy pages carry.
    round: u32,
    /// Data channels.
    channels: u16,
    timeout: Duration,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    /// Tells the fault thread to stop.
    quit: Arc<AtomicBool>,
}

/// The postcopy threads.
struct Threads {
    handles: Vec<JoinHandle<()>>,
    /// Data channel readers started.
    data: usize,
}

impl Active {
    fn clone_for(&self) -> Active {
        Active {
            placer: Arc::clone(&self.placer),
            memory: Arc::clone(&self.memory),
            stop: Arc::clone(&self.stop),
            counters: Arc::clone(&self.counters),
            round: self.round,
            channels: self.channels,
            timeout: self.timeout,
            requests: Arc::clone(&self.requests),
            bytes: Arc::clone(&self.bytes),
            quit: Arc::clone(&self.quit),
        }
    }

    /// Starts a page reader per data channel (`links`), and the fault channel's reader and
    /// fault thread.
    fn start(
        &self,
        links: Vec<Option<Box<dyn LinkReader>>>,
        fault: Option<Conn>,
        options: &ReceiveOptions,
        events: &channels::Sender<Event>,
    ) -> Threads {
        let mut threads = Threads {
            handles: Vec::new(),
            data: 0,
        };
        for (index, link) in links.into_iter().enumerate() {
            let channel = u16::try_from(index).unwrap_or(u16::MAX);
            let Some(link) = link else {
                self.stop.fail(Error::Internal {
                    channel,
                    what: "a data channel's link is missing",
                });
                continue;
            };
            let reader = PageReader::new(self.clone_for(), channel, false, link, events.clone());
            let name = format!("ramjet-postcopy-{channel}");
            if let Some(handle) = session::spawn(name, "postcopy reader", &self.stop, move || {
                reader.run();
            }) {
                threads.handles.push(handle);
                threads.data += 1;
            }
        }
        let Some(mut conn) = fault else {
            self.stop.fail(Error::Internal {
                channel: self.channels,
                what: "the fault channel is missing",
            });
            return threads;
        };
        let channel = self.channels;
        let halves = conn.split(options.transport.as_ref());
        let (writer, link) = match halves {
            Ok(halves) => halves,
            Err(e) => {
                let op = "setting up the fault channel";
                self.stop.fail(Error::io(channel, op, self.timeout, e));
                return threads;
            }
        };
        let reader = PageReader::new(self.clone_for(), channel, true, link, events.clone());
        let name = "ramjet-postcopy-faults-in".to_owned();
        threads.handles.extend(session::spawn(
            name,
            "postcopy reader",
            &self.stop,
            move || reader.run(),
        ));
        let handler = FaultHandler {
            active: self.clone_for(),
            writer,
            events: events.clone(),
        };
        let name = "ramjet-postcopy-faults".to_owned();
        threads.handles.extend(session::spawn(
            name,
            "fault handler",
            &self.stop,
            move || {
                handler.run();
            },
        ));
        threads
    }

    /// Waits until every wanted page is here (`Ok`) or the session stopped (`Err`). Once every
    /// data channel's push ended, a page that is still missing must have been requested
    /// (its answer is on its way): any other is a page the source will never send.
    fn wait(&self, events: &channels::Receiver<Event>, data: usize) -> Result<(), ()> {
        let mut ended = 0;
        loop {
            if self.placer.remaining() == 0 {
                return Ok(());
            }
            if self.stop.is_stopped() {
                return Err(());
            }
            match events.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Ended) => {
                    ended += 1;
                    if ended == data
                        && let Some((region, page)) = self.placer.missing_unrequested()
                    {
                        self.stop.fail(Error::protocol(
                            0,
                            format!(
                                "the source ended its push without page {page} of region index \
                                 {region}"
                            ),
                        ));
                    }
                }
                Ok(Event::Complete) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Event::Failed) | Err(RecvTimeoutError::Disconnected) => {
                    if self.placer.remaining() != 0 {
                        return Err(());
                    }
                }
            }
        }
    }
}

/// Reads one channel's postcopy pages and places them.
struct PageReader {
    active: Active,
    channel: u16,
    /// The fault channel (requested pages, of any channel; idle between faults).
    fault: bool,
    link: Box<dyn LinkReader>,
    events: channels::Sender<Event>,
    table: PageTable,
    payload: Vec<u8>,
    page: Box<[u8; PAGE_SIZE]>,
    decoder: Decoder,
    pushed: u64,
}

impl PageReader {
    fn new(
        active: Active,
        channel: u16,
        fault: bool,
        link: Box<dyn LinkReader>,
        events: channels::Sender<Event>,
    ) -> Self {
        PageReader {
            active,
            channel,
            fault,
            link,
            events,
            table: PageTable::new(),
            payload: Vec::new(),
            page: Box::new([0; PAGE_SIZE]),
            decoder: Decoder::new(),
            pushed: 0,
        }
    }

    fn run(mut self) {
        let result = self.read();
        let event = match result {
            Ok(()) => Event::Ended,
            Err(err) => {
                if !self.active.stop.is_stopped() && !self.active.quit.load(Ordering::SeqCst) {
                    self.active.stop.fail(err);
                }
                Event::Failed
            }
        };
        let _ = self.events.send(event);
    }

    fn protocol(&self, problem: String) -> Error {
        Error::protocol(self.channel, problem)
    }

    fn read(&mut self) -> Result<(), Error> {
        loop {
            let header = self.header()?;
            self.active
                .counters
                .add_wire_bytes(FrameHeader::LEN as u64 + u64::from(header.len));
            self.active.bytes.fetch_add(
                FrameHeader::LEN as u64 + u64::from(header.len),
                Ordering::Relaxed,
            );
            match header.kind {
                FrameKind::Pages => self.pages(&header)?,
                FrameKind::EndOfStream if !self.fault => {
                    self.payload(&header)?;
                    if header.round != self.active.round || header.value != self.pushed {
                        return Err(self.protocol(format!(
                            "the sender pushed {} pages on this channel in postcopy, {} arrived",
                            header.value, self.pushed
                        )));
                    }
                    return Ok(());
                }
                FrameKind::Error => {
                    self.payload(&header)?;
                    return Err(Error::PeerFailed {
                        peer: "sender",
                        message: String::from_utf8_lossy(&self.payload).into_owned(),
                    });
                }
                kind => {
                    return Err(self.protocol(format!("a {kind:?} frame arrived in postcopy")));
                }
            }
        }
    }

    /// The next frame header; on the fault channel, a read timeout between frames is idle
    /// time, not a failure.
    fn header(&mut self) -> Result<FrameHeader, Error> {
        let mut fixed = [0u8; FrameHeader::LEN];
        let op = "receiving a postcopy frame header";
        let timeout = self.active.timeout;
        let mut have = 0;
        while have == 0 {
            if self.active.quit.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            match self.link.recv_some(&mut fixed, 1) {
                Ok(0) => {
                    let closed = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(Error::io(self.channel, op, timeout, closed));
                }
                Ok(n) => have = n,
                Err(e)
                    if self.fault
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                Err(e) => return Err(Error::io(self.channel, op, timeout, e)),
            }
        }
        if have < FrameHeader::LEN {
            let rest = self.link.recv(&mut fixed[have..]);
            rest.map_err(|e| Error::io(self.channel, op, timeout, e))?;
        }
        FrameHeader::decode(&fixed).map_err(|source| Error::Decode {
            channel: self.channel,
            source,
        })
    }

    /// Reads the frame's payload into `self.payload` and checks its crc.
    fn payload(&mut self, header: &FrameHeader) -> Result<(), Error> {
        // At most 8 MiB, checked with the header.
        self.payload.resize(header.len as usize, 0);
        let received = self.link.recv(&mut self.payload);
        received.map_err(|e| {
            let op = "receiving a postcopy frame";
            Error::io(self.channel, op, self.active.timeout, e)
        })?;
        let mut hasher = header.hasher();
        hasher.update(&self.payload);
        header.verify(hasher).map_err(|source| Error::Decode {
            channel: self.channel,
            source,
        })
    }

    /// A pages frame: read whole and checked (crc, then every page it names), then placed.
    fn pages(&mut self, header: &FrameHeader) -> Result<(), Error> {
        self.payload(header)?;
        if header.round != self.active.round {
            return Err(self.protocol(format!(
                "pages of round {} arrived in postcopy (round {})",
                header.round, self.active.round
            )));
        }
        let region = header.region as usize;
        let Some(pages) = self
            .active
            .memory
            .regions()
            .get(region)
            .map(|r| r.layout().pages())
        else {
            return Err(self.protocol(format!("region index {region} does not exist")));
        };
        let table_len = PageTable::len_for(header);
        let (table, data) = self.payload.split_at(table_len.min(self.payload.len()));
        self.table
            .decode(header, table)
            .map_err(|source| Error::Decode {
                channel: self.channel,
                source,
            })?;
        for (page, _) in self.table.pages() {
            if page >= pages {
                return Err(self.protocol(format!(
                    "page {page} is outside region index {region} ({pages} pages)"
                )));
            }
            let owner = channel_of(page, self.active.channels);
            if !self.fault && owner != self.channel {
                return Err(self.protocol(format!(
                    "page {page} belongs on channel {owner}, not on channel {}",
                    self.channel
                )));
            }
            if !self.active.placer.is_wanted(region, page) {
                return Err(self.protocol(format!(
                    "page {page} of region index {region} arrived in postcopy, but it is not \
                     one to fetch"
                )));
            }
        }
        let mut at = 0usize;
        let mut count = 0u64;
        let mut counts = BatchCounts::default();
        for (page, entry) in self.table.pages() {
            let len = entry.len as usize;
            let bytes = data.get(at..at + len).unwrap_or(&[]);
            at += len;
            count += 1;
            counts.add(entry.encoding);
            let placed = match entry.encoding {
                Encoding::Zero => self.active.placer.place(region, page, None),
                Encoding::Raw => match <&[u8; PAGE_SIZE]>::try_from(bytes) {
                    Ok(raw) => self.active.placer.place(region, page, Some(raw)),
                    Err(_) => return Err(self.protocol("a raw page is not a page long".into())),
                },
                encoding @ (Encoding::Lz4 | Encoding::Zstd) => {
                    let decoded = self.decoder.decode(encoding, bytes, &mut self.page[..]);
                    decoded.map_err(|why| {
                        self.protocol(format!("page {page}'s data is invalid: {why}"))
                    })?;
                    self.active.placer.place(region, page, Some(&self.page))
                }
            };
            placed.map_err(Error::Postcopy)?;
        }
        self.active.counters.add_pages(counts);
        if !self.fault {
            self.pushed += count;
        }
        if self.active.placer.remaining() == 0 {
            let _ = self.events.send(Event::Complete);
        }
        Ok(())
    }
}

/// Turns the guest's faults into requests on the fault channel.
struct FaultHandler {
    active: Active,
    writer: Box<dyn LinkWriter>,
    events: channels::Sender<Event>,
}

impl FaultHandler {
    fn run(mut self) {
        if let Err(err) = self.serve() {
            if !self.active.stop.is_stopped() && !self.active.quit.load(Ordering::SeqCst) {
                self.active.stop.fail(err);
            }
            let _ = self.events.send(Event::Failed);
        }
    }

    fn serve(&mut self) -> Result<(), Error> {
        // After a reconnection: the source lost the requests it had not answered.
        for (region, page) in self.active.placer.outstanding() {
            self.request(region, page)?;
        }
        let mut faults = Vec::with_capacity(64);
        while !self.active.quit.load(Ordering::SeqCst) && !self.active.stop.is_stopped() {
            let placer = Arc::clone(&self.active.placer);
            placer
                .read_faults(&mut faults, Duration::from_millis(50))
                .map_err(Error::Postcopy)?;
            for fault in &faults {
                if let Fault::Request(region, page) =
                    placer.fault(fault.address).map_err(Error::Postcopy)?
                {
                    self.request(region, page)?;
                }
            }
        }
        Ok(())
    }

    /// Asks the source for `page` of region index `region`.
    fn request(&mut self, region: usize, page: u64) -> Result<(), Error> {
        let region = u32::try_from(region).unwrap_or(u32::MAX);
        let frame = FrameHeader::request(region, page, 1);
        self.writer.send(&[&frame]).map_err(|e| {
            let op = "sending a page request";
            Error::io(self.active.channels, op, self.active.timeout, e)
        })?;
        self.active.requests.fetch_add(1, Ordering::Relaxed);
        self.active.counters.add_wire_bytes(FrameHeader::LEN as u64);
        Ok(())
    }
}

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

use super::handover::{self, Handover, Outcome};
use super::options::{ReceiveOptions, Received};
use super::shared::{LINGER, Shared};
use super::{Done, Running};
use crate::codec::decode_lz4;
use crate::dirty::DirtySet;
use crate::error::Error;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::postcopy::PostcopyStats;
use crate::postcopy::place::{Fault, Placer};
use crate::session::{self, Counters, FactSink, Stop};
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
        let ready = FrameHeader::ready(rounds, pages, device_state.len() as u64);
        let context = handover::Context {
            listener: self.listener,
            session: self.session,
            layout: memory.layout(),
            options: self.options,
            stop: self.stop,
            sink: sink.as_ref(),
            counters: &counters,
        };
        let outcome = match running.writers.first_mut() {
            Some(writer) => context.hand_over(writer.as_mut(), &mut link, &ready),
            None => Outcome::Discard(Error::Internal {
                channel: 0,
                what: "channel 0 has no writer",
            }),
        };
        match outcome {
            Outcome::Keep(Handover::Go) => {}
            Outcome::Keep(_) => {
                // In doubt: the source may run postcopy or have kept the guest. Nothing runs
                // here, and the pages that are absent stay absent.
                return Err(self.paused(&mut running, placer, sink.as_ref(), "the go never came"));
            }
            Outcome::Discard(err) => {
                let _ = placer.finish();
                self.stop.fail(err);
                running.stop(self.stop);
                return Err(self.stop.end(sink.as_ref()));
            }
        }
        sink.fact(Fact::PostcopyStarted);
        let channels = u16::try_from(links.len()).unwrap_or(u16::MAX);
        if let Some(first) = links.first_mut() {
            *first = link.take();
        }
        let active = Active {
            placer: Arc::clone(&placer),
            memory: Arc::clone(&memory),
            stop: Arc::clone(self.stop),
            counters: Arc::clone(&counters),
            round: rounds + 1,
            channels,
            timeout: self.options.timeout,
            requests: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
            quit: Arc::new(AtomicBool::new(false)),
        };
        let (events_tx, events) = channels::unbounded();
        let mut threads = active.start(links, fault, self.options, &events_tx);
        if let Some(run) = &self.options.postcopy
            && let Err(source) = run.run(&device_state)
        {
            self.stop.fail(Error::Guest {
                op: "start in postcopy",
                source,
            });
        }
        let ended = active.wait(&events, threads.data);
        if ended.is_err() {
            active.quit.store(true, Ordering::SeqCst);
            for thread in threads.handles.drain(..) {
                let _ = thread.join();
            }
            return Err(self.paused(&mut running, placer, sink.as_ref(), "a channel broke"));
        }
        // Every page is here: the memory is the kernel's again, and the source may stop.
        let _ = placer.finish();
        if let Some(writer) = running.writers.first_mut()
            && writer.send(&[&FrameHeader::done(wanted.count())]).is_ok()
        {
            counters.add_wire_bytes(FrameHeader::LEN as u64);
        }
        sink.fact(Fact::Completed);
        // The source closes once it read *done*: until then (or for a moment at most) the
        // readers take what it still sends, so it never sees a reset before the done.
        active.quit.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + LINGER;
        while Instant::now() < deadline && threads.handles.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        running.stop(self.stop);
        for thread in threads.handles.drain(..) {
            let _ = thread.join();
        }
        drop(claim);
        sink.fact(Fact::Drained);
        let latency = placer.latency().snapshot();
        Ok(Received {
            handover: Handover::Go,
            device_state,
            rounds,
            stats: counters.snapshot(),
            elapsed: self.started.elapsed(),
            tls: self.negotiated.clone(),
            postcopy: Some(PostcopyStats {
                pages: wanted.count(),
                requests: active.requests.load(Ordering::Relaxed),
                requested_pages: active.requests.load(Ordering::Relaxed),
                bytes: active.bytes.load(Ordering::Relaxed),
                latency,
            }),
        })
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

    /// Postcopy cannot go on: the guest keeps waiting on its absent pages (the placer, and so
    /// the userfaultfd, is kept: closing it would let the kernel fill them with zeros), and
    /// the migration is paused.
    fn paused(
        &self,
        running: &mut Running,
        placer: Arc<Placer>,
        sink: &dyn FactSink,
        why: &str,
    ) -> Error {
        sink.fact(Fact::ChannelLost);
        running.stop(self.stop);
        let reason = self.stop.take_error();
        self.options.log.line(&format!(
            "postcopy paused ({why}: {}): the guest waits for its missing pages",
            reason.chain()
        ));
        // Recovery takes the placer back over; until it exists, the absent pages must stay
        // absent for as long as this process lives.
        std::mem::forget(placer);
        Error::PostcopyPaused {
            source: Box::new(reason),
        }
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
        for (page, entry) in self.table.pages() {
            let len = entry.len as usize;
            let bytes = data.get(at..at + len).unwrap_or(&[]);
            at += len;
            count += 1;
            let placed = match entry.encoding {
                Encoding::Zero => self.active.placer.place(region, page, None),
                Encoding::Raw => match <&[u8; PAGE_SIZE]>::try_from(bytes) {
                    Ok(raw) => self.active.placer.place(region, page, Some(raw)),
                    Err(_) => return Err(self.protocol("a raw page is not a page long".into())),
                },
                Encoding::Lz4 => {
                    decode_lz4(bytes, &mut self.page[..]).map_err(|why| {
                        self.protocol(format!("page {page}'s lz4 block is invalid: {why}"))
                    })?;
                    self.active.placer.place(region, page, Some(&self.page))
                }
            };
            placed.map_err(Error::Postcopy)?;
        }
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
        let channel = self.active.channels;
        let mut faults = Vec::with_capacity(64);
        while !self.active.quit.load(Ordering::SeqCst) && !self.active.stop.is_stopped() {
            let placer = &self.active.placer;
            placer
                .read_faults(&mut faults, Duration::from_millis(50))
                .map_err(Error::Postcopy)?;
            for fault in &faults {
                if let Fault::Request(region, page) =
                    placer.fault(fault.address).map_err(Error::Postcopy)?
                {
                    let region = u32::try_from(region).unwrap_or(u32::MAX);
                    let frame = FrameHeader::request(region, page, 1);
                    self.writer.send(&[&frame]).map_err(|e| {
                        Error::io(channel, "sending a page request", self.active.timeout, e)
                    })?;
                    self.active.requests.fetch_add(1, Ordering::Relaxed);
                    self.active.counters.add_wire_bytes(FrameHeader::LEN as u64);
                }
            }
        }
        Ok(())
    }
}

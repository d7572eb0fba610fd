//! The receiving side of a migration.
//!
//! One reader thread per channel reads frame headers and page tables, checks every page
//! reference against guest memory and the protocol, then receives raw page payloads straight
//! into their destination pages with one vectored read, and lz4 payloads into a pooled buffer
//! that a decode worker expands in place. The crc covers the bytes as received; a frame that
//! fails it fails the migration.
//!
//! No two threads ever touch the same destination page at once, even with a hostile sender:
//! a page is accepted only on its fixed channel (see [`crate::wire::channel_of`]), at most once
//! per round (a per-page round stamp), and a channel's reader waits for its decode jobs at every
//! end of round before it reads the next round. That is what makes writing guest pages through
//! `&mut [u8]` sound here.

use std::io::IoSliceMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{self as channel, Receiver};
use ramjet_control::Fact;

use crate::codec::{BatchCounts, Pool, decode_lz4};
use crate::error::Error;
use crate::memory::{GuestMemory, RegionLayout};
use crate::session::{Abort, CancelHandle, Counters, FactSink, Stats};
use crate::transport::{LinkReader, LinkWriter, Listener, Stream, Transport};
use crate::wire::{
    DecodeError, Encoding, FrameHeader, FrameKind, Hello, HelloReply, MAX_DEVICE_STATE,
    MAX_PAGES_PER_FRAME, PageTable, Verdict, channel_of,
};

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

/// An lz4 payload buffer and the pages in it: (page, start, length).
#[derive(Debug, Default)]
struct LzBuf {
    data: Vec<u8>,
    pages: Vec<(u64, usize, usize)>,
}

/// Pages of one frame for a decode worker.
struct DecodeJob {
    channel: u16,
    region: usize,
    buf: LzBuf,
    done: channel::Sender<Result<(), Error>>,
}

/// What every thread of a receive session shares.
struct Shared {
    memory: Arc<GuestMemory>,
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
        memory,
        known_zero,
        abort: Arc::clone(&abort),
        counters: Arc::new(Counters::default()),
        sink,
        channels,
        timeout: options.timeout,
        pool: Pool::filled(
            usize::from(channels) * 2 + options.workers * 2,
            LzBuf::default,
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
            if !abort.is_cancelled() {
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
            let (done_tx, done_rx) = channel::unbounded();
            let reader = ChannelReader {
                channel,
                link,
                shared: Arc::clone(shared),
                decode: decode_tx.clone(),
                done_tx,
                done_rx,
                outstanding: 0,
                round: 0,
                round_pages: 0,
                total_pages: 0,
                table: PageTable::new(),
                table_bytes: Vec::with_capacity(MAX_PAGES_PER_FRAME as usize * 8),
                iov: Vec::with_capacity(MAX_PAGES_PER_FRAME as usize + 1),
                next_header: [0; FrameHeader::LEN],
                have_next_header: false,
                device_state: Vec::new(),
            };
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
                return Err(Error::protocol(
                    0,
                    "the channel readers stopped unexpectedly",
                ));
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
            return Err(Error::protocol(0, "no channel reader could be started"));
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

/// What one channel delivered.
struct ChannelDone {
    pages: u64,
    rounds: u32,
    device_state: Vec<u8>,
}

/// Reads and applies one channel's frames.
struct ChannelReader {
    channel: u16,
    link: Box<dyn LinkReader>,
    shared: Arc<Shared>,
    decode: channel::Sender<DecodeJob>,
    done_tx: channel::Sender<Result<(), Error>>,
    done_rx: Receiver<Result<(), Error>>,
    /// Decode jobs sent and not yet finished.
    outstanding: usize,
    /// The last round this channel finished.
    round: u32,
    round_pages: u64,
    total_pages: u64,
    table: PageTable,
    table_bytes: Vec<u8>,
    /// Reused allocation for the vectored read's buffer list.
    iov: Vec<IoSliceMut<'static>>,
    /// The next frame's header, read together with a pages frame's data (a pages frame is
    /// always followed by another frame), which saves a read per frame.
    next_header: [u8; FrameHeader::LEN],
    have_next_header: bool,
    device_state: Vec<u8>,
}

/// The same allocation, emptied and with a new lifetime: the buffer list is rebuilt for every
/// frame without allocating.
fn reuse<'b>(mut v: Vec<IoSliceMut<'_>>) -> Vec<IoSliceMut<'b>> {
    v.clear();
    v.into_iter().map(|_| IoSliceMut::new(&mut [])).collect()
}

impl ChannelReader {
    fn run(mut self) -> Result<ChannelDone, Error> {
        let result = self.read_frames();
        // No decode job of this channel may outlive the reader.
        let waited = self.wait_decodes();
        let done = result?;
        waited?;
        Ok(done)
    }

    fn io(&self, op: &'static str, e: std::io::Error) -> Error {
        Error::io(self.channel, op, self.shared.timeout, e)
    }

    fn protocol(&self, problem: String) -> Error {
        Error::protocol(self.channel, problem)
    }

    fn decode_error(&self, source: DecodeError) -> Error {
        Error::Decode {
            channel: self.channel,
            source,
        }
    }

    fn read_frames(&mut self) -> Result<ChannelDone, Error> {
        loop {
            if self.shared.abort.is_stopped() {
                self.drain();
                return Err(Error::Cancelled);
            }
            let mut fixed = [0u8; FrameHeader::LEN];
            if std::mem::take(&mut self.have_next_header) {
                fixed = self.next_header;
            } else {
                self.link
                    .recv(&mut fixed)
                    .map_err(|e| self.io("receiving a frame header", e))?;
            }
            let header = FrameHeader::decode(&fixed).map_err(|e| self.decode_error(e))?;
            self.shared
                .counters
                .add_wire_bytes(FrameHeader::LEN as u64 + u64::from(header.len));
            match header.kind {
                FrameKind::Pages => self.pages(&header)?,
                FrameKind::EndOfRound => self.end_of_round(&header)?,
                FrameKind::DeviceState => self.device_state_piece(&header)?,
                FrameKind::EndOfStream => return self.end_of_stream(&header),
                FrameKind::Error => return Err(self.peer_error(&header)),
                FrameKind::Confirm => {
                    return Err(self.protocol("unexpected confirm frame from the sender".into()));
                }
            }
        }
    }

    /// Reads and discards until the sender closes, for at most [`LINGER`].
    fn drain(&mut self) {
        let deadline = Instant::now() + LINGER;
        let mut scratch = [0u8; 4096];
        while Instant::now() < deadline && self.link.recv(&mut scratch).is_ok() {}
    }

    fn verify(&self, header: &FrameHeader, payload: &[u8]) -> Result<(), Error> {
        let mut hasher = header.hasher();
        hasher.update(payload);
        header.verify(hasher).map_err(|e| self.decode_error(e))
    }

    fn pages(&mut self, header: &FrameHeader) -> Result<(), Error> {
        let due = self.round + 1;
        if header.round != due {
            return Err(self.protocol(format!(
                "pages of round {} arrived while round {due} was due",
                header.round
            )));
        }
        let region = header.region as usize;
        let memory = Arc::clone(&self.shared.memory);
        let Some(layout) = memory.regions().get(region).map(|r| r.layout()) else {
            return Err(self.protocol(format!(
                "region index {region} does not exist (the guest has {} regions)",
                memory.regions().len()
            )));
        };
        self.table_bytes.resize(PageTable::len_for(header), 0);
        self.link.recv(&mut self.table_bytes).map_err(|e| {
            Error::io(
                self.channel,
                "receiving a page table",
                self.shared.timeout,
                e,
            )
        })?;
        self.table
            .decode(header, &self.table_bytes)
            .map_err(|e| Error::Decode {
                channel: self.channel,
                source: e,
            })?;
        let stamps = &self.shared.stamps[region];
        let mut lz_bytes = 0usize;
        for entry in self.table.entries() {
            let page = header.value + u64::from(entry.offset);
            self.check_page(&layout, page, stamps)?;
            if entry.encoding == Encoding::Lz4 {
                lz_bytes += entry.len as usize;
            }
        }
        let mut lz = (lz_bytes > 0).then(|| self.shared.pool.take());
        if let Some(lz) = &mut lz {
            lz.data.resize(lz_bytes, 0);
            lz.pages.clear();
        }
        // Receive all page data with one vectored read: raw pages straight into guest memory.
        let mut iov = reuse(std::mem::take(&mut self.iov));
        let mut lz_rest: &mut [u8] = lz.as_mut().map_or(&mut [], |lz| &mut lz.data[..]);
        for entry in self.table.entries() {
            let page = header.value + u64::from(entry.offset);
            match entry.encoding {
                Encoding::Zero => {}
                Encoding::Raw => {
                    // SAFETY: `check_page` passed for this page in this frame.
                    iov.push(IoSliceMut::new(unsafe {
                        self.page(&memory, region, page)
                    }?));
                }
                Encoding::Lz4 => {
                    let (part, rest) =
                        std::mem::take(&mut lz_rest).split_at_mut(entry.len as usize);
                    lz_rest = rest;
                    iov.push(IoSliceMut::new(part));
                }
            }
        }
        iov.push(IoSliceMut::new(&mut self.next_header));
        let received = self.link.recv_vectored(&mut iov);
        self.iov = reuse(iov);
        received.map_err(|e| self.io("receiving page data and the next header", e))?;
        self.have_next_header = true;

        // The crc covers header, table and data in the order sent.
        let mut hasher = header.hasher();
        hasher.update(&self.table_bytes);
        let mut lz_at = 0usize;
        for entry in self.table.entries() {
            let page = header.value + u64::from(entry.offset);
            match entry.encoding {
                Encoding::Zero => {}
                Encoding::Raw => {
                    // SAFETY: `check_page` passed for this page in this frame.
                    hasher.update(unsafe { self.page(&memory, region, page) }?);
                }
                Encoding::Lz4 => {
                    let len = entry.len as usize;
                    if let Some(lz) = &lz {
                        hasher.update(&lz.data[lz_at..lz_at + len]);
                    }
                    lz_at += len;
                }
            }
        }
        header.verify(hasher).map_err(|e| self.decode_error(e))?;

        let mut counts = BatchCounts::default();
        let known_zero = self.shared.known_zero[region];
        let mut lz_at = 0usize;
        for entry in self.table.entries() {
            let page = header.value + u64::from(entry.offset);
            let Some(stamp) = stamp_of(stamps, page) else {
                continue;
            };
            match entry.encoding {
                Encoding::Zero => {
                    counts.zero += 1;
                    // Memory that is known to be zero needs no write.
                    if !(known_zero && stamp.load(Ordering::Relaxed) == 0) {
                        // SAFETY: `check_page` passed for this page in this frame.
                        unsafe { self.page(&memory, region, page) }?.fill(0);
                    }
                }
                Encoding::Raw => counts.raw += 1,
                Encoding::Lz4 => {
                    counts.lz4 += 1;
                    let len = entry.len as usize;
                    if let Some(lz) = &mut lz {
                        lz.pages.push((page, lz_at, len));
                    }
                    lz_at += len;
                }
            }
            stamp.store(header.round, Ordering::Relaxed);
        }
        self.shared.counters.add_pages(counts);
        self.round_pages += counts.pages();
        if let Some(buf) = lz {
            let job = DecodeJob {
                channel: self.channel,
                region,
                buf,
                done: self.done_tx.clone(),
            };
            if let Err(e) = self.decode.send(job) {
                self.shared.pool.give(e.into_inner().buf);
                return Err(self.protocol("the decode workers stopped unexpectedly".into()));
            }
            self.outstanding += 1;
        }
        Ok(())
    }

    /// Destination page `page` of region `region`.
    ///
    /// # Safety
    ///
    /// [`ChannelReader::check_page`] must have passed for the page in the frame being read: the
    /// page is then this channel's, not yet written this round, and no decode job holds it
    /// (those of earlier rounds finished at their end of round, and a frame names each page
    /// once, its offsets strictly increasing), so this thread alone accesses it.
    #[expect(
        clippy::mut_from_ref,
        reason = "hands out guest memory, shared mutable memory behind raw pointers"
    )]
    unsafe fn page<'m>(
        &self,
        memory: &'m GuestMemory,
        region: usize,
        page: u64,
    ) -> Result<&'m mut [u8], Error> {
        // SAFETY: exclusive access, as the caller guarantees.
        unsafe { memory.page_mut(region, page) }.map_err(|source| Error::Memory {
            channel: self.channel,
            source,
        })
    }

    /// Checks a page reference from the sender before any byte of it is touched.
    fn check_page(
        &self,
        layout: &RegionLayout,
        page: u64,
        stamps: &[AtomicU32],
    ) -> Result<(), Error> {
        if page >= layout.pages() {
            return Err(self.protocol(format!(
                "page {page} is outside region {} ({} pages)",
                layout.id(),
                layout.pages()
            )));
        }
        let owner = channel_of(page, self.shared.channels);
        if owner != self.channel {
            return Err(self.protocol(format!(
                "page {page} belongs on channel {owner}, not on channel {}",
                self.channel
            )));
        }
        let due = self.round + 1;
        if stamp_of(stamps, page).is_some_and(|s| s.load(Ordering::Relaxed) == due) {
            return Err(self.protocol(format!(
                "page {page} of region {} arrived twice in round {due}",
                layout.id()
            )));
        }
        Ok(())
    }

    /// Waits for every decode job this channel sent; returns the first error.
    fn wait_decodes(&mut self) -> Result<(), Error> {
        let mut first = Ok(());
        for _ in 0..std::mem::take(&mut self.outstanding) {
            let result = self.done_rx.recv().unwrap_or_else(|_| {
                Err(self.protocol("a decode worker stopped unexpectedly".into()))
            });
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    fn end_of_round(&mut self, header: &FrameHeader) -> Result<(), Error> {
        self.verify(header, &[])?;
        let due = self.round + 1;
        if header.round != due {
            return Err(self.protocol(format!(
                "end of round {} arrived while round {due} was due",
                header.round
            )));
        }
        self.wait_decodes()?;
        if header.value != self.round_pages {
            return Err(self.protocol(format!(
                "the sender sent {} pages in round {due} on this channel, {} arrived",
                header.value, self.round_pages
            )));
        }
        self.round = due;
        self.total_pages += self.round_pages;
        self.round_pages = 0;
        if self.channel == 0 {
            self.shared.counters.set_round(due);
            self.shared.sink.fact(Fact::Pass(u64::from(due)));
        }
        Ok(())
    }

    fn device_state_piece(&mut self, header: &FrameHeader) -> Result<(), Error> {
        if self.channel != 0 {
            return Err(self.protocol("device state arrived off channel 0".into()));
        }
        let start = self.device_state.len();
        if header.value != start as u64 {
            return Err(self.protocol(format!(
                "a device state piece for offset {} arrived after {start} bytes",
                header.value
            )));
        }
        let end = start as u64 + u64::from(header.len);
        if end > MAX_DEVICE_STATE {
            return Err(self.decode_error(DecodeError::TooLarge {
                what: "device state",
                value: end,
                limit: MAX_DEVICE_STATE,
            }));
        }
        // The piece is at most 8 MiB (checked with the header), and the blob grows only by
        // what actually arrives.
        self.device_state.resize(start + header.len as usize, 0);
        self.link
            .recv(&mut self.device_state[start..])
            .map_err(|e| {
                Error::io(
                    self.channel,
                    "receiving device state",
                    self.shared.timeout,
                    e,
                )
            })?;
        self.verify(header, &self.device_state[start..])?;
        self.shared
            .counters
            .add_device_state_bytes(u64::from(header.len));
        Ok(())
    }

    fn end_of_stream(&mut self, header: &FrameHeader) -> Result<ChannelDone, Error> {
        self.verify(header, &[])?;
        self.wait_decodes()?;
        if self.round_pages != 0 || header.round != self.round {
            return Err(self.protocol(format!(
                "end of stream after round {} arrived in round {}",
                header.round,
                self.round + 1
            )));
        }
        if header.value != self.total_pages {
            return Err(self.protocol(format!(
                "the sender sent {} pages on this channel, {} arrived",
                header.value, self.total_pages
            )));
        }
        Ok(ChannelDone {
            pages: self.total_pages,
            rounds: self.round,
            device_state: std::mem::take(&mut self.device_state),
        })
    }

    fn peer_error(&mut self, header: &FrameHeader) -> Error {
        let mut message = vec![0u8; header.len as usize];
        if let Err(e) = self.link.recv(&mut message) {
            return self.io("receiving the sender's error message", e);
        }
        if let Err(e) = self.verify(header, &message) {
            return e;
        }
        Error::PeerFailed {
            peer: "sender",
            message: String::from_utf8_lossy(&message).into_owned(),
        }
    }
}

/// The round stamp of `page` (which `check_page` has bounds-checked).
fn stamp_of(stamps: &[AtomicU32], page: u64) -> Option<&AtomicU32> {
    usize::try_from(page).ok().and_then(|i| stamps.get(i))
}

/// Expands lz4 pages into guest memory until the job queue closes.
fn decode_worker(shared: &Shared, jobs: &Receiver<DecodeJob>) {
    while let Ok(job) = jobs.recv() {
        let mut result = Ok(());
        if !shared.abort.is_stopped() {
            for &(page, start, len) in &job.buf.pages {
                // SAFETY: the channel reader handed this page to this job alone (see the module
                // docs) and waits for the job before it touches the page again.
                let dst = match unsafe { shared.memory.page_mut(job.region, page) } {
                    Ok(dst) => dst,
                    Err(source) => {
                        result = Err(Error::Memory {
                            channel: job.channel,
                            source,
                        });
                        break;
                    }
                };
                if let Err(problem) = decode_lz4(&job.buf.data[start..start + len], dst) {
                    result = Err(Error::protocol(
                        job.channel,
                        format!("region index {} page {page}: {problem}", job.region),
                    ));
                    break;
                }
            }
        }
        shared.pool.give(job.buf);
        let _ = job.done.send(result);
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

//! The source's half of postcopy (the protocol is in [`wire`](crate::wire)'s docs).
//!
//! [`Sender::postcopy`] replaces the final round: the guest is paused and its memory frozen, so
//! the pages still to send (the *wanted* pages: dirtied since they were sent) can never change
//! again. It tells the receiver which pages to drop, sends the device state, ends pre-copy on
//! every channel and hands the guest over (*ready*, commit, *go*): the destination runs it from
//! then on. [`Postcopy::run`] then pushes the wanted pages on the data channels through the
//! usual codec workers, while a thread of its own serves the destination's requests on the
//! fault channel: it reads a request, encodes the pages from the frozen memory and sends them at
//! once, so a requested page never waits behind the background stream (QEMU's preempt-full).
//! The push then continues just after the requested page (QEMU's spatial hint), and skips pages
//! the fault channel already sent. The receiver says *done* once every page is there.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use ramjet_control::Fact;

use super::return_path::Reply;
use super::{Dispatch, Sender, Summary, job};
use crate::codec::{Batch, Encoder, PageCompression};
use crate::dirty::DirtySet;
use crate::error::Error;
use crate::memory::{Frozen, GuestMemory};
use crate::postcopy::{LatencyDist, PostcopyStats};
use crate::session::{self, Counters, Stop};
use crate::transport::{Conn, Endpoint, LinkReader, LinkWriter};
use crate::wire::{
    FrameHeader, FrameKind, Hello, HelloFlags, MAX_DEVICE_STATE, MAX_PAGES_PER_FRAME, MAX_PAYLOAD,
    frame_capacity,
};

use super::outgoing::Outgoing;

/// Bitmap words (64 pages each) the push hands out between two looks at the hint: 4 MiB.
const SLICE_WORDS: usize = 16;

/// What the push and the fault server share.
struct Shared {
    frozen: Frozen,
    wanted: DirtySet,
    /// Pages the fault channel sent: the push skips them.
    sent: Vec<Vec<AtomicU64>>,
    /// Where the push goes on (`region << 40 | word`), after a request; [`NO_HINT`] if not.
    hint: AtomicU64,
    requests: AtomicU64,
    requested_pages: AtomicU64,
}

const NO_HINT: u64 = u64::MAX;

impl Shared {
    fn is_wanted(&self, region: usize, page: u64) -> bool {
        let words = self.wanted.words(region);
        usize::try_from(page / 64)
            .ok()
            .and_then(|w| words.get(w))
            .is_some_and(|w| w >> (page % 64) & 1 == 1)
    }

    /// Records pages `first .. first + count` of `region` as sent on the fault channel, and
    /// points the push at what follows them.
    fn note_sent(&self, region: usize, first: u64, count: u64) {
        if let Some(words) = self.sent.get(region) {
            for page in first..first + count {
                if let Some(word) = usize::try_from(page / 64).ok().and_then(|w| words.get(w)) {
                    word.fetch_or(1 << (page % 64), Ordering::Relaxed);
                }
            }
        }
        let next = (first + count) / 64;
        self.hint.store(
            (region as u64) << 40 | next.min((1 << 40) - 1),
            Ordering::Relaxed,
        );
    }

    fn sent_word(&self, region: usize, word: usize) -> u64 {
        self.sent
            .get(region)
            .and_then(|words| words.get(word))
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }
}

/// A postcopy migration, source side: the guest was handed over to the destination, which runs
/// it while this pushes the remaining pages on the data channels and answers the destination's
/// page requests on the fault channel at once, ahead of the push. The guest must never run
/// here again; its memory stays frozen until [`Postcopy::run`] returns.
pub struct Postcopy {
    sender: Sender,
    shared: Arc<Shared>,
    /// Wanted pages not pushed yet.
    pending: DirtySet,
    pending_count: u64,
    /// Where the push goes on when there is no hint.
    cursor: (usize, usize),
    round: u32,
    pushed: Vec<u64>,
    server: Option<JoinHandle<()>>,
    /// When the destination acknowledged the go, or reconnected (which it does only once it
    /// has the go): from then on it runs the guest.
    acknowledged: Option<Instant>,
    /// Bytes sent when postcopy started.
    bytes_before: u64,
    /// The last reconnection attempt's number.
    attempt: u8,
    /// The destination's fault latencies, from its *done*.
    latency: LatencyDist,
}

impl std::fmt::Debug for Postcopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postcopy")
            .field("pending", &self.pending_count)
            .field("round", &self.round)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// Switches to postcopy instead of a final round: tells the
    /// receiver to drop the pages in `discard` (every page written since it was sent: the
    /// pending pages and what the last dirty sync found), sends `device_state`, and hands the
    /// guest over. The caller paused the guest and called [`Sender::switchover`] before; the
    /// session must have been connected with [`SendOptions::postcopy`](super::SendOptions).
    ///
    /// An error means the source keeps the guest, as from [`Sender::finish`]: the caller
    /// resumes it. `Ok` means the destination runs it, even if the link broke right after (the
    /// migration is then paused, [`Postcopy::run`] says so): the guest must never resume here.
    /// Reports `postcopy-started` once committed, and `device-loaded` once the destination
    /// took the go.
    pub fn postcopy(mut self, discard: &DirtySet, device_state: &[u8]) -> Result<Postcopy, Error> {
        self.check()?;
        let problem = if self.fault.is_none() {
            Some("postcopy needs the fault channel: connect with SendOptions::postcopy".to_owned())
        } else if self.frozen.is_none() {
            Some(
                "postcopy starts at the switchover (Sender::switchover): the guest paused and \
                 its memory frozen"
                    .to_owned(),
            )
        } else if discard.region_count() != self.memory.regions().len() {
            Some(format!(
                "the discard set covers {} regions, the guest memory has {}",
                discard.region_count(),
                self.memory.regions().len()
            ))
        } else if device_state.len() as u64 > MAX_DEVICE_STATE {
            Some(format!(
                "device state of {} bytes exceeds the limit of {MAX_DEVICE_STATE}",
                device_state.len()
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(self.fail(Error::Config(problem)));
        }
        let Some(frozen) = self.frozen.clone() else {
            return Err(self.fail(Error::Ended));
        };
        self.queue_bitmaps(FrameKind::Discard, discard);
        self.end_and_await_ready(device_state, FrameHeader::postcopy)?;
        // Handed over: from here the source never resumes the guest, and a failure pauses the
        // migration instead of ending it.
        if !self.stop.commit() {
            return Err(self.fail_stopped());
        }
        self.postcopy = true;
        self.counters
            .add_device_state_bytes(device_state.len() as u64);
        let wanted = discard.clone();
        let pending_count = wanted.count();
        self.counters.set_remaining_pages(pending_count);
        let shared = Arc::new(Shared {
            frozen,
            sent: (0..wanted.region_count())
                .map(|r| {
                    let words = wanted.words(r).len();
                    (0..words).map(|_| AtomicU64::new(0)).collect()
                })
                .collect(),
            wanted,
            hint: AtomicU64::new(NO_HINT),
            requests: AtomicU64::new(0),
            requested_pages: AtomicU64::new(0),
        });
        self.sink.fact(Fact::PostcopyStarted);
        self.handle.set_epoch(Some(Arc::clone(&self.stop)));
        let acknowledged = self.go_on_channel_0();
        if acknowledged.is_some() {
            // The destination took the go: it loads the device state and runs the guest.
            self.sink.fact(Fact::DeviceLoaded);
        }
        let round = self.round + 1;
        let server = self.serve_faults(&shared, round);
        let channels = self.queues.len();
        let bytes_before = self.counters.sent();
        Ok(Postcopy {
            pending: shared.wanted.clone(),
            pending_count,
            shared,
            cursor: (0, 0),
            round,
            pushed: vec![0; channels],
            server,
            acknowledged,
            bytes_before,
            attempt: 0,
            latency: LatencyDist::default(),
            sender: self,
        })
    }

    /// Whether the session has a fault channel, so that it can switch to postcopy.
    pub(crate) fn can_postcopy(&self) -> bool {
        self.fault.is_some()
    }

    /// Queues the bitmap pieces of `set` (every piece with a page in it) on channel 0.
    fn queue_bitmaps(&self, kind: FrameKind, set: &DirtySet) {
        let Some(first) = self.queues.first() else {
            return;
        };
        let per_piece = MAX_PAYLOAD as usize / 8;
        for region in 0..set.region_count() {
            let words = set.words(region);
            for (index, piece) in words.chunks(per_piece).enumerate() {
                if piece.iter().all(|&w| w == 0) {
                    continue;
                }
                let region = u32::try_from(region).unwrap_or(u32::MAX);
                let word = (index * per_piece) as u64;
                let frame = FrameHeader::bitmap(kind, region, word, piece);
                self.counters.add_queued(frame.len() as u64);
                let _ = first.send(Outgoing::Control(frame));
            }
        }
    }

    /// Says *go* on channel 0 and waits for *decided*; returns when it came. In postcopy the
    /// go cannot go on a new connection alone (the destination needs the channels too): if it
    /// is not acknowledged, the session stops and the migration pauses.
    fn go_on_channel_0(&mut self) -> Option<Instant> {
        self.say_go().map_err(|err| self.stop.fail(err)).ok()
    }

    /// Starts the thread that serves page requests on the fault channel.
    fn serve_faults(&mut self, shared: &Arc<Shared>, round: u32) -> Option<JoinHandle<()>> {
        let mut conn = self.fault.take()?;
        let channel = u16::try_from(self.queues.len()).unwrap_or(u16::MAX);
        let (writer, reader) = match conn.split(self.transport.as_ref()) {
            Ok(halves) => halves,
            Err(e) => {
                let op = "setting up the fault channel";
                self.stop.fail(Error::io(channel, op, self.timeout, e));
                return None;
            }
        };
        let server = Server {
            shared: Arc::clone(shared),
            memory: Arc::clone(&self.memory),
            stop: Arc::clone(&self.stop),
            counters: Arc::clone(&self.counters),
            round,
            channel,
            timeout: self.timeout,
        };
        let name = "ramjet-faults".to_owned();
        session::spawn(name, "fault channel server", &self.stop, move || {
            server.run(writer, reader);
        })
    }

    /// Reconnects a paused postcopy to `endpoint` with new connections of the same session
    /// (flag resume), reads the bitmaps of the pages the receiver holds, and starts a new
    /// session over them with the same counters, handle and frozen memory. This session
    /// must have ended (paused).
    fn reconnect(
        &self,
        endpoint: &Endpoint,
        frozen: &Frozen,
        attempt: u8,
    ) -> Result<(Sender, DirtySet), Error> {
        let options = &self.options;
        let stop = Arc::new(Stop::default());
        let connected = self.reconnect_streams(endpoint, &stop, attempt);
        let (mut streams, fault, hello, received) = match connected {
            Ok(connected) => connected,
            Err(err) => {
                stop.close_all();
                return Err(err);
            }
        };
        let mut wiring = match Self::wire_up(
            Arc::clone(&self.memory),
            &stop,
            streams.len(),
            false,
            options,
        ) {
            Ok(wiring) => wiring,
            Err(err) => {
                stop.close_all();
                return Err(err);
            }
        };
        wiring.counters = Arc::clone(&self.counters);
        let sink = Arc::clone(&self.sink);
        let mut sender = Self::start(&wiring, &mut streams, (endpoint, hello), options, sink);
        sender.fault = Some(fault);
        sender.handle = self.handle.clone();
        sender.memory_transfer = self.memory_transfer.clone();
        sender.postcopy = true;
        sender.finishing = true;
        sender.round = self.round;
        sender.total_pages.clone_from(&self.total_pages);
        sender.started = self.started;
        sender.frozen = Some(frozen.clone());
        Ok((sender, received))
    }

    /// Connects every channel and the fault channel again and reads the receiver's bitmaps
    /// on channel 0.
    fn reconnect_streams(
        &self,
        endpoint: &Endpoint,
        stop: &Stop,
        attempt: u8,
    ) -> Result<(Vec<Conn>, Conn, Hello, DirtySet), Error> {
        let options = &self.options;
        let mut hello = self.hello.clone();
        hello.flags = HelloFlags {
            postcopy: true,
            fault: false,
            resume: true,
            attempt,
            share: false,
        };
        let mut streams = Vec::with_capacity(usize::from(options.channels));
        for channel in 0..options.channels {
            hello.channel = channel;
            streams.push(Self::connect_one(endpoint, options, stop, &hello, None)?.0);
        }
        let mut fault = hello.clone();
        fault.channel = options.channels;
        fault.flags.fault = true;
        let fault = Self::connect_one(endpoint, options, stop, &fault, None)?.0;
        hello.channel = 0;
        let Some(first) = streams.first_mut() else {
            return Err(Error::Config("no channels".into()));
        };
        let received = read_received(first, &self.memory, options.timeout)?;
        Ok((streams, fault, hello, received))
    }

    /// Ends a committed postcopy session's threads and sockets after a failure, without a
    /// word to the receiver (the source never keeps the guest now) and without facts (the
    /// migration is paused, not failed): returns why it stopped.
    pub(super) fn pause(&mut self) -> Error {
        self.ended = true;
        self.jobs = None;
        self.queues.clear();
        self.stop.close_all();
        self.stop_threads();
        self.stop.take_error()
    }
}

impl Postcopy {
    /// Pushes every wanted page and serves the destination's requests until the receiver says
    /// every page is there; reports `completed` and `drained` then. The memory stays frozen
    /// until it returns.
    ///
    /// Postcopy never fails: a broken link pauses it, reported as `channel-lost`, and the
    /// error returned then ([`Error::PostcopyPaused`]) means the guest is split between the
    /// two sides: it must not run here, and it cannot run there until the missing pages come.
    pub fn run(mut self) -> Result<Summary, Error> {
        loop {
            let pushed = self.push();
            let done = pushed.and_then(|()| self.wait_for_done());
            // The receiver closes once every page is there, and says *done* first: a failure
            // that its closing caused does not count then.
            if done.is_ok() || self.done_arrived() {
                return Ok(self.complete());
            }
            let why = self.pause_epoch();
            if let Err(gave_up) = self.recover(why) {
                return Err(Error::PostcopyPaused {
                    source: Box::new(gave_up),
                    absent: None,
                });
            }
        }
    }

    /// The connections broke: ends their threads and sockets, reports `channel-lost`, and
    /// returns why.
    fn pause_epoch(&mut self) -> Error {
        self.sender.handle.set_epoch(None);
        let why = self.sender.pause();
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        self.sender.sink.fact(Fact::ChannelLost);
        why
    }

    /// Waits for [`LiveHandle::recover`](crate::LiveHandle::recover) and reconnects: the
    /// receiver says which pages it holds, and the push starts over with every wanted page it
    /// lacks (pages lost in flight included). A failed attempt (`failed`) leaves it paused
    /// for the next `recover`. Returns the reason it stays paused once
    /// [`SendOptions::recover_wait`](super::SendOptions::recover_wait) passes without one.
    fn recover(&mut self, mut why: Error) -> Result<(), Error> {
        let wait = self.sender.options.recover_wait;
        self.sender.handle.clear_recover();
        loop {
            let Some(endpoint) = self.sender.handle.wait_for_recover(wait) else {
                return Err(why);
            };
            let endpoint = endpoint.unwrap_or_else(|| self.sender.endpoint.clone());
            // Attempts count 1 to 255 and wrap, so that the receiver tells them apart.
            self.attempt = self.attempt % 255 + 1;
            match self
                .sender
                .reconnect(&endpoint, &self.shared.frozen, self.attempt)
            {
                Ok((sender, received)) => {
                    self.sender = sender;
                    // The receiver reconnected for this postcopy: whether or not it heard the
                    // go, it runs the guest from now on.
                    self.acknowledged.get_or_insert_with(Instant::now);
                    self.sender.sink.fact(Fact::Reconnected);
                    self.resume_from(&received);
                    self.server = self.sender.serve_faults(&self.shared, self.round);
                    self.sender
                        .handle
                        .set_epoch(Some(Arc::clone(&self.sender.stop)));
                    self.sender.sink.fact(Fact::Resumed);
                    return Ok(());
                }
                Err(err) => {
                    self.sender.sink.fact(Fact::Failed(err.chain()));
                    why = err;
                }
            }
        }
    }

    /// Starts the push over: every wanted page the receiver does not hold is pending again.
    fn resume_from(&mut self, received: &DirtySet) {
        let mut pending = self.shared.wanted.clone();
        let mut count = 0;
        for region in 0..pending.region_count() {
            let have = received.words(region);
            for word in 0..pending.words(region).len() {
                let bits = pending.words(region)[word] & !have.get(word).copied().unwrap_or(0);
                pending.clear_word(region, word);
                pending.merge_word(region, word, bits);
                count += u64::from(bits.count_ones());
            }
        }
        for words in &self.shared.sent {
            for word in words {
                word.store(0, Ordering::Relaxed);
            }
        }
        self.pending = pending;
        self.pending_count = count;
        self.cursor = (0, 0);
        self.pushed.fill(0);
    }

    /// Whether the receiver's *done* is waiting to be read.
    fn done_arrived(&mut self) -> bool {
        let wanted = self.shared.wanted.count();
        let done = self
            .sender
            .confirm
            .try_iter()
            .find_map(|reply| match reply {
                Ok(Reply::Done(pages, latency)) if pages == wanted => Some(*latency),
                _ => None,
            });
        if let Some(latency) = done {
            self.latency = latency;
        }
        done.is_some()
    }

    /// What postcopy did so far.
    pub fn stats(&self) -> PostcopyStats {
        PostcopyStats {
            pages: self.shared.wanted.count(),
            requests: self.shared.requests.load(Ordering::Relaxed),
            requested_pages: self.shared.requested_pages.load(Ordering::Relaxed),
            bytes: self
                .sender
                .counters
                .sent()
                .saturating_sub(self.bytes_before),
            latency: self.latency,
        }
    }

    /// Shows the postcopy figures in the session's [`Progress`](crate::Progress).
    fn publish(&self) {
        let stats = self.stats();
        self.sender.handle.update(|p| p.postcopy = Some(stats));
    }

    /// Pushes every pending page on the data channels; `Err` once the session stopped.
    fn push(&mut self) -> Result<(), ()> {
        let channels = u16::try_from(self.pushed.len()).unwrap_or(u16::MAX);
        let mut outstanding = 0u64;
        loop {
            if self.sender.stop.is_stopped() {
                return Err(());
            }
            if !self.sender.confirm.is_empty() {
                // The receiver spoke first: done (every page came on the fault channel), or
                // a surprise that the wait for done reports.
                break;
            }
            let slice = self.next_slice();
            if slice.count() == 0 {
                break;
            }
            let sender = &mut self.sender;
            let mut out = Dispatch {
                jobs: sender.jobs.as_ref(),
                round_pages: &mut self.pushed,
                counters: &sender.counters,
                remaining: self.pending_count + slice.count(),
                dispatched: 0,
            };
            for job in job::plan(&slice, channels, self.round, Some(&self.shared.frozen)) {
                if sender.stop.is_stopped() || !out.send(job) {
                    break;
                }
            }
            outstanding += out.dispatched;
            while outstanding > 0 && sender.acks.try_recv().is_ok() {
                outstanding -= 1;
            }
            self.publish();
        }
        for _ in 0..outstanding {
            if self.sender.acks.recv().is_err() {
                return Err(());
            }
        }
        if self.sender.stop.is_stopped() {
            return Err(());
        }
        for (channel, queue) in self.sender.queues.iter().enumerate() {
            let frame = FrameHeader::end_of_stream(self.round, self.pushed[channel]);
            self.sender.counters.add_queued(frame.len() as u64);
            let _ = queue.send(Outgoing::Control(frame));
        }
        Ok(())
    }

    /// Takes up to [`SLICE_WORDS`] words of pending pages off the pending set, from the hint
    /// if a request left one, else from the cursor, skipping pages the fault channel sent.
    fn next_slice(&mut self) -> DirtySet {
        let mut slice = DirtySet::none(self.sender.memory());
        let hint = self.shared.hint.swap(NO_HINT, Ordering::Relaxed);
        if hint != NO_HINT {
            let region = usize::try_from(hint >> 40).unwrap_or(usize::MAX);
            let word = usize::try_from(hint & ((1 << 40) - 1)).unwrap_or(usize::MAX);
            if region < self.pending.region_count() {
                self.cursor = (region, word);
            }
        }
        let regions = self.pending.region_count();
        let mut taken = 0;
        let mut visited = 0;
        let total_words: usize = (0..regions).map(|r| self.pending.words(r).len()).sum();
        let (mut region, mut word) = self.cursor;
        while taken < SLICE_WORDS && visited < total_words && self.pending_count > 0 {
            if region >= regions {
                region = 0;
                word = 0;
                continue;
            }
            let words = self.pending.words(region).len();
            if word >= words {
                region += 1;
                word = 0;
                continue;
            }
            visited += 1;
            let bits = self.pending.words(region)[word];
            if bits != 0 {
                let pages = bits & !self.shared.sent_word(region, word);
                self.pending.clear_word(region, word);
                self.pending_count -= u64::from(bits.count_ones());
                if pages != 0 {
                    slice.merge_word(region, word, pages);
                    taken += 1;
                }
            }
            word += 1;
        }
        self.cursor = (region, word);
        slice
    }

    /// Waits for the receiver's *done*. The timeout runs from the last progress, as the wait
    /// for *ready* does.
    fn wait_for_done(&mut self) -> Result<(), ()> {
        let timeout = self.sender.timeout;
        let mut deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            self.publish();
            let sender = &self.sender;
            if sender.stop.is_stopped() {
                return Err(());
            }
            let progress = Some((
                sender.counters.in_flight(),
                sender.stop.unsent(),
                self.shared.requests.load(Ordering::Relaxed),
            ));
            if progress != last {
                last = progress;
                deadline = Instant::now() + timeout;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let op = "waiting for the receiver's done";
            if left.is_zero() {
                sender.stop.fail(Error::Timeout {
                    channel: 0,
                    op,
                    timeout,
                });
                return Err(());
            }
            match sender
                .confirm
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok(Ok(Reply::Done(pages, latency))) if pages == self.shared.wanted.count() => {
                    self.latency = *latency;
                    return Ok(());
                }
                Ok(Ok(reply)) => {
                    let problem = format!("the receiver said {reply:?} in postcopy");
                    sender.stop.fail(Error::protocol(0, problem));
                    return Err(());
                }
                Ok(Err(err)) => {
                    sender.stop.fail(err);
                    return Err(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    sender.stop.fail(Error::Closed { channel: 0, op });
                    return Err(());
                }
            }
        }
    }

    /// Every page is on the destination: ends the session.
    fn complete(mut self) -> Summary {
        let stats = self.stats();
        self.sender.handle.update(|p| p.postcopy = Some(stats));
        let sender = &mut self.sender;
        sender.counters.set_remaining_pages(0);
        sender.sink.fact(Fact::Completed);
        sender.ended = true;
        sender.stop.close_all();
        sender.stop_threads();
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        sender.sink.fact(Fact::Drained);
        let confirmed = self.acknowledged.unwrap_or_else(Instant::now);
        Summary {
            rounds: sender.round,
            stats: sender.counters.snapshot(),
            elapsed: Instant::now().duration_since(sender.started),
            confirmed,
            // Its *done* says it holds every page and runs the guest.
            acknowledged: true,
            tls: sender.negotiated.clone(),
            postcopy: Some(stats),
            memory: sender.memory_transfer.clone(),
        }
    }
}

/// The fault channel's server: reads requests and answers each at once from the frozen
/// memory.
struct Server {
    shared: Arc<Shared>,
    memory: Arc<GuestMemory>,
    stop: Arc<Stop>,
    counters: Arc<Counters>,
    round: u32,
    channel: u16,
    timeout: Duration,
}

impl Server {
    fn run(self, mut writer: Box<dyn LinkWriter>, mut reader: Box<dyn LinkReader>) {
        let mut encoder = Encoder::new();
        let mut frame = vec![0u8; frame_capacity(MAX_PAGES_PER_FRAME as usize)];
        let mut offsets: Vec<u32> = (0..MAX_PAGES_PER_FRAME).collect();
        loop {
            let result = self.next_request(&mut *reader).and_then(|header| {
                self.answer(
                    &header,
                    &mut encoder,
                    &mut frame,
                    &mut offsets,
                    &mut *writer,
                )
            });
            if let Err(err) = result {
                if !self.stop.is_stopped() {
                    self.stop.fail(err);
                }
                return;
            }
        }
    }

    /// Reads the next request; an error frame is the receiver's failure.
    fn next_request(&self, reader: &mut dyn LinkReader) -> Result<FrameHeader, Error> {
        let op = "reading page requests";
        let (header, payload) = session::read_control(&mut |buf| reader.recv(buf))
            .map_err(|e| e.into_error(self.channel, op, self.timeout))?;
        self.counters
            .add_wire_bytes((FrameHeader::LEN + payload.len()) as u64);
        match header.kind {
            FrameKind::Request => Ok(header),
            FrameKind::Error => Err(Error::PeerFailed {
                peer: "receiver",
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
            kind => Err(Error::protocol(
                self.channel,
                format!("a {kind:?} frame arrived on the fault channel"),
            )),
        }
    }

    /// Sends the pages `header` asks for.
    fn answer(
        &self,
        header: &FrameHeader,
        encoder: &mut Encoder,
        frame: &mut [u8],
        offsets: &mut [u32],
        writer: &mut dyn LinkWriter,
    ) -> Result<(), Error> {
        let region = header.region as usize;
        let (first, count) = (header.value, u64::from(header.count));
        let pages = self
            .memory
            .regions()
            .get(region)
            .map(|r| r.layout().pages());
        let inside =
            pages.is_some_and(|pages| first.checked_add(count).is_some_and(|end| end <= pages));
        if !inside {
            return Err(Error::protocol(
                self.channel,
                format!(
                    "a request for {count} pages of region {region} from page {first}, outside the guest memory"
                ),
            ));
        }
        if let Some(page) = (first..first + count).find(|&p| !self.shared.is_wanted(region, p)) {
            return Err(Error::protocol(
                self.channel,
                format!(
                    "a request for page {page} of region {region}, which the destination holds already"
                ),
            ));
        }
        let batch = Batch {
            region: header.region,
            first,
            offsets: &offsets[..header.count as usize],
            round: self.round,
        };
        let (len, counts) = encoder
            .encode(&self.memory, &batch, PageCompression::Off, frame)
            .map_err(|source| Error::Memory {
                channel: self.channel,
                source,
            })?;
        writer
            .send(&[&frame[..len]])
            .map_err(|e| Error::io(self.channel, "sending requested pages", self.timeout, e))?;
        self.counters.add_pages(counts);
        self.counters.add_queued(len as u64);
        self.counters.add_sent(self.channel, len as u64);
        self.shared.note_sent(region, first, count);
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        self.shared
            .requested_pages
            .fetch_add(count, Ordering::Relaxed);
        Ok(())
    }
}

/// Reads the receiver's bitmaps of the pages it holds on a reconnected channel 0, up to its
/// *resume*.
fn read_received(
    conn: &mut Conn,
    memory: &GuestMemory,
    timeout: Duration,
) -> Result<DirtySet, Error> {
    let op = "receiving the bitmaps of the pages the receiver holds";
    let io = |e| Error::io(0, op, timeout, e);
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut received = DirtySet::none(memory);
    loop {
        let mut fixed = [0u8; FrameHeader::LEN];
        conn.read_exact(&mut fixed).map_err(io)?;
        let header =
            FrameHeader::decode(&fixed).map_err(|source| Error::Decode { channel: 0, source })?;
        // At most 8 MiB, checked with the header.
        let mut payload = vec![0u8; header.len as usize];
        conn.read_exact(&mut payload).map_err(io)?;
        let mut hasher = header.hasher();
        hasher.update(&payload);
        header
            .verify(hasher)
            .map_err(|source| Error::Decode { channel: 0, source })?;
        match header.kind {
            FrameKind::Received => {
                let region = header.region as usize;
                let Some(pages) = memory.regions().get(region).map(|r| r.layout().pages()) else {
                    return Err(Error::protocol(
                        0,
                        format!(
                            "a received bitmap for region index {region}, which does not exist"
                        ),
                    ));
                };
                let count = (payload.len() / 8) as u64;
                if header.value.saturating_add(count) > pages.div_ceil(64) {
                    return Err(Error::protocol(
                        0,
                        format!(
                            "a received bitmap runs past region index {region}'s {pages} pages"
                        ),
                    ));
                }
                for (i, word) in FrameHeader::bitmap_words(&payload).enumerate() {
                    let index = usize::try_from(header.value + i as u64).unwrap_or(usize::MAX);
                    received.merge_word(region, index, word);
                }
            }
            FrameKind::Resume if header.value == received.count() => {
                conn.set_read_timeout(None).map_err(io)?;
                return Ok(received);
            }
            FrameKind::Resume => {
                return Err(Error::protocol(
                    0,
                    format!(
                        "the receiver says it holds {} pages, its bitmaps {}",
                        header.value,
                        received.count()
                    ),
                ));
            }
            FrameKind::Error => {
                return Err(Error::PeerFailed {
                    peer: "receiver",
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            kind => {
                return Err(Error::protocol(
                    0,
                    format!("a {kind:?} frame arrived instead of the receiver's bitmaps"),
                ));
            }
        }
    }
}

//! The fault-injecting proxy between a stress run's sender and receiver: one pair of pipes per
//! channel, applying the run's [`Strike`] to the bytes as they pass.
//!
//! Without TLS it follows ramjet's framing (the hello, frame headers, payloads) to aim a fault
//! at a part of the stream or a message. Under TLS it sees what an on-path attacker sees: the
//! records' plaintext headers (type, version, length) and nothing else. It follows the record
//! framing ([`Records`]); it knows the sealed hello on each channel as the first
//! application-data record whose length is the hello's plus what sealing adds ([`SEALING`]),
//! so that the handshake and the hello pass untouched; and on channel 0 it names the handover
//! messages by their place and sealed length ([`SealedMessages`]): after the receiver's sealed
//! hello reply, its next record is *ready* (40 bytes of frame) or its error, the one after
//! that *decided*; the sender's first record after *ready* passed is *go*.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ramjet_dataplane::internals::wire::{FrameHeader, FrameKind, Hello, HelloReply, VERSION};
use ramjet_dataplane::testkit::image::Rng;
use ramjet_dataplane::transport::{Endpoint, Listener, Stream};

use super::plan::{End, Lose, Part, Plan, StrayWhen, Strike, short_span};

/// How often a blocked pipe looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What ramjet's record layer adds to a record's content: its inner content type and the
/// 16-byte AEAD tag (it never pads). A frame of `n` bytes sealed alone is a record body of
/// `n + SEALING` bytes.
pub const SEALING: u64 = 1 + 16;
/// A TLS record's header: content type, legacy version, length (big-endian).
const RECORD_HEADER: usize = 5;
/// The outer content type of every record sealed with traffic keys.
const APPLICATION_DATA: u8 = 23;
/// The body of a full record: 16 KiB of content, sealed.
const FULL_BODY: u64 = (1 << 14) + SEALING;
/// The longest record body a TLS 1.3 peer may send (RFC 8446 §5.2).
const MAX_BODY: usize = (1 << 14) + 256;

/// The body length of `len` bytes of ramjet sealed in one record.
fn sealed(len: u64) -> u64 {
    len + SEALING
}

/// What the proxy saw and did on channel 0, for the run to look at afterwards.
#[derive(Debug, Default)]
pub struct Seen {
    /// A *go* was forwarded to the receiver on channel 0.
    pub go_delivered: AtomicBool,
}

/// A message on channel 0 as it passes, before it is forwarded.
#[derive(Debug, Clone, Copy)]
pub struct Passing {
    /// Sender to receiver.
    pub forward: bool,
    /// The frame's kind (`None`: the hello or its reply).
    pub kind: Option<FrameKind>,
    /// How many frames of this kind passed before it in its direction.
    pub nth: u64,
}

/// Called with each message on channel 0 before it is forwarded; false drops the message.
pub type Watch = Arc<dyn Fn(Passing) -> bool + Send + Sync>;

/// A running proxy.
pub struct Proxy {
    thread: JoinHandle<()>,
    endpoint: Endpoint,
    struck: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
}

impl Proxy {
    /// Accepts the plan's channels on `listener`, connects each to `real`, and forwards;
    /// later connections (a sender delivering its decision anew) are forwarded untouched, or
    /// closed at once after a handover fault that refuses them struck. `hello_len` is the
    /// length of the sender's hello on each channel; `timeout` is the sessions' own, which a
    /// stall outlasts. `watch`, if given, sees every message of channel 0.
    pub fn start(
        listener: Listener,
        real: Endpoint,
        plan: &Plan,
        hello_len: u64,
        timeout: Duration,
        watch: Option<Watch>,
    ) -> Proxy {
        let (stop, struck) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let seen = Arc::new(Seen::default());
        let endpoint = listener.endpoint().clone();
        let thread = {
            let (stop, struck, plan) = (Arc::clone(&stop), Arc::clone(&struck), *plan);
            let seen = Arc::clone(&seen);
            thread::spawn(move || {
                let mut channels = Vec::new();
                let mut index = 0u16;
                let refuse_later = matches!(
                    plan.strike,
                    Strike::Handover {
                        reconnect: false,
                        ..
                    }
                );
                loop {
                    // The session's channels must come soon; later ones may come any time.
                    let wait = (index < plan.channels).then_some(timeout * 4);
                    let Ok(from) = listener.accept(wait, &|| stop.load(Ordering::Relaxed)) else {
                        break;
                    };
                    let channel = index;
                    index = index.saturating_add(1);
                    let later = channel >= plan.channels;
                    if later && refuse_later && struck.load(Ordering::Relaxed) {
                        drop(from);
                        continue;
                    }
                    let Ok(to) = Stream::connect(&real, timeout) else {
                        if later {
                            continue;
                        }
                        break;
                    };
                    let ours = channel == plan.channel;
                    let strike = if later { Strike::None } else { plan.strike };
                    let tamper = |forward: bool| Tamper {
                        strike,
                        forward,
                        ours,
                        tls: plan.tls,
                        hello_len,
                        framing: Framing::new(hello_len),
                        records: Records::new(sealed(hello_len)),
                        flipped: false,
                        rng: Rng::new(plan.run ^ u64::from(channel) << 32 ^ u64::from(forward)),
                        seen: 0,
                        started: None,
                        struck: Arc::clone(&struck),
                        timeout,
                    };
                    let (forward, back, stop) = (tamper(true), tamper(false), Arc::clone(&stop));
                    let messages = (channel == 0
                        && !later
                        && (watch.is_some() || by_message(strike)))
                    .then(|| Messages {
                        watch: watch.clone(),
                        seen: Arc::clone(&seen),
                        pair: Mutex::default(),
                        ready_passed: AtomicBool::new(false),
                    });
                    channels.push(thread::spawn(move || match messages {
                        Some(messages) => {
                            connect_messages(&from, &to, forward, back, &stop, &Arc::new(messages));
                        }
                        None => connect_pipes(&from, &to, forward, back, &stop),
                    }));
                }
                for channel in channels {
                    let _ = channel.join();
                }
            })
        };
        Proxy {
            thread,
            endpoint,
            struck,
            stop,
            seen,
        }
    }

    /// Where the sender connects.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// What it saw on channel 0 so far.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }

    /// Stops forwarding, waits for every pipe, and says whether the fault struck.
    pub fn stop(self) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.struck.load(Ordering::Relaxed)
    }
}

/// Whether channel 0 is forwarded message by message for this strike (a handover fault, or a
/// stray that comes at a message).
fn by_message(strike: Strike) -> bool {
    matches!(
        strike,
        Strike::Handover { .. }
            | Strike::Late { .. }
            | Strike::Stray {
                when: StrayWhen::During | StrayWhen::After,
                ..
            }
    )
}

/// Forwards one channel both ways until both directions end or `stop`. A direction that ends
/// is half-closed, so the other can still carry an answer (the receiver's error message, say).
fn connect_pipes(
    from: &Stream,
    to: &Stream,
    forward: Tamper,
    back: Tamper,
    stop: &Arc<AtomicBool>,
) {
    // Bounded waits, so that every loop sees `stop`.
    for s in [from, to] {
        let _ = s.set_read_timeout(Some(POLL));
        let _ = s.set_write_timeout(Some(POLL));
    }
    let back = match (to.try_clone(), from.try_clone()) {
        (Ok(to), Ok(from)) => {
            let stop = Arc::clone(stop);
            let mut back = back;
            Some(thread::spawn(move || {
                if let Ended::Eof = pipe(&to, &from, &mut back, &stop) {
                    from.shutdown_write();
                }
            }))
        }
        _ => None,
    };
    let mut forward = forward;
    match pipe(from, to, &mut forward, stop) {
        Ended::Eof => to.shutdown_write(),
        Ended::Cut(Cut::Both) => {
            from.shutdown();
            to.shutdown();
        }
        // The other end stays open and silent, as a lost link looks until a timeout.
        Ended::Cut(Cut::Sender) => {
            from.shutdown();
            drain(to, stop);
        }
        Ended::Cut(Cut::Receiver) => {
            to.shutdown();
            drain(from, stop);
        }
    }
    if let Some(back) = back {
        let _ = back.join();
    }
}

/// Channel 0 forwarded message by message: the hello (or its reply), then whole frames.
struct Messages {
    watch: Option<Watch>,
    seen: Arc<Seen>,
    /// Both of its streams, so that a cut in one direction closes it both ways.
    pair: Mutex<Vec<Stream>>,
    /// Under TLS: the receiver's *ready* was seen on its way back, so the sender's next record
    /// is its decision.
    ready_passed: AtomicBool,
}

impl Messages {
    fn cut(&self) {
        for stream in self
            .pair
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            stream.shutdown();
        }
    }
}

/// How a message pump ended.
enum Pumped {
    /// Its source ended (or its destination is gone): half-close the destination.
    Eof,
    /// The fault cut the channel, or silenced this direction: leave everything as it is.
    Struck,
}

/// Forwards channel 0 both ways, message by message, applying the handover fault and the
/// watch; like [`connect_pipes`] otherwise.
fn connect_messages(
    from: &Stream,
    to: &Stream,
    forward: Tamper,
    back: Tamper,
    stop: &Arc<AtomicBool>,
    messages: &Arc<Messages>,
) {
    for s in [from, to] {
        let _ = s.set_read_timeout(Some(POLL));
        let _ = s.set_write_timeout(Some(POLL));
        if let Ok(clone) = s.try_clone() {
            messages
                .pair
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(clone);
        }
    }
    let back = match (to.try_clone(), from.try_clone()) {
        (Ok(to), Ok(from)) => {
            let (stop, messages) = (Arc::clone(stop), Arc::clone(messages));
            let mut back = back;
            Some(thread::spawn(move || {
                if let Pumped::Eof = pump_messages(&to, &from, &mut back, &stop, &messages) {
                    from.shutdown_write();
                }
            }))
        }
        _ => None,
    };
    let mut forward = forward;
    if let Pumped::Eof = pump_messages(from, to, &mut forward, stop, messages) {
        to.shutdown_write();
    }
    if let Some(back) = back {
        let _ = back.join();
    }
}

/// Copies `from` to `to` a message at a time until `from` ends, `to` is gone, the fault
/// strikes, or `stop`.
fn pump_messages(
    from: &Stream,
    to: &Stream,
    tamper: &mut Tamper,
    stop: &AtomicBool,
    messages: &Messages,
) -> Pumped {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return Pumped::Eof;
    };
    let mut counts: Vec<(FrameKind, u64)> = Vec::new();
    let mut reader = if tamper.tls {
        Reader::Sealed(SealedMessages::new(tamper.forward, tamper.hello_len))
    } else {
        Reader::Plain { opening: true }
    };
    while let Some((kind, bytes)) = reader.next(&mut from, tamper.forward, stop, messages) {
        let nth = match kind {
            Some(kind) => match counts.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => {
                    *n += 1;
                    *n - 1
                }
                None => {
                    counts.push((kind, 1));
                    0
                }
            },
            None => 0,
        };
        let first = nth == 0;
        match tamper.strike {
            Strike::Handover { message, how, .. }
                if first && message.forward() == tamper.forward && kind == Some(message.kind()) =>
            {
                tamper.strike();
                match how {
                    Lose::Cut => messages.cut(),
                    Lose::Silence => drain(&from, stop),
                }
                return Pumped::Struck;
            }
            Strike::Late { message, by }
                if first && message.forward() == tamper.forward && kind == Some(message.kind()) =>
            {
                tamper.strike();
                let until = Instant::now() + by;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
                }
            }
            _ => {}
        }
        let passing = Passing {
            forward: tamper.forward,
            kind,
            nth,
        };
        if messages.watch.as_ref().is_some_and(|watch| !watch(passing)) {
            continue;
        }
        if !write_all(&mut to, &bytes, stop) {
            return Pumped::Eof;
        }
        if tamper.forward && kind == Some(FrameKind::Decision) {
            messages.seen.go_delivered.store(true, Ordering::Relaxed);
        }
    }
    Pumped::Eof
}

/// How channel 0 is cut into messages: ramjet's framing, or TLS records.
enum Reader {
    /// The hello (or its reply) while `opening`, then whole frames.
    Plain { opening: bool },
    /// Whole records, named by their place and length.
    Sealed(SealedMessages),
}

impl Reader {
    /// The next message and the frame it is (`None`: the hello or its reply, or under TLS a
    /// record that is not a handover message or stream data: the handshake, an error).
    fn next(
        &mut self,
        from: &mut Stream,
        forward: bool,
        stop: &AtomicBool,
        messages: &Messages,
    ) -> Option<(Option<FrameKind>, Vec<u8>)> {
        match self {
            Reader::Plain { opening } => {
                let message = read_message(from, forward, *opening, stop);
                *opening = false;
                message
            }
            Reader::Sealed(sealed) => {
                let record = read_record(from, stop)?;
                let kind = sealed.name(&record, messages);
                Some((kind, record))
            }
        }
    }
}

/// Where one direction of channel 0 is, under TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The handshake, then the sealed hello (forward) or the sealed reply accepting it (back).
    Opening,
    /// Forward: the stream, then *go*. Back: *ready* (or an error) comes next.
    Stream,
    /// Back: *decided* comes next.
    Ready,
    /// Back: nothing more is a handover message.
    Done,
}

/// Names the records of one direction of channel 0 under TLS, by their place and their
/// length: a frame sealed alone is its length plus [`SEALING`].
struct SealedMessages {
    forward: bool,
    /// The body of the record that ends the opening: the sealed hello, or the sealed reply
    /// that accepts it.
    opening: u64,
    phase: Phase,
}

impl SealedMessages {
    fn new(forward: bool, hello_len: u64) -> SealedMessages {
        let opening = if forward {
            sealed(hello_len)
        } else {
            sealed(HelloReply::FIXED_LEN as u64)
        };
        SealedMessages {
            forward,
            opening,
            phase: Phase::Opening,
        }
    }

    /// What `record` (header and body) is.
    fn name(&mut self, record: &[u8], messages: &Messages) -> Option<FrameKind> {
        let (kind, len) = record_header(record)?;
        let header_only = sealed(FrameHeader::LEN as u64);
        match self.phase {
            Phase::Opening => {
                if kind == APPLICATION_DATA && len == self.opening {
                    self.phase = Phase::Stream;
                }
                None
            }
            // Everything the sender seals before *ready* is stream data; the first record
            // after it, if a frame header alone, its decision.
            Phase::Stream if self.forward => {
                if !messages.ready_passed.load(Ordering::Relaxed) {
                    Some(FrameKind::Pages)
                } else if len == header_only {
                    self.phase = Phase::Done;
                    Some(FrameKind::Decision)
                } else {
                    self.phase = Phase::Done;
                    None
                }
            }
            Phase::Stream => {
                if len == sealed(FrameHeader::LEN as u64 + 8) {
                    messages.ready_passed.store(true, Ordering::Relaxed);
                    self.phase = Phase::Ready;
                    Some(FrameKind::Ready)
                } else {
                    self.phase = Phase::Done;
                    None
                }
            }
            Phase::Ready => {
                self.phase = Phase::Done;
                (len == header_only).then_some(FrameKind::Decided)
            }
            Phase::Done => None,
        }
    }
}

/// A record's content type and body length, from its header.
fn record_header(record: &[u8]) -> Option<(u8, u64)> {
    match record {
        [kind, _, _, high, low, ..] => Some((*kind, u64::from(u16::from_be_bytes([*high, *low])))),
        _ => None,
    }
}

/// The next whole TLS record of `from`, header and body; `None` at the end of the stream, on
/// an error, on a body longer than TLS allows, or at `stop`.
fn read_record(from: &mut Stream, stop: &AtomicBool) -> Option<Vec<u8>> {
    let mut bytes = vec![0u8; RECORD_HEADER];
    read_full(from, &mut bytes, stop)?;
    let (_, len) = record_header(&bytes)?;
    let len = usize::try_from(len).ok().filter(|&len| len <= MAX_BODY)?;
    bytes.resize(RECORD_HEADER + len, 0);
    read_full(from, &mut bytes[RECORD_HEADER..], stop)?;
    Some(bytes)
}

/// The next message of `from`: the hello (sender to receiver) or the hello reply, if
/// `opening`, else a whole frame; `None` at the end of the stream, on an error, on bytes that
/// are not one, or at `stop`.
fn read_message(
    from: &mut Stream,
    forward: bool,
    opening: bool,
    stop: &AtomicBool,
) -> Option<(Option<FrameKind>, Vec<u8>)> {
    if opening {
        let fixed_len = if forward {
            Hello::FIXED_LEN
        } else {
            HelloReply::FIXED_LEN
        };
        let mut bytes = vec![0u8; fixed_len];
        read_full(from, &mut bytes, stop)?;
        let rest = if forward {
            Hello::table_len(bytes.as_slice().try_into().ok()?).ok()?
        } else {
            HelloReply::reason_len(bytes.as_slice().try_into().ok()?).ok()?
        };
        bytes.resize(fixed_len + rest, 0);
        read_full(from, &mut bytes[fixed_len..], stop)?;
        return Some((None, bytes));
    }
    let mut fixed = [0u8; FrameHeader::LEN];
    read_full(from, &mut fixed, stop)?;
    let header = FrameHeader::decode(&fixed).ok()?;
    let mut bytes = fixed.to_vec();
    bytes.resize(FrameHeader::LEN + usize::try_from(header.len).ok()?, 0);
    read_full(from, &mut bytes[FrameHeader::LEN..], stop)?;
    Some((Some(header.kind), bytes))
}

/// Fills `buf` from `from`, riding out the read timeouts; `None` at the end of the stream, on
/// an error, or at `stop`.
fn read_full(from: &mut Stream, buf: &mut [u8], stop: &AtomicBool) -> Option<()> {
    let mut got = 0;
    while got < buf.len() {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        match from.read(&mut buf[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e) if waits(&e) => {}
            Err(_) => return None,
        }
    }
    Some(())
}

/// How a pipe ended.
enum Ended {
    /// Its source ended (or its destination is gone).
    Eof,
    /// The fault cut the link.
    Cut(Cut),
}

/// What a cut closes.
enum Cut {
    Sender,
    Receiver,
    Both,
}

/// One direction's view of the fault.
struct Tamper {
    strike: Strike,
    /// Sender to receiver.
    forward: bool,
    /// Whether this is the channel the fault strikes (slow and short strike every channel).
    ours: bool,
    /// The channel is TLS: its bytes are records.
    tls: bool,
    /// The length of the sender's hello.
    hello_len: u64,
    framing: Framing,
    /// Under TLS, the records of the sender's stream.
    records: Records,
    /// A record flip struck.
    flipped: bool,
    rng: Rng,
    /// Bytes read so far.
    seen: u64,
    started: Option<Instant>,
    struck: Arc<AtomicBool>,
    timeout: Duration,
}

impl Tamper {
    fn strike(&self) {
        self.struck.store(true, Ordering::Relaxed);
    }

    /// How much to read next.
    fn read_size(&mut self, buf: usize) -> usize {
        match self.strike {
            Strike::Short { max_piece } if self.seen < short_span(max_piece) => {
                usize::try_from(1 + self.rng.below(max_piece)).map_or(buf, |n| n.min(buf))
            }
            _ => buf,
        }
    }

    /// Applies the fault to `chunk`, the bytes at `start..` of the stream; `Some` ends the pipe
    /// after `keep` bytes of it are written.
    fn apply(&mut self, chunk: &mut [u8], start: u64) -> Option<(usize, Cut)> {
        let end = start + chunk.len() as u64;
        let at = |at: u64| {
            (start..end)
                .contains(&at)
                .then(|| usize::try_from(at - start).ok())
                .flatten()
        };
        match self.strike {
            Strike::Flip { part, nth, offset } if self.ours && self.forward => {
                for byte in chunk.iter_mut() {
                    if self.framing.advance(*byte, part, nth, offset) {
                        *byte ^= 0x5A;
                        self.strike();
                    }
                }
                None
            }
            Strike::FlipRecord { at, offset, header } if self.ours && self.forward => {
                for byte in chunk.iter_mut() {
                    let place = self.records.advance(*byte);
                    if !self.flipped && place.is_some_and(|p| p.hit(at, offset, header)) {
                        *byte ^= 0x5A;
                        self.flipped = true;
                        self.strike();
                    }
                }
                None
            }
            Strike::Version { reply } if self.ours && self.forward != reply => {
                // Bytes 8..10 of a hello and of a reply: the version, one above this build's.
                let [low, high] = (VERSION + 1).to_le_bytes();
                for (pos, value) in [(8, low), (9, high)] {
                    if let Some(i) = at(pos) {
                        chunk[i] = value;
                        self.strike();
                    }
                }
                None
            }
            Strike::Drop { end: side, at: cut } if self.ours && self.forward => {
                at(cut).map(|keep| {
                    self.strike();
                    (
                        keep,
                        match side {
                            End::Sender => Cut::Sender,
                            End::Receiver => Cut::Receiver,
                        },
                    )
                })
            }
            Strike::Stall { at: stall } if self.ours && self.forward => at(stall).map(|keep| {
                self.strike();
                (keep, Cut::Both)
            }),
            _ => None,
        }
    }

    /// Writes `bytes` on, in the fault's pieces and at its pace; false if `to` is gone.
    fn write(&mut self, to: &mut Stream, bytes: &[u8], stop: &AtomicBool) -> bool {
        match self.strike {
            Strike::Short { max_piece }
                if self.seen <= short_span(max_piece) + bytes.len() as u64 =>
            {
                self.strike();
                let mut rest = bytes;
                while !rest.is_empty() {
                    let n = usize::try_from(1 + self.rng.below(max_piece))
                        .map_or(rest.len(), |n| n.min(rest.len()));
                    if !write_all(to, &rest[..n], stop) {
                        return false;
                    }
                    rest = &rest[n..];
                }
                true
            }
            Strike::Slow { bytes_per_sec } if self.forward => {
                self.strike();
                if !write_all(to, bytes, stop) {
                    return false;
                }
                let started = *self.started.get_or_insert_with(Instant::now);
                let due =
                    started + Duration::from_secs_f64(self.seen as f64 / bytes_per_sec as f64);
                while Instant::now() < due && !stop.load(Ordering::Relaxed) {
                    thread::sleep(due.saturating_duration_since(Instant::now()).min(POLL));
                }
                true
            }
            _ => write_all(to, bytes, stop),
        }
    }
}

/// Copies `from` to `to` through `tamper` until `from` ends, `to` is gone, the fault cuts the
/// link, or `stop`.
fn pipe(from: &Stream, to: &Stream, tamper: &mut Tamper, stop: &AtomicBool) -> Ended {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return Ended::Eof;
    };
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let want = tamper.read_size(buf.len());
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => return Ended::Eof,
            Ok(n) => n,
            Err(e) if waits(&e) => continue,
            Err(_) => return Ended::Eof,
        };
        let start = tamper.seen;
        tamper.seen += n as u64;
        let chunk = &mut buf[..n];
        if let Some((keep, cut)) = tamper.apply(chunk, start) {
            let _ = write_all(&mut to, &chunk[..keep], stop);
            if let Cut::Both = cut {
                // A stall: nothing moves for longer than either side's timeout, then the link
                // is gone.
                let until = Instant::now() + tamper.timeout * 3;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    thread::sleep(POLL);
                }
            }
            return Ended::Cut(cut);
        }
        if !tamper.write(&mut to, chunk, stop) {
            return Ended::Eof;
        }
    }
    Ended::Eof
}

/// Reads and discards until `from` ends or `stop`.
fn drain(from: &Stream, stop: &AtomicBool) {
    let Ok(mut from) = from.try_clone() else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if waits(&e) => {}
            Err(_) => return,
        }
    }
}

/// `write_all` that gives up at `stop` rather than block on a peer that stopped reading.
fn write_all(to: &mut Stream, mut bytes: &[u8], stop: &AtomicBool) -> bool {
    while !bytes.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        match to.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if waits(&e) => {}
            Err(_) => return false,
        }
    }
    true
}

fn waits(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Follows the sender's stream on one channel: the hello, then frame headers and their
/// payloads, whose lengths the wire module reads out of each header.
struct Framing {
    part: Part,
    /// Which one of its kind the current part is.
    index: u64,
    /// Offset in the current part, and its length.
    at: u64,
    len: u64,
    headers: u64,
    payloads: u64,
    header: [u8; FrameHeader::LEN],
}

impl Framing {
    fn new(hello_len: u64) -> Framing {
        Framing {
            part: Part::Hello,
            index: 0,
            at: 0,
            len: hello_len,
            headers: 0,
            payloads: 0,
            header: [0; FrameHeader::LEN],
        }
    }

    /// Steps over one byte; true if it is byte `offset % len` of the `nth` `part`.
    fn advance(&mut self, byte: u8, part: Part, nth: u64, offset: u64) -> bool {
        let hit = self.part == part && self.index == nth && self.at == offset % self.len;
        if self.part == Part::Header {
            self.header[usize::try_from(self.at).unwrap_or(0) % FrameHeader::LEN] = byte;
        }
        self.at += 1;
        if self.at == self.len {
            self.next();
        }
        hit
    }

    fn next(&mut self) {
        let header = |f: &mut Framing| {
            f.part = Part::Header;
            f.index = f.headers;
            f.len = FrameHeader::LEN as u64;
        };
        match self.part {
            Part::Hello => header(self),
            Part::Header => {
                self.headers += 1;
                let payload = FrameHeader::payload_len(&self.header);
                if payload > 0 {
                    self.part = Part::Payload;
                    self.index = self.payloads;
                    self.len = u64::from(payload);
                } else {
                    header(self);
                }
            }
            Part::Payload => {
                self.payloads += 1;
                header(self);
            }
        }
        self.at = 0;
    }
}

/// Follows the sender's stream on one channel under TLS: record headers and bodies, and from
/// the sealed hello on, which record after it a byte is in.
struct Records {
    /// The body length of the sealed hello: the first application-data record this long ends
    /// the handshake and the hello.
    hello: u64,
    header: [u8; RECORD_HEADER],
    /// Bytes of the current record's header read so far.
    in_header: usize,
    /// The current record's body length, and bytes of it read.
    body_len: u64,
    body_at: u64,
    /// The current record's index among those after the sealed hello, once it passed.
    index: Option<u64>,
    /// Bytes after the sealed hello so far, and where the current record began in them.
    past: u64,
    start: u64,
}

/// Where a byte after the sealed hello is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    /// Its record's index after the sealed hello.
    index: u64,
    /// Where it is in the record.
    pos: Pos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// Byte `.0` of the record's header.
    Header(usize),
    /// Byte `at` of a body of `len` bytes, whose record begins `start` bytes after the hello.
    Body { at: u64, len: u64, start: u64 },
}

impl Place {
    /// Whether a [`Strike::FlipRecord`] flips this byte: the `offset`th byte of the body of the
    /// first record that ends past `at` and is the first record after the hello or a full one;
    /// with `header`, the content type of the first record after the hello. The caller stops
    /// at the first hit.
    fn hit(self, at: u64, offset: u64, header: bool) -> bool {
        match self.pos {
            Pos::Header(0) => header && self.index == 0,
            Pos::Header(_) => false,
            Pos::Body {
                at: byte,
                len,
                start,
            } => {
                !header
                    && (self.index == 0 || len == FULL_BODY)
                    && start + RECORD_HEADER as u64 + len > at
                    && byte == offset % len
            }
        }
    }
}

impl Records {
    fn new(hello: u64) -> Records {
        Records {
            hello,
            header: [0; RECORD_HEADER],
            in_header: 0,
            body_len: 0,
            body_at: 0,
            index: None,
            past: 0,
            start: 0,
        }
    }

    /// Steps over one byte; where it is, if past the sealed hello.
    fn advance(&mut self, byte: u8) -> Option<Place> {
        let pos = if self.in_header < RECORD_HEADER {
            self.header[self.in_header] = byte;
            let pos = Pos::Header(self.in_header);
            self.in_header += 1;
            if self.in_header == RECORD_HEADER {
                self.body_len = u64::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.body_at = 0;
            }
            pos
        } else {
            let pos = Pos::Body {
                at: self.body_at,
                len: self.body_len,
                start: self.start,
            };
            self.body_at += 1;
            pos
        };
        let place = self.index.map(|index| Place { index, pos });
        if place.is_some() {
            self.past += 1;
        }
        if self.in_header == RECORD_HEADER && self.body_at == self.body_len {
            self.end_record();
        }
        place
    }

    fn end_record(&mut self) {
        self.index = match self.index {
            Some(index) => Some(index + 1),
            None if self.header[0] == APPLICATION_DATA && self.body_len == self.hello => Some(0),
            None => None,
        };
        self.in_header = 0;
        self.start = self.past;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framing finds the parts of a real stream: a hello, a frame with a payload, one
    /// without.
    #[test]
    fn framing_follows_hello_headers_and_payloads() {
        // A hello of one region is 72 bytes, a header 32.
        let mut stream = vec![0xAA; 72];
        stream.extend(FrameHeader::device_state(0, b"state"));
        stream.extend(FrameHeader::end_of_stream(1, 9));
        let parts = |part, nth, offset| {
            let mut framing = Framing::new(72);
            let hits: Vec<usize> = stream
                .iter()
                .enumerate()
                .filter(|&(_, &b)| framing.advance(b, part, nth, offset))
                .map(|(i, _)| i)
                .collect();
            hits
        };
        assert_eq!(parts(Part::Hello, 0, 75), vec![3]);
        assert_eq!(parts(Part::Header, 0, 2), vec![72 + 2]);
        assert_eq!(parts(Part::Payload, 0, 6), vec![72 + 32 + 1]);
        assert_eq!(parts(Part::Header, 1, 33), vec![72 + 32 + 5 + 1]);
        assert!(parts(Part::Payload, 1, 0).is_empty(), "one payload only");
    }

    /// A TLS record: header and a body of `len` bytes of `fill`.
    fn record(kind: u8, len: u64, fill: u8) -> Vec<u8> {
        let mut record = vec![kind, 3, 3];
        record.extend(u16::try_from(len).unwrap().to_be_bytes());
        record.extend(vec![fill; usize::try_from(len).unwrap()]);
        record
    }

    /// The record follower knows nothing before the sealed hello (the handshake, the hello),
    /// and after it aims a flip at the first record, or past `at` at a full one.
    #[test]
    fn records_are_followed_past_the_sealed_hello() {
        let hello = sealed(72);
        let mut stream = record(22, 300, 1); // a ClientHello
        stream.extend(record(20, 1, 1)); // ChangeCipherSpec
        stream.extend(record(23, 900, 2)); // the encrypted client flight
        stream.extend(record(23, 53, 2));
        stream.extend(record(23, hello, 3));
        let first = stream.len();
        stream.extend(record(23, 100, 4));
        let small = stream.len();
        stream.extend(record(23, 40, 5));
        let full = stream.len();
        stream.extend(record(23, FULL_BODY, 6));
        let flips = |at, offset, header| {
            let mut records = Records::new(hello);
            let mut hits = Vec::new();
            for (i, &byte) in stream.iter().enumerate() {
                let place = records.advance(byte);
                if i < first {
                    assert_eq!(place, None, "byte {i}");
                }
                if hits.is_empty() && place.is_some_and(|p| p.hit(at, offset, header)) {
                    hits.push(i);
                }
            }
            hits
        };
        assert_eq!(flips(0, 7, false), [first + 5 + 7]);
        assert_eq!(flips(0, 107, false), [first + 5 + 7], "modulo the body");
        assert_eq!(flips(0, 99, true), [first], "the first record's type");
        assert_eq!(flips(104, 1, false), [first + 5 + 1], "it ends past 104");
        // Past the first record: the small one is skipped, the full one struck.
        assert_eq!(flips(105, 3, false), [full + 5 + 3]);
        assert_eq!(flips((small - first + 20) as u64, 0, false), [full + 5]);
        let end = (stream.len() - first) as u64;
        assert!(flips(end, 0, false).is_empty(), "nothing ends past the end");
    }

    use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
    use ramjet_dataplane::testkit::image::{self, ImageKind};
    use ramjet_dataplane::testkit::pki::{self, Scratch};
    use ramjet_dataplane::{
        Compression, Error, Fact, PreSwitchover, ReceiveOptions, SendOptions, Sender, TlsClient,
        TlsServer, receive,
    };

    use super::super::plan::{Fault, Mode, Net};

    /// What a migration through the proxy left.
    struct Through {
        sent: Result<(), Error>,
        received: Result<(), Error>,
        /// What the watch saw on channel 0: direction (forward) and frame.
        seen: Vec<(bool, Option<FrameKind>)>,
        struck: bool,
    }

    /// A paused guest of 64 pages migrated over TLS on one channel through a proxy for
    /// `strike`, watched if `watching` (channel 0 then goes message by message, and takes no
    /// byte fault).
    fn through_proxy(strike: Strike, watching: bool) -> Through {
        let dir = Scratch::new("ramjet-stress-proxy-unit").unwrap();
        pki::credentials(dir.path()).unwrap();
        let pages = 64;
        let src = Arc::new(GuestMemory::anonymous(pages * PAGE_SIZE as u64).unwrap());
        image::fill(&src, ImageKind::Mixed, 3).unwrap();
        let dst = Arc::new(GuestMemory::anonymous(pages * PAGE_SIZE as u64).unwrap());
        let tcp = Endpoint::Tcp(([127, 0, 0, 1], 0).into());
        let receiver = Listener::bind(&tcp).unwrap();
        let plan = Plan {
            run: 0,
            net: Net::Tcp,
            mode: Mode::Paused,
            channels: 1,
            compression: Compression::Off,
            image: ImageKind::Mixed,
            pages,
            dirty_rate: 0,
            fault: Fault::None,
            strike,
            channel: 0,
            tls: true,
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let watch: Watch = {
            let seen = Arc::clone(&seen);
            Arc::new(move |p: Passing| {
                seen.lock().unwrap().push((p.forward, p.kind));
                true
            })
        };
        let timeout = Duration::from_secs(5);
        let proxy = Proxy::start(
            Listener::bind(&tcp).unwrap(),
            receiver.endpoint().clone(),
            &plan,
            Hello::encoded_len(1) as u64,
            timeout,
            watching.then_some(watch),
        );
        let options = ReceiveOptions {
            timeout,
            accept_timeout: Some(timeout),
            tls: Some(TlsServer::from_dir(dir.path()).unwrap()),
            ..ReceiveOptions::default()
        };
        let received = {
            let dst = Arc::clone(&dst);
            thread::spawn(move || receive(&receiver, dst, &options, Arc::new(|_: Fact| {})))
        };
        let options = SendOptions {
            channels: 1,
            timeout,
            tls: Some(TlsClient::from_dir(dir.path()).unwrap()),
            ..SendOptions::default()
        };
        let sent = Sender::connect(src, proxy.endpoint(), &options, Arc::new(|_: Fact| {}))
            .and_then(|sender| sender.migrate_paused(b"state", PreSwitchover::Skip))
            .map(|_| ());
        let received = received.join().unwrap().map(|_| ());
        let struck = proxy.stop();
        let seen = seen.lock().unwrap().clone();
        Through {
            sent,
            received,
            seen,
            struck,
        }
    }

    /// Under TLS the proxy names channel 0's handover messages from their records alone:
    /// the handshake and the hello (and the reply) first, unnamed; then the stream and *go*
    /// one way, *ready* and *decided* the other.
    #[test]
    fn sealed_handover_messages_are_named_by_place_and_length() {
        let Through {
            sent,
            received,
            seen,
            struck,
        } = through_proxy(Strike::None, true);
        sent.unwrap();
        received.unwrap();
        assert!(!struck);
        let way = |forward: bool| -> Vec<Option<FrameKind>> {
            seen.iter()
                .filter(|(f, _)| *f == forward)
                .map(|(_, kind)| *kind)
                .collect()
        };
        let (forward, back) = (way(true), way(false));
        // The sender: its ClientHello, its encrypted flight, the sealed hello, unnamed; then
        // stream records, then go.
        let opening = forward.iter().take_while(|k| k.is_none()).count();
        assert!(opening >= 3, "{forward:?}");
        let rest = &forward[opening..];
        assert_eq!(rest.last(), Some(&Some(FrameKind::Decision)), "{forward:?}");
        assert!(
            rest[..rest.len() - 1]
                .iter()
                .all(|k| *k == Some(FrameKind::Pages))
        );
        assert!(rest.len() >= 2, "{forward:?}");
        // The receiver: its ServerHello and encrypted flight, the sealed reply; ready, decided.
        let opening = back.iter().take_while(|k| k.is_none()).count();
        assert!(opening >= 3, "{back:?}");
        assert_eq!(
            back[opening..],
            [Some(FrameKind::Ready), Some(FrameKind::Decided)],
            "{back:?}"
        );
    }

    /// A record flipped past the sealed hello, in its body or its header, fails the migration
    /// with a TLS error at the receiver, never a checksum error.
    #[test]
    fn a_flipped_record_is_a_tls_error() {
        for (offset, header) in [(5, false), (0, true), (u64::MAX, false)] {
            let Through {
                sent,
                received,
                struck,
                ..
            } = through_proxy(
                Strike::FlipRecord {
                    at: 0,
                    offset,
                    header,
                },
                false,
            );
            assert!(struck);
            assert!(sent.is_err());
            let err = received.unwrap_err();
            assert!(err.is_tls() && !err.is_checksum(), "{}", err.chain());
        }
    }
}

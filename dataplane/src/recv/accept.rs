//! Accepting a migration's channels, and telling them from strangers.
//!
//! A receiver listens on a port that anything may connect to: a port scanner, a load balancer's
//! health check, a browser, a sender of some other migration. Such a *stray* must not cost the
//! real sender its migration, so [`screen`] accepts connections until one greets with a
//! well-formed hello, and drops every stray on the way: it is refused (with a [`HelloReply`]
//! giving the reason, where the peer could read one), logged in one line naming the peer
//! (`ip:port`, or "a unix socket peer") and the reason, and counted. The receiver then goes on
//! waiting, within bounds: more than [`max_refused`] strays fail the migration with
//! [`Error::TooManyRefused`], and strays never extend the waits (the first channel must arrive
//! within [`accept_timeout`], each further one within [`timeout`] of the one before, however
//! many strays come in between). A hello must arrive whole within [`hello_timeout`], so a
//! stranger that connects and says nothing holds the real sender up for that long only.
//!
//! What is a stray (dropped, logged, counted; the receiver waits on) and what fails the
//! migration:
//!
//! | The connection                                                    | Outcome                     |
//! |-------------------------------------------------------------------|-----------------------------|
//! | closes before or during its hello (a truncated hello)             | stray, closed               |
//! | sends no complete hello within `hello_timeout`                    | stray, closed               |
//! | fails (a reset) before its hello is complete                      | stray, closed               |
//! | does not start with ramjet's magic (garbage, HTTP, ...)           | stray, refused with reason  |
//! | opens a TLS handshake at a receiver without TLS                   | stray, refused with reason  |
//! | sends a hello whose checksum fails (corrupt)                      | stray, refused with reason  |
//! | sends a hello for another session while this one's channels are awaited | stray, refused with reason |
//! | sends a hello of another protocol version                         | **fails**, refused with reason |
//! | sends a well-formed hello (its checksum holds) with invalid fields (page size, counts, regions) | **fails**, refused with reason |
//! | sends a hello for another memory layout                           | **fails**, refused with reason |
//! | sends a hello of this session with another channel count          | **fails**, refused with reason |
//! | sends a hello of this session for a channel already connected     | **fails**, refused with reason |
//! | sends a hello of this session whose postcopy flag differs from the first's | **fails**, refused with reason |
//! | may switch to postcopy, at a receiver without [`ReceiveOptions::postcopy`] | **fails**, refused with reason |
//! | reconnects a paused postcopy (flag resume), at a receiver that has none | **fails**, refused with reason |
//! | offers its memory by descriptor (flag share) over TCP or TLS, with a broken descriptors message or count, or with a descriptor that is not memory of its region's exact length (a socket, a pipe, a directory, a device; another size; read-only; sealed against writes) | **fails**, refused with reason; the receiver's memory stays its own |
//! | offers its memory at a receiver that cannot take it (its same-host setting is off, or its memory is the embedder's mapping) | accepted, *copying* with the reason (refused with it under same-host on) |
//! | does not offer its memory, at a receiver whose same-host setting is on | **fails**, refused with reason |
//! | is stray number `max_refused + 1`                                 | **fails** ([`Error::TooManyRefused`]) |
//!
//! At a TLS receiver ([`ReceiveOptions::tls`]) every connection first completes a TLS handshake,
//! and nothing a peer sends before that (and before its certificate is on the allow-list, if
//! there is one) can fail the migration:
//!
//! | The connection, at a TLS receiver                                 | Outcome                     |
//! |-------------------------------------------------------------------|-----------------------------|
//! | sends a plaintext ramjet hello (a sender without TLS)             | stray, refused with reason  |
//! | sends anything else that is not TLS                               | stray, closed               |
//! | closes, stalls or fails during the TLS handshake                  | stray, closed               |
//! | presents no certificate, or one the CA did not sign, or one that has expired, is not valid yet or was revoked | stray, closed (rustls sends the TLS alert) |
//! | refuses this receiver's certificate (a TLS alert)                 | stray, closed               |
//! | authenticates, but its subject is not on the allow-list (`tls-authz`) | stray, refused with reason (over TLS) |
//! | authenticates (and is allowed): then as above, hello by hello     | as in the first table       |
//!
//! The line between them: a peer that gets ramjet's magic and checksum right is a ramjet
//! sender, and one that is wrong about the version, the layout or its own session is the real
//! sender, broken; failing says so at once instead of waiting for a sender that will not come.
//! A hello of another session is the exception: a second sender aimed at the same port is not
//! ours, and the sender that is keeps its channels. Once every channel is connected, the
//! [door](super::door) refuses every newcomer while the session runs.
//!
//! [`HelloReply`]: crate::wire::HelloReply
//! [`max_refused`]: ReceiveOptions::max_refused
//! [`accept_timeout`]: ReceiveOptions::accept_timeout
//! [`timeout`]: ReceiveOptions::timeout
//! [`hello_timeout`]: ReceiveOptions::hello_timeout

use std::io;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::memory::{ReceiveLease, RegionLayout};
use crate::session::{self, HelloError, MemoryTransfer, SameHost, Stop};
use crate::tls::{self, HandshakeError, TlsServer};
use crate::transport::{Conn, Listener, Stream};
use crate::wire::{DecodeError, Hello, MAGIC, Verdict};

use super::options::{Log, ReceiveOptions};

/// A connection that greeted with a well-formed hello.
#[derive(Debug)]
pub(super) struct Screened {
    /// The connection (TLS, at a TLS receiver), with the session's read and write timeouts set.
    pub(super) stream: Conn,
    /// Its hello, not yet answered.
    pub(super) hello: Hello,
    /// Who it is, for log lines.
    pub(super) peer: String,
}

/// How long [`screen`] may wait for a sender, and what its timeout error says.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wait {
    /// When to give up (`None`: never).
    pub(super) deadline: Option<Instant>,
    /// The timeout the deadline stands for, for the error.
    pub(super) limit: Duration,
    /// What was being waited for, for the error.
    pub(super) op: &'static str,
    /// The channel expected next, for the errors.
    pub(super) channel: u16,
}

impl Wait {
    fn timed_out(&self) -> Error {
        Error::Timeout {
            channel: self.channel,
            op: self.op,
            timeout: self.limit,
        }
    }
}

/// Whether a stray gets a refusal before it is closed: only a peer that sent bytes of its own
/// may be reading, and a stalled or vanished one is not worth the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reply {
    /// A hello reply with the reason.
    Refusal,
    /// Just close.
    Close,
}

/// The strays a receiver has dropped, and its bound on them.
#[derive(Debug)]
pub(super) struct Strays<'a> {
    count: usize,
    limit: usize,
    hello_limit: Duration,
    log: &'a Log,
}

impl<'a> Strays<'a> {
    pub(super) fn new(options: &'a ReceiveOptions) -> Self {
        Strays {
            count: 0,
            limit: options.max_refused,
            hello_limit: options.hello_limit(),
            log: &options.log,
        }
    }

    /// Drops the stray `stream` from `peer` for `reason` (refusing it first if `reply` says
    /// so), logs one line and counts it; fails once more than the limit were dropped.
    pub(super) fn drop_stray(
        &mut self,
        mut stream: Conn,
        peer: &str,
        reason: &str,
        reply: Reply,
    ) -> Result<(), Error> {
        if reply == Reply::Refusal {
            // Best effort, and bounded: the refusal is small, but the peer need not read.
            let _ = stream.set_write_timeout(Some(self.hello_limit));
            session::refuse(&mut stream, reason);
            stream.shutdown_write();
        }
        drop(stream);
        self.count(peer, reason)
    }

    fn count(&mut self, peer: &str, reason: &str) -> Result<(), Error> {
        self.count += 1;
        self.log.line(&format!(
            "refused a connection from {peer}: {reason} (stray {} of at most {} tolerated)",
            self.count, self.limit
        ));
        if self.count > self.limit {
            return Err(Error::TooManyRefused {
                count: self.count,
                limit: self.limit,
                last: format!("from {peer}: {reason}"),
            });
        }
        Ok(())
    }
}

/// Accepts connections on `listener` until one greets with a well-formed hello of this
/// protocol version, and returns it unanswered; strays on the way are dropped, logged and
/// counted in `strays` (see the module docs for which are which). Fails when `wait` runs out,
/// when `stopped` says to stop ([`Error::Cancelled`]), when a peer speaks another version or
/// sends an invalid hello that its checksum vouches for (refused with the reason), or when
/// there are too many strays.
pub(super) fn screen(
    listener: &Listener,
    wait: Wait,
    options: &ReceiveOptions,
    stopped: &dyn Fn() -> bool,
    strays: &mut Strays<'_>,
) -> Result<Screened, Error> {
    loop {
        let left = match wait.deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(wait.timed_out());
                }
                Some(left)
            }
        };
        let stream = match listener.accept(left, stopped) {
            Ok(stream) => stream,
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => return Err(Error::Cancelled),
                io::ErrorKind::TimedOut => return Err(wait.timed_out()),
                // Gone before it was accepted: the kernel knows no more about it.
                io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset => {
                    strays.count("a peer", "it reset the connection before it was accepted")?;
                    continue;
                }
                _ => {
                    return Err(Error::Listen {
                        endpoint: listener.endpoint().to_string(),
                        source: e,
                    });
                }
            },
        };
        let peer = stream.peer();
        let accepted = Instant::now();
        let mut deadline = accepted + options.hello_limit();
        if let Some(overall) = wait.deadline {
            deadline = deadline.min(overall);
        }
        let limit = deadline - accepted;
        let mut stream = match open(stream, options.tls.as_ref(), deadline, limit, stopped) {
            Opened::Ready(conn) => conn,
            Opened::Stopped => return Err(Error::Cancelled),
            Opened::Stray {
                conn,
                reason,
                reply,
            } => {
                strays.drop_stray(conn, &peer, &reason, reply)?;
                continue;
            }
        };
        let unauthenticated = stream.tls().is_none();
        let (reason, reply) = match session::read_hello(&mut stream, deadline, stopped) {
            Ok(hello) => {
                stream
                    .set_read_timeout(Some(options.timeout))
                    .and_then(|()| stream.set_write_timeout(Some(options.timeout)))
                    .map_err(|e| {
                        Error::io(wait.channel, "setting socket timeouts", options.timeout, e)
                    })?;
                return Ok(Screened {
                    stream,
                    hello,
                    peer,
                });
            }
            Err(HelloError::Stopped) => return Err(Error::Cancelled),
            Err(HelloError::Invalid(DecodeError::BadMagic { found }))
                if unauthenticated && found[..2] == [0x16, 0x03] =>
            {
                (TLS_AT_PLAINTEXT.to_owned(), Reply::Refusal)
            }
            Err(HelloError::Invalid(source)) if !is_stray(&source) => {
                let _ = stream.set_write_timeout(Some(options.hello_limit()));
                session::refuse(&mut stream, &source.to_string());
                stream.shutdown_write();
                return Err(Error::Decode {
                    channel: wait.channel,
                    source,
                });
            }
            Err(HelloError::Invalid(source)) => (source.to_string(), Reply::Refusal),
            Err(other) => (why_no_hello(&other, limit), Reply::Close),
        };
        strays.drop_stray(stream, &peer, &reason, reply)?;
    }
}

/// Why a peer that opens a TLS handshake at a receiver without TLS is refused (it reads this
/// in plaintext, and its error says so).
const TLS_AT_PLAINTEXT: &str =
    "it opened a TLS handshake, and this receiver does not use TLS: TLS is on at the sender only";
/// Why a plaintext ramjet sender is refused at a TLS receiver.
const PLAINTEXT_AT_TLS: &str =
    "it connected without TLS, and this receiver requires TLS: TLS is on at the receiver only";

/// A connection just accepted, after its first step.
pub(super) enum Opened {
    /// Ready for its hello: plaintext at a receiver without TLS, or TLS with the peer
    /// authenticated and allowed.
    Ready(Conn),
    /// A stray: why, and whether to refuse it (over TLS, if it authenticated) before closing.
    Stray {
        conn: Conn,
        reason: String,
        reply: Reply,
    },
    /// The caller's stop said to give up.
    Stopped,
}

/// Opens a connection just accepted. Without `tls`, there is nothing to do. With it, the
/// peer's first byte tells a TLS handshake from a plaintext ramjet sender (whose hello is read
/// whole, so that it can be told why it is refused) and from anything else; the handshake must
/// complete by `deadline` (`limit` after the accept, for messages) and the peer's certificate
/// must be on the allow-list, if there is one.
pub(super) fn open(
    stream: Stream,
    tls: Option<&TlsServer>,
    deadline: Instant,
    limit: Duration,
    stopped: &dyn Fn() -> bool,
) -> Opened {
    let Some(tls) = tls else {
        return Opened::Ready(Conn::plain(stream));
    };
    let stray = |conn, reason, reply| Opened::Stray {
        conn,
        reason,
        reply,
    };
    match first_byte(&stream, deadline, stopped) {
        Err(HelloError::Stopped) => Opened::Stopped,
        Err(e) => stray(Conn::plain(stream), why_no_hello(&e, limit), Reply::Close),
        Ok(first) if first == MAGIC[0] => {
            let mut conn = Conn::plain(stream);
            match session::read_hello(&mut conn, deadline, stopped) {
                Ok(_) => stray(conn, PLAINTEXT_AT_TLS.to_owned(), Reply::Refusal),
                Err(HelloError::Stopped) => Opened::Stopped,
                Err(HelloError::Invalid(e)) => stray(
                    conn,
                    format!("{e}; and this receiver requires TLS"),
                    Reply::Close,
                ),
                Err(other) => stray(conn, why_no_hello(&other, limit), Reply::Close),
            }
        }
        // A TLS record of type handshake: a ClientHello, presumably.
        Ok(0x16) => {
            let mut stream = stream;
            match tls::accept(&mut stream, tls, deadline, stopped) {
                Ok((session, None)) => Opened::Ready(Conn::secured(stream, session)),
                Ok((session, Some(refused))) => stray(
                    Conn::secured(stream, session),
                    format!(
                        "its certificate's subject {} is not on the allow-list (tls-authz)",
                        refused.subject
                    ),
                    Reply::Refusal,
                ),
                Err(HandshakeError::Stopped) => Opened::Stopped,
                Err(e) => stray(
                    Conn::plain(stream),
                    e.reason("the peer", limit),
                    Reply::Close,
                ),
            }
        }
        Ok(first) => stray(
            Conn::plain(stream),
            format!(
                "it does not speak TLS (its first byte is {first:#04x}), and this receiver \
                 requires TLS"
            ),
            Reply::Close,
        ),
    }
}

/// The first byte a new connection sent, left unread; see [`session::read_hello`] for the
/// errors.
fn first_byte(
    stream: &Stream,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<u8, HelloError> {
    let mut byte = [0u8; 1];
    crate::transport::read_stepped(deadline, stopped, |step| {
        stream.set_read_timeout(Some(step))?;
        stream.peek(&mut byte)
    })
    .map_err(|stop| HelloError::from_stop(stop, 0))?;
    Ok(byte[0])
}

/// Whether a hello that does not decode comes from a stranger rather than a broken sender: it
/// is not ramjet at all, or corrupted (its checksum fails, so no field of it can be trusted).
fn is_stray(source: &DecodeError) -> bool {
    matches!(source, DecodeError::BadMagic { .. }) || source.is_checksum()
}

/// Why a connection sent no hello that could be decoded, for a log line.
pub(super) fn why_no_hello(err: &HelloError, limit: Duration) -> String {
    // Whole milliseconds: a deadline that the overall wait cut short is no round number.
    let limit = Duration::from_millis(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
    match err {
        HelloError::Closed { bytes: 0 } => "it closed the connection without a word".into(),
        HelloError::Closed { bytes } => {
            format!("it closed the connection after {bytes} bytes of a hello (truncated)")
        }
        HelloError::Stalled { bytes: 0 } => format!("it sent nothing within {limit:?}"),
        HelloError::Stalled { bytes } => {
            format!("it sent only {bytes} bytes of a hello within {limit:?}")
        }
        HelloError::Stopped => "the receiver stopped waiting for its hello".into(),
        HelloError::Io(e) => format!("its connection failed: {e}"),
        HelloError::Invalid(e) => e.to_string(),
    }
}

/// Accepts every channel of one migration and answers its hello; see the module docs for what
/// is dropped as a stray and what fails.
pub(super) fn accept_channels(
    listener: &Listener,
    lease: &ReceiveLease,
    options: &ReceiveOptions,
    stop: &Stop,
) -> Result<Accepted, Error> {
    let memory = lease.memory();
    let mut transfer = MemoryTransfer::Copied("the sender did not offer it".into());
    let mut strays = Strays::new(options);
    let mut slots: Vec<Option<Conn>> = Vec::new();
    let mut migration = None;
    let mut accepted = 0usize;
    let mut wait = Wait {
        deadline: options.accept_timeout.map(|t| Instant::now() + t),
        limit: options.accept_timeout.unwrap_or_default(),
        op: "waiting for the sender to connect",
        channel: 0,
    };
    loop {
        let Screened {
            mut stream,
            hello,
            peer,
        } = screen(listener, wait, options, &|| stop.is_stopped(), &mut strays)?;
        let channel = hello.channel;
        let problem = match migration {
            _ if hello.regions != memory.layout() => {
                Some(layout_mismatch(&hello.regions, &memory.layout()))
            }
            _ if hello.flags.resume => Some(
                "it reconnects a paused postcopy migration, and this receiver has none (it \
                 lost that migration's memory, or never had it)"
                    .to_owned(),
            ),
            _ if hello.flags.postcopy && options.postcopy.is_none() => Some(
                "the sender may switch to postcopy, and this receiver does not do postcopy \
                 (it has no way to start the guest early)"
                    .to_owned(),
            ),
            Some((id, _, _)) if hello.session != id => {
                // Another sender's channel: not ours, and no reason to fail ours.
                let reason = format!(
                    "channel {channel} belongs to another migration (its session id differs)"
                );
                strays.drop_stray(stream, &peer, &reason, Reply::Refusal)?;
                continue;
            }
            Some((_, count, _)) if hello.channels != count => Some(format!(
                "channel {channel} says the migration has {} channels, the first said {count}",
                hello.channels
            )),
            Some((_, _, postcopy)) if hello.flags.postcopy != postcopy => Some(format!(
                "channel {channel} says postcopy is {}, the first said {}",
                on_off(hello.flags.postcopy),
                on_off(postcopy)
            )),
            Some(_) if slots.get(usize::from(channel)).is_none_or(Option::is_some) => {
                Some(format!("channel {channel} is already connected"))
            }
            _ if channel == 0 && !hello.flags.share && options.same_host == SameHost::On => Some(
                "this receiver takes the guest's memory only by descriptor (same-host on), \
                     and the sender does not offer it (it copies: another host, TCP, TLS, \
                     private memory, or its same-host setting)"
                    .to_owned(),
            ),
            _ => None,
        };
        if let Some(problem) = problem {
            session::refuse(&mut stream, &problem);
            stream.shutdown_write();
            return Err(Error::Refused {
                channel,
                reason: problem,
            });
        }
        let verdict = if hello.flags.share {
            match take_memory(&stream, lease, options) {
                Ok(verdict) => verdict,
                Err(problem) => {
                    session::refuse(&mut stream, &problem);
                    stream.shutdown_write();
                    return Err(Error::Refused {
                        channel,
                        reason: problem,
                    });
                }
            }
        } else {
            Verdict::Accept
        };
        match &verdict {
            Verdict::Shared => transfer = MemoryTransfer::Shared,
            Verdict::Copying(why) => transfer = MemoryTransfer::Copied(why.clone()),
            _ => {}
        }
        stop.register(&stream)
            .map_err(|e| Error::io(channel, "duplicating the socket", options.timeout, e))?;
        session::accept_hello(&mut stream, verdict, channel, options.timeout)?;
        if migration.is_none() {
            migration = Some((hello.session, hello.channels, hello.flags.postcopy));
            // The fault channel comes last, its index the data channel count.
            let fault = usize::from(hello.flags.postcopy);
            slots.resize_with(usize::from(hello.channels) + fault, || None);
        }
        if let Some(slot) = slots.get_mut(usize::from(channel)) {
            *slot = Some(stream);
        }
        accepted += 1;
        if accepted == slots.len() {
            let mut streams: Vec<Conn> = slots.into_iter().flatten().collect();
            let fault = hello.flags.postcopy.then(|| streams.pop()).flatten();
            return Ok(Accepted {
                streams,
                fault,
                session: hello.session,
                memory: transfer,
            });
        }
        wait = Wait {
            deadline: Some(Instant::now() + options.timeout),
            limit: options.timeout,
            op: "waiting for the other channels to connect",
            channel: u16::try_from(accepted).unwrap_or(u16::MAX),
        };
    }
}

/// Every channel of one migration, greeted.
pub(super) struct Accepted {
    /// The data channels, in index order.
    pub(super) streams: Vec<Conn>,
    /// The fault channel, of a migration that may switch to postcopy.
    pub(super) fault: Option<Conn>,
    /// The migration's session id.
    pub(super) session: [u8; 16],
    /// Whether the sender's memory was taken by descriptor, or why not.
    pub(super) memory: MemoryTransfer,
}

/// Takes the memory a same-host sender offered with its channel 0 hello: reads the
/// descriptors (they follow the hello whatever this receiver decides) and maps them in place
/// of this memory's own (`Shared`), or declines with the reason (`Copying`). A descriptor
/// message that is broken, or a descriptor that is not memory of its region's exact size, is
/// a refusal: the returned error says why.
fn take_memory(
    stream: &Conn,
    lease: &ReceiveLease,
    options: &ReceiveOptions,
) -> Result<Verdict, String> {
    let regions = lease.memory().regions().len();
    let fds = session::read_memory(stream, regions)?;
    let decline = match options.same_host {
        SameHost::Off => Some("this receiver's same-host setting is off".to_owned()),
        _ => lease.adoptable().err(),
    };
    if let Some(why) = decline {
        if options.same_host == SameHost::On {
            return Err(why);
        }
        return Ok(Verdict::Copying(why));
    }
    lease.adopt(fds).map_err(|e| e.to_string())?;
    Ok(Verdict::Shared)
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
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

/// What a paused postcopy receiver accepted.
pub(super) enum Recovered {
    /// Every channel of the same session, reconnected (flag resume), greeted.
    Channels {
        /// The data channels, in index order.
        streams: Vec<Conn>,
        /// The fault channel.
        fault: Conn,
    },
    /// A connection of the same session that delivers the source's decision (a source that
    /// did not commit says abort this way).
    Decision(session::Taken),
}

/// What [`accept_recovery`] is waiting for.
pub(super) struct Paused<'a> {
    pub(super) listener: &'a Listener,
    pub(super) layout: Vec<RegionLayout>,
    pub(super) session: [u8; 16],
    /// Data channels.
    pub(super) channels: u16,
    pub(super) options: &'a ReceiveOptions,
}

/// Accepts the reconnection of a paused postcopy: every channel of its session with flag
/// resume (each registered with `stop`), or a connection delivering the source's decision.
/// Strangers, peers of another session or layout, and a reconnection that stops half-way
/// (its next channel does not come within the timeout) are dropped with a log line, and the
/// wait goes on until `deadline` (`None`: for ever).
pub(super) fn accept_recovery(
    paused: &Paused<'_>,
    stop: &Stop,
    deadline: Option<Instant>,
) -> Result<Recovered, Error> {
    let options = paused.options;
    let slots = usize::from(paused.channels) + 1;
    let mut taken: Vec<Option<Conn>> = Vec::new();
    // The newest reconnection attempt seen: its channels are collected, older ones' dropped
    // (their sender gave up on them).
    let mut newest: Option<u8> = None;
    loop {
        let next = if taken.is_empty() {
            deadline
        } else {
            Some(Instant::now() + options.timeout)
        };
        let wait = Wait {
            deadline: match (next, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            limit: options.timeout,
            op: "waiting for the paused postcopy's sender to reconnect",
            channel: 0,
        };
        // Counted per connection, so that no number of strays fails a paused postcopy.
        let mut strays = Strays::new(options);
        let screened = match screen(paused.listener, wait, options, &|| false, &mut strays) {
            Ok(screened) => screened,
            Err(Error::Timeout { .. }) if !taken.is_empty() => {
                options
                    .log
                    .line("postcopy paused: a reconnection stopped half-way; waiting for another");
                taken.clear();
                newest = None;
                continue;
            }
            Err(err @ Error::Timeout { .. }) => return Err(err),
            Err(err) => {
                options.log.line(&format!(
                    "postcopy paused: dropped a connection: {}",
                    err.chain()
                ));
                continue;
            }
        };
        let Screened {
            mut stream,
            hello,
            peer,
        } = screened;
        let problem = if hello.session != paused.session {
            Some("it belongs to another migration than the paused postcopy")
        } else if hello.regions != paused.layout {
            Some("its memory layout differs")
        } else if hello.flags.resume && hello.channels != paused.channels {
            Some("it reconnects with another channel count")
        } else {
            None
        };
        if let Some(problem) = problem {
            let _ = strays.drop_stray(stream, &peer, problem, Reply::Refusal);
            continue;
        }
        if !hello.flags.resume {
            let timeout = options.timeout;
            match session::take(&mut stream, timeout) {
                Ok(taken) => return Ok(Recovered::Decision(taken)),
                Err(err) => {
                    options.log.line(&format!(
                        "postcopy paused: dropped a connection from {peer}: {}",
                        err.chain()
                    ));
                    continue;
                }
            }
        }
        let attempt = hello.flags.attempt;
        match newest {
            Some(n) if n == attempt => {}
            Some(n) if !hello.flags.is_newer_attempt(n) => {
                let reason = "it belongs to an earlier attempt to reconnect";
                let _ = strays.drop_stray(stream, &peer, reason, Reply::Refusal);
                continue;
            }
            _ => {
                // A newer attempt: the sender gave up on the channels collected so far.
                newest = Some(attempt);
                taken.clear();
            }
        }
        let channel = usize::from(hello.channel);
        if taken.is_empty() {
            taken.resize_with(slots, || None);
        }
        if taken.get(channel).is_none_or(Option::is_some) {
            let reason = "it reconnects a channel that is already reconnected";
            let _ = strays.drop_stray(stream, &peer, reason, Reply::Refusal);
            continue;
        }
        stop.register(&stream)
            .map_err(|e| Error::io(hello.channel, "duplicating the socket", options.timeout, e))?;
        let timeout = options.timeout;
        if let Err(err) =
            session::accept_hello(&mut stream, Verdict::Accept, hello.channel, timeout)
        {
            options.log.line(&format!(
                "postcopy paused: a reconnecting channel failed: {}",
                err.chain()
            ));
            taken.clear();
            continue;
        }
        if let Some(slot) = taken.get_mut(channel) {
            *slot = Some(stream);
        }
        if taken.iter().all(Option::is_some) {
            let mut streams: Vec<Conn> = taken.drain(..).flatten().collect();
            if let Some(fault) = streams.pop() {
                return Ok(Recovered::Channels { streams, fault });
            }
        }
    }
}

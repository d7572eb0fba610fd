//! What one stress run is, drawn from the seed and the run's number alone, so that
//! `--seed S --first R --runs 1` replays run R exactly (with `--tls` too, if the pass had it).
//!
//! **Under `--tls`** every channel's bytes are TLS 1.3 records: the proxy sees record headers
//! and sealed lengths, never a frame. So each fault means what an on-path attacker could do:
//! byte offsets (drop, stall, short, slow) count ciphertext, the handshake included; a flip
//! strikes a record past the sealed hello ([`Strike::FlipRecord`]), which must end the run with
//! a TLS error; handover and late faults find their message by its place on channel 0 and its
//! sealed length (see `proxy.rs`); a stray may also be a TLS peer whose certificate the receiver
//! must refuse ([`Stray::Untrusted`], [`Stray::Unlisted`]), and a plaintext ramjet hello
//! ([`Stray::Layout`]) is only a stray there. The version fault rewrites plaintext hello bytes
//! and has no ciphertext equivalent (a rewritten record is a flip): it is left out.

use std::time::Duration;

use ramjet_dataplane::Compression;
use ramjet_dataplane::internals::wire::{FrameKind, Hello, PageEntry};
use ramjet_dataplane::memory::PAGE_SIZE;
use ramjet_dataplane::testkit::image::{ImageKind, Rng};

/// A socket kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Net {
    /// Loopback TCP.
    Tcp,
    /// A Unix socket.
    Unix,
}

/// Whether the guest runs during the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    /// A stopped guest: one round of every page, sent straight from guest memory.
    Paused,
    /// A vCPU thread keeps writing: live pre-copy rounds with userfaultfd (or caller-fed)
    /// tracking, then the switchover.
    Live,
    /// As live, but after round 1 the migration switches to postcopy: the destination runs
    /// its guest at once (a thread reading its memory, faulting on the pages still to come)
    /// while the source pushes the rest. A broken link pauses it, and the run recovers it as
    /// an operator would (a few times at most); faults strike pre-copy as in live runs, and
    /// the handover's.
    Postcopy,
}

/// A kind of fault, as `--faults` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Fault {
    /// Nothing: the run must complete.
    None,
    /// One channel's connection is cut at a random byte, on the sender's or the receiver's end
    /// (with --tls: a byte of ciphertext, the TLS handshake included).
    Drop,
    /// One byte of one channel is flipped, in the hello, a frame header or a payload (with
    /// --tls: in a record past the sealed hello, its body or its header's type, and the run
    /// must fail with a TLS error, never a checksum one).
    Flip,
    /// One channel stops forwarding, for longer than the timeout (with --tls: at a byte of
    /// ciphertext, the handshake included).
    Stall,
    /// Every channel is throttled to a few MB/s: slow, but moving, so the run must complete.
    Slow,
    /// Every channel is read and written in pieces of a few bytes: the run must complete.
    Short,
    /// The receiver's memory differs from the sender's, so it refuses the hello.
    Refuse,
    /// One channel speaks another protocol version (in the hello, or in the receiver's reply).
    /// Not with --tls: it rewrites plaintext bytes that TLS encrypts.
    Version,
    /// The sender is cancelled: before it connects, at a random moment, or at the switchover.
    Cancel,
    /// A handover message on channel 0 is lost: the return path cut (or silent) just before
    /// *ready* or *decided*, the forward path just before *go*; later connections (the
    /// sender's decision on a new connection) are let through or refused (with --tls: the
    /// message's record, known by its place on channel 0 and its sealed length).
    Handover,
    /// A handover message on channel 0 is held past the timeout, then forwarded late (with
    /// --tls: its record, as for handover).
    Late,
    /// A stray peer connects to the receiver before, during or after the real sender: it
    /// closes at once, sends garbage, an HTTP GET, or a ramjet hello for another memory layout
    /// (that one, before the sender, fails the migration; with --tls it is a plaintext peer,
    /// dropped, and two more come: a TLS sender whose certificate another CA signed, and one
    /// whose subject is not on the receiver's allow-list; every stray is dropped and the run
    /// must complete).
    Stray,
}

/// A handover message on channel 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// The receiver's *ready*.
    Ready,
    /// The sender's decision, *go*.
    Go,
    /// The receiver's *decided*.
    Decided,
}

impl Message {
    /// The frame that carries it.
    pub fn kind(self) -> FrameKind {
        match self {
            Message::Ready => FrameKind::Ready,
            Message::Go => FrameKind::Decision,
            Message::Decided => FrameKind::Decided,
        }
    }

    /// Whether it travels from the sender to the receiver.
    pub fn forward(self) -> bool {
        self == Message::Go
    }
}

/// How a handover message is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lose {
    /// Channel 0 is closed, both ways, just before it.
    Cut,
    /// It and everything after it in its direction are swallowed; the connection stays open.
    Silence,
}

/// What a stray peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stray {
    /// Connects and closes at once.
    Close,
    /// Sends random bytes (not ramjet's magic), reads what comes back, closes.
    Garbage,
    /// Sends an HTTP GET, reads what comes back, closes.
    Http,
    /// Sends a well-formed ramjet hello of another session for a memory layout one page larger
    /// (in plaintext: under `--tls`, a sender without TLS).
    Layout,
    /// Under `--tls`: a ramjet sender with TLS whose client certificate another CA signed.
    Untrusted,
    /// Under `--tls`: a ramjet sender with TLS whose client certificate the receiver's CA
    /// signed, for a subject that is not on the receiver's allow-list (`tls-authz`).
    Unlisted,
}

/// The strays of a run without TLS.
const STRAYS: [Stray; 4] = [Stray::Close, Stray::Garbage, Stray::Http, Stray::Layout];
/// The strays of a run with TLS: those, and two TLS peers the receiver must refuse.
const STRAYS_TLS: [Stray; 6] = [
    Stray::Close,
    Stray::Garbage,
    Stray::Http,
    Stray::Layout,
    Stray::Untrusted,
    Stray::Unlisted,
];

/// When a stray peer comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrayWhen {
    /// Before the sender connects (it is done before the sender starts).
    Before,
    /// As the first pages frame passes on channel 0: every channel is connected.
    During,
    /// As the receiver's *ready* passes: the sender's stream is all there, the handover runs.
    After,
}

/// The end of a connection that a drop cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The sender's socket is closed; the receiver's is left open, silent.
    Sender,
    /// The receiver's socket is closed; the sender's is left open and swallows what comes.
    Receiver,
}

/// A part of the sender's byte stream on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The hello.
    Hello,
    /// A frame header.
    Header,
    /// A frame's payload.
    Payload,
}

/// When a cancel comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Before the sender connects.
    BeforeConnect,
    /// This long after the sender starts connecting.
    After(Duration),
    /// As the guest is paused for the switchover.
    Switchover,
}

/// The fault of a run, with where and how it strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strike {
    /// No fault.
    None,
    /// Cut the channel after `at` of the sender's bytes.
    Drop {
        /// The end that is closed.
        end: End,
        /// Bytes forwarded before the cut.
        at: u64,
    },
    /// Flip byte `offset` (modulo the part's length) of the `nth` part of its kind.
    Flip {
        /// Hello, header or payload.
        part: Part,
        /// Which one of them (payloads count only frames that have one).
        nth: u64,
        /// The byte in it.
        offset: u64,
    },
    /// Under `--tls`: flip a byte of the first record on the channel, past the sealed hello,
    /// that ends after `at` bytes of what follows the hello and is either the first record
    /// there or a full one (16 KiB of content). A full record is always stream data (*go*, the
    /// only record the sender seals after its end of stream, is small), so the flip always
    /// strikes before the receiver can say *ready*. The sealed hello itself is not flipped: a
    /// connection whose hello fails to open is dropped as a stray, and the run would fail by
    /// timeout instead of with a TLS error.
    FlipRecord {
        /// Bytes past the sealed hello before which the record must not end.
        at: u64,
        /// The byte of its body (modulo the body's length), unless `header`.
        offset: u64,
        /// Flip the record header's content type instead (of the first record after the
        /// hello): the receiver must refuse the header.
        header: bool,
    },
    /// Stop forwarding after `at` bytes.
    Stall {
        /// Bytes forwarded before the stall.
        at: u64,
    },
    /// Forward every channel at this rate.
    Slow {
        /// Bytes per second per channel.
        bytes_per_sec: u64,
    },
    /// Read and write every channel in pieces of at most `max_piece` bytes (its first
    /// [`short_span`] bytes; then as the bytes come).
    Short {
        /// The largest piece.
        max_piece: u64,
    },
    /// Give the destination one page more than the source.
    Refuse,
    /// Rewrite the protocol version to one this build does not speak.
    Version {
        /// In the receiver's reply instead of the sender's hello.
        reply: bool,
    },
    /// Cancel the sender.
    Cancel(When),
    /// Lose a handover message on channel 0.
    Handover {
        /// Which one.
        message: Message,
        /// How.
        how: Lose,
        /// Whether connections after the first `channels` are let through (else closed at
        /// once once the fault struck).
        reconnect: bool,
    },
    /// Hold a handover message on channel 0 this long, then forward it (and what follows).
    Late {
        /// Which one.
        message: Message,
        /// How long it is held: past the sessions' timeout.
        by: Duration,
    },
    /// A stray peer connects to the receiver.
    Stray {
        /// What it does.
        kind: Stray,
        /// When.
        when: StrayWhen,
    },
}

/// How many bytes of each channel go in pieces of at most `max_piece`: 256 KiB, or 64 KiB in
/// single bytes. (A relay moving single bytes manages well under 1 MB/s on a loaded machine,
/// and a Unix socket frees its sender's buffer a whole packet at a time, up to about 100 KiB:
/// much more of that, and the sender sees no progress for longer than the stress timeout,
/// which by ramjet's definition is a stopped link.)
pub fn short_span(max_piece: u64) -> u64 {
    (max_piece << 16).min(256 << 10)
}

/// How long a late message is held: the sessions' timeout and `permille` thousandths of half
/// of it more.
fn late_by(permille: u64) -> Duration {
    let timeout = super::run::TIMEOUT;
    timeout + timeout / 2 * u32::try_from(permille).unwrap_or(0) / 1000 + Duration::from_millis(100)
}

/// What one run is.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Its number.
    pub run: u64,
    /// The socket kind.
    pub net: Net,
    /// Paused or live guest.
    pub mode: Mode,
    /// Channels, 1 to 4.
    pub channels: u16,
    /// Compression.
    pub compression: Compression,
    /// What the guest's pages hold.
    pub image: ImageKind,
    /// Guest pages.
    pub pages: u64,
    /// Pages per second the live guest writes.
    pub dirty_rate: u64,
    /// The fault kind.
    pub fault: Fault,
    /// Where and how it strikes.
    pub strike: Strike,
    /// The channel it strikes (drop, flip, stall, version).
    pub channel: u16,
    /// Every channel is TLS 1.3 (`--tls`).
    pub tls: bool,
}

impl Plan {
    /// Run `run` of `seed`, choosing among the given sockets, modes and faults, with TLS on
    /// every channel if `tls` (which changes what a flip and a stray are; see the module
    /// docs). Without `tls`, a run is drawn as it always was.
    pub fn new(
        seed: u64,
        run: u64,
        nets: &[Net],
        modes: &[Mode],
        faults: &[Fault],
        tls: bool,
    ) -> Plan {
        let mut rng = Rng::new(seed ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let channels = u16::try_from(rng.below(4) + 1).unwrap_or(1);
        let mut plan = Plan {
            run,
            net: *pick(&mut rng, nets),
            mode: *pick(&mut rng, modes),
            channels,
            compression: *pick(
                &mut rng,
                &[Compression::Off, Compression::Lz4, Compression::Auto],
            ),
            image: *pick(
                &mut rng,
                &[ImageKind::Random, ImageKind::Zero, ImageKind::Mixed],
            ),
            pages: 256 + rng.below(2048),
            dirty_rate: 1000 + rng.below(19_000),
            fault: *pick(&mut rng, faults),
            strike: Strike::None,
            channel: u16::try_from(rng.below(u64::from(channels))).unwrap_or(0),
            tls,
        };
        // Anywhere from the hello to three quarters of what the channel carries in the first
        // round, so that most faults strike.
        let at = rng.below(plan.channel_bytes() * 3 / 4 + 1);
        plan.strike = match plan.fault {
            Fault::None => Strike::None,
            Fault::Drop => Strike::Drop {
                end: *pick(&mut rng, &[End::Sender, End::Receiver]),
                at,
            },
            Fault::Flip if tls => {
                let header = rng.below(4) == 0;
                Strike::FlipRecord {
                    at: if header { 0 } else { at },
                    offset: rng.next_u64(),
                    header,
                }
            }
            Fault::Flip => {
                let part = *pick(&mut rng, &[Part::Hello, Part::Header, Part::Payload]);
                Strike::Flip {
                    part,
                    // Each channel has at least a pages frame, an end of round and an end of
                    // stream.
                    nth: match part {
                        Part::Hello => 0,
                        Part::Header => rng.below(3),
                        Part::Payload => rng.below(2),
                    },
                    offset: rng.next_u64(),
                }
            }
            Fault::Stall => Strike::Stall { at },
            Fault::Slow => Strike::Slow {
                bytes_per_sec: (2 + rng.below(7)) << 20,
            },
            Fault::Short => Strike::Short {
                max_piece: *pick(&mut rng, &[1, 7, 100, 1500, 9000]),
            },
            Fault::Refuse => Strike::Refuse,
            Fault::Version => Strike::Version {
                reply: rng.below(2) == 1,
            },
            Fault::Cancel => Strike::Cancel(match rng.below(3) {
                0 => When::BeforeConnect,
                1 => When::After(Duration::from_micros(match plan.mode {
                    Mode::Paused => rng.below(30_000),
                    Mode::Live | Mode::Postcopy => rng.below(300_000),
                })),
                _ => When::Switchover,
            }),
            Fault::Handover => Strike::Handover {
                message: *pick(&mut rng, &[Message::Ready, Message::Go, Message::Decided]),
                how: *pick(&mut rng, &[Lose::Cut, Lose::Silence]),
                reconnect: rng.below(2) == 1,
            },
            Fault::Late => Strike::Late {
                message: *pick(&mut rng, &[Message::Ready, Message::Go, Message::Decided]),
                // Past the timeout, by up to half of it.
                by: late_by(rng.below(1000)),
            },
            Fault::Stray => Strike::Stray {
                kind: *pick(&mut rng, if tls { &STRAYS_TLS } else { &STRAYS }),
                when: *pick(
                    &mut rng,
                    &[StrayWhen::Before, StrayWhen::During, StrayWhen::After],
                ),
            },
        };
        plan
    }

    /// About how many bytes one channel carries in a round of every page.
    fn channel_bytes(&self) -> u64 {
        let entry = PageEntry::LEN as u64;
        let per_page = match (self.image, self.compression) {
            (ImageKind::Zero, _) => entry,
            (ImageKind::Random, _) => PAGE_SIZE as u64 + entry,
            (ImageKind::Mixed, Compression::Off) => PAGE_SIZE as u64 / 2,
            (ImageKind::Mixed, _) => PAGE_SIZE as u64 / 3,
        };
        Hello::encoded_len(1) as u64 + self.pages * per_page / u64::from(self.channels)
    }
}

fn pick<'a, T>(rng: &mut Rng, from: &'a [T]) -> &'a T {
    let i = usize::try_from(rng.below(from.len() as u64)).unwrap_or(0);
    &from[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_the_same_whenever_it_is_drawn() {
        let all = [
            Fault::None,
            Fault::Drop,
            Fault::Flip,
            Fault::Stall,
            Fault::Slow,
            Fault::Short,
            Fault::Refuse,
            Fault::Version,
            Fault::Cancel,
            Fault::Handover,
            Fault::Late,
            Fault::Stray,
        ];
        let draw = |run| {
            Plan::new(
                9,
                run,
                &[Net::Tcp, Net::Unix],
                &[Mode::Paused, Mode::Live, Mode::Postcopy],
                &all,
                false,
            )
        };
        for run in 0..200 {
            let (a, b) = (draw(run), draw(run));
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
            assert!((1..=4).contains(&a.channels) && a.channel < a.channels);
            assert!((256..2304).contains(&a.pages));
        }
        // Every fault and mode comes up.
        let plans: Vec<Plan> = (0..200).map(draw).collect();
        for fault in all {
            assert!(plans.iter().any(|p| p.fault == fault), "{fault:?}");
        }
        for mode in [Mode::Paused, Mode::Live, Mode::Postcopy] {
            assert!(plans.iter().any(|p| p.mode == mode), "{mode:?}");
        }
    }

    /// Under TLS, a flip is a record flip and the strays include the two TLS peers; a run
    /// draws its socket, guest and fault as without TLS, so one seed covers the same ground.
    #[test]
    fn tls_runs_flip_records_and_bring_tls_strays() {
        let faults = [Fault::None, Fault::Flip, Fault::Drop, Fault::Stray];
        let draw = |run, tls| {
            Plan::new(
                5,
                run,
                &[Net::Tcp, Net::Unix],
                &[Mode::Paused, Mode::Live],
                &faults,
                tls,
            )
        };
        let mut strays = Vec::new();
        for run in 0..300 {
            let (plain, tls) = (draw(run, false), draw(run, true));
            assert!(tls.tls && !plain.tls);
            assert_eq!(
                (plain.net, plain.mode, plain.fault, plain.channels),
                (tls.net, tls.mode, tls.fault, tls.channels)
            );
            match tls.strike {
                Strike::FlipRecord { header, at, .. } => assert!(!header || at == 0),
                Strike::Flip { .. } => panic!("a plaintext flip under TLS"),
                Strike::Stray { kind, .. } => strays.push(kind),
                _ => {}
            }
            assert!(!matches!(plain.strike, Strike::FlipRecord { .. }));
        }
        for kind in STRAYS_TLS {
            assert!(strays.contains(&kind), "{kind:?}");
        }
    }
}

//! The `control` target's input: a machine configuration, then a sequence of steps, each with
//! the time that passed before it.
//!
//! # Input format
//!
//! ```text
//! byte 0   bit 0 destination (else source), bit 1 profile qemu-11 (else qemu-10),
//!          bit 2 pause-before-switchover, bit 3 postcopy-ram,
//!          bits 4..8 start time: 0 a 2026 date, 15 near the end of time, else n hours
//! rest     steps: a byte `b`, step kind `b % KINDS` with its operands, after
//!          `(b / KINDS)^3` milliseconds
//! ```
//!
//! | kind | step | operands |
//! |---|---|---|
//! | 0..=5 | trigger `Trigger::ALL[kind]` | |
//! | 6 | fact setup-done | |
//! | 7 | fact pass N, N the pass due | |
//! | 8 | fact pass N | N `b` |
//! | 9 | fact pass N | N `u64` |
//! | 10..=13 | fact switchover, device-loaded, postcopy-started, completed | |
//! | 14 | fact failed | message: length `b`, bytes (lossy UTF-8, may be empty) |
//! | 15..=18 | fact channel-lost, reconnected, resumed, drained | |
//! | 19 | set options | as bits 2 and 3 of byte 0 |
//! | 20 | set RAM stats and expected downtime | `u32` |
//! | 21 | query | |
//! | 22 | fact in-doubt | |

use std::time::Duration;

use ramjet_control::{Fact, Input, Options, Profile, Side, Timestamp, Trigger};

use crate::cursor::Cursor;

/// Number of step kinds.
pub const KINDS: u8 = 23;

/// The machine's configuration and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The side.
    pub side: Side,
    /// The profile.
    pub profile: Profile,
    /// The options.
    pub options: Options,
    /// The time of the first step.
    pub start: Timestamp,
}

fn options_from(b: u8) -> Options {
    Options::new()
        .pause_before_switchover(b & 4 != 0)
        .postcopy_ram(b & 8 != 0)
}

fn options_bits(options: Options) -> u8 {
    u8::from(options.is_pause_before_switchover()) << 2 | u8::from(options.is_postcopy_ram()) << 3
}

impl Config {
    /// Reads byte 0.
    pub fn read(b: u8) -> Config {
        let start = match b >> 4 {
            0 => Timestamp::from_unix_micros(1_767_225_600_000_000),
            15 => Timestamp::from_unix_micros(u64::MAX - 1_000_000),
            n => Timestamp::from_unix_micros(u64::from(n) * 3_600_000_000),
        };
        Config {
            side: if b & 1 != 0 {
                Side::Destination
            } else {
                Side::Source
            },
            profile: if b & 2 != 0 {
                Profile::Qemu11
            } else {
                Profile::Qemu10
            },
            options: options_from(b),
            start,
        }
    }

    /// Byte 0 for a configuration starting in 2026.
    pub fn byte(side: Side, profile: Profile, options: Options) -> u8 {
        u8::from(side == Side::Destination)
            | u8::from(profile == Profile::Qemu11) << 1
            | options_bits(options)
    }
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Feed the machine an input (`Pass` is resolved against the machine when read: see
    /// [`PassDue`](Step::PassDue)).
    Input(Input),
    /// `pass N` with N the pass due.
    PassDue,
    /// Change the options.
    SetOptions(Options),
    /// Store RAM statistics and an expected downtime built from this number.
    Stats(u32),
    /// Query the machine.
    Query,
}

/// Reads one step and the time that passed before it; `None` once the input is used up.
pub fn read_step(c: &mut Cursor<'_>) -> Option<(Duration, Step)> {
    if c.is_empty() {
        return None;
    }
    let b = c.u8();
    let gap = u64::from(b / KINDS).pow(3);
    let fact = |f: Fact| Step::Input(f.into());
    let step = match b % KINDS {
        k @ 0..=5 => Step::Input(Trigger::ALL[usize::from(k)].into()),
        6 => fact(Fact::SetupDone),
        7 => Step::PassDue,
        8 => fact(Fact::Pass(u64::from(c.u8()))),
        9 => fact(Fact::Pass(c.u64())),
        10 => fact(Fact::Switchover),
        11 => fact(Fact::DeviceLoaded),
        12 => fact(Fact::PostcopyStarted),
        13 => fact(Fact::Completed),
        14 => fact(Fact::Failed(
            String::from_utf8_lossy(c.short_bytes()).into_owned(),
        )),
        15 => fact(Fact::ChannelLost),
        16 => fact(Fact::Reconnected),
        17 => fact(Fact::Resumed),
        18 => fact(Fact::Drained),
        19 => Step::SetOptions(options_from(c.u8())),
        20 => Step::Stats(c.u32()),
        21 => Step::Query,
        _ => fact(Fact::InDoubt),
    };
    Some((Duration::from_millis(gap), step))
}

/// Encodes steps (for seeds), each one millisecond after the one before. Passes should be
/// [`Step::PassDue`], so that mutated seeds keep numbering them right.
pub fn encode(config_byte: u8, steps: &[Step]) -> Vec<u8> {
    let mut out = vec![config_byte];
    for step in steps {
        // Kind k after 1 ms is the byte KINDS + k.
        let kind = |k: u8| KINDS + k;
        match step {
            Step::Input(Input::Trigger(t)) => {
                let k = Trigger::ALL.iter().position(|x| x == t).unwrap_or(0);
                out.push(kind(u8::try_from(k).unwrap_or(0)));
            }
            Step::Input(Input::Fact(f)) => match f {
                Fact::SetupDone => out.push(kind(6)),
                Fact::Pass(n) => {
                    out.push(kind(9));
                    out.extend(n.to_le_bytes());
                }
                Fact::Switchover => out.push(kind(10)),
                Fact::DeviceLoaded => out.push(kind(11)),
                Fact::PostcopyStarted => out.push(kind(12)),
                Fact::Completed => out.push(kind(13)),
                Fact::Failed(message) => {
                    out.push(kind(14));
                    let m = &message.as_bytes()[..message.len().min(255)];
                    out.push(u8::try_from(m.len()).unwrap_or(0));
                    out.extend_from_slice(m);
                }
                Fact::ChannelLost => out.push(kind(15)),
                Fact::Reconnected => out.push(kind(16)),
                Fact::Resumed => out.push(kind(17)),
                Fact::Drained => out.push(kind(18)),
                Fact::InDoubt => out.push(kind(22)),
                other => panic!("no encoding for fact {other}"),
            },
            Step::PassDue => out.push(kind(7)),
            Step::SetOptions(options) => out.extend([kind(19), options_bits(*options)]),
            Step::Stats(n) => {
                out.push(kind(20));
                out.extend(n.to_le_bytes());
            }
            Step::Query => out.push(kind(21)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_roundtrip() {
        let steps = vec![
            Step::Input(Trigger::Migrate.into()),
            Step::PassDue,
            Step::Input(Fact::Pass(7).into()),
            Step::Input(Fact::Failed("boom".into()).into()),
            Step::SetOptions(Options::new().postcopy_ram(true)),
            Step::Stats(12345),
            Step::Query,
            Step::Input(Fact::Drained.into()),
        ];
        let byte = Config::byte(Side::Destination, Profile::Qemu11, Options::new());
        let input = encode(byte, &steps);
        let config = Config::read(input[0]);
        assert_eq!(config.side, Side::Destination);
        assert_eq!(config.profile, Profile::Qemu11);
        let mut c = Cursor::new(&input[1..]);
        let mut back = Vec::new();
        while let Some((gap, step)) = read_step(&mut c) {
            assert_eq!(gap, Duration::from_millis(1));
            back.push(step);
        }
        assert_eq!(back, steps);
    }
}

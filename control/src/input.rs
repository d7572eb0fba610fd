//! What goes into the machine: user triggers and data-plane facts, and the settings that shape
//! how they are read (side, profile, options).

use std::fmt;
use std::str::FromStr;

/// Which end of a migration a [`Machine`](crate::Machine) describes. The two have different
/// graphs: the destination never shows `device` or the postcopy recovery setup, and shows
/// `pre-switchover` only while it is in doubt (see [`Fact::InDoubt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Side {
    /// The machine the guest leaves (QEMU's `migrate`).
    #[default]
    Source,
    /// The machine the guest arrives on (QEMU's `-incoming` / `migrate-incoming`).
    Destination,
}

impl Side {
    /// `"source"` or `"destination"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// Which QEMU release's event stream to reproduce. The profile only changes what is *shown*; the
/// facts and triggers a machine accepts are the same under both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Profile {
    /// Exactly what QEMU 10.0 emits. The default: every libvirt release understands it.
    #[default]
    Qemu10,
    /// QEMU 11: adds `failing` between an error and the end of clean-up, and `postcopy-device`
    /// while the destination loads device state at the start of postcopy.
    Qemu11,
}

impl Profile {
    /// `"qemu-10"` or `"qemu-11"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Profile::Qemu10 => "qemu-10",
            Profile::Qemu11 => "qemu-11",
        }
    }
}

/// Migration capabilities that change the status sequence, like QEMU's
/// `migrate-set-capabilities`. They can be changed only while no migration runs.
///
/// ```
/// use ramjet_control::Options;
/// let options = Options::new().pause_before_switchover(true);
/// assert!(options.is_pause_before_switchover());
/// assert!(!options.is_postcopy_ram());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Options {
    pause_before_switchover: bool,
    postcopy_ram: bool,
}

impl Options {
    /// Every option off.
    pub const fn new() -> Self {
        Options {
            pause_before_switchover: false,
            postcopy_ram: false,
        }
    }

    /// `pause-before-switchover`: after `switchover` the source stops in `pre-switchover` until
    /// the user sends `continue`.
    #[must_use]
    pub const fn pause_before_switchover(mut self, on: bool) -> Self {
        self.pause_before_switchover = on;
        self
    }

    /// `postcopy-ram`: allows `start-postcopy` and the postcopy statuses.
    #[must_use]
    pub const fn postcopy_ram(mut self, on: bool) -> Self {
        self.postcopy_ram = on;
        self
    }

    /// Whether `pause-before-switchover` is on.
    pub const fn is_pause_before_switchover(&self) -> bool {
        self.pause_before_switchover
    }

    /// Whether `postcopy-ram` is on.
    pub const fn is_postcopy_ram(&self) -> bool {
        self.postcopy_ram
    }
}

/// A user command, one per QMP command that drives a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Trigger {
    /// `migrate` on the source, `migrate-incoming` on the destination: start a migration.
    Migrate,
    /// `migrate_cancel`.
    Cancel,
    /// `migrate-continue`: leave `pre-switchover`. On the source: go on to `device`. On a
    /// destination in doubt: the operator's word that the source handed over, so the guest may
    /// run here.
    Continue,
    /// `migrate-start-postcopy`: switch to postcopy at the next switchover.
    StartPostcopy,
    /// `migrate-pause`: break the postcopy channel on purpose (to move it, say).
    Pause,
    /// `migrate` with `resume` on the source, `migrate-recover` on the destination.
    Recover,
}

impl Trigger {
    /// Every trigger.
    pub const ALL: [Trigger; 6] = [
        Trigger::Migrate,
        Trigger::Cancel,
        Trigger::Continue,
        Trigger::StartPostcopy,
        Trigger::Pause,
        Trigger::Recover,
    ];

    /// The trigger's name as the scenarios write it, e.g. `"start-postcopy"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Trigger::Migrate => "migrate",
            Trigger::Cancel => "cancel",
            Trigger::Continue => "continue",
            Trigger::StartPostcopy => "start-postcopy",
            Trigger::Pause => "pause",
            Trigger::Recover => "recover",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Trigger {
    type Err = ParseInputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Trigger::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ParseInputError::new("trigger", s))
    }
}

/// Something the data plane observed. Facts describe what happened, never what to show: the
/// machine alone decides the status.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fact {
    /// Connections are up and the handshake is done; pages start to flow.
    SetupDone,
    /// Dirty sync number N (1, 2, 3, ...): the start of a round. QEMU's `dirty-sync-count`.
    Pass(u64),
    /// The source converged and paused the guest for the final round.
    Switchover,
    /// Postcopy: the destination has loaded the device state and runs the guest.
    DeviceLoaded,
    /// Postcopy: the destination took over the guest; remaining pages are pulled on demand.
    PostcopyStarted,
    /// On the source: the receiver confirmed it has every page and the device state, and the
    /// source committed to the handover: from here on it never resumes the guest (even if its
    /// *go* was never acknowledged, and the destination is left in doubt). On the destination:
    /// the source's *go* arrived (or, in doubt, the operator said run here), so the guest may
    /// run here.
    Completed,
    /// Something went wrong; the message says what, for `error-desc`.
    Failed(String),
    /// A channel broke (in postcopy this pauses the migration; in pre-copy it is an error).
    ChannelLost,
    /// Postcopy recovery: a new channel is connected.
    Reconnected,
    /// Postcopy recovery: the sides are in step again and postcopy continues.
    Resumed,
    /// Every worker and socket of this migration has stopped.
    Drained,
    /// Destination only: the destination holds the complete verified state and told the source
    /// *ready*, but the link or the source failed before the source's *go* (or *abort*)
    /// arrived. It must not start the guest and waits for the source's decision or an
    /// operator's; shown as `pre-switchover`.
    InDoubt,
}

impl Fact {
    /// The fact's name as the scenarios write it, e.g. `"setup-done"` (without argument).
    pub const fn name(&self) -> &'static str {
        match self {
            Fact::SetupDone => "setup-done",
            Fact::Pass(_) => "pass",
            Fact::Switchover => "switchover",
            Fact::DeviceLoaded => "device-loaded",
            Fact::PostcopyStarted => "postcopy-started",
            Fact::Completed => "completed",
            Fact::Failed(_) => "failed",
            Fact::ChannelLost => "channel-lost",
            Fact::Reconnected => "reconnected",
            Fact::Resumed => "resumed",
            Fact::Drained => "drained",
            Fact::InDoubt => "in-doubt",
        }
    }

    /// Parses the scenario form: a name, then the argument if the fact takes one (`pass 3`,
    /// `failed connection reset by peer`).
    ///
    /// ```
    /// use ramjet_control::Fact;
    /// assert_eq!(Fact::parse("pass 3"), Ok(Fact::Pass(3)));
    /// assert_eq!(Fact::parse("failed broken pipe"), Ok(Fact::Failed("broken pipe".into())));
    /// assert!(Fact::parse("pass three").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self, ParseInputError> {
        let s = s.trim();
        let (name, argument) = match s.split_once(char::is_whitespace) {
            Some((name, rest)) => (name, rest.trim()),
            None => (s, ""),
        };
        let bare = |fact: Fact| {
            if argument.is_empty() {
                Ok(fact)
            } else {
                Err(ParseInputError::new("fact (takes no argument)", s))
            }
        };
        match name {
            "setup-done" => bare(Fact::SetupDone),
            "pass" => argument
                .parse()
                .map(Fact::Pass)
                .map_err(|_| ParseInputError::new("fact (pass needs a number)", s)),
            "switchover" => bare(Fact::Switchover),
            "device-loaded" => bare(Fact::DeviceLoaded),
            "postcopy-started" => bare(Fact::PostcopyStarted),
            "completed" => bare(Fact::Completed),
            "failed" if !argument.is_empty() => Ok(Fact::Failed(argument.to_owned())),
            "failed" => Err(ParseInputError::new("fact (failed needs a message)", s)),
            "channel-lost" => bare(Fact::ChannelLost),
            "reconnected" => bare(Fact::Reconnected),
            "resumed" => bare(Fact::Resumed),
            "drained" => bare(Fact::Drained),
            "in-doubt" => bare(Fact::InDoubt),
            _ => Err(ParseInputError::new("fact", s)),
        }
    }
}

impl fmt::Display for Fact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fact::Pass(n) => write!(f, "pass {n}"),
            Fact::Failed(message) => write!(f, "failed {message}"),
            other => f.write_str(other.name()),
        }
    }
}

/// One input to [`Machine::step`](crate::Machine::step): a trigger or a fact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// A user command.
    Trigger(Trigger),
    /// A data-plane observation.
    Fact(Fact),
}

impl Input {
    /// The input's name without argument, e.g. `"cancel"` or `"pass"`.
    pub const fn name(&self) -> &'static str {
        match self {
            Input::Trigger(t) => t.as_str(),
            Input::Fact(f) => f.name(),
        }
    }
}

impl From<Trigger> for Input {
    fn from(trigger: Trigger) -> Self {
        Input::Trigger(trigger)
    }
}

impl From<Fact> for Input {
    fn from(fact: Fact) -> Self {
        Input::Fact(fact)
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Trigger(t) => write!(f, "trigger {t}"),
            Input::Fact(fact) => write!(f, "fact {fact}"),
        }
    }
}

/// A string that names no trigger or fact, or a fact with a bad argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseInputError {
    expected: &'static str,
    input: String,
}

impl ParseInputError {
    fn new(expected: &'static str, input: &str) -> Self {
        ParseInputError {
            expected,
            input: input.to_owned(),
        }
    }
}

impl fmt::Display for ParseInputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a valid {}: {:?}", self.expected, self.input)
    }
}

impl std::error::Error for ParseInputError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_roundtrip() {
        for trigger in Trigger::ALL {
            assert_eq!(trigger.as_str().parse::<Trigger>(), Ok(trigger));
        }
        assert!("Migrate".parse::<Trigger>().is_err());
    }

    #[test]
    fn facts_roundtrip_through_display() {
        let facts = [
            Fact::SetupDone,
            Fact::Pass(7),
            Fact::Switchover,
            Fact::DeviceLoaded,
            Fact::PostcopyStarted,
            Fact::Completed,
            Fact::Failed("connection reset by peer".into()),
            Fact::ChannelLost,
            Fact::Reconnected,
            Fact::Resumed,
            Fact::Drained,
            Fact::InDoubt,
        ];
        for fact in facts {
            assert_eq!(Fact::parse(&fact.to_string()), Ok(fact));
        }
    }

    #[test]
    fn bad_facts_name_the_problem() {
        let cases = [
            ("pass", "pass needs a number"),
            ("pass -1", "pass needs a number"),
            ("pass 99999999999999999999999", "pass needs a number"),
            ("failed", "failed needs a message"),
            ("drained now", "takes no argument"),
            ("in-doubt forever", "takes no argument"),
            ("in_doubt", "not a valid fact"),
            ("exploded", "not a valid fact"),
            ("", "not a valid fact"),
        ];
        for (text, needle) in cases {
            let err = Fact::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn options_builder() {
        let options = Options::new()
            .postcopy_ram(true)
            .pause_before_switchover(true);
        assert!(options.is_postcopy_ram() && options.is_pause_before_switchover());
        assert_eq!(Options::default(), Options::new());
    }
}

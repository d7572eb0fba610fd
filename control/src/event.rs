//! What comes out of the machine: timestamped, QMP-shaped events.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::Status;

/// A point in wall-clock time, in microseconds since the Unix epoch, as QMP stamps its events.
///
/// The machine never reads a clock: every [`Machine::step`](crate::Machine::step) is given the
/// time. Durations between two timestamps saturate at zero, so a clock that steps back yields a
/// zero duration, never a panic. An embedder that wants durations immune to clock steps can pass
/// a start wall-clock time plus a monotonic [`std::time::Instant`] offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Timestamp {
    micros: u64,
}

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp { micros: 0 };

    /// A timestamp `micros` microseconds after the Unix epoch.
    pub const fn from_unix_micros(micros: u64) -> Self {
        Timestamp { micros }
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_unix_micros(self) -> u64 {
        self.micros
    }

    /// Whole seconds since the Unix epoch (QMP's `timestamp.seconds`).
    pub const fn seconds(self) -> u64 {
        self.micros / 1_000_000
    }

    /// The microseconds past [`Timestamp::seconds`] (QMP's `timestamp.microseconds`).
    pub const fn subsec_micros(self) -> u32 {
        (self.micros % 1_000_000) as u32
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.micros.saturating_sub(earlier.micros))
    }

    /// This timestamp moved `by` later, saturating at the largest timestamp.
    #[must_use]
    pub fn saturating_add(self, by: Duration) -> Self {
        let by = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        Timestamp {
            micros: self.micros.saturating_add(by),
        }
    }
}

impl From<SystemTime> for Timestamp {
    /// A time before the epoch becomes the epoch.
    fn from(time: SystemTime) -> Self {
        let micros = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Timestamp { micros }
    }
}

/// What an [`Event`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// QMP `MIGRATION`: the visible status changed to `status`.
    Migration {
        /// The new status.
        status: Status,
    },
    /// QMP `MIGRATION_PASS`: dirty sync number `pass` began.
    MigrationPass {
        /// The dirty sync count, from 1.
        pass: u64,
    },
}

impl EventKind {
    /// The QMP event name: `"MIGRATION"` or `"MIGRATION_PASS"`.
    pub const fn name(&self) -> &'static str {
        match self {
            EventKind::Migration { .. } => "MIGRATION",
            EventKind::MigrationPass { .. } => "MIGRATION_PASS",
        }
    }
}

impl fmt::Display for EventKind {
    /// The scenario form: the status string, or `pass N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKind::Migration { status } => f.write_str(status.as_str()),
            EventKind::MigrationPass { pass } => write!(f, "pass {pass}"),
        }
    }
}

/// One event, stamped with the time of the input that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Event {
    timestamp: Timestamp,
    kind: EventKind,
}

impl Event {
    pub(crate) const fn new(timestamp: Timestamp, kind: EventKind) -> Self {
        Event { timestamp, kind }
    }

    /// When it happened.
    pub const fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    /// What it says.
    pub const fn kind(&self) -> EventKind {
        self.kind
    }

    /// The new status, if this is a `MIGRATION` event.
    pub const fn status(&self) -> Option<Status> {
        match self.kind {
            EventKind::Migration { status } => Some(status),
            EventKind::MigrationPass { .. } => None,
        }
    }
}

impl fmt::Display for Event {
    /// `MIGRATION setup` or `MIGRATION_PASS pass 2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.name(), self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_splits_like_qmp() {
        let t = Timestamp::from_unix_micros(1_767_225_600_123_456);
        assert_eq!(t.seconds(), 1_767_225_600);
        assert_eq!(t.subsec_micros(), 123_456);
        let from_system = Timestamp::from(SystemTime::UNIX_EPOCH + Duration::from_micros(42));
        assert_eq!(from_system.as_unix_micros(), 42);
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(Timestamp::from(before_epoch), Timestamp::EPOCH);
    }

    #[test]
    fn durations_saturate() {
        let a = Timestamp::from_unix_micros(5_000);
        let b = a.saturating_add(Duration::from_millis(3));
        assert_eq!(b.saturating_duration_since(a), Duration::from_millis(3));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        let end = Timestamp::from_unix_micros(u64::MAX - 1).saturating_add(Duration::MAX);
        assert_eq!(end.as_unix_micros(), u64::MAX);
    }

    #[test]
    fn display_forms() {
        let t = Timestamp::EPOCH;
        let pass = Event::new(t, EventKind::MigrationPass { pass: 2 });
        let status = Event::new(
            t,
            EventKind::Migration {
                status: Status::PreSwitchover,
            },
        );
        assert_eq!(pass.to_string(), "MIGRATION_PASS pass 2");
        assert_eq!(status.to_string(), "MIGRATION pre-switchover");
        assert_eq!(status.status(), Some(Status::PreSwitchover));
        assert_eq!(pass.status(), None);
    }
}

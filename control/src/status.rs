//! The visible migration status: QEMU's `MigrationStatus`, string for string.

use std::fmt;
use std::str::FromStr;

/// A migration status as QEMU's QAPI `MigrationStatus` names it.
///
/// The strings returned by [`Status::as_str`] are the stable API: they are exactly the ones QEMU
/// puts in `MIGRATION` events and in `query-migrate`, and management software such as libvirt
/// treats the set as closed. Which of them a [`Machine`](crate::Machine) can emit depends on its
/// [`Side`](crate::Side) and [`Profile`](crate::Profile); see [`Graph`](crate::Graph).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Status {
    /// No migration has started yet.
    None,
    /// The migration was requested and is being set up (connecting, handshake, first sync).
    Setup,
    /// A cancel was requested; the data plane is stopping.
    Cancelling,
    /// The migration was cancelled and everything has stopped. Terminal.
    Cancelled,
    /// Pages are being copied while the guest runs (pre-copy).
    Active,
    /// Postcopy is running but the destination is still loading device state (QEMU 10.2+).
    PostcopyDevice,
    /// The guest runs on the destination; remaining pages are pulled on demand.
    PostcopyActive,
    /// Postcopy lost its channel and waits for a recovery.
    PostcopyPaused,
    /// A postcopy recovery was requested; the new channel is being set up.
    PostcopyRecoverSetup,
    /// The channel is back; the sides are resynchronising.
    PostcopyRecover,
    /// The destination has every page and everything has stopped. Terminal.
    Completed,
    /// An error ended the migration; clean-up is under way (QEMU 11+).
    Failing,
    /// An error ended the migration and everything has stopped. Terminal.
    Failed,
    /// COLO fault tolerance. Part of the vocabulary; ramjet never emits it.
    Colo,
    /// Paused before switchover, waiting for `continue` (`pause-before-switchover`).
    PreSwitchover,
    /// The guest is paused and the final pages and device state are being sent.
    Device,
    /// Waiting for a failover device to unplug. Part of the vocabulary; ramjet never emits it.
    WaitUnplug,
}

impl Status {
    /// Every status, in QAPI declaration order.
    pub const ALL: [Status; 17] = [
        Status::None,
        Status::Setup,
        Status::Cancelling,
        Status::Cancelled,
        Status::Active,
        Status::PostcopyDevice,
        Status::PostcopyActive,
        Status::PostcopyPaused,
        Status::PostcopyRecoverSetup,
        Status::PostcopyRecover,
        Status::Completed,
        Status::Failing,
        Status::Failed,
        Status::Colo,
        Status::PreSwitchover,
        Status::Device,
        Status::WaitUnplug,
    ];

    /// The QAPI string for this status, e.g. `"postcopy-active"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
            Status::Active => "active",
            Status::PostcopyDevice => "postcopy-device",
            Status::PostcopyActive => "postcopy-active",
            Status::PostcopyPaused => "postcopy-paused",
            Status::PostcopyRecoverSetup => "postcopy-recover-setup",
            Status::PostcopyRecover => "postcopy-recover",
            Status::Completed => "completed",
            Status::Failing => "failing",
            Status::Failed => "failed",
            Status::Colo => "colo",
            Status::PreSwitchover => "pre-switchover",
            Status::Device => "device",
            Status::WaitUnplug => "wait-unplug",
        }
    }

    /// Whether the migration is over: `completed`, `failed` or `cancelled`.
    ///
    /// A terminal status is emitted only after the data plane reported `drained`, so whoever
    /// reacts to it may start the next migration at once. It stays until the next `migrate`.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// Whether this is one of the `postcopy-*` statuses, in which a migration cannot be
    /// cancelled (the guest already runs on the destination).
    pub const fn is_postcopy(self) -> bool {
        matches!(
            self,
            Status::PostcopyDevice
                | Status::PostcopyActive
                | Status::PostcopyPaused
                | Status::PostcopyRecoverSetup
                | Status::PostcopyRecover
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ParseStatusError {
                input: s.to_owned(),
            })
    }
}

/// A string that is not one of QEMU's `MigrationStatus` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseStatusError {
    input: String,
}

impl fmt::Display for ParseStatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown migration status {:?}", self.input)
    }
}

impl std::error::Error for ParseStatusError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_qemus_in_qapi_order() {
        let names: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names.join(" "),
            "none setup cancelling cancelled active postcopy-device postcopy-active \
             postcopy-paused postcopy-recover-setup postcopy-recover completed failing failed \
             colo pre-switchover device wait-unplug"
        );
    }

    #[test]
    fn parse_roundtrips_and_rejects_unknown_names() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        let err = "Active".parse::<Status>().unwrap_err();
        assert_eq!(err.to_string(), "unknown migration status \"Active\"");
        assert!("".parse::<Status>().is_err());
        assert!("postcopy_active".parse::<Status>().is_err());
    }

    #[test]
    fn terminal_and_postcopy_sets() {
        let terminal: Vec<Status> = Status::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [Status::Cancelled, Status::Completed, Status::Failed]
        );
        let postcopy = Status::ALL.into_iter().filter(|s| s.is_postcopy()).count();
        assert_eq!(postcopy, 5);
        assert!(!Status::Failing.is_terminal());
        assert!(!Status::Cancelling.is_terminal());
    }
}

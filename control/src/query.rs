//! The `query-migrate` snapshot and the RAM statistics vocabulary the data plane fills.

use std::time::Duration;

use crate::{Status, Timestamp};

/// RAM transfer statistics with `query-migrate`'s field names and meanings (QAPI
/// `MigrationStats`). The data plane samples its counters into one of these and hands it to
/// [`Machine::set_ram_stats`](crate::Machine::set_ram_stats); the machine only stores it, except
/// for `dirty_sync_count`, which it fills from the `pass` facts it accepted so that the query
/// agrees with the `MIGRATION_PASS` events.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct RamStats {
    /// Bytes already transferred to the destination.
    pub transferred: u64,
    /// Bytes still to transfer.
    pub remaining: u64,
    /// Bytes of guest RAM in the migration.
    pub total: u64,
    /// Pages sent as zero pages (QEMU's "duplicate").
    pub duplicate: u64,
    /// Pages sent with their contents.
    pub normal: u64,
    /// Bytes of the normal pages.
    pub normal_bytes: u64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Dirty syncs so far (filled by the machine from `pass` facts).
    pub dirty_sync_count: u64,
    /// Page requests received from the destination in postcopy.
    pub postcopy_requests: u64,
    /// Bytes per page for the page-based counters.
    pub page_size: u64,
    /// Bytes sent over the multi-channel path.
    pub multifd_bytes: u64,
    /// Pages transferred per second.
    pub pages_per_second: u64,
    /// Bytes sent during pre-copy.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    /// Bytes sent during postcopy.
    pub postcopy_bytes: u64,
    /// Dirty syncs that could not avoid copying pages for a zero-copy send.
    pub dirty_sync_missed_zero_copy: u64,
}

/// One error the data plane reported, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRecord {
    /// When the `failed` fact arrived.
    pub at: Timestamp,
    /// Its message.
    pub message: String,
    /// Whether this error decided the course of the migration (failed it, or paused postcopy).
    /// Errors that arrive after a cancel or after the outcome was decided are kept for the
    /// record but decide nothing.
    pub decisive: bool,
}

/// A `query-migrate` snapshot, from [`Machine::query`](crate::Machine::query).
///
/// Optional fields are absent exactly when QEMU leaves them out: `setup-time` until setup is
/// done, `downtime` until the migration completed, `expected-downtime` once it has ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Query {
    /// The status last emitted (a query never shows a status no event announced).
    pub status: Status,
    /// The first decisive error (`error-desc`).
    pub error_desc: Option<String>,
    /// Every error of the current migration, in arrival order (not part of QMP).
    pub errors: Vec<ErrorRecord>,
    /// From `migrate` to `setup-done` (`setup-time`).
    pub setup_time: Option<Duration>,
    /// From `migrate` to the terminal status, or to now while running (`total-time`).
    pub total_time: Option<Duration>,
    /// Source only, once completed: from `switchover` (guest paused) to the guest running again
    /// on the destination (`completed`, or `postcopy-started`) (`downtime`).
    pub downtime: Option<Duration>,
    /// The data plane's estimate while running (`expected-downtime`).
    pub expected_downtime: Option<Duration>,
    /// RAM statistics, once the data plane has reported some (`ram`).
    pub ram: Option<RamStats>,
}

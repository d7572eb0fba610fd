//! [`LiveHandle`]: how other threads steer and watch a live migration.
//!
//! The loop in [`migrate_live`](super::migrate_live) publishes its [`Progress`] and the figures
//! `query-migrate` needs here, and waits here in `pre-switchover`; the handle's clones read them,
//! proceed and cancel.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Progress;
use crate::session::{CancelHandle, Counters, lock};
use ramjet_control::RamStats;

/// Drives a live migration from other threads: proceed out of `pre-switchover`, cancel, and
/// watch its progress. Clones share one migration.
#[derive(Debug, Clone, Default)]
pub struct LiveHandle {
    shared: Arc<HandleShared>,
    cancel: CancelHandle,
}

#[derive(Debug, Default)]
struct HandleShared {
    proceed: Mutex<bool>,
    wake: Condvar,
    progress: Mutex<Progress>,
    running: Mutex<Option<Running>>,
}

/// What the handle needs to report `query-migrate` figures for a running migration.
#[derive(Debug, Clone)]
struct Running {
    counters: Arc<Counters>,
    total_bytes: u64,
    started: Instant,
    /// Bytes sent when the guest paused.
    paused_at_sent: Option<u64>,
}

impl LiveHandle {
    /// A handle whose [`cancel`](LiveHandle::cancel) cancels the send session of `cancel` (the
    /// one in its [`SendOptions`](crate::SendOptions)).
    pub fn new(cancel: CancelHandle) -> Self {
        LiveHandle {
            shared: Arc::default(),
            cancel,
        }
    }

    /// `migrate-continue`: leave `pre-switchover`.
    pub fn proceed(&self) {
        *lock(&self.shared.proceed) = true;
        self.shared.wake.notify_all();
    }

    /// Cancels the migration; the guest resumes on the source.
    pub fn cancel(&self) {
        self.cancel.cancel();
        self.shared.wake.notify_all();
    }

    /// The progress as of the last dirty sync.
    pub fn progress(&self) -> Progress {
        *lock(&self.shared.progress)
    }

    /// The migration's RAM figures with `query-migrate`'s meanings (`None` before it starts):
    /// bytes transferred, remaining and total, zero ("duplicate") and normal pages, the dirty
    /// rate, throughput, dirty syncs, pages per second, and the bytes sent before and during
    /// the downtime. The expected downtime is in [`Progress::expected_downtime`].
    pub fn ram_stats(&self) -> Option<RamStats> {
        let running = lock(&self.shared.running).clone()?;
        let progress = self.progress();
        let mut stats = running
            .counters
            .snapshot()
            .ram_stats(running.total_bytes, running.started.elapsed());
        let sent = running.counters.sent();
        stats.dirty_pages_rate = progress.dirty_pages_rate;
        stats.remaining = stats.remaining.max(progress.remaining_bytes);
        (stats.precopy_bytes, stats.downtime_bytes) = match running.paused_at_sent {
            Some(at) => (at, sent.saturating_sub(at)),
            None => (sent, 0),
        };
        Some(stats)
    }

    /// The migration started at `started`, moving `total_bytes` of guest memory and counting
    /// in `counters`: from now on [`ram_stats`](LiveHandle::ram_stats) reports it.
    pub(super) fn start(&self, counters: Arc<Counters>, total_bytes: u64, started: Instant) {
        *lock(&self.shared.running) = Some(Running {
            counters,
            total_bytes,
            started,
            paused_at_sent: None,
        });
    }

    /// The guest paused when `sent` bytes had been sent: what follows is downtime bytes.
    pub(super) fn paused_at(&self, sent: u64) {
        if let Some(running) = lock(&self.shared.running).as_mut() {
            running.paused_at_sent = Some(sent);
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.shared.progress));
    }

    /// Waits for `proceed` or a cancel; true if told to proceed.
    pub(super) fn wait_to_proceed(&self) -> bool {
        let mut proceed = lock(&self.shared.proceed);
        loop {
            if self.cancel.is_cancelled() {
                return false;
            }
            if *proceed {
                return true;
            }
            proceed = match self
                .shared
                .wake
                .wait_timeout(proceed, Duration::from_millis(50))
            {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

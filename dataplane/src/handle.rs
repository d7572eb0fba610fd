//! [`LiveHandle`]: how other threads steer and watch a live migration, and the [`Progress`]
//! it shows.
//!
//! Every [`Sender`](crate::Sender) has one handle, made with it and bound to its session
//! ([`Sender::live_handle`](crate::Sender::live_handle)), so cancelling it always cancels that
//! session. The loop in [`migrate_live`](crate::migrate_live) publishes its progress and the
//! figures `query-migrate` needs here, and waits here in `pre-switchover`; the handle's clones
//! read them, proceed and cancel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ramjet_control::RamStats;

use crate::session::{Counters, Stop, lock};
use crate::transport::Endpoint;

/// Where a live migration stands, as of its last dirty sync.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Dirty syncs made, each ending a round: 0 all through round 1, N while round N+1 is
    /// sent. The round being sent, and what it has left, are in the session's
    /// [`Counters`](crate::Counters) ([`Stats::rounds`](crate::Stats::rounds),
    /// [`Stats::remaining_pages`](crate::Stats::remaining_pages)), updated as it goes.
    pub round: u32,
    /// Bytes dirty at the last sync (what the next round sends).
    pub remaining_bytes: u64,
    /// Bytes sent per second over the last round.
    pub bandwidth: u64,
    /// Pages the guest dirtied per second since the previous sync.
    pub dirty_pages_rate: u64,
    /// How long the last dirty sync took.
    pub sync_time: Duration,
    /// (remaining + bytes still queued from earlier rounds) / bandwidth, plus a dirty sync.
    /// Not known before the first sync (`round` 0): zero until then.
    pub expected_downtime: Duration,
    /// Rounds in a row in which the bytes still dirty did not shrink.
    pub rounds_without_progress: u32,
    /// Whether that reached [`LiveOptions::stall_rounds`](crate::LiveOptions::stall_rounds).
    pub stalled: bool,
    /// Whether the guest is paused for the switchover.
    pub paused: bool,
    /// In postcopy (the destination runs the guest): what postcopy did so far.
    pub postcopy: Option<crate::postcopy::PostcopyStats>,
}

/// Drives a live migration from other threads: proceed out of `pre-switchover`, cancel, and
/// watch its progress. Clones share one migration; get one from
/// [`Sender::live_handle`](crate::Sender::live_handle).
#[derive(Debug, Clone)]
pub struct LiveHandle {
    shared: Arc<HandleShared>,
    stop: Arc<Stop>,
}

#[derive(Debug, Default)]
struct HandleShared {
    proceed: Mutex<bool>,
    wake: Condvar,
    progress: Mutex<Progress>,
    running: Mutex<Option<Running>>,
    /// `migrate-start-postcopy` was asked for.
    start_postcopy: AtomicBool,
    /// A paused postcopy's `recover`, with the endpoint to reconnect to (`None`: the same).
    recover: Mutex<Option<Option<Endpoint>>>,
    /// Wakes the wait for `recover` (a condvar serves one mutex).
    recovered: Condvar,
    /// The stop switch of the postcopy connections now up, for `pause`.
    epoch: Mutex<Option<Arc<Stop>>>,
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
    /// The handle of the send session that `stop` stops.
    pub(crate) fn new(stop: Arc<Stop>) -> Self {
        LiveHandle {
            shared: Arc::default(),
            stop,
        }
    }

    /// `migrate-continue`: leave `pre-switchover`.
    pub fn proceed(&self) {
        *lock(&self.shared.proceed) = true;
        self.shared.wake.notify_all();
    }

    /// Cancels the migration; the guest resumes on the source.
    pub fn cancel(&self) {
        self.stop.cancel();
        self.shared.wake.notify_all();
    }

    /// `migrate-start-postcopy`: switch to postcopy after the round in progress (unless
    /// pre-copy converges first). It takes effect only for a session connected with
    /// [`SendOptions::postcopy`](crate::SendOptions::postcopy).
    pub fn start_postcopy(&self) {
        self.shared.start_postcopy.store(true, Ordering::SeqCst);
    }

    /// Whether postcopy was asked for.
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.shared.start_postcopy.load(Ordering::SeqCst)
    }

    /// `migrate-pause`: breaks the connections of a migration in postcopy on purpose (to move
    /// them, say); it pauses as on a broken link, and [`recover`](LiveHandle::recover) resumes
    /// it. Does nothing outside postcopy.
    pub fn pause(&self) {
        if let Some(stop) = lock(&self.shared.epoch).as_ref() {
            stop.fail(crate::Error::Paused);
            stop.shutdown_all();
        }
    }

    /// `migrate` with `resume`: a paused postcopy reconnects, to `endpoint` if given (the
    /// destination may listen elsewhere now), else where it was connected. A failed attempt
    /// leaves it paused, to be recovered again. Does nothing unless postcopy is paused.
    pub fn recover(&self, endpoint: Option<Endpoint>) {
        *lock(&self.shared.recover) = Some(endpoint);
        self.shared.recovered.notify_all();
    }

    /// The postcopy connections now up stop through `stop` (`None`: none are up).
    pub(crate) fn set_epoch(&self, stop: Option<Arc<Stop>>) {
        *lock(&self.shared.epoch) = stop;
    }

    /// Waits up to `wait` (`None`: forever) for [`recover`](LiveHandle::recover), and takes
    /// it: the endpoint to reconnect to, if one was given.
    pub(crate) fn wait_for_recover(&self, wait: Option<Duration>) -> Option<Option<Endpoint>> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut recover = lock(&self.shared.recover);
        loop {
            if let Some(endpoint) = recover.take() {
                return Some(endpoint);
            }
            let step = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    left.min(Duration::from_millis(50))
                }
                None => Duration::from_millis(50),
            };
            recover = match self.shared.recovered.wait_timeout(recover, step) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Forgets a `recover` asked for while postcopy was not paused.
    pub(crate) fn clear_recover(&self) {
        *lock(&self.shared.recover) = None;
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
        if let Some(postcopy) = progress.postcopy {
            stats.postcopy_requests = postcopy.requests;
            stats.postcopy_bytes = postcopy.bytes;
            stats.downtime_bytes = stats.downtime_bytes.saturating_sub(postcopy.bytes);
        }
        Some(stats)
    }

    /// The migration started at `started`, moving `total_bytes` of guest memory and counting
    /// in `counters`: from now on [`ram_stats`](LiveHandle::ram_stats) reports it.
    pub(crate) fn start(&self, counters: Arc<Counters>, total_bytes: u64, started: Instant) {
        *lock(&self.shared.running) = Some(Running {
            counters,
            total_bytes,
            started,
            paused_at_sent: None,
        });
    }

    /// The guest paused when `sent` bytes had been sent: what follows is downtime bytes.
    pub(crate) fn paused_at(&self, sent: u64) {
        if let Some(running) = lock(&self.shared.running).as_mut() {
            running.paused_at_sent = Some(sent);
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.shared.progress));
    }

    /// Waits for `proceed`, or for the session to stop (a cancel, or a failure such as the
    /// receiver's); true if told to proceed.
    pub(crate) fn wait_to_proceed(&self) -> bool {
        let mut proceed = lock(&self.shared.proceed);
        loop {
            if self.stop.is_stopped() {
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

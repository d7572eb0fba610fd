//! The convergence policy: when a pre-copy switches over.
//!
//! The loop in [`migrate_live`](super::migrate_live) measures and this module decides. After
//! each dirty sync the loop hands [`Convergence::observe`] what it measured (a [`SyncSample`]:
//! plain byte counts, page counts and durations), which turns it into [`Progress`]: the bandwidth
//! over the round just sent, the guest's dirty rate, the bytes still dirty, the downtime a
//! switchover now would cost, and whether the migration stalled. [`Convergence::decide`] then
//! says whether to send another round, switch over and why, or fail.
//!
//! Nothing here reads the clock or does IO. Time comes in as durations the loop measured, so
//! one sequence of samples always yields the same progress and the same decisions, as `control`'s
//! machine does with its `now` argument; the tests below feed such sequences by hand.

use std::time::Duration;

use super::{LiveOptions, StallPolicy};
use crate::error::Error;
use crate::memory::PAGE_SIZE;

/// Rounds sending less than this keep the previous bandwidth estimate: too few bytes say
/// little about the link.
const MIN_MEASURED_ROUND_BYTES: u64 = 1 << 20;

/// Where a live migration stands, as of its last dirty sync.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Rounds started.
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
    pub expected_downtime: Duration,
    /// Rounds in a row in which the bytes still dirty did not shrink.
    pub rounds_without_progress: u32,
    /// Whether that reached [`LiveOptions::stall_rounds`].
    pub stalled: bool,
    /// Whether the guest is paused for the switchover.
    pub paused: bool,
}

/// Why the switchover happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverReason {
    /// The expected downtime fit the limit.
    Converged,
    /// [`LiveOptions::max_rounds`] was reached.
    MaxRounds,
    /// [`LiveOptions::max_time`] passed.
    MaxTime,
    /// A stall, with [`StallPolicy::Switchover`].
    Stalled,
}

/// What the loop measured at one dirty sync, the one that ends a round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SyncSample {
    /// Frame bytes sent from the round's start to the end of this sync.
    pub(super) bytes_sent: u64,
    /// From the round's start to the end of this sync.
    pub(super) round_time: Duration,
    /// Pages this sync found dirty: what the next round sends.
    pub(super) pages_dirtied: u64,
    /// From the end of the previous sync (for the first, the start of round 1) to the end of
    /// this one: the time the guest had to dirty those pages.
    pub(super) sync_interval: Duration,
    /// How long this sync took; the final one, made while paused, costs about as much.
    pub(super) sync_time: Duration,
    /// Frame bytes earlier rounds still have queued, not yet sent: a switchover waits for them.
    pub(super) bytes_queued: u64,
}

/// What to do after a dirty sync.
#[derive(Debug)]
pub(super) enum Decision {
    /// Send the next round.
    Continue,
    /// Pause the guest and send the rest.
    Switchover(SwitchoverReason),
    /// End the migration with this error ([`StallPolicy::Fail`]); the guest resumes.
    Fail(Error),
}

/// The policy's state across the rounds of one migration.
#[derive(Debug, Clone)]
pub(super) struct Convergence {
    options: LiveOptions,
    /// As of the last sample; `round` counts the samples.
    progress: Progress,
    /// The fewest bytes dirty at any sync so far: progress is beating it.
    best_remaining: u64,
    /// Samples at which the migration was stalled.
    stalled_syncs: u32,
}

impl Convergence {
    /// A migration deciding by `options`, before its first sync.
    pub(super) fn new(options: &LiveOptions) -> Self {
        Convergence {
            options: options.clone(),
            progress: Progress::default(),
            best_remaining: u64::MAX,
            stalled_syncs: 0,
        }
    }

    /// Takes the sample of the sync that ends the next round (the n-th sample ends round n)
    /// and returns the progress as of that sync.
    pub(super) fn observe(&mut self, sample: SyncSample) -> Progress {
        let progress = &mut self.progress;
        progress.round += 1;
        progress.sync_time = sample.sync_time;
        if sample.bytes_sent >= MIN_MEASURED_ROUND_BYTES || progress.bandwidth == 0 {
            progress.bandwidth = per_second(sample.bytes_sent, sample.round_time);
        }
        progress.dirty_pages_rate = per_second(sample.pages_dirtied, sample.sync_interval);
        progress.remaining_bytes = sample.pages_dirtied * PAGE_SIZE as u64;
        progress.expected_downtime = expected_downtime(
            progress.remaining_bytes + sample.bytes_queued,
            progress.bandwidth,
            progress.sync_time,
        );
        if progress.remaining_bytes < self.best_remaining {
            self.best_remaining = progress.remaining_bytes;
            progress.rounds_without_progress = 0;
        } else {
            progress.rounds_without_progress += 1;
        }
        progress.stalled = progress.rounds_without_progress >= self.options.stall_rounds.max(1);
        self.stalled_syncs += u32::from(progress.stalled);
        *progress
    }

    /// Whether to switch over now, `elapsed` after the migration started, and why; rules in
    /// order: converged, [`max_rounds`](LiveOptions::max_rounds),
    /// [`max_time`](LiveOptions::max_time), then the stall policy.
    pub(super) fn decide(&self, elapsed: Duration) -> Decision {
        let options = &self.options;
        let progress = &self.progress;
        if progress.expected_downtime <= options.downtime_limit {
            return Decision::Switchover(SwitchoverReason::Converged);
        }
        if options.max_rounds.is_some_and(|max| progress.round >= max) {
            return Decision::Switchover(SwitchoverReason::MaxRounds);
        }
        if options.max_time.is_some_and(|max| elapsed >= max) {
            return Decision::Switchover(SwitchoverReason::MaxTime);
        }
        if !progress.stalled {
            return Decision::Continue;
        }
        match options.on_stall {
            StallPolicy::Continue => Decision::Continue,
            StallPolicy::Switchover => Decision::Switchover(SwitchoverReason::Stalled),
            StallPolicy::Fail => Decision::Fail(Error::Stalled {
                rounds: progress.round,
                remaining: progress.remaining_bytes,
                dirty_rate: progress.dirty_pages_rate * PAGE_SIZE as u64,
                bandwidth: progress.bandwidth,
            }),
        }
    }

    /// The progress as of the last sample.
    pub(super) fn progress(&self) -> Progress {
        self.progress
    }

    /// Samples at which the migration was stalled.
    pub(super) fn stalled_syncs(&self) -> u32 {
        self.stalled_syncs
    }
}

/// How long sending `to_send` bytes at `bandwidth` bytes per second takes, plus one dirty sync
/// of `sync_time`: the downtime of a switchover now. Unbounded when nothing was measured yet.
fn expected_downtime(to_send: u64, bandwidth: u64, sync_time: Duration) -> Duration {
    match bandwidth {
        0 => Duration::MAX,
        rate => Duration::try_from_secs_f64(to_send as f64 / rate as f64)
            .unwrap_or(Duration::MAX)
            .saturating_add(sync_time),
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "a float-to-integer `as` saturates, which is right for a rate"
)]
fn per_second(amount: u64, over: Duration) -> u64 {
    let seconds = over.as_secs_f64();
    if seconds <= 0.0 {
        return 0;
    }
    (amount as f64 / seconds) as u64
}

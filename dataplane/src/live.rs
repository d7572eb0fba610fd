//! Live pre-copy: migrating a running guest.
//!
//! [`migrate_live`] runs the loop QEMU's pre-copy runs. Round 1 sends every page. Each later
//! round starts with a dirty sync ([`DirtySource::harvest`]) and sends what the guest wrote
//! meanwhile. After each sync it measures the link's bandwidth over the round just sent, the
//! guest's dirty rate and the bytes still dirty, and expects a downtime of the bytes to send
//! (dirty, plus what earlier rounds still have queued) over the bandwidth, plus one more sync. It switches over once that fits the downtime limit, or when a bound (rounds,
//! time) or the stall policy says so. The switchover pauses the guest ([`Guest::pause`]),
//! optionally waits for [`LiveHandle::proceed`] (`pause-before-switchover`), syncs once more,
//! sends the final round straight from the frozen memory, then the device state, and
//! completes once the receiver confirms every page. Downtime is measured from the pause to
//! that confirmation.
//!
//! A stall is the bytes still dirty not shrinking over [`LiveOptions::stall_rounds`] rounds;
//! it is reported in [`Progress`], and [`StallPolicy`] says whether to go on, switch over
//! anyway, or fail with [`Error::Stalled`].

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::dirty::{DirtySet, DirtySource};
use crate::error::Error;
use crate::memory::PAGE_SIZE;
use crate::send::{Sender, Summary};
use crate::session::{CancelHandle, Counters, lock};
use ramjet_control::RamStats;

/// What to do when the migration stops converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StallPolicy {
    /// Go on (as QEMU does); the stall shows in [`Progress::stalled`].
    #[default]
    Continue,
    /// Switch over now and accept a longer downtime.
    Switchover,
    /// Fail the migration with [`Error::Stalled`]; the guest resumes on the source.
    Fail,
}

/// How a live migration decides when to switch over.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The longest pause the guest may see (QEMU's and Cloud Hypervisor's default: 300 ms).
    pub downtime_limit: Duration,
    /// Switch over after this many rounds at the latest.
    pub max_rounds: Option<u32>,
    /// Switch over after this long at the latest.
    pub max_time: Option<Duration>,
    /// The number of rounds without progress that make a stall (at least 1).
    pub stall_rounds: u32,
    /// What a stall does.
    pub on_stall: StallPolicy,
    /// Wait in `pre-switchover`, guest paused, until [`LiveHandle::proceed`].
    pub pause_before_switchover: bool,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            downtime_limit: Duration::from_millis(300),
            max_rounds: None,
            max_time: None,
            stall_rounds: 5,
            on_stall: StallPolicy::Continue,
            pause_before_switchover: false,
        }
    }
}

/// The embedder's side of the switchover.
pub trait Guest {
    /// Stops the guest (its vCPUs): once this returns, nothing writes guest memory.
    fn pause(&mut self) -> Result<(), String>;

    /// The device-state blob, taken while paused.
    fn device_state(&mut self) -> Result<Vec<u8>, String>;

    /// Resumes the guest on the source after a failed or cancelled migration.
    fn resume(&mut self) {}
}

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

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.shared.progress));
    }

    /// Waits for `proceed` or a cancel; true if told to proceed.
    fn wait_to_proceed(&self) -> bool {
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

/// What a completed live migration did.
#[derive(Debug, Clone, Copy)]
pub struct LiveReport {
    /// Rounds sent, the final one included.
    pub rounds: u32,
    /// Why it switched over.
    pub reason: SwitchoverReason,
    /// The downtime expected at the switchover decision.
    pub expected_downtime: Duration,
    /// From pausing the guest to the receiver's confirmation.
    pub downtime: Duration,
    /// Bytes sent while the guest was paused (what earlier rounds still had queued included).
    pub downtime_bytes: u64,
    /// The progress at the last sync before the switchover.
    pub last: Progress,
    /// Dirty syncs at which the migration was stalled.
    pub stalled_syncs: u32,
    /// The send session's summary (wire bytes, pages, total time).
    pub summary: Summary,
}

/// Runs a live migration on a connected `sender` (see the [module docs](self)): `source` tracks
/// the guest's writes, `guest` pauses it and hands over its device state. On failure or
/// cancel the session reports `failed`/`drained`, a paused guest is resumed, and the error is
/// returned.
pub fn migrate_live(
    sender: Sender,
    source: &mut dyn DirtySource,
    guest: &mut dyn Guest,
    options: &LiveOptions,
    handle: &LiveHandle,
) -> Result<LiveReport, Error> {
    let mut paused = false;
    let mut run = Run {
        sender: Some(sender),
        options,
        handle,
        started: Instant::now(),
    };
    let result = run.run(source, guest, &mut paused);
    if result.is_err() && paused {
        guest.resume();
        handle.update(|p| p.paused = false);
    }
    result
}

struct Run<'a> {
    /// Taken by whatever ends the session.
    sender: Option<Sender>,
    options: &'a LiveOptions,
    handle: &'a LiveHandle,
    started: Instant,
}

impl Run<'_> {
    fn sender(&mut self) -> Result<&mut Sender, Error> {
        self.sender.as_mut().ok_or(Error::Ended)
    }

    /// Ends the session with `err` (failed and drained are reported).
    fn fail(&mut self, err: Error) -> Error {
        match self.sender.take() {
            Some(sender) => sender.fail_with(err),
            None => err,
        }
    }

    fn run(
        &mut self,
        source: &mut dyn DirtySource,
        guest: &mut dyn Guest,
        paused: &mut bool,
    ) -> Result<LiveReport, Error> {
        let memory = Arc::clone(self.sender()?.memory());
        let counters = self.sender()?.counters();
        *lock(&self.handle.shared.running) = Some(Running {
            counters: Arc::clone(&counters),
            total_bytes: memory.total_bytes(),
            started: self.started,
            paused_at_sent: None,
        });
        if let Err(e) = source.start(&memory) {
            return Err(self.fail(Error::Dirty(e)));
        }
        let mut round_start = Instant::now();
        let mut round_bytes = counters.sent();
        self.sender()?.round(&DirtySet::all(&memory))?;
        let mut progress = Progress {
            round: 1,
            ..Progress::default()
        };
        let mut last_sync = round_start;
        let mut best_remaining = u64::MAX;
        let mut stalled_syncs = 0;
        let (pending, reason) = loop {
            // The dirty sync that starts the next round.
            let sync_start = Instant::now();
            let dirty = match source.harvest(&memory) {
                Ok(dirty) => dirty,
                Err(e) => return Err(self.fail(Error::Dirty(e))),
            };
            let now = Instant::now();
            // The final sync, made while paused, costs about as much.
            progress.sync_time = now.duration_since(sync_start);
            let sent = counters.sent() - round_bytes;
            let took = now.duration_since(round_start);
            // Too small a round says little about the link: keep the last estimate.
            if sent >= 1 << 20 || progress.bandwidth == 0 {
                progress.bandwidth = per_second(sent, took);
            }
            let dirtied = dirty.count();
            progress.dirty_pages_rate = per_second(dirtied, now.duration_since(last_sync));
            last_sync = now;
            progress.remaining_bytes = dirtied * PAGE_SIZE as u64;
            // A switchover now would first wait for what is still queued.
            let to_send = progress.remaining_bytes + counters.in_flight();
            progress.expected_downtime = match progress.bandwidth {
                0 => Duration::MAX,
                rate => Duration::try_from_secs_f64(to_send as f64 / rate as f64)
                    .unwrap_or(Duration::MAX)
                    .saturating_add(progress.sync_time),
            };
            if progress.remaining_bytes < best_remaining {
                best_remaining = progress.remaining_bytes;
                progress.rounds_without_progress = 0;
            } else {
                progress.rounds_without_progress += 1;
            }
            progress.stalled = progress.rounds_without_progress >= self.options.stall_rounds.max(1);
            stalled_syncs += u32::from(progress.stalled);
            self.handle.update(|p| *p = progress);
            if let Some(reason) = self.decide(&progress) {
                match reason {
                    Ok(reason) => break (dirty, reason),
                    Err(err) => return Err(self.fail(err)),
                }
            }
            round_start = now;
            round_bytes = counters.sent();
            self.sender()?.round(&dirty)?;
            progress.round += 1;
        };
        // The switchover: pause, (wait,) the final sync and round, the device state.
        let paused_at = Instant::now();
        if let Err(message) = guest.pause() {
            return Err(self.fail(Error::Guest {
                op: "pause",
                message,
            }));
        }
        *paused = true;
        self.handle.update(|p| p.paused = true);
        let paused_bytes = counters.sent();
        if let Some(running) = lock(&self.handle.shared.running).as_mut() {
            running.paused_at_sent = Some(paused_bytes);
        }
        self.sender()?.switchover()?;
        if self.options.pause_before_switchover && !self.handle.wait_to_proceed() {
            return Err(self.fail(Error::Cancelled));
        }
        let mut last = pending;
        match source.harvest(&memory) {
            Ok(dirty) => last.union(&dirty),
            Err(e) => return Err(self.fail(Error::Dirty(e))),
        }
        self.sender()?.round(&last)?;
        let device_state = match guest.device_state() {
            Ok(blob) => blob,
            Err(message) => {
                return Err(self.fail(Error::Guest {
                    op: "save its device state",
                    message,
                }));
            }
        };
        let sender = self.sender.take().ok_or(Error::Ended)?;
        let summary = sender.finish(&device_state)?;
        // Everything is across now.
        self.handle.update(|p| p.remaining_bytes = 0);
        Ok(LiveReport {
            rounds: summary.rounds,
            reason,
            expected_downtime: progress.expected_downtime,
            downtime: summary.confirmed.saturating_duration_since(paused_at),
            downtime_bytes: counters.sent().saturating_sub(paused_bytes),
            last: progress,
            stalled_syncs,
            summary,
        })
    }

    /// Whether to switch over now, and why; an error if the stall policy says to fail.
    fn decide(&self, progress: &Progress) -> Option<Result<SwitchoverReason, Error>> {
        let options = self.options;
        if progress.expected_downtime <= options.downtime_limit {
            return Some(Ok(SwitchoverReason::Converged));
        }
        if options.max_rounds.is_some_and(|max| progress.round >= max) {
            return Some(Ok(SwitchoverReason::MaxRounds));
        }
        if options
            .max_time
            .is_some_and(|max| self.started.elapsed() >= max)
        {
            return Some(Ok(SwitchoverReason::MaxTime));
        }
        if progress.stalled {
            match options.on_stall {
                StallPolicy::Continue => {}
                StallPolicy::Switchover => return Some(Ok(SwitchoverReason::Stalled)),
                StallPolicy::Fail => {
                    return Some(Err(Error::Stalled {
                        rounds: progress.round,
                        remaining: progress.remaining_bytes,
                        dirty_rate: progress.dirty_pages_rate * PAGE_SIZE as u64,
                        bandwidth: progress.bandwidth,
                    }));
                }
            }
        }
        None
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

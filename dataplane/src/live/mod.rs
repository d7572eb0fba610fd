//! Live pre-copy: migrating a running guest.
//!
//! [`migrate_live`] runs the loop QEMU's pre-copy runs. Round 1 sends every page. Each later
//! round starts with a dirty sync ([`DirtySource::harvest`]) and sends what the guest wrote
//! meanwhile. After each sync it measures the link's bandwidth over the round just sent, the
//! guest's dirty rate and the bytes still dirty, and expects a downtime of the bytes to send
//! (dirty, plus what earlier rounds still have queued) over the bandwidth, plus one more sync.
//! It switches over once that fits the downtime limit, or when a bound (rounds, time) or the
//! stall policy says so. The switchover pauses the guest ([`Guest::pause`]),
//! optionally waits for [`LiveHandle::proceed`] (`pause-before-switchover`), syncs once more,
//! sends the final round straight from the frozen memory, then the device state, and
//! hands the guest over ([`Sender::finish`]): the receiver says it holds every page, the source
//! commits and says *go*. Downtime is measured from the pause to the receiver's
//! acknowledgement of that go (the destination may run the guest from then at the latest).
//!
//! A same-host migration whose receiver took the memory by descriptor
//! ([`Sender::shares_memory`]) has nothing to copy: it pauses the guest at once (reason
//! [`SwitchoverReason::SharedMemory`], no dirty tracking, no round with pages) and hands over
//! the device state; the downtime is the pause, the device state and the handover's round
//! trip.
//!
//! A stall is the bytes still dirty not shrinking over [`LiveOptions::stall_rounds`] rounds;
//! it is reported in [`Progress`], and [`StallPolicy`] says whether to go on, switch over
//! anyway, switch to postcopy, or fail with [`Error::Stalled`].
//!
//! Postcopy ([`Sender::postcopy`]) replaces the final round when it was asked for
//! ([`LiveHandle::start_postcopy`], [`LiveOptions::postcopy_after_first_round`]) or the stall
//! policy says so, and the sender was connected with
//! [`SendOptions::postcopy`](crate::SendOptions::postcopy): after the pause and the last sync,
//! every page written since it was sent is left for the destination to fetch, the device
//! state goes across, and the destination runs the guest at once. The downtime is then from
//! the pause to the destination's acknowledgement of the go.

// The loop here owns the sender, the dirty source and the guest, and reads the clock. What it
// measures goes to `convergence`, a pure policy (no clock, no IO) that computes the progress
// and makes the switchover decision. `crate::handle` holds `LiveHandle` and what it shares with
// the loop.
mod convergence;
mod options;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dirty::{DirtySet, DirtySource};
use crate::error::{BoxError, Error};
use crate::memory::GuestMemory;
use crate::send::{Sender, Summary};
use crate::session::Counters;
use convergence::{Convergence, Decision, SyncSample};

pub use crate::handle::{LiveHandle, Progress};
pub use convergence::SwitchoverReason;
pub use options::{LiveOptions, StallPolicy};

/// The embedder's side of the switchover. An error from a hook fails the migration with
/// [`Error::Guest`], which keeps it as its source.
///
/// The hooks say which side may run the guest: after [`resume`](Guest::resume) the source
/// runs it (the migration failed before the handover, and the destination discards its copy);
/// after [`handed_over`](Guest::handed_over) the destination does, and the source must never
/// run it again. Exactly one of the two is called once the guest was paused.
pub trait Guest {
    /// Stops the guest (its vCPUs): once this returns, nothing writes guest memory.
    fn pause(&mut self) -> Result<(), BoxError>;

    /// The device-state blob, taken while paused.
    fn device_state(&mut self) -> Result<Vec<u8>, BoxError>;

    /// Resumes the guest on the source after a failed or cancelled migration: the source
    /// kept the guest, since the handover was never decided (the guest must never stay paused,
    /// nor run in two places).
    fn resume(&mut self);

    /// The source handed the guest over: it must never resume here on its own again.
    ///
    /// `acknowledged`: the destination said it got the go and runs the guest; a VMM may tear
    /// the paused guest down. If not, the destination is in doubt (it holds the complete copy
    /// and waits for an operator, who should tell it to run), or its process died after it
    /// said it was ready (then the paused guest here is the only copy left): keep the paused
    /// guest until an operator knows which. The default does nothing.
    fn handed_over(&mut self, acknowledged: bool) {
        let _ = acknowledged;
    }
}

/// What a completed live migration did.
#[derive(Debug, Clone)]
pub struct LiveReport {
    /// Rounds sent, the final one included.
    pub rounds: u32,
    /// Why it switched over.
    pub reason: SwitchoverReason,
    /// The downtime expected at the switchover decision.
    pub expected_downtime: Duration,
    /// From pausing the guest to the receiver's acknowledgement of the go (or, unacknowledged,
    /// to sending it).
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
/// the guest's writes, `guest` pauses it and hands over its device state. Other threads steer
/// and watch it through the sender's [`LiveHandle`] ([`Sender::live_handle`], taken before this
/// call). On failure or cancel the session reports `failed`/`drained`, a paused guest is
/// resumed, and the error is returned; once the guest is handed over,
/// [`Guest::handed_over`] is called and the migration returns `Ok`.
pub fn migrate_live(
    sender: Sender,
    source: &mut dyn DirtySource,
    guest: &mut dyn Guest,
    options: &LiveOptions,
) -> Result<LiveReport, Error> {
    let handle = sender.live_handle();
    let mut convergence = Convergence::new(options);
    if sender.can_postcopy() {
        convergence.allow_postcopy();
    }
    let mut run = Run {
        started: Instant::now(),
        memory: Arc::clone(sender.memory()),
        counters: sender.counters(),
        sender: Some(sender),
        convergence,
        options,
        handle: &handle,
        paused: false,
    };
    let result = run.run(source, guest);
    if result.is_err() && run.paused {
        guest.resume();
        handle.update(|p| p.paused = false);
    }
    result
}

/// One live migration: owns the sender, reads the clock, and asks [`Convergence`] what to do.
struct Run<'a> {
    /// Taken by whatever ends the session.
    sender: Option<Sender>,
    memory: Arc<GuestMemory>,
    counters: Arc<Counters>,
    convergence: Convergence,
    options: &'a LiveOptions,
    handle: &'a LiveHandle,
    started: Instant,
    /// Whether the guest is paused (and must resume if the migration fails).
    paused: bool,
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
    ) -> Result<LiveReport, Error> {
        let total_bytes = self.memory.total_bytes();
        self.handle
            .start(Arc::clone(&self.counters), total_bytes, self.started);
        if self.sender()?.shares_memory() {
            // The destination maps this very memory: no page to track or send.
            let nothing = DirtySet::none(&self.memory);
            return self.switchover(None, guest, nothing, SwitchoverReason::SharedMemory);
        }
        if let Err(e) = source.start(&self.memory) {
            return Err(self.fail(Error::Dirty(e)));
        }
        let (pending, reason) = self.precopy(source)?;
        self.switchover(Some(source), guest, pending, reason)
    }

    /// Round 1 (every page), then a dirty sync and a round of what it found until the policy
    /// says to switch over: returns the pages the last sync found, still to send, and why.
    fn precopy(
        &mut self,
        source: &mut dyn DirtySource,
    ) -> Result<(DirtySet, SwitchoverReason), Error> {
        let mut round_start = Instant::now();
        let mut round_bytes = self.counters.sent();
        let every_page = DirtySet::all(&self.memory);
        self.sender()?.round(&every_page)?;
        let mut last_sync = round_start;
        loop {
            // The dirty sync that starts the next round.
            let sync_start = Instant::now();
            let dirty = match source.harvest(&self.memory) {
                Ok(dirty) => dirty,
                Err(e) => return Err(self.fail(Error::Dirty(e))),
            };
            let now = Instant::now();
            let progress = self.convergence.observe(SyncSample {
                bytes_sent: self.counters.sent() - round_bytes,
                round_time: now.duration_since(round_start),
                pages_dirtied: dirty.count(),
                sync_interval: now.duration_since(last_sync),
                sync_time: now.duration_since(sync_start),
                bytes_queued: self.counters.in_flight(),
            });
            last_sync = now;
            self.handle.update(|p| *p = progress);
            if self.handle.postcopy_requested() {
                self.convergence.request_postcopy();
            }
            match self.convergence.decide(self.started.elapsed()) {
                Decision::Continue => {}
                Decision::Switchover(reason) => return Ok((dirty, reason)),
                Decision::Fail(err) => return Err(self.fail(err)),
            }
            round_start = now;
            round_bytes = self.counters.sent();
            self.sender()?.round(&dirty)?;
        }
    }

    /// Pauses the guest, (waits for `proceed`,) syncs once more, sends `pending` and what that
    /// sync found straight from the frozen memory, then the device state.
    fn switchover(
        &mut self,
        source: Option<&mut dyn DirtySource>,
        guest: &mut dyn Guest,
        pending: DirtySet,
        reason: SwitchoverReason,
    ) -> Result<LiveReport, Error> {
        let paused_at = Instant::now();
        if let Err(source) = guest.pause() {
            return Err(self.fail(Error::Guest {
                op: "pause",
                source,
            }));
        }
        self.paused = true;
        self.handle.update(|p| p.paused = true);
        let paused_bytes = self.counters.sent();
        self.handle.paused_at(paused_bytes);
        self.sender()?.switchover()?;
        if self.options.pause_before_switchover && !self.handle.wait_to_proceed() {
            return Err(self.fail(Error::Cancelled));
        }
        let mut last = pending;
        match source.map(|source| source.harvest(&self.memory)) {
            Some(Ok(dirty)) => last.union(&dirty),
            Some(Err(e)) => return Err(self.fail(Error::Dirty(e))),
            None => {}
        }
        if reason.is_postcopy() {
            let paused = (paused_at, paused_bytes);
            return self.postcopy(guest, &last, reason, paused);
        }
        self.sender()?.round(&last)?;
        let device_state = self.device_state(guest)?;
        let sender = self.sender.take().ok_or(Error::Ended)?;
        let summary = sender.finish(&device_state)?;
        // From here the guest belongs to the destination.
        self.paused = false;
        guest.handed_over(summary.acknowledged);
        // Everything is across now.
        self.handle.update(|p| p.remaining_bytes = 0);
        let progress = self.convergence.progress();
        Ok(LiveReport {
            rounds: summary.rounds,
            reason,
            expected_downtime: progress.expected_downtime,
            downtime: summary.confirmed.saturating_duration_since(paused_at),
            downtime_bytes: self.counters.sent().saturating_sub(paused_bytes),
            last: progress,
            stalled_syncs: self.convergence.stalled_syncs(),
            summary,
        })
    }

    /// The paused guest's device state; a failing hook fails the migration.
    fn device_state(&mut self, guest: &mut dyn Guest) -> Result<Vec<u8>, Error> {
        guest.device_state().map_err(|source| {
            let op = "save its device state";
            self.fail(Error::Guest { op, source })
        })
    }

    /// Switches to postcopy with the guest paused (at `paused.0`, `paused.1` bytes sent):
    /// the pages in `discard` are fetched by the destination, which runs the guest from the
    /// go on. Once the sender committed, the guest never resumes here: if postcopy then
    /// pauses, the guest is handed over unacknowledged (keep it paused) and the error says
    /// the migration is paused.
    fn postcopy(
        &mut self,
        guest: &mut dyn Guest,
        discard: &DirtySet,
        reason: SwitchoverReason,
        paused: (Instant, u64),
    ) -> Result<LiveReport, Error> {
        let (paused_at, paused_bytes) = paused;
        let device_state = self.device_state(guest)?;
        let sender = self.sender.take().ok_or(Error::Ended)?;
        let postcopy = sender.postcopy(discard, &device_state)?;
        // Handed over: the destination runs the guest (or will, once postcopy recovers).
        self.paused = false;
        let summary = match postcopy.run() {
            Ok(summary) => summary,
            Err(err) => {
                guest.handed_over(false);
                return Err(err);
            }
        };
        guest.handed_over(summary.acknowledged);
        self.handle.update(|p| p.remaining_bytes = 0);
        let progress = self.convergence.progress();
        let postcopy_bytes = summary.postcopy.map_or(0, |p| p.bytes);
        Ok(LiveReport {
            rounds: summary.rounds,
            reason,
            expected_downtime: progress.expected_downtime,
            downtime: summary.confirmed.saturating_duration_since(paused_at),
            downtime_bytes: self
                .counters
                .sent()
                .saturating_sub(paused_bytes)
                .saturating_sub(postcopy_bytes),
            last: progress,
            stalled_syncs: self.convergence.stalled_syncs(),
            summary,
        })
    }
}

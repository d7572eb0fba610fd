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

use super::options::{LiveOptions, StallPolicy};
use crate::error::Error;
use crate::handle::Progress;
use crate::memory::PAGE_SIZE;

/// Rounds sending less than this keep the previous bandwidth estimate: too few bytes say
/// little about the link.
const MIN_MEASURED_ROUND_BYTES: u64 = 1 << 20;

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
    /// Postcopy was asked for ([`LiveHandle::start_postcopy`](crate::LiveHandle::start_postcopy),
    /// or [`LiveOptions::postcopy_after_first_round`]).
    PostcopyRequested,
    /// A stall, with [`StallPolicy::Postcopy`].
    PostcopyStalled,
    /// The receiver took the memory by descriptor (a same-host migration): there is nothing
    /// to copy, so the guest pauses at once and only its device state crosses.
    SharedMemory,
}

impl SwitchoverReason {
    /// Whether the migration switches to postcopy (else it ends with a final round).
    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            SwitchoverReason::PostcopyRequested | SwitchoverReason::PostcopyStalled
        )
    }
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
    /// Whether the migration can switch to postcopy, and whether it was asked to.
    postcopy_possible: bool,
    postcopy_requested: bool,
}

impl Convergence {
    /// A migration deciding by `options`, before its first sync.
    pub(super) fn new(options: &LiveOptions) -> Self {
        Convergence {
            options: options.clone(),
            progress: Progress::default(),
            best_remaining: u64::MAX,
            stalled_syncs: 0,
            postcopy_possible: false,
            postcopy_requested: false,
        }
    }

    /// The session can switch to postcopy (it has a fault channel).
    pub(super) fn allow_postcopy(&mut self) {
        self.postcopy_possible = true;
    }

    /// Postcopy was asked for: the next decision switches to it, unless pre-copy converged.
    pub(super) fn request_postcopy(&mut self) {
        self.postcopy_requested = true;
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
        // Asked for up front, postcopy comes right after round 1, whatever pre-copy could do.
        if self.postcopy_possible && options.postcopy_after_first_round {
            return Decision::Switchover(SwitchoverReason::PostcopyRequested);
        }
        if progress.expected_downtime <= options.downtime_limit {
            return Decision::Switchover(SwitchoverReason::Converged);
        }
        // Asked for meanwhile, as QEMU's migrate-start-postcopy: unless pre-copy can finish
        // now.
        if self.postcopy_possible && self.postcopy_requested {
            return Decision::Switchover(SwitchoverReason::PostcopyRequested);
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
            StallPolicy::Postcopy if self.postcopy_possible => {
                Decision::Switchover(SwitchoverReason::PostcopyStalled)
            }
            StallPolicy::Continue | StallPolicy::Postcopy => Decision::Continue,
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

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::{Continue, Fail, Switchover};
    use SwitchoverReason::{Converged, MaxRounds, MaxTime, Stalled};
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = PAGE_SIZE as u64;
    /// The sync time of every hand-written sample.
    const SYNC: Duration = Duration::from_millis(10);

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// A round that sent `bytes_sent` in `round_ms`, ended by a 10 ms sync `round_ms` after the
    /// previous one that found `pages` dirty, with nothing still queued.
    fn round(bytes_sent: u64, round_ms: u64, pages: u64) -> SyncSample {
        SyncSample {
            bytes_sent,
            round_time: ms(round_ms),
            pages_dirtied: pages,
            sync_interval: ms(round_ms),
            sync_time: SYNC,
            bytes_queued: 0,
        }
    }

    /// The progress at `round` with a 10 ms sync and every other figure zero.
    fn at(round: u32) -> Progress {
        Progress {
            round,
            sync_time: SYNC,
            ..Progress::default()
        }
    }

    /// A decision, comparable: [`Decision::Fail`] holds an [`Error`], which is not `PartialEq`.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Continue,
        Switchover(SwitchoverReason),
        /// [`Error::Stalled`] with these fields.
        Fail {
            rounds: u32,
            remaining: u64,
            dirty_rate: u64,
            bandwidth: u64,
        },
    }

    fn outcome(decision: Decision) -> Outcome {
        match decision {
            Decision::Continue => Continue,
            Decision::Switchover(reason) => Switchover(reason),
            Decision::Fail(Error::Stalled {
                rounds,
                remaining,
                dirty_rate,
                bandwidth,
            }) => Fail {
                rounds,
                remaining,
                dirty_rate,
                bandwidth,
            },
            Decision::Fail(other) => panic!("not a stall: {other}"),
        }
    }

    /// One golden step: a sample, and the progress and decision it must yield.
    struct Step {
        sample: SyncSample,
        progress: Progress,
        outcome: Outcome,
    }

    /// Feeds `steps` to a policy with `options` and checks each step's progress and decision.
    /// The time since the start is the sum of the round times, as in the loop, where each
    /// round starts when the previous sync ends.
    fn play(options: &LiveOptions, steps: &[Step]) -> Convergence {
        let mut convergence = Convergence::new(options);
        let mut elapsed = Duration::ZERO;
        for (i, step) in steps.iter().enumerate() {
            elapsed += step.sample.round_time;
            let progress = convergence.observe(step.sample);
            assert_eq!(progress, step.progress, "progress after sample {}", i + 1);
            assert_eq!(
                convergence.progress(),
                progress,
                "kept after sample {}",
                i + 1
            );
            let decision = outcome(convergence.decide(elapsed));
            assert_eq!(decision, step.outcome, "decision after sample {}", i + 1);
        }
        convergence
    }

    #[test]
    fn a_guest_that_converges_in_round_3() {
        let steps = [
            // 100 MiB/s; 50 MiB dirty take 500 ms, plus the sync.
            Step {
                sample: round(100 * MIB, 1000, 12_800),
                progress: Progress {
                    remaining_bytes: 50 * MIB,
                    bandwidth: 100 * MIB,
                    dirty_pages_rate: 12_800,
                    expected_downtime: ms(510),
                    ..at(1)
                },
                outcome: Continue,
            },
            Step {
                sample: round(50 * MIB, 500, 9_600),
                progress: Progress {
                    remaining_bytes: 37 * MIB + MIB / 2,
                    bandwidth: 100 * MIB,
                    dirty_pages_rate: 19_200,
                    expected_downtime: ms(385),
                    ..at(2)
                },
                outcome: Continue,
            },
            // 10 MiB left: 100 ms + 10 ms fits 300 ms.
            Step {
                sample: round(37 * MIB + MIB / 2, 375, 2_560),
                progress: Progress {
                    remaining_bytes: 10 * MIB,
                    bandwidth: 100 * MIB,
                    dirty_pages_rate: 6_826,
                    expected_downtime: ms(110),
                    ..at(3)
                },
                outcome: Switchover(Converged),
            },
        ];
        let convergence = play(&LiveOptions::default(), &steps);
        assert_eq!(convergence.stalled_syncs(), 0);
    }

    #[test]
    fn a_small_round_keeps_the_bandwidth_estimate_unless_there_is_none() {
        let steps = [
            // No estimate yet: half a MiB in 1 s is measured.
            Step {
                sample: round(MIB / 2, 1000, 512),
                progress: Progress {
                    remaining_bytes: 2 * MIB,
                    bandwidth: MIB / 2,
                    dirty_pages_rate: 512,
                    expected_downtime: ms(4010),
                    ..at(1)
                },
                outcome: Continue,
            },
            // A quarter MiB says little: the estimate stays half a MiB per second.
            Step {
                sample: round(MIB / 4, 1000, 384),
                progress: Progress {
                    remaining_bytes: 3 * MIB / 2,
                    bandwidth: MIB / 2,
                    dirty_pages_rate: 384,
                    expected_downtime: ms(3010),
                    ..at(2)
                },
                outcome: Continue,
            },
            // Exactly 1 MiB is measured again: 2 MiB/s.
            Step {
                sample: round(MIB, 500, 256),
                progress: Progress {
                    remaining_bytes: MIB,
                    bandwidth: 2 * MIB,
                    dirty_pages_rate: 512,
                    expected_downtime: ms(510),
                    ..at(3)
                },
                outcome: Continue,
            },
        ];
        play(&LiveOptions::default(), &steps);
    }

    #[test]
    fn bytes_still_queued_count_in_the_expected_downtime() {
        let queued = SyncSample {
            bytes_queued: 20 * MIB,
            ..round(100 * MIB, 1000, 2_560)
        };
        let steps = [Step {
            sample: queued,
            progress: Progress {
                remaining_bytes: 10 * MIB,
                bandwidth: 100 * MIB,
                dirty_pages_rate: 2_560,
                expected_downtime: ms(310),
                ..at(1)
            },
            outcome: Continue,
        }];
        play(&LiveOptions::default(), &steps);
    }

    #[test]
    fn the_dirty_rate_is_over_the_time_since_the_previous_sync() {
        let sample = SyncSample {
            sync_interval: ms(500),
            ..round(100 * MIB, 1000, 12_800)
        };
        let steps = [Step {
            sample,
            progress: Progress {
                remaining_bytes: 50 * MIB,
                bandwidth: 100 * MIB,
                dirty_pages_rate: 25_600,
                expected_downtime: ms(510),
                ..at(1)
            },
            outcome: Continue,
        }];
        play(&LiveOptions::default(), &steps);
    }

    #[test]
    fn no_bandwidth_or_an_overflow_expects_an_unbounded_downtime() {
        let instant = SyncSample {
            round_time: Duration::ZERO,
            sync_interval: Duration::ZERO,
            ..round(MIB, 0, 1)
        };
        // The most bytes a sample can report, at 1 byte/s: too long for a Duration.
        let huge = SyncSample {
            bytes_queued: PAGE - 1,
            ..round(1, 1000, u64::MAX / PAGE)
        };
        let steps = [
            // A round that took no time measures nothing, nor does a sync right after another.
            Step {
                sample: instant,
                progress: Progress {
                    remaining_bytes: PAGE,
                    expected_downtime: Duration::MAX,
                    ..at(1)
                },
                outcome: Continue,
            },
            // Nothing sent: still no bandwidth.
            Step {
                sample: round(0, 1000, 1),
                progress: Progress {
                    remaining_bytes: PAGE,
                    dirty_pages_rate: 1,
                    expected_downtime: Duration::MAX,
                    rounds_without_progress: 1,
                    ..at(2)
                },
                outcome: Continue,
            },
            // Still no estimate, so one page in 1 s is measured: 4096 B/s.
            Step {
                sample: round(PAGE, 1000, 1),
                progress: Progress {
                    remaining_bytes: PAGE,
                    bandwidth: PAGE,
                    dirty_pages_rate: 1,
                    expected_downtime: ms(1010),
                    rounds_without_progress: 2,
                    ..at(3)
                },
                outcome: Continue,
            },
        ];
        play(&LiveOptions::default(), &steps);
        let mut convergence = Convergence::new(&LiveOptions::default());
        let progress = convergence.observe(huge);
        assert_eq!(progress.bandwidth, 1);
        assert_eq!(progress.remaining_bytes, u64::MAX - (PAGE - 1));
        assert_eq!(progress.expected_downtime, Duration::MAX);
    }

    #[test]
    fn max_rounds_switches_over_at_that_round() {
        let options = LiveOptions {
            max_rounds: Some(2),
            ..LiveOptions::default()
        };
        let slow = Progress {
            remaining_bytes: 100 * MIB,
            bandwidth: 100 * MIB,
            dirty_pages_rate: 25_600,
            expected_downtime: ms(1010),
            ..at(1)
        };
        let steps = [
            Step {
                sample: round(100 * MIB, 1000, 25_600),
                progress: slow,
                outcome: Continue,
            },
            Step {
                sample: round(100 * MIB, 1000, 25_600),
                progress: Progress {
                    round: 2,
                    rounds_without_progress: 1,
                    ..slow
                },
                outcome: Switchover(MaxRounds),
            },
        ];
        play(&options, &steps);
    }

    #[test]
    fn max_time_switches_over_once_it_passed() {
        let options = LiveOptions {
            max_time: Some(ms(2500)),
            ..LiveOptions::default()
        };
        let mut convergence = Convergence::new(&options);
        let sample = round(100 * MIB, 1000, 25_600);
        convergence.observe(sample);
        assert_eq!(outcome(convergence.decide(ms(1000))), Continue);
        convergence.observe(sample);
        assert_eq!(outcome(convergence.decide(ms(2499))), Continue);
        assert_eq!(outcome(convergence.decide(ms(2500))), Switchover(MaxTime));
    }

    /// Three samples with 100 MiB dirty (never shrinking): with `stall_rounds` 2 the third is
    /// stalled and yields `policy_outcome`.
    fn stall_steps(policy_outcome: Outcome) -> Vec<Step> {
        let flat = Progress {
            remaining_bytes: 100 * MIB,
            bandwidth: 100 * MIB,
            dirty_pages_rate: 25_600,
            expected_downtime: ms(1010),
            ..at(1)
        };
        let after = |round, rounds_without_progress| Progress {
            round,
            rounds_without_progress,
            stalled: rounds_without_progress >= 2,
            ..flat
        };
        let sample = round(100 * MIB, 1000, 25_600);
        vec![
            Step {
                sample,
                progress: after(1, 0),
                outcome: Continue,
            },
            Step {
                sample,
                progress: after(2, 1),
                outcome: Continue,
            },
            Step {
                sample,
                progress: after(3, 2),
                outcome: policy_outcome,
            },
        ]
    }

    /// Postcopy asked for switches at the next decision, unless pre-copy converged; a stall
    /// with the postcopy policy switches to it; a session without a fault channel does
    /// neither and goes on.
    #[test]
    fn postcopy_is_taken_when_asked_or_stalled_and_possible() {
        use SwitchoverReason::{Converged, PostcopyRequested, PostcopyStalled};
        let slow = round(100 * MIB, 1000, 60_000);
        let mut asked = Convergence::new(&LiveOptions::default());
        asked.observe(slow);
        asked.request_postcopy();
        assert_eq!(
            outcome(asked.decide(ms(1000))),
            Continue,
            "no fault channel"
        );
        asked.allow_postcopy();
        assert_eq!(
            outcome(asked.decide(ms(1000))),
            Switchover(PostcopyRequested)
        );

        // Asked for meanwhile, it gives way to a pre-copy that can finish now; asked for up
        // front, it does not.
        let mut fits = Convergence::new(&LiveOptions::default());
        fits.allow_postcopy();
        fits.request_postcopy();
        fits.observe(round(100 * MIB, 1000, 256));
        assert_eq!(outcome(fits.decide(ms(1000))), Switchover(Converged));
        let mut first = Convergence::new(&LiveOptions {
            postcopy_after_first_round: true,
            ..LiveOptions::default()
        });
        first.allow_postcopy();
        first.observe(round(100 * MIB, 1000, 256));
        assert_eq!(
            outcome(first.decide(ms(1000))),
            Switchover(PostcopyRequested)
        );

        let mut after_first = Convergence::new(&LiveOptions {
            postcopy_after_first_round: true,
            ..LiveOptions::default()
        });
        after_first.allow_postcopy();
        after_first.observe(slow);
        assert_eq!(
            outcome(after_first.decide(ms(1000))),
            Switchover(PostcopyRequested)
        );

        for possible in [false, true] {
            let mut stalled = Convergence::new(&stalling(StallPolicy::Postcopy));
            if possible {
                stalled.allow_postcopy();
            }
            for _ in 0..3 {
                stalled.observe(slow);
            }
            let want = if possible {
                Switchover(PostcopyStalled)
            } else {
                Continue
            };
            assert_eq!(
                outcome(stalled.decide(ms(3000))),
                want,
                "possible: {possible}"
            );
        }
    }

    fn stalling(on_stall: StallPolicy) -> LiveOptions {
        LiveOptions {
            stall_rounds: 2,
            on_stall,
            ..LiveOptions::default()
        }
    }

    #[test]
    fn a_stall_with_continue_goes_on_and_counts_stalled_syncs() {
        let mut steps = stall_steps(Continue);
        let more = Progress {
            round: 4,
            rounds_without_progress: 3,
            remaining_bytes: 150 * MIB,
            dirty_pages_rate: 38_400,
            expected_downtime: ms(1510),
            ..steps[2].progress
        };
        // More dirty, then as much as the best: neither is progress.
        steps.push(Step {
            sample: round(100 * MIB, 1000, 38_400),
            progress: more,
            outcome: Continue,
        });
        steps.push(Step {
            sample: round(100 * MIB, 1000, 25_600),
            progress: Progress {
                round: 5,
                rounds_without_progress: 4,
                ..steps[2].progress
            },
            outcome: Continue,
        });
        // Fewer pages than the best is progress: the stall is over.
        steps.push(Step {
            sample: round(100 * MIB, 1000, 12_800),
            progress: Progress {
                remaining_bytes: 50 * MIB,
                bandwidth: 100 * MIB,
                dirty_pages_rate: 12_800,
                expected_downtime: ms(510),
                ..at(6)
            },
            outcome: Continue,
        });
        let convergence = play(&stalling(StallPolicy::Continue), &steps);
        assert_eq!(convergence.stalled_syncs(), 3);
    }

    #[test]
    fn a_stall_with_switchover_switches_over() {
        let steps = stall_steps(Switchover(Stalled));
        let convergence = play(&stalling(StallPolicy::Switchover), &steps);
        assert_eq!(convergence.stalled_syncs(), 1);
    }

    #[test]
    fn a_stall_with_fail_fails_with_the_figures_of_that_sync() {
        let steps = stall_steps(Fail {
            rounds: 3,
            remaining: 100 * MIB,
            dirty_rate: 100 * MIB,
            bandwidth: 100 * MIB,
        });
        play(&stalling(StallPolicy::Fail), &steps);
    }

    #[test]
    fn zero_stall_rounds_means_one() {
        let options = LiveOptions {
            stall_rounds: 0,
            on_stall: StallPolicy::Switchover,
            ..LiveOptions::default()
        };
        let mut convergence = Convergence::new(&options);
        let sample = round(100 * MIB, 1000, 25_600);
        let first = convergence.observe(sample);
        assert_eq!((first.rounds_without_progress, first.stalled), (0, false));
        assert_eq!(outcome(convergence.decide(ms(1000))), Continue);
        let second = convergence.observe(sample);
        assert_eq!((second.rounds_without_progress, second.stalled), (1, true));
        assert_eq!(outcome(convergence.decide(ms(2000))), Switchover(Stalled));
    }

    #[test]
    fn the_rules_apply_in_order_converged_rounds_time_stall() {
        let options = LiveOptions {
            max_rounds: Some(1),
            max_time: Some(Duration::ZERO),
            stall_rounds: 1,
            on_stall: StallPolicy::Fail,
            ..LiveOptions::default()
        };
        let fits = round(100 * MIB, 1000, 256);
        let slow = round(100 * MIB, 1000, 25_600);
        let mut convergence = Convergence::new(&options);
        convergence.observe(fits);
        assert_eq!(outcome(convergence.decide(ms(1000))), Switchover(Converged));
        // Stalled now (no fewer pages than the best), past every bound.
        convergence.observe(slow);
        assert!(convergence.progress().stalled);
        assert_eq!(outcome(convergence.decide(ms(2000))), Switchover(MaxRounds));
        let options = LiveOptions {
            max_rounds: None,
            ..options
        };
        let mut convergence = Convergence::new(&options);
        convergence.observe(fits);
        convergence.observe(slow);
        assert_eq!(outcome(convergence.decide(ms(2000))), Switchover(MaxTime));
    }

    #[test]
    fn helpers_saturate() {
        assert_eq!(per_second(MIB, Duration::ZERO), 0);
        assert_eq!(per_second(MIB, ms(500)), 2 * MIB);
        assert_eq!(per_second(u64::MAX, Duration::from_nanos(1)), u64::MAX);
        assert_eq!(expected_downtime(MIB, 0, SYNC), Duration::MAX);
        assert_eq!(expected_downtime(u64::MAX, 1, SYNC), Duration::MAX);
        // Fits a Duration, but not with the sync added.
        let longest = u64::MAX - (PAGE - 1);
        assert_eq!(
            expected_downtime(longest, 1, Duration::ZERO),
            Duration::from_secs(longest)
        );
        assert_eq!(
            expected_downtime(longest, 1, Duration::from_secs(PAGE)),
            Duration::MAX
        );
    }

    fn any_policy() -> impl Strategy<Value = StallPolicy> {
        prop_oneof![
            Just(StallPolicy::Continue),
            Just(StallPolicy::Switchover),
            Just(StallPolicy::Fail),
            Just(StallPolicy::Postcopy),
        ]
    }

    /// Dirty page counts falling by 1 to 4096 pages a round, down to none.
    fn shrinking() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(1u64..=4_096, 1..32).prop_map(|drops| {
            let mut pages: u64 = drops.iter().sum();
            let mut counts = vec![pages];
            for drop in drops {
                pages -= drop;
                counts.push(pages);
            }
            counts
        })
    }

    /// A round of 1 s that sent `bytes_sent`, ended by a sync of `sync_time` finding `pages`.
    fn second(bytes_sent: u64, pages: u64, sync_time: Duration) -> SyncSample {
        SyncSample {
            sync_time,
            ..round(bytes_sent, 1000, pages)
        }
    }

    proptest! {
        /// At a constant bandwidth, a dirty set that shrinks every round never stalls, goes on
        /// while (remaining / bandwidth + sync) exceeds the limit, and switches over as
        /// converged once it fits, at the latest when nothing is left.
        #[test]
        fn a_shrinking_dirty_set_converges_without_a_stall(
            pages in shrinking(),
            bandwidth in MIB..=1_024 * MIB,
            limit_ms in 1u64..=1_000,
            sync_ms in 0u64..=1_000,
            stall_rounds in 0u32..=8,
            on_stall in any_policy(),
        ) {
            let limit = ms(limit_ms);
            let sync = ms(sync_ms.min(limit_ms));
            let options = LiveOptions {
                downtime_limit: limit,
                stall_rounds,
                on_stall,
                ..LiveOptions::default()
            };
            let mut convergence = Convergence::new(&options);
            let mut elapsed = Duration::ZERO;
            let mut converged = false;
            for &count in &pages {
                elapsed += Duration::from_secs(1);
                let progress = convergence.observe(second(bandwidth, count, sync));
                prop_assert_eq!(progress.bandwidth, bandwidth);
                prop_assert_eq!(progress.remaining_bytes, count * PAGE);
                prop_assert_eq!(progress.rounds_without_progress, 0);
                prop_assert!(!progress.stalled);
                // The downtime in exact integers; the policy's floats may be a few ns off.
                let exact = u128::from(count * PAGE) * 1_000_000_000 / u128::from(bandwidth)
                    + sync.as_nanos();
                prop_assert!(progress.expected_downtime.as_nanos().abs_diff(exact) <= 1_000);
                let decision = outcome(convergence.decide(elapsed));
                if decision == Switchover(Converged) {
                    prop_assert!(exact <= limit.as_nanos() + 1_000, "converged too early");
                    converged = true;
                    break;
                }
                prop_assert_eq!(decision, Continue);
                prop_assert!(exact + 1_000 > limit.as_nanos(), "fit but went on");
            }
            prop_assert!(converged, "never converged: {:?}", convergence.progress());
            prop_assert_eq!(convergence.stalled_syncs(), 0);
        }

        /// When no sync finds fewer dirty pages than the first, sync n has n - 1 rounds without
        /// progress, and the stall shows from the sync after K = stall_rounds (at least 1) such
        /// rounds on, not before.
        #[test]
        fn a_dirty_set_that_never_shrinks_stalls_after_exactly_k_rounds(
            first in 0u64..=100_000,
            more in prop::collection::vec(0u64..=100_000, 0..24),
            stall_rounds in 0u32..=12,
            bandwidth in 1u64..=1_024 * MIB,
        ) {
            let options = LiveOptions {
                downtime_limit: Duration::ZERO,
                stall_rounds,
                on_stall: StallPolicy::Continue,
                ..LiveOptions::default()
            };
            let k = stall_rounds.max(1);
            let mut convergence = Convergence::new(&options);
            let mut elapsed = Duration::ZERO;
            let mut stalled = 0;
            let counts = std::iter::once(first).chain(more.iter().map(|extra| first + extra));
            for (without, count) in (0u32..).zip(counts) {
                elapsed += Duration::from_secs(1);
                let progress = convergence.observe(second(bandwidth, count, ms(1)));
                prop_assert_eq!(progress.rounds_without_progress, without);
                prop_assert_eq!(progress.stalled, without >= k, "after {} rounds", without);
                stalled += u32::from(progress.stalled);
                prop_assert_eq!(convergence.stalled_syncs(), stalled);
                prop_assert_eq!(outcome(convergence.decide(elapsed)), Continue);
            }
        }

        /// At the first stalled sync (the (K + 1)-th without fewer dirty pages) the outcome is
        /// the stall policy's, unless a bound fires first; before it, only a bound ends the
        /// pre-copy.
        #[test]
        fn the_first_stalled_sync_does_what_the_policy_says(
            on_stall in any_policy(),
            stall_rounds in 1u32..=8,
            pages in 1u64..=100_000,
            max_rounds in prop::option::weighted(0.25, 1u32..=12),
            max_time_s in prop::option::weighted(0.25, 1u64..=12),
        ) {
            let options = LiveOptions {
                downtime_limit: Duration::ZERO,
                max_rounds,
                max_time: max_time_s.map(Duration::from_secs),
                stall_rounds,
                on_stall,
                ..LiveOptions::default()
            };
            let mut convergence = Convergence::new(&options);
            let first_stall = stall_rounds + 1;
            for round in 1..=first_stall {
                let progress = convergence.observe(second(100 * MIB, pages, SYNC));
                prop_assert_eq!(progress.stalled, round == first_stall);
                let decision = outcome(convergence.decide(Duration::from_secs(round.into())));
                if max_rounds.is_some_and(|max| round >= max) {
                    prop_assert_eq!(decision, Switchover(MaxRounds));
                    return Ok(());
                }
                if max_time_s.is_some_and(|max| u64::from(round) >= max) {
                    prop_assert_eq!(decision, Switchover(MaxTime));
                    return Ok(());
                }
                let expected = match (round == first_stall, on_stall) {
                    // Without a fault channel (not allowed here), postcopy's policy goes on.
                    (false, _) | (true, StallPolicy::Continue | StallPolicy::Postcopy) => Continue,
                    (true, StallPolicy::Switchover) => Switchover(Stalled),
                    (true, StallPolicy::Fail) => Fail {
                        rounds: first_stall,
                        remaining: pages * PAGE,
                        dirty_rate: pages * PAGE,
                        bandwidth: 100 * MIB,
                    },
                };
                prop_assert_eq!(decision, expected);
            }
        }
    }
}

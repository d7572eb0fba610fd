//! Progress while a migration runs: the source machine gets its figures every 100 ms and, on a
//! terminal only, stderr shows a line for the migration and one per channel.
//!
//! The migration's line shows the round being sent (the `pass N` of the events), a bar of that
//! round with its percentage, the bytes it still has to send, the rate over the last sample
//! and, once a dirty sync has measured it, the expected downtime:
//!
//! ```text
//! migration round 2 [==============>                 ]  45%  remaining 12.3 MiB  95.1 MiB/s  expected downtime 131.2ms
//!       ch0   47.6 MiB/s  61.2 MiB sent
//!       ch1   47.5 MiB/s  60.9 MiB sent
//! ```
//!
//! The round and its remaining bytes come from the session's live [`Counters`] (updated as
//! pages are handed to the channels), not from [`LiveHandle::progress`], which is computed at
//! each dirty sync only: before the first sync, all through round 1, it is still the default
//! (round 0, nothing remaining, a zero expected downtime), and after sync N it says round N
//! while round N+1 is being sent. The expected downtime is only known from that first sync on.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ramjet_dataplane::memory::PAGE_SIZE;
use ramjet_dataplane::{Counters, LiveHandle, Progress};

use crate::console;
use crate::events::Events;
use crate::units::Bytes;

/// How often the figures are sampled.
const PERIOD: Duration = Duration::from_millis(100);

/// The sampling thread.
pub struct Watcher {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts sampling a send session (`live` for a live migration).
    pub fn start(
        live: Option<LiveHandle>,
        events: Events,
        counters: Arc<Counters>,
        channels: u16,
    ) -> Watcher {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let thread =
            thread::spawn(move || watch(live.as_ref(), &events, &counters, channels, &flag));
        Watcher {
            done,
            thread: Some(thread),
        }
    }

    /// Stops sampling and clears the lines.
    pub fn stop(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// The lines of one migration, removed from the screen when dropped.
///
/// Each line is one message, set once per sample: a line whose parts were set one by one could
/// be drawn half updated (indicatif draws at most 20 times a second, on the first change).
struct Lines {
    whole: ProgressBar,
    lanes: Vec<ProgressBar>,
}

impl Lines {
    fn new(channels: u16) -> Self {
        let whole = line(String::new(), "migration starting".to_owned());
        let lanes = (0..channels)
            .map(|c| line(format!("ch{c}"), String::new()))
            .collect();
        Lines { whole, lanes }
    }
}

/// A line of `prefix` (right-aligned under `migration`) and `message`, added to the process's
/// bars only once both are set, so that nothing is drawn before.
fn line(prefix: String, message: String) -> ProgressBar {
    let template = if prefix.is_empty() {
        "{msg}"
    } else {
        "{prefix:>9} {msg}"
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()).with_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(prefix);
    bar.set_message(message);
    console::bars().add(bar)
}

impl Drop for Lines {
    fn drop(&mut self) {
        for bar in std::iter::once(&self.whole).chain(&self.lanes) {
            bar.finish_and_clear();
            console::bars().remove(bar);
        }
    }
}

fn watch(
    live: Option<&LiveHandle>,
    events: &Events,
    counters: &Counters,
    channels: u16,
    done: &AtomicBool,
) {
    let lines = Lines::new(channels);
    let mut round = RoundBar::default();
    let mut last = (Instant::now(), vec![0u64; usize::from(channels)]);
    while !done.load(Ordering::Relaxed) {
        thread::park_timeout(PERIOD);
        if done.load(Ordering::Relaxed) {
            break;
        }
        let elapsed = last.0.elapsed().as_secs_f64().max(1e-3);
        last.0 = Instant::now();
        let mut sent_since = 0;
        for (c, bar) in lines.lanes.iter().enumerate() {
            let sent = counters.channel_sent(u16::try_from(c).unwrap_or(u16::MAX));
            let delta = sent.saturating_sub(last.1[c]);
            last.1[c] = sent;
            sent_since += delta;
            let rate = Bytes(per_second(delta, elapsed)).to_string();
            bar.set_message(format!("{rate:>10}/s  {} sent", Bytes(sent)));
        }
        let stats = counters.snapshot();
        let (progress, total) = match live {
            Some(handle) => {
                let progress = handle.progress();
                let stats = handle.ram_stats();
                if let Some(stats) = stats {
                    events.with(|m| {
                        m.set_ram_stats(stats);
                        // Unknown (and reported as zero) until the first dirty sync:
                        // query-migrate leaves it out until then.
                        if progress.round > 0 {
                            m.set_expected_downtime(progress.expected_downtime);
                        }
                    });
                }
                (Some(progress), stats.map(|s| s.total))
            }
            None => (None, None),
        };
        let sample = Sample {
            round: stats.rounds,
            remaining: stats.remaining_pages.saturating_mul(PAGE_SIZE as u64),
            encoded: stats.pages().saturating_mul(PAGE_SIZE as u64),
            rate: per_second(sent_since, elapsed),
            total,
            progress,
        };
        if let Some(shown) = round.show(&sample) {
            lines.whole.set_message(shown);
        }
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "a float-to-integer `as` saturates, which is right for a rate"
)]
fn per_second(bytes: u64, seconds: f64) -> u64 {
    (bytes as f64 / seconds) as u64
}

/// One sample of a send session.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// The round being sent (rounds started): the `pass N` of the events.
    round: u64,
    /// Bytes of that round not yet handed to the channels.
    remaining: u64,
    /// Bytes of pages encoded so far, in every round.
    encoded: u64,
    /// Bytes sent per second since the previous sample.
    rate: u64,
    /// The guest's size (a live migration only): what round 1 sends.
    total: Option<u64>,
    /// The live migration's progress as of its last dirty sync.
    progress: Option<Progress>,
}

/// The bar of the round being sent, across samples.
#[derive(Debug, Default)]
struct RoundBar {
    round: u64,
    /// The round's size: what it started with when that is known, else the most seen
    /// remaining.
    size: u64,
}

impl RoundBar {
    /// The migration's line for `sample`; `None` before round 1 started.
    fn show(&mut self, sample: &Sample) -> Option<String> {
        if sample.round == 0 {
            return None;
        }
        if sample.round != self.round {
            self.round = sample.round;
            self.size = 0;
        }
        // Round 1 sends the whole guest (without a handle to say its size: at least what went
        // and what is left); round N+1 what the sync that ended round N found.
        let known = match sample.progress {
            _ if sample.round == 1 => sample
                .total
                .or(Some(sample.encoded.saturating_add(sample.remaining))),
            Some(p) if u64::from(p.round) + 1 == sample.round => Some(p.remaining_bytes),
            _ => None,
        };
        self.size = self
            .size
            .max(sample.remaining)
            .max(known.unwrap_or_default());
        let done = self.size - sample.remaining.min(self.size);
        let mut line = format!(
            "migration round {} {}  remaining {}  {}/s",
            sample.round,
            bar(done, self.size),
            Bytes(sample.remaining),
            Bytes(sample.rate)
        );
        if let Some(progress) = sample.progress {
            if let Some(downtime) = expected_downtime(&progress) {
                let _ = write!(line, "  expected downtime {downtime:.1?}");
            }
            if progress.paused {
                line.push_str("  (guest paused)");
            }
            if progress.postcopy.is_some() {
                line.push_str("  (postcopy)");
            }
        }
        Some(line)
    }
}

/// Cells of the bar.
const BAR_WIDTH: u128 = 32;

/// `[=====>      ]  15%` for `done` of `size` (an empty round is done).
fn bar(done: u64, size: u64) -> String {
    let (done, size) = match size {
        0 => (1, 1),
        size => (u128::from(done.min(size)), u128::from(size)),
    };
    let filled = usize::try_from(done * BAR_WIDTH / size).unwrap_or(0);
    let width = usize::try_from(BAR_WIDTH).unwrap_or(0);
    let cells = if filled >= width {
        "=".repeat(width)
    } else {
        format!("{}>{}", "=".repeat(filled), " ".repeat(width - filled - 1))
    };
    format!("[{cells}] {:>3}%", done * 100 / size)
}

/// The expected downtime once a dirty sync measured it (the first ends round 1), and a link
/// was measured for it.
fn expected_downtime(progress: &Progress) -> Option<Duration> {
    (progress.round >= 1 && progress.expected_downtime != Duration::MAX)
        .then_some(progress.expected_downtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn synced(round: u32, remaining_bytes: u64, downtime_ms: u64) -> Progress {
        Progress {
            round,
            remaining_bytes,
            expected_downtime: Duration::from_millis(downtime_ms),
            ..Progress::default()
        }
    }

    #[test]
    fn nothing_is_shown_before_round_1() {
        let mut round = RoundBar::default();
        let sample = Sample {
            total: Some(256 * MIB),
            progress: Some(Progress::default()),
            ..Sample::default()
        };
        assert_eq!(round.show(&sample), None);
    }

    #[test]
    fn round_1_shows_its_round_and_remaining_bytes_before_any_sync() {
        // During round 1 the handle's progress is still the default one: round 0, nothing
        // remaining, a zero expected downtime. None of that may show.
        let mut round = RoundBar::default();
        let line = round.show(&Sample {
            round: 1,
            remaining: 192 * MIB,
            rate: 100 * MIB,
            encoded: 64 * MIB,
            total: Some(256 * MIB),
            progress: Some(Progress::default()),
        });
        assert_eq!(
            line.as_deref(),
            Some(
                "migration round 1 [========>                       ]  25%  remaining 192.0 MiB  \
                 100.0 MiB/s"
            )
        );
    }

    #[test]
    fn later_rounds_are_sized_by_the_sync_before_them_and_show_the_expected_downtime() {
        let mut round = RoundBar::default();
        let line = round.show(&Sample {
            round: 2,
            remaining: 20 * MIB,
            rate: 0,
            encoded: 300 * MIB,
            total: Some(256 * MIB),
            progress: Some(synced(1, 80 * MIB, 850)),
        });
        assert_eq!(
            line.as_deref(),
            Some(
                "migration round 2 [========================>       ]  75%  remaining 20.0 MiB  \
                 0 B/s  expected downtime 850.0ms"
            )
        );
    }

    #[test]
    fn a_round_of_unknown_size_is_as_large_as_the_most_it_had_left() {
        // The final round (guest paused): the handle does not say how much it sends.
        let mut round = RoundBar::default();
        let paused = Progress {
            paused: true,
            ..synced(3, MIB, 40)
        };
        let sample = |remaining| Sample {
            round: 5,
            remaining,
            progress: Some(paused),
            ..Sample::default()
        };
        let first = round.show(&sample(4 * MIB)).unwrap_or_default();
        assert!(first.contains("]   0%"), "{first}");
        let next = round.show(&sample(MIB)).unwrap_or_default();
        assert!(next.contains("]  75%  remaining 1.0 MiB"), "{next}");
        assert!(
            next.ends_with("expected downtime 40.0ms  (guest paused)"),
            "{next}"
        );
        // A new round starts its own bar.
        let fresh = round
            .show(&Sample {
                round: 6,
                remaining: MIB,
                ..Sample::default()
            })
            .unwrap_or_default();
        assert!(fresh.contains("]   0%"), "{fresh}");
    }

    #[test]
    fn an_unmeasured_expected_downtime_is_not_shown() {
        assert_eq!(expected_downtime(&Progress::default()), None);
        assert_eq!(
            expected_downtime(&Progress {
                expected_downtime: Duration::MAX,
                ..synced(1, MIB, 0)
            }),
            None
        );
        assert_eq!(
            expected_downtime(&synced(2, MIB, 12)),
            Some(Duration::from_millis(12))
        );
    }

    #[test]
    fn a_paused_send_sizes_round_1_by_what_went_and_what_is_left() {
        // No handle: the guest's size is not known, but round 1 sends every page.
        let mut round = RoundBar::default();
        let line = round
            .show(&Sample {
                round: 1,
                remaining: 30 * MIB,
                encoded: 10 * MIB,
                rate: MIB,
                ..Sample::default()
            })
            .unwrap_or_default();
        assert_eq!(
            line,
            format!(
                "migration round 1 [{}>{}]  25%  remaining 30.0 MiB  1.0 MiB/s",
                "=".repeat(8),
                " ".repeat(23)
            )
        );
    }

    #[test]
    fn the_bar_fills_with_the_round() {
        assert_eq!(bar(0, 4), format!("[>{}]   0%", " ".repeat(31)));
        assert_eq!(
            bar(1, 2),
            format!("[{}>{}]  50%", "=".repeat(16), " ".repeat(15))
        );
        assert_eq!(bar(4, 4), format!("[{}] 100%", "=".repeat(32)));
        // Nothing to send is done; more done than the size is full.
        assert_eq!(bar(0, 0), bar(4, 4));
        assert_eq!(bar(9, 4), bar(4, 4));
        assert_eq!(bar(u64::MAX - 1, u64::MAX).len(), bar(0, 1).len());
    }
}

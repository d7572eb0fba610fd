//! Progress while a migration runs: the source machine gets its figures every 100 ms and, on a
//! terminal only, stderr shows a line for the migration and one per channel.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ramjet_dataplane::{Counters, LiveHandle};

use crate::events::Events;
use crate::units::Bytes;

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
            let _ = thread.join();
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
    let bars = MultiProgress::with_draw_target(if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:>9} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let whole = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
    whole.set_prefix("migration");
    let lanes: Vec<ProgressBar> = (0..channels)
        .map(|c| {
            let bar = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
            bar.set_prefix(format!("ch{c}"));
            bar
        })
        .collect();
    let mut last = (Instant::now(), vec![0u64; usize::from(channels)]);
    while !done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        let elapsed = last.0.elapsed().as_secs_f64().max(1e-3);
        for (c, bar) in lanes.iter().enumerate() {
            let sent = counters.channel_sent(u16::try_from(c).unwrap_or(u16::MAX));
            let rate = sent.saturating_sub(last.1[c]) as f64 / elapsed;
            last.1[c] = sent;
            bar.set_message(format!("{:>7.2} GB/s  {} sent", rate / 1e9, Bytes(sent)));
        }
        last.0 = Instant::now();
        let Some(handle) = live else {
            let stats = counters.snapshot();
            whole.set_message(format!(
                "round {}  {} pages sent  {} on the wire",
                stats.rounds,
                stats.pages(),
                Bytes(stats.wire_bytes)
            ));
            continue;
        };
        let progress = handle.progress();
        if let Some(stats) = handle.ram_stats() {
            events.with(|m| {
                m.set_ram_stats(stats);
                m.set_expected_downtime(progress.expected_downtime);
            });
        }
        whole.set_message(format!(
            "round {}  remaining {}  expected downtime {:.1?}{}",
            progress.round,
            Bytes(progress.remaining_bytes),
            progress.expected_downtime,
            if progress.paused {
                "  (guest paused)"
            } else {
                ""
            }
        ));
    }
    let _ = bars.clear();
}

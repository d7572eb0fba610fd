//! What the tools add to the library's postcopy: they reconnect a paused postcopy by themselves
//! (as an operator would say `recover`), and they print what postcopy did.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ramjet_control::{Status, Trigger};
use ramjet_dataplane::postcopy::{BUCKETS, LatencyDist};
use ramjet_dataplane::{LiveHandle, PostcopyStats};

use crate::events::Events;
use crate::units::Bytes;

/// A thread that says `recover` whenever the source's postcopy is paused, a second after it
/// paused (and again a second after each failed attempt), until stopped or until it has been
/// paused for `give_up` in a row: then the sender's own wait for a recover runs out, and it
/// ends paused.
pub struct Recoverer {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Recoverer {
    pub fn start(handle: LiveHandle, events: Events, give_up: Duration) -> Recoverer {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let thread = thread::spawn(move || {
            let mut paused_since: Option<Instant> = None;
            let mut next_try = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(100));
                if events.with(|m| m.status()) != Status::PostcopyPaused {
                    // Reconnecting, or going on: a new pause starts the count again, unless
                    // this was only a failed attempt.
                    if events.with(|m| m.status()) != Status::PostcopyRecoverSetup {
                        paused_since = None;
                    }
                    continue;
                }
                let since = *paused_since.get_or_insert_with(|| {
                    next_try = Instant::now() + Duration::from_secs(1);
                    Instant::now()
                });
                if since.elapsed() >= give_up || Instant::now() < next_try {
                    continue;
                }
                next_try = Instant::now() + Duration::from_secs(1);
                crate::console::err("ramjet: postcopy paused; reconnecting");
                events.step(Trigger::Recover);
                handle.recover(None);
            }
        });
        Recoverer {
            done,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `lo–hi µs` for bucket `n` of the distribution.
fn bucket_name(n: usize) -> String {
    match n {
        0 => "<2 µs".to_owned(),
        n if n + 1 >= BUCKETS => format!("≥{} µs", 1u64 << n),
        n => format!("{}–{} µs", 1u64 << n, 1u64 << (n + 1)),
    }
}

/// The distribution in one line: mean, maximum and the share of each bucket that has faults.
pub fn latency_line(latency: &LatencyDist) -> String {
    if latency.count == 0 {
        return "no fault waited for a page".to_owned();
    }
    let shares: Vec<String> = latency
        .buckets
        .iter()
        .enumerate()
        .filter(|&(_, &n)| n > 0)
        .map(|(i, &n)| {
            format!(
                "{} {:.1}%",
                bucket_name(i),
                n as f64 * 100.0 / latency.count as f64
            )
        })
        .collect();
    format!(
        "{} faults, mean {:.0?}, max {:.0?}: {}",
        latency.count,
        latency.mean(),
        latency.max,
        shares.join(", ")
    )
}

/// The summary line of what postcopy moved.
pub fn stats_line(stats: &PostcopyStats) -> String {
    format!(
        "{} pages left for the destination at the switch; {} requested by its faults, the rest \
         pushed; {} in postcopy",
        stats.pages,
        stats.requested_pages,
        Bytes(stats.bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_read_as_ranges() {
        assert_eq!(bucket_name(0), "<2 µs");
        assert_eq!(bucket_name(7), "128–256 µs");
        assert_eq!(bucket_name(BUCKETS - 1), format!("≥{} µs", 1u64 << 23));
        let mut latency = LatencyDist::default();
        assert_eq!(latency_line(&latency), "no fault waited for a page");
        latency.buckets[6] = 3;
        latency.buckets[7] = 1;
        latency.count = 4;
        latency.total = Duration::from_micros(400);
        latency.max = Duration::from_micros(200);
        assert_eq!(
            latency_line(&latency),
            "4 faults, mean 100µs, max 200µs: 64–128 µs 75.0%, 128–256 µs 25.0%"
        );
    }
}

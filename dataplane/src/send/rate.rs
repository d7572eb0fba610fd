//! Rate policy: the wire rate that `Compression::Auto` watches ([`RateMeter`]) and the
//! session's `max-bandwidth` ([`RateLimit`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::session::{Stop, lock};

/// The wire rate of the last 100 ms or more, updated by whichever worker looks first.
#[derive(Debug)]
pub(super) struct RateMeter {
    origin: Instant,
    at_nanos: AtomicU64,
    at_bytes: AtomicU64,
    /// Bytes per second; `u64::MAX` until the first window is measured.
    rate: AtomicU64,
}

impl RateMeter {
    const WINDOW_NANOS: u64 = 100_000_000;

    pub(super) fn new() -> Self {
        RateMeter {
            origin: Instant::now(),
            at_nanos: AtomicU64::new(0),
            at_bytes: AtomicU64::new(0),
            rate: AtomicU64::new(u64::MAX),
        }
    }

    /// The rate, after folding in `bytes` sent so far. The first window starts at the first
    /// sample, when data flows, not when the session was set up.
    pub(super) fn sample(&self, bytes: u64) -> u64 {
        let now = u64::try_from(self.origin.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .max(1);
        let last = self.at_nanos.load(Ordering::Relaxed);
        if last == 0 {
            if self
                .at_nanos
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.at_bytes.store(bytes, Ordering::Relaxed);
            }
            return self.rate.load(Ordering::Relaxed);
        }
        let span = now.saturating_sub(last);
        if span >= Self::WINDOW_NANOS
            && self
                .at_nanos
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let before = self.at_bytes.swap(bytes, Ordering::Relaxed);
            let rate = u128::from(bytes.saturating_sub(before)) * 1_000_000_000 / u128::from(span);
            self.rate
                .store(u64::try_from(rate).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        self.rate.load(Ordering::Relaxed)
    }
}

/// A session's send-rate limit (every channel together): a token bucket that refills at
/// `rate` bytes per second and holds at most 50 ms of it, so a send of `n` bytes waits until
/// the bucket has paid for it.
#[derive(Debug)]
pub(super) struct RateLimit {
    rate: u64,
    /// Tokens (bytes, negative while in debt) and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub(super) fn new(rate: u64) -> Self {
        Self::starting_at(rate, Instant::now())
    }

    /// A limit whose bucket is empty at `at`.
    fn starting_at(rate: u64, at: Instant) -> Self {
        RateLimit {
            rate: rate.max(1),
            state: Mutex::new((0.0, at)),
        }
    }

    /// Charges `bytes` sent at `now`; returns how long to wait before sending them.
    fn charge(&self, bytes: usize, now: Instant) -> Duration {
        let rate = self.rate as f64;
        let mut state = lock(&self.state);
        let (tokens, at) = *state;
        let refilled =
            (tokens + now.saturating_duration_since(at).as_secs_f64() * rate).min(rate * 0.05);
        let left = refilled - bytes as f64;
        *state = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / rate)
        }
    }

    /// Waits until `bytes` may be sent, or the session stops.
    pub(super) fn wait(&self, bytes: usize, stop: &Stop) {
        let until = Instant::now() + self.charge(bytes, Instant::now());
        while !stop.is_stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    #[test]
    fn the_rate_limit_charges_sends_against_a_refilling_bucket() {
        let t0 = Instant::now();
        let limit = RateLimit::starting_at(1_000_000, t0);
        // An empty bucket: 100 KB at 1 MB/s wait 100 ms.
        assert_eq!(limit.charge(100_000, t0), Duration::from_millis(100));
        // The debt is paid by time: 100 ms later the bucket is empty again.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limit.charge(0, t1), Duration::ZERO);
        // Idle time fills it up to 50 ms worth (50 KB), no more.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(limit.charge(50_000, t2), Duration::ZERO);
        assert_eq!(limit.charge(10_000, t2), Duration::from_millis(10));
        // A second's worth of sends at once: the last may go a second later.
        let limit = RateLimit::starting_at(1_000_000, t0);
        let last = (0..100).map(|_| limit.charge(10_000, t0)).last();
        assert_eq!(last, Some(Duration::from_secs(1)));
    }

    #[test]
    fn the_rate_meter_measures_windows_from_the_first_sample() {
        let meter = RateMeter::new();
        thread::sleep(Duration::from_millis(20));
        // The first sample starts the first window: no rate yet, however long setup took.
        assert_eq!(meter.sample(1_000), u64::MAX);
        assert_eq!(meter.sample(5_000), u64::MAX, "the window is not over");
        thread::sleep(Duration::from_millis(110));
        let rate = meter.sample(1_000 + 100_000_000);
        // 100 MB in a little over 110 ms: below 1 GB/s, well above 0.5 GB/s.
        assert!((500_000_000..1_000_000_000).contains(&rate), "{rate}");
    }
}

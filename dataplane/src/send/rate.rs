//! The session's `max-bandwidth` ([`RateLimit`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::session::{Stop, lock};

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
}

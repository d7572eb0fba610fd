//! The fault-latency distribution: QEMU's `postcopy-latency-dist`, 24 power-of-two buckets of
//! microseconds (bucket `n` holds latencies in `[2^n, 2^(n+1))` µs; below 1 µs counts in bucket
//! 0, 2^23 µs and more in bucket 23), with the count, sum and maximum beside it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets in the distribution, as in QEMU.
pub const BUCKETS: usize = 24;

/// Fault latencies, recorded from any thread.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// The bucket of a latency.
pub(crate) fn bucket(latency: Duration) -> usize {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    (micros.max(1).ilog2() as usize).min(BUCKETS - 1)
}

impl Latency {
    /// Records one fault's latency.
    pub(crate) fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(latency)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// What was recorded so far.
    pub(crate) fn snapshot(&self) -> LatencyDist {
        LatencyDist {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            count: self.count.load(Ordering::Relaxed),
            total: Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)),
            max: Duration::from_nanos(self.max_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A snapshot of the fault-latency distribution: bucket `n` counts faults that took
/// `[2^n, 2^(n+1))` µs (the first and last buckets are open-ended), as QEMU's
/// `postcopy-latency-dist`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencyDist {
    /// Faults per power-of-two bucket of microseconds.
    pub buckets: [u64; BUCKETS],
    /// Faults recorded.
    pub count: u64,
    /// Their latencies added up.
    pub total: Duration,
    /// The longest.
    pub max: Duration,
}

impl LatencyDist {
    /// The mean latency (QEMU's `postcopy-latency`), zero without faults.
    pub fn mean(&self) -> Duration {
        match u32::try_from(self.count) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.total / n,
            Err(_) => Duration::from_nanos(
                u64::try_from(self.total.as_nanos() / u128::from(self.count)).unwrap_or(u64::MAX),
            ),
        }
    }

    /// An upper bound of the `q` quantile (0..=1): the top of the bucket it falls in.
    pub fn quantile_bound(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a rank among at most u64::MAX faults, rounded up"
        )]
        let rank = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (n, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_micros(1 << (n + 1))
                    .min(self.max.max(Duration::from_micros(1)));
            }
        }
        self.max
    }
}

impl LatencyDist {
    /// As the words of a done frame: the buckets, the count, the total and the maximum in
    /// nanoseconds.
    pub(crate) fn to_words(self) -> [u64; crate::wire::DONE_WORDS] {
        let mut words = [0u64; crate::wire::DONE_WORDS];
        words[..BUCKETS].copy_from_slice(&self.buckets);
        words[BUCKETS] = self.count;
        words[BUCKETS + 1] = u64::try_from(self.total.as_nanos()).unwrap_or(u64::MAX);
        words[BUCKETS + 2] = u64::try_from(self.max.as_nanos()).unwrap_or(u64::MAX);
        words
    }

    /// From the words of a done frame.
    pub(crate) fn from_words(words: &[u64; crate::wire::DONE_WORDS]) -> Self {
        let mut buckets = [0u64; BUCKETS];
        buckets.copy_from_slice(&words[..BUCKETS]);
        LatencyDist {
            buckets,
            count: words[BUCKETS],
            total: Duration::from_nanos(words[BUCKETS + 1]),
            max: Duration::from_nanos(words[BUCKETS + 2]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_power_of_two_buckets() {
        let us = Duration::from_micros;
        assert_eq!(bucket(Duration::from_nanos(300)), 0);
        assert_eq!(bucket(us(1)), 0);
        assert_eq!(bucket(us(2)), 1);
        assert_eq!(bucket(us(3)), 1);
        assert_eq!(bucket(us(128)), 7);
        assert_eq!(bucket(us(255)), 7);
        assert_eq!(bucket(us(256)), 8);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
        let latency = Latency::default();
        for micros in [1, 40, 45, 50, 60, 900] {
            latency.record(us(micros));
        }
        let dist = latency.snapshot();
        assert_eq!(dist.count, 6);
        assert_eq!(dist.buckets[0], 1);
        assert_eq!(dist.buckets[5], 4, "32..64 µs: 40, 45, 50 and 60");
        assert_eq!(dist.max, us(900));
        assert_eq!(dist.mean(), us(1096) / 6);
        assert_eq!(dist.quantile_bound(0.5), us(64));
        assert_eq!(dist.quantile_bound(1.0), us(900));
        assert_eq!(LatencyDist::default().quantile_bound(0.5), Duration::ZERO);
    }

    #[test]
    fn a_distribution_crosses_the_wire_as_it_is() {
        let latency = Latency::default();
        for micros in [0, 3, 70, 70, 5000, 1 << 30] {
            latency.record(Duration::from_micros(micros));
        }
        let dist = latency.snapshot();
        assert_eq!(LatencyDist::from_words(&dist.to_words()), dist);
    }
}

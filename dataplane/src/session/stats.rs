//! A session's live counters ([`Counters`]) and their snapshots ([`Stats`]), which fill
//! `query-migrate`'s RAM figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ramjet_control::RamStats;

use crate::codec::BatchCounts;
use crate::memory::PAGE_SIZE;
use crate::wire::MAX_CHANNELS;

/// Live counters of a session, updated once per frame or write (never per page) and safe to
/// sample from any thread ([`Counters::snapshot`]).
#[derive(Debug, Default)]
pub struct Counters {
    zero: AtomicU64,
    raw: AtomicU64,
    lz4: AtomicU64,
    zstd: AtomicU64,
    wire_bytes: AtomicU64,
    /// Sender: frame bytes handed to the channel writers, and bytes they have sent.
    queued: AtomicU64,
    sent: AtomicU64,
    /// Sender: bytes sent per channel.
    channel_sent: PerChannel,
    rounds: AtomicU64,
    remaining_pages: AtomicU64,
    device_state_bytes: AtomicU64,
    zero_copy_bytes: AtomicU64,
}

/// A counter per possible channel.
#[derive(Debug)]
struct PerChannel([AtomicU64; MAX_CHANNELS as usize]);

impl Default for PerChannel {
    fn default() -> Self {
        PerChannel(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Counters {
    pub(crate) fn add_pages(&self, counts: BatchCounts) {
        self.zero.fetch_add(counts.zero, Ordering::Relaxed);
        self.raw.fetch_add(counts.raw, Ordering::Relaxed);
        self.lz4.fetch_add(counts.lz4, Ordering::Relaxed);
        self.zstd.fetch_add(counts.zstd, Ordering::Relaxed);
    }

    pub(crate) fn add_wire_bytes(&self, bytes: u64) {
        self.wire_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Frame bytes queued for the channel writers (sender).
    pub(crate) fn add_queued(&self, bytes: u64) {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Frame bytes the writer of `channel` sent (sender).
    pub(crate) fn add_sent(&self, channel: u16, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        if let Some(counter) = self.channel_sent.0.get(usize::from(channel)) {
            counter.fetch_add(bytes, Ordering::Relaxed);
        }
        self.add_wire_bytes(bytes);
    }

    /// Bytes the sender has sent on `channel` so far.
    pub fn channel_sent(&self, channel: u16) -> u64 {
        self.channel_sent
            .0
            .get(usize::from(channel))
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    /// Frame bytes sent so far (sender).
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Frame bytes queued and not yet sent (sender): what a switchover waits for before its
    /// own pages.
    pub(crate) fn in_flight(&self) -> u64 {
        let sent = self.sent.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(sent)
    }

    pub(crate) fn note_round(&self, round: u32) {
        self.rounds.fetch_max(u64::from(round), Ordering::Relaxed);
    }

    pub(crate) fn set_remaining_pages(&self, pages: u64) {
        self.remaining_pages.store(pages, Ordering::Relaxed);
    }

    /// Bytes a writer sent zero-copy (sender).
    pub(crate) fn add_zero_copy_bytes(&self, bytes: u64) {
        self.zero_copy_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_device_state_bytes(&self, bytes: u64) {
        self.device_state_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Stats {
        Stats {
            pages_zero: self.zero.load(Ordering::Relaxed),
            pages_raw: self.raw.load(Ordering::Relaxed),
            pages_lz4: self.lz4.load(Ordering::Relaxed),
            pages_zstd: self.zstd.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            rounds: self.rounds.load(Ordering::Relaxed),
            remaining_pages: self.remaining_pages.load(Ordering::Relaxed),
            device_state_bytes: self.device_state_bytes.load(Ordering::Relaxed),
            zero_copy_bytes: self.zero_copy_bytes.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of a session's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pages sent or received as zero pages.
    pub pages_zero: u64,
    /// Pages sent or received raw.
    pub pages_raw: u64,
    /// Pages sent or received lz4-compressed.
    pub pages_lz4: u64,
    /// Pages sent or received zstd-compressed.
    pub pages_zstd: u64,
    /// Bytes of frames on the wire (headers, tables, data), both directions.
    pub wire_bytes: u64,
    /// Rounds started (sender) or finished on channel 0 (receiver).
    pub rounds: u64,
    /// Pages still to send in the current round (sender).
    pub remaining_pages: u64,
    /// Bytes of device state.
    pub device_state_bytes: u64,
    /// Bytes sent zero-copy (sender): the kernel read them in place, from the frame buffers
    /// or from paused guest memory. Always 0 with TLS, and over Unix sockets and loopback
    /// unless [`ZeroCopy::On`](crate::ZeroCopy::On) asked for it.
    pub zero_copy_bytes: u64,
}

impl Stats {
    /// All pages.
    pub fn pages(&self) -> u64 {
        self.pages_zero + self.pages_raw + self.pages_lz4 + self.pages_zstd
    }

    /// The stats in `query-migrate` terms, for a guest of `total_bytes` after `elapsed`.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a float-to-integer `as` saturates, which is right for a rate"
    )]
    pub fn ram_stats(&self, total_bytes: u64, elapsed: Duration) -> RamStats {
        let seconds = elapsed.as_secs_f64();
        let per_second = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let normal = self.pages_raw + self.pages_lz4 + self.pages_zstd;
        RamStats {
            transferred: self.wire_bytes,
            remaining: self.remaining_pages * PAGE_SIZE as u64,
            total: total_bytes,
            duplicate: self.pages_zero,
            normal,
            normal_bytes: normal * PAGE_SIZE as u64,
            mbps: per_second(self.wire_bytes) * 8.0 / 1e6,
            dirty_sync_count: self.rounds,
            page_size: PAGE_SIZE as u64,
            multifd_bytes: self.wire_bytes,
            // Whole pages per second; a fraction of a page is not worth a float here.
            pages_per_second: per_second(self.pages()) as u64,
            precopy_bytes: self.wire_bytes,
            ..RamStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_stats_use_query_migrate_meanings() {
        let stats = Stats {
            pages_zero: 10,
            pages_raw: 20,
            pages_lz4: 10,
            pages_zstd: 0,
            wire_bytes: 1_000_000,
            rounds: 2,
            remaining_pages: 3,
            device_state_bytes: 0,
            zero_copy_bytes: 0,
        };
        let ram = stats.ram_stats(1 << 20, Duration::from_secs(2));
        assert_eq!(ram.duplicate, 10);
        assert_eq!(ram.normal, 30);
        assert_eq!(ram.normal_bytes, 30 * 4096);
        assert_eq!(ram.remaining, 3 * 4096);
        assert_eq!(ram.pages_per_second, 20);
        assert!((ram.mbps - 4.0).abs() < 1e-9);
        assert_eq!(stats.ram_stats(0, Duration::ZERO).mbps, 0.0);
    }
}

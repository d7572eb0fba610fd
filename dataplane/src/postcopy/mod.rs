//! Postcopy: the guest runs on the destination before all its memory is there; a page it
//! touches that is still missing faults, the destination asks the source for it, and the source
//! sends it ahead of the pages it keeps pushing in the background.
//!
//! `place.rs` is the destination's half that touches memory: which pages are missing, how the
//! fault handler learns of an access, and how a page is placed atomically (userfaultfd).
//! `latency.rs` keeps the fault-latency distribution QEMU reports.

mod latency;
pub(crate) mod place;

pub use latency::{BUCKETS, LatencyDist};
pub use place::PlaceError;

/// What postcopy did, on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PostcopyStats {
    /// Pages that were still wanted when postcopy started.
    pub pages: u64,
    /// Page requests: served (source) or sent (destination). QEMU's `postcopy-requests`.
    pub requests: u64,
    /// Pages that went on the fault channel, answering requests.
    pub requested_pages: u64,
    /// Bytes sent (source) or received (destination) in postcopy, both paths. QEMU's
    /// `postcopy-bytes`.
    pub bytes: u64,
    /// The destination's fault latencies: from a thread's fault to its page placed.
    pub latency: LatencyDist,
}

#[cfg(test)]
mod tests;

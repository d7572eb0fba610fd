//! Postcopy: the guest runs on the destination before all its memory is there; a page it
//! touches that is still missing faults, the destination asks the source for it, and the source
//! sends it ahead of the pages it keeps pushing in the background.
//!
//! `place.rs` is the destination's half that touches memory: which pages are missing, how the
//! fault handler learns of an access, and how a page is placed atomically (userfaultfd).
//! `latency.rs` keeps the fault-latency distribution QEMU reports.

mod latency;
pub(crate) mod place;

use std::sync::Arc;

pub use latency::{BUCKETS, LatencyDist};
pub use place::PlaceError;

/// The pages a paused postcopy left missing on the destination, kept absent under
/// userfaultfd: a thread that touches one waits (a vCPU stalls) instead of reading zeros.
/// Returned with [`Error::PostcopyPaused`](crate::Error::PostcopyPaused); drop it only once
/// the guest running on that memory has stopped, since the kernel then fills every missing
/// page with zeros on its next touch.
pub struct AbsentPages(Arc<place::Placer>);

impl AbsentPages {
    pub(crate) fn new(placer: Arc<place::Placer>) -> Self {
        AbsentPages(placer)
    }

    /// How many pages are still missing.
    pub fn count(&self) -> u64 {
        self.0.remaining()
    }
}

impl std::fmt::Debug for AbsentPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbsentPages")
            .field("count", &self.count())
            .finish()
    }
}

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

//! Postcopy: the guest runs on the destination before all its memory is there; a page it
//! touches that is still missing faults, the destination asks the source for it, and the source
//! sends it ahead of the pages it keeps pushing in the background.
//!
//! `place.rs` is the destination's half that touches memory: which pages are missing, how the
//! fault handler learns of an access, and how a page is placed atomically (userfaultfd).
//! `latency.rs` keeps the fault-latency distribution QEMU reports.

// The sessions that drive the placement come in the next steps; until then only the tests use
// all of it.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

mod latency;
mod place;

pub use latency::{BUCKETS, LatencyDist};
pub use place::PlaceError;

#[cfg(test)]
mod tests;

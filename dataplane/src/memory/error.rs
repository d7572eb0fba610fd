//! What can go wrong building or accessing guest memory ([`MemoryError`]).

use std::io;

use thiserror::Error;

use super::page::PAGE_SIZE;

/// Errors from building or accessing guest memory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The kernel refused a mapping or a memfd.
    #[error("cannot map {what} of {len} bytes")]
    Map {
        /// What was being mapped.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A region length or guest base that is not page-aligned, or zero.
    #[error(
        "region {id}: base {base:#x} and length {len} must be non-zero multiples of {PAGE_SIZE}"
    )]
    Unaligned {
        /// The region id.
        id: u32,
        /// Its guest base.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Two regions with the same id.
    #[error("region id {id} is used twice")]
    DuplicateId {
        /// The id.
        id: u32,
    },
    /// Two regions that overlap in guest address space.
    #[error("regions {first} and {second} overlap in guest memory")]
    Overlap {
        /// The first region's id.
        first: u32,
        /// The second region's id.
        second: u32,
    },
    /// A memory with no region.
    #[error("guest memory needs at least one region")]
    Empty,
    /// Two memories compared page by page have different layouts.
    #[error("the guest memory layouts differ")]
    LayoutMismatch,
    /// A write to memory that a sender has frozen for its final round.
    #[error("guest memory is frozen: a sender is sending its final round from it")]
    Frozen,
    /// Reading, writing or freezing memory that a receive session holds, or a second receive
    /// session on it.
    #[error("guest memory cannot be {op} while a migration is being received into it")]
    Receiving {
        /// What was refused: "read", "written", "frozen" or "received into twice".
        op: &'static str,
    },
    /// Any access to memory this process handed over to another one (a same-host migration):
    /// the guest runs there now, and this process must never touch the memory again.
    #[error(
        "guest memory was handed over to another process (same-host migration), which runs the \
         guest on it now: this process must never read or write it again"
    )]
    HandedOver,
    /// Memory a same-host sender handed over that this process cannot take in place of its
    /// own.
    #[error("cannot take region {id}'s memory from the sender: {reason}")]
    Adopt {
        /// The region id.
        id: u32,
        /// Why.
        reason: String,
    },
    /// An access outside a region, or to a region that does not exist.
    #[error("{len} bytes at offset {offset:#x} of region index {region} are outside guest memory")]
    OutOfBounds {
        /// The region index.
        region: usize,
        /// The offset into it.
        offset: u64,
        /// The access length.
        len: u64,
    },
}

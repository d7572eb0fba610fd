//! Dirty pages: per-region atomic bitmaps in KVM dirty-log word format ([`DirtyBitmap`]), and
//! the dirty pages of one round ([`DirtySet`]).
//!
//! A bitmap is a `u64` word per 64 pages, bit `i` of word `w` standing for page `64 * w + i`
//! (the layout `KVM_GET_DIRTY_LOG` and vm-memory's `AtomicBitmap` use). Bits past the region's
//! last page are ignored. A round is planned from the words directly: a word is one 64-page
//! chunk of one channel.
//!
//! Where each round's dirty pages come from is a [`DirtySource`]: bitmaps the embedder feeds
//! ([`CallerFed`], e.g. from `KVM_GET_DIRTY_LOG`), userfaultfd write-protection of memory this
//! process owns ([`UffdWp`]), or nothing at all for a stopped guest ([`Everything`]).

mod bitmap;
mod source;
mod uffd;

pub use bitmap::{DirtyBitmap, DirtySet};
pub use source::{CallerFed, DirtyError, DirtySource, Everything};
pub use uffd::UffdWp;

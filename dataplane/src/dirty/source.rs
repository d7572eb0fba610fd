//! Dirty sources: where the pages written since the last dirty sync come from.

use std::io;
use std::sync::Arc;

use super::bitmap::{DirtyBitmap, DirtySet, words_for};
use crate::memory::GuestMemory;

/// An error from the embedder's code, kept with its causes (the crate's `BoxError`).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why dirty pages could not be tracked or harvested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// The kernel, the permissions or the memory do not allow this way of tracking.
    #[error("{what} cannot track this guest: {why}")]
    Unsupported {
        /// The dirty source.
        what: &'static str,
        /// Why not, and what would help.
        why: String,
        /// The OS error behind it, if any.
        #[source]
        source: Option<io::Error>,
    },
    /// A system call failed while tracking.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The embedder's dirty log could not be read.
    #[error("the dirty log of region {region} could not be read")]
    Caller {
        /// The region index.
        region: usize,
        /// The embedder's error.
        #[source]
        source: BoxError,
    },
    /// The source was started for a different guest memory, or not started.
    #[error("the dirty source tracks another guest memory, or was not started")]
    WrongMemory,
}

/// Where each round's dirty pages come from.
///
/// A migration calls [`start`](DirtySource::start) once, just before its first round reads
/// every page, and then [`harvest`](DirtySource::harvest) at each dirty sync (the start of
/// every later round, and the final one once the guest is paused). A page written at any time
/// after `start` is in some later harvest, so the last one, with the guest paused, leaves
/// nothing behind.
pub trait DirtySource: Send {
    /// A short name for messages.
    fn name(&self) -> &'static str;

    /// Starts recording writes to `memory`.
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError>;

    /// The pages of `memory` written since `start` or the previous harvest, which are then
    /// forgotten.
    fn harvest(&mut self, memory: &GuestMemory) -> Result<DirtySet, DirtyError>;
}

/// A stopped guest: nothing is written after the first round, so there is nothing to track.
#[derive(Debug, Clone, Copy, Default)]
pub struct Everything;

impl DirtySource for Everything {
    fn name(&self) -> &'static str {
        "everything"
    }

    fn start(&mut self, _memory: &GuestMemory) -> Result<(), DirtyError> {
        Ok(())
    }

    fn harvest(&mut self, memory: &GuestMemory) -> Result<DirtySet, DirtyError> {
        Ok(DirtySet::none(memory))
    }
}

/// The caller's read of one region's dirty log: OR the pages written since the previous read
/// into the words (a `u64` per 64 pages, as `KVM_GET_DIRTY_LOG` returns them) and clear the log.
type ReadLog = dyn FnMut(usize, &mut [u64]) -> Result<(), BoxError> + Send;

/// Dirty pages the embedder reports: from KVM's dirty log, from vm-memory's
/// `AtomicBitmap::get_and_reset`, or from bitmaps it marks itself.
pub struct CallerFed {
    read: Box<ReadLog>,
}

impl std::fmt::Debug for CallerFed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerFed").finish_non_exhaustive()
    }
}

impl CallerFed {
    /// A source that calls `read(region, words)` at each dirty sync, once per region index:
    /// `read` ORs the pages written since its previous call into `words` (KVM dirty-log word
    /// format, sized for the region) and clears its log, as `KVM_GET_DIRTY_LOG` does. An error
    /// fails the migration, with the error as [`DirtyError::Caller`]'s source.
    pub fn new(
        read: impl FnMut(usize, &mut [u64]) -> Result<(), BoxError> + Send + 'static,
    ) -> Self {
        CallerFed {
            read: Box::new(read),
        }
    }

    /// A source over bitmaps, one per region index, that the embedder marks as its guest
    /// writes ([`DirtyBitmap::set`] is safe from any thread).
    pub fn from_bitmaps(bitmaps: Arc<[DirtyBitmap]>) -> Self {
        CallerFed::new(move |region, words| {
            let bitmap = bitmaps
                .get(region)
                .ok_or_else(|| format!("no bitmap for region {region}"))?;
            for (word, taken) in words.iter_mut().zip(bitmap.take()) {
                *word |= taken;
            }
            Ok(())
        })
    }

    fn read_all(&mut self, memory: &GuestMemory) -> Result<DirtySet, DirtyError> {
        let mut set = DirtySet::none(memory);
        let mut words = Vec::new();
        for (region, r) in memory.regions().iter().enumerate() {
            words.clear();
            words.resize(words_for(r.layout().pages()), 0);
            (self.read)(region, &mut words)
                .map_err(|source| DirtyError::Caller { region, source })?;
            set.merge(region, &words);
        }
        Ok(set)
    }
}

impl DirtySource for CallerFed {
    fn name(&self) -> &'static str {
        "caller-fed"
    }

    /// Reads and drops whatever the logs hold: the first round sends every page anyway.
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        self.read_all(memory).map(drop)
    }

    fn harvest(&mut self, memory: &GuestMemory) -> Result<DirtySet, DirtyError> {
        self.read_all(memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestAddr, Region};

    fn two_regions() -> GuestMemory {
        GuestMemory::new(vec![
            Region::anonymous(0, GuestAddr(0), 100 * 4096).unwrap(),
            Region::anonymous(1, GuestAddr(1 << 30), 3 * 4096).unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn caller_fed_bitmaps_are_harvested_and_cleared() {
        let memory = two_regions();
        let bitmaps: Arc<[DirtyBitmap]> = memory
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new(r.layout().pages()))
            .collect();
        let mut source = CallerFed::from_bitmaps(Arc::clone(&bitmaps));
        bitmaps[0].set(3);
        source.start(&memory).unwrap();
        assert_eq!(source.harvest(&memory).unwrap().count(), 0, "start forgets");
        bitmaps[0].set(99);
        bitmaps[0].set(64);
        bitmaps[1].set(2);
        let set = source.harvest(&memory).unwrap();
        assert_eq!(set.count(), 3);
        assert_eq!(set.words(0), &[0, (1 << 35) | 1][..]);
        assert_eq!(set.words(1), &[0b100][..]);
        assert_eq!(
            source.harvest(&memory).unwrap().count(),
            0,
            "harvest clears"
        );
    }

    #[test]
    fn a_kvm_style_log_is_clipped_and_its_errors_fail() {
        let memory = two_regions();
        // A log that reports bits past the end of each region, then fails.
        let mut calls = 0;
        let mut source = CallerFed::new(move |region, words: &mut [u64]| {
            calls += 1;
            if calls > 4 {
                return Err("KVM_GET_DIRTY_LOG: bad address".into());
            }
            words.fill(u64::MAX);
            let _ = region;
            Ok(())
        });
        source.start(&memory).unwrap();
        let set = source.harvest(&memory).unwrap();
        assert_eq!(set.count(), 103, "only pages inside the regions");
        let err = source.harvest(&memory).unwrap_err();
        assert!(matches!(err, DirtyError::Caller { region: 0, .. }), "{err}");
        // The embedder's own error is kept as the source, so its message reaches the user.
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("bad address")), "{err:?}");
        assert_eq!(Everything.harvest(&memory).unwrap().count(), 0);
    }
}

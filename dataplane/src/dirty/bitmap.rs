//! The bitmaps: [`DirtyBitmap`], marked from any thread, and [`DirtySet`], one round's pages.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::GuestMemory;

/// A dirty bitmap for one region, safe to mark from any thread.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

pub(super) fn words_for(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// The (word index, bit mask) pairs that cover pages `start .. start + count` of a bitmap over
/// `pages` pages, clipped to it.
fn range_masks(start: u64, count: u64, pages: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = start.saturating_add(count).min(pages);
    let mut page = start;
    std::iter::from_fn(move || {
        if page >= end {
            return None;
        }
        let bit = page % 64;
        let n = (64 - bit).min(end - page);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        let index = (page / 64) as usize;
        page += n;
        Some((index, mask))
    })
}

/// The mask of valid bits in word `index` of a bitmap over `pages` pages.
fn valid_mask(index: usize, pages: u64) -> u64 {
    let first = index as u64 * 64;
    match pages.saturating_sub(first) {
        0 => 0,
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

impl DirtyBitmap {
    /// A clean bitmap over `pages` pages.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            words: (0..words_for(pages)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// A bitmap with every page dirty (the first round of a migration).
    pub fn all(pages: u64) -> Self {
        let bitmap = DirtyBitmap::new(pages);
        bitmap.set_range(0, pages);
        bitmap
    }

    /// How many pages it covers.
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks `page` dirty; pages past the end are ignored.
    pub fn set(&self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Marks pages `start .. start + count` dirty, clipped to the bitmap.
    pub fn set_range(&self, start: u64, count: u64) {
        for (index, mask) in range_masks(start, count, self.pages) {
            self.words[index].fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// Whether `page` is dirty.
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// ORs in a caller's bitmap words (e.g. from `KVM_GET_DIRTY_LOG`); words and bits past the
    /// end are ignored.
    pub fn merge(&self, words: &[u64]) {
        for (index, (word, &incoming)) in self.words.iter().zip(words).enumerate() {
            let incoming = incoming & valid_mask(index, self.pages);
            if incoming != 0 {
                word.fetch_or(incoming, Ordering::Relaxed);
            }
        }
    }

    /// Takes the dirty pages and clears them, atomically per word: a page marked concurrently
    /// is either in the result or still set afterwards, never lost.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .enumerate()
            .map(|(index, w)| w.swap(0, Ordering::Relaxed) & valid_mask(index, self.pages))
            .collect()
    }

    /// How many pages are dirty now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// The dirty pages of every region of a guest memory, taken at one moment: what one round
/// sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    /// Per region index: (bitmap words, page count).
    regions: Vec<(Vec<u64>, u64)>,
}

impl DirtySet {
    /// Every page of `memory`.
    pub fn all(memory: &GuestMemory) -> Self {
        Self::per_region(memory, |pages| DirtyBitmap::all(pages).take())
    }

    /// No page of `memory`.
    pub fn none(memory: &GuestMemory) -> Self {
        Self::per_region(memory, |pages| vec![0; words_for(pages)])
    }

    fn per_region(memory: &GuestMemory, words: impl Fn(u64) -> Vec<u64>) -> Self {
        let regions = memory
            .regions()
            .iter()
            .map(|r| {
                let pages = r.layout().pages();
                (words(pages), pages)
            })
            .collect();
        DirtySet { regions }
    }

    /// Marks pages `start .. start + count` of region `region`, clipped to the region.
    pub fn insert_range(&mut self, region: usize, start: u64, count: u64) {
        if let Some((words, pages)) = self.regions.get_mut(region) {
            for (index, mask) in range_masks(start, count, *pages) {
                words[index] |= mask;
            }
        }
    }

    /// ORs `words` (KVM dirty-log format) into region `region`; bits past its end are ignored.
    pub fn merge(&mut self, region: usize, incoming: &[u64]) {
        if let Some((words, pages)) = self.regions.get_mut(region) {
            for (index, (word, &bits)) in words.iter_mut().zip(incoming).enumerate() {
                *word |= bits & valid_mask(index, *pages);
            }
        }
    }

    /// Adds every page of `other` (which must cover the same regions).
    pub fn union(&mut self, other: &DirtySet) {
        for (region, (words, _)) in other.regions.iter().enumerate() {
            self.merge(region, words);
        }
    }

    /// Marks `page` of region `region` (ignored if out of range).
    pub fn insert(&mut self, region: usize, page: u64) {
        if let Some((words, pages)) = self.regions.get_mut(region)
            && page < *pages
        {
            words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Clears word `word` of region `region` (ignored if out of range).
    pub(crate) fn clear_word(&mut self, region: usize, word: usize) {
        if let Some(w) = self
            .regions
            .get_mut(region)
            .and_then(|(words, _)| words.get_mut(word))
        {
            *w = 0;
        }
    }

    /// ORs `bits` into word `word` of region `region`; bits past its end are ignored.
    pub(crate) fn merge_word(&mut self, region: usize, word: usize, bits: u64) {
        if let Some((words, pages)) = self.regions.get_mut(region)
            && let Some(w) = words.get_mut(word)
        {
            *w |= bits & valid_mask(word, *pages);
        }
    }

    /// How many regions it covers.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// The bitmap words of region `region` (empty if there is no such region).
    pub fn words(&self, region: usize) -> &[u64] {
        self.regions.get(region).map_or(&[], |(words, _)| words)
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(words, _)| words)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(crate::tests::proptest_config())]

        #[test]
        fn bitmap_set_range_take_and_merge(
            pages in 1u64..400,
            ranges in prop::collection::vec((0u64..420, 0u64..200), 0..8),
            incoming in prop::collection::vec(any::<u64>(), 0..9),
        ) {
            let bitmap = DirtyBitmap::new(pages);
            let mut model = vec![false; pages as usize];
            for &(start, count) in &ranges {
                bitmap.set_range(start, count);
                for p in start..start.saturating_add(count).min(pages) {
                    model[p as usize] = true;
                }
            }
            bitmap.merge(&incoming);
            for (w, word) in incoming.iter().enumerate() {
                for bit in 0..64 {
                    let p = w as u64 * 64 + bit;
                    if p < pages && word >> bit & 1 == 1 {
                        model[p as usize] = true;
                    }
                }
            }
            for p in 0..pages {
                prop_assert_eq!(bitmap.is_set(p), model[p as usize]);
            }
            prop_assert_eq!(bitmap.count(), model.iter().filter(|&&d| d).count() as u64);
            let words = bitmap.take();
            prop_assert_eq!(bitmap.count(), 0);
            let taken: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            prop_assert_eq!(taken, model.iter().filter(|&&d| d).count() as u64);
        }
    }

    #[test]
    fn edges() {
        let all = DirtyBitmap::all(100);
        assert_eq!(all.count(), 100);
        all.set(1000);
        assert!(!all.is_set(1000));
    }
}

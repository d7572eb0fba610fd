//! Round planning: how a round's dirty pages are cut into jobs, each one pages frame for one
//! channel. [`plan`] is a pure function of the dirty set, the channel count and the round.

use crate::dirty::DirtySet;
use crate::memory::Frozen;
use crate::wire::{CHUNK_PAGES, channel_of};

// A dirty-bitmap word is exactly one channel-assignment chunk, so a word becomes a job.
const _: () = assert!(CHUNK_PAGES == 64);
/// [`CHUNK_PAGES`] as an array length: the most pages in a job.
pub(super) const CHUNK_LEN: usize = 64;

/// Dirty-bitmap words (64-page chunks) one job may gather.
pub(super) const JOB_WORDS: usize = 32;

/// The dirty pages of one frame: up to [`CHUNK_LEN`] pages from up to [`JOB_WORDS`] chunks of
/// one channel, in increasing order. Dense chunks make a job each; sparse ones, typical of
/// later rounds, share one, so a frame is never a page or two.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub(super) region: u32,
    /// (chunk, mask of its dirty pages), the first `words` of them in use.
    pub(super) chunks: [(u64, u64); JOB_WORDS],
    pub(super) words: usize,
    pub(super) pages: u32,
    pub(super) round: u32,
    pub(super) channel: u16,
    /// Set in the final round: the guest is paused and its memory frozen, so raw pages are
    /// sent in place instead of copied.
    pub(super) frozen: Option<Frozen>,
}

impl Job {
    /// Whether the dirty pages `mask` of chunk `chunk` still fit.
    fn fits(&self, chunk: u64, mask: u64) -> bool {
        let first = self.chunks[0].0;
        // Page offsets from the first chunk's first page must fit a u32.
        let span_ok = chunk.saturating_sub(first) < u64::from(u32::MAX) / CHUNK_PAGES;
        self.words < JOB_WORDS
            && u64::from(self.pages + mask.count_ones()) <= CHUNK_PAGES
            && span_ok
    }

    /// Adds the dirty pages `mask` of chunk `chunk` (which must [fit](Job::fits)).
    fn push(&mut self, chunk: u64, mask: u64) {
        self.chunks[self.words] = (chunk, mask);
        self.words += 1;
        self.pages += mask.count_ones();
    }

    /// The chunks in use.
    pub(super) fn chunks(&self) -> &[(u64, u64)] {
        &self.chunks[..self.words]
    }
}

impl Job {
    fn new(region: u32, round: u32, channel: u16, frozen: Option<Frozen>) -> Self {
        Job {
            region,
            chunks: [(0, 0); JOB_WORDS],
            words: 0,
            pages: 0,
            round,
            channel,
            frozen,
        }
    }
}

/// A whole round for the channel writers that encode their own jobs ([`RoundWork::jobs`]).
#[derive(Debug)]
pub(super) struct RoundWork {
    pub(super) dirty: DirtySet,
    pub(super) channels: u16,
    pub(super) round: u32,
    /// As for [`plan`].
    pub(super) frozen: Option<Frozen>,
}

impl RoundWork {
    /// The round's jobs for channel `channel`, as [`plan`] cuts them.
    pub(super) fn jobs(&self, channel: u16) -> impl Iterator<Item = Job> + '_ {
        plan(&self.dirty, self.channels, self.round, self.frozen.as_ref())
            .filter(move |job| job.channel == channel)
    }
}

/// The jobs of one round: every dirty page of `dirty` in exactly one job, for the channel that
/// owns it ([`channel_of`]), never across regions; a channel's sparse chunks share a job up to
/// [`CHUNK_LEN`] pages and [`JOB_WORDS`] chunks. Jobs come region by region; within a region a
/// job is yielded as soon as the next chunk of its channel does not fit, and the jobs still
/// gathering are yielded at the region's end in channel order. `frozen` goes into every job of
/// the final round.
pub(super) fn plan<'a>(
    dirty: &'a DirtySet,
    channels: u16,
    round: u32,
    frozen: Option<&Frozen>,
) -> Plan<'a> {
    Plan {
        dirty,
        channels: channels.max(1),
        round,
        frozen: frozen.cloned(),
        region: 0,
        word: 0,
        gathering: vec![None; usize::from(channels.max(1))],
        flushing: None,
    }
}

/// The iterator [`plan`] returns.
#[derive(Debug)]
pub(super) struct Plan<'a> {
    dirty: &'a DirtySet,
    channels: u16,
    round: u32,
    frozen: Option<Frozen>,
    /// The region and the bitmap word being planned.
    region: usize,
    word: usize,
    /// A job being gathered per channel.
    gathering: Vec<Option<Job>>,
    /// At a region's end: the next channel whose gathered job to yield.
    flushing: Option<usize>,
}

impl Plan<'_> {
    /// Adds the dirty chunk `chunk` of the current region; returns the job it did not fit.
    fn add(&mut self, chunk: u64, mask: u64) -> Option<Job> {
        let channel = channel_of(chunk * CHUNK_PAGES, self.channels);
        let region = u32::try_from(self.region).unwrap_or(u32::MAX);
        let (round, frozen) = (self.round, &self.frozen);
        let slot = &mut self.gathering[usize::from(channel)];
        let full = slot.take_if(|job| !job.fits(chunk, mask));
        slot.get_or_insert_with(|| Job::new(region, round, channel, frozen.clone()))
            .push(chunk, mask);
        full
    }
}

impl Iterator for Plan<'_> {
    type Item = Job;

    fn next(&mut self) -> Option<Job> {
        loop {
            if let Some(channel) = self.flushing {
                if let Some(slot) = self.gathering.get_mut(channel) {
                    self.flushing = Some(channel + 1);
                    if let Some(job) = slot.take() {
                        return Some(job);
                    }
                    continue;
                }
                self.flushing = None;
                self.region += 1;
                self.word = 0;
            }
            if self.region >= self.dirty.region_count() {
                return None;
            }
            let words = self.dirty.words(self.region);
            while let Some(&mask) = words.get(self.word) {
                let chunk = self.word as u64;
                self.word += 1;
                if mask != 0
                    && let Some(full) = self.add(chunk, mask)
                {
                    return Some(full);
                }
            }
            self.flushing = Some(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::memory::{GuestAddr, GuestMemory, PAGE_SIZE, Region};

    fn memory(pages: &[u64]) -> GuestMemory {
        let regions = pages
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let base = GuestAddr(i as u64 * (1 << 40));
                Region::anonymous(i as u32, base, n * PAGE_SIZE as u64).unwrap()
            })
            .collect();
        GuestMemory::new(regions).unwrap()
    }

    /// (region, channel, chunks) of each job.
    type Summary = Vec<(u32, u16, Vec<(u64, u64)>)>;

    fn summary(jobs: &[Job]) -> Summary {
        jobs.iter()
            .map(|j| (j.region, j.channel, j.chunks().to_vec()))
            .collect()
    }

    #[test]
    fn dense_chunks_make_a_job_each_in_bitmap_order() {
        let memory = memory(&[256]);
        let jobs: Vec<Job> = plan(&DirtySet::all(&memory), 2, 1, None).collect();
        let all = u64::MAX;
        assert_eq!(
            summary(&jobs),
            [
                (0, 0, vec![(0, all)]),
                (0, 1, vec![(1, all)]),
                (0, 0, vec![(2, all)]),
                (0, 1, vec![(3, all)]),
            ]
        );
        assert!(
            jobs.iter()
                .all(|j| j.round == 1 && j.pages == 64 && j.frozen.is_none())
        );
    }

    #[test]
    fn sparse_chunks_of_a_channel_share_a_job_within_a_region() {
        let memory = memory(&[64 * 40, 128]);
        let mut dirty = DirtySet::none(&memory);
        // One page in each of the 40 chunks of region 0; two chunks of region 1.
        for chunk in 0..40 {
            dirty.insert(0, chunk * 64 + 5);
        }
        dirty.insert(1, 0);
        dirty.insert(1, 64);
        let jobs: Vec<Job> = plan(&dirty, 1, 3, None).collect();
        // 32 chunks fill a job; the other 8 make a second; region 1 starts its own.
        let chunks: Vec<(u32, usize, u32)> =
            jobs.iter().map(|j| (j.region, j.words, j.pages)).collect();
        assert_eq!(chunks, [(0, 32, 32), (0, 8, 8), (1, 2, 2)]);
        // With four channels, each channel gathers its own chunks.
        let jobs: Vec<Job> = plan(&dirty, 4, 3, None).collect();
        let per: Vec<(u32, u16, usize)> = jobs
            .iter()
            .map(|j| (j.region, j.channel, j.words))
            .collect();
        assert_eq!(
            per,
            [
                (0, 0, 10),
                (0, 1, 10),
                (0, 2, 10),
                (0, 3, 10),
                (1, 0, 1),
                (1, 1, 1)
            ]
        );
    }

    #[test]
    fn a_job_holds_at_most_a_frame_of_pages() {
        let memory = memory(&[64 * 3]);
        let mut dirty = DirtySet::none(&memory);
        dirty.insert_range(0, 0, 40);
        dirty.insert_range(0, 64, 30);
        dirty.insert_range(0, 128, 10);
        let jobs: Vec<Job> = plan(&dirty, 1, 1, None).collect();
        let pages: Vec<u32> = jobs.iter().map(|j| j.pages).collect();
        assert_eq!(
            pages,
            [40, 40],
            "40 + 30 > 64: the second chunk starts a job"
        );
        assert!(plan(&DirtySet::none(&memory), 3, 1, None).next().is_none());
    }

    proptest! {
        #![proptest_config(crate::tests::proptest_config())]

        /// Every dirty page is in exactly one job, of its own region and channel, and no job
        /// breaks a limit.
        #[test]
        fn every_dirty_page_is_planned_once_on_its_channel(
            pages in prop::collection::vec(1u64..700, 1..4),
            seeds in prop::collection::vec(any::<u64>(), 1..40),
            channels in 1u16..6,
        ) {
            let memory = memory(&pages);
            let mut dirty = DirtySet::none(&memory);
            for (i, seed) in seeds.iter().enumerate() {
                let region = i % pages.len();
                dirty.insert_range(region, seed % pages[region], seed >> 60);
            }
            let mut seen = DirtySet::none(&memory);
            let mut planned = 0u64;
            for job in plan(&dirty, channels, 2, None) {
                prop_assert!(job.pages as usize <= CHUNK_LEN && job.words <= JOB_WORDS);
                let region = job.region as usize;
                let mut last = None;
                for &(chunk, mask) in job.chunks() {
                    prop_assert!(last < Some(chunk), "chunks increase");
                    last = Some(chunk);
                    prop_assert_eq!(channel_of(chunk * 64, channels), job.channel);
                    for bit in 0..64 {
                        if mask >> bit & 1 == 1 {
                            let page = chunk * 64 + bit;
                            let before = seen.words(region)[chunk as usize];
                            prop_assert!(before >> bit & 1 == 0, "page {page} twice");
                            seen.insert(region, page);
                            planned += 1;
                        }
                    }
                }
            }
            prop_assert_eq!(planned, dirty.count());
            prop_assert_eq!(seen, dirty);
        }
    }
}

//! Page encoding: zero-page detection, the compression gate, how each page of a batch goes on
//! the wire (zero, raw, lz4 or zstd), and decoding a compressed page ([`Decoder`]). Used by the
//! codec worker pools on both sides; where the bytes go in a frame is [`wire`](crate::wire)'s
//! business ([`PagesFrameWriter`]).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::memory::{Frozen, GuestMemory, MemoryError, PAGE_SIZE};
#[cfg(doc)]
use crate::wire::frame_capacity;
use crate::wire::{Encoding, PagesFrameWriter, Piece};

/// Whether and how pages are compressed. The receiver decodes whatever arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Zero pages are elided, everything else is sent raw.
    Off,
    /// Pages that the sampling gate calls compressible are lz4-compressed.
    Lz4,
    /// Pages that the sampling gate calls compressible are zstd-compressed (at a fast level):
    /// a better ratio than lz4 for about twice the CPU, for links slower than the codec.
    Zstd,
    /// Whichever of off, lz4 and zstd gets the pages across soonest, decided from what the
    /// session measures as it goes: how fast each channel's socket drains (a `max_bandwidth`
    /// cap counts as a slow link), what each codec costs and saves on the guest's pages, the
    /// cores free for it, and how fast each codec actually went. It starts uncompressed, and
    /// compresses only once the link is measured slower than the codec; over a fast link
    /// (loopback, a Unix socket) pages go raw. A session's decisions are logged
    /// (`SendOptions::log`).
    #[default]
    Auto,
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Compression::Off),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            "auto" => Ok(Compression::Auto),
            _ => Err(format!(
                "unknown compression {s:?} (expected off, lz4, zstd or auto)"
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Off => "off",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Auto => "auto",
        })
    }
}

/// Whether every byte of `page` is zero: OR-folds 16-byte words in 256-byte blocks and stops
/// at the first block that is not zero (about ten times faster than a byte loop).
pub fn is_zero(page: &[u8]) -> bool {
    let (blocks, tail) = page.as_chunks::<256>();
    for block in blocks {
        let (words, _) = block.as_chunks::<16>();
        let folded = words
            .iter()
            .fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w));
        if folded != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

/// The sampling gate: 64 bytes spread over the page; more than 44 distinct values means the
/// page looks random and lz4 would waste its time.
pub fn looks_compressible(page: &[u8]) -> bool {
    const SAMPLES: usize = 64;
    const MAX_DISTINCT: u32 = 44;
    if page.len() < SAMPLES {
        return true;
    }
    let stride = page.len() / SAMPLES;
    let mut seen = [0u64; 4];
    for i in 0..SAMPLES {
        let b = page[i * stride];
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    seen.iter().map(|w| w.count_ones()).sum::<u32>() <= MAX_DISTINCT
}

/// What one encoded batch contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Zero pages (sent as table entries only).
    pub zero: u64,
    /// Raw pages.
    pub raw: u64,
    /// lz4 pages.
    pub lz4: u64,
    /// zstd pages.
    pub zstd: u64,
}

impl BatchCounts {
    /// All pages.
    pub fn pages(&self) -> u64 {
        self.zero + self.raw + self.lz4 + self.zstd
    }
}

/// The pages of one frame: `first + offset` for each offset (strictly increasing) of region
/// index `region`, sent in round `round`.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Region index.
    pub region: u32,
    /// The frame's first page.
    pub first: u64,
    /// Page offsets from `first`.
    pub offsets: &'a [u32],
    /// The round.
    pub round: u32,
}

/// The zstd level pages are compressed at: zstd's fastest regular level. Measured on this
/// machine's text-like test pages, one 4 KiB page at a time: level 1 shrinks them 3.8× at about
/// 265 MB/s per core (lz4: 2.15× at about 720 MB/s); level -1 3.5× at 310 MB/s; level 3 4.0× at
/// 245 MB/s.
pub const ZSTD_LEVEL: i32 = 1;

/// Encodes batches of guest pages as pages frames ([`PagesFrameWriter`] lays them out): decides
/// for each page whether it goes as a zero page, raw, lz4 or zstd. Holds the compression
/// scratch (and the zstd context, made on first use) so nothing is allocated per batch.
pub struct Encoder {
    scratch: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// What it measures for `Compression::Auto`, once asked to ([`Encoder::measure`]).
    measuring: Option<Box<Measuring>>,
}

/// What an encoder measured of the pages it encoded ([`Encoder::measure`]), for
/// `Compression::Auto`: how many were not zero, how many of those the gate let through (only
/// those are ever compressed), how many each codec compressed, the CPU time of the batches,
/// and samples of what each codec makes of a compressible page and how long it takes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Pages that were not zero.
    pub nonzero: u64,
    /// Of those, pages the gate looked at: all of them where a codec compresses, one in
    /// [`Tally::LOOK_OFF_EVERY`] uncompressed (the share it lets through is what counts).
    pub looked: u64,
    /// Of those, pages the gate let through.
    pub gated: u64,
    /// Gated pages that batches compressed, with lz4 and with zstd.
    pub compressed: [u64; 2],
    /// Batches encoded.
    pub batches: u64,
    /// Of those, the ones whose CPU time was taken: one in [`Tally::TIME_EVERY`] (reading a
    /// thread's CPU clock is a system call that takes the scheduler's lock).
    pub timed_batches: u64,
    /// The encoding thread's CPU time over the timed batches (without the samples), in ns.
    pub batch_nanos: u64,
    /// Time spent on samples, in ns.
    pub sample_nanos: u64,
    /// The latest samples of lz4 and of zstd.
    pub samples: [Samples; 2],
}

impl Tally {
    /// Uncompressed, the gate looks at one non-zero page in this many: on every page it
    /// slowed encoding uncompressed by an eighth (12.0 → 10.5 GB/s on the mixed image, one
    /// core), which a link faster than the codecs pays in full.
    pub const LOOK_OFF_EVERY: u32 = 8;
    /// One batch in this many is timed (the first of them).
    pub const TIME_EVERY: u32 = 8;

    /// The CPU time of all its batches, estimated from the timed ones (ns).
    pub fn all_batches_nanos(&self) -> u64 {
        pro_rata(self.batch_nanos, self.timed_batches, self.batches)
    }
}

/// What `all` would take, where `part` of it took `nanos`: `nanos * all / part` without
/// overflow (saturating), and 0 where nothing was timed (`part` 0).
pub(crate) fn pro_rata(nanos: u64, part: u64, all: u64) -> u64 {
    if part == 0 {
        return 0;
    }
    let scaled = u128::from(nanos) * u128::from(all) / u128::from(part);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// A codec's latest samples: compressible pages it compressed, each timed on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Samples {
    /// Samples taken (the last [`Samples::KEEP`] of them are in `taken`).
    pub count: usize,
    /// ns it took, and the bytes it came to (a page that did not shrink counts as a whole
    /// page: it is sent raw).
    pub taken: [(u32, u32); Samples::KEEP],
}

impl Samples {
    /// Samples kept between two looks.
    pub const KEEP: usize = 4;

    fn push(&mut self, nanos: u64, bytes: usize) {
        let at = self.count % Self::KEEP;
        self.taken[at] = (
            u32::try_from(nanos).unwrap_or(u32::MAX),
            u32::try_from(bytes).unwrap_or(u32::MAX),
        );
        self.count += 1;
    }

    /// The samples kept, in no particular order.
    pub fn kept(&self) -> &[(u32, u32)] {
        &self.taken[..self.count.min(Self::KEEP)]
    }
}

/// An encoder's measuring state.
struct Measuring {
    tally: Tally,
    /// Non-zero pages since the gate last looked at one, uncompressed.
    unlooked: u32,
    /// Batches since the last timed one.
    untimed: u32,
    /// Gated pages since the last sample, and the earliest time for the next.
    since_sample: u32,
    next_sample: Instant,
    /// Where samples are compressed to.
    scratch: Vec<u8>,
}

impl Measuring {
    /// Samples at most every 10 ms, looking at the clock every 32 gated pages: about 0.5 % of a
    /// core (each codec compresses the page twice), and a hundred samples a second per encoder.
    const SAMPLE_EVERY: Duration = Duration::from_millis(10);
    const LOOK_EVERY: u32 = 32;
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("zstd", &self.zstd.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// An encoder with its scratch allocated.
    pub fn new() -> Self {
        Encoder {
            // The encoder wants room for its worst case, even though only results shorter than
            // a page are used.
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            zstd: None,
            measuring: None,
        }
    }

    /// From now on it measures what it encodes (see [`Tally`]), and samples every codec on a
    /// gated page at most every 10 ms.
    pub fn measure(&mut self) {
        if self.measuring.is_none() {
            self.measuring = Some(Box::new(Measuring {
                tally: Tally::default(),
                unlooked: 0,
                untimed: Tally::TIME_EVERY - 1,
                since_sample: 0,
                next_sample: Instant::now(),
                scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            }));
        }
    }

    /// What it measured since the last call (nothing unless [`measure`](Self::measure)d).
    pub fn take_tally(&mut self) -> Tally {
        self.measuring
            .as_mut()
            .map(|m| std::mem::take(&mut m.tally))
            .unwrap_or_default()
    }

    /// The thread's CPU time, if this encoder measures and times this batch.
    fn batch_start(&mut self) -> Option<u64> {
        let m = self.measuring.as_mut()?;
        m.tally.batches += 1;
        m.untimed += 1;
        if m.untimed < Tally::TIME_EVERY {
            return None;
        }
        m.untimed = 0;
        thread_cpu_nanos()
    }

    /// Counts the CPU time of a timed batch since `start` (without the samples taken in it).
    fn batch_end(&mut self, start: Option<u64>, samples: u64) {
        if let Some(m) = &mut self.measuring {
            m.tally.sample_nanos += samples;
            // The clock is read only for a timed batch.
            if let Some(start) = start
                && let Some(end) = thread_cpu_nanos()
            {
                m.tally.batch_nanos += end.saturating_sub(start).saturating_sub(samples);
                m.tally.timed_batches += 1;
            }
        }
    }

    /// Encodes `batch` as one sealed pages frame at the start of `buf`, which must hold
    /// [`frame_capacity`]`(batch.offsets.len())` bytes. Returns the frame length and the counts.
    ///
    /// Each page is copied out of guest memory once, into the frame; checks, compression and
    /// the crc then run on that copy while it is in cache, so the crc covers exactly the bytes
    /// sent even while the guest writes the page.
    pub fn encode(
        &mut self,
        memory: &GuestMemory,
        batch: &Batch<'_>,
        compression: PageCompression,
        buf: &mut [u8],
    ) -> Result<(usize, BatchCounts), MemoryError> {
        let start = self.batch_start();
        let mut samples = 0;
        let mut frame = PagesFrameWriter::new(buf, batch.offsets.len());
        let mut counts = BatchCounts::default();
        // One read claim for the whole batch.
        let reader = memory.reader()?;
        for &offset in batch.offsets {
            let at = (batch.first + u64::from(offset)) * PAGE_SIZE as u64;
            let data = frame.data();
            reader.read(batch.region as usize, at, data)?;
            let (encoding, len) = match self.classify(data, compression, &mut samples) {
                Class::Zero => (Encoding::Zero, 0),
                Class::Raw => (Encoding::Raw, PAGE_SIZE),
                Class::Compressed(encoding, n) => {
                    data[..n].copy_from_slice(&self.scratch[..n]);
                    (encoding, n)
                }
            };
            counts.add(encoding);
            frame.push(offset, encoding, len);
        }
        let len = frame.finish(batch.region, batch.first, batch.round);
        self.batch_end(start, samples);
        Ok((len, counts))
    }

    /// Encodes `batch` from frozen memory without copying raw pages: the header, the page table
    /// and any lz4 data go into `buf` (sized as for [`encode`](Self::encode)), and `pieces`
    /// lists what to send, in order — ranges of `buf` and raw pages to send straight from guest
    /// memory. Returns the frame's length on the wire and the counts. The crc covers the
    /// pages as they are in memory, which cannot change while it is frozen.
    pub fn encode_in_place(
        &mut self,
        memory: &Frozen,
        batch: &Batch<'_>,
        compression: PageCompression,
        buf: &mut [u8],
        pieces: &mut Vec<Piece>,
    ) -> Result<(usize, BatchCounts), MemoryError> {
        let start = self.batch_start();
        let mut samples = 0;
        let mut frame = PagesFrameWriter::in_place(buf, batch.offsets.len(), pieces);
        let mut counts = BatchCounts::default();
        for &offset in batch.offsets {
            let number = batch.first + u64::from(offset);
            let page = memory.page(batch.region as usize, number)?;
            let encoding = match self.classify(page, compression, &mut samples) {
                Class::Zero => {
                    frame.push(offset, Encoding::Zero, 0);
                    Encoding::Zero
                }
                Class::Raw => {
                    frame.push_in_place(offset, number, page);
                    Encoding::Raw
                }
                Class::Compressed(encoding, n) => {
                    frame.data()[..n].copy_from_slice(&self.scratch[..n]);
                    frame.push(offset, encoding, n);
                    encoding
                }
            };
            counts.add(encoding);
        }
        let len = frame.finish(batch.region, batch.first, batch.round);
        self.batch_end(start, samples);
        Ok((len, counts))
    }

    /// How `page` goes on the wire; a compressed page's data is in `self.scratch`. Time spent
    /// sampling the codecs (see [`Encoder::measure`]) is added to `samples` (ns).
    fn classify(&mut self, page: &[u8], compression: PageCompression, samples: &mut u64) -> Class {
        if is_zero(page) {
            return Class::Zero;
        }
        let Some(m) = self.measuring.as_deref_mut() else {
            if compression == PageCompression::Off || !looks_compressible(page) {
                return Class::Raw;
            }
            return match compress(compression, page, &mut self.scratch, &mut self.zstd) {
                Some((encoding, n)) => Class::Compressed(encoding, n),
                None => Class::Raw,
            };
        };
        m.tally.nonzero += 1;
        if compression == PageCompression::Off {
            m.unlooked += 1;
            if m.unlooked < Tally::LOOK_OFF_EVERY {
                return Class::Raw;
            }
            m.unlooked = 0;
        }
        m.tally.looked += 1;
        if !looks_compressible(page) {
            return Class::Raw;
        }
        m.tally.gated += 1;
        m.since_sample += 1;
        if m.since_sample >= Measuring::LOOK_EVERY {
            m.since_sample = 0;
            let now = Instant::now();
            if now >= m.next_sample {
                m.next_sample = now + Measuring::SAMPLE_EVERY;
                for (i, codec) in [PageCompression::Lz4, PageCompression::Zstd]
                    .into_iter()
                    .enumerate()
                {
                    // Once untimed: a codec not run for milliseconds starts with cold caches
                    // (its code, its tables), which a batch pays once, not per page.
                    compress(codec, page, &mut m.scratch, &mut self.zstd);
                    let timed = Instant::now();
                    let n = compress(codec, page, &mut m.scratch, &mut self.zstd);
                    let nanos = nanos_since(timed);
                    m.tally.samples[i].push(nanos, n.map_or(PAGE_SIZE, |(_, n)| n));
                }
                *samples += nanos_since(now);
            }
        }
        let index = match compression {
            PageCompression::Off => return Class::Raw,
            PageCompression::Lz4 => 0,
            PageCompression::Zstd => 1,
        };
        m.tally.compressed[index] += 1;
        match compress(compression, page, &mut self.scratch, &mut self.zstd) {
            Some((encoding, n)) => Class::Compressed(encoding, n),
            None => Class::Raw,
        }
    }
}

/// Compresses `page` into `out` with `compression`: the encoding and length if that came out
/// shorter than a page (`None`: it goes raw).
fn compress(
    compression: PageCompression,
    page: &[u8],
    out: &mut [u8],
    zstd: &mut Option<zstd::bulk::Compressor<'static>>,
) -> Option<(Encoding, usize)> {
    let compressed = match compression {
        PageCompression::Lz4 => lz4_flex::block::compress_into(page, out)
            .ok()
            .map(|n| (Encoding::Lz4, n)),
        // Only a result shorter than a page is used: a page of room is enough (zstd fails at
        // once on a page that does not fit, which then goes raw).
        PageCompression::Zstd => zstd_compressor(zstd)
            .and_then(|zstd| {
                zstd.compress_to_buffer(page, out.get_mut(..PAGE_SIZE)?)
                    .ok()
            })
            .map(|n| (Encoding::Zstd, n)),
        PageCompression::Off => None,
    };
    compressed.filter(|&(_, n)| n > 0 && n < PAGE_SIZE)
}

/// The zstd context in `slot`, made on first use; `None` (pages then go raw) if zstd cannot
/// make one (out of memory).
fn zstd_compressor<'a>(
    slot: &'a mut Option<zstd::bulk::Compressor<'static>>,
) -> Option<&'a mut zstd::bulk::Compressor<'static>> {
    if slot.is_none() {
        *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
    }
    slot.as_mut()
}

fn nanos_since(at: Instant) -> u64 {
    u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The calling thread's CPU time in ns (`None` if the clock cannot be read).
pub(crate) fn thread_cpu_nanos() -> Option<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call, which is all
    // clock_gettime touches.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Which codec an encoder tries on the pages of one batch (the session's [`Compression`]
/// decides this per batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCompression {
    /// Zero pages are elided, the rest sent raw.
    Off,
    /// Pages that the sampling gate lets through are lz4-compressed where that is shorter.
    Lz4,
    /// Pages that the sampling gate lets through are zstd-compressed where that is shorter.
    Zstd,
}

/// How a page is sent.
enum Class {
    Zero,
    Raw,
    /// lz4 or zstd, this many bytes.
    Compressed(Encoding, usize),
}

impl BatchCounts {
    pub(crate) fn add(&mut self, encoding: Encoding) {
        match encoding {
            Encoding::Zero => self.zero += 1,
            Encoding::Raw => self.raw += 1,
            Encoding::Lz4 => self.lz4 += 1,
            Encoding::Zstd => self.zstd += 1,
        }
    }
}

/// Decodes an lz4 block that must yield exactly one page into `page`.
pub fn decode_lz4(block: &[u8], page: &mut [u8]) -> Result<(), String> {
    match lz4_flex::block::decompress_into(block, page) {
        Ok(n) if n == page.len() => Ok(()),
        Ok(n) => Err(format!("lz4 page decodes to {n} bytes, not {}", page.len())),
        Err(e) => Err(format!("lz4 page does not decode: {e}")),
    }
}

/// Decodes compressed pages (lz4 and zstd) into place, each to exactly one page: a block that
/// decodes to less, or would decode to more (a decompression bomb), or does not decode, is
/// refused with the reason, and nothing is allocated for what a block claims. Holds the zstd
/// context, made on first use, so that a decode worker allocates it once.
#[derive(Default)]
pub struct Decoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("zstd", &self.zstd.is_some())
            .finish()
    }
}

impl Decoder {
    /// A decoder; its zstd context is made when the first zstd page comes.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Decodes `data`, a page's data in `encoding`, into `page` (its whole length).
    ///
    /// # Errors
    ///
    /// The reason the data is not exactly one page in that encoding, or an encoding that is
    /// not compressed.
    pub fn decode(
        &mut self,
        encoding: Encoding,
        data: &[u8],
        page: &mut [u8],
    ) -> Result<(), String> {
        match encoding {
            Encoding::Lz4 => decode_lz4(data, page),
            Encoding::Zstd => self.decode_zstd(data, page),
            other => Err(format!("{other:?} is not a compressed encoding")),
        }
    }

    fn decode_zstd(&mut self, frame: &[u8], page: &mut [u8]) -> Result<(), String> {
        if self.zstd.is_none() {
            let zstd = zstd::bulk::Decompressor::new()
                .map_err(|e| format!("cannot make a zstd decoder: {e}"))?;
            self.zstd = Some(zstd);
        }
        let Some(zstd) = self.zstd.as_mut() else {
            return Err("no zstd decoder".into());
        };
        // One-shot decoding into the page: the page is all the room the output gets (a frame
        // that decodes to more fails) and it is also the decoder's window, so nothing is
        // allocated for the window or the content size a frame declares.
        match zstd.decompress_to_buffer(frame, page) {
            Ok(n) if n == page.len() => Ok(()),
            Ok(n) => Err(format!(
                "zstd page decodes to {n} bytes, not {}",
                page.len()
            )),
            Err(e) => Err(format!("zstd page does not decode: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameHeader, FrameKind, PageTable, frame_capacity};

    #[test]
    fn zero_check_finds_any_set_byte() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        for at in [0, 1, 15, 16, 255, 256, 2048, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&[0u8; 100]));
        assert!(!is_zero(&[0, 0, 7]));
    }

    #[test]
    fn gate_tells_text_from_noise() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        assert!(looks_compressible(&text));
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!looks_compressible(&noise));
    }

    /// Every page codec, but zstd under Miri: zstd is C, which Miri cannot run.
    fn compressions() -> impl Iterator<Item = PageCompression> {
        [
            PageCompression::Off,
            PageCompression::Lz4,
            PageCompression::Zstd,
        ]
        .into_iter()
        .filter(|&c| !(cfg!(miri) && c == PageCompression::Zstd))
    }

    fn batch(first: u64, offsets: &[u32], round: u32) -> Batch<'_> {
        Batch {
            region: 0,
            first,
            offsets,
            round,
        }
    }

    #[test]
    fn encoded_frames_decode_to_the_same_pages() {
        let memory = GuestMemory::anonymous(8 * PAGE_SIZE as u64).unwrap();
        let text = b"migration ".repeat(PAGE_SIZE / 10 + 1);
        memory
            .write(0, PAGE_SIZE as u64, &text[..PAGE_SIZE])
            .unwrap();
        let noise: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| (i * 7919 % 251) as u8 ^ (i >> 3) as u8)
            .collect();
        memory.write(0, 3 * PAGE_SIZE as u64, &noise).unwrap();
        let mut buf = vec![0u8; frame_capacity(4)];
        let mut encoder = Encoder::new();
        let mut decoder = Decoder::new();
        for compression in compressions() {
            let (len, counts) = encoder
                .encode(&memory, &batch(0, &[0, 1, 3, 5], 7), compression, &mut buf)
                .unwrap();
            assert_eq!(counts.zero, 2);
            assert_eq!(counts.lz4, u64::from(compression == PageCompression::Lz4));
            assert_eq!(counts.zstd, u64::from(compression == PageCompression::Zstd));
            // The noise page goes raw whatever the codec.
            assert_eq!(
                counts.raw,
                1 + u64::from(compression == PageCompression::Off)
            );
            let mut fixed = [0u8; FrameHeader::LEN];
            fixed.copy_from_slice(&buf[..FrameHeader::LEN]);
            let header = FrameHeader::decode(&fixed).unwrap();
            assert_eq!(
                (header.kind, header.count, header.round),
                (FrameKind::Pages, 4, 7)
            );
            assert_eq!(FrameHeader::LEN + header.len as usize, len);
            let mut hasher = header.hasher();
            hasher.update(&buf[FrameHeader::LEN..len]);
            header.verify(hasher).unwrap();
            let mut table = PageTable::new();
            let mut at = FrameHeader::LEN + PageTable::len_for(&header);
            table.decode(&header, &buf[FrameHeader::LEN..at]).unwrap();
            let mut page = vec![0u8; PAGE_SIZE];
            let mut expected = vec![0u8; PAGE_SIZE];
            for (number, entry) in table.pages() {
                let data = &buf[at..at + entry.len as usize];
                match entry.encoding {
                    Encoding::Zero => page.fill(0),
                    Encoding::Raw => page.copy_from_slice(data),
                    encoding => decoder.decode(encoding, data, &mut page).unwrap(),
                }
                memory
                    .read(0, number * PAGE_SIZE as u64, &mut expected)
                    .unwrap();
                assert_eq!(page, expected, "page {number}");
                at += entry.len as usize;
            }
        }
        let err = encoder
            .encode(&memory, &batch(7, &[1], 1), PageCompression::Off, &mut buf)
            .unwrap_err();
        assert!(err.to_string().contains("outside guest memory"));
    }

    /// A measuring encoder counts what it saw and samples both codecs on a compressible page;
    /// what it sends is what it would send without measuring.
    #[test]
    #[cfg_attr(miri, ignore = "zstd is C, and the CPU clock a system call")]
    fn a_measuring_encoder_tallies_pages_and_samples_both_codecs() {
        const PAGES: usize = 64;
        let memory = GuestMemory::anonymous(PAGES as u64 * PAGE_SIZE as u64).unwrap();
        let text = b"migration ".repeat(PAGE_SIZE / 10 + 1);
        let noise: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| (i * 7919 % 251) as u8 ^ (i >> 3) as u8)
            .collect();
        // 48 text pages, 8 noise pages, 8 zero pages.
        for page in 0..56u64 {
            let data = if page < 48 {
                &text[..PAGE_SIZE]
            } else {
                &noise[..]
            };
            memory.write(0, page * PAGE_SIZE as u64, data).unwrap();
        }
        let offsets: Vec<u32> = (0..PAGES as u32).collect();
        let (mut plain, mut measured) = (
            vec![0u8; frame_capacity(PAGES)],
            vec![0u8; frame_capacity(PAGES)],
        );
        let mut encoder = Encoder::new();
        encoder.measure();
        let (len, counts) = encoder
            .encode(
                &memory,
                &batch(0, &offsets, 1),
                PageCompression::Lz4,
                &mut measured,
            )
            .unwrap();
        let tally = encoder.take_tally();
        assert_eq!((tally.nonzero, tally.looked, tally.gated), (56, 56, 48));
        assert_eq!(tally.compressed, [counts.lz4, 0]);
        assert_eq!(counts.lz4, 48);
        // One sample of each codec (the clock is looked at every 32 compressible pages, and
        // the first look samples), each of a text page, which both shrink.
        for samples in tally.samples {
            assert_eq!(samples.count, 1, "{tally:?}");
            let (_, bytes) = samples.kept()[0];
            assert!(bytes < PAGE_SIZE as u32 / 4, "{tally:?}");
        }
        // The first batch is timed.
        assert_eq!((tally.batches, tally.timed_batches), (1, 1));
        assert!(tally.batch_nanos > 0 && tally.sample_nanos > 0, "{tally:?}");
        assert_eq!(tally.all_batches_nanos(), tally.batch_nanos);
        assert_eq!(encoder.take_tally(), Tally::default(), "taken");
        let (plain_len, plain_counts) = Encoder::new()
            .encode(
                &memory,
                &batch(0, &offsets, 1),
                PageCompression::Lz4,
                &mut plain,
            )
            .unwrap();
        assert_eq!((len, counts), (plain_len, plain_counts));
        assert_eq!(measured[..len], plain[..len]);
        // Uncompressed, the gate looks at one non-zero page in eight (the 8th, 16th, ...:
        // 7 text pages of the 56), and nothing is sampled.
        let mut encoder = Encoder::new();
        encoder.measure();
        let offsets = &offsets[..];
        let b = batch(0, offsets, 1);
        let (len, counts) = encoder
            .encode(&memory, &b, PageCompression::Off, &mut measured)
            .unwrap();
        let tally = encoder.take_tally();
        assert_eq!((tally.nonzero, tally.looked, tally.gated), (56, 7, 6));
        assert_eq!(tally.compressed, [0, 0]);
        let plain_off = Encoder::new()
            .encode(&memory, &b, PageCompression::Off, &mut plain)
            .unwrap();
        assert_eq!((len, counts), plain_off);
        assert_eq!(measured[..len], plain[..len]);
    }

    /// A tally's CPU time stands for all its batches in the share of them that was timed.
    #[test]
    fn untimed_batches_cost_what_the_timed_ones_did() {
        let tally = |batches, timed_batches, batch_nanos| Tally {
            batches,
            timed_batches,
            batch_nanos,
            ..Tally::default()
        };
        assert_eq!(tally(8, 1, 1_000).all_batches_nanos(), 8_000);
        assert_eq!(tally(12, 2, 1_000).all_batches_nanos(), 6_000);
        assert_eq!(tally(7, 0, 0).all_batches_nanos(), 0, "nothing timed yet");
        assert_eq!(tally(u64::MAX, 1, u64::MAX).all_batches_nanos(), u64::MAX);
    }

    #[test]
    fn in_place_frames_equal_copied_frames_byte_for_byte() {
        let memory = std::sync::Arc::new(GuestMemory::anonymous(8 * PAGE_SIZE as u64).unwrap());
        let text = b"migration ".repeat(PAGE_SIZE / 10 + 1);
        for page in [1u64, 2, 6] {
            memory
                .write(0, page * PAGE_SIZE as u64, &text[..PAGE_SIZE])
                .unwrap();
        }
        let noise: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| (i * 7919 % 251) as u8 ^ (i >> 3) as u8)
            .collect();
        memory.write(0, 3 * PAGE_SIZE as u64, &noise).unwrap();
        let frozen = memory.freeze().unwrap();
        let mut encoder = Encoder::new();
        let (mut copied, mut buf) = (vec![0u8; frame_capacity(7)], vec![0u8; frame_capacity(7)]);
        let mut pieces = Vec::new();
        for compression in compressions() {
            let compress = compression != PageCompression::Off;
            let batch = batch(0, &[0, 1, 2, 3, 4, 6, 7], 3);
            let (len, counts) = encoder
                .encode(&memory, &batch, compression, &mut copied)
                .unwrap();
            let (wire, in_place) = encoder
                .encode_in_place(&frozen, &batch, compression, &mut buf, &mut pieces)
                .unwrap();
            assert_eq!((wire, in_place), (len, counts));
            let mut sent = Vec::new();
            for piece in &pieces {
                match *piece {
                    Piece::Buffer { start, len } => {
                        sent.extend_from_slice(&buf[start..start + len]);
                    }
                    Piece::Page(page) => sent.extend_from_slice(frozen.page(0, page).unwrap()),
                }
            }
            assert_eq!(sent, &copied[..len], "compress {compress}");
            // Raw pages are pieces of their own; buffer bytes next to each other on the wire
            // (header, table, lz4 pages 1 and 2) are one piece.
            let pages = pieces
                .iter()
                .filter(|p| matches!(p, Piece::Page(_)))
                .count();
            assert_eq!(pages as u64, counts.raw);
            assert_eq!(pieces.len(), if compress { 3 } else { 5 }, "{pieces:?}");
        }
        let outside = encoder.encode_in_place(
            &frozen,
            &batch(7, &[1], 1),
            PageCompression::Off,
            &mut buf,
            &mut pieces,
        );
        assert!(outside.is_err());
    }

    #[test]
    fn lz4_bombs_and_short_blocks_are_refused() {
        let mut page = vec![0u8; PAGE_SIZE];
        let half = lz4_flex::block::compress(&vec![b'a'; PAGE_SIZE / 2]);
        assert!(
            decode_lz4(&half, &mut page)
                .unwrap_err()
                .contains("decodes to 2048 bytes")
        );
        let bomb = lz4_flex::block::compress(&vec![b'a'; PAGE_SIZE * 64]);
        assert!(decode_lz4(&bomb, &mut page).is_err());
        assert!(decode_lz4(&[0xff, 0xff, 0xff], &mut page).is_err());
        let ok = lz4_flex::block::compress(&vec![b'b'; PAGE_SIZE]);
        decode_lz4(&ok, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == b'b'));
    }

    /// Bad zstd data is refused with the reason, never decoded past one page: a frame of half
    /// a page, bombs (a frame of 64 pages; a streamed frame of 2 pages that declares no size),
    /// a truncated frame, garbage, a skippable frame (no content), an lz4 block declared zstd
    /// and a zstd frame declared lz4; and a decoder goes on decoding good pages after each.
    #[test]
    #[cfg_attr(miri, ignore = "zstd is C, which Miri cannot run")]
    fn zstd_bombs_and_bad_frames_are_refused() {
        let mut decoder = Decoder::new();
        let mut page = vec![0u8; PAGE_SIZE];
        let zstd = |bytes: &[u8]| zstd::bulk::compress(bytes, ZSTD_LEVEL).unwrap();
        let good = zstd(&vec![b'b'; PAGE_SIZE]);
        let refused = |decoder: &mut Decoder, encoding, data: &[u8], says: &str| {
            let mut page = vec![0u8; PAGE_SIZE];
            let err = decoder.decode(encoding, data, &mut page).unwrap_err();
            assert!(err.contains(says), "{err}");
        };
        refused(
            &mut decoder,
            Encoding::Zstd,
            &zstd(&vec![b'a'; PAGE_SIZE / 2]),
            "decodes to 2048 bytes",
        );
        refused(
            &mut decoder,
            Encoding::Zstd,
            &zstd(&vec![b'a'; PAGE_SIZE * 64]),
            "does not decode",
        );
        // A page's content in a frame that declares a 1 MiB window and no content size
        // (streamed in two pieces): decoded into the page itself, nothing allocated for the
        // window. Then the same with a second page of content: a bomb that says nothing of
        // its size, refused.
        let mut text = b"window ".repeat(PAGE_SIZE / 7 + 1);
        text.truncate(PAGE_SIZE);
        let streamed = |content: &[u8]| {
            let mut wide = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL).unwrap();
            wide.window_log(20).unwrap();
            wide.include_contentsize(false).unwrap();
            let (head, tail) = content.split_at(content.len() / 2);
            std::io::Write::write_all(&mut wide, head).unwrap();
            std::io::Write::flush(&mut wide).unwrap();
            std::io::Write::write_all(&mut wide, tail).unwrap();
            wide.finish().unwrap()
        };
        decoder
            .decode(Encoding::Zstd, &streamed(&text), &mut page)
            .unwrap();
        assert_eq!(page, text);
        let twice = [&text[..], &text[..]].concat();
        refused(
            &mut decoder,
            Encoding::Zstd,
            &streamed(&twice),
            "does not decode",
        );
        refused(
            &mut decoder,
            Encoding::Zstd,
            &good[..good.len() - 2],
            "does not decode",
        );
        refused(
            &mut decoder,
            Encoding::Zstd,
            &[0xff, 0xff, 0xff, 0x00],
            "does not decode",
        );
        // A skippable frame: magic 0x184D2A50, length 4, four bytes: no content at all.
        refused(
            &mut decoder,
            Encoding::Zstd,
            &[0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4],
            "decodes to 0 bytes",
        );
        let lz4 = lz4_flex::block::compress(&vec![b'c'; PAGE_SIZE]);
        refused(&mut decoder, Encoding::Zstd, &lz4, "does not decode");
        refused(&mut decoder, Encoding::Lz4, &good, "lz4 page");
        refused(&mut decoder, Encoding::Raw, &good, "not a compressed");
        decoder.decode(Encoding::Zstd, &good, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == b'b'));
    }

    #[test]
    fn compression_names_parse() {
        assert_eq!("auto".parse::<Compression>(), Ok(Compression::Auto));
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd));
        assert_eq!(Compression::Zstd.to_string(), "zstd");
        assert!("zlib".parse::<Compression>().is_err());
    }
}

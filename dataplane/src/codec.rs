//! Page encoding: zero-page detection, the lz4 gate, building a pages frame from guest memory,
//! and decoding an lz4 page. Used by the codec worker pools on both sides.

use std::fmt;
use std::str::FromStr;

use crossbeam_channel::{Receiver, Sender};

use crate::memory::{Frozen, GuestMemory, MemoryError, PAGE_SIZE};
use crate::wire::{Encoding, FrameHeader, PageEntry, WIRE_PAGE_SIZE};

/// Whether and how pages are compressed. The receiver decodes whatever arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Zero pages are elided, everything else is sent raw.
    Off,
    /// Pages that the sampling gate calls compressible are lz4-compressed.
    Lz4,
    /// lz4 only where it pays: to a peer on another machine, while the link is the bottleneck
    /// (the channel's send queue is at least half full) and slower than the workers can compress
    /// (measured over the last 100 ms, below 0.65 GB/s per codec worker: on two cores lz4 pays
    /// only on links slower than about 1.3 GB/s). To a peer on this machine the link is the same
    /// CPUs, so pages go raw.
    #[default]
    Auto,
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Compression::Off),
            "lz4" => Ok(Compression::Lz4),
            "auto" => Ok(Compression::Auto),
            _ => Err(format!(
                "unknown compression {s:?} (expected off, lz4 or auto)"
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Off => "off",
            Compression::Lz4 => "lz4",
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
}

impl BatchCounts {
    /// All pages.
    pub fn pages(&self) -> u64 {
        self.zero + self.raw + self.lz4
    }
}

/// The size of a frame buffer for batches of up to `pages` pages.
pub const fn frame_capacity(pages: usize) -> usize {
    FrameHeader::LEN + pages * (PageEntry::LEN + PAGE_SIZE)
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

/// One piece of a pages frame sent in place ([`Encoder::encode_in_place`]), in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes at `start` of the frame buffer.
    Buffer {
        /// Offset in the frame buffer.
        start: usize,
        /// Length.
        len: usize,
    },
    /// A raw page of the frame's region, sent straight from frozen guest memory.
    Page(u64),
}

/// Builds pages frames from guest memory into a caller's buffer. Holds the lz4 scratch so
/// nothing is allocated per batch.
#[derive(Debug)]
pub struct Encoder {
    scratch: Vec<u8>,
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
        compress: bool,
        buf: &mut [u8],
    ) -> Result<(usize, BatchCounts), MemoryError> {
        let count = batch.offsets.len();
        assert!(buf.len() >= frame_capacity(count), "frame buffer too small");
        let head = FrameHeader::LEN + count * PageEntry::LEN;
        let mut cursor = head;
        let mut counts = BatchCounts::default();
        // The crc of the page data, page by page while each is hot in cache.
        let mut data_crc = crc32fast::Hasher::new();
        for (i, &offset) in batch.offsets.iter().enumerate() {
            let at = (batch.first + u64::from(offset)) * PAGE_SIZE as u64;
            let dst = &mut buf[cursor..cursor + PAGE_SIZE];
            memory.read(batch.region as usize, at, dst)?;
            let (encoding, len) = match self.classify(dst, compress) {
                Class::Zero => (Encoding::Zero, 0),
                Class::Raw => (Encoding::Raw, PAGE_SIZE),
                Class::Lz4(n) => {
                    buf[cursor..cursor + n].copy_from_slice(&self.scratch[..n]);
                    (Encoding::Lz4, n)
                }
            };
            counts.add(encoding);
            table_entry(buf, i, offset, encoding, len);
            data_crc.update(&buf[cursor..cursor + len]);
            cursor += len;
        }
        seal(buf, batch, head, cursor, &data_crc);
        Ok((cursor, counts))
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
        compress: bool,
        buf: &mut [u8],
        pieces: &mut Vec<Piece>,
    ) -> Result<(usize, BatchCounts), MemoryError> {
        let count = batch.offsets.len();
        assert!(buf.len() >= frame_capacity(count), "frame buffer too small");
        let head = FrameHeader::LEN + count * PageEntry::LEN;
        pieces.clear();
        pieces.push(Piece::Buffer {
            start: 0,
            len: head,
        });
        let mut cursor = head;
        let mut wire = head;
        let mut counts = BatchCounts::default();
        let mut data_crc = crc32fast::Hasher::new();
        for (i, &offset) in batch.offsets.iter().enumerate() {
            let number = batch.first + u64::from(offset);
            let page = memory.page(batch.region as usize, number)?;
            let (encoding, len) = match self.classify(page, compress) {
                Class::Zero => (Encoding::Zero, 0),
                Class::Raw => {
                    data_crc.update(page);
                    pieces.push(Piece::Page(number));
                    (Encoding::Raw, PAGE_SIZE)
                }
                Class::Lz4(n) => {
                    let data = &mut buf[cursor..cursor + n];
                    data.copy_from_slice(&self.scratch[..n]);
                    data_crc.update(data);
                    match pieces.last_mut() {
                        Some(Piece::Buffer { start, len }) if *start + *len == cursor => *len += n,
                        _ => pieces.push(Piece::Buffer {
                            start: cursor,
                            len: n,
                        }),
                    }
                    cursor += n;
                    (Encoding::Lz4, n)
                }
            };
            counts.add(encoding);
            table_entry(buf, i, offset, encoding, len);
            wire += len;
        }
        seal(buf, batch, head, wire, &data_crc);
        Ok((wire, counts))
    }

    /// How `page` goes on the wire; for lz4, the block is in `self.scratch`.
    fn classify(&mut self, page: &[u8], compress: bool) -> Class {
        if is_zero(page) {
            return Class::Zero;
        }
        if compress && looks_compressible(page) {
            match lz4_flex::block::compress_into(page, &mut self.scratch) {
                Ok(n) if n > 0 && n < PAGE_SIZE => return Class::Lz4(n),
                _ => {}
            }
        }
        Class::Raw
    }
}

/// How a page is sent.
enum Class {
    Zero,
    Raw,
    /// lz4, this many bytes.
    Lz4(usize),
}

impl BatchCounts {
    fn add(&mut self, encoding: Encoding) {
        match encoding {
            Encoding::Zero => self.zero += 1,
            Encoding::Raw => self.raw += 1,
            Encoding::Lz4 => self.lz4 += 1,
        }
    }
}

/// Writes page table entry `index` of a frame in `buf`.
fn table_entry(buf: &mut [u8], index: usize, offset: u32, encoding: Encoding, len: usize) {
    // A page's data is never longer than a page.
    let len = u32::try_from(len).unwrap_or(WIRE_PAGE_SIZE);
    let entry = PageEntry {
        offset,
        encoding,
        len,
    };
    entry.write(&mut buf[FrameHeader::LEN + index * PageEntry::LEN..]);
}

/// Writes the header of a pages frame `wire` bytes long into `buf` and seals it: the crc of the
/// header and table (the first `head` bytes) combined with `data_crc`.
fn seal(buf: &mut [u8], batch: &Batch<'_>, head: usize, wire: usize, data_crc: &crc32fast::Hasher) {
    // Frames are at most a few hundred KiB.
    let payload = u32::try_from(wire - FrameHeader::LEN).unwrap_or(u32::MAX);
    let count = u32::try_from(batch.offsets.len()).unwrap_or(u32::MAX);
    let header = FrameHeader::pages(batch.region, batch.first, batch.round, count, payload);
    buf[..FrameHeader::LEN].copy_from_slice(&header.encode());
    crate::wire::seal_split(&mut buf[..head], head, data_crc);
}

/// Decodes an lz4 block that must yield exactly one page into `page`.
pub fn decode_lz4(block: &[u8], page: &mut [u8]) -> Result<(), String> {
    match lz4_flex::block::decompress_into(block, page) {
        Ok(n) if n == page.len() => Ok(()),
        Ok(n) => Err(format!("lz4 page decodes to {n} bytes, not {}", page.len())),
        Err(e) => Err(format!("lz4 page does not decode: {e}")),
    }
}

/// A fixed set of reusable objects (buffers) that circulate over a channel: taken by
/// producers, given back by consumers. Nothing is allocated after start-up; a buffer keeps the
/// capacity it grew to.
#[derive(Debug)]
pub struct Pool<T> {
    give: Sender<T>,
    take: Receiver<T>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool {
            give: self.give.clone(),
            take: self.take.clone(),
        }
    }
}

impl<T> Pool<T> {
    /// A pool of these objects.
    pub fn of(items: Vec<T>) -> Self {
        let (give, take) = crossbeam_channel::bounded(items.len());
        for item in items {
            let _ = give.send(item);
        }
        Pool { give, take }
    }

    /// A pool of `count` objects made by `make`.
    pub fn filled(count: usize, mut make: impl FnMut() -> T) -> Self {
        let (give, take) = crossbeam_channel::bounded(count);
        for _ in 0..count {
            let _ = give.send(make());
        }
        Pool { give, take }
    }

    /// Takes an object, waiting for one to come back if all are in use.
    pub fn take(&self) -> T
    where
        T: Default,
    {
        // The pool holds its own sender, so the channel never disconnects.
        self.take.recv().unwrap_or_default()
    }

    /// Takes an object, waiting for one to come back if all are in use; `None` only if the
    /// pool is broken (it holds its own sender, so it never is).
    pub fn try_take(&self) -> Option<T> {
        self.take.recv().ok()
    }

    /// Gives an object back.
    pub fn give(&self, item: T) {
        let _ = self.give.try_send(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameKind, PageTable};

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
        for compress in [false, true] {
            let (len, counts) = encoder
                .encode(&memory, &batch(0, &[0, 1, 3, 5], 7), compress, &mut buf)
                .unwrap();
            assert_eq!(counts.zero, 2);
            assert_eq!(counts.lz4, u64::from(compress));
            let mut fixed = [0u8; FrameHeader::LEN];
            fixed.copy_from_slice(&buf[..32]);
            let header = FrameHeader::decode(&fixed).unwrap();
            assert_eq!(
                (header.kind, header.count, header.round),
                (FrameKind::Pages, 4, 7)
            );
            assert_eq!(32 + header.len as usize, len);
            let mut hasher = header.hasher();
            hasher.update(&buf[32..len]);
            header.verify(hasher).unwrap();
            let mut table = PageTable::new();
            table.decode(&header, &buf[32..64]).unwrap();
            let mut at = 64;
            let mut page = vec![0u8; PAGE_SIZE];
            let mut expected = vec![0u8; PAGE_SIZE];
            for entry in table.entries() {
                let data = &buf[at..at + entry.len as usize];
                match entry.encoding {
                    Encoding::Zero => page.fill(0),
                    Encoding::Raw => page.copy_from_slice(data),
                    Encoding::Lz4 => decode_lz4(data, &mut page).unwrap(),
                }
                memory
                    .read(0, u64::from(entry.offset) * PAGE_SIZE as u64, &mut expected)
                    .unwrap();
                assert_eq!(page, expected, "page {}", entry.offset);
                at += entry.len as usize;
            }
        }
        let err = encoder
            .encode(&memory, &batch(7, &[1], 1), false, &mut buf)
            .unwrap_err();
        assert!(err.to_string().contains("outside guest memory"));
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
        for compress in [false, true] {
            let batch = batch(0, &[0, 1, 2, 3, 4, 6, 7], 3);
            let (len, counts) = encoder
                .encode(&memory, &batch, compress, &mut copied)
                .unwrap();
            let (wire, in_place) = encoder
                .encode_in_place(&frozen, &batch, compress, &mut buf, &mut pieces)
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
        let outside =
            encoder.encode_in_place(&frozen, &batch(7, &[1], 1), false, &mut buf, &mut pieces);
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

    #[test]
    fn pool_recycles() {
        let pool = Pool::filled(2, || vec![0u8; 16]);
        let a = pool.take();
        let b = pool.take();
        assert_eq!(a.len(), 16);
        pool.give(a);
        pool.give(b);
        assert_eq!(pool.take().len(), 16);
        assert_eq!("auto".parse::<Compression>(), Ok(Compression::Auto));
        assert!("zstd".parse::<Compression>().is_err());
    }
}

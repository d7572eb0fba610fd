//! The layout of a pages frame's payload, in both directions: [`PagesFrameWriter`] builds one
//! (the sender's codec decides only how each page is encoded), and [`PageTable`] reads one (the
//! receiver learns from it where each page's data is). See the [format](super) for the bytes:
//! the 32-byte header, a table of 8-byte [`PageEntry`]s, then each page's data in table order.

use super::error::{DecodeError, invalid};
use super::frame::{FrameHeader, FrameKind, seal_split};
use super::le::{put_u32, u32_at};
use super::limits::{MAX_PAGES_PER_FRAME, PAGE_ENTRY_LEN, WIRE_PAGE_SIZE};

/// Bytes of one page's data at most.
const PAGE: usize = WIRE_PAGE_SIZE as usize;

/// The size of a frame buffer for pages frames of up to `pages` pages: header, table, and a
/// whole page of data per page.
pub const fn frame_capacity(pages: usize) -> usize {
    FrameHeader::LEN + pages * (PageEntry::LEN + PAGE)
}

/// One piece of a pages frame that is sent in place ([`PagesFrameWriter::in_place`]), in wire
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes at `start` of the frame buffer.
    Buffer {
        /// Offset in the frame buffer.
        start: usize,
        /// Length.
        len: usize,
    },
    /// A raw page of the frame's region, sent straight from (frozen) guest memory.
    Page(u64),
}

/// Builds one pages frame in a caller's buffer: [`new`](Self::new) or
/// [`in_place`](Self::in_place) for a frame of `count` pages, then one `push` per page in
/// increasing page order, then [`finish`](Self::finish), which writes the header and seals the
/// frame with its crc. The crc of each page's data is taken as it is pushed, while the data is
/// still in cache.
#[derive(Debug)]
pub struct PagesFrameWriter<'a> {
    buf: &'a mut [u8],
    count: usize,
    pushed: usize,
    /// Where the next data stored in `buf` goes.
    stored: usize,
    /// The frame's length on the wire so far.
    wire: usize,
    data_crc: crc32fast::Hasher,
    /// For a frame sent in place: what to send, in order.
    pieces: Option<&'a mut Vec<Piece>>,
}

impl<'a> PagesFrameWriter<'a> {
    /// A frame of `count` pages (1 to [`MAX_PAGES_PER_FRAME`]) whose data is all stored in
    /// `buf`, which must hold [`frame_capacity`]`(count)` bytes; it is sent as `buf[..len]`.
    pub fn new(buf: &'a mut [u8], count: usize) -> Self {
        assert!(
            (1..=MAX_PAGES_PER_FRAME as usize).contains(&count),
            "a pages frame has 1 to {MAX_PAGES_PER_FRAME} pages, not {count}"
        );
        assert!(buf.len() >= frame_capacity(count), "frame buffer too small");
        let head = FrameHeader::LEN + count * PageEntry::LEN;
        PagesFrameWriter {
            buf,
            count,
            pushed: 0,
            stored: head,
            wire: head,
            data_crc: crc32fast::Hasher::new(),
            pieces: None,
        }
    }

    /// As [`new`](Self::new), for a frame whose raw pages are sent straight from guest memory
    /// ([`push_in_place`](Self::push_in_place)): `pieces` is filled with what to send, in
    /// order.
    pub fn in_place(buf: &'a mut [u8], count: usize, pieces: &'a mut Vec<Piece>) -> Self {
        let mut writer = Self::new(buf, count);
        pieces.clear();
        pieces.push(Piece::Buffer {
            start: 0,
            len: writer.stored,
        });
        writer.pieces = Some(pieces);
        writer
    }

    /// Room for the next page's data, a whole page: copy or compress the page into it, then
    /// [`push`](Self::push) it with the length used.
    pub fn data(&mut self) -> &mut [u8] {
        &mut self.buf[self.stored..self.stored + PAGE]
    }

    /// Adds the page at `offset` from the frame's first page, whose `len` bytes of data are
    /// at the start of [`data`](Self::data): none for a zero page, a page for a raw one, less
    /// than a page of lz4.
    pub fn push(&mut self, offset: u32, encoding: Encoding, len: usize) {
        debug_assert!(matches!(
            (encoding, len),
            (Encoding::Zero, 0) | (Encoding::Raw, PAGE) | (Encoding::Lz4 | Encoding::Zstd, 1..PAGE)
        ));
        let len = len.min(PAGE);
        // A zero page has no data to hash.
        if len > 0 {
            self.data_crc
                .update(&self.buf[self.stored..self.stored + len]);
        }
        if let Some(pieces) = &mut self.pieces {
            match pieces.last_mut() {
                Some(Piece::Buffer { start, len: n }) if *start + *n == self.stored => *n += len,
                _ if len == 0 => {}
                _ => pieces.push(Piece::Buffer {
                    start: self.stored,
                    len,
                }),
            }
        }
        self.entry(offset, encoding, len);
        self.stored += len;
    }

    /// Adds a raw page that is sent in place: `data` is page `page` of the frame's region,
    /// which must not change until the frame is sent (frozen memory). Only for frames made
    /// with [`in_place`](Self::in_place).
    pub fn push_in_place(&mut self, offset: u32, page: u64, data: &[u8]) {
        assert_eq!(data.len(), PAGE, "a raw page is a whole page");
        self.data_crc.update(data);
        let Some(pieces) = &mut self.pieces else {
            panic!("push_in_place on a frame that is not sent in place");
        };
        pieces.push(Piece::Page(page));
        self.entry(offset, Encoding::Raw, PAGE);
    }

    /// Writes table entry number `self.pushed`.
    fn entry(&mut self, offset: u32, encoding: Encoding, len: usize) {
        assert!(
            self.pushed < self.count,
            "more pages than the frame was made for"
        );
        let entry = PageEntry {
            offset,
            encoding,
            // At most a page, which fits.
            len: u32::try_from(len).unwrap_or(WIRE_PAGE_SIZE),
        };
        entry.write(&mut self.buf[FrameHeader::LEN + self.pushed * PageEntry::LEN..]);
        self.pushed += 1;
        self.wire += len;
    }

    /// Writes the header (the frame's pages are of region index `region`, from page `first`,
    /// sent in round `round`) and the crc; returns the frame's length on the wire.
    pub fn finish(self, region: u32, first: u64, round: u32) -> usize {
        assert_eq!(
            self.pushed, self.count,
            "a page of the frame was not pushed"
        );
        let head = FrameHeader::LEN + self.count * PageEntry::LEN;
        // A frame is at most a few MiB, and at most 1024 pages.
        let payload = u32::try_from(self.wire - FrameHeader::LEN).unwrap_or(u32::MAX);
        let count = u32::try_from(self.count).unwrap_or(u32::MAX);
        let header = FrameHeader::pages(region, first, round, count, payload);
        self.buf[..FrameHeader::LEN].copy_from_slice(&header.encode());
        seal_split(&mut self.buf[..head], head, &self.data_crc);
        self.wire
    }
}

/// How one page is encoded in a pages frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// All zero bytes; no data.
    Zero = 0,
    /// The page's bytes as they are.
    Raw = 1,
    /// An lz4 block that decodes to exactly one page.
    Lz4 = 2,
    /// A zstd frame that decodes to exactly one page.
    Zstd = 3,
}

impl Encoding {
    /// Whether the page's data is compressed (it must be decoded into the page).
    pub fn is_compressed(self) -> bool {
        matches!(self, Encoding::Lz4 | Encoding::Zstd)
    }
}

/// One page table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Page offset from the frame's first page.
    pub offset: u32,
    /// Its encoding.
    pub encoding: Encoding,
    /// Its data length.
    pub len: u32,
}

impl PageEntry {
    /// Encoded size.
    pub const LEN: usize = PAGE_ENTRY_LEN as usize;

    /// Writes the entry into `out[..8]`.
    pub fn write(&self, out: &mut [u8]) {
        put_u32(out, 0, self.offset);
        put_u32(out, 4, (self.encoding as u32) << 24 | self.len);
    }

    fn read(b: &[u8]) -> Result<Self, DecodeError> {
        let offset = u32_at(b, 0);
        let desc = u32_at(b, 4);
        let len = desc & 0x00FF_FFFF;
        let encoding = match desc >> 24 {
            0 if len == 0 => Encoding::Zero,
            1 if len == WIRE_PAGE_SIZE => Encoding::Raw,
            2 if len > 0 && len < WIRE_PAGE_SIZE => Encoding::Lz4,
            3 if len > 0 && len < WIRE_PAGE_SIZE => Encoding::Zstd,
            0..=3 => return Err(invalid("page data length", len)),
            other => return Err(invalid("page encoding", other)),
        };
        Ok(PageEntry {
            offset,
            encoding,
            len,
        })
    }
}

/// The decoded page table of a pages frame: the receiver's view of its layout.
#[derive(Debug, Clone, Default)]
pub struct PageTable {
    entries: Vec<PageEntry>,
    /// The frame's first page.
    first: u64,
}

impl PageTable {
    /// An empty table with room for the largest frame, so decoding never allocates.
    pub fn new() -> Self {
        PageTable {
            entries: Vec::with_capacity(MAX_PAGES_PER_FRAME as usize),
            first: 0,
        }
    }

    /// Bytes of table in a frame of `header.count` pages.
    pub fn len_for(header: &FrameHeader) -> usize {
        header.count as usize * PageEntry::LEN
    }

    /// Decodes `bytes` (exactly [`PageTable::len_for`] of them) for `header`: every entry
    /// valid, offsets strictly increasing, and data lengths adding up to the payload.
    pub fn decode(&mut self, header: &FrameHeader, bytes: &[u8]) -> Result<(), DecodeError> {
        self.entries.clear();
        self.first = header.value;
        if header.kind != FrameKind::Pages || bytes.len() != Self::len_for(header) {
            return Err(invalid("page table length", bytes.len() as u64));
        }
        let mut data = 0u64;
        let mut next_offset = 0u64;
        for chunk in bytes.chunks_exact(PageEntry::LEN) {
            let entry = PageEntry::read(chunk)?;
            if u64::from(entry.offset) < next_offset {
                return Err(invalid("page offset (not increasing)", entry.offset));
            }
            if header.value.checked_add(u64::from(entry.offset)).is_none() {
                return Err(invalid("page offset", entry.offset));
            }
            next_offset = u64::from(entry.offset) + 1;
            data += u64::from(entry.len);
            self.entries.push(entry);
        }
        let expected = u64::from(header.len) - bytes.len() as u64;
        if data != expected {
            return Err(invalid("sum of page data lengths", data));
        }
        Ok(())
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[PageEntry] {
        &self.entries
    }

    /// The frame's pages in wire order (the order of their data after the table): each page's
    /// number in its region, and its entry. `decode` checked that no number overflows.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &PageEntry)> + '_ {
        self.entries
            .iter()
            .map(|entry| (self.first.saturating_add(u64::from(entry.offset)), entry))
    }

    /// Bytes of compressed (lz4 and zstd) data in the frame.
    pub fn compressed_bytes(&self) -> usize {
        self.entries
            .iter()
            .filter(|entry| entry.encoding.is_compressed())
            .map(|entry| entry.len as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_bytes(entries: &[PageEntry]) -> Vec<u8> {
        let mut b = vec![0u8; entries.len() * 8];
        for (e, out) in entries.iter().zip(b.chunks_exact_mut(8)) {
            e.write(out);
        }
        b
    }

    #[test]
    fn page_tables_are_validated() {
        let e = |offset, encoding, len| PageEntry {
            offset,
            encoding,
            len,
        };
        let good = [
            e(0, Encoding::Zero, 0),
            e(3, Encoding::Raw, 4096),
            e(4, Encoding::Lz4, 100),
            e(5, Encoding::Zstd, 60),
        ];
        let h = FrameHeader::pages(0, 10, 1, 4, 32 + 4256);
        let mut table = PageTable::new();
        table.decode(&h, &table_bytes(&good)).unwrap();
        assert_eq!(table.entries(), good);

        let cases: [(&[PageEntry], u32, &str); 8] = [
            (
                &[e(1, Encoding::Zero, 0), e(1, Encoding::Zero, 0)],
                16,
                "not increasing",
            ),
            (&[e(0, Encoding::Raw, 100)], 108, "page data length"),
            (&[e(0, Encoding::Lz4, 4096)], 8 + 4096, "page data length"),
            (&[e(0, Encoding::Lz4, 0)], 8, "page data length"),
            (&[e(0, Encoding::Zstd, 4096)], 8 + 4096, "page data length"),
            (&[e(0, Encoding::Zstd, 0)], 8, "page data length"),
            (&[e(0, Encoding::Zero, 5)], 13, "page data length"),
            (
                &[e(0, Encoding::Raw, 4096)],
                8 + 4095,
                "sum of page data lengths",
            ),
        ];
        for (entries, len, needle) in cases {
            let h = FrameHeader::pages(0, 0, 1, entries.len() as u32, len);
            let err = table.decode(&h, &table_bytes(entries)).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let mut unknown = table_bytes(&[e(0, Encoding::Zero, 0)]);
        unknown[7] = 9;
        let h = FrameHeader::pages(0, 0, 1, 1, 8);
        assert!(
            table
                .decode(&h, &unknown)
                .unwrap_err()
                .to_string()
                .contains("page encoding")
        );
        let h = FrameHeader::pages(0, u64::MAX, 1, 1, 8);
        assert!(
            table
                .decode(&h, &table_bytes(&[e(1, Encoding::Zero, 0)]))
                .is_err()
        );
    }

    /// What the writer builds is what the reader reads: header, table, data in table order,
    /// and a crc over all of it; in place, the pieces put the same bytes on the wire.
    #[test]
    fn written_frames_read_back_copied_and_in_place() {
        let text = vec![b'a'; PAGE];
        let lz4 = lz4_flex::block::compress(&text);
        let raw: Vec<u8> = (0..PAGE).map(|i| (i * 7 % 251) as u8).collect();
        let build = |buf: &mut Vec<u8>, pieces: Option<&mut Vec<Piece>>| {
            let mut frame = match pieces {
                Some(pieces) => PagesFrameWriter::in_place(buf, 3, pieces),
                None => PagesFrameWriter::new(buf, 3),
            };
            frame.push(0, Encoding::Zero, 0);
            frame.data()[..lz4.len()].copy_from_slice(&lz4);
            frame.push(2, Encoding::Lz4, lz4.len());
            if frame.pieces.is_some() {
                frame.push_in_place(5, 105, &raw);
            } else {
                frame.data().copy_from_slice(&raw);
                frame.push(5, Encoding::Raw, PAGE);
            }
            frame.finish(1, 100, 4)
        };
        let mut copied = vec![0u8; frame_capacity(3)];
        let len = build(&mut copied, None);
        let mut fixed = [0u8; FrameHeader::LEN];
        fixed.copy_from_slice(&copied[..FrameHeader::LEN]);
        let header = FrameHeader::decode(&fixed).unwrap();
        assert_eq!(
            (header.region, header.value, header.round, header.count),
            (1, 100, 4, 3)
        );
        assert_eq!(FrameHeader::LEN + header.len as usize, len);
        let mut hasher = header.hasher();
        hasher.update(&copied[FrameHeader::LEN..len]);
        header.verify(hasher).unwrap();
        let mut table = PageTable::new();
        let table_end = FrameHeader::LEN + PageTable::len_for(&header);
        table
            .decode(&header, &copied[FrameHeader::LEN..table_end])
            .unwrap();
        let pages: Vec<(u64, Encoding, u32)> = table
            .pages()
            .map(|(page, entry)| (page, entry.encoding, entry.len))
            .collect();
        let lz4_len = lz4.len() as u32;
        assert_eq!(
            pages,
            [
                (100, Encoding::Zero, 0),
                (102, Encoding::Lz4, lz4_len),
                (105, Encoding::Raw, 4096)
            ]
        );
        assert_eq!(table.compressed_bytes(), lz4.len());
        assert_eq!(&copied[table_end..table_end + lz4.len()], &lz4[..]);
        assert_eq!(&copied[table_end + lz4.len()..len], &raw[..]);

        let mut buf = vec![0u8; frame_capacity(3)];
        let mut pieces = Vec::new();
        let wire = build(&mut buf, Some(&mut pieces));
        assert_eq!(wire, len);
        // Header, table and the lz4 page are one piece; the raw page is its own.
        assert_eq!(pieces.len(), 2, "{pieces:?}");
        let mut sent = Vec::new();
        for piece in &pieces {
            match *piece {
                Piece::Buffer { start, len } => sent.extend_from_slice(&buf[start..start + len]),
                Piece::Page(105) => sent.extend_from_slice(&raw),
                Piece::Page(other) => panic!("page {other} is not in the frame"),
            }
        }
        assert_eq!(sent, &copied[..len]);
    }

    #[test]
    #[should_panic(expected = "a page of the frame was not pushed")]
    fn a_frame_with_a_page_missing_is_a_bug() {
        let mut buf = vec![0u8; frame_capacity(2)];
        let mut frame = PagesFrameWriter::new(&mut buf, 2);
        frame.push(0, Encoding::Zero, 0);
        frame.finish(0, 0, 1);
    }
}

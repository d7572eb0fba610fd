//! The `receiver` target's input: flags, then either the raw byte stream a sender puts on the
//! wire after its hello, or a *program* that builds such a stream out of well-formed frames with
//! correct checksums, so that the fuzzer gets past the crc to page tables, lz4 blocks, rounds,
//! device state and end of stream.
//!
//! # Input format
//!
//! ```text
//! byte 0   flags: bit 0 program (else raw stream), bit 1 guest memory prefilled with a
//!          pattern (else fresh, known-zero memory), bit 2 io_uring transport (else blocking)
//! rest     the raw stream, or the program: ops until the input ends
//! ```
//!
//! Each op is an opcode byte (taken modulo [`OPS`]) and its operands. `b` is one byte, `u16`,
//! `u32`, `u64` little-endian, `bytes` a length byte and that many bytes.
//!
//! | op | frame | operands |
//! |---|---|---|
//! | 0 | pages | region `b` (% 3; 2 does not exist), first `b` (see [`first_page`]), count `b` (% 8 + 1), round `b` (0: the round due), then per page: step `b` ([`page_step`]), encoding `b` ([`PageSpec`]) |
//! | 1 | end of round | pages `b` (0: the pages sent this round, else `b - 1`) |
//! | 2 | device state | piece `bytes` at the next offset |
//! | 3 | end of stream | none: the round last ended and the pages sent in all |
//! | 4 | error | message `bytes` |
//! | 5 | (raw bytes) | `bytes`, appended as they are |
//! | 6 | (corruption) | position `u16` (modulo the stream so far), xor mask `b` (0 acts as 1) |
//! | 7 | ready | none (a receiver must refuse it from a sender) |
//! | 8 | any header | kind `b` (% 8), round `u32`, value `u64`, payload `bytes`; sealed |
//!
//! The guest memory is always [`LAYOUT`]; the hello is built for it ([`hello`]).

use ramjet_dataplane::internals::wire::{Encoding, FrameHeader, Hello, PageEntry, seal};
use ramjet_dataplane::memory::{GuestAddr, RegionLayout};

use crate::cursor::Cursor;

/// Flag: the input is a program (else a raw stream).
pub const FLAG_PROGRAM: u8 = 1;
/// Flag: guest memory starts filled with [`initial_byte`] (else zero and known to be zero).
pub const FLAG_PREFILL: u8 = 2;
/// Flag: receive over io_uring where the kernel allows it (else the blocking transport).
pub const FLAG_URING: u8 = 4;

/// Page size of the wire format.
pub const PAGE: usize = 4096;

/// The receiver's guest memory: two small regions, so region indexes and bounds matter.
pub const LAYOUT: [RegionLayout; 2] = [
    RegionLayout::new(0, GuestAddr(0), 6 * PAGE as u64),
    RegionLayout::new(9, GuestAddr(0x10_0000), 3 * PAGE as u64),
];

/// Number of opcodes.
pub const OPS: u8 = 9;

/// The hello a one-channel sender sends for [`LAYOUT`].
pub fn hello() -> Vec<u8> {
    Hello {
        flags: Default::default(),
        session: *b"ramjet-fuzz-sess",
        channel: 0,
        channels: 1,
        regions: LAYOUT.to_vec(),
    }
    .encode()
}

/// Byte `i` of page `page` of region index `region` when the memory is prefilled: different on
/// every page, never all zero.
pub fn initial_byte(region: usize, page: u64, i: usize) -> u8 {
    // Truncation is the point: a pattern of bytes.
    #[allow(clippy::cast_possible_truncation)]
    let v = (region as u64 * 131 + page * 29 + i as u64 * 7 + 1) as u8;
    v | 1
}

/// A compressible page made from `seed`: a short repeating pattern (all zero for seed 0).
pub fn pattern_page(seed: u8) -> Vec<u8> {
    let period = usize::from(seed % 16) + 1;
    (0..PAGE)
        .map(|i| {
            #[allow(clippy::cast_possible_truncation)]
            let step = (i % period) as u8;
            if seed == 0 {
                0
            } else {
                seed.wrapping_add(step)
            }
        })
        .collect()
}

/// The first page of a pages frame, from its operand byte: small pages mostly, and pages near
/// `u64::MAX` to test overflow.
pub fn first_page(b: u8) -> u64 {
    if b < 0xF0 {
        u64::from(b % 10)
    } else {
        u64::MAX - u64::from(b & 0xF)
    }
}

/// How far a page's offset is from the previous one's (the first page's offset is this step
/// from 0): 1 to 3 pages, or 0 (an illegal repeat) for 0xFF.
pub fn page_step(b: u8) -> u32 {
    if b == 0xFF { 0 } else { 1 + u32::from(b % 3) }
}

/// One page of a program's pages frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageSpec {
    /// Encoding byte % 6 == 0: a zero page.
    Zero,
    /// % 6 == 1, then a seed byte: the raw [`pattern_page`].
    Raw(u8),
    /// % 6 == 2, then a seed byte: the [`pattern_page`] compressed with lz4.
    Lz4(u8),
    /// % 6 == 3, then `bytes`: those bytes as the lz4 block (usually not a valid one).
    Lz4Block(Vec<u8>),
    /// % 6 == 4, then a seed byte: the [`pattern_page`] compressed with zstd.
    Zstd(u8),
    /// % 6 == 5, then `bytes`: those bytes as the zstd frame (usually not a valid one).
    ZstdFrame(Vec<u8>),
}

impl PageSpec {
    fn read(c: &mut Cursor<'_>) -> PageSpec {
        match c.u8() % 6 {
            0 => PageSpec::Zero,
            1 => PageSpec::Raw(c.u8()),
            2 => PageSpec::Lz4(c.u8()),
            3 => PageSpec::Lz4Block(c.short_bytes().to_vec()),
            4 => PageSpec::Zstd(c.u8()),
            _ => PageSpec::ZstdFrame(c.short_bytes().to_vec()),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            PageSpec::Zero => out.push(0),
            PageSpec::Raw(seed) => out.extend([1, *seed]),
            PageSpec::Lz4(seed) => out.extend([2, *seed]),
            PageSpec::Lz4Block(block) => {
                out.push(3);
                push_short(out, block);
            }
            PageSpec::Zstd(seed) => out.extend([4, *seed]),
            PageSpec::ZstdFrame(frame) => {
                out.push(5);
                push_short(out, frame);
            }
        }
    }

    /// The encoding and the data as sent.
    fn encode(&self) -> (Encoding, Vec<u8>) {
        match self {
            PageSpec::Zero => (Encoding::Zero, Vec::new()),
            PageSpec::Raw(seed) => (Encoding::Raw, pattern_page(*seed)),
            PageSpec::Lz4(seed) => {
                let page = pattern_page(*seed);
                let block = lz4_flex::block::compress(&page);
                if block.len() < PAGE {
                    (Encoding::Lz4, block)
                } else {
                    (Encoding::Raw, page)
                }
            }
            PageSpec::Lz4Block(block) => (Encoding::Lz4, block.clone()),
            PageSpec::Zstd(seed) => {
                let page = pattern_page(*seed);
                match zstd::bulk::compress(&page, 1) {
                    Ok(frame) if !frame.is_empty() && frame.len() < PAGE => (Encoding::Zstd, frame),
                    _ => (Encoding::Raw, page),
                }
            }
            PageSpec::ZstdFrame(frame) => (Encoding::Zstd, frame.clone()),
        }
    }
}

fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(255)];
    #[allow(clippy::cast_possible_truncation)]
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// One op of a program (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A pages frame.
    Pages {
        /// Region operand.
        region: u8,
        /// First-page operand ([`first_page`]).
        first: u8,
        /// Round operand (0: due).
        round: u8,
        /// Per page: step operand ([`page_step`]) and page.
        pages: Vec<(u8, PageSpec)>,
    },
    /// End of round; the operand (0: correct count, else count + 1).
    EndOfRound(u8),
    /// A device state piece.
    DeviceState(Vec<u8>),
    /// End of stream.
    EndOfStream,
    /// An error frame.
    Error(Vec<u8>),
    /// Bytes appended as they are.
    Raw(Vec<u8>),
    /// Flip bits at a position of the stream so far.
    Corrupt(u16, u8),
    /// A ready frame (the receiver's, never a sender's).
    Confirm,
    /// Any header kind with any round and value, sealed.
    Any {
        /// Kind operand (% 8).
        kind: u8,
        /// The round.
        round: u32,
        /// The value.
        value: u64,
        /// The payload.
        payload: Vec<u8>,
    },
}

impl Op {
    /// Reads one op; `None` once the input is used up.
    pub fn read(c: &mut Cursor<'_>) -> Option<Op> {
        if c.is_empty() {
            return None;
        }
        Some(match c.u8() % OPS {
            0 => {
                let (region, first) = (c.u8(), c.u8());
                let count = c.u8() % 8 + 1;
                let round = c.u8();
                let pages = (0..count)
                    .map(|_| {
                        let step = c.u8();
                        (step, PageSpec::read(c))
                    })
                    .collect();
                Op::Pages {
                    region,
                    first,
                    round,
                    pages,
                }
            }
            1 => Op::EndOfRound(c.u8()),
            2 => Op::DeviceState(c.short_bytes().to_vec()),
            3 => Op::EndOfStream,
            4 => Op::Error(c.short_bytes().to_vec()),
            5 => Op::Raw(c.short_bytes().to_vec()),
            6 => Op::Corrupt(c.u16(), c.u8()),
            7 => Op::Confirm,
            _ => Op::Any {
                kind: c.u8(),
                round: c.u32(),
                value: c.u64(),
                payload: c.short_bytes().to_vec(),
            },
        })
    }

    /// The op's encoding (for seeds): [`Op::read`] reads it back.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Op::Pages {
                region,
                first,
                round,
                pages,
            } => {
                assert!((1..=8).contains(&pages.len()), "1 to 8 pages per op");
                #[allow(clippy::cast_possible_truncation)]
                let count = pages.len() as u8 - 1;
                out.extend([0, *region, *first, count, *round]);
                for (step, page) in pages {
                    out.push(*step);
                    page.write(out);
                }
            }
            Op::EndOfRound(b) => out.extend([1, *b]),
            Op::DeviceState(piece) => {
                out.push(2);
                push_short(out, piece);
            }
            Op::EndOfStream => out.push(3),
            Op::Error(message) => {
                out.push(4);
                push_short(out, message);
            }
            Op::Raw(bytes) => {
                out.push(5);
                push_short(out, bytes);
            }
            Op::Corrupt(at, mask) => {
                out.push(6);
                out.extend(at.to_le_bytes());
                out.push(*mask);
            }
            Op::Confirm => out.push(7),
            Op::Any {
                kind,
                round,
                value,
                payload,
            } => {
                out.extend([8, *kind]);
                out.extend(round.to_le_bytes());
                out.extend(value.to_le_bytes());
                push_short(out, payload);
            }
        }
    }
}

/// Encodes a whole `receiver` input: flags, then the ops.
pub fn program_input(flags: u8, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![flags | FLAG_PROGRAM];
    for op in ops {
        op.write(&mut out);
    }
    out
}

/// What a well-behaved sender would count, so that the default operands make a valid stream.
#[derive(Debug, Default)]
struct Tally {
    /// Rounds ended.
    round: u32,
    round_pages: u64,
    total_pages: u64,
    device_state: u64,
}

/// Runs a program: the frame stream it describes (after the hello).
pub fn build(program: &[u8]) -> Vec<u8> {
    let mut c = Cursor::new(program);
    let mut out = Vec::new();
    let mut tally = Tally::default();
    while let Some(op) = Op::read(&mut c) {
        emit(&op, &mut tally, &mut out);
    }
    out
}

/// The stream a list of ops describes.
pub fn build_ops(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut tally = Tally::default();
    for op in ops {
        emit(op, &mut tally, &mut out);
    }
    out
}

fn emit(op: &Op, tally: &mut Tally, out: &mut Vec<u8>) {
    match op {
        Op::Pages {
            region,
            first,
            round,
            pages,
        } => {
            let round = if *round == 0 {
                tally.round.saturating_add(1)
            } else {
                u32::from(*round)
            };
            let mut table = Vec::with_capacity(pages.len() * PageEntry::LEN);
            let mut data = Vec::new();
            let mut offset = 0u32;
            for (i, (step, spec)) in pages.iter().enumerate() {
                let step = page_step(*step);
                offset = if i == 0 {
                    step.saturating_sub(1)
                } else {
                    offset + step
                };
                let (encoding, bytes) = spec.encode();
                let entry = PageEntry {
                    offset,
                    encoding,
                    len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
                };
                let mut raw = [0u8; PageEntry::LEN];
                entry.write(&mut raw);
                table.extend_from_slice(&raw);
                data.extend_from_slice(&bytes);
            }
            let count = u32::try_from(pages.len()).unwrap_or(u32::MAX);
            let len = u32::try_from(table.len() + data.len()).unwrap_or(u32::MAX);
            let header =
                FrameHeader::pages(u32::from(region % 3), first_page(*first), round, count, len);
            let start = out.len();
            out.extend_from_slice(&header.encode());
            out.extend_from_slice(&table);
            out.extend_from_slice(&data);
            seal(&mut out[start..]);
            tally.round_pages += u64::from(count);
        }
        Op::EndOfRound(b) => {
            let pages = if *b == 0 {
                tally.round_pages
            } else {
                u64::from(*b - 1)
            };
            tally.round = tally.round.saturating_add(1);
            out.extend(FrameHeader::end_of_round(tally.round, pages));
            tally.total_pages += tally.round_pages;
            tally.round_pages = 0;
        }
        Op::DeviceState(piece) => {
            out.extend(FrameHeader::device_state(tally.device_state, piece));
            tally.device_state += piece.len() as u64;
        }
        Op::EndOfStream => out.extend(FrameHeader::end_of_stream(tally.round, tally.total_pages)),
        Op::Error(message) => out.extend(FrameHeader::error(&String::from_utf8_lossy(message))),
        Op::Raw(bytes) => out.extend_from_slice(bytes),
        Op::Corrupt(at, mask) => {
            if !out.is_empty() {
                let at = usize::from(*at) % out.len();
                out[at] ^= (*mask).max(1);
            }
        }
        Op::Confirm => out.extend(FrameHeader::ready(tally.round, tally.total_pages, 0)),
        Op::Any {
            kind,
            round,
            value,
            payload,
        } => {
            let start = out.len();
            let mut header = [0u8; FrameHeader::LEN];
            header[0..2].copy_from_slice(&u16::from(kind % 8).to_le_bytes());
            header[8..16].copy_from_slice(&value.to_le_bytes());
            header[16..20].copy_from_slice(&round.to_le_bytes());
            let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            header[24..28].copy_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&header);
            out.extend_from_slice(payload);
            seal(&mut out[start..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_roundtrip_through_their_encoding() {
        let ops = vec![
            Op::Pages {
                region: 1,
                first: 0,
                round: 0,
                pages: vec![
                    (0, PageSpec::Zero),
                    (1, PageSpec::Raw(7)),
                    (2, PageSpec::Lz4(3)),
                    (0xFF, PageSpec::Lz4Block(vec![1, 2, 3])),
                    (1, PageSpec::Zstd(4)),
                    (2, PageSpec::ZstdFrame(vec![0x28, 0xb5, 0x2f, 0xfd])),
                ],
            },
            Op::EndOfRound(0),
            Op::DeviceState(b"cpu".to_vec()),
            Op::EndOfStream,
            Op::Error(b"no".to_vec()),
            Op::Raw(vec![9; 4]),
            Op::Corrupt(300, 0x10),
            Op::Confirm,
            Op::Any {
                kind: 2,
                round: 5,
                value: 6,
                payload: vec![],
            },
        ];
        let input = program_input(0, &ops);
        let mut c = Cursor::new(&input[1..]);
        let mut back = Vec::new();
        while let Some(op) = Op::read(&mut c) {
            back.push(op);
        }
        assert_eq!(back, ops);
        assert_eq!(build(&input[1..]), build_ops(&ops));
    }
}

//! A reference model of one receiver channel: what guest memory, device state and counters a
//! frame stream must produce, or that it must fail. It follows the protocol as the wire module
//! documents it (rounds from 1, a page at most once per round, pages inside their region, end of
//! round and end of stream counts, device state in order, a crc over every frame), sequentially
//! and without any of the receiver's concurrency, IO or unsafe code.
//!
//! One receiver behaviour is modelled on purpose: a compressed (lz4 or zstd) page that does not
//! decode fails the channel at the next end of round or end of stream (decoding runs on worker
//! threads), not at its frame.

use ramjet_dataplane::internals::wire::{FrameHeader, FrameKind, MAX_DEVICE_STATE, PageTable};

use crate::program::PAGE;

/// What a successful receive must report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    /// The device state, all pieces in order.
    pub device_state: Vec<u8>,
    /// Rounds ended.
    pub rounds: u32,
    /// Zero pages accepted.
    pub zero: u64,
    /// Raw pages accepted.
    pub raw: u64,
    /// lz4 pages accepted.
    pub lz4: u64,
    /// zstd pages accepted.
    pub zstd: u64,
    /// Header and payload bytes of every frame read, the receiver's confirmation included.
    pub wire_bytes: u64,
}

/// The model's verdict on a stream.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Guest memory afterwards, per region. Exact when `outcome` is `Ok`.
    pub memory: Vec<Vec<u8>>,
    /// Per region and page: whether any frame the model got to (the failing one included)
    /// named the page after its checks passed. A failed receive may have written only those.
    pub named: Vec<Vec<bool>>,
    /// Success with what must be reported, or why the stream must fail.
    pub outcome: Result<Accepted, String>,
}

/// Runs the model over `stream` (the bytes after the hello) for guest memory whose regions
/// start as `initial`.
pub fn run(stream: &[u8], initial: Vec<Vec<u8>>) -> Expected {
    let named = initial
        .iter()
        .map(|r| vec![false; r.len() / PAGE])
        .collect();
    let mut m = Model {
        stream,
        memory: initial,
        named,
        stamps: Vec::new(),
        round: 0,
        round_pages: 0,
        total_pages: 0,
        decode_failed: false,
        accepted: Accepted::default(),
    };
    m.stamps = m.named.iter().map(|r| vec![0; r.len()]).collect();
    let outcome = m.frames();
    Expected {
        memory: m.memory,
        named: m.named,
        outcome,
    }
}

struct Model<'a> {
    stream: &'a [u8],
    memory: Vec<Vec<u8>>,
    named: Vec<Vec<bool>>,
    stamps: Vec<Vec<u32>>,
    round: u32,
    round_pages: u64,
    total_pages: u64,
    decode_failed: bool,
    accepted: Accepted,
}

impl<'a> Model<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.stream.len() < n {
            return Err(format!("stream ends {} bytes short", n - self.stream.len()));
        }
        let (head, rest) = self.stream.split_at(n);
        self.stream = rest;
        Ok(head)
    }

    fn frames(&mut self) -> Result<Accepted, String> {
        loop {
            let mut fixed = [0u8; FrameHeader::LEN];
            fixed.copy_from_slice(self.take(FrameHeader::LEN)?);
            let h = FrameHeader::decode(&fixed).map_err(|e| e.to_string())?;
            self.accepted.wire_bytes += FrameHeader::LEN as u64 + u64::from(h.len);
            let due = self.round + 1;
            match h.kind {
                FrameKind::Pages => self.pages(&h, due)?,
                FrameKind::EndOfRound => {
                    crc(&h, &[], &[])?;
                    if h.round != due || self.decode_failed || h.value != self.round_pages {
                        return Err("bad end of round".into());
                    }
                    self.round = due;
                    self.total_pages += self.round_pages;
                    self.round_pages = 0;
                }
                FrameKind::DeviceState => {
                    let start = self.accepted.device_state.len() as u64;
                    if h.value != start || start + u64::from(h.len) > MAX_DEVICE_STATE {
                        return Err("bad device state piece".into());
                    }
                    let piece = self.take(h.len as usize)?;
                    crc(&h, piece, &[])?;
                    self.accepted.device_state.extend_from_slice(piece);
                }
                FrameKind::EndOfStream => {
                    crc(&h, &[], &[])?;
                    if self.decode_failed
                        || self.round_pages != 0
                        || h.round != self.round
                        || h.value != self.total_pages
                    {
                        return Err("bad end of stream".into());
                    }
                    self.accepted.rounds = self.round;
                    // The ready the receiver sends back.
                    self.accepted.wire_bytes += FrameHeader::LEN as u64 + 8;
                    return Ok(std::mem::take(&mut self.accepted));
                }
                FrameKind::Error
                | FrameKind::Ready
                | FrameKind::Decision
                | FrameKind::Decided
                | FrameKind::Discard
                | FrameKind::Postcopy
                | FrameKind::Request
                | FrameKind::Done
                | FrameKind::Received
                | FrameKind::Resume => {
                    // A receiver without postcopy takes none of the postcopy frames either.
                    return Err("error, handover or postcopy frame".into());
                }
            }
        }
    }

    fn pages(&mut self, h: &FrameHeader, due: u32) -> Result<(), String> {
        if h.round != due {
            return Err("pages of another round".into());
        }
        let region = h.region as usize;
        let Some(pages) = self.named.get(region).map(Vec::len) else {
            return Err("no such region".into());
        };
        let table_bytes = self.take(PageTable::len_for(h))?;
        let mut table = PageTable::new();
        table.decode(h, table_bytes).map_err(|e| e.to_string())?;
        for e in table.entries() {
            let page = h.value + u64::from(e.offset);
            let Ok(index) = usize::try_from(page) else {
                return Err("page outside the region".into());
            };
            if index >= pages {
                return Err("page outside the region".into());
            }
            if self.stamps[region][index] == due {
                return Err("page twice in a round".into());
            }
        }
        for e in table.entries() {
            let index = (h.value + u64::from(e.offset)) as usize;
            self.named[region][index] = true;
        }
        let data = self.take(h.len as usize - table_bytes.len())?;
        crc(h, table_bytes, data)?;
        let mut at = 0usize;
        for e in table.entries() {
            let index = (h.value + u64::from(e.offset)) as usize;
            let dst = &mut self.memory[region][index * PAGE..(index + 1) * PAGE];
            let src = &data[at..at + e.len as usize];
            at += e.len as usize;
            match e.encoding {
                ramjet_dataplane::internals::wire::Encoding::Zero => {
                    dst.fill(0);
                    self.accepted.zero += 1;
                }
                ramjet_dataplane::internals::wire::Encoding::Raw => {
                    dst.copy_from_slice(src);
                    self.accepted.raw += 1;
                }
                ramjet_dataplane::internals::wire::Encoding::Lz4 => {
                    let mut page = vec![0u8; PAGE];
                    match lz4_flex::block::decompress_into(src, &mut page) {
                        Ok(n) if n == PAGE => dst.copy_from_slice(&page),
                        _ => self.decode_failed = true,
                    }
                    self.accepted.lz4 += 1;
                }
                ramjet_dataplane::internals::wire::Encoding::Zstd => {
                    // One-shot into a page's room: more, less or garbage fails.
                    let mut page = vec![0u8; PAGE];
                    let decoded = zstd::bulk::Decompressor::new()
                        .and_then(|mut z| z.decompress_to_buffer(src, &mut page[..]));
                    match decoded {
                        Ok(n) if n == PAGE => dst.copy_from_slice(&page),
                        _ => self.decode_failed = true,
                    }
                    self.accepted.zstd += 1;
                }
            }
            self.stamps[region][index] = due;
        }
        self.round_pages += table.entries().len() as u64;
        Ok(())
    }
}

fn crc(h: &FrameHeader, a: &[u8], b: &[u8]) -> Result<(), String> {
    // Independent of `FrameHeader::verify`: the crc of the header with its crc field zeroed,
    // then the payload.
    let mut hasher = crc32fast::Hasher::new();
    let mut header = h.encode();
    header[28..32].fill(0);
    hasher.update(&header);
    hasher.update(a);
    hasher.update(b);
    if hasher.finalize() == h.crc {
        Ok(())
    } else {
        Err("checksum".into())
    }
}

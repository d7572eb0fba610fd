//! Frames: [`FrameHeader`], the control frames, and the crc that seals every frame. The
//! payload of a pages frame is laid out in [`pages`](super::pages).

use super::error::{DecodeError, invalid, too_large, truncate, verify_crc};
use super::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use super::limits::{
    MAX_MESSAGE, MAX_PAGES_PER_FRAME, MAX_PAYLOAD, PAGE_ENTRY_LEN, WIRE_PAGE_SIZE,
};

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// A batch of pages of one region.
    Pages = 1,
    /// This channel has sent everything of a round.
    EndOfRound = 2,
    /// A piece of the device-state blob.
    DeviceState = 3,
    /// This channel has sent everything.
    EndOfStream = 4,
    /// The peer failed; the payload says why.
    Error = 5,
    /// Receiver to sender: every page and the device state arrived and were verified; the
    /// receiver waits for the sender's [`Decision`](FrameKind::Decision).
    Ready = 6,
    /// Sender to receiver: who runs the guest. `value` 1 is *go* (the source handed the guest
    /// over and will never resume it), 0 is *abort* (the source resumes it; discard).
    Decision = 7,
    /// Receiver to sender: the decision arrived (`value` repeats it).
    Decided = 8,
    /// Postcopy, channel 0: pages the destination must drop (dirtied since they were sent): a
    /// piece of a region's bitmap (`region`), from bitmap word `value`.
    Discard = 9,
    /// Postcopy, every data channel: its pre-copy is over (`value`: pages it sent, `round`:
    /// the last pre-copy round); the pages after it are postcopy pages.
    Postcopy = 10,
    /// Postcopy, receiver to sender on the fault channel: send `count` pages of `region` from
    /// page `value` now.
    Request = 11,
    /// Postcopy, receiver to sender on channel 0: every page is here (`value`: pages placed in
    /// postcopy).
    Done = 12,
    /// Postcopy recovery, receiver to sender on channel 0: a piece of a region's bitmap of the
    /// pages it holds, from bitmap word `value`.
    Received = 13,
    /// Postcopy recovery, receiver to sender on channel 0: the bitmaps are complete (`value`:
    /// pages it holds); the source sends the rest.
    Resume = 14,
}

impl FrameKind {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => FrameKind::Pages,
            2 => FrameKind::EndOfRound,
            3 => FrameKind::DeviceState,
            4 => FrameKind::EndOfStream,
            5 => FrameKind::Error,
            6 => FrameKind::Ready,
            7 => FrameKind::Decision,
            8 => FrameKind::Decided,
            9 => FrameKind::Discard,
            10 => FrameKind::Postcopy,
            11 => FrameKind::Request,
            12 => FrameKind::Done,
            13 => FrameKind::Received,
            14 => FrameKind::Resume,
            _ => return None,
        })
    }
}

/// A decoded frame header. Construct with the `FrameHeader::*` constructors; [`decode`]
/// guarantees the per-kind limits.
///
/// [`decode`]: FrameHeader::decode
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The kind.
    pub kind: FrameKind,
    /// Region index (pages frames).
    pub region: u32,
    /// First page, a page count, or a byte offset, by kind.
    pub value: u64,
    /// The round, from 1.
    pub round: u32,
    /// Pages in a pages frame.
    pub count: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// crc32 of the header (this field zero) and the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// Encoded size.
    pub const LEN: usize = 32;

    /// A pages frame header; `len` covers the table and the page data.
    pub const fn pages(region: u32, first_page: u64, round: u32, count: u32, len: u32) -> Self {
        Self::new(FrameKind::Pages, region, first_page, round, count, len)
    }

    const fn new(
        kind: FrameKind,
        region: u32,
        value: u64,
        round: u32,
        count: u32,
        len: u32,
    ) -> Self {
        FrameHeader {
            kind,
            region,
            value,
            round,
            count,
            len,
            crc: 0,
        }
    }

    /// The header bytes, with the crc field as it is in `self`.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        put_u16(&mut b, 0, self.kind as u16);
        put_u32(&mut b, 4, self.region);
        put_u64(&mut b, 8, self.value);
        put_u32(&mut b, 16, self.round);
        put_u32(&mut b, 20, self.count);
        put_u32(&mut b, 24, self.len);
        put_u32(&mut b, 28, self.crc);
        b
    }

    /// The payload length field of header bytes, unchecked: for a relay that only needs to
    /// know where the frame ends (the stress tool's proxy); a receiver uses [`decode`].
    ///
    /// [`decode`]: FrameHeader::decode
    pub fn payload_len(b: &[u8; Self::LEN]) -> u32 {
        u32_at(b, 24)
    }

    /// Decodes and checks a header: a known kind, zero flags, and the kind's limits on count and
    /// payload length. The crc is checked later, over the payload too ([`FrameHeader::verify`]).
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, DecodeError> {
        let raw_kind = u16_at(b, 0);
        let kind = FrameKind::from_u16(raw_kind).ok_or_else(|| invalid("frame kind", raw_kind))?;
        if u16_at(b, 2) != 0 {
            return Err(invalid("frame flags", u16_at(b, 2)));
        }
        let h = FrameHeader {
            kind,
            region: u32_at(b, 4),
            value: u64_at(b, 8),
            round: u32_at(b, 16),
            count: u32_at(b, 20),
            len: u32_at(b, 24),
            crc: u32_at(b, 28),
        };
        if h.len > MAX_PAYLOAD {
            return Err(too_large("frame payload", h.len, MAX_PAYLOAD));
        }
        let regional = matches!(
            kind,
            FrameKind::Pages | FrameKind::Discard | FrameKind::Request | FrameKind::Received
        );
        if !regional && h.region != 0 {
            return Err(invalid("region outside a frame about pages", h.region));
        }
        if !matches!(kind, FrameKind::Pages | FrameKind::Request) && h.count != 0 {
            return Err(invalid("page count outside a pages frame", h.count));
        }
        match kind {
            FrameKind::Pages => {
                if h.count == 0 {
                    return Err(invalid("page count", h.count));
                }
                if h.count > MAX_PAGES_PER_FRAME {
                    return Err(too_large("page count", h.count, MAX_PAGES_PER_FRAME));
                }
                let table = h.count * PAGE_ENTRY_LEN;
                let most = table + h.count * WIRE_PAGE_SIZE;
                if h.len < table || h.len > most {
                    return Err(invalid("pages frame payload length", h.len));
                }
                if h.round == 0 {
                    return Err(invalid("round", h.round));
                }
            }
            FrameKind::EndOfRound | FrameKind::EndOfStream => {
                if h.len != 0 {
                    return Err(invalid("payload length of an end marker", h.len));
                }
            }
            FrameKind::DeviceState => {
                if h.len == 0 {
                    return Err(invalid("device state piece length", h.len));
                }
            }
            FrameKind::Error => {
                if h.len > MAX_MESSAGE {
                    return Err(too_large("error message", h.len, MAX_MESSAGE));
                }
            }
            FrameKind::Ready => {
                if h.len != 8 {
                    return Err(invalid("ready payload length", h.len));
                }
            }
            FrameKind::Decision | FrameKind::Decided => {
                if h.len != 0 || h.value > 1 || h.round != 0 {
                    return Err(invalid("decision frame", h.value));
                }
            }
            FrameKind::Discard | FrameKind::Received => {
                if h.len == 0 || !h.len.is_multiple_of(8) || h.round != 0 {
                    return Err(invalid("bitmap piece length", h.len));
                }
            }
            FrameKind::Request => {
                if h.count == 0 || h.count > MAX_PAGES_PER_FRAME || h.len != 0 || h.round != 0 {
                    return Err(invalid("page request", h.count));
                }
            }
            FrameKind::Postcopy | FrameKind::Resume => {
                if h.len != 0 {
                    return Err(invalid("payload length of a postcopy marker", h.len));
                }
            }
            FrameKind::Done => {
                if h.len as usize != DONE_WORDS * 8 || h.round != 0 {
                    return Err(invalid("payload length of a done frame", h.len));
                }
            }
        }
        Ok(h)
    }

    /// A crc hasher primed with this header's bytes (crc field zero); feed it the payload as
    /// received, then call [`FrameHeader::verify`].
    pub fn hasher(&self) -> crc32fast::Hasher {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&FrameHeader { crc: 0, ..*self }.encode());
        hasher
    }

    /// Checks the crc against header and payload.
    pub fn verify(&self, hasher: crc32fast::Hasher) -> Result<(), DecodeError> {
        verify_crc("frame", self.crc, hasher.finalize())
    }

    /// A whole frame without page data: `header` then `payload`, with the crc filled in.
    fn control(kind: FrameKind, value: u64, round: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut frame = FrameHeader::new(kind, 0, value, round, 0, len)
            .encode()
            .to_vec();
        frame.extend_from_slice(payload);
        seal(&mut frame);
        frame
    }

    /// An end-of-round frame: this channel sent `pages` pages in round `round`.
    pub fn end_of_round(round: u32, pages: u64) -> Vec<u8> {
        Self::control(FrameKind::EndOfRound, pages, round, &[])
    }

    /// An end-of-stream frame: this channel sent `pages` pages in all; `round` was the last.
    pub fn end_of_stream(round: u32, pages: u64) -> Vec<u8> {
        Self::control(FrameKind::EndOfStream, pages, round, &[])
    }

    /// A device-state frame carrying `piece`, which starts at byte `offset` of the blob.
    pub fn device_state(offset: u64, piece: &[u8]) -> Vec<u8> {
        Self::control(FrameKind::DeviceState, offset, 0, piece)
    }

    /// An error frame; the message is cut to the limit.
    pub fn error(message: &str) -> Vec<u8> {
        let message = truncate(message, MAX_MESSAGE as usize);
        Self::control(FrameKind::Error, 0, 0, message.as_bytes())
    }

    /// The receiver's *ready*: `pages` pages and `device_state_len` bytes of device state
    /// arrived and were verified, the last in round `round`.
    pub fn ready(round: u32, pages: u64, device_state_len: u64) -> Vec<u8> {
        Self::control(
            FrameKind::Ready,
            pages,
            round,
            &device_state_len.to_le_bytes(),
        )
    }
}

/// Words (little-endian u64) of a done frame's payload: the destination's fault-latency
/// distribution, its 24 power-of-two microsecond buckets, then the count, the total and the
/// longest latency in nanoseconds.
pub const DONE_WORDS: usize = 27;

impl FrameHeader {
    /// A bitmap piece (`kind` [`Discard`](FrameKind::Discard) or
    /// [`Received`](FrameKind::Received)) of region `region` from bitmap word `word`; at most
    /// [`MAX_PAYLOAD`] bytes of words.
    pub fn bitmap(kind: FrameKind, region: u32, word: u64, words: &[u64]) -> Vec<u8> {
        let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut frame = FrameHeader::new(kind, region, word, 0, 0, len)
            .encode()
            .to_vec();
        frame.extend_from_slice(&payload);
        seal(&mut frame);
        frame
    }

    /// The words of a bitmap piece's payload (its length is a multiple of 8, checked with the
    /// header).
    pub fn bitmap_words(payload: &[u8]) -> impl Iterator<Item = u64> + '_ {
        payload
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
    }

    /// This data channel's pre-copy is over: it sent `pages` pages, the last in round `round`.
    pub fn postcopy(round: u32, pages: u64) -> Vec<u8> {
        Self::control(FrameKind::Postcopy, pages, round, &[])
    }

    /// A request for `count` pages of region `region` from page `first`.
    pub fn request(region: u32, first: u64, count: u32) -> [u8; Self::LEN] {
        let mut frame = FrameHeader::new(FrameKind::Request, region, first, 0, count, 0).encode();
        seal(&mut frame);
        frame
    }

    /// Every page is here; `pages` were placed in postcopy, and `latency` is the
    /// distribution of the faults' latencies (see [`DONE_WORDS`]).
    pub fn done(pages: u64, latency: &[u64; DONE_WORDS]) -> Vec<u8> {
        let payload: Vec<u8> = latency.iter().flat_map(|w| w.to_le_bytes()).collect();
        Self::control(FrameKind::Done, pages, 0, &payload)
    }

    /// The latency words of a done frame's payload (its length was checked with the header).
    pub fn done_words(payload: &[u8]) -> [u64; DONE_WORDS] {
        let mut words = [0u64; DONE_WORDS];
        for (word, bytes) in words.iter_mut().zip(payload.chunks_exact(8)) {
            *word = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
        }
        words
    }

    /// The received bitmaps are complete: the receiver holds `pages` pages.
    pub fn resume(pages: u64) -> Vec<u8> {
        Self::control(FrameKind::Resume, pages, 0, &[])
    }

    /// The sender's decision: `go` (handed over) or abort (the source resumes).
    pub fn decision(go: bool) -> Vec<u8> {
        Self::control(FrameKind::Decision, u64::from(go), 0, &[])
    }

    /// The receiver's acknowledgement of decision `go`.
    pub fn decided(go: bool) -> Vec<u8> {
        Self::control(FrameKind::Decided, u64::from(go), 0, &[])
    }

    /// For [`Decision`](FrameKind::Decision) and [`Decided`](FrameKind::Decided) frames: whether
    /// the decision is *go*.
    pub fn is_go(&self) -> bool {
        self.value == 1
    }
}

/// Fills in the crc of a whole encoded frame (header followed by payload) whose crc field is
/// zero.
pub fn seal(frame: &mut [u8]) {
    let crc = crc32fast::hash(frame);
    put_u32(frame, 28, crc);
}

/// Fills in the crc of a frame whose first `head` bytes (header, crc field zero, and page table)
/// are in `frame` and whose remaining bytes were already hashed into `rest`, each page right
/// after it was written, while it was still in cache.
pub fn seal_split(frame: &mut [u8], head: usize, rest: &crc32fast::Hasher) {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame[..head]);
    hasher.combine(rest);
    put_u32(frame, 28, hasher.finalize());
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::PageTable;

    fn header_bytes(h: FrameHeader) -> [u8; FrameHeader::LEN] {
        h.encode()
    }

    #[test]
    fn control_frames_roundtrip_with_their_crc() {
        for frame in [
            FrameHeader::end_of_round(3, 1000),
            FrameHeader::end_of_stream(4, 5000),
            FrameHeader::device_state(8, b"cpu state"),
            FrameHeader::error("disk full"),
            FrameHeader::ready(4, 5000, 9),
            FrameHeader::decision(true),
            FrameHeader::decision(false),
            FrameHeader::decided(true),
            FrameHeader::bitmap(FrameKind::Discard, 2, 64, &[1, u64::MAX, 0]),
            FrameHeader::bitmap(FrameKind::Received, 0, 0, &[7]),
            FrameHeader::postcopy(3, 1000),
            FrameHeader::request(1, 4096, 2).to_vec(),
            FrameHeader::done(77, &[3; DONE_WORDS]),
            FrameHeader::resume(78),
        ] {
            let mut fixed = [0u8; FrameHeader::LEN];
            fixed.copy_from_slice(&frame[..32]);
            let h = FrameHeader::decode(&fixed).unwrap();
            let mut hasher = h.hasher();
            hasher.update(&frame[32..]);
            h.verify(hasher).unwrap();
            assert_eq!(frame.len(), 32 + h.len as usize);
            // A flipped payload or header byte fails the crc or the header checks.
            for i in 0..frame.len() {
                let mut bad = frame.clone();
                bad[i] ^= 0x10;
                fixed.copy_from_slice(&bad[..32]);
                let caught = match FrameHeader::decode(&fixed) {
                    Err(_) => true,
                    Ok(h) if 32 + h.len as usize != bad.len() => true,
                    Ok(h) => {
                        let mut hasher = h.hasher();
                        hasher.update(&bad[32..]);
                        h.verify(hasher).is_err()
                    }
                };
                assert!(caught, "byte {i} of {:?}", h.kind);
            }
        }
    }

    #[test]
    fn headers_enforce_limits_before_any_allocation() {
        let bad = [
            FrameHeader {
                kind: FrameKind::Pages,
                ..FrameHeader::pages(0, 0, 1, 0, 0)
            },
            FrameHeader::pages(0, 0, 1, MAX_PAGES_PER_FRAME + 1, 0),
            FrameHeader::pages(0, 0, 1, 2, 8),
            FrameHeader::pages(0, 0, 1, 1, 8 + 4097),
            FrameHeader::pages(0, 0, 0, 1, 8),
            FrameHeader::pages(0, 0, 1, 1, MAX_PAYLOAD + 1),
            FrameHeader::new(FrameKind::Error, 0, 0, 0, 0, MAX_MESSAGE + 1),
            FrameHeader::new(FrameKind::Ready, 0, 0, 0, 0, 7),
            FrameHeader::new(FrameKind::Decision, 0, 2, 0, 0, 0),
            FrameHeader::new(FrameKind::Decided, 0, 1, 0, 0, 1),
            FrameHeader::new(FrameKind::EndOfRound, 0, 0, 1, 0, 1),
            FrameHeader::new(FrameKind::DeviceState, 0, 0, 0, 0, 0),
            FrameHeader::new(FrameKind::DeviceState, 0, 0, 0, 3, 10),
            FrameHeader::new(FrameKind::DeviceState, 1, 0, 0, 0, 10),
            FrameHeader::new(FrameKind::Discard, 0, 0, 0, 0, 0),
            FrameHeader::new(FrameKind::Discard, 0, 0, 0, 0, 12),
            FrameHeader::new(FrameKind::Received, 0, 0, 1, 0, 8),
            FrameHeader::new(FrameKind::Request, 0, 0, 0, 0, 0),
            FrameHeader::new(FrameKind::Request, 0, 0, 0, MAX_PAGES_PER_FRAME + 1, 0),
            FrameHeader::new(FrameKind::Request, 0, 0, 0, 1, 8),
            FrameHeader::new(FrameKind::Postcopy, 0, 0, 1, 0, 8),
            FrameHeader::new(FrameKind::Done, 3, 0, 0, 0, 0),
            FrameHeader::new(FrameKind::Done, 0, 0, 0, 0, 8),
            FrameHeader::new(FrameKind::Resume, 0, 0, 0, 1, 0),
        ];
        for h in bad {
            assert!(FrameHeader::decode(&header_bytes(h)).is_err(), "{h:?}");
        }
        let mut zeroed = [0u8; 32];
        assert!(matches!(
            FrameHeader::decode(&zeroed),
            Err(DecodeError::Invalid {
                what: "frame kind",
                ..
            })
        ));
        zeroed[0] = 1;
        zeroed[2] = 1;
        assert!(matches!(
            FrameHeader::decode(&zeroed),
            Err(DecodeError::Invalid {
                what: "frame flags",
                ..
            })
        ));
        let ok = FrameHeader::pages(2, 64, 1, 2, 16 + 4096 + 100);
        assert_eq!(FrameHeader::decode(&header_bytes(ok)), Ok(ok));
    }

    proptest! {
        #![proptest_config(crate::tests::proptest_config())]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            header in prop::array::uniform32(any::<u8>()),
            table in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            if let Ok(h) = FrameHeader::decode(&header) {
                prop_assert!(h.len <= MAX_PAYLOAD);
                let mut t = PageTable::new();
                let _ = t.decode(&h, &table);
            }
        }

        #[test]
        fn pages_headers_roundtrip(
            region in any::<u32>(), first in any::<u64>(), round in 1u32..,
            count in 1u32..=MAX_PAGES_PER_FRAME, extra in 0u32..4096,
        ) {
            let len = (count * 8 + extra).min(count * 8 + count * 4096);
            let h = FrameHeader::pages(region, first, round, count, len);
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }
    }
}

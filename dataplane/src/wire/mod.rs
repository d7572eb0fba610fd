//! Wire format, version 1. This module alone knows the byte layout (the sender builds pages
//! frames with [`PagesFrameWriter`], the receiver reads them through [`PageTable`]); everything is
//! little-endian, every length is checked against a fixed limit before anything is allocated,
//! and crc32 (IEEE, as `crc32fast` computes it) covers every header and payload as sent.
//!
//! # Connection
//!
//! A migration uses one or more channels, each a stream socket (TCP or Unix). Each channel
//! opens with a [`Hello`] from the sender, answered by a [`HelloReply`] from the receiver. Then
//! the sender sends frames; the receiver sends frames back on the same socket (the return path):
//! its [`FrameKind::Confirm`] on channel 0 once it has applied everything, or a
//! [`FrameKind::Error`] on any channel when it fails.
//!
//! ## Hello (sender → receiver), 48 bytes + 24 per region
//!
//! ```text
//! offset size field
//!      0    8 magic "RAMJET\r\n"
//!      8    2 version (1); magic and version stay at these offsets in every version
//!     10    2 flags, 0
//!     12    4 page size (4096)
//!     16   16 session id, the same on every channel of a migration
//!     32    2 channel index, below the channel count
//!     34    2 channel count, 1..=64
//!     36    4 region count, 1..=256
//!     40    4 crc32 of bytes 0..40, checked before any count in them is used
//!     44    4 crc32 of bytes 0..48 (this field zero) and the region table
//!     48 24*n region table, per region:
//!             0 4 region id
//!             4 4 reserved, 0
//!             8 8 guest base address
//!            16 8 length in bytes, a non-zero multiple of the page size
//! ```
//!
//! ## Hello reply (receiver → sender), 24 bytes + reason
//!
//! ```text
//!      0    8 magic "RAMJET\r\n"
//!      8    2 version (1)
//!     10    2 verdict: 1 accept, 2 refuse
//!     12    4 reason length, at most 1024 (0 when accepted)
//!     16    4 crc32 of bytes 0..24 (this field zero) and the reason
//!     20    4 crc32 of bytes 0..16, checked before the reason length is used
//!     24    n reason, UTF-8
//! ```
//!
//! ## Frame header, 32 bytes, then `payload length` bytes
//!
//! ```text
//!      0    2 kind (see below); 0 is invalid, so a zeroed header means nothing
//!      2    2 flags, 0
//!      4    4 region index (pages), else 0
//!      8    8 value: first page (pages), page count (end-of-round, end-of-stream,
//!             confirm), byte offset (device state), else 0
//!     16    4 round, from 1
//!     20    4 page count (pages, 1..=1024), else 0
//!     24    4 payload length (limits per kind below)
//!     28    4 crc32 of the header (this field zero) followed by the payload as sent
//! ```
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | pages | → | page table, then page data |
//! | 2 | end of round | → | none; value = pages this channel sent in the round |
//! | 3 | device state | → | a piece of the device-state blob (≤ 8 MiB); value = its offset |
//! | 4 | end of stream | → | none; value = pages this channel sent in all rounds |
//! | 5 | error | ↔ | UTF-8 message, ≤ 1024 bytes |
//! | 6 | confirm | ← | 8 bytes: device-state length; value = pages applied on all channels |
//!
//! A pages frame's payload is a table of `page count` entries of 8 bytes, then the data of each
//! page in table order:
//!
//! ```text
//!      0    4 page offset from the frame's first page; strictly increasing
//!      4    4 encoding << 24 | data length: 0 zero page (length 0), 1 raw (length 4096),
//!             2 lz4 block (0 < length < 4096, decoding to exactly 4096 bytes)
//! ```
//!
//! The data lengths must add up to the payload length minus the table. A pages frame is at most
//! 8 MiB; the device state at most 1 GiB in all.
//!
//! # Channels and ordering
//!
//! Every page has a fixed channel: page `p` of any region travels on channel
//! `(p / 64) % channel count` ([`channel_of`]), and a receiver refuses a page on another
//! channel. Within a round a page is sent at most once. A channel is one ordered stream, so a
//! page re-sent in round N+1 always arrives after its round-N copy: a stale copy can never
//! overwrite a newer one, however many channels there are.

mod frame;
mod hello;
mod pages;

use thiserror::Error;

pub use frame::{FrameHeader, FrameKind, seal, seal_split};
pub use hello::{Hello, HelloReply, Verdict};
pub use pages::{Encoding, PageEntry, PageTable, PagesFrameWriter, Piece, frame_capacity};

/// The first eight bytes of every hello and hello reply.
pub const MAGIC: [u8; 8] = *b"RAMJET\r\n";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The only page size version 1 supports.
pub const WIRE_PAGE_SIZE: u32 = 4096;
/// Most regions a hello may describe.
pub const MAX_REGIONS: u32 = 256;
/// Most channels a migration may use.
pub const MAX_CHANNELS: u16 = 64;
/// Most pages in one pages frame.
pub const MAX_PAGES_PER_FRAME: u32 = 1024;
/// Largest payload of any frame.
pub const MAX_PAYLOAD: u32 = 8 << 20;
/// Longest refusal reason or error message, in bytes.
pub const MAX_MESSAGE: u32 = 1024;
/// Largest device-state blob.
pub const MAX_DEVICE_STATE: u64 = 1 << 30;
/// Pages per channel-assignment chunk.
pub const CHUNK_PAGES: u64 = 64;

/// The channel that carries page `page` when there are `channels` channels (at least 1).
pub fn channel_of(page: u64, channels: u16) -> u16 {
    let channels = u64::from(channels.max(1));
    // The remainder is below `channels`, a u16.
    u16::try_from((page / CHUNK_PAGES) % channels).unwrap_or(0)
}

/// Why bytes from a peer are not a valid hello, reply or frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The stream does not start with ramjet's magic.
    #[error("not a ramjet peer: bad magic {found:02x?}")]
    BadMagic {
        /// The eight bytes found.
        found: [u8; 8],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found} (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// The version the peer sent.
        found: u16,
    },
    /// A checksum does not match the bytes received.
    #[error("{what} checksum mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    Checksum {
        /// What was checksummed.
        what: &'static str,
        /// The crc the peer sent.
        expected: u32,
        /// The crc of the bytes received.
        actual: u32,
    },
    /// A field holds a value the format does not allow.
    #[error("invalid {what}: {value}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A length over its limit.
    #[error("{what} of {value} exceeds the limit of {limit}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
}

impl DecodeError {
    /// Whether the error is a checksum mismatch (corruption in transit).
    pub fn is_checksum(&self) -> bool {
        matches!(self, DecodeError::Checksum { .. })
    }
}

fn invalid(what: &'static str, value: impl Into<u64>) -> DecodeError {
    DecodeError::Invalid {
        what,
        value: value.into(),
    }
}

fn too_large(what: &'static str, value: impl Into<u64>, limit: impl Into<u64>) -> DecodeError {
    DecodeError::TooLarge {
        what,
        value: value.into(),
        limit: limit.into(),
    }
}

/// A crc check: `expected` is what the peer sent, `actual` what its bytes give.
fn verify_crc(what: &'static str, expected: u32, actual: u32) -> Result<(), DecodeError> {
    if expected == actual {
        Ok(())
    } else {
        Err(DecodeError::Checksum {
            what,
            expected,
            actual,
        })
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Little-endian field access on fixed-size byte arrays.
mod le {
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        let mut a = [0; 4];
        a.copy_from_slice(&b[at..at + 4]);
        u32::from_le_bytes(a)
    }

    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut a = [0; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    }

    pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_assignment_is_by_chunk() {
        assert_eq!(channel_of(0, 4), 0);
        assert_eq!(channel_of(63, 4), 0);
        assert_eq!(channel_of(64, 4), 1);
        assert_eq!(channel_of(64 * 5, 4), 1);
        assert_eq!(channel_of(u64::MAX, 64), ((u64::MAX / 64) % 64) as u16);
        assert_eq!(channel_of(1000, 1), 0);
        assert_eq!(channel_of(1000, 0), 0);
    }
}

//! Why bytes from a peer are not valid protocol ([`DecodeError`]), and the checks that say so.

use thiserror::Error;

use super::limits::VERSION;

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

pub(super) fn invalid(what: &'static str, value: impl Into<u64>) -> DecodeError {
    DecodeError::Invalid {
        what,
        value: value.into(),
    }
}

pub(super) fn too_large(
    what: &'static str,
    value: impl Into<u64>,
    limit: impl Into<u64>,
) -> DecodeError {
    DecodeError::TooLarge {
        what,
        value: value.into(),
        limit: limit.into(),
    }
}

/// A crc check: `expected` is what the peer sent, `actual` what its bytes give.
pub(super) fn verify_crc(
    what: &'static str,
    expected: u32,
    actual: u32,
) -> Result<(), DecodeError> {
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
pub(super) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

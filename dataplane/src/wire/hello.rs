//! The per-channel handshake: [`Hello`] and [`HelloReply`].

use crate::memory::{GuestAddr, RegionLayout};

use super::error::{DecodeError, invalid, too_large, truncate, verify_crc};
use super::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use super::limits::{MAGIC, MAX_CHANNELS, MAX_MESSAGE, MAX_REGIONS, VERSION, WIRE_PAGE_SIZE};

/// A sender's greeting on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The same random id on every channel of one migration.
    pub session: [u8; 16],
    /// This channel's index.
    pub channel: u16,
    /// How many channels the migration uses.
    pub channels: u16,
    /// The sender's guest memory layout, in region-index order.
    pub regions: Vec<RegionLayout>,
    /// Postcopy: whether the migration may switch to it, and what this connection is.
    pub flags: HelloFlags,
}

/// The hello's flags (offset 10): what a connection of a migration that may switch to
/// postcopy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HelloFlags {
    /// Bit 0: the migration may switch to postcopy, and has a fault channel beside its data
    /// channels.
    pub postcopy: bool,
    /// Bit 1: this connection is the fault channel (its index is the data channel count):
    /// requested pages travel on it, ahead of the background stream.
    pub fault: bool,
    /// Bit 2: a reconnection of a paused postcopy migration (recovery).
    pub resume: bool,
    /// Bits 8 to 15, with `resume`: which attempt to reconnect this is (1, 2, ..., wrapping
    /// past 255 to 1), so that a receiver never mixes the channels of two attempts; 0
    /// otherwise.
    pub attempt: u8,
    /// Bit 3, on channel 0 of a migration without postcopy, over a Unix socket: the sender
    /// offers to hand its guest memory over by descriptor instead of copying it; a
    /// [`MemoryFds`] message with the descriptors follows the hello at once.
    pub share: bool,
}

impl HelloFlags {
    const POSTCOPY: u16 = 1;
    const FAULT: u16 = 1 << 1;
    const RESUME: u16 = 1 << 2;
    const SHARE: u16 = 1 << 3;
    const ATTEMPT_SHIFT: u16 = 8;

    fn bits(self) -> u16 {
        (u16::from(self.postcopy) * Self::POSTCOPY)
            | (u16::from(self.fault) * Self::FAULT)
            | (u16::from(self.resume) * Self::RESUME)
            | (u16::from(self.share) * Self::SHARE)
            | (u16::from(self.attempt) << Self::ATTEMPT_SHIFT)
    }

    fn from_bits(bits: u16) -> Result<Self, DecodeError> {
        let flags = HelloFlags {
            postcopy: bits & Self::POSTCOPY != 0,
            fault: bits & Self::FAULT != 0,
            resume: bits & Self::RESUME != 0,
            share: bits & Self::SHARE != 0,
            attempt: bits.to_le_bytes()[1],
        };
        let known = Self::POSTCOPY
            | Self::FAULT
            | Self::RESUME
            | Self::SHARE
            | (0xff << Self::ATTEMPT_SHIFT);
        if bits & !known != 0
            || ((flags.fault || flags.resume) && !flags.postcopy)
            || (flags.resume != (flags.attempt != 0))
            || (flags.share && flags.postcopy)
        {
            return Err(invalid("hello flags", bits));
        }
        Ok(flags)
    }

    /// Whether reconnection attempt `self.attempt` came after `other`'s (counting wraps).
    pub fn is_newer_attempt(self, other: u8) -> bool {
        // Attempts skip 0, so 255 of them make a full turn; within half a turn, later is newer.
        let ahead = (u16::from(self.attempt) + 255 - u16::from(other)) % 255;
        ahead != 0 && ahead < 128
    }
}

impl Hello {
    /// Bytes before the region table.
    pub const FIXED_LEN: usize = 48;
    /// Bytes per region table entry.
    pub const REGION_LEN: usize = 24;

    /// The length of a hello describing `regions` regions.
    pub const fn encoded_len(regions: usize) -> usize {
        Self::FIXED_LEN + regions * Self::REGION_LEN
    }

    /// The encoded hello.
    pub fn encode(&self) -> Vec<u8> {
        let count = self.regions.len();
        let mut b = vec![0u8; Self::FIXED_LEN + count * Self::REGION_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        put_u16(&mut b, 8, VERSION);
        put_u16(&mut b, 10, self.flags.bits());
        put_u32(&mut b, 12, WIRE_PAGE_SIZE);
        b[16..32].copy_from_slice(&self.session);
        put_u16(&mut b, 32, self.channel);
        put_u16(&mut b, 34, self.channels);
        put_u32(&mut b, 36, u32::try_from(count).unwrap_or(u32::MAX));
        for (i, region) in self.regions.iter().enumerate() {
            let at = Self::FIXED_LEN + i * Self::REGION_LEN;
            put_u32(&mut b, at, region.id());
            put_u64(&mut b, at + 8, region.guest_base().0);
            put_u64(&mut b, at + 16, region.len());
        }
        let head = crc32fast::hash(&b[..40]);
        put_u32(&mut b, 40, head);
        let crc = crc32fast::hash(&b);
        put_u32(&mut b, 44, crc);
        b
    }

    /// Checks the fixed part and returns how many region-table bytes follow it. Magic and
    /// version come first, so a peer of another version gets a precise error; then the crc of
    /// bytes 0..40, so that no corrupted count sizes a read of bytes that will never come.
    pub fn table_len(fixed: &[u8; Self::FIXED_LEN]) -> Result<usize, DecodeError> {
        check_magic_version(fixed)?;
        verify_crc("hello", u32_at(fixed, 40), crc32fast::hash(&fixed[..40]))?;
        let flags = HelloFlags::from_bits(u16_at(fixed, 10))?;
        let page_size = u32_at(fixed, 12);
        if page_size != WIRE_PAGE_SIZE {
            return Err(invalid("page size", page_size));
        }
        let (channel, channels) = (u16_at(fixed, 32), u16_at(fixed, 34));
        if channels == 0 {
            return Err(invalid("channel count", channels));
        }
        if channels > MAX_CHANNELS {
            return Err(too_large("channel count", channels, MAX_CHANNELS));
        }
        // The fault channel's index is one past the data channels'.
        let fault_index = flags.fault && channel == channels;
        if channel >= channels && !fault_index
            || flags.fault && channel != channels
            || flags.share && channel != 0
        {
            return Err(invalid("channel index", channel));
        }
        let regions = u32_at(fixed, 36);
        if regions == 0 {
            return Err(invalid("region count", regions));
        }
        if regions > MAX_REGIONS {
            return Err(too_large("region count", regions, MAX_REGIONS));
        }
        // At most 256 regions of 24 bytes: no overflow.
        Ok(regions as usize * Self::REGION_LEN)
    }

    /// Decodes a hello from its fixed part and the region table that [`Hello::table_len`] sized.
    pub fn decode(fixed: &[u8; Self::FIXED_LEN], table: &[u8]) -> Result<Self, DecodeError> {
        let table_len = Self::table_len(fixed)?;
        if table.len() != table_len {
            return Err(invalid("hello region table length", table.len() as u64));
        }
        let mut zeroed = *fixed;
        put_u32(&mut zeroed, 44, 0);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&zeroed);
        hasher.update(table);
        verify_crc("hello", u32_at(fixed, 44), hasher.finalize())?;
        let mut regions = Vec::with_capacity(table_len / Self::REGION_LEN);
        for entry in table.chunks_exact(Self::REGION_LEN) {
            if u32_at(entry, 4) != 0 {
                return Err(invalid("region reserved field", u32_at(entry, 4)));
            }
            let (base, len) = (u64_at(entry, 8), u64_at(entry, 16));
            let page = u64::from(WIRE_PAGE_SIZE);
            if len == 0 || len % page != 0 || base % page != 0 || base.checked_add(len).is_none() {
                return Err(invalid("region length", len));
            }
            regions.push(RegionLayout::new(u32_at(entry, 0), GuestAddr(base), len));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&fixed[16..32]);
        Ok(Hello {
            session,
            channel: u16_at(fixed, 32),
            channels: u16_at(fixed, 34),
            regions,
            flags: HelloFlags::from_bits(u16_at(fixed, 10))?,
        })
    }
}

/// What the receiver says to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Accept,
    /// No, and why.
    Refuse(String),
    /// To a hello that offered its memory (flag `share`): go ahead; this receiver took the
    /// memory, so no page is to be sent.
    Shared,
    /// To a hello that offered its memory: go ahead, but send the pages: this receiver did
    /// not take the memory, for the reason given.
    Copying(String),
}

/// The receiver's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// Accepted or refused.
    pub verdict: Verdict,
}

impl HelloReply {
    /// Bytes before the reason.
    pub const FIXED_LEN: usize = 24;

    /// The encoded reply; a reason longer than the limit is cut at a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let (code, reason) = match &self.verdict {
            Verdict::Accept => (1u16, ""),
            Verdict::Refuse(reason) => (2u16, truncate(reason, MAX_MESSAGE as usize)),
            Verdict::Shared => (3u16, ""),
            Verdict::Copying(reason) => (4u16, truncate(reason, MAX_MESSAGE as usize)),
        };
        let mut b = vec![0u8; Self::FIXED_LEN + reason.len()];
        b[0..8].copy_from_slice(&MAGIC);
        put_u16(&mut b, 8, VERSION);
        put_u16(&mut b, 10, code);
        put_u32(
            &mut b,
            12,
            u32::try_from(reason.len()).unwrap_or(MAX_MESSAGE),
        );
        b[Self::FIXED_LEN..].copy_from_slice(reason.as_bytes());
        let head = crc32fast::hash(&b[..16]);
        put_u32(&mut b, 20, head);
        let crc = crc32fast::hash(&b);
        put_u32(&mut b, 16, crc);
        b
    }

    /// Checks the fixed part and returns the reason length that follows.
    pub fn reason_len(fixed: &[u8; Self::FIXED_LEN]) -> Result<usize, DecodeError> {
        check_magic_version(fixed)?;
        verify_crc(
            "hello reply",
            u32_at(fixed, 20),
            crc32fast::hash(&fixed[..16]),
        )?;
        let code = u16_at(fixed, 10);
        if !(1..=4).contains(&code) {
            return Err(invalid("hello reply verdict", code));
        }
        let len = u32_at(fixed, 12);
        if len > MAX_MESSAGE {
            return Err(too_large("refusal reason", len, MAX_MESSAGE));
        }
        if matches!(code, 1 | 3) && len != 0 {
            return Err(invalid("reason length of an acceptance", len));
        }
        Ok(len as usize)
    }

    /// Decodes a reply from its fixed part and the reason bytes.
    pub fn decode(fixed: &[u8; Self::FIXED_LEN], reason: &[u8]) -> Result<Self, DecodeError> {
        let len = Self::reason_len(fixed)?;
        if reason.len() != len {
            return Err(invalid("reason length", reason.len() as u64));
        }
        let mut zeroed = *fixed;
        put_u32(&mut zeroed, 16, 0);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&zeroed);
        hasher.update(reason);
        verify_crc("hello reply", u32_at(fixed, 16), hasher.finalize())?;
        let reason = || String::from_utf8_lossy(reason).into_owned();
        let verdict = match u16_at(fixed, 10) {
            1 => Verdict::Accept,
            3 => Verdict::Shared,
            4 => Verdict::Copying(reason()),
            _ => Verdict::Refuse(reason()),
        };
        Ok(HelloReply { verdict })
    }
}

/// A same-host sender's guest memory, right after a hello with flag `share`: one descriptor
/// per region of the hello, in region order, attached to this message's first byte
/// (`SCM_RIGHTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFds {
    /// How many descriptors come with it: the hello's region count.
    pub count: u32,
}

impl MemoryFds {
    /// Its length.
    pub const LEN: usize = 24;
    /// The message's kind, at offset 10 (room for others).
    const KIND: u16 = 1;

    /// The encoded message.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&MAGIC);
        put_u16(&mut b, 8, VERSION);
        put_u16(&mut b, 10, Self::KIND);
        put_u32(&mut b, 12, self.count);
        let crc = crc32fast::hash(&b[..20]);
        put_u32(&mut b, 20, crc);
        b
    }

    /// Decodes the message.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, DecodeError> {
        check_magic_version(b)?;
        verify_crc(
            "memory descriptors",
            u32_at(b, 20),
            crc32fast::hash(&b[..20]),
        )?;
        let kind = u16_at(b, 10);
        if kind != Self::KIND {
            return Err(invalid("memory message kind", kind));
        }
        if u32_at(b, 16) != 0 {
            return Err(invalid("memory message reserved field", u32_at(b, 16)));
        }
        let count = u32_at(b, 12);
        if count == 0 {
            return Err(invalid("descriptor count", count));
        }
        if count > MAX_REGIONS {
            return Err(too_large("descriptor count", count, MAX_REGIONS));
        }
        Ok(MemoryFds { count })
    }
}

fn check_magic_version(b: &[u8]) -> Result<(), DecodeError> {
    let mut found = [0u8; 8];
    found.copy_from_slice(&b[0..8]);
    if found != MAGIC {
        return Err(DecodeError::BadMagic { found });
    }
    let version = u16_at(b, 8);
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn split(bytes: &[u8]) -> ([u8; Hello::FIXED_LEN], &[u8]) {
        let mut fixed = [0u8; Hello::FIXED_LEN];
        fixed.copy_from_slice(&bytes[..Hello::FIXED_LEN]);
        (fixed, &bytes[Hello::FIXED_LEN..])
    }

    fn sample() -> Hello {
        Hello {
            flags: Default::default(),
            session: *b"0123456789abcdef",
            channel: 1,
            channels: 4,
            regions: vec![
                RegionLayout::new(0, GuestAddr(0), 1 << 30),
                RegionLayout::new(7, GuestAddr(1 << 32), 4096),
            ],
        }
    }

    #[test]
    fn hello_roundtrip_and_every_corruption_is_caught() {
        let hello = sample();
        let bytes = hello.encode();
        assert_eq!(bytes.len(), 48 + 2 * 24);
        let (fixed, table) = split(&bytes);
        assert_eq!(Hello::table_len(&fixed), Ok(48));
        assert_eq!(Hello::decode(&fixed, table), Ok(hello));
        // A flipped bit anywhere is refused, never accepted as a different hello.
        for i in 0..bytes.len() {
            for bit in [0, 3, 7] {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                let (fixed, table) = split(&bad);
                let result = Hello::table_len(&fixed).and_then(|len| {
                    if len == table.len() {
                        Hello::decode(&fixed, table)
                    } else {
                        Err(invalid("length", len as u64))
                    }
                });
                assert!(result.is_err(), "byte {i} bit {bit} went unnoticed");
            }
        }
    }

    #[test]
    fn hello_fields_are_checked_before_the_table_is_read() {
        let bytes = sample().encode();
        let (fixed, _) = split(&bytes);
        // As a sender with a bug would send them: well-formed, the fixed part's crc right.
        let with = |at: usize, value: &[u8]| {
            let mut f = fixed;
            f[at..at + value.len()].copy_from_slice(value);
            let head = crc32fast::hash(&f[..40]);
            put_u32(&mut f, 40, head);
            Hello::table_len(&f).unwrap_err()
        };
        assert!(matches!(with(0, b"QEMU"), DecodeError::BadMagic { .. }));
        assert_eq!(
            with(8, &1u16.to_le_bytes()),
            DecodeError::UnsupportedVersion { found: 1 }
        );
        assert_eq!(
            with(8, &1u16.to_le_bytes()).to_string(),
            "unsupported protocol version 1 (this build speaks 3)"
        );
        assert!(matches!(
            with(12, &65536u32.to_le_bytes()),
            DecodeError::Invalid {
                what: "page size",
                ..
            }
        ));
        assert!(matches!(
            with(34, &0u16.to_le_bytes()),
            DecodeError::Invalid { .. }
        ));
        assert!(matches!(
            with(34, &65u16.to_le_bytes()),
            DecodeError::TooLarge { .. }
        ));
        assert!(matches!(
            with(32, &4u16.to_le_bytes()),
            DecodeError::Invalid {
                what: "channel index",
                ..
            }
        ));
        assert!(matches!(
            with(36, &0u32.to_le_bytes()),
            DecodeError::Invalid { .. }
        ));
        assert!(matches!(
            with(36, &u32::MAX.to_le_bytes()),
            DecodeError::TooLarge { .. }
        ));
    }

    /// A count corrupted in transit is caught by the fixed part's crc before it sizes a read:
    /// a receiver never waits for a region table, nor a sender for a reason, that will not
    /// come.
    /// The memory descriptors message round-trips; any flipped bit, a zero or excessive count,
    /// another kind or a reserved field set is refused. The replies to an offer round-trip.
    #[test]
    fn memory_message_and_offer_replies() {
        let message = MemoryFds { count: 3 };
        let bytes = message.encode();
        assert_eq!(MemoryFds::decode(&bytes), Ok(message));
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(MemoryFds::decode(&bad).is_err(), "byte {i}");
        }
        let reseal = |mut b: [u8; MemoryFds::LEN]| {
            let crc = crc32fast::hash(&b[..20]);
            put_u32(&mut b, 20, crc);
            b
        };
        for (at, value) in [(12, 0u32), (12, MAX_REGIONS + 1), (16, 1)] {
            let mut bad = bytes;
            put_u32(&mut bad, at, value);
            assert!(MemoryFds::decode(&reseal(bad)).is_err(), "{at}: {value}");
        }
        let mut bad = bytes;
        put_u16(&mut bad, 10, 2);
        assert!(MemoryFds::decode(&reseal(bad)).is_err(), "kind");
        for verdict in [
            Verdict::Shared,
            Verdict::Copying("its memory is the VMM's".into()),
        ] {
            let bytes = HelloReply {
                verdict: verdict.clone(),
            }
            .encode();
            let mut fixed = [0u8; HelloReply::FIXED_LEN];
            fixed.copy_from_slice(&bytes[..HelloReply::FIXED_LEN]);
            let len = HelloReply::reason_len(&fixed).unwrap();
            let reply = HelloReply::decode(&fixed, &bytes[HelloReply::FIXED_LEN..]).unwrap();
            assert_eq!(reply.verdict, verdict);
            assert_eq!(len, bytes.len() - HelloReply::FIXED_LEN);
        }
    }

    #[test]
    fn corrupted_counts_are_caught_before_anything_is_read_for_them() {
        let bytes = sample().encode();
        let (mut fixed, _) = split(&bytes);
        fixed[36] ^= 0x5A;
        assert!(Hello::table_len(&fixed).unwrap_err().is_checksum());
        let reply = HelloReply {
            verdict: Verdict::Refuse("no".into()),
        }
        .encode();
        let mut fixed = [0u8; HelloReply::FIXED_LEN];
        fixed.copy_from_slice(&reply[..24]);
        fixed[12] ^= 0x04;
        assert!(HelloReply::reason_len(&fixed).unwrap_err().is_checksum());
    }

    /// Every valid combination of flags round-trips; fault or resume without postcopy, an
    /// attempt without resume (or resume without one) and unknown bits are refused; attempts
    /// compare across the wrap.
    #[test]
    fn hello_flags_round_trip_and_nonsense_is_refused() {
        // Under Miri, a sample: it interprets each call a hundred times slower.
        let step = if cfg!(miri) { 97 } else { 1 };
        for bits in (0..=u16::MAX).step_by(step) {
            let decoded = HelloFlags::from_bits(bits);
            if let Ok(flags) = decoded {
                assert_eq!(flags.bits(), bits);
                assert!(flags.postcopy || (!flags.fault && !flags.resume));
                assert_eq!(flags.resume, flags.attempt != 0);
                assert!(!(flags.share && flags.postcopy));
            }
        }
        assert!(HelloFlags::from_bits(1 << 4).is_err());
        assert!(HelloFlags::from_bits(HelloFlags::SHARE).is_ok());
        assert!(HelloFlags::from_bits(HelloFlags::SHARE | HelloFlags::POSTCOPY).is_err());
        // Only channel 0 offers memory.
        let mut hello = sample();
        hello.flags.share = true;
        for (channel, ok) in [(0, true), (1, false)] {
            hello.channel = channel;
            let (fixed, _) = split(&hello.encode());
            assert_eq!(Hello::table_len(&fixed).is_ok(), ok, "channel {channel}");
        }
        assert!(HelloFlags::from_bits(HelloFlags::FAULT).is_err());
        assert!(HelloFlags::from_bits(HelloFlags::POSTCOPY | (1 << 8)).is_err());
        assert!(HelloFlags::from_bits(HelloFlags::POSTCOPY | HelloFlags::RESUME).is_err());
        let attempt = |attempt| HelloFlags {
            postcopy: true,
            resume: true,
            attempt,
            ..HelloFlags::default()
        };
        let mut hello = sample();
        hello.flags = attempt(200);
        hello.flags.fault = true;
        hello.channel = hello.channels;
        let bytes = hello.encode();
        let mut fixed = [0u8; Hello::FIXED_LEN];
        fixed.copy_from_slice(&bytes[..Hello::FIXED_LEN]);
        assert!(Hello::table_len(&fixed).is_ok());
        assert!(attempt(2).is_newer_attempt(1));
        assert!(!attempt(1).is_newer_attempt(2));
        assert!(!attempt(5).is_newer_attempt(5));
        assert!(attempt(1).is_newer_attempt(255), "across the wrap");
        assert!(!attempt(255).is_newer_attempt(1));
    }

    #[test]
    fn replies_roundtrip_and_reasons_are_bounded() {
        for verdict in [
            Verdict::Accept,
            Verdict::Refuse("region table differs".into()),
        ] {
            let reply = HelloReply { verdict };
            let bytes = reply.encode();
            let mut fixed = [0u8; HelloReply::FIXED_LEN];
            fixed.copy_from_slice(&bytes[..24]);
            let len = HelloReply::reason_len(&fixed).unwrap();
            assert_eq!(HelloReply::decode(&fixed, &bytes[24..24 + len]), Ok(reply));
        }
        let long = HelloReply {
            verdict: Verdict::Refuse("é".repeat(2000)),
        };
        let bytes = long.encode();
        assert!(bytes.len() <= 24 + MAX_MESSAGE as usize);
        let mut fixed = [0u8; 24];
        fixed.copy_from_slice(&bytes[..24]);
        put_u32(&mut fixed, 12, MAX_MESSAGE + 1);
        let head = crc32fast::hash(&fixed[..16]);
        put_u32(&mut fixed, 20, head);
        assert!(matches!(
            HelloReply::reason_len(&fixed),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    proptest! {
        #![proptest_config(crate::tests::proptest_config())]

        #[test]
        fn hello_decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 48..200)) {
            let (fixed, table) = split(&bytes);
            if let Ok(len) = Hello::table_len(&fixed) {
                let _ = Hello::decode(&fixed, &table[..len.min(table.len())]);
            }
        }
    }
}

//! Fuzzes every decoder of the wire format: frame headers (with the crc check over a payload),
//! page tables, hellos and hello replies.
//!
//! Input: a mode byte, then the bytes to decode. Bits 0..2 of the mode pick the decoder (frame,
//! hello, hello reply, or all three over the same bytes); bit 2 fills in correct crcs before
//! decoding, so that the fuzzer also reaches what comes after the checksum (a hello's region
//! table, a reply's reason).
//!
//! Besides never panicking, whatever decodes must satisfy what the decoder promises:
//! - a decoded header re-encodes to exactly its bytes, and meets its kind's limits;
//! - `verify` accepts exactly the crc that `crc32fast` computes over header (crc zeroed) and
//!   payload, and `seal` produces a frame that verifies;
//! - a decoded page table has `count` entries with strictly increasing offsets, legal
//!   encodings and data lengths that add up to the payload, and re-encodes to its bytes;
//! - a decoded hello respects the limits `table_len` checked and re-encodes to its bytes;
//! - a decoded reply re-encodes to its bytes when its reason is UTF-8.

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use ramjet_dataplane::internals::wire::{
    DecodeError, Encoding, FrameHeader, FrameKind, Hello, HelloReply, MAX_CHANNELS, MAX_MESSAGE,
    MAX_PAGES_PER_FRAME, MAX_PAYLOAD, MAX_REGIONS, PageEntry, PageTable, Verdict, WIRE_PAGE_SIZE,
    seal,
};

/// Mode bit: fill in a correct crc before decoding.
const FIX_CRC: u8 = 4;

fuzz_target!(|data: &[u8]| -> Corpus {
    let [mode, bytes @ ..] = data else {
        return Corpus::Reject;
    };
    let fix = mode & FIX_CRC != 0;
    let used = match mode % 4 {
        0 => frame(bytes, fix),
        1 => hello(bytes, fix),
        2 => reply(bytes, fix),
        _ => frame(bytes, fix) | hello(bytes, fix) | reply(bytes, fix),
    };
    if used { Corpus::Keep } else { Corpus::Reject }
});

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

/// Frame header, crc and page table. Returns false if the input is too short for a header.
fn frame(bytes: &[u8], fix: bool) -> bool {
    if bytes.len() < FrameHeader::LEN {
        return false;
    }
    let mut bytes = bytes.to_vec();
    if fix {
        // Seal the header with as much payload as its length field says (or is there).
        let len = u32::from_le_bytes(array(&bytes[24..28])) as usize;
        let end = (FrameHeader::LEN + len).min(bytes.len());
        bytes[28..32].fill(0);
        seal(&mut bytes[..end]);
    }
    let fixed: [u8; FrameHeader::LEN] = array(&bytes);
    let h = match FrameHeader::decode(&fixed) {
        Ok(h) => h,
        Err(e) => {
            check_error(&e);
            return true;
        }
    };
    assert_eq!(
        h.encode(),
        fixed,
        "a decoded header re-encodes to its bytes"
    );
    assert!(h.len <= MAX_PAYLOAD);
    match h.kind {
        FrameKind::Pages => {
            assert!((1..=MAX_PAGES_PER_FRAME).contains(&h.count));
            assert!(h.len >= h.count * 8 && h.len <= h.count * (8 + WIRE_PAGE_SIZE));
            assert!(h.round >= 1);
        }
        FrameKind::EndOfRound | FrameKind::EndOfStream => assert_eq!(h.len, 0),
        FrameKind::DeviceState => assert!(h.len > 0),
        FrameKind::Error => assert!(h.len <= MAX_MESSAGE),
        FrameKind::Ready => assert_eq!(h.len, 8),
        FrameKind::Decision | FrameKind::Decided => {
            assert_eq!((h.len, h.round), (0, 0));
            assert!(h.value <= 1);
        }
        FrameKind::Discard | FrameKind::Received => {
            assert!(h.len > 0 && h.len % 8 == 0 && h.round == 0);
        }
        FrameKind::Request => {
            assert!((1..=MAX_PAGES_PER_FRAME).contains(&h.count));
            assert_eq!((h.len, h.round), (0, 0));
        }
        FrameKind::Postcopy | FrameKind::Resume => assert_eq!(h.len, 0),
        FrameKind::Done => assert_eq!(h.len, 27 * 8),
    }
    if !matches!(h.kind, FrameKind::Pages | FrameKind::Request) {
        assert_eq!(h.count, 0);
    }
    if !matches!(
        h.kind,
        FrameKind::Pages | FrameKind::Discard | FrameKind::Request | FrameKind::Received
    ) {
        assert_eq!(h.region, 0);
    }

    // The crc over whatever part of the payload is there.
    let rest = &bytes[FrameHeader::LEN..];
    let payload = &rest[..rest.len().min(h.len as usize)];
    let mut hasher = h.hasher();
    hasher.update(payload);
    let mut zeroed = fixed;
    zeroed[28..32].fill(0);
    let mut independent = crc32fast::Hasher::new();
    independent.update(&zeroed);
    independent.update(payload);
    let expected = independent.finalize() == h.crc;
    match h.verify(hasher) {
        Ok(()) => assert!(expected, "verify accepted a wrong crc"),
        Err(e) => {
            assert!(!expected, "verify refused a right crc");
            assert!(e.is_checksum());
        }
    }
    let mut sealed = [&zeroed[..], payload].concat();
    seal(&mut sealed);
    let resealed = FrameHeader::decode(&array(&sealed)).expect("sealing keeps a header valid");
    let mut hasher = resealed.hasher();
    hasher.update(payload);
    assert!(resealed.verify(hasher).is_ok(), "a sealed frame verifies");

    if h.kind == FrameKind::Pages {
        page_table(&h, rest);
    }
    true
}

fn page_table(h: &FrameHeader, rest: &[u8]) {
    let len = PageTable::len_for(h);
    assert_eq!(len, h.count as usize * PageEntry::LEN);
    let mut table = PageTable::new();
    // A table of the wrong length is refused, never read past.
    if rest.len() != len {
        assert!(
            table.decode(h, rest).is_err(),
            "a table of another length is refused"
        );
    }
    if rest.len() < len {
        return;
    }
    let bytes = &rest[..len];
    match table.decode(h, bytes) {
        Err(e) => check_error(&e),
        Ok(()) => {
            let entries = table.entries();
            assert_eq!(entries.len(), h.count as usize);
            let mut data = 0u64;
            let mut prev: Option<u32> = None;
            let mut again = vec![0u8; len];
            for (e, out) in entries.iter().zip(again.chunks_exact_mut(PageEntry::LEN)) {
                if let Some(p) = prev {
                    assert!(e.offset > p, "offsets strictly increase");
                }
                prev = Some(e.offset);
                assert!(h.value.checked_add(u64::from(e.offset)).is_some());
                match e.encoding {
                    Encoding::Zero => assert_eq!(e.len, 0),
                    Encoding::Raw => assert_eq!(e.len, WIRE_PAGE_SIZE),
                    Encoding::Lz4 | Encoding::Zstd => {
                        assert!(e.len > 0 && e.len < WIRE_PAGE_SIZE);
                    }
                }
                data += u64::from(e.len);
                e.write(out);
            }
            assert_eq!(
                data + len as u64,
                u64::from(h.len),
                "data adds up to the payload"
            );
            assert_eq!(again, bytes, "a decoded table re-encodes to its bytes");
        }
    }
}

/// Hello: fixed part, then the region table. Returns false if too short.
fn hello(bytes: &[u8], fix: bool) -> bool {
    if bytes.len() < Hello::FIXED_LEN {
        return false;
    }
    let mut bytes = bytes.to_vec();
    if fix {
        // The fixed part's own crc first: it guards the region count.
        let head = crc32fast::hash(&bytes[..40]);
        bytes[40..44].copy_from_slice(&head.to_le_bytes());
    }
    let fixed: [u8; Hello::FIXED_LEN] = array(&bytes);
    let table_len = match Hello::table_len(&fixed) {
        Ok(n) => n,
        Err(e) => {
            check_error(&e);
            return true;
        }
    };
    let channels = u16::from_le_bytes(array(&bytes[34..36]));
    let channel = u16::from_le_bytes(array(&bytes[32..34]));
    let flags = u16::from_le_bytes(array(&bytes[10..12]));
    // Data channels are numbered from 0; the fault channel (flag bit 1) is one past them.
    let fault = flags & 2 != 0;
    assert!(channels <= MAX_CHANNELS);
    if fault {
        assert_eq!(
            channel, channels,
            "the fault channel is one past the data channels"
        );
    } else {
        assert!(channel < channels);
    }
    if flags & 8 != 0 {
        assert_eq!(channel, 0, "only channel 0 offers the memory");
    }
    assert_eq!(table_len % Hello::REGION_LEN, 0);
    let regions = table_len / Hello::REGION_LEN;
    assert!(regions >= 1 && regions <= MAX_REGIONS as usize);
    let end = (Hello::FIXED_LEN + table_len).min(bytes.len());
    if fix {
        bytes[44..48].fill(0);
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[44..48].copy_from_slice(&crc.to_le_bytes());
    }
    let fixed: [u8; Hello::FIXED_LEN] = array(&bytes);
    let table = &bytes[Hello::FIXED_LEN..end];
    match Hello::decode(&fixed, table) {
        Err(e) => check_error(&e),
        Ok(hello) => {
            assert_eq!(table.len(), table_len);
            assert_eq!(hello.regions.len(), regions);
            assert_eq!((hello.channel, hello.channels), (channel, channels));
            for r in &hello.regions {
                let page = u64::from(WIRE_PAGE_SIZE);
                assert!(!r.is_empty() && r.len() % page == 0 && r.guest_base().0 % page == 0);
                assert!(r.guest_base().0.checked_add(r.len()).is_some());
            }
            assert_eq!(
                hello.encode(),
                &bytes[..end],
                "a hello re-encodes to its bytes"
            );
        }
    }
    true
}

/// Hello reply: fixed part, then the reason. Returns false if too short.
fn reply(bytes: &[u8], fix: bool) -> bool {
    if bytes.len() < HelloReply::FIXED_LEN {
        return false;
    }
    let mut bytes = bytes.to_vec();
    if fix {
        // The fixed part's own crc first: it guards the reason length.
        let head = crc32fast::hash(&bytes[..16]);
        bytes[20..24].copy_from_slice(&head.to_le_bytes());
    }
    let fixed: [u8; HelloReply::FIXED_LEN] = array(&bytes);
    let reason_len = match HelloReply::reason_len(&fixed) {
        Ok(n) => n,
        Err(e) => {
            check_error(&e);
            return true;
        }
    };
    assert!(reason_len <= MAX_MESSAGE as usize);
    let end = (HelloReply::FIXED_LEN + reason_len).min(bytes.len());
    if fix {
        bytes[16..20].fill(0);
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
    }
    let fixed: [u8; HelloReply::FIXED_LEN] = array(&bytes);
    let reason = &bytes[HelloReply::FIXED_LEN..end];
    match HelloReply::decode(&fixed, reason) {
        Err(e) => check_error(&e),
        Ok(reply) => {
            assert_eq!(reason.len(), reason_len);
            match &reply.verdict {
                Verdict::Accept | Verdict::Shared => assert_eq!(reason_len, 0),
                Verdict::Refuse(text) | Verdict::Copying(text) => {
                    if std::str::from_utf8(reason).is_ok() {
                        assert_eq!(text.as_bytes(), reason);
                        assert_eq!(reply.encode(), &bytes[..end], "a reply re-encodes");
                    }
                }
            }
        }
    }
    true
}

/// Every error can be shown, and too-large values are over their limit.
fn check_error(e: &DecodeError) {
    let text = e.to_string();
    assert!(!text.is_empty());
    if let DecodeError::TooLarge { value, limit, .. } = e {
        assert!(value > limit, "{text}");
    }
}

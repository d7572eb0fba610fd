//! Bad input on either side: every case ends in a failed migration whose error names the
//! problem, with `failed` and `drained` reported, and never a panic, a hang or a write outside
//! guest memory — except where the receiver can tell a stranger from its sender: a connection
//! that fails its hello in a way only a stranger would (closes, stalls, bad magic, a corrupt
//! hello, another session's hello) is dropped and logged and the receiver waits on, so these
//! tests' receivers tolerate no such stray (`max_refused` 0) unless a test says otherwise, and
//! then fail with the stray's reason (`tests/strays.rs` has the receiver that waits on).
//!
//! Against the real receiver a hand-written sender sends a valid stream with one defect; against
//! the real sender a hand-written receiver misbehaves.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Facts, Image, Lines, Net, guest};
use ramjet_control::Fact;
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::internals::codec::{Batch, Encoder, PageCompression};
use ramjet_dataplane::internals::wire::{
    Encoding, FrameHeader, FrameKind, Hello, HelloReply, MAX_PAYLOAD, PageEntry, Verdict,
    channel_of, frame_capacity, seal,
};
use ramjet_dataplane::memory::{GuestAddr, GuestMemory, RegionLayout};
use ramjet_dataplane::transport::{Endpoint, Listener, Transport};
use ramjet_dataplane::{Error, Handover, ReceiveOptions, Received, SendOptions, Sender, receive};

const PAGES: u64 = 256;
const SHORT: Duration = Duration::from_millis(400);

type ReceiverRun = JoinHandle<(Result<Received, Error>, Vec<Fact>)>;

/// A real receiver for `memory` with a short timeout that tolerates no stray connection.
fn receiver(memory: Arc<GuestMemory>, transport: &Arc<dyn Transport>) -> (Endpoint, ReceiverRun) {
    let (at, run, _) = receiver_with(memory, transport, |_| {});
    (at, run)
}

/// A real receiver for `memory` with short timeouts (no stray tolerated), the options changed
/// by `tweak`; returns its log lines too.
fn receiver_with(
    memory: Arc<GuestMemory>,
    transport: &Arc<dyn Transport>,
    tweak: impl FnOnce(&mut ReceiveOptions),
) -> (Endpoint, ReceiverRun, Arc<Lines>) {
    let listener = Listener::bind(&common::endpoint(Net::Tcp)).expect("bind");
    let at = listener.endpoint().clone();
    let lines = Arc::new(Lines::default());
    let mut options = ReceiveOptions {
        transport: Arc::clone(transport),
        workers: 2,
        timeout: SHORT,
        accept_timeout: Some(Duration::from_secs(10)),
        max_refused: 0,
        log: lines.log(),
        in_doubt_wait: SHORT,
        ..ReceiveOptions::default()
    };
    tweak(&mut options);
    let handle = thread::spawn(move || {
        let facts = Arc::new(Facts::default());
        let result = receive(&listener, memory, &options, facts.sink());
        (result, facts.all())
    });
    (at, handle, lines)
}

/// The log lines about strays, without the receiver's lines about a doubt.
fn strays_only(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|line| !line.starts_with("in doubt"))
        .collect()
}

/// The hello `bytes` with the crc of their fixed part made right again after a change, as a
/// sender with a bug would send it.
fn reseal_head(bytes: &mut [u8]) {
    let head = crc32fast::hash(&bytes[..40]);
    bytes[40..44].copy_from_slice(&head.to_le_bytes());
}

fn tcp(at: &Endpoint) -> TcpStream {
    match at {
        Endpoint::Tcp(addr) => TcpStream::connect(addr).expect("connect"),
        Endpoint::Unix(_) => unreachable!("these tests use TCP"),
    }
}

/// Writes `bytes` on a new connection, closes the sending direction, and returns what the
/// receiver sent back (until it closes, or a few seconds).
fn feed(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut back = Vec::new();
    let _ = stream.read_to_end(&mut back);
    back
}

/// The receiver's error, after checking that it reported `failed` with the same message and
/// then `drained`.
fn failure(run: ReceiverRun) -> Error {
    let (result, facts) = run.join().expect("receiver thread");
    let err = result.expect_err("the receiver must fail");
    match facts.as_slice() {
        [.., Fact::Failed(message), Fact::Drained] => assert_eq!(message, &err.chain()),
        other => panic!("facts {other:?} for {}", err.chain()),
    }
    err
}

fn assert_names(err: &Error, needle: &str) {
    let text = err.chain();
    assert!(text.contains(needle), "{needle:?} not in: {text}");
}

/// A valid single-migration stream for `memory` on `channels` channels: per channel, the hello
/// and then the frames (pages of round 1, end of round, device state on channel 0, end of
/// stream).
fn valid_stream(memory: &GuestMemory, channels: u16) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut out: Vec<(Vec<u8>, Vec<Vec<u8>>)> = (0..channels)
        .map(|channel| {
            let hello = Hello {
                flags: Default::default(),
                session: [7; 16],
                channel,
                channels,
                regions: memory.layout(),
            };
            (hello.encode(), Vec::new())
        })
        .collect();
    let mut encoder = Encoder::new();
    let offsets: Vec<u32> = (0..64).collect();
    let mut pages = vec![0u64; usize::from(channels)];
    for chunk in 0..memory.total_pages() / 64 {
        let channel = channel_of(chunk * 64, channels);
        let mut buf = vec![0u8; frame_capacity(64)];
        let batch = Batch {
            region: 0,
            first: chunk * 64,
            offsets: &offsets,
            round: 1,
        };
        let (len, _) = encoder
            .encode(memory, &batch, PageCompression::Lz4, &mut buf)
            .expect("encode");
        buf.truncate(len);
        out[usize::from(channel)].1.push(buf);
        pages[usize::from(channel)] += 64;
    }
    for (channel, (_, frames)) in out.iter_mut().enumerate() {
        frames.push(FrameHeader::end_of_round(1, pages[channel]));
        if channel == 0 {
            frames.push(FrameHeader::device_state(0, b"device"));
        }
        frames.push(FrameHeader::end_of_stream(1, pages[channel]));
    }
    out
}

fn source() -> Arc<GuestMemory> {
    guest(PAGES * 4096, Image::Mixed, 21)
}

fn destination() -> Arc<GuestMemory> {
    Arc::new(GuestMemory::anonymous(PAGES * 4096).expect("memory"))
}

/// One channel: the hello, then `frames`, against a real receiver; returns its error.
fn one_channel(t: &Arc<dyn Transport>, hello: &[u8], frames: &[Vec<u8>]) -> Error {
    let (at, run) = receiver(destination(), t);
    let mut stream = tcp(&at);
    let mut bytes = hello.to_vec();
    for frame in frames {
        bytes.extend_from_slice(frame);
    }
    feed(&mut stream, &bytes);
    failure(run)
}

/// A hand-written sender's valid stream is received; the guest may run only once it said go.
/// Without its decision (it closes after ready), the receiver keeps the copy in doubt.
#[test]
fn the_valid_stream_is_accepted() {
    for t in &common::transports() {
        for decides in [true, false] {
            let src = source();
            let dst = destination();
            let (at, run) = receiver(Arc::clone(&dst), t);
            let stream = valid_stream(&src, 1);
            let (hello, frames) = &stream[0];
            let mut s = tcp(&at);
            s.write_all(&[hello.clone(), frames.concat()].concat())
                .expect("send");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            // The reply accepts; then comes ready: a header and its 8-byte payload.
            let mut fixed = [0u8; HelloReply::FIXED_LEN];
            s.read_exact(&mut fixed).expect("hello reply");
            assert_eq!(
                HelloReply::decode(&fixed, &[]).expect("reply").verdict,
                Verdict::Accept
            );
            let mut ready = [0u8; FrameHeader::LEN + 8];
            s.read_exact(&mut ready).expect("ready");
            let mut header = [0u8; FrameHeader::LEN];
            header.copy_from_slice(&ready[..FrameHeader::LEN]);
            let header = FrameHeader::decode(&header).expect("ready header");
            assert_eq!(header.kind, FrameKind::Ready);
            assert_eq!(header.value, PAGES);
            if decides {
                s.write_all(&FrameHeader::decision(true)).expect("go");
                let mut decided = [0u8; FrameHeader::LEN];
                s.read_exact(&mut decided).expect("decided");
                let decided = FrameHeader::decode(&decided).expect("decided header");
                assert_eq!((decided.kind, decided.is_go()), (FrameKind::Decided, true));
            }
            drop(s);
            let (result, facts) = run.join().expect("receiver");
            let received = result.expect("a complete copy");
            assert_eq!(received.device_state, b"device");
            assert_eq!(src.first_difference(&dst).expect("layout"), None);
            if decides {
                assert_eq!(received.handover, Handover::Go);
                assert_eq!(facts[facts.len() - 2..], [Fact::Completed, Fact::Drained]);
            } else {
                assert_eq!(received.handover, Handover::InDoubt);
                assert!(!received.handover.may_run());
                assert!(!facts.contains(&Fact::Completed), "{facts:?}");
                assert_eq!(facts.last(), Some(&Fact::Drained));
            }
        }
    }
}

/// Bad magic is a stranger: the connection is refused with the reason (which reaches the
/// peer), dropped and logged, and the receiver keeps waiting, here for a valid stream that then
/// completes. Another protocol version, a hello that is well-formed (its fixed part's crc is
/// right) but has an invalid field, and another memory layout are a broken sender: each fails
/// the migration with the reason, and the refusal reaches the peer. A corrupted region table
/// (its checksum fails) is a stranger again: with no stray tolerated, the migration fails with
/// the bound's error naming the checksum.
#[test]
fn wrong_magic_version_or_layout_is_refused_with_the_reason() {
    for t in &common::transports() {
        let src = source();
        let (hello, frames) = valid_stream(&src, 1).remove(0);

        let mut bad = hello.clone();
        bad[..4].copy_from_slice(b"QEMU");
        let dst = destination();
        let (at, run, lines) = receiver_with(Arc::clone(&dst), t, |o| o.max_refused = 64);
        let mut stray = tcp(&at);
        let stray_at = stray.local_addr().expect("addr").to_string();
        let back = feed(&mut stray, &bad);
        assert!(String::from_utf8_lossy(&back).contains("bad magic"));
        feed(&mut tcp(&at), &[hello.clone(), frames.concat()].concat());
        let (result, _) = run.join().expect("receiver");
        let received = result.expect("the receiver waited on for its sender");
        assert_eq!(received.device_state, b"device");
        assert_eq!(src.first_difference(&dst).expect("layout"), None);
        // The hand-written sender says no decision: the receiver ends in doubt, and says so.
        let lines = strays_only(lines.all());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains(&stray_at) && lines[0].contains("bad magic"));

        let mut page_size = hello.clone();
        page_size[12..16].copy_from_slice(&8192u32.to_le_bytes());
        reseal_head(&mut page_size);
        let cases: [(Vec<u8>, &str); 2] = [
            (
                [&hello[..8], &4u16.to_le_bytes(), &hello[10..]].concat(),
                "unsupported protocol version 4",
            ),
            (page_size, "invalid page size: 8192"),
        ];
        for (bad, needle) in cases {
            let (at, run) = receiver(destination(), t);
            let back = feed(&mut tcp(&at), &bad);
            assert_names(&failure(run), needle);
            // The peer got a refusal that says why.
            assert!(String::from_utf8_lossy(&back).contains(needle), "{needle}");
        }
        // A valid hello for another layout.
        let other = Hello {
            flags: Default::default(),
            session: [1; 16],
            channel: 0,
            channels: 1,
            regions: vec![RegionLayout::new(0, GuestAddr(0), 2 * PAGES * 4096)],
        };
        let (at, run) = receiver(destination(), t);
        let back = feed(&mut tcp(&at), &other.encode());
        assert_names(&failure(run), "the memory layouts differ");
        assert!(String::from_utf8_lossy(&back).contains("the memory layouts differ"));
        // A corrupted region table fails its checksum: a stray, one too many.
        let mut bad = hello.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        let err = one_channel(t, &bad, &[]);
        assert!(matches!(err, Error::TooManyRefused { count: 1, .. }));
        assert_names(&err, "hello checksum mismatch");
    }
}

/// While the other channels of a migration are awaited, a valid hello of another session is a
/// stranger's (a second sender aimed at the same port): it is refused with the reason, logged,
/// and the receiver waits on for its own channel, and the migration completes. A hello of the
/// same session that gives another channel count, or a channel that is already connected, is
/// the sender's own and broken: the migration fails with the reason.
#[test]
fn a_channel_of_another_session_is_a_stray() {
    for t in &common::transports() {
        let src = source();
        let stream = valid_stream(&src, 2);
        let dst = destination();
        let (at, run, lines) = receiver_with(Arc::clone(&dst), t, |o| o.max_refused = 64);
        let mut zero = tcp(&at);
        zero.write_all(&stream[0].0).expect("hello 0");
        let stranger = Hello {
            flags: Default::default(),
            session: [9; 16],
            channel: 1,
            channels: 2,
            regions: src.layout(),
        }
        .encode();
        let mut other = tcp(&at);
        let other_at = other.local_addr().expect("addr").to_string();
        let back = feed(&mut other, &stranger);
        assert!(String::from_utf8_lossy(&back).contains("another migration"));
        zero.write_all(&stream[0].1.concat()).expect("channel 0");
        let mut one = tcp(&at);
        feed(
            &mut one,
            &[stream[1].0.clone(), stream[1].1.concat()].concat(),
        );
        feed(&mut zero, &[]);
        let (result, _) = run.join().expect("receiver");
        result.expect("the migration completes");
        assert_eq!(src.first_difference(&dst).expect("layout"), None);
        // The hand-written sender says no decision: the receiver ends in doubt, and says so.
        let lines = strays_only(lines.all());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains(&other_at) && lines[0].contains("belongs to another migration"));

        // The same session with another channel count.
        let (at, run) = receiver(destination(), t);
        let mut first = tcp(&at);
        first.write_all(&stream[0].0).expect("hello 0");
        let three = Hello {
            flags: Default::default(),
            session: [7; 16],
            channel: 1,
            channels: 3,
            regions: src.layout(),
        };
        let back = feed(&mut tcp(&at), &three.encode());
        assert_names(&failure(run), "says the migration has 3 channels");
        assert!(String::from_utf8_lossy(&back).contains("3 channels"));
        // The same channel twice.
        let (at, run) = receiver(destination(), t);
        let mut first = tcp(&at);
        first.write_all(&stream[0].0).expect("hello 0");
        feed(&mut tcp(&at), &stream[0].0);
        assert_names(&failure(run), "channel 0 is already connected");
    }
}

#[test]
fn a_truncated_stream_fails_at_every_cut() {
    for t in &common::transports() {
        let src = source();
        let (hello, frames) = valid_stream(&src, 1).remove(0);
        let whole = [hello.clone(), frames.concat()].concat();
        // Every frame boundary, one byte into every frame, and the middle of every frame.
        let mut cuts = vec![0, 10, hello.len()];
        let mut at = hello.len();
        for frame in &frames {
            let header = FrameHeader::LEN;
            cuts.extend([at + 1, at + header - 1, at + header, at + frame.len() / 2]);
            at += frame.len();
            cuts.push(at);
        }
        // The whole stream is valid: every cut is shorter.
        cuts.retain(|&cut| cut < whole.len());
        cuts.sort_unstable();
        cuts.dedup();
        // A cut inside the hello is a stranger's truncated hello (a stray, and these receivers
        // tolerate none); after it, the sender's stream closed early.
        for cut in cuts {
            let (at, run) = receiver(destination(), t);
            feed(&mut tcp(&at), &whole[..cut]);
            let err = failure(run);
            if cut < hello.len() {
                assert!(
                    matches!(err, Error::TooManyRefused { .. }),
                    "cut at {cut}: {}",
                    err.chain()
                );
            } else {
                assert!(
                    matches!(err, Error::Closed { .. } | Error::Decode { .. }),
                    "cut at {cut}: {}",
                    err.chain()
                );
            }
            assert_names(&err, "closed the connection");
        }
    }
}

#[test]
fn a_flipped_byte_anywhere_is_caught() {
    for t in &common::transports() {
        let src = source();
        let (hello, frames) = valid_stream(&src, 1).remove(0);
        let whole = [hello.clone(), frames.concat()].concat();
        // (offset, whether the error must be a checksum mismatch). Only a header that breaks
        // the format's limits (kind 0, length 27) is refused before its crc can be checked; a
        // header or page table that merely points elsewhere (value 9, round 17, table) is
        // reported as the corruption it is, not as a page outside memory or a wrong round.
        let mut offsets = Vec::new();
        let mut at = hello.len();
        for frame in &frames {
            let mut fixed = [0u8; FrameHeader::LEN];
            fixed.copy_from_slice(&frame[..FrameHeader::LEN]);
            let header = FrameHeader::decode(&fixed).expect("valid frame");
            for (i, checksum) in [(0, false), (9, true), (17, true), (27, false), (30, true)] {
                offsets.push((at + i, checksum));
            }
            let data = FrameHeader::LEN + header.count as usize * PageEntry::LEN;
            if header.count > 0 {
                offsets.extend([(at + FrameHeader::LEN + 1, true), (at + data - 3, true)]);
            }
            if frame.len() > data {
                offsets.extend([(at + data, true), (at + (data + frame.len()) / 2, true)]);
                offsets.push((at + frame.len() - 1, true));
            }
            at += frame.len();
        }
        for (offset, data) in offsets {
            let mut bad = whole.clone();
            bad[offset] ^= 0x04;
            let (at, run) = receiver(destination(), t);
            feed(&mut tcp(&at), &bad);
            let err = failure(run);
            if data {
                assert!(err.is_checksum(), "offset {offset}: {}", err.chain());
            }
        }
    }
}

/// A pages frame with one entry, sealed.
fn pages_frame(region: u32, first: u64, round: u32, entry: PageEntry, data: &[u8]) -> Vec<u8> {
    let len = (PageEntry::LEN + data.len()) as u32;
    let mut frame = FrameHeader::pages(region, first, round, 1, len)
        .encode()
        .to_vec();
    let mut table = [0u8; PageEntry::LEN];
    entry.write(&mut table);
    frame.extend_from_slice(&table);
    frame.extend_from_slice(data);
    seal(&mut frame);
    frame
}

fn zero_entry() -> PageEntry {
    PageEntry {
        offset: 0,
        encoding: Encoding::Zero,
        len: 0,
    }
}

#[test]
fn pages_outside_memory_or_on_the_wrong_channel_are_refused() {
    for t in &common::transports() {
        let src = source();
        let (hello, _) = valid_stream(&src, 1).remove(0);
        let err = one_channel(t, &hello, &[pages_frame(0, PAGES, 1, zero_entry(), &[])]);
        assert_names(&err, "page 256 is outside region 0 (256 pages)");
        let err = one_channel(
            t,
            &hello,
            &[pages_frame(0, u64::MAX - 1, 1, zero_entry(), &[])],
        );
        assert_names(&err, "is outside region 0");
        let err = one_channel(t, &hello, &[pages_frame(3, 0, 1, zero_entry(), &[])]);
        assert_names(&err, "region index 3 does not exist");
        let twice = pages_frame(0, 5, 1, zero_entry(), &[]);
        let err = one_channel(t, &hello, &[twice.clone(), twice]);
        assert_names(&err, "page 5 of region 0 arrived twice in round 1");
        let err = one_channel(t, &hello, &[pages_frame(0, 5, 2, zero_entry(), &[])]);
        assert_names(&err, "pages of round 2 arrived while round 1 was due");
        let err = one_channel(t, &hello, &[FrameHeader::end_of_round(1, 7)]);
        assert_names(
            &err,
            "the sender sent 7 pages in round 1 on this channel, 0 arrived",
        );

        // Two channels: page 0 belongs on channel 0.
        let stream = valid_stream(&src, 2);
        let (at, run) = receiver(destination(), t);
        let mut zero = tcp(&at);
        zero.write_all(&stream[0].0).expect("hello");
        let wrong = [stream[1].0.clone(), pages_frame(0, 0, 1, zero_entry(), &[])].concat();
        feed(&mut tcp(&at), &wrong);
        assert_names(
            &failure(run),
            "page 0 belongs on channel 0, not on channel 1",
        );
    }
}

#[test]
fn lz4_pages_must_decode_to_exactly_one_page() {
    for t in &common::transports() {
        let src = source();
        let (hello, _) = valid_stream(&src, 1).remove(0);
        for (content, needle) in [
            (vec![b'a'; 2048], "decodes to 2048 bytes"),
            (vec![b'a'; 64 * 4096], "does not decode"),
        ] {
            let block = lz4_flex::block::compress(&content);
            let entry = PageEntry {
                offset: 0,
                encoding: Encoding::Lz4,
                len: block.len() as u32,
            };
            let frames = [
                pages_frame(0, 0, 1, entry, &block),
                FrameHeader::end_of_round(1, 1),
                FrameHeader::end_of_stream(1, 1),
            ];
            assert_names(&one_channel(t, &hello, &frames), needle);
        }
    }
}

/// zstd pages are held to the same rule as lz4's: half a page, a bomb of 64 pages, a truncated
/// frame, an lz4 block declared zstd and a zstd frame declared lz4 each fail the migration,
/// naming the page.
#[test]
fn zstd_pages_must_decode_to_exactly_one_page() {
    let zstd = |content: &[u8]| zstd::bulk::compress(content, 1).expect("zstd");
    let page = zstd(&[b'z'; 4096]);
    let cases = [
        (Encoding::Zstd, zstd(&[b'a'; 2048]), "decodes to 2048 bytes"),
        (
            Encoding::Zstd,
            zstd(&vec![b'a'; 64 * 4096]),
            "does not decode",
        ),
        (
            Encoding::Zstd,
            page[..page.len() - 1].to_vec(),
            "does not decode",
        ),
        (
            Encoding::Zstd,
            lz4_flex::block::compress(&[b'z'; 4096]),
            "does not decode",
        ),
        (Encoding::Lz4, page.clone(), "lz4 page"),
    ];
    for t in &common::transports() {
        let src = source();
        let (hello, _) = valid_stream(&src, 1).remove(0);
        for (encoding, data, needle) in &cases {
            let entry = PageEntry {
                offset: 0,
                encoding: *encoding,
                len: data.len() as u32,
            };
            let frames = [
                pages_frame(0, 0, 1, entry, data),
                FrameHeader::end_of_round(1, 1),
                FrameHeader::end_of_stream(1, 1),
            ];
            let err = one_channel(t, &hello, &frames);
            assert_names(&err, needle);
            assert_names(&err, "page 0");
        }
    }
}

#[test]
fn lengths_over_their_limits_are_refused_before_allocating() {
    for t in &common::transports() {
        let src = source();
        let (hello, _) = valid_stream(&src, 1).remove(0);
        let huge = FrameHeader::pages(0, 0, 1, 1, MAX_PAYLOAD + 1)
            .encode()
            .to_vec();
        assert_names(&one_channel(t, &hello, &[huge]), "exceeds the limit");
        let mut device = FrameHeader::device_state(0, b"x");
        device[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_names(&one_channel(t, &hello, &[device]), "exceeds the limit");
        let misplaced = FrameHeader::device_state(100, b"piece");
        assert_names(
            &one_channel(t, &hello, &[misplaced]),
            "offset 100 arrived after 0 bytes",
        );
    }
}

/// A connection that says nothing is dropped as a stray after the hello timeout (and logged);
/// the accept timeout still holds, so the receiver then fails waiting for its sender. One that
/// says hello and then nothing is the sender, stopped: the migration fails.
#[test]
fn a_silent_sender_times_out() {
    for t in &common::transports() {
        // Says nothing at all.
        let (at, run, lines) = receiver_with(destination(), t, |o| {
            o.max_refused = 64;
            o.accept_timeout = Some(Duration::from_secs(2));
        });
        let quiet = tcp(&at);
        let err = failure(run);
        assert!(err.is_timeout(), "{}", err.chain());
        assert_names(&err, "waiting for the sender to connect");
        // The hand-written sender says no decision: the receiver ends in doubt, and says so.
        let lines = strays_only(lines.all());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("it sent nothing within"), "{lines:?}");
        drop(quiet);
        // Says hello, then nothing.
        let src = source();
        let (hello, _) = valid_stream(&src, 1).remove(0);
        let (at, run) = receiver(destination(), t);
        let mut stream = tcp(&at);
        stream.write_all(&hello).expect("hello");
        let err = failure(run);
        assert_names(&err, "timed out after");
        assert_names(&err, "receiving a frame header");
    }
}

#[test]
fn the_senders_error_message_reaches_the_receiver() {
    for t in &common::transports() {
        let src = source();
        let (hello, _) = valid_stream(&src, 1).remove(0);
        let err = one_channel(t, &hello, &[FrameHeader::error("guest memory went away")]);
        assert_names(&err, "the sender failed: guest memory went away");
    }
}

// ---- a misbehaving receiver against the real sender ----

/// Runs the real sender against a fake receiver `peer` on a loopback TCP listener; returns the
/// sender's error after checking its facts.
fn sender_against(
    t: &Arc<dyn Transport>,
    peer: impl FnOnce(TcpListener) + Send + 'static,
) -> Error {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = Endpoint::Tcp(listener.local_addr().expect("addr"));
    let fake = thread::spawn(move || peer(listener));
    let err = send_to(t, &at);
    fake.join().expect("fake receiver");
    err
}

/// Runs the real sender to `at`; returns its error after checking its facts.
fn send_to(t: &Arc<dyn Transport>, at: &Endpoint) -> Error {
    send_from(t, at, &source())
}

/// [`send_to`] from guest memory `src`.
fn send_from(t: &Arc<dyn Transport>, at: &Endpoint, src: &Arc<GuestMemory>) -> Error {
    let facts = Arc::new(Facts::default());
    let options = SendOptions {
        transport: Arc::clone(t),
        channels: 1,
        timeout: SHORT,
        ..SendOptions::default()
    };
    let result = Sender::connect(Arc::clone(src), at, &options, facts.sink()).and_then(|mut s| {
        s.round(&DirtySet::all(src))?;
        s.switchover()?;
        s.finish(b"")
    });
    let err = result.expect_err("the sender must fail");
    let facts = facts.all();
    match facts.as_slice() {
        [.., Fact::Failed(message), Fact::Drained] => assert_eq!(message, &err.chain()),
        other => panic!("facts {other:?} for {}", err.chain()),
    }
    err
}

fn read_hello(stream: &mut TcpStream) {
    let mut fixed = [0u8; Hello::FIXED_LEN];
    stream.read_exact(&mut fixed).expect("hello");
    let len = Hello::table_len(&fixed).expect("valid hello");
    let mut table = vec![0u8; len];
    stream.read_exact(&mut table).expect("table");
}

fn reply(stream: &mut TcpStream, verdict: Verdict) {
    stream
        .write_all(&HelloReply { verdict }.encode())
        .expect("reply");
}

/// Reads and discards until the sender closes.
fn swallow(stream: &mut TcpStream) {
    let _ = std::io::copy(stream, &mut std::io::sink());
}

#[test]
fn a_refusal_reaches_the_sender() {
    for t in &common::transports() {
        let err = sender_against(t, |listener| {
            let (mut s, _) = listener.accept().expect("accept");
            read_hello(&mut s);
            reply(&mut s, Verdict::Refuse("no room for 1 MiB".into()));
        });
        assert!(matches!(err, Error::Refused { .. }));
        assert_names(
            &err,
            "the receiver refused the connection: no room for 1 MiB",
        );
    }
}

#[test]
fn a_receiver_that_is_not_listening() {
    for t in &common::transports() {
        // A port that was just free: nothing listens there.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = Endpoint::Tcp(listener.local_addr().expect("addr"));
        drop(listener);
        let err = send_to(t, &at);
        assert!(matches!(err, Error::Connect { .. }), "{}", err.chain());
        assert_names(&err, "cannot connect to tcp:127.0.0.1:");
    }
}

/// Every transport, and io_uring with zero-copy sends (whose writers keep sending while the
/// kernel still reads their buffers) where this machine has it.
fn senders_transports() -> Vec<Arc<dyn Transport>> {
    let mut all = common::transports();
    all.extend(common::zero_copy());
    all
}

#[test]
fn a_silent_receiver_times_out() {
    for t in &senders_transports() {
        let err = sender_against(t, |listener| {
            let (mut s, _) = listener.accept().expect("accept");
            read_hello(&mut s);
            thread::sleep(SHORT * 3);
        });
        assert!(err.is_timeout(), "{}", err.chain());
        assert_names(&err, "waiting for the receiver's hello reply");
        // Accepts, takes everything, never confirms.
        let err = sender_against(t, |listener| {
            let (mut s, _) = listener.accept().expect("accept");
            read_hello(&mut s);
            reply(&mut s, Verdict::Accept);
            s.set_read_timeout(Some(SHORT * 4)).expect("timeout");
            swallow(&mut s);
        });
        assert_names(&err, "waiting for the receiver's ready");
    }
}

/// A receiver that accepts and then stops reading, its connection left open, with far more
/// to come than the sockets hold: the sender times out with the reason, whether its writers
/// wait for room in the socket or (zero-copy) for the kernel to release lent buffers, and
/// does not hang.
#[test]
fn a_receiver_that_stops_reading_times_the_sender_out() {
    for t in &senders_transports() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = Endpoint::Tcp(listener.local_addr().expect("addr"));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let fake = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            read_hello(&mut s);
            reply(&mut s, Verdict::Accept);
            // Holds the connection open, unread, until the sender gave up.
            let _ = done_rx.recv();
        });
        let err = send_from(t, &at, &guest(64 << 20, Image::Random, 5));
        let _ = done_tx.send(());
        fake.join().expect("fake receiver");
        assert!(err.is_timeout(), "{}: {}", t.name(), err.chain());
    }
}

#[test]
fn the_receivers_error_and_garbage_reach_the_sender() {
    for t in &senders_transports() {
        let err = sender_against(t, |listener| {
            let (mut s, _) = listener.accept().expect("accept");
            read_hello(&mut s);
            reply(&mut s, Verdict::Accept);
            s.write_all(&FrameHeader::error("disk on fire"))
                .expect("error frame");
            swallow(&mut s);
        });
        assert_names(&err, "the receiver failed: disk on fire");
        let err = sender_against(t, |listener| {
            let (mut s, _) = listener.accept().expect("accept");
            read_hello(&mut s);
            reply(&mut s, Verdict::Accept);
            s.write_all(&[0xEE; 32]).expect("garbage");
            swallow(&mut s);
        });
        assert_names(&err, "invalid data from the peer");
        let err = sender_against(t, |listener| {
            let (mut s, _) = listener.accept().expect("accept");
            read_hello(&mut s);
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .expect("garbage");
        });
        assert_names(&err, "not a ramjet peer: bad magic");
    }
}

// ---- guest memory that the other side of a session holds ----

/// Memory that a sender froze for its final round cannot be received into, and a sender
/// cannot freeze memory that a migration is being received into (a VM migrated into itself):
/// both fail with a clear error instead of racing on the pages.
#[test]
fn memory_held_by_another_session_is_refused() {
    for t in &common::transports() {
        let memory = source();
        let frozen = memory.freeze().expect("freeze");
        assert!(
            memory.write(0, 0, b"guest").is_err(),
            "frozen memory refuses writes"
        );
        let (_, run) = receiver(Arc::clone(&memory), t);
        let (result, facts) = run.join().expect("receiver thread");
        let err = result.expect_err("frozen memory cannot be received into");
        assert!(matches!(err, Error::MemoryInUse(_)), "{}", err.chain());
        assert_names(&err, "a sender is sending its final round from it");
        assert_eq!(facts, [Fact::Failed(err.chain()), Fact::Drained]);
        drop(frozen);
        memory.write(0, 0, b"guest").expect("writable again");

        // Migrating a guest into itself: the switchover is refused.
        let (at, run) = receiver(Arc::clone(&memory), t);
        let facts = Arc::new(Facts::default());
        let options = SendOptions {
            transport: Arc::clone(t),
            channels: 1,
            timeout: SHORT,
            ..SendOptions::default()
        };
        let mut sender =
            Sender::connect(Arc::clone(&memory), &at, &options, facts.sink()).expect("connect");
        let err = sender.switchover().expect_err("cannot freeze");
        assert!(matches!(err, Error::MemoryInUse(_)), "{}", err.chain());
        assert_names(&err, "while a migration is being received into it");
        assert!(matches!(
            facts.all().as_slice(),
            [.., Fact::Failed(_), Fact::Drained]
        ));
        assert!(!memory.is_frozen());
        let (result, _) = run.join().expect("receiver thread");
        assert_names(&result.expect_err("the sender failed"), "the sender failed");
    }
}

/// Memory that a receive session holds is the session's alone: the embedder's own reads and
/// writes of it are refused with a clear error, and so is a second receive session on it (it
/// fails at once with `failed` and `drained`, without touching the memory); once the first
/// session ends, the memory is usable again.
#[test]
fn memory_being_received_into_is_the_sessions_alone() {
    let memory = guest(PAGES * 4096, Image::Mixed, 7);
    let listener = Listener::bind(&common::endpoint(Net::Tcp)).expect("bind");
    let cancel = ramjet_dataplane::CancelHandle::new();
    let first = {
        let (memory, cancel) = (Arc::clone(&memory), cancel.clone());
        thread::spawn(move || {
            let facts = Arc::new(Facts::default());
            let options = ReceiveOptions {
                cancel,
                ..ReceiveOptions::default()
            };
            let result = receive(&listener, memory, &options, facts.sink());
            (result, facts.all())
        })
    };
    // The session holds the memory from its start, before any sender connects.
    let mut page = vec![0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match memory.write(0, 0, &page) {
            Ok(()) if std::time::Instant::now() < deadline => thread::yield_now(),
            Ok(()) => panic!("writes to memory being received into are never refused"),
            Err(e) => break e,
        }
    };
    assert!(
        refused
            .to_string()
            .contains("cannot be written while a migration is being received into it"),
        "{refused}"
    );
    let read = memory.read(0, 0, &mut page).expect_err("reads are refused");
    assert!(read.to_string().contains("cannot be read"), "{read}");
    assert!(memory.fill(0, 0, 4096, 1).is_err());
    assert!(memory.prefault().is_err());

    let (_, second) = receiver(Arc::clone(&memory), &common::transports()[0]);
    let (result, facts) = second.join().expect("second receiver");
    let err = result.expect_err("a second session is refused");
    assert!(matches!(err, Error::MemoryInUse(_)), "{}", err.chain());
    assert_names(&err, "cannot be received into twice");
    assert_eq!(facts, [Fact::Failed(err.chain()), Fact::Drained]);

    cancel.cancel();
    let (result, facts) = first.join().expect("first receiver");
    assert!(result.expect_err("cancelled").is_cancelled());
    assert_eq!(facts, [Fact::Drained]);
    memory.write(0, 0, &page).expect("the memory is free again");
    memory.read(0, 0, &mut page).expect("readable again");
}

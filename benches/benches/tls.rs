//! What TLS costs a migration, and where the receiver should decrypt. Two groups, one run:
//!
//! - `tls_migrate`: whole migrations of a paused guest (`Sender::migrate_paused`) over loopback
//!   TCP on the default transport (io_uring where the kernel allows it), plaintext and TLS 1.3,
//!   of the random and the mixed image, with 1 and 2 channels, compression off. The destination
//!   memory is prefaulted once before anything is measured (warm, as a VMM's guest RAM is when
//!   a migration arrives). Each case prints GB/s of guest RAM (decimal GB over wall time), the
//!   CPU seconds per GB that sender and receiver spent together (this process's user + system
//!   time), the negotiated cipher suite and key exchange, and the bytes sent zero-copy. Then plaintext and TLS
//!   migrations alternate, pair by pair, for a table of the medians and of the paired
//!   TLS/plaintext ratios: on a machine whose speed drifts, ratios of neighbouring runs are
//!   what can be trusted.
//! - `tls_landing`: where a received record is opened, over real loopback TCP from a writer
//!   thread that sends pre-sealed records of the record layer's size (5-byte header as AAD,
//!   16 KiB + 1 byte of content, 16-byte tag), AES-256-GCM with aws-lc-rs as the record layer
//!   uses it: (a) `read_ahead`, large reads into a 512 KiB buffer, each record opened in place
//!   there and its plaintext copied into the destination pages, as `dataplane/src/tls/record.rs`
//!   does; (a2) `read_ahead_gather`, the same reads, each record opened out of the buffer
//!   straight into the destination (the decryption is the copy); (b) `exact`, the header read,
//!   then the body read straight into the destination range, then the tag, opened in place in
//!   the destination; (b2) `exact_vectored`, as (b) but the body, the tag and the next header
//!   in one `readv`. It weighs syscalls per record against one extra copy. Each prints GB/s
//!   of plaintext, the CPU seconds per GB of the receiving thread and of the whole process,
//!   and reads per record; then the four rotate, for a table of paired medians. (a2), (b) and
//!   (b2) write a record's plaintext into the destination before its tag is checked (a failed
//!   record leaves unauthenticated bytes there), which (a) never does.
//!
//! Both tables are printed at the end of the run, together.
//!
//! Run with `cargo bench -p ramjet-benches --bench tls`: 2 GiB images, about five minutes on
//! two cores. `RAMJET_BENCH_BYTES=256M` (K, M, G suffixes, binary) makes a quick smoke run
//! (the landing group moves at most 256 MiB); `RAMJET_BENCH_ROUNDS` sets the paired
//! alternations (default 10).

use std::cell::{OnceCell, RefCell};
use std::io::{IoSliceMut, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use aws_lc_rs::aead::{self, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use criterion::{BenchmarkId, Criterion};
use memmap2::{Advice, MmapMut};
use ramjet_benches::measure::{
    self, Sample, alternate, bench, bench_bytes, configure, gb, label, load, median,
};
use ramjet_benches::migrate::migrate_with;
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::image::{self, ImageKind, Rng};
use ramjet_dataplane::testkit::pki::{Scratch, credentials};
use ramjet_dataplane::transport::{self, Transport};
use ramjet_dataplane::{Compression, ReceiveOptions, SendOptions, TlsClient, TlsServer};

/// The most the landing group moves per run.
const LANDING_BYTES_MAX: u64 = 256 << 20;
/// Paired alternations unless `RAMJET_BENCH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: usize = 10;

fn rounds() -> usize {
    measure::rounds(DEFAULT_ROUNDS)
}

// ---------------------------------------------------------------------------------------------
// tls_migrate: whole migrations, plaintext against TLS.

/// Both ends' TLS, from one throwaway credentials directory.
struct Tls {
    client: TlsClient,
    server: TlsServer,
    /// Holds the credentials until the end of the run.
    _dir: Scratch,
}

impl Tls {
    fn new() -> Tls {
        let dir = Scratch::new("ramjet-bench-tls").expect("scratch directory");
        credentials(dir.path()).expect("credentials");
        Tls {
            client: TlsClient::from_dir(dir.path()).expect("client credentials"),
            server: TlsServer::from_dir(dir.path()).expect("server credentials"),
            _dir: dir,
        }
    }
}

/// What one migration reports beyond its time.
#[derive(Debug, Clone, Default)]
struct Report {
    /// The cipher suite and key exchange the sender negotiated (`None`: plaintext).
    suite: Option<String>,
    zero_copy_bytes: u64,
}

/// One whole migration of the paused guest `src` into `dst`: switchover, every page (sent in
/// place from the frozen memory, or sealed from it under TLS), device state, confirmation.
fn migrate(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    transport: &Arc<dyn Transport>,
    channels: u16,
    tls: Option<&Tls>,
) -> Report {
    let send = SendOptions {
        channels,
        compression: Compression::Off,
        transport: Arc::clone(transport),
        tls: tls.map(|t| t.client.clone()),
        ..SendOptions::default()
    };
    let receive = ReceiveOptions {
        transport: Arc::clone(transport),
        tls: tls.map(|t| t.server.clone()),
        ..ReceiveOptions::default()
    };
    let (summary, received) = migrate_with(src, dst, "tcp:127.0.0.1:0", &send, receive);
    let name = |n: ramjet_dataplane::Negotiated| format!("{} with {}", n.suite, n.key_exchange);
    let suite = summary.tls.map(name);
    assert_eq!(suite, received.tls.map(name), "both ends name one suite");
    Report {
        suite,
        zero_copy_bytes: summary.stats.zero_copy_bytes,
    }
}

fn mode(tls: bool) -> &'static str {
    if tls { "tls" } else { "plaintext" }
}

/// Plaintext and TLS migrations of both images at 1 and 2 channels, under criterion, then
/// alternating in pairs; returns the table of paired medians (`None` if a filter left every
/// case out). The images and the destination are made on first use, so that a filter that
/// leaves them out does not pay for them.
fn migrations(c: &mut Criterion) -> Option<String> {
    let bytes = bench_bytes();
    let rounds = rounds();
    let (transport, unavailable) = transport::best();
    let transport_name = match &unavailable {
        None => "io_uring".to_owned(),
        Some(why) => format!("blocking ({why})"),
    };
    let tls = Tls::new();
    let dst = OnceCell::new();
    let dst = || {
        dst.get_or_init(|| {
            println!(
                "tls_migrate: {} guest, {transport_name} transport (the default), compression \
                 off (Compression::Auto is off on loopback too), paused guest (migrate_paused)",
                label(bytes)
            );
            let memory = GuestMemory::anonymous(bytes).expect("memory");
            memory.prefault().expect("prefault");
            println!(
                "tls_migrate: destination memory prefaulted (every page written once, \
                 MADV_POPULATE_WRITE) before measuring: warm"
            );
            Arc::new(memory)
        })
    };
    let images = [ImageKind::Random, ImageKind::Mixed].map(|kind| (kind, OnceCell::new()));
    let image = |i: usize| {
        let (kind, src) = &images[i];
        src.get_or_init(|| {
            let memory = GuestMemory::anonymous(bytes).expect("memory");
            image::fill(&memory, *kind, 7).expect("image");
            Arc::new(memory)
        })
    };
    let cases = || (0..images.len()).flat_map(|i| [1u16, 2].map(|channels| (i, channels)));

    let mut group = c.benchmark_group(format!("tls_migrate_{}", label(bytes)));
    configure(&mut group, bytes, 2.0);
    let mut ran = Vec::new();
    for (i, channels) in cases() {
        let kind = images[i].0;
        let mut any = false;
        for on in [false, true] {
            let report = RefCell::new(Report::default());
            let id = BenchmarkId::new(format!("{kind}_{}", mode(on)), channels);
            let prepare = || {
                image(i);
                dst();
            };
            let (total, count) = bench(&mut group, id, prepare, || {
                let tls = on.then_some(&tls);
                *report.borrow_mut() = migrate(image(i), dst(), &transport, channels, tls);
            });
            // Nothing ran when a filter left this benchmark out.
            if count > 0 {
                any = true;
                let report = report.into_inner();
                let moved = gb(bytes * count);
                println!(
                    "{kind}_{}/{channels}: {:.3} GB/s, {:.3} CPU-s/GB (sender and receiver \
                     together), suite {}, {} bytes zero-copy (mean of {count} migrations)",
                    mode(on),
                    moved / total.seconds,
                    total.cpu / moved,
                    report.suite.as_deref().unwrap_or("none (plaintext)"),
                    report.zero_copy_bytes,
                );
            }
        }
        if any {
            ran.push((i, channels));
        }
    }
    group.finish();
    if ran.is_empty() {
        return None;
    }

    println!("tls_migrate: {rounds} rounds of plaintext and TLS in alternation per case");
    let mut rows = Vec::new();
    let mut suites = Vec::new();
    for (i, channels) in ran {
        // Case 0 is plaintext, case 1 TLS.
        let samples = alternate(rounds, 2, &mut |case| {
            let tls = (case == 1).then_some(&tls);
            let report = migrate(image(i), dst(), &transport, channels, tls);
            suites.extend(report.suite);
        });
        rows.push(PairedRow::new(images[i].0, channels, gb(bytes), &samples));
    }
    suites.sort();
    suites.dedup();
    let mut table = format!(
        "tls_migrate paired medians: {} guest, {rounds} alternations of plaintext and TLS per \
         row, {transport_name} transport, compression off, warm destination; GB/s = guest RAM \
         / wall time; CPU-s/GB = process user+system, both ends; TLS suite {}\n",
        label(bytes),
        suites.join(", ")
    );
    table += &format!(
        "{:<7} {:>3} | {:>10} {:>10} {:>9} | {:>12} {:>11} {:>9}\n",
        "image",
        "ch",
        "plain GB/s",
        "TLS GB/s",
        "TLS/plain",
        "plain CPU/GB",
        "TLS CPU/GB",
        "TLS/plain"
    );
    for row in &rows {
        table += &format!("{row}\n");
    }
    table += "(TLS/plain: the median over rounds of each round's ratio; throughput, then \
              CPU-s/GB)\n";
    Some(table)
}

/// One line of the paired table.
struct PairedRow {
    kind: ImageKind,
    channels: u16,
    plain_rate: f64,
    tls_rate: f64,
    rate_ratio: f64,
    plain_cpu: f64,
    tls_cpu: f64,
    cpu_ratio: f64,
}

impl PairedRow {
    /// From `samples[0]` (plaintext) and `samples[1]` (TLS), each run moving `gb` GB.
    fn new(kind: ImageKind, channels: u16, gb: f64, samples: &[Vec<Sample>]) -> PairedRow {
        let [plain, tls] = samples else {
            unreachable!("two cases");
        };
        let rate = |s: &[Sample]| median(s.iter().map(|s| gb / s.seconds).collect());
        let cpu = |s: &[Sample]| median(s.iter().map(|s| s.cpu / gb).collect());
        let pairs = || plain.iter().zip(tls);
        PairedRow {
            kind,
            channels,
            plain_rate: rate(plain),
            tls_rate: rate(tls),
            rate_ratio: median(pairs().map(|(p, t)| p.seconds / t.seconds).collect()),
            plain_cpu: cpu(plain),
            tls_cpu: cpu(tls),
            cpu_ratio: median(pairs().map(|(p, t)| t.cpu / p.cpu).collect()),
        }
    }
}

impl std::fmt::Display for PairedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<7} {:>3} | {:>10.3} {:>10.3} {:>8.3}x | {:>12.3} {:>11.3} {:>8.3}x",
            self.kind.to_string(),
            self.channels,
            self.plain_rate,
            self.tls_rate,
            self.rate_ratio,
            self.plain_cpu,
            self.tls_cpu,
            self.cpu_ratio,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// tls_landing: where the receiver opens a record.

/// Content per record: a full TLS fragment.
const CONTENT: usize = 1 << 14;
/// The sealed part of a record: the content and its inner content type.
const INNER: usize = CONTENT + 1;
const HEADER: usize = 5;
const TAG: usize = aead::MAX_TAG_LEN;
/// A record on the wire.
const RECORD: usize = HEADER + INNER + TAG;
/// What the read-ahead variant reads into, as the record layer's `READ_AHEAD`.
const READ_AHEAD: usize = 512 << 10;
/// The writer's send size: about the 64 records the record layer seals per write.
const WRITE: usize = 1 << 20;
/// TLS's `application_data` content type.
const APPLICATION_DATA: u8 = 23;

/// The record header every record carries: application data, TLS 1.2 on the wire, the length.
fn record_header() -> [u8; HEADER] {
    let [hi, lo] = u16::try_from(INNER + TAG).expect("fits").to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

/// RFC 8446 §5.3: the IV XOR the record's sequence number.
fn nonce(iv: &[u8; aead::NONCE_LEN], seq: u64) -> Nonce {
    let mut nonce = *iv;
    for (byte, s) in nonce[aead::NONCE_LEN - 8..]
        .iter_mut()
        .zip(seq.to_be_bytes())
    {
        *byte ^= s;
    }
    Nonce::assume_unique_for_key(nonce)
}

/// A stream of records sealed once, and what they hold.
struct Stream {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    /// The records as the writer sends them.
    wire: Vec<u8>,
    /// Their content, in order.
    plaintext: Vec<u8>,
    records: usize,
}

impl Stream {
    fn new(bytes: usize) -> Stream {
        let records = bytes / CONTENT;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x5a; 32]).expect("key"));
        let iv = [0xa5; aead::NONCE_LEN];
        let mut plaintext = vec![0u8; records * CONTENT];
        Rng::new(3).fill(&mut plaintext);
        let mut wire = Vec::with_capacity(records * RECORD);
        let header = record_header();
        for (seq, content) in plaintext.chunks_exact(CONTENT).enumerate() {
            wire.extend_from_slice(&header);
            let start = wire.len();
            wire.extend_from_slice(content);
            wire.push(APPLICATION_DATA);
            let tag = key
                .seal_in_place_separate_tag(
                    nonce(&iv, seq as u64),
                    Aad::from(header),
                    &mut wire[start..],
                )
                .expect("seal");
            wire.extend_from_slice(tag.as_ref());
        }
        Stream {
            key,
            iv,
            wire,
            plaintext,
            records,
        }
    }

    fn bytes(&self) -> u64 {
        (self.records * CONTENT) as u64
    }

    /// Checks a record's header and opens its sealed part `inner` (content and type) in place
    /// under `tag`.
    fn open(&self, seq: usize, header: [u8; HEADER], tag: [u8; TAG], inner: &mut [u8]) {
        assert_eq!(header, record_header(), "record {seq}'s header");
        let opened = self
            .key
            .open_in_place_separate_tag(nonce(&self.iv, seq as u64), Aad::from(header), &tag, inner)
            .expect("the record opens");
        assert_eq!(opened[CONTENT], APPLICATION_DATA, "record {seq}'s type");
    }

    /// Checks a record's header and opens its sealed part `inner` under `tag` into `out`
    /// (as long as `inner`).
    fn open_into(
        &self,
        seq: usize,
        header: [u8; HEADER],
        inner: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) {
        assert_eq!(header, record_header(), "record {seq}'s header");
        self.key
            .open_separate_gather(
                nonce(&self.iv, seq as u64),
                Aad::from(header),
                inner,
                tag,
                out,
            )
            .expect("the record opens");
        assert_eq!(out[CONTENT], APPLICATION_DATA, "record {seq}'s type");
    }
}

/// A socket that counts its reads (syscalls).
struct Counted {
    stream: TcpStream,
    reads: u64,
}

impl Counted {
    fn read_some(&mut self, buf: &mut [u8]) -> usize {
        self.reads += 1;
        let n = self.stream.read(buf).expect("read");
        assert!(n > 0, "the writer closed early");
        n
    }

    fn read_full(&mut self, mut buf: &mut [u8]) {
        while !buf.is_empty() {
            let n = self.read_some(buf);
            buf = &mut buf[n..];
        }
    }

    fn read_full_vectored(&mut self, mut bufs: &mut [IoSliceMut<'_>]) {
        while !bufs.is_empty() {
            self.reads += 1;
            let n = self.stream.read_vectored(bufs).expect("readv");
            assert!(n > 0, "the writer closed early");
            IoSliceMut::advance_slices(&mut bufs, n);
        }
    }
}

/// (a) Large reads into `pool`; each record opened in place there, its content copied into
/// its pages of `dst`.
fn land_read_ahead(stream: &Stream, socket: &mut Counted, pool: &mut [u8], dst: &mut [u8]) {
    let (mut start, mut end) = (0, 0);
    for (seq, pages) in dst.chunks_exact_mut(CONTENT).enumerate() {
        while end - start < RECORD {
            if pool.len() - start < RECORD {
                // Move the partial record to the front: what is before it was copied out.
                pool.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            end += socket.read_some(&mut pool[end..]);
        }
        let record = &mut pool[start..start + RECORD];
        let (header, rest) = record.split_at_mut(HEADER);
        let (inner, tag) = rest.split_at_mut(INNER);
        let header = <[u8; HEADER]>::try_from(&*header).expect("5 bytes");
        let tag = <[u8; TAG]>::try_from(&*tag).expect("16 bytes");
        stream.open(seq, header, tag, inner);
        pages.copy_from_slice(&inner[..CONTENT]);
        start += RECORD;
    }
}

/// (a2) As (a), but each record opened out of `pool` straight into its pages of `dst`: the
/// decryption is the copy. Its type byte lands on the first byte after them, as in (b).
fn land_read_ahead_gather(stream: &Stream, socket: &mut Counted, pool: &mut [u8], dst: &mut [u8]) {
    let (mut start, mut end) = (0, 0);
    for seq in 0..stream.records {
        while end - start < RECORD {
            if pool.len() - start < RECORD {
                pool.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            end += socket.read_some(&mut pool[end..]);
        }
        let record = &pool[start..start + RECORD];
        let (header, rest) = record.split_at(HEADER);
        let (inner, tag) = rest.split_at(INNER);
        let header = <[u8; HEADER]>::try_from(header).expect("5 bytes");
        let out = &mut dst[seq * CONTENT..seq * CONTENT + INNER];
        stream.open_into(seq, header, inner, tag, out);
        start += RECORD;
    }
}

/// (b) Exact reads: the header, then the sealed part straight into the record's pages of
/// `dst` (its type byte onto the first byte after them, which the next record's pages
/// overwrite: `dst` has one spare byte at the end), then the tag; opened in place in `dst`.
fn land_exact(stream: &Stream, socket: &mut Counted, dst: &mut [u8]) {
    let (mut header, mut tag) = ([0u8; HEADER], [0u8; TAG]);
    for seq in 0..stream.records {
        let inner = &mut dst[seq * CONTENT..seq * CONTENT + INNER];
        socket.read_full(&mut header);
        socket.read_full(inner);
        socket.read_full(&mut tag);
        stream.open(seq, header, tag, inner);
    }
}

/// (b2) As (b), but the sealed part, the tag and the next record's header in one `readv`.
fn land_exact_vectored(stream: &Stream, socket: &mut Counted, dst: &mut [u8]) {
    let (mut header, mut tag, mut next) = ([0u8; HEADER], [0u8; TAG], [0u8; HEADER]);
    socket.read_full(&mut header);
    for seq in 0..stream.records {
        let inner = &mut dst[seq * CONTENT..seq * CONTENT + INNER];
        let last = seq + 1 == stream.records;
        let mut bufs = [
            IoSliceMut::new(inner),
            IoSliceMut::new(&mut tag),
            IoSliceMut::new(if last { &mut [] } else { &mut next }),
        ];
        socket.read_full_vectored(&mut bufs);
        stream.open(seq, header, tag, inner);
        header = next;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    ReadAhead,
    ReadAheadGather,
    Exact,
    ExactVectored,
}

impl Landing {
    const ALL: [Landing; 4] = [
        Landing::ReadAhead,
        Landing::ReadAheadGather,
        Landing::Exact,
        Landing::ExactVectored,
    ];

    fn name(self) -> &'static str {
        match self {
            Landing::ReadAhead => "read_ahead",
            Landing::ReadAheadGather => "read_ahead_gather",
            Landing::Exact => "exact",
            Landing::ExactVectored => "exact_vectored",
        }
    }
}

/// Receives the whole of `stream` once from a writer thread over a new loopback TCP
/// connection, landing it in `dst` the `landing` way, on this thread; returns the reads it
/// took.
fn land(
    landing: Landing,
    listener: &TcpListener,
    stream: &Stream,
    pool: &mut [u8],
    dst: &mut [u8],
) -> u64 {
    let addr = listener.local_addr().expect("address");
    thread::scope(|scope| {
        scope.spawn(|| {
            let mut socket = TcpStream::connect(addr).expect("connect");
            for chunk in stream.wire.chunks(WRITE) {
                socket.write_all(chunk).expect("write");
            }
        });
        let (socket, _) = listener.accept().expect("accept");
        let mut socket = Counted {
            stream: socket,
            reads: 0,
        };
        match landing {
            Landing::ReadAhead => land_read_ahead(stream, &mut socket, pool, dst),
            Landing::ReadAheadGather => land_read_ahead_gather(stream, &mut socket, pool, dst),
            Landing::Exact => land_exact(stream, &mut socket, dst),
            Landing::ExactVectored => land_exact_vectored(stream, &mut socket, dst),
        }
        socket.reads
    })
}

/// The four landings under criterion, then alternating; returns the table of paired medians
/// (`None` if a filter left every landing out).
fn landing(c: &mut Criterion) -> Option<String> {
    let bytes = bench_bytes().min(LANDING_BYTES_MAX);
    let rounds = rounds();
    let stream = Stream::new(usize::try_from(bytes).expect("64-bit"));
    let bytes = stream.bytes();
    let records = stream.records as f64;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut pool = vec![0u8; READ_AHEAD];
    // The destination pages and one spare byte, in huge pages where the kernel gives them,
    // as guest RAM is.
    let mut dst = MmapMut::map_anon(stream.records * CONTENT + 1).expect("map");
    dst.advise(Advice::HugePage).expect("madvise");
    println!(
        "tls_landing: {} records of {CONTENT} + 1 bytes sealed with AES-256-GCM (aws-lc-rs; {} plaintext), \
         sent over loopback TCP in {} KiB writes",
        stream.records,
        label(bytes),
        WRITE >> 10,
    );
    // Each landing once, unmeasured, into a destination of other bytes (which faults every
    // page in: warm from here on): it must end up holding the plaintext.
    let mut reads = [0u64; Landing::ALL.len()];
    for (i, way) in Landing::ALL.into_iter().enumerate() {
        dst.fill(0xee);
        reads[i] = land(way, &listener, &stream, &mut pool, &mut dst);
        assert!(
            dst[..stream.plaintext.len()] == stream.plaintext[..],
            "{} lands the plaintext",
            way.name()
        );
    }
    println!(
        "tls_landing: destination filled once and every landing checked before measuring \
         (warm)"
    );

    let mut group = c.benchmark_group(format!("tls_landing_{}", label(bytes)));
    configure(&mut group, bytes, 1.5);
    let mut any = false;
    for (i, way) in Landing::ALL.into_iter().enumerate() {
        let id = BenchmarkId::from_parameter(way.name());
        let (total, count) = bench(
            &mut group,
            id,
            || {},
            || {
                reads[i] = land(way, &listener, &stream, &mut pool, &mut dst);
            },
        );
        if count > 0 {
            any = true;
            let moved = gb(bytes * count);
            println!(
                "{}: {:.3} GB/s, {:.3} CPU-s/GB receiving thread, {:.3} CPU-s/GB process \
                 (writer included), {:.2} reads/record (mean of {count} runs)",
                way.name(),
                moved / total.seconds,
                total.thread_cpu / moved,
                total.cpu / moved,
                reads[i] as f64 / records,
            );
        }
    }
    group.finish();
    if !any {
        return None;
    }

    println!("tls_landing: {rounds} rounds of the four landings in rotation");
    let mut paired_reads = vec![Vec::with_capacity(rounds); Landing::ALL.len()];
    let samples = alternate(rounds, Landing::ALL.len(), &mut |i| {
        let n = land(Landing::ALL[i], &listener, &stream, &mut pool, &mut dst);
        paired_reads[i].push(n as f64 / records);
    });
    let gb = gb(bytes);
    let mut table = format!(
        "tls_landing paired medians: {} per run, {rounds} rotations; GB/s = plaintext / wall \
         time; CPU-s/GB of the receiving thread, and of the process (writer included); vs (a): \
         the median of per-round ratios against read_ahead\n",
        label(bytes)
    );
    table += &format!(
        "{:<17} | {:>7} {:>8} | {:>11} {:>8} | {:>11} | {:>12}\n",
        "landing", "GB/s", "vs (a)", "recv CPU/GB", "vs (a)", "proc CPU/GB", "reads/record"
    );
    for (i, way) in Landing::ALL.into_iter().enumerate() {
        let mine = &samples[i];
        let pairs = || mine.iter().zip(&samples[0]);
        table += &format!(
            "{:<17} | {:>7.3} {:>7.3}x | {:>11.3} {:>7.3}x | {:>11.3} | {:>12.2}\n",
            way.name(),
            median(mine.iter().map(|s| gb / s.seconds).collect()),
            median(pairs().map(|(m, a)| a.seconds / m.seconds).collect()),
            median(mine.iter().map(|s| s.thread_cpu / gb).collect()),
            median(pairs().map(|(m, a)| m.thread_cpu / a.thread_cpu).collect()),
            median(mine.iter().map(|s| s.cpu / gb).collect()),
            median(paired_reads[i].clone()),
        );
    }
    table += "(vs (a): throughput ratio, above 1 is faster; CPU ratio, below 1 is cheaper)\n";
    Some(table)
}

/// Both groups, then their tables of paired medians together at the end, with the load before
/// and after: figures from a busy machine are not figures.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let before = load();
    println!("tls bench: {before}");
    let tables = [migrations(&mut criterion), landing(&mut criterion)];
    criterion.final_summary();
    for table in tables.into_iter().flatten() {
        println!();
        print!("{table}");
    }
    println!();
    println!("tls bench: {before} at the start, {} at the end", load());
}

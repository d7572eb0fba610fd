//! Compression across a real slow link: migrations of a paused guest holding the mixed image
//! (50 % zero, 25 % text-like, 25 % random pages) from one network namespace to another over a
//! veth pair shaped by the kernel's `tbf` (`testkit::netns`), at 250 MB/s, at 1 GB/s and
//! unshaped, with each page codec: off, lz4, zstd and auto. Sender and receiver are threads of
//! this process, sharing the machine's cores; the destination memory is prefaulted once before
//! anything is measured.
//!
//! For each link speed the four codecs, and `off` once more as a control, alternate round by
//! round (each goes first equally often); the table gives each codec's medians of guest-RAM
//! throughput (GB of guest RAM over wall time), CPU seconds per GB (the process: both ends),
//! the bytes on the wire, and its throughput as a median of per-round ratios against `off` in
//! the same round, with their range. The control's ratios show how far apart two runs of the
//! same codec come out on this machine: a codec's ratio within them is no difference.
//!
//! Run with `cargo bench -p ramjet-benches --bench shaped` (as root: it makes network
//! namespaces; it says so and stops where it cannot). `RAMJET_BENCH_BYTES` sets the guest size
//! (default 2 GiB: at 1 GB/s a smaller guest moves in under half a second, where the first
//! tens of milliseconds, which `auto` spends measuring, weigh too much), `RAMJET_BENCH_ROUNDS`
//! the alternations (default 3), `RAMJET_BENCH_LINKS` the link speeds (by name,
//! comma-separated: `250 MB/s,1 GB/s,unshaped`), `RAMJET_BENCH_CODECS` the codecs besides
//! `off`, which always runs as the baseline (comma-separated: `lz4,zstd,auto`), and
//! `RAMJET_BENCH_LOG=1` prints the sender's log lines (`auto`'s decisions) on stderr.

use std::cell::RefCell;
use std::sync::Arc;
use std::thread;

use ramjet_benches::measure::{Sample, alternate, gb, label, load, median, parse_bytes, rounds};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::testkit::netns::{Link, Side};
use ramjet_dataplane::{
    Compression, Log, PreSwitchover, ReceiveOptions, SendOptions, Sender, Summary, receive,
};

const DEFAULT_BYTES: u64 = 2 << 30;
const CODECS: [Compression; 4] = [
    Compression::Off,
    Compression::Lz4,
    Compression::Zstd,
    Compression::Auto,
];
const CHANNELS: u16 = 2;

/// One migration of `src` into `dst` across `link` with `compression`; returns the sender's
/// summary.
fn migrate(
    link: &Link,
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    compression: Compression,
) -> Summary {
    let listener = link.listen().expect("listen on the link");
    let at = listener.endpoint().clone();
    let dst = Arc::clone(dst);
    let receiver = thread::spawn(move || {
        receive(&listener, dst, &ReceiveOptions::default(), Arc::new(|_| {})).expect("receive")
    });
    let src = Arc::clone(src);
    let mut options = SendOptions {
        channels: CHANNELS,
        compression,
        ..SendOptions::default()
    };
    if std::env::var_os("RAMJET_BENCH_LOG").is_some() {
        options.log = Log::new(|line| eprintln!("ramjet: {line}"));
    }
    let summary = link
        .spawn(Side::Sender, move || {
            Sender::connect(src, &at, &options, Arc::new(|_| {}))
                .expect("connect")
                .migrate_paused(&[0u8; 4096], PreSwitchover::Skip)
                .expect("migrate")
        })
        .join()
        .expect("sender thread")
        .expect("enter the sender's namespace");
    let received = receiver.join().expect("receiver thread");
    assert!(received.handover.may_run());
    summary
}

fn main() {
    // `cargo bench` passes criterion's flags (`--bench`); this bench takes none.
    let link = match Link::new() {
        Ok(link) => link,
        Err(why) => {
            println!("shaped bench skipped: {why}");
            return;
        }
    };
    let bytes = std::env::var("RAMJET_BENCH_BYTES")
        .ok()
        .and_then(|t| parse_bytes(&t))
        .unwrap_or(DEFAULT_BYTES)
        / 4096
        * 4096;
    let rounds = rounds(3);
    // (row name, codec): the codecs asked for, off first, and off once more as a control.
    let mut codecs: Vec<(String, Compression)> = CODECS
        .into_iter()
        .filter(|codec| {
            *codec == Compression::Off
                || std::env::var("RAMJET_BENCH_CODECS")
                    .map_or(true, |only| only.split(',').any(|n| n == codec.to_string()))
        })
        .map(|codec| (codec.to_string(), codec))
        .collect();
    codecs.push(("off*".into(), Compression::Off));
    let src = Arc::new(GuestMemory::anonymous(bytes).expect("memory"));
    image::fill(&src, ImageKind::Mixed, 7).expect("image");
    let dst = Arc::new(GuestMemory::anonymous(bytes).expect("memory"));
    // Prefaulted: every page touched once before anything is measured.
    dst.fill(0, 0, usize::try_from(bytes).expect("64-bit"), 0xA5)
        .expect("prefault");
    println!("shaped bench: {}", load());
    let mut tables = Vec::new();
    for (name, rate) in [
        ("250 MB/s", Some(250_000_000u64)),
        ("1 GB/s", Some(1_000_000_000)),
        ("unshaped", None),
    ]
    .into_iter()
    .filter(|(name, _)| {
        std::env::var("RAMJET_BENCH_LINKS").map_or(true, |only| only.split(',').any(|n| n == *name))
    }) {
        link.shape(rate).expect("shape");
        let wire = RefCell::new(vec![Vec::new(); codecs.len()]);
        let pages = RefCell::new(vec![(0u64, 0u64); codecs.len()]);
        let samples = alternate(rounds, codecs.len(), &mut |i| {
            let summary = migrate(&link, &src, &dst, codecs[i].1);
            wire.borrow_mut()[i].push(summary.stats.wire_bytes as f64);
            pages.borrow_mut()[i] = (summary.stats.pages_lz4, summary.stats.pages_zstd);
        });
        let wire = wire.into_inner();
        let pages = pages.into_inner();
        let mut table = format!(
            "{name}: {} mixed guest, {CHANNELS} channels, {rounds} alternations, prefaulted \
             destination; GB/s = guest RAM / wall time; CPU-s/GB = process user+system, both \
             ends; x off = median of per-round speed ratios against off (their range); off* = \
             off again, a control: how far apart two runs of the same codec come out\n\
             codec |   GB/s  CPU-s/GB |   wire MB  x off (range)     | lz4 pages  zstd pages \
             (last run)\n",
            label(bytes)
        );
        for (i, (row, _)) in codecs.iter().enumerate() {
            let speed: Vec<f64> = samples[i].iter().map(|s| gb(bytes) / s.seconds).collect();
            let cpu: Vec<f64> = samples[i]
                .iter()
                .map(|s: &Sample| s.cpu / gb(bytes))
                .collect();
            let ratio: Vec<f64> = samples[i]
                .iter()
                .zip(&samples[0])
                .map(|(s, off)| off.seconds / s.seconds)
                .collect();
            let (low, high) = ratio.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
                (lo.min(r), hi.max(r))
            });
            table += &format!(
                "{:>5} | {:>6.3} {:>9.3} | {:>9.1} {:>5.3}x ({:.2}-{:.2}) | {:>9} {:>11}\n",
                row,
                median(speed),
                median(cpu),
                median(wire[i].clone()) / 1e6,
                median(ratio.clone()),
                low,
                high,
                pages[i].0,
                pages[i].1,
            );
        }
        print!("{table}");
        tables.push(table);
    }
    println!("\nshaped bench, all tables ({}):", load());
    for table in tables {
        print!("{table}");
    }
}

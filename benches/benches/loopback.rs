//! End to end over loopback TCP and over a Unix socket: ramjet on both transports against plain
//! socket copies of the same bytes, all in one run. Two groups:
//!
//! - `loopback_tcp`: ramjet (io_uring and blocking transports, random and mixed images, 1 and
//!   2 channels) against plain copies over as many TCP streams (blocking `write_all`/
//!   `read_exact`, and io_uring `Send`, in 1 MiB chunks).
//! - `loopback_unix`: the same migrations over a Unix socket endpoint (`unix:/path`), against
//!   plain copies over as many Unix socket streams (blocking `write_all`/`read_exact` in 1 MiB
//!   chunks between two mappings).
//!
//! Every migration is of a paused guest (`Sender::migrate_paused`, crc on, `Compression::Auto`,
//! which is off to a local peer). The destinations (the plain copies' mapping and ramjet's guest
//! memory) are written once before anything is measured: warm, as a VMM's guest RAM is when a
//! migration arrives. Each benchmark prints GB/s of guest RAM (decimal GB over wall time) and
//! the CPU seconds per GB that sender and receiver spent together (this process's user + system
//! time). Then, per group, image and channel count, the baseline and ramjet on both transports
//! alternate, for a table of medians and of paired ratios against the baseline: on a machine
//! whose speed drifts by tens of percent within minutes, ratios of neighbouring runs are what
//! can be trusted.
//!
//! Run with `cargo bench -p ramjet-benches --bench loopback` (2 GiB; `-- loopback_unix` for
//! one group). `RAMJET_BENCH_BYTES=256M` makes a quick run; `RAMJET_BENCH_ROUNDS` sets the
//! paired alternations (default 8).

use std::cell::{OnceCell, RefCell};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion};
use memmap2::MmapMut;
use ramjet_benches::measure::{
    self, Sample, alternate, bench, bench_bytes, configure, gb, label, load, median,
};
use ramjet_benches::migrate::migrate;
use ramjet_benches::raw::{Raw, RawListener, raw_copy};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::image::{self, ImageKind, Rng};
use ramjet_dataplane::transport::{Blocking, Transport, Uring};

/// Paired alternations unless `RAMJET_BENCH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: usize = 8;

/// Which sockets a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Tcp,
    Unix,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Tcp => "tcp",
            Family::Unix => "unix",
        }
    }

    /// A listener for the plain copies.
    fn raw_listener(self) -> RawListener {
        match self {
            Family::Tcp => RawListener::tcp(),
            Family::Unix => RawListener::unix(Family::path("raw")),
        }
    }

    /// A socket path of this process for `what` (Unix).
    fn path(what: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ramjet-bench-{}-{what}.sock", std::process::id()))
    }
}

/// Where a migration over `family` connects.
fn endpoint(family: Family) -> String {
    match family {
        Family::Tcp => "tcp:127.0.0.1:0".to_owned(),
        Family::Unix => format!("unix:{}", Family::path("migrate").display()),
    }
}

/// What the groups share, each made on first use, so that a filter that leaves a group out
/// does not pay for it: the plain copies' source (random bytes) and prefaulted destination,
/// ramjet's two images and its prefaulted destination.
struct Fixture {
    bytes: u64,
    src: OnceCell<MmapMut>,
    dst: OnceCell<RefCell<MmapMut>>,
    guest_dst: OnceCell<Arc<GuestMemory>>,
    images: [(ImageKind, OnceCell<Arc<GuestMemory>>); 2],
    transports: [(&'static str, Arc<dyn Transport>); 2],
}

impl Fixture {
    fn new(bytes: u64) -> Fixture {
        Fixture {
            bytes,
            src: OnceCell::new(),
            dst: OnceCell::new(),
            guest_dst: OnceCell::new(),
            images: [ImageKind::Random, ImageKind::Mixed].map(|kind| (kind, OnceCell::new())),
            transports: [
                ("uring", Arc::new(Uring::default())),
                ("blocking", Arc::new(Blocking)),
            ],
        }
    }

    fn len(&self) -> usize {
        usize::try_from(self.bytes).expect("64-bit")
    }

    fn src(&self) -> &[u8] {
        self.src.get_or_init(|| {
            let mut src = MmapMut::map_anon(self.len()).expect("map");
            Rng::new(1).fill(&mut src);
            src
        })
    }

    fn dst(&self) -> &RefCell<MmapMut> {
        self.dst.get_or_init(|| {
            let mut dst = MmapMut::map_anon(self.len()).expect("map");
            dst.fill(1);
            RefCell::new(dst)
        })
    }

    fn raw(&self, listener: &RawListener, streams: u16, how: Raw) {
        let src = self.src();
        raw_copy(
            listener,
            src,
            &mut self.dst().borrow_mut(),
            usize::from(streams),
            how,
        );
    }

    fn guest_dst(&self) -> &Arc<GuestMemory> {
        self.guest_dst.get_or_init(|| {
            let memory = GuestMemory::anonymous(self.bytes).expect("memory");
            memory.prefault().expect("prefault");
            Arc::new(memory)
        })
    }

    fn image(&self, i: usize) -> &Arc<GuestMemory> {
        let (kind, src) = &self.images[i];
        src.get_or_init(|| {
            let memory = GuestMemory::anonymous(self.bytes).expect("memory");
            image::fill(&memory, *kind, 7).expect("image");
            Arc::new(memory)
        })
    }

    fn migrate(&self, image: usize, transport: usize, channels: u16, family: Family) {
        let transport = &self.transports[transport].1;
        migrate(
            self.image(image),
            self.guest_dst(),
            transport,
            channels,
            &endpoint(family),
        );
    }
}

/// Prints one benchmark's figures, if it ran.
fn report(family: Family, name: &str, streams: u16, bytes: u64, (total, count): (Sample, u64)) {
    if count > 0 {
        let moved = gb(bytes * count);
        println!(
            "{}/{name}/{streams}: {:.3} GB/s, {:.3} CPU-s/GB (sender and receiver together, \
             mean of {count} runs)",
            family.name(),
            moved / total.seconds,
            total.cpu / moved,
        );
    }
}

/// One group: the baselines and ramjet per channel count under criterion, then, for each image
/// and channel count that ran, the reference baseline and ramjet on both transports in
/// alternation; returns the table of paired medians (`None` if a filter left everything out).
fn group(c: &mut Criterion, fixture: &Fixture, family: Family) -> Option<String> {
    let bytes = fixture.bytes;
    let listener = family.raw_listener();
    let baselines: &[Raw] = match family {
        Family::Tcp => &[Raw::WriteRead, Raw::UringSend],
        Family::Unix => &[Raw::WriteRead],
    };
    // The baseline each image's runs alternate with.
    let reference = match family {
        Family::Tcp => Raw::UringSend,
        Family::Unix => Raw::WriteRead,
    };
    let mut group = c.benchmark_group(format!("loopback_{}_{}", family.name(), label(bytes)));
    configure(&mut group, bytes, 3.0);
    let mut ran = Vec::new();
    for streams in [1u16, 2] {
        for &how in baselines {
            let id = BenchmarkId::new(how.name(), streams);
            let prepare = || {
                fixture.src();
                fixture.dst();
            };
            let totals = bench(&mut group, id, prepare, || {
                fixture.raw(&listener, streams, how);
            });
            report(family, how.name(), streams, bytes, totals);
        }
        for (i, (kind, _)) in fixture.images.iter().enumerate() {
            let mut any = false;
            for (t, (transport, _)) in fixture.transports.iter().enumerate() {
                let name = format!("ramjet_{kind}_{transport}");
                let id = BenchmarkId::new(&name, streams);
                let prepare = || {
                    fixture.image(i);
                    fixture.guest_dst();
                };
                let totals = bench(&mut group, id, prepare, || {
                    fixture.migrate(i, t, streams, family);
                });
                any |= totals.1 > 0;
                report(family, &name, streams, bytes, totals);
            }
            if any {
                ran.push((i, streams));
            }
        }
    }
    group.finish();
    if ran.is_empty() {
        return None;
    }

    let rounds = measure::rounds(DEFAULT_ROUNDS);
    let mut table = format!(
        "loopback_{} paired medians: {} per run, {rounds} alternations per row of {} and \
         ramjet (blocking, uring); warm destinations; crc on; GB/s = guest RAM / wall time; \
         CPU-s/GB = process user+system, both ends; x = median of per-round ratios against \
         the baseline (speed: above 1 is faster; CPU: below 1 is cheaper)\n",
        family.name(),
        label(bytes),
        reference.name(),
    );
    let _ = writeln!(
        table,
        "{:<7} {:>3} | {:>9} {:>9} | {:>9} {:>9} {:>7} {:>9} | {:>9} {:>9} {:>7} {:>9}",
        "image",
        "ch",
        "base GB/s",
        "CPU-s/GB",
        "blk GB/s",
        "CPU-s/GB",
        "x speed",
        "x CPU",
        "uring GB/s",
        "CPU-s/GB",
        "x speed",
        "x CPU",
    );
    for (i, streams) in ran {
        // Made before anything is measured (a filter may have left their benches out).
        fixture.src();
        fixture.dst();
        fixture.image(i);
        fixture.guest_dst();
        // Case 0 is the baseline, 1 ramjet blocking, 2 ramjet on io_uring.
        let samples = alternate(rounds, 3, &mut |case| match case {
            0 => fixture.raw(&listener, streams, reference),
            1 => fixture.migrate(i, 1, streams, family),
            _ => fixture.migrate(i, 0, streams, family),
        });
        let moved = gb(bytes);
        let rate = |s: &[Sample]| median(s.iter().map(|s| moved / s.seconds).collect());
        let cpu = |s: &[Sample]| median(s.iter().map(|s| s.cpu / moved).collect());
        let base = &samples[0];
        let ratios = |s: &[Sample]| {
            let pairs = || s.iter().zip(base);
            (
                median(pairs().map(|(r, b)| b.seconds / r.seconds).collect()),
                median(pairs().map(|(r, b)| r.cpu / b.cpu).collect()),
            )
        };
        let (blocking, uring) = (&samples[1], &samples[2]);
        let (b_speed, b_cpu) = ratios(blocking);
        let (u_speed, u_cpu) = ratios(uring);
        let _ = writeln!(
            table,
            "{:<7} {:>3} | {:>9.3} {:>9.3} | {:>9.3} {:>9.3} {:>6.3}x {:>8.3}x | {:>9.3} \
             {:>9.3} {:>6.3}x {:>8.3}x",
            fixture.images[i].0.to_string(),
            streams,
            rate(base),
            cpu(base),
            rate(blocking),
            cpu(blocking),
            b_speed,
            b_cpu,
            rate(uring),
            cpu(uring),
            u_speed,
            u_cpu,
        );
    }
    Some(table)
}

/// Both groups, then their tables of paired medians together at the end, with the load before
/// and after: figures from a busy machine are not figures.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let before = load();
    println!("loopback bench: {before}");
    let fixture = Fixture::new(bench_bytes());
    let tables = [Family::Tcp, Family::Unix].map(|family| group(&mut criterion, &fixture, family));
    criterion.final_summary();
    for table in tables.into_iter().flatten() {
        println!();
        print!("{table}");
    }
    println!();
    println!(
        "loopback bench: {before} at the start, {} at the end",
        load()
    );
}

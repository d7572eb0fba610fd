//! A probe for profiling one migration case outside criterion: `runs` migrations of a paused
//! guest holding a random (or mixed) image into prefaulted memory, each printed with its GB/s
//! and CPU seconds per GB (this process, both ends). With `RAMJET_PROBE_RAW=1` each migration
//! alternates with a plain copy of as many bytes over as many streams (blocking `write_all`/
//! `read_exact` of 1 MiB between two mappings, the destination prefaulted), and the median of
//! the paired speed ratios is printed at the end.
//!
//! `cargo run --release -p ramjet-benches --example probe -- unix uring 2 2G 5 random`
//! (family tcp|unix, transport uring|blocking, channels, size, runs, image random|mixed); run
//! it under `perf record -g` or `perf stat` to see where the CPU goes.

use std::sync::Arc;

use memmap2::MmapMut;
use ramjet_benches::measure::{Sample, gb, median, parse_bytes};
use ramjet_benches::migrate::migrate;
use ramjet_benches::raw::{Raw, RawListener, raw_copy};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::image::{self, ImageKind, Rng};
use ramjet_dataplane::transport::{Blocking, Transport, Uring};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let family = arg(0, "unix");
    let transport: Arc<dyn Transport> = match arg(1, "uring").as_str() {
        "blocking" => Arc::new(Blocking),
        _ => Arc::new(Uring::default()),
    };
    let channels: u16 = arg(2, "2").parse().expect("channels");
    let bytes = parse_bytes(&arg(3, "2G")).expect("size");
    let runs: usize = arg(4, "5").parse().expect("runs");
    let kind = match arg(5, "random").as_str() {
        "mixed" => ImageKind::Mixed,
        _ => ImageKind::Random,
    };
    let path = |what: &str| {
        std::env::temp_dir().join(format!("ramjet-probe-{}-{what}.sock", std::process::id()))
    };
    let (endpoint, listener) = match family.as_str() {
        "tcp" => ("tcp:127.0.0.1:0".to_owned(), RawListener::tcp()),
        _ => (
            format!("unix:{}", path("migrate").display()),
            RawListener::unix(path("raw")),
        ),
    };
    let raw = std::env::var_os("RAMJET_PROBE_RAW").is_some();
    let len = usize::try_from(bytes).expect("64-bit");
    let (mut raw_src, mut raw_dst) = (
        MmapMut::map_anon(1).expect("map"),
        MmapMut::map_anon(1).expect("map"),
    );
    if raw {
        raw_src = MmapMut::map_anon(len).expect("map");
        Rng::new(1).fill(&mut raw_src);
        raw_dst = MmapMut::map_anon(len).expect("map");
        raw_dst.fill(1);
    }
    let src = GuestMemory::anonymous(bytes).expect("memory");
    image::fill(&src, kind, 7).expect("image");
    let dst = GuestMemory::anonymous(bytes).expect("memory");
    dst.prefault().expect("prefault");
    let (src, dst) = (Arc::new(src), Arc::new(dst));
    eprintln!(
        "probe: {family} {} {channels} channels, {kind}",
        transport.name()
    );
    let mut ratios = Vec::new();
    for _ in 0..runs {
        let base = raw.then(|| {
            Sample::of(&mut || {
                raw_copy(
                    &listener,
                    &raw_src,
                    &mut raw_dst,
                    usize::from(channels),
                    Raw::WriteRead,
                );
            })
        });
        let s = Sample::of(&mut || migrate(&src, &dst, &transport, channels, &endpoint));
        match base {
            Some(b) => {
                ratios.push(b.seconds / s.seconds);
                println!(
                    "raw {:.3} GB/s {:.3} CPU-s/GB, ramjet {:.3} GB/s {:.3} CPU-s/GB",
                    gb(bytes) / b.seconds,
                    b.cpu / gb(bytes),
                    gb(bytes) / s.seconds,
                    s.cpu / gb(bytes)
                );
            }
            None => println!(
                "{:.3} GB/s {:.3} CPU-s/GB",
                gb(bytes) / s.seconds,
                s.cpu / gb(bytes)
            ),
        }
    }
    if !ratios.is_empty() {
        println!(
            "ramjet/raw speed, median of {} pairs: {:.3}",
            ratios.len(),
            median(ratios)
        );
    }
}

//! A probe for profiling one migration case outside criterion: `runs` migrations of a paused
//! guest holding a random (or mixed) image into prefaulted memory, each printed with its GB/s
//! and CPU seconds per GB (this process, both ends).
//!
//! `cargo run --release -p ramjet-benches --example probe -- unix uring 2 2G 5 random`
//! (family tcp|unix, transport uring|blocking, channels, size, runs, image random|mixed); run
//! it under `perf record -g` or `perf stat` to see where the CPU goes.

use std::sync::Arc;

use ramjet_benches::measure::{Sample, gb, parse_bytes};
use ramjet_benches::migrate::migrate;
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::image::{self, ImageKind};
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
    let endpoint = match family.as_str() {
        "tcp" => "tcp:127.0.0.1:0".to_owned(),
        _ => format!(
            "unix:{}",
            std::env::temp_dir()
                .join(format!("ramjet-probe-{}.sock", std::process::id()))
                .display()
        ),
    };
    let src = GuestMemory::anonymous(bytes).expect("memory");
    image::fill(&src, kind, 7).expect("image");
    let dst = GuestMemory::anonymous(bytes).expect("memory");
    dst.prefault().expect("prefault");
    let (src, dst) = (Arc::new(src), Arc::new(dst));
    eprintln!(
        "probe: {family} {} {channels} channels, {kind}",
        transport.name()
    );
    for _ in 0..runs {
        let s = Sample::of(&mut || migrate(&src, &dst, &transport, channels, &endpoint));
        println!(
            "{:.3} GB/s {:.3} CPU-s/GB",
            gb(bytes) / s.seconds,
            s.cpu / gb(bytes)
        );
    }
}

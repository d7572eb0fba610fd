//! End to end over loopback TCP: ramjet on both transports against plain socket copies of the
//! same bytes (blocking `write_all`/`read_exact`, and io_uring `Send` of 1 MiB chunks), all in
//! one run. Besides criterion's time and throughput, each benchmark prints the CPU seconds per
//! GB of guest RAM that sender and receiver spent together (this process's user + system time).

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use io_uring::{IoUring, opcode, types};
use memmap2::MmapMut;
use ramjet_dataplane::Compression;
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::image::{self, ImageKind, Rng};
use ramjet_dataplane::transport::{Blocking, Listener, Transport, Uring};
use ramjet_dataplane::{PreSwitchover, ReceiveOptions, SendOptions, Sender, receive};

const BYTES: u64 = 2 << 30;
const CHUNK: usize = 1 << 20;

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is a plain C struct for which all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct we pass, which lives across the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Sends `part` on `stream` with io_uring `Send` operations of at most 1 MiB, one at a time.
fn uring_send(stream: &TcpStream, part: &[u8]) {
    let mut ring = IoUring::new(4).expect("ring");
    let fd = types::Fd(stream.as_raw_fd());
    let mut at = 0;
    while at < part.len() {
        let len = u32::try_from((part.len() - at).min(CHUNK)).expect("1 MiB fits");
        let entry = opcode::Send::new(fd, part[at..].as_ptr(), len).build();
        // SAFETY: `part` outlives the operation, which completes before the next loop.
        unsafe { ring.submission().push(&entry).expect("queue") };
        ring.submit_and_wait(1).expect("submit");
        let sent = ring.completion().next().expect("completion").result();
        assert!(sent > 0, "send failed: {sent}");
        at += sent as usize;
    }
}

/// The baselines: `streams` TCP connections, each moving its share of `src` into `dst`, sent
/// with blocking `write_all` or io_uring `Send`, received with `read_exact`, in 1 MiB pieces.
fn raw_copy(listener: &TcpListener, src: &[u8], dst: &mut [u8], streams: usize, uring: bool) {
    let share = src.len() / streams;
    let addr = listener.local_addr().expect("address");
    thread::scope(|scope| {
        for part in src.chunks(share) {
            scope.spawn(move || {
                let mut stream = TcpStream::connect(addr).expect("connect");
                if uring {
                    uring_send(&stream, part);
                } else {
                    for chunk in part.chunks(CHUNK) {
                        stream.write_all(chunk).expect("write");
                    }
                }
            });
        }
        for part in dst.chunks_mut(share) {
            let (mut stream, _) = listener.accept().expect("accept");
            scope.spawn(move || {
                for chunk in part.chunks_mut(CHUNK) {
                    stream.read_exact(chunk).expect("read");
                }
            });
        }
    });
}

/// One whole migration of the image `src` into `dst`, as of a paused guest: switchover, every
/// page (sent in place from the frozen memory), device state, confirmation.
fn migrate(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    transport: &Arc<dyn Transport>,
    channels: u16,
) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let at = listener.endpoint().clone();
    let receive_options = ReceiveOptions {
        transport: Arc::clone(transport),
        ..ReceiveOptions::default()
    };
    let dst = Arc::clone(dst);
    let receiver = thread::spawn(move || {
        receive(&listener, dst, &receive_options, Arc::new(|_| {})).expect("receive")
    });
    let options = SendOptions {
        channels,
        compression: Compression::Auto,
        transport: Arc::clone(transport),
        ..SendOptions::default()
    };
    let sender =
        Sender::connect(Arc::clone(src), &at, &options, Arc::new(|_| {})).expect("connect");
    sender
        .migrate_paused(&[0u8; 4096], PreSwitchover::Skip)
        .expect("migrate");
    receiver.join().expect("receiver thread");
}

/// Benchmarks `run` and prints the CPU seconds per GB it cost.
fn bench(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    streams: u16,
    mut run: impl FnMut(),
) {
    let id = BenchmarkId::new(name, streams);
    let cpu = Cell::new(0.0);
    let bytes = Cell::new(0u64);
    group.bench_function(id, |b| {
        b.iter_custom(|iterations| {
            let (start, cpu_start) = (Instant::now(), cpu_seconds());
            for _ in 0..iterations {
                run();
            }
            cpu.set(cpu.get() + cpu_seconds() - cpu_start);
            bytes.set(bytes.get() + iterations * BYTES);
            start.elapsed()
        });
    });
    // Nothing ran when a filter left this benchmark out.
    if bytes.get() > 0 {
        println!(
            "{name}/{streams}: {:.3} CPU-s/GB (sender and receiver together)",
            cpu.get() / (bytes.get() as f64 / 1e9)
        );
    }
}

/// Seconds and CPU seconds of one call of `run`.
fn measure(run: &mut dyn FnMut()) -> (f64, f64) {
    let (start, cpu_start) = (Instant::now(), cpu_seconds());
    run();
    (start.elapsed().as_secs_f64(), cpu_seconds() - cpu_start)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs each of `cases` in turn, `rounds` times, and prints for each case the median over
/// rounds of its speed and CPU time relative to each earlier case in the same round:
/// on a machine whose speed drifts by tens of percent within minutes, ratios of neighbouring
/// runs are what can be trusted.
fn paired(streams: u16, rounds: usize, cases: &mut [(&str, &mut dyn FnMut())]) {
    let mut times = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (_, run)) in cases.iter_mut().enumerate() {
            times[i].push(measure(*run));
        }
    }
    for (j, (name, _)) in cases.iter().enumerate() {
        for (i, (reference, _)) in cases.iter().enumerate().take(j) {
            let pairs = times[j].iter().zip(&times[i]);
            let speed = median(pairs.clone().map(|(t, r)| r.0 / t.0).collect());
            let cpu = median(pairs.map(|(t, r)| t.1 / r.1).collect());
            println!(
                "paired/{streams}: {name} vs {reference}: speed x{speed:.3}, CPU-s/GB \
                 x{cpu:.3} (median of {rounds} alternations)"
            );
        }
    }
}

/// The baselines and ramjet alternate per channel count, so that drift on a noisy machine
/// affects both alike; at the end, each image's runs alternate with the io_uring baseline for
/// paired ratios.
fn loopback(c: &mut Criterion) {
    let mut group = c.benchmark_group("loopback_tcp_2GiB");
    group.throughput(Throughput::Bytes(BYTES));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(10));

    let len = usize::try_from(BYTES).expect("64-bit");
    let mut src = MmapMut::map_anon(len).expect("map");
    Rng::new(1).fill(&mut src);
    let mut dst = MmapMut::map_anon(len).expect("map");
    dst.fill(1);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let guest_dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
    guest_dst.prefault().expect("prefault");
    let images = [ImageKind::Random, ImageKind::Mixed].map(|kind| {
        let src = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
        image::fill(&src, kind, 7).expect("image");
        (kind, src)
    });
    let transports: [(&str, Arc<dyn Transport>); 2] = [
        ("uring", Arc::new(Uring::default())),
        ("blocking", Arc::new(Blocking)),
    ];
    for streams in [1u16, 2] {
        for (name, uring) in [
            ("baseline_write_read", false),
            ("baseline_uring_send", true),
        ] {
            bench(&mut group, name, streams, || {
                raw_copy(&listener, &src, &mut dst, usize::from(streams), uring);
            });
        }
        for (kind, image) in &images {
            for (name, transport) in &transports {
                let name = format!("ramjet_{kind}_{name}");
                bench(&mut group, &name, streams, || {
                    migrate(image, &guest_dst, transport, streams);
                });
            }
        }
    }
    group.finish();
    for (kind, image) in &images {
        for streams in [1u16, 2] {
            let mut baseline = || raw_copy(&listener, &src, &mut dst, usize::from(streams), true);
            let mut uring = || migrate(image, &guest_dst, &transports[0].1, streams);
            let mut blocking = || migrate(image, &guest_dst, &transports[1].1, streams);
            let (on_blocking, on_uring) = (
                format!("ramjet_{kind}_blocking"),
                format!("ramjet_{kind}_uring"),
            );
            paired(
                streams,
                8,
                &mut [
                    ("baseline_uring_send", &mut baseline),
                    (&on_blocking, &mut blocking),
                    (&on_uring, &mut uring),
                ],
            );
        }
    }
}

criterion_group!(benches, loopback);
criterion_main!(benches);

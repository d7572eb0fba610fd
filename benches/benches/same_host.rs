//! Same-host migration of a paused 2 GiB guest whose RAM is a memfd, over a Unix socket, in one
//! run:
//!
//! - `baseline_fd_pass_map` and `baseline_fd_pass_map_touch`: the memfd's descriptor passed
//!   over a Unix socket pair (`SCM_RIGHTS`), mapped shared by the receiving side, and (touch)
//!   every page read once through the new mapping: the floor of any handover by descriptor.
//! - `ramjet_same_host`: ramjet's handover (`--same-host`): connect, hello with the memory's
//!   descriptor, the receiver maps it in place of its own (reserved, never touched) memory,
//!   device state, the handover (ready, go, decided). Its downtime is from the call that
//!   starts the paused guest's migration (the guest is paused) to the go's acknowledgement
//!   (the destination owns the memory).
//!
//! A ramjet case's time runs from binding the listener to the receiver's return: the
//! destination holds the guest. The source's own clean-up after it (joining its threads and,
//! after a handover, revoking its mappings of the memory: a walk of its page tables) is shown
//! apart, as "source done".
//! - `ramjet_copy`: the copying migration of the same memory over the same kind of socket,
//!   2 channels, crc on, into prefaulted (warm) destination memory.
//! - `baseline_unix_copy`: the same bytes copied by hand over 2 Unix socket streams
//!   (`write_all`/`read_exact` of 1 MiB between two mappings, the destination warm): the
//!   floor of any copying migration over this socket.
//!
//! Before each run the source's mapping is faulted in (as a running guest's is) and the
//! receiver's memory is fresh; neither is timed. Each benchmark prints GB/s of guest RAM and the
//! CPU seconds per GB of the whole process over the timed part; then the cases alternate for
//! medians and paired ratios. Run with `cargo bench -p ramjet-benches --bench same_host`; `RAMJET_BENCH_BYTES=256M`
//! makes a quick run, `RAMJET_BENCH_ROUNDS` sets the alternations (default 6).

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use memmap2::{Mmap, MmapMut, MmapOptions};
use ramjet_benches::measure::{self, bench_bytes, configure, gb, label, load, median};
use ramjet_benches::raw::{Raw, RawListener, raw_copy};
use ramjet_dataplane::internals::fds::{recv_with_fds, send_with_fds};
use ramjet_dataplane::memory::{GuestAddr, GuestMemory, Region};
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::transport::{Endpoint, Listener};
use ramjet_dataplane::{
    MemoryTransfer, PAGE_SIZE, PreSwitchover, ReceiveOptions, SameHost, SendOptions, Sender,
    receive,
};

const DEFAULT_ROUNDS: usize = 6;

/// The cases, in table order.
const CASES: [&str; 5] = [
    "baseline_fd_pass_map",
    "baseline_fd_pass_map_touch",
    "ramjet_same_host",
    "ramjet_copy",
    "baseline_unix_copy",
];

/// What one run measured: its timed part's wall and process CPU time, and the downtime of a
/// ramjet migration.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    timed: Duration,
    cpu: f64,
    downtime: Option<Duration>,
    /// A ramjet migration: when the sender returned, clean-up included.
    source_done: Option<Duration>,
}

/// Process CPU seconds so far.
fn cpu() -> f64 {
    measure::cpu_seconds(libc::RUSAGE_SELF)
}

struct Bench {
    bytes: u64,
    /// The guest's RAM: a memfd of random content, mapped afresh by each run.
    memfd: File,
    /// The copying migration's destination, prefaulted once.
    warm: Arc<GuestMemory>,
    socket: PathBuf,
    /// The plain copy's source (the memfd, mapped) and destination (warm), and its listener.
    raw: RefCell<(Mmap, MmapMut)>,
    raw_listener: RawListener,
}

impl Bench {
    /// A new source over the memfd, its page tables filled as a running guest's are (untimed).
    fn source(&self) -> Arc<GuestMemory> {
        // SAFETY: the memfd is this bench's and never truncated.
        let region = unsafe { Region::from_file(0, GuestAddr(0), &self.memfd) }.expect("map");
        let memory = GuestMemory::new(vec![region]).expect("memory");
        memory.prefault().expect("prefault");
        Arc::new(memory)
    }

    /// The descriptor passed over a socket pair, mapped shared, and with `touch` every page
    /// read once.
    fn baseline(&self, touch: bool) -> Run {
        let (a, b) = UnixStream::pair().expect("pair");
        let (started, cpu_started) = (Instant::now(), cpu());
        send_with_fds(&a, b"m", &[self.memfd.as_fd()]).expect("send");
        let mut byte = [0u8; 1];
        let fds = recv_with_fds(&b, &mut byte, 1).expect("receive");
        let file = File::from(fds.into_iter().next().expect("one descriptor"));
        let len = usize::try_from(self.bytes).expect("64-bit");
        // SAFETY: the memfd is this bench's and never truncated while mapped.
        let map = unsafe { MmapOptions::new().len(len).map(file.as_raw_fd()) }.expect("map");
        let mut sum = 0u8;
        if touch {
            for page in map.chunks(PAGE_SIZE) {
                sum = sum.wrapping_add(page[0]);
            }
        }
        std::hint::black_box(sum);
        let (timed, cpu) = (started.elapsed(), cpu() - cpu_started);
        drop(map);
        Run {
            timed,
            cpu,
            downtime: None,
            source_done: None,
        }
    }

    /// One ramjet migration of a paused guest over the Unix socket: handed over or copied.
    fn ramjet(&self, same_host: SameHost) -> Run {
        let src = self.source();
        let dst = match same_host {
            // A same-host destination reserves its memory and never touches it.
            SameHost::On => Arc::new(GuestMemory::anonymous(self.bytes).expect("memory")),
            _ => Arc::clone(&self.warm),
        };
        let _ = std::fs::remove_file(&self.socket);
        let endpoint = Endpoint::Unix(self.socket.clone());
        let (started, cpu_started) = (Instant::now(), cpu());
        let listener = Listener::bind(&endpoint).expect("bind");
        let options = ReceiveOptions {
            same_host,
            ..ReceiveOptions::default()
        };
        let receiving = {
            let dst = Arc::clone(&dst);
            thread::spawn(move || {
                let received = receive(&listener, dst, &options, Arc::new(|_| {}));
                (received.expect("receive"), Instant::now())
            })
        };
        let options = SendOptions {
            channels: 2,
            same_host,
            ..SendOptions::default()
        };
        let sender = Sender::connect(Arc::clone(&src), &endpoint, &options, Arc::new(|_| {}))
            .expect("connect");
        let paused = Instant::now();
        let summary = sender
            .migrate_paused(&[0u8; 4096], PreSwitchover::Skip)
            .expect("migrate");
        let source_done = started.elapsed();
        let (received, owned) = receiving.join().expect("receiver thread");
        let cpu = cpu() - cpu_started;
        let timed = owned.saturating_duration_since(started);
        let shared = same_host == SameHost::On;
        assert_eq!(summary.memory == MemoryTransfer::Shared, shared);
        assert_eq!(received.memory == MemoryTransfer::Shared, shared);
        Run {
            timed,
            cpu,
            downtime: Some(summary.confirmed.saturating_duration_since(paused)),
            source_done: Some(source_done.max(timed)),
        }
    }

    /// The plain copy over 2 Unix socket streams.
    fn raw_copy(&self) -> Run {
        let (src, dst) = &mut *self.raw.borrow_mut();
        let (started, cpu_started) = (Instant::now(), cpu());
        raw_copy(&self.raw_listener, src, dst, 2, Raw::WriteRead);
        Run {
            timed: started.elapsed(),
            cpu: cpu() - cpu_started,
            downtime: None,
            source_done: None,
        }
    }

    fn run(&self, case: usize) -> Run {
        match case {
            0 => self.baseline(false),
            1 => self.baseline(true),
            2 => self.ramjet(SameHost::On),
            3 => self.ramjet(SameHost::Off),
            _ => self.raw_copy(),
        }
    }
}

fn same_host(c: &mut Criterion) {
    let bytes = bench_bytes();
    let memfd = {
        let memory = GuestMemory::memfd(bytes).expect("memfd");
        image::fill(&memory, ImageKind::Random, 7).expect("image");
        File::from(
            memory.regions()[0]
                .try_clone_fd()
                .expect("descriptor")
                .expect("a memfd"),
        )
    };
    let warm = Arc::new(GuestMemory::anonymous(bytes).expect("memory"));
    warm.prefault().expect("prefault");
    let path = |what: &str| {
        std::env::temp_dir().join(format!("ramjet-bench-{}-{what}.sock", std::process::id()))
    };
    let len = usize::try_from(bytes).expect("64-bit");
    // SAFETY: the memfd is this bench's and never truncated.
    let raw_src = unsafe { MmapOptions::new().len(len).map(memfd.as_raw_fd()) }.expect("map");
    let mut raw_dst = MmapMut::map_anon(len).expect("map");
    raw_dst.fill(1);
    let bench = Bench {
        bytes,
        memfd,
        warm,
        socket: path("same-host"),
        raw: RefCell::new((raw_src, raw_dst)),
        raw_listener: RawListener::unix(path("raw")),
    };
    println!("{} random memfd guest, paused; {}", label(bytes), load());

    let mut group = c.benchmark_group(format!("same_host_{}", label(bytes)));
    configure(&mut group, bytes, 4.0);
    let downtimes = RefCell::new(Vec::new());
    for (case, name) in CASES.iter().enumerate() {
        let mut cpu_total = 0.0;
        let mut count = 0u64;
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    let run = bench.run(case);
                    timed += run.timed;
                    cpu_total += run.cpu;
                    count += 1;
                    if let Some(downtime) = run.downtime.filter(|_| case == 2) {
                        downtimes.borrow_mut().push(downtime.as_secs_f64());
                    }
                }
                timed
            });
        });
        if count > 0 {
            println!(
                "{name}: {:.3} CPU-s/GB (whole process, timed part)",
                cpu_total / gb(bytes * count)
            );
        }
    }
    group.finish();
    if !downtimes.borrow().is_empty() {
        println!(
            "ramjet_same_host downtime: median {:.2} ms over {} runs",
            median(downtimes.borrow().clone()) * 1e3,
            downtimes.borrow().len()
        );
    }

    // Alternations: every case once per round, each round starting one case further on.
    let rounds = measure::rounds(DEFAULT_ROUNDS);
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); CASES.len()];
    for round in 0..rounds {
        for k in 0..CASES.len() {
            let case = (round + k) % CASES.len();
            runs[case].push(bench.run(case));
        }
    }
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "median of alternations", "seconds", "GB/s", "CPU-s/GB", "downtime", "source done"
    );
    for (case, name) in CASES.iter().enumerate() {
        let seconds = median(runs[case].iter().map(|r| r.timed.as_secs_f64()).collect());
        let downtime = runs[case]
            .iter()
            .filter_map(|r| r.downtime)
            .map(|d| d.as_secs_f64())
            .collect::<Vec<_>>();
        let millis = |values: Vec<f64>| {
            if values.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2} ms", median(values) * 1e3)
            }
        };
        let downtime = millis(downtime);
        let source_done = millis(
            runs[case]
                .iter()
                .filter_map(|r| r.source_done)
                .map(|d| d.as_secs_f64())
                .collect(),
        );
        let cpu = median(runs[case].iter().map(|r| r.cpu).collect());
        println!(
            "{name:<28} {seconds:>10.4} {:>10.2} {:>10.4} {downtime:>10} {source_done:>12}",
            gb(bytes) / seconds,
            cpu / gb(bytes),
        );
    }
    let ratio = |a: usize, b: usize| {
        median(
            runs[a]
                .iter()
                .zip(&runs[b])
                .map(|(x, y)| x.timed.as_secs_f64() / y.timed.as_secs_f64())
                .collect(),
        )
    };
    println!(
        "paired: ramjet_same_host / ramjet_copy total time x{:.4}; ramjet_same_host / \
         baseline_fd_pass_map x{:.2}; baseline_fd_pass_map_touch / ramjet_copy x{:.3}; \
         ramjet_copy speed / baseline_unix_copy speed x{:.3} (median of {rounds} alternations)",
        ratio(2, 3),
        ratio(2, 0),
        ratio(1, 3),
        1.0 / ratio(3, 4)
    );
    let _ = std::fs::remove_file(&bench.socket);
}

criterion::criterion_group!(benches, same_host);
criterion::criterion_main!(benches);

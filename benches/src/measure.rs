//! What the benches share: the run's size and rounds from the environment, CPU time, one
//! measured run ([`Sample`]), medians, alternation for paired ratios, and a criterion benchmark
//! that also totals its samples.

use std::cell::Cell;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, SamplingMode, Throughput};
use ramjet_dataplane::PAGE_SIZE;

/// Guest RAM per migration unless `RAMJET_BENCH_BYTES` says otherwise.
pub const DEFAULT_BYTES: u64 = 2 << 30;

/// Parses `256M`, `2G`, `2GiB`, `512k` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Guest RAM per migration: `RAMJET_BENCH_BYTES`, in whole pages, or 2 GiB.
///
/// # Panics
///
/// If `RAMJET_BENCH_BYTES` is set to something that is not a size of at least one page.
pub fn bench_bytes() -> u64 {
    let Ok(text) = std::env::var("RAMJET_BENCH_BYTES") else {
        return DEFAULT_BYTES;
    };
    let bytes = parse_bytes(&text)
        .unwrap_or_else(|| panic!("RAMJET_BENCH_BYTES={text:?}: expected e.g. 256M or 2G"));
    let page = PAGE_SIZE as u64;
    assert!(bytes >= page, "RAMJET_BENCH_BYTES={text:?}: below one page");
    bytes / page * page
}

/// Paired alternations: `RAMJET_BENCH_ROUNDS`, or `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("RAMJET_BENCH_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// `2GiB`, `256MiB`, `12KiB` or bytes: for group names.
pub fn label(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}MiB", b >> 20),
        b if b.is_multiple_of(1 << 10) => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

/// Decimal gigabytes.
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Ten samples, flat, with criterion's times sized for iterations of `bytes` at about
/// `gb_per_second`: one or two iterations per sample, whatever the size.
pub fn configure(group: &mut BenchmarkGroup<'_, WallTime>, bytes: u64, gb_per_second: f64) {
    let seconds = gb(bytes) / gb_per_second;
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs_f64(seconds.max(0.5)));
    group.measurement_time(Duration::from_secs_f64((10.0 * seconds).max(1.0)));
}

/// User + system CPU seconds of this process (`RUSAGE_SELF`) or thread (`RUSAGE_THREAD`).
///
/// # Panics
///
/// If `getrusage` fails (it cannot for these two).
pub fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: rusage is a plain C struct for which all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct we pass, which lives across the call.
    let rc = unsafe { libc::getrusage(who, &raw mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", io::Error::last_os_error());
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// One measured run: wall seconds, process CPU seconds, and the CPU seconds of the thread that
/// ran it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Wall time.
    pub seconds: f64,
    /// User + system time of the whole process (both ends of a loopback run).
    pub cpu: f64,
    /// User + system time of the calling thread.
    pub thread_cpu: f64,
}

impl Sample {
    /// Runs `run` once and measures it.
    pub fn of(run: &mut dyn FnMut()) -> Sample {
        let (start, cpu, thread_cpu) = (
            Instant::now(),
            cpu_seconds(libc::RUSAGE_SELF),
            cpu_seconds(libc::RUSAGE_THREAD),
        );
        run();
        Sample {
            seconds: start.elapsed().as_secs_f64(),
            cpu: cpu_seconds(libc::RUSAGE_SELF) - cpu,
            thread_cpu: cpu_seconds(libc::RUSAGE_THREAD) - thread_cpu,
        }
    }

    /// Adds `other` to this one.
    pub fn add(&mut self, other: Sample) {
        self.seconds += other.seconds;
        self.cpu += other.cpu;
        self.thread_cpu += other.thread_cpu;
    }
}

/// The median (the mean of the middle two for an even count; NaN for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => f64::midpoint(values[n / 2 - 1], values[n / 2]),
    }
}

/// Runs each of `cases` cases (`run(i)` runs case `i`) once per round, `rounds` times,
/// starting each round one case further on, so that every case goes first equally often:
/// drift over the run affects all alike. Returns each case's samples, round by round.
pub fn alternate(rounds: usize, cases: usize, run: &mut dyn FnMut(usize)) -> Vec<Vec<Sample>> {
    let mut samples = vec![Vec::with_capacity(rounds); cases];
    for round in 0..rounds {
        for k in 0..cases {
            let i = (round + k) % cases;
            samples[i].push(Sample::of(&mut || run(i)));
        }
    }
    samples
}

/// Benchmarks `run` under criterion as `id`, calling `prepare` untimed before each batch of
/// iterations (to make what is made on first use); returns the totals over every iteration
/// criterion ran, warm-up included, and how many there were (0: a filter left it out).
pub fn bench(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    prepare: impl Fn(),
    mut run: impl FnMut(),
) -> (Sample, u64) {
    let total = Cell::new(Sample::default());
    let count = Cell::new(0u64);
    group.bench_function(id, |b| {
        b.iter_custom(|iterations| {
            prepare();
            let mut sum = Sample::default();
            for _ in 0..iterations {
                sum.add(Sample::of(&mut run));
            }
            let mut all = total.get();
            all.add(sum);
            total.set(all);
            count.set(count.get() + iterations);
            Duration::from_secs_f64(sum.seconds)
        });
    });
    (total.get(), count.get())
}

/// The machine's load: `/proc/loadavg`'s 1, 5 and 15 minute averages and the CPU count.
pub fn load() -> String {
    let averages = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let averages: Vec<&str> = averages.split_whitespace().take(3).collect();
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    format!("load average {} on {cpus} CPUs", averages.join(" "))
}

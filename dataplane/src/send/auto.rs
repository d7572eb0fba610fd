//! `Compression::Auto`: the pages go with the codec under which, by what the session measures
//! as it goes, they cross soonest.
//!
//! What is measured:
//! - **each channel's speed with each codec**, by its writer ([`LinkMeter`]): the time per
//!   non-zero page it sent, over windows of at least 10 ms and 1 MiB whose frames all went with
//!   the current codec (a wait of more than 20 ms for frames, as between rounds, ends a
//!   window). The first window after a switch is left out (the socket still holds the last
//!   codec's bytes); the median of the next three to five is the codec's measured speed, and
//!   it stands for two seconds.
//! - **the link**, by the same writer, over the windows in which it was sending at least half
//!   the time (the first left out), as only then is the link what it waits for: the bytes the
//!   link carried per second (those sent less the growth of what waits unacknowledged,
//!   [`LinkWriter::in_flight`]; where the link cannot tell, as on a Unix socket, the bytes over
//!   the writer's time in `send`), plus what the other channels carried meanwhile. That is the
//!   whole link, which the channels share: each has its share of it. The `max_bandwidth` wait
//!   counts as sending (a cap is a slow link). A window with less sending tells only that the
//!   link is at least as fast as it went, and a link that never held the writer up counts as
//!   unbounded. Also the writer's CPU time per byte sent.
//! - **the codecs**, by whoever encodes ([`Tally`] from each [`Encoder`]): the CPU time of
//!   batches, the share of non-zero pages the gate lets through, and every few milliseconds a
//!   compressible page compressed with lz4 and with zstd on its own: the median time and the
//!   mean size of the latest samples.
//! - **the cores** the session's threads can have ([`CpuMeter`]): what they use plus what
//!   nobody uses.
//!
//! From these, [`page_parts`] predicts each codec's time per non-zero page on a channel: with
//! codec workers, the larger of its CPU time (encoding plus sending, over the channel's share
//! of the cores) and its wire time (bytes over the link's rate); with writers that encode, their
//! sum. [`estimates`] takes a codec's measured speed where there is one, and otherwise its
//! prediction taken at the error its prediction had when the codec was last measured (in the
//! part that bounded it, CPU or wire: [`calibration`]), or, for a codec not measured yet, at
//! the current codec's error; [`choose`] picks the fastest, keeping the current codec unless
//! another is at least [`HYSTERESIS`] faster, and otherwise, where the channel waits on its
//! link ([`LINK_BOUND`]), [`trial`] tries a codec not measured yet (or not for a while, which
//! doubles after each retry) that is estimated less than [`TRIAL`] times slower. A session
//! starts uncompressed and decides nothing before it has measured its link, its cores and its
//! current codec's speed. Once a codec's measured speed is two seconds old, its prediction
//! stands in for it again: a codec that lost comes back when that prediction, at its
//! remembered error, makes it the faster, so a link or a machine that changes is followed, and
//! a prediction that was wrong is corrected by the next measurement.
//!
//! Measuring costs little: the gate looks at one page in eight while nothing is compressed,
//! and one batch in eight reads the thread's CPU clock (a system call that takes the
//! scheduler's lock: read for every batch, it made `auto` 7–10 % slower than `off` on an
//! unshaped link).
//!
//! [`Encoder`]: crate::codec::Encoder
//! [`LinkWriter::in_flight`]: crate::transport::LinkWriter::in_flight

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::outgoing::Holds;
use crate::Log;
use crate::codec::{PageCompression, Tally, pro_rata};
use crate::memory::PAGE_SIZE;
use crate::session::lock;

/// Another codec must be estimated this much faster (a fraction of the current codec's time)
/// for a channel to switch to it.
pub(crate) const HYSTERESIS: f64 = 0.1;

/// How long a codec's measured speed stands.
const MEASURED_FOR: Duration = Duration::from_secs(2);

/// What every codec is predicted from, per non-zero page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Model {
    /// The share of non-zero pages the gate lets through (the only ones ever compressed).
    pub(crate) gated: f64,
    /// CPU time every codec spends on a non-zero page (reading, zero check, framing, crc), ns.
    pub(crate) base_ns: f64,
    /// lz4 and zstd: ns and bytes per gated page; `None` until measured.
    pub(crate) codecs: [Option<CodecCost>; 2],
}

/// What a codec costs per gated page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CodecCost {
    pub(crate) ns: f64,
    pub(crate) bytes: f64,
}

/// What a channel's link was measured at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Link {
    /// Bytes per second the socket drains while the writer waits on it.
    pub(crate) bytes_per_sec: f64,
    /// The writer's CPU time per byte sent, ns.
    pub(crate) cpu_ns_per_byte: f64,
}

/// How a channel's pages are encoded and sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pipeline {
    /// Codec workers encode while the writer sends: they overlap, over this many cores for the
    /// channel (its share of the cores the session's threads can use: see [`CpuMeter`]).
    Workers { cores: f64 },
    /// The writer encodes and then sends: one after the other, on its own thread.
    Writer,
}

const CODECS: [PageCompression; 3] = [
    PageCompression::Off,
    PageCompression::Lz4,
    PageCompression::Zstd,
];

/// A codec's predicted time per non-zero page (ns) in its two parts: the CPU's (encoding, and
/// the writer's sending, over the cores the channel has) and the link's (its bytes at the
/// link's rate). With codec workers they overlap, and the longer one is the time; with the
/// writer encoding, they add up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Parts {
    pub(crate) cpu: f64,
    pub(crate) link: f64,
    pub(crate) serial: bool,
}

impl Parts {
    /// The time per page.
    pub(crate) fn time(self) -> f64 {
        if self.serial {
            self.cpu + self.link
        } else {
            self.cpu.max(self.link)
        }
    }

    /// Taken at `scale`: the CPU's part times its `cpu`, the link's times its `link`.
    fn scaled(self, scale: Scale) -> Parts {
        Parts {
            cpu: self.cpu * scale.cpu,
            link: self.link * scale.link,
            serial: self.serial,
        }
    }
}

/// The predicted time per non-zero page (ns) with `codec`, in its parts, or `None` if that
/// codec has not been measured.
pub(crate) fn page_parts(
    model: &Model,
    link: &Link,
    pipeline: Pipeline,
    codec: PageCompression,
) -> Option<Parts> {
    let page = PAGE_SIZE as f64;
    let (ns, bytes) = match codec {
        PageCompression::Off => (0.0, page),
        PageCompression::Lz4 => model.codecs[0].map(|c| (c.ns, c.bytes))?,
        PageCompression::Zstd => model.codecs[1].map(|c| (c.ns, c.bytes))?,
    };
    let gated = model.gated.clamp(0.0, 1.0);
    let wire = (1.0 - gated) * page + gated * bytes.min(page);
    let encode = model.base_ns.max(0.0) + gated * ns.max(0.0);
    // An unbounded link (never the bottleneck so far) takes no time.
    let send = wire * 1e9 / link.bytes_per_sec.max(1.0);
    let parts = match pipeline {
        Pipeline::Workers { cores } => Parts {
            cpu: (encode + link.cpu_ns_per_byte.max(0.0) * wire) / cores.max(1e-3),
            link: send,
            serial: false,
        },
        Pipeline::Writer => Parts {
            cpu: encode,
            link: send,
            serial: true,
        },
    };
    parts.time().is_finite().then_some(parts)
}

/// The predicted time per non-zero page (ns) with `codec`, or `None` if that codec has not
/// been measured.
#[cfg(test)]
pub(crate) fn page_time(
    model: &Model,
    link: &Link,
    pipeline: Pipeline,
    codec: PageCompression,
) -> Option<f64> {
    page_parts(model, link, pipeline, codec).map(Parts::time)
}

/// How far off a codec's prediction `predicted` is from its `measured` time: the ratio of
/// the two (between ½ and 2), as scales of the prediction's CPU part and link part. It scales
/// the part that bounds the prediction, both where they add up: the CPU's (the cores a codec
/// really gets are what the model knows least: where the peer shares them, as in the shaped
/// bench, fewer bytes on the wire free some of the peer's and the kernel's) or the link's
/// (a channel that had the link to itself for a while measured more than its share).
pub(crate) fn calibration(measured: f64, predicted: Parts) -> Option<Scale> {
    let time = predicted.time();
    if !(time > 0.0 && measured.is_finite()) {
        return None;
    }
    let scale = (measured / time).clamp(0.5, 2.0);
    let (cpu, link) = if predicted.serial {
        (scale, scale)
    } else if predicted.cpu >= predicted.link {
        (scale, 1.0)
    } else {
        (1.0, scale)
    };
    Some(Scale { cpu, link })
}

/// The factors a prediction's parts are taken at ([`calibration`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scale {
    pub(crate) cpu: f64,
    pub(crate) link: f64,
}

impl Scale {
    /// As predicted.
    const NONE: Scale = Scale {
        cpu: 1.0,
        link: 1.0,
    };
}

/// Each codec's estimated time per non-zero page on a channel now using `current`: its
/// `measured` time where there is one, else its predicted time ([`page_parts`]) taken at the
/// [`calibration`] it had when last measured (`remembered`), or for a codec not measured yet,
/// at the current codec's. `None` where there is neither.
pub(crate) fn estimates(
    model: &Model,
    link: &Link,
    pipeline: Pipeline,
    measured: &[Option<f64>; 3],
    remembered: &[Option<Scale>; 3],
    current: PageCompression,
) -> [Option<f64>; 3] {
    let predicted = CODECS.map(|c| page_parts(model, link, pipeline, c));
    let now = usize::from(codec_index(current));
    let current_scale = measured[now]
        .zip(predicted[now])
        .and_then(|(m, p)| calibration(m, p));
    let mut out = [None; 3];
    for (i, slot) in out.iter_mut().enumerate() {
        let scale = remembered[i].or(current_scale).unwrap_or(Scale::NONE);
        *slot = measured[i].or(predicted[i].map(|p| p.scaled(scale).time()));
    }
    out
}

/// The codec a channel now using `current` goes on with, given each codec's estimated time
/// per page: the fastest if that is at least [`HYSTERESIS`] faster than `current`'s (or
/// `current` has none), else `current`.
pub(crate) fn choose(estimates: &[Option<f64>; 3], current: PageCompression) -> PageCompression {
    let Some((best, best_time)) = CODECS
        .iter()
        .zip(estimates)
        .filter_map(|(&c, t)| t.filter(|t| t.is_finite()).map(|t| (c, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
    else {
        return current;
    };
    match estimates[usize::from(codec_index(current))] {
        Some(now) if best_time >= now * (1.0 - HYSTERESIS) => current,
        _ => best,
    }
}

/// How much slower than the current codec a codec with no measured speed may be estimated
/// for a channel to try it (until its speed is measured: a few windows, some 40 ms). The
/// model cannot know everything a codec changes (above all the CPU that fewer bytes free,
/// where the peer shares the cores), and the measurement corrects it; a trial of a codec
/// that loses costs those windows once, and again only after [`History::RETRY`], then twice
/// as long, and so on (its error is remembered meanwhile), while one that wins pays for the
/// rest of the migration. Measured in the shaped bench: at 1 GB/s lz4 is predicted
/// 1.1–1.9× slower than off and is 1.2–1.3× faster; unshaped it is mostly predicted 2.2–2.7×
/// slower, and is, but now and then within 1.5× (which [`LINK_BOUND`] keeps from a trial).
pub(crate) const TRIAL: f64 = 1.5;

/// How close to its link's time a channel's measured time must be for it to try another
/// codec ([`trial`]): only a channel that waits on its link (here, at least two thirds of the
/// time) can gain from sending fewer bytes. Measured in the shaped bench, as measured time over
/// link time with off: 0.95–1.5 at 250 MB/s, 1.1–1.25 at 1 GB/s (now and then 2, when a tbf
/// burst made the link look fast), 1.6–1.85 unshaped, where a trial of lz4 ran 1.7 times slower
/// than off for its windows.
pub(crate) const LINK_BOUND: f64 = 1.5;

/// Whether a channel whose codec was `measured` (ns per page) at what `parts` predicts for it
/// waits on its link: within [`LINK_BOUND`] of the link's part.
pub(crate) fn waits_on_link(measured: Option<f64>, parts: Option<Parts>) -> bool {
    measured
        .zip(parts)
        .is_some_and(|(measured, parts)| measured <= parts.link * LINK_BOUND)
}

/// A codec for a channel now using `current` to try: the fastest by `estimates` of those not
/// `known` (not measured in the session, or not for long: [`History::may_try`]) and estimated
/// less than [`TRIAL`] times `current`'s time. Until then a codec measured before is
/// estimated at the error its prediction had then, and comes back only if that makes it the
/// faster one.
pub(crate) fn trial(
    estimates: &[Option<f64>; 3],
    known: &[bool; 3],
    current: PageCompression,
) -> Option<PageCompression> {
    let now = estimates[usize::from(codec_index(current))].filter(|t| t.is_finite())?;
    CODECS
        .into_iter()
        .zip(estimates.iter().zip(known))
        .filter(|&(c, (_, known))| c != current && !known)
        .filter_map(|(c, (t, _))| {
            t.filter(|t| t.is_finite() && *t < now * TRIAL)
                .map(|t| (c, t))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(c, _)| c)
}

/// The codecs' measurements: sums that halve as they grow, so that recent pages count most,
/// and each codec's latest samples.
#[derive(Debug, Default)]
struct Costs {
    nonzero: u64,
    looked: u64,
    gated: u64,
    compressed: [u64; 2],
    batch_nanos: u64,
    /// lz4's and zstd's latest samples: ns and bytes.
    samples: [VecDeque<(u32, u32)>; 2],
}

impl Costs {
    /// Non-zero pages after which the sums are halved (a few MiB of guest RAM), and the
    /// samples kept per codec (about a third of a second's, with two encoders).
    const KEEP_PAGES: u64 = 4096;
    const KEEP_SAMPLES: usize = 64;

    fn add(&mut self, tally: &Tally) {
        self.nonzero += tally.nonzero;
        self.looked += tally.looked;
        self.gated += tally.gated;
        self.batch_nanos += tally.all_batches_nanos();
        for (sum, n) in self.compressed.iter_mut().zip(tally.compressed) {
            *sum += n;
        }
        if self.nonzero > Self::KEEP_PAGES {
            self.nonzero /= 2;
            self.looked /= 2;
            self.gated /= 2;
            self.batch_nanos /= 2;
            for sum in &mut self.compressed {
                *sum /= 2;
            }
        }
        for (kept, new) in self.samples.iter_mut().zip(&tally.samples) {
            kept.extend(new.kept());
            while kept.len() > Self::KEEP_SAMPLES {
                kept.pop_front();
            }
        }
    }

    /// The model, once a non-zero page was seen. A codec's time is the median of its samples:
    /// now and then one is interrupted (by the network's softirqs, or the scheduler), which
    /// says how busy the cores are (the [`CpuMeter`]'s business), not what the codec costs.
    fn model(&self) -> Option<Model> {
        if self.nonzero == 0 || self.looked == 0 {
            return None;
        }
        let codecs = self.samples.each_ref().map(|kept| {
            let mut times: Vec<u32> = kept.iter().map(|&(ns, _)| ns).collect();
            times.sort_unstable();
            let median = *times.get(times.len() / 2)?;
            let bytes = kept.iter().map(|&(_, b)| f64::from(b)).sum::<f64>() / kept.len() as f64;
            Some(CodecCost {
                ns: f64::from(median),
                bytes,
            })
        });
        let codec_nanos: f64 = self
            .compressed
            .iter()
            .zip(&codecs)
            .map(|(&n, cost)| n as f64 * cost.map_or(0.0, |c| c.ns))
            .sum();
        let nonzero = self.nonzero as f64;
        Some(Model {
            gated: self.gated as f64 / self.looked as f64,
            base_ns: ((self.batch_nanos as f64 - codec_nanos) / nonzero).max(0.0),
            codecs,
        })
    }
}

/// What a session measured of a codec before.
#[derive(Debug, Default, Clone, Copy)]
struct History {
    /// How far off its prediction was when it was last measured ([`calibration`]).
    error: Option<Scale>,
    /// When it last had a measured speed.
    measured_at: Option<Instant>,
    /// How often it was tried again after it had been measured.
    retries: u32,
}

impl History {
    /// How long after its last measurement a codec may be tried again; twice that after each
    /// retry (at most 2^16 times that). A trial's verdict rests on a few windows whose speeds
    /// swing by a third (measured at 1 GB/s): a wrong one is undone in a long migration, at a
    /// cost that grows only with the logarithm of its length.
    const RETRY: Duration = Duration::from_secs(4);

    /// Whether the codec may be tried at `now`: never measured, or not since long enough.
    fn may_try(&self, now: Instant) -> bool {
        self.measured_at.is_none_or(|at| {
            let wait = Self::RETRY.saturating_mul(1 << self.retries.min(16));
            now.saturating_duration_since(at) >= wait
        })
    }
}

/// One channel's measurements, by its writer.
#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    /// The whole link's rate as this channel measured it (see [`LinkMeter`]), and its CPU per
    /// byte.
    link: Option<Link>,
    /// What the channel's latest window carried per second, and when that window ended.
    recent: Option<(f64, Instant)>,
    /// Per codec: ns per non-zero page, and when last measured.
    speed: [Option<(f64, Instant)>; 3],
}

fn codec_index(codec: PageCompression) -> u8 {
    match codec {
        PageCompression::Off => 0,
        PageCompression::Lz4 => 1,
        PageCompression::Zstd => 2,
    }
}

fn codec_at(index: u8) -> PageCompression {
    CODECS
        .get(usize::from(index))
        .copied()
        .unwrap_or(PageCompression::Off)
}

/// A session's `Compression::Auto` state: what every channel measured, the codecs' costs as
/// measured by every encoder, the cores, and the codec.
///
/// One codec for every channel: the channels share the codec workers, and each round's pages
/// are split evenly among them, so a round lasts as long as its slowest channel and a worker
/// waiting on one channel's full queue holds up the others; a channel on a codec of its own
/// would be measured at the others' pace. So every channel's measurements decide together.
#[derive(Debug)]
pub(crate) struct Auto {
    /// The codec, as [`codec_index`].
    codec: AtomicU8,
    channels: Vec<Mutex<Measured>>,
    costs: Mutex<Costs>,
    /// Whether the writers encode (else codec workers do).
    writers_encode: bool,
    /// The cores the session's threads can have, once measured.
    cpu: Mutex<CpuMeter>,
    /// Per codec, what it measured before.
    history: Mutex<[History; 3]>,
    /// CPU time the session's encoders and writers spent, ns.
    own_cpu: AtomicU64,
    /// Whether it has had what it needs to decide.
    decided: AtomicBool,
    /// Where its first decision and each change of codec are logged.
    log: Log,
}

impl Auto {
    /// The state for `channels` channels, encoded by their writers or by codec workers, with
    /// `threads` threads that encode or send; it starts uncompressed.
    pub(crate) fn new(channels: usize, threads: usize, writers_encode: bool, log: Log) -> Self {
        Auto {
            codec: AtomicU8::new(0),
            channels: (0..channels)
                .map(|_| Mutex::new(Measured::default()))
                .collect(),
            costs: Mutex::new(Costs::default()),
            writers_encode,
            cpu: Mutex::new(CpuMeter::new(threads)),
            history: Mutex::new([History::default(); 3]),
            own_cpu: AtomicU64::new(0),
            decided: AtomicBool::new(false),
            log,
        }
    }

    /// The codec the next batch goes with.
    pub(crate) fn codec(&self) -> PageCompression {
        codec_at(self.codec.load(Ordering::Relaxed))
    }

    /// Counts `nanos` more of the session's CPU time; returns the total.
    fn add_own_cpu(&self, nanos: u64) -> u64 {
        self.own_cpu
            .fetch_add(nanos, Ordering::Relaxed)
            .saturating_add(nanos)
    }

    /// Folds an encoder's `tally` into the costs, and decides the codec again.
    pub(crate) fn fold(&self, tally: &Tally) {
        let now = Instant::now();
        let own = self.add_own_cpu(tally.all_batches_nanos().saturating_add(tally.sample_nanos));
        let model = {
            let mut costs = lock(&self.costs);
            costs.add(tally);
            costs.model()
        };
        let channels = self.channels.len().max(1) as f64;
        // With codec workers, nothing changes before the cores are measured.
        let pipeline = if self.writers_encode {
            Pipeline::Writer
        } else {
            match lock(&self.cpu).cores(own, now) {
                Some(all) => Pipeline::Workers {
                    cores: all / channels,
                },
                None => return,
            }
        };
        let (Some(model), Some((link, speed))) = (model, self.measured(now)) else {
            return;
        };
        let index = self.codec.load(Ordering::Relaxed);
        let current = codec_at(index);
        // Nothing changes before the current codec's speed is known.
        if speed[usize::from(index)].is_none() {
            return;
        }
        let cur = usize::from(index);
        let parts = page_parts(&model, &link, pipeline, current);
        // The current codec's error is remembered for when it is no longer measured.
        let mut history = lock(&self.history);
        if let Some(error) = speed[cur].zip(parts).and_then(|(m, p)| calibration(m, p)) {
            history[cur].error = Some(error);
        }
        for (past, speed) in history.iter_mut().zip(speed) {
            if speed.is_some() {
                past.measured_at = Some(now);
            }
        }
        let remembered = history.map(|h| h.error);
        let estimated = estimates(&model, &link, pipeline, &speed, &remembered, current);
        let mut next = choose(&estimated, current);
        let mut what = "now";
        // Another codec is tried only where the channel waits on its link, and only one not
        // measured yet, or not for long (see `History::may_try`).
        let known = [0, 1, 2].map(|i| speed[i].is_some() || !history[i].may_try(now));
        if next == current
            && waits_on_link(speed[cur], parts)
            && let Some(other) = trial(&estimated, &known, current)
        {
            (next, what) = (other, "trying");
            let past = &mut history[usize::from(codec_index(other))];
            if past.measured_at.is_some() {
                past.retries = past.retries.saturating_add(1);
            }
        }
        drop(history);
        let decided = if next == current {
            // The first decision is logged even when it keeps the codec.
            !self.decided.swap(true, Ordering::Relaxed)
        } else {
            self.decided.store(true, Ordering::Relaxed);
            self.codec
                .compare_exchange(
                    index,
                    codec_index(next),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        };
        if decided {
            let what = if next == current { "stays" } else { what };
            let line = decision_line(what, next, &estimated, &speed, &model, &link, pipeline);
            self.log.line(&line);
        }
    }

    /// The channels' measurements together, as of `now`: their mean link (`None` until one
    /// was measured), and per codec the mean of their speeds measured within
    /// [`MEASURED_FOR`].
    fn measured(&self, now: Instant) -> Option<(Link, [Option<f64>; 3])> {
        // Links: the mean of the measured rates (a channel whose link never held its writer
        // up counts only if none did), and of the CPU per byte.
        let (mut rates, mut cpu, mut links, mut bounded) = (0.0, 0.0, 0u32, 0u32);
        let mut speeds = [(0.0, 0u32); 3];
        for channel in &self.channels {
            let measured = *lock(channel);
            if let Some(link) = measured.link {
                links += 1;
                cpu += link.cpu_ns_per_byte;
                if link.bytes_per_sec.is_finite() {
                    rates += link.bytes_per_sec;
                    bounded += 1;
                }
            }
            for (sum, speed) in speeds.iter_mut().zip(measured.speed) {
                if let Some((ns, at)) = speed
                    && now.saturating_duration_since(at) < MEASURED_FOR
                {
                    sum.0 += ns;
                    sum.1 += 1;
                }
            }
        }
        // Each channel measured the whole link, which they share: a channel's part of it is
        // its share.
        let share = self.channels.len().max(1) as f64;
        let link = (links > 0).then(|| Link {
            bytes_per_sec: if bounded > 0 {
                rates / f64::from(bounded) / share
            } else {
                f64::INFINITY
            },
            cpu_ns_per_byte: cpu / f64::from(links),
        })?;
        Some((
            link,
            speeds.map(|(sum, n)| (n > 0).then(|| sum / f64::from(n))),
        ))
    }
}

/// How many cores the session's threads can have: those they used plus those nobody used
/// (`/proc/stat`), over windows of at least [`CpuMeter::WINDOW`], at most one per thread.
/// Another process on the machine, or a receiver on this host, leaves fewer. Without
/// `/proc/stat` every core counts as free.
#[derive(Debug)]
pub(crate) struct CpuMeter {
    threads: f64,
    /// The CPUs this process may use, asked once: `available_parallelism` reads the cgroup's
    /// files on every call (asked on every fold, it cost the session a few percent of its CPU
    /// unshaped).
    cpus: f64,
    /// At the window's start: when, the session's CPU time (ns), and the machine's idle and
    /// total ticks.
    at: Option<(Instant, u64, u64, u64)>,
    /// Cores, once measured.
    cores: Option<f64>,
}

impl CpuMeter {
    /// `/proc/stat` counts in ticks of 10 ms: a window is at least five per core.
    const WINDOW: Duration = Duration::from_millis(50);
    const WEIGHT: f64 = 0.5;

    /// A meter whose first window starts now.
    fn new(threads: usize) -> Self {
        CpuMeter {
            threads: threads.max(1) as f64,
            cpus: thread::available_parallelism().map_or(1, usize::from) as f64,
            at: machine_ticks().map(|(idle, total)| (Instant::now(), 0, idle, total)),
            cores: None,
        }
    }

    /// The cores, given the session's CPU time `own` (ns) so far, at `now`.
    fn cores(&mut self, own: u64, now: Instant) -> Option<f64> {
        self.cores_with(own, now, self.cpus, machine_ticks)
    }

    /// [`cores`](Self::cores) on a machine of `cpus` CPUs whose idle and total ticks `ticks`
    /// reads. Where they cannot be read, every core counts as free.
    fn cores_with(
        &mut self,
        own: u64,
        now: Instant,
        cpus: f64,
        ticks: impl FnOnce() -> Option<(u64, u64)>,
    ) -> Option<f64> {
        match self.at {
            Some((at, _, _, _)) if now.saturating_duration_since(at) < Self::WINDOW => {}
            _ => {
                let Some((idle, total)) = ticks() else {
                    return Some(self.threads.min(cpus));
                };
                if let Some((at, own_at, idle_at, total_at)) = self.at {
                    let wall = now.saturating_duration_since(at).as_secs_f64();
                    let ticks = total.saturating_sub(total_at) as f64;
                    if ticks > 0.0 && wall > 0.0 {
                        let idle = idle.saturating_sub(idle_at) as f64 / ticks * cpus;
                        let used = own.saturating_sub(own_at) as f64 / 1e9 / wall;
                        let sample = (idle + used).clamp(0.25, self.threads.min(cpus));
                        self.cores = Some(match self.cores {
                            Some(cores) => cores + Self::WEIGHT * (sample - cores),
                            None => sample,
                        });
                    }
                }
                self.at = Some((now, own, idle, total));
            }
        }
        self.cores
    }
}

/// The machine's idle and total CPU ticks so far (`/proc/stat`'s first line; idle includes
/// waiting for I/O), or `None` if they cannot be read.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_ticks(stat.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...` as (idle, total).
fn parse_ticks(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // guest and guest_nice are counted in user and nice already.
    let total = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((idle, total))
}

/// The log line for a decision (`what`: `now` for a switch to `codec`, `stays` for keeping
/// it): every codec's estimate (and whether it was measured) and what the predictions came
/// from.
fn decision_line(
    what: &str,
    codec: PageCompression,
    estimated: &[Option<f64>; 3],
    measured: &[Option<f64>; 3],
    model: &Model,
    link: &Link,
    pipeline: Pipeline,
) -> String {
    let name = |c: PageCompression| match c {
        PageCompression::Off => "off",
        PageCompression::Lz4 => "lz4",
        PageCompression::Zstd => "zstd",
    };
    let each: Vec<String> = CODECS
        .iter()
        .enumerate()
        .map(|(i, &c)| match estimated[i] {
            Some(ns) if measured[i].is_some() => format!("{} {:.2} measured", name(c), ns / 1e3),
            Some(ns) => format!("{} {:.2} predicted", name(c), ns / 1e3),
            None => format!("{} unknown", name(c)),
        })
        .collect();
    let cores = match pipeline {
        Pipeline::Workers { cores } => format!("{cores:.2} cores"),
        Pipeline::Writer => "writers encode".to_owned(),
    };
    let costs: Vec<String> = [PageCompression::Lz4, PageCompression::Zstd]
        .iter()
        .zip(&model.codecs)
        .map(|(&c, cost)| match cost {
            Some(cost) => format!(
                "{} {:.2} µs to {:.0} bytes",
                name(c),
                cost.ns / 1e3,
                cost.bytes
            ),
            None => format!("{} unmeasured", name(c)),
        })
        .collect();
    let rate = if link.bytes_per_sec.is_finite() {
        format!("{:.3} GB/s", link.bytes_per_sec / 1e9)
    } else {
        "never the bottleneck".to_owned()
    };
    format!(
        "compression auto: {what} {}: µs per non-zero page and channel {}; {cores} per channel, link \
         {rate} ({:.2} ns CPU per byte), {:.0} % of non-zero pages compressible, base {:.2} µs \
         per page; per compressible page {}",
        name(codec),
        each.join(", "),
        link.cpu_ns_per_byte,
        model.gated * 100.0,
        model.base_ns / 1e3,
        costs.join(", "),
    )
}

/// A channel writer's measurements (see the module documentation), published to the
/// session's [`Auto`] at the end of each window.
#[derive(Debug)]
pub(crate) struct LinkMeter {
    auto: Arc<Auto>,
    channel: u16,
    /// The window: when it started and its last send ended, the writer's time in `send`, the
    /// bytes, the writer's CPU time in the sends it timed and their bytes, the non-zero pages,
    /// and their codec (`None` while empty; `Err` once mixed).
    started: Option<Instant>,
    last: Option<Instant>,
    busy: Duration,
    bytes: u64,
    cpu_nanos: u64,
    cpu_bytes: u64,
    nonzero: u64,
    codec: Option<Result<PageCompression, ()>>,
    /// What waited in the link for the peer ([`LinkWriter::in_flight`]) before the window's
    /// first send and after its last one, where the link tells.
    ///
    /// [`LinkWriter::in_flight`]: crate::transport::LinkWriter::in_flight
    in_flight: (Option<u64>, Option<u64>),
    /// Bytes per second (0: not measured yet), and CPU ns per byte.
    rate: f64,
    cpu_per_byte: f64,
    /// Windows that measured the link: the first is not counted, as the connection and the
    /// pipeline behind it are still starting up.
    windows: u32,
    /// Per codec: its speed in the windows since the session last switched to it.
    speed: [Windows; 3],
    /// Sends so far, of which one in [`LinkMeter::TIME_EVERY`] is timed.
    sends: u32,
}

/// A codec's speed on a channel (ns per non-zero page) in its last few windows, since the
/// session switched to it.
#[derive(Debug, Default, Clone, Copy)]
struct Windows {
    /// Windows seen, the first not counted: the socket still held the last codec's bytes.
    seen: u32,
    last: [f64; Windows::KEEP],
}

impl Windows {
    const KEEP: usize = 5;
    /// A speed stands once this many windows measured it.
    const ENOUGH: usize = 3;

    /// Adds the speed `ns` of one window; returns the median of the last few, once there are
    /// [`ENOUGH`](Self::ENOUGH). A median, because now and then a window holds a stall of tens
    /// of milliseconds (a TCP loss on a shaped link), which would make a mean of a few windows
    /// a matter of luck.
    fn push(&mut self, ns: f64) -> Option<f64> {
        self.seen += 1;
        let counted = usize::try_from(self.seen - 1).unwrap_or(usize::MAX);
        if counted == 0 {
            return None;
        }
        self.last[(counted - 1) % Self::KEEP] = ns;
        let n = counted.min(Self::KEEP);
        if n < Self::ENOUGH {
            return None;
        }
        let mut sorted = self.last;
        let sorted = &mut sorted[..n];
        sorted.sort_by(f64::total_cmp);
        Some(sorted[n / 2])
    }
}

impl LinkMeter {
    const WINDOW: Duration = Duration::from_millis(10);
    const WINDOW_BYTES: u64 = 1 << 20;
    /// A wait this long for frames ends a window, and is not counted in it.
    const GAP: Duration = Duration::from_millis(20);
    /// A window measures the link if the writer spent at least this share of it sending.
    const BUSY: f64 = 0.5;
    /// How much each new window counts.
    const WEIGHT: f64 = 0.3;
    /// One send in this many is timed: the thread's CPU clock is a system call that takes the
    /// scheduler's lock, and read around every send it made `auto` some 4 % slower than `off`
    /// on an unshaped link (0.950 and 0.962 of off against 1.012 and 0.990 without, 12
    /// alternations each).
    const TIME_EVERY: u32 = 8;

    /// The meter of channel `channel`, for `auto`.
    pub(crate) fn new(auto: Arc<Auto>, channel: u16) -> Self {
        LinkMeter {
            auto,
            channel,
            started: None,
            last: None,
            busy: Duration::ZERO,
            bytes: 0,
            cpu_nanos: 0,
            cpu_bytes: 0,
            nonzero: 0,
            codec: None,
            in_flight: (None, None),
            rate: 0.0,
            cpu_per_byte: 0.0,
            windows: 0,
            speed: [Windows::default(); 3],
            sends: 0,
        }
    }

    /// Whether a send starting at `start` opens a window: none is open, or the writer waited
    /// more than [`GAP`](Self::GAP) for it, which ends the open one. Only then is what waits
    /// in the link before it ([`record`](Self::record)'s `in_flight`) counted.
    pub(crate) fn opens_window(&self, start: Instant) -> bool {
        self.last
            .is_none_or(|last| start.saturating_duration_since(last) > Self::GAP)
    }

    /// Whether the writer should time its next send's CPU ([`record`](Self::record)): one in
    /// [`TIME_EVERY`](Self::TIME_EVERY), the first included.
    pub(crate) fn times_next(&mut self) -> bool {
        self.sends = self.sends.wrapping_add(1);
        self.sends % Self::TIME_EVERY == 1
    }

    /// Counts one send of `bytes` holding the pages `holds` lists, from `start` to `end`
    /// (waiting for the rate limit included), that took `cpu_nanos` of the writer's CPU time
    /// (if timed: [`times_next`](Self::times_next)), with `in_flight` bytes waiting in the link
    /// for the peer before it (read only where the send [opens a window](Self::opens_window))
    /// and after it, where the link tells; at the end of a window updates the session's
    /// measurements of the channel.
    pub(crate) fn record(
        &mut self,
        (start, end): (Instant, Instant),
        bytes: u64,
        holds: impl Iterator<Item = Holds>,
        cpu_nanos: Option<u64>,
        in_flight: (Option<u64>, Option<u64>),
    ) {
        if let Some(last) = self.last
            && self.opens_window(start)
        {
            self.close(last);
        }
        if self.started.is_none() {
            self.started = Some(start);
            self.in_flight.0 = in_flight.0;
        }
        self.in_flight.1 = in_flight.1;
        self.last = Some(end);
        self.busy += end.saturating_duration_since(start);
        self.bytes += bytes;
        if let Some(nanos) = cpu_nanos {
            self.cpu_nanos += nanos;
            self.cpu_bytes += bytes;
        }
        for held in holds {
            self.nonzero += u64::from(held.nonzero);
            if held.nonzero > 0 {
                self.codec = match self.codec {
                    None => Some(Ok(held.codec)),
                    Some(Ok(c)) if c == held.codec => Some(Ok(c)),
                    Some(_) => Some(Err(())),
                };
            }
        }
        if let Some(started) = self.started
            && end.saturating_duration_since(started) >= Self::WINDOW
            && self.bytes >= Self::WINDOW_BYTES
        {
            self.close(end);
        }
    }

    /// Ends the window at `end`, and publishes what it measured.
    fn close(&mut self, end: Instant) {
        let Some(started) = self.started.take() else {
            return;
        };
        let auto = Arc::clone(&self.auto);
        // The sends not timed took as much per byte as those timed.
        let timed = self.cpu_bytes;
        let cpu_per_byte = (timed > 0).then(|| self.cpu_nanos as f64 / timed as f64);
        auto.add_own_cpu(pro_rata(self.cpu_nanos, timed, self.bytes));
        let wall = end.saturating_duration_since(started).as_secs_f64();
        let (busy, bytes) = (self.busy.as_secs_f64(), self.bytes as f64);
        let full = wall >= Self::WINDOW.as_secs_f64() && self.bytes >= Self::WINDOW_BYTES;
        let current = auto.codec();
        // What the link carried: the bytes sent, less what more of them still wait for the
        // peer than when the window began.
        let carried = match self.in_flight {
            (Some(before), Some(after)) => {
                Some(self.bytes.saturating_add(before).saturating_sub(after) as f64)
            }
            _ => None,
        };
        let mut speed = None;
        // What the other channels carried meanwhile: the link is theirs too. A channel whose
        // latest window ended more than a gap before this one began was not sending.
        let others = |auto: &Auto| -> f64 {
            (0..auto.channels.len())
                .filter(|&c| c != usize::from(self.channel))
                .filter_map(|c| lock(&auto.channels[c]).recent)
                .filter(|&(_, at)| at + Self::GAP >= started)
                .map(|(rate, _)| rate)
                .sum()
        };
        if full && busy > 0.0 {
            if busy >= Self::BUSY * wall {
                self.windows += 1;
                // The link ran full all window (its socket was full at least half of it, and
                // held bytes the rest): what it carried over the window's time. Without that
                // figure, the bytes over the time spent sending them, which is as much but
                // overstates a link whose socket had room (its sends return at memory speed).
                // A window that carried nothing (a stall) measured a very slow link, not none.
                // With what the other channels carried, that is the whole link's rate: a
                // channel alone on it for a while (the others waiting for their pages) takes
                // all of it, not its share.
                let own = carried.map_or(bytes / busy, |carried| carried / wall);
                let sample = (own + others(&auto)).max(1.0);
                self.rate = match (self.windows, self.rate) {
                    (1, _) => 0.0,
                    (_, rate) if rate > 0.0 => rate + Self::WEIGHT * (sample - rate),
                    _ => sample,
                };
            } else if self.rate > 0.0 {
                // The link kept up with everything it was given: at least this fast.
                self.rate = self
                    .rate
                    .max(carried.unwrap_or(bytes) / wall + others(&auto));
            }
            if let Some(cpu) = cpu_per_byte {
                self.cpu_per_byte = if self.cpu_per_byte > 0.0 {
                    self.cpu_per_byte + Self::WEIGHT * (cpu - self.cpu_per_byte)
                } else {
                    cpu
                };
            }
            // A window all of one codec, the channel's codec now, that sent enough pages
            // to measure its speed.
            if let Some(Ok(codec)) = self.codec
                && codec == current
                && self.nonzero >= Self::WINDOW_BYTES / PAGE_SIZE as u64 / 2
            {
                let i = usize::from(codec_index(codec));
                speed = self.speed[i]
                    .push(wall * 1e9 / self.nonzero as f64)
                    .map(|ns| (i, ns));
            }
        }
        // Speeds measured before the session last switched away are not counted again.
        for (i, windows) in self.speed.iter_mut().enumerate() {
            if i != usize::from(codec_index(current)) {
                *windows = Windows::default();
            }
        }
        if full && let Some(state) = auto.channels.get(usize::from(self.channel)) {
            let mut measured = lock(state);
            // A link that never held the writer up is faster than anything it was given.
            let rate = if self.rate > 0.0 {
                self.rate
            } else {
                f64::INFINITY
            };
            measured.link = Some(Link {
                bytes_per_sec: rate,
                cpu_ns_per_byte: self.cpu_per_byte,
            });
            measured.recent = Some((carried.unwrap_or(bytes) / wall, end));
            if let Some((i, ns)) = speed
                && let Some(slot) = measured.speed.get_mut(i)
            {
                *slot = Some((ns, end));
            }
        }
        self.last = None;
        self.busy = Duration::ZERO;
        self.bytes = 0;
        self.cpu_nanos = 0;
        self.cpu_bytes = 0;
        self.nonzero = 0;
        self.codec = None;
        self.in_flight = (None, None);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::Samples;

    const PAGE: f64 = PAGE_SIZE as f64;

    /// Half the non-zero pages compressible, 0.5 µs a page whatever the codec; lz4 5 µs to
    /// 2000 bytes, zstd 15 µs to 1000.
    fn model() -> Model {
        Model {
            gated: 0.5,
            base_ns: 500.0,
            codecs: [
                Some(CodecCost {
                    ns: 5_000.0,
                    bytes: 2_000.0,
                }),
                Some(CodecCost {
                    ns: 15_000.0,
                    bytes: 1_000.0,
                }),
            ],
        }
    }

    fn link(bytes_per_sec: f64) -> Link {
        Link {
            bytes_per_sec,
            cpu_ns_per_byte: 0.0,
        }
    }

    const ONE_CORE: Pipeline = Pipeline::Workers { cores: 1.0 };

    #[test]
    fn a_page_takes_the_slower_of_cpu_and_wire_with_workers_and_both_with_writers() {
        let (m, slow) = (model(), link(100e6));
        // Off: 4096 bytes at 100 MB/s is 40.96 µs on the wire, 0.5 µs of CPU.
        let off = page_time(&m, &slow, ONE_CORE, PageCompression::Off).expect("off");
        assert!((off - 40_960.0).abs() < 1e-6, "{off}");
        // lz4: (2048 + 1000) bytes, 30.48 µs on the wire; 3 µs of CPU.
        let lz4 = page_time(&m, &slow, ONE_CORE, PageCompression::Lz4).expect("lz4");
        assert!((lz4 - 30_480.0).abs() < 1e-6, "{lz4}");
        // With the writer encoding, CPU and wire add up.
        let serial = page_time(&m, &slow, Pipeline::Writer, PageCompression::Lz4).expect("lz4");
        assert!((serial - 33_480.0).abs() < 1e-6, "{serial}");
        // Half a core doubles the CPU time: zstd's 8 µs becomes 16, still under the wire's
        // (2048 + 500) bytes = 25.48 µs.
        let half = Pipeline::Workers { cores: 0.5 };
        let zstd = page_time(&m, &slow, half, PageCompression::Zstd).expect("zstd");
        assert!((zstd - 25_480.0).abs() < 1e-6, "{zstd}");
        // The writer's CPU per byte counts as CPU: 1 ns a byte on a fast link.
        let costly = Link {
            bytes_per_sec: 100e9,
            cpu_ns_per_byte: 1.0,
        };
        let off = page_time(&m, &costly, ONE_CORE, PageCompression::Off).expect("off");
        assert!((off - (500.0 + PAGE)).abs() < 1e-6, "{off}");
    }

    #[test]
    fn an_unmeasured_codec_has_no_time_and_an_unbounded_link_no_wire_time() {
        let mut m = model();
        m.codecs[1] = None;
        let fast = link(f64::INFINITY);
        assert_eq!(page_time(&m, &fast, ONE_CORE, PageCompression::Zstd), None);
        assert_eq!(
            page_time(&m, &fast, ONE_CORE, PageCompression::Off),
            Some(500.0)
        );
        assert_eq!(
            page_time(&m, &fast, ONE_CORE, PageCompression::Lz4),
            Some(3_000.0)
        );
    }

    /// [`estimates`] on one core, off the current codec.
    fn off_now(
        m: &Model,
        link: &Link,
        measured: [Option<f64>; 3],
        remembered: [Option<Scale>; 3],
    ) -> [Option<f64>; 3] {
        estimates(
            m,
            link,
            ONE_CORE,
            &measured,
            &remembered,
            PageCompression::Off,
        )
    }

    #[test]
    fn measured_speeds_stand_and_predictions_are_scaled_by_the_current_codecs_error() {
        let (m, slow) = (model(), link(100e6));
        // Off predicted 40.96 µs, measured 61.44: every prediction is taken 1.5 times.
        let off_measured = |measured| off_now(&m, &slow, measured, [None; 3]);
        let e = off_measured([Some(61_440.0), None, Some(20_000.0)]);
        assert_eq!(e[0], Some(61_440.0));
        assert!((e[1].expect("lz4") - 30_480.0 * 1.5).abs() < 1e-6, "{e:?}");
        assert_eq!(e[2], Some(20_000.0), "measured beats predicted");
        // The scale stays within ½ and 2.
        let e = off_measured([Some(1e9), None, None]);
        assert!((e[1].expect("lz4") - 30_480.0 * 2.0).abs() < 1e-6, "{e:?}");
        let e = off_measured([Some(1.0), None, None]);
        assert!((e[1].expect("lz4") - 30_480.0 * 0.5).abs() < 1e-6, "{e:?}");
    }

    /// The current codec's error scales the part that bounds its prediction, in every
    /// codec's prediction: a CPU-bound codec measured faster than predicted makes the others'
    /// CPU cheaper, not the link faster.
    #[test]
    fn the_current_codecs_error_scales_the_part_that_bounds_it() {
        let (m, gb) = (model(), link(1e9));
        let half = Pipeline::Workers { cores: 0.5 };
        // lz4 is CPU-bound at 6 µs (3 µs over half a core; 3.048 on the wire) and measured at
        // 3.6: CPU parts count 0.6. Off stays bound by its wire, 4.096 µs, slower than lz4's
        // 3.6 (scaled whole, it would have been 2.46 and won); zstd's 16 µs of CPU count 9.6.
        let lz4 = page_parts(&m, &gb, half, PageCompression::Lz4).expect("lz4");
        assert!((lz4.cpu - 6_000.0).abs() < 1e-6 && (lz4.link - 3_048.0).abs() < 1e-6);
        let measured = [None, Some(3_600.0), None];
        let e = estimates(&m, &gb, half, &measured, &[None; 3], PageCompression::Lz4);
        assert!((e[0].expect("off") - 4_096.0).abs() < 1e-6, "{e:?}");
        assert!((e[2].expect("zstd") - 9_600.0).abs() < 1e-6, "{e:?}");
        assert_eq!(choose(&e, PageCompression::Lz4), PageCompression::Lz4);
        // Off is bound by the wire and measured 1.5 times its prediction: wire parts count
        // 1.5, CPU parts as predicted (lz4 stays at its 6 µs of CPU).
        let measured = [Some(6_144.0), None, None];
        let e = estimates(&m, &gb, half, &measured, &[None; 3], PageCompression::Off);
        assert!((e[1].expect("lz4") - 6_000.0).abs() < 1e-6, "{e:?}");
        assert!((e[2].expect("zstd") - 16_000.0).abs() < 1e-6, "{e:?}");
    }

    /// A codec measured before is taken at the error its own prediction had then, not at the
    /// current codec's: at 250 MB/s lz4 was predicted 16.3 µs a page, measured 22.8, and
    /// predicted 14.7–16.3 again each time its measurement lapsed.
    #[test]
    fn a_codec_measured_before_is_taken_at_its_own_error() {
        let (m, slow) = (model(), link(100e6));
        let lz4 = page_parts(&m, &slow, ONE_CORE, PageCompression::Lz4).expect("lz4");
        // Off measured as predicted; lz4 measured 1.4 times its (link-bound) prediction.
        let measured = [Some(40_960.0), None, None];
        let lz4_error = calibration(lz4.time() * 1.4, lz4).expect("calibration");
        assert_eq!(
            lz4_error,
            Scale {
                cpu: 1.0,
                link: 1.4
            }
        );
        let remembered = [None, Some(lz4_error), None];
        let off_measured = |measured| off_now(&m, &slow, measured, remembered);
        let e = off_measured(measured);
        let lz4_time = lz4.time() * 1.4;
        assert!((e[1].expect("lz4") - lz4_time).abs() < 1e-6, "{e:?}");
        // zstd, never measured, is taken at off's error (none).
        let zstd = page_time(&m, &slow, ONE_CORE, PageCompression::Zstd).expect("zstd");
        assert!((e[2].expect("zstd") - zstd).abs() < 1e-6, "{e:?}");
        // A measured speed still beats a remembered error.
        let e = off_measured([Some(40_960.0), Some(1_000.0), None]);
        assert_eq!(e[1], Some(1_000.0));
        // Nothing to calibrate by: no time, or a time that is not a number.
        let zero = Parts {
            cpu: 0.0,
            link: 0.0,
            serial: false,
        };
        assert_eq!(calibration(1.0, zero), None);
        assert_eq!(calibration(f64::NAN, lz4), None);
    }

    /// A codec measured before is tried again 4 s after it was last measured, 8 s after the
    /// next time, and so on; one never measured at once.
    #[test]
    fn a_codec_measured_before_is_tried_again_ever_later() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut h = History::default();
        assert!(h.may_try(t0));
        h.measured_at = Some(t0);
        assert!(!h.may_try(t0 + s(3)));
        assert!(h.may_try(t0 + s(4)));
        h.retries = 1;
        assert!(!h.may_try(t0 + s(7)));
        assert!(h.may_try(t0 + s(8)));
        // However many retries, the wait stops growing (at three days) and never overflows.
        h.retries = u32::MAX;
        assert!(!h.may_try(t0 + s(4 << 15)));
        assert!(h.may_try(t0 + s(4 << 16)));
        // A clock read before the measurement (another thread's) is no later than it.
        h.retries = 0;
        h.measured_at = Some(t0 + s(10));
        assert!(!h.may_try(t0));
    }

    /// Figures from the shaped bench's logs, off's time per page against its link's.
    #[test]
    fn only_a_channel_that_waits_on_its_link_tries_another_codec() {
        let parts = |link| {
            Some(Parts {
                cpu: 1_000.0,
                link,
                serial: false,
            })
        };
        // 1 GB/s: 7.35 µs a page, 6.03 of them the link's.
        assert!(waits_on_link(Some(7_350.0), parts(6_030.0)));
        // Unshaped: 4.65 µs a page, the link's 2.53.
        assert!(!waits_on_link(Some(4_650.0), parts(2_530.0)));
        // An unbounded link, or nothing measured or predicted: no.
        assert!(!waits_on_link(Some(4_650.0), parts(0.0)));
        assert!(!waits_on_link(None, parts(6_030.0)));
        assert!(!waits_on_link(Some(7_350.0), None));
    }

    #[test]
    fn a_codec_not_measured_yet_is_tried_when_it_comes_close() {
        use PageCompression::{Lz4, Off, Zstd};
        let off_only = [true, false, false];
        // lz4 within 1.5 times off's time; zstd not.
        assert_eq!(
            trial(&[Some(100.0), Some(140.0), Some(160.0)], &off_only, Off),
            Some(Lz4)
        );
        // The closest of those not measured.
        let both = [Some(100.0), Some(145.0), Some(120.0)];
        assert_eq!(trial(&both, &off_only, Off), Some(Zstd));
        assert_eq!(trial(&both, &[true, false, true], Off), Some(Lz4));
        // Nothing close, or everything measured: no trial.
        assert_eq!(
            trial(&[Some(100.0), Some(151.0), None], &off_only, Off),
            None
        );
        assert_eq!(trial(&both, &[true; 3], Off), None);
        // Never the current codec, nothing without an estimate for it, nothing not a number.
        assert_eq!(trial(&[Some(100.0), None, None], &[false; 3], Off), None);
        assert_eq!(trial(&[None, Some(1.0), None], &[false; 3], Off), None);
        assert_eq!(
            trial(&[Some(100.0), Some(f64::NAN), None], &off_only, Off),
            None
        );
    }

    #[test]
    fn the_current_codec_stays_unless_another_is_a_tenth_faster() {
        use PageCompression::{Lz4, Off, Zstd};
        assert_eq!(choose(&[Some(100.0), Some(91.0), None], Off), Off);
        assert_eq!(choose(&[Some(100.0), Some(89.0), None], Off), Lz4);
        assert_eq!(choose(&[Some(100.0), Some(89.0), Some(50.0)], Off), Zstd);
        assert_eq!(choose(&[Some(60.0), Some(89.0), Some(55.0)], Zstd), Zstd);
        // Without an estimate for the current codec, the fastest known one.
        assert_eq!(choose(&[Some(60.0), None, None], Lz4), Off);
        assert_eq!(choose(&[None, None, None], Zstd), Zstd);
        // Nothing that is not a number wins.
        assert_eq!(choose(&[Some(100.0), Some(f64::NAN), None], Off), Off);
    }

    fn codec() -> impl Strategy<Value = PageCompression> {
        prop_oneof![
            Just(PageCompression::Off),
            Just(PageCompression::Lz4),
            Just(PageCompression::Zstd),
        ]
    }

    fn cost() -> impl Strategy<Value = Option<CodecCost>> {
        proptest::option::of(
            (0.0..100_000.0f64, 0.0..8192.0f64).prop_map(|(ns, bytes)| CodecCost { ns, bytes }),
        )
    }

    fn any_model() -> impl Strategy<Value = Model> {
        (0.0..=1.0f64, 0.0..10_000.0f64, cost(), cost()).prop_map(|(gated, base_ns, a, b)| Model {
            gated,
            base_ns,
            codecs: [a, b],
        })
    }

    proptest! {
        /// A switch goes to the fastest estimate, and only when it beats the current codec's by
        /// the hysteresis; a codec without an estimate is never picked.
        #[test]
        fn choose_switches_only_to_a_clearly_faster_known_codec(
            times in proptest::array::uniform3(proptest::option::of(0.0..1e6f64)),
            current in codec(),
        ) {
            let next = choose(&times, current);
            if next != current {
                let t = times[usize::from(codec_index(next))];
                prop_assert!(t.is_some());
                let t = t.unwrap_or(f64::INFINITY);
                prop_assert!(times.iter().flatten().all(|&o| t <= o));
                if let Some(now) = times[usize::from(codec_index(current))] {
                    prop_assert!(t < now * (1.0 - HYSTERESIS));
                }
            }
        }

        /// A trial is of another codec, not measured yet, estimated within [`TRIAL`] times
        /// the current codec's time, and the fastest such.
        #[test]
        fn a_trial_is_of_a_close_codec_not_measured(
            times in proptest::array::uniform3(proptest::option::of(0.0..1e6f64)),
            known in proptest::array::uniform3(proptest::bool::ANY),
            current in codec(),
        ) {
            let now = times[usize::from(codec_index(current))];
            if let Some(tried) = trial(&times, &known, current) {
                let i = usize::from(codec_index(tried));
                prop_assert_ne!(tried, current);
                prop_assert!(!known[i]);
                let (t, now) = (times[i].unwrap_or(f64::INFINITY), now.unwrap_or(0.0));
                prop_assert!(t < now * TRIAL);
                for (j, other) in times.iter().enumerate() {
                    if j != i && CODECS[j] != current && !known[j]
                        && let Some(o) = other
                    {
                        prop_assert!(t <= *o);
                    }
                }
            } else if let Some(now) = now {
                for (j, other) in times.iter().enumerate() {
                    if CODECS[j] != current && !known[j]
                        && let Some(o) = other
                    {
                        prop_assert!(*o >= now * TRIAL);
                    }
                }
            }
        }

        /// A faster link or more cores never make a page slower.
        #[test]
        fn more_link_or_cores_never_cost_time(
            m in any_model(),
            rate in 1e6..1e11f64,
            more in 1.0..100.0f64,
            cores in 0.1..8.0f64,
            cpu_per_byte in 0.0..2.0f64,
            c in codec(),
        ) {
            let slow = Link { bytes_per_sec: rate, cpu_ns_per_byte: cpu_per_byte };
            let fast = Link { bytes_per_sec: rate * more, ..slow };
            let few = Pipeline::Workers { cores };
            let many = Pipeline::Workers { cores: cores * more };
            for pipeline in [few, Pipeline::Writer] {
                let (a, b) = (page_time(&m, &slow, pipeline, c), page_time(&m, &fast, pipeline, c));
                if let (Some(a), Some(b)) = (a, b) {
                    prop_assert!(b <= a * (1.0 + 1e-9), "{a} {b}");
                }
            }
            let (a, b) = (page_time(&m, &slow, few, c), page_time(&m, &slow, many, c));
            if let (Some(a), Some(b)) = (a, b) {
                prop_assert!(b <= a * (1.0 + 1e-9), "{a} {b}");
            }
        }

        /// On an unbounded link with free sends, compressing only adds CPU: off is never beaten.
        #[test]
        fn nothing_beats_off_on_an_unbounded_link(m in any_model(), cores in 0.1..8.0f64) {
            let fast = link(f64::INFINITY);
            for pipeline in [Pipeline::Workers { cores }, Pipeline::Writer] {
                let t = CODECS.map(|c| page_time(&m, &fast, pipeline, c));
                let measured = [t[0], None, None];
                let estimated =
                    estimates(&m, &fast, pipeline, &measured, &[None; 3], PageCompression::Off);
                prop_assert_eq!(choose(&estimated, PageCompression::Off), PageCompression::Off);
            }
        }
    }

    #[test]
    fn a_speed_stands_on_the_median_of_its_windows_after_the_first() {
        let mut w = Windows::default();
        assert_eq!(w.push(1e9), None, "the first window is left out");
        assert_eq!(w.push(10.0), None);
        assert_eq!(w.push(30.0), None);
        assert_eq!(w.push(20.0), Some(20.0));
        // A stall in one window does not move it.
        assert_eq!(w.push(5000.0), Some(30.0));
        assert_eq!(w.push(25.0), Some(25.0));
        // Only the last five count.
        for _ in 0..5 {
            w.push(7.0);
        }
        assert_eq!(w.push(7.0), Some(7.0));
    }

    #[test]
    fn proc_stat_lines_parse_to_idle_and_total() {
        let line = "cpu  3626354 39126 953009 4852830 537800 0 61094 9041 10 0";
        let total = 3626354 + 39126 + 953009 + 4852830 + 537800 + 61094 + 9041;
        assert_eq!(parse_ticks(line), Some((4852830 + 537800, total)));
        assert_eq!(parse_ticks("cpu0 1 2 3 4 5"), None);
        assert_eq!(parse_ticks("cpu 1 2 x 4"), None);
        assert_eq!(parse_ticks("cpu 1 2"), None);
        assert_eq!(parse_ticks(""), None);
    }

    #[test]
    fn the_cores_are_what_the_session_used_and_nobody_used() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut meter = CpuMeter {
            threads: 4.0,
            cpus: 2.0,
            at: Some((t0, 0, 1_000, 10_000)),
            cores: None,
        };
        // Within the window nothing is measured yet.
        assert_eq!(meter.cores_with(0, t0 + ms(10), 2.0, || Some((0, 0))), None);
        // 100 ms on 2 CPUs (20 ticks): 5 ticks idle is half a core; the session used 50 ms of
        // CPU in it, another half.
        let cores = meter.cores_with(50_000_000, t0 + ms(100), 2.0, || Some((1_005, 10_020)));
        assert!((cores.expect("measured") - 1.0).abs() < 1e-9, "{cores:?}");
        // The next window, all idle: 2 cores (at most the CPUs), averaged with the last.
        let cores = meter.cores_with(50_000_000, t0 + ms(200), 2.0, || Some((1_025, 10_040)));
        assert!((cores.expect("measured") - 1.5).abs() < 1e-9, "{cores:?}");
        // Never below a quarter of a core; without /proc/stat, every core.
        let mut busy = CpuMeter::new(4);
        busy.at = Some((t0, 0, 0, 0));
        let cores = busy.cores_with(0, t0 + ms(100), 2.0, || Some((0, 20)));
        assert_eq!(cores, Some(0.25));
        let cores = busy.cores_with(0, t0 + ms(200), 2.0, || None);
        assert_eq!(cores, Some(2.0));
    }

    fn samples(taken: &[(u32, u32)]) -> Samples {
        let mut s = Samples::default();
        for (i, t) in taken.iter().enumerate() {
            s.taken[i] = *t;
        }
        s.count = taken.len();
        s
    }

    #[test]
    fn costs_take_the_median_time_and_mean_size_and_leave_the_codecs_out_of_the_base() {
        let mut costs = Costs::default();
        assert_eq!(costs.model(), None);
        costs.add(&Tally {
            nonzero: 100,
            looked: 100,
            gated: 50,
            compressed: [50, 0],
            // 50 lz4 pages at 4 µs, and 1 µs for each of the 100 pages.
            batches: 2,
            timed_batches: 2,
            batch_nanos: 50 * 4_000 + 100 * 1_000,
            sample_nanos: 0,
            // One sample held up 1 ms by an interrupt.
            samples: [
                samples(&[(4_000, 2_000), (1_000_000, 2_000), (3_000, 1_000)]),
                samples(&[]),
            ],
        });
        let m = costs.model().expect("model");
        assert_eq!(m.gated, 0.5);
        assert_eq!(
            m.codecs[0],
            Some(CodecCost {
                ns: 4_000.0,
                bytes: 5_000.0 / 3.0
            })
        );
        assert_eq!(m.codecs[1], None);
        assert!((m.base_ns - 1_000.0).abs() < 1e-9, "{m:?}");
        // The sums halve as they grow; the shares stay.
        for _ in 0..100 {
            costs.add(&Tally {
                nonzero: 100,
                looked: 100,
                gated: 25,
                ..Tally::default()
            });
        }
        assert!(costs.nonzero <= Costs::KEEP_PAGES);
        let m = costs.model().expect("model");
        assert!((m.gated - 0.25).abs() < 0.02, "{m:?}");
    }

    /// A run of back-to-back sends of `bytes` each `every` apart (the writer busy `busy` of
    /// it), `count` of them, holding `nonzero` pages of `codec` each; returns when they end.
    #[allow(clippy::too_many_arguments)]
    fn sends(
        meter: &mut LinkMeter,
        from: Instant,
        count: u32,
        every: Duration,
        busy: Duration,
        bytes: u64,
        nonzero: u32,
        codec: PageCompression,
    ) -> Instant {
        let mut at = from;
        for _ in 0..count {
            let holds = [Holds { nonzero, codec }];
            meter.record(
                (at + every - busy, at + every),
                bytes,
                holds.into_iter(),
                None,
                (None, None),
            );
            at += every;
        }
        at
    }

    fn measured(auto: &Auto) -> Measured {
        *lock(&auto.channels[0])
    }

    #[test]
    fn a_writer_measures_its_link_only_while_it_waits_on_it() {
        use PageCompression::Off;
        let auto = Arc::new(Auto::new(1, 2, true, Log::default()));
        let mut meter = LinkMeter::new(Arc::clone(&auto), 0);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // 1 MiB every 10 ms, all of it spent sending: 100 MiB/s. The first window is left
        // out; until a window measures the link, it is unbounded.
        let t = sends(&mut meter, t0, 1, ms(10), ms(10), 1 << 20, 256, Off);
        let link = measured(&auto).link.expect("published");
        assert!(link.bytes_per_sec.is_infinite());
        let t = sends(&mut meter, t, 1, ms(10), ms(10), 1 << 20, 256, Off);
        let rate = measured(&auto).link.expect("link").bytes_per_sec;
        assert!((rate - 104_857_600.0).abs() < 1.0, "{rate}");
        // A window mostly idle (a 1 ms send every 10 ms): the link kept up, so it is at least
        // as fast as it went, 1 MiB in 31 ms: slower than measured, so no change.
        let t = sends(&mut meter, t, 4, ms(10), ms(1), 1 << 18, 64, Off);
        let rate = measured(&auto).link.expect("link").bytes_per_sec;
        assert!((rate - 104_857_600.0).abs() < 1.0, "{rate}");
        // Off's speed: the median of three windows after the first, 10 ms per 256 pages
        // (the idle window's 31 ms is the odd one out).
        assert_eq!(measured(&auto).speed[0], None);
        let t = sends(&mut meter, t, 1, ms(10), ms(10), 1 << 20, 256, Off);
        let (ns, _) = measured(&auto).speed[0].expect("speed");
        assert!((ns - 10e6 / 256.0).abs() < 1.0, "{ns}");
        // A wait of more than 20 ms ends the window and is not counted: two sends 5 ms each
        // around a 30 ms wait make two windows too short to count, not one of 40 ms.
        let t = sends(&mut meter, t + ms(30), 1, ms(5), ms(5), 1 << 20, 256, Off);
        let t = sends(&mut meter, t + ms(30), 1, ms(5), ms(5), 1 << 20, 256, Off);
        let (ns, _) = measured(&auto).speed[0].expect("speed");
        assert!((ns - 10e6 / 256.0).abs() < 1.0, "{ns}");
        // A window of frames of another codec than the session's says nothing of speeds.
        sends(
            &mut meter,
            t,
            2,
            ms(10),
            ms(10),
            1 << 20,
            64,
            PageCompression::Lz4,
        );
        assert_eq!(measured(&auto).speed[1], None);
    }

    /// Where the link tells what waits for the peer, the link's rate is what it carried over
    /// the window's time: a socket that took each 1 MiB send whole in 10 ms while its queue
    /// grew by 768 KiB carried 256 KiB per 10 ms, not the 1 MiB its sends suggest. Where the
    /// link cannot tell, the sends' own time stands in.
    #[test]
    fn a_link_is_measured_by_what_it_carried_where_it_tells() {
        use PageCompression::Off;
        let auto = Arc::new(Auto::new(1, 2, true, Log::default()));
        let mut meter = LinkMeter::new(Arc::clone(&auto), 0);
        let ms = Duration::from_millis;
        let mut at = Instant::now();
        let mut queued = 0u64;
        let mut send = |meter: &mut LinkMeter, at: &mut Instant, tells: bool| {
            let before = queued;
            queued += 768 << 10;
            let holds = [Holds {
                nonzero: 256,
                codec: Off,
            }];
            let in_flight = if tells {
                (Some(before), Some(queued))
            } else {
                (None, None)
            };
            meter.record(
                (*at, *at + ms(10)),
                1 << 20,
                holds.into_iter(),
                None,
                in_flight,
            );
            *at += ms(10);
        };
        // What waits before a send counts only where it opens a window: the first, and one
        // after a wait of more than 20 ms.
        assert!(meter.opens_window(at));
        meter.record(
            (at, at + ms(1)),
            1 << 10,
            [].into_iter(),
            None,
            (Some(0), Some(0)),
        );
        assert!(!meter.opens_window(at + ms(21)));
        assert!(meter.opens_window(at + ms(22)));
        at += ms(30);
        // The first window is left out; the second measures.
        send(&mut meter, &mut at, true);
        send(&mut meter, &mut at, true);
        let rate = measured(&auto).link.expect("link").bytes_per_sec;
        assert!((rate - 26_214_400.0).abs() < 1.0, "{rate}");
        // A window whose end the link did not tell: 1 MiB in 10 ms of sending.
        send(&mut meter, &mut at, false);
        let rate = measured(&auto).link.expect("link").bytes_per_sec;
        let expected = 26_214_400.0 + LinkMeter::WEIGHT * (104_857_600.0 - 26_214_400.0);
        assert!((rate - expected).abs() < 1.0, "{rate}");
        // A queue that reads larger than what was sent into it (nothing carried: a stall)
        // makes a slow link, neither a negative rate nor an unmeasured (unbounded) one.
        meter.record(
            (at, at + ms(10)),
            1 << 20,
            [Holds {
                nonzero: 256,
                codec: Off,
            }]
            .into_iter(),
            None,
            (Some(0), Some(u64::MAX)),
        );
        let rate = measured(&auto).link.expect("link").bytes_per_sec;
        assert!(rate > 0.0 && rate < expected, "{rate}");
    }

    /// A writer times one send in eight; the others are taken to cost as much per byte.
    #[test]
    fn a_writer_times_one_send_in_eight() {
        let auto = Arc::new(Auto::new(1, 1, true, Log::default()));
        let mut meter = LinkMeter::new(Arc::clone(&auto), 0);
        let timed: Vec<bool> = (0..17).map(|_| meter.times_next()).collect();
        let expected: Vec<bool> = (0..17).map(|i| i % 8 == 0).collect();
        assert_eq!(timed, expected);
        // One window of eight sends of 128 KiB, the first taking 2 µs of CPU.
        let at = Instant::now();
        let step = Duration::from_micros(1250);
        for i in 0..8u32 {
            let start = at + step * i;
            let cpu = (i == 0).then_some(2_000);
            let holds = [Holds {
                nonzero: 32,
                codec: PageCompression::Off,
            }];
            meter.record(
                (start, start + step),
                128 << 10,
                holds.into_iter(),
                cpu,
                (None, None),
            );
        }
        let link = measured(&auto).link.expect("link");
        assert!(
            (link.cpu_ns_per_byte - 2_000.0 / 131_072.0).abs() < 1e-12,
            "{link:?}"
        );
        assert_eq!(auto.own_cpu.load(Ordering::Relaxed), 16_000);
    }

    /// Channels share their link: each measures the whole of it, with what the others
    /// carried meanwhile, and a channel's part is its share. Two channels that each send 1 MiB
    /// per 10 ms while waiting on the link measure 2 MiB per 10 ms, and get half; one that then
    /// has the link to itself and sends 2 MiB per 10 ms measures the same link, not one twice
    /// as fast (once the other's last window is more than a gap, 20 ms, behind).
    #[test]
    fn channels_measure_the_link_they_share() {
        use PageCompression::Off;
        let auto = Arc::new(Auto::new(2, 2, true, Log::default()));
        let mut meters = [
            LinkMeter::new(Arc::clone(&auto), 0),
            LinkMeter::new(Arc::clone(&auto), 1),
        ];
        let ms = Duration::from_millis;
        let holds = || {
            [Holds {
                nonzero: 256,
                codec: Off,
            }]
            .into_iter()
        };
        let whole = |channel: usize| {
            lock(&auto.channels[channel])
                .link
                .expect("link")
                .bytes_per_sec
        };
        let mut at = Instant::now();
        for _ in 0..4 {
            for meter in &mut meters {
                meter.record((at, at + ms(10)), 1 << 20, holds(), None, (None, None));
            }
            at += ms(10);
        }
        let link = 2.0 * 104_857_600.0;
        for channel in 0..2 {
            assert!((whole(channel) - link).abs() < 1.0, "{}", whole(channel));
        }
        let (shared, _) = auto.measured(at).expect("measured");
        assert!(
            (shared.bytes_per_sec - link / 2.0).abs() < 1.0,
            "{shared:?}"
        );
        // Channel 1 waits for pages; channel 0 has the link to itself.
        for _ in 0..16 {
            meters[0].record((at, at + ms(10)), 2 << 20, holds(), None, (None, None));
            at += ms(10);
        }
        assert!((whole(0) / link - 1.0).abs() < 0.01, "{}", whole(0));
    }

    #[test]
    fn auto_compresses_once_measured_slow_and_goes_back_when_measured_slower() {
        use PageCompression::{Lz4, Off};
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let log = {
            let lines = Arc::clone(&lines);
            Log::new(move |l| lines.lock().expect("lines").push(l.to_owned()))
        };
        // Writers encode: no cores to measure first.
        let auto = Arc::new(Auto::new(1, 1, true, log));
        let mut meter = LinkMeter::new(Arc::clone(&auto), 0);
        let ms = Duration::from_millis;
        // lz4 halves a compressible page in 5 µs; zstd is not sampled.
        let tally = Tally {
            nonzero: 256,
            looked: 256,
            gated: 128,
            batches: 4,
            timed_batches: 4,
            batch_nanos: 256 * 500,
            samples: [samples(&[(5_000, 2_048); 4]), samples(&[])],
            ..Tally::default()
        };
        auto.fold(&tally);
        assert_eq!(auto.codec(), Off, "nothing measured yet");
        // A slow link: 1 MiB of raw pages every 40 ms, the writer waiting all along.
        let t = sends(
            &mut meter,
            Instant::now(),
            4,
            ms(40),
            ms(40),
            1 << 20,
            256,
            Off,
        );
        auto.fold(&tally);
        assert_eq!(auto.codec(), Lz4, "{:?}", lines.lock().expect("lines"));
        // lz4 goes slower than off did (the prediction was wrong): measured, it loses.
        sends(&mut meter, t, 4, ms(60), ms(60), 1 << 20, 256, Lz4);
        auto.fold(&tally);
        assert_eq!(auto.codec(), Off);
        let lines = lines.lock().expect("lines").clone();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].starts_with("compression auto: now lz4: "),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("compression auto: now off: "),
            "{lines:#?}"
        );
        assert!(lines[1].contains("lz4 234.38 measured"), "{lines:#?}");
    }
}

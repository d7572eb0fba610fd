//! A toy guest for demos, examples and stress runs: a "vCPU" thread that keeps writing pages of
//! guest memory, implementing [`Guest`] so a live migration can pause and resume it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::image::{self, ImageKind, Rng};
use crate::dirty::{CallerFed, DirtyBitmap, DirtyError, DirtySource, UffdWp};
use crate::error::BoxError;
use crate::live::Guest;
use crate::memory::{GuestMemory, PAGE_SIZE};

/// A running toy guest: one thread writing random pages (of `kind` content) of every region,
/// at `pages_per_second` or as fast as it can, and marking each in `log` (one bitmap per region)
/// if given, as a VMM's dirty log would.
#[derive(Debug)]
pub struct Workload {
    memory: Arc<GuestMemory>,
    log: Option<Arc<[DirtyBitmap]>>,
    pages_per_second: Option<u64>,
    kind: ImageKind,
    seed: u64,
    vcpu: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    writes: Arc<AtomicU64>,
    resumes: u64,
    handed_over: Option<bool>,
}

impl Workload {
    /// Starts writing.
    pub fn start(
        memory: &Arc<GuestMemory>,
        log: Option<Arc<[DirtyBitmap]>>,
        pages_per_second: Option<u64>,
        kind: ImageKind,
        seed: u64,
    ) -> Self {
        let mut workload = Workload {
            memory: Arc::clone(memory),
            log,
            pages_per_second,
            kind,
            seed,
            vcpu: None,
            writes: Arc::default(),
            resumes: 0,
            handed_over: None,
        };
        workload.run();
        workload
    }

    /// Starts a workload together with the dirty source that tracks it: userfaultfd write
    /// protection where the kernel allows it, else a bitmap per region that the workload marks
    /// (as a VMM's dirty log would). The third value says why userfaultfd could not be used.
    pub fn start_tracked(
        memory: &Arc<GuestMemory>,
        pages_per_second: Option<u64>,
        kind: ImageKind,
        seed: u64,
    ) -> (Workload, Box<dyn DirtySource>, Option<DirtyError>) {
        // A trial start, undone when the probe is dropped; the migration starts its own.
        let (source, log, why): (Box<dyn DirtySource>, _, _) = match UffdWp::new().start(memory) {
            Ok(()) => (Box::new(UffdWp::new()), None, None),
            Err(why) => {
                let bitmaps: Arc<[DirtyBitmap]> = memory
                    .regions()
                    .iter()
                    .map(|r| DirtyBitmap::new(r.layout().pages()))
                    .collect();
                let source = CallerFed::from_bitmaps(Arc::clone(&bitmaps));
                (Box::new(source), Some(bitmaps), Some(why))
            }
        };
        let workload = Workload::start(memory, log, pages_per_second, kind, seed);
        (workload, source, why)
    }

    /// Pages written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Whether the vCPU thread runs.
    pub fn is_running(&self) -> bool {
        self.vcpu.is_some()
    }

    /// How often [`Guest::resume`] restarted it.
    pub fn resumes(&self) -> u64 {
        self.resumes
    }

    /// Whether [`Guest::handed_over`] was called, and with what acknowledgement.
    pub fn handed_over(&self) -> Option<bool> {
        self.handed_over
    }

    fn run(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (memory, log, writes) = (
            Arc::clone(&self.memory),
            self.log.clone(),
            Arc::clone(&self.writes),
        );
        let (rate, kind) = (self.pages_per_second, self.kind);
        let seed = self.seed.wrapping_add(self.resumes);
        let vcpu = thread::Builder::new()
            .name("ramjet-vcpu".into())
            .spawn(move || {
                let mut rng = Rng::new(seed);
                let mut page = vec![0u8; PAGE_SIZE];
                let regions: Vec<u64> = memory
                    .regions()
                    .iter()
                    .map(|r| r.layout().pages())
                    .collect();
                let total: u64 = regions.iter().sum();
                let started = Instant::now();
                let mut done = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    if let Some(rate) = rate
                        && done as f64 >= started.elapsed().as_secs_f64() * rate as f64
                    {
                        thread::sleep(Duration::from_micros(100));
                        continue;
                    }
                    // A page of the whole guest, then its region.
                    let mut target = rng.below(total);
                    let mut region = 0;
                    while region + 1 < regions.len() && target >= regions[region] {
                        target -= regions[region];
                        region += 1;
                    }
                    image::fill_page(kind, &mut rng, &mut page);
                    // Writes fail only while a sender has the memory frozen, which it does only
                    // after pausing us: stop then.
                    if memory
                        .write(region, target * PAGE_SIZE as u64, &page)
                        .is_err()
                    {
                        break;
                    }
                    if let Some(bitmap) = log.as_ref().and_then(|log| log.get(region)) {
                        bitmap.set(target);
                    }
                    done += 1;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            });
        // A toy for tests and demos: a machine that cannot start one more thread cannot run
        // them either.
        let vcpu = vcpu.expect("cannot start the toy guest's vCPU thread");
        self.vcpu = Some((stop, vcpu));
    }

    /// Stops the vCPU thread and waits for it.
    fn stop(&mut self) -> Result<(), String> {
        let (stop, vcpu) = self.vcpu.take().ok_or("the guest is not running")?;
        stop.store(true, Ordering::Relaxed);
        vcpu.join()
            .map_err(|_| "the vCPU thread panicked".to_string())
    }
}

impl Guest for Workload {
    fn pause(&mut self) -> Result<(), BoxError> {
        Ok(self.stop()?)
    }

    fn device_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(format!("vcpu0: {} page writes", self.writes()).into_bytes())
    }

    fn resume(&mut self) {
        if self.vcpu.is_none() {
            self.resumes += 1;
            self.run();
        }
    }

    fn handed_over(&mut self, acknowledged: bool) {
        self.handed_over = Some(acknowledged);
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_writes_marks_pauses_and_resumes() {
        let memory = Arc::new(GuestMemory::anonymous(64 * PAGE_SIZE as u64).unwrap());
        let log: Arc<[DirtyBitmap]> = vec![DirtyBitmap::new(64)].into();
        let mut workload =
            Workload::start(&memory, Some(Arc::clone(&log)), None, ImageKind::Random, 1);
        while workload.writes() < 100 {
            thread::yield_now();
        }
        workload.pause().unwrap();
        assert!(!workload.is_running());
        assert!(workload.pause().is_err(), "already paused");
        let (writes, dirty) = (workload.writes(), log[0].count());
        assert!(dirty > 0 && dirty <= 64);
        thread::sleep(Duration::from_millis(5));
        assert_eq!(workload.writes(), writes, "paused means no writes");
        workload.resume();
        assert!(workload.is_running() && workload.resumes() == 1);
        let state = workload.device_state().unwrap();
        assert!(String::from_utf8(state).unwrap().starts_with("vcpu0: "));
    }
}

//! Leak checks: the file descriptors and threads of this process at one moment, compared with
//! a later moment once everything that is on its way out has gone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The file descriptors and threads of this process at one moment ([`Resources::now`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    fds: usize,
    /// Thread names (Linux's `comm`: the first 15 bytes), each with how many threads have it.
    threads: HashMap<String, usize>,
}

/// The name prefix of the kernel's io_uring worker threads, which the kernel ends on its own
/// time after their ring is closed.
const IO_URING_WORKER: &str = "iou-";

impl Resources {
    /// What the process holds now, once the io_uring workers of rings already closed are gone
    /// (waiting up to 10 s for them).
    pub fn now() -> Resources {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = Resources::read();
            let settled = !now.threads.keys().any(|n| n.starts_with(IO_URING_WORKER));
            if settled || Instant::now() >= deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn read() -> Resources {
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
        let mut threads = HashMap::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.filter_map(Result::ok) {
                // A thread that exited between the listing and this read is gone: skip it.
                if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
                    *threads.entry(name.trim().to_owned()).or_default() += 1;
                }
            }
        }
        Resources { fds, threads }
    }

    /// What the process holds beyond what it held at `self`, one line per kind ("2 file
    /// descriptors leaked", "threads leaked: ramjet-send-1, ..."), or nothing. Threads that are
    /// exiting (a joined thread can still be listed for a moment) and io_uring workers of
    /// closed rings get up to `patience` to go; whatever is still there then is named.
    pub fn leaks(&self, patience: Duration) -> Vec<String> {
        let deadline = Instant::now() + patience;
        loop {
            let leaks = self.compare(&Resources::read());
            if leaks.is_empty() || Instant::now() >= deadline {
                return leaks;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn compare(&self, after: &Resources) -> Vec<String> {
        let mut leaks = Vec::new();
        if after.fds > self.fds {
            leaks.push(format!("{} file descriptors leaked", after.fds - self.fds));
        }
        let mut extra: Vec<String> = after
            .threads
            .iter()
            .filter_map(|(name, &n)| {
                let before = self.threads.get(name).copied().unwrap_or(0);
                (n > before).then(|| format!("{name} (x{})", n - before))
            })
            .collect();
        if !extra.is_empty() {
            extra.sort();
            leaks.push(format!("threads leaked: {}", extra.join(", ")));
        }
        leaks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(fds: usize, threads: &[&str]) -> Resources {
        let mut counted = HashMap::new();
        for name in threads {
            *counted.entry((*name).to_owned()).or_default() += 1;
        }
        Resources {
            fds,
            threads: counted,
        }
    }

    /// (Pure: the unit tests share one process, whose threads come and go; the real check
    /// runs in `tests/leaks.rs`, a process of its own.)
    #[test]
    fn what_is_left_over_is_counted_and_named() {
        let before = resources(10, &["main", "worker", "worker"]);
        assert!(before.compare(&before).is_empty());
        assert!(
            before.compare(&resources(9, &["main"])).is_empty(),
            "fewer is no leak"
        );
        let after = resources(12, &["main", "worker", "worker", "worker", "ramjet-send-1"]);
        assert_eq!(
            before.compare(&after),
            [
                "2 file descriptors leaked",
                "threads leaked: ramjet-send-1 (x1), worker (x1)"
            ]
        );
        let now = Resources::now();
        assert!(now.fds > 0 && !now.threads.is_empty(), "{now:?}");
    }
}

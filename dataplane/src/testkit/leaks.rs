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

    #[test]
    fn a_thread_that_stays_is_named_and_one_that_ends_is_not_a_leak() {
        let before = Resources::now();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stays = std::thread::Builder::new()
            .name("leak-probe".into())
            .spawn(move || {
                let _ = stop_rx.recv();
            })
            .unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let leaks = before.leaks(Duration::from_millis(100));
        assert_eq!(leaks.len(), 2, "{leaks:?}");
        assert_eq!(leaks[0], "1 file descriptors leaked");
        assert_eq!(leaks[1], "threads leaked: leak-probe (x1)");
        drop(file);
        drop(stop_tx);
        stays.join().unwrap();
        // Joined: gone at once or within the patience.
        assert_eq!(before.leaks(Duration::from_secs(10)), Vec::<String>::new());
    }
}

//! The single-operation engine: submit one operation, wait for it with a deadline (cancelling
//! it when the time is up), and return only after its last completion. It is the one place
//! that lends buffers to the kernel, and its [`Runner::run`] carries the contract for it.

use std::io;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Submitter, cqueue, opcode, squeue, types};

/// The `user_data` of the operation in flight.
const OP: u64 = 1;
/// The `user_data` of the request that cancels it.
const CANCEL: u64 = 2;
/// Ring entries: the operation and its cancel, with room to spare.
const ENTRIES: u32 = 8;
/// Operations in flight per socket: one, so bytes on a stream never reorder.
const MAX_IN_FLIGHT: usize = 1;

/// A ring that runs one operation at a time, each to its last completion: at most
/// [`MAX_IN_FLIGHT`] is ever submitted, no call returns while it is in the kernel, and a ring
/// that breaks meanwhile stops the process ([`broken_ring`]).
pub(super) struct Runner {
    ring: IoUring,
    /// How long an operation may take before it is cancelled (`None`: forever).
    timeout: Option<Duration>,
    /// Operations submitted and not yet completed (at most [`MAX_IN_FLIGHT`]).
    in_flight: usize,
}

/// What the completions reaped so far say about the operation in flight.
#[derive(Default)]
struct Progress {
    /// The operation's result, once its (first) completion came.
    result: Option<i32>,
    /// A zero-copy notification is still to come.
    more: bool,
    /// The operation was asked to stop: its deadline passed.
    cancelled: bool,
    /// The cancel request has not completed yet.
    cancel_pending: bool,
}

impl Progress {
    /// Whether the kernel posted every completion it will post for the operation.
    fn done(&self) -> bool {
        self.result.is_some() && !self.more && !self.cancel_pending
    }

    /// Notes one completion: the cancel request's, the zero-copy notification, or the
    /// operation's result (and whether a notification is still to come).
    fn note(&mut self, user_data: u64, res: i32, flags: u32) {
        match user_data {
            CANCEL => self.cancel_pending = false,
            _ if cqueue::notif(flags) => self.more = false,
            _ => {
                self.result = Some(res);
                self.more = cqueue::more(flags);
            }
        }
    }

    /// The operation's result: `TimedOut` if it ended because it was cancelled.
    fn outcome(&self) -> io::Result<i32> {
        let res = self.result.unwrap_or(-libc::EIO);
        if self.cancelled && (res == -libc::ECANCELED || res == -libc::EINTR) {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(res)
    }
}

impl Runner {
    /// A new ring whose operations each get `timeout`.
    pub(super) fn new(timeout: Option<Duration>) -> io::Result<Runner> {
        Ok(Runner {
            ring: IoUring::new(ENTRIES)?,
            timeout,
            in_flight: 0,
        })
    }

    /// The ring's submitter, to register files and buffers: a registration lasts until it is
    /// undone or the ring is dropped.
    pub(super) fn submitter(&self) -> Submitter<'_> {
        self.ring.submitter()
    }

    /// Submits `entry` and waits for every completion it produces, the zero-copy notification
    /// included; returns the operation's result. When the timeout passes first, the operation
    /// is cancelled, its completion awaited all the same, and the result is `TimedOut`.
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points to must stay valid until this returns, which is after the
    /// kernel posted its last completion for it.
    pub(super) unsafe fn run(&mut self, entry: squeue::Entry) -> io::Result<i32> {
        if self.in_flight >= MAX_IN_FLIGHT {
            return Err(io::Error::other(
                "an operation is already in flight on this socket",
            ));
        }
        // SAFETY: the caller keeps the operation's buffers valid until we return.
        unsafe {
            self.ring
                .submission()
                .push(&entry.user_data(OP))
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        self.in_flight += 1;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut progress = Progress::default();
        while !progress.done() {
            if self.wait(deadline, &mut progress) {
                self.reap(&mut progress);
            }
        }
        self.in_flight -= 1;
        progress.outcome()
    }

    /// Submits and waits for a completion, until `deadline` unless the operation was already
    /// cancelled; returns whether to reap completions now. When the time is up it queues a
    /// request to cancel the operation and returns false: the next wait submits the request,
    /// and returns at once if completions are already posted.
    fn wait(&mut self, deadline: Option<Instant>, progress: &mut Progress) -> bool {
        let waited = match deadline {
            Some(deadline) if !progress.cancelled => {
                let left = deadline.saturating_duration_since(Instant::now());
                let ts = types::Timespec::from(left);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            _ => self.ring.submit_and_wait(1),
        };
        match waited {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                let cancel = opcode::AsyncCancel::new(OP).build().user_data(CANCEL);
                // SAFETY: a cancel request points to no buffer.
                if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
                    progress.cancelled = true;
                    progress.cancel_pending = true;
                }
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) || e.raw_os_error() == Some(libc::EBUSY) =>
            {
                true
            }
            // io_uring_enter fails otherwise only if the ring itself is broken.
            Err(e) => broken_ring(&e),
        }
    }

    /// Takes the completions the kernel posted and notes what they say.
    fn reap(&mut self, progress: &mut Progress) {
        // Copy the completions out of the ring before acting on them.
        let mut cqes = [(0u64, 0i32, 0u32); 8];
        let mut n = 0;
        for cqe in self.ring.completion().take(cqes.len()) {
            cqes[n] = (cqe.user_data(), cqe.result(), cqe.flags());
            n += 1;
        }
        for &(user_data, res, flags) in &cqes[..n] {
            progress.note(user_data, res, flags);
        }
    }
}

/// `io_uring_enter` failed for a reason other than a timeout or a signal (`EFAULT`, `EINVAL`,
/// `ENXIO`: the ring itself is broken) while an operation is in flight. Its buffers belong to
/// the caller, who would free or reuse them once we return, while the kernel may still write
/// into them; there is no safe way back, so the process stops here instead.
#[cold]
fn broken_ring(e: &io::Error) -> ! {
    eprintln!(
        "ramjet: the io_uring ring broke ({e}) with an operation in flight; stopping, since \
         the kernel may still use memory its owner would free"
    );
    std::process::abort()
}

//! The single-operation engine: submit one operation, wait for it with a deadline (cancelling
//! it when the time is up), and return only after its last completion, or, for a zero-copy
//! send whose buffers its owner keeps for longer, once its bytes are in the socket, leaving its
//! notification to be reaped later. It is the one place that lends buffers to the kernel, and
//! its [`Runner::run`] and [`Runner::run_lent`] carry the contract for it.

use std::io;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Submitter, cqueue, opcode, squeue, types};

/// The `user_data` of the request that cancels the operation in flight; operations are
/// numbered from [`FIRST_OP`] up.
const CANCEL: u64 = 1;
/// The `user_data` of the first operation.
const FIRST_OP: u64 = 16;
/// Ring entries: the operation and its cancel, with room to spare (the completion queue is
/// twice as large, and the kernel keeps completions that overflow it).
const ENTRIES: u32 = 8;
/// Operations in flight per socket: one, so bytes on a stream never reorder. (Zero-copy sends
/// whose notification is still to come are not in flight: their bytes are in the socket.)
const MAX_IN_FLIGHT: usize = 1;

/// A ring that runs one operation at a time: at most [`MAX_IN_FLIGHT`] is ever submitted, no
/// call returns while it is in the kernel (a zero-copy send run with [`Runner::run_lent`] is
/// back once its bytes are in the socket; only its notification is still to come), and a ring
/// that breaks meanwhile stops the process ([`broken_ring`]).
pub(super) struct Runner {
    ring: IoUring,
    /// How long an operation may take before it is cancelled (`None`: forever).
    timeout: Option<Duration>,
    /// Operations submitted and not yet completed (at most [`MAX_IN_FLIGHT`]).
    in_flight: usize,
    /// The `user_data` of the next operation.
    next_op: u64,
    /// Zero-copy sends run with [`Runner::run_lent`] whose notification has not come yet.
    unnotified: Vec<u64>,
    /// Those whose notification came, not yet taken by [`Runner::take_notified`].
    notified: Vec<u64>,
    /// Zero-copy notifications that said the kernel copied the bytes after all, and those
    /// that did not (only sends that ask, `IORING_SEND_ZC_REPORT_USAGE`, are told).
    copied: u64,
    in_place: u64,
}

/// `IORING_NOTIF_USAGE_ZC_COPIED` (linux/io_uring.h): set in a notification's result when the
/// kernel copied the send's bytes instead of reading them in place.
const NOTIF_COPIED: u32 = 1 << 31;

/// What the completions reaped so far say about the operation in flight.
struct Progress {
    /// The operation's `user_data`.
    op: u64,
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
    fn new(op: u64) -> Progress {
        Progress {
            op,
            result: None,
            more: false,
            cancelled: false,
            cancel_pending: false,
        }
    }

    /// Whether the kernel posted every completion it will post for the operation (but the
    /// notification, unless `notification` too).
    fn done(&self, notification: bool) -> bool {
        self.result.is_some() && !(notification && self.more) && !self.cancel_pending
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
            next_op: FIRST_OP,
            unnotified: Vec::new(),
            notified: Vec::new(),
            copied: 0,
            in_place: 0,
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
        // SAFETY: the caller keeps the buffers valid until we return, which `true` makes wait
        // for the notification too.
        unsafe { self.submit_and_wait(entry, true) }.map(|(res, _)| res)
    }

    /// [`run`](Self::run) for a zero-copy send that returns once the kernel took its bytes
    /// (its first completion), before the notification that it no longer reads the buffers.
    /// Returns the result and, if that notification is still to come, the operation's number,
    /// which [`take_notified`](Self::take_notified) gives back once it came. A send that
    /// failed after the kernel took some of its bytes is awaited the same way: then
    /// [`last_unnotified`](Self::last_unnotified) names it.
    ///
    /// # Safety
    ///
    /// The message header and iovecs `entry` points to must stay valid until this returns;
    /// the bytes they describe must stay valid and unchanged until the returned operation's
    /// notification was taken, or for good if the ring is dropped before.
    pub(super) unsafe fn run_lent(
        &mut self,
        entry: squeue::Entry,
    ) -> io::Result<(i32, Option<u64>)> {
        // SAFETY: the caller keeps the header until we return, and the bytes until the
        // notification, which `submit_and_wait` records when it does not wait for it.
        unsafe { self.submit_and_wait(entry, false) }
    }

    /// Zero-copy notifications so far that said the kernel copied, and that said it did not.
    pub(super) fn zero_copy_usage(&self) -> (u64, u64) {
        (self.copied, self.in_place)
    }

    /// The last operation run, if it was a lent send whose notification has not come.
    pub(super) fn last_unnotified(&self) -> Option<u64> {
        let last = self.next_op.checked_sub(1)?;
        self.unnotified.contains(&last).then_some(last)
    }

    /// Moves the numbers of the lent sends whose notification came since the last call to
    /// `out`, taking any completions already posted first (without waiting).
    pub(super) fn take_notified(&mut self, out: &mut Vec<u64>) {
        if !self.unnotified.is_empty() {
            self.reap(None);
        }
        out.append(&mut self.notified);
    }

    /// Waits until a notification of a lent send comes (for at most the timeout: then
    /// `TimedOut`); returns at once if one came and was not taken yet, or none is awaited.
    pub(super) fn wait_notified(&mut self) -> io::Result<()> {
        self.reap(None);
        let deadline = self.timeout.map(|t| Instant::now() + t);
        while self.notified.is_empty() && !self.unnotified.is_empty() {
            if !self.wait(deadline, None) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not release a zero-copy send's buffers in time",
                ));
            }
            self.reap(None);
        }
        Ok(())
    }

    /// Submits `entry` and waits for its completions, the notification too if `notification`;
    /// returns its result and, if its notification is still to come, its number.
    ///
    /// # Safety
    ///
    /// As [`run`](Self::run) if `notification`, else as [`run_lent`](Self::run_lent).
    unsafe fn submit_and_wait(
        &mut self,
        entry: squeue::Entry,
        notification: bool,
    ) -> io::Result<(i32, Option<u64>)> {
        if self.in_flight >= MAX_IN_FLIGHT {
            return Err(io::Error::other(
                "an operation is already in flight on this socket",
            ));
        }
        let op = self.next_op;
        self.next_op += 1;
        // SAFETY: the caller keeps the operation's buffers valid as long as the kernel may
        // use them.
        unsafe {
            self.ring
                .submission()
                .push(&entry.user_data(op))
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        self.in_flight += 1;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut progress = Progress::new(op);
        while !progress.done(notification) {
            if self.wait(deadline, Some(&mut progress)) {
                self.reap(Some(&mut progress));
            }
        }
        self.in_flight -= 1;
        // A notification still to come is awaited, even for a send that failed or was
        // cancelled after it took bytes: their buffers are lent until then.
        let more = progress.more.then_some(op);
        if let Some(op) = more {
            self.unnotified.push(op);
        }
        let res = progress.outcome()?;
        Ok((res, more))
    }

    /// Submits and waits for a completion, until `deadline` unless the operation in flight
    /// (`progress`) was already cancelled; returns whether to reap completions now. When the
    /// time is up it queues a request to cancel the operation in flight and returns false: the
    /// next wait submits the request, and returns at once if completions are already posted.
    /// With no operation in flight, a deadline that passes just returns false.
    fn wait(&mut self, deadline: Option<Instant>, progress: Option<&mut Progress>) -> bool {
        let cancelled = progress.as_ref().is_some_and(|p| p.cancelled);
        let waited = match deadline {
            Some(deadline) if !cancelled => {
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
                if let Some(progress) = progress {
                    let cancel = opcode::AsyncCancel::new(progress.op)
                        .build()
                        .user_data(CANCEL);
                    // SAFETY: a cancel request points to no buffer.
                    if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
                        progress.cancelled = true;
                        progress.cancel_pending = true;
                    }
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

    /// Takes the completions the kernel posted and notes what they say: about the operation
    /// in flight (`progress`), its cancel request, and lent sends' notifications.
    fn reap(&mut self, mut progress: Option<&mut Progress>) {
        loop {
            // Copy the completions out of the ring before acting on them.
            let mut cqes = [(0u64, 0i32, 0u32); 8];
            let mut n = 0;
            for cqe in self.ring.completion().take(cqes.len()) {
                cqes[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                n += 1;
            }
            for &(user_data, res, flags) in &cqes[..n] {
                if user_data == CANCEL {
                    if let Some(p) = progress.as_deref_mut() {
                        p.cancel_pending = false;
                    }
                } else if cqueue::notif(flags) {
                    if res.cast_unsigned() & NOTIF_COPIED != 0 {
                        self.copied += 1;
                    } else {
                        self.in_place += 1;
                    }
                    match progress.as_deref_mut() {
                        Some(p) if p.op == user_data => p.more = false,
                        _ => {
                            if let Some(at) = self.unnotified.iter().position(|&o| o == user_data) {
                                self.unnotified.swap_remove(at);
                                self.notified.push(user_data);
                            }
                        }
                    }
                } else if let Some(p) = progress.as_deref_mut()
                    && p.op == user_data
                {
                    p.result = Some(res);
                    p.more = cqueue::more(flags);
                }
            }
            if n < cqes.len() {
                break;
            }
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

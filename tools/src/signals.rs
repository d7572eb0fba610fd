//! Ctrl-C (SIGINT) and SIGTERM cancel the running migration cleanly: the handler only sets a
//! flag, and a watcher thread turns it into a cancel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use ramjet_dataplane::CancelHandle;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // An atomic store is async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handlers and starts a thread that, once a signal came, runs `first` (telling
/// the status machine about the user's cancel) and cancels `cancel`. A second signal gets the
/// default action back (stops the process).
pub fn cancel_on_interrupt(
    cancel: CancelHandle,
    first: impl FnOnce() + Send + 'static,
) -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is a plain C struct for which all-zero is a valid value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // The default action comes back after the first delivery.
        action.sa_flags = libc::SA_RESETHAND;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; `action`
        // lives across the call and the old action is not asked for.
        let installed = unsafe { libc::sigaction(signal, &raw const action, std::ptr::null_mut()) };
        if installed != 0 {
            anyhow::bail!(
                "cannot install a signal handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    thread::Builder::new()
        .name("ramjet-signals".into())
        .spawn(move || {
            while !INTERRUPTED.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
            eprintln!("ramjet: interrupted, cancelling the migration");
            first();
            cancel.cancel();
        })?;
    Ok(())
}

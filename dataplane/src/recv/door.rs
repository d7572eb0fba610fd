//! The door: while a session runs, someone keeps answering the listener.
//!
//! Once every channel is connected nothing else may join the session, but the listener is still
//! open, and a connection nobody accepts hangs in the kernel's backlog until its peer gives up.
//! So a [`Door`] thread accepts every newcomer and turns it away: a newcomer that sends a
//! ramjet hello within the hello timeout gets a refusal, "a migration is already being
//! received"; any other is closed. Each gets one log line. The door never touches the session:
//! no newcomer can fail, slow or end it.
//!
//! [`Door::close`] stops the thread (at once while it waits for a newcomer, within about 50 ms
//! while it reads a newcomer's hello) and joins it, after which the listener is the caller's again, to accept a
//! reconnecting sender, say. Dropping a door only tells the thread to stop; the thread scope
//! joins it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crate::session::{self, HelloError};
use crate::tls::TlsServer;
use crate::transport::{Listener, Stream, Wake};
use crate::wire::DecodeError;

use super::accept::{Opened, open, why_no_hello};
use super::options::{Log, ReceiveOptions};

/// What the door says to a newcomer that sent a hello.
pub(super) const BUSY: &str = "a migration is already being received";

/// The thread that refuses newcomers while a session runs; see the module docs.
#[derive(Debug)]
pub(super) struct Door<'scope> {
    closed: Arc<AtomicBool>,
    /// Ends the thread's wait for a newcomer at once (without it, within 50 ms).
    wake: Option<Arc<Wake>>,
    thread: Option<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope> Door<'scope> {
    /// Starts refusing newcomers on `listener`. If the thread cannot be started, says so in the
    /// log and returns a door that is already closed: newcomers then wait in the backlog, which
    /// is no reason to fail the session.
    pub(super) fn open<'env>(
        scope: &'scope Scope<'scope, 'env>,
        listener: &'env Listener,
        options: &ReceiveOptions,
    ) -> Door<'scope> {
        let closed = Arc::new(AtomicBool::new(false));
        let (log, hello_limit) = (options.log.clone(), options.hello_limit());
        let tls = options.tls.clone();
        let flag = Arc::clone(&closed);
        let wake = Wake::new().ok().map(Arc::new);
        let waker = wake.clone();
        let spawned = thread::Builder::new()
            .name("ramjet-door".into())
            .spawn_scoped(scope, move || {
                let turn = Turn {
                    log: &log,
                    hello_limit,
                    tls: tls.as_ref(),
                };
                run(listener, &turn, &flag, waker.as_deref());
            });
        let thread = match spawned {
            Ok(thread) => Some(thread),
            Err(e) => {
                options.log.line(&format!(
                    "cannot start the thread that refuses further connections ({e}): they \
                     wait unanswered until the migration ends"
                ));
                None
            }
        };
        Door {
            closed,
            wake,
            thread,
        }
    }

    /// Stops refusing newcomers and joins the thread: the listener is free when this returns.
    pub(super) fn close(mut self) {
        self.closed.store(true, Ordering::Release);
        if let Some(wake) = &self.wake {
            wake.wake();
        }
        if let Some(thread) = self.thread.take() {
            // The thread only accepts, reads and writes sockets; a panic there is no reason to
            // lose the session's outcome.
            let _ = thread.join();
        }
    }
}

impl Drop for Door<'_> {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        if let Some(wake) = &self.wake {
            wake.wake();
        }
    }
}

/// How the door turns newcomers away.
struct Turn<'a> {
    log: &'a Log,
    hello_limit: Duration,
    /// The receiver's TLS: a newcomer must authenticate before it is told anything.
    tls: Option<&'a TlsServer>,
}

fn run(listener: &Listener, turn: &Turn<'_>, closed: &AtomicBool, wake: Option<&Wake>) {
    let stopped = || closed.load(Ordering::Acquire);
    loop {
        match listener.accept_or_wake(None, &stopped, wake) {
            Ok(stream) => turn_away(stream, turn, &stopped),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                turn.log.line(&format!(
                    "accepting a connection during the migration failed: {e}"
                ));
                // Out of descriptors, say: wait a little rather than spin on it.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Refuses one newcomer: reads its hello for at most `hello_limit` (at a TLS receiver, after
/// its TLS handshake, within the same limit), answers a ramjet peer with a refusal, closes, and
/// logs one line.
fn turn_away(stream: Stream, turn: &Turn<'_>, stopped: &dyn Fn() -> bool) {
    let (log, hello_limit) = (turn.log, turn.hello_limit);
    let peer = stream.peer();
    let deadline = Instant::now() + hello_limit;
    let mut stream = match open(stream, turn.tls, deadline, hello_limit, stopped) {
        Opened::Ready(conn) => conn,
        Opened::Stopped => return,
        Opened::Stray { conn, reason, .. } => {
            drop(conn);
            log.line(&format!(
                "refused a connection from {peer}: {BUSY} ({reason})"
            ));
            return;
        }
    };
    let read = session::read_hello(&mut stream, deadline, stopped);
    let (what, refuse) = match &read {
        Ok(_) => ("it sent a hello".to_owned(), true),
        // Another program: it would not understand a refusal.
        Err(HelloError::Invalid(e @ DecodeError::BadMagic { .. })) => (e.to_string(), false),
        // A ramjet peer, of another version perhaps.
        Err(HelloError::Invalid(e)) => (format!("it sent a hello that is invalid: {e}"), true),
        Err(HelloError::Stopped) => ("the migration ended before it sent a hello".into(), false),
        Err(other) => (why_no_hello(other, hello_limit), false),
    };
    if refuse {
        let _ = stream.set_write_timeout(Some(hello_limit));
        session::refuse(&mut stream, BUSY);
        stream.shutdown_write();
    }
    drop(stream);
    log.line(&format!(
        "refused a connection from {peer}: {BUSY} ({what})"
    ));
}

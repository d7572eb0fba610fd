//! Fuzzes the receiver end to end through its public entry point, [`receive`]: a real Unix
//! socket, a valid hello for a small two-region guest memory, then the fuzz input as the frame
//! stream (raw, or built by a program of sealed frames: see `ramjet_fuzz::program`). The
//! sender's side of the socket writes everything and closes its writing direction, so every
//! receive ends promptly without relying on a timeout.
//!
//! Checks, against the sequential reference model in `ramjet_fuzz::model`:
//! - no panic, and `receive` returns within [`BOUND`];
//! - success exactly when the model accepts the stream;
//! - on success: guest memory equals the model's byte for byte (so every page not sent kept its
//!   contents), and device state, rounds and page, device-state and wire counters agree;
//! - on failure: only pages that a frame named (after the bounds, channel and once-per-round
//!   checks) may have changed;
//! - the facts are `setup-done`, `pass 1..=N`, then `completed` and `drained`, or end with
//!   `failed` (with the error's message) and `drained`; and a destination control machine
//!   accepts them all and ends in `completed` or `failed`.

#![no_main]

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use libfuzzer_sys::{Corpus, fuzz_target};
use ramjet_control::{Machine, Options, Profile, Side, Status, Timestamp, Trigger};
use ramjet_dataplane::internals::wire::FrameHeader;
use ramjet_dataplane::memory::{GuestMemory, Region};
use ramjet_dataplane::transport::{Blocking, Endpoint, Listener, Transport, Uring};
use ramjet_dataplane::{CancelHandle, Error, Fact, Handover, ReceiveOptions, Received, receive};
use ramjet_fuzz::model::{self, Expected};
use ramjet_fuzz::program::{self, FLAG_PREFILL, FLAG_PROGRAM, FLAG_URING, LAYOUT, PAGE};

/// The longest a receive may take. Nothing here waits for a timeout, so this is generous only
/// for slow sanitizer builds on a loaded machine.
const BOUND: Duration = Duration::from_secs(10);

/// The receiver's read and write timeout: never reached unless the receiver hangs.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The listening socket, bound once per process, and whether io_uring works here.
struct Harness {
    listener: Listener,
    path: PathBuf,
    uring: bool,
    /// `RAMJET_FUZZ_VERBOSE` set: print each input's outcome (for looking at seeds).
    verbose: bool,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

/// Removes the socket file when libFuzzer exits (it calls `exit`, which drops no static).
extern "C" fn remove_socket() {
    if let Some(h) = HARNESS.get() {
        let _ = std::fs::remove_file(&h.path);
    }
}

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        // libFuzzer does not ignore SIGPIPE the way a Rust `main` does, and the harness writes
        // to sockets that the receiver shuts down when it fails.
        // SAFETY: SIG_IGN is a valid disposition for SIGPIPE, and this runs once, before any
        // thread of the harness writes to a socket.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let path = std::env::temp_dir().join(format!("ramjet-fuzz-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = Listener::bind(&Endpoint::Unix(path.clone())).expect("bind a Unix socket");
        // SAFETY: `remove_socket` is an `extern "C" fn()` that does not unwind (removing a
        // file cannot panic) and only reads the harness once it is initialised.
        unsafe { libc::atexit(remove_socket) };
        Harness {
            listener,
            path,
            uring: Uring::probe().is_ok(),
            verbose: std::env::var_os("RAMJET_FUZZ_VERBOSE").is_some(),
        }
    })
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let [flags, rest @ ..] = data else {
        return Corpus::Reject;
    };
    let stream = if flags & FLAG_PROGRAM != 0 {
        program::build(rest)
    } else {
        rest.to_vec()
    };
    if stream.len() < 32 {
        // Not even one frame header: the model and the receiver agree trivially.
        return Corpus::Reject;
    }
    run(*flags, &stream);
    Corpus::Keep
});

fn run(flags: u8, stream: &[u8]) {
    let h = harness();
    let prefill = flags & FLAG_PREFILL != 0;
    let (memory, initial) = guest(prefill);
    let transport: Arc<dyn Transport> = if flags & FLAG_URING != 0 && h.uring {
        Arc::new(Uring::default())
    } else {
        Arc::new(Blocking)
    };

    let mut client = UnixStream::connect(&h.path).expect("connect to the receiver");
    let mut bytes = program::hello();
    bytes.extend_from_slice(stream);
    // The sender's decision, which a receiver reads once it said ready.
    bytes.extend_from_slice(&FrameHeader::decision(true));
    let writer = send(&mut client, bytes);

    let facts = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let facts = Arc::clone(&facts);
        Arc::new(move |fact: Fact| facts.lock().expect("facts").push(fact))
    };
    let options = ReceiveOptions {
        workers: 1,
        timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT),
        transport,
        cancel: CancelHandle::new(),
        // Nothing connects again: a receiver in doubt gives up at once.
        in_doubt_wait: Duration::ZERO,
        ..ReceiveOptions::default()
    };
    let started = Instant::now();
    let result = receive(&h.listener, Arc::clone(&memory), &options, sink);
    let elapsed = started.elapsed();
    if let Some(writer) = writer {
        writer.join().expect("writer thread");
    }
    drop(client);
    assert!(elapsed < BOUND, "receive took {elapsed:?}");

    let expected = model::run(stream, initial.clone());
    let facts = std::mem::take(&mut *facts.lock().expect("facts"));
    if h.verbose {
        let transport = options.transport.name();
        match (&result, &expected.outcome) {
            (Ok(r), _) => eprintln!("{transport}: completed, {} rounds, {:?}", r.rounds, r.stats),
            (Err(e), model) => eprintln!("{transport}: failed: {} (model: {model:?})", e.chain()),
        }
    }
    check(&memory, &initial, &expected, &result, &facts);
}

/// Fresh guest memory for [`LAYOUT`], prefilled or known to be zero, and its contents.
fn guest(prefill: bool) -> (Arc<GuestMemory>, Vec<Vec<u8>>) {
    let regions = LAYOUT
        .iter()
        .map(|l| Region::anonymous(l.id(), l.guest_base(), l.len()).expect("anonymous memory"))
        .collect();
    let memory = Arc::new(GuestMemory::new(regions).expect("guest memory"));
    let mut initial = Vec::new();
    for (index, layout) in LAYOUT.iter().enumerate() {
        let mut bytes = vec![0u8; PAGE * layout.pages() as usize];
        if prefill {
            for (page, chunk) in bytes.chunks_exact_mut(PAGE).enumerate() {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = program::initial_byte(index, page as u64, i);
                }
            }
            memory.write(index, 0, &bytes).expect("prefill");
        }
        initial.push(bytes);
    }
    (memory, initial)
}

/// Writes `bytes` to the receiver and closes the writing direction: at once if the socket
/// buffer takes them, else from a thread (returned), since the receiver reads only once
/// `receive` runs.
fn send(client: &mut UnixStream, bytes: Vec<u8>) -> Option<thread::JoinHandle<()>> {
    client.set_nonblocking(true).expect("nonblocking");
    let mut at = 0;
    while at < bytes.len() {
        match client.write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("writing to the receiver: {e}"),
        }
    }
    client.set_nonblocking(false).expect("blocking");
    if at == bytes.len() {
        let _ = client.shutdown(std::net::Shutdown::Write);
        return None;
    }
    let mut rest = client.try_clone().expect("clone the client socket");
    Some(thread::spawn(move || {
        // The receiver stops reading and shuts the socket down when it fails.
        let _ = rest.write_all(&bytes[at..]);
        let _ = rest.shutdown(std::net::Shutdown::Write);
    }))
}

fn contents(memory: &GuestMemory) -> Vec<Vec<u8>> {
    LAYOUT
        .iter()
        .enumerate()
        .map(|(index, layout)| {
            let mut bytes = vec![0u8; layout.len() as usize];
            memory
                .read(index, 0, &mut bytes)
                .expect("read guest memory");
            bytes
        })
        .collect()
}

fn check(
    memory: &GuestMemory,
    initial: &[Vec<u8>],
    expected: &Expected,
    result: &Result<Received, Error>,
    facts: &[Fact],
) {
    let actual = contents(memory);
    match (result, &expected.outcome) {
        (Ok(received), Ok(model)) => {
            same_as_model(&actual, expected);
            assert_eq!(received.device_state, model.device_state, "device state");
            assert_eq!(received.rounds, model.rounds, "rounds");
            let s = &received.stats;
            assert_eq!(
                (s.pages_zero, s.pages_raw, s.pages_lz4, s.pages_zstd),
                (model.zero, model.raw, model.lz4, model.zstd),
                "page counters"
            );
            assert_eq!(
                s.device_state_bytes,
                model.device_state.len() as u64,
                "device-state counter"
            );
            // The decision read and its acknowledgement, when the stream ended with a go; a
            // stream with more after its end says something else than go, and the receiver is
            // in doubt.
            let decision = match received.handover {
                Handover::Go => 2 * FrameHeader::LEN as u64,
                _ => 0,
            };
            assert_eq!(s.wire_bytes, model.wire_bytes + decision, "wire bytes");
            assert_eq!(s.rounds, u64::from(model.rounds), "round counter");
            let passes: Vec<Fact> = (1..=u64::from(model.rounds)).map(Fact::Pass).collect();
            let end = match received.handover {
                Handover::Go => Fact::Completed,
                _ => Fact::InDoubt,
            };
            let want: Vec<Fact> =
                [vec![Fact::SetupDone], passes, vec![end, Fact::Drained]].concat();
            assert_eq!(facts, want, "facts of a complete receive");
        }
        // More after the end of a valid stream may be an error or an abort: the source keeps
        // the guest, and the complete copy is discarded.
        (Err(e @ Error::SourceKept { .. }), Ok(_)) => {
            same_as_model(&actual, expected);
            assert!(
                matches!(facts, [Fact::SetupDone, .., Fact::Failed(m), Fact::Drained] if *m == e.chain()),
                "facts {facts:?} of a discarded receive"
            );
        }
        (Ok(_), Err(why)) => panic!("the receiver accepted a stream the model refuses: {why}"),
        (Err(e), Ok(_)) => panic!("the receiver refused a valid stream: {}", e.chain()),
        (Err(e), Err(_)) => {
            for (index, ((a, before), named)) in
                actual.iter().zip(initial).zip(&expected.named).enumerate()
            {
                for (page, ((a, b), named)) in a
                    .chunks_exact(PAGE)
                    .zip(before.chunks_exact(PAGE))
                    .zip(named)
                    .enumerate()
                {
                    assert!(
                        a == b || *named,
                        "a failed receive changed region index {index} page {page}, which no \
                         frame named: {}",
                        e.chain()
                    );
                }
            }
            match facts {
                [Fact::SetupDone, .., Fact::Failed(message), Fact::Drained] => {
                    assert_eq!(message, &e.chain(), "the failed fact carries the error");
                }
                other => panic!("facts {other:?} of a failed receive: {}", e.chain()),
            }
        }
    }
    // A destination control machine accepts the receiver's facts in order.
    let mut machine = Machine::new(Side::Destination, Profile::Qemu10, Options::new());
    let t = Timestamp::from_unix_micros(1);
    machine.step(Trigger::Migrate, t).expect("migrate");
    for fact in facts {
        if let Err(e) = machine.step(fact.clone(), t) {
            panic!("the control machine refused {fact} from the receiver: {e}");
        }
    }
    let want = match result {
        Ok(r) if r.handover.may_run() => Status::Completed,
        // In doubt: the destination waits for the source's word, never `failed`.
        Ok(_) => Status::PreSwitchover,
        Err(_) => Status::Failed,
    };
    assert_eq!(machine.status(), want);
}

fn same_as_model(actual: &[Vec<u8>], expected: &Expected) {
    for (index, (a, e)) in actual.iter().zip(&expected.memory).enumerate() {
        if let Some(page) = first_different_page(a, e) {
            panic!("region index {index} page {page} differs from the model");
        }
    }
}

fn first_different_page(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks_exact(PAGE)
        .zip(b.chunks_exact(PAGE))
        .position(|(x, y)| x != y)
}

//! Helpers shared by the integration tests: guest images, a migration over loopback driven
//! through both control machines, and a hand-written peer for bad-input tests.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ramjet_control::{Fact, Machine, Options, Profile, Side, Status, Timestamp, Trigger};
use ramjet_dataplane::Compression;
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::transport::{Blocking, Endpoint, Listener, Transport, Uring, ZeroCopy};
use ramjet_dataplane::{
    Error, FactSink, PreSwitchover, ReceiveOptions, Received, SendOptions, Sender, Summary,
    TlsClient, TlsServer, receive,
};

pub use ramjet_dataplane::testkit::image::{ImageKind as Image, Rng};

/// Fills page `page` of region 0 the way `image` wants, from `rng`.
pub fn write_page(memory: &GuestMemory, image: Image, rng: &mut Rng, page: u64, buf: &mut [u8]) {
    ramjet_dataplane::testkit::image::fill_page(image, rng, buf);
    memory
        .write(0, page * PAGE_SIZE as u64, buf)
        .expect("page in bounds");
}

/// A one-region guest of `bytes` holding `image`.
pub fn guest(bytes: u64, image: Image, seed: u64) -> Arc<GuestMemory> {
    let memory = GuestMemory::anonymous(bytes).expect("anonymous memory");
    if image != Image::Zero {
        ramjet_dataplane::testkit::image::fill(&memory, image, seed).expect("fill");
    }
    Arc::new(memory)
}

/// Every transport this machine has: io_uring (unless it cannot be set up here, which is
/// printed) and the blocking one.
pub fn transports() -> Vec<Arc<dyn Transport>> {
    let mut all: Vec<Arc<dyn Transport>> = Vec::new();
    match Uring::probe() {
        Ok(()) => all.push(Arc::new(Uring::default())),
        Err(why) => eprintln!("io_uring cases skipped: {why}"),
    }
    all.push(Arc::new(Blocking));
    all
}

/// io_uring with zero-copy sends (TCP only: Unix sockets refuse them), unless io_uring or
/// `SENDMSG_ZC` is unavailable here (printed). On loopback the kernel copies anyway, but the
/// code path is the one a real network takes: registered pool buffers, and guest pages sent in
/// place in the final round, each returned only after the kernel's notification.
pub fn zero_copy() -> Option<Arc<dyn Transport>> {
    let transport = Uring {
        zero_copy: ZeroCopy::On,
    };
    match Uring::probe() {
        Ok(()) if transport.supports_zero_copy() => Some(Arc::new(transport)),
        Ok(()) => {
            eprintln!("zero-copy cases skipped: the kernel lacks SENDMSG_ZC");
            None
        }
        Err(why) => {
            eprintln!("zero-copy cases skipped: {why}");
            None
        }
    }
}

/// TCP or a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Tcp,
    Unix,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh endpoint: port 0 on loopback, or a socket path in the temp directory.
pub fn endpoint(net: Net) -> Endpoint {
    match net {
        Net::Tcp => "tcp:127.0.0.1:0".parse().expect("valid endpoint"),
        Net::Unix => {
            let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
            let path: PathBuf =
                std::env::temp_dir().join(format!("ramjet-test-{}-{n}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            Endpoint::Unix(path)
        }
    }
}

/// Facts as they arrive, stamped.
#[derive(Default)]
pub struct Facts(Mutex<Vec<Fact>>);

impl Facts {
    pub fn sink(self: &Arc<Self>) -> Arc<dyn FactSink> {
        let facts = Arc::clone(self);
        Arc::new(move |fact| facts.0.lock().expect("facts lock").push(fact))
    }

    pub fn all(&self) -> Vec<Fact> {
        self.0.lock().expect("facts lock").clone()
    }
}

/// A receiver's log lines as they arrive.
#[derive(Default)]
pub struct Lines(Mutex<Vec<String>>);

impl Lines {
    pub fn log(self: &Arc<Self>) -> ramjet_dataplane::Log {
        let lines = Arc::clone(self);
        ramjet_dataplane::Log::new(move |line| {
            lines.0.lock().expect("lines lock").push(line.to_owned());
        })
    }

    pub fn all(&self) -> Vec<String> {
        self.0.lock().expect("lines lock").clone()
    }
}

/// Runs `facts` through a control machine for `side` and returns what it emitted, as the
/// scenario vocabulary (`setup`, `pass 1`, ...). Every fact must be accepted.
pub fn statuses(side: Side, facts: &[Fact]) -> Vec<String> {
    let mut machine = Machine::new(side, Profile::Qemu10, Options::new());
    let now = Timestamp::from_unix_micros(1);
    let mut shown = Vec::new();
    let migrate = machine.step(Trigger::Migrate, now).expect("migrate");
    shown.extend(migrate.map(|e| e.kind().to_string()));
    for fact in facts {
        match machine.step(fact.clone(), now) {
            Ok(event) => shown.extend(event.map(|e| e.kind().to_string())),
            Err(e) => panic!("the {side:?} machine refused {fact}: {e} (facts {facts:?})"),
        }
    }
    assert!(
        machine.status().is_terminal() || machine.status() == Status::None,
        "the {side:?} machine ended in {} (facts {facts:?})",
        machine.status()
    );
    shown
}

/// How a test migration is set up.
#[derive(Debug, Clone)]
pub struct Plan {
    pub transport: Arc<dyn Transport>,
    pub net: Net,
    pub channels: u16,
    pub compression: Compression,
    pub timeout: Duration,
    /// The guest is paused from the start (an image): switchover comes first, and the one
    /// round sends every page in place from the frozen memory.
    pub paused: bool,
    /// Relay every channel through a proxy that forwards this many bytes per second.
    pub throttle: Option<u64>,
    /// TLS on both ends.
    pub tls: Option<(TlsClient, TlsServer)>,
}

/// What a migration test does after a round.
pub enum Next {
    /// Another live round with these pages.
    Live(DirtySet),
    /// Switch over (the guest is paused now) and send these pages in the final round.
    Final(DirtySet),
}

impl Plan {
    pub fn new(net: Net, channels: u16, compression: Compression) -> Self {
        Plan {
            transport: ramjet_dataplane::transport::best().0,
            net,
            channels,
            compression,
            timeout: Duration::from_secs(20),
            paused: false,
            throttle: None,
            tls: None,
        }
    }

    /// The same with TLS on both ends (the shared throwaway credentials of [`tls`]).
    pub fn with_tls(mut self) -> Self {
        self.tls = Some(tls(self.net));
        self
    }
}

/// Throwaway credentials in QEMU's layout, made once per test process (and removed at exit).
pub fn credentials() -> &'static std::path::Path {
    use std::sync::OnceLock;
    static DIR: OnceLock<ramjet_dataplane::testkit::pki::Scratch> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = ramjet_dataplane::testkit::pki::Scratch::new("ramjet-test-creds").expect("dir");
        ramjet_dataplane::testkit::pki::credentials(dir.path()).expect("credentials");
        dir
    })
    .path()
}

/// Both ends' TLS from [`credentials`]; over a Unix socket the sender checks the receiver's
/// certificate against `localhost` (over TCP, against 127.0.0.1).
pub fn tls(net: Net) -> (TlsClient, TlsServer) {
    let mut client = TlsClient::from_dir(credentials()).expect("client credentials");
    if net == Net::Unix {
        client = client.with_hostname("localhost").expect("hostname");
    }
    (
        client,
        TlsServer::from_dir(credentials()).expect("server credentials"),
    )
}

/// What a test migration produced on both sides.
pub struct Outcome {
    pub sent: Result<Summary, Error>,
    pub received: Result<Received, Error>,
    pub source_facts: Vec<Fact>,
    pub destination_facts: Vec<Fact>,
    pub elapsed: Duration,
}

/// Migrates `src` into `dst`. Live: the first round sends every page; `between(round)` may
/// change the source and says what the next round sends, live or after switchover. Paused: a
/// switchover and then one round of every page. Then the device state.
pub fn migrate(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    plan: &Plan,
    mut between: impl FnMut(u32) -> Next,
    device_state: &[u8],
) -> Outcome {
    let listener = Listener::bind(&endpoint(plan.net)).expect("bind");
    let mut at = listener.endpoint().clone();
    if let Some(rate) = plan.throttle {
        at = throttle(plan.net, &at, plan.channels, rate);
    }
    let (source_facts, destination_facts) =
        (Arc::new(Facts::default()), Arc::new(Facts::default()));
    let receive_options = ReceiveOptions {
        workers: 2,
        timeout: plan.timeout,
        accept_timeout: Some(plan.timeout),
        transport: Arc::clone(&plan.transport),
        tls: plan.tls.as_ref().map(|t| t.1.clone()),
        ..ReceiveOptions::default()
    };
    let (dst, sink) = (Arc::clone(dst), destination_facts.sink());
    let started = Instant::now();
    let receiver = thread::spawn(move || receive(&listener, dst, &receive_options, sink));
    let send_options = SendOptions {
        channels: plan.channels,
        compression: plan.compression,
        workers: 2,
        timeout: plan.timeout,
        transport: Arc::clone(&plan.transport),
        tls: plan.tls.as_ref().map(|t| t.0.clone()),
        ..SendOptions::default()
    };
    let sent = (|| {
        let mut sender = Sender::connect(Arc::clone(src), &at, &send_options, source_facts.sink())?;
        if plan.paused {
            return sender.migrate_paused(device_state, PreSwitchover::Skip);
        }
        let mut dirty = DirtySet::all(src);
        loop {
            sender.round(&dirty)?;
            match between(sender.rounds()) {
                Next::Live(next) => dirty = next,
                Next::Final(last) => {
                    dirty = last;
                    break;
                }
            }
        }
        sender.switchover()?;
        sender.round(&dirty)?;
        sender.finish(device_state)
    })();
    let received = receiver.join().expect("receiver thread");
    Outcome {
        sent,
        received,
        source_facts: source_facts.all(),
        destination_facts: destination_facts.all(),
        elapsed: started.elapsed(),
    }
}

/// Migrates the paused guest `src` into `dst` with `options`: across the network-namespace
/// `link` (the receiver listens in its namespace, the sender connects from the other), or
/// without one over TCP loopback.
pub fn migrate_across(
    link: Option<&ramjet_dataplane::testkit::netns::Link>,
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    options: SendOptions,
) -> (Result<Summary, Error>, Result<Received, Error>) {
    use ramjet_dataplane::testkit::netns::Side;
    let listener = match link {
        Some(link) => link.listen().expect("listen on the link"),
        None => Listener::bind(&endpoint(Net::Tcp)).expect("bind"),
    };
    let at = listener.endpoint().clone();
    let dst = Arc::clone(dst);
    let receiver = thread::spawn(move || {
        receive(&listener, dst, &ReceiveOptions::default(), Arc::new(|_| {}))
    });
    let src = Arc::clone(src);
    let send = move || {
        let sender = Sender::connect(src, &at, &options, Arc::new(|_| {}))?;
        sender.migrate_paused(b"device state", PreSwitchover::Skip)
    };
    let sent = match link {
        Some(link) => link
            .spawn(Side::Sender, send)
            .join()
            .expect("sender thread"),
        None => Ok(thread::spawn(send).join().expect("sender thread")),
    };
    let received = receiver.join().expect("receiver thread");
    (sent.expect("enter the sender's namespace"), received)
}

/// Starts a relay that accepts `channels` connections and forwards each to `to`, sender to
/// receiver at `rate` bytes per second in 4 KiB steps, and answers back as they come; returns
/// where it listens.
pub fn throttle(net: Net, to: &Endpoint, channels: u16, rate: u64) -> Endpoint {
    use ramjet_dataplane::transport::Stream;
    use std::io::{Read, Write};
    let listener = Listener::bind(&endpoint(net)).expect("bind the relay");
    let at = listener.endpoint().clone();
    let to = to.clone();
    thread::spawn(move || {
        for _ in 0..channels {
            let Ok(from) = listener.accept(Some(Duration::from_secs(20)), &|| false) else {
                return;
            };
            let peer = Stream::connect(&to, Duration::from_secs(5)).expect("connect");
            let (mut back_from, mut back_to) =
                (peer.try_clone().unwrap(), from.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
                back_to.shutdown_write();
            });
            thread::spawn(move || {
                let (mut from, mut peer) = (from, peer);
                let mut buf = [0u8; 4096];
                let started = Instant::now();
                let mut moved = 0u64;
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    if peer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    moved += n as u64;
                    let due = started + Duration::from_secs_f64(moved as f64 / rate as f64);
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                peer.shutdown_write();
            });
        }
    });
    at
}

/// Asserts a migration completed with identical memory and the expected status sequences.
pub fn assert_completed(outcome: &Outcome, src: &GuestMemory, dst: &GuestMemory, what: &str) {
    assert!(!src.is_frozen(), "{what}: the source is still frozen");
    if let Err(e) = &outcome.sent {
        panic!("{what}: the sender failed: {}", e.chain());
    }
    if let Err(e) = &outcome.received {
        panic!("{what}: the receiver failed: {}", e.chain());
    }
    assert_eq!(
        src.first_difference(dst).expect("same layout"),
        None,
        "{what}: memory differs"
    );
    // setup, active, device, completed, with a MIGRATION_PASS for every round; a paused
    // guest has one round, after switchover.
    let source = statuses(Side::Source, &outcome.source_facts).join(" ");
    let paused = outcome
        .source_facts
        .iter()
        .position(|f| *f == Fact::Switchover)
        < outcome
            .source_facts
            .iter()
            .position(|f| *f == Fact::Pass(1));
    if paused {
        assert_eq!(source, "setup active device pass 1 completed", "{what}");
    } else {
        assert!(
            source.starts_with("setup active pass 1 ")
                && source.contains(" device pass ")
                && source.ends_with(" completed"),
            "{what}: source events {source}"
        );
    }
    let destination = statuses(Side::Destination, &outcome.destination_facts).join(" ");
    assert_eq!(destination, "setup active completed", "{what}");
}

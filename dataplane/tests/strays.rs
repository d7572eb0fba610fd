//! A receiver survives strangers: connections that are not its sender's are dropped, logged
//! in one line each (naming the peer and the reason) and counted, and the real sender then
//! migrates with byte-identical memory; too many of them fail the migration; and once the
//! session runs, newcomers are refused without disturbing it.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Facts, Image, Lines, Net, guest};
use ramjet_control::Fact;
use ramjet_dataplane::internals::wire::{Hello, HelloReply, Verdict};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::{Endpoint, Listener, Stream};
use ramjet_dataplane::{
    Error, PreSwitchover, ReceiveOptions, Received, SendOptions, Sender, receive,
};

const PAGES: u64 = 256;
const HELLO_TIMEOUT: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_secs(10);

type ReceiverRun = JoinHandle<(Result<Received, Error>, Vec<Fact>)>;

/// A real receiver on `net` for `memory` tolerating `max_refused` strays; returns where it
/// listens, its thread, and its log lines.
fn receiver(
    net: Net,
    memory: &Arc<GuestMemory>,
    max_refused: usize,
) -> (Endpoint, ReceiverRun, Arc<Lines>) {
    let listener = Listener::bind(&common::endpoint(net)).expect("bind");
    let at = listener.endpoint().clone();
    let lines = Arc::new(Lines::default());
    let options = ReceiveOptions {
        workers: 2,
        timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT),
        hello_timeout: HELLO_TIMEOUT,
        max_refused,
        log: lines.log(),
        ..ReceiveOptions::default()
    };
    let memory = Arc::clone(memory);
    let run = thread::spawn(move || {
        let facts = Arc::new(Facts::default());
        let result = receive(&listener, memory, &options, facts.sink());
        (result, facts.all())
    });
    (at, run, lines)
}

/// A stranger's connection and the address the receiver sees it from.
fn connect(at: &Endpoint) -> (Stream, String) {
    let stream = Stream::connect(at, TIMEOUT).expect("connect");
    let seen_as = match &stream {
        Stream::Tcp(s) => s.local_addr().expect("addr").to_string(),
        Stream::Unix(_) => "a unix socket peer".to_owned(),
    };
    (stream, seen_as)
}

/// Everything the receiver sends until it closes (a reset after a refusal counts as a close).
fn read_until_closed(stream: &mut Stream) -> Vec<u8> {
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut back = Vec::new();
    let _ = stream.read_to_end(&mut back);
    back
}

/// The real sender migrates the paused guest `src` to `at` on two channels.
fn migrate(src: &Arc<GuestMemory>, at: &Endpoint) -> Vec<Fact> {
    let facts = Arc::new(Facts::default());
    let options = SendOptions {
        channels: 2,
        workers: 2,
        timeout: TIMEOUT,
        ..SendOptions::default()
    };
    let sender = Sender::connect(Arc::clone(src), at, &options, facts.sink()).expect("connect");
    sender
        .migrate_paused(b"device", PreSwitchover::Skip)
        .expect("the migration completes");
    facts.all()
}

fn completed(run: ReceiverRun, src: &GuestMemory, dst: &GuestMemory) {
    let (result, facts) = run.join().expect("receiver thread");
    let received = result.expect("the receiver completes");
    assert_eq!(received.device_state, b"device");
    assert_eq!(
        src.first_difference(dst).expect("layout"),
        None,
        "memory differs"
    );
    assert_eq!(facts.first(), Some(&Fact::SetupDone));
    assert!(
        matches!(facts.as_slice(), [.., Fact::Completed, Fact::Drained]),
        "{facts:?}"
    );
}

/// Asserts one log line per stranger, in order, each naming the peer and (a part of) the
/// reason.
fn assert_lines(lines: &Lines, expected: &[(String, &str)]) {
    let lines = lines.all();
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    for (line, (peer, reason)) in lines.iter().zip(expected) {
        assert!(line.contains(peer.as_str()), "{peer:?} not in {line:?}");
        assert!(line.contains(reason), "{reason:?} not in {line:?}");
    }
}

/// Before the real sender, four strangers, each dropped, logged with its address and reason,
/// and the receiver waits on: (a) one connects and closes without a word; (b) one sends
/// garbage, which is not ramjet's magic (it is refused with the reason, or the connection is
/// reset); (c) one sends an HTTP GET, likewise not ramjet; (d) one connects and says nothing
/// until the receiver gives up on it after the hello timeout and closes it. Then the real
/// sender migrates, and the destination memory equals the source's. Over TCP and a Unix
/// socket.
#[test]
fn strangers_before_the_sender_are_dropped_and_logged() {
    for net in [Net::Tcp, Net::Unix] {
        let src = guest(PAGES * 4096, Image::Mixed, 3);
        let dst = Arc::new(GuestMemory::anonymous(PAGES * 4096).expect("memory"));
        let (at, run, lines) = receiver(net, &dst, 64);

        let (closes, closes_at) = connect(&at);
        drop(closes);
        let (mut garbage, garbage_at) = connect(&at);
        garbage.write_all(&[0xEE; 64]).expect("garbage");
        read_until_closed(&mut garbage);
        let (mut http, http_at) = connect(&at);
        http.write_all(b"GET / HTTP/1.1\r\nHost: migration\r\n\r\n")
            .expect("request");
        read_until_closed(&mut http);
        let (mut silent, silent_at) = connect(&at);
        // The receiver closes it: nothing comes back.
        assert!(read_until_closed(&mut silent).is_empty());

        let facts = migrate(&src, &at);
        assert!(matches!(
            facts.as_slice(),
            [.., Fact::Completed, Fact::Drained]
        ));
        completed(run, &src, &dst);
        assert_lines(
            &lines,
            &[
                (closes_at, "closed the connection without a word"),
                (garbage_at, "not a ramjet peer: bad magic"),
                (http_at, "not a ramjet peer: bad magic"),
                (silent_at, "sent nothing within 300ms"),
            ],
        );
    }
}

/// One stray more than `max_refused` fails the migration with the bound's error, which names
/// the count and the last stray's reason; `failed` and `drained` are reported. Each of the
/// three strays connects and closes without a word.
#[test]
fn one_stray_too_many_fails_the_migration() {
    let dst = Arc::new(GuestMemory::anonymous(PAGES * 4096).expect("memory"));
    let (at, run, lines) = receiver(Net::Tcp, &dst, 2);
    for _ in 0..3 {
        drop(connect(&at));
    }
    let (result, facts) = run.join().expect("receiver thread");
    let err = result.expect_err("too many strays");
    assert!(
        matches!(
            err,
            Error::TooManyRefused {
                count: 3,
                limit: 2,
                ..
            }
        ),
        "{}",
        err.chain()
    );
    let chain = err.chain();
    assert!(chain.contains("refused 3 connections"), "{chain}");
    assert!(
        chain.contains("closed the connection without a word"),
        "{chain}"
    );
    assert_eq!(facts, [Fact::Failed(chain), Fact::Drained]);
    assert_eq!(lines.all().len(), 3);
}

/// Once the sender's channels are connected, newcomers are refused while the session runs:
/// one that sends a ramjet hello reads a refusal, "a migration is already being received"; one
/// that says nothing is closed after the hello timeout; one that sends garbage is closed. Each
/// gets a log line, and the migration completes with identical memory. Over TCP and a Unix
/// socket.
#[test]
fn newcomers_during_the_session_are_refused_without_disturbing_it() {
    for net in [Net::Tcp, Net::Unix] {
        let src = guest(PAGES * 4096, Image::Mixed, 4);
        let dst = Arc::new(GuestMemory::anonymous(PAGES * 4096).expect("memory"));
        let (at, run, lines) = receiver(net, &dst, 0);
        let facts = Arc::new(Facts::default());
        let options = SendOptions {
            channels: 2,
            workers: 2,
            timeout: TIMEOUT,
            ..SendOptions::default()
        };
        let sender =
            Sender::connect(Arc::clone(&src), &at, &options, facts.sink()).expect("connect");

        // Every channel is connected: the session runs.
        let (mut hello, hello_at) = connect(&at);
        let greeting = Hello {
            flags: Default::default(),
            session: [5; 16],
            channel: 0,
            channels: 1,
            regions: src.layout(),
        };
        hello.write_all(&greeting.encode()).expect("hello");
        let back = read_until_closed(&mut hello);
        assert!(back.len() >= HelloReply::FIXED_LEN, "{back:?}");
        let mut fixed = [0u8; HelloReply::FIXED_LEN];
        fixed.copy_from_slice(&back[..HelloReply::FIXED_LEN]);
        let len = HelloReply::reason_len(&fixed).expect("a reply");
        let reply = HelloReply::decode(&fixed, &back[HelloReply::FIXED_LEN..][..len]);
        assert_eq!(
            reply.expect("a reply").verdict,
            Verdict::Refuse("a migration is already being received".into())
        );
        let (mut silent, silent_at) = connect(&at);
        assert!(read_until_closed(&mut silent).is_empty());
        let (mut garbage, garbage_at) = connect(&at);
        garbage
            .write_all(b"SSH-2.0-OpenSSH_9.6\r\n")
            .expect("garbage");
        read_until_closed(&mut garbage);

        sender
            .migrate_paused(b"device", PreSwitchover::Skip)
            .expect("the migration completes");
        completed(run, &src, &dst);
        let busy = "a migration is already being received";
        assert_lines(
            &lines,
            &[
                (hello_at, "it sent a hello"),
                (silent_at, "it sent nothing within 300ms"),
                (garbage_at, "bad magic"),
            ],
        );
        assert!(lines.all().iter().all(|line| line.contains(busy)));
    }
}

/// A hello timeout of zero would drop every connection as a stray: the options are refused.
#[test]
fn a_zero_hello_timeout_is_invalid() {
    let dst = Arc::new(GuestMemory::anonymous(PAGES * 4096).expect("memory"));
    let listener = Listener::bind(&common::endpoint(Net::Tcp)).expect("bind");
    let options = ReceiveOptions {
        hello_timeout: Duration::ZERO,
        ..ReceiveOptions::default()
    };
    let facts = Arc::new(Facts::default());
    let err = receive(&listener, dst, &options, facts.sink()).expect_err("invalid");
    assert!(matches!(err, Error::Config(_)), "{}", err.chain());
    assert!(err.chain().contains("hello timeout"), "{}", err.chain());
    assert_eq!(facts.all(), [Fact::Failed(err.chain()), Fact::Drained]);
}

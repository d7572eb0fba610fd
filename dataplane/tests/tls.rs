//! TLS at both ends, and every peer it refuses: each refusal names its reason on the side that
//! sees it, a refused sender is a stray at the receiver (logged, dropped), and the receiver
//! keeps listening and then completes with the real sender. Ciphertext tampered with on the way
//! fails the migration with a TLS error, never a wrong page.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Image, Lines, Net, endpoint, guest};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::pki::{self, Authority, Leaf, Scratch};
use ramjet_dataplane::transport::{Endpoint, Listener, Stream, Uring, ZeroCopy};
use ramjet_dataplane::{
    Error, Handover, PreSwitchover, ReceiveOptions, Received, SendOptions, Sender, Summary,
    TlsClient, TlsServer, receive,
};

const BYTES: u64 = 8 << 20;

/// A credentials directory of its own (all five files), and the CA that signed it.
fn pki() -> (Scratch, Authority) {
    let dir = Scratch::new("ramjet-tls-test").expect("dir");
    let ca = pki::credentials(dir.path()).expect("credentials");
    (dir, ca)
}

/// A receiver's thread: its result.
type Receiving = JoinHandle<Result<Received, Error>>;

/// A receiver at a fresh endpoint, in a thread: where it listens, its result, its log, its
/// guest memory.
fn receiver(
    net: Net,
    tls: Option<TlsServer>,
) -> (Endpoint, Receiving, Arc<Lines>, Arc<GuestMemory>) {
    let listener = Listener::bind(&endpoint(net)).expect("bind");
    let at = listener.endpoint().clone();
    let lines = Arc::new(Lines::default());
    let options = ReceiveOptions {
        workers: 2,
        timeout: Duration::from_secs(20),
        accept_timeout: Some(Duration::from_secs(20)),
        hello_timeout: Duration::from_secs(2),
        log: lines.log(),
        tls,
        ..ReceiveOptions::default()
    };
    let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
    let memory = Arc::clone(&dst);
    let thread = thread::spawn(move || receive(&listener, memory, &options, Arc::new(|_| {})));
    (at, thread, lines, dst)
}

/// Migrates the paused `src` to `at` with `tls`.
fn send(src: &Arc<GuestMemory>, at: &Endpoint, tls: Option<TlsClient>) -> Result<Summary, Error> {
    let options = SendOptions {
        channels: 2,
        workers: 2,
        timeout: Duration::from_secs(20),
        tls,
        ..SendOptions::default()
    };
    let sender = Sender::connect(Arc::clone(src), at, &options, Arc::new(|_| {}))?;
    sender.migrate_paused(b"state", PreSwitchover::Skip)
}

/// Sends with `real`, then checks that the receiver completed with the guest intact and
/// logged a refusal naming `reason`.
fn completes_after_refusing(
    src: &Arc<GuestMemory>,
    at: &Endpoint,
    real: Option<TlsClient>,
    receiver: Receiving,
    lines: &Lines,
    dst: &GuestMemory,
    reason: &str,
) {
    let summary = send(src, at, real).expect("the real sender completes");
    assert!(summary.acknowledged);
    let received = receiver
        .join()
        .expect("thread")
        .expect("the receiver completes");
    assert_eq!(received.handover, Handover::Go);
    assert_eq!(src.first_difference(dst).expect("layout"), None);
    let log = lines.all();
    assert!(
        log.iter()
            .any(|l| l.starts_with("refused a connection from ") && l.contains(reason)),
        "no refusal naming {reason:?} in {log:#?}"
    );
}

/// TLS is on at one end only: each end says so, and the receiver waits on for a sender that
/// speaks as it does.
#[test]
fn tls_at_one_end_only_is_named_at_both() {
    let (dir, _) = pki();
    let src = guest(BYTES, Image::Mixed, 1);
    for net in [Net::Tcp, Net::Unix] {
        let client = || {
            let client = TlsClient::from_dir(dir.path()).expect("client");
            client.with_hostname("localhost").expect("name")
        };
        // A plaintext sender at a TLS receiver.
        let server = TlsServer::from_dir(dir.path()).expect("server");
        let (at, thread, lines, dst) = receiver(net, Some(server));
        let err = send(&src, &at, None).expect_err("refused");
        let text = err.chain();
        assert!(
            matches!(err, Error::Refused { .. }) && text.contains("TLS is on at the receiver only"),
            "{net:?}: {text}"
        );
        let reason = "it connected without TLS";
        completes_after_refusing(&src, &at, Some(client()), thread, &lines, &dst, reason);

        // A TLS sender at a plaintext receiver.
        let (at, thread, lines, dst) = receiver(net, None);
        let err = send(&src, &at, Some(client())).expect_err("refused");
        let text = err.chain();
        assert!(
            err.is_tls() && text.contains("TLS is on at this end only"),
            "{net:?}: {text}"
        );
        let reason = "TLS is on at the sender only";
        completes_after_refusing(&src, &at, None, thread, &lines, &dst, reason);
    }
}

/// A sender whose certificate the receiver does not accept: from another CA, expired, not yet
/// valid, or authenticated but with a subject not on the allow-list. The sender's error says
/// that the receiver refused it (with the TLS alert, or the allow-list's reason); the receiver
/// names the reason in its log and completes with the real sender.
#[test]
fn sender_certificates_the_receiver_refuses() {
    let (dir, ca) = pki();
    let other = Authority::new("another CA").expect("CA");
    let src = guest(BYTES, Image::Random, 2);
    let bad = |signer: &Authority, leaf: Leaf| {
        let bad = Scratch::new("ramjet-tls-bad").expect("dir");
        std::fs::copy(
            dir.path().join("ca-cert.pem"),
            bad.path().join("ca-cert.pem"),
        )
        .expect("copy");
        signer.write_leaf(bad.path(), &leaf).expect("leaf");
        bad
    };
    let expired = Leaf {
        not_before: (2020, 1, 1),
        not_after: (2021, 1, 1),
        ..Leaf::sender("ramjet-sender")
    };
    let early = Leaf {
        not_before: (2090, 1, 1),
        ..Leaf::sender("ramjet-sender")
    };
    let cases = [
        (
            bad(&other, Leaf::sender("ramjet-sender")),
            "is not signed by the CA",
            "UnknownCA",
        ),
        (bad(&ca, expired), "has expired", "CertificateExpired"),
        (bad(&ca, early), "is not valid yet", "CertificateExpired"),
        (
            bad(&ca, Leaf::sender("intruder")),
            "O=ramjet,CN=intruder is not on the allow-list (tls-authz)",
            "is not on the allow-list",
        ),
    ];
    for (creds, logged, told) in cases {
        let server = TlsServer::from_dir(dir.path())
            .expect("server")
            .allow_subjects([pki::SENDER_SUBJECT, "CN=someone,O=else"])
            .expect("subjects");
        let (at, thread, lines, dst) = receiver(Net::Tcp, Some(server));
        let client = TlsClient::from_dir(creds.path()).expect("client");
        let err = send(&src, &at, Some(client)).expect_err("refused");
        let text = err.chain();
        assert!(text.contains(told), "{logged}: the sender says {text}");
        let real = TlsClient::from_dir(dir.path()).expect("client");
        completes_after_refusing(&src, &at, Some(real), thread, &lines, &dst, logged);
    }
}

/// A receiver the sender does not accept: its certificate is for another name, or from a CA
/// the sender does not trust. The sender says why; the receiver logs the sender's alert as a
/// stray and completes with a sender that trusts it.
#[test]
fn receiver_certificates_the_sender_refuses() {
    let (dir, _) = pki();
    let (elsewhere, _) = pki();
    let src = guest(BYTES, Image::Mixed, 3);
    let cases = [
        (
            TlsClient::from_dir(dir.path())
                .expect("client")
                .with_hostname("wrong.example")
                .expect("name"),
            "is not valid for wrong.example (it names localhost, 127.0.0.1, ::1)",
            "BadCertificate",
        ),
        (
            // Trusts another CA (and proves itself with that CA's certificate).
            TlsClient::from_dir(elsewhere.path()).expect("client"),
            "is not signed by the CA this end trusts",
            "UnknownCA",
        ),
    ];
    for (client, told, logged) in cases {
        let server = TlsServer::from_dir(dir.path()).expect("server");
        let (at, thread, lines, dst) = receiver(Net::Tcp, Some(server));
        let err = send(&src, &at, Some(client)).expect_err("refused");
        let text = err.chain();
        assert!(err.is_tls() && text.contains(told), "{told}: {text}");
        let real = TlsClient::from_dir(dir.path()).expect("client");
        completes_after_refusing(&src, &at, Some(real), thread, &lines, &dst, logged);
    }
}

/// Strangers at a TLS receiver (a plaintext HTTP client, a peer that closes at once, one that
/// starts a handshake and stalls) are strays: logged and dropped, and the sender completes.
#[test]
fn strangers_at_a_tls_receiver_are_strays() {
    let (dir, _) = pki();
    let src = guest(BYTES, Image::Mixed, 4);
    let server = TlsServer::from_dir(dir.path())
        .expect("server")
        .allow_subjects([pki::SENDER_SUBJECT])
        .expect("subject");
    let (at, thread, lines, dst) = receiver(Net::Tcp, Some(server));
    let Endpoint::Tcp(addr) = at else {
        unreachable!()
    };
    let mut http = std::net::TcpStream::connect(addr).expect("connect");
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    let _ = http.read_to_end(&mut answer);
    assert!(
        answer.is_empty(),
        "an HTTP client is told nothing: {answer:?}"
    );
    drop(std::net::TcpStream::connect(addr).expect("connect"));
    let mut stall = std::net::TcpStream::connect(addr).expect("connect");
    // A TLS record header of a ClientHello, and nothing more.
    stall
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .expect("write");
    let real = TlsClient::from_dir(dir.path()).expect("client");
    let reason = "it does not speak TLS (its first byte is 0x47)";
    completes_after_refusing(&src, &at, Some(real), thread, &lines, &dst, reason);
    let log = lines.all();
    for reason in [
        "closed the connection",
        "did not finish the TLS handshake within",
    ] {
        assert!(log.iter().any(|l| l.contains(reason)), "{reason}: {log:#?}");
    }
    drop(stall);
}

/// A relay between sender and receiver that flips one byte of channel 0's ciphertext, `at`
/// bytes into it (past the handshake): the record fails to open, the migration fails with a
/// TLS error on the receiver (which tells the sender), and the guest is not handed over.
#[test]
fn tampered_ciphertext_fails_with_a_tls_error() {
    let (dir, _) = pki();
    let src = guest(BYTES, Image::Random, 5);
    let server = TlsServer::from_dir(dir.path()).expect("server");
    let (to, thread, _lines, dst) = receiver(Net::Tcp, Some(server));
    let flip_at = 2 << 20;
    let at = flipping_relay(&to, flip_at);
    let err = send(
        &src,
        &at,
        Some(TlsClient::from_dir(dir.path()).expect("client")),
    )
    .expect_err("the sender fails");
    let received = thread.join().expect("thread");
    let err_at_receiver = received.expect_err("the receiver fails");
    assert!(
        err_at_receiver.is_tls() && err_at_receiver.chain().contains("bad_record_mac"),
        "{}",
        err_at_receiver.chain()
    );
    assert!(err.chain().contains("bad_record_mac"), "{}", err.chain());
    drop(dst);
}

/// Zero-copy sends cannot be asked for with TLS: the sender says so.
#[test]
fn zero_copy_is_refused_with_tls() {
    if Uring::probe().is_err() {
        eprintln!("skipped: io_uring is unavailable");
        return;
    }
    let (dir, _) = pki();
    let src = guest(BYTES, Image::Zero, 6);
    let server = TlsServer::from_dir(dir.path()).expect("server");
    let (at, thread, _lines, _dst) = receiver(Net::Tcp, Some(server));
    let options = SendOptions {
        channels: 1,
        timeout: Duration::from_secs(20),
        transport: Arc::new(Uring {
            zero_copy: ZeroCopy::On,
        }),
        tls: Some(TlsClient::from_dir(dir.path()).expect("client")),
        ..SendOptions::default()
    };
    let err = Sender::connect(Arc::clone(&src), &at, &options, Arc::new(|_| {}))
        .and_then(|s| s.migrate_paused(b"", PreSwitchover::Skip))
        .expect_err("refused");
    assert!(
        err.chain().contains("not available with TLS"),
        "{}",
        err.chain()
    );
    assert!(thread.join().expect("thread").is_err());
}

/// Relays every connection to `to`; on the first, flips bit 6 of the byte `flip_at` bytes
/// into the sender's stream.
fn flipping_relay(to: &Endpoint, flip_at: u64) -> Endpoint {
    let listener = Listener::bind(&endpoint(Net::Tcp)).expect("bind");
    let at = listener.endpoint().clone();
    let to = to.clone();
    let first = Arc::new(AtomicU64::new(0));
    thread::spawn(move || {
        while let Ok(from) = listener.accept(Some(Duration::from_secs(20)), &|| false) {
            let Ok(peer) = Stream::connect(&to, Duration::from_secs(5)) else {
                return;
            };
            let flip = (first.fetch_add(1, Ordering::Relaxed) == 0).then_some(flip_at);
            let (mut back_from, mut back_to) = (
                peer.try_clone().expect("clone"),
                from.try_clone().expect("clone"),
            );
            thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
                back_to.shutdown_write();
            });
            thread::spawn(move || {
                let (mut from, mut peer) = (from, peer);
                let mut buf = [0u8; 64 << 10];
                let mut moved = 0u64;
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    if let Some(at) = flip.filter(|&at| (moved..moved + n as u64).contains(&at)) {
                        buf[usize::try_from(at - moved).expect("in the buffer")] ^= 0x40;
                    }
                    if peer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    moved += n as u64;
                }
                peer.shutdown_write();
            });
        }
    });
    at
}

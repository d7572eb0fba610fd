//! The TLS layer against itself and against rustls's own record layer, over real sockets.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::*;
use crate::testkit::pki::{self, Scratch};
use crate::transport::{Blocking, Conn, Stream, Transport, Uring};

fn creds() -> (Scratch, TlsClient, TlsServer) {
    let dir = Scratch::new("ramjet-tls-unit").unwrap();
    pki::credentials(dir.path()).unwrap();
    let client = TlsClient::from_dir(dir.path()).unwrap();
    let server = TlsServer::from_dir(dir.path()).unwrap();
    (dir, client, server)
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

fn pair() -> (Stream, Stream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Stream::Unix(a), Stream::Unix(b))
}

/// Both ends over a socket pair: (client, server) connections.
fn handshake(client: &TlsClient, server: &TlsServer) -> (Conn, Conn) {
    let (mut a, mut b) = pair();
    let server = server.clone();
    let peer = std::thread::spawn(move || {
        let (session, refused) = accept(
            &mut b,
            &server,
            Instant::now() + Duration::from_secs(10),
            &|| false,
        )
        .unwrap();
        assert!(refused.is_none());
        Conn::secured(b, session)
    });
    let session = connect(&mut a, client, localhost(), Duration::from_secs(10)).unwrap();
    let b = peer.join().unwrap();
    // The handshakes leave short stepped read timeouts behind (a session sets its own): on a
    // loaded machine a writer thread can be late by more than one step.
    for end in [&a, &*b] {
        end.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (Conn::secured(a, session), b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

/// The handshake authenticates both ends and settles TLS 1.3; bytes then cross both ways,
/// through the blocking reads and writes and through the split halves of either transport,
/// across many key updates in both directions.
#[test]
fn both_ends_talk_through_every_path_and_key_updates() {
    let (_dir, client, server) = creds();
    let client = client.update_keys_every(3);
    let server = server.update_keys_every(5);
    let transports: [Arc<dyn Transport>; 2] = [Arc::new(Blocking), Arc::new(Uring::default())];
    for transport in transports {
        let (mut a, mut b) = handshake(&client, &server);
        assert_eq!(a.tls().unwrap().suite, "TLS13_AES_256_GCM_SHA384");
        assert_eq!(a.tls().unwrap().key_exchange, "X25519MLKEM768");
        assert_eq!(
            b.tls().unwrap().peer_subject.as_deref(),
            Some(pki::SENDER_SUBJECT)
        );
        a.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        b.write_all(b"welcome").unwrap();
        let mut got = [0u8; 7];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"welcome");

        let (mut aw, mut ar) = a.split(transport.as_ref()).unwrap();
        let (mut bw, mut br) = b.split(transport.as_ref()).unwrap();
        assert!(
            a.write_all(b"x").is_err(),
            "a split connection is not written around TLS"
        );
        let up: Vec<Vec<u8>> = (0..40).map(|i| pattern(1000 + i * 7919, i as u8)).collect();
        let total: usize = up.iter().map(Vec::len).sum();
        let sent = up.clone();
        let writer = std::thread::spawn(move || {
            let slices: Vec<&[u8]> = sent.iter().map(Vec::as_slice).collect();
            aw.send(&slices).unwrap();
            aw
        });
        let mut received = vec![0u8; total];
        let (x, y) = received.split_at_mut(total / 3);
        br.recv(x).unwrap();
        br.recv_vectored(&mut [std::io::IoSliceMut::new(y)])
            .unwrap();
        assert_eq!(received, up.concat());
        let _aw = writer.join().unwrap();
        let down = pattern(3 << 20, 7);
        let back = down.clone();
        let writer = std::thread::spawn(move || bw.send(&[&back]).unwrap());
        let mut got = vec![0u8; down.len()];
        ar.recv(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got == down, "{}", transport.name());
    }
}

/// A client whose certificate another CA signed is refused with the reason, and the server
/// survives it: rustls keeps the client's later handshake messages (its CertificateVerify and
/// Finished, read with the refused Certificate) as ranges of the caller's buffer, so the
/// alert must be sent with that buffer, not an empty one, or rustls panics.
#[test]
fn a_client_certificate_from_another_ca_is_refused_without_a_panic() {
    let dir = Scratch::new("ramjet-tls-unit-intruder").unwrap();
    let ca = pki::credentials(dir.path()).unwrap();
    let intruder = dir.path().join("intruder");
    ca.write_ca(&intruder).unwrap();
    pki::Authority::new("another CA")
        .unwrap()
        .write_leaf(&intruder, &pki::Leaf::sender("ramjet-sender"))
        .unwrap();
    let client = TlsClient::from_dir(&intruder).unwrap();
    let server = TlsServer::from_dir(dir.path()).unwrap();
    for _ in 0..10 {
        let (mut a, mut b) = pair();
        let server = server.clone();
        let peer = std::thread::spawn(move || {
            accept(
                &mut b,
                &server,
                Instant::now() + Duration::from_secs(10),
                &|| false,
            )
            .map(|_| ())
        });
        // The client may or may not see the alert before it counts itself done.
        let _ = connect(&mut a, &client, localhost(), Duration::from_secs(10));
        drop(a);
        let refused = peer.join().expect("the server survives the handshake");
        match refused {
            Err(e @ HandshakeError::Tls(_)) => {
                let why = e.reason("the peer", Duration::from_secs(10));
                assert!(why.contains("not signed by the CA"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A sender on rustls's own record layer (its buffered connection) and a receiver on this one,
/// and the reverse: the records are standard TLS 1.3, key updates included.
#[test]
fn records_interoperate_with_rustls() {
    let (_dir, client, server) = creds();
    let server = server.update_keys_every(2);
    // rustls as the client, this record layer as the server.
    let (ours, theirs) = pair();
    let mut ours = ours;
    let config = Arc::clone(&client.config);
    let peer = std::thread::spawn(move || {
        let Stream::Unix(sock) = theirs else {
            unreachable!()
        };
        let conn = rustls::ClientConnection::new(config, localhost()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(&pattern(100_000, 1)).unwrap();
        tls.flush().unwrap();
        let mut back = vec![0u8; 200_000];
        tls.read_exact(&mut back).unwrap();
        assert_eq!(back, pattern(200_000, 2));
        // rustls updates its own keys on request.
        tls.conn.refresh_traffic_keys().unwrap();
        tls.write_all(b"after").unwrap();
        tls.flush().unwrap();
    });
    let (session, _) = accept(
        &mut ours,
        &server,
        Instant::now() + Duration::from_secs(10),
        &|| false,
    )
    .unwrap();
    let mut conn = Conn::secured(ours, session);
    let mut got = vec![0u8; 100_000];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(100_000, 1));
    conn.write_all(&pattern(200_000, 2)).unwrap();
    let mut after = [0u8; 5];
    conn.read_exact(&mut after).unwrap();
    assert_eq!(&after, b"after");
    peer.join().unwrap();

    // rustls as the server, this record layer as the client.
    let (ours, theirs) = pair();
    let mut ours = ours;
    let config = Arc::clone(&server.config);
    let peer = std::thread::spawn(move || {
        let Stream::Unix(sock) = theirs else {
            unreachable!()
        };
        let conn = rustls::ServerConnection::new(config).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut got = vec![0u8; 150_000];
        tls.read_exact(&mut got).unwrap();
        assert_eq!(got, pattern(150_000, 3));
        tls.write_all(&pattern(50_000, 4)).unwrap();
        tls.flush().unwrap();
    });
    let client = client.update_keys_every(4);
    let session = connect(&mut ours, &client, localhost(), Duration::from_secs(10)).unwrap();
    let mut conn = Conn::secured(ours, session);
    conn.write_all(&pattern(150_000, 3)).unwrap();
    let mut got = vec![0u8; 50_000];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(50_000, 4));
    peer.join().unwrap();
}

/// A socket pair with a relay between: bytes from the first end to the second pass through a
/// thread that flips bit 6 of the byte at offset `*flip` (counted from the first byte it
/// forwarded; `usize::MAX`: none) and cuts the stream at offset `*cut`; the other direction is
/// copied untouched.
fn relayed(
    flip: Arc<AtomicUsize>,
    cut: Arc<AtomicUsize>,
    seen: Arc<AtomicUsize>,
) -> (Stream, Stream) {
    let (a, mut ra) = UnixStream::pair().unwrap();
    let (b, mut rb) = UnixStream::pair().unwrap();
    let (mut ra2, mut rb2) = (ra.try_clone().unwrap(), rb.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut at = 0usize;
        loop {
            let n = match ra.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let (flip, cut) = (flip.load(Ordering::Acquire), cut.load(Ordering::Acquire));
            if (at..at + n).contains(&flip) {
                buf[flip - at] ^= 0x40;
            }
            let keep = if cut < at + n {
                cut.saturating_sub(at)
            } else {
                n
            };
            // Counted before they are forwarded: once the far end has read them, they count.
            seen.store(at + n, Ordering::Release);
            if rb.write_all(&buf[..keep]).is_err() || keep < n {
                break;
            }
            at += n;
        }
        let _ = rb.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut rb2, &mut ra2);
        let _ = ra2.shutdown(std::net::Shutdown::Write);
    });
    (Stream::Unix(a), Stream::Unix(b))
}

/// What the opening end makes of bytes that are not what was sealed: a flipped bit anywhere
/// in a record (header, body, inner type, tag) fails the read with `bad_record_mac` or a bad
/// header, never returning a byte of that record; a stream cut inside a record is a
/// truncation; and the error stays: the next read fails too.
#[test]
fn tampered_and_truncated_records_are_refused() {
    let (_dir, client, server) = creds();
    let data = pattern(40_000, 9);
    // Offsets into the application data: the first record's header, body, tag, the second
    // record's body.
    for (offset, cut) in [
        (Some(0), None),
        (Some(4), None),
        (Some(100), None),
        (Some(16_400), None),
        (Some(16_420), None),
        (None, Some(20_000)),
        (None, Some(3)),
    ] {
        let flip = Arc::new(AtomicUsize::new(usize::MAX));
        let cutting = Arc::new(AtomicUsize::new(usize::MAX));
        let seen = Arc::new(AtomicUsize::new(0));
        let (mut a, mut b) = relayed(Arc::clone(&flip), Arc::clone(&cutting), Arc::clone(&seen));
        let server = server.clone();
        let peer = std::thread::spawn(move || {
            let (session, _) = accept(
                &mut b,
                &server,
                Instant::now() + Duration::from_secs(10),
                &|| false,
            )
            .unwrap();
            Conn::secured(b, session)
        });
        let session = connect(&mut a, &client, localhost(), Duration::from_secs(10)).unwrap();
        let mut b = peer.join().unwrap();
        // Everything the client sent so far was the handshake, and the server has read it.
        let base = seen.load(Ordering::Acquire);
        if let Some(offset) = offset {
            flip.store(base + offset, Ordering::Release);
        }
        if let Some(cut) = cut {
            cutting.store(base + cut, Ordering::Release);
        }
        let mut a = Conn::secured(a, session);
        a.write_all(&data).unwrap();
        let mut got = vec![0u8; data.len()];
        let mut read = 0;
        let err = loop {
            match b.read(&mut got[read..]) {
                Ok(0) => panic!("{offset:?} {cut:?}: a clean end after {read} bytes"),
                Ok(n) => read += n,
                Err(e) => break e,
            }
            assert!(read < data.len(), "{offset:?} {cut:?}: every byte arrived");
        };
        // No byte of a damaged record was handed out: only whole records before it.
        assert_eq!(read % MAX_FRAGMENT, 0, "{offset:?} {cut:?}");
        assert_eq!(got[..read], data[..read]);
        let record = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<RecordError>())
            .cloned();
        match (offset, cut) {
            (Some(0 | 4), _) => assert!(
                matches!(
                    record,
                    Some(RecordError::BadHeader { .. } | RecordError::BadRecordMac)
                ),
                "{offset:?}: {err}"
            ),
            (Some(_), _) => assert_eq!(record, Some(RecordError::BadRecordMac), "{err}"),
            (None, _) => assert_eq!(record, Some(RecordError::Truncated), "{err}"),
        }
        assert!(b.read(&mut got).is_err(), "the error stays");
    }
}

proptest::proptest! {
    #![proptest_config(crate::tests::proptest_config())]

    /// The record layer is a byte stream: whatever sends of whatever sizes go in, with keys
    /// updated every few records, reads of whatever sizes get back exactly those bytes.
    #[test]
    fn the_record_layer_is_a_byte_stream(
        sends in proptest::collection::vec(
            proptest::collection::vec(0usize..70_000, 1..4),
            1..6,
        ),
        reads in proptest::collection::vec(1usize..40_000, 1..8),
        per_key in 1u64..6,
    ) {
        let (_dir, client, server) = creds();
        let (mut a, mut b) = handshake(&client.update_keys_every(per_key), &server);
        let (mut writer, _) = a.split(&Blocking).unwrap();
        let (_, mut reader) = b.split(&Blocking).unwrap();
        let batches: Vec<Vec<Vec<u8>>> = sends
            .iter()
            .enumerate()
            .map(|(i, lens)| {
                lens.iter()
                    .enumerate()
                    .map(|(j, &len)| pattern(len, (i * 7 + j) as u8))
                    .collect()
            })
            .collect();
        let expected: Vec<u8> = batches.iter().flatten().flatten().copied().collect();
        let sent = std::thread::spawn(move || {
            for batch in &batches {
                let slices: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                writer.send(&slices).unwrap();
            }
        });
        let mut got = vec![0u8; expected.len()];
        let mut at = 0;
        for len in reads.iter().cycle() {
            if at == got.len() {
                break;
            }
            let n = (*len).min(got.len() - at);
            reader.recv(&mut got[at..at + n]).unwrap();
            at += n;
        }
        sent.join().unwrap();
        proptest::prop_assert!(got == expected);
    }
}

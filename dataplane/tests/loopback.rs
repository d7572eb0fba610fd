//! Whole migrations over loopback TCP and Unix sockets, compared byte for byte.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{Image, Net, Next, Plan, Rng, assert_completed, guest, migrate, statuses, write_page};
use ramjet_control::{Fact, Side};
use ramjet_dataplane::Compression;
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::transport::Listener;
use ramjet_dataplane::{CancelHandle, ReceiveOptions, SendOptions, Sender, receive};

const IMAGE_BYTES: u64 = 256 << 20;

/// Plaintext: every transport, socket kind, channel count and compression mode for one image
/// kind. With TLS, the TLS axis: both transports, TCP and Unix, 1 and 4 channels, compression
/// off and auto, on a smaller image; every channel TLS 1.3, and nothing sent zero-copy. The first
/// transfer lands in fresh (known-zero) memory; the others in memory filled with junk, so that
/// every page, zero pages included, must really be written. With 2 channels the guest is live
/// (pages are copied before they are sent); with 1 and 4 it is paused (pages are sent in place
/// from frozen memory).
fn every_path(image: Image, seed: u64, tls: bool) {
    let bytes = if tls { 64 << 20 } else { IMAGE_BYTES };
    let (channel_counts, compressions): (&[u16], &[Compression]) = if tls {
        (&[1, 4], &[Compression::Off, Compression::Auto])
    } else {
        (
            &[1, 2, 4],
            &[
                Compression::Off,
                Compression::Lz4,
                Compression::Zstd,
                Compression::Auto,
            ],
        )
    };
    let src = guest(bytes, image, seed);
    let dst = Arc::new(GuestMemory::anonymous(bytes).expect("memory"));
    let mut first = true;
    // Zero-copy sends are refused with TLS (tests/tls.rs says so).
    let zero_copy = common::zero_copy().filter(|_| !tls).map(|t| (t, Net::Tcp));
    for (transport, net) in common::transports()
        .into_iter()
        .flat_map(|t| [(Arc::clone(&t), Net::Tcp), (t, Net::Unix)])
        .chain(zero_copy)
    {
        for &channels in channel_counts {
            for &compression in compressions {
                if !first {
                    dst.fill(0, 0, bytes as usize, 0xA5).expect("fill");
                }
                first = false;
                let paused = channels != 2;
                let what = format!(
                    "{}{image:?} over {net:?} with {}, {channels} channels, {compression}, {}",
                    if tls { "TLS, " } else { "" },
                    transport.name(),
                    if paused { "paused" } else { "live" }
                );
                let plan = Plan::new(net, channels, compression);
                let plan = Plan {
                    transport: Arc::clone(&transport),
                    paused,
                    ..if tls { plan.with_tls() } else { plan }
                };
                let none = DirtySet::none(&src);
                let outcome = migrate(
                    &src,
                    &dst,
                    &plan,
                    |_| Next::Final(none.clone()),
                    b"device state",
                );
                assert_completed(&outcome, &src, &dst, &what);
                let received = outcome.received.expect("checked");
                assert_eq!(received.device_state, b"device state", "{what}");
                let sent = outcome.sent.expect("checked");
                let stats = sent.stats;
                assert_eq!(stats.pages(), src.total_pages(), "{what}");
                assert_eq!(received.stats.pages(), src.total_pages(), "{what}");
                match image {
                    Image::Zero => assert_eq!(stats.pages_zero, src.total_pages(), "{what}"),
                    Image::Random => assert_eq!(
                        stats.pages_zero + stats.pages_lz4 + stats.pages_zstd,
                        0,
                        "{what}"
                    ),
                    Image::Mixed => {
                        // Half the pages are zero; with lz4 or zstd the text pages compress.
                        let half = src.total_pages() / 2;
                        assert!(
                            stats.pages_zero.abs_diff(half) < half / 20,
                            "{what}: {stats:?}"
                        );
                        let compressed = match compression {
                            Compression::Lz4 => Some(stats.pages_lz4),
                            Compression::Zstd => Some(stats.pages_zstd),
                            _ => None,
                        };
                        if let Some(compressed) = compressed {
                            assert!(compressed > src.total_pages() / 5, "{what}: {stats:?}");
                        }
                    }
                }
                // Auto may try a codec here (tests/auto.rs checks what it settles on).
                if !matches!(compression, Compression::Lz4 | Compression::Auto) {
                    assert_eq!(stats.pages_lz4, 0, "{what}");
                }
                if !matches!(compression, Compression::Zstd | Compression::Auto) {
                    assert_eq!(stats.pages_zstd, 0, "{what}");
                }
                assert_eq!(
                    (received.stats.pages_lz4, received.stats.pages_zstd),
                    (stats.pages_lz4, stats.pages_zstd),
                    "{what}: the receiver counts what was sent"
                );
                if tls {
                    let suite = sent.tls.as_ref().map(|t| t.suite.as_str());
                    assert_eq!(suite, Some("TLS13_AES_256_GCM_SHA384"), "{what}");
                    let subject = received.tls.as_ref().and_then(|t| t.peer_subject.clone());
                    assert_eq!(
                        subject.as_deref(),
                        Some(ramjet_dataplane::testkit::pki::SENDER_SUBJECT),
                        "{what}"
                    );
                    assert_eq!(stats.zero_copy_bytes, 0, "{what}");
                } else {
                    assert!(sent.tls.is_none() && received.tls.is_none(), "{what}");
                }
            }
        }
    }
}

#[test]
fn random_image_over_every_path_with_tls() {
    every_path(Image::Random, 4, true);
}

#[test]
fn mixed_image_over_every_path_with_tls() {
    every_path(Image::Mixed, 5, true);
}

#[test]
fn zero_image_over_every_path_with_tls() {
    every_path(Image::Zero, 6, true);
}

#[test]
fn random_image_over_every_path() {
    every_path(Image::Random, 1, false);
}

#[test]
fn zero_image_over_every_path() {
    every_path(Image::Zero, 2, false);
}

#[test]
fn mixed_image_over_every_path() {
    every_path(Image::Mixed, 3, false);
}

/// Pages rewritten between rounds, some of them in every round and on every channel: the
/// destination ends with the newest version of each, never a stale one from an earlier round.
#[test]
fn rewritten_pages_arrive_in_their_latest_version() {
    let zero_copy = common::zero_copy().map(|t| (t, Net::Tcp, Compression::Off));
    let cases = common::transports()
        .into_iter()
        .flat_map(|t| {
            [
                (Arc::clone(&t), Net::Tcp, Compression::Lz4),
                (t, Net::Unix, Compression::Auto),
            ]
        })
        .chain(zero_copy);
    for (transport, net, compression) in cases {
        let src = guest(32 << 20, Image::Mixed, 11);
        let dst = Arc::new(GuestMemory::anonymous(32 << 20).expect("memory"));
        let pages = src.total_pages();
        let mut rng = Rng::new(5);
        let mut buf = vec![0u8; PAGE_SIZE];
        // The first 512 pages (eight chunks: two per channel) change in every round.
        let hot: Vec<u64> = (0..512).collect();
        let source = Arc::clone(&src);
        let outcome = migrate(
            &src,
            &dst,
            &Plan {
                transport: Arc::clone(&transport),
                ..Plan::new(net, 4, compression)
            },
            |round| {
                let mut dirty = DirtySet::none(&source);
                let cold = (0..1500)
                    .map(|_| rng.next_u64() % pages)
                    .collect::<Vec<_>>();
                for &page in hot.iter().chain(&cold) {
                    write_page(&source, Image::Mixed, &mut rng, page, &mut buf);
                    dirty.insert(0, page);
                }
                // The guest pauses after its writes of round 6: the final round sends them in
                // place.
                if round >= 6 {
                    Next::Final(dirty)
                } else {
                    Next::Live(dirty)
                }
            },
            b"",
        );
        let what = format!("{net:?} multi-round with {}", transport.name());
        assert_completed(&outcome, &src, &dst, &what);
        let summary = outcome.sent.expect("checked");
        assert_eq!(summary.rounds, 7, "six live rounds and the final one");
        let passes = outcome
            .destination_facts
            .iter()
            .filter(|f| matches!(f, Fact::Pass(_)))
            .count();
        assert_eq!(passes, 7);
    }
}

/// Ordering under load: every round rewrites every page with content unique to the round, so
/// 64 frames per channel and round are queued and sent in batches, nine rounds in a row, on
/// every transport. A frame overtaking another (within a socket, or a stale round arriving
/// after a newer one) would leave an old version behind or be refused by the receiver; the
/// destination must end byte-identical to the source, whose last version is sent in place in
/// the final round.
#[test]
fn frames_stay_in_order_across_rounds_and_channels() {
    const BYTES: u64 = 64 << 20;
    let rewrite = |memory: &GuestMemory, round: u32, buf: &mut [u8]| {
        for page in 0..memory.total_pages() {
            // Mostly incompressible, a little text, so both raw and lz4 frames are in flight.
            let mut rng = Rng::new(u64::from(round) << 32 | page);
            if page % 5 == 0 {
                buf.fill(0);
                buf[..32].copy_from_slice(format!("round {round:8} page {page:12}").as_bytes());
            } else {
                rng.fill(buf);
            }
            memory
                .write(0, page * PAGE_SIZE as u64, buf)
                .expect("page in bounds");
        }
    };
    let zero_copy = common::zero_copy().map(|t| (t, Net::Tcp));
    let cases = common::transports()
        .into_iter()
        .flat_map(|t| [(Arc::clone(&t), Net::Tcp), (t, Net::Unix)])
        .chain(zero_copy);
    for (transport, net) in cases {
        let src = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
        let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
        let mut buf = vec![0u8; PAGE_SIZE];
        rewrite(&src, 0, &mut buf);
        let source = Arc::clone(&src);
        let outcome = migrate(
            &src,
            &dst,
            &Plan {
                transport: Arc::clone(&transport),
                ..Plan::new(net, 4, Compression::Lz4)
            },
            |round| {
                rewrite(&source, round, &mut buf);
                let all = DirtySet::all(&source);
                if round >= 8 {
                    Next::Final(all)
                } else {
                    Next::Live(all)
                }
            },
            b"",
        );
        let what = format!("{net:?} with {}", transport.name());
        assert_completed(&outcome, &src, &dst, &what);
        let summary = outcome.sent.expect("checked");
        assert_eq!(summary.rounds, 9, "{what}");
        assert_eq!(summary.stats.pages(), 9 * src.total_pages(), "{what}");
    }
}

/// Several regions at scattered guest addresses, including a tiny one.
#[test]
fn several_regions() {
    use ramjet_dataplane::memory::{GuestAddr, Region};
    let make = || {
        GuestMemory::new(vec![
            Region::anonymous(0, GuestAddr(0), 8 << 20).expect("region"),
            Region::memfd(5, GuestAddr(1 << 32), 4 << 20).expect("region"),
            Region::anonymous(9, GuestAddr(1 << 40), 4096).expect("region"),
        ])
        .expect("memory")
    };
    let src = Arc::new(make());
    let mut rng = Rng::new(8);
    let mut buf = vec![0u8; PAGE_SIZE];
    for (region, r) in src.regions().iter().enumerate() {
        for page in 0..r.layout().pages() {
            if !rng.next_u64().is_multiple_of(3) {
                rng.fill(&mut buf);
                src.write(region, page * PAGE_SIZE as u64, &buf)
                    .expect("write");
            }
        }
    }
    let dst = Arc::new(make());
    let outcome = migrate(
        &src,
        &dst,
        &Plan::new(Net::Tcp, 3, Compression::Auto),
        |_| Next::Final(DirtySet::none(&src)),
        b"x",
    );
    assert_completed(&outcome, &src, &dst, "three regions");
}

/// A cancel on either side stops both promptly: the cancelled side reports `drained` without
/// `failed`, the other side fails with a clear error, and the control machines end in
/// `cancelled` and `failed`.
#[test]
fn cancel_on_either_side() {
    for cancel_sender in [true, false] {
        let src = guest(64 << 20, Image::Random, 4);
        let dst = Arc::new(GuestMemory::anonymous(64 << 20).expect("memory"));
        let listener = Listener::bind(&common::endpoint(Net::Tcp)).expect("bind");
        let at = listener.endpoint().clone();
        let (send_cancel, recv_cancel) = (CancelHandle::new(), CancelHandle::new());
        let source_facts = Arc::new(common::Facts::default());
        let destination_facts = Arc::new(common::Facts::default());
        // Cancel as soon as data flows: the sender at its first pass, the receiver once set up.
        let (sc, rc) = (send_cancel.clone(), recv_cancel.clone());
        let (sf, df) = (Arc::clone(&source_facts), Arc::clone(&destination_facts));
        let source_sink: Arc<dyn ramjet_dataplane::FactSink> = Arc::new(move |fact: Fact| {
            if cancel_sender && fact == Fact::Pass(1) {
                sc.cancel();
            }
            sf.sink().fact(fact);
        });
        let destination_sink: Arc<dyn ramjet_dataplane::FactSink> = Arc::new(move |fact: Fact| {
            if !cancel_sender && fact == Fact::SetupDone {
                rc.cancel();
            }
            df.sink().fact(fact);
        });
        let options = ReceiveOptions {
            cancel: recv_cancel,
            ..ReceiveOptions::default()
        };
        let dst2 = Arc::clone(&dst);
        let receiver = thread::spawn(move || receive(&listener, dst2, &options, destination_sink));
        let options = SendOptions {
            cancel: send_cancel,
            ..SendOptions::default()
        };
        let sent =
            Sender::connect(Arc::clone(&src), &at, &options, source_sink).and_then(|mut s| {
                s.round(&DirtySet::all(&src))?;
                s.switchover()?;
                s.finish(b"")
            });
        let received = receiver.join().expect("receiver thread");
        let (sent, received) = (sent.expect_err("sender"), received.expect_err("receiver"));
        let (cancelled, failed, cancelled_facts, failed_facts, cancelled_side) = if cancel_sender {
            (
                sent,
                received,
                source_facts.all(),
                destination_facts.all(),
                Side::Source,
            )
        } else {
            (
                received,
                sent,
                destination_facts.all(),
                source_facts.all(),
                Side::Destination,
            )
        };
        assert!(cancelled.is_cancelled(), "{}", cancelled.chain());
        assert!(!failed.is_cancelled());
        assert_eq!(cancelled_facts.last(), Some(&Fact::Drained));
        assert!(!cancelled_facts.iter().any(|f| matches!(f, Fact::Failed(_))));
        assert!(
            matches!(
                failed_facts.as_slice(),
                [.., Fact::Failed(_), Fact::Drained]
            ),
            "{failed_facts:?}"
        );
        // The user's cancel is a trigger on the cancelled side.
        let mut machine = ramjet_control::Machine::new(
            cancelled_side,
            ramjet_control::Profile::Qemu10,
            ramjet_control::Options::new(),
        );
        let t = ramjet_control::Timestamp::EPOCH;
        machine
            .step(ramjet_control::Trigger::Migrate, t)
            .expect("migrate");
        for fact in &cancelled_facts {
            if *fact == Fact::Drained {
                machine
                    .step(ramjet_control::Trigger::Cancel, t)
                    .expect("cancel");
            }
            machine.step(fact.clone(), t).expect("fact");
        }
        assert_eq!(machine.status(), ramjet_control::Status::Cancelled);
        let other = if cancel_sender {
            Side::Destination
        } else {
            Side::Source
        };
        assert_eq!(
            statuses(other, &failed_facts).last().map(String::as_str),
            Some("failed")
        );
    }
}

/// A timeout means a link that stopped, not a slow one: through a relay moving 512 KiB/s, a
/// 1 MiB guest takes about four times as long as each side's 500 ms timeout allows for one
/// operation (a 256 KiB frame needs half a second, and the sender waits for its confirmation
/// while its sockets still drain), and still completes, on every transport and socket.
#[test]
fn a_slow_link_is_not_a_stopped_one() {
    for transport in common::transports() {
        for net in [Net::Tcp, Net::Unix] {
            let src = guest(1 << 20, Image::Random, 3);
            let dst = Arc::new(GuestMemory::anonymous(1 << 20).expect("memory"));
            let plan = Plan {
                transport: Arc::clone(&transport),
                paused: true,
                timeout: Duration::from_millis(500),
                throttle: Some(512 << 10),
                ..Plan::new(net, 1, Compression::Off)
            };
            let none = DirtySet::none(&src);
            let outcome = migrate(&src, &dst, &plan, |_| Next::Final(none.clone()), b"dev");
            let what = format!("{} over {net:?}", transport.name());
            assert_completed(&outcome, &src, &dst, &what);
        }
    }
}

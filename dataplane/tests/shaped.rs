//! Migrations across a real link: two network namespaces joined by a veth pair, shaped by the
//! kernel (`tbf`), the receiver in one and the sender in the other (`testkit::netns`). Skipped,
//! with the reason printed, where namespaces cannot be made (not root, no iproute2).

mod common;

use std::sync::Arc;

use common::{Image, guest, migrate_across};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::netns::{Link, Side};
use ramjet_dataplane::{Compression, SendOptions};

/// 250 MB/s: a slow link, where compression pays.
const SLOW: u64 = 250_000_000;

fn link() -> Option<Link> {
    match Link::new() {
        Ok(link) => Some(link),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// Every codec moves each image kind byte for byte across a link shaped to 250 MB/s, into
/// memory filled with junk (so zero pages must be written too); both sides count the pages
/// each codec carried alike, and bytes went through the kernel's shaper.
#[test]
fn every_codec_moves_every_image_across_a_shaped_link() {
    let Some(link) = link() else {
        return;
    };
    link.shape(Some(SLOW)).expect("shape");
    let bytes: usize = 8 << 20;
    for image in [Image::Zero, Image::Random, Image::Mixed] {
        let src = guest(bytes as u64, image, 19);
        let dst = Arc::new(GuestMemory::anonymous(bytes as u64).expect("memory"));
        for compression in [
            Compression::Off,
            Compression::Lz4,
            Compression::Zstd,
            Compression::Auto,
        ] {
            let what = format!("{image:?} with {compression}");
            dst.fill(0, 0, bytes, 0xA5).expect("fill");
            let options = SendOptions {
                channels: 2,
                compression,
                ..SendOptions::default()
            };
            let (sent, received) = migrate_across(Some(&link), &src, &dst, options);
            let sent = sent.unwrap_or_else(|e| panic!("{what}: sender: {}", e.chain()));
            let received = received.unwrap_or_else(|e| panic!("{what}: receiver: {}", e.chain()));
            assert!(received.handover.may_run(), "{what}");
            assert_eq!(received.device_state, b"device state", "{what}");
            assert_eq!(
                src.first_difference(&dst).expect("layout"),
                None,
                "{what}: memory differs"
            );
            let (s, r) = (sent.stats, received.stats);
            assert_eq!(s.pages(), src.total_pages(), "{what}");
            assert_eq!(
                (s.pages_zero, s.pages_raw, s.pages_lz4, s.pages_zstd),
                (r.pages_zero, r.pages_raw, r.pages_lz4, r.pages_zstd),
                "{what}: both sides count alike"
            );
            let compressed = s.pages_lz4 + s.pages_zstd;
            match (image, compression) {
                (Image::Zero, _) => assert_eq!(s.pages_zero, src.total_pages(), "{what}"),
                (Image::Random, _) | (Image::Mixed, Compression::Off) => {
                    assert_eq!(compressed, 0, "{what}");
                }
                (Image::Mixed, Compression::Lz4) => {
                    assert!(s.pages_lz4 > src.total_pages() / 5, "{what}: {s:?}");
                }
                (Image::Mixed, Compression::Zstd) => {
                    assert!(s.pages_zstd > src.total_pages() / 5, "{what}: {s:?}");
                }
                (Image::Mixed, _) => {}
            }
        }
    }
    let shaped = link.shaped_bytes(Side::Sender).expect("shaped");
    assert!(shaped > 8 << 20, "{shaped} bytes through the shaper");
}

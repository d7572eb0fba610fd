//! `Compression::Auto` decides from what it measures: over unshaped TCP loopback it sends the
//! pages raw; over the same loopback capped to 250 MB/s by `max_bandwidth`, and across a link
//! the kernel shapes to 250 MB/s (`testkit::netns`, skipped with the reason printed where
//! namespaces cannot be made), it compresses them. One test in a binary of its own, so that
//! nothing else runs beside it: the cores are idle but for it.

mod common;

use std::sync::Arc;

use common::{Image, Lines, guest, migrate_across};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::netns::Link;
use ramjet_dataplane::{Compression, SendOptions, Stats};

/// Migrates `src` (the mixed image) with `Compression::Auto` across `link` (`None`: TCP
/// loopback), at most `max_bandwidth` bytes per second, checks it arrived whole, and returns
/// the sender's stats and its log lines about the codec.
fn migrate_auto(
    link: Option<&Link>,
    max_bandwidth: Option<u64>,
    src: &Arc<GuestMemory>,
    what: &str,
) -> (Stats, Vec<String>) {
    let dst = Arc::new(GuestMemory::anonymous(src.total_pages() * 4096).expect("memory"));
    // Prefaulted, as a destination whose guest was set up before the migration: on this
    // machine a first touch of fresh memory costs 5–12 µs a page, which would make the
    // receiver, not the link, what the sender waits for (and no codec changes that).
    let len = usize::try_from(src.total_pages() * 4096).expect("64-bit");
    dst.fill(0, 0, len, 0xA5).expect("prefault");
    let lines = Arc::new(Lines::default());
    let options = SendOptions {
        channels: 2,
        compression: Compression::Auto,
        max_bandwidth,
        log: lines.log(),
        ..SendOptions::default()
    };
    let (sent, received) = migrate_across(link, src, &dst, options);
    let sent = sent.unwrap_or_else(|e| panic!("{what}: sender: {}", e.chain()));
    let received = received.unwrap_or_else(|e| panic!("{what}: receiver: {}", e.chain()));
    assert!(received.handover.may_run(), "{what}");
    assert_eq!(src.first_difference(&dst).expect("layout"), None, "{what}");
    let (s, r) = (sent.stats, received.stats);
    assert_eq!(
        (s.pages_zero, s.pages_raw, s.pages_lz4, s.pages_zstd),
        (r.pages_zero, r.pages_raw, r.pages_lz4, r.pages_zstd),
        "{what}: both sides count alike"
    );
    let decisions = lines
        .all()
        .into_iter()
        .filter(|l| l.starts_with("compression auto: "))
        .collect();
    (s, decisions)
}

/// The codec the last logged decision named: auto logs its first decision (`stays off` or
/// `now lz4`, ...) and every switch after. A trial (`trying lz4`) is not a decision: it lasts
/// until the codec is measured, and then auto decides.
fn last_codec(decisions: &[String]) -> Option<&str> {
    decisions.iter().rev().find_map(|line| {
        let (what, rest) = line.strip_prefix("compression auto: ")?.split_once(' ')?;
        (what != "trying").then(|| rest.split(':').next())?
    })
}

#[test]
fn auto_compresses_across_a_slow_link_and_not_over_loopback() {
    // Over loopback every codec is slower than the socket, and measuring shows it: the
    // pages go raw. A trial of a codec the model favoured may compress a few (it then
    // measures slower, and auto goes back), never most.
    let src = guest(512 << 20, Image::Mixed, 29);
    let compressible = src.total_pages() / 4;
    let (stats, decisions) = migrate_auto(None, None, &src, "loopback");
    assert_eq!(
        last_codec(&decisions),
        Some("off"),
        "loopback: {decisions:#?}"
    );
    assert!(
        stats.pages_lz4 + stats.pages_zstd < compressible / 4,
        "loopback: {stats:?} {decisions:#?}"
    );

    // A cap is a slow link: capped to 250 MB/s, the same loopback is the bottleneck, and
    // once measured auto compresses most of the compressible pages, with whichever codec
    // measures fastest.
    let src = guest(160 << 20, Image::Mixed, 31);
    let compresses = |link: Option<&Link>, max_bandwidth, what: &str| {
        let (stats, decisions) = migrate_auto(link, max_bandwidth, &src, what);
        let compressible = src.total_pages() / 4;
        assert!(
            stats.pages_lz4 + stats.pages_zstd > compressible / 2,
            "{what}: {stats:?} {decisions:#?}"
        );
        let codec = last_codec(&decisions);
        assert!(
            matches!(codec, Some("lz4" | "zstd")),
            "{what}: {decisions:#?}"
        );
    };
    compresses(None, Some(250_000_000), "capped");

    // Across 250 MB/s the link is the bottleneck, as the cap was.
    let link = match Link::new() {
        Ok(link) => link,
        Err(why) => {
            eprintln!("the shaped half skipped: {why}");
            return;
        }
    };
    link.shape(Some(250_000_000)).expect("shape");
    compresses(Some(&link), None, "250 MB/s");
}

//! How long a guest waits for a page in postcopy, over loopback TCP: a 1 GiB guest switches to
//! postcopy at once (every page still on the source), and a thread on the destination reads
//! pages in a scattered order, each read of a missing page a fault that the destination asks
//! the source for. Two runs: the background push slowed to a trickle (the fault path alone),
//! and the push at full speed beside it (requested pages must overtake it). The baseline, in
//! the same run: a bare request/response ping-pong over a loopback TCP socket (32 bytes out, a
//! page back), the floor of any page fetched over the network.
//!
//! ```text
//! cargo run --release -p ramjet-dataplane --example postcopy_faults -- [GUEST_MIB]
//! ```

use std::error::Error;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::postcopy::{BUCKETS, LatencyDist};
use ramjet_dataplane::testkit::image::{self, ImageKind};
use ramjet_dataplane::transport::Listener;
use ramjet_dataplane::{PostcopyRun, ReceiveOptions, SendOptions, Sender, receive};

fn main() -> Result<(), Box<dyn Error>> {
    let mib: u64 = std::env::args().nth(1).map_or(Ok(1024), |a| a.parse())?;
    let bytes = mib << 20;
    println!("{mib} MiB guest, postcopy from the start, loopback TCP, 2 channels");
    let floor = ping_pong(20_000)?;
    report(
        "ping-pong floor (32 B out, 4 KiB back, bare TCP)",
        &floor,
        None,
    );
    for (what, push) in [
        ("faults, push trickling (8 MB/s)", Some(8_000_000)),
        ("faults, push at full speed beside them", None),
    ] {
        let (latency, reads, took) = postcopy(bytes, push)?;
        report(what, &latency, Some((reads, took)));
    }
    Ok(())
}

/// One postcopy migration of `bytes` with the push limited to `push` bytes a second: the
/// destination's fault latencies, the guest's reads and how long the migration took.
fn postcopy(bytes: u64, push: Option<u64>) -> Result<(LatencyDist, u64, Duration), Box<dyn Error>> {
    let source = Arc::new(GuestMemory::anonymous(bytes)?);
    image::fill(&source, ImageKind::Random, 3)?;
    let destination = Arc::new(GuestMemory::anonymous_like(&source.layout())?);
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
    let at = listener.endpoint().clone();
    let (quit, reads) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let guest = {
        let (memory, quit, reads) = (
            Arc::clone(&destination),
            Arc::clone(&quit),
            Arc::clone(&reads),
        );
        PostcopyRun::new(move |_| {
            let (memory, quit, reads) =
                (Arc::clone(&memory), Arc::clone(&quit), Arc::clone(&reads));
            thread::spawn(move || {
                let pages = memory.total_pages();
                let mut page = vec![0u8; PAGE_SIZE];
                let mut at = 0u64;
                while !quit.load(Ordering::Relaxed) {
                    at = (at + 104_729) % pages;
                    if memory.read(0, at * PAGE_SIZE as u64, &mut page).is_err() {
                        return;
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
            Ok(())
        })
    };
    let options = ReceiveOptions {
        postcopy: Some(guest),
        ..ReceiveOptions::default()
    };
    let incoming = Arc::clone(&destination);
    let receiver = thread::spawn(move || receive(&listener, incoming, &options, Arc::new(|_| {})));
    let options = SendOptions {
        postcopy: true,
        max_bandwidth: push,
        ..SendOptions::default()
    };
    let started = Instant::now();
    let mut sender = Sender::connect(Arc::clone(&source), &at, &options, Arc::new(|_| {}))?;
    sender.switchover()?;
    let summary = sender.postcopy(&DirtySet::all(&source), &[])?.run()?;
    let took = started.elapsed();
    quit.store(true, Ordering::Relaxed);
    let received = receiver.join().map_err(|_| "the receiver panicked")??;
    if !source.content_eq(&destination)? {
        return Err("the destination differs from the source".into());
    }
    let latency = received.postcopy.map(|p| p.latency).unwrap_or_default();
    let _ = summary;
    Ok((latency, reads.load(Ordering::Relaxed), took))
}

/// `iterations` request/response round trips over a loopback TCP socket: a 32-byte request,
/// a 4 KiB page back, timed into the same buckets as the faults.
fn ping_pong(iterations: u64) -> Result<LatencyDist, Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = thread::spawn(move || -> std::io::Result<()> {
        let (mut peer, _) = listener.accept()?;
        peer.set_nodelay(true)?;
        let (mut request, page) = ([0u8; 32], vec![7u8; PAGE_SIZE]);
        while peer.read_exact(&mut request).is_ok() {
            peer.write_all(&page)?;
        }
        Ok(())
    });
    let mut client = TcpStream::connect(addr)?;
    client.set_nodelay(true)?;
    let mut dist = LatencyDist::default();
    let mut page = vec![0u8; PAGE_SIZE];
    for _ in 0..iterations {
        let start = Instant::now();
        client.write_all(&[1u8; 32])?;
        client.read_exact(&mut page)?;
        let took = start.elapsed();
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (micros.max(1).ilog2() as usize).min(BUCKETS - 1);
        dist.buckets[bucket] += 1;
        dist.count += 1;
        dist.total += took;
        dist.max = dist.max.max(took);
    }
    drop(client);
    server.join().map_err(|_| "the server panicked")??;
    Ok(dist)
}

/// The bucket below which `permille` thousandths of the faults fall, as its upper bound in
/// µs.
fn percentile(dist: &LatencyDist, permille: u64) -> u64 {
    let want = (dist.count * permille).div_ceil(1000);
    let mut seen = 0;
    for (bucket, &n) in dist.buckets.iter().enumerate() {
        seen += n;
        if seen >= want.max(1) {
            return 1 << (bucket + 1);
        }
    }
    1 << BUCKETS
}

fn report(what: &str, dist: &LatencyDist, run: Option<(u64, Duration)>) {
    let shares: Vec<String> = dist
        .buckets
        .iter()
        .enumerate()
        .filter(|&(_, &n)| n * 200 >= dist.count)
        .map(|(b, &n)| {
            format!(
                "{}-{} µs {:.1}%",
                if b == 0 { 0 } else { 1u64 << b },
                1u64 << (b + 1),
                n as f64 * 100.0 / dist.count.max(1) as f64
            )
        })
        .collect();
    println!(
        "{what}: {} samples, mean {:.1?}, p50 < {} µs, p90 < {} µs, p99 < {} µs, max {:.1?}{}",
        dist.count,
        dist.mean(),
        percentile(dist, 500),
        percentile(dist, 900),
        percentile(dist, 990),
        dist.max,
        run.map_or_else(String::new, |(reads, took)| format!(
            "; {reads} guest reads, migration {took:.2?}"
        ))
    );
    println!("    {}", shares.join(", "));
}

//! End to end over loopback TCP: ramjet against a plain socket copy of the same bytes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use memmap2::MmapMut;
use ramjet_dataplane::codec::Compression;
use ramjet_dataplane::dirty::DirtySet;
use ramjet_dataplane::image::{self, ImageKind, Rng};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::Listener;
use ramjet_dataplane::{ReceiveOptions, SendOptions, Sender, receive};

const BYTES: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;

/// The baseline: `streams` TCP connections, each moving its share of `src` into `dst` with
/// 1 MiB `write_all`/`read_exact` calls.
fn raw_copy(listener: &TcpListener, src: &[u8], dst: &mut [u8], streams: usize) {
    let share = src.len() / streams;
    let addr = listener.local_addr().expect("address");
    thread::scope(|scope| {
        for part in src.chunks(share) {
            scope.spawn(move || {
                let mut stream = TcpStream::connect(addr).expect("connect");
                for chunk in part.chunks(CHUNK) {
                    stream.write_all(chunk).expect("write");
                }
            });
        }
        for part in dst.chunks_mut(share) {
            let (mut stream, _) = listener.accept().expect("accept");
            scope.spawn(move || {
                for chunk in part.chunks_mut(CHUNK) {
                    stream.read_exact(chunk).expect("read");
                }
            });
        }
    });
}

/// One whole migration of `src` into `dst`: every page, switchover, device state, confirmation.
fn migrate(src: &Arc<GuestMemory>, dst: &Arc<GuestMemory>, channels: u16) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let at = listener.endpoint().clone();
    let dst = Arc::clone(dst);
    let receiver = thread::spawn(move || {
        receive(&listener, dst, &ReceiveOptions::default(), Arc::new(|_| {})).expect("receive")
    });
    let options = SendOptions {
        channels,
        compression: Compression::Auto,
        ..SendOptions::default()
    };
    let mut sender =
        Sender::connect(Arc::clone(src), &at, &options, Arc::new(|_| {})).expect("connect");
    sender.round(&DirtySet::all(src)).expect("round");
    sender.switchover().expect("switchover");
    sender.round(&DirtySet::none(src)).expect("final round");
    sender.finish(&[0u8; 4096]).expect("finish");
    receiver.join().expect("receiver thread");
}

fn loopback(c: &mut Criterion) {
    let mut group = c.benchmark_group("loopback_tcp");
    group.throughput(Throughput::Bytes(BYTES));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(12));

    let len = usize::try_from(BYTES).expect("64-bit");
    let mut src = MmapMut::map_anon(len).expect("map");
    Rng::new(1).fill(&mut src);
    let mut dst = MmapMut::map_anon(len).expect("map");
    dst.fill(1);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    for streams in [1, 2] {
        group.bench_function(BenchmarkId::new("baseline_write_read", streams), |b| {
            b.iter(|| raw_copy(&listener, &src, &mut dst, streams));
        });
    }
    drop((src, dst));

    let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
    dst.prefault().expect("prefault");
    for kind in [ImageKind::Random, ImageKind::Mixed] {
        let src = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
        image::fill(&src, kind, 7).expect("image");
        for channels in [1u16, 2] {
            group.bench_function(BenchmarkId::new(format!("ramjet_{kind}"), channels), |b| {
                b.iter(|| migrate(&src, &dst, channels));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, loopback);
criterion_main!(benches);

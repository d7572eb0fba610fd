//! The codec stage on one core, as a live round runs it: pages copied out of guest memory
//! (relaxed atomic word loads, since the guest may be writing them), classified, and sealed
//! into frames with their crc. The baseline in the same run is the plain `memcpy` of the same
//! bytes out of an ordinary buffer. The images are larger than any cache, so pages stream from
//! RAM as they do in a migration.

use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ramjet_dataplane::internals::codec::{Batch, Encoder, PageCompression};
use ramjet_dataplane::internals::wire::frame_capacity;
use ramjet_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ramjet_dataplane::testkit::image::{self, ImageKind};

const BYTES: u64 = 512 << 20;
const PAGES_PER_FRAME: u32 = 64;

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_512MiB");
    group.throughput(Throughput::Bytes(BYTES));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));

    let pages = BYTES / PAGE_SIZE as u64;
    let mut page = vec![0u8; PAGE_SIZE];
    for kind in [ImageKind::Random, ImageKind::Mixed] {
        let memory = GuestMemory::anonymous(BYTES).expect("memory");
        image::fill(&memory, kind, 7).expect("image");
        let mut plain = vec![0u8; usize::try_from(BYTES).expect("64-bit")];
        for (index, chunk) in plain.chunks_mut(PAGE_SIZE).enumerate() {
            memory
                .read(0, index as u64 * PAGE_SIZE as u64, chunk)
                .expect("read");
        }

        group.bench_function(format!("baseline_memcpy_{kind}"), |b| {
            b.iter(|| {
                for chunk in plain.chunks(PAGE_SIZE) {
                    page.copy_from_slice(chunk);
                    std::hint::black_box(&page);
                }
            });
        });
        group.bench_function(format!("guest_read_{kind}"), |b| {
            b.iter(|| {
                for index in 0..pages {
                    memory
                        .read(0, index * PAGE_SIZE as u64, &mut page)
                        .expect("read");
                    std::hint::black_box(&page);
                }
            });
        });
        let mut encoder = Encoder::new();
        let mut frame = vec![0u8; frame_capacity(PAGES_PER_FRAME as usize)];
        let offsets: Vec<u32> = (0..PAGES_PER_FRAME).collect();
        group.bench_function(format!("encode_{kind}"), |b| {
            b.iter(|| {
                for first in (0..pages).step_by(PAGES_PER_FRAME as usize) {
                    let batch = Batch {
                        region: 0,
                        first,
                        offsets: &offsets,
                        round: 1,
                    };
                    let encoded = encoder.encode(&memory, &batch, PageCompression::Off, &mut frame);
                    std::hint::black_box(encoded.expect("encode"));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);

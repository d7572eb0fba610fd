//! The codec stage on one core, as a live round runs it: pages copied out of guest memory
//! (relaxed atomic word loads, since the guest may be writing them), classified, and sealed
//! into frames with their crc. The baseline in the same run is the plain `memcpy` of the same
//! bytes out of an ordinary buffer. The images are larger than any cache, so pages stream from
//! RAM as they do in a migration. Each image is encoded with every page codec (off, lz4, zstd),
//! and each codec's frames are decoded again (the receiver's decode workers' part); the bytes
//! each codec puts on the wire are printed with its ratio.

use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ramjet_dataplane::internals::codec::{Batch, Decoder, Encoder, PageCompression};
use ramjet_dataplane::internals::wire::{FrameHeader, PageTable, frame_capacity};
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
        let batches = (0..pages)
            .step_by(PAGES_PER_FRAME as usize)
            .map(|first| Batch {
                region: 0,
                first,
                offsets: &offsets,
                round: 1,
            })
            .collect::<Vec<_>>();
        for (name, compression) in [
            ("off", PageCompression::Off),
            ("lz4", PageCompression::Lz4),
            ("zstd", PageCompression::Zstd),
        ] {
            group.bench_function(format!("encode_{kind}_{name}"), |b| {
                b.iter(|| {
                    for batch in &batches {
                        let encoded = encoder.encode(&memory, batch, compression, &mut frame);
                        std::hint::black_box(encoded.expect("encode"));
                    }
                });
            });
            // The frames as sent, for the wire bytes and the decode bench.
            let frames: Vec<Vec<u8>> = batches
                .iter()
                .map(|batch| {
                    let (len, _) = encoder
                        .encode(&memory, batch, compression, &mut frame)
                        .expect("encode");
                    frame[..len].to_vec()
                })
                .collect();
            let wire: usize = frames.iter().map(Vec::len).sum();
            println!(
                "{kind} {name}: {wire} bytes on the wire, ratio {:.3}",
                BYTES as f64 / wire as f64
            );
            if compression == PageCompression::Off {
                continue;
            }
            let mut decoder = Decoder::new();
            let mut table = PageTable::new();
            group.bench_function(format!("decode_{kind}_{name}"), |b| {
                b.iter(|| {
                    for bytes in &frames {
                        let mut fixed = [0u8; FrameHeader::LEN];
                        fixed.copy_from_slice(&bytes[..FrameHeader::LEN]);
                        let header = FrameHeader::decode(&fixed).expect("header");
                        let mut at = FrameHeader::LEN + PageTable::len_for(&header);
                        table
                            .decode(&header, &bytes[FrameHeader::LEN..at])
                            .expect("table");
                        for (_, entry) in table.pages() {
                            let len = entry.len as usize;
                            if entry.encoding.is_compressed() {
                                decoder
                                    .decode(entry.encoding, &bytes[at..at + len], &mut page)
                                    .expect("decode");
                                std::hint::black_box(&page);
                            }
                            at += len;
                        }
                    }
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);

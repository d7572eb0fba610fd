//! Criterion benchmarks for ramjet live under `benches/`, one file per stage (bitmap scan,
//! crc32, lz4, frame codec, loopback send) plus end to end, each reporting throughput against a
//! baseline measured in the same run. None exist yet: they arrive with the stages they measure.

#![warn(missing_docs)]

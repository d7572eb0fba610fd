//! Criterion benchmarks for ramjet live in `benches/`, each reporting throughput in bytes of
//! guest RAM per second beside a baseline measured in the same run:
//!
//! - `loopback`: whole migrations of 1 GiB random and mixed images over loopback TCP with 1 and
//!   2 channels, against plain large `write_all`/`read_exact` copies between two mappings over
//!   the same number of TCP streams.
//!
//! Run with `cargo bench -p ramjet-benches`. The destination memory is prefaulted (warm), as a
//! VMM's guest RAM is before a migration arrives.

#![warn(missing_docs)]

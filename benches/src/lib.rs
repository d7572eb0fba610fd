//! Criterion benchmarks for ramjet live in `benches/`, each reporting throughput in bytes of
//! guest RAM per second beside a baseline measured in the same run:
//!
//! - `loopback`: whole migrations of 2 GiB random and mixed images over loopback TCP and over a
//!   Unix socket with 1 and 2 channels on the io_uring and blocking transports, against plain
//!   copies of the same bytes between two mappings over the same number of streams (blocking
//!   `write_all` of 1 MiB chunks, and on TCP io_uring `Send`, received with `read_exact`). Each
//!   prints GB/s and the CPU seconds per GB that sender and receiver spent together, then a
//!   table of paired ratios against the baseline. `RAMJET_BENCH_BYTES=256M` makes a quick run.
//! - `tls`: the same migrations (paused guest, io_uring, compression off) in plaintext and under
//!   TLS 1.3, alternating in pairs, with GB/s, CPU seconds per GB, the negotiated cipher suite
//!   and a table of paired TLS/plaintext ratios; and where the receiver should open records,
//!   over real loopback sockets: large reads into a buffer and a copy out (or an out-of-place
//!   open), against exact reads straight into the destination. `RAMJET_BENCH_BYTES=256M` makes a quick run.
//!
//! - `same_host`: a paused 2 GiB memfd guest handed over by file descriptor on one host
//!   (`--same-host`), with its downtime, against passing, mapping (and touching) the descriptor
//!   by hand and against copying the same guest over the same Unix socket.
//!
//! [`measure`] holds what they share. Run with `cargo bench -p ramjet-benches` (one file:
//! `--bench tls`). The destination memory is prefaulted (warm), as a
//! VMM's guest RAM is before a migration arrives.

#![warn(missing_docs)]

pub mod measure;
pub mod migrate;
pub mod raw;

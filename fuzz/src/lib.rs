//! Shared pieces of ramjet's fuzz targets: how a target reads its input, the structured frame
//! streams of the `receiver` target, a reference model of the receiver to compare against, the
//! input encoding of the `control` target, and the seed builders (`examples/seeds.rs` writes the
//! committed seed corpus with them).
//!
//! Every input format here is total: any byte string means something, and running out of bytes
//! reads as zeros, so the fuzzer never wastes executions on inputs the harness cannot use.

#![warn(missing_docs)]

pub mod control_input;
pub mod cursor;
pub mod model;
pub mod program;

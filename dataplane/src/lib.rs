//! ramjet's data plane: moves guest RAM from mmapped memory to a receiver.
//!
//! This crate is being built (see `DESIGN.md` in the project's shared docs). It will stream
//! dirty guest pages over io_uring sockets with parallel zero-page elision, lz4 compression and
//! crc32 checksums, and report only facts ([`Fact`]) — what completed, what failed — to the
//! caller, who feeds them to a [`ramjet_control::Machine`] for the visible status. Nothing here
//! moves memory yet.

#![warn(missing_docs)]

/// The vocabulary the data plane reports in: facts for the control machine.
pub use ramjet_control::Fact;

//! What tests, benchmarks, the fuzz targets and the `ramjet` tool share, behind the `testkit`
//! feature and not part of the embedder's API: deterministic guest [images](image), a toy guest
//! that keeps writing its memory ([`Workload`]), a check that a migration left no file
//! descriptor or thread behind ([`Resources`]), and a [relay] that loses a handover message.

pub mod image;
mod leaks;
pub mod pki;
pub mod relay;
mod workload;

pub use leaks::Resources;
pub use workload::Workload;

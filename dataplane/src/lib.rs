//! ramjet's data plane: moves guest RAM from mmapped memory to a receiver.
//!
//! # Embedding it in a VMM
//!
//! 1. **Guest memory.** Describe guest RAM as a [`GuestMemory`](memory::GuestMemory) of regions:
//!    the VMM's own mappings ([`Region::from_host`](memory::Region::from_host)), rust-vmm's
//!    `GuestMemoryMmap` (`GuestMemory::from_vm_memory`, feature `vm-memory`), or memory ramjet
//!    maps (anonymous, memfd, an image file).
//! 2. **Dirty source.** Pick how writes are tracked ([`dirty::DirtySource`]): the VMM's dirty log
//!    ([`dirty::CallerFed`], e.g. `KVM_GET_DIRTY_LOG` per region), userfaultfd write protection
//!    of memory this process maps ([`dirty::UffdWp`]), or nothing for a stopped guest
//!    ([`dirty::Everything`]).
//! 3. **Connect.** [`Sender::connect`] with [`SendOptions`] (channels, compression, transport,
//!    `max_bandwidth`, timeout, cancel handle); the destination runs [`receive`] on a
//!    [`Listener`](transport::Listener) into its own, prefaulted guest memory.
//! 4. **Run.** [`migrate_live`] with [`LiveOptions`] (downtime limit, bounds, stall policy,
//!    pause-before-switchover) and the VMM's [`Guest`] hooks (pause the vCPUs, save the device
//!    state, resume after a failure).
//! 5. **Observe and steer** from other threads: the [`FactSink`] given to `connect` and
//!    `receive` gets every fact (feed them to a `ramjet_control::Machine` for QEMU's statuses and
//!    events); [`LiveHandle`] gives [`Progress`], `query-migrate` figures
//!    ([`LiveHandle::ram_stats`]), `continue` ([`LiveHandle::proceed`]) and cancel.
//!
//! `examples/embed.rs` does all of this for a toy guest that migrates itself over loopback.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod arena;
pub mod codec;
pub mod dirty;
mod error;
pub mod live;
pub mod memory;
mod pool;
mod recv;
mod send;
mod session;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod transport;
pub mod wire;

pub use error::Error;
pub use live::{
    Guest, LiveHandle, LiveOptions, LiveReport, Progress, StallPolicy, SwitchoverReason,
    migrate_live,
};
pub use recv::{ReceiveOptions, Received, receive};
pub use send::{RoundStats, SendOptions, Sender, Summary};
pub use session::{CancelHandle, Counters, FactSink, Stats};

/// The vocabulary the data plane reports in: facts for the control machine.
pub use ramjet_control::Fact;

#[cfg(test)]
mod tests {
    /// The property tests' configuration: the defaults, except under Miri, which interprets
    /// every case a hundred times slower and may not touch the file system.
    pub(crate) fn proptest_config() -> proptest::test_runner::Config {
        if cfg!(miri) {
            proptest::test_runner::Config {
                cases: 4,
                failure_persistence: None,
                ..proptest::test_runner::Config::default()
            }
        } else {
            proptest::test_runner::Config::default()
        }
    }
}

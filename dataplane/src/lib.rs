//! ramjet's data plane: moves guest RAM from mmapped memory to a receiver.
//!
//! # The shortest migration
//!
//! A paused guest, 16 MiB of anonymous memory, moved over loopback TCP into memory of the same
//! layout:
//!
//! ```
//! use std::sync::Arc;
//! use std::thread;
//!
//! use ramjet_dataplane::{
//!     GuestMemory, Listener, PreSwitchover, ReceiveOptions, SendOptions, Sender, receive,
//! };
//!
//! let source = Arc::new(GuestMemory::anonymous(16 << 20)?);
//! source.write(0, 4096, b"the guest's memory")?;
//!
//! // The destination listens (like QEMU's -incoming) with memory of the same layout.
//! let destination = Arc::new(GuestMemory::anonymous_like(&source.layout())?);
//! let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
//! let at = listener.endpoint().clone();
//! let incoming = Arc::clone(&destination);
//! let receiver = thread::spawn(move || {
//!     receive(&listener, incoming, &ReceiveOptions::default(), Arc::new(|_| {}))
//! });
//!
//! // The source connects and sends every page, then the device state.
//! let sink = Arc::new(|fact| println!("source: {fact:?}"));
//! let sender = Sender::connect(Arc::clone(&source), &at, &SendOptions::default(), sink)?;
//! sender.migrate_paused(b"device state", PreSwitchover::Skip)?;
//!
//! // The source handed the guest over (it must never run it again); the destination may run
//! // it, since the source's go arrived.
//! let received = receiver.join().map_err(|_| "the receiver thread panicked")??;
//! assert!(received.handover.may_run());
//! assert_eq!(received.device_state, b"device state");
//! assert!(source.content_eq(&destination)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Embedding it in a VMM
//!
//! 1. **Guest memory.** Describe guest RAM as a [`GuestMemory`] of regions: the VMM's own
//!    mappings ([`Region::from_host`]), rust-vmm's `GuestMemoryMmap`
//!    (`GuestMemory::from_vm_memory`, feature `vm-memory`), or memory ramjet maps (anonymous,
//!    memfd, an image file).
//! 2. **Dirty source.** Pick how writes are tracked ([`DirtySource`]): the VMM's dirty log
//!    ([`CallerFed`], e.g. `KVM_GET_DIRTY_LOG` per region), userfaultfd write protection of
//!    memory this process maps ([`UffdWp`]), or nothing for a stopped guest ([`Everything`]).
//! 3. **Connect.** [`Sender::connect`] with [`SendOptions`] (channels, [`Compression`],
//!    [`Transport`], `max_bandwidth`, timeout, [`CancelHandle`]); the destination runs
//!    [`receive`] on a [`Listener`] into its own, prefaulted guest memory. Strangers that
//!    connect first (port scanners, health checks) are dropped and logged ([`Log`]), and the
//!    receiver waits on for its sender.
//! 4. **Run.** [`migrate_live`] with [`LiveOptions`] (downtime limit, bounds, stall policy,
//!    pause-before-switchover) and the VMM's [`Guest`] hooks (pause the vCPUs, save the device
//!    state, resume after a failure); or, for a guest that is already stopped,
//!    [`Sender::migrate_paused`].
//! 5. **Hand over.** The guest runs in exactly one place. The source decides: once the
//!    receiver holds everything, verified, the sender commits and says *go*; from then on the
//!    migration returns `Ok` and the source calls [`Guest::handed_over`], never
//!    [`Guest::resume`]. The destination runs the guest only if [`Received::handover`] says it
//!    may ([`Handover::may_run`]); when the link broke after it said it was ready, it is in
//!    doubt ([`Handover::InDoubt`]): it keeps the state and does not run it until the source's
//!    decision arrives on a new connection, or an operator decides ([`Operator`]). Receive
//!    errors mean discard: the source keeps the guest.
//! 6. **Postcopy** (optional): connect with [`SendOptions::postcopy`] and give the receiver a
//!    [`PostcopyRun`] hook ([`ReceiveOptions::postcopy`]); the live loop then switches to
//!    postcopy when asked ([`LiveHandle::start_postcopy`],
//!    [`LiveOptions::postcopy_after_first_round`]) or stalled ([`StallPolicy::Postcopy`]), or
//!    call [`Sender::postcopy`] yourself. The destination runs the guest at once (its memory
//!    must be anonymous or a memfd: pages still missing fault through userfaultfd and are
//!    fetched), and [`receive`] returns once every page is there. A broken link pauses both
//!    sides; [`LiveHandle::recover`] reconnects.
//! 7. **Same host** (a VMM upgrade): give the guest memfd regions ([`Region::memfd`], or a file
//!    mapped shared, [`Region::from_file`]) and migrate over a Unix socket: with
//!    [`SameHost::Auto`] (the default, [`SendOptions::same_host`],
//!    [`ReceiveOptions::same_host`]) the sender passes the memory's descriptors and the
//!    receiver maps them in place of its own regions, at the same addresses; no page is copied
//!    ([`Sender::shares_memory`], [`Summary::memory`], [`Received::memory`] say so, or why
//!    not). After the go the source's memory refuses every access
//!    ([`MemoryError::HandedOver`]); a destination that does not end up with the guest maps its
//!    own memory again.
//! 8. **Observe and steer** from other threads: the [`FactSink`] given to `connect` and
//!    `receive` gets every fact (feed them to a `ramjet_control::Machine` for QEMU's statuses and
//!    events); the sender's [`LiveHandle`] ([`Sender::live_handle`]) gives [`Progress`],
//!    `query-migrate` figures ([`LiveHandle::ram_stats`]), `continue`
//!    ([`LiveHandle::proceed`]) and cancel.
//!
//! `examples/embed.rs` does all of this for a toy guest that migrates itself over loopback.
//!
//! # Features
//!
//! - `vm-memory`: [`GuestMemory::from_vm_memory`](memory::GuestMemory) for VMMs built on
//!   rust-vmm.
//! - `testkit` and `internals` are for ramjet's own tests, benchmarks, fuzz targets and tools
//!   (test images, a toy guest, leak checks; the wire format and the page codec). They are not
//!   part of the embedder's API and may change at any time.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod arena;
mod codec;
pub mod dirty;
mod error;
mod handle;
pub mod live;
pub mod memory;
mod pool;
pub mod postcopy;
mod recv;
mod send;
mod session;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod transport;
mod uffd;
// Reached from outside only as `internals::wire`; without that feature some of its items have
// no user in the crate.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod wire;
#[cfg(not(feature = "internals"))]
#[allow(dead_code, unused_imports)]
mod wire;

pub use codec::Compression;
pub use dirty::{CallerFed, DirtyBitmap, DirtyError, DirtySet, DirtySource, Everything, UffdWp};
pub use error::{BoxError, Error};
pub use live::{
    Guest, LiveHandle, LiveOptions, LiveReport, Progress, StallPolicy, SwitchoverReason,
    migrate_live,
};
pub use memory::{Backing, GuestAddr, GuestMemory, MemoryError, PAGE_SIZE, Region, RegionLayout};
pub use postcopy::PostcopyStats;
pub use recv::{Handover, Log, Operator, PostcopyRun, ReceiveOptions, Received, receive};
pub use send::{Postcopy, PreSwitchover, RoundStats, SendOptions, Sender, Summary};
pub use session::{CancelHandle, Counters, FactSink, MemoryTransfer, SameHost, Stats};
pub use tls::{Negotiated, TlsClient, TlsError, TlsServer};
pub use transport::{Blocking, Endpoint, Listener, Transport, Uring, ZeroCopy};

/// The vocabulary the data plane reports in: facts for the control machine.
pub use ramjet_control::Fact;

/// ramjet's own internals, for its benchmarks, fuzz targets and tools (feature `internals`):
/// not the embedder's API, and not stable.
#[cfg(feature = "internals")]
pub mod internals {
    #[doc(inline)]
    pub use crate::wire;

    /// Passing descriptors over a Unix socket (`SCM_RIGHTS`), as a same-host migration does.
    pub mod fds {
        pub use crate::transport::fds::{recv_with_fds, send_with_fds};
    }

    /// The page codec: how each page of a frame is encoded, and decoding compressed pages.
    pub mod codec {
        pub use crate::codec::{
            Batch, BatchCounts, Decoder, Encoder, PageCompression, Samples, Tally, ZSTD_LEVEL,
            decode_lz4, is_zero, looks_compressible,
        };
    }
}

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

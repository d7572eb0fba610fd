//! ramjet's data plane: moves guest RAM from mmapped memory to a receiver.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod arena;
pub mod codec;
pub mod dirty;
mod error;
pub mod image;
pub mod live;
pub mod memory;
mod recv;
mod send;
mod session;
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

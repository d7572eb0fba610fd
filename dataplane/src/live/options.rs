//! How a live migration decides when to switch over ([`LiveOptions`], [`StallPolicy`]).

use std::time::Duration;

#[cfg(doc)]
use crate::{Error, LiveHandle, Progress};

/// What to do when the migration stops converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StallPolicy {
    /// Go on (as QEMU does); the stall shows in [`Progress::stalled`].
    #[default]
    Continue,
    /// Switch over now and accept a longer downtime.
    Switchover,
    /// Fail the migration with [`Error::Stalled`]; the guest resumes on the source.
    Fail,
    /// Switch to postcopy: the destination runs the guest at once and fetches what it
    /// touches (needs [`SendOptions::postcopy`](crate::SendOptions::postcopy); without it,
    /// this acts as [`Continue`](StallPolicy::Continue)).
    Postcopy,
}

/// How a live migration decides when to switch over.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The longest pause the guest may see (QEMU's and Cloud Hypervisor's default: 300 ms).
    pub downtime_limit: Duration,
    /// Switch over after this many rounds at the latest.
    pub max_rounds: Option<u32>,
    /// Switch over after this long at the latest.
    pub max_time: Option<Duration>,
    /// The number of rounds without progress that make a stall (at least 1).
    pub stall_rounds: u32,
    /// What a stall does.
    pub on_stall: StallPolicy,
    /// Wait in `pre-switchover`, guest paused, until [`LiveHandle::proceed`].
    pub pause_before_switchover: bool,
    /// Switch to postcopy right after the first round (which sends every page once), even
    /// where pre-copy could finish; needs [`SendOptions::postcopy`](crate::SendOptions::postcopy).
    /// [`LiveHandle::start_postcopy`] asks for the switch at any time, as QEMU's
    /// `migrate-start-postcopy` does: it gives way to a pre-copy that can finish at once.
    pub postcopy_after_first_round: bool,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            downtime_limit: Duration::from_millis(300),
            max_rounds: None,
            max_time: None,
            stall_rounds: 5,
            on_stall: StallPolicy::Continue,
            pause_before_switchover: false,
            postcopy_after_first_round: false,
        }
    }
}

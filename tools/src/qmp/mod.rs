//! QMP, the QEMU Machine Protocol, on a socket: `ramjet send --qmp` and `ramjet recv --qmp`
//! wait for management's commands as a QEMU source (before `migrate`) and a QEMU destination
//! started with `-incoming defer` do, and send the control machine's `MIGRATION` and
//! `MIGRATION_PASS` events, so that software written against QEMU (libvirt, or QEMU's own
//! Python `qemu.qmp`) drives ramjet unchanged.
//!
//! - [`protocol`]: the wire: greeting, commands, replies, error classes, input framing.
//! - [`server`]: the socket, one client at a time as QEMU's `-qmp` chardev serves them.
//! - [`settings`]: capabilities, parameters and TLS objects, which both sides have.
//! - [`source`] and [`destination`]: each side's commands.

pub mod destination;
pub mod protocol;
pub mod server;
pub mod settings;
pub mod source;

pub use server::{Address, Broadcast};

use ramjet_control::Status;
use serde_json::{Value, json};

use crate::events::Events;
use protocol::QmpError;

/// `query-status`: QEMU's `StatusInfo` for run state `state`.
fn status_info(state: &str) -> Value {
    json!({"status": state, "running": state == "running", "singlestep": false})
}

/// The refusal for a command that a migration in `status` does not allow, in QEMU's words.
fn not_in_state(status: Status) -> QmpError {
    QmpError::generic(format!("Migration not in expected state: {status}"))
}

/// Steps `events` with a user's command, or refuses the command with the machine's reason
/// (`cancel` in postcopy, say).
fn step(events: &Events, trigger: ramjet_control::Trigger) -> Result<(), QmpError> {
    events
        .try_step(trigger)
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// `query-migrate` now.
fn query(events: &Events) -> Value {
    serde_json::to_value(events.query()).unwrap_or_else(|_| json!({"status": "none"}))
}

/// Whether a migration in `status` is under way (neither not started nor ended).
fn is_running(status: Status) -> bool {
    !matches!(
        status,
        Status::None | Status::Completed | Status::Failed | Status::Cancelled
    )
}

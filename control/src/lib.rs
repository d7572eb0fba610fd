//! ramjet's migration status machine: facts and triggers in, QEMU's stable `MigrationStatus`
//! sequence and events out.
//!
//! A migration has two kinds of input. **Triggers** are the user's commands (`migrate`,
//! `cancel`, `continue`, `start-postcopy`, `pause`, `recover`: one per QMP command). **Facts** are
//! what ramjet's data plane observed (`setup-done`, `pass N`, `switchover`, `completed`,
//! `failed <message>`, `drained`, ...). The data plane never sets a status. A [`Machine`] records
//! both kinds of input and derives the one visible status from them; whenever that status
//! changes it returns a `MIGRATION` event, and for each dirty sync a `MIGRATION_PASS` event, in
//! the shape libvirt and other management software already consume from QEMU. This is the
//! design proposed on qemu-devel in January 2026 (Fabiano Rosas, Prasad Pandit, Peter Xu) for
//! `migration_advance_state()`.
//!
//! The crate has no dependencies (the optional `serde` feature adds QMP-shaped JSON), does no
//! IO and reads no clock: the time is an argument of every step, so a run is deterministic and
//! the tests can try every input sequence.
//!
//! ```
//! use ramjet_control::{Fact, Input, Machine, Options, Profile, Side, Status, Timestamp, Trigger};
//!
//! let mut source = Machine::new(Side::Source, Profile::Qemu10, Options::new());
//! let now = Timestamp::from(std::time::SystemTime::now());
//! let mut shown = Vec::new();
//! let inputs: [Input; 7] = [
//!     Trigger::Migrate.into(),
//!     Fact::Pass(1).into(),
//!     Fact::SetupDone.into(),
//!     Fact::Switchover.into(),
//!     Fact::Pass(2).into(),
//!     Fact::Completed.into(),
//!     Fact::Drained.into(),
//! ];
//! for input in inputs {
//!     if let Some(event) = source.step(input, now)? {
//!         shown.push(event.to_string());
//!     }
//! }
//! assert_eq!(
//!     shown,
//!     [
//!         "MIGRATION setup",
//!         "MIGRATION_PASS pass 1",
//!         "MIGRATION active",
//!         "MIGRATION device",
//!         "MIGRATION_PASS pass 2",
//!         "MIGRATION completed",
//!     ]
//! );
//! assert_eq!(source.status(), Status::Completed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Statuses and profiles
//!
//! [`Status`] holds every QAPI `MigrationStatus` string. Which ones appear is the stable API,
//! and libvirt treats the set as closed, so the machine emits only what the chosen [`Profile`]
//! emits:
//!
//! - [`Profile::Qemu10`] (default): exactly what QEMU 10.0 emits. A source precopy migration
//!   shows `setup, active, device, completed`; a destination `setup, active, completed`.
//! - [`Profile::Qemu11`]: adds `failing` (an error happened, clean-up is under way) before
//!   `failed`, and on the source `postcopy-device` (postcopy started, the destination still
//!   loads device state) before `postcopy-active`.
//!
//! Internal phases never leak as new strings. `colo` and `wait-unplug` are part of the
//! vocabulary but never emitted.
//!
//! # Rules
//!
//! 1. **Precopy, source.** `migrate` → `setup`; `setup-done` → `active`; `switchover` (the
//!    data plane converged and paused the guest) → `device`, or with the
//!    `pause-before-switchover` option → `pre-switchover` until `continue` → `device`;
//!    `completed` (the receiver confirmed every page) and then `drained` → `completed`.
//!    `pass N` (a dirty sync) is accepted in `setup`, `active`, `pre-switchover` and `device`,
//!    because QEMU syncs once during setup and once more after switchover: `pass 1` comes before
//!    `active` and the last pass after `device`. Passes count 1, 2, 3, ... without gaps.
//!    **Destination:** `migrate` (start listening) → `setup`; `setup-done` → `active`;
//!    `completed` and `drained` → `completed`. The destination accepts `pass N` but, like QEMU,
//!    emits no `MIGRATION_PASS`.
//! 2. **Terminal statuses wait for `drained`.** `completed`, `failed` and `cancelled` are
//!    emitted only once the data plane reported that every worker and socket has stopped, so a
//!    consumer that reacts to them can start the next migration at once without racing the
//!    clean-up. A terminal status stays until the next `migrate`. Facts that straggle in after
//!    it (a late pass, a late error) are ignored: no event, no error.
//! 3. **Cancel and failure.** The first of an error, a cancel and the receiver's confirmation
//!    decides how the migration ends; nothing that arrives later changes that.
//!    `cancel` while running → `cancelling`, and after `drained` → `cancelled`. If an error was
//!    recorded *before* the cancel, the cancel does nothing visible and the end is `failed` with
//!    that first error. Errors after a cancel are kept in the error history but are not the
//!    `error-desc` and never change the outcome. A `cancel` when nothing runs, or once the end
//!    is already decided, is accepted and does nothing. `cancel` in any postcopy status is
//!    refused: the guest already runs on the destination; `pause` and `recover` are the way out.
//!    After an error the default profile stays on the current status until `drained`, then
//!    shows `failed`; [`Profile::Qemu11`] shows `failing` in between. While the end is decided
//!    but not yet drained, progress facts (a pass, `switchover`, ...) are ignored: the data
//!    plane is stopping.
//! 4. **Postcopy** (needs the `postcopy-ram` option). `start-postcopy` is accepted in `setup`
//!    and `active` and shows nothing by itself. Then `switchover` → `device`, and
//!    `postcopy-started` → `postcopy-active` (under QEMU 11: `postcopy-device`, then
//!    `device-loaded` → `postcopy-active`). In postcopy a `failed` or `channel-lost` pauses
//!    instead of failing: → `postcopy-paused`, never `failed`. `pause` is accepted in
//!    `postcopy-active` (and `postcopy-device`, `postcopy-recover`) and the data plane answers
//!    it with `channel-lost`. **Source** recovery: `recover` → `postcopy-recover-setup`,
//!    `reconnected` → `postcopy-recover`, `resumed` → `postcopy-active`; a `failed` or
//!    `channel-lost` during recovery → `postcopy-paused` again. **Destination** recovery:
//!    `recover` shows nothing, `reconnected` → `postcopy-recover`, `resumed` →
//!    `postcopy-active`. The destination starts postcopy with `postcopy-started` from `active`.
//! 5. **Nonsense is refused.** A trigger or fact that makes no sense now (`migrate` while
//!    running, `continue` outside `pre-switchover`, `start-postcopy` without the option,
//!    `reconnected` while `active`, `drained` before any outcome, a source-only input on the
//!    destination, a pass out of order) returns a typed [`StepError`] and changes nothing.
//!    In pre-copy a `channel-lost` is an error like `failed`.
//!
//! # What a consumer sees
//!
//! | migration | source events (`qemu-10`) | `qemu-11` differs |
//! |---|---|---|
//! | precopy | `setup, active, device, completed` | |
//! | with `pause-before-switchover` | `setup, active, pre-switchover, device, completed` | |
//! | an error | `setup, active, failed` | `setup, active, failing, failed` |
//! | a cancel | `setup, active, cancelling, cancelled` | |
//! | postcopy | `setup, active, device, postcopy-active, completed` | `device, postcopy-device, postcopy-active` |
//! | postcopy, channel lost and recovered | `... postcopy-active, postcopy-paused, postcopy-recover-setup, postcopy-recover, postcopy-active, ...` | |
//! | destination | `setup, active, completed` (error: `setup, active, failed`) | error: `setup, active, failing, failed` |
//!
//! The source adds a `MIGRATION_PASS` for each dirty sync: pass 1 during `setup`, one per
//! round while `active`, the last after `device`. When `completed`, `failed` or `cancelled`
//! arrives, everything has stopped: the next `migrate` may follow at once.
//!
//! Every emitted change is an edge of the [`Graph`] for the machine's side and profile; the
//! tests check that for every input sequence up to length 9 and for random long ones, and that
//! the golden scenarios in `control/tests/scenarios/` reach every edge.
//!
//! # The graphs
//!
//! Edges are labelled with what causes them. "failed" stands for any error (`failed <message>`,
//! or `channel-lost` outside postcopy).
//!
//! ## Source, `qemu-10`
//!
//! ```mermaid
//! stateDiagram-v2
//!     state "postcopy-active" as postcopy_active
//!     state "postcopy-paused" as postcopy_paused
//!     state "postcopy-recover-setup" as postcopy_recover_setup
//!     state "postcopy-recover" as postcopy_recover
//!     state "pre-switchover" as pre_switchover
//!     [*] --> none
//!     none --> setup: migrate
//!     completed --> setup: migrate
//!     failed --> setup: migrate
//!     cancelled --> setup: migrate
//!     setup --> active: setup-done
//!     setup --> cancelling: cancel
//!     active --> cancelling: cancel
//!     cancelling --> cancelled: drained
//!     postcopy_active --> completed: completed, then drained
//!     postcopy_active --> postcopy_paused: failed or channel-lost
//!     postcopy_recover --> postcopy_active: resumed
//!     postcopy_recover --> postcopy_paused: failed or channel-lost
//!     active --> device: switchover
//!     active --> pre_switchover: switchover (pause-before-switchover)
//!     pre_switchover --> device: continue
//!     pre_switchover --> cancelling: cancel
//!     device --> cancelling: cancel
//!     device --> completed: completed, then drained
//!     postcopy_paused --> postcopy_recover_setup: recover
//!     postcopy_recover_setup --> postcopy_recover: reconnected
//!     postcopy_recover_setup --> postcopy_paused: failed or channel-lost
//!     setup --> failed: failed, then drained
//!     active --> failed: failed, then drained
//!     pre_switchover --> failed: failed, then drained
//!     device --> failed: failed, then drained
//!     device --> postcopy_active: postcopy-started
//! ```
//!
//! ## Source, `qemu-11`
//!
//! ```mermaid
//! stateDiagram-v2
//!     state "postcopy-device" as postcopy_device
//!     state "postcopy-active" as postcopy_active
//!     state "postcopy-paused" as postcopy_paused
//!     state "postcopy-recover-setup" as postcopy_recover_setup
//!     state "postcopy-recover" as postcopy_recover
//!     state "pre-switchover" as pre_switchover
//!     [*] --> none
//!     none --> setup: migrate
//!     completed --> setup: migrate
//!     failed --> setup: migrate
//!     cancelled --> setup: migrate
//!     setup --> active: setup-done
//!     setup --> cancelling: cancel
//!     active --> cancelling: cancel
//!     cancelling --> cancelled: drained
//!     postcopy_active --> completed: completed, then drained
//!     postcopy_active --> postcopy_paused: failed or channel-lost
//!     postcopy_recover --> postcopy_active: resumed
//!     postcopy_recover --> postcopy_paused: failed or channel-lost
//!     active --> device: switchover
//!     active --> pre_switchover: switchover (pause-before-switchover)
//!     pre_switchover --> device: continue
//!     pre_switchover --> cancelling: cancel
//!     device --> cancelling: cancel
//!     device --> completed: completed, then drained
//!     postcopy_paused --> postcopy_recover_setup: recover
//!     postcopy_recover_setup --> postcopy_recover: reconnected
//!     postcopy_recover_setup --> postcopy_paused: failed or channel-lost
//!     setup --> failing: failed
//!     active --> failing: failed
//!     pre_switchover --> failing: failed
//!     device --> failing: failed
//!     failing --> failed: drained
//!     device --> postcopy_device: postcopy-started
//!     postcopy_device --> postcopy_active: device-loaded
//!     postcopy_device --> completed: completed, then drained
//!     postcopy_device --> postcopy_paused: failed or channel-lost
//! ```
//!
//! ## Destination, `qemu-10`
//!
//! ```mermaid
//! stateDiagram-v2
//!     state "postcopy-active" as postcopy_active
//!     state "postcopy-paused" as postcopy_paused
//!     state "postcopy-recover" as postcopy_recover
//!     [*] --> none
//!     none --> setup: migrate
//!     completed --> setup: migrate
//!     failed --> setup: migrate
//!     cancelled --> setup: migrate
//!     setup --> active: setup-done
//!     setup --> cancelling: cancel
//!     active --> cancelling: cancel
//!     cancelling --> cancelled: drained
//!     postcopy_active --> completed: completed, then drained
//!     postcopy_active --> postcopy_paused: failed or channel-lost
//!     postcopy_recover --> postcopy_active: resumed
//!     postcopy_recover --> postcopy_paused: failed or channel-lost
//!     active --> completed: completed, then drained
//!     active --> postcopy_active: postcopy-started
//!     postcopy_paused --> postcopy_recover: recover, then reconnected
//!     setup --> failed: failed, then drained
//!     active --> failed: failed, then drained
//! ```
//!
//! ## Destination, `qemu-11`
//!
//! ```mermaid
//! stateDiagram-v2
//!     state "postcopy-active" as postcopy_active
//!     state "postcopy-paused" as postcopy_paused
//!     state "postcopy-recover" as postcopy_recover
//!     [*] --> none
//!     none --> setup: migrate
//!     completed --> setup: migrate
//!     failed --> setup: migrate
//!     cancelled --> setup: migrate
//!     setup --> active: setup-done
//!     setup --> cancelling: cancel
//!     active --> cancelling: cancel
//!     cancelling --> cancelled: drained
//!     postcopy_active --> completed: completed, then drained
//!     postcopy_active --> postcopy_paused: failed or channel-lost
//!     postcopy_recover --> postcopy_active: resumed
//!     postcopy_recover --> postcopy_paused: failed or channel-lost
//!     active --> completed: completed, then drained
//!     active --> postcopy_active: postcopy-started
//!     postcopy_paused --> postcopy_recover: recover, then reconnected
//!     setup --> failing: failed
//!     active --> failing: failed
//!     failing --> failed: drained
//! ```
//!
//! # Events and queries
//!
//! [`Machine::step`] returns at most one [`Event`], stamped with the step's time: `MIGRATION`
//! with the new status, or `MIGRATION_PASS` with the pass number. Never a self-transition, and
//! nothing after a terminal status until the next `migrate`. [`Machine::query`] returns a
//! [`Query`] with `query-migrate`'s members: the status last emitted, `error-desc` (the first
//! error that decided the course of the migration), the full error history, `setup-time`,
//! `total-time`, `downtime`, `expected-downtime` and the [`RamStats`] the data plane reported.
//! With the `serde` feature, events serialize as QMP events and the query as the object
//! `query-migrate` returns.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod event;
mod graph;
mod input;
#[cfg(feature = "serde")]
mod json;
mod machine;
mod query;
mod status;

pub use event::{Event, EventKind, Timestamp};
pub use graph::{Edge, Graph};
pub use input::{Fact, Input, Options, ParseInputError, Profile, Side, Trigger};
pub use machine::{Machine, StepError};
pub use query::{ErrorRecord, Query, RamStats};
pub use status::{ParseStatusError, Status};

#[cfg(test)]
mod tests {
    use super::*;

    /// The diagrams in the crate docs are generated from the const tables; this fails when the
    /// two drift apart, and prints the diagram to paste.
    #[test]
    fn crate_docs_show_the_graphs() {
        let docs: String = include_str!("lib.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("//!"))
            .map(|line| line.strip_prefix(' ').unwrap_or(line))
            .collect::<Vec<_>>()
            .join("\n");
        for side in [Side::Source, Side::Destination] {
            for profile in [Profile::Qemu10, Profile::Qemu11] {
                let graph = Graph::new(side, profile);
                let block = format!("```mermaid\n{}```", graph.to_mermaid());
                assert!(
                    docs.contains(&block),
                    "the crate docs lack the current {} {} graph:\n{block}",
                    side.as_str(),
                    profile.as_str()
                );
            }
        }
    }
}

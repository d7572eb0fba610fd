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
//!    `completed` (the receiver confirmed every page, and the source committed to the
//!    handover: from then on it never resumes the guest, even if its *go* was never
//!    acknowledged and the destination is left in doubt) and then `drained` → `completed`.
//!    `pass N` (a dirty sync) is accepted in `setup`, `active`, `pre-switchover` and `device`,
//!    because QEMU syncs once during setup and once more after switchover: `pass 1` comes before
//!    `active` and the last pass after `device`. Passes count 1, 2, 3, ... without gaps.
//!    **Destination:** `migrate` (start listening) → `setup`; `setup-done` → `active`;
//!    `completed` (the source's *go* arrived) and `drained` → `completed`. The destination
//!    accepts `pass N` in `setup` and `active` but, like QEMU, emits no `MIGRATION_PASS`.
//!    **Destination in doubt** (see [Handover](#handover-who-runs-the-guest)): `in-doubt` in
//!    `active` → `pre-switchover`, which on the destination means "the complete copy is here,
//!    waiting for the source's decision". From there `completed` (the source's late *go*), then
//!    `drained` → `completed`; `failed <message>` (the source's *abort*: it resumed the guest,
//!    so the copy may be discarded), then `drained` → `failed` (under `qemu-11` through
//!    `failing`); `cancel` (the operator discards) → `cancelling`, then `drained` →
//!    `cancelled`; `continue` (the operator: the source handed over, run here) is accepted and
//!    shows nothing: the data plane answers it with `completed` and `drained`, and until then
//!    an abort or a cancel may still come first. In doubt, `channel-lost` is not an error and
//!    changes nothing (it is why the destination waits; the source may retry on a new
//!    connection), while `pass N`, `setup-done`, another `in-doubt` and the postcopy facts are
//!    refused: every page is already verified. `drained` with no outcome decided (the data
//!    plane gave up waiting; the caller keeps the state, in a file say) is accepted and shows
//!    nothing: the destination is **kept in doubt**. Its status stays `pre-switchover`, never
//!    `failed`; the migration still runs, so `migrate` is refused; every fact is refused (the
//!    data plane has stopped); and the operator's `continue` → `completed` or `cancel` →
//!    `cancelled` ends it at once, since it has drained already.
//! 2. **Terminal statuses wait for `drained`.** `completed`, `failed` and `cancelled` are
//!    emitted only once the data plane reported that every worker and socket has stopped, so a
//!    consumer that reacts to them can start the next migration at once without racing the
//!    clean-up (a destination kept in doubt has drained before the operator's `continue` or
//!    `cancel`, so those show the terminal status at once). A terminal status stays until the
//!    next `migrate`. Facts that straggle in after
//!    it (a late pass, a late error) are ignored: no event, no error.
//! 3. **Cancel and failure.** The first of an error, a cancel and the receiver's confirmation
//!    (on a destination kept in doubt: the operator's `continue`) decides how the migration
//!    ends; nothing that arrives later changes that, `in-doubt` included.
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
//!    `reconnected` while `active`, `drained` before any outcome, an input of the other side
//!    such as `switchover` on the destination or `in-doubt` on the source, `in-doubt` outside
//!    `active`, a pass out of order) returns a typed [`StepError`] and changes nothing.
//!    In pre-copy a `channel-lost` is an error like `failed`.
//!
//! # Handover: who runs the guest
//!
//! A guest must never run in two places, so one side owns the decision: the source. The
//! destination verifies everything and tells the source *ready*; the source commits (from then
//! on it never resumes the guest) and sends *go*; only when *go* arrives does the destination
//! show `completed` and may run the guest. The source shows `completed` once the destination
//! acknowledged the *go*, or once it gave up delivering it: either way it handed over. If the link or the source fails
//! after *ready* but before *go*, the destination is **in doubt** (`in-doubt`): it holds the
//! complete verified state, must not start the guest, and waits for the source, which retries
//! delivering its decision on a new connection for a bounded time, or for an operator.
//!
//! | what happened | source shows | destination shows |
//! |---|---|---|
//! | the source resumes, the destination discards | `failed` or `cancelled` | `failed` or `cancelled` |
//! | handed over, the destination runs the guest | `completed` | `completed` |
//! | handed over, the destination in doubt | `completed` | `pre-switchover` until the source's late *go* (`completed`), the source's *abort* (`failed`), or the operator's `continue` (`completed`) or `cancel` (`cancelled`) |
//!
//! The destination in doubt cannot tell whether the source committed (its *go* was lost) or
//! resumed (its *abort* may still come), so only the source's word, or an operator who asked
//! the source, may end it: `continue` when the source shows `completed`, `cancel` when it shows
//! `failed` or `cancelled`.
//!
//! While in doubt the destination shows **`pre-switchover`**. In QEMU that is the non-terminal
//! status of a migration waiting for management's word before the point of no return (the
//! `pause-before-switchover` capability and `migrate-continue`). libvirt treats it as a
//! migration still running, so it never kills the destination's copy, which may be the only
//! live copy of the guest. `failed` would tell it to destroy that copy, so a destination in
//! doubt shows `failed` only after the source's *abort*: a lost channel changes nothing, and
//! `drained` keeps `pre-switchover`.
//!
//! # What a consumer sees
//!
//! | migration | events (`qemu-10`) | `qemu-11` differs |
//! |---|---|---|
//! | precopy | `setup, active, device, completed` | |
//! | with `pause-before-switchover` | `setup, active, pre-switchover, device, completed` | |
//! | an error | `setup, active, failed` | `setup, active, failing, failed` |
//! | a cancel | `setup, active, cancelling, cancelled` | |
//! | postcopy | `setup, active, device, postcopy-active, completed` | `device, postcopy-device, postcopy-active` |
//! | postcopy, channel lost and recovered | `... postcopy-active, postcopy-paused, postcopy-recover-setup, postcopy-recover, postcopy-active, ...` | |
//! | destination | `setup, active, completed` (error: `setup, active, failed`) | error: `setup, active, failing, failed` |
//! | destination in doubt, then a late *go* or `continue` | `setup, active, pre-switchover, completed` | |
//! | destination in doubt, then the source's *abort* | `setup, active, pre-switchover, failed` | `... pre-switchover, failing, failed` |
//! | destination in doubt, then `cancel` | `setup, active, pre-switchover, cancelling, cancelled` | |
//! | destination kept in doubt (drained, no decision) | `setup, active, pre-switchover`, then nothing until the operator's `continue` (`completed`) or `cancel` (`cancelled`) | |
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
//!     active --> completed: completed, then drained
//!     active --> postcopy_active: postcopy-started
//!     postcopy_paused --> postcopy_recover: recover, then reconnected
//!     active --> pre_switchover: in-doubt
//!     pre_switchover --> completed: completed, then drained (or drained, then continue)
//!     pre_switchover --> cancelling: cancel
//!     pre_switchover --> cancelled: drained, then cancel
//!     setup --> failed: failed, then drained
//!     active --> failed: failed, then drained
//!     pre_switchover --> failed: failed, then drained
//! ```
//!
//! ## Destination, `qemu-11`
//!
//! ```mermaid
//! stateDiagram-v2
//!     state "postcopy-active" as postcopy_active
//!     state "postcopy-paused" as postcopy_paused
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
//!     active --> completed: completed, then drained
//!     active --> postcopy_active: postcopy-started
//!     postcopy_paused --> postcopy_recover: recover, then reconnected
//!     active --> pre_switchover: in-doubt
//!     pre_switchover --> completed: completed, then drained (or drained, then continue)
//!     pre_switchover --> cancelling: cancel
//!     pre_switchover --> cancelled: drained, then cancel
//!     setup --> failing: failed
//!     active --> failing: failed
//!     pre_switchover --> failing: failed
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

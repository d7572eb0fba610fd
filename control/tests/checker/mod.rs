//! The properties every step of a [`Machine`] must keep, as one checker that the property
//! tests (`properties.rs`) and the control fuzz target (`fuzz/fuzz_targets/control.rs`, which
//! includes this file by path) both drive:
//! - a refused input changes nothing;
//! - every `MIGRATION` event is a change (never a self-transition) along an edge of the graph
//!   for the machine's side and profile, so nothing outside the profile is ever emitted;
//! - after a terminal status the only event is `setup`, caused by `migrate`;
//! - `migrate` is accepted only before the first migration or after a terminal status;
//! - at most one terminal status per `migrate`, and it is caused by `drained`, or, on a
//!   destination kept in doubt (drained while `pre-switchover`, no event), by the operator's
//!   `continue` or `cancel`;
//! - `cancelled` only after a cancel, `failed` only after an error, `completed` only after the
//!   receiver's confirmation (or the operator's `continue` when kept in doubt);
//! - a destination that showed `pre-switchover` (in doubt) shows `failing` or `failed` only
//!   after a `failed` fact that came while it was in doubt (the source's abort): a lost channel
//!   never fails it;
//! - kept in doubt, only `continue` and `cancel` are accepted, and the machine says it is kept
//!   ([`Machine::is_kept_in_doubt`]) exactly when the checker saw it drain in doubt;
//! - `MIGRATION_PASS` comes only from the source, numbered 1, 2, 3, ... within a migration;
//! - the query shows the status last emitted, and events carry the step's time.

use ramjet_control::{
    EventKind, Fact, Input, Machine, Options, Profile, Side, Status, Timestamp, Trigger,
};

/// What the checker remembers of the current migration, beside the machine itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Checker {
    /// The machine under test.
    pub machine: Machine,
    terminals: u32,
    cancelled: bool,
    errored: bool,
    confirmed: bool,
    last_pass_event: u64,
    /// The destination showed `pre-switchover`: it is (or was) in doubt.
    in_doubt: bool,
    /// A `failed` fact came while in doubt: the source's abort.
    aborted_in_doubt: bool,
    /// `drained` in doubt without an event: the destination is kept in doubt.
    kept: bool,
}

impl Checker {
    /// A checker around a new machine.
    pub fn new(side: Side, profile: Profile, options: Options) -> Self {
        Checker {
            machine: Machine::new(side, profile, options),
            terminals: 0,
            cancelled: false,
            errored: false,
            confirmed: false,
            last_pass_event: 0,
            in_doubt: false,
            aborted_in_doubt: false,
            kept: false,
        }
    }

    /// Steps the machine and checks every property; returns whether the input was accepted, or
    /// the violated property.
    pub fn step(&mut self, input: &Input, now: Timestamp) -> Result<bool, String> {
        let before = self.machine.clone();
        let prev = before.status();
        let graph = before.graph();
        let result = self.machine.step(input.clone(), now);
        let event = match result {
            Err(e) => {
                if self.machine != before {
                    return Err(format!("refused {input} ({e}) but the machine changed"));
                }
                return Ok(false);
            }
            Ok(event) => event,
        };
        let was_kept = self.kept;
        let operator_decides = matches!(input, Input::Trigger(Trigger::Continue | Trigger::Cancel));
        if was_kept && !operator_decides {
            return Err(format!("{input} accepted on a destination kept in doubt"));
        }
        match input {
            Input::Trigger(Trigger::Migrate) => {
                if !(prev.is_terminal() || prev == Status::None) {
                    return Err(format!("migrate accepted in {prev}"));
                }
                self.terminals = 0;
                self.cancelled = false;
                self.errored = false;
                self.confirmed = false;
                self.last_pass_event = 0;
                self.in_doubt = false;
                self.aborted_in_doubt = false;
                self.kept = false;
            }
            Input::Trigger(Trigger::Cancel) => self.cancelled = true,
            Input::Trigger(Trigger::Continue) if was_kept => self.confirmed = true,
            Input::Fact(Fact::Failed(_)) => {
                self.errored = true;
                self.aborted_in_doubt |= self.in_doubt;
            }
            Input::Fact(Fact::ChannelLost) => self.errored = true,
            Input::Fact(Fact::Completed) => self.confirmed = true,
            _ => {}
        }
        let status = self.machine.status();
        let Some(event) = event else {
            if status != prev {
                return Err(format!(
                    "{input}: status {prev} -> {status} without an event"
                ));
            }
            if matches!(input, Input::Trigger(Trigger::Migrate)) {
                return Err("migrate accepted without a setup event".into());
            }
            if matches!(input, Input::Fact(Fact::Drained))
                && graph.side() == Side::Destination
                && status == Status::PreSwitchover
            {
                self.kept = true;
            }
            return self.kept_matches();
        };
        if event.timestamp() != now {
            return Err(format!("{input}: event stamped {:?}", event.timestamp()));
        }
        match event.kind() {
            EventKind::Migration { status: to } => {
                if to != status {
                    return Err(format!(
                        "{input}: emitted {to} but the machine shows {status}"
                    ));
                }
                if to == prev {
                    return Err(format!("{input}: self-transition {prev} -> {to}"));
                }
                if !graph.allows(prev, to) {
                    return Err(format!(
                        "{input}: {prev} -> {to} is not an edge of the {} {} graph",
                        graph.side().as_str(),
                        graph.profile().as_str()
                    ));
                }
                if (prev.is_terminal() || prev == Status::None)
                    && !(to == Status::Setup && matches!(input, Input::Trigger(Trigger::Migrate)))
                {
                    return Err(format!("{input}: {prev} -> {to} after a terminal status"));
                }
                if to.is_terminal() {
                    self.terminals += 1;
                    if self.terminals > 1 {
                        return Err(format!("{input}: a second terminal status ({to})"));
                    }
                    let by_operator = was_kept && operator_decides;
                    if !(by_operator || matches!(input, Input::Fact(Fact::Drained))) {
                        return Err(format!("{input}: terminal {to} before drained"));
                    }
                    self.kept = false;
                }
                if matches!(to, Status::Failing | Status::Failed)
                    && self.in_doubt
                    && !self.aborted_in_doubt
                {
                    return Err(format!(
                        "{input}: {to} for a destination in doubt without the source's abort"
                    ));
                }
                if to == Status::PreSwitchover && graph.side() == Side::Destination {
                    self.in_doubt = true;
                }
                let justified = match to {
                    Status::Cancelled => self.cancelled,
                    Status::Failed | Status::Failing => self.errored,
                    Status::Completed => self.confirmed,
                    _ => true,
                };
                if !justified {
                    return Err(format!("{input}: {to} without its cause"));
                }
            }
            EventKind::MigrationPass { pass } => {
                if graph.side() != Side::Source {
                    return Err(format!("{input}: MIGRATION_PASS on the destination"));
                }
                if prev.is_terminal() || prev == Status::None {
                    return Err(format!("{input}: MIGRATION_PASS in {prev}"));
                }
                if pass != self.last_pass_event + 1 || input != &Input::Fact(Fact::Pass(pass)) {
                    return Err(format!(
                        "{input}: MIGRATION_PASS {pass} after {}",
                        self.last_pass_event
                    ));
                }
                self.last_pass_event = pass;
            }
        }
        let shown = self.machine.query(now).status;
        if shown != status {
            return Err(format!("query shows {shown}, last event {status}"));
        }
        self.kept_matches()
    }

    /// The machine says it is kept in doubt exactly when the checker saw it drain in doubt.
    fn kept_matches(&self) -> Result<bool, String> {
        let says = self.machine.is_kept_in_doubt();
        if says != self.kept {
            return Err(format!(
                "is_kept_in_doubt() is {says}, the checker says {}",
                self.kept
            ));
        }
        Ok(true)
    }
}

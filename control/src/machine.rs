//! The machine: records triggers and facts, derives the visible status from them, and emits an
//! event whenever that status changes.

use std::fmt;
use std::time::Duration;

use crate::{
    ErrorRecord, Event, EventKind, Fact, Graph, Input, Options, Profile, Query, RamStats, Side,
    Status, Timestamp, Trigger,
};

/// How far the data plane has got. The profile decides how a phase is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Active,
    PreSwitchover,
    Device,
    /// Postcopy started; the destination is still loading device state.
    PostcopyDevice,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    /// Destination only: the complete verified state is here and the source was told *ready*,
    /// but its decision (*go* or *abort*) has not arrived. Shown as `pre-switchover`.
    InDoubt,
}

impl Phase {
    const fn is_postcopy(self) -> bool {
        matches!(
            self,
            Phase::PostcopyDevice
                | Phase::PostcopyActive
                | Phase::PostcopyPaused
                | Phase::PostcopyRecoverSetup
                | Phase::PostcopyRecover
        )
    }

    const fn shown(self, profile: Profile) -> Status {
        match self {
            Phase::Setup => Status::Setup,
            Phase::Active => Status::Active,
            Phase::PreSwitchover => Status::PreSwitchover,
            Phase::Device => Status::Device,
            Phase::PostcopyDevice => match profile {
                Profile::Qemu10 => Status::PostcopyActive,
                Profile::Qemu11 => Status::PostcopyDevice,
            },
            Phase::PostcopyActive => Status::PostcopyActive,
            Phase::PostcopyPaused => Status::PostcopyPaused,
            Phase::PostcopyRecoverSetup => Status::PostcopyRecoverSetup,
            Phase::PostcopyRecover => Status::PostcopyRecover,
            Phase::InDoubt => Status::PreSwitchover,
        }
    }
}

/// How a migration ends. The first of an error, a cancel or the receiver's confirmation decides
/// it; nothing that arrives later changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

impl Outcome {
    const fn terminal(self) -> Status {
        match self {
            Outcome::Completed => Status::Completed,
            Outcome::Failed => Status::Failed,
            Outcome::Cancelled => Status::Cancelled,
        }
    }
}

/// Everything recorded about one migration, from `migrate` to the next `migrate`.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    phase: Phase,
    outcome: Option<Outcome>,
    postcopy_requested: bool,
    recover_requested: bool,
    passes: u64,
    started_at: Timestamp,
    setup_done_at: Option<Timestamp>,
    /// `switchover`: the source paused the guest.
    paused_at: Option<Timestamp>,
    /// The guest runs again, on the destination: `completed` or `postcopy-started`.
    running_again_at: Option<Timestamp>,
    /// `drained` after the outcome was decided: the migration is over.
    ended_at: Option<Timestamp>,
    /// `drained` while in doubt, before any outcome: the data plane stopped waiting for the
    /// source and the caller keeps the state; only the operator's `continue` or `cancel` ends
    /// the migration now.
    kept_since: Option<Timestamp>,
    errors: Vec<ErrorRecord>,
    ram: Option<RamStats>,
    expected_downtime: Option<Duration>,
}

impl Run {
    const fn new(now: Timestamp) -> Self {
        Run {
            phase: Phase::Setup,
            outcome: None,
            postcopy_requested: false,
            recover_requested: false,
            passes: 0,
            started_at: now,
            setup_done_at: None,
            paused_at: None,
            running_again_at: None,
            ended_at: None,
            kept_since: None,
            errors: Vec::new(),
            ram: None,
            expected_downtime: None,
        }
    }

    fn record_error(&mut self, at: Timestamp, message: String, decisive: bool) {
        self.errors.push(ErrorRecord {
            at,
            message,
            decisive,
        });
    }

    /// An error (`message`) or a lost channel (`None`) while the outcome is still open. In
    /// postcopy the guest already runs on the destination, so nothing fails: postcopy pauses.
    fn break_down(&mut self, at: Timestamp, message: Option<String>) {
        if self.phase.is_postcopy() {
            let pauses_now = self.phase != Phase::PostcopyPaused;
            self.phase = Phase::PostcopyPaused;
            if let Some(message) = message {
                self.record_error(at, message, pauses_now);
            }
        } else {
            let message = message.unwrap_or_else(|| "a migration channel was lost".to_owned());
            self.record_error(at, message, true);
            self.outcome = Some(Outcome::Failed);
        }
    }
}

/// Why [`Machine::step`] refused an input. A refused input changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepError {
    /// The input needs a migration, and none was ever started.
    NotStarted {
        /// The refused input's name.
        input: &'static str,
    },
    /// `migrate` while a migration runs.
    AlreadyRunning {
        /// The current status.
        status: Status,
    },
    /// The input makes no sense in the current status.
    WrongStatus {
        /// The refused input's name.
        input: &'static str,
        /// The current status.
        status: Status,
    },
    /// The input belongs to the other side of a migration.
    WrongSide {
        /// The refused input's name.
        input: &'static str,
        /// This machine's side.
        side: Side,
    },
    /// The input needs an option that is off.
    OptionOff {
        /// The refused input's name.
        input: &'static str,
        /// The option's name.
        option: &'static str,
    },
    /// `cancel` during postcopy: the guest already runs on the destination.
    CancelInPostcopy {
        /// The current status.
        status: Status,
    },
    /// A `pass` whose number is not the next one.
    PassOutOfOrder {
        /// The number that was due.
        expected: u64,
        /// The number that came.
        got: u64,
    },
    /// `drained` before anything completed, failed or was cancelled.
    DrainedEarly {
        /// The current status.
        status: Status,
    },
    /// A second `recover` before the first reconnected (destination).
    RecoverPending,
    /// [`Machine::set_options`] while a migration runs.
    OptionsWhileRunning {
        /// The current status.
        status: Status,
    },
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepError::NotStarted { input } => {
                write!(f, "{input} refused: no migration has been started")
            }
            StepError::AlreadyRunning { status } => {
                write!(
                    f,
                    "migrate refused: a migration is running (status {status})"
                )
            }
            StepError::WrongStatus { input, status } => {
                write!(f, "{input} refused in status {status}")
            }
            StepError::WrongSide { input, side } => {
                write!(
                    f,
                    "{input} refused: not accepted on the {} side",
                    side.as_str()
                )
            }
            StepError::OptionOff { input, option } => {
                write!(f, "{input} refused: option {option} is off")
            }
            StepError::CancelInPostcopy { status } => write!(
                f,
                "cancel refused in status {status}: postcopy cannot be cancelled, \
                 pause and recover instead"
            ),
            StepError::PassOutOfOrder { expected, got } => {
                write!(f, "pass {got} refused: pass {expected} is due")
            }
            StepError::DrainedEarly { status } => write!(
                f,
                "drained refused in status {status}: nothing has completed, failed or been \
                 cancelled"
            ),
            StepError::RecoverPending => {
                write!(f, "recover refused: a recovery is already pending")
            }
            StepError::OptionsWhileRunning { status } => {
                write!(
                    f,
                    "options cannot change while a migration runs (status {status})"
                )
            }
        }
    }
}

impl std::error::Error for StepError {}

/// The status machine of one side of a migration.
///
/// Feed it triggers (user commands) and facts (from the data plane) with [`Machine::step`]; it
/// answers with the event to publish, if any. See the [crate docs](crate) for the rules.
///
/// ```
/// use ramjet_control::{Fact, Machine, Options, Profile, Side, Status, Timestamp, Trigger};
///
/// let mut machine = Machine::new(Side::Source, Profile::Qemu10, Options::new());
/// let t = Timestamp::from_unix_micros(1_000_000);
/// let event = machine.step(Trigger::Migrate, t)?;
/// assert_eq!(event.and_then(|e| e.status()), Some(Status::Setup));
/// machine.step(Fact::SetupDone, t)?;
/// assert_eq!(machine.status(), Status::Active);
/// assert!(machine.step(Trigger::Continue, t).is_err()); // not in pre-switchover
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    side: Side,
    profile: Profile,
    options: Options,
    /// The status last emitted: what a query returns.
    shown: Status,
    run: Option<Run>,
}

impl Machine {
    /// A machine for `side` that emits what `profile` emits, in status `none`.
    pub const fn new(side: Side, profile: Profile, options: Options) -> Self {
        Machine {
            side,
            profile,
            options,
            shown: Status::None,
            run: None,
        }
    }

    /// The side this machine describes.
    pub const fn side(&self) -> Side {
        self.side
    }

    /// The profile it emits.
    pub const fn profile(&self) -> Profile {
        self.profile
    }

    /// The options in force.
    pub const fn options(&self) -> Options {
        self.options
    }

    /// The graph every emitted change belongs to.
    pub const fn graph(&self) -> Graph {
        Graph::new(self.side, self.profile)
    }

    /// The status last emitted.
    pub const fn status(&self) -> Status {
        self.shown
    }

    /// The dirty syncs (`pass` facts) accepted in the current migration: QEMU's
    /// `dirty-sync-count`.
    pub fn passes(&self) -> u64 {
        self.run.as_ref().map_or(0, |run| run.passes)
    }

    /// Whether a migration has started and not yet reached a terminal status. A destination
    /// kept in doubt (drained, waiting for the operator) still runs.
    pub const fn is_running(&self) -> bool {
        matches!(&self.run, Some(run) if run.ended_at.is_none())
    }

    /// Whether this is a destination in doubt: it holds the complete verified state, must not
    /// start the guest, and waits for the source's decision or the operator's (`continue` to
    /// run here, `cancel` to discard). It shows `pre-switchover` meanwhile. Stays true until the
    /// outcome is decided.
    pub fn is_in_doubt(&self) -> bool {
        matches!(&self.run, Some(run) if run.phase == Phase::InDoubt && run.outcome.is_none())
    }

    /// Whether a destination in doubt was drained without an outcome: the data plane stopped
    /// waiting, the caller keeps the state (in a file, say), and only the operator's `continue`
    /// or `cancel` ends the migration.
    pub fn is_kept_in_doubt(&self) -> bool {
        self.is_in_doubt()
            && self
                .run
                .as_ref()
                .is_some_and(|run| run.kept_since.is_some())
    }

    /// Changes the options, like `migrate-set-capabilities`; refused while a migration runs.
    pub fn set_options(&mut self, options: Options) -> Result<(), StepError> {
        if self.is_running() {
            return Err(StepError::OptionsWhileRunning { status: self.shown });
        }
        self.options = options;
        Ok(())
    }

    /// Stores the data plane's latest RAM statistics for [`Machine::query`]. Ignored when no
    /// migration was ever started; kept after the end, until the next `migrate`.
    pub fn set_ram_stats(&mut self, stats: RamStats) {
        if let Some(run) = &mut self.run {
            run.ram = Some(stats);
        }
    }

    /// Stores the data plane's current estimate of the downtime (`expected-downtime`).
    pub fn set_expected_downtime(&mut self, expected: Duration) {
        if let Some(run) = &mut self.run {
            run.expected_downtime = Some(expected);
        }
    }

    /// Applies one trigger or fact at time `now`.
    ///
    /// Returns the event to publish: a `MIGRATION` event when the visible status changed, a
    /// `MIGRATION_PASS` event for an accepted `pass` on the source, or nothing. An input that
    /// makes no sense now is refused with a [`StepError`] and changes nothing.
    pub fn step(
        &mut self,
        input: impl Into<Input>,
        now: Timestamp,
    ) -> Result<Option<Event>, StepError> {
        let pass = match input.into() {
            Input::Trigger(trigger) => {
                self.trigger(trigger, now)?;
                None
            }
            Input::Fact(fact) => self.fact(fact, now)?,
        };
        let next = self.derive();
        if next == self.shown {
            return Ok(pass.map(|pass| Event::new(now, EventKind::MigrationPass { pass })));
        }
        debug_assert!(pass.is_none(), "a pass never changes the status");
        debug_assert!(
            self.graph().allows(self.shown, next),
            "{} -> {} is not an edge of {:?} {:?}",
            self.shown,
            next,
            self.side,
            self.profile
        );
        self.shown = next;
        Ok(Some(Event::new(now, EventKind::Migration { status: next })))
    }

    /// The `query-migrate` snapshot at time `now`.
    pub fn query(&self, now: Timestamp) -> Query {
        let Some(run) = &self.run else {
            return Query {
                status: self.shown,
                error_desc: None,
                errors: Vec::new(),
                setup_time: None,
                total_time: None,
                downtime: None,
                expected_downtime: None,
                ram: None,
            };
        };
        let since_start = |t: Timestamp| t.saturating_duration_since(run.started_at);
        let downtime = match (run.paused_at, run.running_again_at) {
            (Some(paused), Some(running)) if self.shown == Status::Completed => {
                Some(running.saturating_duration_since(paused))
            }
            _ => None,
        };
        Query {
            status: self.shown,
            error_desc: run
                .errors
                .iter()
                .find(|e| e.decisive)
                .map(|e| e.message.clone()),
            errors: run.errors.clone(),
            setup_time: run.setup_done_at.map(since_start),
            total_time: Some(since_start(run.ended_at.unwrap_or(now))),
            downtime,
            expected_downtime: run.expected_downtime.filter(|_| run.ended_at.is_none()),
            ram: run.ram.map(|ram| RamStats {
                dirty_sync_count: run.passes,
                ..ram
            }),
        }
    }

    /// The status the recorded inputs call for.
    fn derive(&self) -> Status {
        let Some(run) = &self.run else {
            return Status::None;
        };
        match run.outcome {
            Some(outcome) if run.ended_at.is_some() => outcome.terminal(),
            Some(Outcome::Cancelled) => Status::Cancelling,
            Some(Outcome::Failed) if self.profile == Profile::Qemu11 => Status::Failing,
            _ => run.phase.shown(self.profile),
        }
    }

    fn on_side(&self, side: Side, input: &'static str) -> Result<(), StepError> {
        if self.side == side {
            Ok(())
        } else {
            Err(StepError::WrongSide {
                input,
                side: self.side,
            })
        }
    }

    fn trigger(&mut self, trigger: Trigger, now: Timestamp) -> Result<(), StepError> {
        let input = trigger.as_str();
        let status = self.shown;
        let wrong = StepError::WrongStatus { input, status };
        if trigger == Trigger::StartPostcopy {
            self.on_side(Side::Source, input)?;
        }
        if trigger == Trigger::Migrate {
            if self.is_running() {
                return Err(StepError::AlreadyRunning { status });
            }
            self.run = Some(Run::new(now));
            return Ok(());
        }
        if trigger == Trigger::StartPostcopy && !self.options.is_postcopy_ram() {
            return Err(StepError::OptionOff {
                input,
                option: "postcopy-ram",
            });
        }
        let side = self.side;
        let Some(run) = self.run.as_mut().filter(|run| run.ended_at.is_none()) else {
            // Nothing runs: a cancel has nothing to do; anything else makes no sense.
            return match trigger {
                Trigger::Cancel => Ok(()),
                _ if self.run.is_none() => Err(StepError::NotStarted { input }),
                _ => Err(wrong),
            };
        };
        if run.outcome.is_some() {
            // The end is decided (cancelling, failing, or confirmed and draining). A cancel
            // cannot change it, so it is accepted and does nothing, as `cancel` on a
            // migration that is already stopping does.
            return if trigger == Trigger::Cancel {
                Ok(())
            } else {
                Err(wrong)
            };
        }
        match trigger {
            Trigger::Cancel if run.phase.is_postcopy() => {
                return Err(StepError::CancelInPostcopy { status });
            }
            // Kept in doubt, the data plane has already stopped: the operator's word ends the
            // migration at once.
            Trigger::Cancel if run.kept_since.is_some() => {
                run.outcome = Some(Outcome::Cancelled);
                run.ended_at = Some(now);
            }
            Trigger::Cancel => run.outcome = Some(Outcome::Cancelled),
            Trigger::Continue if run.phase == Phase::PreSwitchover => run.phase = Phase::Device,
            Trigger::Continue if run.phase == Phase::InDoubt && run.kept_since.is_some() => {
                run.outcome = Some(Outcome::Completed);
                run.running_again_at.get_or_insert(now);
                run.ended_at = Some(now);
            }
            // Accepted: the data plane hears that the source handed over and answers with
            // `completed` and `drained`. Until then an abort or a cancel may still decide.
            Trigger::Continue if run.phase == Phase::InDoubt => {}
            Trigger::StartPostcopy if matches!(run.phase, Phase::Setup | Phase::Active) => {
                run.postcopy_requested = true;
            }
            // Accepted: the data plane breaks the channel and answers with `channel-lost`.
            Trigger::Pause
                if matches!(
                    run.phase,
                    Phase::PostcopyDevice | Phase::PostcopyActive | Phase::PostcopyRecover
                ) => {}
            Trigger::Recover if run.phase == Phase::PostcopyPaused => match side {
                Side::Source => run.phase = Phase::PostcopyRecoverSetup,
                Side::Destination if run.recover_requested => {
                    return Err(StepError::RecoverPending);
                }
                Side::Destination => run.recover_requested = true,
            },
            _ => return Err(wrong),
        }
        Ok(())
    }

    /// Applies a fact; returns the pass number when a `MIGRATION_PASS` event is due.
    fn fact(&mut self, fact: Fact, now: Timestamp) -> Result<Option<u64>, StepError> {
        let input = fact.name();
        let status = self.shown;
        let (side, options) = (self.side, self.options);
        let wrong = StepError::WrongStatus { input, status };
        match fact {
            Fact::Switchover | Fact::DeviceLoaded => self.on_side(Side::Source, input)?,
            Fact::InDoubt => self.on_side(Side::Destination, input)?,
            Fact::PostcopyStarted if !options.is_postcopy_ram() => {
                return Err(StepError::OptionOff {
                    input,
                    option: "postcopy-ram",
                });
            }
            _ => {}
        }
        let Some(run) = &mut self.run else {
            return Err(StepError::NotStarted { input });
        };
        if run.ended_at.is_some() {
            // A straggler from a migration that is over: ignored.
            return Ok(None);
        }
        if run.outcome.is_some() {
            // Winding down: only errors (for the record) and `drained` matter now.
            match fact {
                Fact::Failed(message) => run.record_error(now, message, false),
                Fact::Drained => run.ended_at = Some(now),
                _ => {}
            }
            return Ok(None);
        }
        if run.kept_since.is_some() {
            // Kept in doubt: the data plane has stopped, only the operator decides now.
            return Err(wrong);
        }
        match (fact, side, run.phase) {
            (Fact::SetupDone, _, Phase::Setup) => {
                run.phase = Phase::Active;
                run.setup_done_at = Some(now);
            }
            (Fact::Pass(got), Side::Source, Phase::Setup | Phase::Active)
            | (Fact::Pass(got), Side::Source, Phase::PreSwitchover | Phase::Device)
            | (Fact::Pass(got), Side::Destination, Phase::Setup | Phase::Active) => {
                let expected = run.passes.saturating_add(1);
                if got != expected {
                    return Err(StepError::PassOutOfOrder { expected, got });
                }
                run.passes = got;
                // QEMU emits MIGRATION_PASS on the source only.
                return Ok((side == Side::Source).then_some(got));
            }
            (Fact::Switchover, _, Phase::Active) => {
                run.paused_at = Some(now);
                run.phase = if options.is_pause_before_switchover() {
                    Phase::PreSwitchover
                } else {
                    Phase::Device
                };
            }
            (Fact::DeviceLoaded, _, Phase::PostcopyDevice) => run.phase = Phase::PostcopyActive,
            (Fact::PostcopyStarted, Side::Source, Phase::Device) if run.postcopy_requested => {
                run.phase = Phase::PostcopyDevice;
                run.running_again_at = Some(now);
            }
            (Fact::PostcopyStarted, Side::Destination, Phase::Active) => {
                run.phase = Phase::PostcopyActive;
            }
            (Fact::InDoubt, Side::Destination, Phase::Active) => run.phase = Phase::InDoubt,
            (
                Fact::Completed,
                Side::Source,
                Phase::Device | Phase::PostcopyDevice | Phase::PostcopyActive,
            )
            | (
                Fact::Completed,
                Side::Destination,
                Phase::Active | Phase::PostcopyActive | Phase::InDoubt,
            ) => {
                run.outcome = Some(Outcome::Completed);
                run.running_again_at.get_or_insert(now);
            }
            // In doubt, a lost channel is why the destination waits, not an error: the source
            // may retry on a new connection. Only its abort (`failed`) ends it as a failure.
            (Fact::ChannelLost, Side::Destination, Phase::InDoubt) => {}
            (Fact::Failed(message), _, _) => run.break_down(now, Some(message)),
            (Fact::ChannelLost, _, _) => run.break_down(now, None),
            (Fact::Reconnected, Side::Source, Phase::PostcopyRecoverSetup) => {
                run.phase = Phase::PostcopyRecover;
            }
            (Fact::Reconnected, Side::Destination, Phase::PostcopyPaused)
                if run.recover_requested =>
            {
                run.recover_requested = false;
                run.phase = Phase::PostcopyRecover;
            }
            (Fact::Resumed, _, Phase::PostcopyRecover) => run.phase = Phase::PostcopyActive,
            (Fact::Drained, Side::Destination, Phase::InDoubt) => run.kept_since = Some(now),
            (Fact::Drained, _, _) => return Err(StepError::DrainedEarly { status }),
            _ => return Err(wrong),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_unix_micros(1_000_000_000);

    fn at_ms(ms: u64) -> Timestamp {
        T0.saturating_add(Duration::from_millis(ms))
    }

    fn source() -> Machine {
        Machine::new(Side::Source, Profile::Qemu10, Options::new())
    }

    #[test]
    fn query_times_follow_the_facts() {
        let mut m = source();
        assert_eq!(m.query(at_ms(0)).total_time, None);
        m.step(Trigger::Migrate, at_ms(0)).unwrap();
        m.step(Fact::Pass(1), at_ms(5)).unwrap();
        m.step(Fact::SetupDone, at_ms(20)).unwrap();
        m.set_expected_downtime(Duration::from_millis(250));
        let q = m.query(at_ms(100));
        assert_eq!(q.status, Status::Active);
        assert_eq!(q.setup_time, Some(Duration::from_millis(20)));
        assert_eq!(q.total_time, Some(Duration::from_millis(100)));
        assert_eq!(q.expected_downtime, Some(Duration::from_millis(250)));
        assert_eq!(q.downtime, None);

        m.step(Fact::Switchover, at_ms(1_000)).unwrap();
        m.step(Fact::Pass(2), at_ms(1_001)).unwrap();
        m.step(Fact::Completed, at_ms(1_040)).unwrap();
        // Confirmed but not drained: still `device`, and no downtime yet.
        assert_eq!(m.query(at_ms(1_045)).downtime, None);
        m.step(Fact::Drained, at_ms(1_050)).unwrap();
        let q = m.query(at_ms(9_999));
        assert_eq!(q.status, Status::Completed);
        assert_eq!(q.downtime, Some(Duration::from_millis(40)));
        assert_eq!(q.total_time, Some(Duration::from_millis(1_050)));
        assert_eq!(q.expected_downtime, None);
    }

    #[test]
    fn ram_stats_take_the_pass_count() {
        let mut m = source();
        m.set_ram_stats(RamStats {
            total: 1,
            ..RamStats::default()
        });
        assert_eq!(m.query(T0).ram, None, "no migration, no stats");
        m.step(Trigger::Migrate, T0).unwrap();
        m.step(Fact::Pass(1), T0).unwrap();
        m.step(Fact::SetupDone, T0).unwrap();
        m.step(Fact::Pass(2), T0).unwrap();
        m.set_ram_stats(RamStats {
            transferred: 4096,
            dirty_sync_count: 99,
            mbps: 1.5,
            ..RamStats::default()
        });
        let ram = m.query(T0).ram.unwrap();
        assert_eq!(ram.transferred, 4096);
        assert_eq!(ram.dirty_sync_count, 2);
        assert!((ram.mbps - 1.5).abs() < f64::EPSILON);
    }

    #[test]
    fn error_desc_is_the_first_decisive_error() {
        let mut m = source();
        m.step(Trigger::Migrate, T0).unwrap();
        m.step(Fact::Failed("first".into()), at_ms(1)).unwrap();
        m.step(Fact::Failed("second".into()), at_ms(2)).unwrap();
        let q = m.query(at_ms(3));
        assert_eq!(q.error_desc.as_deref(), Some("first"));
        assert_eq!(q.errors.len(), 2);
        assert!(q.errors[0].decisive && !q.errors[1].decisive);
        assert_eq!(q.errors[1].at, at_ms(2));
    }

    #[test]
    fn errors_after_a_cancel_are_recorded_but_not_shown_as_the_cause() {
        let mut m = source();
        m.step(Trigger::Migrate, T0).unwrap();
        m.step(Trigger::Cancel, T0).unwrap();
        m.step(Fact::Failed("broken pipe".into()), T0).unwrap();
        m.step(Fact::Drained, T0).unwrap();
        let q = m.query(T0);
        assert_eq!(q.status, Status::Cancelled);
        assert_eq!(q.error_desc, None);
        assert_eq!(q.errors.len(), 1);
    }

    #[test]
    fn options_change_only_between_migrations() {
        let mut m = source();
        let postcopy = Options::new().postcopy_ram(true);
        m.set_options(postcopy).unwrap();
        m.step(Trigger::Migrate, T0).unwrap();
        let err = m.set_options(Options::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "options cannot change while a migration runs (status setup)"
        );
        assert_eq!(m.options(), postcopy);
        m.step(Trigger::Cancel, T0).unwrap();
        m.step(Fact::Drained, T0).unwrap();
        assert!(!m.is_running());
        m.set_options(Options::new()).unwrap();
    }

    /// A destination under `profile` that verified everything and is now in doubt.
    fn in_doubt(profile: Profile) -> Machine {
        let mut d = Machine::new(Side::Destination, profile, Options::new());
        d.step(Trigger::Migrate, at_ms(0)).unwrap();
        d.step(Fact::SetupDone, at_ms(1)).unwrap();
        d.step(Fact::Pass(1), at_ms(2)).unwrap();
        assert!(!d.is_in_doubt());
        let event = d.step(Fact::InDoubt, at_ms(3)).unwrap();
        assert_eq!(event.and_then(|e| e.status()), Some(Status::PreSwitchover));
        assert!(d.is_in_doubt() && !d.is_kept_in_doubt());
        d
    }

    fn shown(event: Option<Event>) -> Option<Status> {
        event.and_then(|e| e.status())
    }

    #[test]
    fn in_doubt_then_a_late_go_completes() {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            let mut d = in_doubt(profile);
            assert_eq!(d.step(Fact::Completed, at_ms(10)).unwrap(), None);
            assert!(!d.is_in_doubt(), "the outcome is decided");
            assert_eq!(d.status(), Status::PreSwitchover);
            let event = d.step(Fact::Drained, at_ms(11)).unwrap();
            assert_eq!(shown(event), Some(Status::Completed));
            assert_eq!(d.query(at_ms(12)).error_desc, None);
        }
    }

    #[test]
    fn in_doubt_then_the_sources_abort_fails() {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            let mut d = in_doubt(profile);
            let event = d.step(Fact::Failed("source resumed".into()), at_ms(10));
            let expected = (profile == Profile::Qemu11).then_some(Status::Failing);
            assert_eq!(shown(event.unwrap()), expected);
            let event = d.step(Fact::Drained, at_ms(11)).unwrap();
            assert_eq!(shown(event), Some(Status::Failed));
            let q = d.query(at_ms(12));
            assert_eq!(q.error_desc.as_deref(), Some("source resumed"));
        }
    }

    #[test]
    fn a_lost_channel_in_doubt_is_not_an_error() {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            let mut d = in_doubt(profile);
            assert_eq!(d.step(Fact::ChannelLost, at_ms(10)).unwrap(), None);
            assert_eq!(d.step(Fact::ChannelLost, at_ms(11)).unwrap(), None);
            assert!(d.is_in_doubt());
            assert_eq!(d.status(), Status::PreSwitchover);
            assert!(d.query(at_ms(12)).errors.is_empty());
            // The data plane gives up: kept, still not failed.
            assert_eq!(d.step(Fact::Drained, at_ms(13)).unwrap(), None);
            assert_eq!(d.status(), Status::PreSwitchover);
        }
    }

    #[test]
    fn continue_in_doubt_waits_for_the_data_planes_answer() {
        let mut d = in_doubt(Profile::Qemu10);
        assert_eq!(d.step(Trigger::Continue, at_ms(10)).unwrap(), None);
        assert_eq!(d.step(Trigger::Continue, at_ms(11)).unwrap(), None);
        assert!(d.is_in_doubt(), "continue alone decides nothing");
        // The source's abort still wins if it comes first.
        d.step(Fact::Failed("source resumed".into()), at_ms(12))
            .unwrap();
        d.step(Fact::Completed, at_ms(13)).unwrap();
        let event = d.step(Fact::Drained, at_ms(14)).unwrap();
        assert_eq!(shown(event), Some(Status::Failed));

        let mut d = in_doubt(Profile::Qemu10);
        d.step(Trigger::Continue, at_ms(10)).unwrap();
        d.step(Fact::Completed, at_ms(11)).unwrap();
        let event = d.step(Fact::Drained, at_ms(12)).unwrap();
        assert_eq!(shown(event), Some(Status::Completed));
    }

    #[test]
    fn cancel_in_doubt_discards() {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            let mut d = in_doubt(profile);
            let event = d.step(Trigger::Cancel, at_ms(10)).unwrap();
            assert_eq!(shown(event), Some(Status::Cancelling));
            // A go that crosses the cancel changes nothing: the first decision stands.
            assert_eq!(d.step(Fact::Completed, at_ms(11)).unwrap(), None);
            let event = d.step(Fact::Drained, at_ms(12)).unwrap();
            assert_eq!(shown(event), Some(Status::Cancelled));
        }
    }

    #[test]
    fn kept_in_doubt_waits_for_the_operator() {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            let mut d = in_doubt(profile);
            assert_eq!(d.step(Fact::Drained, at_ms(10)).unwrap(), None);
            assert!(d.is_kept_in_doubt() && d.is_running());
            assert_eq!(d.status(), Status::PreSwitchover);
            let status = Status::PreSwitchover;
            assert_eq!(
                d.step(Trigger::Migrate, at_ms(11)),
                Err(StepError::AlreadyRunning { status })
            );
            assert_eq!(
                d.set_options(Options::new()),
                Err(StepError::OptionsWhileRunning { status })
            );
            let refused: [Input; 7] = [
                Fact::Completed.into(),
                Fact::Failed("late".into()).into(),
                Fact::ChannelLost.into(),
                Fact::Drained.into(),
                Fact::InDoubt.into(),
                Trigger::Pause.into(),
                Trigger::Recover.into(),
            ];
            for input in refused {
                let input_name = input.name();
                let before = d.clone();
                assert_eq!(
                    d.step(input, at_ms(12)),
                    Err(StepError::WrongStatus {
                        input: input_name,
                        status
                    })
                );
                assert_eq!(d, before, "{input_name}: a refusal changes nothing");
            }
            let mut cancelled = d.clone();
            let event = d.step(Trigger::Continue, at_ms(20)).unwrap();
            assert_eq!(shown(event), Some(Status::Completed));
            assert!(!d.is_running() && !d.is_in_doubt());
            let q = d.query(at_ms(99));
            assert_eq!(q.total_time, Some(Duration::from_millis(20)));
            assert_eq!(q.error_desc, None);
            let event = cancelled.step(Trigger::Cancel, at_ms(20)).unwrap();
            assert_eq!(shown(event), Some(Status::Cancelled));
            assert!(!cancelled.is_running());
            // Over: the next migration may start.
            assert_eq!(
                shown(cancelled.step(Trigger::Migrate, at_ms(21)).unwrap()),
                Some(Status::Setup)
            );
        }
    }

    #[test]
    fn in_doubt_is_refused_where_it_makes_no_sense() {
        let mut s = source();
        assert_eq!(
            s.step(Fact::InDoubt, T0),
            Err(StepError::WrongSide {
                input: "in-doubt",
                side: Side::Source
            })
        );
        s.step(Trigger::Migrate, T0).unwrap();
        s.step(Fact::SetupDone, T0).unwrap();
        let e = s.step(Fact::InDoubt, T0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "in-doubt refused: not accepted on the source side"
        );

        let mut d = Machine::new(Side::Destination, Profile::Qemu10, Options::new());
        let e = d.step(Fact::InDoubt, T0).unwrap_err();
        assert_eq!(e, StepError::NotStarted { input: "in-doubt" });
        d.step(Trigger::Migrate, T0).unwrap();
        let e = d.step(Fact::InDoubt, T0).unwrap_err();
        assert_eq!(e.to_string(), "in-doubt refused in status setup");

        // In postcopy the guest already runs here: nothing to be in doubt about.
        let options = Options::new().postcopy_ram(true);
        let mut d = Machine::new(Side::Destination, Profile::Qemu10, options);
        d.step(Trigger::Migrate, T0).unwrap();
        d.step(Fact::SetupDone, T0).unwrap();
        d.step(Fact::PostcopyStarted, T0).unwrap();
        let e = d.step(Fact::InDoubt, T0).unwrap_err();
        assert_eq!(e.to_string(), "in-doubt refused in status postcopy-active");

        // Once in doubt, no more pages, syncs or postcopy.
        let mut d = in_doubt(Profile::Qemu11);
        for fact in [
            Fact::Pass(2),
            Fact::SetupDone,
            Fact::InDoubt,
            Fact::Reconnected,
            Fact::Resumed,
        ] {
            let input = fact.name();
            let status = Status::PreSwitchover;
            assert_eq!(
                d.step(fact, T0),
                Err(StepError::WrongStatus { input, status })
            );
        }
        // After the end is decided, a straggling in-doubt is ignored like any other fact.
        let mut d = Machine::new(Side::Destination, Profile::Qemu10, Options::new());
        d.step(Trigger::Migrate, T0).unwrap();
        d.step(Fact::SetupDone, T0).unwrap();
        d.step(Trigger::Cancel, T0).unwrap();
        assert_eq!(d.step(Fact::InDoubt, T0), Ok(None));
        assert_eq!(d.status(), Status::Cancelling);
    }

    #[test]
    fn continue_on_the_destination_outside_doubt_is_refused_by_status() {
        let mut d = Machine::new(Side::Destination, Profile::Qemu10, Options::new());
        d.step(Trigger::Migrate, T0).unwrap();
        d.step(Fact::SetupDone, T0).unwrap();
        let e = d.step(Trigger::Continue, T0).unwrap_err();
        assert_eq!(e.to_string(), "continue refused in status active");
    }

    #[test]
    fn errors_read_well() {
        let mut m = source();
        let e = m.step(Fact::SetupDone, T0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "setup-done refused: no migration has been started"
        );
        m.step(Trigger::Migrate, T0).unwrap();
        let cases: [(Input, &str); 6] = [
            (
                Trigger::Migrate.into(),
                "migrate refused: a migration is running (status setup)",
            ),
            (Trigger::Continue.into(), "continue refused in status setup"),
            (
                Trigger::StartPostcopy.into(),
                "start-postcopy refused: option postcopy-ram is off",
            ),
            (Fact::Pass(2).into(), "pass 2 refused: pass 1 is due"),
            (
                Fact::Drained.into(),
                "drained refused in status setup: nothing has completed, failed or been cancelled",
            ),
            (
                Fact::Reconnected.into(),
                "reconnected refused in status setup",
            ),
        ];
        for (input, message) in cases {
            assert_eq!(m.step(input, T0).unwrap_err().to_string(), message);
        }
        let mut d = Machine::new(Side::Destination, Profile::Qemu10, Options::new());
        d.step(Trigger::Migrate, T0).unwrap();
        let e = d.step(Fact::Switchover, T0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "switchover refused: not accepted on the destination side"
        );
    }
}

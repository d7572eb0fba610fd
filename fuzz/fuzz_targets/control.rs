//! Fuzzes the control machine: any sequence of triggers, facts, option changes, statistics and
//! queries, on either side, under either profile, with time moving forward.
//!
//! After every step it checks what `control/tests/properties.rs` checks for short and random
//! sequences, for the much longer and stranger ones a fuzzer finds:
//! - no panic (the machine's own `debug_assert!`s included: fuzz builds keep them);
//! - a refused input changes nothing;
//! - every `MIGRATION` event is a change along an edge of the graph for the machine's side and
//!   profile;
//! - after a terminal status nothing is emitted until `migrate`, which emits `setup`;
//! - at most one terminal status per migration, caused by `drained`, and `cancelled`,
//!   `failed`/`failing` and `completed` only after their cause;
//! - `MIGRATION_PASS` only on the source, numbered 1, 2, 3, ... per migration;
//! - events carry the step's time, and the query shows the status last emitted.
//!
//! Input format: `ramjet_fuzz::control_input`.

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use ramjet_control::{EventKind, Fact, Input, Machine, RamStats, Side, Status, Timestamp, Trigger};
use ramjet_fuzz::control_input::{Config, Step, read_step};
use ramjet_fuzz::cursor::Cursor;

fuzz_target!(|data: &[u8]| -> Corpus {
    let [config, steps @ ..] = data else {
        return Corpus::Reject;
    };
    if steps.is_empty() {
        return Corpus::Reject;
    }
    let config = Config::read(*config);
    let mut checker = Checker::new(Machine::new(config.side, config.profile, config.options));
    let mut now = config.start;
    let mut c = Cursor::new(steps);
    while let Some((gap, step)) = read_step(&mut c) {
        now = now.saturating_add(gap);
        checker.step(step, now);
    }
    Corpus::Keep
});

/// What the checker remembers of the current migration, beside the machine.
struct Checker {
    machine: Machine,
    terminals: u32,
    cancelled: bool,
    errored: bool,
    confirmed: bool,
    last_pass_event: u64,
    last_now: Timestamp,
}

impl Checker {
    fn new(machine: Machine) -> Self {
        Checker {
            machine,
            terminals: 0,
            cancelled: false,
            errored: false,
            confirmed: false,
            last_pass_event: 0,
            last_now: Timestamp::EPOCH,
        }
    }

    fn step(&mut self, step: Step, now: Timestamp) {
        assert!(now >= self.last_now, "the harness moves time forward");
        self.last_now = now;
        let input = match step {
            Step::Input(input) => input,
            Step::PassDue => Input::Fact(Fact::Pass(self.machine.passes().saturating_add(1))),
            Step::SetOptions(options) => {
                let before = self.machine.clone();
                let running = before.is_running();
                match self.machine.set_options(options) {
                    Ok(()) => {
                        assert!(!running, "options changed while running");
                        assert_eq!(self.machine.options(), options);
                        assert_eq!(self.machine.status(), before.status());
                    }
                    Err(e) => {
                        assert!(running, "options refused while idle: {e}");
                        assert!(
                            self.machine == before,
                            "refused options changed the machine"
                        );
                    }
                }
                return;
            }
            Step::Stats(n) => {
                let status = self.machine.status();
                let stats = RamStats {
                    transferred: u64::from(n) * 4096,
                    remaining: u64::from(n),
                    total: u64::MAX,
                    mbps: f64::from(n),
                    dirty_sync_count: u64::from(n),
                    ..RamStats::default()
                };
                self.machine.set_ram_stats(stats);
                self.machine
                    .set_expected_downtime(std::time::Duration::from_micros(u64::from(n)));
                assert_eq!(self.machine.status(), status);
                return;
            }
            Step::Query => {
                self.query(now);
                return;
            }
        };
        self.apply(&input, now);
    }

    fn query(&self, now: Timestamp) {
        let q = self.machine.query(now);
        assert_eq!(
            q.status,
            self.machine.status(),
            "query shows another status"
        );
        if let Some(ram) = q.ram {
            assert_eq!(
                ram.dirty_sync_count,
                self.machine.passes(),
                "dirty-sync-count differs from the passes accepted"
            );
        }
        if q.error_desc.is_some() {
            assert!(!q.errors.is_empty(), "error-desc without an error record");
        }
        let _ = format!("{q:?}");
    }

    fn apply(&mut self, input: &Input, now: Timestamp) {
        let before = self.machine.clone();
        let prev = before.status();
        let graph = before.graph();
        let event = match self.machine.step(input.clone(), now) {
            Err(e) => {
                assert!(
                    self.machine == before,
                    "refused {input} ({e}) but the machine changed"
                );
                let _ = e.to_string();
                return;
            }
            Ok(event) => event,
        };
        match input {
            Input::Trigger(Trigger::Migrate) => {
                self.terminals = 0;
                self.cancelled = false;
                self.errored = false;
                self.confirmed = false;
                self.last_pass_event = 0;
            }
            Input::Trigger(Trigger::Cancel) => self.cancelled = true,
            Input::Fact(Fact::Failed(_) | Fact::ChannelLost) => self.errored = true,
            Input::Fact(Fact::Completed) => self.confirmed = true,
            _ => {}
        }
        let status = self.machine.status();
        let Some(event) = event else {
            assert_eq!(status, prev, "{input}: status changed without an event");
            assert!(
                !matches!(input, Input::Trigger(Trigger::Migrate)),
                "migrate accepted without a setup event"
            );
            return;
        };
        assert_eq!(
            event.timestamp(),
            now,
            "{input}: event stamped with another time"
        );
        match event.kind() {
            EventKind::Migration { status: to } => {
                assert_eq!(
                    to, status,
                    "{input}: emitted {to}, the machine shows {status}"
                );
                assert_ne!(to, prev, "{input}: self-transition {prev} -> {to}");
                assert!(
                    graph.allows(prev, to),
                    "{input}: {prev} -> {to} is not an edge of the {} {} graph",
                    graph.side().as_str(),
                    graph.profile().as_str()
                );
                if prev.is_terminal() || prev == Status::None {
                    assert!(
                        to == Status::Setup && matches!(input, Input::Trigger(Trigger::Migrate)),
                        "{input}: {prev} -> {to} after a terminal status"
                    );
                }
                if to.is_terminal() {
                    self.terminals += 1;
                    assert_eq!(self.terminals, 1, "{input}: a second terminal status {to}");
                    assert!(
                        matches!(input, Input::Fact(Fact::Drained)),
                        "{input}: terminal {to} before drained"
                    );
                }
                let justified = match to {
                    Status::Cancelled => self.cancelled,
                    Status::Failed | Status::Failing => self.errored,
                    Status::Completed => self.confirmed,
                    _ => true,
                };
                assert!(justified, "{input}: {to} without its cause");
            }
            EventKind::MigrationPass { pass } => {
                assert_eq!(
                    graph.side(),
                    Side::Source,
                    "MIGRATION_PASS on the destination"
                );
                assert!(
                    !prev.is_terminal() && prev != Status::None,
                    "MIGRATION_PASS in {prev}"
                );
                assert_eq!(
                    pass,
                    self.last_pass_event + 1,
                    "MIGRATION_PASS out of order"
                );
                assert_eq!(input, &Input::Fact(Fact::Pass(pass)));
                self.last_pass_event = pass;
            }
        }
        let _ = event.to_string();
        self.query(now);
    }
}

//! Fuzzes the control machine: any sequence of triggers, facts, option changes, statistics and
//! queries, on either side, under either profile, with time moving forward.
//!
//! After every step it checks what `control/tests/properties.rs` checks for short and random
//! sequences (the same checker, included from `control/tests/checker/mod.rs`), for the much
//! longer and stranger ones a fuzzer finds, and more: no panic (the machine's own
//! `debug_assert!`s included: fuzz builds keep them), option changes only while idle, statistics
//! that never move the status, and a query that agrees with the passes accepted.
//!
//! Input format: `ramjet_fuzz::control_input`.

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use ramjet_control::{Fact, Input, RamStats, Timestamp};
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
    let mut checker = Checker::new(&config);
    let mut now = config.start;
    let mut c = Cursor::new(steps);
    while let Some((gap, step)) = read_step(&mut c) {
        now = now.saturating_add(gap);
        checker.step(step, now);
    }
    Corpus::Keep
});

#[path = "../../control/tests/checker/mod.rs"]
mod checker;

/// The shared property checker, plus what this target adds.
struct Checker {
    inner: checker::Checker,
    last_now: Timestamp,
}

impl Checker {
    fn new(config: &Config) -> Self {
        Checker {
            inner: checker::Checker::new(config.side, config.profile, config.options),
            last_now: Timestamp::EPOCH,
        }
    }

    fn step(&mut self, step: Step, now: Timestamp) {
        assert!(now >= self.last_now, "the harness moves time forward");
        self.last_now = now;
        let machine = &mut self.inner.machine;
        let input = match step {
            Step::Input(input) => input,
            Step::PassDue => Input::Fact(Fact::Pass(machine.passes().saturating_add(1))),
            Step::SetOptions(options) => {
                let before = machine.clone();
                let running = before.is_running();
                match machine.set_options(options) {
                    Ok(()) => {
                        assert!(!running, "options changed while running");
                        assert_eq!(machine.options(), options);
                        assert_eq!(machine.status(), before.status());
                    }
                    Err(e) => {
                        assert!(running, "options refused while idle: {e}");
                        assert!(*machine == before, "refused options changed the machine");
                    }
                }
                return;
            }
            Step::Stats(n) => {
                let status = machine.status();
                let stats = RamStats {
                    transferred: u64::from(n) * 4096,
                    remaining: u64::from(n),
                    total: u64::MAX,
                    mbps: f64::from(n),
                    dirty_sync_count: u64::from(n),
                    ..RamStats::default()
                };
                machine.set_ram_stats(stats);
                machine.set_expected_downtime(std::time::Duration::from_micros(u64::from(n)));
                assert_eq!(machine.status(), status);
                return;
            }
            Step::Query => {
                self.query(now);
                return;
            }
        };
        if let Err(violation) = self.inner.step(&input, now) {
            panic!("{violation}");
        }
        self.query(now);
    }

    fn query(&self, now: Timestamp) {
        let machine = &self.inner.machine;
        let q = machine.query(now);
        assert_eq!(q.status, machine.status(), "query shows another status");
        if let Some(ram) = q.ram {
            assert_eq!(
                ram.dirty_sync_count,
                machine.passes(),
                "dirty-sync-count differs from the passes accepted"
            );
        }
        if q.error_desc.is_some() {
            assert!(!q.errors.is_empty(), "error-desc without an error record");
        }
        let _ = format!("{q:?}");
    }
}

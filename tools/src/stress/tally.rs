//! The stress pass's tally: each finished run counted by fault and by mode, every violation
//! kept (and said at once), and the table printed at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use super::BOUND;
use super::check::Outcome;
use super::plan::{Fault, Mode, Plan};
use super::run::Ran;

/// One finished run, as a worker reports it.
pub(super) struct Report {
    pub(super) plan: Plan,
    /// `Err(())`: the run panicked.
    pub(super) result: Result<anyhow::Result<Ran>, ()>,
    pub(super) took: Duration,
}

/// The tally: runs by row (a fault, or a mode) and outcome, and the violations.
#[derive(Default)]
pub(super) struct Tally {
    by_fault: BTreeMap<Fault, Row>,
    by_mode: BTreeMap<Mode, Row>,
    pub(super) runs: u64,
    pub(super) violations: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Row {
    runs: u64,
    struck: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
}

impl Row {
    fn add(&mut self, ran: &Ran) {
        self.runs += 1;
        self.struck += u64::from(ran.struck);
        match ran.outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Cancelled => self.cancelled += 1,
        }
    }
}

impl Tally {
    pub(super) fn add(&mut self, report: Report) {
        let Report { plan, result, took } = report;
        self.runs += 1;
        let mut violation = |v: String| {
            let v = format!("run {} ({plan:?}): {v}", plan.run);
            // At once too, for a long pass; the summary repeats it.
            eprintln!("stress: violation: {v}");
            self.violations.push(v);
        };
        match result {
            Ok(Ok(ran)) => {
                self.by_fault.entry(plan.fault).or_default().add(&ran);
                self.by_mode.entry(plan.mode).or_default().add(&ran);
                for v in ran.violations {
                    violation(v);
                }
            }
            Ok(Err(e)) => violation(format!("could not run: {e:#}")),
            Err(()) => violation("panicked".into()),
        }
        if took > BOUND {
            violation(format!("took {took:.1?}, over the {BOUND:?} bound"));
        }
    }

    pub(super) fn print(&self, seed: u64, elapsed: Duration) {
        println!(
            "{:<8} {:>6} {:>7} {:>10} {:>7} {:>10}",
            "", "runs", "struck", "completed", "failed", "cancelled"
        );
        let line = |name: String, r: &Row| {
            println!(
                "{name:<8} {:>6} {:>7} {:>10} {:>7} {:>10}",
                r.runs, r.struck, r.completed, r.failed, r.cancelled
            );
        };
        for (fault, row) in &self.by_fault {
            line(format!("{fault:?}").to_lowercase(), row);
        }
        for (mode, row) in &self.by_mode {
            line(format!("{mode:?}").to_lowercase(), row);
        }
        println!(
            "{} runs in {:.1?}, seed {seed}: {} violations",
            self.runs,
            elapsed,
            self.violations.len()
        );
        for v in &self.violations {
            println!("violation: {v} (replay: --seed {seed} --first <run> --runs 1)");
        }
    }
}

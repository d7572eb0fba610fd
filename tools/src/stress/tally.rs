//! The stress pass's tally: each finished run counted by fault and by mode, every violation
//! kept (and said at once), and the table printed at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use super::BOUND;
use super::check::{Outcome, Owner};
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
    all: Row,
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
    /// Postcopy runs left paused.
    paused: u64,
    /// Who owns the guest, by [`Owner`].
    owners: [u64; 7],
    /// Handed over without the receiver's acknowledgement.
    unacked: u64,
}

impl Row {
    fn add(&mut self, ran: &Ran) {
        self.runs += 1;
        self.struck += u64::from(ran.struck);
        match ran.verdict.outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::Paused => self.paused += 1,
        }
        self.owners[owner_column(ran.verdict.owner)] += 1;
        self.unacked +=
            u64::from(ran.verdict.outcome == Outcome::Completed && !ran.verdict.acknowledged);
    }
}

/// The ownership columns: heading and owner, in table order.
const OWNERS: [(&str, Owner); 7] = [
    ("src-owns", Owner::Source),
    ("dst-runs", Owner::Destination),
    ("doubt-ho", Owner::DoubtHandedOver),
    ("doubt-kept", Owner::DoubtKept),
    ("split", Owner::Split),
    ("both!", Owner::Both),
    ("nobody!", Owner::Nobody),
];

fn owner_column(owner: Owner) -> usize {
    OWNERS.iter().position(|(_, o)| *o == owner).unwrap_or(0)
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
                self.all.add(&ran);
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

    /// Prints the table, the summary line and each violation with how to replay it (`tls`:
    /// the pass had `--tls`).
    pub(super) fn print(&self, seed: u64, tls: bool, elapsed: Duration) {
        print_heading();
        for (fault, row) in &self.by_fault {
            print_row(&format!("{fault:?}").to_lowercase(), row);
        }
        for (mode, row) in &self.by_mode {
            print_row(&format!("{mode:?}").to_lowercase(), row);
        }
        print_row("all", &self.all);
        let in_doubt = self.all.owners[owner_column(Owner::DoubtHandedOver)]
            + self.all.owners[owner_column(Owner::DoubtKept)];
        println!(
            "ownership: src-owns = the source resumed, the destination discarded; dst-runs = \
             handed over, the destination may run; doubt-ho / doubt-kept = the destination in \
             doubt, the source handed over / kept it ({in_doubt} in doubt); split = postcopy \
             paused, the destination runs the guest without all its pages; unacked = handed \
             over, go never acknowledged; both! and nobody! break the promise"
        );
        let tls = if tls { " --tls" } else { "" };
        println!(
            "{} runs in {:.1?}, seed {seed}{}: {} violations",
            self.runs,
            elapsed,
            if tls.is_empty() { "" } else { ", TLS" },
            self.violations.len()
        );
        for v in &self.violations {
            println!("violation: {v} (replay: --seed {seed}{tls} --first <run> --runs 1)");
        }
    }
}

fn print_heading() {
    print!(
        "{:<9} {:>6} {:>7} {:>10} {:>7} {:>10} {:>7}",
        "", "runs", "struck", "completed", "failed", "cancelled", "paused"
    );
    for (heading, _) in OWNERS {
        print!(" {heading:>10}");
    }
    println!(" {:>8}", "unacked");
}

fn print_row(name: &str, r: &Row) {
    print!(
        "{name:<9} {:>6} {:>7} {:>10} {:>7} {:>10} {:>7}",
        r.runs, r.struck, r.completed, r.failed, r.cancelled, r.paused
    );
    for count in r.owners {
        print!(" {count:>10}");
    }
    println!(" {:>8}", r.unacked);
}

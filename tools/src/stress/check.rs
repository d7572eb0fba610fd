//! What every stress run must show, whatever its fault.

use ramjet_control::{Machine, Options, Profile, Side, Status, Timestamp, Trigger};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::{Error, Fact};

use super::plan::{Fault, Plan, Strike, When};

/// How a run ended, as the sender saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// The receiver confirmed.
    Completed,
    /// An error.
    Failed,
    /// A cancel.
    Cancelled,
}

/// Everything a run left to look at.
pub struct Evidence<'a> {
    /// The plan.
    pub plan: &'a Plan,
    /// The source's memory, its guest stopped.
    pub src: &'a GuestMemory,
    /// The destination's memory.
    pub dst: &'a GuestMemory,
    /// The sender's result: the device state it handed over.
    pub sent: &'a Result<Vec<u8>, Error>,
    /// The receiver's result: the device state it got.
    pub received: &'a Result<Vec<u8>, Error>,
    /// Facts each side reported, in order.
    pub source_facts: &'a [Fact],
    /// See `source_facts`.
    pub destination_facts: &'a [Fact],
    /// Whether the fault struck before the sender ended.
    pub struck: bool,
}

/// The promises, each broken one a line:
/// 1. each side's facts drive its control machine along its graph to exactly one terminal
///    status;
/// 2. `completed` means byte-identical memory and the same device state on both sides;
/// 3. `failed` comes with an error (from either side) that names the fault;
/// 4. `cancelled` only after a cancel;
/// 5. runs whose fault leaves the stream intact (none, slow, short) complete, and a fault that
///    struck the stream (drop, flip, stall, refuse, version) never lets a run complete.
pub fn check(e: &Evidence<'_>) -> (Outcome, Vec<String>) {
    let mut violations = Vec::new();
    let outcome = match e.sent {
        Ok(_) => Outcome::Completed,
        Err(err) if err.is_cancelled() => Outcome::Cancelled,
        Err(_) => Outcome::Failed,
    };
    path(
        Side::Source,
        e.source_facts,
        outcome == Outcome::Cancelled,
        &mut violations,
    );
    path(
        Side::Destination,
        e.destination_facts,
        false,
        &mut violations,
    );
    if outcome == Outcome::Completed {
        same_on_both_sides(e, &mut violations);
    }
    fault_decides_the_end(e, outcome, &mut violations);
    if outcome == Outcome::Failed {
        error_names_the_fault(e, &mut violations);
    }
    (outcome, violations)
}

/// Promise 2, for a completed run: the same device state and byte-identical memory.
fn same_on_both_sides(e: &Evidence<'_>, violations: &mut Vec<String>) {
    match (e.sent, e.received) {
        (Ok(ours), Ok(theirs)) if ours != theirs => {
            violations.push("completed, but the device state differs".into());
        }
        (_, Err(err)) => violations.push(format!(
            "the sender completed, the receiver failed: {}",
            err.chain()
        )),
        _ => {}
    }
    match e.src.first_difference(e.dst) {
        Ok(None) => {}
        Ok(Some((region, page))) => {
            violations.push(format!(
                "completed, but page {page} of region {region} differs"
            ));
        }
        Err(err) => violations.push(format!("cannot compare the memories: {err}")),
    }
}

/// Promises 4 and 5: how the fault lets the run end.
fn fault_decides_the_end(e: &Evidence<'_>, outcome: Outcome, violations: &mut Vec<String>) {
    let fault = e.plan.fault;
    if outcome == Outcome::Cancelled && fault != Fault::Cancel {
        violations.push("cancelled without a cancel".into());
    }
    let intact = matches!(fault, Fault::None | Fault::Slow | Fault::Short);
    if intact && outcome != Outcome::Completed {
        violations.push(format!(
            "the stream was intact ({fault:?}), but the run did not complete"
        ));
    }
    let breaking = matches!(
        fault,
        Fault::Drop | Fault::Flip | Fault::Stall | Fault::Refuse | Fault::Version
    );
    if breaking && e.struck && outcome == Outcome::Completed {
        violations.push(format!(
            "the {fault:?} fault struck, and yet the run completed"
        ));
    }
    if let Strike::Cancel(when @ (When::BeforeConnect | When::Switchover)) = e.plan.strike
        && outcome != Outcome::Cancelled
    {
        violations.push(format!("a cancel {when:?} ended {outcome:?}"));
    }
}

/// Promise 3, for a failed run: an error from either side names the fault.
fn error_names_the_fault(e: &Evidence<'_>, violations: &mut Vec<String>) {
    let fault = e.plan.fault;
    let errors: String = [e.sent, e.received]
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|err| err.chain().to_lowercase())
        .collect::<Vec<_>>()
        .join(" | ");
    let names = |words: &[&str]| words.iter().any(|w| errors.contains(w));
    let named = match fault {
        Fault::Drop => names(&["closed", "reset", "broken pipe", "timed out"]),
        Fault::Flip => names(&[
            "checksum",
            "not a ramjet peer",
            "version",
            "invalid",
            "exceeds the limit",
        ]),
        Fault::Stall => names(&["timed out"]),
        Fault::Refuse => names(&["memory layouts differ"]),
        Fault::Version => names(&["unsupported protocol version"]),
        Fault::None | Fault::Slow | Fault::Short | Fault::Cancel => false,
    };
    if !named {
        violations.push(format!(
            "failed without naming the {fault:?} fault: {errors}"
        ));
    }
}

/// Drives a control machine for `side` with `facts` (and a cancel, if the run was cancelled,
/// before the session's drained fact) and checks promise 1.
fn path(side: Side, facts: &[Fact], cancelled: bool, violations: &mut Vec<String>) {
    let mut machine = Machine::new(side, Profile::Qemu10, Options::new());
    let now = Timestamp::from_unix_micros(1);
    let mut ends = 0;
    let _ = machine.step(Trigger::Migrate, now);
    for fact in facts {
        if cancelled && *fact == Fact::Drained {
            let _ = machine.step(Trigger::Cancel, now);
        }
        match machine.step(fact.clone(), now) {
            Ok(Some(event)) if event.status().is_some_and(Status::is_terminal) => ends += 1,
            Ok(_) => {}
            Err(err) => {
                violations.push(format!(
                    "{side:?}: the control machine refused {fact}: {err}"
                ));
            }
        }
    }
    if ends != 1 {
        violations.push(format!(
            "{side:?}: {ends} terminal statuses (facts {facts:?})"
        ));
    }
}

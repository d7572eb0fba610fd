//! What every stress run must show, whatever its fault.

use ramjet_control::{Machine, Options, Profile, Side, Status, Timestamp, Trigger};
use ramjet_dataplane::internals::wire::VERSION;
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::{Error, Fact, Handover};

use super::plan::{Fault, Lose, Message, Mode, Plan, Stray, StrayWhen, Strike, When};

/// How a run ended, as the sender saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// The sender handed the guest over (the receiver said ready).
    Completed,
    /// An error: the source keeps the guest.
    Failed,
    /// A cancel: the source keeps the guest.
    Cancelled,
    /// Postcopy: handed over, then paused and not recovered (the run's recoveries were
    /// refused, or used up): the guest runs nowhere until an operator recovers it.
    Paused,
}

/// Who owns the guest at the end of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// The source resumed it (the sender failed) and the destination discarded its copy.
    Source,
    /// The source handed it over and the destination may run it.
    Destination,
    /// The source handed it over; the destination holds the complete copy in doubt (the only
    /// one: an operator must let it run).
    DoubtHandedOver,
    /// The source kept it; the destination holds a complete copy in doubt (an operator must
    /// discard it).
    DoubtKept,
    /// Postcopy paused: the source handed it over and the destination runs it, blocked on
    /// the pages still missing, until an operator recovers the migration.
    Split,
    /// Broken promise: the source resumed it and the destination may run it too.
    Both,
    /// Broken promise: the source handed it over and the destination discarded it.
    Nobody,
}

/// What the receiver ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// It holds the complete copy: the handover says whether it may run it.
    Copy(Handover),
    /// It discarded what it had.
    Discarded,
    /// Postcopy, paused: it holds part of the memory, and runs the guest if `started`.
    Paused {
        /// Whether its guest started (the go, or a reconnection, came).
        started: bool,
    },
}

impl Owner {
    /// Who owns the guest, from the sender's result (`true`: handed over, in postcopy too)
    /// and what the receiver kept.
    pub fn of(handed_over: bool, kept: Kept) -> Owner {
        match (handed_over, kept) {
            (false, Kept::Discarded) => Owner::Source,
            (false, Kept::Copy(Handover::InDoubt) | Kept::Paused { started: false }) => {
                Owner::DoubtKept
            }
            (false, Kept::Copy(_) | Kept::Paused { started: true }) => Owner::Both,
            (true, Kept::Copy(Handover::InDoubt) | Kept::Paused { started: false }) => {
                Owner::DoubtHandedOver
            }
            (true, Kept::Copy(_)) => Owner::Destination,
            (true, Kept::Paused { started: true }) => Owner::Split,
            (true, Kept::Discarded) => Owner::Nobody,
        }
    }
}

/// What the sender returned when it handed the guest over.
pub struct Sent {
    /// The device state it handed over.
    pub device_state: Vec<u8>,
    /// Whether the receiver acknowledged the go.
    pub acknowledged: bool,
}

/// What the receiver returned when it kept the copy.
pub struct Got {
    /// Who may run it.
    pub handover: Handover,
    /// The device state it got.
    pub device_state: Vec<u8>,
}

/// Everything a run left to look at.
pub struct Evidence<'a> {
    /// The plan.
    pub plan: &'a Plan,
    /// The source's memory as it was when its guest stopped for the switchover.
    pub src: &'a GuestMemory,
    /// The destination's memory.
    pub dst: &'a GuestMemory,
    /// The sender's result.
    pub sent: &'a Result<Sent, Error>,
    /// The device state the source took at the switchover, if it got that far.
    pub source_state: Option<&'a [u8]>,
    /// The receiver's result.
    pub received: &'a Result<Got, Error>,
    /// Facts each side reported, in order.
    pub source_facts: &'a [Fact],
    /// See `source_facts`.
    pub destination_facts: &'a [Fact],
    /// Whether the fault struck before the sender ended.
    pub struck: bool,
    /// Postcopy: whether the destination's guest started.
    pub destination_started: bool,
}

/// How a run ended, on both sides.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    /// The sender's outcome.
    pub outcome: Outcome,
    /// Who owns the guest.
    pub owner: Owner,
    /// The sender handed over, and the receiver acknowledged it.
    pub acknowledged: bool,
}

/// The promises, each broken one a line:
/// 1. **one owner**: at the end exactly one side owns the guest (the source resumed it, or the
///    destination may run it), or the destination holds it in doubt; never both, never
///    nobody;
/// 2. a destination that may run the guest, or holds it in doubt, has byte-identical memory
///    and the same device state as the source had when its guest stopped;
/// 3. each side's facts drive its control machine (`qemu-10`) along its graph: the source to
///    exactly one terminal status (`completed` when it handed over), the destination to
///    `completed` when it may run, `failed` or `cancelled` when it discarded, and to
///    `pre-switchover` (no terminal status, never `failed`) when in doubt;
/// 4. `failed` comes with an error (from either side) that names the fault;
/// 5. `cancelled` only after a cancel;
/// 6. runs whose fault leaves the stream intact (none, slow, short, a stray that is not the
///    sender) hand over and are acknowledged; a fault that struck the stream (drop, flip,
///    stall, refuse, version) never lets the sender hand over; a lost or late *go* or
///    *decided* comes after *ready*, so the sender hands over; a lost *decided* comes after
///    *go*, so the destination may run; a lost *go* with no way back leaves it in doubt;
/// 7. under TLS, a flipped record ends the run with a TLS error on one side at least
///    ([`Error::is_tls`]), never a checksum error, and the destination discards its copy (a
///    flip strikes before *ready*). At a TLS receiver every stray is one, a plaintext ramjet
///    hello for another layout too: the run must complete.
pub fn check(e: &Evidence<'_>) -> (Verdict, Vec<String>) {
    let mut violations = Vec::new();
    let outcome = match e.sent {
        Ok(_) => Outcome::Completed,
        Err(Error::PostcopyPaused { .. }) => Outcome::Paused,
        Err(err) if err.is_cancelled() => Outcome::Cancelled,
        Err(_) => Outcome::Failed,
    };
    let kept = match e.received {
        Ok(got) => Kept::Copy(got.handover),
        Err(Error::PostcopyPaused { .. }) => Kept::Paused {
            started: e.destination_started,
        },
        Err(_) => Kept::Discarded,
    };
    let owner = Owner::of(
        matches!(outcome, Outcome::Completed | Outcome::Paused),
        kept,
    );
    if e.plan.mode != Mode::Postcopy && e.destination_started {
        violations.push("the destination started its guest early without postcopy".into());
    }
    if let (Kept::Discarded, true) = (kept, e.destination_started) {
        violations.push(format!(
            "the destination started its guest in postcopy, and then discarded it: {}",
            errors(e)
        ));
    }
    let acknowledged = e.sent.as_ref().is_ok_and(|sent| sent.acknowledged);
    match owner {
        Owner::Both => violations.push(format!(
            "the source kept the guest ({}) and the destination may run it too",
            e.sent.as_ref().err().map_or_else(String::new, Error::chain)
        )),
        Owner::Split if e.plan.mode != Mode::Postcopy => {
            violations.push("a split guest without postcopy".into());
        }
        Owner::Nobody => violations.push(format!(
            "the source handed the guest over and the destination discarded it: {}",
            e.received
                .as_ref()
                .err()
                .map_or_else(String::new, Error::chain)
        )),
        _ => {}
    }
    if let Ok(got) = e.received {
        same_on_both_sides(e, got, &mut violations);
    }
    source_path(e, outcome, &mut violations);
    destination_path(e, &mut violations);
    fault_decides_the_end(e, outcome, owner, acknowledged, &mut violations);
    if outcome == Outcome::Failed {
        error_names_the_fault(e, &mut violations);
    }
    if e.plan.tls && e.plan.fault == Fault::Flip && e.struck {
        a_flipped_record_is_a_tls_error(e, &mut violations);
    }
    let verdict = Verdict {
        outcome,
        owner,
        acknowledged,
    };
    (verdict, violations)
}

/// Promise 2, for a destination that keeps its copy: the same device state and byte-identical
/// memory.
fn same_on_both_sides(e: &Evidence<'_>, got: &Got, violations: &mut Vec<String>) {
    let kept = if got.handover.may_run() {
        "may run"
    } else {
        "is in doubt"
    };
    let ours = match e.sent {
        Ok(sent) => Some(sent.device_state.as_slice()),
        Err(_) => e.source_state,
    };
    match ours {
        Some(ours) if ours != got.device_state => {
            violations.push(format!(
                "the destination {kept}, but the device state differs"
            ));
        }
        Some(_) => {}
        None => violations.push(format!(
            "the destination {kept}, but the source never took its device state"
        )),
    }
    match e.src.first_difference(e.dst) {
        Ok(None) => {}
        Ok(Some((region, page))) => violations.push(format!(
            "the destination {kept}, but page {page} of region {region} differs"
        )),
        Err(err) => violations.push(format!("cannot compare the memories: {err}")),
    }
}

/// Promise 3 for the source: one terminal status, the one its result says.
fn source_path(e: &Evidence<'_>, outcome: Outcome, violations: &mut Vec<String>) {
    let cancelled = outcome == Outcome::Cancelled;
    let machine = path(Side::Source, e.plan, e.source_facts, cancelled, violations);
    let want = match outcome {
        Outcome::Completed => Status::Completed,
        Outcome::Failed => Status::Failed,
        Outcome::Cancelled => Status::Cancelled,
        Outcome::Paused => Status::PostcopyPaused,
    };
    if machine.status() != want {
        violations.push(format!(
            "Source: {outcome:?}, but its control machine shows {}",
            machine.status()
        ));
    }
}

/// Promise 3 for the destination: `completed` when it may run, `failed` or `cancelled` when
/// it discarded, `pre-switchover` when in doubt.
fn destination_path(e: &Evidence<'_>, violations: &mut Vec<String>) {
    let cancelled = e.received.as_ref().is_err_and(Error::is_cancelled);
    let machine = path(
        Side::Destination,
        e.plan,
        e.destination_facts,
        cancelled,
        violations,
    );
    let status = machine.status();
    let (ok, what) = match e.received {
        // Paused with its guest running, or in doubt before it ever ran (still active).
        Err(Error::PostcopyPaused { .. }) if e.destination_started => {
            (status == Status::PostcopyPaused, "is paused in postcopy")
        }
        Err(Error::PostcopyPaused { .. }) => (status == Status::Active, "is in doubt in postcopy"),
        Ok(got) if got.handover.may_run() => (status == Status::Completed, "may run"),
        Ok(_) => (
            status == Status::PreSwitchover && machine.is_in_doubt(),
            "is in doubt",
        ),
        Err(_) => (
            matches!(status, Status::Failed | Status::Cancelled),
            "discarded its copy",
        ),
    };
    if !ok {
        violations.push(format!(
            "Destination: it {what}, but its control machine shows {status} (facts {:?})",
            e.destination_facts
        ));
    }
}

/// Promises 5 and 6: how the fault lets the run end.
fn fault_decides_the_end(
    e: &Evidence<'_>,
    outcome: Outcome,
    owner: Owner,
    acknowledged: bool,
    violations: &mut Vec<String>,
) {
    let fault = e.plan.fault;
    if outcome == Outcome::Cancelled && fault != Fault::Cancel {
        violations.push("cancelled without a cancel".into());
    }
    // A hello for another layout before the sender fails a receiver without TLS; at a TLS
    // receiver it is a plaintext peer, a stray like any other.
    let stray_sender = !e.plan.tls
        && matches!(
            e.plan.strike,
            Strike::Stray {
                kind: Stray::Layout,
                when: StrayWhen::Before
            }
        );
    let intact = matches!(
        fault,
        Fault::None | Fault::Slow | Fault::Short | Fault::Stray
    ) && !stray_sender;
    if intact && (owner != Owner::Destination || !acknowledged) {
        violations.push(format!(
            "the stream was intact ({:?}), but the run did not hand over and acknowledge \
             ({outcome:?}, {owner:?}): {}",
            e.plan.strike,
            errors(e)
        ));
    }
    let breaking = matches!(
        fault,
        Fault::Drop | Fault::Flip | Fault::Stall | Fault::Refuse | Fault::Version
    ) || stray_sender;
    if breaking && e.struck && outcome == Outcome::Completed {
        violations.push(format!(
            "the {fault:?} fault struck, and yet the sender handed over"
        ));
    }
    if let Strike::Cancel(when @ (When::BeforeConnect | When::Switchover)) = e.plan.strike
        && outcome != Outcome::Cancelled
    {
        violations.push(format!("a cancel {when:?} ended {outcome:?}"));
    }
    let (message, lost, reconnect, silenced) = match e.plan.strike {
        Strike::Handover {
            message,
            reconnect,
            how,
        } => (message, true, reconnect, how == Lose::Silence),
        Strike::Late { message, .. } => (message, false, true, false),
        _ => return,
    };
    if !e.struck {
        return;
    }
    // In postcopy a go or decided lost with no way back leaves the migration paused.
    let paused_for_good = e.plan.mode == Mode::Postcopy && lost && !reconnect;
    // In postcopy a decided silenced on channel 0 silences the receiver's *done* too: if the
    // destination fetched its last pages on the fault channel before the source gave up on
    // the decided, it completes and leaves, and the source, which never hears the done and
    // finds nobody to reconnect to, stays paused. The guest runs in one place (the
    // destination, with all its memory); the source cannot know that, so it says paused.
    let done_silenced = e.plan.mode == Mode::Postcopy
        && message == Message::Decided
        && silenced
        && outcome == Outcome::Paused
        && owner == Owner::Destination;
    match message {
        Message::Ready if lost && outcome == Outcome::Completed => {
            violations.push("ready was lost, and yet the sender handed over".into());
        }
        Message::Go | Message::Decided if paused_for_good && outcome == Outcome::Paused => {}
        Message::Decided if done_silenced => {}
        Message::Go | Message::Decided if outcome != Outcome::Completed => {
            violations.push(format!(
                "{message:?} came after ready, and yet the sender did not hand over: {}",
                errors(e)
            ));
        }
        _ => {}
    }
    if message == Message::Decided
        && !matches!(owner, Owner::Destination)
        && !(paused_for_good && owner == Owner::Split)
    {
        violations.push(format!(
            "decided came after go, and yet the destination may not run ({owner:?}): {}",
            errors(e)
        ));
    }
    if message == Message::Go && lost && !reconnect && owner != Owner::DoubtHandedOver {
        violations.push(format!(
            "go was lost with no way back, and yet the destination is not in doubt \
             ({owner:?}, acknowledged {acknowledged})"
        ));
    }
}

/// Both sides' errors, lower case, `|` between them.
fn errors(e: &Evidence<'_>) -> String {
    let sent = e.sent.as_ref().err();
    let received = e.received.as_ref().err();
    [sent, received]
        .iter()
        .flatten()
        .map(|err| err.chain().to_lowercase())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Promise 4, for a failed run: an error from either side names the fault.
fn error_names_the_fault(e: &Evidence<'_>, violations: &mut Vec<String>) {
    let fault = e.plan.fault;
    let errors = errors(e);
    let names = |words: &[&str]| words.iter().any(|w| errors.contains(w));
    // A handshake that stops on a silent link says so in its own words.
    let lost = [
        "closed",
        "reset",
        "broken pipe",
        "timed out",
        "did not finish the tls handshake",
    ];
    let named = match fault {
        Fault::Drop => names(&lost),
        Fault::Flip if e.plan.tls => names(&["tls:"]),
        Fault::Flip => names(&[
            "checksum",
            "not a ramjet peer",
            "version",
            "invalid",
            "exceeds the limit",
        ]),
        Fault::Stall => names(&["timed out", "did not finish the tls handshake"]),
        Fault::Refuse => names(&["memory layouts differ"]),
        // The proxy writes the version after this build's.
        Fault::Version => names(&[&format!("unsupported protocol version {}", VERSION + 1)]),
        Fault::Handover | Fault::Late => names(&lost),
        Fault::Stray => names(&["memory layouts differ"]),
        Fault::None | Fault::Slow | Fault::Short | Fault::Cancel => false,
    };
    if !named {
        violations.push(format!(
            "failed without naming the {fault:?} fault: {errors}"
        ));
    }
}

/// Promise 7: a flipped record is a TLS error, not a checksum one, and nothing is kept.
fn a_flipped_record_is_a_tls_error(e: &Evidence<'_>, violations: &mut Vec<String>) {
    let errors: Vec<&Error> = [e.sent.as_ref().err(), e.received.as_ref().err()]
        .into_iter()
        .flatten()
        .collect();
    if errors.iter().any(|err| err.is_checksum()) {
        violations.push(format!(
            "a flipped TLS record ended in a checksum error: {}",
            self::errors(e)
        ));
    }
    if !errors.iter().any(|err| err.is_tls()) {
        violations.push(format!(
            "a flipped TLS record struck, and yet neither side failed with a TLS error: {}",
            self::errors(e)
        ));
    }
    if e.received.is_ok() {
        violations
            .push("a flipped TLS record struck, and yet the destination kept its copy".into());
    }
}

/// Drives a control machine for `side` with `facts` (and a cancel, if the run was cancelled,
/// before the session's drained fact), checks that it accepts each and reaches at most one
/// terminal status (exactly one unless in doubt), and returns it.
fn path(
    side: Side,
    plan: &Plan,
    facts: &[Fact],
    cancelled: bool,
    violations: &mut Vec<String>,
) -> Machine {
    let postcopy = plan.mode == Mode::Postcopy;
    let options = Options::new().postcopy_ram(postcopy);
    let mut machine = Machine::new(side, Profile::Qemu10, options);
    let now = Timestamp::from_unix_micros(1);
    let mut ends = 0;
    let _ = machine.step(Trigger::Migrate, now);
    if postcopy && side == Side::Source {
        let _ = machine.step(Trigger::StartPostcopy, now);
    }
    for fact in facts {
        if cancelled && *fact == Fact::Drained {
            let _ = machine.step(Trigger::Cancel, now);
        }
        // The run recovers a paused postcopy as an operator would: `recover` (`migrate
        // -r` on the source, `migrate-recover` on the destination) comes before a
        // reconnection, or on the source a failed attempt.
        let attempt = match side {
            Side::Source => matches!(fact, Fact::Reconnected | Fact::Failed(_)),
            _ => *fact == Fact::Reconnected,
        };
        if machine.status() == Status::PostcopyPaused && attempt {
            let _ = machine.step(Trigger::Recover, now);
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
    // A paused postcopy, and a destination in doubt, end in no terminal status.
    let open = machine.is_in_doubt()
        || matches!(
            machine.status(),
            Status::PostcopyPaused | Status::PostcopyRecoverSetup | Status::PostcopyRecover
        )
        || (postcopy && side == Side::Destination && machine.status() == Status::Active);
    let want = usize::from(!open);
    if ends != want {
        violations.push(format!(
            "{side:?}: {ends} terminal statuses (facts {facts:?})"
        ));
    }
    machine
}

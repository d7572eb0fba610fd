//! The handover over loopback, on both transports: every handover message (the receiver's
//! *ready*, the sender's *go*, the receiver's *decided*) lost in its direction, either stalled
//! (the relay swallows it and everything after it, the connection stays open) or cut (the
//! relay closes channel 0 just before it), with new connections through the relay working
//! again or refused. Each case asserts who owns the guest afterwards and what each side
//! reported: the source resumes (its migration failed) and the destination discards, or the
//! source handed over and the destination runs, or the source handed over (or is gone) and the
//! destination holds the complete copy in doubt. Never both.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Facts, Image, Net, guest};
use ramjet_control::{Fact, Side};
use ramjet_dataplane::internals::wire::FrameKind;
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::testkit::relay::{Fault, How, relay};
use ramjet_dataplane::transport::{Endpoint, Listener, Transport};
use ramjet_dataplane::{
    Error, Handover, Operator, PreSwitchover, ReceiveOptions, Received, SendOptions, Sender,
    Summary, receive,
};

const BYTES: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_millis(400);
const DECISION_TIMEOUT: Duration = Duration::from_secs(1);
const IN_DOUBT_WAIT: Duration = Duration::from_secs(2);

type ReceiverRun = JoinHandle<(Result<Received, Error>, Vec<Fact>)>;

fn receiver(
    memory: Arc<GuestMemory>,
    transport: &Arc<dyn Transport>,
    operator: &Operator,
) -> (Endpoint, ReceiverRun) {
    let listener = Listener::bind(&common::endpoint(Net::Tcp)).expect("bind");
    let at = listener.endpoint().clone();
    let options = ReceiveOptions {
        transport: Arc::clone(transport),
        workers: 2,
        timeout: TIMEOUT,
        accept_timeout: Some(Duration::from_secs(10)),
        in_doubt_wait: IN_DOUBT_WAIT,
        operator: operator.clone(),
        ..ReceiveOptions::default()
    };
    let handle = thread::spawn(move || {
        let facts = Arc::new(Facts::default());
        let result = receive(&listener, memory, &options, facts.sink());
        (result, facts.all())
    });
    (at, handle)
}

/// A paused guest's migration to `to`: Ok means the source handed the guest over, an error
/// that it keeps (and resumes) it.
fn send(
    src: &Arc<GuestMemory>,
    to: &Endpoint,
    transport: &Arc<dyn Transport>,
) -> (Result<Summary, Error>, Vec<Fact>) {
    let facts = Arc::new(Facts::default());
    let options = SendOptions {
        channels: 2,
        workers: 2,
        timeout: TIMEOUT,
        decision_timeout: DECISION_TIMEOUT,
        transport: Arc::clone(transport),
        ..SendOptions::default()
    };
    let result = Sender::connect(Arc::clone(src), to, &options, facts.sink())
        .and_then(|sender| sender.migrate_paused(b"device", PreSwitchover::Skip));
    (result, facts.all())
}

/// Who owns the guest after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The source resumed it; the destination discarded its copy.
    Source,
    /// The source handed it over and the destination runs it.
    Destination,
    /// The source handed it over; the destination holds the complete copy in doubt.
    HandedOverInDoubt,
    /// The source resumed it; the destination holds a complete copy in doubt (it must not
    /// run it: an operator who asks the source learns that it kept the guest).
    SourceDestinationInDoubt,
}

fn owner(sent: &Result<Summary, Error>, received: &Result<Received, Error>) -> Owner {
    match (sent, received) {
        (Err(_), Err(_)) => Owner::Source,
        (Ok(_), Ok(r)) if r.handover.may_run() => Owner::Destination,
        (Ok(_), Ok(_)) => Owner::HandedOverInDoubt,
        (Err(_), Ok(r)) if !r.handover.may_run() => Owner::SourceDestinationInDoubt,
        (sent, received) => panic!(
            "the guest runs in two places or nowhere: sender {:?}, receiver {:?}",
            sent.as_ref().map_err(Error::chain),
            received.as_ref().map(|r| r.handover).map_err(Error::chain)
        ),
    }
}

struct Case {
    fault: Fault,
    owner: Owner,
    /// What the sender reports when it handed over: whether the receiver acknowledged.
    acknowledged: bool,
    /// Whether the receiver reported `in-doubt` on the way (`None`: it may or may not, as
    /// the two sides' timeouts race).
    doubted: Option<bool>,
}

fn run(case: &Case, transport: &Arc<dyn Transport>) {
    let what = format!("{:?} over {}", case.fault, transport.name());
    let src = guest(BYTES, Image::Random, 7);
    let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
    let operator = Operator::new();
    let (at, receiving) = receiver(Arc::clone(&dst), transport, &operator);
    let through = relay(&at, case.fault).expect("relay");
    let (sent, sent_facts) = send(&src, &through, transport);
    let (received, received_facts) = receiving.join().expect("receiver thread");
    let owner = owner(&sent, &received);
    assert_eq!(
        owner, case.owner,
        "{what}: sender {sent:?}, receiver {received:?}"
    );
    assert!(!src.is_frozen(), "{what}: the source is still frozen");
    // Each side's facts are a sequence its control machine accepts, ending in drained.
    common::statuses(Side::Source, &sent_facts);
    assert_eq!(sent_facts.last(), Some(&Fact::Drained), "{what}");
    assert_eq!(received_facts.last(), Some(&Fact::Drained), "{what}");
    if let Some(doubted) = case.doubted {
        assert_eq!(
            received_facts.contains(&Fact::InDoubt),
            doubted,
            "{what}: {received_facts:?}"
        );
    }
    match &sent {
        Ok(summary) => {
            assert_eq!(summary.acknowledged, case.acknowledged, "{what}");
            assert!(sent_facts.contains(&Fact::Completed), "{what}");
        }
        Err(err) => assert!(
            matches!(sent_facts.as_slice(), [.., Fact::Failed(m), Fact::Drained] if *m == err.chain()),
            "{what}: {sent_facts:?}"
        ),
    }
    match &received {
        Ok(r) => {
            // Whatever the handover, a copy that is kept is complete and verified.
            assert_eq!(src.first_difference(&dst).expect("layout"), None, "{what}");
            assert_eq!(r.device_state, b"device", "{what}");
            assert_eq!(
                received_facts.contains(&Fact::Completed),
                r.handover.may_run(),
                "{what}: {received_facts:?}"
            );
        }
        Err(err) => {
            assert!(
                matches!(err, Error::SourceKept { .. }),
                "{what}: {}",
                err.chain()
            );
            assert!(!received_facts.contains(&Fact::Completed), "{what}");
        }
    }
}

fn cases() -> Vec<Case> {
    let case = |kind, how, reconnect, owner, acknowledged, doubted| Case {
        fault: Fault {
            kind,
            how,
            reconnect,
        },
        owner,
        acknowledged,
        doubted,
    };
    use FrameKind::{Decided, Decision, Ready};
    use How::{Cut, Stall};
    use Owner::{Destination, HandedOverInDoubt, Source, SourceDestinationInDoubt};
    vec![
        // Ready lost: the sender never commits. A stall leaves the way up open, so its error
        // reaches the receiver on channel 0; after a cut, its abort comes on a new
        // connection; with none possible the receiver stays in doubt and keeps its copy.
        case(Ready, Stall, true, Source, false, None),
        case(Ready, Cut, true, Source, false, Some(true)),
        case(
            Ready,
            Cut,
            false,
            SourceDestinationInDoubt,
            false,
            Some(true),
        ),
        // Go lost: the sender has committed; it delivers the go on a new connection, or,
        // with none possible, the receiver is left in doubt.
        case(Decision, Stall, true, Destination, true, Some(true)),
        case(Decision, Cut, true, Destination, true, Some(true)),
        case(Decision, Cut, false, HandedOverInDoubt, false, Some(true)),
        // Decided lost: the receiver runs; the sender does not know that it arrived.
        case(Decided, Stall, true, Destination, false, Some(false)),
        case(Decided, Cut, false, Destination, false, Some(false)),
    ]
}

#[test]
fn every_handover_message_lost_leaves_exactly_one_owner() {
    for transport in &common::transports() {
        for case in &cases() {
            run(case, transport);
        }
    }
}

/// An operator resolves the doubt: told that the source handed over, the receiver completes
/// and the guest may run there; told that the source kept it, the receiver discards its copy
/// and reports a cancel (never `failed`). Outside the doubt the operator's word does nothing.
#[test]
fn an_operator_resolves_the_doubt() {
    let transport: Arc<dyn Transport> = Arc::new(ramjet_dataplane::Blocking);
    for run_here in [true, false] {
        let src = guest(BYTES, Image::Random, 8);
        let dst = Arc::new(GuestMemory::anonymous(BYTES).expect("memory"));
        let operator = Operator::new();
        assert!(
            !operator.run_here() && !operator.discard(),
            "not in doubt yet"
        );
        let (at, receiving) = receiver(Arc::clone(&dst), &transport, &operator);
        // Go (handed over) or ready (kept) lost with channel 0, and no new connection.
        let kind = if run_here {
            FrameKind::Decision
        } else {
            FrameKind::Ready
        };
        let fault = Fault {
            kind,
            how: How::Cut,
            reconnect: false,
        };
        let through = relay(&at, fault).expect("relay");
        let deciding = {
            let operator = operator.clone();
            thread::spawn(move || {
                while !operator.is_in_doubt() {
                    thread::sleep(Duration::from_millis(5));
                }
                if run_here {
                    operator.run_here()
                } else {
                    operator.discard()
                }
            })
        };
        let (sent, _) = send(&src, &through, &transport);
        assert!(deciding.join().expect("operator"), "the ruling took effect");
        let (received, facts) = receiving.join().expect("receiver thread");
        assert!(!facts.contains(&Fact::Failed(String::new())));
        if run_here {
            assert!(!sent.expect("handed over").acknowledged);
            let received = received.expect("a complete copy");
            assert_eq!(received.handover, Handover::Operator);
            assert_eq!(src.first_difference(&dst).expect("layout"), None);
            assert_eq!(
                facts[facts.len() - 3..],
                [Fact::InDoubt, Fact::Completed, Fact::Drained]
            );
        } else {
            assert!(sent.is_err(), "the source kept the guest");
            let err = received.expect_err("discarded");
            assert!(err.is_cancelled(), "{}", err.chain());
            assert_eq!(facts[facts.len() - 2..], [Fact::InDoubt, Fact::Drained]);
        }
        assert!(!operator.run_here(), "the doubt is over");
    }
}

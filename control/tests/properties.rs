//! Properties of the status machine, checked two ways: every input sequence up to a length
//! (exhaustive, in the spirit of TigerBeetle's exhaustigen), and long random sequences
//! (proptest), on both sides, both profiles and every combination of options.
//!
//! After every step the [`Checker`] (in `checker/`, shared with the control fuzz target) checks
//! the properties listed there.

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use ramjet_control::{
    Fact, Graph, Input, Machine, Options, Profile, Side, Status, Timestamp, Trigger,
};

mod checker;
use checker::Checker;

/// Every kind of input, with the pass number due and one out of order.
fn alphabet(machine: &Machine) -> Vec<Input> {
    let due = machine.passes() + 1;
    let mut inputs: Vec<Input> = Trigger::ALL.into_iter().map(Input::from).collect();
    inputs.extend(
        [
            Fact::SetupDone,
            Fact::Pass(due),
            Fact::Pass(due + 1),
            Fact::Switchover,
            Fact::DeviceLoaded,
            Fact::PostcopyStarted,
            Fact::Completed,
            Fact::Failed("injected error".into()),
            Fact::ChannelLost,
            Fact::Reconnected,
            Fact::Resumed,
            Fact::Drained,
            Fact::InDoubt,
        ]
        .map(Input::from),
    );
    inputs
}

fn configs() -> Vec<(Side, Profile, Options)> {
    let mut configs = Vec::new();
    for side in [Side::Source, Side::Destination] {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            for pause in [false, true] {
                for postcopy in [false, true] {
                    let options = Options::new()
                        .pause_before_switchover(pause)
                        .postcopy_ram(postcopy);
                    configs.push((side, profile, options));
                }
            }
        }
    }
    configs
}

/// How long the exhaustive sequences are: long enough for the longest path to every edge (a
/// source postcopy recovery that breaks again takes nine inputs).
const EXHAUSTIVE_LENGTH: usize = 9;

#[derive(Debug, Default)]
struct Tally {
    steps: u64,
    pruned: u64,
    edges: BTreeSet<(Side, Profile, Status, Status)>,
}

/// Tries every input after `checker`'s state, `depth` deep. A refused input leaves the state as
/// it was, and so does an accepted one that changes nothing; the sequences that continue from
/// there are continuations of the parent's state with fewer steps left, which the parent
/// explores anyway, so they are not explored again. Every sequence is thereby covered.
fn explore(checker: &Checker, depth: usize, path: &mut Vec<Input>, tally: &mut Tally) {
    if depth == 0 {
        return;
    }
    let now = Timestamp::from_unix_micros(1_000_000 * (1 + path.len() as u64));
    for input in alphabet(&checker.machine) {
        let mut next = checker.clone();
        tally.steps += 1;
        path.push(input.clone());
        match next.step(&input, now) {
            Err(violation) => {
                let inputs: Vec<String> = path.iter().map(ToString::to_string).collect();
                panic!(
                    "{violation}\n{:?} {:?} {:?} after: {}",
                    checker.machine.side(),
                    checker.machine.profile(),
                    checker.machine.options(),
                    inputs.join(", ")
                );
            }
            Ok(_) if next == *checker => tally.pruned += 1,
            Ok(_) => {
                let (from, to) = (checker.machine.status(), next.machine.status());
                if from != to {
                    let (side, profile) = (checker.machine.side(), checker.machine.profile());
                    tally.edges.insert((side, profile, from, to));
                }
                explore(&next, depth - 1, path, tally);
            }
        }
        path.pop();
    }
}

#[test]
fn every_sequence_up_to_the_exhaustive_length() {
    let mut tally = Tally::default();
    for (side, profile, options) in configs() {
        let checker = Checker::new(side, profile, options);
        explore(&checker, EXHAUSTIVE_LENGTH, &mut Vec::new(), &mut tally);
    }
    // Every edge of every graph was taken: the tables hold no edge the machine cannot emit.
    for side in [Side::Source, Side::Destination] {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            for edge in Graph::new(side, profile).edges() {
                assert!(
                    tally.edges.contains(&(side, profile, edge.from, edge.to)),
                    "{side:?} {profile:?}: no sequence takes {} -> {}",
                    edge.from,
                    edge.to
                );
            }
        }
    }
    println!(
        "{} steps over every sequence of up to {EXHAUSTIVE_LENGTH} inputs ({} pruned)",
        tally.steps, tally.pruned
    );
}

fn any_input() -> impl Strategy<Value = Input> {
    let triggers = prop::sample::select(Trigger::ALL.to_vec()).prop_map(Input::from);
    let facts = prop_oneof![
        Just(Fact::SetupDone),
        // Mostly near the numbers due, so passes are accepted as well as refused.
        (0u64..8).prop_map(Fact::Pass),
        Just(Fact::Switchover),
        Just(Fact::DeviceLoaded),
        Just(Fact::PostcopyStarted),
        Just(Fact::Completed),
        "[a-z ]{1,20}".prop_map(Fact::Failed),
        Just(Fact::ChannelLost),
        Just(Fact::Reconnected),
        Just(Fact::Resumed),
        Just(Fact::Drained),
        Just(Fact::InDoubt),
    ]
    .prop_map(Input::from);
    prop_oneof![1 => triggers, 2 => facts]
}

fn any_config() -> impl Strategy<Value = (Side, Profile, Options)> {
    prop::sample::select(configs())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2_000,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_sequences_keep_every_property(
        (side, profile, options) in any_config(),
        inputs in prop::collection::vec(any_input(), 0..80),
        gaps in prop::collection::vec(0u64..5_000, 80),
    ) {
        let mut checker = Checker::new(side, profile, options);
        let mut now = Timestamp::from_unix_micros(1_767_225_600_000_000);
        for (input, gap) in inputs.iter().zip(&gaps) {
            now = now.saturating_add(Duration::from_micros(*gap));
            if let Err(violation) = checker.step(input, now) {
                prop_assert!(false, "{}", violation);
            }
        }
    }
}

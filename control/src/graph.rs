//! The documented transition graphs, as const data: one per side and profile.
//!
//! [`Machine`](crate::Machine) derives statuses from facts and triggers; these tables are what it
//! promises to emit. The tests check both directions: every emitted change is an edge here, and
//! every edge here is emitted by some golden scenario.

use std::fmt::Write as _;

use crate::{Profile, Side, Status};

/// One allowed status change and the input that causes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Edge {
    /// The status before.
    pub from: Status,
    /// The status after.
    pub to: Status,
    /// What causes it, in the scenario vocabulary (e.g. `"failed, then drained"`).
    pub cause: &'static str,
}

const fn edge(from: Status, to: Status, cause: &'static str) -> Edge {
    Edge { from, to, cause }
}

use Status as S;

/// Edges both sides share under both profiles.
const COMMON: &[Edge] = &[
    edge(S::None, S::Setup, "migrate"),
    edge(S::Completed, S::Setup, "migrate"),
    edge(S::Failed, S::Setup, "migrate"),
    edge(S::Cancelled, S::Setup, "migrate"),
    edge(S::Setup, S::Active, "setup-done"),
    edge(S::Setup, S::Cancelling, "cancel"),
    edge(S::Active, S::Cancelling, "cancel"),
    edge(S::Cancelling, S::Cancelled, "drained"),
    edge(S::PostcopyActive, S::Completed, "completed, then drained"),
    edge(
        S::PostcopyActive,
        S::PostcopyPaused,
        "failed or channel-lost",
    ),
    edge(S::PostcopyRecover, S::PostcopyActive, "resumed"),
    edge(
        S::PostcopyRecover,
        S::PostcopyPaused,
        "failed or channel-lost",
    ),
];

/// Source-only edges under both profiles.
const SOURCE: &[Edge] = &[
    edge(S::Active, S::Device, "switchover"),
    edge(
        S::Active,
        S::PreSwitchover,
        "switchover (pause-before-switchover)",
    ),
    edge(S::PreSwitchover, S::Device, "continue"),
    edge(S::PreSwitchover, S::Cancelling, "cancel"),
    edge(S::Device, S::Cancelling, "cancel"),
    edge(S::Device, S::Completed, "completed, then drained"),
    edge(S::PostcopyPaused, S::PostcopyRecoverSetup, "recover"),
    edge(S::PostcopyRecoverSetup, S::PostcopyRecover, "reconnected"),
    edge(
        S::PostcopyRecoverSetup,
        S::PostcopyPaused,
        "failed or channel-lost",
    ),
];

/// Source, QEMU 10: an error shows only once clean-up is over; postcopy starts in one step.
const SOURCE_QEMU10: &[Edge] = &[
    edge(S::Setup, S::Failed, "failed, then drained"),
    edge(S::Active, S::Failed, "failed, then drained"),
    edge(S::PreSwitchover, S::Failed, "failed, then drained"),
    edge(S::Device, S::Failed, "failed, then drained"),
    edge(S::Device, S::PostcopyActive, "postcopy-started"),
];

/// Source, QEMU 11: `failing` during clean-up; `postcopy-device` until the device state loaded.
const SOURCE_QEMU11: &[Edge] = &[
    edge(S::Setup, S::Failing, "failed"),
    edge(S::Active, S::Failing, "failed"),
    edge(S::PreSwitchover, S::Failing, "failed"),
    edge(S::Device, S::Failing, "failed"),
    edge(S::Failing, S::Failed, "drained"),
    edge(S::Device, S::PostcopyDevice, "postcopy-started"),
    edge(S::PostcopyDevice, S::PostcopyActive, "device-loaded"),
    edge(S::PostcopyDevice, S::Completed, "completed, then drained"),
    edge(
        S::PostcopyDevice,
        S::PostcopyPaused,
        "failed or channel-lost",
    ),
];

/// Destination-only edges under both profiles. `pre-switchover` is the destination in doubt:
/// the complete state is here, the source's decision is not.
const DESTINATION: &[Edge] = &[
    edge(S::Active, S::Completed, "completed, then drained"),
    edge(S::Active, S::PostcopyActive, "postcopy-started"),
    edge(
        S::PostcopyPaused,
        S::PostcopyRecover,
        "recover, then reconnected",
    ),
    edge(S::Active, S::PreSwitchover, "in-doubt"),
    edge(
        S::PreSwitchover,
        S::Completed,
        "completed, then drained (or drained, then continue)",
    ),
    edge(S::PreSwitchover, S::Cancelling, "cancel"),
    edge(S::PreSwitchover, S::Cancelled, "drained, then cancel"),
];

/// Destination, QEMU 10.
const DESTINATION_QEMU10: &[Edge] = &[
    edge(S::Setup, S::Failed, "failed, then drained"),
    edge(S::Active, S::Failed, "failed, then drained"),
    edge(S::PreSwitchover, S::Failed, "failed, then drained"),
];

/// Destination, QEMU 11.
const DESTINATION_QEMU11: &[Edge] = &[
    edge(S::Setup, S::Failing, "failed"),
    edge(S::Active, S::Failing, "failed"),
    edge(S::PreSwitchover, S::Failing, "failed"),
    edge(S::Failing, S::Failed, "drained"),
];

/// The transition graph of one side under one profile: every status change a
/// [`Machine`](crate::Machine) with that side and profile may emit.
///
/// ```
/// use ramjet_control::{Graph, Profile, Side, Status};
/// let graph = Graph::new(Side::Source, Profile::Qemu10);
/// assert!(graph.allows(Status::Active, Status::Device));
/// assert!(!graph.allows(Status::Active, Status::Failing)); // QEMU 11 only
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Graph {
    side: Side,
    profile: Profile,
    parts: [&'static [Edge]; 3],
}

impl Graph {
    /// The graph for `side` under `profile`.
    pub const fn new(side: Side, profile: Profile) -> Self {
        let parts = match (side, profile) {
            (Side::Source, Profile::Qemu10) => [COMMON, SOURCE, SOURCE_QEMU10],
            (Side::Source, Profile::Qemu11) => [COMMON, SOURCE, SOURCE_QEMU11],
            (Side::Destination, Profile::Qemu10) => [COMMON, DESTINATION, DESTINATION_QEMU10],
            (Side::Destination, Profile::Qemu11) => [COMMON, DESTINATION, DESTINATION_QEMU11],
        };
        Graph {
            side,
            profile,
            parts,
        }
    }

    /// The side this graph describes.
    pub const fn side(&self) -> Side {
        self.side
    }

    /// The profile this graph describes.
    pub const fn profile(&self) -> Profile {
        self.profile
    }

    /// Every edge, shared ones first.
    pub fn edges(&self) -> impl Iterator<Item = &'static Edge> + '_ {
        self.parts.iter().flat_map(|part| part.iter())
    }

    /// Whether a change from `from` to `to` is an edge of this graph.
    pub fn allows(&self, from: Status, to: Status) -> bool {
        self.edges().any(|e| e.from == from && e.to == to)
    }

    /// Whether this graph can ever show `status` (`none` included).
    pub fn shows(&self, status: Status) -> bool {
        self.edges().any(|e| e.from == status || e.to == status)
    }

    /// The graph as a mermaid `stateDiagram-v2`, edges labelled with their cause.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("stateDiagram-v2\n");
        for status in Status::ALL.into_iter().filter(|s| self.shows(*s)) {
            if status.as_str().contains('-') {
                let _ = writeln!(out, "    state \"{}\" as {}", status, mermaid_id(status));
            }
        }
        let _ = writeln!(out, "    [*] --> none");
        for e in self.edges() {
            let _ = writeln!(
                out,
                "    {} --> {}: {}",
                mermaid_id(e.from),
                mermaid_id(e.to),
                e.cause
            );
        }
        out
    }
}

/// Mermaid state ids cannot contain `-`.
fn mermaid_id(status: Status) -> String {
    status.as_str().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_GRAPHS: [(Side, Profile); 4] = [
        (Side::Source, Profile::Qemu10),
        (Side::Source, Profile::Qemu11),
        (Side::Destination, Profile::Qemu10),
        (Side::Destination, Profile::Qemu11),
    ];

    #[test]
    fn no_duplicate_or_self_edges() {
        for (side, profile) in ALL_GRAPHS {
            let graph = Graph::new(side, profile);
            let edges: Vec<_> = graph.edges().collect();
            for (i, a) in edges.iter().enumerate() {
                assert_ne!(a.from, a.to, "self edge {a:?}");
                for b in &edges[i + 1..] {
                    assert!(
                        (a.from, a.to) != (b.from, b.to),
                        "duplicate {a:?} in {side:?} {profile:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn terminals_lead_only_to_setup() {
        for (side, profile) in ALL_GRAPHS {
            for e in Graph::new(side, profile).edges() {
                if e.from.is_terminal() || e.from == Status::None {
                    assert_eq!(e.to, Status::Setup, "{e:?}");
                }
            }
        }
    }

    #[test]
    fn profiles_show_only_their_statuses() {
        for side in [Side::Source, Side::Destination] {
            let qemu10 = Graph::new(side, Profile::Qemu10);
            assert!(!qemu10.shows(Status::Failing));
            assert!(!qemu10.shows(Status::PostcopyDevice));
            assert!(Graph::new(side, Profile::Qemu11).shows(Status::Failing));
        }
        for (side, profile) in ALL_GRAPHS {
            let graph = Graph::new(side, profile);
            assert!(!graph.shows(Status::Colo) && !graph.shows(Status::WaitUnplug));
        }
        let destination = Graph::new(Side::Destination, Profile::Qemu11);
        // In doubt, the destination shows `pre-switchover`; never the source's other phases.
        assert!(destination.shows(Status::PreSwitchover));
        for status in [
            Status::Device,
            Status::PostcopyDevice,
            Status::PostcopyRecoverSetup,
        ] {
            assert!(!destination.shows(status), "{status}");
        }
    }

    #[test]
    fn in_doubt_never_leads_to_running_elsewhere() {
        // From `pre-switchover` a destination only ends (or starts to end): it never goes back
        // to copying, and never to postcopy, where the guest would run before the decision.
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            let graph = Graph::new(Side::Destination, profile);
            let mut next: Vec<Status> = graph
                .edges()
                .filter(|e| e.from == Status::PreSwitchover)
                .map(|e| e.to)
                .collect();
            next.sort();
            let failure = match profile {
                Profile::Qemu10 => Status::Failed,
                Profile::Qemu11 => Status::Failing,
            };
            let mut expected = vec![
                Status::Cancelling,
                Status::Cancelled,
                Status::Completed,
                failure,
            ];
            expected.sort();
            assert_eq!(next, expected, "{profile:?}");
            let into: Vec<_> = graph
                .edges()
                .filter(|e| e.to == Status::PreSwitchover)
                .collect();
            assert_eq!(into.len(), 1);
            assert_eq!((into[0].from, into[0].cause), (Status::Active, "in-doubt"));
        }
    }

    #[test]
    fn mermaid_names_every_edge() {
        let graph = Graph::new(Side::Source, Profile::Qemu11);
        let text = graph.to_mermaid();
        assert!(text.starts_with("stateDiagram-v2\n"));
        assert!(text.contains("state \"postcopy-recover-setup\" as postcopy_recover_setup"));
        assert!(text.contains("    failing --> failed: drained\n"));
        assert_eq!(
            text.lines().filter(|l| l.contains("-->")).count(),
            graph.edges().count() + 1
        );
    }
}

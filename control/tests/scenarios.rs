//! Golden scenarios: every `scenarios/*.scn` file is a script of inputs and the events each must
//! emit, in the raft-rs datadriven spirit.
//!
//! Format, one item per line; `#` starts a comment:
//!
//! ```text
//! side source|destination        (header, default source)
//! profile qemu-10|qemu-11        (header, default qemu-10)
//! option pause-before-switchover (header, repeatable; also postcopy-ram)
//! trigger <name> => <events>
//! fact <name> [<argument>] => <events>
//! status => <status>
//! error => <first error message, or nothing>
//! ```
//!
//! `<events>` is what that input emits, in order: status strings and `pass N`, separated by
//! spaces; empty for nothing; `refused` when the input is refused. Each input line is stepped one
//! millisecond after the one before. A failure names the file, the line, what was expected and
//! what was emitted; all failures of all files are reported together. Finally, every edge of
//! every graph must have been emitted by some scenario, so the scenarios cover every rule.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ramjet_control::{
    Fact, Graph, Input, Machine, Options, Profile, Side, Status, Timestamp, Trigger,
};

/// A status change some scenario emitted: (side, profile, from, to).
type Seen = BTreeSet<(&'static str, &'static str, Status, Status)>;

#[test]
fn golden_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "scn"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());

    let mut failures = Vec::new();
    let mut seen = Seen::new();
    let mut checked = 0;
    for path in &files {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        checked += run_scenario(&name, &text, &mut seen, &mut failures);
    }

    for side in [Side::Source, Side::Destination] {
        for profile in [Profile::Qemu10, Profile::Qemu11] {
            for edge in Graph::new(side, profile).edges() {
                let key = (side.as_str(), profile.as_str(), edge.from, edge.to);
                if !seen.contains(&key) {
                    failures.push(format!(
                        "no scenario covers the {} {} edge {} -> {} ({})",
                        side.as_str(),
                        profile.as_str(),
                        edge.from,
                        edge.to,
                        edge.cause
                    ));
                }
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} golden scenario failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "{} files, {checked} checked lines, all as expected",
        files.len()
    );
}

/// Runs one scenario file; returns how many lines it checked.
fn run_scenario(name: &str, text: &str, seen: &mut Seen, failures: &mut Vec<String>) -> usize {
    let mut side = Side::Source;
    let mut profile = Profile::Qemu10;
    let mut options = Options::new();
    let mut machine: Option<Machine> = None;
    let mut now = Timestamp::from_unix_micros(1_767_225_600_000_000);
    let mut checked = 0;

    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{name}:{}", index + 1);
        let mut fail = |message: String| failures.push(format!("{at}: {message}"));

        let (head, expected) = match line.split_once("=>") {
            Some((head, expected)) => (head.trim(), Some(normalize(expected))),
            None => (line, None),
        };
        let (word, rest) = head.split_once(' ').unwrap_or((head, ""));
        let rest = rest.trim();

        if expected.is_none() {
            // A header line.
            if machine.is_some() {
                fail(format!("header {line:?} after the first input"));
                continue;
            }
            match (word, rest) {
                ("side", "source") => side = Side::Source,
                ("side", "destination") => side = Side::Destination,
                ("profile", "qemu-10") => profile = Profile::Qemu10,
                ("profile", "qemu-11") => profile = Profile::Qemu11,
                ("option", "pause-before-switchover") => {
                    options = options.pause_before_switchover(true);
                }
                ("option", "postcopy-ram") => options = options.postcopy_ram(true),
                _ => fail(format!("not a header: {line:?}")),
            }
            continue;
        }
        let expected = expected.unwrap_or_default();
        let m = machine.get_or_insert_with(|| Machine::new(side, profile, options));
        checked += 1;

        let input: Input = match word {
            "trigger" => match rest.parse::<Trigger>() {
                Ok(trigger) => trigger.into(),
                Err(e) => {
                    fail(e.to_string());
                    continue;
                }
            },
            "fact" => match Fact::parse(rest) {
                Ok(fact) => fact.into(),
                Err(e) => {
                    fail(e.to_string());
                    continue;
                }
            },
            "status" if rest.is_empty() => {
                let actual = m.status().to_string();
                if actual != expected {
                    fail(format!("expected status {expected:?}, is {actual:?}"));
                }
                continue;
            }
            "error" if rest.is_empty() => {
                let actual = m.query(now).error_desc.unwrap_or_default();
                if actual != expected {
                    fail(format!("expected error {expected:?}, is {actual:?}"));
                }
                continue;
            }
            _ => {
                fail(format!("not an input or a check: {line:?}"));
                continue;
            }
        };

        now = now.saturating_add(Duration::from_millis(1));
        let before = m.status();
        let mut refusal = None;
        let emitted = match m.step(input, now) {
            Ok(Some(event)) => {
                if let Some(after) = event.status() {
                    seen.insert((side.as_str(), profile.as_str(), before, after));
                }
                event.kind().to_string()
            }
            Ok(None) => String::new(),
            Err(e) => {
                refusal = Some(e);
                "refused".to_owned()
            }
        };
        if emitted != expected {
            let mut message = format!("{head}: expected {expected:?}, emitted {emitted:?}");
            match refusal {
                Some(e) => {
                    let _ = write!(message, " ({e})");
                }
                None => {
                    let _ = write!(message, " (status was {before})");
                }
            }
            fail(message);
        }
    }
    checked
}

/// Events with single spaces, for comparison.
fn normalize(events: &str) -> String {
    events.split_whitespace().collect::<Vec<_>>().join(" ")
}

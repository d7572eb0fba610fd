//! The `ramjet` binary as a user runs it.

use std::process::Command;

fn ramjet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ramjet"))
        .args(args)
        .output()
        .expect("run ramjet")
}

#[test]
fn the_demo_migrates_a_running_guest_and_verifies_it() {
    let out = ramjet(&["demo", "--size", "32M", "--dirty-rate", "5000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("verified         destination identical"),
        "{stdout}"
    );
    // The source's events, in order: setup, active, a pass per round, device, completed.
    let source: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("source      "))
        .collect();
    assert_eq!(source.first(), Some(&"MIGRATION setup"), "{stdout}");
    assert_eq!(source.get(1), Some(&"MIGRATION active"));
    assert_eq!(source.get(2), Some(&"MIGRATION_PASS pass 1"));
    assert_eq!(source.last(), Some(&"MIGRATION completed"));
    assert!(source.contains(&"MIGRATION device"), "{stdout}");
    let destination: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("destination "))
        .collect();
    assert_eq!(
        destination,
        ["MIGRATION setup", "MIGRATION active", "MIGRATION completed"]
    );
}

#[test]
fn images_are_deterministic_and_bad_values_name_their_flag() {
    let dir = std::env::temp_dir();
    let (a, b) = (
        dir.join(format!("ramjet-cli-a-{}", std::process::id())),
        dir.join(format!("ramjet-cli-b-{}", std::process::id())),
    );
    for path in [&a, &b] {
        let out = ramjet(
            &["image", "--profile", "mixed", "--size", "1M", "--seed", "5"]
                .iter()
                .copied()
                .chain([path.to_str().expect("utf-8 path")])
                .collect::<Vec<_>>(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (x, y) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
    assert_eq!(x.len(), 1 << 20);
    assert!(x == y, "same seed, same bytes");
    for (args, flag) in [
        (&["image", "--size", "12Q", "x"][..], "--size"),
        (
            &["image", "--size", "1M", "--profile", "stripes", "x"][..],
            "--profile",
        ),
        (&["demo", "--dirty-rate", "fast"][..], "--dirty-rate"),
        (&["demo", "--max-bandwidth", "100M"][..], "--max-bandwidth"),
    ] {
        let out = ramjet(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = ramjet(&["image", "--size", "5000", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 4096"));
    let _ = std::fs::remove_file(a);
    let _ = std::fs::remove_file(b);
}

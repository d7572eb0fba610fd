//! The tests written in Python, against the real `ramjet` binary: QEMU's own QMP client
//! (`qemu.qmp`) driving `ramjet send --qmp` and `ramjet recv --qmp` as management software
//! drives two QEMUs, the QMP protocol's edge cases over a raw socket, and what a terminal shows
//! (a pseudo-terminal read through a VT100 screen). `tests/python/venv` makes the virtual
//! environment they run in (once; `.ci/run` makes it first).

use std::path::{Path, PathBuf};
use std::process::Command;

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// The virtual environment's python, made if missing.
fn python() -> PathBuf {
    let out = Command::new(here().join("venv"))
        .output()
        .expect("cannot run tests/python/venv");
    assert!(
        out.status.success(),
        "tests/python/venv failed (it needs python3 with venv and pip, and the package \
         registry): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs one script with the `ramjet` binary as its argument; its output is shown on failure.
fn run(script: &str) {
    let out = Command::new(python())
        .arg(here().join(script))
        .arg(env!("CARGO_BIN_EXE_ramjet"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("cannot run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    // Each script prints one `ok NAME` line per case it ran: a script that ran none failed.
    assert!(
        text.lines().any(|l| l.starts_with("ok ")),
        "{script} ran no case:\n{text}"
    );
}

#[test]
fn a_terminal_shows_every_event_and_true_progress() {
    run("test_terminal.py");
}

#[test]
fn qemu_qmp_drives_a_migration_like_two_qemus() {
    run("test_qmp.py");
}

#[test]
fn the_qmp_protocol_edge_cases_get_qemus_answers() {
    run("test_qmp_protocol.py");
}

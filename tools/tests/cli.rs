//! The `ramjet` binary as a user runs it.

use std::process::Command;

fn ramjet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ramjet"))
        .args(args)
        .output()
        .expect("run ramjet")
}

/// Runs ramjet, asserts that it succeeded (showing both streams if not) and returns its stdout.
fn ramjet_ok(args: &[&str]) -> String {
    let out = ramjet(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_migrates_a_running_guest_and_verifies_it() {
    let stdout = ramjet_ok(&["demo", "--size", "32M", "--dirty-rate", "5000"]);
    assert!(
        stdout.contains("verified: destination identical"),
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

/// `ramjet demo --same-host`: a memfd guest handed over by descriptor over a Unix socket; the
/// check finds the destination mapping the source's very memfd, and the source refusing it.
#[test]
fn the_demo_hands_a_guest_over_on_one_host() {
    let stdout = ramjet_ok(&[
        "demo",
        "--size",
        "32M",
        "--dirty-rate",
        "5000",
        "--same-host",
    ]);
    assert!(stdout.contains("rounds:      1 (SharedMemory)"), "{stdout}");
    assert!(
        stdout.contains("memory:      handed over by file descriptor (same host)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("verified: the destination maps the source's memfd itself"),
        "{stdout}"
    );
    assert!(
        stdout.contains("the source refuses to touch it"),
        "{stdout}"
    );
}

/// `ramjet demo --postcopy`: after round 1 the destination runs the guest (which writes on
/// there), fetching what it touches; both sides show postcopy-active, and the check finds the
/// destination equal to the source at the pause but for the pages its guest wrote.
#[test]
fn the_demo_switches_to_postcopy() {
    let stdout = ramjet_ok(&[
        "demo",
        "--size",
        "32M",
        "--dirty-rate",
        "5000",
        "--postcopy",
    ]);
    for line in [
        "source      MIGRATION postcopy-active",
        "destination MIGRATION postcopy-active",
        "destination MIGRATION completed",
        "rounds:      1 (PostcopyRequested)",
        "postcopy:    ",
        "faults:      ",
        "verified: destination identical to the source at the pause, but for the ",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.ends_with("MIGRATION completed"))
            .count(),
        2,
        "{stdout}"
    );
}

/// `ramjet demo --guest kvm`: a KVM guest migrates and continues on the destination from the
/// same counter and checksum (skipped, saying why, where KVM cannot be opened).
#[test]
fn the_demo_migrates_a_kvm_guest() {
    if let Err(why) = ramjet_vmm::kvm_available() {
        eprintln!("the_demo_migrates_a_kvm_guest: skipped: {why}");
        return;
    }
    let stdout = ramjet_ok(&[
        "demo",
        "--guest",
        "kvm",
        "--size",
        "64M",
        "--dirty-rate",
        "5000",
    ]);
    assert!(stdout.contains("KVM dirty log"), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "guest:       continued on the destination from the same counter and checksum"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("destination MIGRATION completed"),
        "{stdout}"
    );
}

/// Without KVM the KVM demo says why and fails; the default demo does not need it (above).
#[test]
fn the_kvm_demo_without_kvm_says_why() {
    let out = Command::new(env!("CARGO_BIN_EXE_ramjet"))
        .args(["demo", "--guest", "kvm", "--size", "64M"])
        .env("RAMJET_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .expect("run ramjet");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the KVM guest cannot run here: /nonexistent/kvm does not exist"),
        "{stderr}"
    );
    assert!(stderr.contains("without `--guest kvm`"), "{stderr}");
}

/// `ramjet demo --tls`: the same migration, every channel encrypted and mutually
/// authenticated with throwaway certificates, and the summary says so.
#[test]
fn the_demo_encrypts_with_tls() {
    let stdout = ramjet_ok(&["demo", "--size", "32M", "--dirty-rate", "5000", "--tls"]);
    assert!(
        stdout.contains("verified: destination identical"),
        "{stdout}"
    );
    assert!(
        stdout.contains("every channel TLS 1.3 (TLS13_")
            && stdout.contains("mutually authenticated")
            && stdout.contains("(0 bytes sent zero-copy)"),
        "{stdout}"
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

/// A short stress pass, several runs at once, paused and live guests: no violation, and the
/// table has a row per fault that came up, per mode, and the ownership columns. (The faults
/// that cost a timeout each, stall and late, are left to the full pass.)
#[test]
fn a_short_stress_pass_finds_no_violation() {
    let out = ramjet(&[
        "stress",
        "--runs",
        "24",
        "--seed",
        "7",
        "--jobs",
        "4",
        "--faults",
        "none,drop,flip,slow,short,refuse,version,cancel,handover,stray",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("24 runs in"), "{stdout}");
    assert!(stdout.contains(": 0 violations"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for row in ["none", "drop", "flip", "paused", "live", "all"] {
        assert!(rows.contains(&row), "no {row} row: {stdout}");
    }
    assert!(
        stdout.contains("doubt-ho") && stdout.contains("in doubt)"),
        "{stdout}"
    );
}

/// The short pass with TLS on every run: no violation; the faults strike ciphertext (a flip
/// must end in a TLS error), and the summary says the pass was TLS.
#[test]
fn a_short_tls_stress_pass_finds_no_violation() {
    let stdout = ramjet_ok(&[
        "stress", "--tls", "--runs", "20", "--seed", "1", "--jobs", "4",
    ]);
    assert!(stdout.contains("20 runs in"), "{stdout}");
    assert!(stdout.contains(", TLS: 0 violations"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for row in ["flip", "all"] {
        assert!(rows.contains(&row), "no {row} row: {stdout}");
    }
    assert!(!rows.contains(&"version"), "{stdout}");
}

/// What --tls cannot do is refused, and says why.
#[test]
fn tls_stress_arguments_are_checked() {
    let out = ramjet(&["stress", "--tls", "--faults", "none,version"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--faults version") && stderr.contains("--tls"),
        "{stderr}"
    );
    let out = ramjet(&["stress", "--tls", "--processes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--processes") && stderr.contains("--tls"),
        "{stderr}"
    );
}

/// A short pass of `ramjet send` and `ramjet recv` as processes, one killed in each run: no
/// violation, and the table has a row per kill point that came up and the ownership columns.
#[test]
fn a_short_processes_pass_finds_no_violation() {
    let stdout = ramjet_ok(&["stress", "--processes", "--runs", "6", "--seed", "3"]);
    assert!(stdout.contains("6 runs in"), "{stdout}");
    assert!(stdout.contains(": 0 violations"), "{stdout}");
    assert!(stdout.contains("dgone-after"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(rows.contains(&"all"), "{stdout}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with("sender@") || r.starts_with("receiver@")),
        "{stdout}"
    );
}

/// Bad stress arguments name what is wrong.
#[test]
fn stress_arguments_are_checked() {
    let out = ramjet(&["stress", "--duration", "5d"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
    let out = ramjet(&["stress", "--faults", "gremlins"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("gremlins"));
    let out = ramjet(&["stress", "--jobs", "0"]);
    assert!(!out.status.success());
}

mod processes {
    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::time::Duration;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ramjet-cli-{}-{name}", std::process::id()))
    }

    /// Starts `ramjet recv` and returns it with the endpoint it listens on.
    fn recv(listen: &str, memory: &str, extra: &[&str]) -> (Child, String) {
        let (child, endpoint, _) = recv_logged(listen, memory, extra);
        (child, endpoint)
    }

    /// [`recv`], and the rest of its stderr once it exits.
    fn recv_logged(
        listen: &str,
        memory: &str,
        extra: &[&str],
    ) -> (Child, String, std::thread::JoinHandle<String>) {
        recv_with(listen, memory, extra, Stdio::inherit())
    }

    /// [`recv_logged`] with `stdin`.
    fn recv_with(
        listen: &str,
        memory: &str,
        extra: &[&str],
        stdin: Stdio,
    ) -> (Child, String, std::thread::JoinHandle<String>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ramjet"))
            .args([
                "recv",
                "--listen",
                listen,
                "--memory",
                memory,
                "--accept-timeout",
                "30",
            ])
            .args(extra)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn recv");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let endpoint = loop {
            let line = lines
                .next()
                .expect("recv said where it listens")
                .expect("a line");
            if let Some(at) = line.strip_prefix("ramjet: listening on ") {
                break at.to_string();
            }
        };
        // Keep draining its stderr so it never blocks on a full pipe.
        let rest = std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .fold(String::new(), |all, line| all + &line + "\n")
        });
        (child, endpoint, rest)
    }

    fn send(to: &str, image: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ramjet"));
        command
            .args(["send", "--to", to, "--image"])
            .arg(image)
            .args(extra);
        command
    }

    fn image(name: &str, size: &str) -> PathBuf {
        let path = temp(name);
        let out = Command::new(env!("CARGO_BIN_EXE_ramjet"))
            .args([
                "image",
                "--profile",
                "mixed",
                "--size",
                size,
                "--seed",
                "11",
            ])
            .arg(&path)
            .output()
            .expect("image");
        assert!(out.status.success());
        path
    }

    /// Each line of `out` parsed as JSON; the last one is the query.
    fn json_lines(out: &Output) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    fn statuses(lines: &[serde_json::Value]) -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.get("event").is_some())
            .map(|l| match l["event"].as_str() {
                Some("MIGRATION") => l["data"]["status"].as_str().unwrap_or("?").to_string(),
                Some("MIGRATION_PASS") => format!("pass {}", l["data"]["pass"]),
                other => panic!("unknown event {other:?}"),
            })
            .collect()
    }

    /// `send` maps its image as the guest's memory, private: a live guest writing it during
    /// the migration never changes the file, even a read-only one.
    #[test]
    fn a_live_send_never_writes_its_image() {
        use std::os::unix::fs::PermissionsExt;
        let img = image("live-image", "16M");
        let before = std::fs::read(&img).expect("image");
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        let (receiver, at) = recv("tcp:127.0.0.1:0", "16M", &[]);
        let sent = send(&at, &img, &["--live-dirty-rate", "20000"])
            .output()
            .expect("send");
        let received = receiver.wait_with_output().expect("recv");
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        assert!(received.status.success());
        assert!(
            std::fs::read(&img).expect("image") == before,
            "the image file changed"
        );
        let _ = std::fs::remove_file(&img);
    }

    /// `send --postcopy` of an image (a paused guest): the receiver runs it at once and the
    /// source pushes every page; `--out` equals the image, and both sides show postcopy.
    #[test]
    fn send_postcopy_moves_an_image_after_the_switch() {
        let img = image("postcopy-image", "16M");
        let out_file = temp("postcopy-out");
        let out_arg = out_file.to_str().expect("utf-8 path");
        let (receiver, at, rest) = recv_logged("tcp:127.0.0.1:0", "16M", &["--out", out_arg]);
        let sent = send(&at, &img, &["--postcopy", "--channels", "2"])
            .output()
            .expect("send");
        let received = receiver.wait_with_output().expect("recv");
        let stderr = rest.join().expect("stderr");
        let sent_out = String::from_utf8_lossy(&sent.stdout);
        assert!(
            sent.status.success(),
            "{sent_out}\n{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        assert!(received.status.success(), "{stderr}");
        assert!(sent_out.contains("MIGRATION postcopy-active"), "{sent_out}");
        let recv_out = String::from_utf8_lossy(&received.stdout);
        assert!(recv_out.contains("MIGRATION postcopy-active"), "{recv_out}");
        assert!(stderr.contains("ramjet: postcopy faults: "), "{stderr}");
        assert_eq!(
            std::fs::read(&img).expect("image"),
            std::fs::read(&out_file).expect("out"),
            "--out equals the image"
        );
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&out_file);
    }

    /// Two processes, over TCP and a Unix socket: the received memory equals the image, and
    /// both sides' JSON events are QMP-shaped and follow the control crate's sequence.
    #[test]
    fn send_and_recv_migrate_an_image_between_processes() {
        let img = image("image", "16M");
        for listen in [
            "tcp:127.0.0.1:0".to_string(),
            format!("unix:{}", temp("sock").display()),
        ] {
            let out_file = temp("out");
            let out_arg = out_file.to_str().expect("utf-8 path");
            let (receiver, at) = recv(
                &listen,
                "16M",
                &["--out", out_arg, "--events", "json", "--query"],
            );
            let sent = send(
                &at,
                &img,
                &["--events", "json", "--query", "--channels", "3"],
            )
            .output()
            .expect("send");
            let received = receiver.wait_with_output().expect("recv");
            let sent_stderr = String::from_utf8_lossy(&sent.stderr);
            assert!(sent.status.success(), "{sent_stderr}");
            // Progress is for terminals; a pipe gets none.
            assert!(!sent_stderr.contains("GB/s"), "{sent_stderr}");
            assert!(received.status.success(), "recv over {listen}");
            assert!(
                std::fs::read(&img).expect("image") == std::fs::read(&out_file).expect("out"),
                "the received memory differs from the image over {listen}"
            );
            let (source, destination) = (json_lines(&sent), json_lines(&received));
            assert_eq!(
                statuses(&source),
                ["setup", "active", "device", "pass 1", "completed"]
            );
            assert_eq!(statuses(&destination), ["setup", "active", "completed"]);
            for event in source.iter().filter(|l| l.get("event").is_some()) {
                assert!(event["timestamp"]["seconds"].as_u64().is_some(), "{event}");
                assert!(
                    event["timestamp"]["microseconds"].as_u64().is_some(),
                    "{event}"
                );
            }
            let query = source.last().expect("query");
            assert_eq!(query["status"], "completed");
            assert_eq!(query["ram"]["total"], 16 << 20);
            let _ = std::fs::remove_file(&out_file);
        }
        let _ = std::fs::remove_file(&img);
    }

    /// On one host, over a Unix socket: `send --share` hands the image's file over (no page
    /// copied) and `recv --out` writes what it maps; a private image with `--same-host on`
    /// fails before anything is sent, saying why; and a receiver with `--same-host on` refuses
    /// a sender that copies. Without `on`, a private image is copied with a line saying why.
    #[test]
    fn send_share_hands_an_image_over_on_one_host() {
        let img = image("shared-image", "16M");
        let out_file = temp("shared-out");
        let out_arg = out_file.to_str().expect("utf-8 path");
        let listen = format!("unix:{}", temp("shared-sock").display());
        let (receiver, at, rest) = recv_logged(&listen, "16M", &["--out", out_arg]);
        let sent = send(&at, &img, &["--share", "--same-host"])
            .output()
            .expect("send");
        let received = receiver.wait_with_output().expect("recv");
        let (sent_stderr, received_stderr) = (
            String::from_utf8_lossy(&sent.stderr).into_owned(),
            rest.join().expect("stderr"),
        );
        assert!(sent.status.success(), "{sent_stderr}");
        assert!(received.status.success(), "{received_stderr}");
        assert!(
            sent_stderr.contains("handed over by file descriptor (same host): no page was copied"),
            "{sent_stderr}"
        );
        assert!(
            received_stderr.contains("handed the guest's memory over by file descriptor"),
            "{received_stderr}"
        );
        assert!(
            std::fs::read(&img).expect("image") == std::fs::read(&out_file).expect("out"),
            "the received memory differs from the image"
        );
        let _ = std::fs::remove_file(&out_file);

        // A private image: `on` fails, `auto` copies and says why.
        let (receiver, at, rest) = recv_logged(&listen, "16M", &[]);
        let sent = send(&at, &img, &["--same-host", "on"])
            .output()
            .expect("send");
        let sent_stderr = String::from_utf8_lossy(&sent.stderr);
        assert!(!sent.status.success());
        assert!(
            sent_stderr.contains(
                "same-host is on, and the memory cannot be handed over: region 0 is a private \
                 (copy-on-write) mapping of a file"
            ),
            "{sent_stderr}"
        );
        let received = receiver.wait_with_output().expect("recv");
        assert!(
            !received.status.success(),
            "{}",
            rest.join().expect("stderr")
        );
        let (receiver, at, _rest) = recv_logged(&listen, "16M", &[]);
        let sent = send(&at, &img, &[]).output().expect("send");
        let sent_stderr = String::from_utf8_lossy(&sent.stderr);
        assert!(sent.status.success(), "{sent_stderr}");
        assert!(
            sent_stderr.contains(
                "ramjet: copying the guest memory, not handing it over: region 0 is a private"
            ),
            "{sent_stderr}"
        );
        assert!(receiver.wait_with_output().expect("recv").status.success());

        // A receiver that takes memory only by descriptor refuses a sender that copies.
        let (receiver, at, rest) = recv_logged(&listen, "16M", &["--same-host", "on"]);
        let sent = send(&at, &img, &[]).output().expect("send");
        let sent_stderr = String::from_utf8_lossy(&sent.stderr);
        assert!(!sent.status.success());
        assert!(
            sent_stderr.contains("takes the guest's memory only by descriptor"),
            "{sent_stderr}"
        );
        let received = receiver.wait_with_output().expect("recv");
        let received_stderr = rest.join().expect("stderr");
        assert!(!received.status.success());
        assert!(
            received_stderr.contains("takes the guest's memory only by descriptor"),
            "{received_stderr}"
        );
        let _ = std::fs::remove_file(&img);
    }

    /// `send` and `recv` with TLS, from credentials as libvirt keeps them (one directory with
    /// all five files) and as QEMU's two tls-creds-x509 objects are given (each end its own
    /// directory, only its files in it), over TCP (the name checked is the host of `--to`) and
    /// a Unix socket (`--tls-hostname`); and a sender whose subject is not on `--tls-authz` is
    /// refused by name while the receiver waits on for the real one.
    #[test]
    fn send_and_recv_migrate_with_tls() {
        use ramjet_dataplane::testkit::pki::{self, Leaf, Scratch};
        let all = Scratch::new("ramjet-cli-tls").expect("dir");
        let ca = pki::credentials(all.path()).expect("credentials");
        let (server, client) = (
            Scratch::new("ramjet-cli-tls-server").expect("dir"),
            Scratch::new("ramjet-cli-tls-client").expect("dir"),
        );
        for (dir, files) in [
            (
                &server,
                ["ca-cert.pem", "server-cert.pem", "server-key.pem"],
            ),
            (
                &client,
                ["ca-cert.pem", "client-cert.pem", "client-key.pem"],
            ),
        ] {
            for file in files {
                std::fs::copy(all.path().join(file), dir.path().join(file)).expect("copy");
            }
        }
        let intruder = Scratch::new("ramjet-cli-tls-intruder").expect("dir");
        std::fs::copy(
            all.path().join("ca-cert.pem"),
            intruder.path().join("ca-cert.pem"),
        )
        .expect("copy");
        ca.write_leaf(intruder.path(), &Leaf::sender("intruder"))
            .expect("leaf");
        let img = image("tls", "8M");
        let path = |s: &Scratch| s.path().to_str().expect("utf-8").to_owned();
        for (listen, recv_dir, send_dir) in [
            ("tcp:127.0.0.1:0".to_string(), path(&all), path(&all)),
            (
                format!("unix:{}", temp("tls-sock").display()),
                path(&server),
                path(&client),
            ),
        ] {
            let (receiver, at, log) = recv_logged(
                &listen,
                "8M",
                &["--tls-creds", &recv_dir, "--tls-authz", pki::SENDER_SUBJECT],
            );
            let unix = listen.starts_with("unix:");
            let named = |dir: String| {
                let mut args = vec!["--tls-creds".to_owned(), dir];
                if unix {
                    args.extend(["--tls-hostname".to_owned(), "localhost".to_owned()]);
                }
                args
            };
            let refused_args = named(path(&intruder));
            let refused_args: Vec<&str> = refused_args.iter().map(String::as_str).collect();
            let refused = send(&at, &img, &refused_args).output().expect("send");
            let refused_stderr = String::from_utf8_lossy(&refused.stderr);
            assert!(!refused.status.success(), "{refused_stderr}");
            assert!(
                refused_stderr.contains("O=ramjet,CN=intruder is not on the allow-list"),
                "{refused_stderr}"
            );
            let real_args = named(send_dir);
            let real_args: Vec<&str> = real_args.iter().map(String::as_str).collect();
            let sent = send(&at, &img, &real_args).output().expect("send");
            let received = receiver.wait_with_output().expect("recv");
            let (sent_stderr, received_stderr) = (
                String::from_utf8_lossy(&sent.stderr),
                log.join().expect("recv's stderr"),
            );
            assert!(sent.status.success(), "{listen}: {sent_stderr}");
            assert!(received.status.success(), "{listen}: {received_stderr}");
            assert!(
                sent_stderr.contains("every channel was encrypted: TLS 1.3, TLS13_"),
                "{sent_stderr}"
            );
            assert!(
                received_stderr
                    .contains("mutually authenticated (sender O=ramjet,CN=ramjet-sender)")
                    && received_stderr.contains("refused a connection from"),
                "{received_stderr}"
            );
        }
        let _ = std::fs::remove_file(&img);
    }

    /// A receiver that is not there: a failed migration, a clear error, a non-zero exit.
    #[test]
    fn a_receiver_that_is_not_listening_fails_the_migration() {
        let img = image("lonely", "1M");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = format!("tcp:{}", listener.local_addr().expect("addr"));
        drop(listener);
        let out = send(&at, &img, &["--events", "json"])
            .output()
            .expect("send");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("cannot connect to tcp:127.0.0.1:"),
            "{stderr}"
        );
        assert_eq!(statuses(&json_lines(&out)), ["setup", "failed"]);
        let _ = std::fs::remove_file(&img);
    }

    /// Ctrl-C on a receiver still waiting for its sender: cancelled, and it exits non-zero.
    #[test]
    fn an_interrupted_receiver_ends_cancelled() {
        let (receiver, _) = recv("tcp:127.0.0.1:0", "1M", &["--events", "json"]);
        std::thread::sleep(Duration::from_millis(200));
        let pid = i32::try_from(receiver.id()).expect("pid");
        // SAFETY: kill only sends a signal to the child we started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let received = receiver.wait_with_output().expect("recv");
        assert!(!received.status.success());
        assert_eq!(
            statuses(&json_lines(&received)),
            ["setup", "cancelling", "cancelled"]
        );
    }

    /// Ctrl-C during a send: the migration ends cancelled, both processes exit non-zero, and
    /// nothing is left running.
    #[test]
    fn an_interrupted_send_ends_cancelled() {
        let img = image("slow", "64M");
        let (receiver, at) = recv("tcp:127.0.0.1:0", "64M", &["--events", "json"]);
        // 64 MiB at 8 MB/s: eight seconds, interrupted long before.
        let sender = send(&at, &img, &["--events", "json", "--max-bandwidth", "8M/s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("send");
        std::thread::sleep(Duration::from_millis(700));
        let pid = i32::try_from(sender.id()).expect("pid");
        // SAFETY: kill only sends a signal to the child we started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let sent = sender.wait_with_output().expect("send");
        let received = receiver.wait_with_output().expect("recv");
        assert!(!sent.status.success(), "a cancel is not a success");
        assert!(!received.status.success());
        let source = statuses(&json_lines(&sent));
        assert_eq!(
            source.last().map(String::as_str),
            Some("cancelled"),
            "{source:?}"
        );
        assert!(source.contains(&"cancelling".to_string()), "{source:?}");
        let stderr = String::from_utf8_lossy(&sent.stderr);
        assert!(stderr.contains("cancelled"), "{stderr}");
        let _ = std::fs::remove_file(&img);
    }

    /// A relay loses a handover message; the two processes never both claim the guest, and
    /// neither drops it. `ramjet send` exits 0 once it handed the guest over (it must not
    /// resume it) and 1 when it keeps it; `ramjet recv` exits 0 when the guest may run there,
    /// 1 when it discards its copy, and 3 when it keeps a complete copy in doubt.
    #[test]
    fn a_lost_handover_message_never_runs_the_guest_twice() {
        use ramjet_dataplane::internals::wire::FrameKind;
        use ramjet_dataplane::testkit::relay::{Fault, How, relay};
        let img = image("handover", "4M");
        let cases = [
            // The last message back (decided) dropped: the destination runs; the source
            // handed over and says it was never acknowledged.
            (FrameKind::Decided, How::Stall, true, 0, 0),
            // Ready dropped: the source keeps the guest; the receiver hears its error and
            // discards.
            (FrameKind::Ready, How::Stall, true, 1, 1),
            // Ready cut with no way back: the source keeps the guest; the receiver keeps its
            // copy in doubt.
            (FrameKind::Ready, How::Cut, false, 1, 3),
            // Go cut with no way back: the source handed over; the receiver keeps its copy in
            // doubt, the only one.
            (FrameKind::Decision, How::Cut, false, 0, 3),
        ];
        for (kind, how, reconnect, send_code, recv_code) in cases {
            let what = format!("{kind:?} {how:?} reconnect {reconnect}");
            let out_file = temp("handover-out");
            let _ = std::fs::remove_file(&out_file);
            let out_arg = out_file.to_str().expect("utf-8 path");
            let (receiver, at, log) = recv_logged(
                "tcp:127.0.0.1:0",
                "4M",
                &["--out", out_arg, "--timeout", "1", "--in-doubt-wait", "3"],
            );
            let at = at.parse().expect("endpoint");
            let fault = Fault {
                kind,
                how,
                reconnect,
            };
            let through = relay(&at, fault).expect("relay").to_string();
            let sent = send(
                &through,
                &img,
                &["--timeout", "1", "--decision-timeout", "2"],
            )
            .output()
            .expect("send");
            let received = receiver.wait_with_output().expect("recv");
            let sent_stderr = String::from_utf8_lossy(&sent.stderr);
            let received_stderr = log.join().expect("recv's stderr");
            let codes = (sent.status.code(), received.status.code());
            assert_eq!(
                codes,
                (Some(send_code), Some(recv_code)),
                "{what}: send said {sent_stderr}; recv said {received_stderr}"
            );
            // Never both: a source that keeps the guest and a destination that runs it.
            assert_ne!(codes, (Some(1), Some(0)), "{what}");
            if recv_code != 1 {
                assert!(
                    std::fs::read(&img).expect("image") == std::fs::read(&out_file).expect("out"),
                    "{what}: the kept copy differs from the image"
                );
            }
            if recv_code == 3 {
                assert!(
                    received_stderr.contains("in doubt: complete copy kept"),
                    "{what}: {received_stderr}"
                );
            }
            if (send_code, recv_code) == (0, 0) {
                assert!(
                    sent_stderr.contains("never acknowledged"),
                    "{what}: {sent_stderr}"
                );
            }
            let _ = std::fs::remove_file(&out_file);
        }
        let _ = std::fs::remove_file(&img);
    }

    /// Strangers reach `ramjet recv` before its sender: one connects and closes, one sends
    /// garbage, one speaks HTTP. Each is dropped with a line naming it and why, and the real
    /// migration then completes byte-identical.
    #[test]
    fn strays_before_the_sender_do_not_end_the_migration() {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        let img = image("strays", "4M");
        let out_file = temp("strays-out");
        let out_arg = out_file.to_str().expect("utf-8 path");
        let (receiver, at, log) = recv_logged("tcp:127.0.0.1:0", "4M", &["--out", out_arg]);
        let addr = at.strip_prefix("tcp:").expect("a tcp endpoint");
        let strays: [&[u8]; 3] = [
            b"",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 random garbage",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ];
        let mut peers = Vec::new();
        for bytes in strays {
            let mut stray = TcpStream::connect(addr).expect("connect a stray");
            peers.push(stray.local_addr().expect("addr").to_string());
            stray.write_all(bytes).expect("stray bytes");
            stray.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut answer = Vec::new();
            let _ = stray.read_to_end(&mut answer);
        }
        let sent = send(&at, &img, &[]).output().expect("send");
        let received = receiver.wait_with_output().expect("recv");
        let log = log.join().expect("recv's stderr");
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        assert!(received.status.success(), "{log}");
        assert!(
            std::fs::read(&img).expect("image") == std::fs::read(&out_file).expect("out"),
            "the received memory differs from the image"
        );
        for peer in &peers {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(peer.as_str())).collect();
            assert_eq!(lines.len(), 1, "one line for {peer}: {log}");
            assert!(lines[0].contains("refused a connection"), "{log}");
        }
        assert!(log.contains("bad magic"), "{log}");
        let _ = std::fs::remove_file(&out_file);
        let _ = std::fs::remove_file(&img);
    }

    /// The go is lost with no way back: the source handed over, the receiver is in doubt, and
    /// the operator, seeing that `ramjet send` handed over, tells `ramjet recv` on stdin to run
    /// the guest (`continue`). Lines before the doubt are ignored. The destination's statuses
    /// show the doubt as `pre-switchover`, never `failed`, then `completed`.
    #[test]
    fn an_operator_resolves_the_doubt_on_stdin() {
        use ramjet_dataplane::internals::wire::FrameKind;
        use ramjet_dataplane::testkit::relay::{Fault, How, relay};
        use std::io::Write;
        let img = image("operator", "4M");
        let (mut receiver, at, log) = recv_with(
            "tcp:127.0.0.1:0",
            "4M",
            &[
                "--timeout",
                "1",
                "--in-doubt-wait",
                "20",
                "--operator-stdin",
                "--events",
                "json",
            ],
            Stdio::piped(),
        );
        let fault = Fault {
            kind: FrameKind::Decision,
            how: How::Cut,
            reconnect: false,
        };
        let through = relay(&at.parse().expect("endpoint"), fault)
            .expect("relay")
            .to_string();
        let sent = send(
            &through,
            &img,
            &["--timeout", "1", "--decision-timeout", "1"],
        )
        .output()
        .expect("send");
        assert!(sent.status.success(), "the source handed over");
        let mut stdin = receiver.stdin.take().expect("stdin");
        let operator = std::thread::spawn(move || {
            while stdin.write_all(b"continue\n").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let received = receiver.wait_with_output().expect("recv");
        let _ = operator.join();
        let log = log.join().expect("recv's stderr");
        assert_eq!(received.status.code(), Some(0), "{log}");
        assert_eq!(
            statuses(&json_lines(&received)),
            ["setup", "active", "pre-switchover", "completed"],
            "{log}"
        );
        assert!(log.contains("completed: the operator said"), "{log}");
        let _ = std::fs::remove_file(&img);
    }
}

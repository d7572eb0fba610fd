//! TLS driven over QMP as libvirt drives QEMU's: `object-add` of a `tls-creds-x509` (and an
//! `authz-simple` on the destination), named in `migrate-set-parameters`' `tls-creds`,
//! `tls-hostname` and `tls-authz`. Throwaway credentials come from the testkit, which Python
//! cannot make, so these cases are here rather than in `tests/python/`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ramjet_dataplane::testkit::pki::{self, SENDER_SUBJECT, Scratch};
use serde_json::{Value, json};

/// A raw QMP connection, negotiated, with the `events` capability on.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, child: &mut Child) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(path) {
                break stream;
            }
            assert!(
                child.try_wait().ok().flatten().is_none(),
                "ramjet exited before serving QMP"
            );
            assert!(Instant::now() < deadline, "no QMP on {}", path.display());
            std::thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        assert!(qmp.line().get("QMP").is_some());
        assert_eq!(qmp.ok("qmp_capabilities", &json!({})), json!({}));
        let events = json!({"capabilities": [{"capability": "events", "state": true}]});
        qmp.ok("migrate-set-capabilities", &events);
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("a QMP line");
        assert!(n > 0, "QMP closed");
        serde_json::from_str(&line).expect("JSON from QMP")
    }

    /// Runs a command; its reply (events seen meanwhile are kept).
    fn execute(&mut self, name: &str, arguments: &Value) -> Value {
        // One write: the server runs a command as soon as its object closes, so after `quit`
        // a second write (the newline) could find the stream closed.
        let cmd = json!({"execute": name, "arguments": arguments});
        self.writer
            .write_all(format!("{cmd}\n").as_bytes())
            .unwrap();
        loop {
            let msg = self.line();
            if msg.get("event").is_some() {
                self.events.push(msg);
            } else {
                return msg;
            }
        }
    }

    fn ok(&mut self, name: &str, arguments: &Value) -> Value {
        let reply = self.execute(name, arguments);
        reply
            .get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{name} {arguments}: {reply}"))
    }

    /// Waits for a MIGRATION event with a terminal status; returns it.
    fn end(&mut self) -> String {
        let mut seen = self.events.drain(..).collect::<Vec<_>>().into_iter();
        loop {
            let event = seen.next().unwrap_or_else(|| self.line());
            if event["event"] == "MIGRATION" {
                let status = event["data"]["status"].as_str().unwrap_or("").to_owned();
                if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
                    return status;
                }
            }
        }
    }
}

struct Side {
    child: Child,
    qmp: Qmp,
    log: PathBuf,
}

impl Side {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Side {
        let sock = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ramjet"))
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", sock.display()))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run ramjet");
        let qmp = Qmp::connect(&sock, &mut child);
        Side { child, qmp, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Quits; returns everything the process printed.
    fn quit(mut self) -> String {
        let reply = self.qmp.execute("quit", &json!({}));
        assert_eq!(reply, json!({"return": {}}), "{}", self.log());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}", self.log());
        self.log()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two processes with their credentials, the destination allowing `subject`.
fn pair(dir: &Path, subject: &str) -> (Side, Side, String, PathBuf, PathBuf) {
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    pki::credentials(&creds).unwrap();
    let image = dir.join("guest.img");
    let made = Command::new(env!("CARGO_BIN_EXE_ramjet"))
        .args(["image", "--size", "8M"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = dir.join("received.img");
    let out_arg = out.to_string_lossy().into_owned();
    let image_arg = image.to_string_lossy().into_owned();
    let mut dst = Side::start(dir, "dst", &["recv", "--memory", "8M", "--out", &out_arg]);
    let mut src = Side::start(dir, "src", &["send", "--image", &image_arg]);
    let dir_arg = creds.to_string_lossy().into_owned();
    dst.qmp.ok(
        "object-add",
        &json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": dir_arg,
               "endpoint": "server", "verify-peer": true}),
    );
    dst.qmp.ok(
        "object-add",
        &json!({"qom-type": "authz-simple", "id": "authz0", "identity": subject}),
    );
    dst.qmp.ok(
        "migrate-set-parameters",
        &json!({"tls-creds": "tls0", "tls-authz": "authz0"}),
    );
    src.qmp.ok(
        "object-add",
        &json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": dir_arg,
               "endpoint": "client"}),
    );
    src.qmp.ok(
        "migrate-set-parameters",
        &json!({"tls-creds": "tls0", "tls-hostname": "localhost"}),
    );
    let uri = format!("unix:{}", dir.join("migration.sock").display());
    dst.qmp.ok("migrate-incoming", &json!({"uri": uri}));
    (dst, src, uri, image, out)
}

/// The cases run one after the other: each starts two processes of its own.
#[test]
fn tls_over_qmp() {
    tls_objects_made_over_qmp_encrypt_the_migration();
    a_sender_the_authz_does_not_allow_is_refused();
}

fn tls_objects_made_over_qmp_encrypt_the_migration() {
    let dir = Scratch::new("ramjet-qmp-tls").unwrap();
    let (mut dst, mut src, uri, image, out) = pair(dir.path(), SENDER_SUBJECT);
    src.qmp.ok("migrate", &json!({"uri": uri}));
    assert_eq!(src.qmp.end(), "completed", "{}", src.log());
    assert_eq!(dst.qmp.end(), "completed", "{}", dst.log());
    let params = src.qmp.ok("query-migrate-parameters", &json!({}));
    assert_eq!(params["tls-creds"], "tls0");
    assert_eq!(std::fs::read(&image).unwrap(), std::fs::read(&out).unwrap());
    // Credentials in use cannot go.
    let reply = src.qmp.execute("object-del", &json!({"id": "tls0"}));
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    src.quit();
    let log = dst.quit();
    assert!(log.contains("every channel was encrypted"), "{log}");
}

fn a_sender_the_authz_does_not_allow_is_refused() {
    let dir = Scratch::new("ramjet-qmp-tls-authz").unwrap();
    let (mut dst, mut src, uri, _, _) = pair(dir.path(), "O=ramjet,CN=someone-else");
    src.qmp.ok("migrate", &json!({"uri": uri}));
    assert_eq!(src.qmp.end(), "failed", "{}", src.log());
    let info = src.qmp.ok("query-migrate", &json!({}));
    assert!(
        info["error-desc"].as_str().is_some_and(|e| !e.is_empty()),
        "{info}"
    );
    // The destination refused a stranger and goes on waiting for its real sender, until
    // management cancels.
    let status = dst.qmp.ok("query-migrate", &json!({}));
    assert_eq!(status["status"], "setup", "{status}");
    src.quit();
    dst.qmp.ok("migrate_cancel", &json!({}));
    assert_eq!(dst.qmp.end(), "cancelled", "{}", dst.log());
    let log = dst.log();
    assert!(
        log.contains("not allowed") || log.contains("authz") || log.contains("someone"),
        "{log}"
    );
}

//! The QMP socket: one client at a time, as a QEMU `-qmp` chardev serves them (a second client
//! is accepted by the kernel and gets its greeting once the first has gone), commands read and
//! answered in order, and events sent to the client once it negotiated capabilities.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use ramjet_control::Timestamp;
use serde_json::{Map, Value, json};

use super::protocol::{self, Outcome, Piece, QmpError, Reply, Splitter};

/// Where the monitor listens: `unix:PATH`, or `tcp:[HOST]:PORT` (on 127.0.0.1 when no host
/// is given: the monitor controls the guest, so it is not on the network unless asked). QEMU's
/// chardev options `,server=on`, `,wait=off` (and `,server`, `,nowait`) are accepted and
/// change nothing: the monitor is always a server that does not wait for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let main = parts.next().unwrap_or_default();
        for option in parts {
            if !matches!(option, "server" | "server=on" | "wait=off" | "nowait") {
                return Err(format!(
                    "unknown option {option:?} in {s:?} (the monitor is always a server that \
                     does not wait: server=on,wait=off)"
                ));
            }
        }
        if let Some(path) = main.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = main.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').unwrap_or(("", rest));
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let host = if host.is_empty() { "127.0.0.1" } else { host };
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{port:?} in {s:?} is not a port"))?;
            let ip = host
                .parse()
                .map_err(|_| format!("{host:?} in {s:?} is not an IP address"))?;
            return Ok(Address::Tcp(SocketAddr::new(ip, port)));
        }
        Err(format!(
            "{s:?} must be unix:PATH or tcp:[HOST]:PORT (HOST is 127.0.0.1 if left out)"
        ))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// The commands of one kind of monitor (the source's, the destination's); the server itself
/// has `qmp_capabilities`, `query-version`, `query-commands` and `quit`.
pub trait Commands: Send + Sync + 'static {
    /// The names of the commands [`execute`](Commands::execute) knows, for `query-commands`.
    fn names(&self) -> Vec<&'static str>;

    /// Runs command `name`; `None` if there is no such command.
    fn execute(&self, name: &str, arguments: Map<String, Value>) -> Option<Outcome>;
}

/// Events queued for a client that does not read them: beyond this it is dropped (QEMU's
/// monitor would buffer without end).
const QUEUE: usize = 4096;

/// How long a write to a client may block before the client is taken for gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends events to the client, from any thread; clones share the server.
#[derive(Clone)]
pub struct Broadcast(Arc<Shared>);

struct Shared {
    /// The client now served, once it negotiated capabilities (events go only to such).
    client: Mutex<Option<SyncSender<String>>>,
    /// The `events` capability: `MIGRATION` and `MIGRATION_PASS` are sent only with it on.
    migration_events: AtomicBool,
    /// A client is being served: from its accept until what was queued for it is written.
    serving: AtomicBool,
    /// Lines queued for the client and not yet written.
    pending: AtomicUsize,
    quit: Mutex<bool>,
    quitting: Condvar,
}

impl Broadcast {
    /// Sends event `name` with `data` (a JSON object) now, stamped with the time.
    pub fn event(&self, name: &str, data: &Value) {
        let stamp = Timestamp::from(SystemTime::now());
        let line = json!({"timestamp": stamp, "event": name, "data": data});
        self.send_line(line.to_string());
    }

    /// Turns the `events` capability on or off.
    pub fn set_migration_events(&self, on: bool) {
        self.0.migration_events.store(on, Ordering::Relaxed);
    }

    /// Sends a migration event (the control machine's), if the `events` capability is on.
    pub fn migration_event(&self, event: &ramjet_control::Event) {
        if self.0.migration_events.load(Ordering::Relaxed) {
            self.send_line(serde_json::to_string(event).unwrap_or_default());
        }
    }

    /// Sends a serialized event, if a client is listening.
    fn send_line(&self, line: String) {
        let mut client = self.0.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = client.as_ref() {
            self.0.pending.fetch_add(1, Ordering::SeqCst);
            let sent = tx.try_send(line);
            if sent.is_err() {
                self.0.pending.fetch_sub(1, Ordering::SeqCst);
            }
            match sent {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    eprintln!(
                        "ramjet: the QMP client reads nothing ({QUEUE} lines queued): no more \
                         events are sent to it until its next command"
                    );
                    *client = None;
                }
                Err(TrySendError::Disconnected(_)) => *client = None,
            }
        }
    }

    /// Asks the process to quit (`quit`, or a signal).
    pub fn quit(&self) {
        *self.0.quit.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0.quitting.notify_all();
    }

    /// Waits until [`quit`](Broadcast::quit).
    pub fn wait_quit(&self) {
        let mut quit = self.0.quit.lock().unwrap_or_else(PoisonError::into_inner);
        while !*quit {
            quit = self
                .0
                .quitting
                .wait(quit)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

enum Socket {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(Some(t)),
            Conn::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening monitor.
pub struct Server {
    socket: Socket,
    address: Address,
    broadcast: Broadcast,
}

impl Server {
    /// Listens on `address` (a stale Unix socket file there is replaced, as QEMU does).
    pub fn bind(address: &Address) -> anyhow::Result<Server> {
        let socket = match address {
            Address::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)
                        .with_context(|| format!("cannot replace {}", path.display()))?;
                }
                Socket::Unix(
                    UnixListener::bind(path)
                        .with_context(|| format!("cannot listen on {address}"))?,
                )
            }
            Address::Tcp(addr) => Socket::Tcp(
                TcpListener::bind(addr).with_context(|| format!("cannot listen on {address}"))?,
            ),
        };
        let address = match (&socket, address) {
            (Socket::Tcp(l), _) => Address::Tcp(l.local_addr()?),
            (_, a) => a.clone(),
        };
        Ok(Server {
            socket,
            address,
            broadcast: Broadcast(Arc::new(Shared {
                client: Mutex::new(None),
                migration_events: AtomicBool::new(false),
                serving: AtomicBool::new(false),
                pending: AtomicUsize::new(0),
                quit: Mutex::new(false),
                quitting: Condvar::new(),
            })),
        })
    }

    pub fn broadcast(&self) -> Broadcast {
        self.broadcast.clone()
    }

    /// Serves clients, one after another, on a thread of its own, until the process ends.
    pub fn serve(self, commands: Arc<dyn Commands>) -> anyhow::Result<Served> {
        let broadcast = self.broadcast.clone();
        let address = self.address.clone();
        thread::Builder::new()
            .name("ramjet-qmp".into())
            .spawn(move || self.accept_loop(commands.as_ref()))
            .context("cannot start the QMP thread")?;
        Ok(Served { broadcast, address })
    }

    fn accept_loop(&self, commands: &dyn Commands) {
        loop {
            let conn = match &self.socket {
                Socket::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
                Socket::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
            };
            match conn {
                Ok(conn) => {
                    self.broadcast.0.serving.store(true, Ordering::SeqCst);
                    if let Err(e) = self.serve_client(conn, commands) {
                        eprintln!("ramjet: QMP client: {e}");
                    }
                    self.broadcast.0.serving.store(false, Ordering::SeqCst);
                }
                Err(e) => {
                    eprintln!("ramjet: QMP accept failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// One client, until it closes: the greeting, then command after command. Events reach it
    /// once it left capabilities negotiation.
    fn serve_client(&self, mut conn: Conn, commands: &dyn Commands) -> io::Result<()> {
        conn.set_write_timeout(WRITE_TIMEOUT)?;
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let writer = spawn_writer(conn.try_clone()?, rx, Arc::clone(&self.broadcast.0))?;
        // A closed writer means the client is gone; the read below then ends too.
        let pending = &self.broadcast.0.pending;
        let send = |line: String| {
            pending.fetch_add(1, Ordering::SeqCst);
            if tx.send(line).is_err() {
                pending.fetch_sub(1, Ordering::SeqCst);
            }
        };
        send(protocol::greeting().to_string());
        let mut negotiated = false;
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; 64 << 10];
        let mut pieces = Vec::new();
        'client: loop {
            let n = match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            splitter.push(&buf[..n], &mut pieces);
            for piece in pieces.drain(..) {
                let reply = match piece {
                    Piece::TooLarge => Reply::new(
                        Err(QmpError::generic(format!(
                            "JSON parse error, input larger than {} bytes",
                            protocol::MAX_INPUT
                        ))),
                        None,
                    ),
                    Piece::Value(text) => match protocol::parse_request(&text) {
                        Err((error, id)) => Reply::new(Err(error), id),
                        Ok(request) => {
                            let (outcome, quit) = self.execute(&request, &mut negotiated, commands);
                            if negotiated && quit.is_none() {
                                // From the reply to qmp_capabilities on (and again after
                                // events were dropped for a client that did not read),
                                // events go to this client, after the reply.
                                send(line(&Reply::new(outcome, request.id)));
                                self.broadcast
                                    .0
                                    .client
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .get_or_insert_with(|| tx.clone());
                                continue;
                            }
                            let reply = Reply::new(outcome, request.id);
                            if quit.is_some() {
                                eprintln!("ramjet: quit, as the QMP client asked");
                                send(line(&reply));
                                self.broadcast.event(
                                    "SHUTDOWN",
                                    &json!({"guest": false, "reason": "host-qmp-quit"}),
                                );
                                self.broadcast.quit();
                                break 'client;
                            }
                            reply
                        }
                    },
                };
                send(line(&reply));
            }
        }
        // The client is gone (or quit): stop sending to it, and let its writer drain.
        *self
            .broadcast
            .0
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        drop(tx);
        let _ = writer.join();
        conn.shutdown();
        Ok(())
    }

    /// One command: the server's own, or the monitor's. Returns the outcome and, for `quit`,
    /// `Some(())`.
    fn execute(
        &self,
        request: &protocol::Request,
        negotiated: &mut bool,
        commands: &dyn Commands,
    ) -> (Outcome, Option<()>) {
        let name = request.name.as_str();
        let arguments = request.arguments.clone();
        if !*negotiated {
            if name != "qmp_capabilities" {
                return (
                    Err(QmpError::not_found(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )),
                    None,
                );
            }
            return match protocol::arguments::<Negotiate>(arguments) {
                Ok(Negotiate { enable }) => match enable.first() {
                    Some(capability) => (
                        Err(QmpError::generic(format!(
                            "Capability {capability} not available"
                        ))),
                        None,
                    ),
                    None => {
                        *negotiated = true;
                        (Ok(json!({})), None)
                    }
                },
                Err(e) => (Err(e), None),
            };
        }
        let outcome = match name {
            "qmp_capabilities" => Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-version" => no_arguments(&arguments).map(|()| protocol::version()),
            "query-commands" => no_arguments(&arguments).map(|()| {
                let mut names = vec![
                    "qmp_capabilities",
                    "query-version",
                    "query-commands",
                    "quit",
                ];
                names.extend(commands.names());
                Value::Array(names.into_iter().map(|n| json!({"name": n})).collect())
            }),
            "quit" => {
                return match no_arguments(&arguments) {
                    Ok(()) => (Ok(json!({})), Some(())),
                    Err(e) => (Err(e), None),
                };
            }
            _ => commands.execute(name, arguments).unwrap_or_else(|| {
                Err(QmpError::not_found(format!(
                    "The command {name} has not been found"
                )))
            }),
        };
        (outcome, None)
    }
}

/// A server serving: what the process keeps of it.
pub struct Served {
    pub broadcast: Broadcast,
    pub address: Address,
}

impl Served {
    /// Waits for `quit`, then removes a Unix socket's file (as QEMU does on exit).
    pub fn wait_quit(&self) {
        self.broadcast.wait_quit();
        // Let the client's writer hand the last reply and event (quit's, or a failed
        // migration's) to the kernel; a client that reads nothing gets a few seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline
            && self.broadcast.0.serving.load(Ordering::SeqCst)
            && self.broadcast.0.pending.load(Ordering::SeqCst) > 0
        {
            thread::sleep(Duration::from_millis(5));
        }
        if let Address::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `qmp_capabilities`' arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Negotiate {
    #[serde(default)]
    enable: Vec<String>,
}

/// Refuses arguments to a command that takes none.
pub fn no_arguments(arguments: &Map<String, Value>) -> Result<(), QmpError> {
    match arguments.keys().next() {
        None => Ok(()),
        Some(name) => Err(QmpError::generic(format!(
            "Parameter '{name}' is unexpected"
        ))),
    }
}

/// The thread that writes what is queued for one client, a line each.
/// Each line is counted in `shared.pending` from before it is queued until it is written (or
/// dropped, the client gone).
fn spawn_writer(
    mut conn: Conn,
    rx: mpsc::Receiver<String>,
    shared: Arc<Shared>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("ramjet-qmp-out".into())
        .spawn(move || {
            let mut gone = false;
            for mut line in rx {
                line.push_str("\r\n");
                // Gone, or not reading: no more is sent, and the reader sees it closed.
                if !gone && conn.write_all(line.as_bytes()).is_err() {
                    conn.shutdown();
                    gone = true;
                }
                shared.pending.fetch_sub(1, Ordering::SeqCst);
            }
        })
}

/// A reply as one line of JSON.
fn line(reply: &Reply) -> String {
    serde_json::to_string(reply).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_qemu_writes_them() {
        assert_eq!(
            "unix:/tmp/q.sock".parse(),
            Ok(Address::Unix("/tmp/q.sock".into()))
        );
        assert_eq!(
            "unix:/tmp/q.sock,server=on,wait=off".parse(),
            Ok(Address::Unix("/tmp/q.sock".into()))
        );
        assert_eq!(
            "tcp::4444".parse(),
            Ok(Address::Tcp("127.0.0.1:4444".parse().unwrap()))
        );
        assert_eq!(
            "tcp:4444".parse(),
            Ok(Address::Tcp("127.0.0.1:4444".parse().unwrap()))
        );
        assert_eq!(
            "tcp:[::1]:5".parse(),
            Ok(Address::Tcp("[::1]:5".parse().unwrap()))
        );
        for bad in [
            "unix:",
            "tcp:x:1",
            "tcp::99999",
            "stdio",
            "unix:/x,reconnect=1",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }
}

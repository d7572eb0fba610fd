//! `ramjet recv`: the destination, like QEMU's `-incoming`.
//!
//! Its exit status says who may run the guest: 0 completed (the source handed the guest over:
//! run it here), 1 failed (discard: the source keeps the guest), 3 in doubt (a complete,
//! verified copy is kept in `--out`, but the source's decision never arrived: run it only if
//! the source reports that its migration completed). 2 is a usage error.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ramjet_control::{Options, Side, Trigger};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::{Endpoint, Listener};
use ramjet_dataplane::{
    Handover, Log, MemoryTransfer, Operator, PostcopyRun, ReceiveOptions, Received, receive,
};

use crate::cli::{
    GuestSize, SameHostArg, TransportKind, parse_endpoint, seconds, tls_server, transport_of,
};
use crate::events::{Events, Format};
use crate::postcopy;
use crate::signals;

/// Receive one migration into fresh guest memory.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to listen: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_parser = parse_endpoint, required_unless_present = "qmp")]
    pub(crate) listen: Option<Endpoint>,
    /// Serve QMP on this socket (unix:PATH, or tcp:HOST:PORT; tcp::PORT listens on
    /// 127.0.0.1) and wait for management's commands, as QEMU with `-incoming defer` does:
    /// `migrate-incoming` starts listening (or --listen, at once). The process stays until
    /// `quit`, or exits 1 when the migration fails (unless migrate-incoming said
    /// "exit-on-error": false).
    #[arg(long, value_name = "ADDRESS")]
    pub(crate) qmp: Option<crate::qmp::Address>,
    /// Guest RAM to receive into (the sender's must match).
    #[arg(long)]
    pub(crate) memory: GuestSize,
    /// Write the received memory to this file, once every page is here (before `completed`
    /// shows). Pages are received into anonymous memory, not into a mapping of the file:
    /// any migration may switch to postcopy, and userfaultfd cannot serve a regular file's
    /// shared mapping; nor is a half-received guest ever left in the file.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Transport; io_uring where the kernel allows it unless given.
    #[arg(long, value_enum)]
    pub(crate) transport: Option<TransportKind>,
    /// How events are printed.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) events: Format,
    /// Print a query-migrate JSON object at the end.
    #[arg(long)]
    pub(crate) query: bool,
    /// Give up if no sender connects within this long: 30s, 500ms, 2m; a bare number is
    /// seconds.
    #[arg(long, value_parser = seconds)]
    pub(crate) accept_timeout: Option<Duration>,
    /// How long to wait for the source's decision when the link breaks after this side said
    /// it holds everything (in doubt), before exiting with status 3 and the copy kept.
    #[arg(long, value_parser = seconds)]
    pub(crate) in_doubt_wait: Option<Duration>,
    /// Limit for each read and write once connected: 30s, 500ms; a bare number is seconds.
    #[arg(long, value_parser = seconds)]
    pub(crate) timeout: Option<Duration>,
    /// While in doubt, take the operator's decision from stdin: a line `continue` (the source
    /// handed over: run the guest here) or `cancel` (the source kept it: discard the copy).
    #[arg(long)]
    pub(crate) operator_stdin: bool,
    /// TLS 1.3 with mutual authentication on every connection, with the credentials in this
    /// directory, in QEMU's tls-creds-x509 layout: ca-cert.pem (the CA that signs the senders'
    /// client certificates), server-cert.pem and server-key.pem (this receiver's). Nothing is
    /// read from a peer before it has proved itself. A directory holding all five files, as
    /// libvirt keeps them for QEMU, works as it is.
    #[arg(long, value_name = "DIR")]
    pub(crate) tls_creds: Option<PathBuf>,
    /// Admit only senders whose client certificate subject is this distinguished name (QEMU's
    /// tls-authz), e.g. "CN=source.example.com,O=Example": in certificate order (as GnuTLS
    /// and QEMU write it) or reversed (RFC 4514); repeat for more.
    #[arg(long = "tls-authz", value_name = "SUBJECT")]
    pub(crate) tls_authz: Vec<String>,
    /// How long a paused postcopy waits for the source to reconnect: 60s, 5m; a bare number is
    /// seconds. (A sender that may switch to postcopy is always accepted: this receiver's
    /// "guest" is its memory, which `--out` writes once every page is here.)
    #[arg(long, value_parser = seconds, default_value = "60")]
    pub(crate) recover_wait: Duration,
    /// Same host: take the sender's memory by file descriptor instead of receiving its pages
    /// (QEMU's cpr-transfer), over a unix: socket. `auto` takes it when offered; `on` refuses a
    /// sender that copies (and then skips faulting in --memory, which the sender's replaces);
    /// `off` always receives the pages.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) same_host: SameHostArg,
}

/// Exit status: in doubt, the complete copy kept.
const IN_DOUBT: u8 = 3;

impl TryFrom<&Args> for ReceiveOptions {
    type Error = anyhow::Error;

    /// The library's options for the flags: the transport probed, a fresh cancel handle, and
    /// the receiver's log lines (connections it refused) on stderr.
    fn try_from(args: &Args) -> anyhow::Result<Self> {
        let defaults = ReceiveOptions::default();
        Ok(ReceiveOptions {
            transport: transport_of(args.transport)?,
            accept_timeout: args.accept_timeout,
            in_doubt_wait: args.in_doubt_wait.unwrap_or(defaults.in_doubt_wait),
            timeout: args.timeout.unwrap_or(defaults.timeout),
            log: Log::new(|line| eprintln!("ramjet: {line}")),
            tls: tls_server(args.tls_creds.as_deref(), &args.tls_authz)?,
            postcopy: Some(postcopy_run()),
            recover_wait: Some(args.recover_wait),
            same_host: args.same_host.into(),
            ..defaults
        })
    }
}

/// This receiver's postcopy start: its "guest" is its memory, so it only says so.
pub(crate) fn postcopy_run() -> PostcopyRun {
    PostcopyRun::new(|_| {
        eprintln!(
            "ramjet: postcopy: the source handed the guest over; the pages it still has follow"
        );
        Ok(())
    })
}

/// Guest RAM of `size`, allocated and faulted in before listening, as a VMM does at start-up.
/// On a terminal, a line says so while it takes (seconds for a large guest here). With
/// `--same-host on` it is only reserved: the sender's memory will take its place.
pub(crate) fn guest_memory(
    size: GuestSize,
    same_host: SameHostArg,
) -> anyhow::Result<Arc<GuestMemory>> {
    let memory = Arc::new(GuestMemory::anonymous(size.bytes()).context("cannot map guest memory")?);
    if same_host != SameHostArg::On {
        let preparing = crate::demo::Preparing::new(size.bytes());
        preparing.step("faulting in the guest's memory");
        memory.prefault().context("cannot fault in guest memory")?;
    }
    Ok(memory)
}

/// How a receive ended, and whether `--out` was written.
pub(crate) struct Landed {
    pub result: Result<Received, ramjet_dataplane::Error>,
    /// Writing `--out` (only once the migration succeeded or ended in doubt).
    pub written: anyhow::Result<()>,
}

/// Receives one migration into `memory` and writes `out` before the final status shows:
/// the data plane's `drained` is held back until then, so that `completed` (or a destination
/// kept in doubt) means the file is there.
pub(crate) fn land(
    listener: &Listener,
    memory: &Arc<GuestMemory>,
    options: &ReceiveOptions,
    events: &Events,
    out: Option<&Path>,
) -> Landed {
    let (sink, drain) = Events::holding_drained(events.recovering_sink());
    let result = receive(listener, Arc::clone(memory), options, sink);
    if let Ok(received) = &result {
        let stats = received
            .stats
            .ram_stats(memory.total_bytes(), received.elapsed);
        events.with(|m| m.set_ram_stats(stats));
        if received.memory == MemoryTransfer::Shared {
            eprintln!(
                "ramjet: the sender handed the guest's memory over by file descriptor (same \
                 host): no page was copied"
            );
        }
    }
    // Whether the guest may run here or not, the copy is complete and verified: keep it.
    let written = match (&result, out) {
        (Ok(_), Some(path)) => {
            write_memory(memory, path).with_context(|| format!("cannot write {}", path.display()))
        }
        _ => Ok(()),
    };
    drain.release(events);
    Landed { result, written }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(address) = &args.qmp {
        return crate::qmp::destination::run(args, address);
    }
    let Some(listen) = &args.listen else {
        anyhow::bail!("--listen is needed unless --qmp is given");
    };
    let options = ReceiveOptions::try_from(args)?;
    let memory = guest_memory(args.memory, args.same_host)?;
    // Ctrl-C is handled from before anyone can know where to connect.
    let control = Options::new().postcopy_ram(true);
    let events = Events::new(Side::Destination, control, args.events, false);
    events.step(Trigger::Migrate);
    let (user, operator) = (events.clone(), options.operator.clone());
    signals::cancel_on_interrupt(options.cancel.clone(), move || {
        // In doubt, Ctrl-C only stops the wait: the copy is kept, and the status stays.
        if !operator.is_in_doubt() {
            user.step(Trigger::Cancel);
        }
    })?;
    if args.operator_stdin {
        decide_from_stdin(&events, &options.operator)?;
    }
    let listener = Listener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("ramjet: listening on {}", listener.endpoint());
    let landed = land(&listener, &memory, &options, &events, args.out.as_deref());
    if args.query {
        println!("{}", serde_json::to_string(&events.query())?);
    }
    Ok(report(landed, args.out.as_deref()))
}

/// Says on stderr how a receive ended; the exit status.
pub(crate) fn report(landed: Landed, out: Option<&Path>) -> ExitCode {
    let received = match landed.result {
        Ok(received) => received,
        Err(e) => {
            if e.is_cancelled() {
                eprintln!("ramjet: the migration was cancelled; nothing is kept");
            } else {
                eprintln!(
                    "ramjet: the migration failed: {}; nothing is kept (the source keeps the \
                     guest)",
                    e.chain()
                );
            }
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = landed.written {
        eprintln!("ramjet: {e:#}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "ramjet: received {} pages in {} rounds ({} bytes of device state)",
        received.stats.pages(),
        received.rounds,
        received.device_state.len()
    );
    if let Some(tls) = &received.tls {
        eprintln!("ramjet: every channel was encrypted: {tls}");
    }
    if let Some(stats) = &received.postcopy {
        eprintln!("ramjet: postcopy: {}", postcopy::stats_line(stats));
        eprintln!(
            "ramjet: postcopy faults: {}",
            postcopy::latency_line(&stats.latency)
        );
    }
    let kept = out.map_or_else(String::new, |p| format!(" in {}", p.display()));
    match received.handover {
        Handover::Go => eprintln!("ramjet: completed: the source handed the guest over"),
        Handover::Operator => {
            eprintln!("ramjet: completed: the operator said the source handed over");
        }
        Handover::InDoubt => {
            eprintln!(
                "ramjet: in doubt: complete copy kept{kept}; the source's decision is unknown: \
                 run the guest here only if the source reports that its migration completed"
            );
            return ExitCode::from(IN_DOUBT);
        }
    }
    ExitCode::SUCCESS
}

/// Reads the operator's `continue` or `cancel` from stdin, acting on it only while in doubt.
fn decide_from_stdin(events: &Events, operator: &Operator) -> anyhow::Result<()> {
    use std::io::BufRead;
    let (events, operator) = (events.clone(), operator.clone());
    std::thread::Builder::new()
        .name("ramjet-operator".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                let trigger = match line.trim() {
                    "continue" => Trigger::Continue,
                    "cancel" => Trigger::Cancel,
                    "" => continue,
                    other => {
                        eprintln!("ramjet: `{other}` is not a decision: continue or cancel");
                        continue;
                    }
                };
                if !operator.is_in_doubt() {
                    eprintln!("ramjet: not in doubt; `{}` is ignored", line.trim());
                    continue;
                }
                events.step(trigger);
                let ruled = match trigger {
                    Trigger::Continue => operator.run_here(),
                    _ => operator.discard(),
                };
                if !ruled {
                    eprintln!(
                        "ramjet: the doubt ended before `{}` took effect",
                        line.trim()
                    );
                }
            }
        })
        .context("cannot start the thread that reads the operator's decision")?;
    Ok(())
}

fn write_memory(memory: &GuestMemory, path: &Path) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(File::create(path)?);
    let mut page = vec![0u8; 1 << 20];
    for (index, region) in memory.regions().iter().enumerate() {
        let len = region.layout().len();
        let mut at = 0;
        while at < len {
            let n = usize::try_from((len - at).min(page.len() as u64)).unwrap_or(page.len());
            memory.read(index, at, &mut page[..n])?;
            file.write_all(&page[..n])?;
            at += n as u64;
        }
    }
    file.flush()?;
    Ok(())
}

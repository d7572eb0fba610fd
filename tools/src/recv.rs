//! `ramjet recv`: the destination, like QEMU's `-incoming`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ramjet_control::{Options, Side, Trigger};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::{Endpoint, Listener};
use ramjet_dataplane::{Log, ReceiveOptions, receive};

use crate::cli::{GuestSize, TransportKind, parse_endpoint, seconds, transport_of};
use crate::events::{Events, Format};
use crate::signals;

/// Receive one migration into fresh guest memory.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to listen: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_parser = parse_endpoint)]
    listen: Endpoint,
    /// Guest RAM to receive into (the sender's must match).
    #[arg(long)]
    memory: GuestSize,
    /// Write the received memory to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Transport; io_uring where the kernel allows it unless given.
    #[arg(long, value_enum)]
    transport: Option<TransportKind>,
    /// How events are printed.
    #[arg(long, value_enum, default_value = "text")]
    events: Format,
    /// Print a query-migrate JSON object at the end.
    #[arg(long)]
    query: bool,
    /// Give up if no sender connects within this long: 30s, 500ms, 2m; a bare number is
    /// seconds.
    #[arg(long, value_parser = seconds)]
    accept_timeout: Option<Duration>,
}

impl TryFrom<&Args> for ReceiveOptions {
    type Error = anyhow::Error;

    /// The library's options for the flags: the transport probed, a fresh cancel handle, and
    /// the receiver's log lines (connections it refused) on stderr.
    fn try_from(args: &Args) -> anyhow::Result<Self> {
        Ok(ReceiveOptions {
            transport: transport_of(args.transport)?,
            accept_timeout: args.accept_timeout,
            log: Log::new(|line| eprintln!("ramjet: {line}")),
            ..ReceiveOptions::default()
        })
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let options = ReceiveOptions::try_from(args)?;
    let bytes = args.memory.bytes();
    // Guest RAM is allocated and faulted in before listening, as a VMM does at start-up.
    let memory = Arc::new(GuestMemory::anonymous(bytes).context("cannot map guest memory")?);
    memory.prefault().context("cannot fault in guest memory")?;
    // Ctrl-C is handled from before anyone can know where to connect.
    let events = Events::new(Side::Destination, Options::new(), args.events, false);
    events.step(Trigger::Migrate);
    let user = events.clone();
    signals::cancel_on_interrupt(options.cancel.clone(), move || user.step(Trigger::Cancel))?;
    let listener = Listener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("ramjet: listening on {}", listener.endpoint());
    let result = receive(&listener, Arc::clone(&memory), &options, events.sink());
    if let Ok(received) = &result {
        let stats = received.stats.ram_stats(bytes, received.elapsed);
        events.with(|m| m.set_ram_stats(stats));
    }
    if args.query {
        println!("{}", serde_json::to_string(&events.query())?);
    }
    let received = match result {
        Ok(received) => received,
        Err(e) => {
            if e.is_cancelled() {
                eprintln!("ramjet: the migration was cancelled");
            } else {
                eprintln!("ramjet: the migration failed: {}", e.chain());
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(path) = &args.out {
        write_memory(&memory, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!(
        "ramjet: received {} pages in {} rounds ({} bytes of device state)",
        received.stats.pages(),
        received.rounds,
        received.device_state.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn write_memory(memory: &GuestMemory, path: &PathBuf) -> anyhow::Result<()> {
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

//! `ramjet`: the command-line front door to ramjet.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;
mod console;
mod demo;
mod events;
mod graph;
mod image;
mod kvm;
mod postcopy;
mod progress;
mod qmp;
mod recv;
mod send;
mod signals;
mod stress;
mod units;

/// ramjet moves guest RAM between hosts for live migration.
#[derive(Debug, Parser)]
#[command(name = "ramjet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate a running guest over loopback, on built-in defaults, and show how it goes.
    Demo(demo::Args),
    /// Print the migration status graph that ramjet emits for one side and profile.
    Graph(graph::Args),
    /// Write a deterministic guest image to a file.
    Image(image::Args),
    /// Receive a migration (like QEMU's -incoming).
    Recv(recv::Args),
    /// Send a guest image to a receiver (like QEMU's migrate).
    Send(send::Args),
    /// Run many migrations with injected faults and check every outcome.
    Stress(stress::Args),
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`ramjet graph | head`) is not a failure.
            if err
                .chain()
                .filter_map(|cause| cause.downcast_ref::<io::Error>())
                .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(io::stderr(), "ramjet: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Graph(args) => graph::run(&args, &mut io::stdout().lock())?,
        Command::Image(args) => image::run(&args)?,
        Command::Demo(args) => demo::run(&args)?,
        Command::Recv(args) => return recv::run(&args),
        Command::Send(args) => return send::run(&args),
        Command::Stress(args) => return stress::run(&args),
    }
    Ok(ExitCode::SUCCESS)
}

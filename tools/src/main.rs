//! `ramjet`: the command-line front door to ramjet.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod graph;

/// ramjet moves guest RAM between hosts for live migration.
#[derive(Debug, Parser)]
#[command(name = "ramjet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the migration status graph that ramjet emits for one side and profile.
    Graph(graph::Args),
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
    }
    Ok(ExitCode::SUCCESS)
}

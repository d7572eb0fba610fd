//! `ramjet graph`: prints the status graph a side emits under a profile.

use std::io::Write;

use anyhow::Context as _;
use clap::ValueEnum;
use ramjet_control::{Graph, Profile, Side};

/// Which graph, and how to print it.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which end of the migration.
    #[arg(long, value_enum, default_value_t = SideArg::Source)]
    side: SideArg,
    /// Which QEMU release's event stream.
    #[arg(long, value_enum, default_value_t = ProfileArg::Qemu10)]
    profile: ProfileArg,
    /// `mermaid` for a stateDiagram-v2, `edges` for one `from -> to: cause` line per edge.
    #[arg(long, value_enum, default_value_t = Format::Mermaid)]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SideArg {
    Source,
    Destination,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileArg {
    #[value(name = "qemu-10")]
    Qemu10,
    #[value(name = "qemu-11")]
    Qemu11,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Mermaid,
    Edges,
}

/// Writes the chosen graph to `out`.
pub fn run(args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    let side = match args.side {
        SideArg::Source => Side::Source,
        SideArg::Destination => Side::Destination,
    };
    let profile = match args.profile {
        ProfileArg::Qemu10 => Profile::Qemu10,
        ProfileArg::Qemu11 => Profile::Qemu11,
    };
    let graph = Graph::new(side, profile);
    let text = match args.format {
        Format::Mermaid => graph.to_mermaid(),
        Format::Edges => graph
            .edges()
            .map(|e| format!("{} -> {}: {}\n", e.from, e.to, e.cause))
            .collect(),
    };
    out.write_all(text.as_bytes())
        .context("cannot write the graph")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn output(argv: &[&str]) -> String {
        let cli = Cli::try_parse_from(argv).unwrap();
        let mut out = Vec::new();
        run(&cli.args, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn prints_the_requested_graph() {
        let edges = output(&[
            "graph",
            "--side",
            "destination",
            "--profile",
            "qemu-11",
            "--format",
            "edges",
        ]);
        assert!(edges.contains("failing -> failed: drained\n"));
        assert!(
            !edges.contains("device"),
            "the destination never shows device:\n{edges}"
        );
        let mermaid = output(&["graph"]);
        assert!(mermaid.starts_with("stateDiagram-v2\n"));
        assert!(mermaid.contains("device --> completed"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = Cli::try_parse_from(["graph", "--profile", "qemu-9"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("--profile") && text.contains("qemu-9"),
            "{text}"
        );
    }
}

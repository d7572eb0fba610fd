//! `ramjet image`: deterministic guest images to migrate.

use std::fs::File;
use std::path::PathBuf;

use anyhow::Context;
use ramjet_dataplane::testkit::image::{self, ImageKind};

use crate::cli::GuestSize;
use crate::units::Bytes;

/// Write a deterministic guest image: the same profile, size and seed give the same bytes.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Content: random, zero, or mixed (per 4 KiB page: 50% zero, 25% text-like, 25% random).
    #[arg(long, default_value = "mixed")]
    profile: ImageKind,
    /// Size, a whole number of 4 KiB pages (512M, 2G, ...).
    #[arg(long)]
    size: GuestSize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The file to write (created or truncated).
    file: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let bytes = args.size.bytes();
    let file = File::create(&args.file)
        .with_context(|| format!("cannot create {}", args.file.display()))?;
    image::write_file(&file, args.profile, args.seed, bytes)
        .with_context(|| format!("cannot write {}", args.file.display()))?;
    eprintln!(
        "wrote {} of {} image (seed {}) to {}",
        Bytes(bytes),
        args.profile,
        args.seed,
        args.file.display()
    );
    Ok(())
}

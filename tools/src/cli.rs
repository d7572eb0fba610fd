//! What the subcommands' flags share: value parsers (endpoints, guest sizes, durations with
//! units), the transport choice, and the flags `send` and `demo` both take, with the step that
//! turns them into the library's options.
//!
//! Parsing has two stages, as in ripgrep: clap checks each value as it reads it (so a bad one
//! is reported with its flag, before anything runs), and each subcommand then turns its checked
//! flags into the library's options in one `TryFrom`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ramjet_dataplane::Compression;
use ramjet_dataplane::memory::PAGE_SIZE;
use ramjet_dataplane::transport::{self, Blocking, Endpoint, Transport, Uring};
use ramjet_dataplane::{LiveOptions, Log, SameHost, SendOptions, StallPolicy};

use crate::events::Format;
use crate::units::{Rate, Size};

/// How bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// io_uring (the default where the kernel allows it).
    Uring,
    /// Blocking sockets.
    Blocking,
}

/// The transport the user asked for; without `--transport`, io_uring where the kernel allows
/// it, else blocking sockets.
pub fn transport_of(kind: Option<TransportKind>) -> anyhow::Result<Arc<dyn Transport>> {
    Ok(match kind {
        None => Arc::new(transport::Auto),
        Some(TransportKind::Blocking) => Arc::new(Blocking),
        Some(TransportKind::Uring) => {
            Uring::probe().context("--transport uring")?;
            Arc::new(Uring::default())
        }
    })
}

/// Whether a migration on one host hands the guest's memory over by descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SameHostArg {
    /// Over a Unix socket, when the memory is shareable and the other side takes it.
    Auto,
    /// Always, or fail saying why not.
    On,
    /// Never: copy every page.
    Off,
}

impl From<SameHostArg> for SameHost {
    fn from(arg: SameHostArg) -> Self {
        match arg {
            SameHostArg::Auto => SameHost::Auto,
            SameHostArg::On => SameHost::On,
            SameHostArg::Off => SameHost::Off,
        }
    }
}

/// `tcp:HOST:PORT` or `unix:PATH`.
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    s.parse()
}

/// Where a sender connects, with the host as written: by default the name a TLS receiver's
/// certificate must be for (QEMU's `tls-hostname` defaults to the URI's host).
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    /// `HOST` of `tcp:HOST:PORT` (without an IPv6 address's brackets); none for `unix:`.
    pub host: Option<String>,
}

pub fn parse_target(s: &str) -> Result<Target, String> {
    let endpoint = parse_endpoint(s)?;
    let host = s
        .strip_prefix("tcp:")
        .and_then(|rest| rest.rsplit_once(':'))
        .map(|(host, _)| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
    Ok(Target { endpoint, host })
}

/// The sender's TLS for `--tls-creds DIR` and `--tls-hostname NAME` (by default the host of
/// `target`): `None` without credentials.
pub fn tls_client(
    creds: Option<&std::path::Path>,
    hostname: Option<&str>,
    target: Option<&Target>,
) -> anyhow::Result<Option<ramjet_dataplane::TlsClient>> {
    use anyhow::Context as _;
    let Some(dir) = creds else {
        if hostname.is_some() {
            anyhow::bail!("--tls-hostname needs --tls-creds");
        }
        return Ok(None);
    };
    let mut tls = ramjet_dataplane::TlsClient::from_dir(dir)
        .with_context(|| format!("--tls-creds {}", dir.display()))?;
    let name = hostname.or_else(|| target.and_then(|t| t.host.as_deref()));
    if let Some(name) = name {
        tls = tls.with_hostname(name).context("--tls-hostname")?;
    } else if target.is_some_and(|t| matches!(t.endpoint, Endpoint::Unix(_))) {
        anyhow::bail!(
            "TLS over a unix: socket needs --tls-hostname, the name the receiver's certificate \
             is for"
        );
    }
    Ok(Some(tls))
}

/// The receiver's TLS for `--tls-creds DIR` and `--tls-authz SUBJECT`s: `None` without
/// credentials.
pub fn tls_server(
    creds: Option<&std::path::Path>,
    authz: &[String],
) -> anyhow::Result<Option<ramjet_dataplane::TlsServer>> {
    use anyhow::Context as _;
    let Some(dir) = creds else {
        if !authz.is_empty() {
            anyhow::bail!("--tls-authz needs --tls-creds");
        }
        return Ok(None);
    };
    let mut tls = ramjet_dataplane::TlsServer::from_dir(dir)
        .with_context(|| format!("--tls-creds {}", dir.display()))?;
    if !authz.is_empty() {
        tls = tls.allow_subjects(authz).context("--tls-authz")?;
    }
    Ok(Some(tls))
}

/// Guest RAM: a size as [`Size`] reads it (`512M`, `2G`, ...) that is a positive whole number
/// of pages, which is all guest memory can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSize(u64);

impl GuestSize {
    /// `bytes` as guest RAM, if it is a positive multiple of [`PAGE_SIZE`].
    pub fn new(bytes: u64) -> Option<GuestSize> {
        (bytes != 0 && bytes.is_multiple_of(PAGE_SIZE as u64)).then_some(GuestSize(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for GuestSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Size(bytes) = s.parse()?;
        // clap puts the flag and the value before this.
        GuestSize::new(bytes)
            .ok_or_else(|| format!("must be a positive multiple of {PAGE_SIZE} bytes, not {bytes}"))
    }
}

/// What a number without a unit counts: each flag keeps the unit it had before units were
/// accepted, so an old invocation means what it meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bare {
    Millis,
    Seconds,
}

/// A duration in milliseconds when bare: `300`, `300ms`, `1.5s`, `1m`.
pub fn millis(s: &str) -> Result<Duration, String> {
    parse_duration(s, Bare::Millis)
}

/// A duration in seconds when bare: `90`, `90s`, `500ms`, `20m`, `1h`.
pub fn seconds(s: &str) -> Result<Duration, String> {
    parse_duration(s, Bare::Seconds)
}

/// `N` or `N.F` followed by `ms`, `s`, `m`, `h`, or by nothing (then `bare` says the unit).
/// Whole minutes or hours beyond the largest `Duration` saturate, as `--duration` always did;
/// a whole number beyond `u64` is too large.
fn parse_duration(s: &str, bare: Bare) -> Result<Duration, String> {
    let not_a_duration = || format!("{s:?} is not a duration (like 300ms, 1.5s, 20m or 1h)");
    let trimmed = s.trim();
    // A plain integer flag took a leading `+` (Rust's integer parser does); keep it.
    let unsigned = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let split = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, unit) = unsigned.split_at(split);
    if number.is_empty() {
        return Err(not_a_duration());
    }
    // Milliseconds per unit.
    let per_unit: u64 = match (unit.trim(), bare) {
        ("ms", _) | ("", Bare::Millis) => 1,
        ("s", _) | ("", Bare::Seconds) => 1_000,
        ("m", _) => 60_000,
        ("h", _) => 3_600_000,
        (other, _) => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if let Ok(whole) = number.parse::<u64>() {
        return Ok(whole_duration(whole, per_unit));
    }
    if !number.contains('.') {
        // Only digits, yet no u64: it overflows.
        return Err(format!("{s:?} is too large"));
    }
    let value: f64 = number.parse().map_err(|_| not_a_duration())?;
    Duration::try_from_secs_f64(value * per_unit as f64 / 1_000.0)
        .map_err(|_| format!("{s:?} is too large"))
}

/// `n` units of `per_unit` milliseconds, exact, saturating at the largest `Duration`.
fn whole_duration(n: u64, per_unit: u64) -> Duration {
    if per_unit == 1 {
        return Duration::from_millis(n);
    }
    // Every unit above a millisecond is whole seconds.
    Duration::from_secs(n.saturating_mul(per_unit / 1_000))
}

/// The flags `send` and `demo` share: how the source side migrates.
#[derive(Debug, clap::Args)]
pub struct MigrationArgs {
    /// Channels (sockets).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// Page compression: off, lz4, zstd or auto.
    #[arg(long, default_value = "auto")]
    pub compress: Compression,
    /// Transport; io_uring where the kernel allows it unless given.
    #[arg(long, value_enum)]
    pub transport: Option<TransportKind>,
    /// Limit the link, e.g. 200M/s.
    #[arg(long)]
    pub max_bandwidth: Option<Rate>,
    /// The downtime limit of a live migration: 300ms, 1.5s, ...; a bare number is milliseconds.
    #[arg(long, default_value = "300ms", value_parser = millis)]
    pub downtime_limit: Duration,
    /// How events are printed.
    #[arg(long, value_enum, default_value = "text")]
    pub events: Format,
    /// Limit for connecting and for each wait on the receiver: 30s, 500ms; a bare number is
    /// seconds.
    #[arg(long, value_parser = seconds)]
    pub timeout: Option<Duration>,
    /// How long to keep trying to deliver the handover to a receiver whose connection broke
    /// after it said it holds everything.
    #[arg(long, value_parser = seconds)]
    pub decision_timeout: Option<Duration>,
    /// Postcopy (QEMU's postcopy-ram): `after-first-round` (a bare --postcopy) switches once
    /// every page was sent, `on-stall` when pre-copy stops converging. The destination then
    /// runs the guest at once and fetches the pages it touches; a broken link pauses the
    /// migration, and it reconnects by itself (for --recover-wait).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "after-first-round")]
    pub postcopy: Option<PostcopyWhen>,
    /// How long a paused postcopy keeps trying to reconnect: 60s, 5m; a bare number is
    /// seconds.
    #[arg(long, value_parser = seconds, default_value = "60")]
    pub recover_wait: Duration,
    /// Same host: hand the guest's memory over by file descriptor instead of copying it
    /// (QEMU's cpr-transfer). `auto` does so over a unix: socket when the memory is shareable
    /// (a memfd, or an image mapped with --share) and the receiver takes it, and otherwise
    /// copies and says why; `on` (a bare --same-host) fails instead of copying; `off` always
    /// copies. `ramjet demo --same-host` migrates a memfd guest over a unix: socket this way.
    #[arg(long, value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    pub same_host: SameHostArg,
}

/// When a migration switches to postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PostcopyWhen {
    /// Once round 1 sent every page.
    AfterFirstRound,
    /// When pre-copy stalls.
    OnStall,
}

impl TryFrom<&MigrationArgs> for (SendOptions, LiveOptions) {
    type Error = anyhow::Error;

    /// The library's options for these flags: the transport probed, a fresh cancel handle,
    /// everything else at the library's defaults.
    fn try_from(args: &MigrationArgs) -> anyhow::Result<Self> {
        let defaults = SendOptions::default();
        let send = SendOptions {
            channels: args.channels,
            compression: args.compress,
            transport: transport_of(args.transport)?,
            max_bandwidth: args.max_bandwidth.map(|Rate(r)| r),
            timeout: args.timeout.unwrap_or(defaults.timeout),
            decision_timeout: args.decision_timeout.unwrap_or(defaults.decision_timeout),
            postcopy: args.postcopy.is_some(),
            recover_wait: Some(args.recover_wait),
            same_host: args.same_host.into(),
            log: Log::new(|line| crate::console::err(&format!("ramjet: {line}"))),
            ..defaults
        };
        let defaults = LiveOptions::default();
        let live = LiveOptions {
            downtime_limit: args.downtime_limit,
            postcopy_after_first_round: args.postcopy == Some(PostcopyWhen::AfterFirstRound),
            on_stall: match args.postcopy {
                Some(PostcopyWhen::OnStall) => StallPolicy::Postcopy,
                _ => defaults.on_stall,
            },
            ..defaults
        };
        Ok((send, live))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        migration: MigrationArgs,
        #[arg(long)]
        memory: Option<GuestSize>,
        #[arg(long, value_parser = seconds)]
        accept_timeout: Option<Duration>,
    }

    fn parse(argv: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(["ramjet"].iter().chain(argv)).map_err(|e| e.to_string())
    }

    #[test]
    fn guest_sizes_are_whole_pages() {
        assert_eq!("4096".parse::<GuestSize>().map(GuestSize::bytes), Ok(4096));
        assert_eq!("1G".parse::<GuestSize>().map(GuestSize::bytes), Ok(1 << 30));
        assert_eq!(
            "1.5M".parse::<GuestSize>().map(GuestSize::bytes),
            Ok(3 << 19)
        );
        assert_eq!(
            "5000".parse::<GuestSize>(),
            Err("must be a positive multiple of 4096 bytes, not 5000".into())
        );
        assert_eq!(
            "0".parse::<GuestSize>(),
            Err("must be a positive multiple of 4096 bytes, not 0".into())
        );
        assert_eq!(
            "4.5K".parse::<GuestSize>(),
            Err("must be a positive multiple of 4096 bytes, not 4608".into())
        );
        // What `Size` refuses is refused in its words.
        let err = "12Q".parse::<GuestSize>().unwrap_err();
        assert!(err.starts_with("unknown unit \"Q\""), "{err}");
        assert_eq!(GuestSize::new(8192), Some(GuestSize(8192)));
        assert_eq!(GuestSize::new(4095), None);
    }

    #[test]
    fn a_bad_guest_size_names_its_flag() {
        let err = parse(&["--memory", "5000"]).unwrap_err();
        assert!(
            err.contains("--memory") && err.contains("multiple of 4096 bytes, not 5000"),
            "{err}"
        );
    }

    #[test]
    fn bare_numbers_keep_their_old_unit() {
        assert_eq!(millis("300"), Ok(Duration::from_millis(300)));
        assert_eq!(millis("+300"), Ok(Duration::from_millis(300)));
        assert_eq!(millis("0"), Ok(Duration::ZERO));
        assert_eq!(
            millis("18446744073709551615"),
            Ok(Duration::from_millis(u64::MAX))
        );
        assert_eq!(seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(seconds("+30"), Ok(Duration::from_secs(30)));
        assert_eq!(
            seconds("18446744073709551615"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn durations_take_units_and_fractions() {
        for parse in [millis, seconds] {
            assert_eq!(parse("300ms"), Ok(Duration::from_millis(300)));
            assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
            assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
            assert_eq!(parse("0.5ms"), Ok(Duration::from_micros(500)));
            assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
            assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
            assert_eq!(parse(" 2 s "), Ok(Duration::from_secs(2)));
        }
        assert_eq!(millis("1.5"), Ok(Duration::from_micros(1500)));
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        // Whole hours too many for a Duration saturate, as --duration always did.
        assert_eq!(
            seconds("18446744073709551615h"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }

    /// Moved from `stress`: what `--duration` took before (seconds when bare), it still takes.
    #[test]
    fn durations_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(seconds("90"), Ok(Duration::from_secs(90)));
        assert_eq!(seconds("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(seconds("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(seconds("1h"), Ok(Duration::from_secs(3600)));
        assert!(seconds("").unwrap_err().contains("not a duration"));
        assert!(seconds("5d").unwrap_err().contains("unknown unit"));
        assert!(seconds("m").unwrap_err().contains("not a duration"));
    }

    #[test]
    fn bad_durations_say_why() {
        let not = |s: &str| format!("{s:?} is not a duration (like 300ms, 1.5s, 20m or 1h)");
        for bad in ["", "ms", "-5s", "fast", "+"] {
            assert_eq!(millis(bad), Err(not(bad)), "{bad:?}");
        }
        assert_eq!(millis("1.2.3s"), Err(not("1.2.3s")));
        assert_eq!(
            millis("5d"),
            Err("unknown unit \"d\" in \"5d\" (use ms, s, m or h)".into())
        );
        assert_eq!(
            seconds("2 days"),
            Err("unknown unit \"days\" in \"2 days\" (use ms, s, m or h)".into())
        );
        assert_eq!(
            millis("99999999999999999999"),
            Err("\"99999999999999999999\" is too large".into())
        );
        // No exponents: what follows the digits is a unit.
        assert_eq!(
            seconds("1.0e309"),
            Err("unknown unit \"e309\" in \"1.0e309\" (use ms, s, m or h)".into())
        );
        let huge = format!("{}.5h", "9".repeat(30));
        assert_eq!(seconds(&huge), Err(format!("{huge:?} is too large")));
    }

    #[test]
    fn shared_flags_default_as_before() {
        let cli = parse(&[]).unwrap();
        let m = &cli.migration;
        assert_eq!(m.channels, 2);
        assert_eq!(m.compress, Compression::Auto);
        assert_eq!(m.transport, None);
        assert_eq!(m.max_bandwidth, None);
        assert_eq!(m.downtime_limit, Duration::from_millis(300));
        assert_eq!(m.events, Format::Text);
        assert_eq!(m.same_host, SameHostArg::Auto);
        let cli = parse(&["--downtime-limit", "50", "--channels", "64"]).unwrap();
        assert_eq!(cli.migration.downtime_limit, Duration::from_millis(50));
        assert_eq!(cli.migration.channels, 64);
        let cli = parse(&["--downtime-limit", "1.5s", "--accept-timeout", "2"]).unwrap();
        assert_eq!(cli.migration.downtime_limit, Duration::from_millis(1500));
        assert_eq!(cli.accept_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn bad_shared_flags_name_the_flag() {
        for (argv, says) in [
            (&["--channels", "0"][..], "0 is not in 1..=64"),
            (&["--channels", "65"][..], "65 is not in 1..=64"),
            (&["--downtime-limit", "fast"][..], "is not a duration"),
            (&["--max-bandwidth", "100M"][..], "not a rate"),
            (&["--transport", "carrier-pigeon"][..], "carrier-pigeon"),
        ] {
            let err = parse(argv).unwrap_err();
            assert!(
                err.contains(argv[0]) && err.contains(says),
                "{argv:?}: {err}"
            );
        }
    }

    #[test]
    fn shared_flags_become_the_library_options() {
        let cli = parse(&[
            "--channels",
            "3",
            "--compress",
            "lz4",
            "--transport",
            "blocking",
            "--max-bandwidth",
            "1M/s",
            "--downtime-limit",
            "2s",
            "--same-host",
            "off",
        ])
        .unwrap();
        let (send, live) = <(SendOptions, LiveOptions)>::try_from(&cli.migration).unwrap();
        assert_eq!(send.channels, 3);
        assert_eq!(send.compression, Compression::Lz4);
        assert_eq!(send.transport.name(), Blocking.name());
        assert_eq!(send.max_bandwidth, Some(1 << 20));
        assert_eq!(send.same_host, SameHost::Off);
        assert!(!send.cancel.is_cancelled());
        assert_eq!(live.downtime_limit, Duration::from_secs(2));
        assert_eq!(live.max_rounds, LiveOptions::default().max_rounds);
    }

    #[test]
    fn endpoints_parse_and_bad_ones_say_why() {
        assert!(parse_endpoint("tcp:127.0.0.1:0").is_ok());
        assert!(parse_endpoint("unix:/tmp/ramjet.sock").is_ok());
        let err = parse_endpoint("bogus").unwrap_err();
        assert!(err.contains("must start with tcp: or unix:"), "{err}");
    }
}

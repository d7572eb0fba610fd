//! Sizes and rates on the command line: `4096`, `512M`, `2G`, `1GiB`, `1.5G`, and the same
//! with `/s` for rates. `K`, `M`, `G`, `T` (with or without `i` and `B`) are powers of 1024, as
//! QEMU's `-m` reads them; `KB`, `MB`, `GB`, `TB` are powers of 1000.

use std::fmt;
use std::str::FromStr;

/// A byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// Bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

fn multiplier(unit: &str) -> Option<u64> {
    Some(match unit {
        "" | "B" => 1,
        "K" | "k" | "Ki" | "KiB" | "kiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        "T" | "Ti" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    })
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(format!("{s:?} does not start with a number"));
    }
    let factor = multiplier(unit.trim()).ok_or_else(|| {
        format!("unknown unit {unit:?} in {s:?} (use K, M, G, T, KiB..TiB or KB..TB)")
    })?;
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(factor)
            .ok_or_else(|| format!("{s:?} is too large"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{number:?} is not a number"))?;
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "checked finite and in range above; a fraction of a byte is dropped"
    )]
    Ok(bytes as u64)
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_bytes(s).map(Size)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s
            .trim()
            .strip_suffix("/s")
            .ok_or_else(|| format!("{s:?} is not a rate (write it like 100M/s or 1GiB/s)"))?;
        parse_bytes(bytes).map(Rate)
    }
}

/// `bytes` for people: `1.00 GiB`, `512.0 MiB`, `4.0 KiB`, `12 B`.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        match self.0 {
            n if n >= 1 << 30 => write!(f, "{:.2} GiB", b / f64::from(1u32 << 30)),
            n if n >= 1 << 20 => write!(f, "{:.1} MiB", b / f64::from(1u32 << 20)),
            n if n >= 1 << 10 => write!(f, "{:.1} KiB", b / 1024.0),
            n => write!(f, "{n} B"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_read_like_qemu() {
        assert_eq!("4096".parse(), Ok(Size(4096)));
        assert_eq!("512M".parse(), Ok(Size(512 << 20)));
        assert_eq!("2G".parse(), Ok(Size(2 << 30)));
        assert_eq!("1GiB".parse(), Ok(Size(1 << 30)));
        assert_eq!("1.5G".parse(), Ok(Size(3 << 29)));
        assert_eq!("10MB".parse(), Ok(Size(10_000_000)));
        assert_eq!("1GiB/s".parse(), Ok(Rate(1 << 30)));
        assert_eq!("100M/s".parse(), Ok(Rate(100 << 20)));
        for bad in ["", "G", "12Q", "1.2.3M", "-5M", "99999999999T"] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?}");
        }
        let err = "100M".parse::<Rate>().unwrap_err();
        assert!(err.contains("not a rate"), "{err}");
        assert_eq!(Bytes(3 << 29).to_string(), "1.50 GiB");
        assert_eq!(Bytes(12).to_string(), "12 B");
    }
}

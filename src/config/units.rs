//! Sizes (`"8GB"`) and durations (`"5s"`, `"30d"`) as the configuration file writes them.

use std::time::Duration;

/// Parses a size the way PostgreSQL reads memory settings: a whole number with an optional
/// unit `B`, `kB`, `MB`, `GB` or `TB`, each 1024 times the previous (`"8GB"` is 8 GiB). Units
/// are case-insensitive and `KiB`/`MiB`/`GiB`/`TiB` are accepted too; a space may separate the
/// number from its unit. Returns an explanation when the text is not a size.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let explain = || {
        format!(
            "{text:?} is not a size: write a whole number of bytes with an optional unit \
             B, kB, MB, GB or TB (1024-based), e.g. \"8GB\""
        )
    };
    if number.is_empty() {
        return Err(explain());
    }
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "kib" => 1 << 10,
        "mb" | "mib" => 1 << 20,
        "gb" | "gib" => 1 << 30,
        "tb" | "tib" => 1 << 40,
        _ => return Err(explain()),
    };
    let n: u64 = number.parse().map_err(|_| explain())?;
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large: at most {} bytes", u64::MAX))
}

/// Formats a byte count the way [`parse_size`] reads it, with the largest exact unit.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TB", 1 << 40),
        ("GB", 1 << 30),
        ("MB", 1 << 20),
        ("kB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        // Every unit is a power of two: a multiple has no bits below it.
        if bytes != 0 && bytes & (size - 1) == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// Parses a positive duration in humantime syntax: `"500ms"`, `"5s"`, `"10min"`, `"30d"`,
/// `"1h 30m"`. Returns an explanation when the text is not one.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(format!("{text:?} must be longer than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "{text:?} is not a duration ({e}): write a number with a unit, \
             e.g. \"500ms\", \"5s\", \"10min\", \"12h\" or \"30d\""
        )),
    }
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_1024_multipliers() {
        assert_eq!(parse_size("8GB"), Ok(8 << 30));
        assert_eq!(parse_size("8 GB"), Ok(8 << 30));
        assert_eq!(parse_size("512kB"), Ok(512 << 10));
        assert_eq!(parse_size("512KB"), Ok(512 << 10));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("1TB"), Ok(1 << 40));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1000B"), Ok(1000));
    }

    #[test]
    fn bad_sizes_explain_the_syntax() {
        for bad in ["", "GB", "8 gigs", "1.5GB", "-1GB", "8PB", "99999999999TB"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn sizes_format_back() {
        for s in ["8GB", "512kB", "1000B", "3MB", "2TB"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
        assert_eq!(format_size(0), "0B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s")
            .unwrap_err()
            .contains("longer than zero"));
        assert!(parse_duration("5").unwrap_err().contains("\"5\""));
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_duration(Duration::from_secs(30 * 86400)), "30days");
    }
}

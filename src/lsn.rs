//! WAL positions and PostgreSQL timestamps, the two coordinates every replication message carries.
//!
//! An [`Lsn`] is a byte offset into the write-ahead log. PostgreSQL prints it as two hex halves,
//! `16/B374D848`; walbridge parses and prints that form everywhere (config, logs, `tail`).
//!
//! A [`PgTimestamp`] is what the wire protocol and the catalogs use: microseconds since
//! 2000-01-01 00:00:00 UTC. Keeping the raw integer means commit times pass from the source's
//! Begin message to `pg_replication_origin_xact_setup` on the target without any rounding.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Utc};

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`, which the protocol uses for "none" or "from the slot's start".
    pub const ZERO: Lsn = Lsn(0);

    /// True for `0/0`.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Bytes from `self` forward to `later`, zero when `later` is not ahead.
    pub fn bytes_until(self, later: Lsn) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `XXXXXXXX/XXXXXXXX`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an LSN; expected two hexadecimal halves like 0/16B3748")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800 * 1_000_000;

/// A PostgreSQL `timestamptz` as it travels on the wire: microseconds since 2000-01-01 UTC.
///
/// `i64::MAX` / `i64::MIN` are PostgreSQL's `infinity` / `-infinity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_datetime(Utc::now())
    }

    /// Converts from a chrono UTC time.
    pub fn from_datetime(t: DateTime<Utc>) -> Self {
        PgTimestamp(t.timestamp_micros().saturating_sub(PG_EPOCH_OFFSET_MICROS))
    }

    /// Microseconds from `self` to `later` (negative when `later` is earlier), saturating:
    /// timestamps come from the wire and from rows, where `±infinity` are ordinary values.
    pub fn micros_until(self, later: PgTimestamp) -> i64 {
        later.0.saturating_sub(self.0)
    }

    /// Converts to a chrono UTC time; `None` for the infinities or out-of-range values.
    pub fn to_datetime(self) -> Option<DateTime<Utc>> {
        if self.0 == i64::MAX || self.0 == i64::MIN {
            return None;
        }
        DateTime::<Utc>::from_timestamp_micros(self.0.checked_add(PG_EPOCH_OFFSET_MICROS)?)
    }

    /// Seconds from `self` to `later` (negative when `later` is earlier).
    pub fn seconds_until(self, later: PgTimestamp) -> f64 {
        (later.0 as f64 - self.0 as f64) / 1_000_000.0
    }

    /// Parses PostgreSQL's ISO output (`2026-11-21 10:00:00.123456+00`, `+05:30`, `infinity`),
    /// and RFC 3339 (`2026-11-21T10:00:00Z`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "infinity" => return Some(PgTimestamp(i64::MAX)),
            "-infinity" => return Some(PgTimestamp(i64::MIN)),
            _ => {}
        }
        let s = s.trim();
        // wal2json stamps every Begin and Commit this way: parsed by hand, a format string
        // per call costs ~3,000 instructions (a sixth of a wal2json row).
        if let Some(t) = parse_iso_fast(s) {
            return Some(t);
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Some(Self::from_datetime(t.with_timezone(&Utc)));
        }
        // PostgreSQL prints offsets as +HH, +HH:MM or +HH:MM:SS; normalise to +HH:MM:SS.
        let split = s.rfind(['+', '-']).filter(|&i| i > 10)?;
        let (local, offset) = s.split_at(split);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let mut parts = offset[1..].split(':');
        let hours: i64 = parts.next()?.parse().ok()?;
        let minutes: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
        let seconds: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
        let local = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
        // The offset is text from a server or a row: checked, so a silly one is refused rather
        // than wrapped (or a panic in debug builds).
        let offset_micros = hours
            .checked_mul(3600)?
            .checked_add(minutes.checked_mul(60)?)?
            .checked_add(seconds)?
            .checked_mul(1_000_000)?
            .checked_mul(sign)?;
        let utc = local
            .and_utc()
            .timestamp_micros()
            .checked_sub(offset_micros)?;
        Some(PgTimestamp(utc.checked_sub(PG_EPOCH_OFFSET_MICROS)?))
    }
}

/// PostgreSQL's ISO output in its common shape, `YYYY-MM-DD HH:MM:SS[.f{1,6}]±HH[:MM[:SS]]`;
/// `None` for anything else (other years, more digits, another shape), which
/// [`PgTimestamp::parse`] then hands to chrono. Same result as chrono's for what it accepts.
fn parse_iso_fast(s: &str) -> Option<PgTimestamp> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        digits.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let sep = |at: usize, c: u8| b.get(at) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b' ') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut at = 19;
    let mut micros = 0;
    if sep(at, b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        let digits = at - start;
        if digits == 0 || digits > 6 {
            return None;
        }
        micros = num(start, digits)? * 10i64.pow(6 - digits as u32);
    }
    let sign = match b.get(at) {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return None,
    };
    let mut offset = num(at + 1, 2)? * 3600;
    at += 3;
    for unit in [60, 1] {
        if at == b.len() {
            break;
        }
        if !sep(at, b':') {
            return None;
        }
        offset += num(at + 1, 2)? * unit;
        at += 3;
    }
    if at != b.len() {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let local = (days * 86_400 + hour * 3600 + minute * 60 + second) * 1_000_000 + micros;
    Some(PgTimestamp(
        local - sign * offset * 1_000_000 - PG_EPOCH_OFFSET_MICROS,
    ))
}

impl fmt::Display for PgTimestamp {
    /// RFC 3339 in UTC with microseconds, or `infinity` / `-infinity`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            i64::MAX => f.write_str("infinity"),
            i64::MIN => f.write_str("-infinity"),
            _ => match self.to_datetime() {
                Some(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ")),
                None => write!(f, "{}", self.0),
            },
        }
    }
}

impl serde::Serialize for PgTimestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand parser agrees with chrono's on everything it accepts, and leaves the rest to it.
    #[test]
    fn iso_fast_path_agrees_with_chrono() {
        let slow = |s: &str| {
            let split = s.rfind(['+', '-']).filter(|&i| i > 10)?;
            let (local, offset) = s.split_at(split);
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let mut parts = offset[1..].split(':');
            let h: i64 = parts.next()?.parse().ok()?;
            let m: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
            let sec: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
            let local = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
            let off = (h * 3600 + m * 60 + sec) * 1_000_000 * sign;
            Some(PgTimestamp(
                local.and_utc().timestamp_micros() - off - PG_EPOCH_OFFSET_MICROS,
            ))
        };
        for s in [
            "2026-11-21 10:00:00+00",
            "2026-11-21 10:00:00.123456+00",
            "2026-11-21 10:00:00.1+00",
            "2026-11-21 10:00:00.000001-08",
            "2024-02-29 23:59:59.999999+05:30",
            "2000-01-01 00:00:00+00",
            "1999-12-31 23:59:59.5-00:00:30",
            "1970-01-01 00:00:00+14",
            "0001-01-01 00:00:00+00",
            "2100-03-01 12:34:56.789+01",
        ] {
            assert_eq!(parse_iso_fast(s), slow(s), "{s}");
            assert!(parse_iso_fast(s).is_some(), "{s}");
            assert_eq!(PgTimestamp::parse(s), slow(s), "{s}");
        }
        for s in [
            "2023-02-29 00:00:00+00",
            "2026-13-01 00:00:00+00",
            "2026-11-21 24:00:00+00",
            "2026-11-21 10:00:00.1234567+00",
            "2026-11-21 10:00:00.+00",
            "2026-11-21T10:00:00Z",
            "2026-11-21 10:00:00",
            "2026-11-21 10:00:00+5",
            "2026-11-21 10:00:00+05:3",
            "12026-11-21 10:00:00+00",
            "2026-11-21 10:00:00+00 BC",
        ] {
            assert_eq!(parse_iso_fast(s), None, "{s}");
        }
    }

    #[test]
    fn lsn_round_trips_through_text() {
        for text in ["0/0", "0/16B3748", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap().0, 0x16_B374_D848);
    }

    #[test]
    fn lsn_rejects_garbage() {
        for text in ["", "/", "0/", "/0", "12345", "G/0", "123456789/0"] {
            assert!(text.parse::<Lsn>().is_err(), "{text}");
        }
    }

    #[test]
    fn lsn_arithmetic_at_the_limits() {
        let max: Lsn = "FFFFFFFF/FFFFFFFF".parse().unwrap();
        assert_eq!(max, Lsn(u64::MAX));
        assert_eq!(Lsn::ZERO.bytes_until(max), u64::MAX);
        assert_eq!(max.bytes_until(Lsn::ZERO), 0);
        assert_eq!(max.bytes_until(max), 0);
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let (lo, hi) = (PgTimestamp(i64::MIN), PgTimestamp(i64::MAX));
        assert_eq!(lo.micros_until(hi), i64::MAX);
        assert_eq!(hi.micros_until(lo), i64::MIN);
        assert_eq!(PgTimestamp(5).micros_until(PgTimestamp(7)), 2);
        assert_eq!(lo.to_datetime(), None);
        assert!(lo.seconds_until(hi).is_finite());
    }

    #[test]
    fn timestamp_with_absurd_offset_is_refused_not_wrapped() {
        for text in [
            "2000-01-01 00:00:00+99999999999999",
            "2000-01-01 00:00:00-99999999999999",
            "2000-01-01 00:00:00+00:9999999999999999",
            "2000-01-01 00:00:00+00:00:9223372036854775807",
            "2000-01-01 00:00:00+2562047789",
        ] {
            assert_eq!(PgTimestamp::parse(text), None, "{text}");
        }
    }

    #[test]
    fn timestamp_parses_postgres_iso_output() {
        let t = PgTimestamp::parse("2000-01-01 00:00:01.5+00").unwrap();
        assert_eq!(t.0, 1_500_000);
        let t = PgTimestamp::parse("2000-01-01 05:30:00+05:30").unwrap();
        assert_eq!(t.0, 0);
        let t = PgTimestamp::parse("1999-12-31 19:00:00-05").unwrap();
        assert_eq!(t.0, 0);
        assert_eq!(PgTimestamp::parse("infinity").unwrap().0, i64::MAX);
    }

    #[test]
    fn timestamp_displays_rfc3339_utc() {
        assert_eq!(
            PgTimestamp(1_500_000).to_string(),
            "2000-01-01T00:00:01.500000Z"
        );
        let now = PgTimestamp::now();
        assert_eq!(PgTimestamp::parse(&now.to_string()), Some(now));
    }
}

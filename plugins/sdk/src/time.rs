//! Time as the contract carries it: microseconds since the Unix epoch, UTC
//! (the WIT `database.value.timestamp` and `storage.object-info.modified`).
//!
//! A task that compares times ("ended before now", "older than 90 days")
//! should compute the bound here, from the sandbox's clock, and bind it as a
//! [`Value::Timestamp`](crate::database::Value::Timestamp) parameter rather
//! than call the database's `now()`: the same SQL then works on PostgreSQL
//! and SQLite, and in UTC whatever the time zone of the host or the server.
//!
//! ```
//! use celer_plugin::database::Value;
//! use celer_plugin::time::{self, DAY};
//! let cutoff = Value::Timestamp(time::now_micros() - 90 * DAY);
//! # let _ = cutoff;
//! assert_eq!(time::format_utc(0), "1970-01-01T00:00:00.000000Z");
//! assert_eq!(time::parse_utc("1970-01-02 00:00:00+00"), Some(DAY));
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

/// One second in microseconds.
pub const SECOND: i64 = 1_000_000;
/// One minute in microseconds.
pub const MINUTE: i64 = 60 * SECOND;
/// One hour in microseconds.
pub const HOUR: i64 = 60 * MINUTE;
/// One day (24 hours) in microseconds.
pub const DAY: i64 = 24 * HOUR;

/// Now, from the sandbox's wall clock (WASI), in microseconds since the epoch.
pub fn now_micros() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// A point in time split into UTC calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Proleptic Gregorian year.
    pub year: i64,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
    /// 0–23.
    pub hour: u32,
    /// 0–59.
    pub minute: u32,
    /// 0–59.
    pub second: u32,
    /// 0–999 999.
    pub micro: u32,
}

/// Splits microseconds since the epoch into UTC calendar fields.
pub fn to_civil(micros: i64) -> Civil {
    let days = micros.div_euclid(DAY);
    let rest = micros.rem_euclid(DAY);
    let (year, month, day) = civil_from_days(days);
    // `rest` is in 0..DAY, so every field below fits its type.
    Civil {
        year,
        month,
        day,
        hour: (rest / HOUR) as u32,
        minute: (rest % HOUR / MINUTE) as u32,
        second: (rest % MINUTE / SECOND) as u32,
        micro: (rest % SECOND) as u32,
    }
}

/// Microseconds since the epoch of a UTC calendar time; `None` when a field
/// is out of range.
pub fn from_civil(c: Civil) -> Option<i64> {
    let valid = (1..=12).contains(&c.month)
        && c.day >= 1
        && c.day <= days_in_month(c.year, c.month)
        && c.hour < 24
        && c.minute < 60
        && c.second < 60
        && c.micro < 1_000_000;
    if !valid {
        return None;
    }
    let days = days_from_civil(c.year, c.month, c.day);
    let secs = i64::from(c.hour) * 3600 + i64::from(c.minute) * 60 + i64::from(c.second);
    days.checked_mul(DAY)?.checked_add(secs * SECOND + i64::from(c.micro))
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`: ISO-8601 / RFC 3339 in UTC, always
/// microseconds. The form the host uses for a timestamp on SQLite, where it
/// is stored as text and compared as text.
pub fn format_utc(micros: i64) -> String {
    let c = to_civil(micros);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.micro
    )
}

/// Parses an ISO-8601 / RFC 3339 date-time: `T` or a space between date and
/// time, optional fraction (up to nanoseconds, truncated to microseconds), and
/// `Z`, `±HH:MM`, `±HHMM`, `±HH` or nothing (read as UTC) at the end. Also a
/// bare date (`2026-11-22`, midnight UTC). `None` for anything else.
pub fn parse_utc(text: &str) -> Option<i64> {
    let s = text.trim().as_bytes();
    let num = |range: core::ops::Range<usize>| -> Option<u32> {
        let part = s.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        core::str::from_utf8(part).ok()?.parse().ok()
    };
    if s.get(4) != Some(&b'-') || s.get(7) != Some(&b'-') {
        return None;
    }
    let (year, month, day) = (i64::from(num(0..4)?), num(5..7)?, num(8..10)?);
    let mut c = Civil { year, month, day, hour: 0, minute: 0, second: 0, micro: 0 };
    if s.len() == 10 {
        return from_civil(c);
    }
    if !matches!(s.get(10), Some(b'T' | b't' | b' ')) || s.get(13) != Some(&b':') || s.get(16) != Some(&b':') {
        return None;
    }
    c.hour = num(11..13)?;
    c.minute = num(14..16)?;
    c.second = num(17..19)?;
    let mut i = 19;
    if s.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() || digits.len() > 9 {
            return None;
        }
        let mut micro = 0_u32;
        for k in 0..6 {
            micro = micro * 10 + digits.get(k).map_or(0, |d| u32::from(d - b'0'));
        }
        c.micro = micro;
    }
    let offset_secs: i64 = match &s[i..] {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (h, m) = match rest {
                [h1, h2] => (two(*h1, *h2)?, 0),
                [h1, h2, b':', m1, m2] | [h1, h2, m1, m2] => (two(*h1, *h2)?, two(*m1, *m2)?),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            let secs = i64::from(h) * 3600 + i64::from(m) * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    from_civil(c)?.checked_sub(offset_secs * SECOND)
}

fn two(a: u8, b: u8) -> Option<u32> {
    (a.is_ascii_digit() && b.is_ascii_digit()).then(|| u32::from(a - b'0') * 10 + u32::from(b - b'0'))
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's algorithms (public domain): days since 1970-01-01 to and
// from the proleptic Gregorian calendar.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_microseconds() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_utc(1_795_334_400_123_456), "2026-11-22T08:00:00.123456Z");
        assert_eq!(format_utc(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(format_utc(951_782_400 * SECOND), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn parses_what_the_backends_and_python_print() {
        let t = 1_795_334_400_123_456;
        for text in [
            "2026-11-22T08:00:00.123456Z",
            "2026-11-22 08:00:00.123456+00",
            "2026-11-22 08:00:00.123456+00:00",
            "2026-11-22T09:00:00.123456+01:00",
            "2026-11-22T03:30:00.123456-0430",
            "2026-11-22T08:00:00.123456789Z",
            "2026-11-22T08:00:00.123456",
        ] {
            assert_eq!(parse_utc(text), Some(t), "{text}");
        }
        assert_eq!(parse_utc("2026-11-22T08:00:00Z"), Some(t - 123_456));
        assert_eq!(parse_utc("2026-11-22T08:00:00.5Z"), Some(t - 123_456 + 500_000));
        assert_eq!(parse_utc("2026-11-22"), Some(t - 8 * HOUR - 123_456));
        for bad in ["", "2026-11-22T08:00", "2026-13-01T00:00:00Z", "2026-02-29T00:00:00Z", "2026-11-22T08:00:00+25:00", "x026-11-22", "2026-11-22T08:00:00Q"] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn civil_round_trips_over_centuries() {
        let mut t = -(400 * 365 * DAY);
        while t < 400 * 365 * DAY {
            let c = to_civil(t);
            assert_eq!(from_civil(c), Some(t), "{c:?}");
            assert_eq!(parse_utc(&format_utc(t)), Some(t));
            t += 7 * DAY + 3 * HOUR + 11 * SECOND + 17;
        }
    }

    #[test]
    fn now_is_after_2024() {
        assert!(now_micros() > parse_utc("2024-01-01T00:00:00Z").unwrap());
    }
}

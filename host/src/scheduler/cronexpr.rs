//! Crontab expressions as operators write them (five fields, `0` = Sunday,
//! as in cron(8) and django-celery-beat), translated to the `cron` crate's
//! seven-field form (seconds first, `1` = Sunday, year last). Parsing and
//! iteration are the crate's; this only maps the notation.

use std::str::FromStr;

/// Why an expression was refused; the text names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid cron expression {expr:?}: {reason}")]
pub struct CronError {
    pub expr: String,
    pub reason: String,
}

/// Parses a 5-field (`m h dom mon dow`) or 6-field (`s m h dom mon dow`)
/// expression, or a nickname (`@daily`, `@hourly`, …).
pub fn parse(expr: &str) -> Result<cron::Schedule, CronError> {
    let err = |reason: String| CronError { expr: expr.to_string(), reason };
    let trimmed = expr.trim();
    let seven = match trimmed {
        "@yearly" | "@annually" => "0 0 0 1 1 * *".to_string(),
        "@monthly" => "0 0 0 1 * * *".to_string(),
        "@weekly" => "0 0 0 * * 1 *".to_string(),
        "@daily" | "@midnight" => "0 0 0 * * * *".to_string(),
        "@hourly" => "0 0 * * * * *".to_string(),
        _ => {
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let (seconds, rest) = match fields.len() {
                5 => ("0", &fields[..]),
                6 => (fields[0], &fields[1..]),
                n => return Err(err(format!("expected 5 fields (minute hour day-of-month month day-of-week), got {n}"))),
            };
            let dow = day_of_week(rest[4]).map_err(err)?;
            format!("{seconds} {} {} {} {} {dow} *", rest[0], rest[1], rest[2], rest[3])
        }
    };
    cron::Schedule::from_str(&seven).map_err(|e| err(e.to_string()))
}

/// Maps day-of-week numbers from cron's 0–7 (0 and 7 = Sunday) to the
/// crate's 1–7 (1 = Sunday); names pass through.
fn day_of_week(field: &str) -> Result<String, String> {
    let map_num = |s: &str| -> Result<String, String> {
        if s.chars().all(|c| c.is_ascii_alphabetic()) {
            return Ok(s.to_string());
        }
        let n: u8 = s.parse().map_err(|_| format!("day-of-week {s:?} is not a number or a day name"))?;
        match n {
            0 | 7 => Ok("1".into()),
            1..=6 => Ok((n + 1).to_string()),
            _ => Err(format!("day-of-week {n} is out of range 0-7")),
        }
    };
    let mut items = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let mapped = match range {
            "*" | "?" => range.to_string(),
            r => match r.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (map_num(a)?, map_num(b)?);
                    // `5-7` (Fri-Sun) would become 6-1: spell it out instead.
                    match (a.parse::<u8>(), b.parse::<u8>()) {
                        (Ok(x), Ok(y)) if y < x => format!("{x}-7,1-{y}"),
                        _ => format!("{a}-{b}"),
                    }
                }
                None => map_num(r)?,
            },
        };
        match step {
            Some(s) => items.push(format!("{mapped}/{s}")),
            None => items.push(mapped),
        }
    }
    Ok(items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn next(expr: &str, after: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
        parse(expr).expect(expr).after(&after).next().expect("a next time")
    }

    #[test]
    fn five_fields_with_sunday_zero() {
        // 2026-11-24 is a Tuesday.
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
        assert_eq!(next("0 3 * * *", t), Utc.with_ymd_and_hms(2026, 11, 25, 3, 0, 0).unwrap());
        assert_eq!(next("0 3 * * 0", t), Utc.with_ymd_and_hms(2026, 11, 29, 3, 0, 0).unwrap(), "Sunday");
        assert_eq!(next("0 3 * * 7", t), Utc.with_ymd_and_hms(2026, 11, 29, 3, 0, 0).unwrap(), "7 is Sunday too");
        assert_eq!(next("0 3 * * 1-5", t), Utc.with_ymd_and_hms(2026, 11, 25, 3, 0, 0).unwrap(), "weekdays");
        assert_eq!(next("0 3 * * 6", t), Utc.with_ymd_and_hms(2026, 11, 28, 3, 0, 0).unwrap(), "Saturday");
        assert_eq!(next("0 3 * * mon", t), Utc.with_ymd_and_hms(2026, 11, 30, 3, 0, 0).unwrap());
        assert_eq!(next("*/5 * * * *", t), Utc.with_ymd_and_hms(2026, 11, 24, 12, 5, 0).unwrap());
        assert_eq!(next("@daily", t), Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap());
        assert_eq!(next("* * * * * *", t), Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 1).unwrap(), "six fields: seconds");
    }

    #[test]
    fn wrapping_day_ranges() {
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap(); // Tuesday
        assert_eq!(next("0 0 * * 5-0", t), Utc.with_ymd_and_hms(2026, 11, 27, 0, 0, 0).unwrap(), "Fri-Sun");
    }

    #[test]
    fn refusals_name_the_problem() {
        for (expr, needle) in [
            ("0 3 * *", "expected 5 fields"),
            ("0 3 * * 9", "out of range"),
            ("0 25 * * *", "invalid cron expression"),
            ("banana", "expected 5 fields"),
        ] {
            let e = parse(expr).expect_err(expr).to_string();
            assert!(e.contains(needle), "{expr}: {e}");
        }
    }
}

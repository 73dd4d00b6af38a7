//! A periodic task, as django-celery-beat models it: a crontab (with its
//! time zone), an interval, or a one-off clocked time; plus enabled,
//! one_off, start_time, expires, last_run_at and total_run_count. This module
//! answers one question: which fire times are due now.

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cronexpr;

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Timing {
    /// A crontab expression evaluated in `timezone` (IANA name).
    Crontab { expr: String, timezone: String },
    /// Every `every_s` seconds from `start_time` (or creation).
    Interval { every_s: u64 },
    /// Once, at `at`.
    Clocked { at: DateTime<Utc> },
}

/// One stored schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub name: String,
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    pub queue: String,
    #[serde(flatten)]
    pub timing: Timing,
    pub enabled: bool,
    /// Disable after the first run.
    pub one_off: bool,
    /// Not before this instant.
    pub start_time: Option<DateTime<Utc>>,
    /// Not after this instant.
    pub expires: Option<DateTime<Utc>>,
    /// The fire time of the last enqueued tick.
    pub last_run_at: Option<DateTime<Utc>>,
    pub total_run_count: u64,
    pub description: String,
    /// Who created it: `cli`, `api`, `plugin:<name>`, `django-celery-beat`.
    pub source: String,
    pub created_at: DateTime<Utc>,
}

/// The longest interval a schedule may have: longer ones would overflow
/// the date arithmetic of its ticks (and mean "never").
pub const MAX_INTERVAL_S: u64 = 100 * 365 * 86_400;

/// Why a schedule definition was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Cron(#[from] cronexpr::CronError),
    #[error("unknown time zone {0:?} (use an IANA name such as Europe/London)")]
    TimeZone(String),
    #[error("interval must be from one second to a century ({MAX_INTERVAL_S} s)")]
    Interval,
    #[error("invalid schedule: {0}")]
    Invalid(String),
}

/// Checks a timing before it is stored, so a bad expression or time zone is
/// refused with one clear line instead of never firing.
pub fn validate(timing: &Timing) -> Result<(), ScheduleError> {
    match timing {
        Timing::Crontab { expr, timezone } => {
            cronexpr::parse(expr)?;
            parse_tz(timezone)?;
        }
        Timing::Interval { every_s } if *every_s == 0 || *every_s > MAX_INTERVAL_S => return Err(ScheduleError::Interval),
        Timing::Interval { .. } | Timing::Clocked { .. } => {}
    }
    Ok(())
}

fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    name.parse::<Tz>().map_err(|_| ScheduleError::TimeZone(name.to_string()))
}

/// How missed ticks are handled after a gap longer than a leader handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    /// Fire once for the whole gap (the latest missed tick).
    #[default]
    Once,
    /// Fire nothing for the gap; resume with the next tick.
    Skip,
}

/// Ticks are never replayed more than this many at once.
const MAX_TICKS_PER_PASS: usize = 1000;

impl Schedule {
    /// The fire times to enqueue now, oldest first. Ticks missed within
    /// `handover` (a leader dying and another taking over) are all fired;
    /// a longer gap (everything was down) fires per `missed`.
    pub fn due(&self, now: DateTime<Utc>, handover: Duration, missed: Missed) -> Result<Vec<DateTime<Utc>>, ScheduleError> {
        if !self.enabled || self.expires.is_some_and(|e| e < now) {
            return Ok(Vec::new());
        }
        let floor = self.start_time.unwrap_or(self.created_at);
        // Fire times strictly after this are candidates.
        let after = self.last_run_at.unwrap_or(floor - Duration::milliseconds(1)).max(floor - Duration::milliseconds(1));
        let mut ticks = self.ticks_between(after, now)?;
        if ticks.is_empty() {
            return Ok(ticks);
        }
        let recent_from = now - handover;
        let (old, recent): (Vec<_>, Vec<_>) = ticks.drain(..).partition(|t| *t < recent_from);
        let mut out = Vec::new();
        if let (Some(latest_old), Missed::Once) = (old.last(), missed) {
            // Ticks older than a handover collapse into one catch-up tick.
            out.push(*latest_old);
        }
        out.extend(recent);
        if self.one_off {
            out.truncate(1);
        }
        Ok(out)
    }

    /// Fire times in `(after, until]`, at most [`MAX_TICKS_PER_PASS`] of
    /// them (the latest ones).
    fn ticks_between(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> Result<Vec<DateTime<Utc>>, ScheduleError> {
        if after >= until {
            return Ok(Vec::new());
        }
        let mut ticks = Vec::new();
        match &self.timing {
            Timing::Clocked { at } => {
                if *at > after && *at <= until {
                    ticks.push(*at);
                }
            }
            Timing::Interval { every_s } => {
                // Checked at validation; a stored one past it never ticks.
                let Some(every) = i64::try_from(*every_s).ok().and_then(Duration::try_seconds) else { return Ok(ticks) };
                let anchor = self.start_time.unwrap_or(self.created_at);
                // k-th tick = anchor + k*every; the first after `after`:
                let span = (after - anchor).num_milliseconds().max(-1);
                let step = every.num_milliseconds().max(1);
                let mut k = span.div_euclid(step) + 1;
                let last_k = (until - anchor).num_milliseconds().div_euclid(step);
                k = k.max(last_k - MAX_TICKS_PER_PASS as i64 + 1).max(0);
                while k <= last_k {
                    ticks.push(anchor + Duration::milliseconds(k * step));
                    k += 1;
                }
            }
            Timing::Crontab { expr, timezone } => {
                let schedule = cronexpr::parse(expr)?;
                let tz = parse_tz(timezone)?;
                // Long gaps: only the last stretch matters (they collapse to one tick).
                let start = after.max(until - Duration::days(366));
                for t in schedule.after(&tz.from_utc_datetime(&start.naive_utc())) {
                    let t = t.with_timezone(&Utc);
                    if t > until {
                        break;
                    }
                    ticks.push(t);
                    if ticks.len() > MAX_TICKS_PER_PASS {
                        ticks.remove(0);
                    }
                }
            }
        }
        Ok(ticks)
    }

    /// The next fire time after `now`, for `celer schedules list`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if !self.enabled {
            return None;
        }
        let from = now.max(self.start_time.unwrap_or(now));
        let next = match &self.timing {
            Timing::Clocked { at } => (*at > from).then_some(*at),
            Timing::Interval { every_s } => {
                let step = i64::try_from(*every_s).ok()?.checked_mul(1000)?.max(1);
                let anchor = self.start_time.unwrap_or(self.created_at);
                let k = (from - anchor).num_milliseconds().div_euclid(step) + 1;
                k.max(0).checked_mul(step).and_then(Duration::try_milliseconds).and_then(|d| anchor.checked_add_signed(d))
            }
            Timing::Crontab { expr, timezone } => {
                let tz = parse_tz(timezone).ok()?;
                cronexpr::parse(expr).ok()?.after(&tz.from_utc_datetime(&from.naive_utc())).next().map(|t| t.with_timezone(&Utc))
            }
        };
        next.filter(|n| self.expires.is_none_or(|e| *n <= e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect(s).with_timezone(&Utc)
    }

    fn crontab(expr: &str, tz: &str) -> Schedule {
        Schedule {
            name: "s".into(),
            task: "t".into(),
            args: serde_json::json!([]),
            kwargs: serde_json::json!({}),
            queue: "default".into(),
            timing: Timing::Crontab { expr: expr.into(), timezone: tz.into() },
            enabled: true,
            one_off: false,
            start_time: None,
            expires: None,
            last_run_at: None,
            total_run_count: 0,
            description: String::new(),
            source: "test".into(),
            created_at: at("2026-01-01T00:00:00Z"),
        }
    }

    fn next(s: &Schedule, now: &str) -> String {
        s.next_after(at(now)).expect("has a next").to_rfc3339()
    }

    #[test]
    fn daily_03_00_in_london_across_both_dst_changes() {
        let s = crontab("0 3 * * *", "Europe/London");
        // Winter: GMT = UTC.
        assert_eq!(next(&s, "2026-01-10T12:00:00Z"), "2026-01-11T03:00:00+00:00");
        // BST starts 2026-03-29 01:00 UTC: 03:00 BST = 02:00 UTC.
        assert_eq!(next(&s, "2026-03-28T12:00:00Z"), "2026-03-29T02:00:00+00:00");
        // BST ends 2026-10-25 01:00 UTC: 03:00 GMT = 03:00 UTC.
        assert_eq!(next(&s, "2026-10-24T12:00:00Z"), "2026-10-25T03:00:00+00:00");
    }

    #[test]
    fn new_york_across_both_dst_changes() {
        let s = crontab("30 9 * * 1-5", "America/New_York");
        // EST (UTC-5) on Friday 2026-03-06; EDT (UTC-4) from Sunday 2026-03-08.
        assert_eq!(next(&s, "2026-03-06T12:00:00Z"), "2026-03-06T14:30:00+00:00");
        assert_eq!(next(&s, "2026-03-07T12:00:00Z"), "2026-03-09T13:30:00+00:00");
        // Back to EST on 2026-11-01.
        assert_eq!(next(&s, "2026-10-30T12:00:00Z"), "2026-10-30T13:30:00+00:00");
        assert_eq!(next(&s, "2026-10-31T12:00:00Z"), "2026-11-02T14:30:00+00:00");
    }

    #[test]
    fn a_local_time_skipped_by_spring_forward_does_not_fire_that_day() {
        // 01:30 does not exist in London on 2026-03-29.
        let s = crontab("30 1 * * *", "Europe/London");
        assert_eq!(next(&s, "2026-03-28T12:00:00Z"), "2026-03-30T00:30:00+00:00");
    }

    #[test]
    fn missed_ticks_fire_once_after_a_long_gap_and_all_after_a_handover() {
        let mut s = crontab("* * * * * *", "UTC"); // every second
        s.last_run_at = Some(at("2026-05-01T00:00:00Z"));
        let handover = Duration::seconds(10);
        // Everything was down for an hour: one catch-up tick, the latest old one, plus the recent ones.
        let now = at("2026-05-01T01:00:00Z");
        let due = s.due(now, handover, Missed::Once).expect("valid");
        assert_eq!(due.len(), 12, "the 11 ticks of the handover window (both ends) + 1 catch-up: {due:?}");
        assert_eq!(due[0], at("2026-05-01T00:59:49Z"), "the catch-up tick is the latest one before the window");
        let due = s.due(now, handover, Missed::Skip).expect("valid");
        assert_eq!(due.len(), 11, "only the handover window");
        // A handover of 4 s: every missed tick fires, none twice.
        s.last_run_at = Some(at("2026-05-01T00:59:56Z"));
        let due = s.due(now, handover, Missed::Once).expect("valid");
        assert_eq!(due, vec![at("2026-05-01T00:59:57Z"), at("2026-05-01T00:59:58Z"), at("2026-05-01T00:59:59Z"), at("2026-05-01T01:00:00Z")]);
    }

    #[test]
    fn a_never_run_schedule_fires_its_latest_tick_once() {
        let s = crontab("0 * * * *", "UTC");
        let due = s.due(at("2026-05-01T10:30:00Z"), Duration::seconds(10), Missed::Once).expect("valid");
        assert_eq!(due, vec![at("2026-05-01T10:00:00Z")]);
    }

    #[test]
    fn intervals_count_from_their_anchor() {
        let mut s = crontab("", "UTC");
        s.timing = Timing::Interval { every_s: 300 };
        s.start_time = Some(at("2026-05-01T10:02:00Z"));
        assert_eq!(next(&s, "2026-05-01T10:03:00Z"), "2026-05-01T10:07:00+00:00");
        s.last_run_at = Some(at("2026-05-01T10:07:00Z"));
        let due = s.due(at("2026-05-01T10:12:01Z"), Duration::seconds(10), Missed::Once).expect("valid");
        assert_eq!(due, vec![at("2026-05-01T10:12:00Z")]);
        assert!(s.due(at("2026-05-01T10:11:59Z"), Duration::seconds(10), Missed::Once).expect("valid").is_empty());
    }

    #[test]
    fn clocked_expired_disabled_and_one_off() {
        let mut s = crontab("", "UTC");
        s.timing = Timing::Clocked { at: at("2026-05-01T10:00:00Z") };
        let h = Duration::seconds(10);
        assert!(s.due(at("2026-05-01T09:59:59Z"), h, Missed::Once).expect("ok").is_empty());
        assert_eq!(s.due(at("2026-05-01T10:00:01Z"), h, Missed::Once).expect("ok").len(), 1);
        s.last_run_at = Some(at("2026-05-01T10:00:00Z"));
        assert!(s.due(at("2026-05-01T11:00:00Z"), h, Missed::Once).expect("ok").is_empty(), "fires once");

        let mut e = crontab("* * * * * *", "UTC");
        e.expires = Some(at("2026-05-01T00:00:00Z"));
        assert!(e.due(at("2026-05-02T00:00:00Z"), h, Missed::Once).expect("ok").is_empty());
        e.expires = None;
        e.enabled = false;
        assert!(e.due(at("2026-05-02T00:00:00Z"), h, Missed::Once).expect("ok").is_empty());
        e.enabled = true;
        e.one_off = true;
        e.last_run_at = Some(at("2026-05-01T23:59:50Z"));
        assert_eq!(e.due(at("2026-05-02T00:00:00Z"), h, Missed::Once).expect("ok").len(), 1);
    }

    #[test]
    fn validation_refuses_bad_expressions_and_zones() {
        assert!(matches!(validate(&Timing::Crontab { expr: "0 3 * *".into(), timezone: "UTC".into() }), Err(ScheduleError::Cron(_))));
        assert!(matches!(validate(&Timing::Crontab { expr: "0 3 * * *".into(), timezone: "Mars/Olympus".into() }), Err(ScheduleError::TimeZone(_))));
        assert_eq!(validate(&Timing::Interval { every_s: 0 }), Err(ScheduleError::Interval));
        assert_eq!(validate(&Timing::Interval { every_s: MAX_INTERVAL_S + 1 }), Err(ScheduleError::Interval));
        assert_eq!(validate(&Timing::Interval { every_s: MAX_INTERVAL_S }), Ok(()));
        assert!(validate(&Timing::Crontab { expr: "0 3 * * *".into(), timezone: "Europe/London".into() }).is_ok());
    }
}

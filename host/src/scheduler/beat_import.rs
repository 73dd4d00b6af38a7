//! `celer schedules import --from-django-celery-beat URL`: reads
//! django-celery-beat's tables (PostgreSQL or SQLite, as Django created them)
//! and turns each periodic task into a celer schedule. Crontab, interval and
//! clocked schedules map; solar schedules and tasks no plugin serves do not,
//! and are listed with the reason rather than dropped silently.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::schedule::{Schedule, Timing, validate};

/// One row of `django_celery_beat_periodictask` with its schedule joined in.
#[derive(Debug, Default)]
struct BeatRow {
    name: String,
    task: String,
    args: String,
    kwargs: String,
    queue: Option<String>,
    enabled: bool,
    one_off: bool,
    start_time: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
    last_run_at: Option<DateTime<Utc>>,
    total_run_count: i64,
    description: String,
    crontab: Option<[String; 6]>,
    interval: Option<(i64, String)>,
    clocked: Option<DateTime<Utc>>,
    solar: Option<String>,
}

/// What an import did.
#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub imported: Vec<String>,
    /// Periodic task name → why it was not imported.
    pub not_imported: BTreeMap<String, String>,
}

/// Why the source could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read django-celery-beat tables from {url}: {reason}")]
pub struct ImportError {
    pub url: String,
    pub reason: String,
}

const QUERY: &str = "
SELECT t.name, t.task, t.args, t.kwargs, t.queue, t.enabled, t.one_off,
       t.start_time, t.expires, t.last_run_at, t.total_run_count, t.description,
       c.minute, c.hour, c.day_of_month, c.month_of_year, c.day_of_week, c.timezone,
       i.every, i.period, k.clocked_time, s.event
  FROM django_celery_beat_periodictask t
  LEFT JOIN django_celery_beat_crontabschedule c ON c.id = t.crontab_id
  LEFT JOIN django_celery_beat_intervalschedule i ON i.id = t.interval_id
  LEFT JOIN django_celery_beat_clockedschedule k ON k.id = t.clocked_id
  LEFT JOIN django_celery_beat_solarschedule s ON s.id = t.solar_id
 ORDER BY t.name";

/// The crontab columns of a joined row (same on both backends), or none.
macro_rules! crontab_fields {
    ($r:expr) => {{
        let minute: Option<String> = $r.try_get("minute")?;
        match minute {
            None => None,
            Some(minute) => {
                let get = |c: &str| -> Result<String, sqlx::Error> { Ok($r.try_get::<Option<String>, _>(c)?.unwrap_or_else(|| "*".into())) };
                Some([minute, get("hour")?, get("day_of_month")?, get("month_of_year")?, get("day_of_week")?, get("timezone")?])
            }
        }
    }};
}

/// Reads every periodic task and maps it. `resolve` maps a Celery task name
/// to a celer task (through manifest aliases), or `None` when no plugin
/// serves it.
pub async fn import(url: &str, resolve: impl Fn(&str) -> Option<String>) -> Result<(Vec<Schedule>, ImportReport), ImportError> {
    let err = |reason: String| ImportError { url: redact(url), reason };
    let rows = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        read_postgres(url).await.map_err(|e| err(e.to_string()))?
    } else if url.starts_with("sqlite:") {
        read_sqlite(url).await.map_err(|e| err(e.to_string()))?
    } else {
        return Err(err("expected a postgres:// or sqlite:// URL".into()));
    };
    let mut report = ImportReport::default();
    let mut schedules = Vec::new();
    for row in rows {
        match map_row(&row, &resolve) {
            Ok(s) => {
                report.imported.push(s.name.clone());
                schedules.push(s);
            }
            Err(reason) => {
                report.not_imported.insert(row.name.clone(), reason);
            }
        }
    }
    Ok((schedules, report))
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

async fn read_postgres(url: &str) -> Result<Vec<BeatRow>, sqlx::Error> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await?;
    let rows = sqlx::query(QUERY).fetch_all(&pool).await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(BeatRow {
            name: r.try_get("name")?,
            task: r.try_get("task")?,
            args: r.try_get("args")?,
            kwargs: r.try_get("kwargs")?,
            queue: r.try_get("queue")?,
            enabled: r.try_get("enabled")?,
            one_off: r.try_get("one_off")?,
            start_time: r.try_get("start_time")?,
            expires: r.try_get("expires")?,
            last_run_at: r.try_get("last_run_at")?,
            total_run_count: i64::from(r.try_get::<i32, _>("total_run_count")?),
            description: r.try_get("description")?,
            crontab: crontab_fields!(r),
            interval: match r.try_get::<Option<i32>, _>("every")? {
                Some(every) => Some((i64::from(every), r.try_get::<String, _>("period")?)),
                None => None,
            },
            clocked: r.try_get("clocked_time")?,
            solar: r.try_get("event")?,
        });
    }
    pool.close().await;
    Ok(out)
}

/// Django's SQLite backend stores datetimes as `YYYY-MM-DD HH:MM:SS[.ffffff]` text in UTC.
fn sqlite_time(v: Option<String>) -> Option<DateTime<Utc>> {
    let v = v?;
    let v = v.trim_end_matches("+00:00");
    NaiveDateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S%.f").ok().map(|n| n.and_utc())
}

async fn read_sqlite(url: &str) -> Result<Vec<BeatRow>, sqlx::Error> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?.read_only(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
    let rows = sqlx::query(QUERY).fetch_all(&pool).await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(BeatRow {
            name: r.try_get("name")?,
            task: r.try_get("task")?,
            args: r.try_get("args")?,
            kwargs: r.try_get("kwargs")?,
            queue: r.try_get("queue")?,
            enabled: r.try_get::<i64, _>("enabled")? != 0,
            one_off: r.try_get::<i64, _>("one_off")? != 0,
            start_time: sqlite_time(r.try_get("start_time")?),
            expires: sqlite_time(r.try_get("expires")?),
            last_run_at: sqlite_time(r.try_get("last_run_at")?),
            total_run_count: r.try_get("total_run_count")?,
            description: r.try_get("description")?,
            crontab: crontab_fields!(r),
            interval: match r.try_get::<Option<i64>, _>("every")? {
                Some(every) => Some((every, r.try_get::<String, _>("period")?)),
                None => None,
            },
            clocked: sqlite_time(r.try_get("clocked_time")?),
            solar: r.try_get("event")?,
        });
    }
    pool.close().await;
    Ok(out)
}

fn map_row(row: &BeatRow, resolve: &impl Fn(&str) -> Option<String>) -> Result<Schedule, String> {
    let task = resolve(&row.task).ok_or_else(|| format!("no plugin serves task {:?} (add it to a manifest's aliases)", row.task))?;
    let timing = if let Some([minute, hour, dom, month, dow, tz]) = &row.crontab {
        Timing::Crontab { expr: format!("{minute} {hour} {dom} {month} {dow}"), timezone: if tz.is_empty() { "UTC".into() } else { tz.clone() } }
    } else if let Some((every, period)) = &row.interval {
        let unit: i64 = match period.as_str() {
            "days" => 86_400,
            "hours" => 3_600,
            "minutes" => 60,
            "seconds" => 1,
            other => return Err(format!("interval period {other:?} is not supported (celer's resolution is one second)")),
        };
        Timing::Interval { every_s: u64::try_from(every.saturating_mul(unit)).map_err(|_| "negative interval".to_string())? }
    } else if let Some(at) = row.clocked {
        Timing::Clocked { at }
    } else if let Some(event) = &row.solar {
        return Err(format!("solar schedules ({event}) have no celer equivalent"));
    } else {
        return Err("no schedule attached".into());
    };
    validate(&timing).map_err(|e| e.to_string())?;
    let json = |what: &str, text: &str, default: Value| -> Result<Value, String> {
        if text.trim().is_empty() {
            return Ok(default);
        }
        serde_json::from_str(text).map_err(|e| format!("{what} is not JSON: {e}"))
    };
    let args = json("args", &row.args, serde_json::json!([]))?;
    let kwargs = json("kwargs", &row.kwargs, serde_json::json!({}))?;
    if !args.is_array() || !kwargs.is_object() {
        return Err("args must be a JSON array and kwargs an object".into());
    }
    Ok(Schedule {
        name: row.name.clone(),
        task,
        args,
        kwargs,
        queue: row.queue.clone().filter(|q| !q.is_empty()).unwrap_or_else(|| crate::job::DEFAULT_QUEUE.to_string()),
        one_off: row.one_off || matches!(timing, Timing::Clocked { .. }),
        timing,
        enabled: row.enabled,
        start_time: row.start_time,
        expires: row.expires,
        last_run_at: row.last_run_at,
        total_run_count: u64::try_from(row.total_run_count).unwrap_or(0),
        description: row.description.clone(),
        source: "django-celery-beat".into(),
        created_at: Utc::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(t: &str) -> Option<String> {
        (t == "apps.events.tasks.mark_ended_events_as_completed").then(|| "events.complete_ended".to_string())
    }

    #[test]
    fn crontab_interval_clocked_map_and_the_rest_is_explained() {
        let base = BeatRow { name: "n".into(), task: "apps.events.tasks.mark_ended_events_as_completed".into(), args: "[]".into(), kwargs: "{}".into(), enabled: true, ..Default::default() };
        let cron = BeatRow { crontab: Some(["0".into(), "3".into(), "*".into(), "*".into(), "*".into(), "Europe/London".into()]), ..base_clone(&base) };
        let s = map_row(&cron, &resolve).expect("maps");
        assert_eq!(s.task, "events.complete_ended");
        assert_eq!(s.timing, Timing::Crontab { expr: "0 3 * * *".into(), timezone: "Europe/London".into() });
        let every = BeatRow { interval: Some((5, "minutes".into())), ..base_clone(&base) };
        assert_eq!(map_row(&every, &resolve).expect("maps").timing, Timing::Interval { every_s: 300 });
        let micro = BeatRow { interval: Some((5, "microseconds".into())), ..base_clone(&base) };
        assert!(map_row(&micro, &resolve).expect_err("unsupported").contains("microseconds"));
        let solar = BeatRow { solar: Some("sunset".into()), ..base_clone(&base) };
        assert!(map_row(&solar, &resolve).expect_err("no solar").contains("solar"));
        let unknown = BeatRow { task: "celery.backend_cleanup".into(), interval: Some((1, "days".into())), ..base_clone(&base) };
        assert!(map_row(&unknown, &resolve).expect_err("unmapped").contains("no plugin serves"));
    }

    fn base_clone(b: &BeatRow) -> BeatRow {
        BeatRow { name: b.name.clone(), task: b.task.clone(), args: b.args.clone(), kwargs: b.kwargs.clone(), enabled: b.enabled, ..Default::default() }
    }

    #[test]
    fn django_sqlite_times_parse_as_utc() {
        assert_eq!(sqlite_time(Some("2026-11-24 03:00:00.123456".into())).map(|t| t.to_rfc3339()), Some("2026-11-24T03:00:00.123456+00:00".into()));
        assert_eq!(sqlite_time(Some("2026-11-24 03:00:00".into())).map(|t| t.timestamp()), Some(1_795_489_200));
        assert_eq!(redact("postgres://u:secret@db:5432/app"), "postgres://…@db:5432/app");
    }
}

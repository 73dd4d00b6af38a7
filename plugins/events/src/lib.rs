//! `events`: the event lifecycle of the seeds.
//!
//! * `events.complete_ended`: CONFIRMED or ONGOING events whose `end_date` is
//!   past become COMPLETED, in one bulk UPDATE; returns the count (the
//!   seeds' `mark_ended_events_as_completed`).
//! * `events.archive_completed`: COMPLETED events that ended more than
//!   `archive_after_days` (90) ago become ARCHIVED, in one bulk UPDATE.
//! * `events.send_reminders`: for every CONFIRMED event starting within
//!   `reminder_window_hours` (24), one reminder per attendee, never twice.
//!
//! "Now" is the sandbox's clock (UTC), bound as a timestamp parameter, so
//! the comparison is the same on PostgreSQL and SQLite and does not depend
//! on any time zone setting.
//!
//! Never twice: each reminder is enqueued as `email.send` with the
//! idempotency key `events.reminder:<attendee id>` and then the attendee's
//! `reminder_sent_at` is set (only where it is still NULL). A run that dies
//! between the two enqueues the same key again on its next run, which the
//! broker answers with the first job; a run after the mark skips the
//! attendee. The enqueue and the mark are deliberately not one database
//! transaction: on the embedded default the queue lives in the same SQLite
//! file, and a write transaction held across the enqueue would block it.

use celer_plugin::database::{self, Value as Db};
use celer_plugin::time::{self, DAY, HOUR};
use celer_plugin::{Context, EnqueueOptions, TaskError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

celer_plugin::plugin! {
    name: "events",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "events.complete_ended" => complete_ended,
        "events.archive_completed" => archive_completed,
        "events.send_reminders" => send_reminders,
    }
}

/// The manifest's `[config]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub archive_after_days: u32,
    pub reminder_window_hours: u32,
    /// Attendees per page of `send_reminders`.
    pub batch_size: u32,
    /// The task that mails a reminder.
    pub email_task: String,
    /// Where a reminder links to: `{event_id}` is replaced (optional).
    pub event_url: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            archive_after_days: 90,
            reminder_window_hours: 24,
            batch_size: 200,
            email_task: "email.send".into(),
            event_url: None,
        }
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Updated {
    pub updated: u64,
    /// The time bound used, UTC.
    pub before: String,
}

pub const COMPLETE_ENDED: &str = "UPDATE events SET status = 'COMPLETED', updated_at = $1 \
     WHERE status IN ('CONFIRMED', 'ONGOING') AND end_date < $1";

fn complete_ended(ctx: &Context, (): ()) -> Result<Updated, TaskError> {
    let now = time::now_micros();
    let updated = database::execute(COMPLETE_ENDED, &[Db::Timestamp(now)])?;
    ctx.info(format!("events.complete_ended: {updated} events completed"));
    Ok(Updated { updated, before: time::format_utc(now) })
}

pub const ARCHIVE_COMPLETED: &str = "UPDATE events SET status = 'ARCHIVED', updated_at = $1 \
     WHERE status = 'COMPLETED' AND end_date < $2";

fn archive_completed(ctx: &Context, (): ()) -> Result<Updated, TaskError> {
    let config: Config = ctx.config()?;
    let now = time::now_micros();
    let before = now - i64::from(config.archive_after_days) * DAY;
    let updated = database::execute(ARCHIVE_COMPLETED, &[Db::Timestamp(now), Db::Timestamp(before)])?;
    ctx.info(format!("events.archive_completed: {updated} events archived"));
    Ok(Updated { updated, before: time::format_utc(before) })
}

pub const DUE_REMINDERS: &str = "SELECT a.id, a.user_id, e.id, e.name, e.start_date \
     FROM event_attendees a JOIN events e ON e.id = a.event_id \
     WHERE e.status = 'CONFIRMED' AND e.start_date >= $1 AND e.start_date < $2 \
     AND a.reminder_sent_at IS NULL AND a.id > $3 \
     ORDER BY a.id LIMIT $4";

#[derive(Debug, Serialize, PartialEq)]
pub struct Reminded {
    /// Reminders enqueued (one per attendee).
    pub reminders: u64,
    /// Attendees marked as reminded.
    pub marked: u64,
    pub window_start: String,
    pub window_end: String,
}

/// One attendee due a reminder.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    pub attendee_id: i64,
    pub user_id: i64,
    pub event_id: i64,
    pub event_name: String,
    pub starts_at: i64,
}

impl Due {
    fn from_row(row: &[Db]) -> Option<Due> {
        Some(Due {
            attendee_id: row.first()?.as_i64()?,
            user_id: row.get(1)?.as_i64()?,
            event_id: row.get(2)?.as_i64()?,
            event_name: row.get(3)?.as_str()?.to_owned(),
            starts_at: row.get(4)?.as_micros()?,
        })
    }
}

/// The `email.send` kwargs of one reminder (template `notification`).
pub fn reminder_kwargs(config: &Config, due: &Due) -> Value {
    let when = time::to_civil(due.starts_at);
    let when = format!("{:04}-{:02}-{:02} {:02}:{:02} UTC", when.year, when.month, when.day, when.hour, when.minute);
    let url = config.event_url.as_ref().map(|u| u.replace("{event_id}", &due.event_id.to_string()));
    json!({
        "template": "notification",
        "user_id": due.user_id,
        "context": {
            "title": format!("Reminder: {}", due.event_name),
            "message": format!("{} starts at {when}.", due.event_name),
            "url": url,
            "event_id": due.event_id,
            "starts_at": time::format_utc(due.starts_at),
        },
    })
}

fn send_reminders(ctx: &Context, (): ()) -> Result<Reminded, TaskError> {
    let config: Config = ctx.config()?;
    let now = time::now_micros();
    let end = now + i64::from(config.reminder_window_hours) * HOUR;
    let batch = config.batch_size.clamp(1, 1000);
    let mut result =
        Reminded { reminders: 0, marked: 0, window_start: time::format_utc(now), window_end: time::format_utc(end) };
    let mut after = 0_i64;
    loop {
        let rows = database::query_all(
            DUE_REMINDERS,
            &[Db::Timestamp(now), Db::Timestamp(end), Db::Int(after), Db::Int(batch.into())],
        )?;
        let Some(last) = rows.last() else { break };
        after = last.first().and_then(Db::as_i64).unwrap_or(i64::MAX);
        let due: Vec<Due> = rows.iter().filter_map(|r| Due::from_row(r)).collect();
        for d in &due {
            let options = EnqueueOptions::new().idempotency_key(format!("events.reminder:{}", d.attendee_id));
            ctx.enqueue_with(&config.email_task, (), reminder_kwargs(&config, d), &options)?;
            result.reminders += 1;
        }
        if !due.is_empty() {
            let ids: Vec<Db> = due.iter().map(|d| Db::Int(d.attendee_id)).collect();
            let sql = format!(
                "UPDATE event_attendees SET reminder_sent_at = $1 WHERE reminder_sent_at IS NULL AND id IN ({})",
                (2..2 + ids.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
            );
            let mut params = Vec::with_capacity(ids.len() + 1);
            params.push(Db::Timestamp(now));
            params.extend(ids);
            result.marked += database::execute(&sql, &params)?;
        }
        ctx.progress(result.reminders, result.reminders);
        if rows.len() < batch as usize {
            break;
        }
    }
    ctx.info(format!("events.send_reminders: {} reminders enqueued", result.reminders));
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reminder_names_the_event_and_its_utc_start() {
        let due = Due {
            attendee_id: 3,
            user_id: 9,
            event_id: 5,
            event_name: "Retro".into(),
            starts_at: time::parse_utc("2026-11-22T14:30:00+01:00").unwrap(),
        };
        let config = Config { event_url: Some("https://app.test/events/{event_id}".into()), ..Config::default() };
        let k = reminder_kwargs(&config, &due);
        assert_eq!(k["template"], "notification");
        assert_eq!(k["user_id"], 9);
        assert_eq!(k["context"]["title"], "Reminder: Retro");
        assert_eq!(k["context"]["message"], "Retro starts at 2026-11-22 13:30 UTC.");
        assert_eq!(k["context"]["url"], "https://app.test/events/5");
        assert_eq!(reminder_kwargs(&Config::default(), &due)["context"]["url"], Value::Null);
    }

    #[test]
    fn rows_from_either_backend_make_a_due_reminder() {
        let sqlite = [Db::Int(1), Db::Int(2), Db::Int(3), Db::Text("E".into()), Db::Text("2026-11-22T12:00:00.000000Z".into())];
        let postgres = [Db::Int(1), Db::Int(2), Db::Int(3), Db::Text("E".into()), Db::Timestamp(time::parse_utc("2026-11-22T12:00:00Z").unwrap())];
        assert_eq!(Due::from_row(&sqlite), Due::from_row(&postgres));
        assert!(Due::from_row(&sqlite).is_some());
        assert_eq!(Due::from_row(&sqlite[..3]), None);
    }

    #[test]
    fn status_updates_only_touch_the_states_they_name() {
        assert!(COMPLETE_ENDED.contains("status IN ('CONFIRMED', 'ONGOING')") && COMPLETE_ENDED.contains("end_date < $1"));
        assert!(ARCHIVE_COMPLETED.contains("status = 'COMPLETED'") && ARCHIVE_COMPLETED.contains("end_date < $2"));
        assert!(DUE_REMINDERS.contains("reminder_sent_at IS NULL"));
    }
}

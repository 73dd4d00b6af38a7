//! Where schedules live (the SQLite file of the embedded default, beside the
//! queue), and the leader lock that lets every host run the scheduler role
//! while only one of them ticks at a time. The per-tick idempotency key on
//! the enqueued job is what makes each tick fire exactly once; the lock only
//! keeps the hosts from doing the same work.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::Row;

use super::schedule::{Schedule, Timing};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("schedule store unavailable: {0}")]
    Unavailable(String),
    #[error("a schedule named {0:?} already exists")]
    Exists(String),
    #[error("corrupt schedule {name}: {reason}")]
    Corrupt { name: String, reason: String },
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The schedule table and the leader lock.
#[derive(Clone)]
pub struct ScheduleStore {
    pool: SqlitePool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS celer_schedules (
    name            TEXT PRIMARY KEY,
    task            TEXT NOT NULL,
    args            TEXT NOT NULL,
    kwargs          TEXT NOT NULL,
    queue           TEXT NOT NULL,
    timing          TEXT NOT NULL,
    enabled         INTEGER NOT NULL,
    one_off         INTEGER NOT NULL,
    start_time      INTEGER,
    expires         INTEGER,
    last_run_at     INTEGER,
    total_run_count INTEGER NOT NULL DEFAULT 0,
    description     TEXT NOT NULL DEFAULT '',
    source          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS celer_locks (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
";

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|m| Utc.timestamp_millis_opt(m).single())
}

impl ScheduleStore {
    /// Opens (and creates) the tables in the SQLite file at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await.map_err(db)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.map_err(db)?;
        Ok(ScheduleStore { pool })
    }

    fn row(r: &SqliteRow) -> Result<Schedule, StoreError> {
        let name: String = r.try_get("name").map_err(db)?;
        let corrupt = |reason: String| StoreError::Corrupt { name: name.clone(), reason };
        let json = |col: &str| -> Result<serde_json::Value, StoreError> {
            let text: String = r.try_get(col).map_err(db)?;
            serde_json::from_str(&text).map_err(|e| corrupt(format!("{col}: {e}")))
        };
        let timing: Timing = serde_json::from_value(json("timing")?).map_err(|e| corrupt(format!("timing: {e}")))?;
        Ok(Schedule {
            task: r.try_get("task").map_err(db)?,
            args: json("args")?,
            kwargs: json("kwargs")?,
            queue: r.try_get("queue").map_err(db)?,
            timing,
            enabled: r.try_get::<i64, _>("enabled").map_err(db)? != 0,
            one_off: r.try_get::<i64, _>("one_off").map_err(db)? != 0,
            start_time: from_ms(r.try_get("start_time").map_err(db)?),
            expires: from_ms(r.try_get("expires").map_err(db)?),
            last_run_at: from_ms(r.try_get("last_run_at").map_err(db)?),
            total_run_count: u64::try_from(r.try_get::<i64, _>("total_run_count").map_err(db)?).unwrap_or(0),
            description: r.try_get("description").map_err(db)?,
            source: r.try_get("source").map_err(db)?,
            created_at: from_ms(r.try_get("created_at").map_err(db)?).unwrap_or_else(Utc::now),
            name,
        })
    }

    /// Every schedule, by name.
    pub async fn list(&self) -> Result<Vec<Schedule>, StoreError> {
        let rows = sqlx::query("SELECT * FROM celer_schedules ORDER BY name").fetch_all(&self.pool).await.map_err(db)?;
        rows.iter().map(Self::row).collect()
    }

    /// One schedule.
    pub async fn get(&self, name: &str) -> Result<Option<Schedule>, StoreError> {
        let row = sqlx::query("SELECT * FROM celer_schedules WHERE name = ?1").bind(name).fetch_optional(&self.pool).await.map_err(db)?;
        row.as_ref().map(Self::row).transpose()
    }

    /// Stores a new schedule; `replace` overwrites one of the same name,
    /// otherwise an existing name is an error.
    pub async fn insert(&self, s: &Schedule, replace: bool) -> Result<(), StoreError> {
        let done = self.write(replace, s).await?;
        if !done && !replace {
            return Err(StoreError::Exists(s.name.clone()));
        }
        Ok(())
    }

    /// Stores a schedule unless one of that name exists (a plugin's default
    /// schedule must not overwrite the operator's edits). True if stored.
    pub async fn insert_if_absent(&self, s: &Schedule) -> Result<bool, StoreError> {
        self.write(false, s).await
    }

    async fn write(&self, replace: bool, s: &Schedule) -> Result<bool, StoreError> {
        macro_rules! insert {
            ($verb:literal) => {
                concat!(
                    $verb,
                    " INTO celer_schedules (name, task, args, kwargs, queue, timing, enabled, one_off, start_time, expires,
                        last_run_at, total_run_count, description, source, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                )
            };
        }
        let timing = serde_json::to_string(&s.timing).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let sql = if replace { insert!("INSERT OR REPLACE") } else { insert!("INSERT OR IGNORE") };
        let r = sqlx::query(sql)
            .bind(&s.name)
            .bind(&s.task)
            .bind(s.args.to_string())
            .bind(s.kwargs.to_string())
            .bind(&s.queue)
            .bind(timing)
            .bind(i64::from(s.enabled))
            .bind(i64::from(s.one_off))
            .bind(s.start_time.map(ms))
            .bind(s.expires.map(ms))
            .bind(s.last_run_at.map(ms))
            .bind(i64::try_from(s.total_run_count).unwrap_or(i64::MAX))
            .bind(&s.description)
            .bind(&s.source)
            .bind(ms(s.created_at))
            .bind(ms(Utc::now()))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Enables or disables a schedule; false when there is none of that name.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE celer_schedules SET enabled = ?1, updated_at = ?2 WHERE name = ?3")
            .bind(i64::from(enabled))
            .bind(ms(Utc::now()))
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Deletes a schedule; false when there is none of that name.
    pub async fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM celer_schedules WHERE name = ?1").bind(name).execute(&self.pool).await.map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a fired tick: last_run_at moves forward only, the count grows
    /// when the tick was newly enqueued, and a one-off schedule is disabled.
    pub async fn mark_run(&self, name: &str, fired: DateTime<Utc>, counted: bool, disable: bool) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE celer_schedules
                SET last_run_at = MAX(COALESCE(last_run_at, ?1), ?1),
                    total_run_count = total_run_count + ?2,
                    enabled = CASE WHEN ?3 THEN 0 ELSE enabled END,
                    updated_at = ?4
              WHERE name = ?5",
        )
        .bind(ms(fired))
        .bind(i64::from(counted))
        .bind(disable)
        .bind(ms(Utc::now()))
        .bind(name)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Takes or renews the scheduler lock for `owner`; true while it leads.
    pub async fn try_lead(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = ms(Utc::now());
        let until = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let r = sqlx::query(
            "INSERT INTO celer_locks (name, owner, expires_at) VALUES ('scheduler', ?1, ?2)
             ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
              WHERE celer_locks.owner = excluded.owner OR celer_locks.expires_at < ?3",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the lock up at shutdown so another host takes over at once.
    pub async fn resign(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM celer_locks WHERE name = 'scheduler' AND owner = ?1").bind(owner).execute(&self.pool).await.map_err(db)?;
        Ok(())
    }
}

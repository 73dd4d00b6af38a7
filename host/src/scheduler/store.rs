//! Where schedules live — the database: PostgreSQL when `DATABASE_URL`
//! names one (so every host sees the same schedules), else the SQLite file
//! of the embedded default — and the leader lock that lets every host run
//! the scheduler role while only one of them ticks at a time. The per-tick
//! idempotency key on the enqueued job is what makes each tick fire exactly
//! once; the lock only keeps the hosts from doing the same work.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

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

/// A `celer_schedules` row (same columns and types on both backends) as a [`Schedule`].
macro_rules! schedule_from_row {
    ($r:expr) => {{
        let r = $r;
        (|| -> Result<Schedule, StoreError> {
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
        })()
    }};
}

/// Runs one statement on whichever backend the store has. Every statement
/// is written once, in SQL both accept: `$n` placeholders appearing in
/// increasing order (SQLite numbers `$n` by first appearance), 64-bit
/// integers for times and flags, `ON CONFLICT` upserts.
macro_rules! on_pool {
    ($pool:expr, $sql:expr, [$($bind:expr),*], $run:ident) => {
        match $pool {
            Pool::Sqlite(p) => sqlx::query($sql)$(.bind($bind))*.$run(p).await.map(Rows::from),
            Pool::Postgres(p) => sqlx::query($sql)$(.bind($bind))*.$run(p).await.map(Rows::from),
        }
    };
}

/// The schedule table and the leader lock.
#[derive(Clone)]
pub struct ScheduleStore {
    pool: Pool,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// What a statement returned, whichever the backend.
enum Rows {
    Affected(u64),
    Schedules(Vec<Result<Schedule, StoreError>>),
}

impl From<sqlx::sqlite::SqliteQueryResult> for Rows {
    fn from(r: sqlx::sqlite::SqliteQueryResult) -> Self {
        Rows::Affected(r.rows_affected())
    }
}

impl From<sqlx::postgres::PgQueryResult> for Rows {
    fn from(r: sqlx::postgres::PgQueryResult) -> Self {
        Rows::Affected(r.rows_affected())
    }
}

impl From<Vec<sqlx::sqlite::SqliteRow>> for Rows {
    fn from(rows: Vec<sqlx::sqlite::SqliteRow>) -> Self {
        Rows::Schedules(rows.iter().map(|r| schedule_from_row!(r)).collect())
    }
}

impl From<Vec<sqlx::postgres::PgRow>> for Rows {
    fn from(rows: Vec<sqlx::postgres::PgRow>) -> Self {
        Rows::Schedules(rows.iter().map(|r| schedule_from_row!(r)).collect())
    }
}

impl Rows {
    fn affected(self) -> u64 {
        match self {
            Rows::Affected(n) => n,
            Rows::Schedules(s) => s.len() as u64,
        }
    }

    fn schedules(self) -> Result<Vec<Schedule>, StoreError> {
        match self {
            Rows::Schedules(s) => s.into_iter().collect(),
            Rows::Affected(_) => Ok(Vec::new()),
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS celer_schedules (
    name            TEXT PRIMARY KEY,
    task            TEXT NOT NULL,
    args            TEXT NOT NULL,
    kwargs          TEXT NOT NULL,
    queue           TEXT NOT NULL,
    timing          TEXT NOT NULL,
    enabled         BIGINT NOT NULL,
    one_off         BIGINT NOT NULL,
    start_time      BIGINT,
    expires         BIGINT,
    last_run_at     BIGINT,
    total_run_count BIGINT NOT NULL DEFAULT 0,
    description     TEXT NOT NULL DEFAULT '',
    source          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS celer_locks (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
";

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|m| Utc.timestamp_millis_opt(m).single())
}

impl ScheduleStore {
    /// Opens the store in the database at `url` (`postgres://…` or
    /// `sqlite://path`) and creates its tables when missing.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Pool::Postgres(PgPoolOptions::new().max_connections(2).connect(url).await.map_err(db)?)
        } else {
            let path = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
            if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
            }
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
                .map_err(db)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10));
            Pool::Sqlite(SqlitePoolOptions::new().max_connections(2).connect_with(options).await.map_err(db)?)
        };
        match &pool {
            Pool::Sqlite(p) => sqlx::raw_sql(SCHEMA).execute(p).await.map(|_| ()),
            Pool::Postgres(p) => sqlx::raw_sql(SCHEMA).execute(p).await.map(|_| ()),
        }
        .map_err(db)?;
        Ok(ScheduleStore { pool })
    }

    /// Every schedule, by name.
    pub async fn list(&self) -> Result<Vec<Schedule>, StoreError> {
        on_pool!(&self.pool, "SELECT * FROM celer_schedules ORDER BY name", [], fetch_all).map_err(db)?.schedules()
    }

    /// One schedule.
    pub async fn get(&self, name: &str) -> Result<Option<Schedule>, StoreError> {
        let mut found = on_pool!(&self.pool, "SELECT * FROM celer_schedules WHERE name = $1", [name], fetch_all).map_err(db)?.schedules()?;
        Ok(found.pop())
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
            ($on_conflict:literal) => {
                concat!(
                    "INSERT INTO celer_schedules (name, task, args, kwargs, queue, timing, enabled, one_off, start_time, expires,
                        last_run_at, total_run_count, description, source, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) ON CONFLICT (name) ",
                    $on_conflict
                )
            };
        }
        let timing = serde_json::to_string(&s.timing).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let sql = if replace {
            insert!("DO UPDATE SET task = excluded.task, args = excluded.args, kwargs = excluded.kwargs, queue = excluded.queue,
                timing = excluded.timing, enabled = excluded.enabled, one_off = excluded.one_off, start_time = excluded.start_time,
                expires = excluded.expires, last_run_at = excluded.last_run_at, total_run_count = excluded.total_run_count,
                description = excluded.description, source = excluded.source, updated_at = excluded.updated_at")
        } else {
            insert!("DO NOTHING")
        };
        let rows = on_pool!(&self.pool, sql, [
            s.name.as_str(), s.task.as_str(), s.args.to_string(), s.kwargs.to_string(), s.queue.as_str(), timing.as_str(),
            i64::from(s.enabled), i64::from(s.one_off), s.start_time.map(ms), s.expires.map(ms), s.last_run_at.map(ms),
            i64::try_from(s.total_run_count).unwrap_or(i64::MAX), s.description.as_str(), s.source.as_str(),
            ms(s.created_at), ms(Utc::now())
        ], execute)
        .map_err(db)?;
        Ok(rows.affected() == 1)
    }

    /// Enables or disables a schedule; false when there is none of that name.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        let sql = "UPDATE celer_schedules SET enabled = $1, updated_at = $2 WHERE name = $3";
        let rows = on_pool!(&self.pool, sql, [i64::from(enabled), ms(Utc::now()), name], execute).map_err(db)?;
        Ok(rows.affected() == 1)
    }

    /// Deletes a schedule; false when there is none of that name.
    pub async fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let rows = on_pool!(&self.pool, "DELETE FROM celer_schedules WHERE name = $1", [name], execute).map_err(db)?;
        Ok(rows.affected() == 1)
    }

    /// Records a fired tick: last_run_at moves forward only, the count grows
    /// when the tick was newly enqueued, and a one-off schedule is disabled.
    pub async fn mark_run(&self, name: &str, fired: DateTime<Utc>, counted: bool, disable: bool) -> Result<(), StoreError> {
        let sql = "UPDATE celer_schedules
                SET last_run_at = CASE WHEN last_run_at IS NULL OR last_run_at < $1 THEN $1 ELSE last_run_at END,
                    total_run_count = total_run_count + $2,
                    enabled = CASE WHEN $3 = 1 THEN 0 ELSE enabled END,
                    updated_at = $4
              WHERE name = $5";
        on_pool!(&self.pool, sql, [ms(fired), i64::from(counted), i64::from(disable), ms(Utc::now()), name], execute).map_err(db)?;
        Ok(())
    }

    /// Takes or renews the scheduler lock for `owner`; true while it leads.
    pub async fn try_lead(&self, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = ms(Utc::now());
        let until = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let sql = "INSERT INTO celer_locks (name, owner, expires_at) VALUES ('scheduler', $1, $2)
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
              WHERE celer_locks.owner = excluded.owner OR celer_locks.expires_at < $3";
        let rows = on_pool!(&self.pool, sql, [owner, until, now], execute).map_err(db)?;
        Ok(rows.affected() == 1)
    }

    /// Gives the lock up at shutdown so another host takes over at once.
    pub async fn resign(&self, owner: &str) -> Result<(), StoreError> {
        on_pool!(&self.pool, "DELETE FROM celer_locks WHERE name = 'scheduler' AND owner = $1", [owner], execute).map_err(db)?;
        Ok(())
    }
}

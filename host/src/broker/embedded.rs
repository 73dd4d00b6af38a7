//! The embedded broker: the queue, leases, retries, dead letters and results
//! in one SQLite file, so that a single machine runs celer with nothing else
//! to install. `celer serve` and every `celer` CLI invocation open the same
//! file at once, so all coordination goes through SQLite itself: WAL
//! journal (readers never block the writer), a busy timeout (writers queue
//! up instead of failing), and every multi-statement change in a
//! `BEGIN IMMEDIATE` transaction (it takes the write lock up front, so two
//! processes can never both read "job X is free" and both take it).
//!
//! # Leases in SQL
//!
//! A running job carries `lease_token` (random, new for every delivery) and
//! `lease_until` (ms since the epoch). [`Broker::fetch`] runs, in one write
//! transaction:
//!
//! 1. pending jobs (or running ones whose lease ran out) past their
//!    `expires_at` turn `expired`;
//! 2. running jobs whose lease ran out and whose stop was requested turn
//!    `cancelled`; those with no retry left turn `failed` with kind `lost`;
//! 3. one `UPDATE … WHERE id IN (SELECT … ORDER BY priority DESC, run_at, id
//!    LIMIT max) RETURNING *` leases the due jobs: state `running`, a fresh
//!    token, `lease_until = now + lease`. A job whose lease ran out is simply
//!    due again; taking it over counts as a new attempt (`attempt + 1`).
//!
//! Every later write for that delivery (`renew`, `progress`, `complete`,
//! `release`) carries `WHERE id = ? AND lease_token = ? AND state =
//! 'running'`: once a job was handed to someone else the old token matches
//! nothing, so a worker that lost its lease cannot overwrite the outcome.
//!
//! Times are stored as integer milliseconds since the Unix epoch; JSON values
//! (args, kwargs, result, touched) as JSON text.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{
    Broker, BrokerError, CancelOutcome, Delivery, Enqueued, FetchRequest, HostInfo, Lease,
    LeaseStatus, Outcome, QueueStats, RunRecord,
};
use crate::job::{ErrorKind, Job, JobError, JobState, JobStatus, NewJob, Progress};

/// Bumped with every change to [`SCHEMA`]; stored in `celer_meta`.
const SCHEMA_VERSION: i64 = 2;
/// How long a writer waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per process; SQLite has one writer at a time anyway.
const POOL_SIZE: u32 = 4;

/// Idempotent: run on every open, inside a write transaction.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS celer_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS celer_jobs (
    id               TEXT PRIMARY KEY NOT NULL,
    task             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    args             TEXT NOT NULL,
    kwargs           TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_retries      INTEGER NOT NULL,
    state            TEXT NOT NULL,
    run_at           INTEGER NOT NULL,
    eta              INTEGER,
    expires_at       INTEGER,
    timeout_ms       INTEGER,
    idempotency_key  TEXT UNIQUE,
    parent_id        TEXT,
    root_id          TEXT,
    enqueued_at      INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    lease_token      TEXT,
    lease_until      INTEGER,
    host             TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result           TEXT,
    error_kind       TEXT,
    error_message    TEXT,
    progress_done    INTEGER,
    progress_total   INTEGER,
    plugin           TEXT,
    plugin_version   TEXT,
    touched          TEXT,
    log              TEXT,
    dead_at          INTEGER
);
CREATE INDEX IF NOT EXISTS celer_jobs_fetch ON celer_jobs (state, queue, priority DESC, run_at);
"#;

// The statements of `fetch`. Each names `state IN (…)` first so that it
// walks the `celer_jobs_fetch` index instead of the whole (ever growing)
// table of finished jobs.

/// ?1 now.
const EXPIRE: &str = "
UPDATE celer_jobs
   SET state = 'expired', finished_at = ?1, lease_token = NULL, lease_until = NULL
 WHERE state IN ('queued', 'scheduled', 'retrying', 'running')
   AND expires_at < ?1
   AND (state <> 'running' OR lease_until < ?1)";

/// ?1 now. A stop was requested but the host running it vanished.
const CANCEL_ABANDONED: &str = "
UPDATE celer_jobs
   SET state = 'cancelled', finished_at = ?1, lease_token = NULL, lease_until = NULL,
       error_kind = 'cancelled', error_message = 'cancelled while its host was gone'
 WHERE state = 'running' AND lease_until < ?1 AND cancel_requested = 1";

/// ?1 now. Taking it over would be one attempt too many.
const FAIL_LOST: &str = "
UPDATE celer_jobs
   SET state = 'failed', finished_at = ?1, dead_at = ?1, lease_token = NULL, lease_until = NULL,
       error_kind = 'lost', error_message = 'lease expired on every attempt (host died?)'
 WHERE state = 'running' AND lease_until < ?1 AND attempt + 1 > max_retries";

/// ?1 now, ?2 lease_until, ?3 host, ?4 queues (JSON array), ?5 excluded tasks
/// (JSON array), ?6 max; the tokens given select the ids. In `SET`, `state`
/// and `attempt` are the old values.
macro_rules! lease_sql {
    ($($pick:tt)*) => {
        concat!(
            "
UPDATE celer_jobs
   SET state = 'running',
       attempt = attempt + (CASE WHEN state = 'running' THEN 1 ELSE 0 END),
       lease_token = lower(hex(randomblob(16))),
       lease_until = ?2,
       host = ?3,
       started_at = ?1,
       finished_at = NULL,
       cancel_requested = 0,
       progress_done = NULL,
       progress_total = NULL
 WHERE id IN (",
            $($pick)*,
            ")
RETURNING *"
        )
    };
}

/// `SELECT <columns>` of the jobs a fetch may take (due, not excluded).
macro_rules! due_jobs {
    ($columns:literal) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM celer_jobs
        WHERE state IN ('queued', 'scheduled', 'retrying', 'running')
          AND queue IN (SELECT value FROM json_each(?4))
          AND (CASE WHEN state = 'running' THEN lease_until < ?1 ELSE run_at <= ?1 END)
          AND task NOT IN (SELECT value FROM json_each(?5))
        ORDER BY priority DESC, run_at, id"
        )
    };
}

const LEASE: &str = lease_sql!(due_jobs!("id"), " LIMIT ?6");

/// [`LEASE`] with ?7, the plugins with little room (a JSON object: task →
/// `[plugin index, free slots]`): no more of a plugin's jobs than it has
/// room for. It looks at the first 1 024 due jobs at most, which bounds
/// its work on a queue full of jobs it cannot run now.
const LEASE_LIMITED: &str = lease_sql!(
    "SELECT id FROM (
       SELECT d.id, d.priority, d.run_at, json_extract(r.value, '$[1]') AS free,
              ROW_NUMBER() OVER (PARTITION BY json_extract(r.value, '$[0]') ORDER BY d.priority DESC, d.run_at, d.id) AS nth
         FROM (",
    due_jobs!("id, task, priority, run_at"),
    " LIMIT 1024) d
         LEFT JOIN json_each(?7) r ON r.key = d.task)
     WHERE free IS NULL OR nth <= free
     ORDER BY priority DESC, run_at, id
     LIMIT ?6"
);

/// ?1 now, ?2 reason, ?3 id. A row that cannot be read back must not block
/// the queue: it goes to the dead letters with the reason.
const BURY_UNREADABLE: &str = "
UPDATE celer_jobs
   SET state = 'failed', finished_at = ?1, dead_at = ?1, lease_token = NULL, lease_until = NULL,
       error_kind = 'invalid-args', error_message = ?2
 WHERE id = ?3";

/// A broker on a SQLite file; cheap to clone (a connection pool).
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    /// Reads (status, lists, stats).
    pool: SqlitePool,
    /// Every write goes through this one connection, so writers of this
    /// process queue up in order instead of colliding on SQLite's write
    /// lock and sleeping in its busy handler (which cut throughput by 10×).
    /// Other processes still meet the busy timeout, as they must.
    writer: SqlitePool,
    /// Stop requests made through this process (the HTTP API of the host
    /// that runs the job), so its worker stops the job at once; one made
    /// by another process (`celer cancel`) arrives with the next renewal.
    stops: tokio::sync::broadcast::Sender<String>,
}

impl EmbeddedBroker {
    /// Opens (creating it and its directory when missing) the SQLite file at
    /// `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, BrokerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                BrokerError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);

        // Switching a new file to WAL needs an exclusive lock that the busy
        // timeout does not wait for: when two processes create the file at
        // the same moment, one of them retries for a little while.
        let mut tries = 0u64;
        let pool = loop {
            let opened = SqlitePoolOptions::new()
                .max_connections(POOL_SIZE)
                .connect_with(options.clone())
                .await;
            match opened {
                Ok(pool) => break pool,
                Err(e) if is_locked(&e) && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10 * tries.min(10))).await;
                }
                Err(e) => {
                    return Err(BrokerError::Unavailable(format!(
                        "cannot open {}: {e}",
                        path.display()
                    )));
                }
            }
        };
        migrate(&pool).await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        Ok(EmbeddedBroker { pool, writer, stops: tokio::sync::broadcast::channel(super::STOP_REQUESTS_BUFFER).0 })
    }

    /// Like [`EmbeddedBroker::open`], from a `sqlite://path` or
    /// `sqlite:path` URL (`sqlite:///abs/path` for an absolute path).
    pub async fn open_url(url: &str) -> Result<Self, BrokerError> {
        let path =
            url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).ok_or_else(
                || BrokerError::Invalid(format!("not a sqlite URL (sqlite://path): {url}")),
            )?;
        if path.is_empty() || path.starts_with(":memory:") {
            return Err(BrokerError::Invalid(format!(
                "the embedded broker needs a file path, got {url}"
            )));
        }
        Self::open(Path::new(path)).await
    }

    /// The pool, for other tables kept in the same file.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Waits for the connections to close (flushing the WAL).
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    /// A write transaction that holds the write lock from its first
    /// statement on; rolled back when dropped without commit.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, Sqlite>, BrokerError> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db)
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), BrokerError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await.map_err(db)?;
    // Version 2 added `root_id`; a file made by version 1 gets the column.
    let has_root: i64 = sqlx::query_scalar("SELECT count(*) FROM pragma_table_info('celer_jobs') WHERE name = 'root_id'")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    if has_root == 0 {
        sqlx::query("ALTER TABLE celer_jobs ADD COLUMN root_id TEXT").execute(&mut *tx).await.map_err(db)?;
    }
    sqlx::query(
        "UPDATE celer_meta SET value = ?1 WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?1",
    )
    .bind(SCHEMA_VERSION.to_string())
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query(
        "INSERT INTO celer_meta (key, value) VALUES ('schema_version', ?1)
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(SCHEMA_VERSION.to_string())
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let stored: String =
        sqlx::query_scalar("SELECT value FROM celer_meta WHERE key = 'schema_version'")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    match stored.parse::<i64>() {
        Ok(v) if v <= SCHEMA_VERSION => {}
        Ok(v) => {
            return Err(BrokerError::Unavailable(format!(
                "the database has schema version {v}, written by a newer celer \
                 (this one knows up to {SCHEMA_VERSION})"
            )));
        }
        Err(_) => {
            return Err(BrokerError::Unavailable(format!(
                "unreadable schema_version in celer_meta: {stored:?}"
            )));
        }
    }
    tx.commit().await.map_err(db)
}

#[async_trait]
impl Broker for EmbeddedBroker {
    fn stop_requests(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.stops.subscribe())
    }

    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, BrokerError> {
        job.validate().map_err(BrokerError::Invalid)?;
        let now = now_ms();
        let eta = job.eta.map(|t| t.timestamp_millis());
        let run_at = eta.unwrap_or(now);
        let state = if run_at > now { JobState::Scheduled } else { JobState::Queued };
        let timeout_ms = job
            .timeout_ms
            .map(i64::try_from)
            .transpose()
            .map_err(|_| BrokerError::Invalid("timeout_ms is too large".into()))?;
        let args = to_json(&job.args)?;
        let kwargs = to_json(&job.kwargs)?;

        // The key may belong to a job that is purged between our insert and
        // our select: then the insert goes through on the next round.
        for _ in 0..3 {
            let id = Uuid::now_v7().to_string();
            let inserted = sqlx::query(
                "INSERT INTO celer_jobs (id, task, queue, args, kwargs, priority, attempt,
                     max_retries, state, run_at, eta, expires_at, timeout_ms, idempotency_key,
                     parent_id, root_id, enqueued_at, cancel_requested)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, 0)
                 ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(&id)
            .bind(&job.task)
            .bind(&job.queue)
            .bind(&args)
            .bind(&kwargs)
            .bind(job.priority)
            .bind(i64::from(job.max_retries))
            .bind(state.as_str())
            .bind(run_at)
            .bind(eta)
            .bind(job.expires_at.map(|t| t.timestamp_millis()))
            .bind(timeout_ms)
            .bind(job.idempotency_key.as_deref())
            .bind(job.parent_id.as_deref())
            .bind(job.root_id.as_deref())
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(db)?;
            if inserted.rows_affected() == 1 {
                return Ok(Enqueued { id, existing: false });
            }
            let existing: Option<String> =
                sqlx::query_scalar("SELECT id FROM celer_jobs WHERE idempotency_key = ?1")
                    .bind(job.idempotency_key.as_deref())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
            if let Some(id) = existing {
                return Ok(Enqueued { id, existing: true });
            }
        }
        Err(BrokerError::Unavailable(
            "idempotency key kept conflicting with a job that vanished".into(),
        ))
    }

    async fn fetch(&self, req: FetchRequest<'_>) -> Result<Vec<Delivery>, BrokerError> {
        if req.max == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let lease_until = now.saturating_add(millis(req.lease));
        let queues = to_json(&req.queues)?;
        let exclude = to_json(&req.exclude_tasks)?;
        let limit = i64::try_from(req.max).unwrap_or(i64::MAX);

        let mut tx = self.write_tx().await?;
        for maintenance in [EXPIRE, CANCEL_ABANDONED, FAIL_LOST] {
            sqlx::query(maintenance).bind(now).execute(&mut *tx).await.map_err(db)?;
        }
        // LEASE_LIMITED's ?7, only when some plugin has little room.
        let (lease, room) = match req.limited.is_empty() {
            true => (LEASE, None),
            false => {
                // A task in two rooms (a rate's and its plugin's) counts
                // against the first, as [`PluginRoom::of`] finds it.
                let mut room = serde_json::Map::new();
                for (i, r) in req.limited.iter().enumerate() {
                    for t in &r.tasks {
                        room.entry(t.clone()).or_insert_with(|| serde_json::json!([i, r.free]));
                    }
                }
                (LEASE_LIMITED, Some(serde_json::Value::Object(room).to_string()))
            }
        };
        let query = sqlx::query(lease)
            .bind(now)
            .bind(lease_until)
            .bind(req.host)
            .bind(&queues)
            .bind(&exclude)
            .bind(limit);
        let query = match &room {
            Some(room) => query.bind(room),
            None => query,
        };
        let rows = query
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;

        let mut leased = Vec::with_capacity(rows.len());
        for row in &rows {
            match delivery_from_row(row) {
                Ok(found) => leased.push(found),
                Err(e) => bury_unreadable(&mut tx, row, now, e).await?,
            }
        }
        tx.commit().await.map_err(db)?;

        // RETURNING does not promise the subquery's order.
        leased.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.job.id.cmp(&b.2.job.id)));
        Ok(leased.into_iter().map(|(_, _, delivery)| delivery).collect())
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<LeaseStatus, BrokerError> {
        let cancel: Option<i64> = sqlx::query_scalar(
            "UPDATE celer_jobs SET lease_until = ?1
              WHERE id = ?2 AND lease_token = ?3 AND state = 'running'
             RETURNING cancel_requested",
        )
        .bind(now_ms().saturating_add(millis(ttl)))
        .bind(&lease.job_id)
        .bind(&lease.token)
        .fetch_optional(&self.writer)
        .await
        .map_err(db)?;
        Ok(match cancel {
            Some(flag) => LeaseStatus::Held { cancel_requested: flag != 0 },
            None => LeaseStatus::Lost,
        })
    }

    async fn progress(&self, lease: &Lease, done: u64, total: u64) -> Result<(), BrokerError> {
        sqlx::query(
            "UPDATE celer_jobs SET progress_done = ?1, progress_total = ?2
              WHERE id = ?3 AND lease_token = ?4 AND state = 'running'",
        )
        .bind(clamp(done))
        .bind(clamp(total))
        .bind(&lease.job_id)
        .bind(&lease.token)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn complete(
        &self,
        lease: &Lease,
        outcome: Outcome,
        record: RunRecord,
    ) -> Result<bool, BrokerError> {
        let mut tx = self.write_tx().await?;
        let cancel_requested: Option<i64> = sqlx::query_scalar(
            "SELECT cancel_requested FROM celer_jobs
              WHERE id = ?1 AND lease_token = ?2 AND state = 'running'",
        )
        .bind(&lease.job_id)
        .bind(&lease.token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(cancel_requested) = cancel_requested else {
            return Ok(false);
        };
        // A stop was asked for while the attempt failed: do not run it again.
        let outcome = match outcome {
            Outcome::Retry { error, .. } if cancel_requested != 0 => Outcome::Cancelled {
                error: JobError::new(
                    ErrorKind::Cancelled,
                    format!("cancelled; the last attempt failed: {}", error.message),
                ),
            },
            other => other,
        };

        let now = now_ms();
        let ending = Ending::of(outcome, now)?;
        let touched = record.touched.as_ref().map(to_json).transpose()?;
        let updated = sqlx::query(
            "UPDATE celer_jobs
                SET state = ?1, attempt = attempt + ?2, run_at = COALESCE(?3, run_at),
                    result = ?4, error_kind = ?5, error_message = ?6,
                    finished_at = ?7, dead_at = ?8,
                    lease_token = NULL, lease_until = NULL,
                    plugin = ?9, plugin_version = ?10, touched = ?11, log = ?12,
                    progress_done = COALESCE(?15, progress_done),
                    progress_total = COALESCE(?16, progress_total)
              WHERE id = ?13 AND lease_token = ?14 AND state = 'running'",
        )
        .bind(ending.state.as_str())
        .bind(ending.attempt_increment)
        .bind(ending.run_at)
        .bind(ending.result)
        .bind(ending.error_kind)
        .bind(ending.error_message)
        .bind(ending.finished_at)
        .bind(ending.dead_at)
        .bind(record.plugin)
        .bind(record.plugin_version)
        .bind(touched)
        .bind(record.log)
        .bind(&lease.job_id)
        .bind(&lease.token)
        .bind(record.progress.map(|p| i64::try_from(p.done).unwrap_or(i64::MAX)))
        .bind(record.progress.map(|p| i64::try_from(p.total).unwrap_or(i64::MAX)))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(updated.rows_affected() == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        sqlx::query(
            "UPDATE celer_jobs
                SET state = CASE WHEN cancel_requested = 1 THEN 'cancelled'
                                 WHEN run_at > ?1 THEN 'scheduled'
                                 ELSE 'queued' END,
                    finished_at = CASE WHEN cancel_requested = 1 THEN ?1 END,
                    error_kind = CASE WHEN cancel_requested = 1 THEN 'cancelled'
                                      ELSE error_kind END,
                    error_message = CASE WHEN cancel_requested = 1 THEN 'cancelled before it started'
                                         ELSE error_message END,
                    lease_token = NULL, lease_until = NULL, host = NULL, started_at = NULL
              WHERE id = ?2 AND lease_token = ?3 AND state = 'running'",
        )
        .bind(now_ms())
        .bind(&lease.job_id)
        .bind(&lease.token)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn cancel(&self, id: &str) -> Result<CancelOutcome, BrokerError> {
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        let found = sqlx::query("SELECT state, lease_until FROM celer_jobs WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        let Some(row) = found else {
            return Ok(CancelOutcome::NotFound);
        };
        let reader = Reader { row: &row, id: id.to_string() };
        let state = reader.state()?;
        let lease_until: Option<i64> = reader.get("lease_until")?;
        // A running job whose lease ran out has no worker to ask.
        let abandoned = state == JobState::Running && lease_until.is_none_or(|t| t < now);
        let outcome = match state {
            JobState::Queued | JobState::Scheduled | JobState::Retrying => {
                cancel_now(&mut tx, id, now, "cancelled before it started").await?;
                CancelOutcome::Cancelled
            }
            JobState::Running if abandoned => {
                cancel_now(&mut tx, id, now, "cancelled while its host was gone").await?;
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                sqlx::query("UPDATE celer_jobs SET cancel_requested = 1 WHERE id = ?1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                CancelOutcome::StopRequested
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Expired => {
                CancelOutcome::AlreadyFinished
            }
        };
        tx.commit().await.map_err(db)?;
        if outcome == CancelOutcome::StopRequested {
            // No worker of this process listening: nothing runs it here.
            let _ = self.stops.send(id.to_string());
        }
        Ok(outcome)
    }

    async fn status(&self, id: &str) -> Result<Option<JobStatus>, BrokerError> {
        let row = sqlx::query("SELECT * FROM celer_jobs WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(status_from_row).transpose()
    }

    async fn dead_list(&self, limit: u32) -> Result<Vec<JobStatus>, BrokerError> {
        let rows = sqlx::query(
            "SELECT * FROM celer_jobs WHERE state = 'failed'
              ORDER BY dead_at DESC, id DESC LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(status_from_row).collect()
    }

    async fn dead_retry(&self, ids: &[String]) -> Result<u64, BrokerError> {
        let done = sqlx::query(
            "UPDATE celer_jobs
                SET state = 'queued', attempt = 0, run_at = ?1, result = NULL,
                    error_kind = NULL, error_message = NULL, dead_at = NULL,
                    lease_token = NULL, lease_until = NULL, host = NULL, cancel_requested = 0,
                    started_at = NULL, finished_at = NULL,
                    progress_done = NULL, progress_total = NULL
              WHERE state = 'failed'
                AND (json_array_length(?2) = 0 OR id IN (SELECT value FROM json_each(?2)))",
        )
        .bind(now_ms())
        .bind(to_json(&ids)?)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn dead_purge(&self) -> Result<u64, BrokerError> {
        let done = sqlx::query("DELETE FROM celer_jobs WHERE state = 'failed'")
            .execute(&self.writer)
            .await
            .map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db)?;
        Ok(())
    }

    /// The embedded broker keeps no heartbeats (its hosts share one
    /// machine): the hosts listed are those holding running jobs.
    async fn hosts(&self) -> Result<Vec<HostInfo>, BrokerError> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT host, count(*) FROM celer_jobs WHERE state = 'running' GROUP BY host ORDER BY host",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(host, running)| HostInfo {
                host: host.unwrap_or_default(),
                running: u64::try_from(running).unwrap_or(0),
                ..HostInfo::default()
            })
            .collect())
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>, BrokerError> {
        // Only queues with pending, running or dead jobs: finished history is
        // not read (the index walk stays proportional to the live jobs).
        let rows = sqlx::query(
            "SELECT queue,
                    SUM(state = 'queued' OR (state IN ('scheduled', 'retrying') AND run_at <= ?1)),
                    SUM(state IN ('scheduled', 'retrying') AND run_at > ?1),
                    SUM(state = 'running'),
                    SUM(state = 'failed')
               FROM celer_jobs
              WHERE state IN ('queued', 'scheduled', 'retrying', 'running', 'failed')
              GROUP BY queue ORDER BY queue",
        )
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                let count = |i: usize| -> Result<u64, BrokerError> {
                    let n: i64 = row.try_get(i).map_err(db)?;
                    Ok(u64::try_from(n).unwrap_or(0))
                };
                Ok(QueueStats {
                    queue: row.try_get(0).map_err(db)?,
                    queued: count(1)?,
                    delayed: count(2)?,
                    running: count(3)?,
                    dead: count(4)?,
                })
            })
            .collect()
    }
}

/// The columns `complete` writes, decided by the outcome.
struct Ending {
    state: JobState,
    attempt_increment: i64,
    run_at: Option<i64>,
    result: Option<String>,
    error_kind: Option<String>,
    error_message: Option<String>,
    finished_at: Option<i64>,
    dead_at: Option<i64>,
}

impl Ending {
    fn of(outcome: Outcome, now: i64) -> Result<Ending, BrokerError> {
        let finished = |state, error: Option<JobError>, dead_at| -> Result<Ending, BrokerError> {
            let (error_kind, error_message) = split_error(error)?;
            Ok(Ending {
                state,
                attempt_increment: 0,
                run_at: None,
                result: None,
                error_kind,
                error_message,
                finished_at: Some(now),
                dead_at,
            })
        };
        match outcome {
            Outcome::Succeeded { result } => Ok(Ending {
                result: Some(to_json(&result)?),
                ..finished(JobState::Succeeded, None, None)?
            }),
            Outcome::Retry { error, at } => Ok(Ending {
                attempt_increment: 1,
                run_at: Some(at.timestamp_millis()),
                finished_at: None,
                ..finished(JobState::Retrying, Some(error), None)?
            }),
            Outcome::Dead { error } => finished(JobState::Failed, Some(error), Some(now)),
            Outcome::Cancelled { error } => finished(JobState::Cancelled, Some(error), None),
        }
    }
}

/// The kind as its kebab-case text (the same as in status JSON), and the message.
fn split_error(error: Option<JobError>) -> Result<(Option<String>, Option<String>), BrokerError> {
    let Some(error) = error else {
        return Ok((None, None));
    };
    let kind = match serde_json::to_value(error.kind) {
        Ok(Value::String(kind)) => kind,
        _ => return Err(BrokerError::Invalid(format!("unstorable error kind {:?}", error.kind))),
    };
    Ok((Some(kind), Some(error.message)))
}

async fn cancel_now(
    conn: &mut SqliteConnection,
    id: &str,
    now: i64,
    message: &str,
) -> Result<(), BrokerError> {
    sqlx::query(
        "UPDATE celer_jobs
            SET state = 'cancelled', finished_at = ?1, lease_token = NULL, lease_until = NULL,
                error_kind = 'cancelled', error_message = ?2
          WHERE id = ?3",
    )
    .bind(now)
    .bind(message)
    .bind(id)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

async fn bury_unreadable(
    conn: &mut SqliteConnection,
    row: &SqliteRow,
    now: i64,
    error: BrokerError,
) -> Result<(), BrokerError> {
    let Ok(id) = row.try_get::<String, _>("id") else {
        return Err(error);
    };
    tracing::error!(job = %id, %error, "unreadable job moved to the dead letters");
    sqlx::query(BURY_UNREADABLE)
        .bind(now)
        .bind(format!("stored job is unreadable: {error}"))
        .bind(&id)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// A leased row as a delivery, with its sort key (priority, run_at).
fn delivery_from_row(row: &SqliteRow) -> Result<(i32, i64, Delivery), BrokerError> {
    let reader = Reader::new(row);
    let job = reader.job()?;
    let token: Option<String> = reader.get("lease_token")?;
    let token = token.ok_or_else(|| reader.corrupt("leased without a token"))?;
    let run_at: i64 = reader.get("run_at")?;
    let lease = Lease { job_id: job.id.clone(), token };
    Ok((job.priority, run_at, Delivery { job, lease }))
}

fn status_from_row(row: &SqliteRow) -> Result<JobStatus, BrokerError> {
    let r = Reader::new(row);
    let error_kind: Option<String> = r.get("error_kind")?;
    let error = match error_kind {
        None => None,
        Some(kind) => {
            let kind: ErrorKind = serde_json::from_value(Value::String(kind.clone()))
                .map_err(|_| r.corrupt(format!("unknown error kind {kind:?}")))?;
            let message: Option<String> = r.get("error_message")?;
            Some(JobError { kind, message: message.unwrap_or_default() })
        }
    };
    let progress = match (r.opt_int::<u64>("progress_done")?, r.opt_int::<u64>("progress_total")?) {
        (Some(done), Some(total)) => Some(Progress { done, total }),
        _ => None,
    };
    Ok(JobStatus {
        job: r.job()?,
        state: r.state()?,
        result: r.opt_json("result")?,
        error,
        progress,
        started_at: r.opt_time("started_at")?,
        finished_at: r.opt_time("finished_at")?,
        plugin: r.get("plugin")?,
        plugin_version: r.get("plugin_version")?,
        host: r.get("host")?,
        touched: r.opt_json("touched")?,
        log: r.get("log")?,
    })
}

/// Typed reads of one `celer_jobs` row; every failure is a
/// [`BrokerError::Corrupt`] naming the job.
struct Reader<'r> {
    row: &'r SqliteRow,
    id: String,
}

impl<'r> Reader<'r> {
    fn new(row: &'r SqliteRow) -> Self {
        let id = row.try_get::<String, _>("id").unwrap_or_else(|_| "?".into());
        Reader { row, id }
    }

    fn corrupt(&self, reason: impl Into<String>) -> BrokerError {
        BrokerError::Corrupt { id: self.id.clone(), reason: reason.into() }
    }

    fn get<T>(&self, column: &str) -> Result<T, BrokerError>
    where
        T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
    {
        self.row.try_get(column).map_err(|e| self.corrupt(format!("column {column}: {e}")))
    }

    fn int<T: TryFrom<i64>>(&self, column: &str) -> Result<T, BrokerError> {
        let n: i64 = self.get(column)?;
        T::try_from(n).map_err(|_| self.corrupt(format!("column {column}: {n} out of range")))
    }

    fn opt_int<T: TryFrom<i64>>(&self, column: &str) -> Result<Option<T>, BrokerError> {
        let n: Option<i64> = self.get(column)?;
        n.map(|n| {
            T::try_from(n).map_err(|_| self.corrupt(format!("column {column}: {n} out of range")))
        })
        .transpose()
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>, BrokerError> {
        let ms: i64 = self.get(column)?;
        DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| self.corrupt(format!("column {column}: {ms} is not a time")))
    }

    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>, BrokerError> {
        let ms: Option<i64> = self.get(column)?;
        ms.map(|ms| {
            DateTime::from_timestamp_millis(ms)
                .ok_or_else(|| self.corrupt(format!("column {column}: {ms} is not a time")))
        })
        .transpose()
    }

    fn json<T: serde::de::DeserializeOwned>(&self, column: &str) -> Result<T, BrokerError> {
        let text: String = self.get(column)?;
        serde_json::from_str(&text).map_err(|e| self.corrupt(format!("column {column}: {e}")))
    }

    fn opt_json(&self, column: &str) -> Result<Option<Value>, BrokerError> {
        let text: Option<String> = self.get(column)?;
        text.map(|text| {
            serde_json::from_str(&text).map_err(|e| self.corrupt(format!("column {column}: {e}")))
        })
        .transpose()
    }

    fn state(&self) -> Result<JobState, BrokerError> {
        let text: String = self.get("state")?;
        JobState::parse(&text).ok_or_else(|| self.corrupt(format!("unknown state {text:?}")))
    }

    fn job(&self) -> Result<Job, BrokerError> {
        Ok(Job {
            id: self.get("id")?,
            task: self.get("task")?,
            args: self.json("args")?,
            kwargs: self.json("kwargs")?,
            queue: self.get("queue")?,
            priority: self.int("priority")?,
            attempt: self.int("attempt")?,
            max_retries: self.int("max_retries")?,
            eta: self.opt_time("eta")?,
            expires_at: self.opt_time("expires_at")?,
            timeout_ms: self.opt_int("timeout_ms")?,
            idempotency_key: self.get("idempotency_key")?,
            parent_id: self.get("parent_id")?,
            root_id: self.get("root_id")?,
            enqueued_at: self.time("enqueued_at")?,
        })
    }
}

fn db(e: sqlx::Error) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// SQLITE_BUSY or SQLITE_LOCKED, extended codes included.
fn is_locked(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|e| e.code())
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, BrokerError> {
    serde_json::to_string(value)
        .map_err(|e| BrokerError::Invalid(format!("not storable as JSON: {e}")))
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use tempfile::TempDir;

    use super::*;

    const HOST: &str = "test-host";

    async fn broker() -> (TempDir, EmbeddedBroker) {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = EmbeddedBroker::open(&dir.path().join("nested/celer.db")).await.expect("open");
        (dir, broker)
    }

    fn job(task: &str) -> NewJob {
        NewJob::new(task, json!([1, "two"]), json!({"k": true}))
    }

    async fn enqueue(b: &EmbeddedBroker, job: NewJob) -> String {
        let enqueued = b.enqueue(job).await.expect("enqueue");
        assert!(!enqueued.existing);
        enqueued.id
    }

    fn default_queue() -> Vec<String> {
        vec!["default".to_string()]
    }

    async fn fetch_with(
        b: &EmbeddedBroker,
        max: usize,
        exclude: &[String],
        lease: Duration,
    ) -> Vec<Delivery> {
        let queues = default_queue();
        let req = FetchRequest { host: HOST, queues: &queues, exclude_tasks: exclude, limited: &[], max, lease, wait_longer: None };
        b.fetch(req).await.expect("fetch")
    }

    async fn fetch(b: &EmbeddedBroker, max: usize) -> Vec<Delivery> {
        fetch_with(b, max, &[], Duration::from_secs(30)).await
    }


    async fn status(b: &EmbeddedBroker, id: &str) -> JobStatus {
        b.status(id).await.expect("status").expect("job exists")
    }

    fn ids(deliveries: &[Delivery]) -> Vec<String> {
        deliveries.iter().map(|d| d.job.id.clone()).collect()
    }



    // The broker contract (states, leases, retries, dead letters, cancel,
    // expiry, idempotency, stats) is tested once for every broker in
    // `broker::suite`; what follows is specific to SQLite.

    #[tokio::test]
    async fn open_url_and_reopen_keep_the_same_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("celer.db");
        let id = {
            let b =
                EmbeddedBroker::open_url(&format!("sqlite://{}", path.display())).await.unwrap();
            let id = enqueue(&b, job("t")).await;
            b.close().await;
            id
        };
        let b = EmbeddedBroker::open_url(&format!("sqlite:{}", path.display())).await.unwrap();
        assert_eq!(status(&b, &id).await.state, JobState::Queued);
        let version: String =
            sqlx::query_scalar("SELECT value FROM celer_meta WHERE key = 'schema_version'")
                .fetch_one(b.pool())
                .await
                .unwrap();
        assert_eq!(version, SCHEMA_VERSION.to_string());
        assert!(matches!(
            EmbeddedBroker::open_url("redis://x").await,
            Err(BrokerError::Invalid(_))
        ));
        assert!(matches!(
            EmbeddedBroker::open_url("sqlite::memory:").await,
            Err(BrokerError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn an_unknown_state_is_reported_as_corrupt() {
        let (_dir, b) = broker().await;
        let id = enqueue(&b, job("t")).await;
        sqlx::query("UPDATE celer_jobs SET state = 'zombie' WHERE id = ?1")
            .bind(&id)
            .execute(b.pool())
            .await
            .unwrap();
        assert!(
            matches!(b.status(&id).await, Err(BrokerError::Corrupt { id: ref bad, .. }) if *bad == id)
        );
    }

    #[tokio::test]
    async fn an_unreadable_job_goes_to_the_dead_letters_instead_of_blocking_fetch() {
        let (_dir, b) = broker().await;
        let bad = enqueue(&b, NewJob { priority: 1, ..job("t") }).await;
        let good = enqueue(&b, job("t")).await;
        sqlx::query("UPDATE celer_jobs SET args = 'not json' WHERE id = ?1")
            .bind(&bad)
            .execute(b.pool())
            .await
            .unwrap();
        assert_eq!(ids(&fetch(&b, 10).await), vec![good]);
        let dead = sqlx::query_scalar::<_, String>("SELECT state FROM celer_jobs WHERE id = ?1")
            .bind(&bad)
            .fetch_one(b.pool())
            .await
            .unwrap();
        assert_eq!(dead, "failed");
    }

    #[tokio::test]
    async fn fetch_statements_walk_the_index() {
        let (_dir, b) = broker().await;
        for statement in [EXPIRE, CANCEL_ABANDONED, FAIL_LOST, LEASE] {
            let explain = format!("EXPLAIN QUERY PLAN {statement}");
            let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(explain))
                .fetch_all(b.pool())
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<String, _>("detail"))
                .collect();
            assert!(
                plan.iter().any(|step| step.contains("USING INDEX celer_jobs_fetch")),
                "{statement}\n{plan:#?}"
            );
            assert!(!plan.iter().any(|step| step.starts_with("SCAN celer_jobs")), "{plan:#?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_processes_deliver_every_job_exactly_once() {
        // Two brokers opened at the same moment on one file stand for two
        // processes; the shared suite checks every job is delivered once.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        let (a, b) = tokio::join!(EmbeddedBroker::open(&path), EmbeddedBroker::open(&path));
        let brokers: Vec<Arc<dyn Broker>> = vec![Arc::new(a.unwrap()), Arc::new(b.unwrap())];
        crate::broker::suite::concurrent_workers_deliver_every_job_exactly_once(brokers).await;
    }
}

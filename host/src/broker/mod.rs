//! Brokers hold jobs between the producer and the worker: the queue, the
//! leases of running jobs, retries, the dead letters and the result store.
//! The worker only speaks [`Broker`], so the embedded SQLite broker and the
//! Redis broker are interchangeable.
//!
//! Delivery is at-least-once with leases: a fetched job is leased to one
//! worker until `lease_until`; the worker renews the lease while the job
//! runs; a host that dies stops renewing, and once the lease runs out the
//! job is handed out again (as a new attempt). Every write that ends an
//! attempt names the [`Lease`] it holds, so a worker that lost its lease
//! cannot overwrite the outcome of the worker that took over: exactly one
//! outcome is recorded per attempt.

pub mod backoff;
pub mod embedded;
pub mod redis;
#[cfg(test)]
mod suite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::job::{Job, JobError, JobStatus, NewJob};

/// What can go wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The backend (SQLite file, Redis) could not be reached or answered
    /// with an error; the caller may retry.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (e.g. an invalid job).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Stored data could not be read back (a bug or a manual edit).
    #[error("corrupt broker record for job {id}: {reason}")]
    Corrupt { id: String, reason: String },
}

/// Proof that a worker holds a job: the job id plus a token unique to this
/// delivery. Outcomes written with a stale token are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub token: String,
}

/// A job handed to a worker.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub job: Job,
    pub lease: Lease,
}

/// What a lease renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still ours; `cancel_requested` when someone asked to stop the job.
    Held { cancel_requested: bool },
    /// Taken over or finished elsewhere: stop working on it, write nothing.
    Lost,
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded { result: Value },
    /// Run it again at `at` (attempt + 1).
    Retry { error: JobError, at: DateTime<Utc> },
    /// Failed for good: state `failed`, into the dead letters.
    Dead { error: JobError },
    /// Stopped because it was cancelled.
    Cancelled { error: JobError },
}

/// Everything about a finished attempt besides its outcome.
#[derive(Debug, Clone, Default)]
pub struct RunRecord {
    pub plugin: Option<String>,
    pub plugin_version: Option<String>,
    pub touched: Option<Value>,
    pub log: Option<String>,
    /// The last progress the plugin reported.
    pub progress: Option<crate::job::Progress>,
}

/// The answer to an enqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: String,
    /// True when an idempotency key matched an existing job, whose id this is.
    pub existing: bool,
}

/// The answer to a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CancelOutcome {
    /// It had not started: now `cancelled`.
    Cancelled,
    /// It is running: the worker is asked to stop it.
    StopRequested,
    /// Already finished; nothing changed.
    AlreadyFinished,
    NotFound,
}

/// Depth of one queue, for `celer inspect` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub queue: String,
    /// Due and waiting.
    pub queued: u64,
    /// Waiting for an eta or a retry backoff.
    pub delayed: u64,
    pub running: u64,
    /// In the dead letters.
    pub dead: u64,
}

/// A worker host as the broker knows it, for `celer inspect`: an operator
/// sees which hosts are alive and what each is holding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    pub host: String,
    /// Jobs it holds a lease on now.
    pub running: u64,
    /// Its last heartbeat, when the broker keeps heartbeats (Redis: every
    /// 2 s; a host silent for 10 s is gone from the list).
    pub last_seen: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub pid: Option<u32>,
    /// The queues it consumes, when it said.
    pub queues: Vec<String>,
}

/// What fetch may hand out.
#[derive(Debug, Clone)]
pub struct FetchRequest<'a> {
    /// Identifies this host in leases and status (`host` field).
    pub host: &'a str,
    pub queues: &'a [String],
    /// Tasks whose plugin has no free slot: leave them for another worker.
    pub exclude_tasks: &'a [String],
    /// Plugins with fewer free slots than `max` (and rate-limited tasks,
    /// first): lease no more of their jobs than they can run, rather than
    /// leasing and handing back. A task in two rooms counts against the first.
    pub limited: &'a [PluginRoom],
    /// Free worker slots: never lease more (no hoarding).
    pub max: usize,
    pub lease: Duration,
    /// A broker whose fetch waits for new work when it finds none
    /// ([`Broker::fetch_waits`]) may wait this long instead of its usual
    /// time when it is longer: the jobs it sent back are of rate-limited
    /// tasks whose next start is this far off, and reading them again
    /// sooner would only send them back again. A new job still ends the
    /// wait at once.
    pub wait_longer: Option<Duration>,
}

/// A plugin that can start only `free` more jobs now (`free` ≥ 1: a full
/// plugin's tasks are in [`FetchRequest::exclude_tasks`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRoom {
    /// Its task names and aliases.
    pub tasks: Vec<String>,
    pub free: usize,
}

impl PluginRoom {
    /// Which of `rooms` holds `task`.
    pub fn of(rooms: &[PluginRoom], task: &str) -> Option<usize> {
        rooms.iter().position(|r| r.tasks.iter().any(|t| t == task))
    }
}

/// Stop requests a slow worker may fall behind by before it misses some
/// (it then learns of them at the job's next lease renewal).
pub(crate) const STOP_REQUESTS_BUFFER: usize = 1024;

/// The operations a worker, the CLI and the API need from a broker.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Stores a new job (state `queued`, or `scheduled` when its eta is ahead).
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, BrokerError>;

    /// Leases up to `req.max` due jobs, highest priority first, then oldest.
    /// Jobs whose `expires_at` passed turn `expired` instead; jobs whose
    /// lease ran out are handed out again as a new attempt (or failed with
    /// kind `lost` when they have no retries left).
    async fn fetch(&self, req: FetchRequest<'_>) -> Result<Vec<Delivery>, BrokerError>;

    /// True when `fetch` itself waits (up to the worker's poll interval) for
    /// a job to become due when none is, instead of returning at once; the
    /// worker then asks again right away instead of sleeping.
    fn fetch_waits(&self) -> bool {
        false
    }

    /// Job ids whose stop was requested, as the requests are made (by any
    /// host), so that the worker running one renews its lease at once and
    /// learns of the request then, instead of at its next regular renewal.
    /// `None`: this broker does not push them; renewals still carry them.
    fn stop_requests(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }

    /// Extends a lease while the job runs.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<LeaseStatus, BrokerError>;

    /// Records the progress the plugin reported.
    async fn progress(&self, lease: &Lease, done: u64, total: u64) -> Result<(), BrokerError>;

    /// Ends an attempt. Returns false when the lease was no longer held (the
    /// outcome was not recorded because another worker owns the job).
    async fn complete(
        &self,
        lease: &Lease,
        outcome: Outcome,
        record: RunRecord,
    ) -> Result<bool, BrokerError>;

    /// Gives a job back without counting an attempt (shutdown, or no free
    /// plugin slot after all).
    async fn release(&self, lease: &Lease) -> Result<(), BrokerError>;

    /// Cancels a job that has not started, or asks its worker to stop it.
    async fn cancel(&self, id: &str) -> Result<CancelOutcome, BrokerError>;

    /// The status JSON of a job, or `None` when unknown.
    async fn status(&self, id: &str) -> Result<Option<JobStatus>, BrokerError>;

    /// Dead letters, newest first.
    async fn dead_list(&self, limit: u32) -> Result<Vec<JobStatus>, BrokerError>;

    /// Puts dead letters back on their queue with a fresh retry budget:
    /// the given ids, or all of them when `ids` is empty. Returns how many.
    async fn dead_retry(&self, ids: &[String]) -> Result<u64, BrokerError>;

    /// Deletes dead letters for good. Returns how many.
    async fn dead_purge(&self) -> Result<u64, BrokerError>;

    /// Depth of every queue that holds jobs.
    async fn queue_stats(&self) -> Result<Vec<QueueStats>, BrokerError>;

    /// Succeeds when the broker answers (`/readyz`).
    async fn ping(&self) -> Result<(), BrokerError>;

    /// The hosts that hold running jobs or sent a heartbeat lately.
    async fn hosts(&self) -> Result<Vec<HostInfo>, BrokerError>;

    /// Takes up to `max` ids of `queue`'s jobs that ended without a run's
    /// outcome (taken over after their host died, cancelled before they
    /// started, handed back after a stop was asked): whoever answers for
    /// them elsewhere (the Celery consumer writes their results) finds them
    /// here, whichever process ended them. A broker that keeps no such list
    /// has none.
    async fn take_unrun(&self, _queue: &str, _max: usize) -> Result<Vec<String>, BrokerError> {
        Ok(Vec::new())
    }

    /// Puts back ids from [`Broker::take_unrun`] that could not be answered
    /// now, for a later round.
    async fn put_back_unrun(&self, _queue: &str, _ids: &[String]) -> Result<(), BrokerError> {
        Ok(())
    }
}

//! [`CeleryAwareBroker`]: the worker's broker, plus Celery results. It
//! passes every call to the broker it wraps; when an attempt of a job that
//! came from Celery ends (recorded under a held lease), it also writes the
//! job's `celery-task-meta-<id>`. The worker does not know Celery exists.
//!
//! While such a job runs, its result reads `STARTED` (with
//! `track_started`, Celery's `task_track_started`) and, once its plugin
//! reports progress, `PROGRESS` with `{"current", "total", "percent"}`.
//!
//! A job came from Celery when its idempotency key is `celery:<task id>`
//! (the consumer enqueues it so, which also makes a message taken twice
//! one job). The key travels with the job, so whichever host runs it
//! writes the result.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use chrono::Utc;

use super::ResultWriter;
use super::activity::{Activity, Running};
use super::events::{Events, TaskEvent};
use super::follow_ups::FollowUps;
use super::revoke::Revocations;
use super::result::{self, Exception, Status};
use crate::broker::{
    Broker, BrokerError, CancelOutcome, Delivery, Enqueued, FetchRequest, HostInfo, Lease, LeaseStatus, Outcome,
    QueueStats, RunRecord,
};
use crate::job::{ErrorKind, JobError, JobStatus, NewJob};

/// Idempotency keys of jobs enqueued from Celery messages start with this.
pub const KEY_PREFIX: &str = "celery:";

/// The Celery task id of a job, from its idempotency key.
pub fn celery_id(idempotency_key: Option<&str>) -> Option<&str> {
    idempotency_key.and_then(|k| k.strip_prefix(KEY_PREFIX))
}

/// The worker's broker with Celery's side effects added at each outcome
/// (results, follow-ups, events), so the worker itself knows nothing of
/// Celery.
#[derive(Clone)]
pub struct CeleryAwareBroker {
    pub(super) inner: Arc<dyn Broker>,
    pub(super) results: ResultWriter,
    pub(super) follow_ups: FollowUps,
    pub(super) revocations: Revocations,
    /// The Celery tasks this host runs and has run.
    pub(super) activity: Arc<Activity>,
    /// Task events, when they are on.
    pub(super) events: Arc<Events>,
    /// With `track_started`: the worker hostname a STARTED result names.
    pub(super) started_by: Option<String>,
    /// The worker's lease, renewed once before follow-ups are sent.
    pub(super) lease: Duration,
}

impl CeleryAwareBroker {
    /// The same Celery bookkeeping over another broker (a worker shard's
    /// own connection).
    pub fn over(&self, inner: Arc<dyn Broker>) -> Arc<dyn Broker> {
        Arc::new(CeleryAwareBroker { inner, ..self.clone() })
    }

    /// Writes STARTED for the Celery jobs just leased (one round trip).
    async fn write_started(&self, got: &[Delivery]) {
        let Some(hostname) = &self.started_by else { return };
        let info = serde_json::json!({"pid": std::process::id(), "hostname": hostname});
        let docs: Vec<(String, String)> = got
            .iter()
            .filter_map(|d| celery_id(d.job.idempotency_key.as_deref()))
            .map(|id| (id.to_string(), result::meta(id, Status::Started, &result::Outcome::Success(info.clone()), Utc::now())))
            .collect();
        if let Err(e) = self.results.write_running(&docs).await {
            tracing::warn!(error = %e, tasks = docs.len(), "cannot write the STARTED state of Celery tasks");
        }
    }

    /// Whether the task was revoked; when that cannot be read, not (the
    /// retry goes ahead, as it would without the revoke).
    async fn revoked(&self, celery_id: &str) -> bool {
        match self.revocations.contains(celery_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(celery_id, error = %e, "cannot check whether a Celery task was revoked");
                false
            }
        }
    }

    /// The task event of an outcome just recorded.
    fn outcome_event(origin: &Running, outcome: &Outcome, exception: Option<&Exception>, traceback: Option<&str>) -> TaskEvent {
        let id = origin.celery_id.as_str();
        match outcome {
            Outcome::Succeeded { result } => {
                let runtime = SystemTime::now().duration_since(origin.started).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                let mut shown = result::py_repr(result);
                if shown.len() > RESULT_REPR_MAX {
                    let cut = (0..=RESULT_REPR_MAX).rev().find(|i| shown.is_char_boundary(*i)).unwrap_or(0);
                    shown.truncate(cut);
                    shown.push_str("...");
                }
                TaskEvent::new("task-succeeded", id, serde_json::json!({"result": shown, "runtime": runtime}))
            }
            Outcome::Cancelled { .. } => {
                TaskEvent::new("task-revoked", id, serde_json::json!({"terminated": true, "signum": null, "expired": false}))
            }
            Outcome::Retry { .. } | Outcome::Dead { .. } => {
                let kind = if matches!(outcome, Outcome::Retry { .. }) { "task-retried" } else { "task-failed" };
                let fields = serde_json::json!({"exception": exception.map(Exception::repr), "traceback": traceback});
                TaskEvent::new(kind, id, fields)
            }
        }
    }
}

/// Longest result text a `task-succeeded` event carries (Celery's
/// `resultrepr_maxsize`).
const RESULT_REPR_MAX: usize = 1024;

#[async_trait]
impl Broker for CeleryAwareBroker {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, BrokerError> {
        self.inner.enqueue(job).await
    }

    async fn fetch(&self, req: FetchRequest<'_>) -> Result<Vec<Delivery>, BrokerError> {
        let got = self.inner.fetch(req).await?;
        let now = SystemTime::now();
        let running: Vec<(String, Running)> = got
            .iter()
            .filter_map(|d| {
                let id = celery_id(d.job.idempotency_key.as_deref())?;
                let running = Running {
                    celery_id: id.to_string(),
                    task: d.job.task.clone(),
                    args: d.job.args.value(),
                    kwargs: d.job.kwargs.value(),
                    queue: d.job.queue.clone(),
                    started: now,
                };
                Some((d.lease.token.clone(), running))
            })
            .collect();
        let started: Vec<TaskEvent> = if self.events.task_events_on() {
            running.iter().map(|(_, r)| TaskEvent::new("task-started", &r.celery_id, serde_json::json!({}))).collect()
        } else {
            Vec::new()
        };
        if !running.is_empty() {
            self.activity.start_all(running);
        }
        if !started.is_empty() {
            // Stamped now, so they order before the tasks' later events;
            // sent off the fetch's path, so the jobs go out without waiting.
            let (events, stamped) = (self.events.clone(), self.events.stamp(started));
            tokio::spawn(async move { events.publish(stamped).await });
        }
        self.write_started(&got).await;
        Ok(got)
    }

    fn fetch_waits(&self) -> bool {
        self.inner.fetch_waits()
    }

    fn stop_requests(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        self.inner.stop_requests()
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<LeaseStatus, BrokerError> {
        let status = self.inner.renew(lease, ttl).await?;
        if status == LeaseStatus::Lost {
            // Another host runs the task now; this run ends without an outcome.
            self.activity.take(&lease.token);
        }
        Ok(status)
    }

    async fn progress(&self, lease: &Lease, done: u64, total: u64) -> Result<(), BrokerError> {
        self.inner.progress(lease, done, total).await?;
        if let Some(id) = self.activity.celery_id(&lease.token) {
            let percent = if total == 0 { 0.0 } else { ((done as f64 / total as f64) * 10_000.0).round() / 100.0 };
            let info = serde_json::json!({"current": done, "total": total, "percent": percent});
            let doc = result::meta(&id, Status::Progress, &result::Outcome::Success(info), Utc::now());
            if let Err(e) = self.results.write_running(&[(id.clone(), doc)]).await {
                tracing::debug!(celery_id = %id, error = %e, "cannot write the PROGRESS state of a Celery task");
            }
        }
        Ok(())
    }

    async fn complete(&self, lease: &Lease, outcome: Outcome, record: RunRecord) -> Result<bool, BrokerError> {
        let celery_id = self.activity.celery_id(&lease.token);
        // A Celery worker drops the retry of a revoked task: so does celer.
        let outcome = match (outcome, &celery_id) {
            (Outcome::Retry { error, .. }, Some(id)) if self.revoked(id).await => Outcome::Cancelled {
                error: JobError::new(ErrorKind::Cancelled, format!("revoked; the last attempt failed: {}", error.message)),
            },
            (outcome, _) => outcome,
        };
        if let (Some(id), Outcome::Succeeded { result }) = (&celery_id, &outcome) {
            // Sent before the outcome is recorded: if this fails, the
            // outcome is not recorded either and the job runs again.
            let still_held = async {
                match self.inner.renew(lease, self.lease).await {
                    Ok(status) => Ok(status != LeaseStatus::Lost),
                    Err(e) => Err(e.to_string()),
                }
            };
            self.follow_ups
                .on_success(id, result, still_held)
                .await
                .map_err(|e| BrokerError::Unavailable(format!("cannot send the Celery follow-ups of {id}: {e}")))?;
        }
        // What the traceback names; the record itself (its log can be
        // large) goes to the broker without a copy.
        let plugin = record.plugin.clone().zip(record.plugin_version.clone());
        let recorded = self.inner.complete(lease, outcome.clone(), record).await?;
        let Some(origin) = self.activity.take(&lease.token) else { return Ok(recorded) };
        if !recorded {
            return Ok(false);
        }
        self.activity.finished(&origin.task);
        let plugin = plugin.as_ref().map(|(name, version)| (name.as_str(), version.as_str()));
        let (status, stored) = match &outcome {
            Outcome::Succeeded { result } => (Status::Success, result::Outcome::Success(result.clone())),
            Outcome::Retry { error, .. } | Outcome::Dead { error } => {
                let e = Exception::of(error);
                let tb = result::traceback(&e, &lease.job_id, &origin.task, plugin);
                let status = if matches!(outcome, Outcome::Retry { .. }) { Status::Retry } else { Status::Failure };
                (status, result::Outcome::Failure(e, Some(tb)))
            }
            Outcome::Cancelled { error } => (Status::Revoked, result::Outcome::Failure(Exception::revoked(&error.message), None)),
        };
        let doc = result::meta(&origin.celery_id, status, &stored, Utc::now());
        if let Err(e) = self.results.write(&origin.celery_id, &doc).await {
            tracing::error!(job_id = %lease.job_id, celery_id = %origin.celery_id, error = %e, "cannot write the Celery result");
        }
        if let (Outcome::Dead { .. } | Outcome::Cancelled { .. }, result::Outcome::Failure(e, _)) = (&outcome, &stored) {
            // Errbacks and the chord's count only once the failure is
            // recorded and stored (as a Celery worker calls them after
            // storing it): a stale run that failed must not send them, nor
            // drop the workflow the run that took over needs; and the
            // chord's failure never shows before its part's own.
            let revoked = matches!(outcome, Outcome::Cancelled { .. });
            if let Err(e) = self.follow_ups.on_failure(&origin.celery_id, e, revoked).await {
                tracing::error!(job_id = %lease.job_id, celery_id = %origin.celery_id, error = %e, "cannot send the Celery errbacks or count the chord part");
            }
        }
        if self.events.task_events_on() {
            let (exception, traceback) = match &stored {
                result::Outcome::Failure(e, tb) => (Some(e), tb.as_deref()),
                result::Outcome::Success(_) => (None, None),
            };
            self.events.tasks(vec![Self::outcome_event(&origin, &outcome, exception, traceback)]).await;
        }
        Ok(true)
    }

    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        // Handed back before it ran: no longer STARTED (Celery's PENDING).
        // Before the hand-back, so a host that takes it at once keeps its own.
        let running = self.activity.take(&lease.token);
        if let (Some(running), Some(_)) = (running, &self.started_by) {
            if let Err(e) = self.results.unstart(&running.celery_id).await {
                tracing::warn!(task_id = %running.celery_id, error = %e, "a Celery task handed back still reads STARTED");
            }
        }
        self.inner.release(lease).await
    }

    async fn cancel(&self, id: &str) -> Result<CancelOutcome, BrokerError> {
        self.inner.cancel(id).await
    }

    async fn status(&self, id: &str) -> Result<Option<JobStatus>, BrokerError> {
        self.inner.status(id).await
    }

    async fn dead_list(&self, limit: u32) -> Result<Vec<JobStatus>, BrokerError> {
        self.inner.dead_list(limit).await
    }

    async fn dead_retry(&self, ids: &[String]) -> Result<u64, BrokerError> {
        self.inner.dead_retry(ids).await
    }

    async fn dead_purge(&self) -> Result<u64, BrokerError> {
        self.inner.dead_purge().await
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>, BrokerError> {
        self.inner.queue_stats().await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }

    async fn hosts(&self) -> Result<Vec<HostInfo>, BrokerError> {
        self.inner.hosts().await
    }

    async fn take_unrun(&self, queue: &str, max: usize) -> Result<Vec<String>, BrokerError> {
        self.inner.take_unrun(queue, max).await
    }

    async fn put_back_unrun(&self, queue: &str, ids: &[String]) -> Result<(), BrokerError> {
        self.inner.put_back_unrun(queue, ids).await
    }
}

//! The worker loop: lease as many jobs as there are free slots (never more,
//! so a busy host does not sit on jobs another host could run), run each in
//! the sandbox while keeping its lease alive, and record the outcome —
//! success, a retry after backoff, or a dead letter. On shutdown it stops
//! leasing, gives running jobs a grace period, then hands their leases back.
//!
//! The jobs of one fetch start only once the next fetch is on the wire, so
//! that its round trip overlaps their runs instead of following them.

mod intake;
mod leases;
mod shards;
mod task_limits;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use crate::broker::backoff::Backoff;
use crate::broker::{Broker, Delivery, FetchRequest, Outcome, PluginRoom, RunRecord};
use crate::config::WorkerConfig;
use crate::job::{ErrorKind, JobError};
use crate::runtime::Runtime;
use crate::runtime::plugin::LoadedPlugin;
use crate::runtime::registry::Registry;
use crate::runtime::sandbox::{JobControl, RunOutcome, StopReason};
use leases::RunningJobs;
pub use intake::Intake;
pub(crate) use shards::panic_message;
pub use shards::ShardBroker;
pub use task_limits::{TaskLimits, parse_rate};

/// Everything a worker needs; cheap to clone into each job's task.
#[derive(Clone)]
pub struct Worker {
    pub broker: Arc<dyn Broker>,
    pub registry: Arc<Registry>,
    pub runtime: Arc<Runtime>,
    pub config: WorkerConfig,
    pub backoff: Backoff,
    pub host: String,
    /// How many of its slots the host uses now (remote control may lower it).
    pub intake: Intake,
}

/// How long to wait before asking an unreachable broker again.
const BROKER_RETRY: Duration = Duration::from_millis(500);

/// While jobs run and only a few slots are free, the worker waits up to
/// this long for more to free up, so that one fetch leases a batch instead
/// of one round trip per finished job. Long jobs lose at most this much;
/// short ones gain the most.
const BATCH_WAIT: Duration = Duration::from_millis(1);

/// The longest retry delay a plugin may ask for (`retry-request.after-ms`):
/// beyond it a job would as good as never run again, and a date that far
/// off could overflow.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 86_400);

/// The plugin that serves a leased job's task, with one of its slots if it
/// had one free when the job was leased (`None`: no plugin serves it).
type ServingPlugin = Option<(Arc<LoadedPlugin>, Option<OwnedSemaphorePermit>)>;

/// A leased job with its slots, waiting to start ([`Worker::run`] starts
/// it once the next fetch is on its way).
struct ReadyJob {
    worker: Worker,
    delivery: Delivery,
    plugin: ServingPlugin,
    slot: Slot,
    control: Arc<JobControl>,
    kept: leases::Registration,
}

/// Starts every job in `ready`, each as a task of its own.
fn start_all(ready: &mut Vec<ReadyJob>, running: &mut JoinSet<()>) {
    for ReadyJob { worker, delivery, plugin, slot, control, kept } in ready.drain(..) {
        running.spawn(async move { worker.run_delivery(delivery, plugin, slot, control, kept).await });
    }
}

/// One worker slot, held while a job runs in the sandbox and given back as
/// soon as the run ends (before its outcome is written: a finished job no
/// longer occupies the host). Wakes the fetch loop when freed.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The permit first, so the woken loop sees the slot free.
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

impl Worker {
    /// Runs until `shutdown` turns true, then drains as described above.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let concurrency = self.config.concurrency;
        let slots = Arc::new(Semaphore::new(concurrency));
        let freed = Arc::new(Notify::new());
        let mut running: JoinSet<()> = JoinSet::new();
        let lease = Duration::from_millis(self.config.lease_ms);
        let leases = Arc::new(RunningJobs::default());
        let keeper = tokio::spawn(leases.clone().keep(self.broker.clone(), lease));
        let poll = Duration::from_millis(self.config.poll_ms);
        let batch = (concurrency / 4).max(1);
        let mut batch_deadline: Option<Instant> = None;
        // Leased, with their slots, not started yet: see the fetch below.
        let mut ready: Vec<ReadyJob> = Vec::new();
        tracing::info!(host = %self.host, queues = ?self.config.queues, concurrency, "worker started");

        let mut intake = self.intake.watch();
        while !*shutdown.borrow() {
            while running.try_join_next().is_some() {}
            // Slots held back by a smaller pool size are not free, and
            // queues left to other hosts are not asked.
            let limit = self.intake.mine().min(concurrency);
            let free = slots.available_permits().saturating_sub(concurrency - limit);
            let queues = self.intake.taken(&self.config.queues);
            if free == 0 || queues.is_empty() {
                start_all(&mut ready, &mut running);
                tokio::select! {
                    _ = freed.notified() => {}
                    _ = intake.changed() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            if free < batch && free < limit {
                let deadline = *batch_deadline.get_or_insert_with(|| Instant::now() + BATCH_WAIT);
                if Instant::now() < deadline {
                    start_all(&mut ready, &mut running);
                    tokio::select! {
                        _ = freed.notified() => {}
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
            }
            batch_deadline = None;
            let (mut exclude, mut limited) = self.registry.room(free);
            let next_start = self.hold_back_rate_limited(free, &mut exclude, &mut limited);
            let request = FetchRequest {
                host: &self.host,
                queues: &queues,
                exclude_tasks: &exclude,
                limited: &limited,
                max: free,
                lease,
                wait_longer: next_start,
            };
            // The next fetch goes on the wire before the jobs of the last
            // one start. On a single-threaded event loop (a shard) those
            // jobs would otherwise all run before the connection's task sends
            // it, and its round trip would then be waited out with nothing
            // left to run: 40 % of a shard's time went idle that way.
            let mut fetching = Box::pin(self.broker.fetch(request));
            let first_poll = (&mut fetching).now_or_never();
            start_all(&mut ready, &mut running);
            let fetched = match first_poll {
                Some(fetched) => fetched,
                None => fetching.await,
            };
            let deliveries = match fetched {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch jobs; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(BROKER_RETRY) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
            };
            let got = deliveries.len();
            // A pool shrunk while the fetch waited counts at once:
            // what is past it goes back to the queue unharmed.
            let mut room = limit.min(self.intake.mine()).saturating_sub(concurrency - slots.available_permits());
            for delivery in deliveries {
                let permit = match room.checked_sub(1) {
                    Some(left) => {
                        room = left;
                        slots.clone().try_acquire_owned().ok()
                    }
                    None => None,
                };
                let Some(permit) = permit else {
                    // Never lose the job (a full host cannot happen: we
                    // leased at most `free`).
                    if let Err(e) = self.broker.release(&delivery.lease).await {
                        tracing::warn!(job_id = %delivery.job.id, error = %e, "cannot hand a job back; it runs again once its lease expires");
                    }
                    continue;
                };
                let slot = Slot { permit: Some(permit), freed: freed.clone() };
                // Its plugin's slot is taken now, so the next fetch counts it;
                // so is a start of its task when that is rate-limited (only
                // if it starts: one handed back for want of a slot uses none).
                let plugin = self.registry.lookup(&delivery.job.task).map(|p| {
                    let permit = p.slots.clone().try_acquire_owned().ok();
                    if permit.is_some() {
                        self.intake.limits().took(p.canonical_task(&delivery.job.task));
                    }
                    (p, permit)
                });
                // Registered before the task starts, so a shutdown that
                // stops every running job reaches this one too.
                let control = Arc::new(JobControl::default());
                let kept = leases.register(&delivery.lease, &control);
                ready.push(ReadyJob { worker: self.clone(), delivery, plugin, slot, control, kept });
            }
            if got < free && !self.broker.fetch_waits() {
                start_all(&mut ready, &mut running);
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }

        // Leased before the stop: they run (or are handed back by the drain).
        start_all(&mut ready, &mut running);
        let grace = Duration::from_millis(self.config.grace_ms);
        while running.try_join_next().is_some() {}
        tracing::info!(running = running.len(), grace_ms = self.config.grace_ms, "worker stopping: no new jobs; waiting for running ones");
        let drained = tokio::time::timeout(grace, async { while running.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(running = running.len(), "grace period over: handing the remaining jobs back to the queue");
            leases.stop_all(StopReason::Shutdown);
            while running.join_next().await.is_some() {}
        }
        keeper.abort();
        tracing::info!("worker stopped");
    }

    /// Runs one leased job to its recorded outcome.
    /// `kept` keeps the lease alive until the outcome is written.
    async fn run_delivery(
        &self,
        delivery: Delivery,
        plugin: ServingPlugin,
        slot: Slot,
        control: Arc<JobControl>,
        kept: leases::Registration,
    ) {
        let Delivery { mut job, lease } = delivery;
        let Some((plugin, plugin_slot)) = plugin else {
            let error = JobError::new(ErrorKind::UnknownTask, format!("no loaded plugin serves task {:?}", job.task));
            tracing::warn!(job_id = %job.id, task = %job.task, "{}", error.message);
            self.finish(&lease, Outcome::Dead { error }, RunRecord::default()).await;
            return;
        };
        let Some(plugin_slot) = plugin_slot else {
            // Its plugin filled up between fetch and now (another shard
            // took its last slot meanwhile): give it back unharmed.
            if let Err(e) = self.broker.release(&lease).await {
                tracing::warn!(job_id = %job.id, error = %e, "cannot release a job; it runs again once its lease expires");
            }
            return;
        };

        if let Some(limit) = self.intake.limits().time_limit(plugin.canonical_task(&job.task)) {
            let own = job.timeout_ms.unwrap_or(plugin.limits.timeout_ms);
            job.timeout_ms = Some(own.min(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)));
        }
        let started = Instant::now();
        let report = self.runtime.run_job(&plugin, &job, control).await;
        drop(plugin_slot);
        drop(slot);
        let elapsed_ms = started.elapsed().as_millis() as u64;

        let record = RunRecord {
            plugin: Some(plugin.name.clone()),
            plugin_version: Some(plugin.version.clone()),
            touched: report.touched,
            log: report.log,
            progress: report.progress,
        };
        let outcome = match report.outcome {
            RunOutcome::Succeeded(result) => {
                tracing::info!(job_id = %job.id, task = %job.task, plugin = %plugin.name, attempt = job.attempt, key = job.idempotency_key.as_deref(), elapsed_ms, "job succeeded");
                Outcome::Succeeded { result }
            }
            RunOutcome::Failed { error, retryable, retry_after } => {
                if retryable && job.attempt < job.max_retries {
                    let delay = retry_after.map_or_else(|| self.backoff.delay(job.attempt), |asked| asked.min(MAX_RETRY_AFTER));
                    tracing::warn!(
                        job_id = %job.id, task = %job.task, plugin = %plugin.name, attempt = job.attempt, key = job.idempotency_key.as_deref(),
                        kind = ?error.kind, retry_in_ms = delay.as_millis() as u64, "job failed, will retry: {}", error.message
                    );
                    let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::days(30));
                    Outcome::Retry { error, at }
                } else {
                    tracing::error!(
                        job_id = %job.id, task = %job.task, plugin = %plugin.name, attempt = job.attempt, key = job.idempotency_key.as_deref(),
                        kind = ?error.kind, "job failed, dead-lettered: {}", error.message
                    );
                    Outcome::Dead { error }
                }
            }
            RunOutcome::Stopped(StopReason::Cancelled) => {
                tracing::info!(job_id = %job.id, task = %job.task, "job cancelled while running");
                Outcome::Cancelled { error: JobError::new(ErrorKind::Cancelled, "cancelled while running") }
            }
            RunOutcome::Stopped(StopReason::LeaseLost) => {
                tracing::warn!(job_id = %job.id, task = %job.task, "lease lost (another worker owns the job now); outcome not recorded");
                return;
            }
            RunOutcome::Stopped(StopReason::Shutdown) => {
                tracing::warn!(job_id = %job.id, task = %job.task, "stopped by shutdown; job handed back to the queue");
                if let Err(e) = self.broker.release(&lease).await {
                    tracing::warn!(job_id = %job.id, error = %e, "cannot release a job; it runs again once its lease expires");
                }
                return;
            }
        };
        self.finish(&lease, outcome, record).await;
        drop(kept);
    }

    /// Leaves out of a fetch the rate-limited tasks with no start
    /// available, and lets it lease no more of the others' jobs than they
    /// have starts ([`TaskLimits`]). A task in two rooms counts against the
    /// first, so the rate's room goes first; a fetch may then lease one job
    /// more than a nearly full plugin can start, which the loop hands back.
    /// Returns when the first task left out has a start again.
    fn hold_back_rate_limited(&self, max: usize, exclude: &mut Vec<String>, limited: &mut Vec<PluginRoom>) -> Option<Duration> {
        let task_limits::Starts { none, some, next_in } = self.intake.limits().starts_available(max);
        if none.is_empty() && some.is_empty() {
            return None;
        }
        let names_of = |task: &str| -> Vec<String> {
            let mut names = vec![task.to_string()];
            if let Some(p) = self.registry.lookup(task) {
                names.extend(p.aliases.iter().filter(|(_, t)| *t == task).map(|(alias, _)| alias.clone()));
            }
            names
        };
        for task in none {
            exclude.extend(names_of(&task));
        }
        let rooms: Vec<PluginRoom> = some.into_iter().map(|(task, free)| PluginRoom { tasks: names_of(&task), free }).collect();
        limited.splice(0..0, rooms);
        next_in
    }

    /// Records an outcome, retrying briefly when the broker is unreachable.
    /// If it stays unreachable, the lease expires and the job runs again:
    /// at-least-once, never lost.
    async fn finish(&self, lease: &crate::broker::Lease, outcome: Outcome, record: RunRecord) {
        for attempt in 0..5u32 {
            match self.broker.complete(lease, outcome.clone(), record.clone()).await {
                Ok(true) => return,
                Ok(false) => {
                    tracing::warn!(job_id = %lease.job_id, "lease no longer held; another worker owns the job, outcome dropped");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id = %lease.job_id, error = %e, attempt, "cannot record the outcome; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        tracing::error!(job_id = %lease.job_id, "giving up recording the outcome; the job runs again once its lease expires");
    }
}

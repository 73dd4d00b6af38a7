//! The Redis broker: many hosts share one Redis (or a Redis Cluster).
//!
//! # Layout (prefix `celer:` configurable; `{q}` is the queue's name)
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `celer:{q}:s:<priority>` | stream, group `celer` | waiting jobs (id, envelope, task, expiry, attempt); one stream per priority in use; a running job's entry stays pending |
//! | `celer:{q}:prios` | zset | the priorities that have a stream |
//! | `celer:{q}:delayed` | zset id → run at (ms) | jobs waiting for their eta or retry backoff |
//! | `celer:{q}:lease-ms` | hash host → ms | the lease length of each host holding entries |
//! | `celer:{q}:reclaim`, `celer:{q}:cursor` | string (PX), hash | pacing and XAUTOCLAIM cursors of the scan for lapsed leases |
//! | `celer:{q}:dead` | stream | dead letters (job ids) |
//! | `celer:{q}:unrun` | list | ids of jobs a take-over ended without running them (for the Celery consumer); at most 10 000, a day |
//! | `celer:{q}:j:<id>` | hash | envelope, state, result, lease token…; expires `result_ttl` after the job finished (failed jobs stay until purged or retried) |
//! | `celer:{q}:idem:<key>` | string | idempotency key → job id; expires with its job |
//! | `celer:queues` | set | queue names, for lookups by id and `queue_stats` |
//! | `celer:host:<host>` | string, TTL | heartbeat of a live host (JSON) |
//! | `celer:hosts` | set | host names that sent a heartbeat (pruned when theirs expired) |
//!
//! All keys of one queue share the hash tag `{q}`, so every script (one per
//! state change, see [`scripts`]) touches one cluster slot.
//!
//! # Leases
//!
//! A lease is a pending entry of the consumer group. A fetch ([`fetch`])
//! reads at most `max` new entries (no hoarding) with a plain XREADGROUP
//! and marks each job `running` with a fresh token in one pipeline; the
//! entry carries the envelope, so leasing never reads the job's hash. A
//! maintenance script, run every few tens of ms per queue, promotes due
//! delayed jobs and, at most every third of a lease (≤ 250 ms), takes over
//! with XAUTOCLAIM the entries idle for longer than the leases of the hosts
//! holding them (a new attempt, or `failed`/`lost` when out of retries).
//! The holder renews by claiming its own entries again (XCLAIM resets their
//! idle time), so a job is never taken over while its host lives.
//! `complete` acks and deletes the entry with the outcome: in the COMPLETE
//! script, checked against the token (a stale worker's `complete` changes
//! nothing), or, for a success whose lease was confirmed less than half a
//! lease ago ([`held`]), in one plain pipeline. `XPENDING` shows who holds what.
//!
//! One idle threshold serves a queue: the longest lease of the hosts that
//! hold its entries (`lease-ms`), so hosts with different `lease_ms` never
//! cut each other's leases short.
//!
//! # Waiting for work
//!
//! When nothing is due, fetch waits (up to `block`, the worker's poll
//! interval) with `XREAD BLOCK` on the queue's streams from the ids last
//! delivered to the group, on a connection of its own, so a new job starts
//! within a round trip instead of a poll interval. It never reads through
//! the group while blocking, so nothing can be delivered to a host that
//! does not record the lease.
//!
//! # Redis restarts
//!
//! Connections reconnect by themselves ([`conn`]); scripts are loaded again
//! on NOSCRIPT; streams and the consumer group are created again when
//! missing (MKSTREAM; NOGROUP handled by the fetch and the scripts), so consumption
//! resumes by itself. Whether jobs survive a restart is Redis's
//! persistence setting (AOF `appendfsync always` for no loss at all).

pub mod conn;
mod fetch;
mod held;
pub mod pubsub;
pub mod scripts;
mod stops;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::AsyncCommands;
use futures_util::future::join_all;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use self::conn::{Conn, Target};
use self::held::{HeldLease, HeldLeases};
use self::scripts::Scripts;
use super::{
    Broker, BrokerError, CancelOutcome, Delivery, Enqueued, FetchRequest, HostInfo, Lease,
    LeaseStatus, Outcome, QueueStats, RunRecord,
};
use crate::job::{ErrorKind, Job, JobError, JobState, JobStatus, JsonText, NewJob, Progress};

/// The consumer group every host joins.
pub const GROUP: &str = "celer";
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "celer:";
/// How long a finished job's hash stays readable, by default (a day, like
/// Celery's `result_expires`).
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(86_400);
/// `<prefix>{queue}:`, the prefix of every key of one queue (the braces
/// are its hash tag).
pub fn queue_prefix(prefix: &str, queue: &str) -> String {
    format!("{prefix}{{{queue}}}:")
}

/// The list of jobs of `queue` that a take-over ended without running
/// them (cancelled while their host was gone, or lost on their last
/// attempt), newest first: what the Celery consumer answers for.
pub fn unrun_key(prefix: &str, queue: &str) -> String {
    format!("{}unrun", queue_prefix(prefix, queue))
}

/// How often a host refreshes its heartbeat key, and how long it lives.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT_TTL: Duration = Duration::from_secs(10);
/// How long a request on the shared connection may wait for its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The lease assumed for a holder that recorded none (the worker's default
/// `lease_ms`); every fetch that leases jobs records its holder's lease.
const DEFAULT_LEASE_MS: u64 = 30_000;

/// How to reach Redis and lay out the keys.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port/db` or `redis+cluster://host:port,host:port`.
    pub url: String,
    /// Prepended to every key; must not contain `{` or `}`.
    pub prefix: String,
    /// How long a finished job stays readable.
    pub result_ttl: Duration,
    /// How long a fetch waits for a job when none is due (0: never waits).
    pub block: Duration,
}

impl RedisOptions {
    /// The defaults `celer.toml` documents, for callers (tests, the bench) that only have a
    /// URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            prefix: DEFAULT_PREFIX.into(),
            result_ttl: DEFAULT_RESULT_TTL,
            block: Duration::ZERO,
        }
    }
}

/// The immutable part of a job, stored once as JSON in its hash.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    id: String,
    task: String,
    args: JsonText,
    kwargs: JsonText,
    queue: String,
    priority: i32,
    max_retries: u32,
    eta: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    timeout_ms: Option<u64>,
    idempotency_key: Option<String>,
    parent_id: Option<String>,
    /// Absent in envelopes written before root ids were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root_id: Option<String>,
}

/// A broker on Redis Streams; cheap to clone.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    target: Target,
    prefix: String,
    ttl_s: u64,
    block: Duration,
    scripts: Arc<Scripts>,
    /// Completions go through one batching task (see [`complete_batches`]).
    completer: tokio::sync::mpsc::UnboundedSender<CompleteReq>,
    /// When each queue was last added to the `queues` set by this process.
    registered: Mutex<HashMap<String, std::time::Instant>>,
    /// Leases held by this host, for the unchecked outcome path.
    held: HeldLeases,
    /// When each queue's maintenance script last ran (see [`fetch`]).
    pacing: Mutex<HashMap<String, fetch::Pacing>>,
    /// Connections for blocking reads, one per concurrent waiter.
    waiters: Mutex<Vec<Conn>>,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Stop requests heard from every host (see [`stops`]), and the task
    /// that listens for them, started by the first worker that asks.
    stops: tokio::sync::broadcast::Sender<String>,
    stop_listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in [&self.heartbeat, &self.stop_listener] {
            if let Ok(mut h) = task.lock()
                && let Some(h) = h.take()
            {
                h.abort();
            }
        }
    }
}

fn unavailable(e: ::redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, BrokerError> {
    serde_json::to_string(value).map_err(|e| BrokerError::Invalid(format!("not storable as JSON: {e}")))
}

fn ms_precision(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

impl RedisBroker {
    /// Connects (failing when Redis cannot be reached now; later outages
    /// are survived by reconnecting).
    pub async fn connect(options: RedisOptions) -> Result<Self, BrokerError> {
        if options.prefix.contains('{') || options.prefix.contains('}') {
            return Err(BrokerError::Invalid(format!(
                "the Redis key prefix must not contain braces (they would break the per-queue hash tags): {:?}",
                options.prefix
            )));
        }
        let target = Target::parse(&options.url).map_err(BrokerError::Invalid)?;
        let conn = target.connect(Some(RESPONSE_TIMEOUT)).await.map_err(unavailable)?;
        let scripts = Arc::new(Scripts::new());
        let ttl_s = options.result_ttl.as_secs().max(1);
        let (completer, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(complete_batches(requests, conn.clone(), scripts.clone(), options.prefix.clone(), ttl_s));
        let broker = RedisBroker {
            inner: Arc::new(Inner {
                conn,
                target,
                prefix: options.prefix,
                ttl_s,
                block: options.block,
                scripts,
                completer,
                registered: Mutex::new(HashMap::new()),
                held: HeldLeases::default(),
                pacing: Mutex::new(HashMap::new()),
                waiters: Mutex::new(Vec::new()),
                heartbeat: Mutex::new(None),
                stops: tokio::sync::broadcast::channel(super::STOP_REQUESTS_BUFFER).0,
                stop_listener: Mutex::new(None),
            }),
        };
        // Fail now, with a clear message, when the URL is wrong.
        let mut c = broker.conn();
        let _: String = ::redis::cmd("PING").query_async(&mut c).await.map_err(unavailable)?;
        Ok(broker)
    }

    /// A connection handle for one request (a clone of the shared one).
    pub fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// `celer:{queue}:`, the prefix of every key of one queue.
    pub fn queue_prefix(&self, queue: &str) -> String {
        queue_prefix(&self.inner.prefix, queue)
    }

    fn job_key(&self, queue: &str, id: &str) -> String {
        format!("{}j:{}", self.queue_prefix(queue), id)
    }

    fn queues_key(&self) -> String {
        format!("{}queues", self.inner.prefix)
    }

    fn hosts_key(&self) -> String {
        format!("{}hosts", self.inner.prefix)
    }

    /// Jobs each consumer (host) holds, from the pending lists of every
    /// queue's streams.
    async fn running_by_host(&self) -> Result<HashMap<String, u64>, BrokerError> {
        let mut by_host = HashMap::new();
        for queue in self.queues().await? {
            let qp = self.queue_prefix(&queue);
            let mut c = self.conn();
            let mut prios: Vec<String> = c.zrange(format!("{qp}prios"), 0, -1).await.map_err(unavailable)?;
            if !prios.iter().any(|p| p == "0") {
                prios.push("0".into());
            }
            for p in prios {
                let summary: Result<::redis::Value, _> =
                    ::redis::cmd("XPENDING").arg(format!("{qp}s:{p}")).arg(GROUP).query_async(&mut c).await;
                // No stream or no group yet: nothing pending there.
                let Ok(::redis::Value::Array(parts)) = summary else { continue };
                let Some(::redis::Value::Array(consumers)) = parts.get(3) else { continue };
                for consumer in consumers {
                    let Ok((name, count)) = ::redis::from_redis_value::<(String, u64)>(consumer.clone()) else { continue };
                    *by_host.entry(name).or_insert(0) += count;
                }
            }
        }
        Ok(by_host)
    }

    /// Every queue that ever held a job (since the last flush).
    pub async fn queues(&self) -> Result<Vec<String>, BrokerError> {
        let mut c = self.conn();
        let mut q: Vec<String> = c.smembers(self.queues_key()).await.map_err(unavailable)?;
        q.sort();
        Ok(q)
    }

    /// The queue a lease token names (`<random>-<n>.<queue>`).
    fn lease_queue(lease: &Lease) -> Option<&str> {
        lease.token.split_once('.').map(|(_, q)| q)
    }

    /// Which queue holds job `id`: the job hash is looked up in every known queue.
    async fn find(&self, id: &str) -> Result<Option<(String, HashMap<String, String>)>, BrokerError> {
        let queues = self.queues().await?;
        let lookups = queues.iter().map(|q| {
            let mut c = self.conn();
            let key = self.job_key(q, id);
            async move {
                let h: HashMap<String, String> = c.hgetall(key).await.map_err(unavailable)?;
                Ok::<_, BrokerError>(h)
            }
        });
        let found = join_all(lookups).await;
        for (q, h) in queues.into_iter().zip(found) {
            let h = h?;
            if !h.is_empty() {
                return Ok(Some((q, h)));
            }
        }
        Ok(None)
    }

    fn start_heartbeat(&self, host: &str, queues: &[String]) {
        let Ok(mut slot) = self.inner.heartbeat.lock() else { return };
        if slot.is_some() {
            return;
        }
        let key = format!("{}host:{}", self.inner.prefix, host);
        let hosts_key = self.hosts_key();
        let (host, queues, started_at) = (host.to_string(), queues.to_vec(), Utc::now());
        let weak = Arc::downgrade(&self.inner);
        *slot = Some(tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let mut c = inner.conn.clone();
                drop(inner);
                let value = Heartbeat {
                    host: host.clone(),
                    queues: queues.clone(),
                    pid: std::process::id(),
                    started_at,
                    seen_at: Utc::now(),
                };
                // Two commands, not one pipeline: on a cluster the keys live
                // in different slots.
                let set: Result<(), _> = ::redis::cmd("SET")
                    .arg(&key)
                    .arg(serde_json::to_string(&value).unwrap_or_default())
                    .arg("PX")
                    .arg(HEARTBEAT_TTL.as_millis() as u64)
                    .query_async(&mut c)
                    .await;
                let add: Result<i64, _> = ::redis::cmd("SADD").arg(&hosts_key).arg(&host).query_async(&mut c).await;
                let beat = set.and(add.map(|_| ()));
                if let Err(e) = beat {
                    tracing::debug!(error = %e, "heartbeat not written");
                }
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        }));
    }

    /// Blocks until one of the streams gets a new entry, or `block` (or
    /// the wait for the next delayed job) ends.
    async fn wait_for_entries(&self, wait: Wait, block: Duration) {
        let mut timeout = block;
        if let Some(next) = wait.next_ms {
            timeout = timeout.min(Duration::from_millis(u64::try_from(next).unwrap_or(0)));
        }
        let timeout = timeout.max(Duration::from_millis(2));
        if wait.streams.is_empty() {
            tokio::time::sleep(timeout).await;
            return;
        }
        let conn = self.inner.waiters.lock().ok().and_then(|mut w| w.pop());
        let mut conn = match conn {
            Some(c) => c,
            None => match self.inner.target.connect(None).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "no connection for a blocking read");
                    tokio::time::sleep(timeout).await;
                    return;
                }
            },
        };
        let mut cmd = ::redis::cmd("XREAD");
        cmd.arg("COUNT").arg(1).arg("BLOCK").arg(timeout.as_millis() as u64).arg("STREAMS");
        for (k, _) in &wait.streams {
            cmd.arg(k);
        }
        for (_, id) in &wait.streams {
            cmd.arg(id);
        }
        let read: Result<::redis::Value, _> = cmd.query_async(&mut conn).await;
        match read {
            Ok(_) => {
                if let Ok(mut w) = self.inner.waiters.lock() {
                    w.push(conn);
                }
            }
            Err(e) => {
                // Dropped: a broken connection is not reused.
                tracing::debug!(error = %e, "blocking read failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn status_from_hash(&self, id: &str, h: &HashMap<String, String>) -> Result<JobStatus, BrokerError> {
        let corrupt = |reason: String| BrokerError::Corrupt { id: id.to_string(), reason };
        let get = |k: &str| h.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let env: Envelope = serde_json::from_str(get("env").ok_or_else(|| corrupt("no envelope".into()))?)
            .map_err(|e| corrupt(format!("envelope: {e}")))?;
        let int = |k: &str| -> Result<Option<i64>, BrokerError> {
            get(k).map(|v| v.parse::<i64>().map_err(|_| corrupt(format!("field {k}: {v:?} is not a number")))).transpose()
        };
        let micros = |k: &str| -> Result<Option<DateTime<Utc>>, BrokerError> {
            int(k)?.map(|us| DateTime::from_timestamp_micros(us).ok_or_else(|| corrupt(format!("field {k}: not a time")))).transpose()
        };
        let json = |k: &str| -> Result<Option<Value>, BrokerError> {
            get(k).map(|v| serde_json::from_str(v).map_err(|e| corrupt(format!("field {k}: {e}")))).transpose()
        };
        let state_text = get("state").unwrap_or("");
        let state = JobState::parse(state_text).ok_or_else(|| corrupt(format!("unknown state {state_text:?}")))?;
        let error = match get("ek") {
            None => None,
            Some(kind) => {
                let kind: ErrorKind = serde_json::from_value(Value::String(kind.to_string()))
                    .map_err(|_| corrupt(format!("unknown error kind {kind:?}")))?;
                Some(JobError { kind, message: get("em").unwrap_or("").to_string() })
            }
        };
        let progress = match (int("pd")?, int("pt")?) {
            (Some(done), Some(total)) => Some(Progress { done: done.max(0) as u64, total: total.max(0) as u64 }),
            _ => None,
        };
        let attempt = int("attempt")?.unwrap_or(0);
        let enqueued_at = micros("enq")?.ok_or_else(|| corrupt("no enqueue time".into()))?;
        Ok(JobStatus {
            job: job_of(env, u32::try_from(attempt).unwrap_or(0), enqueued_at),
            state,
            result: json("result")?,
            error,
            progress,
            started_at: micros("st")?,
            finished_at: micros("fin")?,
            plugin: get("plugin").map(String::from),
            plugin_version: get("pv").map(String::from),
            host: get("host").map(String::from),
            touched: json("touched")?,
            log: h.get("log").cloned(),
        })
    }

    /// Waits until the fetch's `running` mark of a lease held here has been
    /// answered, so that what follows lands after it ([`held::Marked`]).
    async fn mark_answered(&self, token: &str) {
        if let Some(marked) = self.inner.held.marked(token) {
            marked.wait().await;
        }
    }

    /// Hands an outcome to the batching task and waits for its answer.
    async fn send_complete(&self, queue: &str, write: Write) -> Result<bool, BrokerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || BrokerError::Unavailable("the broker is shutting down".into());
        self.inner.completer.send(CompleteReq { queue: queue.to_string(), write, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Dead-letter job ids of one queue, newest first.
    async fn dead_ids(&self, queue: &str, limit: usize) -> Result<Vec<String>, BrokerError> {
        let mut c = self.conn();
        let key = format!("{}dead", self.queue_prefix(queue));
        let entries: ::redis::streams::StreamRangeReply =
            c.xrevrange_count(&key, "+", "-", limit).await.map_err(unavailable)?;
        Ok(entries
            .ids
            .into_iter()
            .filter_map(|e| e.get::<String>("id"))
            .collect())
    }
}

/// What a host writes to `celer:host:<host>` every [`HEARTBEAT_EVERY`].
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    host: String,
    queues: Vec<String>,
    pid: u32,
    started_at: DateTime<Utc>,
    seen_at: DateTime<Utc>,
}

/// One `complete`, waiting for its batch.
struct CompleteReq {
    queue: String,
    write: Write,
    reply: tokio::sync::oneshot::Sender<Result<bool, BrokerError>>,
}

/// The record fields of a finished attempt, in the order the COMPLETE
/// script takes them and under the names the job hash keeps them.
const RECORD_FIELDS: [&str; 6] = ["plugin", "pv", "touched", "log", "pd", "pt"];

/// One outcome to write.
struct Write {
    token: String,
    job_id: String,
    /// `succeeded`, `retry`, `dead` or `cancelled`.
    kind: &'static str,
    /// The result JSON (succeeded).
    result: String,
    error_kind: String,
    error_message: String,
    /// Retry time, ms.
    retry_at: i64,
    /// When the run ended, µs (the unchecked path stamps it; the script
    /// uses Redis's clock).
    finished_us: i64,
    /// Values of [`RECORD_FIELDS`].
    record: [Option<String>; 6],
    /// Set for a success whose lease was certain when it ended
    /// ([`HeldLease`]): written with the plain pipeline if it still is when
    /// the batch is sent, else through the script.
    held: Option<HeldLease>,
}

impl Write {
    fn unchecked(&self) -> bool {
        self.held.as_ref().is_some_and(HeldLease::certainly_held)
    }
}

/// Writes outcomes in batches: whatever completions are waiting when the
/// previous batch returns go out together, per queue one script call for
/// the checked ones and one pipeline for the unchecked ones. At low load a
/// batch is one job (no added latency); under load one round trip records
/// many jobs.
async fn complete_batches(
    mut requests: tokio::sync::mpsc::UnboundedReceiver<CompleteReq>,
    conn: Conn,
    scripts: Arc<Scripts>,
    prefix: String,
    ttl_s: u64,
) {
    const MAX_BATCH: usize = 128;
    while let Some(first) = requests.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut by_queue: HashMap<(String, bool), Vec<CompleteReq>> = HashMap::new();
        for r in batch {
            let checked = !r.write.unchecked();
            by_queue.entry((r.queue.clone(), checked)).or_default().push(r);
        }
        let calls = by_queue.into_iter().map(|((queue, checked), reqs)| {
            let c = conn.clone();
            let scripts = scripts.clone();
            let qp = queue_prefix(&prefix, &queue);
            async move {
                let written = if checked {
                    write_checked(c, &scripts, &qp, ttl_s, &reqs).await
                } else {
                    write_unchecked(c, &qp, ttl_s, &reqs).await.map(|()| vec![1; reqs.len()])
                };
                match written {
                    Ok(flags) => {
                        for (r, flag) in reqs.into_iter().zip(flags.into_iter().chain(std::iter::repeat(0))) {
                            let _ = r.reply.send(Ok(flag == 1));
                        }
                    }
                    Err(e) => {
                        for r in reqs {
                            let _ = r.reply.send(Err(unavailable(e.clone())));
                        }
                    }
                }
            }
        });
        join_all(calls).await;
    }
}

/// One COMPLETE script call for a batch of one queue; 1 per recorded job.
async fn write_checked(
    mut c: Conn,
    scripts: &Scripts,
    qp: &str,
    ttl_s: u64,
    reqs: &[CompleteReq],
) -> Result<Vec<i64>, ::redis::RedisError> {
    let mut inv = scripts.complete.prepare_invoke();
    inv.key(format!("{qp}delayed")).arg(qp).arg(GROUP).arg(ttl_s);
    for r in reqs {
        let w = &r.write;
        inv.arg(&w.token)
            .arg(&w.job_id)
            .arg(w.kind)
            .arg(&w.result)
            .arg(&w.error_kind)
            .arg(&w.error_message)
            .arg(w.retry_at);
        // Optional record fields: '' when absent, '=' + value when present.
        for v in &w.record {
            inv.arg(v.as_ref().map(|v| format!("={v}")).unwrap_or_default());
        }
    }
    inv.invoke_async(&mut c).await
}

/// One pipeline for a batch of successes of one queue: each job's hash
/// gets its outcome and its expiry, then the entries are acked and deleted
/// with one XACK and one XDEL per stream (as the COMPLETE script does). No
/// MULTI is needed: Redis runs one connection's commands in order, so if
/// the connection drops part way, every entry not yet acked still belongs
/// to a job that runs again (at least once), and one whose outcome landed
/// is only acked by the takeover scan.
async fn write_unchecked(mut c: Conn, qp: &str, ttl_s: u64, reqs: &[CompleteReq]) -> Result<(), ::redis::RedisError> {
    let mut pipe = ::redis::pipe();
    let mut entries: HashMap<&str, Vec<&str>> = HashMap::new();
    for r in reqs {
        let w = &r.write;
        let Some(held) = &w.held else { continue };
        let jk = format!("{qp}j:{}", w.job_id);
        // Borrowed, not copied: the result and the log can be large.
        let fin = w.finished_us.to_string();
        let mut fields: Vec<(&str, &str)> = vec![("state", "succeeded"), ("result", &w.result), ("fin", &fin)];
        fields.extend(RECORD_FIELDS.iter().zip(&w.record).filter_map(|(k, v)| v.as_deref().map(|v| (*k, v))));
        pipe.hset_multiple(&jk, &fields).ignore();
        if held.attempt > 0 {
            pipe.hdel(&jk, &["ek", "em"]).ignore();
        }
        pipe.expire(&jk, ttl_s as i64).ignore();
        if let Some(ik) = &held.idempotency_key {
            pipe.expire(ik, ttl_s as i64).ignore();
        }
        entries.entry(held.stream.as_str()).or_default().push(held.entry.as_str());
    }
    for (stream, ids) in entries {
        pipe.cmd("XACK").arg(stream).arg(GROUP).arg(&ids).ignore();
        pipe.cmd("XDEL").arg(stream).arg(&ids).ignore();
    }
    pipe.query_async(&mut c).await
}

/// What a fetch that found nothing blocks on.
#[derive(Debug, Default)]
struct Wait {
    /// ms until the next delayed job, when any.
    next_ms: Option<i64>,
    /// (stream key, last id seen).
    streams: Vec<(String, String)>,
}

fn job_of(env: Envelope, attempt: u32, enqueued_at: DateTime<Utc>) -> Job {
    Job {
        id: env.id,
        task: env.task,
        args: env.args,
        kwargs: env.kwargs,
        queue: env.queue,
        priority: env.priority,
        attempt,
        max_retries: env.max_retries,
        eta: env.eta,
        expires_at: env.expires_at,
        timeout_ms: env.timeout_ms,
        idempotency_key: env.idempotency_key,
        parent_id: env.parent_id,
        root_id: env.root_id,
        enqueued_at,
    }
}

/// A lease length as the scripts and `lease-ms` take it.
fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl Broker for RedisBroker {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, BrokerError> {
        job.validate().map_err(BrokerError::Invalid)?;
        let id = Uuid::now_v7().to_string();
        let qp = self.queue_prefix(&job.queue);
        let jk = format!("{qp}j:{id}");
        let idem = job.idempotency_key.as_ref().map(|k| format!("{qp}idem:{k}"));
        let env = Envelope {
            id: id.clone(),
            task: job.task.clone(),
            args: JsonText::of(&job.args),
            kwargs: JsonText::of(&job.kwargs),
            queue: job.queue.clone(),
            priority: job.priority,
            max_retries: job.max_retries,
            eta: job.eta.map(ms_precision),
            expires_at: job.expires_at.map(ms_precision),
            timeout_ms: job.timeout_ms,
            idempotency_key: job.idempotency_key.clone(),
            parent_id: job.parent_id,
            root_id: job.root_id,
        };
        let mut inv = self.inner.scripts.enqueue.prepare_invoke();
        inv.key(&jk)
            .key(format!("{qp}delayed"))
            .key(idem.as_deref().unwrap_or(&jk))
            .arg(&qp)
            .arg(GROUP)
            .arg(&id)
            .arg(to_json(&env)?)
            .arg(&job.task)
            .arg(job.priority)
            .arg(job.max_retries)
            .arg(job.expires_at.map(|t| t.timestamp_millis().to_string()).unwrap_or_default())
            .arg(job.eta.map(|t| t.timestamp_millis().to_string()).unwrap_or_default())
            .arg(if idem.is_some() { "1" } else { "0" });
        let mut c = self.conn();
        // The queue joins the `queues` set (what lookups by id and stats
        // walk); refreshed every second, so a Redis that lost it (restart)
        // gets it back.
        let register = self.inner.registered.lock().map_or(true, |mut r| {
            let now = std::time::Instant::now();
            match r.get(&job.queue) {
                Some(t) if now.duration_since(*t) < Duration::from_secs(1) => false,
                _ => {
                    r.insert(job.queue.clone(), now);
                    true
                }
            }
        });
        let mut c2 = self.conn();
        let queues_key = self.queues_key();
        let queue = job.queue.clone();
        let add = async move {
            if register {
                let added: Result<i64, _> = c2.sadd(queues_key, queue).await;
                added.map(|_| ())
            } else {
                Ok(())
            }
        };
        let (res, added) = tokio::join!(inv.invoke_async::<(i64, String)>(&mut c), add);
        let (fresh, id) = res.map_err(unavailable)?;
        if let Err(e) = added {
            if let Ok(mut r) = self.inner.registered.lock() {
                r.remove(&job.queue);
            }
            return Err(unavailable(e));
        }
        Ok(Enqueued { id, existing: fresh == 0 })
    }

    async fn fetch(&self, req: FetchRequest<'_>) -> Result<Vec<Delivery>, BrokerError> {
        if req.max == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        self.start_heartbeat(req.host, req.queues);
        let blocking = !self.inner.block.is_zero();
        let (got, wait) = self.fetch_once(&req, blocking).await?;
        if !got.is_empty() || !blocking {
            return Ok(got);
        }
        let block = req.wait_longer.map_or(self.inner.block, |longer| longer.max(self.inner.block));
        self.wait_for_entries(wait, block).await;
        let (got, _) = self.fetch_once(&req, false).await?;
        Ok(got)
    }

    fn stop_requests(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        let heard = self.inner.stops.subscribe();
        if let Ok(mut listener) = self.inner.stop_listener.lock()
            && listener.as_ref().is_none_or(tokio::task::JoinHandle::is_finished)
        {
            let (target, channel) = (self.inner.target.clone(), stops::channel(&self.inner.prefix));
            *listener = Some(tokio::spawn(stops::listen(target, channel, self.inner.stops.clone())));
        }
        Some(heard)
    }

    fn fetch_waits(&self) -> bool {
        !self.inner.block.is_zero()
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<LeaseStatus, BrokerError> {
        let Some(queue) = Self::lease_queue(lease) else { return Ok(LeaseStatus::Lost) };
        self.mark_answered(&lease.token).await;
        let qp = self.queue_prefix(queue);
        let mut c = self.conn();
        let sent = std::time::Instant::now();
        let r: i64 = lease_call(&self.inner.scripts.renew, &qp, lease)
            .arg(lease_ms(ttl))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(match r {
            -1 => {
                self.inner.held.take(&lease.token);
                LeaseStatus::Lost
            }
            flag => {
                self.inner.held.confirm(&lease.token, sent, ttl);
                LeaseStatus::Held { cancel_requested: flag == 1 }
            }
        })
    }

    async fn progress(&self, lease: &Lease, done: u64, total: u64) -> Result<(), BrokerError> {
        let Some(queue) = Self::lease_queue(lease) else { return Ok(()) };
        self.mark_answered(&lease.token).await;
        let qp = self.queue_prefix(queue);
        let mut c = self.conn();
        let _: i64 = self
            .inner
            .scripts
            .progress
            .key(format!("{qp}j:{}", lease.job_id))
            .arg(&qp)
            .arg(GROUP)
            .arg(&lease.token)
            .arg(done)
            .arg(total)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn complete(&self, lease: &Lease, outcome: Outcome, record: RunRecord) -> Result<bool, BrokerError> {
        let Some(queue) = Self::lease_queue(lease) else { return Ok(false) };
        let kind_text = |k: ErrorKind| match serde_json::to_value(k) {
            Ok(Value::String(s)) => s,
            _ => "plugin".to_string(),
        };
        let (kind, result, error_kind, error_message, retry_at) = match &outcome {
            Outcome::Succeeded { result } => ("succeeded", to_json(result)?, String::new(), String::new(), 0),
            Outcome::Retry { error, at } => {
                ("retry", String::new(), kind_text(error.kind), error.message.clone(), at.timestamp_millis())
            }
            Outcome::Dead { error } => ("dead", String::new(), kind_text(error.kind), error.message.clone(), 0),
            Outcome::Cancelled { error } => {
                ("cancelled", String::new(), kind_text(error.kind), error.message.clone(), 0)
            }
        };
        // Whether it is still certainly held is judged when the batch is sent.
        let held = self.inner.held.take(&lease.token);
        if let Some(h) = &held {
            h.marked.wait().await;
        }
        let write = Write {
            token: lease.token.clone(),
            job_id: lease.job_id.clone(),
            kind,
            result,
            error_kind,
            error_message,
            retry_at,
            finished_us: Utc::now().timestamp_micros(),
            record: [
                record.plugin,
                record.plugin_version,
                record.touched.as_ref().map(to_json).transpose()?,
                record.log,
                record.progress.map(|p| p.done.to_string()),
                record.progress.map(|p| p.total.to_string()),
            ],
            held: held.filter(|_| kind == "succeeded"),
        };
        self.send_complete(queue, write).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        let Some(queue) = Self::lease_queue(lease) else { return Ok(()) };
        if let Some(h) = self.inner.held.take(&lease.token) {
            h.marked.wait().await;
        }
        let qp = self.queue_prefix(queue);
        let mut c = self.conn();
        let _: i64 = lease_call(&self.inner.scripts.release, &qp, lease)
            .arg(&lease.job_id)
            .arg(self.inner.ttl_s)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn cancel(&self, id: &str) -> Result<CancelOutcome, BrokerError> {
        let Some((queue, _)) = self.find(id).await? else { return Ok(CancelOutcome::NotFound) };
        let qp = self.queue_prefix(&queue);
        let mut c = self.conn();
        let r: String = self
            .inner
            .scripts
            .cancel
            .key(format!("{qp}j:{id}"))
            .key(format!("{qp}delayed"))
            .arg(&qp)
            .arg(GROUP)
            .arg(id)
            .arg(self.inner.ttl_s)
            .arg(DEFAULT_LEASE_MS)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(match r.as_str() {
            "cancelled" => CancelOutcome::Cancelled,
            "stop-requested" => {
                stops::publish(self.conn(), &stops::channel(&self.inner.prefix), id).await;
                CancelOutcome::StopRequested
            }
            "already-finished" => CancelOutcome::AlreadyFinished,
            _ => CancelOutcome::NotFound,
        })
    }

    async fn status(&self, id: &str) -> Result<Option<JobStatus>, BrokerError> {
        match self.find(id).await? {
            Some((_, h)) => self.status_from_hash(id, &h).map(Some),
            None => Ok(None),
        }
    }

    async fn dead_list(&self, limit: u32) -> Result<Vec<JobStatus>, BrokerError> {
        let mut all = Vec::new();
        for queue in self.queues().await? {
            for id in self.dead_ids(&queue, limit as usize).await? {
                let mut c = self.conn();
                let h: HashMap<String, String> = c.hgetall(self.job_key(&queue, &id)).await.map_err(unavailable)?;
                if h.get("state").map(String::as_str) != Some("failed") {
                    continue;
                }
                let dead: i64 = h.get("dead").and_then(|v| v.parse().ok()).unwrap_or(0);
                all.push((dead, self.status_from_hash(&id, &h)?));
            }
        }
        all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.job.id.cmp(&a.1.job.id)));
        Ok(all.into_iter().take(limit as usize).map(|(_, s)| s).collect())
    }

    async fn dead_retry(&self, ids: &[String]) -> Result<u64, BrokerError> {
        let mut by_queue: HashMap<String, Vec<String>> = HashMap::new();
        if ids.is_empty() {
            for q in self.queues().await? {
                by_queue.insert(q, Vec::new());
            }
        } else {
            for id in ids {
                if let Some((q, _)) = self.find(id).await? {
                    by_queue.entry(q).or_default().push(id.clone());
                }
            }
        }
        let mut total = 0u64;
        for (queue, ids) in by_queue {
            let qp = self.queue_prefix(&queue);
            let mut inv = self.inner.scripts.dead_retry.prepare_invoke();
            inv.key(format!("{qp}dead")).arg(&qp).arg(GROUP);
            for id in &ids {
                inv.arg(id);
            }
            let mut c = self.conn();
            let n: u64 = inv.invoke_async(&mut c).await.map_err(unavailable)?;
            total += n;
        }
        Ok(total)
    }

    async fn dead_purge(&self) -> Result<u64, BrokerError> {
        let mut total = 0u64;
        for queue in self.queues().await? {
            let qp = self.queue_prefix(&queue);
            let mut c = self.conn();
            let n: u64 = self
                .inner
                .scripts
                .dead_purge
                .key(format!("{qp}dead"))
                .arg(&qp)
                .arg(GROUP)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            total += n;
        }
        Ok(total)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut c = self.conn();
        let _: String = ::redis::cmd("PING").query_async(&mut c).await.map_err(unavailable)?;
        Ok(())
    }

    /// Hosts with a live heartbeat, and any other consumer still holding
    /// jobs (a host that died: its jobs are taken over once their leases
    /// run out).
    async fn hosts(&self) -> Result<Vec<HostInfo>, BrokerError> {
        let mut c = self.conn();
        let names: Vec<String> = c.smembers(self.hosts_key()).await.map_err(unavailable)?;
        let mut running = self.running_by_host().await?;
        let mut out = Vec::new();
        for name in names {
            let beat: Option<String> = c.get(format!("{}host:{}", self.inner.prefix, name)).await.map_err(unavailable)?;
            let Some(beat) = beat.and_then(|b| serde_json::from_str::<Heartbeat>(&b).ok()) else {
                // Its heartbeat expired: forget it (its jobs still show below).
                let _: Result<i64, _> = c.srem(self.hosts_key(), &name).await;
                continue;
            };
            out.push(HostInfo {
                running: running.remove(&name).unwrap_or(0),
                host: name,
                last_seen: Some(beat.seen_at),
                started_at: Some(beat.started_at),
                pid: Some(beat.pid),
                queues: beat.queues,
            });
        }
        for (host, n) in running {
            if n > 0 {
                out.push(HostInfo { host, running: n, ..HostInfo::default() });
            }
        }
        out.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(out)
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>, BrokerError> {
        let mut out = Vec::new();
        for queue in self.queues().await? {
            let qp = self.queue_prefix(&queue);
            let mut c = self.conn();
            let (queued, delayed, running, dead): (u64, u64, u64, u64) = self
                .inner
                .scripts
                .stats
                .key(format!("{qp}prios"))
                .key(format!("{qp}delayed"))
                .key(format!("{qp}dead"))
                .arg(&qp)
                .arg(GROUP)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            if queued + delayed + running + dead > 0 {
                out.push(QueueStats { queue, queued, delayed, running, dead });
            }
        }
        Ok(out)
    }

    async fn take_unrun(&self, queue: &str, max: usize) -> Result<Vec<String>, BrokerError> {
        let mut c = self.conn();
        let ids: Option<Vec<String>> =
            ::redis::cmd("RPOP").arg(unrun_key(self.prefix(), queue)).arg(max.max(1)).query_async(&mut c).await.map_err(unavailable)?;
        Ok(ids.unwrap_or_default())
    }

    async fn put_back_unrun(&self, queue: &str, ids: &[String]) -> Result<(), BrokerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        ::redis::cmd("RPUSH").arg(unrun_key(self.prefix(), queue)).arg(ids).query_async::<i64>(&mut c).await.map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// The test Redis (`scripts/services.sh up redis`, started by `make test`);
/// `CELER_TEST_REDIS_URL` overrides where it is.
#[cfg(test)]
pub(crate) fn test_redis_url() -> String {
    std::env::var("CELER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".into())
}

/// A connection to the test Redis, for tests of code that writes to it.
#[cfg(test)]
pub(crate) async fn test_redis_conn() -> Conn {
    let url = test_redis_url();
    let target = Target::parse(&url).expect("test Redis URL");
    target
        .connect(None)
        .await
        .unwrap_or_else(|e| panic!("the test Redis at {url} is not reachable ({e}): run `scripts/services.sh up redis`"))
}


/// The start every lease-holding script shares: the job hash as key, then
/// queue prefix, consumer group and lease token; callers append their own
/// arguments.
fn lease_call<'a>(script: &'a ::redis::Script, qp: &str, lease: &Lease) -> ::redis::ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    call.key(format!("{qp}j:{}", lease.job_id)).arg(qp).arg(GROUP).arg(&lease.token);
    call
}

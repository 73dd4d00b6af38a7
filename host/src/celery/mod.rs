//! The Celery drop-in: a Django app keeps calling `send_task()` /
//! `.delay()` and `AsyncResult.get()`, and celer does the work.
//!
//! - [`protocol`] reads Celery protocol v2 messages (JSON serializer only).
//! - The consumer here takes messages off kombu's Redis lists (`celery`,
//!   and its priority lists `celery\x06\x16{3,6,9}`) and turns each into a
//!   celer job on the celer queue of the same name. A message is never lost
//!   on the way: it moves atomically (LMOVE/BLMOVE) to a list this host owns,
//!   `<prefix>celery:inflight:<host>/<queue>`, and is removed from there
//!   only once its job is recorded (enqueued, or its outcome written). A
//!   host that dies leaves its list behind; the others notice that its
//!   `<prefix>celery:alive:<host>` key expired and finish its messages (a
//!   message handled twice is still one job: the job's idempotency key is
//!   `celery:<task id>`).
//! - [`broker::CeleryAwareBroker`] writes `celery-task-meta-<id>` when a
//!   job from Celery ends, in Celery's format ([`result`]).
//! - [`follow_ups`] sends `link=` callbacks and the next task of a chain
//!   when a task succeeds, and `link_error=` errbacks when it fails for
//!   good, as a Celery worker does; [`chord`] counts a chord's header tasks
//!   and sends its callback when the last one ends.
//! - [`control`] answers Celery's remote control (`inspect ping`,
//!   `active`, `stats`, …, what `celery inspect` and Flower ask) as the
//!   worker `celer@<host>`; its `revoke` ([`revoke`]) cancels the task's
//!   job (or keeps its message from running).
//! - [`events`] announces the host as a Celery worker (online, heartbeats,
//!   offline) and, when task events are on, reports each task's life
//!   (received, started, succeeded, …), so `celery events` and Flower see
//!   them; [`activity`] is what it and `inspect` report.
//!
//! Messages that cannot be run (not JSON, bad base64, pickle or another
//! content type, unknown task) go to the stream `<prefix>celery:dead` with
//! the reason, and consumption goes on; an unknown task also gets Celery's
//! `NotRegistered` failure as its result, and a message whose `expires`
//! passed gets `REVOKED`, as a Celery worker would write them.

pub mod activity;
pub mod broker;
pub mod chord;
pub mod control;
pub mod events;
pub mod follow_ups;
pub mod protocol;
pub mod result;
pub mod revoke;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use self::protocol::TaskMessage;
use self::result::{Exception, Status};
use crate::broker::redis::conn::{Conn, Target};
use crate::broker::{Broker, BrokerError};
use crate::config::{CeleryConfig, Config};
use crate::job::NewJob;
use crate::runtime::registry::Registry;

/// How many messages one round moves off a list.
const BATCH: usize = 64;
/// The alive key's lifetime and refresh period.
const ALIVE_TTL: Duration = Duration::from_secs(10);
const ALIVE_EVERY: Duration = Duration::from_secs(2);
/// How often orphaned in-flight lists of dead hosts are looked for (and
/// tasks that expired in celer's queue are reported).
const RECOVER_EVERY: Duration = Duration::from_secs(2);

/// Writes Celery results: SETEX + PUBLISH in one MULTI, like Celery's Redis backend.
#[derive(Clone)]
pub struct ResultWriter {
    conn: Conn,
    expires_s: u64,
    running: ::redis::Script,
    unstart: ::redis::Script,
}

/// KEYS: a result key. Deletes it while it reads STARTED (a task handed
/// back before it ran reads PENDING again, as Celery shows a task nobody
/// has started).
const UNSTART: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, '"status": "STARTED"', 1, true) then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// KEYS: result keys; ARGV: 1 ttl s, then one document per key. Writes
/// (SETEX + PUBLISH) each document unless its key holds a final state.
const WRITE_RUNNING: &str = r#"
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  local final = cur and (string.find(cur, '"status": "SUCCESS"', 1, true) or string.find(cur, '"status": "FAILURE"', 1, true)
    or string.find(cur, '"status": "REVOKED"', 1, true))
  if not final then
    redis.call('SETEX', key, ARGV[1], ARGV[i + 1])
    redis.call('PUBLISH', key, ARGV[i + 1])
  end
end
return 1
"#;

impl ResultWriter {
    /// Results expire as the app's `result_expires` says, like those a Celery worker
    /// writes.
    pub fn new(conn: Conn, expires_s: u64) -> Self {
        ResultWriter {
            conn,
            expires_s: expires_s.max(1),
            running: ::redis::Script::new(WRITE_RUNNING),
            unstart: ::redis::Script::new(UNSTART),
        }
    }

    /// SETEX and PUBLISH in one round trip: a `.get()` waiting on the channel wakes as the
    /// key appears.
    pub async fn write(&self, task_id: &str, doc: &str) -> Result<(), ::redis::RedisError> {
        self.write_all(&[(task_id, doc)]).await
    }

    /// Writes several results (task id, document) in one MULTI.
    pub async fn write_all<I: AsRef<str>, D: AsRef<str>>(&self, docs: &[(I, D)]) -> Result<(), ::redis::RedisError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for (task_id, doc) in docs {
            let key = format!("celery-task-meta-{}", task_id.as_ref());
            pipe.cmd("SETEX").arg(&key).arg(self.expires_s).arg(doc.as_ref()).ignore();
            pipe.cmd("PUBLISH").arg(&key).arg(doc.as_ref()).ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async(&mut c).await
    }

    /// Whether the task's stored result is final (SUCCESS, FAILURE or
    /// REVOKED), so that nothing writes it a second time.
    pub async fn is_final(&self, task_id: &str) -> Result<bool, ::redis::RedisError> {
        let mut c = self.conn.clone();
        let doc: Option<String> = ::redis::cmd("GET").arg(format!("celery-task-meta-{task_id}")).query_async(&mut c).await?;
        Ok(doc.is_some_and(|d| ["SUCCESS", "FAILURE", "REVOKED"].iter().any(|s| d.contains(&format!("\"status\": \"{s}\"")))))
    }

    /// Takes back the STARTED of a task handed back before it ran.
    pub async fn unstart(&self, task_id: &str) -> Result<(), ::redis::RedisError> {
        let mut c = self.conn.clone();
        self.unstart.key(format!("celery-task-meta-{task_id}")).invoke_async::<i64>(&mut c).await.map(|_| ())
    }

    /// Stores the states of running tasks (STARTED, PROGRESS), one round
    /// trip for all; a task whose result is already final keeps it (a late
    /// progress report never hides a SUCCESS).
    pub async fn write_running(&self, docs: &[(String, String)]) -> Result<(), ::redis::RedisError> {
        if docs.is_empty() {
            return Ok(());
        }
        let mut inv = self.running.prepare_invoke();
        inv.arg(self.expires_s);
        for (task_id, doc) in docs {
            inv.key(format!("celery-task-meta-{task_id}")).arg(doc);
        }
        let mut c = self.conn.clone();
        inv.invoke_async(&mut c).await
    }
}

/// Moves up to ARGV[1] messages from the lists KEYS[1..n-1] (in order) to
/// the in-flight list KEYS[n]; returns them.
const MOVE: &str = r#"
local n = tonumber(ARGV[1])
local dst = KEYS[#KEYS]
local out = {}
for i = 1, #KEYS - 1 do
  while #out < n do
    local m = redis.call('LMOVE', KEYS[i], dst, 'RIGHT', 'LEFT')
    if not m then break end
    out[#out + 1] = m
  end
end
return out
"#;

struct Ctx {
    conn: Conn,
    target: Target,
    celery: CeleryConfig,
    prefix: String,
    host: String,
    broker: Arc<dyn Broker>,
    registry: Arc<Registry>,
    results: ResultWriter,
    follow_ups: follow_ups::FollowUps,
    revocations: revoke::Revocations,
    events: Arc<events::Events>,
    mover: ::redis::Script,
    /// What the host takes in now: remote control's `cancel_consumer` /
    /// `add_consumer` leave a queue to the other hosts and take it back
    /// (this consumer and the worker both), `pool_*` change the slots.
    intake: crate::worker::Intake,
    /// The queues this host consumes (`[celery] queues` and `[worker]
    /// queues`): those `add_consumer` can take back.
    consumable: Vec<String>,
}

/// Starts consuming the configured Celery queues; returns the broker the
/// worker should use (the given one, wrapped to write Celery results;
/// [`broker::CeleryAwareBroker::over`] wraps a shard's).
pub async fn start(
    config: &Config,
    broker: Arc<dyn Broker>,
    registry: Arc<Registry>,
    host: String,
    shutdown: watch::Sender<bool>,
    intake: crate::worker::Intake,
) -> Result<Arc<broker::CeleryAwareBroker>, String> {
    let stop = shutdown.subscribe();
    let url = config.celery_url().ok_or("[celery] needs a Redis URL ([celery] url or a redis:// broker)")?;
    let target = Target::parse(&url)?;
    if target.is_cluster() {
        return Err("[celery] url: kombu's Redis transport does not run on Redis Cluster; name one server".into());
    }
    let conn = target.connect(Some(Duration::from_secs(5))).await.map_err(|e| format!("Celery's Redis at {url}: {e}"))?;
    let results = ResultWriter::new(conn.clone(), config.celery.result_expires_s);
    let revocations = revoke::Revocations::new(conn.clone(), config.broker.prefix.clone());
    let follow_ups = follow_ups::FollowUps::new(
        conn.clone(),
        config.broker.prefix.clone(),
        config.celery.key_prefix.clone(),
        config.celery.result_expires_s,
        config.celery.routes.clone(),
        chord::Chords::new(conn.clone(), results.clone(), config.celery.result_expires_s),
    );
    let activity = Arc::new(activity::Activity::default());
    let hostname = worker_name(config.celery.worker_name.as_deref(), &host);
    let events_channel = control::fanout_channel(&url, &config.celery.key_prefix, "celeryev");
    let events = Arc::new(events::Events::new(
        conn.clone(),
        events_channel,
        hostname.clone(),
        config.celery.task_events,
        activity.clone(),
    ));
    let ctx = Arc::new(Ctx {
        conn,
        target,
        celery: config.celery.clone(),
        prefix: config.broker.prefix.clone(),
        host,
        broker: broker.clone(),
        registry,
        results: results.clone(),
        follow_ups: follow_ups.clone(),
        revocations: revocations.clone(),
        events: events.clone(),
        mover: ::redis::Script::new(MOVE),
        intake,
        consumable: config.celery.queues.iter().chain(&config.worker.queues).fold(Vec::new(), |mut all, q| {
            if !all.contains(q) {
                all.push(q.clone());
            }
            all
        }),
    });
    // Register this host's in-flight lists before anything moves into them.
    let mut add = ::redis::cmd("SADD");
    add.arg(ctx.inflight_lists());
    for q in &ctx.celery.queues {
        add.arg(ctx.inflight(&ctx.host, q));
    }
    let mut c = ctx.conn.clone();
    add.query_async::<i64>(&mut c).await.map_err(|e| format!("Celery's Redis at {url}: {e}"))?;
    // The Celery side's loops; one that dies (a panic) stops the host.
    let mut loops = tokio::task::JoinSet::new();
    loops.spawn(keep_alive(ctx.clone(), stop.clone()));
    loops.spawn(recover_loop(ctx.clone(), stop.clone()));
    let host_stop = shutdown.clone();
    let control = Arc::new(control::Control {
        ctx: ctx.clone(),
        events: events.clone(),
        activity: activity.clone(),
        url: url.clone(),
        started: std::time::Instant::now(),
        shutdown,
    });
    loops.spawn(control::listen(control, stop.clone()));
    for queue in &ctx.celery.queues {
        loops.spawn(consume(ctx.clone(), queue.clone(), stop.clone()));
    }
    tracing::info!(queues = ?ctx.celery.queues, worker = %hostname, task_events = config.celery.task_events, "consuming Celery messages");
    loops.spawn(events::announce(events.clone(), stop.clone()));
    tokio::spawn(watch_loops(loops, host_stop));
    let started_by = config.celery.track_started.then_some(hostname);
    let lease = Duration::from_millis(config.worker.lease_ms);
    Ok(Arc::new(broker::CeleryAwareBroker {
        inner: broker,
        results,
        follow_ups,
        revocations,
        activity,
        events,
        started_by,
        lease,
    }))
}

impl Ctx {
    /// Turns consumption of the Celery queue `queue` on or off; `false`
    /// when this host does not consume it at all.
    fn set_consuming(&self, queue: &str, on: bool) -> bool {
        if !self.consumable.iter().any(|q| q == queue) {
            return false;
        }
        self.intake.pause(queue, !on);
        true
    }

    /// The Celery queues this host takes messages from now.
    fn consumed_queues(&self) -> Vec<&str> {
        self.celery.queues.iter().map(String::as_str).filter(|q| !self.intake.is_paused(q)).collect()
    }

    /// The producer's `argsrepr` and `kwargsrepr` of a task, as JSON `[a, k]`.
    fn shown(&self, celery_id: &str) -> String {
        format!("{}celery:shown:{celery_id}", self.prefix)
    }

    /// Whether a job was made from this task's message already.
    async fn has_job(&self, celery_id: &str) -> Result<bool, String> {
        let mut c = self.conn.clone();
        ::redis::cmd("EXISTS").arg(self.job_of(celery_id)).query_async(&mut c).await.map_err(|e| e.to_string())
    }

    /// Ends a Celery task that will not run (revoked, or expired): REVOKED
    /// as its result, and its part of a chord counted (the chord fails).
    async fn end_revoked(&self, celery_id: &str, why: &str) -> Result<(), String> {
        self.end_unrun(celery_id, Exception::revoked(why), true).await
    }

    /// Stores `e` as the result of a task that did not run to an outcome
    /// (REVOKED when `revoked`, else FAILURE), as a Celery worker does,
    /// then sends its errbacks (not a revoked one's) and counts its chord part.
    async fn end_unrun(&self, celery_id: &str, e: Exception, revoked: bool) -> Result<(), String> {
        let status = if revoked { Status::Revoked } else { Status::Failure };
        let doc = result::meta(celery_id, status, &result::Outcome::Failure(e.clone(), None), Utc::now());
        self.results.write(celery_id, &doc).await.map_err(|e| e.to_string())?;
        self.follow_ups.on_failure(celery_id, &e, revoked).await
    }

    fn inflight(&self, host: &str, queue: &str) -> String {
        format!("{}celery:inflight:{host}/{queue}", self.prefix)
    }

    fn alive(&self, host: &str) -> String {
        format!("{}celery:alive:{host}", self.prefix)
    }

    /// The set of every in-flight list (what recovery walks; no KEYS scan).
    fn inflight_lists(&self) -> String {
        format!("{}celery:inflight-lists", self.prefix)
    }

    /// Jobs from messages with an `expires`: member `<celery id> <job id>`,
    /// score the expiry (ms). Checked by the recovery loop, so a task that
    /// expires while it waits in celer's queue still gets its REVOKED result.
    fn expiring(&self) -> String {
        format!("{}celery:expiring", self.prefix)
    }

    fn dead(&self) -> String {
        format!("{}celery:dead", self.prefix)
    }

    /// kombu's list for a queue, then its priority lists, in the order kombu reads them.
    fn sources(&self, queue: &str) -> Vec<String> {
        let q = format!("{}{queue}", self.celery.key_prefix);
        vec![q.clone(), format!("{q}\x06\x163"), format!("{q}\x06\x166"), format!("{q}\x06\x169")]
    }
}

async fn keep_alive(ctx: Arc<Ctx>, stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let mut c = ctx.conn.clone();
        let r: Result<(), _> = ::redis::cmd("SET")
            .arg(ctx.alive(&ctx.host))
            .arg(1)
            .arg("PX")
            .arg(ALIVE_TTL.as_millis() as u64)
            .query_async(&mut c)
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "Celery consumer: alive key not written");
        }
        let mut add = ::redis::cmd("SADD");
        add.arg(ctx.inflight_lists());
        for q in &ctx.celery.queues {
            add.arg(ctx.inflight(&ctx.host, q));
        }
        if let Err(e) = add.query_async::<i64>(&mut c).await {
            tracing::warn!(error = %e, "Celery consumer: in-flight lists not registered (other hosts may not recover them if this one dies now)");
        }
        tokio::time::sleep(ALIVE_EVERY).await;
    }
}

/// Stops the host when one of the Celery side's loops dies before
/// shutdown (a panic), so that the service manager starts it again whole,
/// as with a worker shard, instead of it running on without consuming a
/// queue, answering control requests or recovering messages.
async fn watch_loops(mut loops: tokio::task::JoinSet<()>, shutdown: watch::Sender<bool>) {
    while let Some(ended) = loops.join_next().await {
        if *shutdown.borrow() {
            continue;
        }
        let why = match ended {
            Err(e) if e.is_panic() => crate::worker::panic_message(e.into_panic().as_ref()),
            Err(e) => e.to_string(),
            Ok(()) => "it stopped".to_string(),
        };
        tracing::error!(error = %why, "a Celery consumer loop ended before shutdown; stopping the host so that it starts again whole");
        shutdown.send_replace(true);
    }
}

/// Takes over the in-flight lists of hosts that are gone (and this host's
/// own, left by an earlier run with the same host id).
async fn recover_loop(ctx: Arc<Ctx>, stop: watch::Receiver<bool>) {
    let mut first = true;
    while !*stop.borrow() {
        if let Err(e) = recover(&ctx, first).await {
            tracing::warn!(error = %e, "Celery consumer: cannot recover in-flight messages; will try again");
        } else {
            first = false;
        }
        tokio::time::sleep(RECOVER_EVERY).await;
    }
}

/// Writes REVOKED for watched jobs that expired in celer's queue; forgets
/// the ones that ended otherwise.
async fn revoke_expired(ctx: &Ctx) -> Result<(), String> {
    let mut c = ctx.conn.clone();
    let now = Utc::now().timestamp_millis();
    let due: Vec<String> = ::redis::cmd("ZRANGE")
        .arg(ctx.expiring())
        .arg("-inf")
        .arg(now)
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(500)
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    for member in due {
        let Some((celery_id, job_id)) = member.split_once(' ') else { continue };
        let state = match ctx.broker.status(job_id).await {
            Ok(Some(s)) => Some(s.state),
            Ok(None) => None,
            Err(e) => {
                // One unreadable job must not hold back the others' results.
                tracing::warn!(task_id = celery_id, job_id, error = %e, "cannot read an expiring Celery task's job; checking it again later");
                continue;
            }
        };
        match state {
            Some(crate::job::JobState::Expired) => ctx.end_revoked(celery_id, "expired").await?,
            // Still waiting or running: the broker expires it at its next look; check again.
            Some(s) if !s.is_terminal() => continue,
            _ => {}
        }
        let _: i64 = ::redis::cmd("ZREM").arg(ctx.expiring()).arg(&member).query_async(&mut c).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Writes the Celery result of tasks whose jobs a take-over ended without
/// running them (their host died): REVOKED when a stop had been asked
/// for, FAILURE when it was their last attempt. Without it their
/// `.get()` would wait forever.
async fn answer_unrun(ctx: &Ctx) -> Result<(), String> {
    for queue in &ctx.celery.queues {
        let ids = ctx.broker.take_unrun(queue, 100).await.map_err(|e| e.to_string())?;
        for (i, job_id) in ids.iter().enumerate() {
            let status = match ctx.broker.status(job_id).await {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    // Back where the next round takes them: none is dropped.
                    if let Err(back) = ctx.broker.put_back_unrun(queue, &ids[i..]).await {
                        tracing::error!(ids = ?&ids[i..], error = %back, "jobs ended without running lost their place in the unrun list: their Celery results are not written");
                    }
                    return Err(e.to_string());
                }
            };
            let Some(celery_id) = broker::celery_id(status.job.idempotency_key.as_deref()) else { continue };
            // A Celery revoke already wrote it (its cancel lists the job too).
            if ctx.results.is_final(celery_id).await.unwrap_or(false) {
                continue;
            }
            let answered = match (status.state, &status.error) {
                (crate::job::JobState::Cancelled, _) => ctx.end_revoked(celery_id, "revoked").await,
                (crate::job::JobState::Failed, Some(error)) => ctx.end_unrun(celery_id, Exception::of(error), false).await,
                _ => Ok(()),
            };
            match answered {
                Ok(()) => tracing::info!(task_id = celery_id, job_id, state = ?status.state, "Celery task ended without running (a take-over after its host died, or a cancel): result written"),
                Err(e) => {
                    // Back for the next round (about 2 s); the list expires in a day.
                    tracing::error!(task_id = celery_id, job_id, error = %e, "cannot write the result of a Celery task ended without running; trying again");
                    if let Err(back) = ctx.broker.put_back_unrun(queue, std::slice::from_ref(job_id)).await {
                        tracing::error!(task_id = celery_id, job_id, error = %back, "its place in the unrun list is lost: its Celery result is not written");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn recover(ctx: &Ctx, own_too: bool) -> Result<(), String> {
    if let Err(e) = revoke_expired(ctx).await {
        tracing::warn!(error = %e, "Celery consumer: cannot check expired tasks");
    }
    if let Err(e) = answer_unrun(ctx).await {
        tracing::warn!(error = %e, "Celery consumer: cannot answer for tasks ended by a take-over");
    }
    let mut c = ctx.conn.clone();
    let keys: Vec<String> =
        ::redis::cmd("SMEMBERS").arg(ctx.inflight_lists()).query_async(&mut c).await.map_err(|e| e.to_string())?;
    let start = format!("{}celery:inflight:", ctx.prefix);
    for key in keys {
        let Some((host, queue)) = key.strip_prefix(&start).and_then(|rest| rest.split_once('/')) else { continue };
        if !ctx.celery.queues.iter().any(|q| q == queue) {
            continue;
        }
        let mine = host == ctx.host;
        if mine && !own_too {
            continue;
        }
        if !mine {
            let alive: bool = ::redis::cmd("EXISTS").arg(ctx.alive(host)).query_async(&mut c).await.map_err(|e| e.to_string())?;
            if alive {
                continue;
            }
        }
        let mut moved = Vec::new();
        if mine {
            moved = ::redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async(&mut c).await.map_err(|e| e.to_string())?;
        } else {
            loop {
                let mut inv = ctx.mover.prepare_invoke();
                inv.key(&key).key(ctx.inflight(&ctx.host, queue)).arg(BATCH);
                let got: Vec<Vec<u8>> = inv.invoke_async(&mut c).await.map_err(|e| e.to_string())?;
                if got.is_empty() {
                    break;
                }
                moved.extend(got);
            }
        }
        if !moved.is_empty() {
            tracing::info!(from = %host, queue, messages = moved.len(), "recovering in-flight Celery messages");
            handle_batch(ctx, queue, moved).await;
        }
        if !mine {
            // Emptied; its host is gone. (A list refilled meanwhile is still found
            // if its host comes back: each consumer adds its lists again.)
            let _: Result<i64, _> = ::redis::cmd("SREM").arg(ctx.inflight_lists()).arg(&key).query_async(&mut c).await;
        }
    }
    Ok(())
}

async fn consume(ctx: Arc<Ctx>, queue: String, mut stop: watch::Receiver<bool>) {
    let sources = ctx.sources(&queue);
    let inflight = ctx.inflight(&ctx.host, &queue);
    let mut waiter: Option<Conn> = None;
    let mut intake = ctx.intake.watch();
    while !*stop.borrow() {
        intake.mark_unchanged();
        if ctx.intake.is_paused(&queue) {
            // Cancelled by remote control: the messages stay in the list
            // for the other consumers until `add_consumer`. (A blocking
            // read under way is not cut short: what it takes would sit in
            // this host's in-flight list; it ends within a second.)
            tokio::select! {
                _ = intake.changed() => continue,
                _ = stop.changed() => break,
            }
        }
        let mut c = ctx.conn.clone();
        let mut inv = ctx.mover.prepare_invoke();
        for s in &sources {
            inv.key(s);
        }
        inv.key(&inflight).arg(BATCH);
        let batch: Result<Vec<Vec<u8>>, _> = inv.invoke_async(&mut c).await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, queue, "Celery consumer: cannot read the queue; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if batch.is_empty() {
            // Wait on the main list (priority lists are swept each round).
            if waiter.is_none() {
                waiter = match ctx.target.connect(None).await {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, queue, "Celery consumer: no connection for blocking reads; polling every 0.5 s");
                        None
                    }
                };
            }
            let Some(w) = waiter.as_mut() else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let mut blmove = ::redis::cmd("BLMOVE");
            blmove.arg(&sources[0]).arg(&inflight).arg("RIGHT").arg("LEFT").arg(1.0);
            let read = blmove.query_async::<Option<Vec<u8>>>(w);
            tokio::select! {
                r = read => match r {
                    Ok(Some(m)) => batch.push(m),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "Celery consumer: blocking read failed");
                        waiter = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            }
        }
        handle_batch(&ctx, &queue, batch).await;
    }
}

/// Ends a message that keeps failing while both brokers answer: if its job
/// exists, the job runs and only the bookkeeping after it was lost
/// (logged); otherwise the message goes to the dead letters with `reason`
/// and the task reads FAILURE, so `.get()` raises instead of waiting.
/// `false` (keep trying) when a broker does not answer.
async fn give_up(ctx: &Ctx, queue: &str, raw: &[u8], reason: &str) -> bool {
    let msg = protocol::decode(raw).ok();
    let (task_id, task) = (msg.as_ref().map(|m| m.id.as_str()), msg.as_ref().map(|m| m.task.as_str()));
    if ctx.broker.ping().await.is_err() {
        return false;
    }
    if let Some(m) = &msg {
        match ctx.has_job(&m.id).await {
            Ok(true) => {
                tracing::error!(task_id, task, queue, "Celery message recorded as a job, but what follows (revoke and expiry watch, argsrepr) was not: {reason}");
                return true;
            }
            Ok(false) => {}
            Err(_) => return false,
        }
    }
    if dead_letter(ctx, queue, raw, reason, task_id, task).await.is_err() {
        return false;
    }
    tracing::error!(task_id, task, queue, "Celery message dead-lettered: {reason}");
    if let Some(m) = &msg {
        let e = Exception::new("RuntimeError", "builtins", format!("celer could not record the task: {reason}"));
        if let Err(e) = write_failure(ctx, m, e).await {
            tracing::error!(task_id, error = %e, "cannot write the FAILURE of a dead-lettered Celery message");
        }
    }
    true
}

/// How many times a message is tried before `give_up` may end it.
const GIVE_UP_AFTER: u32 = 8;

/// Records every message of the batch (concurrently), then removes them
/// from this host's in-flight list.
async fn handle_batch(ctx: &Ctx, queue: &str, batch: Vec<Vec<u8>>) {
    let inflight = ctx.inflight(&ctx.host, queue);
    let handled = batch.iter().map(|raw| async move {
        // A failure keeps the message in flight and is tried again. After
        // a while (about 15 s) it is given up (`give_up`) if both Redis
        // servers answer: the failure is then the message's own and would
        // never pass, and it must not hold its queue. While either is
        // unreachable it waits.
        let mut wait = Duration::from_millis(100);
        for tries in 1.. {
            let Err(e) = handle(ctx, queue, raw).await else { return };
            if tries >= GIVE_UP_AFTER && give_up(ctx, queue, raw, &format!("could not be recorded after {tries} tries: {e}")).await {
                return;
            }
            tracing::warn!(error = %e, tries, "Celery consumer: cannot record a message; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    });
    join_all(handled).await;
    let mut pipe = ::redis::pipe();
    for raw in &batch {
        pipe.cmd("LREM").arg(&inflight).arg(1).arg(raw.as_slice()).ignore();
    }
    let mut c = ctx.conn.clone();
    if let Err(e) = pipe.query_async::<()>(&mut c).await {
        // Left in flight: recovered (and recognised as the same jobs) later.
        tracing::warn!(error = %e, "Celery consumer: cannot clear handled messages");
    }
}

async fn join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    // Poll them all together without spawning (they borrow the batch).
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await
}

/// One message: a job, a dead letter, or (expired) a REVOKED result.
async fn handle(ctx: &Ctx, queue: &str, raw: &[u8]) -> Result<(), String> {
    let msg = match protocol::decode(raw) {
        Ok(m) => m,
        Err(rejected) => {
            tracing::warn!(task_id = ?rejected.task_id, task = ?rejected.task, "Celery message rejected: {}", rejected.reason);
            return dead_letter(ctx, queue, raw, &rejected.reason, rejected.task_id.as_deref(), rejected.task.as_deref()).await;
        }
    };
    let Some(plugin) = ctx.registry.lookup(&msg.task) else {
        let reason = format!("unknown task {:?}: no loaded plugin serves it or has it as an alias", msg.task);
        tracing::warn!(task_id = %msg.id, "Celery message rejected: {reason}");
        dead_letter(ctx, queue, raw, &reason, Some(&msg.id), Some(&msg.task)).await?;
        // What a Celery worker stores for an unregistered task.
        let e = Exception::new("NotRegistered", "celery.exceptions", format!("'{}'", msg.task));
        return write_failure(ctx, &msg, e).await;
    };
    let revoked_event = |expired: bool| {
        events::TaskEvent::new("task-revoked", &msg.id, serde_json::json!({"terminated": false, "signum": null, "expired": expired}))
    };
    let expired = msg.expires.is_some_and(|t| t <= Utc::now());
    if (expired || ctx.revocations.contains(&msg.id).await?) && !ctx.has_job(&msg.id).await? {
        let why = if expired { "expired" } else { "revoked" };
        tracing::info!(task_id = %msg.id, task = %msg.task, why, "Celery task ended before it could run: revoked");
        ctx.events.tasks(vec![revoked_event(expired)]).await;
        ctx.follow_ups.keep(&msg, queue).await?;
        return ctx.end_revoked(&msg.id, why).await;
    }
    // A message handled before (recovered from an in-flight list) whose
    // job exists goes on below and finds that job: the job's own expiry
    // and the revoke already applied to it decide its fate.
    if !msg.workflow.unsupported.is_empty() {
        tracing::warn!(task_id = %msg.id, task = %msg.task, parts = ?msg.workflow.unsupported, "parts of this Celery canvas are not run by celer; the task and its links/chain are");
    }
    // Before the job exists: it may succeed (and look for them) at once.
    ctx.follow_ups.keep(&msg, queue).await?;
    let mut job = to_job(&msg, queue);
    // The producer's time limit, within the operator's (the manifest's).
    if let Some(limit) = msg.time_limit {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        job.timeout_ms = Some(ms.min(plugin.limits.timeout_ms));
    }
    match ctx.broker.enqueue(job).await {
        Ok(enqueued) => {
            // The job is remembered so that a revoke can find it (as long
            // as the result lives); in the same round trip, in this order,
            // a revoke heard since the check above (it found no job) is
            // looked for: it came before the job existed, so the job is
            // stopped even if a worker took it meanwhile.
            let mut c = ctx.conn.clone();
            let ttl = ctx.celery.result_expires_s.max(1);
            let mut pipe = ::redis::pipe();
            pipe.cmd("SET").arg(ctx.job_of(&msg.id)).arg(&enqueued.id).arg("EX").arg(ttl).ignore();
            // How the producer wants the arguments shown (an app may mask
            // secrets there), for whichever host runs the job and is asked.
            if msg.argsrepr.is_some() || msg.kwargsrepr.is_some() {
                let shown = serde_json::json!([msg.argsrepr, msg.kwargsrepr]).to_string();
                pipe.cmd("SET").arg(ctx.shown(&msg.id)).arg(shown).arg("EX").arg(ttl).ignore();
            }
            if ctx.events.task_events_on() {
                ctx.events.stamp(vec![received_event(&msg)]).add_to(&mut pipe);
            }
            let (revoked,): (bool,) =
                pipe.cmd("EXISTS").arg(ctx.revocations.key(&msg.id)).query_async(&mut c).await.map_err(|e| e.to_string())?;
            if revoked {
                ctx.revoke_job(&msg.id, &enqueued.id, true).await?;
            }
            if let Some(expires) = msg.expires {
                let mut c = ctx.conn.clone();
                ::redis::cmd("ZADD")
                    .arg(ctx.expiring())
                    .arg(expires.timestamp_millis())
                    .arg(format!("{} {}", msg.id, enqueued.id))
                    .query_async::<i64>(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Err(BrokerError::Invalid(reason)) => dead_letter(ctx, queue, raw, &reason, Some(&msg.id), Some(&msg.task)).await,
        Err(e) => Err(e.to_string()),
    }
}

/// This host's name as a Celery worker: the configured one with `%h`
/// (hostname) and `%n` (its first label) filled in, else `celer@<host id>`.
fn worker_name(configured: Option<&str>, host_id: &str) -> String {
    let Some(name) = configured.filter(|n| !n.trim().is_empty()) else { return format!("celer@{host_id}") };
    let hostname = crate::config::machine_hostname().unwrap_or_else(|| "localhost".into());
    let short = hostname.split('.').next().unwrap_or(&hostname).to_string();
    name.replace("%h", &hostname).replace("%n", &short)
}

/// `task-received`: the task, as the Celery tools list it.
fn received_event(msg: &TaskMessage) -> events::TaskEvent {
    let time = |t: Option<chrono::DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false));
    events::TaskEvent::new(
        "task-received",
        &msg.id,
        serde_json::json!({
            "name": msg.task,
            "args": msg.argsrepr.clone().unwrap_or_else(|| result::py_args_repr(&msg.args)),
            "kwargs": msg.kwargsrepr.clone().unwrap_or_else(|| result::py_repr(&msg.kwargs)),
            "root_id": msg.root_id.as_deref().unwrap_or(&msg.id),
            "parent_id": msg.parent_id,
            "retries": msg.retries,
            "eta": time(msg.eta),
            "expires": time(msg.expires),
        }),
    )
}

/// The celer job for a Celery message.
pub fn to_job(msg: &TaskMessage, queue: &str) -> NewJob {
    let mut job = NewJob::new(msg.task.clone(), msg.args.clone(), msg.kwargs.clone());
    job.queue = queue.to_string();
    // kombu on Redis serves priority 0 first and 9 last; celer serves the
    // highest number first: 0 stays 0 (native jobs' default), 9 is -9.
    job.priority = -i32::from(msg.priority);
    job.eta = msg.eta;
    job.expires_at = msg.expires;
    // The attempts Celery already spent count against the retry budget.
    job.max_retries = crate::job::DEFAULT_MAX_RETRIES.saturating_sub(msg.retries);
    job.idempotency_key = Some(format!("{}{}", broker::KEY_PREFIX, msg.id));
    job.parent_id = msg.parent_id.clone();
    // Celery names a workflow's first task as its own root; celer leaves
    // the root empty then, so both read "this job started it".
    job.root_id = msg.root_id.clone().filter(|root| *root != msg.id);
    job
}

/// Stores FAILURE with a traceback for a message that could not run.
async fn write_failure(ctx: &Ctx, msg: &TaskMessage, e: Exception) -> Result<(), String> {
    let tb = result::traceback(&e, "-", &msg.task, None);
    let doc = result::meta(&msg.id, Status::Failure, &result::Outcome::Failure(e, Some(tb)), Utc::now());
    ctx.results.write(&msg.id, &doc).await.map_err(|e| e.to_string())
}

async fn dead_letter(ctx: &Ctx, queue: &str, raw: &[u8], reason: &str, task_id: Option<&str>, task: Option<&str>) -> Result<(), String> {
    let mut c = ctx.conn.clone();
    ::redis::cmd("XADD")
        .arg(ctx.dead())
        .arg("MAXLEN")
        .arg("~")
        .arg(10_000)
        .arg("*")
        .arg("reason")
        .arg(reason)
        .arg("queue")
        .arg(queue)
        .arg("task_id")
        .arg(task_id.unwrap_or(""))
        .arg("task")
        .arg(task.unwrap_or(""))
        .arg("host")
        .arg(&ctx.host)
        .arg("message")
        .arg(raw)
        .query_async::<String>(&mut c)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A file captured from a real Celery 5.7 client or worker
/// (`shared/fixtures/celery-protocol/`), for the byte-level tests.
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/celery-protocol").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, root: Option<&str>, parent: Option<&str>) -> TaskMessage {
        TaskMessage {
            retries: 1,
            root_id: root.map(String::from),
            parent_id: parent.map(String::from),
            ..TaskMessage::for_tests(id, "proj.tasks.add", serde_json::json!([1, 2]))
        }
    }

    #[test]
    fn the_worker_name_is_configurable_like_celery_worker_n() {
        assert_eq!(worker_name(None, "web-1-42"), "celer@web-1-42");
        assert_eq!(worker_name(Some("  "), "web-1-42"), "celer@web-1-42");
        let named = worker_name(Some("celer@%h"), "web-1-42");
        assert!(named.starts_with("celer@") && !named.contains("%h") && named.len() > "celer@".len(), "{named}");
        assert_eq!(worker_name(Some("jobs@static"), "x"), "jobs@static");
    }

    #[test]
    fn a_message_becomes_a_job_with_its_lineage_and_spent_retries() {
        let job = to_job(&message("c", Some("a"), Some("b")), "celery");
        assert_eq!((job.root_id.as_deref(), job.parent_id.as_deref()), (Some("a"), Some("b")));
        assert_eq!(job.queue, "celery");
        assert_eq!(job.max_retries, crate::job::DEFAULT_MAX_RETRIES - 1);
        assert_eq!(job.idempotency_key.as_deref(), Some(format!("{}c", broker::KEY_PREFIX).as_str()));
        // Celery names a first task its own root: celer reads that as "no root".
        let first = to_job(&message("a", Some("a"), None), "celery");
        assert_eq!((first.root_id, first.parent_id), (None, None));
        // kombu's 0 (served first on Redis) stays celer's default; 9 goes last.
        assert_eq!((job.priority, to_job(&TaskMessage { priority: 9, ..message("p", None, None) }, "celery").priority), (0, -9));
    }

    /// A progress report that arrives after the task ended (its keeper
    /// raced the final write) never replaces SUCCESS; on a running task it
    /// replaces STARTED. Against the test Redis.
    #[tokio::test]
    async fn a_running_state_never_replaces_a_final_one() {
        use result::{Outcome, Status, meta};
        let conn = crate::broker::redis::test_redis_conn().await;
        let writer = ResultWriter::new(conn.clone(), 60);
        let id = format!("celer-test-{}", uuid::Uuid::now_v7());
        let key = format!("celery-task-meta-{id}");
        let doc = |status| meta(&id, status, &Outcome::Success(serde_json::json!({"current": 1, "total": 2})), chrono::Utc::now());
        let status_now = || {
            let mut c = conn.clone();
            let key = key.clone();
            async move {
                let text: String = ::redis::cmd("GET").arg(&key).query_async(&mut c).await.expect("get");
                serde_json::from_str::<serde_json::Value>(&text).expect("json")["status"].as_str().unwrap_or_default().to_string()
            }
        };
        writer.write_running(&[(id.clone(), doc(Status::Started))]).await.expect("started");
        writer.write_running(&[(id.clone(), doc(Status::Progress))]).await.expect("progress");
        assert_eq!(status_now().await, "PROGRESS");
        writer.write(&id, &doc(Status::Success)).await.expect("success");
        writer.write_running(&[(id.clone(), doc(Status::Progress))]).await.expect("late progress");
        assert_eq!(status_now().await, "SUCCESS");
        let mut c = conn.clone();
        let _: i64 = ::redis::cmd("DEL").arg(&key).query_async(&mut c).await.expect("del");
    }
}

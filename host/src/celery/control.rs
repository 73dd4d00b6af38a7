//! Celery's remote control: `celery inspect ping` (the liveness probe of
//! many deployments), `app.control.inspect().active()`, `stats`, Flower's
//! worker pages, `enable_events`, and `revoke`. Celery broadcasts a request
//! on its `celery.pidbox` fanout exchange, which kombu's Redis transport
//! turns into a PUBLISH on `<key prefix>/<db>.celery.pidbox`; every celer
//! host with `[celery] enabled` listens there as a Celery worker does,
//! answers as `celer@<host>`, and sends its reply the way kombu delivers to
//! the caller's reply queue: the caller's binding in
//! `_kombu.binding.<reply exchange>` names its list, and the reply is
//! LPUSHed there (no binding: the caller gave up, nothing is sent). Shapes
//! are those a Celery 5.7 worker sends (captured with a real worker and
//! Flower 2.2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::Ctx;
use super::activity::Activity;
use super::events::Events;
use super::revoke::Revoke;
use crate::broker::redis::pubsub;
use crate::worker::parse_rate;

/// The pub/sub channel of `celery.pidbox` for a Redis URL's database.
pub fn channel(url: &str, key_prefix: &str) -> String {
    fanout_channel(url, key_prefix, "celery.pidbox")
}

/// The pub/sub channel kombu's Redis transport publishes a fanout
/// exchange's messages on: `<key prefix>/<db>.<exchange>`.
pub fn fanout_channel(url: &str, key_prefix: &str, exchange: &str) -> String {
    let db = url::Url::parse(url)
        .ok()
        .and_then(|u| u.path().trim_start_matches('/').parse::<u32>().ok())
        .unwrap_or(0);
    format!("{key_prefix}/{db}.{exchange}")
}

/// One control request, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub arguments: Value,
    destination: Vec<String>,
    pattern: Option<String>,
    matcher: Option<String>,
    /// Present when the caller waits for replies.
    ticket: Option<String>,
    reply_to: Option<ReplyTo>,
}

#[derive(Debug, Clone, PartialEq)]
struct ReplyTo {
    exchange: String,
    routing_key: String,
}

#[derive(serde::Deserialize)]
struct Envelope {
    body: String,
    #[serde(rename = "content-type")]
    content_type: Option<String>,
    #[serde(default)]
    properties: Properties,
}

#[derive(serde::Deserialize, Default)]
struct Properties {
    body_encoding: Option<String>,
}

impl Request {
    /// The request in a pidbox message; `None` for anything this reader
    /// cannot decode (it is never executed).
    pub fn parse(payload: &[u8]) -> Option<Request> {
        let envelope: Envelope = serde_json::from_slice(payload).ok()?;
        if envelope.content_type.as_deref().is_some_and(|t| t != "application/json") {
            return None;
        }
        let body = match envelope.properties.body_encoding.as_deref() {
            Some("base64") => base64::engine::general_purpose::STANDARD.decode(envelope.body.as_bytes()).ok()?,
            _ => envelope.body.into_bytes(),
        };
        let body: Value = serde_json::from_slice(&body).ok()?;
        Request::of(&body)
    }

    /// The request in a decoded body: a method is all it needs; fields of
    /// an unexpected shape are ignored, as kombu ignores them.
    fn of(body: &Value) -> Option<Request> {
        // kombu tests these by truthiness: an empty string is no value.
        let text = |k: &str| body.get(k).and_then(Value::as_str).filter(|t| !t.is_empty()).map(String::from);
        let reply_to = body.get("reply_to").and_then(|r| {
            Some(ReplyTo {
                exchange: r.get("exchange")?.as_str()?.to_string(),
                routing_key: r.get("routing_key")?.as_str()?.to_string(),
            })
        });
        Some(Request {
            method: text("method")?,
            arguments: body.get("arguments").cloned().unwrap_or(Value::Null),
            destination: body
                .get("destination")
                .and_then(Value::as_array)
                .map(|d| d.iter().filter_map(|n| n.as_str().map(String::from)).collect())
                .unwrap_or_default(),
            pattern: text("pattern"),
            matcher: text("matcher"),
            ticket: text("ticket"),
            reply_to,
        })
    }

    /// Whether a worker named `hostname` should act on it, as kombu
    /// decides: the named workers when a destination is given, else those
    /// whose name matches `pattern` when a `matcher` is given too, else
    /// every worker.
    pub fn is_for(&self, hostname: &str) -> bool {
        if !self.destination.is_empty() {
            return self.destination.iter().any(|n| n == hostname);
        }
        match (&self.pattern, self.matcher.as_deref()) {
            (Some(pattern), Some("glob")) => glob(pattern, hostname),
            // A `pcre` pattern: celer does not evaluate it (nor act on it).
            (Some(_), Some(_)) => false,
            _ => true,
        }
    }
}

/// fnmatch-style matching of `*` and `?`.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// What answers control requests on this host.
pub(super) struct Control {
    pub ctx: Arc<Ctx>,
    pub events: Arc<Events>,
    pub activity: Arc<Activity>,
    pub url: String,
    pub started: Instant,
    /// Asks the whole host to stop as SIGTERM does (`celery control shutdown`).
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

/// The longest time limit `time_limit` sets (a day): a job's deadline is
/// an instant, which a limit far beyond any job could overflow.
const MAX_TIME_LIMIT_S: f64 = 86_400.0;

/// At most this many revoked ids in a `revoked` answer.
const REVOKED_MAX: usize = 10_000;

impl Control {
    /// The answer to `request` (what goes under this host's name in the reply).
    async fn answer(&self, request: &Request) -> Value {
        let args = &request.arguments;
        let hostname = self.events.hostname();
        match request.method.as_str() {
            "ping" => json!({"ok": "pong"}),
            "revoke" => match Revoke::of(request) {
                Some(revoke) => match self.ctx.apply(&revoke).await {
                    Ok(()) => json!({"ok": format!("tasks {} flagged as revoked", revoke.task_ids.join(", "))}),
                    Err(e) => json!({"error": format!("revoke not applied: {e}")}),
                },
                None => json!({"error": "revoke needs task_id"}),
            },
            "stats" => self.stats(),
            "active" => {
                let safe = args.get("safe").and_then(Value::as_bool).unwrap_or(false);
                let running = self.activity.running();
                let shown = if safe { self.shown(&running).await } else { vec![(None, None); running.len()] };
                Value::Array(running.iter().zip(shown).map(|(r, shown)| r.info(hostname, safe, shown)).collect())
            }
            // celer takes a job only when a slot is free, so nothing waits
            // reserved on a host; jobs waiting for their eta wait in the
            // shared queue, not on a host.
            "reserved" | "scheduled" => json!([]),
            "revoked" => match self.revoked_ids().await {
                Ok(ids) => json!(ids),
                Err(e) => json!({"error": format!("cannot list revoked ids: {e}")}),
            },
            "registered" => json!(self.registered()),
            "active_queues" => Value::Array(self.ctx.consumed_queues().into_iter().map(queue_info).collect()),
            // Stop or resume taking a queue's messages on this host (the
            // messages wait in the list for other consumers meanwhile).
            // celer consumes only the queues its configuration names.
            // Fewer or more of the configured slots in use, without a
            // restart; never above `[worker] concurrency`, nor below 0.
            "pool_grow" | "pool_shrink" => {
                let n = args.get("n").and_then(Value::as_u64).map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX));
                if request.method == "pool_grow" {
                    match self.ctx.intake.grow(n) {
                        Ok(now) => json!({"ok": format!("pool will grow (now {now})")}),
                        Err(now) => json!({"error": format!("the pool is at [worker] concurrency ({now}); celer grows only back up to it")}),
                    }
                } else {
                    json!({"ok": format!("pool will shrink (now {})", self.ctx.intake.shrink(n))})
                }
            }
            // celer has no idle processes to scale: the maximum is what
            // counts (clamped to `[worker] concurrency`).
            "autoscale" => {
                let bound = |k: &str| args.get(k).and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()));
                match bound("max") {
                    Some(max) => {
                        let now = self.ctx.intake.set_slots(usize::try_from(max).unwrap_or(usize::MAX));
                        json!({"ok": format!("autoscale now max={now} min={}", bound("min").unwrap_or(0))})
                    }
                    None => json!({"error": "autoscale needs max"}),
                }
            }
            "cancel_consumer" | "add_consumer" => {
                let queue = args.get("queue").and_then(Value::as_str).unwrap_or_default();
                let on = request.method == "add_consumer";
                match (self.ctx.set_consuming(queue, on), on) {
                    (true, true) => json!({"ok": format!("add consumer {queue}")}),
                    // Celery answers the same for a queue it did not consume.
                    (_, false) => json!({"ok": format!("no longer consuming from {queue}")}),
                    (false, true) => json!({"error": format!(
                        "celer consumes only the queues in [celery] queues and [worker] queues ({}); add {queue:?} there",
                        self.ctx.consumable.join(", ")
                    )}),
                }
            }
            "conf" => self.conf(),
            "report" => json!({"ok": self.report()}),
            "clock" => json!({"clock": self.events.tick()}),
            "query_task" => {
                let ids: Vec<&str> = match args.get("ids") {
                    Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_str).collect(),
                    Some(Value::String(id)) => vec![id.as_str()],
                    _ => Vec::new(),
                };
                let found: serde_json::Map<String, Value> = self
                    .activity
                    .running()
                    .iter()
                    .filter(|r| ids.contains(&r.celery_id.as_str()))
                    .map(|r| (r.celery_id.clone(), json!(["active", r.info(hostname, false, (None, None))])))
                    .collect();
                Value::Object(found)
            }
            "enable_events" => {
                let was = self.events.set_task_events(true);
                if !was {
                    tracing::info!("Celery task events enabled by a control request");
                }
                json!({"ok": if was { "task events already enabled" } else { "task events enabled" }})
            }
            "disable_events" => {
                let was = self.events.set_task_events(false);
                if was {
                    tracing::info!("Celery task events disabled by a control request");
                }
                json!({"ok": if was { "task events disabled" } else { "task events already disabled" }})
            }
            "heartbeat" => {
                self.events.worker("worker-heartbeat").await;
                Value::Null
            }
            // A warm shutdown, as a Celery worker does it: no new jobs,
            // running ones get the grace period. The service manager
            // decides whether it comes back (deploys use this to roll
            // workers).
            "shutdown" => {
                // The host stops once the reply is out (`handle`).
                json!({"ok": "shutting down"})
            }
            // Limits on one task on this host (Flower's task page; an
            // operator slowing a task whose downstream struggles).
            "rate_limit" => match self.task_of(args) {
                None => json!({"error": "unknown task"}),
                Some(task) => match parse_rate(args.get("rate_limit").unwrap_or(&Value::Null)) {
                    Err(e) => json!({"error": format!("Invalid rate limit string: {e}")}),
                    Ok(per_s) => {
                        self.ctx.intake.limits().set_rate(&task, per_s);
                        match per_s {
                            Some(_) => json!({"ok": "new rate limit set successfully"}),
                            None => json!({"ok": "rate limit disabled successfully"}),
                        }
                    }
                },
            },
            // celer has one deadline per job: the shorter of the two limits
            // given (none, or 0 as in Celery, lifts it); it only ever
            // shortens a job's own.
            "time_limit" => match self.task_of(args) {
                None => json!({"error": "unknown task"}),
                Some(task) => {
                    let seconds = |k: &str| args.get(k).and_then(Value::as_f64).filter(|s| s.is_finite() && *s > 0.0);
                    let limit = [seconds("soft"), seconds("hard")].into_iter().flatten().reduce(f64::min);
                    self.ctx.intake.limits().set_time(&task, limit.map(|s| Duration::from_secs_f64(s.min(MAX_TIME_LIMIT_S))));
                    json!({"ok": "time limits set successfully"})
                }
            },
            // A deploy's "reload the code": celer's code is its plugins,
            // which it reloads by itself when their files change; this
            // brings every plugin in line with the directory now (a
            // watcher that missed a change, as on some network mounts).
            // Running jobs finish on the version they started with.
            "pool_restart" => {
                let registry = self.ctx.registry.clone();
                tokio::spawn(async move { registry.scan().await });
                tracing::warn!("plugins directory rescanned by remote control (pool_restart)");
                json!({"ok": "reload started"})
            }
            // A Python worker starting up asks the others for the ids they revoked.
            "hello" => match self.revoked_ids().await {
                Ok(ids) => json!({"revoked": ids, "clock": self.events.tick()}),
                Err(_) => json!({"revoked": [], "clock": self.events.tick()}),
            },
            other => {
                // The caller may not show the refusal (Flower's "Shut Down" does not).
                tracing::warn!(method = other, "Celery control command refused: celer does not implement it");
                json!({"error": format!("celer does not implement the control command {other:?}")})
            }
        }
    }

    /// The producers' `argsrepr` / `kwargsrepr` of running tasks (none
    /// where the producer sent none; `'...'` when they cannot be read).
    async fn shown(&self, running: &[super::activity::Running]) -> Vec<(Option<String>, Option<String>)> {
        if running.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = running.iter().map(|r| self.ctx.shown(&r.celery_id)).collect();
        let mut c = self.ctx.conn.clone();
        let found: Vec<Option<String>> = match ::redis::cmd("MGET").arg(&keys).query_async(&mut c).await {
            Ok(found) => found,
            Err(e) => {
                // Never the raw arguments a producer may have masked.
                tracing::warn!(error = %e, "cannot read the producers' argsrepr; showing '...'");
                return vec![(Some("'...'".into()), Some("'...'".into())); running.len()];
            }
        };
        let mut shown: Vec<_> = found
            .into_iter()
            .map(|v| v.and_then(|v| serde_json::from_str::<(Option<String>, Option<String>)>(&v).ok()).unwrap_or_default())
            .collect();
        shown.resize(running.len(), (None, None));
        shown
    }

    fn stats(&self) -> Value {
        let pid = std::process::id();
        let broker = url::Url::parse(&self.url).ok();
        let db = broker.as_ref().map(|u| u.path().trim_start_matches('/').to_string()).filter(|d| !d.is_empty());
        json!({
            "total": self.activity.totals(),
            "pid": pid,
            "clock": self.events.tick().to_string(),
            "uptime": self.started.elapsed().as_secs(),
            "pool": {
                "implementation": "celer (one wasmtime sandbox per job)",
                "max-concurrency": self.ctx.intake.slots(),
                "processes": [pid],
                "max-tasks-per-child": "N/A",
                "put-guarded-by-semaphore": false,
                "timeouts": [0, 0],
            },
            "broker": {
                "hostname": broker.as_ref().and_then(|u| u.host_str().map(String::from)),
                "userid": broker.as_ref().map(|u| u.username().to_string()).filter(|u| !u.is_empty()),
                "virtual_host": db.unwrap_or_else(|| "0".into()),
                "port": broker.as_ref().and_then(url::Url::port),
                "insist": false,
                "ssl": broker.as_ref().is_some_and(|u| u.scheme() == "rediss"),
                "transport": "redis",
                "connect_timeout": 5,
                "transport_options": {},
                "login_method": null,
                "uri_prefix": null,
                "heartbeat": null,
                "failover_strategy": "round-robin",
                "alternates": [],
            },
            // No prefetch: a host takes a job only when a slot is free.
            "prefetch_count": 0,
            "rusage": rusage(),
        })
    }

    /// The plugin task a control request's `task_name` (a task name or a
    /// Celery alias) stands for, if this host serves it.
    fn task_of(&self, args: &Value) -> Option<String> {
        let name = args.get("task_name").and_then(Value::as_str)?;
        let plugin = self.ctx.registry.lookup(name)?;
        Some(plugin.canonical_task(name).to_string())
    }

    /// Every task name this host runs: plugin tasks and their Celery aliases.
    fn registered(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .ctx
            .registry
            .plugins()
            .iter()
            .flat_map(|p| p.tasks.iter().cloned().chain(p.aliases.keys().cloned()).collect::<Vec<_>>())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn conf(&self) -> Value {
        let url = masked(&self.url);
        json!({
            "broker_url": url,
            "result_backend": url,
            "result_expires": self.ctx.celery.result_expires_s,
            "task_track_started": self.ctx.celery.track_started,
            "task_routes": self.ctx.celery.routes,
            "task_default_queue": self.ctx.celery.queues.first(),
            "worker_concurrency": self.ctx.intake.configured(),
            "worker_prefetch_multiplier": 0,
            "worker_send_task_events": self.events.task_events_on(),
        })
    }

    fn report(&self) -> String {
        format!(
            "\nsoftware -> celer:{} (wasmtime sandbox per job)\nplatform -> system:{} pid:{}\nbroker -> {}\nqueues -> {}\nplugins -> {}\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            masked(&self.url),
            self.ctx.celery.queues.join(", "),
            self.ctx.registry.plugins().iter().map(|p| p.name.clone()).collect::<Vec<_>>().join(", "),
        )
    }

    /// The Celery task ids revoked lately (remembered for 3 h by every host).
    async fn revoked_ids(&self) -> Result<Vec<String>, String> {
        let start = self.ctx.revocations.key("");
        let mut c = self.ctx.conn.clone();
        let mut ids = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{start}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            ids.extend(keys.into_iter().filter_map(|k| k.strip_prefix(&start).map(String::from)));
            cursor = next;
            if cursor == 0 || ids.len() >= REVOKED_MAX {
                break;
            }
        }
        ids.truncate(REVOKED_MAX);
        ids.sort();
        Ok(ids)
    }

    /// Sends `result` to the caller's reply queue, if the caller still waits.
    async fn reply(&self, request: &Request, result: Value) -> Result<(), String> {
        let (Some(ticket), Some(reply_to)) = (&request.ticket, &request.reply_to) else { return Ok(()) };
        let prefix = &self.ctx.celery.key_prefix;
        let mut c = self.ctx.conn.clone();
        let bindings: Vec<Vec<u8>> = ::redis::cmd("SMEMBERS")
            .arg(format!("{prefix}_kombu.binding.{}", reply_to.exchange))
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let queues: Vec<String> = bindings
            .iter()
            .filter_map(|b| {
                let text = String::from_utf8_lossy(b);
                let mut parts = text.split("\x06\x16");
                let (rk, _pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
                (rk == reply_to.routing_key).then(|| format!("{prefix}{queue}"))
            })
            .collect();
        if queues.is_empty() {
            tracing::debug!(method = %request.method, "Celery control reply dropped: the caller no longer waits");
            return Ok(());
        }
        let body = json!({ self.events.hostname(): result }).to_string();
        let headers = json!({"ticket": ticket, "clock": self.events.tick()});
        let message = super::protocol::transient(&body, headers, &reply_to.exchange, &reply_to.routing_key);
        let mut pipe = ::redis::pipe();
        for q in &queues {
            pipe.cmd("LPUSH").arg(q).arg(&message).ignore();
        }
        pipe.query_async::<()>(&mut c).await.map_err(|e| e.to_string())
    }

    async fn handle(&self, request: Request) {
        let result = self.answer(&request).await;
        tracing::debug!(method = %request.method, "Celery control request answered");
        if let Err(e) = self.reply(&request, result).await {
            tracing::warn!(method = %request.method, error = %e, "Celery control reply not sent");
        }
        if request.method == "shutdown" {
            tracing::warn!(worker = self.events.hostname(), "shutdown requested by a Celery control command: draining, then exiting");
            self.shutdown.send_replace(true);
        }
    }
}

/// This process's resource usage, as `stats` reports it (Flower's System tab).
fn rusage() -> Value {
    // SAFETY: getrusage only writes the struct it is given, which is
    // zero-initialised plain data of the right type.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Value::Null;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    json!({
        "utime": seconds(usage.ru_utime), "stime": seconds(usage.ru_stime), "maxrss": usage.ru_maxrss,
        "ixrss": usage.ru_ixrss, "idrss": usage.ru_idrss, "isrss": usage.ru_isrss,
        "minflt": usage.ru_minflt, "majflt": usage.ru_majflt, "nswap": usage.ru_nswap,
        "inblock": usage.ru_inblock, "oublock": usage.ru_oublock, "msgsnd": usage.ru_msgsnd,
        "msgrcv": usage.ru_msgrcv, "nsignals": usage.ru_nsignals, "nvcsw": usage.ru_nvcsw, "nivcsw": usage.ru_nivcsw,
    })
}

/// A queue as `inspect active_queues` describes it (kombu's `Queue.as_dict`).
fn queue_info(queue: &str) -> Value {
    json!({
        "name": queue,
        "exchange": {"name": queue, "type": "direct", "arguments": null, "durable": true, "passive": false,
                     "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": queue, "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false, "alias": null, "bindings": [],
        "no_declare": null, "expires": null, "message_ttl": null, "max_length": null, "max_length_bytes": null,
        "max_priority": null,
    })
}

/// A Redis URL with its password hidden.
fn masked(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("********"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unreadable URL)".into(),
    }
}

/// Listens for control requests until `stop`, reconnecting when Redis goes
/// away. Requests that change something (revoke, events on or off, the
/// pool size, the queues consumed) are
/// handled one at a time, in the order they were sent; the others, which
/// only read, each on its own.
pub(super) async fn listen(control: Arc<Control>, stop: watch::Receiver<bool>) {
    let channel = channel(&control.url, &control.ctx.celery.key_prefix);
    let purpose = pubsub::Purpose { what: "Celery remote control", meanwhile: "inspect, ping and revoke go unanswered" };
    pubsub::listen(vec![control.url.clone()], channel, purpose, Some(stop), |payload| {
        let control = control.clone();
        async move {
            let Some(request) = Request::parse(&payload) else { return };
            if !request.is_for(control.events.hostname()) {
                return;
            }
            // A read (a scan of revoked ids, say) must not hold up the next request.
            let changes = [
                "revoke", "enable_events", "disable_events", "heartbeat", "pool_grow", "pool_shrink", "autoscale", "cancel_consumer",
                "add_consumer",
            ];
            if changes.contains(&request.method.as_str()) {
                control.handle(request).await;
            } else {
                tokio::spawn(async move { control.handle(request).await });
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_names_the_database_and_the_key_prefix() {
        assert_eq!(channel("redis://127.0.0.1:6390/0", ""), "/0.celery.pidbox");
        assert_eq!(channel("redis://:pw@redis:6379/3", "app:"), "app:/3.celery.pidbox");
        assert_eq!(channel("redis://redis:6379", ""), "/0.celery.pidbox");
    }

    /// Requests for every worker, for this one by name, or by a glob
    /// pattern; not those for other workers.
    #[test]
    fn a_request_is_for_this_host_when_it_names_it_or_nobody() {
        let req = |v: Value| Request::of(&v).expect("a request");
        assert!(req(json!({"method": "ping"})).is_for("celer@a"));
        assert!(req(json!({"method": "ping", "destination": ["w1@x", "celer@a"]})).is_for("celer@a"));
        assert!(!req(json!({"method": "ping", "destination": ["w1@x"]})).is_for("celer@a"));
        assert!(req(json!({"method": "ping", "pattern": "celer@*", "matcher": "glob"})).is_for("celer@a"));
        assert!(!req(json!({"method": "ping", "pattern": "w?@*", "matcher": "glob"})).is_for("celer@a"));
        // A pattern without a matcher is no filter (kombu's rule).
        assert!(req(json!({"method": "ping", "pattern": "w?@*", "matcher": null})).is_for("celer@a"));
        // Fields of an odd shape are ignored, not the request.
        assert!(req(json!({"method": "revoke", "reply_to": "nonsense", "destination": null})).is_for("celer@a"));
        assert_eq!(Request::of(&json!({"arguments": {}})), None);
        assert!(req(json!({"method": "ping", "pattern": "", "matcher": "glob"})).is_for("celer@a"));
        assert!(!req(json!({"method": "ping", "pattern": "celer@.*", "matcher": "pcre"})).is_for("celer@a"));
        assert!(glob("*a*b?", "xxaYbZ") && !glob("a*", "ba") && glob("", "") && !glob("", "x"));
    }

    #[test]
    fn a_password_never_leaves_in_a_reply() {
        assert_eq!(masked("redis://:secret@r:6379/0"), "redis://:********@r:6379/0");
        assert_eq!(masked("redis://r:6379/1"), "redis://r:6379/1");
    }
}

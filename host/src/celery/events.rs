//! Celery's events: a celer host announces itself on the `celeryev` fanout
//! exchange the way a Celery worker does: `worker-online` when it starts,
//! `worker-heartbeat` every 2 s (a Celery worker sends these even without
//! `-E`), `worker-offline` when it stops. With task events on (`[celery]
//! task_events`, Celery's `-E`, or the `enable_events` control command
//! Flower sends every few seconds) it also sends `task-received`,
//! `task-started`, `task-succeeded`, `task-failed`, `task-retried` and
//! `task-revoked`, so `celery events` and Flower show the tasks. The
//! message shape is the captured one (`shared/fixtures/celery-protocol/
//! event-worker-*.json`); one event per message, on
//! `<prefix>/<db>.celeryev/<type with '-' as '.'>`, which Celery's receivers
//! take as they take a worker's batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::activity::Activity;
use super::protocol;
use crate::broker::redis::conn::Conn;

/// How often a heartbeat goes out (Celery's default `freq`).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// This host on the events exchange: its name, its Lamport clock (shared
/// with control replies) and whether task events are on.
pub struct Events {
    conn: Conn,
    channel_prefix: String,
    hostname: String,
    clock: AtomicU64,
    task_events: AtomicBool,
    activity: Arc<Activity>,
}

/// One task event: its type (`task-started`, …), the task id and the
/// fields of that type.
pub struct TaskEvent {
    pub kind: &'static str,
    pub uuid: String,
    pub fields: Map<String, Value>,
}

/// Task events turned into messages: (channel, message).
pub struct Stamped(Vec<(String, String)>);

impl Stamped {
    /// Adds their PUBLISHes (replies ignored) to a pipeline that goes out anyway.
    pub fn add_to(self, pipe: &mut ::redis::Pipeline) {
        for (channel, message) in self.0 {
            pipe.cmd("PUBLISH").arg(channel).arg(message).ignore();
        }
    }
}

impl TaskEvent {
    /// The host and clock are stamped when it is sent, so builders need only the task's own
    /// fields.
    pub fn new(kind: &'static str, uuid: &str, fields: Value) -> Self {
        let fields = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        TaskEvent { kind, uuid: uuid.to_string(), fields }
    }
}

impl Events {
    /// One sender per host: it owns the Lamport clock every event and reply carries.
    pub fn new(conn: Conn, channel_prefix: String, hostname: String, task_events: bool, activity: Arc<Activity>) -> Self {
        Events { conn, channel_prefix, hostname, clock: AtomicU64::new(0), task_events: AtomicBool::new(task_events), activity }
    }

    /// The worker name Celery's tools show: `celer@<host>`.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The next tick of this host's Lamport clock.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Callers skip building events nobody asked for (`-E` off).
    pub fn task_events_on(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Turns task events on or off; returns whether they were on.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::Relaxed)
    }

    /// Publishes task events (one round trip) when task events are on.
    pub async fn tasks(&self, events: Vec<TaskEvent>) {
        self.publish(self.stamp(events)).await;
    }

    /// The events as messages, stamped now (clock and time), ready to be
    /// published later; none when task events are off.
    pub fn stamp(&self, events: Vec<TaskEvent>) -> Stamped {
        if !self.task_events_on() {
            return Stamped(Vec::new());
        }
        let messages = events
            .into_iter()
            .map(|e| {
                let mut body = self.common();
                body.insert("uuid".into(), Value::String(e.uuid));
                body.extend(e.fields);
                self.finish(&mut body, e.kind);
                (self.channel(e.kind), self.message(e.kind, &Value::Object(body)))
            })
            .collect();
        Stamped(messages)
    }

    /// Publishes stamped events (one round trip).
    pub async fn publish(&self, stamped: Stamped) {
        if stamped.0.is_empty() {
            return;
        }
        let mut pipe = ::redis::pipe();
        stamped.add_to(&mut pipe);
        let mut c = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut c).await {
            tracing::debug!(error = %e, "Celery task events not sent");
        }
    }

    /// Publishes one worker event (`worker-online`, `-heartbeat`, `-offline`).
    pub async fn worker(&self, kind: &str) {
        let body = self.worker_body(kind);
        let mut c = self.conn.clone();
        let sent: Result<i64, _> = ::redis::cmd("PUBLISH")
            .arg(self.channel(kind))
            .arg(self.message(kind, &body))
            .query_async(&mut c)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, kind, "Celery worker event not sent");
        }
    }

    fn worker_body(&self, kind: &str) -> Value {
        let mut body = self.common();
        body.insert("freq".into(), json!(HEARTBEAT_EVERY.as_secs_f64()));
        body.insert("active".into(), json!(self.activity.running_count()));
        body.insert("processed".into(), json!(self.activity.processed()));
        body.insert("loadavg".into(), json!(loadavg()));
        body.insert("sw_ident".into(), json!("celer"));
        body.insert("sw_ver".into(), json!(env!("CARGO_PKG_VERSION")));
        body.insert("sw_sys".into(), json!(if cfg!(target_os = "linux") { "Linux" } else { std::env::consts::OS }));
        self.finish(&mut body, kind);
        Value::Object(body)
    }

    /// What every event starts with, as Celery orders it.
    fn common(&self) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("hostname".into(), json!(self.hostname));
        body.insert("utcoffset".into(), json!(0.0));
        body.insert("pid".into(), json!(std::process::id()));
        body.insert("clock".into(), json!(self.tick()));
        body
    }

    fn finish(&self, body: &mut Map<String, Value>, kind: &str) {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        body.insert("timestamp".into(), json!(timestamp));
        body.insert("type".into(), json!(kind));
    }

    fn channel(&self, kind: &str) -> String {
        format!("{}/{}", self.channel_prefix, kind.replacen('-', ".", 1))
    }

    /// The kombu message around an event body.
    fn message(&self, kind: &str, body: &Value) -> String {
        protocol::transient(&body.to_string(), json!({"hostname": self.hostname}), "celeryev", &kind.replacen('-', ".", 1))
    }
}

/// Publishes this host's worker events until `stop`, then `worker-offline`.
pub async fn announce(events: Arc<Events>, mut stop: watch::Receiver<bool>) {
    events.worker("worker-online").await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_EVERY) => events.worker("worker-heartbeat").await,
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    events.worker("worker-offline").await;
}

/// The 1, 5 and 15 minute load averages (zeros where they cannot be read).
fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<f64>().unwrap_or(0.0));
    [
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
    ]
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn fixture(name: &str) -> Value {
        serde_json::from_slice(&crate::celery::fixture(name)).expect("a JSON fixture")
    }

    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    }

    /// Our heartbeat has the fields and message shape a Celery worker's
    /// has. (The publisher needs a connection to the test Redis; nothing
    /// is sent.)
    #[tokio::test]
    async fn a_heartbeat_has_the_shape_of_celerys() {
        let conn = crate::broker::redis::test_redis_conn().await;
        let events = Events::new(conn, "/0.celeryev".into(), "celer@h".into(), false, Arc::default());
        let body = events.worker_body("worker-heartbeat");
        let ours: Value = serde_json::from_str(&events.message("worker-heartbeat", &body)).unwrap();
        let theirs = fixture("event-worker-heartbeat.json");
        assert_eq!(keys(&ours), keys(&theirs));
        assert_eq!(keys(&ours["properties"]), keys(&theirs["properties"]));
        assert_eq!(ours["properties"]["delivery_info"], theirs["properties"]["delivery_info"]);
        let decoded = base64::engine::general_purpose::STANDARD.decode(ours["body"].as_str().unwrap()).unwrap();
        let decoded: Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(keys(&decoded), keys(&fixture("event-worker-heartbeat.body-decoded.json")));
        assert_eq!((decoded["type"].as_str(), decoded["hostname"].as_str()), (Some("worker-heartbeat"), Some("celer@h")));
        assert_eq!(events.channel("task-succeeded"), "/0.celeryev/task.succeeded");
    }
}

//! Celery's worker events: a celer host announces itself on the `celeryev`
//! fanout exchange the way a Celery worker does: `worker-online` when it
//! starts, `worker-heartbeat` every 2 s (a Celery worker sends these even
//! without `-E`), `worker-offline` when it stops. So `celery events`,
//! Flower and anything else that watches worker heartbeats see the host,
//! with how many Celery tasks it runs and has run. The message shape is the
//! captured one (`shared/fixtures/celery-protocol/event-worker-*.json`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::broker::redis::conn::Conn;

/// How often a heartbeat goes out (Celery's default `freq`).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// What the heartbeats report, kept by the Celery-aware broker.
#[derive(Debug, Default)]
pub struct WorkerCounts {
    /// Celery tasks running on this host now.
    pub active: AtomicU64,
    /// Celery tasks this host finished since it started.
    pub processed: AtomicU64,
}

/// Publishes this host's worker events until `stop`, then `worker-offline`.
pub async fn announce(
    conn: Conn,
    channel_prefix: String,
    hostname: String,
    counts: Arc<WorkerCounts>,
    mut stop: watch::Receiver<bool>,
) {
    let mut clock = 0u64;
    let mut send = |kind: &str| {
        clock += 1;
        let body = event(kind, &hostname, clock, &counts);
        let channel = format!("{channel_prefix}/{}", kind.replacen('-', ".", 1));
        let mut c = conn.clone();
        let message = message(kind, &hostname, &body);
        async move {
            let sent: Result<i64, _> = ::redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(message)
                .query_async(&mut c)
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, channel, "Celery worker event not sent");
            }
        }
    };
    send("worker-online").await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_EVERY) => send("worker-heartbeat").await,
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    send("worker-offline").await;
}

/// The event itself (the message body), as a Celery worker fills it.
fn event(kind: &str, hostname: &str, clock: u64, counts: &WorkerCounts) -> Value {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    json!({
        "hostname": hostname,
        "utcoffset": 0.0,
        "pid": std::process::id(),
        "clock": clock,
        "freq": HEARTBEAT_EVERY.as_secs_f64(),
        "active": counts.active.load(Ordering::Relaxed),
        "processed": counts.processed.load(Ordering::Relaxed),
        "loadavg": loadavg(),
        "sw_ident": "celer",
        "sw_ver": env!("CARGO_PKG_VERSION"),
        "sw_sys": if cfg!(target_os = "linux") { "Linux" } else { std::env::consts::OS },
        "timestamp": timestamp,
        "type": kind,
    })
}

/// The kombu message around an event body.
fn message(kind: &str, hostname: &str, body: &Value) -> String {
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": hostname},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": kind.replacen('-', ".", 1)},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
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

    /// Our heartbeat has the fields and message shape a Celery worker's has.
    #[test]
    fn a_heartbeat_has_the_shape_of_celerys() {
        let counts = WorkerCounts::default();
        let ours: Value = serde_json::from_str(&message(
            "worker-heartbeat",
            "celer@h",
            &event("worker-heartbeat", "celer@h", 2, &counts),
        ))
        .unwrap();
        let theirs = fixture("event-worker-heartbeat.json");
        assert_eq!(keys(&ours), keys(&theirs));
        assert_eq!(keys(&ours["properties"]), keys(&theirs["properties"]));
        assert_eq!(
            ours["properties"]["delivery_info"],
            theirs["properties"]["delivery_info"]
        );
        let body = base64::engine::general_purpose::STANDARD
            .decode(ours["body"].as_str().unwrap())
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            keys(&body),
            keys(&fixture("event-worker-heartbeat.body-decoded.json"))
        );
        assert_eq!(
            (body["type"].as_str(), body["hostname"].as_str()),
            (Some("worker-heartbeat"), Some("celer@h"))
        );
    }
}

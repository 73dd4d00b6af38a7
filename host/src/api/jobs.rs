//! `/api/jobs`, `/api/plugins`, `/api/queues`, `/metrics`: the producer's and
//! the operator's HTTP view of the same broker and registry the CLI uses.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiState, error};
use crate::broker::{BrokerError, CancelOutcome};
use crate::job::NewJob;

/// The body of `POST /api/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    task: String,
    #[serde(default = "empty_array")]
    args: Value,
    #[serde(default = "empty_object")]
    kwargs: Value,
    queue: Option<String>,
    delay_ms: Option<u64>,
    eta: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    max_retries: Option<u32>,
    timeout_ms: Option<u64>,
    idempotency_key: Option<String>,
    priority: Option<i32>,
}

fn empty_array() -> Value {
    json!([])
}

fn empty_object() -> Value {
    json!({})
}

fn broker_error(e: BrokerError) -> Response {
    match e {
        BrokerError::Invalid(m) => error(StatusCode::BAD_REQUEST, &m),
        other => error(StatusCode::SERVICE_UNAVAILABLE, &other.to_string()),
    }
}

/// `POST /api/jobs` → `201 {id, existing}`; `400` malformed; `422` unknown task.
pub async fn enqueue(State(state): State<ApiState>, body: Bytes) -> Response {
    let Some(broker) = &state.broker else { return error(StatusCode::SERVICE_UNAVAILABLE, "no broker on this host") };
    let b: EnqueueBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("malformed job: {e}")),
    };
    let mut job = NewJob::new(b.task, b.args, b.kwargs);
    if let Some(q) = b.queue {
        job.queue = q;
    }
    job.eta = match (b.delay_ms, b.eta) {
        (Some(ms), _) => match crate::job::from_now(std::time::Duration::from_millis(ms)) {
            Some(at) => Some(at),
            None => return error(StatusCode::BAD_REQUEST, &format!("delay_ms {ms} is too far in the future")),
        },
        (None, eta) => eta,
    };
    job.expires_at = b.expires_at;
    job.timeout_ms = b.timeout_ms;
    job.idempotency_key = b.idempotency_key;
    if let Some(n) = b.max_retries {
        job.max_retries = n;
    }
    if let Some(p) = b.priority {
        job.priority = p;
    }
    if let Err(m) = job.validate() {
        return error(StatusCode::BAD_REQUEST, &m);
    }
    if let Some(registry) = &state.registry {
        if registry.lookup(&job.task).is_none() {
            return error(StatusCode::UNPROCESSABLE_ENTITY, &format!("unknown task {:?}: no loaded plugin serves it", job.task));
        }
    }
    match broker.enqueue(job).await {
        Ok(e) => (StatusCode::CREATED, Json(json!({"id": e.id, "existing": e.existing}))).into_response(),
        Err(e) => broker_error(e),
    }
}

/// `GET /api/jobs/{id}` → the status JSON.
pub async fn status(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let Some(broker) = &state.broker else { return error(StatusCode::SERVICE_UNAVAILABLE, "no broker on this host") };
    match broker.status(&id).await {
        Ok(Some(s)) => Json(s).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("no job with id {id:?}")),
        Err(e) => broker_error(e),
    }
}

/// `DELETE /api/jobs/{id}` → cancel a queued job, or ask a running one to stop.
pub async fn cancel(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let Some(broker) = &state.broker else { return error(StatusCode::SERVICE_UNAVAILABLE, "no broker on this host") };
    match broker.cancel(&id).await {
        Ok(CancelOutcome::NotFound) => error(StatusCode::NOT_FOUND, &format!("no job with id {id:?}")),
        Ok(outcome) => Json(json!({"id": id, "outcome": outcome})).into_response(),
        Err(e) => broker_error(e),
    }
}

/// `GET /api/plugins` → loaded plugins with their grants and limits.
pub async fn plugins(State(state): State<ApiState>) -> Response {
    let Some(registry) = &state.registry else { return Json(json!([])).into_response() };
    let list: Vec<Value> = registry
        .plugins()
        .iter()
        .map(|p| {
            json!({
                "name": p.name, "version": p.version, "digest": p.digest, "tasks": p.tasks,
                "aliases": p.aliases, "grants": p.manifest.grants, "limits": p.limits,
                "running": p.limits.concurrency.saturating_sub(p.slots.available_permits()),
            })
        })
        .collect();
    Json(list).into_response()
}

/// `GET /api/queues` → depth of every queue.
pub async fn queues(State(state): State<ApiState>) -> Response {
    let Some(broker) = &state.broker else { return error(StatusCode::SERVICE_UNAVAILABLE, "no broker on this host") };
    match broker.queue_stats().await {
        Ok(q) => Json(q).into_response(),
        Err(e) => broker_error(e),
    }
}

/// `GET /metrics` → Prometheus text: queue depths by state, loaded plugins,
/// running jobs per plugin.
pub async fn metrics(State(state): State<ApiState>) -> Response {
    let mut out = String::new();
    if let Some(broker) = &state.broker {
        out.push_str("# HELP celer_queue_jobs Jobs per queue and state.\n# TYPE celer_queue_jobs gauge\n");
        if let Ok(stats) = broker.queue_stats().await {
            for q in stats {
                for (st, n) in [("queued", q.queued), ("delayed", q.delayed), ("running", q.running), ("dead", q.dead)] {
                    out.push_str(&format!("celer_queue_jobs{{queue=\"{}\",state=\"{st}\"}} {n}\n", escape(&q.queue)));
                }
            }
        }
    }
    if let Some(registry) = &state.registry {
        let plugins = registry.plugins();
        out.push_str("# HELP celer_plugins_loaded Plugins loaded on this host.\n# TYPE celer_plugins_loaded gauge\n");
        out.push_str(&format!("celer_plugins_loaded {}\n", plugins.len()));
        out.push_str("# HELP celer_plugin_running_jobs Jobs running per plugin on this host.\n# TYPE celer_plugin_running_jobs gauge\n");
        for p in plugins {
            let running = p.limits.concurrency.saturating_sub(p.slots.available_permits());
            out.push_str(&format!("celer_plugin_running_jobs{{plugin=\"{}\"}} {running}\n", escape(&p.name)));
        }
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Prometheus label values escape `\`, `"` and newlines.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

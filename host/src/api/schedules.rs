//! `/api/schedules`: the same schedule store `celer schedules` edits; the
//! leading scheduler uses a change from its next tick.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiState, error};
use crate::scheduler::schedule::{Schedule, Timing, validate};
use crate::scheduler::store::StoreError;

/// The body of `POST /api/schedules` (and the fields `PATCH` may change).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    name: Option<String>,
    task: Option<String>,
    cron: Option<String>,
    timezone: Option<String>,
    every_s: Option<u64>,
    at: Option<DateTime<Utc>>,
    args: Option<Value>,
    kwargs: Option<Value>,
    queue: Option<String>,
    enabled: Option<bool>,
    one_off: Option<bool>,
    start_time: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
    description: Option<String>,
}

impl ScheduleBody {
    /// The timing named by the body, if any; more than one is an error.
    fn timing(&self) -> Result<Option<Timing>, String> {
        let t = match (&self.cron, self.every_s, self.at) {
            (Some(expr), None, None) => Some(Timing::Crontab { expr: expr.clone(), timezone: self.timezone.clone().unwrap_or_else(|| "UTC".into()) }),
            (None, Some(every_s), None) => Some(Timing::Interval { every_s }),
            (None, None, Some(at)) => Some(Timing::Clocked { at }),
            (None, None, None) => None,
            _ => return Err("give at most one of cron, every_s, at".into()),
        };
        if let Some(t) = &t {
            validate(t).map_err(|e| e.to_string())?;
        }
        Ok(t)
    }
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Exists(_) => error(StatusCode::CONFLICT, &e.to_string()),
        other => error(StatusCode::SERVICE_UNAVAILABLE, &other.to_string()),
    }
}

fn view(s: &Schedule) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    v["next_run_at"] = json!(s.next_after(Utc::now()));
    v
}

fn parse(body: &Bytes) -> Result<ScheduleBody, Response> {
    serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("malformed schedule: {e}")))
}

/// `GET /api/schedules`
pub async fn list(State(state): State<ApiState>) -> Response {
    let Some(store) = &state.schedules else { return Json(json!([])).into_response() };
    match store.list().await {
        Ok(all) => Json(all.iter().map(view).collect::<Vec<_>>()).into_response(),
        Err(e) => store_error(e),
    }
}

/// `POST /api/schedules` → `201` with the schedule; `400` for a bad
/// definition (cron, time zone, JSON); `409` when the name exists.
pub async fn create(State(state): State<ApiState>, body: Bytes) -> Response {
    let Some(store) = &state.schedules else { return error(StatusCode::SERVICE_UNAVAILABLE, "no schedule store on this host") };
    let b = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let timing = match b.timing() {
        Ok(Some(t)) => t,
        Ok(None) => return error(StatusCode::BAD_REQUEST, "give one of cron, every_s, at"),
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let (Some(name), Some(task)) = (b.name.clone(), b.task.clone()) else {
        return error(StatusCode::BAD_REQUEST, "name and task are required");
    };
    let args = b.args.clone().unwrap_or_else(|| json!([]));
    let kwargs = b.kwargs.clone().unwrap_or_else(|| json!({}));
    if !args.is_array() || !kwargs.is_object() {
        return error(StatusCode::BAD_REQUEST, "args must be a JSON array and kwargs a JSON object");
    }
    let s = Schedule {
        name,
        task,
        args,
        kwargs,
        queue: b.queue.clone().unwrap_or_else(|| crate::job::DEFAULT_QUEUE.to_string()),
        one_off: b.one_off.unwrap_or(false) || matches!(timing, Timing::Clocked { .. }),
        timing,
        enabled: b.enabled.unwrap_or(true),
        start_time: b.start_time,
        expires: b.expires,
        last_run_at: None,
        total_run_count: 0,
        description: b.description.clone().unwrap_or_default(),
        source: "api".into(),
        created_at: Utc::now(),
    };
    match store.insert(&s, false).await {
        Ok(()) => (StatusCode::CREATED, Json(view(&s))).into_response(),
        Err(e) => store_error(e),
    }
}

/// `PATCH /api/schedules/{name}`: changes the fields given.
pub async fn update(State(state): State<ApiState>, Path(name): Path<String>, body: Bytes) -> Response {
    let Some(store) = &state.schedules else { return error(StatusCode::SERVICE_UNAVAILABLE, "no schedule store on this host") };
    let b = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut s = match store.get(&name).await {
        Ok(Some(s)) => s,
        Ok(None) => return error(StatusCode::NOT_FOUND, &format!("no schedule named {name:?}")),
        Err(e) => return store_error(e),
    };
    if b.name.as_ref().is_some_and(|n| *n != name) {
        return error(StatusCode::BAD_REQUEST, "a schedule cannot be renamed");
    }
    match b.timing() {
        Ok(Some(t)) => s.timing = t,
        Ok(None) => {
            if let (Some(tz), Timing::Crontab { expr, .. }) = (&b.timezone, &s.timing) {
                let t = Timing::Crontab { expr: expr.clone(), timezone: tz.clone() };
                if let Err(e) = validate(&t) {
                    return error(StatusCode::BAD_REQUEST, &e.to_string());
                }
                s.timing = t;
            }
        }
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    }
    if let Some(v) = b.task {
        s.task = v;
    }
    if let Some(v) = b.args {
        s.args = v;
    }
    if let Some(v) = b.kwargs {
        s.kwargs = v;
    }
    if !s.args.is_array() || !s.kwargs.is_object() {
        return error(StatusCode::BAD_REQUEST, "args must be a JSON array and kwargs a JSON object");
    }
    if let Some(v) = b.queue {
        s.queue = v;
    }
    if let Some(v) = b.enabled {
        s.enabled = v;
    }
    if let Some(v) = b.one_off {
        s.one_off = v;
    }
    if b.start_time.is_some() {
        s.start_time = b.start_time;
    }
    if b.expires.is_some() {
        s.expires = b.expires;
    }
    if let Some(v) = b.description {
        s.description = v;
    }
    match store.insert(&s, true).await {
        Ok(()) => Json(view(&s)).into_response(),
        Err(e) => store_error(e),
    }
}

/// `DELETE /api/schedules/{name}`
pub async fn remove(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    let Some(store) = &state.schedules else { return error(StatusCode::SERVICE_UNAVAILABLE, "no schedule store on this host") };
    match store.remove(&name).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, &format!("no schedule named {name:?}")),
        Err(e) => store_error(e),
    }
}

//! The host's HTTP listener (`http.listen`, default `127.0.0.1:8642`),
//! started by `celer serve`.
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /healthz` | none | `200 ok` while the process runs |
//! | `GET /readyz` | token | `200` when every backend answers, else `503`; JSON either way |
//! | `GET /files/{*key}?expires=&sig=` | the signature | a `file://` object, through a signed, expiring link |
//!
//! With `http.token` (`CELER_API_TOKEN`) set, every route but `/healthz` and
//! the signed links needs `Authorization: Bearer <token>`. New routes that
//! need the token go in [`protected_routes`]; [`router`] puts the layer on
//! them.

mod jobs;
mod schedules;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::capabilities::Capabilities;
use crate::capabilities::storage::FileLinks;
use crate::capabilities::storage::link::{LinkError, content_type_for};
use crate::config::HttpConfig;

/// Readiness checks that take longer than this count as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The backends, for `/readyz` (and whatever later routes need).
    pub capabilities: Capabilities,
    /// `http.token`: required as a bearer token on protected routes.
    pub token: Option<Arc<str>>,
    /// `file://` download links; none when storage is S3.
    pub files: Option<FileLinks>,
    /// Jobs and queues (`/api/jobs`, `/api/queues`, `/metrics`).
    pub broker: Option<Arc<dyn crate::broker::Broker>>,
    /// Loaded plugins (`/api/plugins`; unknown-task checks on enqueue).
    pub registry: Option<Arc<crate::runtime::registry::Registry>>,
    /// Periodic tasks (`/api/schedules`).
    pub schedules: Option<crate::scheduler::store::ScheduleStore>,
}

impl ApiState {
    /// The API shares the host's capabilities (its broker, database, storage) rather than
    /// opening its own.
    pub fn new(capabilities: Capabilities, http: &HttpConfig) -> ApiState {
        let files = capabilities.file_links();
        let token = http.token.as_deref().filter(|t| !t.is_empty()).map(Arc::from);
        ApiState { capabilities, token, files, broker: None, registry: None, schedules: None }
    }

    /// Serves the jobs, queues and metrics routes from `broker`.
    pub fn with_broker(mut self, broker: Arc<dyn crate::broker::Broker>) -> Self {
        self.broker = Some(broker);
        self
    }

    /// Serves `/api/plugins` and checks task names on enqueue.
    pub fn with_registry(mut self, registry: Arc<crate::runtime::registry::Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Serves `/api/schedules`.
    pub fn with_schedules(mut self, store: crate::scheduler::store::ScheduleStore) -> Self {
        self.schedules = Some(store);
        self
    }
}

/// Binds `listen`, or says in one line why not.
pub async fn bind(listen: &str) -> Result<TcpListener, String> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e} (set http.listen in celer.toml or CELER_LISTEN)"))
}

/// Serves `router` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, "http listening");
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "http listener failed");
    }
}

/// Every route, with the bearer-token layer on the protected ones.
pub fn router(state: ApiState) -> Router {
    let protected = protected_routes().route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/files/{*key}", get(file))
        .merge(protected)
        .with_state(state)
}

/// Routes behind the bearer token (when one is configured).
pub fn protected_routes() -> Router<ApiState> {
    use axum::routing::post;
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(jobs::metrics))
        .route("/api/jobs", post(jobs::enqueue))
        .route("/api/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/api/plugins", get(jobs::plugins))
        .route("/api/queues", get(jobs::queues))
        .route("/api/schedules", get(schedules::list).post(schedules::create))
        .route("/api/schedules/{name}", axum::routing::patch(schedules::update).delete(schedules::remove))
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// `Authorization: Bearer <token>` when a token is configured.
async fn require_token(State(state): State<ApiState>, headers: HeaderMap, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else { return next.run(request).await };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return next.run(request).await;
    }
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> &'static str {
    "ok"
}

/// Every backend's answer: `{"ready": bool, "checks": {name: "ok" | error}}`.
async fn readyz(State(state): State<ApiState>) -> Response {
    let Ok(results) = tokio::time::timeout(READY_TIMEOUT, state.capabilities.ping()).await else {
        let body = json!({"ready": false, "error": format!("readiness checks took longer than {READY_TIMEOUT:?}")});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    };
    let mut checks = Map::new();
    let mut ready = true;
    for (name, result) in results {
        match result {
            Ok(()) => checks.insert(name.into(), Value::from("ok")),
            Err(e) => {
                ready = false;
                checks.insert(name.into(), Value::from(e))
            }
        };
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({"ready": ready, "checks": checks}))).into_response()
}

#[derive(Deserialize)]
struct LinkQuery {
    expires: Option<String>,
    sig: Option<String>,
}

/// A signed `file://` download link: 403 when the signature is wrong or
/// the link has expired, 404 when the object is gone; else the bytes, streamed.
async fn file(State(state): State<ApiState>, Path(key): Path<String>, Query(q): Query<LinkQuery>) -> Response {
    let Some(files) = &state.files else {
        return error(StatusCode::NOT_FOUND, "this host serves no file links (storage is not file://)");
    };
    let (Some(expires), Some(sig)) = (q.expires.and_then(|e| e.parse::<u64>().ok()), q.sig) else {
        return error(StatusCode::FORBIDDEN, "the link is not signed");
    };
    match files.open(&key, expires, &sig).await {
        Ok((file, len)) => {
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
            let mut response = Response::new(body);
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type_for(&key)));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
            response
        }
        Err(LinkError::Forbidden) => error(StatusCode::FORBIDDEN, "the link's signature is wrong or the link has expired"),
        Err(LinkError::NotFound) => error(StatusCode::NOT_FOUND, "no such object"),
    }
}

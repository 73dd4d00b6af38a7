//! The job as every part of celer sees it: what a producer asks for
//! ([`NewJob`]), the envelope a worker runs ([`Job`]), its life cycle
//! ([`JobState`]) and the status JSON that `celer status` and the HTTP API
//! print ([`JobStatus`]). One definition, so the CLI, the broker and the
//! worker cannot drift apart.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Default retry budget when a producer does not say.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Default queue name.
pub const DEFAULT_QUEUE: &str = "default";

/// The time `delay` from now, or `None` when no date can hold it (a delay
/// from a request, a plugin or a flag that would overflow): callers refuse
/// it as invalid input rather than panic.
pub fn from_now(delay: std::time::Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(delay).ok().and_then(|d| Utc::now().checked_add_signed(d))
}

/// A job's arguments as JSON text. They go from the queue to the plugin as
/// text (the guest reads JSON), so a fetched job keeps them as they were
/// stored instead of parsing them into a tree and writing them out again
/// for each run: for a job carrying a document, that round trip (escapes
/// undone, then redone) was the host's largest cost outside the sandbox.
#[derive(Clone)]
pub struct JsonText(Box<serde_json::value::RawValue>);

impl JsonText {
    /// The text of `value`.
    pub fn of(value: &Value) -> JsonText {
        // A `Value` always serializes; `null` would only stand in for a bug.
        JsonText(serde_json::value::to_raw_value(value).unwrap_or_else(|_| JsonText::null()))
    }

    fn null() -> Box<serde_json::value::RawValue> {
        serde_json::value::RawValue::from_string("null".to_string()).unwrap_or_else(|_| unreachable!("null is JSON"))
    }

    /// The JSON text, as stored.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The value, parsed (for the places that look inside: `inspect active`,
    /// comparisons in tests).
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }
}

impl std::fmt::Debug for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Equal when they hold the same value, whatever the spacing.
impl PartialEq for JsonText {
    fn eq(&self, other: &JsonText) -> bool {
        self.as_str() == other.as_str() || self.value() == other.value()
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<JsonText, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(JsonText)
    }
}

/// A job a producer wants run; the broker gives it an id and an envelope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewJob {
    pub task: String,
    /// Positional arguments; always a JSON array.
    pub args: Value,
    /// Keyword arguments; always a JSON object.
    pub kwargs: Value,
    pub queue: String,
    /// Higher runs first among jobs that are due.
    pub priority: i32,
    pub max_retries: u32,
    /// Not before this instant (`--delay` / `--eta`); `None` means now.
    pub eta: Option<DateTime<Utc>>,
    /// Not after this instant: the job turns `expired` instead of running.
    pub expires_at: Option<DateTime<Utc>>,
    /// Overrides the plugin's `limits.timeout_s` for this job.
    pub timeout_ms: Option<u64>,
    /// A second enqueue with the same key returns the first job's id.
    pub idempotency_key: Option<String>,
    /// The job that enqueued this one.
    pub parent_id: Option<String>,
    /// The first job of the workflow this one belongs to (Celery's
    /// `root_id`), so that every job a request set off can be found from
    /// it; `None` when this job starts a workflow itself.
    pub root_id: Option<String>,
}

impl NewJob {
    /// A job with the defaults for everything but its task and arguments.
    pub fn new(task: impl Into<String>, args: Value, kwargs: Value) -> Self {
        NewJob {
            task: task.into(),
            args,
            kwargs,
            queue: DEFAULT_QUEUE.to_string(),
            priority: 0,
            max_retries: DEFAULT_MAX_RETRIES,
            eta: None,
            expires_at: None,
            timeout_ms: None,
            idempotency_key: None,
            parent_id: None,
            root_id: None,
        }
    }

    /// Checks the shape producers most often get wrong, so that a bad job is
    /// refused at the door instead of failing later in a worker.
    pub fn validate(&self) -> Result<(), String> {
        if self.task.trim().is_empty() {
            return Err("task name is empty".into());
        }
        if !self.args.is_array() {
            return Err(format!("args must be a JSON array, got {}", json_kind(&self.args)));
        }
        if !self.kwargs.is_object() {
            return Err(format!("kwargs must be a JSON object, got {}", json_kind(&self.kwargs)));
        }
        if self.queue.trim().is_empty() {
            return Err("queue name is empty".into());
        }
        Ok(())
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The envelope of a job once enqueued (the design's "Job" JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub task: String,
    pub args: JsonText,
    pub kwargs: JsonText,
    pub queue: String,
    pub priority: i32,
    /// 0 on the first delivery; +1 for every retry or redelivery.
    pub attempt: u32,
    pub max_retries: u32,
    pub eta: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub timeout_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    pub parent_id: Option<String>,
    /// See [`NewJob::root_id`].
    #[serde(default)]
    pub root_id: Option<String>,
    pub enqueued_at: DateTime<Utc>,
}

impl Job {
    /// The root of the workflow this job belongs to: its own root, or
    /// itself when it started one. Follow-up jobs carry it on.
    pub fn workflow_root(&self) -> &str {
        self.root_id.as_deref().unwrap_or(&self.id)
    }
}

/// Where a job is in its life cycle.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for its eta.
    Scheduled,
    /// Due; waiting for a worker.
    Queued,
    /// Leased by a worker.
    Running,
    /// Failed an attempt; waiting for its backoff to pass.
    Retrying,
    Succeeded,
    /// Out of retries, or failed permanently: also in the dead-letter queue.
    Failed,
    Cancelled,
    /// Its `expires_at` passed before it could run.
    Expired,
}

impl JobState {
    /// The text stored by brokers and printed in status JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }

    /// Parses what [`JobState::as_str`] wrote.
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "scheduled" => JobState::Scheduled,
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "retrying" => JobState::Retrying,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            "expired" => JobState::Expired,
            _ => return None,
        })
    }

    /// No further transition happens from a terminal state (but a failed
    /// job can be brought back by `celer dead retry`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Expired
        )
    }
}

/// Why a job attempt failed; the `kind` in status JSON.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Ran past its `timeout_ms` / `limits.timeout_s`.
    Timeout,
    /// Tried to grow its memory past `limits.memory_mb`.
    MemoryLimit,
    /// The guest trapped: a panic, `unreachable`, an out-of-bounds access.
    Trap,
    /// Asked for something its grants do not allow, and failed because of it.
    Denied,
    /// A backend was down, or the worker lost the job's lease.
    Unavailable,
    /// The arguments did not fit the task.
    InvalidArgs,
    /// No loaded plugin declares the task.
    UnknownTask,
    /// The plugin returned its own failure.
    Plugin,
    /// Stopped by `celer cancel` / `DELETE /api/jobs/{id}`.
    Cancelled,
    /// The host that ran it vanished too often (lease lost on every attempt).
    Lost,
}

impl ErrorKind {
    /// Whether another attempt could succeed. A timeout, a trap or a
    /// memory-limit hit is retried (a flaky network call can cause either);
    /// an unknown task, bad arguments or a denial will fail the same way.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Timeout
                | ErrorKind::MemoryLimit
                | ErrorKind::Trap
                | ErrorKind::Unavailable
                | ErrorKind::Plugin
                | ErrorKind::Lost
        )
    }
}

/// A failure as recorded in status JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
}

impl JobError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        JobError { kind, message: message.into() }
    }
}

/// Progress as last reported by the plugin.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// The status JSON: the envelope plus everything known of its run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStatus {
    #[serde(flatten)]
    pub job: Job,
    pub state: JobState,
    pub result: Option<Value>,
    pub error: Option<JobError>,
    pub progress: Option<Progress>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub plugin: Option<String>,
    pub plugin_version: Option<String>,
    pub host: Option<String>,
    /// What the job reached through its grants (see `capabilities`).
    pub touched: Option<Value>,
    /// The job's captured log: guest stdout/stderr and `log` calls, capped.
    pub log: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_keep_their_stored_text_through_an_envelope() {
        let stored = r#"{"args":["{\"id\": \"ord_1\", \"note\": \"caf\u00e9\"}"],"n":1}"#;
        #[derive(Deserialize, Serialize)]
        struct Envelope {
            args: JsonText,
            n: u32,
        }
        let env: Envelope = serde_json::from_str(stored).expect("envelope");
        assert_eq!(env.args.as_str(), r#"["{\"id\": \"ord_1\", \"note\": \"caf\u00e9\"}"]"#, "the text, escapes and all, not re-encoded");
        assert_eq!(env.args.value(), json!(["{\"id\": \"ord_1\", \"note\": \"café\"}"]));
        assert_eq!(serde_json::to_string(&env).expect("write"), stored, "written back as it was read");
        assert_eq!(JsonText::of(&json!({"a": [1, 2]})).as_str(), r#"{"a":[1,2]}"#);
        let spaced: JsonText = serde_json::from_str(r#"{ "a" : [1, 2] }"#).expect("spaced");
        assert_eq!(spaced, JsonText::of(&json!({"a": [1, 2]})), "equal by value, whatever the spacing");
        assert_ne!(spaced, JsonText::of(&json!({"a": [2, 1]})));
    }
}

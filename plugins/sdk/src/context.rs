//! What a task can know and do besides its arguments: the job's identity,
//! the plugin's configuration, logging, progress and follow-up jobs.
//!
//! These are the capabilities every task may use (logging and progress are
//! always granted; enqueueing is checked against `grants.enqueue`), so they
//! hang off the [`Context`] each task receives instead of being free functions
//! the author has to discover.

use std::cell::OnceCell;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bindings::celer::plugin::jobs;
use crate::bindings::celer::plugin::log::{self, Level};
use crate::bindings::celer::plugin::types::{HostError, Job};
use crate::TaskError;

/// The job being run and the host capabilities every task may use.
///
/// Capability methods (logging, progress, enqueue) call into the host; on a
/// native target (unit tests) they panic, so test tasks that use them through
/// the host, or keep them out of the code under test.
#[derive(Debug)]
pub struct Context {
    job_id: String,
    task: String,
    attempt: u32,
    max_retries: u32,
    queue: String,
    parent_id: Option<String>,
    config_text: String,
    /// Parsed on first use: most tasks (and every benchmark no-op) never look.
    config: OnceCell<Value>,
}

impl Context {
    /// Takes everything but the arguments out of the job handed to `run`.
    pub(crate) fn from_job(job: Job) -> (Self, String, String) {
        let Job { id, task, args, kwargs, attempt, max_retries, queue, parent_id, config } = job;
        let ctx = Self {
            job_id: id,
            task,
            attempt,
            max_retries,
            queue,
            parent_id,
            config_text: config,
            config: OnceCell::new(),
        };
        (ctx, args, kwargs)
    }

    /// A context for unit-testing a task function natively, with the given
    /// task name and `[config]` table; every other field takes a fixed value.
    pub fn for_tests(task: &str, config: Value) -> Self {
        Self {
            job_id: "00000000-0000-7000-8000-000000000000".to_owned(),
            task: task.to_owned(),
            attempt: 0,
            max_retries: 3,
            queue: "default".to_owned(),
            parent_id: None,
            config_text: config.to_string(),
            config: OnceCell::from(config),
        }
    }

    /// The job's id (UUIDv7 text), stable across retries: use it as an
    /// idempotency key for side effects.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The task name the job was enqueued under (after alias mapping).
    pub fn task(&self) -> &str {
        &self.task
    }

    /// 0 on the first delivery, +1 on every retry or redelivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many retries the job may have (as the host reports it).
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The queue the job came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The job that enqueued this one, if any.
    pub fn parent_id(&self) -> Option<&str> {
        self.parent_id.as_deref()
    }

    /// The manifest's `[config]` table as JSON; `Null` if the host sent
    /// something that is not JSON (it never should).
    pub fn config_value(&self) -> &Value {
        self.config
            .get_or_init(|| serde_json::from_str(&self.config_text).unwrap_or(Value::Null))
    }

    /// The manifest's `[config]` table decoded into `T` (no table reads as
    /// `{}`). A mismatch is the operator's mistake and will not heal by
    /// retrying, so it is a `fail`.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        let text = match self.config_text.trim() {
            "" | "null" => "{}",
            text => text,
        };
        serde_json::from_str(text).map_err(|e| TaskError::fail(format!("invalid config: {e}")))
    }

    /// Writes one line to the host's log and the job's own log, at `level`.
    pub fn log(&self, level: Level, message: impl AsRef<str>) {
        log::log(level, message.as_ref());
    }

    /// Logs at trace level.
    pub fn trace(&self, message: impl AsRef<str>) {
        self.log(Level::Trace, message);
    }

    /// Logs at debug level.
    pub fn debug(&self, message: impl AsRef<str>) {
        self.log(Level::Debug, message);
    }

    /// Logs at info level.
    pub fn info(&self, message: impl AsRef<str>) {
        self.log(Level::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(&self, message: impl AsRef<str>) {
        self.log(Level::Warn, message);
    }

    /// Logs at error level.
    pub fn error(&self, message: impl AsRef<str>) {
        self.log(Level::Error, message);
    }

    /// Reports progress (`done` of `total`), visible in the job's status.
    pub fn progress(&self, done: u64, total: u64) {
        log::progress(done, total);
    }

    /// Enqueues a follow-up job with the host's default options; see
    /// [`enqueue_with`](Self::enqueue_with).
    pub fn enqueue(
        &self,
        task: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<String, HostError> {
        self.enqueue_with(task, args, kwargs, &EnqueueOptions::default())
    }

    /// Enqueues a follow-up job, whose `parent_id` will be this job, and
    /// returns its id. `args` must serialize to a JSON array (a tuple, a `Vec`,
    /// `json!([…])`) and `kwargs` to an object (a struct, a map,
    /// `json!({…})`); `()` means none. The task must be in `grants.enqueue`.
    pub fn enqueue_with(
        &self,
        task: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
        options: &EnqueueOptions,
    ) -> Result<String, HostError> {
        let args = encode(&args, "args", Container::Array)?;
        let kwargs = encode(&kwargs, "kwargs", Container::Object)?;
        jobs::enqueue(task, &args, &kwargs, &options.to_wire())
    }
}

/// The JSON container a job's `args` (array) or `kwargs` (object) must be.
#[derive(Debug, Clone, Copy)]
enum Container {
    Array,
    Object,
}

impl Container {
    fn name(self) -> &'static str {
        match self {
            Self::Array => "array",
            Self::Object => "object",
        }
    }

    /// What `()` (JSON null) stands for: no arguments.
    fn empty(self) -> &'static str {
        match self {
            Self::Array => "[]",
            Self::Object => "{}",
        }
    }

    fn holds(self, value: &Value) -> bool {
        match self {
            Self::Array => value.is_array(),
            Self::Object => value.is_object(),
        }
    }
}

/// JSON text of `value`, which must serialize to `container` or to null.
fn encode(value: &impl Serialize, what: &str, container: Container) -> Result<String, HostError> {
    let value = serde_json::to_value(value)
        .map_err(|e| HostError::Invalid(format!("{what} do not serialize to JSON: {e}")))?;
    match value {
        Value::Null => Ok(container.empty().to_owned()),
        v if container.holds(&v) => Ok(v.to_string()),
        v => Err(HostError::Invalid(format!("{what} must be a JSON {}, got {v}", container.name()))),
    }
}

/// How a follow-up job is queued; every field left `None` takes the host's
/// default. Built with chained setters: `EnqueueOptions::new().queue("mail")`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnqueueOptions {
    /// The queue; the host's default queue when `None`.
    pub queue: Option<String>,
    /// Run no earlier than this long from now.
    pub delay: Option<Duration>,
    /// Retries allowed for the new job.
    pub max_retries: Option<u32>,
    /// Higher runs first.
    pub priority: Option<i32>,
    /// A second enqueue with the same key returns the first job's id, so a
    /// retried parent does not enqueue its children twice.
    pub idempotency_key: Option<String>,
}

impl EnqueueOptions {
    /// All host defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Sets the delay before the job may run.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Sets the retries allowed.
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = Some(max_retries);
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    fn to_wire(&self) -> jobs::EnqueueOptions {
        jobs::EnqueueOptions {
            queue: self.queue.clone(),
            delay_ms: self.delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            max_retries: self.max_retries,
            priority: self.priority,
            idempotency_key: self.idempotency_key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(config: &str) -> Job {
        Job {
            id: "id-1".into(),
            task: "t.x".into(),
            args: "[1]".into(),
            kwargs: "{}".into(),
            attempt: 2,
            max_retries: 5,
            queue: "q".into(),
            parent_id: Some("p".into()),
            config: config.into(),
        }
    }

    #[test]
    fn from_job_splits_identity_from_arguments() {
        let (ctx, args, kwargs) = Context::from_job(job(r#"{"greeting": "Hi"}"#));
        assert_eq!((args.as_str(), kwargs.as_str()), ("[1]", "{}"));
        assert_eq!(ctx.job_id(), "id-1");
        assert_eq!(ctx.task(), "t.x");
        assert_eq!((ctx.attempt(), ctx.max_retries()), (2, 5));
        assert_eq!(ctx.queue(), "q");
        assert_eq!(ctx.parent_id(), Some("p"));
        assert_eq!(ctx.config_value(), &json!({"greeting": "Hi"}));
    }

    #[test]
    fn typed_config_and_its_errors() {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            greeting: Option<String>,
        }
        let (ctx, ..) = Context::from_job(job(r#"{"greeting": "Hi"}"#));
        assert_eq!(ctx.config::<Config>().unwrap().greeting.as_deref(), Some("Hi"));
        let (ctx, ..) = Context::from_job(job(""));
        assert_eq!(ctx.config::<Config>().unwrap().greeting, None);
        assert_eq!(ctx.config_value(), &Value::Null);
        let (ctx, ..) = Context::from_job(job("null"));
        assert_eq!(ctx.config::<Config>().unwrap().greeting, None);
        let (ctx, ..) = Context::from_job(job(r#"{"greeting": 1}"#));
        let err = ctx.config::<Config>().err().unwrap();
        assert!(matches!(&err, TaskError::Fail(m) if m.starts_with("invalid config: ")), "{err}");
    }

    #[test]
    fn enqueue_arguments_must_be_array_and_object() {
        assert_eq!(encode(&(), "args", Container::Array).unwrap(), "[]");
        assert_eq!(encode(&(), "kwargs", Container::Object).unwrap(), "{}");
        assert_eq!(encode(&("a", 1), "args", Container::Array).unwrap(), r#"["a",1]"#);
        assert_eq!(encode(&json!({"a": 1}), "kwargs", Container::Object).unwrap(), r#"{"a":1}"#);
        let err = encode(&42, "args", Container::Array).unwrap_err();
        assert_eq!(err, HostError::Invalid("args must be a JSON array, got 42".into()));
        let err = encode(&[1], "kwargs", Container::Object).unwrap_err();
        assert_eq!(err, HostError::Invalid("kwargs must be a JSON object, got [1]".into()));
    }

    #[test]
    fn options_go_to_the_wire_in_milliseconds() {
        let wire = EnqueueOptions::new()
            .queue("mail")
            .delay(Duration::from_secs(3))
            .max_retries(1)
            .priority(-2)
            .idempotency_key("k")
            .to_wire();
        assert_eq!(wire.queue.as_deref(), Some("mail"));
        assert_eq!(wire.delay_ms, Some(3000));
        assert_eq!((wire.max_retries, wire.priority), (Some(1), Some(-2)));
        assert_eq!(wire.idempotency_key.as_deref(), Some("k"));
        assert_eq!(EnqueueOptions::new().to_wire(), jobs::EnqueueOptions {
            queue: None,
            delay_ms: None,
            max_retries: None,
            priority: None,
            idempotency_key: None,
        });
    }
}

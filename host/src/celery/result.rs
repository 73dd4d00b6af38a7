//! Celery's result format (Redis result backend): `celery-task-meta-<id>`
//! holds a JSON document written with SETEX and PUBLISHed on a channel of
//! the same name, exactly as a Celery worker writes it, so that
//! `AsyncResult.get()` returns or raises as it would with Celery:
//!
//! ```text
//! {"status": "SUCCESS", "result": <JSON>, "traceback": null, "children": [],
//!  "date_done": "2026-11-22T17:37:45.542126+00:00", "task_id": "<id>"}
//! {"status": "FAILURE", "result": {"exc_type": …, "exc_message": [...], "exc_module": …},
//!  "traceback": "Traceback (most recent call last):\n…", …}
//! ```
//!
//! The text is Python's `json.dumps` output byte for byte (`", "` and `": "`
//! separators, non-ASCII escaped as `\uXXXX`); the tests compare it with the
//! captured fixtures.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::job::{ErrorKind, JobError};

/// Celery task states celer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Success,
    Failure,
    Retry,
    Revoked,
    /// Running (`task_track_started`); the result is `{"pid", "hostname"}`.
    Started,
    /// Running, with the progress the plugin reported: `{"current",
    /// "total", "percent"}`, the custom state Django progress bars read
    /// (what `self.update_state(state="PROGRESS", meta=…)` writes).
    Progress,
}

impl Status {
    /// The exact spelling Celery's client compares states with.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Failure => "FAILURE",
            Status::Retry => "RETRY",
            Status::Revoked => "REVOKED",
            Status::Started => "STARTED",
            Status::Progress => "PROGRESS",
        }
    }

    /// Celery's READY_STATES: only these carry a `date_done`.
    fn is_ready(self) -> bool {
        matches!(self, Status::Success | Status::Failure | Status::Revoked)
    }
}

/// An exception as Celery serializes it for JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Exception {
    pub exc_type: String,
    pub exc_module: String,
    pub message: String,
}

impl Exception {
    /// Celery's client rebuilds the exception from these three, so they are all a failure
    /// needs.
    pub fn new(exc_type: &str, exc_module: &str, message: impl Into<String>) -> Self {
        Exception { exc_type: exc_type.into(), exc_module: exc_module.into(), message: message.into() }
    }

    /// What a revoked (or expired) task stores: Celery's `TaskRevokedError`.
    pub fn revoked(why: &str) -> Exception {
        Exception::new("TaskRevokedError", "celery.exceptions", why)
    }

    /// The exception a Django app sees for a celer failure. Celery's own
    /// classes where one fits (the client can import them); otherwise a
    /// `celer.exceptions.<Name>`, which Celery's client recreates as an
    /// Exception subclass of that name.
    pub fn of(error: &JobError) -> Exception {
        let (t, m) = match error.kind {
            ErrorKind::Timeout => ("TimeLimitExceeded", "celery.exceptions"),
            ErrorKind::UnknownTask => ("NotRegistered", "celery.exceptions"),
            ErrorKind::Lost => ("WorkerLostError", "celery.exceptions"),
            ErrorKind::Cancelled => ("TaskRevokedError", "celery.exceptions"),
            ErrorKind::InvalidArgs => ("TypeError", "builtins"),
            ErrorKind::MemoryLimit => ("MemoryLimitExceeded", "celer.exceptions"),
            ErrorKind::Trap => ("Trap", "celer.exceptions"),
            ErrorKind::Denied => ("Denied", "celer.exceptions"),
            ErrorKind::Unavailable => ("Unavailable", "celer.exceptions"),
            ErrorKind::Plugin => ("PluginError", "celer.exceptions"),
        };
        Exception::new(t, m, error.message.clone())
    }
}

impl Exception {
    /// How Python prints it: `PluginError('organization 42 not found')`.
    pub fn repr(&self) -> String {
        format!("{}({})", self.exc_type, py_str_repr(&self.message))
    }
}

/// What a finished task stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    /// With the traceback text (None for a revocation).
    Failure(Exception, Option<String>),
}

/// The `celery-task-meta-<id>` document.
pub fn meta(task_id: &str, status: Status, outcome: &Outcome, date_done: DateTime<Utc>) -> String {
    let mut s = String::with_capacity(256);
    s.push_str("{\"status\": ");
    py_str(&mut s, status.as_str());
    s.push_str(", \"result\": ");
    match outcome {
        Outcome::Success(v) => py_json(&mut s, v),
        Outcome::Failure(e, _) => {
            s.push_str("{\"exc_type\": ");
            py_str(&mut s, &e.exc_type);
            s.push_str(", \"exc_message\": [");
            py_str(&mut s, &e.message);
            s.push_str("], \"exc_module\": ");
            py_str(&mut s, &e.exc_module);
            s.push('}');
        }
    }
    s.push_str(", \"traceback\": ");
    match outcome {
        Outcome::Failure(_, Some(tb)) => py_str(&mut s, tb),
        _ => s.push_str("null"),
    }
    s.push_str(", \"children\": [], \"date_done\": ");
    if status.is_ready() {
        py_str(&mut s, &iso(date_done));
    } else {
        s.push_str("null");
    }
    s.push_str(", \"task_id\": ");
    py_str(&mut s, task_id);
    s.push('}');
    s
}

/// A traceback string in Python's shape, naming where the job ran.
pub fn traceback(e: &Exception, job_id: &str, task: &str, plugin: Option<(&str, &str)>) -> String {
    let place = match plugin {
        Some((name, version)) => format!("plugin {name} {version}"),
        None => "no plugin".to_string(),
    };
    format!(
        "Traceback (most recent call last):\n  celer job {job_id}, task {task}, {place}\n{}: {}\n",
        e.exc_type, e.message
    )
}

/// Python's `datetime.isoformat()` of an aware UTC time.
pub fn iso(t: DateTime<Utc>) -> String {
    if t.timestamp_subsec_micros() == 0 {
        t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }
}

/// `json.dumps(value)` with Python's defaults.
pub fn py_json(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let text = n.to_string();
            // Python writes exponents with a sign: 1e+21.
            match text.find('e') {
                Some(i) if !text[i + 1..].starts_with('-') && !text[i + 1..].starts_with('+') => {
                    out.push_str(&text[..=i]);
                    out.push('+');
                    out.push_str(&text[i + 1..]);
                }
                _ => out.push_str(&text),
            }
        }
        Value::String(s) => py_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_json(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_str(out, k);
                out.push_str(": ");
                py_json(out, item);
            }
            out.push('}');
        }
    }
}

/// A JSON string as Python writes it with `ensure_ascii=True`.
pub fn py_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7f => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr()` of a JSON value.
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_str_repr(s),
        Value::Array(items) => format!("[{}]", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            format!("{{{}}}", map.iter().map(|(k, v)| format!("{}: {}", py_str_repr(k), py_repr(v))).collect::<Vec<_>>().join(", "))
        }
    }
}

/// Python's `repr()` of a str: single quotes unless the text holds one and
/// no double quote.
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `repr()` of a JSON array as a tuple of positional arguments:
/// `(2, 3)`, `('x',)`, `()`.
pub fn py_args_repr(args: &Value) -> String {
    match args {
        Value::Array(items) if items.len() == 1 => format!("({},)", py_repr(&items[0])),
        Value::Array(items) => format!("({})", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        other => py_repr(other),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn values_are_printed_as_python_reprs_them() {
        assert_eq!(py_repr(&json!(["it's", "say \"hi\"", null, true, 1.5, {"k": [1]}])), r#"["it's", 'say "hi"', None, True, 1.5, {'k': [1]}]"#);
        assert_eq!((py_args_repr(&json!([2, 3])), py_args_repr(&json!(["x"])), py_args_repr(&json!([]))), ("(2, 3)".into(), "('x',)".into(), "()".into()));
    }

    fn fixture(name: &str) -> String {
        String::from_utf8(crate::celery::fixture(name)).expect("a UTF-8 fixture")
    }

    fn time(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn success_meta_is_byte_identical_to_celerys() {
        let expected = fixture("result-meta-success.json");
        // serde_json sorts object keys; Python keeps insertion order. The
        // fixture's result has its keys in insertion order, so compare the
        // document around it byte for byte and the result as JSON.
        let result = json!({"org_id": 42, "user_id": 7, "fmt": "zip", "path": "/exports/42.zip"});
        let ours = meta(
            "1d6d6902-cf49-4421-bc8b-221fa29bc960",
            Status::Success,
            &Outcome::Success(result.clone()),
            time("2026-11-22T17:37:45.542126+00:00"),
        );
        let mut sorted = String::new();
        py_json(&mut sorted, &result);
        let theirs_result = r#"{"org_id": 42, "user_id": 7, "fmt": "zip", "path": "/exports/42.zip"}"#;
        assert_eq!(ours.replace(&sorted, theirs_result), expected);
        assert_eq!(fixture("result-publish-success.json"), expected, "PUBLISH carries the same bytes");
        let parsed: Value = serde_json::from_str(&ours).unwrap();
        assert_eq!(parsed, serde_json::from_str::<Value>(&expected).unwrap());
    }

    #[test]
    fn failure_meta_has_celerys_exception_shape() {
        let expected = fixture("result-meta-failure.json");
        let parsed: Value = serde_json::from_str(&expected).unwrap();
        let tb = parsed["traceback"].as_str().unwrap().to_string();
        let e = Exception::new("ValueError", "builtins", "organization 42 not found");
        let ours = meta(
            "27bfc597-edd5-4651-af8f-70104f869b43",
            Status::Failure,
            &Outcome::Failure(e, Some(tb)),
            time("2026-11-22T17:37:46.556013+00:00"),
        );
        assert_eq!(ours, expected);
    }

    /// Celery stores `date_done` only for ready states (SUCCESS, FAILURE,
    /// REVOKED); STARTED, PROGRESS and RETRY carry `null`.
    #[test]
    fn only_ready_states_carry_a_date_done() {
        let t = DateTime::from_timestamp(1_795_369_062, 0).unwrap();
        let started = meta("id", Status::Started, &Outcome::Success(json!({"pid": 7, "hostname": "celer@h"})), t);
        assert_eq!(
            started,
            r#"{"status": "STARTED", "result": {"hostname": "celer@h", "pid": 7}, "traceback": null, "children": [], "date_done": null, "task_id": "id"}"#
        );
        let retry = meta("id", Status::Retry, &Outcome::Failure(Exception::new("E", "m", "x"), None), t);
        assert!(retry.contains(r#""date_done": null"#), "{retry}");
        let done = meta("id", Status::Success, &Outcome::Success(json!(1)), t);
        assert!(done.contains(r#""date_done": "2026-11-22T17:37:42+00:00""#), "{done}");
    }

    #[test]
    fn strings_and_numbers_are_written_as_python_does() {
        let mut s = String::new();
        py_json(&mut s, &json!({"a": "é\u{1F600}\"\\\n\u{1}", "b": [1, 2.5, 1e21, -0.0001], "c": null}));
        assert_eq!(s, r#"{"a": "\u00e9\ud83d\ude00\"\\\n\u0001", "b": [1, 2.5, 1e+21, -0.0001], "c": null}"#);
        assert_eq!(iso(time("2026-11-22T17:37:45Z")), "2026-11-22T17:37:45+00:00");
    }
}

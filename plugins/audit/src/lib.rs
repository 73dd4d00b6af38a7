//! `audit`: the authentication audit log, written off the request path (the
//! seeds' `log_auth_event_task`).
//!
//! `audit.log_auth_event(user_id, event_type, ip_address, user_agent,
//! device_info, success, details)` inserts one `auth_audit_log` row. The
//! arguments come positionally from Celery in exactly that order.
//!
//! * A `user_id` that names no user is not an error: the line is still
//!   recorded (the attempt is what an audit log is for), with `user_id` NULL
//!   and `skipped_reason = 'unknown user <id>'`, and the job succeeds with
//!   `skipped` in its result.
//! * A redelivered job does not log twice: the row carries the job id
//!   (unique), and the insert is `ON CONFLICT (job_id) DO NOTHING`.

use celer_plugin::database::{self, Value as Db};
use celer_plugin::{Context, TaskError, time};
use serde::{Deserialize, Serialize};
use serde_json::Value;

celer_plugin::plugin! {
    name: "audit",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "audit.log_auth_event" => log_auth_event,
    }
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct AuthEvent {
    pub user_id: Option<i64>,
    pub event_type: String,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    /// Any JSON (an object from Django, or a string).
    pub device_info: Option<Value>,
    pub success: Option<bool>,
    pub details: Option<Value>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Logged {
    /// Whether this job inserted the row (false: a redelivery, already logged).
    pub recorded: bool,
    pub user_id: Option<i64>,
    pub event_type: String,
    /// Set when the user is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

pub const INSERT: &str = "INSERT INTO auth_audit_log \
     (user_id, event_type, ip_address, user_agent, device_info, success, details, skipped_reason, job_id, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (job_id) DO NOTHING";

/// The limits of what is stored, so that a hostile client cannot grow the
/// log without bound through its user agent.
pub const MAX_TEXT: usize = 1024;

/// Whether the event names a user that exists: `(user_id to store, skipped reason)`.
pub fn resolve_user(requested: Option<i64>, exists: bool) -> (Option<i64>, Option<String>) {
    match requested {
        None => (None, None),
        Some(id) if exists => (Some(id), None),
        Some(id) => (None, Some(format!("unknown user {id}"))),
    }
}

/// The INSERT's parameters, `$1`…`$10`.
pub fn insert_params(event: &AuthEvent, user_id: Option<i64>, skipped: Option<&str>, job_id: &str, now: i64) -> Vec<Db> {
    let json = |v: &Option<Value>| Db::Json(v.as_ref().filter(|v| !v.is_null()).unwrap_or(&Value::Object(Default::default())).to_string());
    vec![
        user_id.into(),
        Db::Text(clip(&event.event_type)),
        event.ip_address.as_deref().map(clip).into(),
        Db::Text(event.user_agent.as_deref().map(clip).unwrap_or_default()),
        json(&event.device_info),
        Db::Boolean(event.success.unwrap_or(true)),
        json(&event.details),
        skipped.map(str::to_owned).into(),
        Db::Text(job_id.to_owned()),
        Db::Timestamp(now),
    ]
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn log_auth_event(ctx: &Context, event: AuthEvent) -> Result<Logged, TaskError> {
    if event.event_type.trim().is_empty() {
        return Err(TaskError::fail("event_type is empty"));
    }
    let exists = match event.user_id {
        Some(id) => !database::query_all("SELECT id FROM users WHERE id = $1", &[Db::Int(id)])?.is_empty(),
        None => false,
    };
    let (user_id, skipped) = resolve_user(event.user_id, exists);
    if let Some(reason) = &skipped {
        ctx.warn(format!("audit.log_auth_event: {reason}; recorded without a user"));
    }
    let params = insert_params(&event, user_id, skipped.as_deref(), ctx.job_id(), time::now_micros());
    let inserted = database::execute(INSERT, &params)?;
    Ok(Logged { recorded: inserted > 0, user_id, event_type: event.event_type, skipped })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn celery_positional_arguments_map_in_order() {
        let e: AuthEvent = celer_plugin::args::decode(
            r#"[7, "login", "192.0.2.1", "curl/8", {"os": "Linux"}, false, {"method": "password"}]"#,
            "{}",
        )
        .unwrap();
        assert_eq!(e.user_id, Some(7));
        assert_eq!(e.event_type, "login");
        assert_eq!(e.success, Some(false));
        assert_eq!(e.device_info, Some(json!({"os": "Linux"})));
        let e: AuthEvent = celer_plugin::args::decode(r#"[null, "login_failed"]"#, r#"{"ip_address": "::1"}"#).unwrap();
        assert_eq!((e.user_id, e.ip_address.as_deref()), (None, Some("::1")));
    }

    #[test]
    fn an_unknown_user_is_skipped_not_failed() {
        assert_eq!(resolve_user(Some(7), true), (Some(7), None));
        assert_eq!(resolve_user(Some(7), false), (None, Some("unknown user 7".into())));
        assert_eq!(resolve_user(None, false), (None, None));
    }

    #[test]
    fn parameters_are_bound_in_column_order_and_bounded() {
        let e = AuthEvent {
            user_id: Some(1),
            event_type: "login".into(),
            ip_address: None,
            user_agent: Some("x".repeat(5000)),
            device_info: Some(json!("iPhone")),
            success: None,
            details: None,
        };
        let p = insert_params(&e, Some(1), None, "job-1", 42);
        assert_eq!(p.len(), 10);
        assert_eq!(p[0], Db::Int(1));
        assert_eq!(p[2], Db::Null);
        assert!(matches!(&p[3], Db::Text(s) if s.len() == MAX_TEXT));
        assert_eq!(p[4], Db::Json("\"iPhone\"".into()));
        assert_eq!(p[5], Db::Boolean(true), "success defaults to true");
        assert_eq!(p[6], Db::Json("{}".into()));
        assert_eq!((p[7].clone(), p[8].clone(), p[9].clone()), (Db::Null, Db::Text("job-1".into()), Db::Timestamp(42)));
        assert_eq!(clip("ééé"), "ééé");
        assert!(INSERT.contains("$10") && !INSERT.contains("$11"));
    }
}

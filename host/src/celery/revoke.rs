//! `AsyncResult.revoke()` and `app.control.revoke(ids)` from a Django app.
//! Celery broadcasts the request on its `celery.pidbox` fanout exchange,
//! which kombu's Redis transport turns into a PUBLISH on the channel
//! `<key prefix>/<db>.celery.pidbox` (captured in
//! `shared/fixtures/celery-protocol/pidbox-broadcast-hello.json`). celer
//! listens on it as a Celery worker does ([`super::control`]), and for a
//! revoke does what a worker does:
//!
//! - the id is remembered for [`REMEMBER`] (Celery's `REVOKE_EXPIRES`), so a
//!   message that arrives later for it is not run but reads REVOKED;
//! - a job not started yet is cancelled and reads REVOKED at once;
//! - a running job is stopped only when the request says `terminate=True`
//!   (then it ends `cancelled` and reads REVOKED); otherwise it finishes,
//!   as it would under Celery.
//!
//! Broadcasts are not stored: a revoke sent while no host listens is lost,
//! as with Celery workers that run without `--statedb`.

use std::time::Duration;

use super::Ctx;
use super::control::Request;
use crate::broker::CancelOutcome;
use crate::broker::redis::conn::Conn;
use crate::job::JobState;

/// How long a revoked id is remembered (Celery's default, 3 hours).
const REMEMBER: Duration = Duration::from_secs(3 * 3600);

/// One revoke request.
#[derive(Debug, Clone, PartialEq)]
pub struct Revoke {
    pub task_ids: Vec<String>,
    pub terminate: bool,
}

impl Revoke {
    /// The revoke in a control request; `None` for other commands.
    pub fn of(request: &Request) -> Option<Revoke> {
        if request.method != "revoke" {
            return None;
        }
        let task_ids = match request.arguments.get("task_id")? {
            serde_json::Value::String(id) => vec![id.clone()],
            serde_json::Value::Array(ids) => ids.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            _ => return None,
        };
        // Celery tests `if terminate:`, and Flower sends `1`: any truthy value.
        let terminate = match request.arguments.get("terminate") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|n| n != 0.0),
            Some(serde_json::Value::String(s)) => !s.is_empty(),
            _ => false,
        };
        Some(Revoke { task_ids, terminate })
    }
}

/// The Celery task ids revoked lately (`<prefix>celery:revoked:<id>`), as
/// the consumer and the result-writing broker both check them.
#[derive(Clone)]
pub struct Revocations {
    conn: Conn,
    prefix: String,
}

impl Revocations {
    /// Revoked ids live under celer's prefix, shared by every host on that Redis.
    pub fn new(conn: Conn, prefix: String) -> Self {
        Revocations { conn, prefix }
    }

    pub(super) fn key(&self, celery_id: &str) -> String {
        format!("{}celery:revoked:{celery_id}", self.prefix)
    }

    /// Whether a revoke for this Celery task id was heard lately.
    pub async fn contains(&self, celery_id: &str) -> Result<bool, String> {
        let mut c = self.conn.clone();
        ::redis::cmd("EXISTS").arg(self.key(celery_id)).query_async(&mut c).await.map_err(|e| e.to_string())
    }

    async fn remember(&self, revoke: &Revoke) -> Result<(), String> {
        let mut c = self.conn.clone();
        let mut pipe = ::redis::pipe();
        for id in &revoke.task_ids {
            pipe.cmd("SET").arg(self.key(id)).arg(u8::from(revoke.terminate)).arg("EX").arg(REMEMBER.as_secs()).ignore();
        }
        pipe.query_async::<()>(&mut c).await.map_err(|e| e.to_string())
    }
}

impl Ctx {
    /// celer's job id for a Celery task id, written when its message is taken.
    pub(super) fn job_of(&self, celery_id: &str) -> String {
        format!("{}celery:job:{celery_id}", self.prefix)
    }


    /// Cancels the job of a revoked task if it has not started (or, with
    /// `terminate`, stops it); a job that already ended is left as it is.
    pub(super) async fn revoke_job(&self, celery_id: &str, job_id: &str, terminate: bool) -> Result<(), String> {
        let state = self.broker.status(job_id).await.map_err(|e| e.to_string())?.map(|s| s.state);
        match state {
            Some(JobState::Running) if !terminate => {
                tracing::info!(task_id = %celery_id, job_id, "Celery task revoked while running: it finishes (no terminate=True)");
                Ok(())
            }
            Some(s) if !s.is_terminal() => match self.broker.cancel(job_id).await.map_err(|e| e.to_string())? {
                CancelOutcome::Cancelled => {
                    tracing::info!(task_id = %celery_id, job_id, "Celery task revoked: its job is cancelled");
                    self.end_revoked(celery_id, "revoked").await
                }
                // Its worker stops it and writes REVOKED when it ends.
                CancelOutcome::StopRequested => {
                    tracing::info!(task_id = %celery_id, job_id, "Celery task revoked with terminate=True: stopping its job");
                    Ok(())
                }
                CancelOutcome::AlreadyFinished | CancelOutcome::NotFound => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Remembers every id first (one failing id must not cost the others
    /// their revoke: broadcasts are not stored), then ends the jobs.
    pub(super) async fn apply(&self, revoke: &Revoke) -> Result<(), String> {
        self.revocations.remember(revoke).await?;
        let mut c = self.conn.clone();
        for id in &revoke.task_ids {
            let job: Result<Option<String>, _> = ::redis::cmd("GET").arg(self.job_of(id)).query_async(&mut c).await;
            let done = match job {
                Ok(Some(job_id)) => self.revoke_job(id, &job_id, revoke.terminate).await,
                Ok(None) => {
                    tracing::info!(task_id = %id, "Celery task revoked before its message arrived: it will not run");
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = done {
                tracing::warn!(task_id = %id, error = %e, "Celery revoke: the id is remembered, but its job could not be ended now");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    /// A broadcast shaped like the captured `hello` one, carrying `body`.
    fn broadcast(body: serde_json::Value) -> Vec<u8> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(body.to_string());
        serde_json::json!({
            "body": encoded, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"clock": 1, "expires": 1795369060.725446},
            "properties": {"delivery_mode": 2, "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
                           "priority": 0, "body_encoding": "base64", "delivery_tag": "t"}
        })
        .to_string()
        .into_bytes()
    }

    fn parse(payload: &[u8]) -> Option<Revoke> {
        Request::parse(payload).as_ref().filter(|r| r.is_for("celer@h")).and_then(Revoke::of)
    }

    #[test]
    fn revoke_requests_are_read_and_nothing_else_is() {
        let one = broadcast(serde_json::json!({"method": "revoke", "arguments": {"task_id": "a", "terminate": false, "signal": "SIGTERM"},
            "destination": null, "pattern": null, "matcher": null, "ticket": "x"}));
        assert_eq!(parse(&one), Some(Revoke { task_ids: vec!["a".into()], terminate: false }));
        let many = broadcast(serde_json::json!({"method": "revoke", "arguments": {"task_id": ["a", "b"], "terminate": true}}));
        assert_eq!(parse(&many), Some(Revoke { task_ids: vec!["a".into(), "b".into()], terminate: true }));
        // Flower's "terminate" button sends 1 (its strtobool), not true.
        let flower = broadcast(serde_json::json!({"method": "revoke", "arguments": {"task_id": "a", "terminate": 1, "signal": "SIGTERM"}}));
        assert_eq!(parse(&flower).map(|r| r.terminate), Some(true));
        let zero = broadcast(serde_json::json!({"method": "revoke", "arguments": {"task_id": "a", "terminate": 0}}));
        assert_eq!(parse(&zero).map(|r| r.terminate), Some(false));
        // The captured mingle `hello`, a request for named workers, and junk: ignored.
        let hello = crate::celery::fixture("pidbox-broadcast-hello.json");
        assert_eq!(parse(&hello), None);
        let targeted = broadcast(serde_json::json!({"method": "revoke", "arguments": {"task_id": "a"}, "destination": ["w1@host"]}));
        assert_eq!(parse(&targeted), None);
        let ours = broadcast(serde_json::json!({"method": "revoke", "arguments": {"task_id": "a"}, "destination": ["w1@host", "celer@h"]}));
        assert_eq!(parse(&ours).map(|r| r.task_ids), Some(vec!["a".to_string()]));
        assert_eq!(parse(b"not json"), None);
    }

}

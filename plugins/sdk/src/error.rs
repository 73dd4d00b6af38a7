//! How a task fails, in the author's terms.
//!
//! The WIT `task-error` is a wire type (`retry-request` with milliseconds);
//! [`TaskError`] is what a task returns: a [`Duration`], constructors that read
//! well at the call site, and a `From<HostError>` so that `?` on a capability
//! call does the usual right thing (retry when the backend is away, fail when
//! retrying cannot help).

use core::fmt;
use std::time::Duration;

use crate::bindings::celer::plugin::types::{
    HostError, RetryRequest, TaskError as WitTaskError,
};

/// Why a task did not succeed, and whether the host should try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// A transient failure: the host runs the job again (after `after`, or
    /// with exponential backoff and jitter when `None`) while the job has
    /// retries left, then dead-letters it.
    Retry {
        /// Recorded in the job's status and log.
        reason: String,
        /// The earliest the job should run again.
        after: Option<Duration>,
    },
    /// A permanent failure: the job fails and is dead-lettered at once.
    Fail(String),
}

impl TaskError {
    /// A permanent failure, e.g. bad input or a state that retrying cannot fix.
    pub fn fail(message: impl Into<String>) -> Self {
        Self::Fail(message.into())
    }

    /// A transient failure; the host chooses the delay (backoff with jitter).
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry { reason: reason.into(), after: None }
    }

    /// A transient failure that should not be retried before `after`, e.g.
    /// when a remote service said when it will be back.
    pub fn retry_after(reason: impl Into<String>, after: Duration) -> Self {
        Self::Retry { reason: reason.into(), after: Some(after) }
    }

    /// The human-readable message, whichever the kind.
    pub fn message(&self) -> &str {
        match self {
            Self::Retry { reason, .. } => reason,
            Self::Fail(message) => message,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry { reason, after: Some(after) } => {
                write!(f, "retry after {} ms: {reason}", after.as_millis())
            }
            Self::Retry { reason, after: None } => write!(f, "retry: {reason}"),
            Self::Fail(message) => write!(f, "fail: {message}"),
        }
    }
}

impl std::error::Error for TaskError {}

impl HostError {
    /// The error's kind as the WIT contract names it (`denied`,
    /// `unavailable`, `invalid`, `budget-exceeded`) and its message: for a
    /// plugin that reports a host error as data instead of failing.
    pub fn kind_and_message(&self) -> (&'static str, &str) {
        match self {
            HostError::Denied(m) => ("denied", m),
            HostError::Unavailable(m) => ("unavailable", m),
            HostError::Invalid(m) => ("invalid", m),
            HostError::BudgetExceeded(m) => ("budget-exceeded", m),
        }
    }
}

/// `?` on a capability call: an unreachable backend is worth a retry; a
/// denial, a wrong request or a spent budget will fail the same way next time.
/// The message keeps the kind (`"denied: …"`) so that the job's status says
/// what happened without the author writing it out.
impl From<HostError> for TaskError {
    fn from(error: HostError) -> Self {
        let (kind, message) = error.kind_and_message();
        let text = format!("{kind}: {message}");
        match error {
            HostError::Unavailable(_) => Self::retry(text),
            _ => Self::fail(text),
        }
    }
}

/// The wire form the host receives from `run`.
impl From<TaskError> for WitTaskError {
    fn from(error: TaskError) -> Self {
        match error {
            TaskError::Retry { reason, after } => WitTaskError::Retry(RetryRequest {
                reason,
                // A delay beyond u64 milliseconds (584 million years) saturates.
                after_ms: after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }),
            TaskError::Fail(message) => WitTaskError::Fail(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_errors_map_to_retry_or_fail_with_their_kind() {
        assert_eq!(
            TaskError::from(HostError::Unavailable("redis down".into())),
            TaskError::retry("unavailable: redis down")
        );
        assert_eq!(
            TaskError::from(HostError::Denied("cache key `x`".into())),
            TaskError::fail("denied: cache key `x`")
        );
        assert_eq!(
            TaskError::from(HostError::Invalid("bad sql".into())),
            TaskError::fail("invalid: bad sql")
        );
        assert_eq!(
            TaskError::from(HostError::BudgetExceeded("rows".into())),
            TaskError::fail("budget-exceeded: rows")
        );
    }

    #[test]
    fn wire_form_carries_milliseconds() {
        let wire: WitTaskError = TaskError::retry_after("later", Duration::from_secs(2)).into();
        assert_eq!(
            wire,
            WitTaskError::Retry(RetryRequest { reason: "later".into(), after_ms: Some(2000) })
        );
        let wire: WitTaskError = TaskError::retry("soon").into();
        assert_eq!(
            wire,
            WitTaskError::Retry(RetryRequest { reason: "soon".into(), after_ms: None })
        );
        let wire: WitTaskError = TaskError::retry_after("never", Duration::MAX).into();
        assert!(matches!(wire, WitTaskError::Retry(RetryRequest { after_ms: Some(u64::MAX), .. })));
        let wire: WitTaskError = TaskError::fail("no").into();
        assert_eq!(wire, WitTaskError::Fail("no".into()));
    }
}

//! `celer:plugin/jobs`: follow-up jobs, limited to the task names in
//! `grants.enqueue`. The new job's `parent_id` is the calling job and its
//! `root_id` the calling job's workflow root, so a chain of jobs can be
//! followed in their status (as Celery's `parent_id` / `root_id`).

use std::sync::Arc;

use serde_json::Value;

use super::{GrantError, JobInfo, Record};
use crate::broker::Broker;
use crate::job::NewJob;
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::jobs::{EnqueueOptions, Host};
use crate::runtime::manifest::Grants;

/// Enqueue grants are task names; an empty name cannot be meant.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    match grants.enqueue.iter().find(|t| t.trim().is_empty()) {
        Some(_) => Err(GrantError { grant: "enqueue", reason: "an empty task name".into() }),
        None => Ok(()),
    }
}

/// Per-job state of the jobs interface.
pub struct JobsCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    broker: Arc<dyn Broker>,
    pub(super) record: Record,
}

impl JobsCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, broker: Arc<dyn Broker>) -> Self {
        JobsCap { info, grants, broker, record: Record::default() }
    }
}

fn parse_json(what: &str, text: &str) -> Result<Value, HostError> {
    serde_json::from_str(text).map_err(|e| HostError::Invalid(format!("{what} is not valid JSON: {e}")))
}

impl Host for JobsCap {
    async fn enqueue(
        &mut self,
        task: String,
        args: String,
        kwargs: String,
        options: EnqueueOptions,
    ) -> Result<String, HostError> {
        if !self.grants.enqueue.iter().any(|t| *t == task) {
            return Err(self.record.deny(&self.info, "enqueue", format!("task {task}")));
        }
        let mut job = NewJob::new(task.clone(), parse_json("args", &args)?, parse_json("kwargs", &kwargs)?);
        job.parent_id = Some(self.info.job_id.clone());
        job.root_id = Some(self.info.root_id.clone());
        if let Some(q) = options.queue {
            job.queue = q;
        }
        if let Some(ms) = options.delay_ms {
            let at = crate::job::from_now(std::time::Duration::from_millis(ms));
            job.eta = Some(at.ok_or_else(|| HostError::Invalid(format!("delay-ms {ms} is too far in the future")))?);
        }
        if let Some(n) = options.max_retries {
            job.max_retries = n;
        }
        if let Some(p) = options.priority {
            job.priority = p;
        }
        job.idempotency_key = options.idempotency_key;
        job.validate().map_err(HostError::Invalid)?;
        let enqueued = self.broker.enqueue(job).await.map_err(|e| match e {
            crate::broker::BrokerError::Invalid(m) => HostError::Invalid(m),
            other => HostError::Unavailable(other.to_string()),
        })?;
        self.record.used(serde_json::json!({"task": task, "id": enqueued.id}));
        Ok(enqueued.id)
    }
}

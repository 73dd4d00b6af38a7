//! What the benchmarks that run jobs straight in the sandbox (no broker)
//! share: the job they run and the median of their rounds. Each benchmark
//! is its own crate and uses a part of this.
#![allow(dead_code)]

use celer::job::Job;
use serde_json::{Value, json};

/// A first attempt of `task` with keyword arguments `kwargs` and no
/// retries; `timeout_ms` overrides the manifest's limit.
pub fn job(task: &str, kwargs: Value, timeout_ms: Option<u64>) -> Job {
    Job {
        id: "bench".into(),
        task: task.into(),
        args: json!([]),
        kwargs,
        queue: "default".into(),
        priority: 0,
        attempt: 0,
        max_retries: 0,
        eta: None,
        expires_at: None,
        timeout_ms,
        idempotency_key: None,
        parent_id: None,
        root_id: None,
        enqueued_at: chrono::Utc::now(),
    }
}

/// The median of the rounds' figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

//! What this host is doing as a Celery worker: the Celery tasks it runs
//! now and how many of each it has finished. The result-writing broker
//! keeps it; worker heartbeats, `inspect active` / `stats` / `query_task`
//! and Flower's worker page read it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::result::{py_args_repr, py_repr};

/// A Celery task running on this host.
#[derive(Debug, Clone)]
pub struct Running {
    pub celery_id: String,
    /// The task name as the producer sent it.
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    pub queue: String,
    pub started: SystemTime,
}

impl Running {
    /// The task as `inspect active` describes it (Celery's `Request.info()`);
    /// `safe` (what Flower asks for) gives args and kwargs as text: the
    /// producer's own (`shown`: its `argsrepr` and `kwargsrepr`, which may
    /// mask secrets), else Python reprs.
    pub fn info(&self, hostname: &str, safe: bool, shown: (Option<String>, Option<String>)) -> Value {
        let (args, kwargs) = if safe {
            let (a, k) = shown;
            (
                Value::String(a.unwrap_or_else(|| py_args_repr(&self.args))),
                Value::String(k.unwrap_or_else(|| py_repr(&self.kwargs))),
            )
        } else {
            (self.args.clone(), self.kwargs.clone())
        };
        let started = self.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        json!({
            "id": self.celery_id, "name": self.task, "args": args, "kwargs": kwargs, "type": self.task,
            "hostname": hostname, "time_start": started, "acknowledged": true,
            "delivery_info": {"exchange": "", "routing_key": self.queue, "priority": 0, "redelivered": false},
            "worker_pid": std::process::id(),
        })
    }
}

/// The Celery tasks of this host, running and finished.
#[derive(Debug, Default)]
pub struct Activity {
    /// By lease token (one job can be leased twice when a lease lapsed and
    /// this host took it back).
    running: Mutex<HashMap<String, Running>>,
    /// Finished tasks per task name, since the host started.
    finished: Mutex<BTreeMap<String, u64>>,
}

impl Activity {
    /// Records tasks just leased (by lease token), under one lock.
    pub fn start_all(&self, tasks: impl IntoIterator<Item = (String, Running)>) {
        if let Ok(mut m) = self.running.lock() {
            m.extend(tasks);
        }
    }

    /// The Celery task id leased under `token`, if it is a Celery task.
    pub fn celery_id(&self, token: &str) -> Option<String> {
        self.running.lock().ok().and_then(|m| m.get(token).map(|r| r.celery_id.clone()))
    }

    /// Forgets the task leased under `token` (its run ended or was handed back).
    pub fn take(&self, token: &str) -> Option<Running> {
        self.running.lock().ok().and_then(|mut m| m.remove(token))
    }

    /// Counts a task whose outcome was recorded.
    pub fn finished(&self, task: &str) {
        if let Ok(mut m) = self.finished.lock() {
            *m.entry(task.to_string()).or_default() += 1;
        }
    }

    /// For `inspect active` and `query_task`: a snapshot, so no lock is held while
    /// replying.
    pub fn running(&self) -> Vec<Running> {
        self.running.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// For the worker heartbeat's `active`, without copying the tasks.
    pub fn running_count(&self) -> usize {
        self.running.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// For `inspect stats` (`total`), as Flower's worker page shows it.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.finished.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// For the worker heartbeat's `processed`, which Flower charts.
    pub fn processed(&self) -> u64 {
        self.finished.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
}

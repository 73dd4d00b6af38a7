//! One job, one fresh instance. A `Store` is built per job holding only that
//! plugin's grants; its memory is capped by a [`ResourceLimiter`], its time
//! by the epoch deadline, and whatever the guest does — loop, allocate
//! without bound, panic, trap — ends in a classified [`RunOutcome`] while
//! the host goes on serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::Runtime;
use super::bindings::{PluginInfo, TaskError, WitJob};
use super::guest_output::GuestOutput;
use super::plugin::LoadedPlugin;
use crate::capabilities::log::JobLog;
use crate::capabilities::{HasCaps, JobCaps, JobInfo};
use crate::job::{ErrorKind, Job, JobError, Progress};

/// Why the worker stopped a running job from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Someone cancelled it.
    Cancelled,
    /// Another worker owns it now: write nothing.
    LeaseLost,
    /// The host is shutting down: hand the lease back.
    Shutdown,
}

/// The worker's handle on a running job: stop it, follow its progress.
#[derive(Debug)]
pub struct JobControl {
    stop: AtomicU8,
    progress: Arc<watch::Sender<Option<Progress>>>,
}

impl Default for JobControl {
    fn default() -> Self {
        JobControl { stop: AtomicU8::new(0), progress: Arc::new(watch::Sender::new(None)) }
    }
}

impl JobControl {
    /// Asks the guest to stop at its next epoch tick (≤ 10 ms). The first
    /// reason given wins.
    pub fn stop(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Cancelled => 1,
            StopReason::LeaseLost => 2,
            StopReason::Shutdown => 3,
        };
        let _ = self.stop.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The reason given to [`JobControl::stop`], if any.
    pub fn stopped(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::LeaseLost),
            3 => Some(StopReason::Shutdown),
            _ => None,
        }
    }

    /// Progress reports of the running job.
    pub fn progress(&self) -> watch::Receiver<Option<Progress>> {
        self.progress.subscribe()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// The plugin's JSON result.
    Succeeded(Value),
    /// Failed; `retryable` says whether another attempt may help and
    /// `retry_after` is the plugin's own wish for the delay.
    Failed { error: JobError, retryable: bool, retry_after: Option<Duration> },
    /// Stopped by the worker.
    Stopped(StopReason),
}

/// A finished run: its outcome plus what the job touched and printed.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: RunOutcome,
    pub touched: Option<Value>,
    pub log: Option<String>,
    pub progress: Option<Progress>,
}

/// What a job's `Store` holds.
pub struct JobCtx {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    caps: JobCaps,
    control: Arc<JobControl>,
    deadline: Instant,
    timed_out: bool,
}

impl WasiView for JobCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl HasCaps for JobCtx {
    fn caps(&mut self) -> &mut JobCaps {
        &mut self.caps
    }
}

/// Caps linear memory at the plugin's `limits.memory_mb` and remembers
/// that it did, so that running out of memory is reported as
/// `memory-limit`, not confused with a guest panic.
struct MemoryLimiter {
    max_bytes: usize,
    exceeded: bool,
}

/// Tables hold function references; no sane plugin needs more.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            wasmtime::bail!(
                "memory limit of {} MiB reached (the plugin asked for {} MiB)",
                self.max_bytes >> 20,
                desired.div_ceil(1 << 20)
            );
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The answer of `describe()` at load time must come quickly.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Runtime {
    /// A fresh store for one call into `plugin`.
    fn new_store(&self, plugin: &LoadedPlugin, info: Arc<JobInfo>, control: Arc<JobControl>, log: &JobLog, timeout: Duration) -> Store<JobCtx> {
        // No preopened directories, no environment, no arguments, no sockets:
        // the only ways out are the celer capabilities below.
        let wasi = WasiCtxBuilder::new()
            .stdout(GuestOutput::new(log.clone()))
            .stderr(GuestOutput::new(log.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let caps = self.capabilities.for_job(info, &plugin.grants, log.clone(), control.progress.clone());
        let ctx = JobCtx {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter { max_bytes: plugin.limits.memory_bytes, exceeded: false },
            caps,
            control,
            deadline: Instant::now() + timeout,
            timed_out: false,
        };
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|ctx| &mut ctx.limiter);
        store.set_epoch_deadline(1);
        // Every tick: stop when asked or past the deadline; otherwise yield
        // to the scheduler so that a busy guest cannot starve lease renewals.
        store.epoch_deadline_callback(|mut cx| {
            let ctx = cx.data_mut();
            if ctx.control.stopped().is_some() {
                return Ok(UpdateDeadline::Interrupt);
            }
            if Instant::now() >= ctx.deadline {
                ctx.timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }

    /// Calls `describe()` in a fresh instance (at load, to check the plugin
    /// against its manifest).
    pub(crate) async fn describe(&self, plugin: &LoadedPlugin) -> Result<PluginInfo, String> {
        let info = Arc::new(JobInfo { job_id: "-".into(), root_id: "-".into(), task: "describe".into(), plugin: plugin.name.clone(), attempt: 0 });
        let log = JobLog::new(self.sandbox.log_cap_bytes);
        let mut store = self.new_store(plugin, info, Arc::default(), &log, DESCRIBE_TIMEOUT);
        let call = async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            instance.call_describe(&mut store).await
        };
        match tokio::time::timeout(DESCRIBE_TIMEOUT + Duration::from_secs(1), call).await {
            Ok(Ok(info)) => Ok(info),
            Ok(Err(e)) => Err(classify(&e, store.data(), &log).message),
            Err(_) => Err(format!("describe() did not return within {DESCRIBE_TIMEOUT:?}")),
        }
    }

    /// Runs one job of `plugin` in a fresh instance.
    pub async fn run_job(&self, plugin: &LoadedPlugin, job: &Job, control: Arc<JobControl>) -> RunReport {
        let timeout = Duration::from_millis(job.timeout_ms.unwrap_or(plugin.limits.timeout_ms));
        let info = Arc::new(JobInfo {
            job_id: job.id.clone(),
            root_id: job.workflow_root().to_string(),
            task: job.task.clone(),
            plugin: plugin.name.clone(),
            attempt: job.attempt,
        });
        let log = JobLog::new(self.sandbox.log_cap_bytes);
        let mut store = self.new_store(plugin, info, control.clone(), &log, timeout);
        let wit_job = WitJob {
            id: job.id.clone(),
            task: plugin.canonical_task(&job.task).to_string(),
            args: job.args.as_str().to_string(),
            kwargs: job.kwargs.as_str().to_string(),
            attempt: job.attempt,
            max_retries: job.max_retries,
            queue: job.queue.clone(),
            parent_id: job.parent_id.clone(),
            config: plugin.config_json.clone(),
        };
        let call = async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            instance.call_run(&mut store, &wit_job).await
        };
        // The epoch deadline stops guest code; this also bounds time spent
        // inside host calls (a hung backend), with a little slack.
        let result = tokio::time::timeout(timeout + Duration::from_secs(1), call).await;
        let outcome = match result {
            Err(_) => RunOutcome::Failed {
                error: JobError::new(ErrorKind::Timeout, format!("timed out after {} ms", timeout.as_millis())),
                retryable: true,
                retry_after: None,
            },
            Ok(Ok(Ok(json))) => RunOutcome::Succeeded(
                serde_json::from_str(&json).unwrap_or(Value::String(json)),
            ),
            Ok(Ok(Err(task_error))) => task_failure(task_error),
            Ok(Err(e)) => match store.data().control.stopped() {
                Some(reason) => RunOutcome::Stopped(reason),
                None => {
                    let error = classify(&e, store.data(), &log);
                    RunOutcome::Failed { retryable: error.kind.is_retryable(), error, retry_after: None }
                }
            },
        };
        let touched = store.data().caps.touched();
        let progress = *control.progress.borrow();
        RunReport { outcome, touched, log: log.contents(), progress }
    }
}

/// The text a plugin's `fail` starts with when its arguments did not fit;
/// the SDK writes it.
const INVALID_ARGS_PREFIX: &str = "invalid arguments:";

/// The SDK turns a host error it cannot handle into a task error whose text
/// starts with the host error's kind; the job's error keeps that kind, so an
/// operator sees `unavailable` or `denied` rather than a generic failure.
fn task_failure(e: TaskError) -> RunOutcome {
    match e {
        TaskError::Retry(r) => {
            let kind = if r.reason.starts_with("unavailable:") { ErrorKind::Unavailable } else { ErrorKind::Plugin };
            RunOutcome::Failed { error: JobError::new(kind, r.reason), retryable: true, retry_after: r.after_ms.map(Duration::from_millis) }
        }
        TaskError::Fail(message) => {
            let kind = if message.starts_with(INVALID_ARGS_PREFIX) {
                ErrorKind::InvalidArgs
            } else if message.starts_with("denied:") {
                ErrorKind::Denied
            } else {
                ErrorKind::Plugin
            };
            RunOutcome::Failed { error: JobError::new(kind, message), retryable: false, retry_after: None }
        }
    }
}

/// Names what stopped a guest: the deadline, the memory cap, or a trap
/// (with the guest's panic message when it printed one).
fn classify(e: &wasmtime::Error, ctx: &JobCtx, log: &JobLog) -> JobError {
    if ctx.timed_out {
        return JobError::new(ErrorKind::Timeout, "stopped at its deadline (limits.timeout_s or the job's timeout_ms)");
    }
    if ctx.limiter.exceeded {
        return JobError::new(ErrorKind::MemoryLimit, format!("memory limit of {} MiB reached", ctx.limiter.max_bytes >> 20));
    }
    let trap = e.downcast_ref::<wasmtime::Trap>().map(|t| t.to_string());
    let root = e.root_cause().to_string();
    let what = trap.unwrap_or(root);
    let message = match log.panic_message() {
        Some(panic) => format!("{panic} ({what})"),
        None => what,
    };
    JobError::new(ErrorKind::Trap, message)
}

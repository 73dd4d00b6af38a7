//! `celer enqueue`, `celer status`, `celer cancel`: the producer's side.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;

use celer::config::Config;
use celer::job::{JobState, NewJob};
use celer::runtime::manifest::Manifest;

use super::{CliError, open_broker, print_json};

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Task name (or an alias from a manifest).
    task: String,
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    kwargs: String,
    #[arg(long, default_value = celer::job::DEFAULT_QUEUE)]
    queue: String,
    /// Run no sooner than this from now (e.g. 30s, 5m).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "eta")]
    delay: Option<Duration>,
    /// Run no sooner than this instant (RFC 3339).
    #[arg(long)]
    eta: Option<DateTime<Utc>>,
    /// Expire (never run) if not started within this time.
    #[arg(long, value_parser = humantime::parse_duration)]
    expires: Option<Duration>,
    #[arg(long, default_value_t = 0)]
    priority: i32,
    #[arg(long, default_value_t = celer::job::DEFAULT_MAX_RETRIES)]
    max_retries: u32,
    /// Overrides the plugin's time limit for this job.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// A second enqueue with the same key returns the first job's id.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Enqueue even if no plugin in the plugins directory declares the task.
    #[arg(long)]
    no_check: bool,
    /// Wait for the job to finish and print its status; exit 1 unless it succeeded.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", requires = "wait")]
    timeout: Duration,
}

fn parse_json(flag: &str, text: &str) -> Result<Value, CliError> {
    serde_json::from_str(text).map_err(|e| CliError::Usage(format!("--{flag} is not valid JSON: {e}")))
}

/// Whether some manifest in the plugins directory declares `task`.
fn task_is_known(config: &Config, task: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(&config.plugins.dir) else { return false };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .filter_map(|e| Manifest::load(&e.path()).ok())
        .any(|m| m.plugin.tasks.iter().any(|t| t == task) || m.plugin.aliases.contains_key(task))
}

/// `celer enqueue`: checks the task against the manifests first, so a typo fails here, not
/// in the dead letters.
pub async fn enqueue(config: &Config, a: EnqueueArgs) -> Result<ExitCode, CliError> {
    let mut job = NewJob::new(a.task.clone(), parse_json("args", &a.args)?, parse_json("kwargs", &a.kwargs)?);
    job.queue = a.queue;
    job.priority = a.priority;
    job.max_retries = a.max_retries;
    job.timeout_ms = a.timeout_ms;
    job.idempotency_key = a.idempotency_key;
    job.eta = match (a.delay, a.eta) {
        (Some(d), _) => Some(celer::job::from_now(d).ok_or_else(|| CliError::Usage("--delay is too far in the future".into()))?),
        (None, eta) => eta,
    };
    if let Some(d) = a.expires {
        job.expires_at = Some(celer::job::from_now(d).ok_or_else(|| CliError::Usage("--expires is too far in the future".into()))?);
    }
    job.validate().map_err(CliError::Usage)?;
    if !a.no_check && !task_is_known(config, &a.task) {
        return Err(CliError::Usage(format!(
            "unknown task {:?}: no manifest in {} declares it (use --no-check to enqueue anyway)",
            a.task,
            config.plugins.dir.display()
        )));
    }
    let broker = open_broker(config).await?;
    let enqueued = broker.enqueue(job).await?;
    if !a.wait {
        super::say(&format!("{}", enqueued.id));
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now().checked_add(a.timeout).ok_or_else(|| CliError::Usage("--timeout is too long".into()))?;
    loop {
        let status = broker.status(&enqueued.id).await?.ok_or_else(|| CliError::Failed(format!("job {} vanished", enqueued.id)))?;
        if status.state.is_terminal() {
            print_json(&status)?;
            return Ok(if status.state == JobState::Succeeded { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        if Instant::now() >= deadline {
            print_json(&status)?;
            return Err(CliError::Failed(format!("job {} still {} after {:?}", enqueued.id, status.state.as_str(), a.timeout)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `celer status`: the job's record as JSON, for scripts as well as people.
pub async fn status(config: &Config, id: &str) -> Result<ExitCode, CliError> {
    let broker = open_broker(config).await?;
    match broker.status(id).await? {
        Some(status) => {
            print_json(&status)?;
            Ok(ExitCode::SUCCESS)
        }
        None => Err(CliError::Usage(format!("no job with id {id:?}"))),
    }
}

/// `celer cancel`: prints whether the job was cancelled, asked to stop, or
/// already over, so a script knows if it must wait; an unknown id is a
/// usage error.
pub async fn cancel(config: &Config, id: &str) -> Result<ExitCode, CliError> {
    let broker = open_broker(config).await?;
    let outcome = broker.cancel(id).await?;
    if outcome == celer::broker::CancelOutcome::NotFound {
        return Err(CliError::Usage(format!("no job with id {id:?}")));
    }
    print_json(&serde_json::json!({"id": id, "outcome": outcome}))?;
    Ok(ExitCode::SUCCESS)
}

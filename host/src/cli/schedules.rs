//! `celer schedules …`: periodic tasks stored in the database. Changes are
//! picked up by the leading scheduler at its next tick; no restart.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use celer::config::Config;
use celer::job::NewJob;
use celer::scheduler::schedule::{Schedule, Timing, validate};
use celer::scheduler::store::{ScheduleStore, StoreError};

use super::{CliError, open_broker, print_json};

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Every schedule with its next fire time.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Create a schedule (exactly one of --cron, --every, --at).
    Add(AddArgs),
    /// Enable a schedule.
    Enable { name: String },
    /// Disable a schedule (it keeps its history).
    Disable { name: String },
    /// Delete a schedule.
    Remove { name: String },
    /// Enqueue the schedule's task now, outside its timing; prints the job id.
    RunNow { name: String },
    /// Bring over django-celery-beat's periodic tasks.
    Import {
        /// The Django database: postgres://… or sqlite://path.
        #[arg(long = "from-django-celery-beat", value_name = "DATABASE_URL")]
        from: String,
        /// Overwrite celer schedules of the same name.
        #[arg(long)]
        replace: bool,
    },
}

/// Celery task name → celer task, through every manifest's tasks and aliases.
fn task_resolver(config: &Config) -> impl Fn(&str) -> Option<String> {
    let mut map = std::collections::HashMap::new();
    if let Ok(entries) = std::fs::read_dir(&config.plugins.dir) {
        for e in entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "toml")) {
            if let Ok(m) = celer::runtime::manifest::Manifest::load(&e.path()) {
                for t in &m.plugin.tasks {
                    map.insert(t.clone(), t.clone());
                }
                for (alias, t) in &m.plugin.aliases {
                    map.insert(alias.clone(), t.clone());
                }
            }
        }
    }
    move |name: &str| map.get(name).cloned()
}

#[derive(Debug, Args)]
pub struct AddArgs {
    name: String,
    task: String,
    /// Crontab expression: 5 fields (minute hour day-of-month month day-of-week; 0 = Sunday), or 6 with seconds first.
    #[arg(long, group = "timing")]
    cron: Option<String>,
    /// IANA time zone of --cron (default UTC).
    #[arg(long, requires = "cron")]
    tz: Option<String>,
    /// Interval, e.g. 30s, 5m, 1h, 1d.
    #[arg(long, value_parser = humantime::parse_duration, group = "timing")]
    every: Option<Duration>,
    /// One-off at this instant (RFC 3339).
    #[arg(long, group = "timing")]
    at: Option<DateTime<Utc>>,
    #[arg(long, default_value = "[]")]
    args: String,
    #[arg(long, default_value = "{}")]
    kwargs: String,
    #[arg(long, default_value = celer::job::DEFAULT_QUEUE)]
    queue: String,
    /// Disable after the first run.
    #[arg(long)]
    one_off: bool,
    /// Not before this instant (RFC 3339); intervals count from it.
    #[arg(long)]
    start: Option<DateTime<Utc>>,
    /// Not after this instant (RFC 3339).
    #[arg(long)]
    expires: Option<DateTime<Utc>>,
    #[arg(long, default_value = "")]
    description: String,
    /// Overwrite a schedule of the same name.
    #[arg(long)]
    replace: bool,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
}

fn store_err(e: StoreError) -> CliError {
    match e {
        StoreError::Exists(_) => CliError::Usage(e.to_string()),
        other => CliError::Failed(other.to_string()),
    }
}

fn timing_text(t: &Timing) -> String {
    match t {
        Timing::Crontab { expr, timezone } => format!("cron {expr} ({timezone})"),
        Timing::Interval { every_s } => format!("every {}", humantime::format_duration(Duration::from_secs(*every_s))),
        Timing::Clocked { at } => format!("at {}", at.to_rfc3339()),
    }
}

fn view(s: &Schedule, now: DateTime<Utc>) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    v["next_run_at"] = json!(s.next_after(now));
    v
}

/// `celer schedules …`: edits the schedules store directly, so it works with no host
/// running.
pub async fn run(config: &Config, command: ScheduleCommand) -> Result<ExitCode, CliError> {
    let store = ScheduleStore::open(&config.database_url()).await.map_err(store_err)?;
    let unknown = |name: &str| CliError::Usage(format!("no schedule named {name:?}"));
    match command {
        ScheduleCommand::List { json: as_json } => {
            let now = Utc::now();
            let all = store.list().await.map_err(store_err)?;
            if as_json {
                print_json(&all.iter().map(|s| view(s, now)).collect::<Vec<_>>())?;
            } else {
                for s in &all {
                    super::say(&format!(
                        "{:<28} {:<8} {:<32} {:<36} next {:<26} runs {}",
                        s.name,
                        if s.enabled { "enabled" } else { "disabled" },
                        s.task,
                        timing_text(&s.timing),
                        s.next_after(now).map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into()),
                        s.total_run_count
                    ));
                }
            }
        }
        ScheduleCommand::Add(a) => {
            let timing = match (a.cron, a.every, a.at) {
                (Some(expr), None, None) => Timing::Crontab { expr, timezone: a.tz.unwrap_or_else(|| "UTC".into()) },
                (None, Some(every), None) => Timing::Interval { every_s: every.as_secs() },
                (None, None, Some(at)) => Timing::Clocked { at },
                _ => return Err(CliError::Usage("give exactly one of --cron, --every, --at".into())),
            };
            validate(&timing).map_err(|e| CliError::Usage(e.to_string()))?;
            let parse = |flag: &str, text: &str| -> Result<Value, CliError> {
                serde_json::from_str(text).map_err(|e| CliError::Usage(format!("--{flag} is not valid JSON: {e}")))
            };
            let probe = NewJob::new(a.task.clone(), parse("args", &a.args)?, parse("kwargs", &a.kwargs)?);
            probe.validate().map_err(CliError::Usage)?;
            let schedule = Schedule {
                name: a.name,
                task: probe.task,
                args: probe.args,
                kwargs: probe.kwargs,
                queue: a.queue,
                one_off: a.one_off || matches!(timing, Timing::Clocked { .. }),
                timing,
                enabled: !a.disabled,
                start_time: a.start,
                expires: a.expires,
                last_run_at: None,
                total_run_count: 0,
                description: a.description,
                source: "cli".into(),
                created_at: Utc::now(),
            };
            store.insert(&schedule, a.replace).await.map_err(store_err)?;
            print_json(&view(&schedule, Utc::now()))?;
        }
        ScheduleCommand::Enable { name } => {
            if !store.set_enabled(&name, true).await.map_err(store_err)? {
                return Err(unknown(&name));
            }
        }
        ScheduleCommand::Disable { name } => {
            if !store.set_enabled(&name, false).await.map_err(store_err)? {
                return Err(unknown(&name));
            }
        }
        ScheduleCommand::Remove { name } => {
            if !store.remove(&name).await.map_err(store_err)? {
                return Err(unknown(&name));
            }
        }
        ScheduleCommand::Import { from, replace } => {
            let (schedules, mut report) = celer::scheduler::beat_import::import(&from, task_resolver(config))
                .await
                .map_err(|e| CliError::Usage(e.to_string()))?;
            for s in &schedules {
                if let Err(e) = store.insert(s, replace).await {
                    report.imported.retain(|n| n != &s.name);
                    report.not_imported.insert(s.name.clone(), e.to_string());
                }
            }
            print_json(&report)?;
        }
        ScheduleCommand::RunNow { name } => {
            let s = store.get(&name).await.map_err(store_err)?.ok_or_else(|| unknown(&name))?;
            let mut job = NewJob::new(s.task, s.args, s.kwargs);
            job.queue = s.queue;
            let broker = open_broker(config).await?;
            super::say(&format!("{}", broker.enqueue(job).await?.id));
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! Command-line interface: one module per group of commands.

mod dead;
mod enqueue;
mod plugins;
mod schedules;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use celer::broker::Broker;
use celer::broker::embedded::EmbeddedBroker;
use celer::config::Config;

/// A failure of a command, with the exit code it deserves.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage or bad input: exit 2.
    #[error("{0}")]
    Usage(String),
    /// The work could not be done: exit 1.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// Scripts tell a usage error (2) from a failure (1) by the exit status.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl From<celer::config::ConfigError> for CliError {
    fn from(e: celer::config::ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl From<celer::broker::BrokerError> for CliError {
    fn from(e: celer::broker::BrokerError) -> Self {
        match e {
            celer::broker::BrokerError::Invalid(m) => CliError::Usage(m),
            other => CliError::Failed(other.to_string()),
        }
    }
}

/// celer runs background jobs as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "celer", version, about)]
pub struct Cli {
    /// Configuration file (default: ./celer.toml when present).
    #[arg(long, global = true, env = "CELER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Whether this runs the long-lived host (which logs at info by default).
    pub fn is_serve(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host: consume queues and run jobs until SIGTERM.
    Serve(serve::ServeArgs),
    /// Put a job on a queue; prints its id (or its final status with --wait).
    Enqueue(enqueue::EnqueueArgs),
    /// Print the status JSON of a job.
    Status {
        id: String,
    },
    /// Cancel a job that has not started, or ask its worker to stop it.
    Cancel {
        id: String,
    },
    /// List the plugins in the plugins directory and whether each loads.
    Plugins {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Plugin tools.
    Plugin {
        #[command(subcommand)]
        command: plugins::PluginCommand,
    },
    /// Queue depths: queued, delayed, running and dead jobs per queue.
    Inspect {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Periodic tasks.
    Schedules {
        #[command(subcommand)]
        command: schedules::ScheduleCommand,
    },
    /// The dead-letter queue.
    Dead {
        #[command(subcommand)]
        command: dead::DeadCommand,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve(args) => serve::serve(config, args).await,
        Command::Enqueue(args) => enqueue::enqueue(&config, args).await,
        Command::Status { id } => enqueue::status(&config, &id).await,
        Command::Cancel { id } => enqueue::cancel(&config, &id).await,
        Command::Plugins { json } => plugins::list(&config, json).await,
        Command::Plugin { command } => plugins::run(&config, command).await,
        Command::Inspect { json } => inspect(&config, json).await,
        Command::Schedules { command } => schedules::run(&config, command).await,
        Command::Dead { command } => dead::run(&config, command).await,
    }
}

/// The Redis broker's settings from `[broker]` and `[worker]`.
fn redis_options(config: &Config) -> celer::broker::redis::RedisOptions {
    celer::broker::redis::RedisOptions {
        url: config.broker.url.clone().unwrap_or_default(),
        prefix: config.broker.prefix.clone(),
        result_ttl: std::time::Duration::from_secs(config.broker.result_ttl_s),
        block: std::time::Duration::from_millis(config.worker.poll_ms),
    }
}

/// The broker named by the configuration.
async fn open_broker(config: &Config) -> Result<Arc<dyn Broker>, CliError> {
    if config.broker.is_redis() {
        let broker = celer::broker::redis::RedisBroker::connect(redis_options(config))
            .await
            .map_err(|e| CliError::Failed(format!("cannot open the Redis broker: {e}")))?;
        return Ok(Arc::new(broker));
    }
    let path = config.broker_path();
    let broker = EmbeddedBroker::open(&path)
        .await
        .map_err(|e| CliError::Failed(format!("cannot open the embedded broker at {}: {e}", path.display())))?;
    Ok(Arc::new(broker))
}

/// `celer inspect`: what an operator checks first at 3 a.m.
async fn inspect(config: &Config, as_json: bool) -> Result<ExitCode, CliError> {
    let broker = open_broker(config).await?;
    let stats = broker.queue_stats().await?;
    let hosts = broker.hosts().await?;
    if as_json {
        print_json(&serde_json::json!({"queues": stats, "hosts": hosts}))?;
        return Ok(ExitCode::SUCCESS);
    }
    say(&format!("{:<24} {:>10} {:>10} {:>10} {:>10}", "queue", "queued", "delayed", "running", "dead"));
    for q in &stats {
        say(&format!("{:<24} {:>10} {:>10} {:>10} {:>10}", q.queue, q.queued, q.delayed, q.running, q.dead));
    }
    say("");
    say(&format!("{:<32} {:>8} {:>8} {:<22} {}", "host", "running", "pid", "last seen", "queues"));
    let now = chrono::Utc::now();
    for h in &hosts {
        let seen = match h.last_seen {
            Some(t) => format!("{:.1} s ago", (now - t).num_milliseconds().max(0) as f64 / 1000.0),
            // No heartbeat: it holds jobs but is not known to be alive.
            None => "no heartbeat".to_string(),
        };
        let pid = h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        say(&format!("{:<32} {:>8} {:>8} {:<22} {}", h.host, h.running, pid, seen, h.queues.join(",")));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a value as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Failed(e.to_string()))?;
    say(&text);
    Ok(())
}

/// Writes one line to stdout. A reader that went away (`celer … | head`)
/// is not an error worth a panic: the rest of the output is dropped.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

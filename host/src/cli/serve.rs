//! `celer serve`: wires broker, runtime, registry, watcher and worker
//! together and runs until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;

use celer::capabilities::Capabilities;
use celer::config::Config;
use celer::runtime::Runtime;
use celer::runtime::registry::Registry;
use celer::runtime::watcher;
use celer::worker::Worker;

use super::{CliError, open_broker};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Roles this process takes, comma separated. This build has the
    /// `worker` role; `scheduler` and `api` are refused until they exist.
    #[arg(long, value_delimiter = ',', default_value = "worker")]
    roles: Vec<String>,
}

/// Instance slots beyond the worker's concurrency, for plugin loads and
/// `describe()` calls running beside jobs.
const LOAD_SLOTS: u32 = 4;

pub async fn serve(config: Config, args: ServeArgs) -> Result<ExitCode, CliError> {
    for role in &args.roles {
        if role != "worker" {
            return Err(CliError::Usage(format!("role {role:?} is not available in this build (available: worker)")));
        }
    }
    let broker = open_broker(&config).await?;
    let slots = u32::try_from(config.worker.concurrency).unwrap_or(u32::MAX / 2).saturating_add(LOAD_SLOTS);
    let capabilities = Capabilities::connect(&config, broker.clone()).await.map_err(|e| CliError::Failed(e.to_string()))?;
    let runtime = Runtime::new(&config.sandbox, capabilities, config.cache_dir(), slots)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let runtime = Arc::new(runtime);
    let registry = Arc::new(Registry::new(runtime.clone(), config.plugins.dir.clone()));
    registry.scan().await;
    let _watcher = watcher::watch(registry.clone(), Duration::from_millis(config.plugins.debounce_ms))
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!(
        plugins = registry.plugins().len(), dir = %config.plugins.dir.display(),
        broker = %config.broker_path().display(), "celer serving"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; send the signal again to exit at once");
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now; running jobs run again once their leases expire");
        std::process::exit(130);
    });

    let worker = Worker {
        broker,
        registry,
        runtime,
        config: config.worker.clone(),
        backoff: config.retry,
        host: config.host_id(),
    };
    worker.run(stop_rx).await;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (service managers) or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

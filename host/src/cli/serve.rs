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
use celer::scheduler::Scheduler;
use celer::scheduler::lock::LeaderLock;
use celer::scheduler::store::ScheduleStore;
use celer::broker::Broker;
use celer::broker::redis::RedisBroker;
use celer::worker::{Intake, ShardBroker, Worker};

use super::{CliError, open_broker, redis_options};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Roles this process takes, comma separated: `worker` (runs jobs),
    /// `scheduler` (fires periodic tasks; every host may run it, one leads),
    /// `api` (the HTTP listener).
    #[arg(long, value_delimiter = ',', default_value = "worker,scheduler,api")]
    roles: Vec<String>,
}

/// Instance slots beyond the worker's concurrency, for plugin loads and
/// `describe()` calls running beside jobs.
const LOAD_SLOTS: u32 = 4;

/// `celer serve`: the long-running host; returns once every role has stopped after
/// SIGTERM/SIGINT.
pub async fn serve(config: Config, args: ServeArgs) -> Result<ExitCode, CliError> {
    const ROLES: [&str; 3] = ["worker", "scheduler", "api"];
    if let Some(bad) = args.roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
        return Err(CliError::Usage(format!("unknown role {bad:?} (roles: {})", ROLES.join(", "))));
    }
    let has = |role: &str| args.roles.iter().any(|r| r == role);
    // First, so that a port in use fails at once with one clear line.
    let listener = match has("api") {
        true => Some(celer::api::bind(&config.http.listen).await.map_err(CliError::Failed)?),
        false => None,
    };
    let broker = open_broker(&config).await?;
    let slots = u32::try_from(config.worker.concurrency).unwrap_or(u32::MAX / 2).saturating_add(LOAD_SLOTS);
    let capabilities = Capabilities::connect(&config, broker.clone()).await.map_err(|e| CliError::Failed(e.to_string()))?;
    let api = celer::api::ApiState::new(capabilities.clone(), &config.http);
    let runtime = Runtime::new(&config.sandbox, capabilities, config.cache_dir(), slots)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let runtime = Arc::new(runtime);
    let registry = Arc::new(Registry::new(runtime.clone(), config.plugins.dir.clone()));
    registry.scan().await;
    let _watcher = watcher::watch(registry.clone(), Duration::from_millis(config.plugins.debounce_ms))
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!(
        plugins = registry.plugins().len(), dir = %config.plugins.dir.display(),
        broker = %broker_name(&config), "celer serving"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    // A database that is down must not stop the host from running jobs:
    // without the schedule store, this host runs no scheduler role (another
    // host, or a restart, picks it up) and says so once.
    let schedules = match ScheduleStore::open(&config.database_url()).await {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::error!(error = %e, "schedule store unavailable: this host runs without the scheduler role and /api/schedules");
            None
        }
    };
    if let Some(listener) = listener {
        let mut api = api.with_broker(broker.clone()).with_registry(registry.clone());
        if let Some(store) = &schedules {
            api = api.with_schedules(store.clone());
        }
        tokio::spawn(celer::api::serve(listener, celer::api::router(api), stop_rx.clone()));
    }
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; send the signal again to exit at once");
        let _ = on_signal.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now; running jobs run again once their leases expire");
        std::process::exit(130);
    });

    let mut roles = tokio::task::JoinSet::new();
    if let (true, Some(store)) = (has("scheduler"), schedules) {
        let lock = match config.broker.url.as_deref().filter(|u| u.starts_with("redis://") || u.starts_with("rediss://")) {
            Some(url) => match LeaderLock::redis(url, &config.broker.prefix).await {
                Ok(lock) => lock,
                Err(e) => {
                    // Ticks stay exactly-once through their idempotency keys.
                    tracing::warn!(error = %e, "Redis unreachable for the scheduler lock; using the database lock");
                    LeaderLock::Database(store.clone())
                }
            },
            None => LeaderLock::Database(store.clone()),
        };
        let scheduler = Scheduler {
            lock,
            store,
            broker: broker.clone(),
            registry: Some(registry.clone()),
            host: config.host_id(),
            config: config.scheduler,
        };
        roles.spawn(scheduler.run(stop_rx.clone()));
    }
    if has("worker") {
        let mut worker_config = config.worker.clone();
        let intake = Intake::new(worker_config.concurrency);
        let celery = match config.celery.enabled {
            // Celery's queues become celer queues of the same name, run here too.
            true => {
                for q in &config.celery.queues {
                    if !worker_config.queues.contains(q) {
                        worker_config.queues.push(q.clone());
                    }
                }
                let started = celer::celery::start(&config, broker.clone(), registry.clone(), config.host_id(), stop_tx.clone(), intake.clone());
                Some(started.await.map_err(CliError::Failed)?)
            }
            false => None,
        };
        let shards = worker_config.shard_count(config.broker.is_redis());
        let connect: ShardBroker = {
            let (options, celery) = (redis_options(&config), celery.clone());
            Arc::new(move || {
                let (options, celery) = (options.clone(), celery.clone());
                Box::pin(async move {
                    let own: Arc<dyn Broker> = Arc::new(RedisBroker::connect(options).await?);
                    Ok(match &celery {
                        Some(celery) => celery.over(own),
                        None => own,
                    })
                })
            })
        };
        let broker: Arc<dyn Broker> = match celery {
            Some(celery) => celery,
            None => broker,
        };
        let worker = Worker {
            broker,
            registry,
            runtime,
            config: worker_config,
            backoff: config.retry,
            host: config.host_id(),
            intake,
        };
        if shards > 1 {
            tracing::info!(shards, "worker shards: each on a thread of its own, with its own broker connection");
        }
        roles.spawn(worker.run_sharded(shards, connect, stop_tx.clone()));
    }
    if roles.is_empty() {
        // API only: serve until asked to stop.
        let mut stop = stop_rx;
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    }
    while roles.join_next().await.is_some() {}
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

/// The broker for the log: the Redis URL without its password, or the SQLite file.
fn broker_name(config: &Config) -> String {
    match (&config.broker.url, config.broker.is_redis()) {
        (Some(url), true) => match url.split_once('@') {
            Some((scheme_user, host)) => format!("{}:***@{host}", scheme_user.rsplit_once(':').map_or(scheme_user, |(a, _)| a)),
            None => url.clone(),
        },
        _ => config.broker_path().display().to_string(),
    }
}

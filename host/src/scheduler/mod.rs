//! The scheduler role: periodic tasks (crontab with time zone, interval,
//! clocked) stored in the database, fired by whichever host holds the
//! leader lock. Each tick is enqueued with the idempotency key
//! `schedule:<name>:<fire time>`, so even two hosts that both believe they
//! lead (a lock lost mid-tick) enqueue a tick once. Edits through the CLI
//! are read at the next tick: no restart.

pub mod beat_import;
pub mod cronexpr;
pub mod lock;
pub mod schedule;
pub mod store;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::watch;

use crate::broker::Broker;
use crate::job::NewJob;
use crate::runtime::registry::Registry;
use schedule::{Missed, Schedule};
use store::ScheduleStore;

/// `[scheduler]` in celer.toml.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// How often the leader looks for due ticks.
    pub tick_ms: u64,
    /// The leader lock's lifetime; another host takes over this long after
    /// the leader dies. Ticks missed within it are all fired.
    pub lock_ttl_ms: u64,
    /// Ticks missed for longer (everything was down): `once` or `skip`.
    pub missed: Missed,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { tick_ms: 250, lock_ttl_ms: 5_000, missed: Missed::Once }
    }
}

/// One host's scheduler role.
pub struct Scheduler {
    pub store: ScheduleStore,
    /// The leader lock: in Redis with a Redis broker, else in the store.
    pub lock: lock::LeaderLock,
    pub broker: Arc<dyn Broker>,
    /// Loaded plugins, whose manifests may carry default schedules.
    pub registry: Option<Arc<Registry>>,
    pub host: String,
    pub config: SchedulerConfig,
}

impl Scheduler {
    /// Ticks until `shutdown`, leading when it can.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let ttl = Duration::from_millis(self.config.lock_ttl_ms);
        let mut interval = tokio::time::interval(Duration::from_millis(self.config.tick_ms));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading = false;
        let mut seeded: HashSet<(String, String)> = HashSet::new();
        while !*shutdown.borrow() {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.changed() => break,
            }
            self.seed_plugin_defaults(&mut seeded).await;
            match self.lock.try_lead(&self.host, ttl).await {
                Ok(now_leading) => {
                    if now_leading != leading {
                        tracing::info!(host = %self.host, leading = now_leading, "scheduler leadership changed");
                        leading = now_leading;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler cannot reach its lock; not ticking");
                    leading = false;
                }
            }
            if leading {
                self.tick(Utc::now()).await;
            }
        }
        if leading {
            if let Err(e) = self.lock.resign(&self.host).await {
                tracing::warn!(error = %e, "cannot hand the scheduler lock over");
            }
        }
    }

    /// Enqueues every due tick of every schedule.
    pub async fn tick(&self, now: DateTime<Utc>) {
        let handover = chrono::Duration::milliseconds(i64::try_from(self.config.lock_ttl_ms + 2 * self.config.tick_ms).unwrap_or(i64::MAX / 2));
        let schedules = match self.store.list().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read schedules");
                return;
            }
        };
        for s in schedules {
            let due = match s.due(now, handover, self.config.missed) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(schedule = %s.name, error = %e, "schedule cannot be evaluated; skipping it");
                    continue;
                }
            };
            for fire in due {
                if let Err(e) = self.fire(&s, fire).await {
                    tracing::warn!(schedule = %s.name, error = %e, "tick not enqueued; will retry next tick");
                    break;
                }
            }
        }
    }

    async fn fire(&self, s: &Schedule, fire: DateTime<Utc>) -> Result<(), String> {
        let mut job = NewJob::new(s.task.clone(), s.args.clone(), s.kwargs.clone());
        job.queue = s.queue.clone();
        job.idempotency_key = Some(format!("schedule:{}:{}", s.name, fire.timestamp_millis()));
        let enqueued = self.broker.enqueue(job).await.map_err(|e| e.to_string())?;
        if !enqueued.existing {
            tracing::info!(schedule = %s.name, task = %s.task, job_id = %enqueued.id, fire_time = %fire.to_rfc3339(), "schedule fired");
        }
        self.store.mark_run(&s.name, fire, !enqueued.existing, s.one_off).await.map_err(|e| e.to_string())
    }

    /// Creates the default schedules a plugin's manifest declares, once per
    /// plugin version, unless a schedule of that name exists (the
    /// operator's edits win; disable a default schedule to stop it).
    async fn seed_plugin_defaults(&self, seeded: &mut HashSet<(String, String)>) {
        let Some(registry) = &self.registry else { return };
        for plugin in registry.plugins() {
            if !seeded.insert((plugin.name.clone(), plugin.digest.clone())) {
                continue;
            }
            for (name, spec) in &plugin.manifest.schedules {
                let s = match spec.to_schedule(name, &plugin.name) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(plugin = %plugin.name, schedule = %name, error = %e, "default schedule refused");
                        continue;
                    }
                };
                match self.store.insert_if_absent(&s).await {
                    Ok(true) => tracing::info!(plugin = %plugin.name, schedule = %name, "default schedule created"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(schedule = %name, error = %e, "cannot create default schedule"),
                }
            }
        }
    }
}

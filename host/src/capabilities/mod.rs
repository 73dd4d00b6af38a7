//! The host side of every WIT interface, one module each (database, cache,
//! storage, mail, jobs, log), in the manner of Spin's factors: a module owns
//! its grant checks, its per-job state and its linker wiring, and can be
//! read — or removed — on its own.
//!
//! Grants are checked twice: at load ([`Capabilities::check_grants`]
//! refuses a manifest that asks for something this host cannot give) and on
//! every call (a call outside the grants returns `denied` and never reaches
//! the backend). Every call is also recorded, so a job's status can say
//! what the job touched.

pub mod cache;
pub mod database;
pub mod jobs;
pub mod log;
pub mod mail;
pub mod storage;

use std::sync::Arc;

use serde_json::{Map, Value};
use wasmtime::component::{HasSelf, Linker};

use crate::broker::Broker;
use crate::config::Config;
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin as wit;
use crate::runtime::manifest::{Grants, Manifest};

/// Who is calling: carried by every capability for its log lines.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub job_id: String,
    /// The workflow's first job (the job itself when it started one);
    /// follow-up jobs carry it on as their `root_id`.
    pub root_id: String,
    pub task: String,
    pub plugin: String,
    pub attempt: u32,
}

/// Process-wide state of the capabilities: the backends all jobs share.
#[derive(Clone)]
pub struct Capabilities {
    broker: Arc<dyn Broker>,
    database: Arc<database::Backend>,
    cache: Arc<cache::Backend>,
    storage: Arc<storage::Backend>,
    mail: Arc<mail::Backend>,
}

/// A backend named by the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{capability} backend: {reason}")]
pub struct BackendError {
    pub capability: &'static str,
    pub reason: String,
}

/// Why a manifest's grants cannot be honoured by this host.
#[derive(Debug, thiserror::Error)]
#[error("grant {grant} cannot be honoured: {reason}")]
pub struct GrantError {
    pub grant: &'static str,
    pub reason: String,
}

/// Every capability's state for one job; lives in that job's `Store`.
pub struct JobCaps {
    pub log: log::LogCap,
    pub jobs: jobs::JobsCap,
    pub database: database::DatabaseCap,
    pub cache: cache::CacheCap,
    pub storage: storage::StorageCap,
    pub mail: mail::MailCap,
}

/// A store's data that carries a [`JobCaps`]; lets the linker reach each
/// capability's state from the store.
pub trait HasCaps: Send + 'static {
    fn caps(&mut self) -> &mut JobCaps;
}

impl Capabilities {
    /// Connects every backend the configuration names (the embedded
    /// default when it names none).
    pub async fn connect(config: &Config, broker: Arc<dyn Broker>) -> Result<Self, BackendError> {
        Ok(Capabilities {
            broker,
            database: Arc::new(database::Backend::connect(config).await?),
            cache: Arc::new(cache::Backend::connect(config).await?),
            storage: Arc::new(storage::Backend::connect(config).await?),
            mail: Arc::new(mail::Backend::connect(config).await?),
        })
    }

    /// Refuses, at load, a manifest that names something impossible, and
    /// prepares the backends for the plugin (e.g. its database role).
    pub async fn prepare(&self, manifest: &Manifest) -> Result<(), GrantError> {
        let (name, grants) = (&manifest.plugin.name, &manifest.grants);
        database::check_grants(grants)?;
        cache::check_grants(grants)?;
        storage::check_grants(grants)?;
        mail::check_grants(grants)?;
        jobs::check_grants(grants)?;
        self.database.prepare(name, grants).await?;
        self.cache.prepare(name, grants).await?;
        self.storage.prepare(name, grants).await?;
        self.mail.prepare(name, grants).await?;
        Ok(())
    }

    /// The `file://` download links the HTTP listener serves; none on S3.
    pub fn file_links(&self) -> Option<storage::FileLinks> {
        self.storage.file_links()
    }

    /// Which backends answer, for `/readyz`: (capability, error if any).
    pub async fn ping(&self) -> Vec<(&'static str, Result<(), String>)> {
        vec![
            ("broker", self.broker.ping().await.map_err(|e| e.to_string())),
            ("database", self.database.ping().await),
            ("cache", self.cache.ping().await),
            ("storage", self.storage.ping().await),
            ("mail", self.mail.ping().await),
        ]
    }

    /// Fresh per-job state holding only this plugin's grants.
    pub fn for_job(
        &self,
        info: Arc<JobInfo>,
        grants: &Arc<Grants>,
        log: log::JobLog,
        progress: Arc<tokio::sync::watch::Sender<Option<crate::job::Progress>>>,
    ) -> JobCaps {
        JobCaps {
            log: log::LogCap::new(info.clone(), log, progress),
            jobs: jobs::JobsCap::new(info.clone(), grants.clone(), self.broker.clone()),
            database: database::DatabaseCap::new(info.clone(), grants.clone(), self.database.clone()),
            cache: cache::CacheCap::new(info.clone(), grants.clone(), self.cache.clone()),
            storage: storage::StorageCap::new(info.clone(), grants.clone(), self.storage.clone()),
            mail: mail::MailCap::new(info, grants.clone(), self.mail.clone()),
        }
    }

    /// Wires every interface into the linker, once per engine.
    pub fn add_to_linker<T: HasCaps>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
        wit::types::add_to_linker::<T, HasSelf<JobCaps>>(linker, |t| t.caps())?;
        wit::log::add_to_linker::<T, HasSelf<log::LogCap>>(linker, |t| &mut t.caps().log)?;
        wit::jobs::add_to_linker::<T, HasSelf<jobs::JobsCap>>(linker, |t| &mut t.caps().jobs)?;
        wit::database::add_to_linker::<T, HasSelf<database::DatabaseCap>>(linker, |t| &mut t.caps().database)?;
        wit::cache::add_to_linker::<T, HasSelf<cache::CacheCap>>(linker, |t| &mut t.caps().cache)?;
        wit::storage::add_to_linker::<T, HasSelf<storage::StorageCap>>(linker, |t| &mut t.caps().storage)?;
        wit::mail::add_to_linker::<T, HasSelf<mail::MailCap>>(linker, |t| &mut t.caps().mail)?;
        Ok(())
    }
}

impl wit::types::Host for JobCaps {}

impl JobCaps {
    /// What the job reached, for its status: one key per capability that was
    /// used, plus every denial. `None` when the job touched nothing.
    pub fn touched(&self) -> Option<Value> {
        let mut out = Map::new();
        let mut denials = Vec::new();
        self.jobs.record.report("enqueued", &mut out, &mut denials);
        self.database.record.report("database", &mut out, &mut denials);
        self.cache.record.report("cache", &mut out, &mut denials);
        self.storage.record.report("storage", &mut out, &mut denials);
        self.mail.record.report("mail", &mut out, &mut denials);
        if !denials.is_empty() {
            out.insert("denials".into(), Value::Array(denials));
        }
        (!out.is_empty()).then_some(Value::Object(out))
    }
}

/// One capability's audit trail for one job.
#[derive(Debug, Default)]
pub struct Record {
    /// What was reached, in call order (capped).
    pub used: Vec<Value>,
    /// What was refused.
    pub denials: Vec<Value>,
}

/// A job can call a capability in a loop; its status keeps the first this many entries.
const RECORD_CAP: usize = 200;

impl Record {
    fn used(&mut self, entry: Value) {
        if self.used.len() < RECORD_CAP {
            self.used.push(entry);
        }
    }

    fn report(&self, key: &str, out: &mut Map<String, Value>, denials: &mut Vec<Value>) {
        if !self.used.is_empty() {
            out.insert(key.into(), Value::Array(self.used.clone()));
        }
        denials.extend(self.denials.iter().cloned());
    }

    /// Refuses a call: records it, logs one line, returns the typed error.
    fn deny(&mut self, info: &JobInfo, capability: &'static str, what: String) -> HostError {
        tracing::warn!(
            job_id = %info.job_id, task = %info.task, plugin = %info.plugin, attempt = info.attempt,
            capability, what = %what, "denied: not granted by the plugin's manifest"
        );
        if self.denials.len() < RECORD_CAP {
            self.denials.push(serde_json::json!({"capability": capability, "what": what}));
        }
        HostError::Denied(format!("{capability}: {what} is not granted to plugin {}", info.plugin))
    }
}

/// Whether `key` starts with one of the granted prefixes.
fn prefix_granted(prefixes: &[String], key: &str) -> bool {
    prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_only_from_the_start() {
        let granted = vec!["exports/".to_string(), "is_member_".to_string()];
        assert!(prefix_granted(&granted, "exports/42.zip"));
        assert!(prefix_granted(&granted, "is_member_7_3"));
        assert!(!prefix_granted(&granted, "x/exports/42.zip"));
        assert!(!prefix_granted(&granted, "exports"));
        assert!(!prefix_granted(&[], "anything"));
    }
}

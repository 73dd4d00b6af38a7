//! `celer:plugin/cache`: the shared cache, limited to keys that start with a
//! prefix in `grants.cache`.
//!
//! This build has no cache backend wired in: a granted call returns
//! `unavailable`; a call outside the grants returns `denied` first.

use std::sync::Arc;

use super::{BackendError, GrantError, JobInfo, Record, not_configured, prefix_granted};
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::cache::Host;
use crate::config::Config;
use crate::runtime::manifest::Grants;

/// An empty prefix would grant every key: refused, so that "everything" is
/// never granted by accident.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    match grants.cache.iter().any(String::is_empty) {
        true => Err(GrantError { grant: "cache", reason: "an empty key prefix would grant every key".into() }),
        false => Ok(()),
    }
}

/// The process-wide cache backend, shared by every job.
pub struct Backend {
    _unconfigured: (),
}

impl Backend {
    /// Connects to what the configuration names.
    pub async fn connect(_config: &Config) -> Result<Backend, BackendError> {
        Ok(Backend { _unconfigured: () })
    }

    /// Prepares the backend for a plugin at load (e.g. database roles).
    pub async fn prepare(&self, _plugin: &str, _grants: &Grants) -> Result<(), GrantError> {
        Ok(())
    }

    /// Whether the backend answers, for `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Per-job state of the cache interface.
pub struct CacheCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    #[allow(dead_code)] // read once the backend is wired in
    backend: Arc<Backend>,
    pub(super) record: Record,
}

impl CacheCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, backend: Arc<Backend>) -> Self {
        CacheCap { info, grants, backend, record: Record::default() }
    }

    fn refuse(&mut self, op: &str, key: &str) -> HostError {
        if !prefix_granted(&self.grants.cache, key) {
            return self.record.deny(&self.info, "cache", format!("{op} {key:?}"));
        }
        not_configured("cache")
    }
}

impl Host for CacheCap {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        Err(self.refuse("get", &key))
    }

    async fn set(&mut self, key: String, _value: Vec<u8>, _ttl_ms: Option<u64>) -> Result<(), HostError> {
        Err(self.refuse("set", &key))
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        Err(self.refuse("delete", &key))
    }

    async fn incr(&mut self, key: String, _delta: i64) -> Result<i64, HostError> {
        Err(self.refuse("incr", &key))
    }
}

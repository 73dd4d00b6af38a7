//! `celer:plugin/storage`: object storage, limited to keys that start with a
//! prefix in `grants.storage`.
//!
//! This build has no storage backend wired in: a granted call returns
//! `unavailable`; a call outside the grants returns `denied` first.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::{BackendError, GrantError, JobInfo, Record, not_configured, prefix_granted};
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::storage::{Host, HostWriter, ObjectInfo};
use crate::config::Config;
use crate::runtime::manifest::Grants;

/// An empty prefix would grant the whole bucket: refused.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    match grants.storage.iter().any(String::is_empty) {
        true => Err(GrantError { grant: "storage", reason: "an empty key prefix would grant every object".into() }),
        false => Ok(()),
    }
}

/// A streamed upload. No backend in this build ever creates one.
pub struct Writer {
    _private: (),
}

/// The process-wide storage backend, shared by every job.
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

/// Per-job state of the storage interface.
pub struct StorageCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    #[allow(dead_code)] // read once the backend is wired in
    backend: Arc<Backend>,
    pub(super) record: Record,
}

impl StorageCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, backend: Arc<Backend>) -> Self {
        StorageCap { info, grants, backend, record: Record::default() }
    }

    fn refuse(&mut self, op: &str, key: &str) -> HostError {
        if !prefix_granted(&self.grants.storage, key) {
            return self.record.deny(&self.info, "storage", format!("{op} {key:?}"));
        }
        not_configured("storage")
    }
}

impl Host for StorageCap {
    async fn create(&mut self, key: String, _content_type: Option<String>) -> Result<Resource<Writer>, HostError> {
        Err(self.refuse("create", &key))
    }

    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        Err(self.refuse("get", &key))
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        Err(self.refuse("delete", &key))
    }

    async fn list(&mut self, prefix: String, _start_after: Option<String>, _limit: u32) -> Result<Vec<ObjectInfo>, HostError> {
        Err(self.refuse("list", &prefix))
    }

    async fn presign_get(&mut self, key: String, _expires_in_s: u32) -> Result<String, HostError> {
        Err(self.refuse("presign-get", &key))
    }
}

impl HostWriter for StorageCap {
    async fn write(&mut self, _writer: Resource<Writer>, _chunk: Vec<u8>) -> Result<(), HostError> {
        Err(HostError::Invalid("no such writer".into()))
    }

    async fn finish(&mut self, _writer: Resource<Writer>) -> Result<ObjectInfo, HostError> {
        Err(HostError::Invalid("no such writer".into()))
    }

    async fn drop(&mut self, _writer: Resource<Writer>) -> wasmtime::Result<()> {
        Ok(())
    }
}

//! `celer:plugin/database`: SQL limited to the tables in `grants.database`.
//!
//! This build has no database backend wired in: every granted call returns
//! `unavailable` (so a plugin retries instead of believing it succeeded),
//! and every call outside the grants returns `denied` first. See
//! docs/capabilities.md for what is and is not there yet.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::{BackendError, GrantError, JobInfo, Record, not_configured};
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::database::{Host, HostCursor, Row, Value};
use crate::config::Config;
use crate::runtime::manifest::Grants;

/// A table name must be a plain SQL identifier (optionally schema-qualified),
/// so that it can be matched against the tables a statement names.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    let db = &grants.database;
    for table in db.read.iter().chain(&db.write) {
        let plain = !table.is_empty()
            && table.split('.').all(|part| {
                !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
        if !plain {
            return Err(GrantError { grant: "database", reason: format!("{table:?} is not a table name") });
        }
    }
    Ok(())
}

/// An open query's rows. No backend in this build ever creates one.
pub struct Cursor {
    _private: (),
}

/// The process-wide database backend, shared by every job.
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

/// Per-job state of the database interface.
pub struct DatabaseCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    #[allow(dead_code)] // read once the backend is wired in
    backend: Arc<Backend>,
    pub(super) record: Record,
}

impl DatabaseCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, backend: Arc<Backend>) -> Self {
        DatabaseCap { info, grants, backend, record: Record::default() }
    }

    /// The error for a statement: `denied` without a grant, else
    /// `unavailable` (no backend in this build).
    fn refuse(&mut self, write: bool, sql: &str) -> HostError {
        let granted = if write { &self.grants.database.write } else { &self.grants.database.read };
        if granted.is_empty() {
            let kind = if write { "database.write" } else { "database.read" };
            let head: String = sql.chars().take(60).collect();
            return self.record.deny(&self.info, "database", format!("{kind} for {head:?}"));
        }
        not_configured("database")
    }
}

impl Host for DatabaseCap {
    async fn query(&mut self, sql: String, _params: Vec<Value>) -> Result<Resource<Cursor>, HostError> {
        Err(self.refuse(false, &sql))
    }

    async fn execute(&mut self, sql: String, _params: Vec<Value>) -> Result<u64, HostError> {
        Err(self.refuse(true, &sql))
    }

    async fn begin(&mut self) -> Result<(), HostError> {
        Err(not_configured("database"))
    }

    async fn commit(&mut self) -> Result<(), HostError> {
        Err(HostError::Invalid("no transaction is open".into()))
    }

    async fn rollback(&mut self) -> Result<(), HostError> {
        Err(HostError::Invalid("no transaction is open".into()))
    }
}

impl HostCursor for DatabaseCap {
    async fn columns(&mut self, _cursor: Resource<Cursor>) -> Vec<String> {
        Vec::new()
    }

    async fn next(&mut self, _cursor: Resource<Cursor>, _max_rows: u32) -> Result<Vec<Row>, HostError> {
        Err(HostError::Invalid("no such cursor".into()))
    }

    async fn drop(&mut self, _cursor: Resource<Cursor>) -> wasmtime::Result<()> {
        Ok(())
    }
}

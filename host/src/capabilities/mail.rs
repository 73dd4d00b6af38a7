//! `celer:plugin/mail`: outgoing mail when the manifest says `mail = true`
//! (optionally from granted senders only).
//!
//! This build has no mail transport wired in: a granted call returns
//! `unavailable`; a call outside the grants returns `denied` first.

use std::sync::Arc;

use super::{BackendError, GrantError, JobInfo, Record, not_configured};
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::mail::{Host, Message};
use crate::config::Config;
use crate::runtime::manifest::{Grants, MailGrant};

/// A sender grant must look like an address.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    if let MailGrant::Senders { senders } = &grants.mail {
        if let Some(bad) = senders.iter().find(|s| !s.contains('@')) {
            return Err(GrantError { grant: "mail", reason: format!("sender {bad:?} is not an email address") });
        }
    }
    Ok(())
}

/// The process-wide mail backend, shared by every job.
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

/// Per-job state of the mail interface.
pub struct MailCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    #[allow(dead_code)] // read once the backend is wired in
    backend: Arc<Backend>,
    pub(super) record: Record,
}

impl MailCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, backend: Arc<Backend>) -> Self {
        MailCap { info, grants, backend, record: Record::default() }
    }
}

impl Host for MailCap {
    async fn send(&mut self, msg: Message) -> Result<String, HostError> {
        let sender = msg.from.as_ref().map(|a| a.email.as_str());
        let allowed = match (&self.grants.mail, sender) {
            (MailGrant::Senders { senders }, Some(s)) => senders.iter().any(|g| g == s),
            (MailGrant::Senders { .. }, None) => true,
            (grant, _) => grant.allowed(),
        };
        if !allowed {
            let what = match sender {
                Some(s) => format!("send from {s}"),
                None => "send".to_string(),
            };
            return Err(self.record.deny(&self.info, "mail", what));
        }
        Err(not_configured("mail"))
    }
}

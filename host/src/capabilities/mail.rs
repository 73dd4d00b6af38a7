//! `celer:plugin/mail`: outgoing mail when the manifest says `mail = true`
//! (optionally from granted senders only).
//!
//! This build has no mail transport wired in: a granted call returns
//! `unavailable`; a call outside the grants returns `denied` first.

use std::sync::Arc;

use super::{GrantError, JobInfo, Record, not_configured};
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::mail::{Host, Message};
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

/// Per-job state of the mail interface.
pub struct MailCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    pub(super) record: Record,
}

impl MailCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>) -> Self {
        MailCap { info, grants, record: Record::default() }
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

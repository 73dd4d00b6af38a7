//! `celer:plugin/mail`: outgoing mail when the manifest says `mail = true`
//! (or `mail = { senders = [...] }`: only from those addresses).
//!
//! Two transports behind one [`Backend`], chosen by `[mail] url`
//! (`CELER_SMTP_URL`):
//! * `file://dir` — an outbox of `.eml` files ([`outbox`]); the embedded
//!   default is `file://<data_dir>/outbox`;
//! * `smtp://…` / `smtps://…` — an SMTP relay ([`smtp`]).
//!
//! A message is checked and built by [`compose`] before it reaches either:
//! a bad request is `invalid`, a relay that is down is `unavailable` (the
//! job retries with backoff), a relay that refuses the message for good
//! (5xx) is `invalid`. Every message sent is recorded in the job's
//! `touched.mail` (Message-ID, number of recipients, subject).

pub mod compose;
pub mod outbox;
pub mod smtp;

use std::path::PathBuf;
use std::sync::Arc;

use lettre::message::Mailbox;
use serde_json::json;

use super::{BackendError, GrantError, JobInfo, Record};
use crate::config::Config;
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::mail::{Host, Message};
use crate::runtime::manifest::{Grants, MailGrant};

/// A sender grant must look like an address.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    if let MailGrant::Senders { senders } = &grants.mail
        && let Some(bad) = senders.iter().find(|s| s.parse::<lettre::Address>().is_err())
    {
        return Err(GrantError { grant: "mail", reason: format!("sender {bad:?} is not an email address") });
    }
    Ok(())
}

enum Transport {
    Outbox(outbox::Outbox),
    Smtp(smtp::Smtp),
}

/// The process-wide mail backend, shared by every job.
pub struct Backend {
    transport: Transport,
    /// `[mail] from`: the sender of a message that names none.
    default_from: Mailbox,
}

fn backend_error(reason: impl Into<String>) -> BackendError {
    BackendError { capability: "mail", reason: reason.into() }
}

impl Backend {
    /// Prepares what the configuration names; nothing is sent. An SMTP relay
    /// that is down is not an error here: sends return `unavailable` until
    /// it answers. A URL or sender that cannot be meant is.
    pub async fn connect(config: &Config) -> Result<Backend, BackendError> {
        let default_from: Mailbox = config
            .mail
            .from
            .parse()
            .map_err(|e| backend_error(format!("[mail] from = {:?} is not a mailbox: {e}", config.mail.from)))?;
        let url = config.mail.url.as_deref().map(str::trim).filter(|u| !u.is_empty());
        let transport = match url {
            None => Transport::Outbox(outbox::Outbox::new(config.data_dir.join("outbox")).map_err(backend_error)?),
            Some(u) if u.starts_with("file:") => Transport::Outbox(outbox::Outbox::new(file_url_path(u)).map_err(backend_error)?),
            Some(u) => Transport::Smtp(smtp::Smtp::new(u).map_err(backend_error)?),
        };
        match &transport {
            Transport::Outbox(o) => tracing::info!(backend = "outbox", dir = %o.dir().display(), "mail ready"),
            Transport::Smtp(s) => tracing::info!(backend = "smtp", relay = %s.display(), "mail ready"),
        }
        Ok(Backend { transport, default_from })
    }

    /// `"outbox"` or `"smtp"`.
    pub fn kind(&self) -> &'static str {
        match self.transport {
            Transport::Outbox(_) => "outbox",
            Transport::Smtp(_) => "smtp",
        }
    }

    /// Prepares the backend for a plugin at load (nothing to do for mail).
    pub async fn prepare(&self, _plugin: &str, _grants: &Grants) -> Result<(), GrantError> {
        Ok(())
    }

    /// Whether the backend answers, for `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        match &self.transport {
            Transport::Outbox(o) => o.ping().await,
            Transport::Smtp(s) => s.ping().await,
        }
    }

    /// Checks, builds and sends one message; returns its Message-ID and the
    /// number of recipients.
    pub async fn send(&self, msg: &Message) -> Result<(String, usize), HostError> {
        match &self.transport {
            Transport::Outbox(o) => {
                let c = compose::compose(msg, &self.default_from, true)?;
                o.write(&c.message_id, c.message.formatted())
                    .await
                    .map_err(|e| HostError::Unavailable(format!("mail: {e}")))?;
                Ok((c.message_id, c.recipients))
            }
            Transport::Smtp(s) => {
                let c = compose::compose(msg, &self.default_from, false)?;
                s.send(c.message).await.map_err(|e| match e {
                    smtp::SendError::Rejected(m) => HostError::Invalid(format!("mail: {m}")),
                    smtp::SendError::Unavailable(m) => HostError::Unavailable(format!("mail: {m}")),
                })?;
                Ok((c.message_id, c.recipients))
            }
        }
    }
}

/// `file:///abs/dir` → `/abs/dir`; `file://rel/dir` (or `file:rel/dir`) →
/// `rel/dir`, relative to the working directory.
fn file_url_path(url: &str) -> PathBuf {
    let rest = url.strip_prefix("file://").or_else(|| url.strip_prefix("file:")).unwrap_or(url);
    PathBuf::from(percent_encoding::percent_decode_str(rest).decode_utf8_lossy().into_owned())
}

/// Per-job state of the mail interface.
pub struct MailCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
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
        let sender = msg.from.as_ref().map(|a| a.email.trim());
        let allowed = match (&self.grants.mail, sender) {
            (MailGrant::Senders { senders }, Some(s)) => senders.iter().any(|g| g.eq_ignore_ascii_case(s)),
            (MailGrant::Senders { .. }, None) => true,
            (grant, _) => grant.allowed(),
        };
        if !allowed {
            let what = match sender {
                Some(s) if self.grants.mail.allowed() => format!("send from {s}"),
                _ => "send".to_string(),
            };
            return Err(self.record.deny(&self.info, "mail", what));
        }
        let result = self.backend.send(&msg).await;
        let info = &self.info;
        match &result {
            Ok((message_id, recipients)) => {
                tracing::info!(
                    job_id = %info.job_id, task = %info.task, plugin = %info.plugin, attempt = info.attempt,
                    message_id = %message_id, recipients, backend = self.backend.kind(), "mail sent"
                );
                self.record.used(json!({"message_id": message_id, "recipients": recipients, "subject": msg.subject}));
            }
            Err(e) => {
                let kind = match e {
                    HostError::Unavailable(m) => {
                        tracing::warn!(
                            job_id = %info.job_id, task = %info.task, plugin = %info.plugin, attempt = info.attempt,
                            error = %m, "mail unavailable"
                        );
                        "unavailable"
                    }
                    HostError::Invalid(_) => "invalid",
                    HostError::BudgetExceeded(_) => "budget-exceeded",
                    HostError::Denied(_) => "denied",
                };
                self.record.used(json!({"subject": msg.subject, "error": kind}));
            }
        }
        result.map(|(id, _)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls() {
        assert_eq!(file_url_path("file:///var/mail/out"), PathBuf::from("/var/mail/out"));
        assert_eq!(file_url_path("file://celer-data/outbox"), PathBuf::from("celer-data/outbox"));
        assert_eq!(file_url_path("file:out%20box"), PathBuf::from("out box"));
    }

    #[test]
    fn sender_grants_must_be_addresses() {
        let mut g = Grants { mail: MailGrant::Senders { senders: vec!["noreply@example.com".into()] }, ..Grants::default() };
        assert!(check_grants(&g).is_ok());
        g.mail = MailGrant::Senders { senders: vec!["noreply".into()] };
        assert!(check_grants(&g).is_err());
    }

    #[tokio::test]
    async fn the_embedded_default_writes_to_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let b = Backend::connect(&config).await.unwrap();
        assert_eq!(b.kind(), "outbox");
        let msg = Message {
            from: None,
            to: vec![crate::runtime::bindings::celer::plugin::mail::Address { email: "a@example.com".into(), name: None }],
            cc: vec![],
            bcc: vec![],
            reply_to: None,
            subject: "hi".into(),
            text: Some("hello".into()),
            html: None,
            headers: vec![],
        };
        let (id, n) = b.send(&msg).await.unwrap();
        assert_eq!(n, 1);
        let eml = std::fs::read_to_string(dir.path().join("outbox").join(format!("{}.eml", outbox::file_stem(&id)))).unwrap();
        assert!(eml.contains("Subject: hi") && eml.contains("From: celer@localhost"), "{eml}");
    }
}

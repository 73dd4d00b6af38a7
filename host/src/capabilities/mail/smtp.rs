//! The SMTP relay, through lettre's pooled async transport.
//!
//! | URL | connection | default port |
//! |---|---|---|
//! | `smtp://host:port` | STARTTLS when the relay offers it (opportunistic) | 587 |
//! | `smtp://host:port?tls=required` | STARTTLS or fail | 587 |
//! | `smtp://host:port?tls=none` | plain text, for a relay on the same machine | 587 |
//! | `smtps://host:port` | TLS from the first byte (implicit TLS) | 465 |
//!
//! `user:password@` in the URL (percent-encoded) authenticates; TLS
//! certificates are checked against the Mozilla roots (webpki-roots). The
//! URL's credentials never appear in logs or errors.

use std::time::Duration;

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::{Error as SmtpError, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use percent_encoding::percent_decode_str;

/// How long one SMTP connection or command may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a sending failure means for the job.
#[derive(Debug)]
pub enum SendError {
    /// The relay refused this message for good (a 5xx reply that is not
    /// about the host's own credentials): retrying the same mail cannot help.
    Rejected(String),
    /// Down, unreachable, timed out, TLS failed, a 4xx reply, or the relay
    /// refused the host's credentials: worth a retry.
    Unavailable(String),
}

/// An SMTP relay.
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    display: String,
}

impl Smtp {
    /// Parses the URL and prepares the pool; nothing is connected yet.
    pub fn new(url: &str) -> Result<Smtp, String> {
        let u = url::Url::parse(url).map_err(|e| format!("invalid mail URL: {e}"))?;
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or("the mail URL names no host")?.to_string();
        // A bracketed IPv6 literal is a host name for the socket, not for TLS.
        let tls_name = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let mut tls_mode = None;
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "tls" => tls_mode = Some(v.into_owned()),
                other => return Err(format!("unknown mail URL parameter {other:?} (known: tls)")),
            }
        }
        let params = || TlsParameters::new(tls_name.clone()).map_err(|e| format!("TLS setup for {tls_name}: {e}"));
        let (tls, default_port, mode) = match (u.scheme(), tls_mode.as_deref()) {
            ("smtps", None) => (Tls::Wrapper(params()?), 465, "implicit TLS"),
            ("smtp", None | Some("opportunistic")) => (Tls::Opportunistic(params()?), 587, "STARTTLS when offered"),
            ("smtp", Some("required")) => (Tls::Required(params()?), 587, "STARTTLS required"),
            ("smtp", Some("none")) => (Tls::None, 587, "plain text"),
            ("smtps", Some(other)) => return Err(format!("smtps:// is always TLS; drop tls={other}")),
            ("smtp", Some(other)) => return Err(format!("tls={other:?}: expected required, opportunistic or none")),
            (scheme, _) => return Err(format!("unsupported mail URL scheme {scheme:?} (smtp, smtps or file)")),
        };
        let port = u.port().unwrap_or(default_port);
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(port)
            .tls(tls)
            .timeout(Some(TIMEOUT))
            .pool_config(PoolConfig::new().max_size(8).idle_timeout(Duration::from_secs(30)));
        if !u.username().is_empty() {
            let decode = |s: &str| percent_decode_str(s).decode_utf8().map(|c| c.into_owned());
            let user = decode(u.username()).map_err(|_| "the mail URL's user name is not UTF-8")?;
            let password = decode(u.password().unwrap_or("")).map_err(|_| "the mail URL's password is not UTF-8")?;
            builder = builder.credentials(Credentials::new(user, password));
        }
        let transport: AsyncSmtpTransport<Tokio1Executor> = builder.build();
        let auth = if u.username().is_empty() { "" } else { ", authenticated" };
        Ok(Smtp { transport, display: format!("{}://{host}:{port} ({mode}{auth})", u.scheme()) })
    }

    /// The relay without credentials, for logs.
    pub fn display(&self) -> &str {
        &self.display
    }

    pub async fn send(&self, message: lettre::Message) -> Result<(), SendError> {
        self.transport.send(message).await.map(drop).map_err(|e| classify(&self.display, &e))
    }

    /// Opens (or reuses) a connection and says `NOOP`.
    pub async fn ping(&self) -> Result<(), String> {
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("SMTP relay {} did not answer NOOP", self.display)),
            Err(e) => Err(format!("SMTP relay {}: {e}", self.display)),
        }
    }
}

fn classify(display: &str, e: &SmtpError) -> SendError {
    let message = format!("SMTP relay {display}: {e}");
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    // 530/534/535/538: authentication is the host's configuration, not the
    // message; the operator can fix it while the job waits.
    let about_credentials = code.starts_with("53");
    match e.is_permanent() && !about_credentials {
        true => SendError::Rejected(message),
        false => SendError::Unavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_pick_port_and_tls() {
        let cases = [
            ("smtp://mail.example.com", "smtp://mail.example.com:587 (STARTTLS when offered)"),
            ("smtp://mail.example.com:2525?tls=required", "smtp://mail.example.com:2525 (STARTTLS required)"),
            ("smtp://127.0.0.1:25?tls=none", "smtp://127.0.0.1:25 (plain text)"),
            ("smtps://u:p%40ss@mail.example.com", "smtps://mail.example.com:465 (implicit TLS, authenticated)"),
        ];
        for (url, display) in cases {
            assert_eq!(Smtp::new(url).map(|s| s.display).unwrap(), display, "{url}");
        }
    }

    #[tokio::test]
    async fn bad_urls_are_refused_without_their_secret() {
        for url in [
            "smtp://u:s3cret@mail.example.com?tls=sometimes",
            "smtps://u:s3cret@mail.example.com?tls=none",
            "smtp://u:s3cret@mail.example.com?timeout=3",
            "imap://u:s3cret@mail.example.com",
            "smtp://u:s3cret@",
        ] {
            let err = Smtp::new(url).err().unwrap_or_else(|| panic!("{url} accepted"));
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}

//! The `mail` capability end to end: a probe plugin sends from inside real
//! `celer serve` processes, to the SMTP sink of `scripts/services.sh` (which
//! writes every message it receives, with its envelope, to an inbox
//! directory this test reads) and to the `file://` outbox of the embedded
//! default.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use celer_integration::{Env, TEST_CONFIG, plugin_wasm, repo_root, services};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    format!("{}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

const MANIFEST: &str = "tests/plugins/mail-probe/celer-plugin.toml";

fn install_probe_with(env: &Env, manifest: &str) {
    env.install_files("mail_probe", &std::fs::read(plugin_wasm("mail_probe")).expect("wasm"), manifest);
}

fn install_probe(env: &Env) {
    install_probe_with(env, &std::fs::read_to_string(repo_root().join(MANIFEST)).expect("manifest"));
}

/// Where the SMTP sink writes what it receives (scripts/services/smtp.sh).
fn sink_inbox() -> PathBuf {
    let services = std::env::var_os("SERVICES_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/services"));
    services.join("smtp/inbox")
}

/// A message with every field set, tagged with `token`.
fn full_message(token: &str) -> Value {
    json!({
        "from": {"email": "probe@celer.test", "name": "Celer Probe"},
        "to": [{"email": "ann@example.test", "name": "Ann Example"}, {"email": "al@example.test"}],
        "cc": [{"email": "bob@example.test"}],
        "bcc": [{"email": "carl@example.test"}],
        "reply_to": {"email": "support@celer.test"},
        "subject": format!("Your export is ready {token}"),
        "text": "Your export is ready. Download it within 7 days.",
        "html": "<p>Your export is <b>ready</b>.</p>",
        "headers": [["X-Celer-Test", token], ["List-Unsubscribe", "<mailto:unsubscribe@celer.test>"]],
    })
}

/// Runs `mail_probe.send`; returns the final status of a job that succeeded.
fn send(env: &Env, message: Value) -> Value {
    let id = env.enqueue("mail_probe.send", &["--kwargs", &json!({ "message": message }).to_string()]);
    env.wait_state(&id, "succeeded", T)
}

/// One parsed RFC 5322 message (or MIME part): unfolded headers and body.
struct Eml {
    headers: Vec<(String, String)>,
    body: String,
}

impl Eml {
    fn parse(text: &str) -> Eml {
        let text = text.replace("\r\n", "\n");
        let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some(last) = headers.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            } else if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        Eml { headers, body: body.to_string() }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn content_type(&self) -> String {
        self.header("Content-Type").unwrap_or("text/plain").to_ascii_lowercase()
    }

    /// The parts of a multipart body.
    fn parts(&self) -> Vec<Eml> {
        let ct = self.header("Content-Type").unwrap_or_default();
        let boundary = ct
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("boundary="))
            .next()
            .unwrap_or_else(|| panic!("no boundary in {ct:?}"))
            .trim_matches('"')
            .to_string();
        let delimiter = format!("--{boundary}");
        let mut parts = Vec::new();
        for chunk in self.body.split(&delimiter).skip(1) {
            if chunk.starts_with("--") {
                break;
            }
            parts.push(Eml::parse(chunk.trim_start_matches('\n')));
        }
        parts
    }

    /// The body, decoded from quoted-printable when so encoded.
    fn text(&self) -> String {
        match self.header("Content-Transfer-Encoding").map(str::to_ascii_lowercase).as_deref() {
            Some("quoted-printable") => {
                let soft = self.body.replace("=\n", "");
                let mut out = Vec::new();
                let bytes = soft.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i] == b'=' && i + 2 < bytes.len() {
                        if let Ok(b) = u8::from_str_radix(&soft[i + 1..i + 3], 16) {
                            out.push(b);
                            i += 3;
                            continue;
                        }
                    }
                    out.push(bytes[i]);
                    i += 1;
                }
                String::from_utf8_lossy(&out).trim_end().to_string()
            }
            _ => self.body.trim_end().to_string(),
        }
    }
}

/// Waits for the sink to have received the message tagged `token`; returns
/// the message and its SMTP envelope.
fn received(token: &str) -> (Eml, Value) {
    let deadline = Instant::now() + T;
    loop {
        let found = std::fs::read_dir(sink_inbox()).into_iter().flatten().flatten().map(|e| e.path()).find(|p| {
            p.extension().is_some_and(|x| x == "eml") && std::fs::read_to_string(p).is_ok_and(|t| t.contains(token))
        });
        if let Some(path) = found {
            let eml = Eml::parse(&std::fs::read_to_string(&path).expect("eml"));
            let envelope = serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).expect("envelope")).expect("json");
            return (eml, envelope);
        }
        assert!(Instant::now() < deadline, "the SMTP sink never received {token} (is it up? scripts/services.sh status)");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_full_message(eml: &Eml, token: &str, message_id: &str) {
    let from = eml.header("From").expect("From");
    assert!(from.contains("Celer Probe") && from.ends_with("<probe@celer.test>"), "From: {from}");
    let to = eml.header("To").expect("To");
    assert!(to.contains("ann@example.test") && to.contains("Ann Example") && to.contains("al@example.test"), "To: {to}");
    assert_eq!(eml.header("Cc"), Some("bob@example.test"));
    assert_eq!(eml.header("Reply-To"), Some("support@celer.test"));
    assert_eq!(eml.header("Subject"), Some(format!("Your export is ready {token}").as_str()));
    assert_eq!(eml.header("Message-ID"), Some(message_id));
    assert_eq!(eml.header("X-Celer-Test"), Some(token));
    assert_eq!(eml.header("List-Unsubscribe"), Some("<mailto:unsubscribe@celer.test>"));
    assert!(eml.header("Date").is_some(), "Date");
    assert!(eml.content_type().starts_with("multipart/alternative"), "{}", eml.content_type());
    let parts = eml.parts();
    assert_eq!(parts.len(), 2, "text and HTML");
    assert!(parts[0].content_type().starts_with("text/plain"), "{}", parts[0].content_type());
    assert_eq!(parts[0].text(), "Your export is ready. Download it within 7 days.");
    assert!(parts[1].content_type().starts_with("text/html"), "{}", parts[1].content_type());
    assert_eq!(parts[1].text(), "<p>Your export is <b>ready</b>.</p>");
}

#[test]
fn a_full_message_arrives_at_the_smtp_sink_with_its_headers_and_both_parts() {
    let env = Env::new().var("CELER_SMTP_URL", services::SMTP_URL);
    install_probe(&env);
    let server = env.serve();
    let token = unique();
    let status = send(&env, full_message(&token));
    let message_id = status["result"]["ok"].as_str().unwrap_or_else(|| panic!("no Message-ID: {status:#}")).to_string();
    assert!(message_id.starts_with('<') && message_id.ends_with("@celer.test>"), "{message_id}");

    let (eml, envelope) = received(&token);
    check_full_message(&eml, &token, &message_id);
    assert!(eml.header("Bcc").is_none(), "Bcc travels in the envelope only");
    assert_eq!(envelope["mail_from"], "probe@celer.test");
    let mut rcpt: Vec<&str> = envelope["rcpt_tos"].as_array().expect("rcpt").iter().filter_map(Value::as_str).collect();
    rcpt.sort_unstable();
    assert_eq!(rcpt, ["al@example.test", "ann@example.test", "bob@example.test", "carl@example.test"]);

    assert_eq!(
        status["touched"]["mail"],
        json!([{"message_id": message_id, "recipients": 4, "subject": format!("Your export is ready {token}")}]),
        "{status:#}"
    );
    let log = server.wait_log("mail sent", T);
    assert!(!log.contains("carl@example.test"), "recipients are not logged:\n{log}");
}

#[test]
fn without_configuration_mail_goes_to_the_outbox() {
    let env = Env::new();
    install_probe(&env);
    let _server = env.serve();
    let token = unique();
    let status = send(&env, full_message(&token));
    let message_id = status["result"]["ok"].as_str().unwrap_or_else(|| panic!("{status:#}")).to_string();
    let file = env.data.join("outbox").join(format!("{}.eml", message_id.trim_matches(['<', '>'])));
    let eml = Eml::parse(&std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())));
    check_full_message(&eml, &token, &message_id);
    assert_eq!(eml.header("Bcc"), Some("carl@example.test"), "the outbox keeps Bcc: a file has no envelope");
    let leftovers: Vec<_> = std::fs::read_dir(env.data.join("outbox")).expect("outbox").flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "no temporary files left behind");
}

#[test]
fn a_file_url_names_the_outbox_and_the_default_sender_is_used() {
    let dir = tempfile::tempdir().expect("tmp");
    let outbox: &Path = dir.path();
    let config = format!("{TEST_CONFIG}\n[mail]\nfrom = \"Celer Jobs <jobs@celer.test>\"\n");
    let env = Env::with_config(&config).var("CELER_SMTP_URL", &format!("file://{}", outbox.display()));
    install_probe(&env);
    let _server = env.serve();
    let status = send(&env, json!({"to": [{"email": "ann@example.test"}], "subject": "plain", "text": "just text"}));
    let message_id = status["result"]["ok"].as_str().unwrap_or_else(|| panic!("{status:#}")).to_string();
    assert!(message_id.ends_with("@celer.test>"), "{message_id}");
    let file = outbox.join(format!("{}.eml", message_id.trim_matches(['<', '>'])));
    let eml = Eml::parse(&std::fs::read_to_string(&file).expect("eml in the configured outbox"));
    let from = eml.header("From").expect("From");
    assert!(from.contains("Celer Jobs") && from.ends_with("<jobs@celer.test>"), "From: {from}");
    assert!(eml.content_type().starts_with("text/plain"), "one part only: {}", eml.content_type());
    assert_eq!(eml.text(), "just text");
    assert!(!env.data.join("outbox").exists(), "nothing in the default outbox");
}

#[test]
fn a_sender_outside_the_grants_is_denied_and_nothing_is_sent() {
    let env = Env::new();
    install_probe(&env);
    let server = env.serve();
    let mut message = full_message(&unique());
    message["from"] = json!({"email": "ceo@elsewhere.test"});
    let status = send(&env, message);
    assert_eq!(status["result"]["err"]["kind"], "denied", "{status:#}");
    assert_eq!(status["touched"]["denials"], json!([{"capability": "mail", "what": "send from ceo@elsewhere.test"}]), "{status:#}");
    assert!(status["touched"].get("mail").is_none(), "{status:#}");
    let sent = std::fs::read_dir(env.data.join("outbox")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(sent, 0, "nothing written");
    server.wait_log("denied", T);
}

#[test]
fn a_plugin_without_the_mail_grant_is_denied() {
    let env = Env::new();
    let manifest = std::fs::read_to_string(repo_root().join(MANIFEST)).expect("manifest");
    let without: String = manifest.lines().filter(|l| !l.starts_with("mail")).map(|l| format!("{l}\n")).collect();
    assert_ne!(without, manifest);
    install_probe_with(&env, &without);
    let _server = env.serve();
    let mut message = full_message(&unique());
    message["from"] = Value::Null;
    let status = send(&env, message);
    assert_eq!(status["result"]["err"]["kind"], "denied", "{status:#}");
    assert_eq!(status["touched"]["denials"][0]["capability"], "mail", "{status:#}");
}

#[test]
fn bad_messages_are_invalid() {
    let env = Env::new();
    install_probe(&env);
    let _server = env.serve();
    let token = unique();
    let cases = [
        ("a Bcc header", json!({"headers": [["Bcc", "spy@elsewhere.test"]]})),
        ("a From header", json!({"headers": [["From", "ceo@elsewhere.test"]]})),
        ("header injection", json!({"subject": "hi\r\nBcc: spy@elsewhere.test"})),
        ("no recipients", json!({"to": [], "cc": [], "bcc": []})),
        ("no body", json!({"text": null, "html": null})),
        ("a bad address", json!({"to": [{"email": "not an address"}]})),
    ];
    for (what, change) in cases {
        let mut message = full_message(&token);
        for (k, v) in change.as_object().expect("object") {
            message[k] = v.clone();
        }
        let status = send(&env, message);
        assert_eq!(status["result"]["err"]["kind"], "invalid", "{what}: {status:#}");
    }
    let sent = std::fs::read_dir(env.data.join("outbox")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(sent, 0, "nothing written");
}

#[test]
fn smtp_down_is_unavailable_and_the_job_retries_never_succeeds() {
    let url = format!("smtp://probe:s3cret@127.0.0.1:{}", services::CLOSED_PORT);
    let env = Env::new().var("CELER_SMTP_URL", &url);
    install_probe(&env);
    let server = env.serve(); // a relay that is down does not keep the host from starting
    let status = send(&env, full_message(&unique()));
    assert_eq!(status["result"]["err"]["kind"], "unavailable", "{status:#}");
    assert_eq!(status["touched"]["mail"][0]["error"], "unavailable", "{status:#}");

    let kwargs = json!({"message": full_message(&unique()), "propagate": true}).to_string();
    let id = env.enqueue("mail_probe.send", &["--kwargs", &kwargs, "--max-retries", "1"]);
    let retrying = env.wait_state(&id, "retrying", T);
    assert_eq!(retrying["attempt"], 1, "{retrying:#}");
    let failed = env.wait_for(&id, T, |s| s["state"] == "failed" || s["state"] == "succeeded");
    assert_eq!(failed["state"], "failed", "never succeeded: {failed:#}");
    let (kind, message) = (failed["error"]["kind"].as_str().unwrap_or(""), failed["error"]["message"].as_str().unwrap_or(""));
    assert!(kind == "unavailable" || message.starts_with("unavailable"), "{failed:#}");
    let log = server.log();
    assert!(!log.contains("s3cret") && !failed.to_string().contains("s3cret"), "a secret leaked:\n{log}\n{failed:#}");
}

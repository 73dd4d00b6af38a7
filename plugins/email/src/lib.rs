//! `email`: transactional mail from templates, the Celery `send_*_email`
//! tasks of the seeds.
//!
//! * `email.send(template, to?, user_id?, context?, language?)` renders one
//!   of the templates in `templates.rs` (password_reset,
//!   account_confirmation, notification, welcome, export_ready) as text +
//!   HTML, in the recipient's language when the template exists in it
//!   (English otherwise), and sends it through the host's `mail`
//!   capability. With `user_id`, the address, name and language come from
//!   the `users` table; `to` (an address, or `{email, name}`) overrides the
//!   address.
//! * `email.welcome(user_id)`: the `welcome` template for that user — the
//!   target of the seeds' `send_welcome_email` alias.
//!
//! A relay that is down (`unavailable`) makes the job retry with the host's
//! backoff; a bad address or a template that misses a context key fails it
//! for good. A delivered job is remembered in the cache for a week under
//! `email_sent_<job id>`, so that a redelivered job (its host died after
//! sending) does not send twice; the cache being away never stops a mail.

pub mod templates;

use celer_plugin::database::{self, Value as Db};
use celer_plugin::mail::{self, Address, Message};
use celer_plugin::{Context, HostError, TaskError, cache};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

celer_plugin::plugin! {
    name: "email",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "email.send" => send,
        "email.welcome" => welcome,
    }
}

/// The manifest's `[config]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Shown in subjects and footers.
    pub app_name: String,
    /// The product's address, for `welcome`.
    pub app_url: Option<String>,
    pub support_email: Option<String>,
    /// The sender; the host's default sender when absent.
    pub from_email: Option<String>,
    pub from_name: Option<String>,
    /// Language when neither the job nor the user says.
    pub default_language: String,
    /// How long a sent job is remembered (cache), in hours.
    pub dedupe_hours: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            app_name: "celer".into(),
            app_url: None,
            support_email: None,
            from_email: None,
            from_name: None,
            default_language: templates::FALLBACK.into(),
            dedupe_hours: 24 * 7,
        }
    }
}

/// A recipient: `"ann@example.com"` or `{"email": "…", "name": "…"}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Recipient {
    Email(String),
    Named { email: String, name: Option<String> },
}

#[derive(Debug, Deserialize)]
pub struct Send {
    pub template: String,
    pub to: Option<Recipient>,
    pub user_id: Option<i64>,
    pub context: Option<Map<String, Value>>,
    pub language: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Sent {
    /// The Message-ID the host gave the mail; `None` when skipped.
    pub message_id: Option<String>,
    pub template: String,
    pub language: String,
    pub to: String,
    /// Why nothing was sent, when nothing was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// A user row: what a mail needs to know about its recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub email: String,
    pub name: String,
    pub language: String,
}

fn send(ctx: &Context, args: Send) -> Result<Sent, TaskError> {
    let config: Config = ctx.config()?;
    let user = match args.user_id {
        Some(id) => Some(load_user(id)?.ok_or_else(|| TaskError::fail(format!("no user with id {id}")))?),
        None => None,
    };
    let plan = plan(&config, args, user).map_err(TaskError::fail)?;
    deliver(ctx, &config, plan)
}

#[derive(Debug, Deserialize)]
struct Welcome {
    user_id: i64,
}

fn welcome(ctx: &Context, Welcome { user_id }: Welcome) -> Result<Sent, TaskError> {
    send(ctx, Send { template: "welcome".into(), to: None, user_id: Some(user_id), context: None, language: None })
}

fn load_user(id: i64) -> Result<Option<User>, HostError> {
    let rows = database::query_all("SELECT email, name, language FROM users WHERE id = $1", &[Db::Int(id)])?;
    Ok(rows.into_iter().next().map(|row| {
        let text = |i: usize| row.get(i).and_then(Db::as_str).unwrap_or_default().to_owned();
        User { email: text(0), name: text(1), language: text(2) }
    }))
}

/// Everything decided before talking to the host: pure, unit-tested.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub template: String,
    pub to: Address,
    pub message: Message,
    pub language: &'static str,
}

/// Chooses the recipient and language, fills the context's defaults and
/// renders the mail. An `Err` is a permanent failure (the caller's mistake).
pub fn plan(config: &Config, args: Send, user: Option<User>) -> Result<Plan, String> {
    let (email, name) = match (&args.to, &user) {
        (Some(Recipient::Email(e)), u) => (e.clone(), u.as_ref().map(|u| u.name.clone())),
        (Some(Recipient::Named { email, name }), u) => {
            (email.clone(), name.clone().or_else(|| u.as_ref().map(|u| u.name.clone())))
        }
        (None, Some(u)) => (u.email.clone(), Some(u.name.clone())),
        (None, None) => return Err("give `to` or `user_id`: the mail has no recipient".into()),
    };
    if email.trim().is_empty() {
        return Err("the recipient has no email address".into());
    }
    let name = name.filter(|n| !n.trim().is_empty());
    let language = args
        .language
        .clone()
        .or_else(|| user.as_ref().map(|u| u.language.clone()))
        .filter(|l| !l.trim().is_empty())
        .unwrap_or_else(|| config.default_language.clone());

    let mut context = args.context.unwrap_or_default();
    let greeting_name = name.clone().unwrap_or_else(|| email.split('@').next().unwrap_or_default().to_owned());
    context.entry("name").or_insert_with(|| json!(greeting_name));
    context.entry("email").or_insert_with(|| json!(email));
    context.entry("app_name").or_insert_with(|| json!(config.app_name));
    if let Some(url) = &config.app_url {
        context.entry("app_url").or_insert_with(|| json!(url));
    }
    if let Some(support) = &config.support_email {
        context.entry("support_email").or_insert_with(|| json!(support));
    }

    let rendered = templates::render_mail(&args.template, &language, &context).map_err(|e| e.0)?;
    let to = Address { email: email.trim().to_owned(), name };
    let from = config.from_email.as_ref().map(|e| Address { email: e.clone(), name: config.from_name.clone() });
    let message = Message {
        from,
        to: vec![to.clone()],
        cc: Vec::new(),
        bcc: Vec::new(),
        reply_to: None,
        subject: rendered.subject,
        text: Some(rendered.text),
        html: Some(rendered.html),
        headers: vec![("X-Celer-Template".into(), args.template.clone())],
    };
    Ok(Plan { template: args.template, to, message, language: rendered.language })
}

fn deliver(ctx: &Context, config: &Config, mut plan: Plan) -> Result<Sent, TaskError> {
    let sent_key = format!("email_sent_{}", ctx.job_id());
    let mut sent = Sent {
        message_id: None,
        template: plan.template.clone(),
        language: plan.language.to_owned(),
        to: plan.to.email.clone(),
        skipped: None,
    };
    match cache::get(&sent_key) {
        Ok(Some(previous)) => {
            sent.message_id = Some(String::from_utf8_lossy(&previous).into_owned());
            sent.skipped = Some("already sent by an earlier delivery of this job".into());
            ctx.info(format!("email.send: job {} already sent its mail; not sending twice", ctx.job_id()));
            return Ok(sent);
        }
        Ok(None) => {}
        Err(e) => ctx.warn(format!("email.send: cannot check the sent-marker ({e:?}); sending anyway")),
    }
    plan.message.headers.push(("X-Celer-Job".into(), ctx.job_id().to_owned()));
    // A relay that is down (`unavailable`) is a retry with the host's
    // backoff; anything else fails for good (the SDK's mapping).
    let message_id = mail::send(&plan.message)?;
    let ttl_ms = config.dedupe_hours.saturating_mul(3_600_000);
    if let Err(e) = cache::set(&sent_key, message_id.as_bytes(), Some(ttl_ms)) {
        ctx.warn(format!("email.send: sent, but cannot record the sent-marker ({e:?})"));
    }
    ctx.info(format!("email.send: {} ({}) to {}", plan.template, plan.language, plan.to.email));
    sent.message_id = Some(message_id);
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(lang: &str) -> User {
        User { email: "ann@example.com".into(), name: "Ann Lovelace".into(), language: lang.into() }
    }

    fn args(template: &str, context: Value) -> Send {
        Send { template: template.into(), to: None, user_id: Some(1), context: context.as_object().cloned(), language: None }
    }

    #[test]
    fn users_get_their_language_and_name() {
        let config = Config::default();
        let p = plan(&config, args("welcome", json!({})), Some(user("de"))).unwrap();
        assert_eq!(p.language, "de");
        assert_eq!(p.to, Address { email: "ann@example.com".into(), name: Some("Ann Lovelace".into()) });
        assert_eq!(p.message.subject, "Willkommen bei celer, Ann Lovelace");
        assert!(p.message.text.as_deref().unwrap().starts_with("Hallo Ann Lovelace,"));
        assert!(p.message.html.as_deref().unwrap().contains("lang=\"de\""));
        let p = plan(&config, args("welcome", json!({})), Some(user("fr"))).unwrap();
        assert_eq!(p.language, "en", "no French templates: English");
    }

    #[test]
    fn an_explicit_language_and_address_win() {
        let mut a = args("notification", json!({"title": "Hi", "message": "There"}));
        a.language = Some("en".into());
        a.to = Some(Recipient::Named { email: "other@example.com".into(), name: None });
        let p = plan(&Config::default(), a, Some(user("de"))).unwrap();
        assert_eq!(p.language, "en");
        assert_eq!(p.to, Address { email: "other@example.com".into(), name: Some("Ann Lovelace".into()) });
        assert_eq!(p.message.subject, "Hi");
    }

    #[test]
    fn a_bare_address_is_enough() {
        let a = Send {
            template: "account_confirmation".into(),
            to: Some(Recipient::Email("bo@example.com".into())),
            user_id: None,
            context: json!({"confirm_url": "https://x.test/c"}).as_object().cloned(),
            language: None,
        };
        let p = plan(&Config::default(), a, None).unwrap();
        assert_eq!(p.to.name, None);
        assert!(p.message.text.as_deref().unwrap().starts_with("Hello bo,"));
    }

    #[test]
    fn config_fills_app_fields_and_sender() {
        let config = Config {
            app_name: "Acme".into(),
            app_url: Some("https://acme.test".into()),
            from_email: Some("noreply@acme.test".into()),
            from_name: Some("Acme".into()),
            ..Config::default()
        };
        let p = plan(&config, args("welcome", json!({})), Some(user("en"))).unwrap();
        assert!(p.message.text.as_deref().unwrap().contains("Sign in at https://acme.test"));
        assert_eq!(p.message.from, Some(Address { email: "noreply@acme.test".into(), name: Some("Acme".into()) }));
        assert_eq!(p.message.headers, vec![("X-Celer-Template".to_owned(), "welcome".to_owned())]);
    }

    #[test]
    fn mistakes_are_permanent_and_clear() {
        let e = plan(&Config::default(), Send { user_id: None, ..args("welcome", json!({})) }, None).unwrap_err();
        assert!(e.contains("no recipient"), "{e}");
        let e = plan(&Config::default(), args("export_ready", json!({})), Some(user("en"))).unwrap_err();
        assert!(e.contains("needs `organization`"), "{e}");
        let e = plan(&Config::default(), args("nope", json!({})), Some(user("en"))).unwrap_err();
        assert!(e.contains("no template `nope`"), "{e}");
    }

    #[test]
    fn arguments_decode_from_celery_shapes() {
        let a: Send = celer_plugin::args::decode(r#"["welcome"]"#, r#"{"to": "a@b.c"}"#).unwrap();
        assert_eq!(a.to, Some(Recipient::Email("a@b.c".into())));
        let a: Send = celer_plugin::args::decode("[]", r#"{"template": "welcome", "to": {"email": "a@b.c", "name": "A"}}"#).unwrap();
        assert_eq!(a.to, Some(Recipient::Named { email: "a@b.c".into(), name: Some("A".into()) }));
        let w: Welcome = celer_plugin::args::decode("[42]", "{}").unwrap();
        assert_eq!(w.user_id, 42);
    }
}

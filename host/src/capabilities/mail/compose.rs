//! From the WIT `message` to an RFC 5322 message (lettre), with every check
//! that makes a bad request `invalid` before anything is sent.
//!
//! * At least one recipient, at most [`MAX_RECIPIENTS`] over to/cc/bcc;
//!   every address must parse.
//! * A text body, an HTML body, or both (then `multipart/alternative`, text
//!   first, as mail clients expect).
//! * No CR or LF in the subject, display names or header values: no header
//!   injection.
//! * Extra headers: `X-*`, `List-Unsubscribe` and `List-Unsubscribe-Post`
//!   only. Anything else (`Bcc`, `From`, `Sender`, `Received`…) would let a
//!   plugin change who the mail claims to be from or where it goes behind
//!   the grants, so it is refused.
//! * At most [`MAX_MESSAGE_BYTES`] of subject, bodies and headers:
//!   `budget-exceeded` past that.
//!
//! The Message-ID is `<uuid-v7@sender-domain>` and is returned to the
//! plugin.

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};

use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::mail::{Address, Message};

/// Most recipients (to + cc + bcc) of one message; most relays refuse more
/// than 100 `RCPT TO` per transaction anyway.
pub const MAX_RECIPIENTS: usize = 100;
/// Most bytes of subject, bodies and extra headers in one message.
pub const MAX_MESSAGE_BYTES: usize = 10 << 20;

/// A message ready for a transport.
pub struct Composed {
    pub message: lettre::Message,
    /// With its angle brackets: `<…@…>`.
    pub message_id: String,
    pub recipients: usize,
}

fn invalid(message: impl Into<String>) -> HostError {
    HostError::Invalid(format!("mail: {}", message.into()))
}

fn no_line_breaks(what: &str, value: &str) -> Result<(), HostError> {
    match value.contains(['\r', '\n']) {
        true => Err(invalid(format!("{what} contains a line break"))),
        false => Ok(()),
    }
}

/// A WIT address as a lettre mailbox; `invalid` when it does not parse.
pub fn mailbox(address: &Address) -> Result<Mailbox, HostError> {
    let email: lettre::Address =
        address.email.trim().parse().map_err(|e| invalid(format!("{:?} is not an email address: {e}", address.email)))?;
    if let Some(name) = &address.name {
        no_line_breaks("a display name", name)?;
    }
    Ok(Mailbox::new(address.name.clone().filter(|n| !n.trim().is_empty()), email))
}

/// Whether a plugin may set this header.
pub fn header_allowed(name: &str) -> bool {
    let x_header = name.len() > 2 && name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("X-"));
    x_header || name.eq_ignore_ascii_case("List-Unsubscribe") || name.eq_ignore_ascii_case("List-Unsubscribe-Post")
}

/// Builds the message. `keep_bcc` keeps the `Bcc` header in the output (for
/// the outbox, where there is no envelope to carry it).
pub fn compose(msg: &Message, default_from: &Mailbox, keep_bcc: bool) -> Result<Composed, HostError> {
    let from = match &msg.from {
        Some(a) => mailbox(a)?,
        None => default_from.clone(),
    };
    let recipients = msg.to.len() + msg.cc.len() + msg.bcc.len();
    if recipients == 0 {
        return Err(invalid("a message needs at least one recipient (to, cc or bcc)"));
    }
    if recipients > MAX_RECIPIENTS {
        return Err(HostError::BudgetExceeded(format!(
            "mail: {recipients} recipients, at most {MAX_RECIPIENTS} per message"
        )));
    }
    if msg.text.is_none() && msg.html.is_none() {
        return Err(invalid("a message needs a text or an HTML body"));
    }
    no_line_breaks("the subject", &msg.subject)?;
    let size = msg.subject.len()
        + msg.text.as_ref().map_or(0, String::len)
        + msg.html.as_ref().map_or(0, String::len)
        + msg.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(HostError::BudgetExceeded(format!("mail: {size} bytes of content, at most {MAX_MESSAGE_BYTES}")));
    }

    let message_id = format!("<{}@{}>", uuid::Uuid::now_v7().simple(), from.email.domain());
    let mut builder = lettre::Message::builder().from(from).subject(msg.subject.clone()).message_id(Some(message_id.clone()));
    for a in &msg.to {
        builder = builder.to(mailbox(a)?);
    }
    for a in &msg.cc {
        builder = builder.cc(mailbox(a)?);
    }
    for a in &msg.bcc {
        builder = builder.bcc(mailbox(a)?);
    }
    if let Some(a) = &msg.reply_to {
        builder = builder.reply_to(mailbox(a)?);
    }
    for (name, value) in &msg.headers {
        if !header_allowed(name) {
            return Err(invalid(format!("header {name:?} may not be set by a plugin (only X-*, List-Unsubscribe and List-Unsubscribe-Post)")));
        }
        let header = HeaderName::new_from_ascii(name.clone())
            .ok()
            .filter(|_| name.bytes().all(|b| (33..=126).contains(&b)))
            .ok_or_else(|| invalid(format!("{name:?} is not a valid header name")))?;
        no_line_breaks(&format!("header {name}"), value)?;
        builder = builder.raw_header(HeaderValue::new(header, value.clone()));
    }
    if keep_bcc {
        builder = builder.keep_bcc();
    }
    let built = match (&msg.text, &msg.html) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(text.clone(), html.clone())),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text.clone())),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html.clone())),
        (None, None) => unreachable!("checked above"),
    };
    let message = built.map_err(|e| invalid(e.to_string()))?;
    Ok(Composed { message, message_id, recipients })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(email: &str) -> Address {
        Address { email: email.into(), name: None }
    }

    fn message() -> Message {
        Message {
            from: None,
            to: vec![Address { email: "ann@example.com".into(), name: Some("Ann É".into()) }],
            cc: vec![addr("cc@example.com")],
            bcc: vec![addr("hidden@example.com")],
            reply_to: Some(addr("support@example.com")),
            subject: "Your export is ready".into(),
            text: Some("Download it here.".into()),
            html: Some("<p>Download it <a href=\"https://x\">here</a>.</p>".into()),
            headers: vec![("X-Celer-Test".into(), "1".into()), ("List-Unsubscribe".into(), "<mailto:u@example.com>".into())],
        }
    }

    fn default_from() -> Mailbox {
        "Celer <noreply@celer.example>".parse().unwrap()
    }

    fn text(c: &Composed) -> String {
        String::from_utf8(c.message.formatted()).unwrap()
    }

    #[test]
    fn a_full_message_has_every_header_and_both_parts() {
        let c = compose(&message(), &default_from(), false).unwrap();
        let t = text(&c);
        assert!(c.message_id.starts_with('<') && c.message_id.ends_with("@celer.example>"), "{}", c.message_id);
        assert_eq!(c.recipients, 3);
        for needle in [
            "From: Celer <noreply@celer.example>",
            "Cc: cc@example.com",
            "Reply-To: support@example.com",
            "Subject: Your export is ready",
            "X-Celer-Test: 1",
            "List-Unsubscribe: <mailto:u@example.com>",
            "multipart/alternative",
            "text/plain",
            "text/html",
            &format!("Message-ID: {}", c.message_id),
        ] {
            assert!(t.contains(needle), "{needle:?} missing in\n{t}");
        }
        assert!(!t.contains("hidden@example.com"), "Bcc is in the envelope only:\n{t}");
        let rcpt: Vec<String> = c.message.envelope().to().iter().map(ToString::to_string).collect();
        assert!(rcpt.contains(&"hidden@example.com".to_string()), "{rcpt:?}");
        let kept = text(&compose(&message(), &default_from(), true).unwrap());
        assert!(kept.contains("Bcc: hidden@example.com"), "{kept}");
    }

    #[test]
    fn one_part_messages_are_not_multipart() {
        let mut m = message();
        m.html = None;
        let t = text(&compose(&m, &default_from(), false).unwrap());
        assert!(t.contains("text/plain") && !t.contains("multipart"), "{t}");
        let mut m = message();
        m.text = None;
        let t = text(&compose(&m, &default_from(), false).unwrap());
        assert!(t.contains("text/html") && !t.contains("multipart"), "{t}");
    }

    #[test]
    fn bad_requests_are_invalid() {
        type Change = Box<dyn Fn(&mut Message)>;
        let cases: Vec<(&str, Change)> = vec![
            ("no recipients", Box::new(|m| {
                m.to.clear();
                m.cc.clear();
                m.bcc.clear();
            })),
            ("no body", Box::new(|m| {
                m.text = None;
                m.html = None;
            })),
            ("bad address", Box::new(|m| m.to.push(addr("not an address")))),
            ("subject injection", Box::new(|m| m.subject = "hi\r\nBcc: x@evil.example".into())),
            ("name injection", Box::new(|m| m.to[0].name = Some("Ann\nBcc: x@evil.example".into()))),
            ("value injection", Box::new(|m| m.headers.push(("X-A".into(), "1\r\nBcc: x@evil.example".into())))),
            ("Bcc header", Box::new(|m| m.headers.push(("Bcc".into(), "x@evil.example".into())))),
            ("From header", Box::new(|m| m.headers.push(("From".into(), "ceo@example.com".into())))),
            ("bare X-", Box::new(|m| m.headers.push(("X-".into(), "1".into())))),
            ("header with a colon", Box::new(|m| m.headers.push(("X-A:B".into(), "1".into())))),
            ("header with a space", Box::new(|m| m.headers.push(("X-A B".into(), "1".into())))),
        ];
        for (what, change) in cases {
            let mut m = message();
            change(&mut m);
            match compose(&m, &default_from(), false) {
                Err(HostError::Invalid(_)) => {}
                Err(other) => panic!("{what}: expected invalid, got {other:?}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
    }

    #[test]
    fn budgets() {
        let mut m = message();
        m.bcc = (0..MAX_RECIPIENTS).map(|i| addr(&format!("r{i}@example.com"))).collect();
        assert!(matches!(compose(&m, &default_from(), false), Err(HostError::BudgetExceeded(_))));
        let mut m = message();
        m.text = Some("x".repeat(MAX_MESSAGE_BYTES + 1));
        assert!(matches!(compose(&m, &default_from(), false), Err(HostError::BudgetExceeded(_))));
    }

    #[test]
    fn allowed_headers() {
        for ok in ["X-Campaign", "x-priority", "List-Unsubscribe", "list-unsubscribe-post"] {
            assert!(header_allowed(ok), "{ok}");
        }
        for bad in ["Bcc", "From", "Sender", "Return-Path", "X", "X-", "List-Id", "Received", "aé", "é"] {
            assert!(!header_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn the_plugin_sender_replaces_the_default() {
        let mut m = message();
        m.from = Some(Address { email: "news@shop.example".into(), name: Some("Shop".into()) });
        let c = compose(&m, &default_from(), false).unwrap();
        assert!(text(&c).contains("From: Shop <news@shop.example>"));
        assert!(c.message_id.ends_with("@shop.example>"));
    }
}

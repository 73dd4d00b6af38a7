//! Outgoing mail, when the manifest says `mail = true`.
//!
//! The WIT `mail` interface ([`send`], [`Message`], [`Address`]) plus
//! constructors, because a [`Message`] literal has ten fields and most mails
//! need three.

pub use crate::bindings::celer::plugin::mail::*;

impl Address {
    /// A bare mailbox, `user@example.com`.
    pub fn new(email: impl Into<String>) -> Self {
        Self { email: email.into(), name: None }
    }

    /// A mailbox with a display name, `"Ann" <ann@example.com>`.
    pub fn named(name: impl Into<String>, email: impl Into<String>) -> Self {
        Self { email: email.into(), name: Some(name.into()) }
    }
}

impl Message {
    /// A plain-text message to one recipient from the host's default sender;
    /// set further fields on the result as needed.
    pub fn plain(to: Address, subject: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            from: None,
            to: vec![to],
            cc: Vec::new(),
            bcc: Vec::new(),
            reply_to: None,
            subject: subject.into(),
            text: Some(text.into()),
            html: None,
            headers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_message_has_one_recipient_and_a_text_body() {
        let m = Message::plain(Address::named("Ann", "ann@example.com"), "Hi", "Hello");
        assert_eq!(m.to, vec![Address { email: "ann@example.com".into(), name: Some("Ann".into()) }]);
        assert_eq!((m.subject.as_str(), m.text.as_deref(), m.html), ("Hi", Some("Hello"), None));
        assert_eq!(Address::new("a@b.c").name, None);
    }
}

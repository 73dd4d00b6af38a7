//! `mail_probe`: a test-only plugin that sends the message it is given
//! through the mail capability and reports what came back.
//!
//! `mail_probe.send {message: {from?, to, cc?, bcc?, reply_to?, subject,
//! text?, html?, headers?}, propagate?}` returns `{"ok": "<message-id>"}` or
//! `{"err": {"kind", "message"}}`. With `propagate`, an error ends the job
//! the way a real plugin's `?` would (`unavailable` → retry, else fail).

use celer_plugin::mail::{self, Address, Message};
use celer_plugin::{Context, TaskError};
use serde::Deserialize;
use serde_json::{Value, json};

celer_plugin::plugin! {
    name: "mail_probe",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "mail_probe.send" => send,
    }
}

#[derive(Deserialize)]
struct Mailbox {
    email: String,
    name: Option<String>,
}

impl From<Mailbox> for Address {
    fn from(m: Mailbox) -> Address {
        Address { email: m.email, name: m.name }
    }
}

#[derive(Deserialize)]
struct Msg {
    from: Option<Mailbox>,
    to: Vec<Mailbox>,
    #[serde(default)]
    cc: Vec<Mailbox>,
    #[serde(default)]
    bcc: Vec<Mailbox>,
    reply_to: Option<Mailbox>,
    subject: String,
    text: Option<String>,
    html: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct Send {
    message: Msg,
    propagate: Option<bool>,
}

fn addresses(list: Vec<Mailbox>) -> Vec<Address> {
    list.into_iter().map(Address::from).collect()
}

fn send(_: &Context, Send { message: m, propagate }: Send) -> Result<Value, TaskError> {
    let msg = Message {
        from: m.from.map(Address::from),
        to: addresses(m.to),
        cc: addresses(m.cc),
        bcc: addresses(m.bcc),
        reply_to: m.reply_to.map(Address::from),
        subject: m.subject,
        text: m.text,
        html: m.html,
        headers: m.headers,
    };
    match mail::send(&msg) {
        Ok(id) => Ok(json!({ "ok": id })),
        Err(e) if propagate == Some(true) => Err(e.into()),
        Err(e) => {
            let (kind, message) = e.kind_and_message();
            Ok(json!({ "err": { "kind": kind, "message": message } }))
        }
    }
}

//! Celery task messages, protocol v2, as kombu's Redis transport stores
//! them (one JSON document per list element; see
//! `shared/fixtures/celery-protocol/`):
//!
//! ```text
//! {"body": base64([args, kwargs, {callbacks, errbacks, chain, chord}]),
//!  "content-type": "application/json", "content-encoding": "utf-8",
//!  "headers": {"task", "id", "eta", "expires", "retries", "root_id", "parent_id", …},
//!  "properties": {"body_encoding": "base64", "delivery_tag", "priority", …}}
//! ```
//!
//! Only the JSON serializer is accepted: a pickle (or any other content
//! type) is never deserialized; it is rejected with the reason, like every
//! message that cannot be read.

use base64::Engine as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;

/// A task message, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// Celery's task id (`headers.id`): the key of its result.
    pub id: String,
    /// The task name as the producer sent it (`headers.task`).
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    /// Not before (countdown and eta both arrive as `headers.eta`).
    pub eta: Option<DateTime<Utc>>,
    /// Not after.
    pub expires: Option<DateTime<Utc>>,
    /// How many times Celery already retried it.
    pub retries: u32,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    /// The group it belongs to (`headers.group`): a `group(…)` or a chord's header.
    pub group: Option<String>,
    /// Its place in that group (`headers.group_index`).
    pub group_index: Option<u64>,
    /// `properties.priority`, 0–9; on Redis kombu serves 0 first.
    pub priority: u8,
    /// The shorter of Celery's soft and hard time limits (`headers.timelimit`,
    /// from `apply_async(time_limit=…)` or the task's own `time_limit`):
    /// the run is stopped then, and fails with `TimeLimitExceeded`.
    pub time_limit: Option<std::time::Duration>,
    /// How the producer wants its args and kwargs shown (`headers.argsrepr`,
    /// `kwargsrepr`; an app may mask secrets there).
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
    /// What Celery's canvas attached to run after it.
    pub workflow: Workflow,
}

#[cfg(test)]
impl TaskMessage {
    /// A message with an id, a task and its args, nothing else attached.
    pub fn for_tests(id: &str, task: &str, args: Value) -> Self {
        TaskMessage {
            id: id.into(),
            task: task.into(),
            args,
            kwargs: serde_json::json!({}),
            eta: None,
            expires: None,
            retries: 0,
            root_id: None,
            parent_id: None,
            group: None,
            group_index: None,
            priority: 0,
            time_limit: None,
            argsrepr: None,
            kwargsrepr: None,
            workflow: Workflow::default(),
        }
    }
}

/// The canvas of a message (`embed` of the body): signatures as Celery
/// sent them (`{"task", "args", "kwargs", "options", "immutable", …}`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Workflow {
    /// `link=`: each is sent with the result when the task succeeds.
    pub callbacks: Vec<Value>,
    /// The rest of a `chain(…)`; the last element runs next, with the result.
    pub chain: Vec<Value>,
    /// `link_error=`: each is sent with the task's id when it fails for good.
    pub errbacks: Vec<Value>,
    /// The callback of the chord whose header this task is in (`embed.chord`).
    pub chord: Option<Value>,
    /// Attached parts celer does not run.
    pub unsupported: Vec<&'static str>,
}

impl Workflow {
    /// Anything to send on when the task succeeds or fails.
    pub fn has_follow_ups(&self) -> bool {
        !self.callbacks.is_empty() || !self.chain.is_empty() || !self.errbacks.is_empty() || self.chord.is_some()
    }
}

/// Why a message was not accepted; `task_id` when the headers could be read,
/// so that the failure can still be reported as the task's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub reason: String,
    pub task_id: Option<String>,
    pub task: Option<String>,
}

impl Rejected {
    fn new(reason: impl Into<String>) -> Self {
        Rejected { reason: reason.into(), task_id: None, task: None }
    }
}

/// Decodes one message as read from the list.
pub fn decode(raw: &[u8]) -> Result<TaskMessage, Rejected> {
    let msg: Value = serde_json::from_slice(raw).map_err(|e| Rejected::new(format!("the message is not JSON: {e}")))?;
    let Value::Object(msg) = msg else {
        return Err(Rejected::new("the message is not a JSON object"));
    };
    let headers = msg.get("headers").and_then(Value::as_object);
    let header_str = |k: &str| headers.and_then(|h| h.get(k)).and_then(Value::as_str).map(String::from);
    let (task_id, task) = (header_str("id"), header_str("task"));
    let reject = |reason: String| Rejected { reason, task_id: task_id.clone(), task: task.clone() };

    let content_type = msg.get("content-type").and_then(Value::as_str).unwrap_or("");
    if content_type != "application/json" {
        let what = match content_type {
            "application/x-python-serialize" => " (pickle)",
            "application/x-yaml" => " (yaml)",
            "application/x-msgpack" => " (msgpack)",
            _ => "",
        };
        return Err(reject(format!(
            "content type {content_type:?}{what} is not accepted: only the JSON serializer (application/json) is, and nothing else is ever deserialized"
        )));
    }
    let encoding = msg.get("content-encoding").and_then(Value::as_str).unwrap_or("utf-8");
    if !encoding.eq_ignore_ascii_case("utf-8") {
        return Err(reject(format!("content encoding {encoding:?} is not accepted (utf-8 only)")));
    }
    let (Some(id), Some(name)) = (task_id.clone(), task.clone()) else {
        return Err(reject("no headers.task / headers.id: not a Celery protocol v2 message (protocol 1 is not supported)".into()));
    };
    let body = msg.get("body").and_then(Value::as_str).ok_or_else(|| reject("no body".into()))?;
    let body_encoding = msg
        .get("properties")
        .and_then(|p| p.get("body_encoding"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let body: Vec<u8> = match body_encoding {
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|e| reject(format!("the body is not valid base64: {e}")))?,
        "" | "utf-8" => body.as_bytes().to_vec(),
        other => return Err(reject(format!("body encoding {other:?} is not supported"))),
    };
    let body: Value = serde_json::from_slice(&body).map_err(|e| reject(format!("the body is not JSON: {e}")))?;
    let Some([args, kwargs, embed]) = body.as_array().map(Vec::as_slice).and_then(|b| <&[Value; 3]>::try_from(b).ok()) else {
        return Err(reject("the body is not [args, kwargs, embed] (protocol v2)".into()));
    };
    if !args.is_array() {
        return Err(reject("args is not a JSON array".into()));
    }
    if !kwargs.is_object() {
        return Err(reject("kwargs is not a JSON object".into()));
    }
    let attached = |k: &str| embed.get(k).is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()));
    let signatures = |k: &str| -> Result<Vec<Value>, Rejected> {
        match embed.get(k) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(sigs)) if sigs.iter().all(|s| s.get("task").is_some_and(Value::is_string)) => Ok(sigs.clone()),
            Some(other) => Err(reject(format!("embed.{k} is not a list of task signatures: {other}"))),
        }
    };
    let group = header_str("group");
    let chord = match embed.get("chord") {
        Some(sig) if attached("chord") && sig.get("task").is_some_and(Value::is_string) => Some(sig.clone()),
        Some(other) if attached("chord") => return Err(reject(format!("embed.chord is not a task signature: {other}"))),
        _ => None,
    };
    let mut workflow = Workflow {
        callbacks: signatures("callbacks")?,
        chain: signatures("chain")?,
        errbacks: signatures("errbacks")?,
        unsupported: Vec::new(),
        chord: None,
    };
    match (chord, &group) {
        (Some(sig), Some(_)) if sendable_callback(&sig) => workflow.chord = Some(sig),
        (Some(_), Some(_)) => workflow.unsupported.push("a chord whose callback is a group or chord"),
        (Some(_), None) => workflow.unsupported.push("a chord header task without a group id"),
        (None, _) => {}
    }
    // A group or chord inside a link, or one in a chain that celer cannot
    // start (nested canvases, or a group with more of the chain after it),
    // is not something celer can send: none of the follow-ups run then,
    // rather than a part of them.
    if workflow.callbacks.iter().chain(&workflow.errbacks).any(is_canvas) || !startable_chain(&workflow.chain) {
        workflow.chain.clear();
        workflow.callbacks.clear();
        workflow.errbacks.clear();
        workflow.unsupported.push("a group or chord in a chain or link");
    }
    let time = |k: &str| -> Result<Option<DateTime<Utc>>, Rejected> {
        match headers.and_then(|h| h.get(k)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => parse_time(s).map(Some).ok_or_else(|| reject(format!("headers.{k} is not an ISO-8601 time: {s:?}"))),
            Some(other) => Err(reject(format!("headers.{k} is not a time: {other}"))),
        }
    };
    let retries = headers.and_then(|h| h.get("retries")).and_then(Value::as_u64).unwrap_or(0);
    Ok(TaskMessage {
        id,
        task: name,
        args: args.clone(),
        kwargs: kwargs.clone(),
        eta: time("eta")?,
        expires: time("expires")?,
        retries: u32::try_from(retries).unwrap_or(u32::MAX),
        root_id: header_str("root_id"),
        parent_id: header_str("parent_id"),
        group,
        group_index: headers.and_then(|h| h.get("group_index")).and_then(Value::as_u64),
        priority: msg
            .get("properties")
            .and_then(|p| p.get("priority"))
            .and_then(Value::as_u64)
            .map_or(0, |p| u8::try_from(p.min(9)).unwrap_or(9)),
        time_limit: headers
            .and_then(|h| h.get("timelimit"))
            .and_then(Value::as_array)
            .and_then(|limits| limits.iter().filter_map(Value::as_f64).filter(|s| *s > 0.0).min_by(f64::total_cmp))
            .map(|s| std::time::Duration::from_secs_f64(s.min(1e9))),
        argsrepr: header_str("argsrepr"),
        kwargsrepr: header_str("kwargsrepr"),
        workflow,
    })
}

/// A group, or a chord's header and callback, in a chain: what the run
/// before it sends when it succeeds.
#[derive(Debug, PartialEq)]
pub struct Fanout<'a> {
    /// The group id (a chord's header's).
    pub group_id: &'a str,
    /// Its members (tasks, or chains of tasks), in group order.
    pub tasks: &'a [Value],
    /// A chord's callback.
    pub body: Option<&'a Value>,
}

/// A group, chord or chain signature rather than a task's.
fn is_canvas(sig: &Value) -> bool {
    sig.get("subtask_type").is_some_and(|t| !t.is_null())
}

/// A task's own signature (no canvas).
fn is_plain(sig: &Value) -> bool {
    sig.get("task").is_some_and(Value::is_string) && !is_canvas(sig)
}

/// Whether celer can run every step of a message's `chain` (in message
/// order: the next step last): tasks, and groups or chords it can start,
/// a bare group only as the chain's end (Celery's client turns a group
/// with more after it into a chord).
fn startable_chain(chain: &[Value]) -> bool {
    chain.iter().enumerate().all(|(i, s)| !is_canvas(s) || fanout(s).is_some_and(|f| f.body.is_some() || i == 0))
}

/// A member of a group (or chord header) celer can send: a task, or a
/// chain of tasks (`group(a.s() | b.s(), c.s())`), sent as its first task
/// carrying the rest. A chain's last task is the member's result, so it
/// is the one that carries the group's id, place and chord
/// ([`last_task_mut`]). Nested groups need nothing: Celery's client
/// flattens them into the outer group.
fn is_member(sig: &Value) -> bool {
    is_plain(sig) || unchain(sig, &[]).is_some_and(|(first, rest)| is_plain(&first) && rest.iter().all(is_plain))
}

/// The task whose result is a group member's: the member itself, or a
/// chain's last task.
pub fn last_task_mut(member: &mut Value) -> Option<&mut Value> {
    if member.get("subtask_type").and_then(Value::as_str) == Some("chain") {
        return member.pointer_mut("/kwargs/tasks").and_then(Value::as_array_mut).and_then(|t| t.last_mut());
    }
    Some(member)
}

/// Every task a group member sends, first to last.
pub fn member_tasks(member: &Value) -> Vec<&Value> {
    match member.pointer("/kwargs/tasks").and_then(Value::as_array) {
        Some(tasks) if member.get("subtask_type").and_then(Value::as_str) == Some("chain") => tasks.iter().collect(),
        _ => vec![member],
    }
}

/// A chord callback celer can send: a task, a chain that starts with one
/// (`group(…) | a.s() | b.s()` is a chord whose callback is the chain
/// `a | b`), or a group of tasks (`chord(header, group(c.s(), d.s()))`).
fn sendable_callback(sig: &Value) -> bool {
    is_plain(sig)
        || unchain(sig, &[]).is_some_and(|(first, rest)| is_plain(&first) && startable_chain(&rest))
        || group_tasks(sig).is_some()
}

/// The members of `sig` when it is a group of tasks or chains of tasks (no
/// chord).
pub fn group_tasks(sig: &Value) -> Option<&[Value]> {
    fanout(sig).filter(|f| f.body.is_none()).map(|f| f.tasks)
}

/// A chain signature as the message of its first task: that task, with
/// the chain's own options (queue, countdown, priority… as Celery's
/// `chain.run` applies them) where it has none, and the chain its message
/// carries (message order, the next step last): the chain's other tasks,
/// then what follows the chain itself (`after`, or the chain signature's
/// own `options.chain`). `None` when `sig` is no chain, or an empty one.
pub fn unchain(sig: &Value, after: &[Value]) -> Option<(Value, Vec<Value>)> {
    if sig.get("subtask_type").and_then(Value::as_str) != Some("chain") {
        return None;
    }
    let (first, more) = sig.pointer("/kwargs/tasks").and_then(Value::as_array)?.split_first()?;
    if !first.is_object() {
        return None;
    }
    let mut chain = match after.is_empty() {
        true => sig.pointer("/options/chain").and_then(Value::as_array).cloned().unwrap_or_default(),
        false => after.to_vec(),
    };
    chain.extend(more.iter().rev().cloned());
    let mut first = first.clone();
    // The chain's id, group and place are its last task's, not the first's.
    const NOT_INHERITED: [&str; 5] = ["chain", "chord", "task_id", "group_id", "group_index"];
    if let Some(inherited) = sig.get("options").and_then(Value::as_object) {
        if !first.get("options").is_some_and(Value::is_object) {
            first["options"] = Value::Object(Default::default());
        }
        if let Some(options) = first.get_mut("options").and_then(Value::as_object_mut) {
            for (k, v) in inherited.iter().filter(|(k, _)| !NOT_INHERITED.contains(&k.as_str())) {
                options.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    Some((first, chain))
}

/// The group or chord `sig` is, if celer can start it: tasks or chains of
/// tasks in the group (or header) and a callback it can send.
pub fn fanout(sig: &Value) -> Option<Fanout<'_>> {
    fn id_of(s: &Value) -> Option<&str> {
        s.pointer("/options/task_id").and_then(Value::as_str)
    }
    fn tasks_of(group: &Value) -> Option<&[Value]> {
        group.pointer("/kwargs/tasks").and_then(Value::as_array).map(Vec::as_slice)
    }
    let (group_id, tasks, body) = match sig.get("subtask_type").and_then(Value::as_str)? {
        "group" => (id_of(sig)?, tasks_of(sig)?, None),
        "chord" => {
            let header = sig.pointer("/kwargs/header")?;
            let body = sig.pointer("/kwargs/body").filter(|b| sendable_callback(b))?;
            (id_of(sig).or_else(|| id_of(header))?, tasks_of(header)?, Some(body))
        }
        _ => return None,
    };
    tasks.iter().all(is_member).then_some(Fanout { group_id, tasks, body })
}

/// A task message celer sends (a follow-up of Celery's canvas), in the
/// shape a Celery client writes (`shared/fixtures/celery-protocol/
/// send_task-*.json`), so that any consumer of the queue, Celery worker or
/// celer host, runs it.
pub struct Outgoing<'a> {
    pub id: &'a str,
    pub task: &'a str,
    pub args: &'a Value,
    pub kwargs: &'a Value,
    /// `{"callbacks", "errbacks", "chain", "chord"}` of the new message.
    pub embed: Value,
    pub root_id: &'a str,
    pub parent_id: &'a str,
    /// The group it belongs to (a chord's callback carries its header's)
    /// and its place in it.
    pub group: Option<&'a str>,
    pub group_index: Option<u64>,
    pub queue: &'a str,
    pub eta: Option<DateTime<Utc>>,
}

/// Encodes `o` as a protocol v2 message (JSON body, base64).
pub fn encode(o: &Outgoing<'_>) -> String {
    let body = serde_json::json!([o.args, o.kwargs, o.embed]).to_string();
    serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": o.task, "id": o.id, "shadow": null,
            "eta": o.eta.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)),
            "expires": null, "group": o.group, "group_index": o.group_index, "retries": 0, "timelimit": [null, null],
            "root_id": o.root_id, "parent_id": o.parent_id,
            "argsrepr": o.args.to_string(), "kwargsrepr": o.kwargs.to_string(),
            "origin": "celer", "ignore_result": false, "replaced_task_nesting": 0,
            "stamped_headers": null, "stamps": {},
        },
        "properties": {
            "correlation_id": o.id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": o.queue},
            "priority": 0, "body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// A transient kombu message (an event, a control reply): `body` (JSON
/// text) base64-encoded in the envelope every kombu message has, delivery
/// mode 1, as Celery's workers send them (captured in
/// `shared/fixtures/celery-protocol/event-*.json`).
pub fn transient(body: &str, headers: Value, exchange: &str, routing_key: &str) -> String {
    serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// ISO-8601 as Celery writes it (`2026-11-22T17:37:35.310600+00:00`); a
/// time without offset is UTC (Celery's `enable_utc`).
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    use crate::celery::fixture;

    #[test]
    fn decodes_the_captured_send_task_messages() {
        let m = decode(&fixture("send_task-export.organization.json")).unwrap();
        assert_eq!(m.id, "72233f39-e827-45bf-91ba-025a6eeb6cb9");
        assert_eq!(m.task, "export.organization");
        assert_eq!((m.args, m.kwargs), (json!([42, 7]), json!({"fmt": "zip"})));
        assert_eq!((m.eta, m.expires, m.retries), (None, None, 0));
        assert_eq!(m.root_id.as_deref(), Some("72233f39-e827-45bf-91ba-025a6eeb6cb9"));
        assert_eq!(m.parent_id, None);
        assert_eq!(m.workflow, Workflow::default());

        let m = decode(&fixture("send_task-export.organization-countdown10.json")).unwrap();
        assert_eq!(m.eta, Some(parse_time("2026-11-22T17:37:35.310600+00:00").unwrap()));
        assert_eq!(m.eta.unwrap().timestamp_micros() % 1_000_000, 310_600);
        let m = decode(&fixture("send_task-export.organization-expires300.json")).unwrap();
        assert_eq!(m.expires, Some(parse_time("2026-11-22T17:42:25.312834+00:00").unwrap()));
        // The message as a worker keeps it in `unacked`: [message, exchange, routing key].
        let entry: Value = serde_json::from_slice(&fixture("unacked-hash-entry-eta-task.json")).unwrap();
        let m = decode(entry[0].to_string().as_bytes()).unwrap();
        assert_eq!(m.id, "7437c1fd-decb-4e3b-acec-e1432cbd1349");
    }

    fn message(content_type: &str, body: &str) -> Vec<u8> {
        json!({
            "body": body, "content-type": content_type, "content-encoding": "utf-8",
            "headers": {"task": "t.x", "id": "abc", "retries": 2, "parent_id": "p", "root_id": "r"},
            "properties": {"body_encoding": "base64"},
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn rejects_with_a_reason_and_never_unpickles() {
        let pickle = decode(&message("application/x-python-serialize", "gASVAAAAAAAAAAB9lC4=")).unwrap_err();
        assert!(pickle.reason.contains("pickle"), "{}", pickle.reason);
        assert_eq!(pickle.task_id.as_deref(), Some("abc"));
        let bad_b64 = decode(&message("application/json", "%%% not base64")).unwrap_err();
        assert!(bad_b64.reason.contains("base64"), "{}", bad_b64.reason);
        let not_json = decode(b"{oops").unwrap_err();
        assert!(not_json.reason.contains("not JSON"), "{}", not_json.reason);
        assert_eq!(not_json.task_id, None);
        let b64 = |v: Value| base64::engine::general_purpose::STANDARD.encode(v.to_string());
        let bad_body = decode(&message("application/json", &b64(json!({"a": 1})))).unwrap_err();
        assert!(bad_body.reason.contains("protocol v2"), "{}", bad_body.reason);
        let ok = decode(&message("application/json", &b64(json!([[1], {"k": 2}, {"callbacks": null}])))).unwrap();
        assert_eq!((ok.retries, ok.parent_id.as_deref(), ok.root_id.as_deref()), (2, Some("p"), Some("r")));
        assert_eq!((ok.time_limit, ok.priority), (None, 0));
        let chained = decode(&message("application/json", &b64(json!([[], {}, {"chain": [{"task": "t"}], "errbacks": [{"task": "e"}]}])))).unwrap();
        assert_eq!(chained.workflow.chain, vec![json!({"task": "t"})]);
        assert!(chained.workflow.has_follow_ups());
        assert_eq!(chained.workflow.errbacks, vec![json!({"task": "e"})]);
        assert!(chained.workflow.unsupported.is_empty());
        let orphan = decode(&message("application/json", &b64(json!([[], {}, {"chord": {"task": "c"}}])))).unwrap();
        assert_eq!(orphan.workflow.unsupported, vec!["a chord header task without a group id"]);
        assert!(!orphan.workflow.has_follow_ups());
        let grouped = decode(&message("application/json", &b64(json!([[], {}, {"chain": [{"task": "celery.chord", "subtask_type": "chord"}]}])))).unwrap();
        assert!(!grouped.workflow.has_follow_ups());
        assert_eq!(grouped.workflow.unsupported, vec!["a group or chord in a chain or link"]);
        // A group celer can start ends a chain; with more after it, it is not one.
        let group = json!({"task": "celery.group", "kwargs": {"tasks": [{"task": "t.a"}, {"task": "t.b"}]}, "options": {"task_id": "g"}, "subtask_type": "group"});
        let ending = decode(&message("application/json", &b64(json!([[], {}, {"chain": [group.clone(), {"task": "t.x"}]}])))).unwrap();
        assert!(ending.workflow.has_follow_ups() && ending.workflow.unsupported.is_empty());
        let middle = decode(&message("application/json", &b64(json!([[], {}, {"chain": [{"task": "t.x"}, group]}])))).unwrap();
        assert_eq!(middle.workflow.unsupported, vec!["a group or chord in a chain or link"]);
        let bad = decode(&message("application/json", &b64(json!([[], {}, {"callbacks": [1]}])))).unwrap_err();
        assert!(bad.reason.contains("embed.callbacks"), "{}", bad.reason);
    }

    /// `headers.timelimit` is `[soft, hard]`, either may be null: the run's
    /// deadline is the shorter one given.
    #[test]
    fn the_shorter_time_limit_is_the_deadline() {
        let with = |limits: Value| {
            let body = base64::engine::general_purpose::STANDARD.encode(json!([[], {}, {}]).to_string());
            let raw = json!({"body": body, "content-type": "application/json", "headers": {"task": "t", "id": "i", "timelimit": limits},
                "properties": {"body_encoding": "base64"}});
            decode(raw.to_string().as_bytes()).unwrap().time_limit
        };
        use std::time::Duration;
        assert_eq!(with(json!([null, 30])), Some(Duration::from_secs(30)));
        assert_eq!(with(json!([5.5, 30])), Some(Duration::from_millis(5500)));
        assert_eq!(with(json!([null, null])), None);
    }

    /// A chord's header task as Celery 5.7's client sends it (headers
    /// `group`, `group_index`; the callback in `embed.chord`).
    #[test]
    fn reads_a_chord_header_task() {
        let callback = json!({"task": "app.tsum", "args": [], "kwargs": {}, "options": {"task_id": "cb-1", "reply_to": "r", "group_id": "g-1"}, "subtask_type": null, "immutable": false});
        let body = json!([[3, 4], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": callback}]);
        let raw = json!({
            "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
            "content-type": "application/json", "content-encoding": "utf-8",
            "headers": {"task": "app.add", "id": "h-1", "group": "g-1", "group_index": 1, "root_id": "h-1", "parent_id": null},
            "properties": {"body_encoding": "base64"},
        });
        let m = decode(raw.to_string().as_bytes()).unwrap();
        assert_eq!((m.group.as_deref(), m.group_index), (Some("g-1"), Some(1)));
        assert_eq!(m.workflow.chord, Some(callback));
        assert!(m.workflow.has_follow_ups() && m.workflow.unsupported.is_empty());
    }

    /// A chord in a chain, as Celery 5.7's client writes it.
    #[test]
    fn a_chord_in_a_chain_can_be_started_when_its_parts_are_tasks_or_chains_of_tasks() {
        let header = json!({"task": "celery.group", "args": [], "kwargs": {"tasks": [{"task": "app.add", "args": [1, 2], "options": {"task_id": "h0", "group_index": 0}, "subtask_type": null, "immutable": true}, {"task": "app.add", "args": [3], "options": {"task_id": "h1", "group_index": 1}, "subtask_type": null, "immutable": false}]}, "options": {"task_id": "g"}, "subtask_type": "group"});
        let body = json!({"task": "app.tsum", "args": [], "kwargs": {}, "options": {"task_id": "cb"}, "subtask_type": null, "immutable": false});
        let chord = json!({"task": "celery.chord", "args": [], "kwargs": {"kwargs": {}, "header": header, "body": body}, "options": {"task_id": "g"}, "subtask_type": "chord", "immutable": false});
        let f = fanout(&chord).expect("startable");
        assert_eq!((f.group_id, f.tasks.len(), f.body), ("g", 2, Some(&body)));
        let mut nested = chord.clone();
        nested["kwargs"]["header"]["kwargs"]["tasks"][0]["subtask_type"] = json!("chain");
        assert_eq!(fanout(&nested), None);
        assert_eq!(fanout(&body), None);
        // A chain of tasks is a member (captured from the client:
        // `chord([chain(add.si(1, 2), add.si(3, 4)), …], tsum.s())`); its
        // last task carries the group's place. A chain that ends in a
        // group is not.
        let first = json!({"task": "app.add", "args": [1, 2], "options": {"task_id": "c0"}, "subtask_type": null, "immutable": true});
        let last = json!({"task": "app.add", "args": [3, 4], "options": {"task_id": "c1", "group_index": 0}, "subtask_type": null, "immutable": true});
        let mut member = json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [first, last]}, "options": {"task_id": "c1"}, "subtask_type": "chain", "immutable": false});
        let mut with_chain = chord.clone();
        with_chain["kwargs"]["header"]["kwargs"]["tasks"][0] = member.clone();
        assert_eq!(fanout(&with_chain).map(|f| f.tasks.len()), Some(2));
        assert_eq!(member_tasks(&member).iter().map(|t| t["options"]["task_id"].clone()).collect::<Vec<_>>(), [json!("c0"), json!("c1")]);
        assert_eq!(last_task_mut(&mut member).map(|t| t["options"]["task_id"].clone()), Some(json!("c1")));
        with_chain["kwargs"]["header"]["kwargs"]["tasks"][0]["kwargs"]["tasks"][1] = header.clone();
        assert_eq!(fanout(&with_chain), None);
    }

    /// `group(a, b) | c | d`: Celery 5.7's client sends a chord whose
    /// callback is the chain `c | d` (captured from the real client). Its
    /// first task is sent carrying the rest, then what follows the chain.
    #[test]
    fn a_chord_callback_that_is_a_chain_is_sent_as_its_first_task() {
        let c = json!({"task": "t.c", "args": [], "kwargs": {}, "options": {"task_id": "id-c"}, "subtask_type": null, "immutable": false});
        let d = json!({"task": "t.d", "args": [], "kwargs": {}, "options": {"task_id": "id-d", "group_id": "g"}, "subtask_type": null, "immutable": false});
        let callback = json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [c, d]}, "options": {"task_id": "id-d"}, "subtask_type": "chain", "immutable": false});
        let raw = |chord: &Value| {
            let body = base64::engine::general_purpose::STANDARD.encode(json!([[1, 2], {}, {"chord": chord}]).to_string());
            json!({"body": body, "content-type": "application/json", "content-encoding": "utf-8", "properties": {"body_encoding": "base64"},
                   "headers": {"task": "t.add", "id": "h0", "group": "g", "group_index": 0}})
            .to_string()
        };
        let m = decode(raw(&callback).as_bytes()).expect("decodes");
        assert_eq!(m.workflow.chord.as_ref(), Some(&callback));
        assert!(m.workflow.unsupported.is_empty(), "{:?}", m.workflow.unsupported);

        let (first, chain) = unchain(&callback, &[]).expect("a chain");
        assert_eq!((first, chain), (c.clone(), vec![d.clone()]));
        // The chain's own options reach its first task, but not its id.
        let mut routed = callback.clone();
        routed["options"]["queue"] = json!("mail");
        let (first, _) = unchain(&routed, &[]).expect("a chain");
        assert_eq!((first["options"]["queue"].as_str(), first["options"]["task_id"].as_str()), (Some("mail"), Some("id-c")));
        // What follows the chain runs after its last step (message order: next step last).
        let after = json!({"task": "t.after"});
        assert_eq!(unchain(&callback, std::slice::from_ref(&after)).map(|(_, chain)| chain), Some(vec![after.clone(), d.clone()]));
        let mut followed = callback.clone();
        followed["options"]["chain"] = json!([after]);
        assert_eq!(unchain(&followed, &[]).map(|(_, chain)| chain), Some(vec![after, d]));
        assert_eq!(unchain(&c, &[]), None);

        // A group of tasks is a callback celer sends (each gets the results);
        // a chain that starts with a group is not.
        let group = json!({"task": "celery.group", "args": [], "kwargs": {"tasks": [{"task": "t.c", "options": {"task_id": "id-c"}}]}, "options": {"task_id": "g2"}, "subtask_type": "group"});
        assert_eq!(decode(raw(&group).as_bytes()).expect("decodes").workflow.chord, Some(group));
        let mut grouped = callback.clone();
        grouped["kwargs"]["tasks"][0]["subtask_type"] = json!("group");
        let m = decode(raw(&grouped).as_bytes()).expect("decodes");
        assert_eq!((m.workflow.chord, m.workflow.unsupported), (None, vec!["a chord whose callback is a group or chord"]));
    }

    #[test]
    fn what_celer_sends_reads_back_as_sent() {
        let (args, kwargs) = (json!([{"sum": 3}, 4]), json!({"k": true}));
        let embed = json!({"callbacks": null, "errbacks": null, "chain": [{"task": "t.last"}], "chord": null});
        let out = Outgoing {
            id: "n-1", task: "t.next", args: &args, kwargs: &kwargs, embed, root_id: "r", parent_id: "p", group: Some("g"), group_index: Some(2), queue: "q", eta: None,
        };
        let m = decode(encode(&out).as_bytes()).expect("decodes");
        assert_eq!((m.id.as_str(), m.task.as_str(), &m.args, &m.kwargs), ("n-1", "t.next", &args, &kwargs));
        assert_eq!((m.root_id.as_deref(), m.parent_id.as_deref()), (Some("r"), Some("p")));
        assert_eq!(m.workflow.chain, vec![json!({"task": "t.last"})]);
        assert_eq!((m.group.as_deref(), m.group_index), (Some("g"), Some(2)));
        // The same headers and properties as a real client's message.
        let ours: Value = serde_json::from_str(&encode(&out)).unwrap();
        let theirs: Value = serde_json::from_slice(&fixture("send_task-export.organization.json")).unwrap();
        let keys = |v: &Value, k: &str| v[k].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&ours, "headers"), keys(&theirs, "headers"));
        assert_eq!(keys(&ours, "properties"), keys(&theirs, "properties"));
    }
}

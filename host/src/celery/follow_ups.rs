//! Celery's canvas after a task ends: `link=` callbacks and the next task
//! of a `chain(…)` when it succeeds, `link_error=` errbacks when it fails
//! for good. When a message carrying any is taken, its workflow is kept
//! beside the job (`<prefix>celery:workflow:<task id>`, as long as the
//! result); when the job ends, each follow-up is sent as a protocol v2
//! message onto its queue's kombu list, as a Celery worker sends it: the
//! result (the failed task's id, for an errback) first in its args unless
//! the signature is immutable, the rest of the chain in its embed, root and
//! parent ids carried on. Whatever consumes that queue, a celer host or a
//! Celery worker, runs it.
//!
//! Errbacks are sent the way Celery sends an errback it cannot call in
//! process (one that takes only the task id); a Python errback taking
//! `(request, exc, traceback)` only runs inside a Celery worker.
//!
//! A task in a chord's header also records its final state in the chord
//! ([`super::chord`]), which sends the chord's callback once the header is
//! complete.
//!
//! Follow-ups are sent before the outcome is recorded, once a lease renewal
//! has confirmed that the run still holds its job (a stale run sends none),
//! so a host that dies in between sends them again when the job runs
//! again; each keeps the task id Celery froze into its signature (or one
//! derived from the parent id), and celer's consumer makes one job per
//! task id, so a repeat is not run twice by celer.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

use super::chord::{Chords, Part};
use super::protocol::{self, Outgoing, TaskMessage};
use super::result::Exception;
use super::routes::Routes;
use crate::broker::redis::conn::Conn;

/// How often a failed task's chord part is tried before it is given up.
const PART_TRIES: u32 = 3;

/// What a Celery worker does after a task ends, done by whichever host ran
/// it: the links and the next step of the chain on success, the errbacks
/// on failure, and the task's part of its chord either way.
#[derive(Clone)]
pub struct FollowUps {
    conn: Conn,
    /// celer's key prefix (where workflows are kept).
    prefix: String,
    /// kombu's `global_keyprefix` (where queues are).
    key_prefix: String,
    expires_s: u64,
    /// `[celery] routes`: where a follow-up without a queue goes.
    routes: Routes,
    chords: Chords,
}

/// What is kept per task between taking its message and its success.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub(super) struct Kept {
    callbacks: Vec<Value>,
    chain: Vec<Value>,
    /// Absent in workflows kept before errbacks were sent.
    #[serde(default)]
    errbacks: Vec<Value>,
    /// The callback of the chord whose header the task is in, with the
    /// header's group id and the task's place in it.
    #[serde(default)]
    pub(super) chord: Option<Value>,
    #[serde(default)]
    pub(super) group: Option<String>,
    #[serde(default)]
    pub(super) group_index: Option<u64>,
    /// The queue the task came from: follow-ups without one go there.
    queue: String,
    root_id: String,
}

impl FollowUps {
    /// One per host, shared by the consumer and the worker's Celery-aware broker.
    pub fn new(
        conn: Conn,
        prefix: String,
        key_prefix: String,
        expires_s: u64,
        routes: std::collections::BTreeMap<String, String>,
        chords: Chords,
    ) -> Self {
        FollowUps { conn, prefix, key_prefix, expires_s: expires_s.max(1), routes: Routes::new(&routes), chords }
    }

    /// kombu's list for a queue.
    pub(super) fn queue_key(&self, queue: &str) -> String {
        format!("{}{queue}", self.key_prefix)
    }

    fn key(&self, celery_id: &str) -> String {
        format!("{}celery:workflow:{celery_id}", self.prefix)
    }

    /// Keeps the follow-ups of a message just taken from `queue`, if any.
    pub async fn keep(&self, msg: &TaskMessage, queue: &str) -> Result<(), String> {
        if !msg.workflow.has_follow_ups() {
            return Ok(());
        }
        let kept = Kept {
            callbacks: msg.workflow.callbacks.clone(),
            chain: msg.workflow.chain.clone(),
            errbacks: msg.workflow.errbacks.clone(),
            chord: msg.workflow.chord.clone(),
            group: msg.group.clone(),
            group_index: msg.group_index,
            queue: queue.to_string(),
            root_id: msg.root_id.clone().unwrap_or_else(|| msg.id.clone()),
        };
        let text = serde_json::to_string(&kept).map_err(|e| e.to_string())?;
        // Kept until its task can have run (its eta) and as long as a result after that.
        let wait_s = msg.eta.map_or(0, |eta| u64::try_from((eta - Utc::now()).num_seconds()).unwrap_or(0));
        let mut c = self.conn.clone();
        ::redis::cmd("SET")
            .arg(self.key(&msg.id))
            .arg(text)
            .arg("EX")
            .arg(self.expires_s + wait_s)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    /// Sends the follow-ups of `celery_id`, which succeeded with `result`,
    /// if `still_held` confirms the run still holds its job (a run whose
    /// lease lapsed sends nothing: the run that took over sends them).
    pub async fn on_success(
        &self,
        celery_id: &str,
        result: &Value,
        still_held: impl std::future::Future<Output = Result<bool, String>>,
    ) -> Result<(), String> {
        let Some(kept) = self.kept(celery_id).await? else { return Ok(()) };
        if kept.callbacks.is_empty() && kept.chain.is_empty() && kept.chord.is_none() {
            return Ok(());
        }
        if !still_held.await? {
            tracing::warn!(task_id = %celery_id, "lease lost before the Celery follow-ups were sent; the run that took over sends them");
            return Ok(());
        }
        // The chord part first: it counts once however often it is
        // recorded, and the workflow is still there if it fails.
        self.chords.part_done(self, &kept, celery_id, Part::Success(result)).await?;
        let mut messages = Vec::new();
        let mut setup = Vec::new();
        for (i, sig) in kept.callbacks.iter().enumerate() {
            messages.push(self.message(sig, Vec::new(), result, celery_id, &kept, &format!("link-{i}")));
        }
        if let Some((next, rest)) = kept.chain.split_last() {
            match protocol::fanout(next) {
                Some(fanout) => {
                    let (commands, started) = self.chords.start(self, &fanout, rest, result, celery_id, &kept);
                    setup.extend(commands);
                    messages.extend(started);
                }
                None => messages.push(self.message(next, rest.to_vec(), result, celery_id, &kept, "chain")),
            }
        }
        self.send(celery_id, setup, messages).await
    }

    /// Sends the errbacks of `celery_id`, which failed for good with `e`
    /// (or was revoked: then no errbacks, as with Celery), and records the
    /// failure in its chord.
    pub async fn on_failure(&self, celery_id: &str, e: &Exception, revoked: bool) -> Result<(), String> {
        let Some(kept) = self.kept(celery_id).await? else { return Ok(()) };
        let part = if revoked { Part::Revoked(e) } else { Part::Failure(e) };
        // The failure is recorded already, so nothing runs this again: a
        // few tries, and the errbacks go out whatever the chord's fate.
        let mut counted = Ok(());
        for attempt in 1..=PART_TRIES {
            counted = self.chords.part_done(self, &kept, celery_id, part).await;
            if counted.is_ok() || attempt == PART_TRIES {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
        }
        let failed = Value::String(celery_id.to_string());
        let messages = if revoked {
            Vec::new()
        } else {
            kept.errbacks
                .iter()
                .enumerate()
                .map(|(i, sig)| self.message(sig, Vec::new(), &failed, celery_id, &kept, &format!("errback-{i}")))
                .collect()
        };
        self.send(celery_id, Vec::new(), messages).await?;
        counted.map_err(|e| format!("the chord part was not recorded: {e}"))
    }

    async fn kept(&self, celery_id: &str) -> Result<Option<Kept>, String> {
        let mut c = self.conn.clone();
        let kept: Option<String> = ::redis::cmd("GET").arg(self.key(celery_id)).query_async(&mut c).await.map_err(|e| e.to_string())?;
        kept.map(|k| serde_json::from_str(&k).map_err(|e| format!("unreadable workflow of {celery_id}: {e}"))).transpose()
    }

    /// Runs `setup`, sends `messages` and forgets the workflow, all or none.
    async fn send(&self, celery_id: &str, setup: Vec<::redis::Cmd>, messages: Vec<(String, String)>) -> Result<(), String> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for cmd in setup {
            pipe.add_command(cmd).ignore();
        }
        self.add_pushes(&mut pipe, &messages);
        pipe.cmd("DEL").arg(self.key(celery_id)).ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(|e| e.to_string())?;
        if !messages.is_empty() {
            tracing::info!(task_id = %celery_id, follow_ups = messages.len(), "Celery follow-ups sent");
        }
        Ok(())
    }

    /// Sends `(queue, message)`s, all or none.
    pub(super) async fn push(&self, messages: &[(String, String)]) -> Result<(), String> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        self.add_pushes(&mut pipe, messages);
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(|e| e.to_string())
    }

    /// All or nothing (in a MULTI): a dropped connection must not leave
    /// some sent and the workflow still there to send them again.
    fn add_pushes(&self, pipe: &mut ::redis::Pipeline, messages: &[(String, String)]) {
        for (queue, message) in messages {
            pipe.cmd("LPUSH").arg(self.queue_key(queue)).arg(message).ignore();
        }
    }

    /// The queue and message for one signature; `first` (the result, or
    /// the failed task's id) leads its args unless it is immutable. The
    /// signature's options give its id, queue, countdown, links, the rest
    /// of its chain (unless `chain` is given), its group and chord, and
    /// may override the root and parent ids. A chain signature (a chord's
    /// callback `a | b`) is sent as its first task carrying the rest.
    pub(super) fn message(&self, sig: &Value, chain: Vec<Value>, first: &Value, parent: &str, kept: &Kept, role: &str) -> (String, String) {
        let first_of_chain;
        let (sig, chain) = match protocol::unchain(sig, &chain) {
            Some((task, rest)) => {
                first_of_chain = task;
                (&first_of_chain, rest)
            }
            None => (sig, chain),
        };
        let options = sig.get("options").cloned().unwrap_or(json!({}));
        let immutable = sig.get("immutable").and_then(Value::as_bool).unwrap_or(false);
        let mut args: Vec<Value> = sig.get("args").and_then(Value::as_array).cloned().unwrap_or_default();
        if !immutable {
            args.insert(0, first.clone());
        }
        let kwargs = sig.get("kwargs").filter(|k| k.is_object()).cloned().unwrap_or(json!({}));
        let id = options.get("task_id").and_then(Value::as_str).map(String::from).unwrap_or_else(|| derived_id(parent, role));
        let task = sig.get("task").and_then(Value::as_str).unwrap_or_default();
        let queue = options
            .get("queue")
            .and_then(|q| q.as_str().or_else(|| q.get("name").and_then(Value::as_str)))
            .or_else(|| options.get("routing_key").and_then(Value::as_str))
            .or_else(|| self.routes.queue_of(task))
            .unwrap_or(&kept.queue)
            .to_string();
        // Clamped to a century: a countdown Python could not have turned
        // into a date must not overflow ours either.
        const MAX_COUNTDOWN_MS: f64 = 100.0 * 365.25 * 86_400_000.0;
        let eta = options
            .get("countdown")
            .and_then(Value::as_f64)
            .map(|s| Utc::now() + chrono::Duration::milliseconds((s * 1000.0).clamp(0.0, MAX_COUNTDOWN_MS) as i64));
        let list = |k: &str| options.get(k).filter(|v| v.as_array().is_some_and(|a| !a.is_empty())).cloned().unwrap_or(Value::Null);
        let embed = json!({
            "callbacks": list("link"),
            "errbacks": list("link_error"),
            "chain": if chain.is_empty() { list("chain") } else { Value::Array(chain) },
            "chord": options.get("chord").filter(|c| c.is_object()).cloned().unwrap_or(Value::Null),
        });
        let text = |k: &str| options.get(k).and_then(Value::as_str);
        let out = Outgoing {
            id: &id,
            task,
            args: &Value::Array(args),
            kwargs: &kwargs,
            embed,
            root_id: text("root_id").unwrap_or(&kept.root_id),
            parent_id: text("parent_id").unwrap_or(parent),
            group: text("group_id"),
            group_index: options.get("group_index").and_then(Value::as_u64),
            queue: &queue,
            eta,
        };
        (queue.clone(), protocol::encode(&out))
    }
}

/// A stable task id for a follow-up whose signature has none, so that
/// sending it twice still makes one job.
fn derived_id(parent: &str, role: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{parent}/{role}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Uuid::from_bytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chords(conn: &Conn) -> Chords {
        Chords::new(conn.clone(), super::super::ResultWriter::new(conn.clone(), 60), 60)
    }

    /// A run whose lease lapsed sends no follow-ups and leaves the workflow
    /// for the run that took over; a run that still holds its job sends
    /// them once. Against the test Redis.
    #[tokio::test]
    async fn follow_ups_go_out_only_from_a_run_that_still_holds_its_job() {
        let conn = crate::broker::redis::test_redis_conn().await;
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let (prefix, queue) = (format!("celer-test-{unique}:"), format!("q-{unique}"));
        let follow_ups = FollowUps::new(conn.clone(), prefix.clone(), String::new(), 60, Default::default(), chords(&conn));
        let msg = protocol::TaskMessage {
            workflow: protocol::Workflow { callbacks: vec![json!({"task": "proj.tasks.greet", "args": []})], ..Default::default() },
            ..protocol::TaskMessage::for_tests(&format!("t-{unique}"), "proj.tasks.add", json!([1, 2]))
        };
        follow_ups.keep(&msg, &queue).await.expect("kept");
        let mut c = conn.clone();
        let waiting = |c: &mut Conn| {
            let mut c = c.clone();
            let queue = queue.clone();
            async move { ::redis::cmd("LLEN").arg(&queue).query_async::<i64>(&mut c).await.expect("llen") }
        };
        follow_ups.on_success(&msg.id, &json!(3), async { Ok(false) }).await.expect("stale run");
        assert_eq!(waiting(&mut c).await, 0, "a stale run sends nothing");
        follow_ups.on_success(&msg.id, &json!(3), async { Ok(true) }).await.expect("holder");
        assert_eq!(waiting(&mut c).await, 1, "the run that holds the job sends the callback");
        follow_ups.on_success(&msg.id, &json!(3), async { Ok(true) }).await.expect("again");
        assert_eq!(waiting(&mut c).await, 1, "sent once: the workflow is gone after it");
        let _: i64 = ::redis::cmd("DEL").arg(&queue).arg(follow_ups.key(&msg.id)).query_async(&mut c).await.expect("del");
    }

    /// A chord's part counts once however often it is recorded, the
    /// callback goes out once, after the last part, with the results in
    /// header order; a late repeat finds the chord done. Against the test Redis.
    #[tokio::test]
    async fn a_chord_fires_once_with_its_parts_in_header_order() {
        let conn = crate::broker::redis::test_redis_conn().await;
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let (group, queue) = (format!("g-{unique}"), format!("q-{unique}"));
        let f = FollowUps::new(conn.clone(), format!("p-{unique}:"), String::new(), 60, Default::default(), chords(&conn));
        let callback = json!({"task": "proj.tasks.tsum", "args": [], "kwargs": {}, "options": {"task_id": format!("cb-{unique}"), "group_id": group}, "immutable": false});
        let part = |index: u64| Kept {
            chord: Some(callback.clone()),
            group: Some(group.clone()),
            group_index: Some(index),
            queue: queue.clone(),
            root_id: "r".into(),
            ..Kept::default()
        };
        let mut c = conn.clone();
        let _: () = ::redis::cmd("SET").arg(format!("celery-taskset-meta-{group}.s")).arg(2).query_async(&mut c).await.expect("size");
        let sent = |c: &mut Conn| {
            let (mut c, queue) = (c.clone(), queue.clone());
            async move { ::redis::cmd("LRANGE").arg(&queue).arg(0).arg(-1).query_async::<Vec<String>>(&mut c).await.expect("lrange") }
        };
        // The second part finishes first, and twice (a run taken over
        // after its part was recorded; its result differs this time).
        f.chords.part_done(&f, &part(1), "t-1", Part::Success(&json!({"sum": 7}))).await.expect("part 1");
        f.chords.part_done(&f, &part(1), "t-1", Part::Success(&json!({"sum": 8}))).await.expect("part 1 again");
        assert!(sent(&mut c).await.is_empty(), "not complete: one of two parts, counted once");
        f.chords.part_done(&f, &part(0), "t-0", Part::Success(&json!({"sum": 3}))).await.expect("part 0");
        let messages = sent(&mut c).await;
        assert_eq!(messages.len(), 1, "the callback went out once the header was complete");
        let m = protocol::decode(messages[0].as_bytes()).expect("a task message");
        assert_eq!((m.id, m.task.as_str(), m.args), (format!("cb-{unique}"), "proj.tasks.tsum", json!([[{"sum": 3}, {"sum": 7}]])));
        assert_eq!((m.group.as_deref(), m.parent_id.as_deref()), (Some(group.as_str()), Some("t-0")));
        f.chords.part_done(&f, &part(0), "t-0", Part::Success(&json!({"sum": 3}))).await.expect("a late repeat");
        assert_eq!(sent(&mut c).await.len(), 1, "a late repeat sends nothing");
        let done: String = ::redis::cmd("GET").arg(format!("celery-taskset-meta-{group}.c")).query_async(&mut c).await.expect("claim");
        assert_eq!(done, "done");
        let _: i64 = ::redis::cmd("DEL").arg(&queue).arg(format!("celery-taskset-meta-{group}.c")).query_async(&mut c).await.expect("del");
    }

    /// A chord that is the next step of a chain is started by the run
    /// before it: the header's size is stored, each header task goes out
    /// with the group id, its place and the callback, the previous result
    /// first in its args unless immutable. Against the test Redis.
    #[tokio::test]
    async fn a_chord_next_in_a_chain_is_started_with_the_previous_result() {
        let conn = crate::broker::redis::test_redis_conn().await;
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let (group, queue) = (format!("g-{unique}"), format!("q-{unique}"));
        let f = FollowUps::new(conn.clone(), format!("p-{unique}:"), String::new(), 60, Default::default(), chords(&conn));
        let header = json!({"task": "celery.group", "kwargs": {"tasks": [
            {"task": "t.add", "args": [10], "options": {"task_id": "h0"}, "immutable": false},
            {"task": "t.add", "args": [1, 2], "options": {"task_id": "h1"}, "immutable": true}]}, "options": {"task_id": group}, "subtask_type": "group"});
        let chord = json!({"task": "celery.chord", "kwargs": {"header": header, "body": {"task": "t.tsum", "options": {"task_id": "cb"}}}, "options": {"task_id": group}, "subtask_type": "chord"});
        let msg = protocol::TaskMessage {
            root_id: Some("root".into()),
            workflow: protocol::Workflow { chain: vec![json!({"task": "t.after"}), chord], ..Default::default() },
            ..protocol::TaskMessage::for_tests(&format!("t-{unique}"), "t.add", json!([1, 1]))
        };
        f.keep(&msg, &queue).await.expect("kept");
        f.on_success(&msg.id, &json!(2), async { Ok(true) }).await.expect("started");
        let mut c = conn.clone();
        let size: String = ::redis::cmd("GET").arg(format!("celery-taskset-meta-{group}.s")).query_async(&mut c).await.expect("size");
        assert_eq!(size, "2");
        let sent: Vec<String> = ::redis::cmd("LRANGE").arg(&queue).arg(0).arg(-1).query_async(&mut c).await.expect("lrange");
        let mut sent: Vec<protocol::TaskMessage> = sent.iter().map(|m| protocol::decode(m.as_bytes()).expect("a task message")).collect();
        sent.sort_by_key(|m| m.group_index);
        assert_eq!(sent.iter().map(|m| (m.id.as_str(), m.args.clone(), m.group_index)).collect::<Vec<_>>(),
            vec![("h0", json!([2, 10]), Some(0)), ("h1", json!([1, 2]), Some(1))]);
        for m in &sent {
            assert_eq!((m.group.as_deref(), m.root_id.as_deref(), m.parent_id.as_deref()), (Some(group.as_str()), Some("root"), Some(msg.id.as_str())));
            let callback = m.workflow.chord.as_ref().expect("the callback rides along");
            assert_eq!(callback["options"]["group_id"], json!(group));
            assert_eq!(callback["options"]["chain"], json!([{"task": "t.after"}]), "the rest of the chain follows the callback");
        }
        let _: i64 = ::redis::cmd("DEL").arg(&queue).arg(format!("celery-taskset-meta-{group}.s")).query_async(&mut c).await.expect("del");
    }

    /// `[celery] routes` picks the queue of a follow-up whose signature names
    /// none: an exact task name first, then the longest `prefix*`; without
    /// a route it goes to its parent's queue, and a queue in the signature
    /// always wins.
    #[tokio::test]
    async fn a_follow_up_without_a_queue_goes_where_the_routes_say() {
        let conn = crate::broker::redis::test_redis_conn().await;
        let routes = [("proj.mail.*", "mail"), ("proj.mail.urgent", "urgent"), ("proj.*", "default-proj")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let f = FollowUps::new(conn.clone(), "p:".into(), String::new(), 60, routes, chords(&conn));
        let kept = Kept { queue: "parent-q".into(), root_id: "r".into(), ..Kept::default() };
        let queue_of = |sig: Value| f.message(&sig, Vec::new(), &json!(1), "parent", &kept, "link-0").0;
        assert_eq!(queue_of(json!({"task": "proj.mail.urgent"})), "urgent");
        assert_eq!(queue_of(json!({"task": "proj.mail.weekly"})), "mail");
        assert_eq!(queue_of(json!({"task": "proj.other"})), "default-proj");
        assert_eq!(queue_of(json!({"task": "elsewhere.task"})), "parent-q");
        assert_eq!(queue_of(json!({"task": "proj.mail.weekly", "options": {"queue": "explicit"}})), "explicit");
    }
}

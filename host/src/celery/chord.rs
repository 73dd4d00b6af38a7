//! Chords: `chord([add.s(1, 2), add.s(3, 4)])(tsum.s())`. Celery's client
//! sends the header tasks with the chord's group id (`headers.group`) and
//! their place in it (`group_index`), the callback's signature in
//! `embed.chord`, and stores the header's size before it sends the last
//! one. Whoever runs a header task records its final state in the group's
//! keys; the run that completes the header sends the callback with the
//! results in header order or, when one of them failed or was revoked,
//! stores the callback's failure (`ChordError: Dependency <id> raised …`)
//! and sends the callback's errbacks, as a Celery worker does.
//!
//! The keys, and what each means, are those of Celery 5.7's Redis result
//! backend, so celer hosts and Celery workers can run the parts of one
//! chord side by side (`<g>` = `celery-taskset-meta-<group id>`):
//!
//! - `<g>.j`: sorted set of `[1, task id, state, result]`, scored by group index;
//! - `<g>.d`: the `<task id>:<index>` already counted (a task run twice counts once);
//! - `<g>.s`: the header's size (the client writes it); `<g>.t`: an adjustment to it;
//! - `<g>.c`: a claim held for seconds by the run that completes the header,
//!   then `done` for a while so that a late repeat does nothing;
//! - `<g>` itself: the header's structure, saved by the client only when a
//!   part's result is itself a group (a chain that ends in a group); celer
//!   does not join those: the callback fails with a `ChordError` that says
//!   so. Chains and groups in a header are otherwise fine: the client
//!   flattens a nested group into the header, and a chain's last task
//!   carries the chord.
//!
//! The callback may be a chain (`group(…) | a.s() | b.s()`): its first
//! task is sent carrying the rest; or a group (`chord(header, group(…))`):
//! each of its tasks gets the results.
//!
//! Sending the callback and clearing the keys is one script, so a run that
//! dies between them cannot leave a chord fired twice. A successful part is
//! recorded before its own outcome (a run that dies before recording runs
//! again and records it once); a failed part after it, so a host that dies
//! between the two leaves the chord waiting until its keys expire.
//!
//! A group or chord that is the next step of a chain is started by the run
//! that succeeded before it, as a Celery worker does: its tasks are sent
//! with the group id, their places and (a chord's) callback, the previous
//! result first in their args unless immutable, and a chord's size is
//! stored first, in the same transaction.

use chrono::Utc;
use serde_json::{Value, json};

use super::ResultWriter;
use super::follow_ups::{FollowUps, Kept};
use super::protocol::{self, Fanout};
use super::result::{self, Exception, Status, py_repr};
use crate::broker::redis::conn::Conn;

/// How long the claim of the run that completes the header lasts (Celery's:
/// twice `result_chord_join_timeout`).
const CLAIM_S: u64 = 6;
/// How long a fired chord stays marked `done`.
const DONE_S: u64 = 300;

/// KEYS: j t s d c; ARGV: member, counted-as, score, ttl s, claim s, token.
/// Returns {ready parts, 1 when this call completed the header and holds the
/// claim}; {-1, 0} when the chord already fired. The token is the part's
/// own, so a repeat of the call that took the claim (its first attempt
/// failed on the way) holds it again.
const PART: &str = r#"
local claim = redis.call('GET', KEYS[5])
if claim == 'done' then return {-1, 0} end
if redis.call('SADD', KEYS[4], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
local ready = redis.call('ZCARD', KEYS[1])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
local size = redis.call('GET', KEYS[3])
if not size then return {ready, 0} end
local total = tonumber(size) + tonumber(redis.call('GET', KEYS[2]) or '0')
if ready == total and (claim == ARGV[6] or redis.call('SET', KEYS[5], ARGV[6], 'NX', 'EX', ARGV[5])) then
  return {ready, 1}
end
return {ready, 0}
"#;

/// KEYS: c j t s d, then the list of each callback message; ARGV: token,
/// done s, then the messages (one, or a group callback's tasks). Sends the
/// callback and clears the chord if the claim is still ours (or lapsed
/// with nobody else's in its place); 0 otherwise.
const FIRE: &str = r#"
local claim = redis.call('GET', KEYS[1])
if claim ~= ARGV[1] and not (claim == false and redis.call('EXISTS', KEYS[4]) == 1) then return 0 end
for i = 3, #ARGV do redis.call('LPUSH', KEYS[i + 3], ARGV[i]) end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
return 1
"#;

/// How a header task ended for good, as the chord records it.
#[derive(Clone, Copy)]
pub enum Part<'a> {
    Success(&'a Value),
    Failure(&'a Exception),
    Revoked(&'a Exception),
}

/// The chord bookkeeping Celery's Redis backend keeps, so celer hosts and
/// Celery workers can share one chord (see the module doc).
#[derive(Clone)]
pub struct Chords {
    conn: Conn,
    results: ResultWriter,
    expires_s: u64,
    part: ::redis::Script,
    fire: ::redis::Script,
}

impl Chords {
    /// The chord keys live as long as results do (`result_expires_s`), as with Celery's
    /// backend.
    pub fn new(conn: Conn, results: ResultWriter, expires_s: u64) -> Self {
        Chords { conn, results, expires_s: expires_s.max(1), part: ::redis::Script::new(PART), fire: ::redis::Script::new(FIRE) }
    }

    /// Records that `task_id`, a header task of the chord `kept` names,
    /// ended; sends the callback (or stores its failure) when it was the
    /// last part. Safe to repeat: a part counts once.
    pub(super) async fn part_done(&self, follow_ups: &FollowUps, kept: &Kept, task_id: &str, part: Part<'_>) -> Result<(), String> {
        let (Some(callback), Some(group)) = (&kept.chord, &kept.group) else { return Ok(()) };
        let key = |suffix: &str| format!("celery-taskset-meta-{group}{suffix}");
        let (state, value) = match part {
            Part::Success(v) => ("SUCCESS", v.clone()),
            Part::Failure(e) => ("FAILURE", exception_json(e)),
            Part::Revoked(e) => ("REVOKED", exception_json(e)),
        };
        let mut member = String::new();
        result::py_json(&mut member, &json!([1, task_id, state, value]));
        let score = kept.group_index.map_or_else(|| "+inf".to_string(), |i| i.to_string());
        let token = format!("{task_id}:{score}");
        let mut c = self.conn.clone();
        let mut inv = self.part.prepare_invoke();
        inv.key(key(".j")).key(key(".t")).key(key(".s")).key(key(".d")).key(key(".c"));
        inv.arg(&member).arg(&token).arg(&score).arg(self.expires_s).arg(CLAIM_S).arg(&token);
        let (ready, completed): (i64, i64) = inv.invoke_async(&mut c).await.map_err(|e| e.to_string())?;
        tracing::debug!(task_id, group = %group, ready, "Celery chord part recorded");
        if completed != 1 {
            return Ok(());
        }
        let (parts, nested): (Vec<String>, bool) = ::redis::pipe()
            .cmd("ZRANGE")
            .arg(key(".j"))
            .arg(0)
            .arg(-1)
            .cmd("EXISTS")
            .arg(key(""))
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let callback_id = callback.pointer("/options/task_id").and_then(Value::as_str).unwrap_or_default().to_string();
        let results = if nested {
            Err("Join error: celer does not join a chord header part whose result is a group (a chain that ends in a group)".to_string())
        } else {
            header_results(&parts)
        };
        match results {
            Ok(results) => {
                let results = Value::Array(results);
                // A group callback: each of its tasks gets the results.
                let messages: Vec<(String, String)> = match protocol::group_tasks(callback) {
                    Some(tasks) => tasks
                        .iter()
                        .enumerate()
                        .map(|(i, task)| follow_ups.message(task, Vec::new(), &results, task_id, kept, &format!("chord-{i}")))
                        .collect(),
                    _ => vec![follow_ups.message(callback, Vec::new(), &results, task_id, kept, "chord")],
                };
                let mut inv = self.fire.prepare_invoke();
                inv.key(key(".c")).key(key(".j")).key(key(".t")).key(key(".s")).key(key(".d"));
                inv.arg(&token).arg(DONE_S);
                for (queue, message) in &messages {
                    inv.key(follow_ups.queue_key(queue)).arg(message);
                }
                let fired: i64 = inv.invoke_async(&mut c).await.map_err(|e| e.to_string())?;
                if fired == 1 {
                    tracing::info!(group = %group, callback_id, parts = parts.len(), "Celery chord complete: callback sent");
                } else {
                    tracing::warn!(group = %group, callback_id, "Celery chord: the claim lapsed before the callback was sent; another run sends it");
                }
                Ok(())
            }
            Err(why) => self.fail(follow_ups, kept, callback, &callback_id, &why, &key(".s")).await,
        }
    }

    /// What starts `fanout`, the next step of `parent`'s chain (`rest` is
    /// the chain after it): commands to run first (a chord's size), then
    /// the messages to send.
    pub(super) fn start(
        &self,
        follow_ups: &FollowUps,
        fanout: &Fanout<'_>,
        rest: &[Value],
        previous: &Value,
        parent: &str,
        kept: &Kept,
    ) -> (Vec<::redis::Cmd>, Vec<(String, String)>) {
        let group = fanout.group_id;
        let mut setup = Vec::new();
        let body = fanout.body.map(|body| {
            let mut body = body.clone();
            if let Some(options) = body.get_mut("options").and_then(Value::as_object_mut) {
                options.insert("group_id".into(), json!(group));
                if !rest.is_empty() {
                    options.insert("chain".into(), Value::Array(rest.to_vec()));
                }
            } else {
                body["options"] = json!({"group_id": group, "chain": rest});
            }
            body
        });
        if let Some(body) = &body {
            if fanout.tasks.is_empty() {
                // Nothing to wait for: the callback runs on no results.
                let message = follow_ups.message(body, Vec::new(), &json!([]), parent, kept, "chord");
                return (setup, vec![message]);
            }
            let key = |suffix: &str| format!("celery-taskset-meta-{group}{suffix}");
            let mut clear = ::redis::cmd("DEL");
            clear.arg(key(".c"));
            let mut size = ::redis::cmd("SET");
            size.arg(key(".s")).arg(fanout.tasks.len()).arg("EX").arg(self.expires_s);
            setup.extend([clear, size]);
        }
        let messages = fanout
            .tasks
            .iter()
            .enumerate()
            .map(|(i, task)| {
                let mut member = task.clone();
                let options = json!({"group_id": group, "group_index": i, "chord": body});
                if let Some(last) = protocol::last_task_mut(&mut member) {
                    match last.get_mut("options").and_then(Value::as_object_mut) {
                        Some(o) => o.extend(options.as_object().cloned().unwrap_or_default()),
                        None => last["options"] = options,
                    }
                }
                follow_ups.message(&member, Vec::new(), previous, parent, kept, &format!("group-{group}-{i}"))
            })
            .collect();
        (setup, messages)
    }

    /// The callback will not run: its errbacks are sent with its id, and
    /// it and the rest of its chain read FAILURE with a `ChordError`.
    async fn fail(&self, follow_ups: &FollowUps, kept: &Kept, callback: &Value, callback_id: &str, why: &str, size_key: &str) -> Result<(), String> {
        tracing::warn!(callback_id, error = why, "Celery chord failed: its callback does not run");
        // Errbacks get the callback's id, which is also their root (Celery's).
        let mut errbacks = callback.pointer("/options/link_error").and_then(Value::as_array).cloned().unwrap_or_default();
        errbacks.retain(|sig| sig.get("task").is_some_and(Value::is_string));
        let failed = Value::String(callback_id.to_string());
        let messages: Vec<_> = errbacks
            .into_iter()
            .enumerate()
            .map(|(i, mut sig)| {
                if let Some(options) = sig.get_mut("options").and_then(Value::as_object_mut) {
                    options.entry("root_id").or_insert_with(|| failed.clone());
                }
                follow_ups.message(&sig, Vec::new(), &failed, callback_id, kept, &format!("chord-errback-{i}"))
            })
            .collect();
        let sent = follow_ups.push(&messages).await;
        let e = Exception::new("ChordError", "celery.exceptions", why);
        let traceback = format!("Traceback (most recent call last):\n  celer: chord callback {callback_id}\ncelery.exceptions.ChordError: {why}\n");
        let now = Utc::now();
        let mut docs = Vec::new();
        if !callback_id.is_empty() {
            docs.push((callback_id.to_string(), result::meta(callback_id, Status::Failure, &result::Outcome::Failure(e.clone(), Some(traceback)), now)));
        }
        // What would have run after it: the rest of its chain, the steps
        // of a callback that is itself a chain, the tasks of a group.
        let chain = match (protocol::unchain(callback, &[]), protocol::group_tasks(callback)) {
            (Some((first, mut rest)), _) => {
                rest.push(first);
                rest
            }
            (None, Some(members)) => members.iter().flat_map(protocol::member_tasks).cloned().collect(),
            _ => callback.pointer("/options/chain").and_then(Value::as_array).cloned().unwrap_or_default(),
        };
        let ids = chain.iter().filter_map(|sig| sig.pointer("/options/task_id").and_then(Value::as_str));
        for id in ids.filter(|id| *id != callback_id) {
            docs.push((id.to_string(), result::meta(id, Status::Failure, &result::Outcome::Failure(e.clone(), None), now)));
        }
        let written = self.results.write_all(&docs).await.map_err(|e| e.to_string());
        // The chord is over whatever failed above (Celery's `finally`).
        let mut c = self.conn.clone();
        ::redis::cmd("DEL").arg(size_key).query_async::<i64>(&mut c).await.map_err(|e| e.to_string())?;
        sent.and(written)
    }
}

/// Celery's JSON form of an exception.
fn exception_json(e: &Exception) -> Value {
    json!({"exc_type": e.exc_type, "exc_message": [e.message], "exc_module": e.exc_module})
}

/// The header's results in header order, or why the chord fails: the
/// first part (in header order) that failed or was revoked.
fn header_results(parts: &[String]) -> Result<Vec<Value>, String> {
    let mut results = Vec::with_capacity(parts.len());
    for raw in parts {
        let part: Value = serde_json::from_str(raw).map_err(|e| format!("Join error: unreadable chord part {raw:?}: {e}"))?;
        let (Some(id), Some(state), Some(value)) = (part.get(1).and_then(Value::as_str), part.get(2).and_then(Value::as_str), part.get(3)) else {
            return Err(format!("Join error: unreadable chord part {raw:?}"));
        };
        match state {
            "FAILURE" | "REVOKED" => return Err(format!("Dependency {id} raised {}", exception_repr(value))),
            _ => results.push(value.clone()),
        }
    }
    Ok(results)
}

/// How Python prints the exception Celery rebuilds from its JSON form:
/// `ValueError('boom', 42)`.
fn exception_repr(e: &Value) -> String {
    let name = e.get("exc_type").and_then(Value::as_str).unwrap_or("Exception");
    let args = match e.get("exc_message") {
        Some(Value::Array(args)) => args.iter().map(py_repr).collect::<Vec<_>>().join(", "),
        Some(Value::Null) | None => String::new(),
        Some(one) => py_repr(one),
    };
    format!("{name}({args})")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of Celery's `ChordError` names the failed part as Python
    /// prints its exception.
    #[test]
    fn a_failed_part_is_named_as_python_prints_it() {
        let parts = [
            r#"[1, "a", "SUCCESS", {"sum": 3}]"#.to_string(),
            r#"[1, "b", "FAILURE", {"exc_type": "ValueError", "exc_message": ["boom", 42], "exc_module": "builtins"}]"#.to_string(),
            r#"[1, "c", "REVOKED", {"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"}]"#.to_string(),
        ];
        assert_eq!(header_results(&parts), Err("Dependency b raised ValueError('boom', 42)".to_string()));
        assert_eq!(header_results(&parts[..1]), Ok(vec![json!({"sum": 3})]));
        assert_eq!(exception_repr(&json!({"exc_type": "KeyError", "exc_message": []})), "KeyError()");
        assert!(header_results(&["not json".to_string()]).is_err_and(|e| e.starts_with("Join error")));
    }
}

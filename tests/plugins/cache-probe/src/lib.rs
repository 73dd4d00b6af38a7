//! `cache_probe`: a test-only plugin that calls the cache capability with
//! the job's arguments and reports what came back.
//!
//! * `cache_probe.run {calls: [{op, key, value?, ttl_ms?, delta?}], propagate?}`
//!   makes the calls in order and returns one `{"ok": …}` or
//!   `{"err": {"kind", "message"}}` per call. With `propagate`, the first
//!   error ends the job the way a real plugin's `?` would (`unavailable` →
//!   retry, anything else → fail).
//! * `cache_probe.get_loop {key, n}` makes `n` gets of one key inside one
//!   job: the benchmark's guest side.

use celer_plugin::{Context, HostError, TaskError, cache};
use serde::Deserialize;
use serde_json::{Value, json};

celer_plugin::plugin! {
    name: "cache_probe",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "cache_probe.run" => run,
        "cache_probe.get_loop" => get_loop,
    }
}

#[derive(Deserialize)]
struct Call {
    op: String,
    key: String,
    /// For `set`: UTF-8 text stored as its bytes.
    value: Option<String>,
    ttl_ms: Option<u64>,
    delta: Option<i64>,
}

#[derive(Deserialize)]
struct Run {
    calls: Vec<Call>,
    propagate: Option<bool>,
}

fn call(c: &Call) -> Result<Value, HostError> {
    match c.op.as_str() {
        "get" => cache::get(&c.key).map(|v| json!(v.map(|b| String::from_utf8_lossy(&b).into_owned()))),
        "set" => cache::set(&c.key, c.value.as_deref().unwrap_or("").as_bytes(), c.ttl_ms).map(|()| Value::Null),
        "delete" => cache::delete(&c.key).map(|existed| json!(existed)),
        "incr" => cache::incr(&c.key, c.delta.unwrap_or(1)).map(|n| json!(n)),
        other => Err(HostError::Invalid(format!("cache_probe: unknown op {other:?}"))),
    }
}

fn run(_: &Context, Run { calls, propagate }: Run) -> Result<Value, TaskError> {
    let mut out = Vec::with_capacity(calls.len());
    for c in &calls {
        match call(c) {
            Ok(v) => out.push(json!({ "ok": v })),
            Err(e) if propagate == Some(true) => return Err(e.into()),
            Err(e) => {
                let (kind, message) = e.kind_and_message();
                out.push(json!({ "err": { "kind": kind, "message": message } }));
            }
        }
    }
    Ok(Value::Array(out))
}

#[derive(Deserialize)]
struct GetLoop {
    key: String,
    n: u64,
}

fn get_loop(_: &Context, GetLoop { key, n }: GetLoop) -> Result<Value, TaskError> {
    let mut hits = 0_u64;
    for _ in 0..n {
        if cache::get(&key)?.is_some() {
            hits += 1;
        }
    }
    Ok(json!({ "n": n, "hits": hits }))
}

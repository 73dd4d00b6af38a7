//! `db_probe`: a test-only plugin that makes the database calls its job
//! describes and reports what came back.
//!
//! * `db_probe.run {calls: [{op, sql?, params?, batch?}], propagate?}`: `op`
//!   is `query` (reads the whole cursor in batches of `batch`, default 256,
//!   and returns `{columns, rows}`), `execute` (`{affected}`), `begin`,
//!   `commit` or `rollback`. One `{"ok": …}` or `{"err": {"kind",
//!   "message"}}` per call; with `propagate`, the first error ends the job
//!   as a real plugin's `?` would (`unavailable` → retry, else fail).
//! * `db_probe.stream {sql, params?, batch}`: reads a cursor to its end,
//!   keeping only counts, and returns `{rows, bytes, batches, columns}` —
//!   a small plugin streaming a large result.
//! * `db_probe.query_loop {sql, params?, n}`: `n` one-row queries (query,
//!   next, drop) in one job: the benchmark's guest side.
//!
//! Values travel as JSON: parameters `null`, `true`, `7`, `2.5`, `"text"`,
//! or tagged `{"bytes": [..]}`, `{"timestamp": µs}`, `{"json": "…"}`,
//! `{"int": n}`, `{"float": x}`, `{"text": s}`, `{"bool": b}`; results are
//! always tagged (`null` for NULL).

use celer_plugin::database::{self, Value as Db};
use celer_plugin::{Context, HostError, TaskError};
use serde::Deserialize;
use serde_json::{Value, json};

celer_plugin::plugin! {
    name: "db_probe",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "db_probe.run" => run,
        "db_probe.stream" => stream,
        "db_probe.query_loop" => query_loop,
    }
}

fn param(v: &Value) -> Result<Db, TaskError> {
    Ok(match v {
        Value::Null => Db::Null,
        Value::Bool(b) => Db::Boolean(*b),
        Value::Number(n) if n.is_i64() => Db::Int(n.as_i64().unwrap_or_default()),
        Value::Number(n) => Db::Float(n.as_f64().unwrap_or_default()),
        Value::String(s) => Db::Text(s.clone()),
        Value::Object(o) if o.len() == 1 => {
            let (k, v) = o.iter().next().expect("one entry");
            match (k.as_str(), v) {
                ("int", v) => Db::Int(v.as_i64().ok_or_else(|| TaskError::fail("int"))?),
                ("float", v) => Db::Float(v.as_f64().ok_or_else(|| TaskError::fail("float"))?),
                ("text", Value::String(s)) => Db::Text(s.clone()),
                ("bool", Value::Bool(b)) => Db::Boolean(*b),
                ("timestamp", v) => Db::Timestamp(v.as_i64().ok_or_else(|| TaskError::fail("timestamp"))?),
                ("json", Value::String(s)) => Db::Json(s.clone()),
                ("bytes", Value::Array(a)) => Db::Bytes(a.iter().map(|b| b.as_u64().unwrap_or_default() as u8).collect()),
                _ => return Err(TaskError::fail(format!("db_probe: unknown parameter {v}"))),
            }
        }
        other => return Err(TaskError::fail(format!("db_probe: unknown parameter {other}"))),
    })
}

fn params(list: &Option<Vec<Value>>) -> Result<Vec<Db>, TaskError> {
    list.iter().flatten().map(param).collect()
}

fn value(v: &Db) -> Value {
    match v {
        Db::Null => Value::Null,
        Db::Boolean(b) => json!({ "bool": b }),
        Db::Int(i) => json!({ "int": i }),
        Db::Float(f) => json!({ "float": f }),
        Db::Text(s) => json!({ "text": s }),
        Db::Bytes(b) => json!({ "bytes": b }),
        Db::Timestamp(t) => json!({ "timestamp": t }),
        Db::Json(s) => json!({ "json": s }),
    }
}

#[derive(Deserialize)]
struct Call {
    op: String,
    sql: Option<String>,
    params: Option<Vec<Value>>,
    batch: Option<u32>,
}

#[derive(Deserialize)]
struct Run {
    calls: Vec<Call>,
    propagate: Option<bool>,
}

fn call(c: &Call) -> Result<Result<Value, HostError>, TaskError> {
    let sql = c.sql.as_deref().unwrap_or("");
    let p = params(&c.params)?;
    Ok(match c.op.as_str() {
        "query" => (|| {
            let cursor = database::query(sql, &p)?;
            let mut rows = Vec::new();
            loop {
                let batch = cursor.next(c.batch.unwrap_or(256))?;
                if batch.is_empty() {
                    break;
                }
                rows.extend(batch.iter().map(|r| Value::Array(r.iter().map(value).collect())));
            }
            Ok(json!({ "columns": cursor.columns(), "rows": rows }))
        })(),
        "execute" => database::execute(sql, &p).map(|n| json!({ "affected": n })),
        "begin" => database::begin().map(|()| Value::Null),
        "commit" => database::commit().map(|()| Value::Null),
        "rollback" => database::rollback().map(|()| Value::Null),
        other => return Err(TaskError::fail(format!("db_probe: unknown op {other:?}"))),
    })
}

fn run(_: &Context, Run { calls, propagate }: Run) -> Result<Value, TaskError> {
    let mut out = Vec::with_capacity(calls.len());
    for c in &calls {
        match call(c)? {
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
struct Stream {
    sql: String,
    params: Option<Vec<Value>>,
    batch: u32,
}

fn size(v: &Db) -> u64 {
    match v {
        Db::Null | Db::Boolean(_) => 1,
        Db::Int(_) | Db::Float(_) | Db::Timestamp(_) => 8,
        Db::Text(s) | Db::Json(s) => s.len() as u64,
        Db::Bytes(b) => b.len() as u64,
    }
}

fn stream(_: &Context, args: Stream) -> Result<Value, TaskError> {
    let cursor = database::query(&args.sql, &params(&args.params)?)?;
    let (mut rows, mut bytes, mut batches, mut largest) = (0_u64, 0_u64, 0_u64, 0_usize);
    loop {
        let batch = cursor.next(args.batch)?;
        if batch.is_empty() {
            break;
        }
        batches += 1;
        largest = largest.max(batch.len());
        rows += batch.len() as u64;
        bytes += batch.iter().flatten().map(size).sum::<u64>();
    }
    Ok(json!({ "rows": rows, "bytes": bytes, "batches": batches, "largest_batch": largest, "columns": cursor.columns() }))
}

#[derive(Deserialize)]
struct QueryLoop {
    sql: String,
    params: Option<Vec<Value>>,
    n: u64,
}

fn query_loop(_: &Context, args: QueryLoop) -> Result<Value, TaskError> {
    let p = params(&args.params)?;
    let mut rows = 0_u64;
    for _ in 0..args.n {
        let cursor = database::query(&args.sql, &p)?;
        rows += cursor.next(2)?.len() as u64;
    }
    Ok(json!({ "n": args.n, "rows": rows }))
}

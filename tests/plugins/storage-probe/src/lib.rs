//! `storage_probe`: a test-only plugin that calls the storage capability
//! with the job's arguments and reports what came back.
//!
//! * `storage_probe.run {calls: [{op, …}], propagate?}` makes the calls in
//!   order and returns one `{"ok": …}` or `{"err": {"kind", "message"}}` per
//!   call. With `propagate`, the first error ends the job the way a real
//!   plugin's `?` would (`unavailable` → retry, anything else → fail). Ops:
//!   `put {key, data, content_type?}`, `get {key}`, `delete {key}`,
//!   `list {prefix, start_after?, limit?}`, `presign {key, expires_in_s?}`,
//!   `misuse {key}` (write after finish, finish twice: the error kinds).
//! * `storage_probe.big {key, mib, chunk_kib?, finish?, panic_after_mib?}`
//!   generates `mib` MiB of deterministic bytes chunk by chunk into one
//!   streamed writer and returns `{size, sha256, info}`; it never holds more
//!   than one chunk. `finish: false` drops the writer unfinished;
//!   `panic_after_mib` traps mid-upload.

use celer_plugin::{Context, HostError, TaskError, storage};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

celer_plugin::plugin! {
    name: "storage_probe",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "storage_probe.run" => run,
        "storage_probe.big" => big,
    }
}

#[derive(Deserialize)]
struct Call {
    op: String,
    key: Option<String>,
    /// For `put`: UTF-8 text stored as its bytes.
    data: Option<String>,
    content_type: Option<String>,
    prefix: Option<String>,
    start_after: Option<String>,
    limit: Option<u32>,
    expires_in_s: Option<u32>,
}

#[derive(Deserialize)]
struct Run {
    calls: Vec<Call>,
    propagate: Option<bool>,
}

fn err_json(e: &HostError) -> Value {
    let (kind, message) = e.kind_and_message();
    json!({ "kind": kind, "message": message })
}

fn info(o: &storage::ObjectInfo) -> Value {
    json!({ "key": o.key, "size": o.size, "modified": o.modified })
}

fn call(c: &Call) -> Result<Value, HostError> {
    let key = c.key.as_deref().unwrap_or("");
    match c.op.as_str() {
        "put" => {
            let data = c.data.as_deref().unwrap_or("");
            storage::put(key, data.as_bytes(), c.content_type.as_deref()).map(|o| info(&o))
        }
        "get" => storage::get(key).map(|v| json!(v.map(|b| String::from_utf8_lossy(&b).into_owned()))),
        "delete" => storage::delete(key).map(|existed| json!(existed)),
        "list" => {
            let prefix = c.prefix.as_deref().unwrap_or("");
            storage::list(prefix, c.start_after.as_deref(), c.limit.unwrap_or(100))
                .map(|v| Value::Array(v.iter().map(info).collect()))
        }
        "presign" => storage::presign_get(key, c.expires_in_s.unwrap_or(300)).map(|url| json!(url)),
        "misuse" => {
            let w = storage::create(key, None)?;
            w.write(b"once")?;
            let first = w.finish()?;
            let after = w.write(b"again").err().map(|e| err_json(&e));
            let twice = w.finish().err().map(|e| err_json(&e));
            Ok(json!({ "finished": info(&first), "write_after_finish": after, "finish_twice": twice }))
        }
        other => Err(HostError::Invalid(format!("storage_probe: unknown op {other:?}"))),
    }
}

fn run(_: &Context, Run { calls, propagate }: Run) -> Result<Value, TaskError> {
    let mut out = Vec::with_capacity(calls.len());
    for c in &calls {
        match call(c) {
            Ok(v) => out.push(json!({ "ok": v })),
            Err(e) if propagate == Some(true) => return Err(e.into()),
            Err(e) => out.push(json!({ "err": err_json(&e) })),
        }
    }
    Ok(Value::Array(out))
}

#[derive(Deserialize)]
struct Big {
    key: String,
    mib: u64,
    chunk_kib: Option<usize>,
    finish: Option<bool>,
    panic_after_mib: Option<u64>,
}

/// xorshift64*: cheap, deterministic bytes that do not compress.
struct Bytes(u64);

impl Bytes {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

fn big(ctx: &Context, args: Big) -> Result<Value, TaskError> {
    let total = args.mib << 20;
    let chunk = args.chunk_kib.unwrap_or(1024) << 10;
    let mut buf = vec![0u8; chunk];
    let mut bytes = Bytes(0x9E37_79B9_7F4A_7C15);
    let mut hash = Sha256::new();
    let writer = storage::create(&args.key, Some("application/octet-stream"))?;
    let mut written = 0u64;
    while written < total {
        if args.panic_after_mib.is_some_and(|m| written >= m << 20) {
            panic!("storage_probe: panicking mid-upload after {written} bytes");
        }
        let n = chunk.min(usize::try_from(total - written).unwrap_or(chunk));
        bytes.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        writer.write(&buf[..n])?;
        written += n as u64;
        ctx.progress(written, total);
    }
    let sha256: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if args.finish == Some(false) {
        drop(writer);
        return Ok(json!({ "size": written, "sha256": sha256, "info": null }));
    }
    let done = writer.finish()?;
    Ok(json!({ "size": written, "sha256": sha256, "info": info(&done) }))
}

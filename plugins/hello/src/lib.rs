//! `hello`: celer's first plugin, and the smallest tour of the SDK.
//!
//! Each task exercises one thing end to end, so that the host's tests and
//! benchmarks have a known plugin to run: configuration (`greet`), the
//! cheapest possible job (`noop`), arithmetic on typed arguments (`add`),
//! summing a list of results (`total`, a chord's callback), both failure
//! kinds (`fail`), follow-up jobs through the `jobs` grant
//! (`chain`), and logging, progress and captured stdout (`progress`).

use celer_plugin::{Context, TaskError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

celer_plugin::plugin! {
    name: "hello",
    version: env!("CARGO_PKG_VERSION"),
    tasks: {
        "hello.greet" => greet,
        "hello.noop" => noop,
        "hello.add" => add,
        "hello.total" => total,
        "hello.fail" => fail,
        "hello.chain" => chain,
        "hello.progress" => progress,
    }
}

/// The manifest's `[config]`; every key optional so that a bare manifest works.
#[derive(Deserialize)]
struct Config {
    #[serde(default = "default_greeting")]
    greeting: String,
}

fn default_greeting() -> String {
    "Hello".to_owned()
}

#[derive(Deserialize)]
struct Greet {
    name: String,
    excited: Option<bool>,
}

#[derive(Serialize)]
struct Greeting {
    message: String,
}

/// `{"message": "<greeting>, <name>!"}`, with `!!!` when excited; the
/// greeting comes from the manifest's `[config]`.
fn greet(ctx: &Context, Greet { name, excited }: Greet) -> Result<Greeting, TaskError> {
    let Config { greeting } = ctx.config()?;
    Ok(Greeting { message: message(&greeting, &name, excited.unwrap_or(false)) })
}

fn message(greeting: &str, name: &str, excited: bool) -> String {
    let bang = if excited { "!!!" } else { "!" };
    format!("{greeting}, {name}{bang}")
}

/// Does nothing and returns `null`: the per-job overhead of the host, measured.
fn noop(_: &Context, (): ()) -> Result<(), TaskError> {
    Ok(())
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// `{"sum": a + b}`; an overflow fails the job rather than wrapping.
fn add(_: &Context, Add { a, b }: Add) -> Result<Value, TaskError> {
    let sum = a
        .checked_add(b)
        .ok_or_else(|| TaskError::fail(format!("{a} + {b} overflows a 64-bit integer")))?;
    Ok(json!({ "sum": sum }))
}

#[derive(Deserialize)]
struct Total {
    parts: Vec<Value>,
}

/// `{"sum": …}` of numbers or of `{"sum": n}` results: the callback of a
/// chord of `hello.add`s (Celery's classic `tsum`). Anything else in
/// `parts`, or an overflow, fails the job.
fn total(_: &Context, Total { parts }: Total) -> Result<Value, TaskError> {
    let mut sum: i64 = 0;
    for (i, part) in parts.iter().enumerate() {
        let n = part
            .as_i64()
            .or_else(|| part.get("sum").and_then(Value::as_i64))
            .ok_or_else(|| TaskError::fail(format!("part {i} is not a number nor a {{\"sum\": n}} result: {part}")))?;
        sum = sum
            .checked_add(n)
            .ok_or_else(|| TaskError::fail("the total overflows a 64-bit integer"))?;
    }
    Ok(json!({ "sum": sum }))
}

#[derive(Deserialize)]
struct Fail {
    message: String,
    retry: bool,
    /// With `retry`: ask for this delay instead of the host's backoff.
    after_ms: Option<u64>,
}

/// Fails on purpose: a retry when `retry` (after `after_ms` when given),
/// else a permanent failure.
fn fail(_: &Context, Fail { message, retry, after_ms }: Fail) -> Result<(), TaskError> {
    Err(match (retry, after_ms) {
        (true, Some(ms)) => TaskError::retry_after(message, std::time::Duration::from_millis(ms)),
        (true, None) => TaskError::retry(message),
        (false, _) => TaskError::fail(message),
    })
}

#[derive(Deserialize)]
struct Chain {
    name: String,
}

/// Enqueues `hello.greet` for `name` (granted by the manifest) and returns
/// `{"child": <id>}`. Keyed by this job's id, so a retry does not enqueue twice.
fn chain(ctx: &Context, Chain { name }: Chain) -> Result<Value, TaskError> {
    let options = celer_plugin::EnqueueOptions::new()
        .idempotency_key(format!("hello.chain:{}", ctx.job_id()));
    let child = ctx.enqueue_with("hello.greet", (), json!({ "name": name }), &options)?;
    Ok(json!({ "child": child }))
}

#[derive(Deserialize)]
struct Progress {
    steps: u32,
}

/// Reports progress and logs at every step, prints one line to stdout (the
/// host captures it), and returns `{"steps": n}`.
fn progress(ctx: &Context, Progress { steps }: Progress) -> Result<Value, TaskError> {
    let total = u64::from(steps);
    for done in 1..=total {
        ctx.progress(done, total);
        ctx.info(format!("step {done}/{total}"));
    }
    println!("hello.progress: {steps} steps done");
    Ok(json!({ "steps": steps }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn greeting_uses_the_configured_word() {
        let ctx = Context::for_tests("hello.greet", json!({ "greeting": "Hi" }));
        let out = greet(&ctx, Greet { name: "Ann".into(), excited: None }).unwrap();
        assert_eq!(out.message, "Hi, Ann!");
        let ctx = Context::for_tests("hello.greet", json!({}));
        let out = greet(&ctx, Greet { name: "Bo".into(), excited: Some(true) }).unwrap();
        assert_eq!(out.message, "Hello, Bo!!!");
    }

    #[test]
    fn add_and_its_overflow() {
        let ctx = Context::for_tests("hello.add", json!({}));
        assert_eq!(add(&ctx, Add { a: 2, b: 3 }).unwrap(), json!({ "sum": 5 }));
        assert!(matches!(add(&ctx, Add { a: i64::MAX, b: 1 }), Err(TaskError::Fail(_))));
    }

    #[test]
    fn total_sums_numbers_and_add_results() {
        let ctx = Context::for_tests("hello.total", json!({}));
        let parts = vec![json!(1), json!({"sum": 3}), json!(-2)];
        assert_eq!(total(&ctx, Total { parts }).unwrap(), json!({"sum": 2}));
        assert!(total(&ctx, Total { parts: vec![json!("x")] }).is_err());
        assert!(total(&ctx, Total { parts: vec![json!(i64::MAX), json!(1)] }).is_err());
    }

    #[test]
    fn fail_picks_the_kind() {
        let ctx = Context::for_tests("hello.fail", json!({}));
        let retry = fail(&ctx, Fail { message: "later".into(), retry: true, after_ms: None });
        assert_eq!(retry, Err(TaskError::retry("later")));
        let after = fail(&ctx, Fail { message: "later".into(), retry: true, after_ms: Some(1500) });
        assert_eq!(after, Err(TaskError::retry_after("later", std::time::Duration::from_millis(1500))));
        let fatal = fail(&ctx, Fail { message: "no".into(), retry: false, after_ms: Some(1) });
        assert_eq!(fatal, Err(TaskError::fail("no")));
    }
}

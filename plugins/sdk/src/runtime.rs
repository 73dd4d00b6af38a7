//! What [`plugin!`](crate::plugin) expands to calls into: turning the WIT
//! `describe`/`run` exports into calls of typed task functions.
//!
//! Kept out of the macro so that the logic is ordinary, tested Rust and the
//! macro stays a thin table of task names. Public only for the macro; not a
//! stable API.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::bindings::Guest;
pub use crate::bindings::celer::plugin::types::{Job, PluginInfo, TaskError as WitTaskError};

use crate::{Context, TaskError, args};

/// The answer to `describe`.
pub fn plugin_info(name: &str, version: &str, tasks: &[&str]) -> PluginInfo {
    PluginInfo {
        name: name.to_owned(),
        version: version.to_owned(),
        tasks: tasks.iter().map(|&t| t.to_owned()).collect(),
    }
}

/// The body of `run`: builds the [`Context`], lets `dispatch` find the task
/// (`None`: no such task here) and converts the outcome to the wire form.
pub fn run_job(
    job: Job,
    tasks: &[&str],
    dispatch: impl FnOnce(&Context, &str, &str, &str) -> Option<Result<String, TaskError>>,
) -> Result<String, WitTaskError> {
    let (ctx, args, kwargs) = Context::from_job(job);
    let outcome = dispatch(&ctx, ctx.task(), &args, &kwargs)
        .unwrap_or_else(|| Err(unknown_task(ctx.task(), tasks)));
    outcome.map_err(WitTaskError::from)
}

fn unknown_task(task: &str, tasks: &[&str]) -> TaskError {
    TaskError::fail(format!("unknown task `{task}`; this plugin has: {}", tasks.join(", ")))
}

/// Decodes the arguments, calls the task and encodes its result as JSON.
pub fn invoke<A, R, F>(ctx: &Context, args: &str, kwargs: &str, task: F) -> Result<String, TaskError>
where
    A: DeserializeOwned,
    R: Serialize,
    F: FnOnce(&Context, A) -> Result<R, TaskError>,
{
    let input: A = args::decode(args, kwargs)?;
    let output = task(ctx, input)?;
    serde_json::to_string(&output)
        .map_err(|e| TaskError::fail(format!("the task's result is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde_json::json;

    use super::*;
    use crate::bindings::celer::plugin::types::RetryRequest;

    #[derive(Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    fn add(_: &Context, Add { a, b }: Add) -> Result<serde_json::Value, TaskError> {
        Ok(json!({"sum": a + b}))
    }

    fn noop(_: &Context, (): ()) -> Result<(), TaskError> {
        Ok(())
    }

    fn flaky(ctx: &Context, (): ()) -> Result<(), TaskError> {
        Err(TaskError::retry(format!("attempt {}", ctx.attempt())))
    }

    fn not_json(_: &Context, (): ()) -> Result<BTreeMap<(i32, i32), i32>, TaskError> {
        Ok(BTreeMap::from([((1, 2), 3)]))
    }

    const TASKS: &[&str] = &["t.add", "t.noop", "t.flaky", "t.not_json"];

    fn run(task: &str, args: &str, kwargs: &str) -> Result<String, WitTaskError> {
        let job = Job {
            id: "j".into(),
            task: task.into(),
            args: args.into(),
            kwargs: kwargs.into(),
            attempt: 1,
            max_retries: 3,
            queue: "default".into(),
            parent_id: None,
            config: "{}".into(),
        };
        // What `plugin!` generates.
        run_job(job, TASKS, |ctx, task, args, kwargs| match task {
            "t.add" => Some(invoke(ctx, args, kwargs, add)),
            "t.noop" => Some(invoke(ctx, args, kwargs, noop)),
            "t.flaky" => Some(invoke(ctx, args, kwargs, flaky)),
            "t.not_json" => Some(invoke(ctx, args, kwargs, not_json)),
            _ => None,
        })
    }

    #[test]
    fn results_are_json_text() {
        assert_eq!(run("t.add", "[2]", r#"{"b": 3}"#), Ok(r#"{"sum":5}"#.to_owned()));
        assert_eq!(run("t.noop", "[]", "{}"), Ok("null".to_owned()));
    }

    #[test]
    fn failures_reach_the_wire() {
        assert_eq!(
            run("t.flaky", "[]", "{}"),
            Err(WitTaskError::Retry(RetryRequest { reason: "attempt 1".into(), after_ms: None }))
        );
        assert!(matches!(
            run("t.add", "[1]", "{}"),
            Err(WitTaskError::Fail(m)) if m == "invalid arguments: missing field `b`"
        ));
        assert!(matches!(
            run("t.not_json", "[]", "{}"),
            Err(WitTaskError::Fail(m)) if m.starts_with("the task's result is not JSON: ")
        ));
    }

    #[test]
    fn unknown_task_fails_and_lists_the_known_ones() {
        assert_eq!(
            run("t.nope", "[]", "{}"),
            Err(WitTaskError::Fail(
                "unknown task `t.nope`; this plugin has: t.add, t.noop, t.flaky, t.not_json".into()
            ))
        );
    }

    #[test]
    fn describe_lists_the_tasks() {
        let info = plugin_info("p", "1.0.0", TASKS);
        assert_eq!((info.name.as_str(), info.version.as_str()), ("p", "1.0.0"));
        assert_eq!(info.tasks, TASKS);
    }
}

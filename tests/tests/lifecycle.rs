//! Every job state transition, through real `celer` processes: queued →
//! running → succeeded; scheduled; retrying with backoff; failed into the
//! dead letters and back; cancelled; expired; bad input refused at the door.

use std::time::{Duration, Instant};

use celer_integration::{Env, stdout_json};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn env_with_hello() -> Env {
    let env = Env::new();
    env.install("hello");
    env
}

#[test]
fn a_job_runs_to_success_with_its_result_and_provenance() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.greet", &["--kwargs", r#"{"name":"Ada"}"#]);
    let s = env.wait_state(&id, "succeeded", T);
    assert_eq!(s["result"], json!({"message": "Hello, Ada!"}));
    assert_eq!(s["plugin"], "hello");
    assert_eq!(s["attempt"], 0);
    assert!(s["plugin_version"].is_string() && s["host"].is_string() && s["finished_at"].is_string(), "{s:#}");
    assert_eq!(s["error"], serde_json::Value::Null);
}

#[test]
fn positional_args_map_to_fields_and_wait_prints_the_final_status() {
    let env = env_with_hello();
    let _server = env.serve();
    let out = env.celer(&["enqueue", "hello.add", "--args", "[2, 40]", "--wait", "--timeout", "20s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    assert_eq!(s["state"], "succeeded");
    assert_eq!(s["result"], json!({"sum": 42}));
}

#[test]
fn wait_exits_1_when_the_job_fails() {
    let env = env_with_hello();
    let _server = env.serve();
    let out = env.celer(&[
        "enqueue", "hello.fail", "--kwargs", r#"{"message":"nope","retry":false}"#, "--wait", "--timeout", "20s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let s = stdout_json(&out);
    assert_eq!(s["state"], "failed");
    assert_eq!(s["error"]["kind"], "plugin");
    assert_eq!(s["error"]["message"], "nope");
    assert_eq!(s["attempt"], 0, "a permanent failure is not retried");
}

#[test]
fn bad_input_gets_one_clear_line_and_exit_2() {
    let env = env_with_hello();
    for (args, needle) in [
        (vec!["enqueue", "hello.greet", "--args", "[1,"], "--args is not valid JSON"),
        (vec!["enqueue", "hello.greet", "--args", r#"{"a":1}"#], "args must be a JSON array"),
        (vec!["enqueue", "hello.greet", "--kwargs", "[1]"], "kwargs must be a JSON object"),
        (vec!["enqueue", "no.such.task"], "unknown task \"no.such.task\""),
        (vec!["status", "no-such-id"], "no job with id"),
        (vec!["plugin", "check", "/nonexistent.wasm"], "no such file"),
    ] {
        let out = env.celer(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one line, got: {stderr}");
    }
}

#[test]
fn a_delayed_job_is_scheduled_and_not_run_before_its_time() {
    let env = env_with_hello();
    let _server = env.serve();
    let enqueued = Instant::now();
    let id = env.enqueue("hello.noop", &["--delay", "2s"]);
    assert_eq!(env.status(&id)["state"], "scheduled");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(env.status(&id)["state"], "scheduled", "ran before its eta");
    env.wait_state(&id, "succeeded", T);
    assert!(enqueued.elapsed() >= Duration::from_secs(2));
}

#[test]
fn retries_back_off_then_dead_letter_then_come_back_on_request() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.fail", &["--kwargs", r#"{"message":"flaky","retry":true}"#, "--max-retries", "2"]);
    let first = env.wait_state(&id, "retrying", T);
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["error"]["message"], "flaky");
    let failed = env.wait_state(&id, "failed", T);
    assert_eq!(failed["attempt"], 2, "ran 3 times: attempts 0, 1, 2");
    assert_eq!(failed["error"]["kind"], "plugin");
    // Backoff: base 300 ms with equal jitter, so at least 150 + 300 ms between
    // the first run and the last.
    let started = chrono::DateTime::parse_from_rfc3339(failed["started_at"].as_str().expect("started_at")).expect("time");
    let enqueued = chrono::DateTime::parse_from_rfc3339(failed["enqueued_at"].as_str().expect("enqueued_at")).expect("time");
    assert!(started - enqueued >= chrono::Duration::milliseconds(450), "retries did not back off: {failed:#}");

    let dead = stdout_json(&env.celer(&["dead", "list"]));
    assert!(dead.as_array().expect("list").iter().any(|j| j["id"] == id.as_str()), "{dead:#}");

    let out = env.celer(&["dead", "retry", &id]);
    assert_eq!(stdout_json(&out)["retried"], 1);
    let again = env.wait_for(&id, T, |s| s["state"] == "failed" && s["attempt"] == 2 && s["started_at"] != failed["started_at"]);
    assert_eq!(again["error"]["message"], "flaky");

    let purged = stdout_json(&env.celer(&["dead", "purge"]));
    assert_eq!(purged["purged"], 1);
    assert_eq!(env.celer(&["status", &id]).status.code(), Some(2), "purged jobs are gone");
}

#[test]
fn a_plugin_retry_after_is_honoured() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.fail", &["--kwargs", r#"{"message":"later","retry":true,"after_ms":1500}"#, "--max-retries", "1"]);
    let retrying = env.wait_state(&id, "retrying", T);
    let failed = env.wait_state(&id, "failed", T);
    let t0 = chrono::DateTime::parse_from_rfc3339(retrying["finished_at"].as_str().unwrap_or(retrying["started_at"].as_str().expect("time"))).expect("time");
    let t1 = chrono::DateTime::parse_from_rfc3339(failed["started_at"].as_str().expect("time")).expect("time");
    assert!(t1 - t0 >= chrono::Duration::milliseconds(1400), "retry came after {:?}", t1 - t0);
}

#[test]
fn invalid_arguments_fail_at_once_with_their_kind() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.add", &["--kwargs", r#"{"a":"two","b":3}"#]);
    let s = env.wait_state(&id, "failed", T);
    assert_eq!(s["error"]["kind"], "invalid-args", "{s:#}");
    assert_eq!(s["attempt"], 0);
}

#[test]
fn an_unknown_task_is_dead_lettered_with_its_kind() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("nobody.serves.this", &["--no-check"]);
    let s = env.wait_state(&id, "failed", T);
    assert_eq!(s["error"]["kind"], "unknown-task");
}

#[test]
fn a_queued_job_can_be_cancelled_and_never_runs() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.noop", &["--delay", "1s"]);
    let out = env.celer(&["cancel", &id]);
    assert_eq!(stdout_json(&out)["outcome"], "cancelled");
    std::thread::sleep(Duration::from_millis(1500));
    let s = env.status(&id);
    assert_eq!(s["state"], "cancelled");
    assert_eq!(s["started_at"], serde_json::Value::Null, "it never started");
}

#[test]
fn a_running_job_can_be_cancelled() {
    let env = Env::new();
    env.install("hostile");
    let _server = env.serve();
    let id = env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":60000}"#]);
    env.wait_state(&id, "running", T);
    let out = env.celer(&["cancel", &id]);
    assert_eq!(stdout_json(&out)["outcome"], "stop-requested");
    let s = env.wait_state(&id, "cancelled", T);
    assert_eq!(s["error"]["kind"], "cancelled");
}

#[test]
fn a_job_past_its_expiry_turns_expired_instead_of_running() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.noop", &["--delay", "1500ms", "--expires", "500ms"]);
    let s = env.wait_state(&id, "expired", T);
    assert_eq!(s["started_at"], serde_json::Value::Null);
}

#[test]
fn an_idempotency_key_returns_the_first_job() {
    let env = env_with_hello();
    let a = env.enqueue("hello.noop", &["--idempotency-key", "order-42"]);
    let b = env.enqueue("hello.noop", &["--idempotency-key", "order-42"]);
    assert_eq!(a, b);
}

#[test]
fn a_job_can_enqueue_its_granted_follow_up_and_its_status_says_so() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.chain", &["--kwargs", r#"{"name":"Grace"}"#]);
    let parent = env.wait_state(&id, "succeeded", T);
    let child_id = parent["result"]["child"].as_str().expect("child id").to_string();
    let child = env.wait_state(&child_id, "succeeded", T);
    assert_eq!(child["parent_id"], id.as_str());
    assert_eq!(child["root_id"], id.as_str(), "the parent started the workflow");
    assert_eq!(parent["root_id"], serde_json::Value::Null);
    assert_eq!(child["result"], json!({"message": "Hello, Grace!"}));
    assert_eq!(parent["touched"]["enqueued"][0]["task"], "hello.greet", "{parent:#}");
}

#[test]
fn progress_and_guest_output_are_captured() {
    let env = env_with_hello();
    let _server = env.serve();
    let id = env.enqueue("hello.progress", &["--kwargs", r#"{"steps":3}"#]);
    let s = env.wait_state(&id, "succeeded", T);
    let log = s["log"].as_str().expect("captured log");
    assert!(log.contains("INFO"), "log calls are captured: {log}");
    assert!(log.lines().count() >= 4, "stdout and log lines: {log}");
}

#[test]
fn inspect_shows_queue_depths() {
    let env = env_with_hello();
    env.enqueue("hello.noop", &["--delay", "1h"]);
    env.enqueue("hello.noop", &["--queue", "other"]);
    let out = stdout_json(&env.celer(&["inspect", "--json"]));
    let q = out["queues"].clone();
    let by = |name: &str| q.as_array().expect("list").iter().find(|x| x["queue"] == name).cloned().expect(name);
    assert_eq!((by("default")["delayed"].clone(), by("other")["queued"].clone()), (json!(1), json!(1)), "{q:#}");
}

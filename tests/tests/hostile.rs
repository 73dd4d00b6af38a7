//! Hostile guests: whatever a plugin does — loop, allocate without bound,
//! panic, trap, ask for what it was not granted, flood its output — the job
//! fails with a clear, classified error, and the host serves the next job.

use std::time::{Duration, Instant};

use celer_integration::Env;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn env() -> Env {
    let env = Env::new();
    env.install("hostile");
    env.install("hello");
    env
}

/// After each hostile job, an ordinary job still runs on the same host.
fn still_serving(env: &Env) {
    let id = env.enqueue("hello.greet", &["--kwargs", r#"{"name":"next"}"#]);
    let s = env.wait_state(&id, "succeeded", T);
    assert_eq!(s["result"], json!({"message": "Hello, next!"}));
}

fn run_to_failure(env: &Env, task: &str) -> serde_json::Value {
    let id = env.enqueue(task, &["--max-retries", "0"]);
    env.wait_state(&id, "failed", T)
}

#[test]
fn an_infinite_loop_is_stopped_at_its_timeout() {
    let env = env();
    let server = env.serve();
    let started = Instant::now();
    let s = run_to_failure(&env, "hostile.loop");
    assert_eq!(s["error"]["kind"], "timeout", "{s:#}");
    // limits.timeout_s = 2 in its manifest.
    assert!(started.elapsed() >= Duration::from_secs(2), "stopped too early");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped too late: {:?}", started.elapsed());
    still_serving(&env);
    assert!(server.log().contains("hostile.loop"), "the failure is logged with the task");
}

#[test]
fn a_per_job_timeout_overrides_the_manifest() {
    let env = env();
    let _server = env.serve();
    let started = Instant::now();
    let id = env.enqueue("hostile.loop", &["--max-retries", "0", "--timeout-ms", "300"]);
    let s = env.wait_state(&id, "failed", T);
    assert_eq!(s["error"]["kind"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn a_memory_bomb_is_stopped_at_its_limit_and_named_as_such() {
    let env = env();
    let _server = env.serve();
    let s = run_to_failure(&env, "hostile.alloc");
    assert_eq!(s["error"]["kind"], "memory-limit", "{s:#}");
    assert!(s["error"]["message"].as_str().unwrap_or("").contains("16 MiB"), "{s:#}");
    still_serving(&env);
}

#[test]
fn a_panic_fails_the_job_with_the_panic_message() {
    let env = env();
    let _server = env.serve();
    let s = run_to_failure(&env, "hostile.panic");
    assert_eq!(s["error"]["kind"], "trap", "{s:#}");
    assert!(s["error"]["message"].as_str().unwrap_or("").contains("hostile panic: boom"), "{s:#}");
    still_serving(&env);
}

#[test]
fn a_trap_fails_the_job_with_the_trap() {
    let env = env();
    let _server = env.serve();
    let s = run_to_failure(&env, "hostile.trap");
    assert_eq!(s["error"]["kind"], "trap", "{s:#}");
    assert!(s["error"]["message"].as_str().unwrap_or("").contains("unreachable"), "{s:#}");
    still_serving(&env);
}

#[test]
fn an_ungranted_call_is_denied_logged_and_recorded() {
    let env = env();
    let server = env.serve();
    let s = run_to_failure(&env, "hostile.denied");
    let message = s["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("denied") || message.contains("not granted"), "{s:#}");
    assert_eq!(s["touched"]["denials"][0]["capability"], "cache", "{s:#}");
    let log = server.wait_log("denied", T);
    assert!(log.contains("hostile"), "{log}");
    still_serving(&env);
}

#[test]
fn an_output_flood_is_capped_not_fatal() {
    let env = env();
    let _server = env.serve();
    let id = env.enqueue("hostile.print_flood", &[]);
    let s = env.wait_state(&id, "succeeded", T);
    let log = s["log"].as_str().expect("log");
    assert!(log.len() <= 70 * 1024, "log capped, got {} bytes", log.len());
    assert!(log.contains("more bytes of output dropped"), "the cap is visible");
}

/// Memory slots are reused between jobs (zeroed, not unmapped): no job may
/// see a global or the bytes of a static buffer an earlier one left.
#[test]
fn no_job_sees_what_an_earlier_one_left_in_memory() {
    let env = env();
    let _server = env.serve();
    for _ in 0..12 {
        let id = env.enqueue("hostile.remember", &[]);
        let s = env.wait_state(&id, "succeeded", T);
        assert_eq!(s["result"], json!({"runs": 1, "scratch_was_clean": true}), "{s:#}");
    }
}

#[test]
fn several_hostile_jobs_at_once_do_not_take_the_host_down() {
    let env = env();
    let _server = env.serve();
    let ids: Vec<String> = ["hostile.loop", "hostile.alloc", "hostile.panic", "hostile.trap"]
        .iter()
        .map(|t| env.enqueue(t, &["--max-retries", "0"]))
        .collect();
    for id in &ids {
        env.wait_state(id, "failed", T);
    }
    still_serving(&env);
}

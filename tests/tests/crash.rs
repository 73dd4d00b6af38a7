//! No job is lost when a host dies: a SIGKILLed host's job runs again once
//! its lease runs out, and exactly one success is recorded. SIGTERM drains:
//! running jobs finish within the grace period, the rest are handed back.

use std::time::Duration;

use celer_integration::Env;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_job_of_a_sigkilled_host_completes_later_exactly_once() {
    let env = Env::new();
    env.install("hostile");
    let mut first = env.serve_named("first");
    // Well inside hostile's 2 s timeout, so the rerun cannot time out.
    let id = env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":1200}"#]);
    let running = env.wait_state(&id, "running", T);
    let first_host = running["host"].as_str().expect("host").to_string();
    first.sigkill();

    let second = env.serve_named("second");
    let s = env.wait_state(&id, "succeeded", T);
    assert_eq!(s["attempt"], 1, "the lost run counts as one attempt: {s:#}");
    assert_ne!(s["host"].as_str(), Some(first_host.as_str()), "finished by the second host");
    assert_eq!(second.log().matches("job succeeded").count(), 1, "one success recorded");
}

#[test]
fn sigterm_lets_running_jobs_finish() {
    let env = Env::new();
    env.install("hostile");
    let mut server = env.serve();
    let id = env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":800}"#]);
    env.wait_state(&id, "running", T);
    server.sigterm();
    let status = server.wait_exit(T);
    assert!(status.success(), "clean exit: {status:?}");
    assert_eq!(env.status(&id)["state"], "succeeded");
}

#[test]
fn sigterm_past_the_grace_period_hands_jobs_back() {
    let env = Env::with_config(&celer_integration::TEST_CONFIG.replace("grace_ms = 5000", "grace_ms = 300"));
    env.install("hostile");
    let mut server = env.serve();
    let id = env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":30000}"#]);
    env.wait_state(&id, "running", T);
    server.sigterm();
    assert!(server.wait_exit(T).success());
    let s = env.status(&id);
    assert_eq!(s["state"], "queued", "handed back, not lost: {s:#}");
    assert_eq!(s["attempt"], 0, "a shutdown does not use up an attempt");
}

#[test]
fn per_plugin_concurrency_is_respected() {
    let env = Env::new();
    env.install("hostile");
    let _server = env.serve();
    // hostile's manifest: concurrency = 2; the host has 8 slots.
    let ids: Vec<String> = (0..5).map(|_| env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":500}"#])).collect();
    let mut events = Vec::new();
    for id in &ids {
        let s = env.wait_state(id, "succeeded", T);
        // The guest's own clock: when each run really executed (a job is
        // leased slightly before its plugin slot frees up).
        let at = |k: &str| s["result"][k].as_u64().expect(k);
        events.push((at("started_ms"), 1i32));
        events.push((at("ended_ms"), -1i32));
    }
    events.sort();
    let events_debug = format!("{events:?}");
    let (mut now, mut most) = (0, 0);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    assert_eq!(most, 2, "at most 2 at once, and the limit was used: {events_debug}");
}

//! The HTTP API against a real `celer serve`: jobs, plugins, queues,
//! metrics and schedules, with the bearer token when one is set. Requests
//! go out through plain `curl`, as any client's would.

use std::process::Command;
use std::time::{Duration, Instant};

use celer_integration::Env;
use serde_json::{Value, json};

/// `curl -X METHOD URL [-d BODY] [-H …]` → (status, body).
fn http(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn jobs_plugins_queues_and_metrics() {
    let env = Env::new();
    env.install("hello");
    let _server = env.serve();
    let base = format!("http://127.0.0.1:{}", env.port);

    let (code, body) = http("POST", &format!("{base}/api/jobs"), Some(r#"{"task":"hello.add","args":[20,22]}"#), None);
    assert_eq!(code, 201, "{body}");
    let id = json_of(&body)["id"].as_str().expect("id").to_string();
    let s = env.wait_state(&id, "succeeded", Duration::from_secs(20));
    assert_eq!(s["result"], json!({"sum": 42}));
    let (code, body) = http("GET", &format!("{base}/api/jobs/{id}"), None, None);
    assert_eq!(code, 200);
    assert_eq!(json_of(&body)["state"], "succeeded");

    let (code, body) = http("POST", &format!("{base}/api/jobs"), Some(r#"{"task":"hello.add","args":[1,"#), None);
    assert_eq!(code, 400, "{body}");
    assert!(json_of(&body)["error"].as_str().unwrap_or("").contains("malformed"), "{body}");
    let (code, body) = http("POST", &format!("{base}/api/jobs"), Some(r#"{"task":"hello.add","args":{"a":1}}"#), None);
    assert_eq!(code, 400, "{body}");
    let (code, body) = http("POST", &format!("{base}/api/jobs"), Some(r#"{"task":"nobody.home"}"#), None);
    assert_eq!(code, 422, "{body}");

    let (code, body) = http("POST", &format!("{base}/api/jobs"), Some(r#"{"task":"hello.noop","delay_ms":60000}"#), None);
    assert_eq!(code, 201, "{body}");
    let later = json_of(&body)["id"].as_str().expect("id").to_string();
    let (code, body) = http("DELETE", &format!("{base}/api/jobs/{later}"), None, None);
    assert_eq!((code, json_of(&body)["outcome"].clone()), (200, json!("cancelled")), "{body}");
    assert_eq!(http("GET", &format!("{base}/api/jobs/no-such-job"), None, None).0, 404);

    let (code, body) = http("GET", &format!("{base}/api/plugins"), None, None);
    assert_eq!(code, 200);
    assert_eq!(json_of(&body)[0]["name"], "hello");
    let (code, body) = http("GET", &format!("{base}/api/queues"), None, None);
    assert_eq!(code, 200, "{body}");
    let (code, body) = http("GET", &format!("{base}/metrics"), None, None);
    assert_eq!(code, 200);
    assert!(body.contains("celer_plugins_loaded 1"), "{body}");
    assert!(body.contains("# TYPE celer_queue_jobs gauge"), "{body}");
    assert_eq!(http("GET", &format!("{base}/healthz"), None, None).0, 200);
}

#[test]
fn schedules_over_http() {
    let env = Env::new();
    env.install("hello");
    let _server = env.serve();
    let base = format!("http://127.0.0.1:{}/api/schedules", env.port);
    let (code, body) = http("POST", &base, Some(r#"{"name":"n","task":"hello.noop","cron":"0 3 * * *","timezone":"Europe/London"}"#), None);
    assert_eq!(code, 201, "{body}");
    assert!(json_of(&body)["next_run_at"].is_string());
    let (code, body) = http("POST", &base, Some(r#"{"name":"bad","task":"hello.noop","cron":"0 3 * *"}"#), None);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("expected 5 fields"), "{body}");
    let (code, _) = http("POST", &base, Some(r#"{"name":"tz","task":"hello.noop","cron":"0 3 * * *","timezone":"Atlantis/Capital"}"#), None);
    assert_eq!(code, 400);
    assert_eq!(http("POST", &base, Some(r#"{"name":"n","task":"hello.noop","every_s":5}"#), None).0, 409);
    let (code, body) = http("PATCH", &format!("{base}/n"), Some(r#"{"enabled":false,"every_s":60}"#), None);
    assert_eq!(code, 200, "{body}");
    let s = json_of(&body);
    assert_eq!((s["enabled"].clone(), s["kind"].clone(), s["every_s"].clone()), (json!(false), json!("interval"), json!(60)));
    let list = json_of(&http("GET", &base, None, None).1);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(http("DELETE", &format!("{base}/n"), None, None).0, 204);
    assert_eq!(http("DELETE", &format!("{base}/n"), None, None).0, 404);
}

#[test]
fn a_token_guards_everything_but_healthz() {
    let env = Env::new().var("CELER_API_TOKEN", "s3cret");
    env.install("hello");
    let _server = env.serve();
    let base = format!("http://127.0.0.1:{}", env.port);
    assert_eq!(http("GET", &format!("{base}/healthz"), None, None).0, 200);
    assert_eq!(http("GET", &format!("{base}/api/queues"), None, None).0, 401);
    assert_eq!(http("GET", &format!("{base}/api/queues"), None, Some("wrong")).0, 401);
    assert_eq!(http("GET", &format!("{base}/api/queues"), None, Some("s3cret")).0, 200);
    let (code, _) = http("POST", &format!("{base}/api/jobs"), Some(r#"{"task":"hello.noop"}"#), None);
    assert_eq!(code, 401);
}

/// `DELETE /api/jobs/{id}` stops a running job at once (the worker of the
/// host that serves the API hears the request), not at its lease's next
/// renewal: 10 s away with this 30 s lease, and the job's 20 s timeout would
/// end it first.
#[test]
fn deleting_a_running_job_stops_it_at_once() {
    let env = Env::with_long_lease();
    let _server = env.serve();
    let base = format!("http://127.0.0.1:{}", env.port);
    let id = env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":15000}"#]);
    env.wait_state(&id, "running", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (code, body) = http("DELETE", &format!("{base}/api/jobs/{id}"), None, None);
    assert_eq!((code, json_of(&body)["outcome"].clone()), (200, json!("stop-requested")), "{body}");
    let s = env.wait_state(&id, "cancelled", Duration::from_secs(8));
    assert_eq!(s["error"]["kind"], "cancelled");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "stopped {took:?} after the DELETE; the next renewal was ~10 s away");
}

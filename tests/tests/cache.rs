//! The `cache` capability end to end: a probe plugin calls it from inside
//! real `celer serve` processes, on the in-process cache of the embedded
//! default and on the real Redis of `scripts/services.sh`, whose keys the
//! test reads and writes directly (as a Django app would) with `redis-cli`.

use std::process::Command;
use std::time::{Duration, Instant};

use celer_integration::{Env, TEST_CONFIG, plugin_wasm, repo_root, services};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// A key part no other test (or earlier run) uses: tests share one Redis.
fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    format!("{}{}", std::process::id(), nanos % 1_000_000_000_000)
}

fn install_probe(env: &Env) {
    let manifest = std::fs::read_to_string(repo_root().join("tests/plugins/cache-probe/celer-plugin.toml")).expect("manifest");
    env.install_files("cache_probe", &std::fs::read(plugin_wasm("cache_probe")).expect("wasm"), &manifest);
}

fn in_process() -> Env {
    let env = Env::new();
    install_probe(&env);
    env
}

fn on_redis() -> Env {
    let env = Env::new().var("CELER_REDIS_URL", services::REDIS_URL);
    install_probe(&env);
    env
}

/// Runs `cache_probe.run` with these calls; returns the job's final status.
fn run(env: &Env, calls: Value) -> Value {
    let id = env.enqueue("cache_probe.run", &["--kwargs", &json!({ "calls": calls }).to_string()]);
    env.wait_state(&id, "succeeded", T)
}

/// The per-call results of a `cache_probe.run` job.
fn results(status: &Value) -> Vec<Value> {
    status["result"].as_array().unwrap_or_else(|| panic!("no result list: {status:#}")).clone()
}

fn get(key: &str) -> Value {
    json!({"op": "get", "key": key})
}
fn set(key: &str, value: &str, ttl_ms: Option<u64>) -> Value {
    json!({"op": "set", "key": key, "value": value, "ttl_ms": ttl_ms})
}
fn delete(key: &str) -> Value {
    json!({"op": "delete", "key": key})
}
fn incr(key: &str, delta: i64) -> Value {
    json!({"op": "incr", "key": key, "delta": delta})
}

/// `redis-cli` against the test Redis; stdout, trimmed.
fn redis(args: &[&str]) -> String {
    let port = services::REDIS_URL.rsplit(':').next().expect("port");
    let out = Command::new("redis-cli").args(["-p", port, "--raw"]).args(args).output().expect("redis-cli (scripts/services.sh installs it)");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every call once, in the order a plugin would make them.
fn every_call_round_trips(env: &Env, base: &str) {
    let (k, n, s) = (format!("{base}:k"), format!("{base}:n"), format!("{base}:s"));
    let status = run(
        env,
        json!([
            get(&k),
            set(&k, "hello", None),
            get(&k),
            incr(&n, 5),
            incr(&n, -2),
            get(&n),
            delete(&k),
            delete(&k),
            get(&k),
            set(&s, "not a number", None),
            incr(&s, 1),
        ]),
    );
    let r = results(&status);
    let expected = [
        json!({"ok": null}),
        json!({"ok": null}),
        json!({"ok": "hello"}),
        json!({"ok": 5}),
        json!({"ok": 3}),
        json!({"ok": "3"}),
        json!({"ok": true}),
        json!({"ok": false}),
        json!({"ok": null}),
        json!({"ok": null}),
    ];
    assert_eq!(&r[..10], &expected[..], "{status:#}");
    assert_eq!(r[10]["err"]["kind"], "invalid", "incr on a string: {status:#}");
    // The audit trail: one entry per call that reached the backend.
    let touched = status["touched"]["cache"].as_array().expect("touched.cache");
    assert_eq!(touched.len(), 11, "{status:#}");
    assert_eq!(touched[0], json!({"op": "get", "key": k, "hit": false}));
    assert_eq!(touched[2], json!({"op": "get", "key": k, "hit": true}));
    assert_eq!(touched[4], json!({"op": "incr", "key": n, "delta": -2, "value": 3}));
    assert_eq!(touched[6], json!({"op": "delete", "key": k, "existed": true}));
    assert_eq!(touched[10]["error"], "invalid");
    assert!(status["touched"].get("denials").is_none(), "{status:#}");
}

#[test]
fn every_call_round_trips_in_process() {
    let env = in_process();
    let _server = env.serve();
    every_call_round_trips(&env, &format!("probe:{}", unique()));
}

#[test]
fn every_call_round_trips_on_redis() {
    let env = on_redis();
    let _server = env.serve();
    let base = format!("probe:{}", unique());
    every_call_round_trips(&env, &base);
    // What the plugin left is where django-redis would look: `:1:<key>`.
    assert_eq!(redis(&["GET", &format!(":1:{base}:n")]), "3");
    assert_eq!(redis(&["OBJECT", "ENCODING", &format!(":1:{base}:n")]), "int", "incr leaves a Redis integer");
    assert_eq!(redis(&["EXISTS", &format!(":1:{base}:k")]), "0");
    assert_eq!(redis(&["EXISTS", &format!("{base}:n")]), "0", "never stored under the bare logical key");
}

/// Values set with a TTL are gone after it, and `incr` keeps a key's TTL.
fn ttl_expires(env: &Env, base: &str) -> Value {
    let (t, c, forever) = (format!("{base}:t"), format!("{base}:c"), format!("{base}:forever"));
    let first = run(
        env,
        json!([set(&t, "soon gone", Some(2500)), set(&c, "10", Some(2500)), incr(&c, 1), set(&forever, "x", None), get(&t)]),
    );
    let set_at = Instant::now();
    assert_eq!(results(&first)[2], json!({"ok": 11}), "{first:#}");
    assert_eq!(results(&first)[4], json!({"ok": "soon gone"}), "{first:#}");
    std::thread::sleep(Duration::from_millis(3000).saturating_sub(set_at.elapsed()));
    let later = run(env, json!([get(&t), get(&c), get(&forever)]));
    assert_eq!(results(&later), vec![json!({"ok": null}), json!({"ok": null}), json!({"ok": "x"})], "{later:#}");
    first
}

#[test]
fn ttl_expires_in_process() {
    let env = in_process();
    let _server = env.serve();
    ttl_expires(&env, &format!("probe:{}", unique()));
}

#[test]
fn ttl_expires_on_redis() {
    let env = on_redis();
    let _server = env.serve();
    let base = format!("probe:{}", unique());
    ttl_expires(&env, &base);
    assert_eq!(redis(&["TTL", &format!(":1:{base}:forever")]), "-1", "no TTL unless asked");
}

#[test]
fn keys_are_shared_with_django_in_the_django_redis_format() {
    let env = on_redis();
    let _server = env.serve();
    let user = unique();
    // What a Django app with django-redis's defaults wrote: `cache.set("is_member_<user>_3", …)`.
    let (member, counter, written) = (format!("is_member_{user}_3"), format!("is_member_{user}_5"), format!("is_member_{user}_4"));
    redis(&["SET", &format!(":1:{member}"), "pickled-by-django"]);
    redis(&["SET", &format!(":1:{counter}"), "41"]); // django-redis stores ints unpickled
    let status = run(&env, json!([delete(&member), incr(&counter, 1), set(&written, r#"{"member":true}"#, Some(60_000)), get(&member)]));
    assert_eq!(
        results(&status),
        vec![json!({"ok": true}), json!({"ok": 42}), json!({"ok": null}), json!({"ok": null})],
        "{status:#}"
    );
    assert_eq!(redis(&["EXISTS", &format!(":1:{member}")]), "0", "the plugin invalidated Django's key");
    assert_eq!(redis(&["GET", &format!(":1:{counter}")]), "42");
    assert_eq!(redis(&["GET", &format!(":1:{written}")]), r#"{"member":true}"#, "raw bytes, JSON for Django's JSONSerializer");
    let ttl: i64 = redis(&["TTL", &format!(":1:{written}")]).parse().expect("a number");
    assert!((1..=60).contains(&ttl), "TTL {ttl}");
}

#[test]
fn key_prefix_and_version_come_from_the_config() {
    let config = format!("{TEST_CONFIG}\n[cache]\nkey_prefix = \"shop\"\nversion = 3\n");
    let env = Env::with_config(&config).var("CELER_REDIS_URL", services::REDIS_URL);
    install_probe(&env);
    let _server = env.serve();
    let key = format!("is_member_{}_9", unique());
    redis(&["SET", &format!("shop:3:{key}"), "1"]);
    let status = run(&env, json!([get(&key), delete(&key), set(&key, "v2", Some(60_000))]));
    assert_eq!(results(&status), vec![json!({"ok": "1"}), json!({"ok": true}), json!({"ok": null})], "{status:#}");
    assert_eq!(redis(&["GET", &format!("shop:3:{key}")]), "v2");
    assert_eq!(redis(&["EXISTS", &format!(":1:{key}")]), "0");
}

#[test]
fn a_key_outside_the_grants_is_denied_recorded_and_never_reaches_redis() {
    let env = on_redis();
    let server = env.serve();
    let u = unique();
    let (secret, other) = (format!("secret_{u}"), format!("other:{u}"));
    redis(&["SET", &format!(":1:{secret}"), "do not read"]);
    let status = run(&env, json!([get(&secret), set(&other, "x", None), delete(&secret), incr(&other, 1)]));
    for (i, r) in results(&status).iter().enumerate() {
        assert_eq!(r["err"]["kind"], "denied", "call {i}: {status:#}");
    }
    let denials = status["touched"]["denials"].as_array().expect("denials");
    assert_eq!(denials.len(), 4, "{status:#}");
    assert_eq!(denials[0], json!({"capability": "cache", "what": format!("get {secret:?}")}));
    assert!(status["touched"].get("cache").is_none(), "nothing reached the backend: {status:#}");
    assert_eq!(redis(&["GET", &format!(":1:{secret}")]), "do not read");
    assert_eq!(redis(&["EXISTS", &format!(":1:{other}")]), "0");
    let log = server.wait_log("denied", T);
    assert!(log.contains("cache_probe") && log.contains(&secret), "{log}");
    redis(&["DEL", &format!(":1:{secret}")]);
}

#[test]
fn redis_down_is_unavailable_and_the_job_retries_never_succeeds() {
    // In the config file rather than CELER_REDIS_URL, so only the cache
    // points at the closed port (whatever else that variable may select).
    // The password must never show up in the log or the job's status.
    let config = format!("{TEST_CONFIG}\n[cache]\nurl = \"redis://:s3cret@127.0.0.1:{}\"\n", services::CLOSED_PORT);
    let env = Env::with_config(&config);
    install_probe(&env);
    let server = env.serve(); // a Redis that is down does not keep the host from starting

    let status = run(&env, json!([get("probe:down"), set("probe:down", "x", None), incr("probe:down", 1), delete("probe:down")]));
    for (i, r) in results(&status).iter().enumerate() {
        assert_eq!(r["err"]["kind"], "unavailable", "call {i}: {status:#}");
    }
    assert_eq!(status["touched"]["cache"][0]["error"], "unavailable", "{status:#}");

    let kwargs = json!({"calls": [get("probe:down")], "propagate": true}).to_string();
    let id = env.enqueue("cache_probe.run", &["--kwargs", &kwargs, "--max-retries", "1"]);
    let retrying = env.wait_state(&id, "retrying", T);
    assert_eq!(retrying["attempt"], 1, "{retrying:#}");
    let failed = env.wait_for(&id, T, |s| s["state"] == "failed" || s["state"] == "succeeded");
    assert_eq!(failed["state"], "failed", "never succeeded: {failed:#}");
    let (kind, message) = (failed["error"]["kind"].as_str().unwrap_or(""), failed["error"]["message"].as_str().unwrap_or(""));
    assert!(kind == "unavailable" || message.starts_with("unavailable"), "{failed:#}");
    let log = server.log();
    assert!(log.contains("unavailable"), "{log}");
    assert!(!log.contains("s3cret") && !failed.to_string().contains("s3cret"), "a secret leaked:\n{log}\n{failed:#}");
}

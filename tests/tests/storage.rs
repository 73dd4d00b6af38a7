//! The `storage` capability end to end, on both backends: `file://` (the
//! embedded default, links served by the host's own HTTP listener) and S3
//! (the real s3s-fs of `scripts/services.sh`, which checks signatures and
//! presigned expiry). A probe plugin calls storage from inside real
//! `celer serve` processes; the test downloads with plain `curl`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use celer_integration::{Env, Server, TEST_CONFIG, plugin_wasm, repo_root, services};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    File,
    S3,
}

/// A name part no other test (or earlier run) uses: tests share one bucket.
fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    format!("{}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

fn install_probe(env: &Env) {
    let manifest =
        std::fs::read_to_string(repo_root().join("tests/plugins/storage-probe/celer-plugin.toml")).expect("manifest");
    env.install_files("storage_probe", &std::fs::read(plugin_wasm("storage_probe")).expect("wasm"), &manifest);
}

/// The S3 environment of the test services, for an endpoint of choice.
fn with_s3(env: Env, endpoint: &str, bucket_prefix: &str) -> Env {
    env.var("CELER_STORAGE", &format!("s3://{}/{bucket_prefix}", services::S3_BUCKET))
        .var("AWS_ENDPOINT_URL", endpoint)
        .var("AWS_ACCESS_KEY_ID", services::S3_ACCESS_KEY)
        .var("AWS_SECRET_ACCESS_KEY", services::S3_SECRET_KEY)
        .var("AWS_REGION", "us-east-1")
        // Never ask an instance-metadata service for anything.
        .var("AWS_EC2_METADATA_DISABLED", "true")
        .var("AWS_CONFIG_FILE", "/dev/null")
        .var("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
}

fn env_on(backend: Backend) -> Env {
    env_with(backend, TEST_CONFIG)
}

fn env_with(backend: Backend, config: &str) -> Env {
    let env = Env::with_config(config);
    let env = match backend {
        Backend::File => env,
        // Each test in a prefix of its own in the shared bucket.
        Backend::S3 => with_s3(env, services::S3_ENDPOINT, &format!("t-{}", unique())),
    };
    install_probe(&env);
    env
}

/// Runs `storage_probe.run` with these calls; returns the job's final status.
fn run(env: &Env, calls: Value) -> Value {
    let id = env.enqueue("storage_probe.run", &["--kwargs", &json!({ "calls": calls }).to_string()]);
    env.wait_state(&id, "succeeded", T)
}

/// The per-call results of a `storage_probe.run` job.
fn results(status: &Value) -> Vec<Value> {
    status["result"].as_array().unwrap_or_else(|| panic!("no result list: {status:#}")).clone()
}

/// Runs one call and returns its `{"ok": …}` or `{"err": …}`.
fn one(env: &Env, call: Value) -> Value {
    results(&run(env, json!([call])))[0].clone()
}

fn put(key: &str, data: &str) -> Value {
    json!({"op": "put", "key": key, "data": data, "content_type": "text/plain"})
}
fn get(key: &str) -> Value {
    json!({"op": "get", "key": key})
}
fn delete(key: &str) -> Value {
    json!({"op": "delete", "key": key})
}
fn list(prefix: &str, start_after: Option<&str>, limit: u32) -> Value {
    json!({"op": "list", "prefix": prefix, "start_after": start_after, "limit": limit})
}
fn presign(key: &str, expires_in_s: u32) -> Value {
    json!({"op": "presign", "key": key, "expires_in_s": expires_in_s})
}

/// `curl URL` into `out`: the HTTP status.
fn curl_to(url: &str, out: &Path) -> u16 {
    let o = Command::new("curl")
        .args(["-s", "-o"])
        .arg(out)
        .args(["-w", "%{http_code}", "--max-time", "60", url])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or_else(|_| panic!("curl said {o:?}"))
}

/// `curl URL`: status and body.
fn curl(url: &str, headers: &[&str]) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-w", "\n%{http_code}", "--max-time", "20"]);
    for h in headers {
        c.args(["-H", h]);
    }
    let o = c.arg(url).output().expect("run curl");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn sha256_file(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or("").to_string()
}

fn keys(listed: &Value) -> Vec<String> {
    listed["ok"].as_array().unwrap_or_else(|| panic!("not a list: {listed:#}")).iter().map(|o| o["key"].as_str().unwrap_or("").to_string()).collect()
}

/// Changes the last hex digit of the signature in a link.
fn tamper(url: &str) -> String {
    let marker = if url.contains("X-Amz-Signature=") { "X-Amz-Signature=" } else { "sig=" };
    let at = url.find(marker).expect("a signature") + marker.len();
    let end = url[at..].find('&').map(|i| at + i).unwrap_or(url.len());
    let last = &url[end - 1..end];
    let swapped = if last == "0" { "1" } else { "0" };
    format!("{}{swapped}{}", &url[..end - 1], &url[end..])
}

// ---------------------------------------------------------------------------

fn every_call_round_trips(backend: Backend) {
    let env = env_on(backend);
    let _server = env.serve();
    let status = run(
        &env,
        json!([
            put("probe/a/one.txt", "hello"),
            get("probe/a/one.txt"),
            get("probe/a/missing.txt"),
            put("probe/a/two.txt", "second"),
            put("probe/a/sub/three.txt", "third, deeper"),
            put("probe/b.txt", "elsewhere"),
            list("probe/a/", None, 100),
            list("probe/a/", Some("probe/a/one.txt"), 1),
            list("probe/a/t", None, 100),
            put("probe/a/one.txt", "replaced"),
            get("probe/a/one.txt"),
            delete("probe/a/two.txt"),
            delete("probe/a/two.txt"),
            get("probe/a/two.txt"),
            list("probe/", None, 100),
            presign("probe/a/none.txt", 60),
            {"op": "misuse", "key": "probe/misuse.txt"},
            put("probe/a/../../escape.txt", "x"),
            get("probe//double"),
            get("probe/./x"),
            put("probe/nul\u{0}.txt", "x"),
            presign("probe/a/one.txt", 0),
        ]),
    );
    let r = results(&status);
    assert_eq!(r[0]["ok"]["key"], "probe/a/one.txt", "{status:#}");
    assert_eq!(r[0]["ok"]["size"], 5, "{status:#}");
    assert!(r[0]["ok"]["modified"].as_i64().unwrap_or(0) > 1_600_000_000_000_000, "microseconds: {status:#}");
    assert_eq!(r[1]["ok"], "hello");
    assert_eq!(r[2]["ok"], Value::Null, "a missing object is none");
    assert_eq!(keys(&r[6]), ["probe/a/one.txt", "probe/a/sub/three.txt", "probe/a/two.txt"], "{status:#}");
    assert_eq!(r[6]["ok"][1]["size"], 13);
    assert_eq!(keys(&r[7]), ["probe/a/sub/three.txt"], "start-after and limit: {status:#}");
    assert_eq!(keys(&r[8]), ["probe/a/two.txt"], "a prefix need not end at a slash");
    assert_eq!(r[10]["ok"], "replaced", "a second upload replaces the object");
    assert_eq!((&r[11]["ok"], &r[12]["ok"], &r[13]["ok"]), (&json!(true), &json!(false), &Value::Null));
    assert_eq!(keys(&r[14]), ["probe/a/one.txt", "probe/a/sub/three.txt", "probe/b.txt"], "{status:#}");
    assert_eq!(r[15]["err"]["kind"], "invalid", "presign of a missing key: {status:#}");
    assert_eq!(r[16]["ok"]["finished"]["size"], 4, "{status:#}");
    assert_eq!(r[16]["ok"]["write_after_finish"]["kind"], "invalid", "{status:#}");
    assert_eq!(r[16]["ok"]["finish_twice"]["kind"], "invalid", "{status:#}");
    for (i, call) in r.iter().enumerate().skip(17) {
        assert_eq!(call["err"]["kind"], "invalid", "call {i}: {status:#}");
    }
    // What the job touched: every object, in call order.
    let touched = status["touched"]["storage"].as_array().expect("touched.storage");
    assert_eq!(touched[0], json!({"op": "write", "key": "probe/a/one.txt", "bytes": 5}), "{status:#}");
    assert_eq!(touched[1], json!({"op": "get", "key": "probe/a/one.txt", "bytes": 5}));
    assert_eq!(touched[2], json!({"op": "get", "key": "probe/a/missing.txt", "bytes": null}));
    assert!(touched.contains(&json!({"op": "delete", "key": "probe/a/two.txt", "existed": true})), "{status:#}");
    assert!(touched.contains(&json!({"op": "list", "prefix": "probe/a/", "count": 3})), "{status:#}");
    assert!(status["touched"].get("denials").is_none(), "{status:#}");

    let (code, body) = curl(&format!("http://127.0.0.1:{}/readyz", env.port), &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["checks"]["storage"], "ok", "{body}");

    if backend == Backend::File {
        // The embedded default keeps objects as plain files.
        let root = env.data.join("storage");
        assert_eq!(std::fs::read_to_string(root.join("probe/a/one.txt")).expect("file"), "replaced");
        assert!(!env.path().join("escape.txt").exists() && !env.data.join("escape.txt").exists());
    }
}

#[test]
fn file_every_call_round_trips() {
    every_call_round_trips(Backend::File);
}

#[test]
fn s3_every_call_round_trips() {
    every_call_round_trips(Backend::S3);
}

// ---------------------------------------------------------------------------

const BIG_MIB: u64 = 24;

fn a_big_object_streams_through_a_small_plugin(backend: Backend) {
    let env = env_on(backend);
    let _server = env.serve();
    // The probe's manifest gives it 16 MiB of memory; the object is larger.
    let manifest = std::fs::read_to_string(repo_root().join("tests/plugins/storage-probe/celer-plugin.toml")).expect("manifest");
    assert!(manifest.contains("memory_mb = 16"), "the test needs a plugin smaller than its object");

    let kwargs = json!({"key": "probe/big.bin", "mib": BIG_MIB}).to_string();
    let id = env.enqueue("storage_probe.big", &["--kwargs", &kwargs, "--max-retries", "0"]);
    let s = env.wait_state(&id, "succeeded", Duration::from_secs(120));
    let size = BIG_MIB << 20;
    assert_eq!(s["result"]["size"], size, "{s:#}");
    assert_eq!(s["result"]["info"]["size"], size, "{s:#}");
    assert_eq!(s["touched"]["storage"][0], json!({"op": "write", "key": "probe/big.bin", "bytes": size}));
    let sha = s["result"]["sha256"].as_str().expect("sha256").to_string();

    // Read back through a download link with a plain HTTP client.
    let r = one(&env, presign("probe/big.bin", 300));
    let url = r["ok"].as_str().unwrap_or_else(|| panic!("{r:#}")).to_string();
    let out = env.path().join("big.download");
    assert_eq!(curl_to(&url, &out), 200, "{url}");
    assert_eq!(std::fs::metadata(&out).expect("downloaded").len(), size);
    assert_eq!(sha256_file(&out), sha, "same bytes");

    if backend == Backend::S3 {
        // Completed as a multipart upload of 5 MiB parts: S3's ETag says how many.
        let o = Command::new("curl").args(["-s", "-D", "-", "-o", "/dev/null", &url]).output().expect("curl");
        let headers = String::from_utf8_lossy(&o.stdout).to_ascii_lowercase();
        let etag = headers.lines().find_map(|l| l.strip_prefix("etag:")).unwrap_or("").trim().trim_matches('"').to_string();
        assert!(etag.ends_with(&format!("-{}", BIG_MIB.div_ceil(5))), "etag {etag:?} of a {BIG_MIB} MiB multipart upload");
    }
    // Larger than `get` reads whole.
    assert_eq!(one(&env, get("probe/big.bin"))["err"]["kind"], "budget-exceeded");
    if backend == Backend::File {
        let stored = env.data.join("storage/probe/big.bin");
        assert_eq!(sha256_file(&stored), sha);
    }
    assert_eq!(one(&env, delete("probe/big.bin"))["ok"], true);
}

#[test]
fn file_a_big_object_streams_through_a_small_plugin() {
    a_big_object_streams_through_a_small_plugin(Backend::File);
}

#[test]
fn s3_a_big_object_streams_through_a_small_plugin() {
    a_big_object_streams_through_a_small_plugin(Backend::S3);
}

// ---------------------------------------------------------------------------

fn an_unfinished_upload_leaves_nothing(backend: Backend) {
    let prefix = format!("t-{}", unique());
    let env = match backend {
        Backend::File => Env::new(),
        Backend::S3 => with_s3(Env::new(), services::S3_ENDPOINT, &prefix),
    };
    install_probe(&env);
    let _server = env.serve();
    // Dropped unfinished after two parts' worth (so S3 has a multipart upload to abort).
    let kwargs = json!({"key": "probe/dropped.bin", "mib": 11, "finish": false}).to_string();
    let id = env.enqueue("storage_probe.big", &["--kwargs", &kwargs, "--max-retries", "0"]);
    env.wait_state(&id, "succeeded", T);
    // A plugin that dies mid-upload.
    let kwargs = json!({"key": "probe/crashed.bin", "mib": 12, "panic_after_mib": 7}).to_string();
    let id = env.enqueue("storage_probe.big", &["--kwargs", &kwargs, "--max-retries", "0"]);
    let s = env.wait_state(&id, "failed", T);
    assert_eq!(s["error"]["kind"], "trap", "{s:#}");

    let r = results(&run(&env, json!([get("probe/dropped.bin"), get("probe/crashed.bin"), list("probe/", None, 10)])));
    assert_eq!((&r[0]["ok"], &r[1]["ok"]), (&Value::Null, &Value::Null), "{r:#?}");
    assert!(keys(&r[2]).is_empty(), "{r:#?}");
    match backend {
        Backend::File => {
            let leftovers: Vec<_> = walk(&env.data.join("storage"));
            assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");
        }
        Backend::S3 => {
            assert_eq!(b64("celer-test"), "Y2VsZXItdGVzdA");
            // s3s-fs keeps `.bucket-<b64>.object-<b64>.upload-<id>.metadata.json`
            // while a multipart upload is open; the host aborts both uploads
            // (in the background: Drop cannot wait).
            for key in ["probe/dropped.bin", "probe/crashed.bin"] {
                let marker = format!(".bucket-{}.object-{}.upload-", b64(services::S3_BUCKET), b64(&format!("{prefix}/{key}")));
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let open: Vec<String> = std::fs::read_dir(s3_data_dir())
                        .expect("s3s-fs data dir")
                        .filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .filter(|n| n.starts_with(&marker))
                        .collect();
                    if open.is_empty() {
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "multipart upload of {key} never aborted: {open:?}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Where s3s-fs keeps its data (scripts/services/s3.sh).
fn s3_data_dir() -> std::path::PathBuf {
    std::env::var_os("SERVICES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/services"))
        .join("s3/data")
}

/// base64, URL-safe alphabet, no padding (s3s-fs's file names).
fn b64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = c.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn file_an_unfinished_upload_leaves_nothing() {
    an_unfinished_upload_leaves_nothing(Backend::File);
}

#[test]
fn s3_an_unfinished_upload_leaves_nothing() {
    an_unfinished_upload_leaves_nothing(Backend::S3);
}

// ---------------------------------------------------------------------------

fn a_link_downloads_until_it_expires(backend: Backend) {
    let env = env_on(backend);
    let _server = env.serve();
    let r = results(&run(&env, json!([put("probe/report.txt", "the report"), presign("probe/report.txt", 2), presign("probe/report.txt", 300)])));
    let short = r[1]["ok"].as_str().unwrap_or_else(|| panic!("{r:#?}")).to_string();
    let long = r[2]["ok"].as_str().expect("url").to_string();
    match backend {
        Backend::File => assert!(short.starts_with(&format!("http://127.0.0.1:{}/files/probe/report.txt?expires=", env.port)), "{short}"),
        Backend::S3 => assert!(short.starts_with(services::S3_ENDPOINT) && short.contains("X-Amz-Signature="), "{short}"),
    }

    assert_eq!(curl(&short, &[]), (200, "the report".to_string()), "a fresh link downloads");
    let (code, _) = curl(&tamper(&long), &[]);
    assert_eq!(code, 403, "a tampered signature is refused");
    std::thread::sleep(Duration::from_millis(3200));
    let (code, _) = curl(&short, &[]);
    assert_eq!(code, 403, "an expired link is refused");
    assert_eq!(curl(&long, &[]).0, 200, "a link within its time still works");

    // A link to an object deleted since: 404 (file) / 404 NoSuchKey (S3).
    assert_eq!(one(&env, delete("probe/report.txt"))["ok"], true);
    assert_eq!(curl(&long, &[]).0, 404);
}

#[test]
fn file_a_link_downloads_until_it_expires() {
    a_link_downloads_until_it_expires(Backend::File);
}

#[test]
fn s3_a_link_downloads_until_it_expires() {
    a_link_downloads_until_it_expires(Backend::S3);
}

// ---------------------------------------------------------------------------

fn a_key_outside_the_grants_is_denied(backend: Backend) {
    let env = env_on(backend);
    let server = env.serve();
    let status = run(
        &env,
        json!([
            put("secret/x.txt", "no"),
            get("secret/x.txt"),
            delete("secret/x.txt"),
            list("secret/", None, 10),
            list("", None, 10),
            presign("secret/x.txt", 60),
            get("prob"),
        ]),
    );
    for (i, r) in results(&status).iter().enumerate() {
        assert_eq!(r["err"]["kind"], "denied", "call {i}: {status:#}");
    }
    let denials = status["touched"]["denials"].as_array().expect("denials");
    assert_eq!(denials.len(), 7, "{status:#}");
    assert_eq!(denials[0], json!({"capability": "storage", "what": "create \"secret/x.txt\""}));
    assert!(status["touched"].get("storage").is_none(), "nothing reached the backend: {status:#}");
    let log = server.wait_log("denied", T);
    assert!(log.contains("storage_probe") && log.contains("secret/x.txt"), "{log}");
    if backend == Backend::File {
        assert!(!env.data.join("storage/secret").exists());
    }
}

#[test]
fn file_a_key_outside_the_grants_is_denied() {
    a_key_outside_the_grants_is_denied(Backend::File);
}

#[test]
fn s3_a_key_outside_the_grants_is_denied() {
    a_key_outside_the_grants_is_denied(Backend::S3);
}

// ---------------------------------------------------------------------------

/// The job retries (never succeeds) while storage is unavailable, and
/// `/readyz` says which backend failed.
fn unavailable_storage_retries(env: &Env, server: &Server) {
    let status = run(env, json!([put("probe/down.txt", "x"), get("probe/down.txt"), list("probe/", None, 5)]));
    for (i, r) in results(&status).iter().enumerate() {
        assert_eq!(r["err"]["kind"], "unavailable", "call {i}: {status:#}");
    }
    assert_eq!(status["touched"]["storage"][0]["error"], "unavailable", "{status:#}");

    let kwargs = json!({"calls": [put("probe/down.txt", "x")], "propagate": true}).to_string();
    let id = env.enqueue("storage_probe.run", &["--kwargs", &kwargs, "--max-retries", "1"]);
    let retrying = env.wait_state(&id, "retrying", T);
    assert_eq!(retrying["attempt"], 1, "{retrying:#}");
    let failed = env.wait_for(&id, T, |s| s["state"] == "failed" || s["state"] == "succeeded");
    assert_eq!(failed["state"], "failed", "never succeeded: {failed:#}");
    let message = failed["error"]["message"].as_str().unwrap_or("");
    assert!(failed["error"]["kind"] == "unavailable" || message.starts_with("unavailable"), "{failed:#}");
    assert!(server.log().contains("unavailable"));

    let (code, body) = curl(&format!("http://127.0.0.1:{}/readyz", env.port), &[]);
    assert_eq!(code, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["ready"], false, "{ready:#}");
    assert_ne!(ready["checks"]["storage"], "ok", "{ready:#}");
}

#[test]
fn s3_down_is_unavailable_and_the_job_retries() {
    let env = with_s3(Env::new(), &format!("http://127.0.0.1:{}", services::CLOSED_PORT), "down");
    install_probe(&env);
    let server = env.serve(); // S3 being down does not keep the host from starting
    unavailable_storage_retries(&env, &server);
}

#[test]
fn s3_with_a_wrong_secret_is_unavailable_not_accepted() {
    // s3s-fs checks signatures: a wrong secret is refused, as on real S3.
    let env = with_s3(Env::new(), services::S3_ENDPOINT, &format!("t-{}", unique())).var("AWS_SECRET_ACCESS_KEY", "wrong");
    install_probe(&env);
    let _server = env.serve();
    let r = one(&env, put("probe/x.txt", "x"));
    assert_eq!(r["err"]["kind"], "unavailable", "{r:#}");
}

#[test]
fn file_storage_gone_is_unavailable_and_the_job_retries() {
    let env = env_on(Backend::File);
    let server = env.serve();
    // The storage directory becomes a plain file under the running host.
    let root = env.data.join("storage");
    std::fs::remove_dir_all(&root).expect("rm storage");
    std::fs::write(&root, b"not a directory").expect("file");
    unavailable_storage_retries(&env, &server);
}

// ---------------------------------------------------------------------------

#[test]
fn the_http_listener_health_readiness_and_token() {
    let env = env_with(Backend::File, &format!("{TEST_CONFIG}\n[http]\ntoken = \"t0ken\"\n"));
    let _server = env.serve();
    let base = format!("http://127.0.0.1:{}", env.port);
    assert_eq!(curl(&format!("{base}/healthz"), &[]), (200, "ok".to_string()), "no token needed");
    let (code, body) = curl(&format!("{base}/readyz"), &[]);
    assert_eq!(code, 401, "{body}");
    let (code, _) = curl(&format!("{base}/readyz"), &["Authorization: Bearer wrong"]);
    assert_eq!(code, 401);
    let (code, body) = curl(&format!("{base}/readyz"), &["Authorization: Bearer t0ken"]);
    assert_eq!(code, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["ready"], true, "{ready:#}");
    assert_eq!(ready["checks"]["storage"], "ok", "{ready:#}");

    // A signed link needs no token; an unsigned or garbled one is refused.
    let r = results(&run(&env, json!([put("probe/t.json", "{}"), presign("probe/t.json", 60)])));
    let url = r[1]["ok"].as_str().expect("url").to_string();
    assert_eq!(curl(&url, &[]), (200, "{}".to_string()));
    let unsigned = url.split('?').next().expect("path").to_string();
    assert_eq!(curl(&unsigned, &[]).0, 403);
    assert_eq!(curl(&format!("{unsigned}?expires=abc&sig=00"), &[]).0, 403);
    // The signature covers the key: the same query on another key is refused.
    let other = url.replace("/files/probe/t.json", "/files/probe/other.json");
    assert_eq!(curl(&other, &[]).0, 403);
    // And the key cannot climb out of the storage directory.
    let climb = url.replace("/files/probe/t.json", "/files/probe/%2E%2E/%2E%2E/celer.toml");
    assert_eq!(curl(&climb, &[]).0, 403);
    // The generated link secret is private to the host's user.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(env.data.join("link-secret")).expect("secret").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn serve_fails_with_one_line_when_its_port_is_taken() {
    let env = Env::new();
    let _taken = std::net::TcpListener::bind(("127.0.0.1", env.port)).expect("take the port");
    let out = env.command().arg("serve").output().expect("run celer serve");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("celer:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(&format!("cannot listen on 127.0.0.1:{}", env.port)), "{stderr}");
}

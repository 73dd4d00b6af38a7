//! The Celery drop-in, end to end: the real Celery 5.7 client (the venv
//! `scripts/services.sh up celery` makes) sends tasks as a Django app would,
//! a real `celer serve` with `[celery] enabled` runs them in the `hello`
//! plugin, and `.get()` returns or raises. The checks themselves are in
//! tests/celery/django_app.py; this side starts the host, runs the
//! producer, and reads celer's Celery dead letters.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celer_integration::{Env, TEST_CONFIG, plugin_manifest, plugin_wasm, repo_root, services};

fn python() -> PathBuf {
    let venv = std::env::var_os("CELER_CELERY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/services/celery-venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} is missing: run `scripts/services.sh up celery` (make test does)", py.display());
    py
}

fn redis_cli(args: &[&str]) -> String {
    let port = services::REDIS_URL.rsplit(':').next().expect("port");
    let out = Command::new("redis-cli").args(["-p", port, "--raw"]).args(args).output().expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Host(Child, PathBuf);

impl Host {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A host on the test Redis with `[celery] enabled` for `queue`, and hello
/// installed with Celery task names as aliases.
fn start(env: &Env) -> Host {
    let log = env.path().join("serve.log");
    let child = env
        .command()
        .args(["serve", "--roles", "worker"])
        .env("CELER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn celer serve");
    let host = Host(child, log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host.log().contains("consuming Celery messages") {
        assert!(Instant::now() < deadline, "the host did not start consuming:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    host
}

/// Fails the test unless the Python side `what` exited 0, showing its
/// output and the host's log.
fn assert_succeeded(out: &std::process::Output, what: &str, host: &Host) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}\n--- celer log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        host.log()
    );
}

/// A test's own id, Celery queue (`celery-<kind>-<id>`) and celer key
/// prefix, so tests sharing the Redis never see each other's keys.
fn unique(kind: &str) -> (String, String, String) {
    let id = format!("{}-{}", std::process::id(), Instant::now().elapsed().as_nanos());
    let (queue, prefix) = (format!("celery-{kind}-{id}"), format!("celer-celery-{kind}-{id}:"));
    (id, queue, prefix)
}

/// A Celery worker name for `[celery] worker_name` (`<name>@%n`, as
/// `celery worker -n <name>@%n` would set it) and what it becomes on this
/// machine, the name replies come under.
fn worker_names(name: &str) -> (String, String) {
    let short_hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname").trim().split('.').next().unwrap_or_default().to_string();
    (format!("{name}@%n"), format!("{name}@{short_hostname}"))
}

#[test]
fn a_django_app_gets_its_results_from_celer() {
    let (id, queue, prefix) = unique("test");
    let (worker_name, worker) = worker_names(&format!("django-{id}"));
    let config = format!(
        "{TEST_CONFIG}\n[celery]\nenabled = true\ntrack_started = true\nqueues = [\"{queue}\"]\nworker_name = \"{worker_name}\"\n"
    );
    let env = Env::with_config(&config)
        .var("CELER_BROKER_URL", services::REDIS_URL)
        .var("CELER_BROKER_PREFIX", &prefix);
    let manifest = std::fs::read_to_string(plugin_manifest("hello")).expect("manifest").replacen(
        "\n[limits]",
        "\naliases = { \"proj.tasks.add\" = \"hello.add\", \"proj.tasks.greet\" = \"hello.greet\", \"proj.tasks.fail\" = \"hello.fail\", \"proj.tasks.tsum\" = \"hello.total\" }\n\n[limits]",
        1,
    );
    env.install_files("hello", &std::fs::read(plugin_wasm("hello")).expect("wasm"), &manifest);
    // A task that runs for a while, for revoke(terminate=True).
    let slow = std::fs::read_to_string(plugin_manifest("hostile"))
        .expect("manifest")
        .replacen("\n[limits]", "\naliases = { \"proj.tasks.slow\" = \"hostile.sleep\", \"proj.tasks.slow_retry\" = \"hostile.sleep_then_retry\" }\n\n[limits]", 1);
    env.install_files("hostile", &std::fs::read(plugin_wasm("hostile")).expect("wasm"), &slow);
    let host = start(&env);

    let out = Command::new(python())
        .arg(repo_root().join("tests/celery/django_app.py"))
        .env("CELERY_URL", services::REDIS_URL)
        .env("CELERY_QUEUE", &queue)
        .env("CELER_PREFIX", &prefix)
        .env("CELER_WORKER", &worker)
        .output()
        .expect("run the Celery producer");
    assert_succeeded(&out, "the Django-style producer", &host);
    eprintln!("producer: {}", String::from_utf8_lossy(&out.stdout));
    // Its last request was `celery control shutdown`: the host drains and exits 0.
    let mut host = host;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = host.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the host did not exit after `celery control shutdown`:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit after a remote shutdown: {status}\n{}", host.log());
    assert!(host.log().contains("shutdown requested by a Celery control command"), "{}", host.log());

    // The four malformed messages, each with its reason.
    let dead = redis_cli(&["XRANGE", &format!("{prefix}celery:dead"), "-", "+"]);
    for reason in ["not JSON", "base64", "pickle", "unknown task"] {
        assert!(dead.contains(reason), "a dead letter says {reason:?}:\n{dead}");
    }
    assert_eq!(redis_cli(&["XLEN", &format!("{prefix}celery:dead")]), "4", "{dead}");
    // Nothing left in flight, nothing left on the Celery list.
    assert_eq!(redis_cli(&["LLEN", &queue]), "0");
    let inflight = redis_cli(&["KEYS", &format!("{prefix}celery:inflight:*")]);
    for key in inflight.lines().filter(|k| !k.is_empty()) {
        assert_eq!(redis_cli(&["LLEN", key]), "0", "{key} still holds messages");
    }
}

#[test]
fn messages_in_flight_on_a_dead_host_are_recovered_once() {
    let (id, queue, prefix) = unique("recover");
    // A message a host had moved off the Celery list when it died.
    let message = std::fs::read_to_string(repo_root().join("../shared/fixtures/celery-protocol/send_task-export.organization.json"))
        .expect("fixture")
        .replace("export.organization", "hello.greet")
        .replace("W1s0MiwgN10sIHsiZm10IjogInppcCJ9LCB7ImNhbGxiYWNrcyI6IG51bGwsICJlcnJiYWNrcyI6IG51bGwsICJjaGFpbiI6IG51bGwsICJjaG9yZCI6IG51bGx9XQ==", "W1siQm8iXSwge30sIHt9XQ==")
        .replace("72233f39-e827-45bf-91ba-025a6eeb6cb9", &format!("recover-{id}"));
    let orphan = format!("{prefix}celery:inflight:gone-host-1/{queue}");
    redis_cli(&["LPUSH", &orphan, &message]);
    redis_cli(&["LPUSH", &orphan, &message]); // taken twice: still one job
    redis_cli(&["SADD", &format!("{prefix}celery:inflight-lists"), &orphan]);

    let config = format!("{TEST_CONFIG}\n[celery]\nenabled = true\nqueues = [\"{queue}\"]\n");
    let env = Env::with_config(&config)
        .var("CELER_BROKER_URL", services::REDIS_URL)
        .var("CELER_BROKER_PREFIX", &prefix);
    env.install("hello");
    let host = start(&env);
    let key = format!("celery-task-meta-recover-{id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let meta = loop {
        let meta = redis_cli(&["GET", &key]);
        if !meta.is_empty() {
            break meta;
        }
        assert!(Instant::now() < deadline, "no result for the recovered message:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(meta.starts_with(r#"{"status": "SUCCESS", "result": {"message": "Hello, Bo!"}"#), "{meta}");
    assert_eq!(redis_cli(&["LLEN", &orphan]), "0");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(host.log().matches("job succeeded").count(), 1, "one job for a message taken twice");
}

/// A host environment on the test Redis whose `[celery]` consumes a queue
/// of its own, with `plugin` installed and `aliases` (the body of its
/// manifest's inline table) mapping Celery names to its tasks.
struct OneQueue {
    env: Env,
    queue: String,
    prefix: String,
    /// Unique to this test run, for task ids.
    id: String,
}

fn one_queue(kind: &str, plugin: &str, aliases: &str) -> OneQueue {
    let (id, queue, prefix) = unique(kind);
    let config = format!("{TEST_CONFIG}\n[celery]\nenabled = true\nqueues = [\"{queue}\"]\n");
    let env = Env::with_config(&config).var("CELER_BROKER_URL", services::REDIS_URL).var("CELER_BROKER_PREFIX", &prefix);
    let manifest = std::fs::read_to_string(plugin_manifest(plugin))
        .expect("manifest")
        .replacen("\n[limits]", &format!("\naliases = {{ {aliases} }}\n\n[limits]"), 1);
    env.install_files(plugin, &std::fs::read(plugin_wasm(plugin)).expect("wasm"), &manifest);
    OneQueue { env, queue, prefix, id }
}

/// Sends one task with the real Celery client; `call` is what goes
/// between the parentheses of `app.send_task(…)`.
fn send_task(call: &str) {
    let send = format!(
        "from celery import Celery\napp = Celery('proj', broker='{url}', backend='{url}')\napp.send_task({call})\n",
        url = services::REDIS_URL,
    );
    let out = Command::new(python()).args(["-c", &send]).output().expect("send the task");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The task's `celery-task-meta` once it reads `status`, within `within`
/// (the host's log in the failure message otherwise).
fn await_meta(task_id: &str, status: &str, within: Duration, host: &Host) -> String {
    let key = format!("celery-task-meta-{task_id}");
    let deadline = Instant::now() + within;
    loop {
        let meta = redis_cli(&["GET", &key]);
        if meta.contains(status) {
            return meta;
        }
        assert!(Instant::now() < deadline, "no {status} for {task_id} (meta {meta:?}):\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Celery task on its last attempt whose host dies mid-run: the host that
/// takes its job over ends it `failed` (kind `lost`) without running it, and
/// writes Celery's FAILURE, so the producer's `.get()` raises instead of
/// waiting forever.
#[test]
fn a_task_lost_with_its_host_gets_a_failure_result() {
    let OneQueue { env, queue, prefix, id } = one_queue("lost", "hostile", r#""proj.tasks.slow" = "hostile.sleep""#);
    let task_id = format!("lost-{id}");
    let mut victim = start(&env);

    // Sent as a task that already used its retries: no attempt is left after this one.
    let retries = celer::job::DEFAULT_MAX_RETRIES;
    send_task(&format!("'proj.tasks.slow', kwargs={{'ms': 20000}}, task_id='{task_id}', queue='{queue}', retries={retries}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = redis_cli(&["GET", &format!("{prefix}celery:job:{task_id}")]);
        if !job.is_empty() && redis_cli(&["HGET", &format!("{}j:{job}", celer::broker::redis::queue_prefix(&prefix, &queue)), "state"]) == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the task did not start:\n{}", victim.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = victim.0.kill();
    let _ = victim.0.wait();

    let survivor = start(&env);
    let meta = await_meta(&task_id, "FAILURE", Duration::from_secs(30), &survivor);
    assert!(meta.contains("lease expired on every attempt"), "{meta}");
    assert!(survivor.log().contains("Celery task ended without running"), "{}", survivor.log());
}

/// `celer cancel` (or `DELETE /api/jobs/{id}`) of a Celery task that has
/// not started writes Celery's REVOKED, so the producer's `.get()` raises
/// `TaskRevokedError` instead of waiting forever.
#[test]
fn a_celer_cancel_of_a_waiting_celery_task_revokes_it() {
    let OneQueue { env, queue, prefix, id } = one_queue("cancel", "hello", r#""proj.tasks.add" = "hello.add""#);
    let task_id = format!("cancel-{id}");
    let host = start(&env);
    send_task(&format!("'proj.tasks.add', args=[1, 2], task_id='{task_id}', queue='{queue}', countdown=600"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let job = redis_cli(&["GET", &format!("{prefix}celery:job:{task_id}")]);
        if !job.is_empty() {
            break job;
        }
        assert!(Instant::now() < deadline, "the task was not taken:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = env.command().args(["cancel", &job]).output().expect("celer cancel");
    assert!(out.status.success(), "celer cancel: {}", String::from_utf8_lossy(&out.stderr));
    let meta = await_meta(&task_id, "REVOKED", Duration::from_secs(15), &host);
    assert!(meta.contains("TaskRevokedError"), "{meta}");
}

/// `celery control pool_restart` (what a deploy sends after new code)
/// loads a changed plugin at once. The host's watcher here waits ten
/// minutes of quiet before loading a change, so only the rescan the
/// command starts can make the new alias known within the test.
#[test]
fn pool_restart_loads_a_changed_plugin_at_once() {
    let (id, queue, prefix) = unique("reload");
    let (worker_name, worker) = worker_names(&format!("reload-{id}"));
    let slow_watcher = TEST_CONFIG.replace("debounce_ms = 100", "debounce_ms = 600000");
    assert_ne!(slow_watcher, TEST_CONFIG, "the test config names its debounce");
    let config = format!("{slow_watcher}\n[celery]\nenabled = true\nqueues = [\"{queue}\"]\nworker_name = \"{worker_name}\"\n");
    let env = Env::with_config(&config).var("CELER_BROKER_URL", services::REDIS_URL).var("CELER_BROKER_PREFIX", &prefix);
    let shipped = std::fs::read_to_string(plugin_manifest("hello")).expect("manifest");
    let with_alias = |alias: &str| shipped.replacen("\n[limits]", &format!("\naliases = {{ \"{alias}\" = \"hello.add\" }}\n\n[limits]"), 1);
    let wasm = std::fs::read(plugin_wasm("hello")).expect("wasm");
    env.install_files("hello", &wasm, &with_alias("proj.tasks.add"));
    let host = start(&env);
    // The deploy: a new manifest names the task differently.
    env.put("hello.toml", with_alias("proj.tasks.added").as_bytes());
    let script = format!(
        r#"
import sys, time
from celery import Celery
app = Celery("proj", broker="{url}", backend="{url}")
app.conf.task_default_queue = "{queue}"
me = "{worker}"
def registered():
    return (app.control.inspect(destination=[me], timeout=3).registered() or {{}}).get(me, [])
time.sleep(0.5)
assert "proj.tasks.added" not in registered(), "the watcher loaded the change by itself: the test proves nothing"
replies = app.control.pool_restart(reload=True, destination=[me], reply=True, timeout=3)
assert [r[me] for r in replies if me in r] == [{{"ok": "reload started"}}], replies
deadline = time.time() + 10
while "proj.tasks.added" not in registered():
    assert time.time() < deadline, f"not loaded after pool_restart: {{registered()}}"
    time.sleep(0.1)
assert app.send_task("proj.tasks.added", (2, 3)).get(timeout=20) == {{"sum": 5}}
"#,
        url = services::REDIS_URL,
    );
    let out = Command::new(python()).args(["-c", &script]).output().expect("run the Celery client");
    assert_succeeded(&out, "the Celery client", &host);
    assert!(host.log().contains("pool_restart"), "the rescan is logged:\n{}", host.log());
}

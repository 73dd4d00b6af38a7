//! Schedules through real `celer` processes: bad definitions are refused at
//! the door; several hosts running the scheduler role fire each tick exactly
//! once; a SIGKILLed leader is replaced within the lock's TTL with no double
//! and no lost tick.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use celer_integration::{Env, Server, stdout_json};
use serde_json::json;

/// Short lock TTL and tick so that takeover tests take seconds.
fn config() -> String {
    format!("{}\n[scheduler]\ntick_ms = 200\nlock_ttl_ms = 2000\n", celer_integration::TEST_CONFIG)
}

/// Fire times each host logged ("schedule fired … fire_time=…"), counted.
fn fired(servers: &[&Server], schedule: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for s in servers {
        for line in s.log().lines().filter(|l| l.contains("schedule fired") && l.contains(&format!("schedule={schedule}"))) {
            if let Some(t) = line.split("fire_time=").nth(1).and_then(|r| r.split_whitespace().next()) {
                *seen.entry(t.to_string()).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Every second from the first fire time to the last is there exactly once.
fn assert_each_tick_once(seen: &BTreeMap<String, usize>) {
    let doubles: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubles.is_empty(), "ticks fired twice: {doubles:?}");
    let times: Vec<i64> = seen
        .keys()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).expect("rfc3339").timestamp())
        .collect();
    let (first, last) = (times[0], times[times.len() - 1]);
    assert_eq!(times.len() as i64, last - first + 1, "a tick is missing between {first} and {last}: {times:?}");
}

#[test]
fn bad_definitions_get_one_clear_line_and_exit_2() {
    let env = Env::new();
    for (args, needle) in [
        (vec!["schedules", "add", "x", "hello.noop", "--cron", "0 3 * *"], "expected 5 fields"),
        (vec!["schedules", "add", "x", "hello.noop", "--cron", "0 3 * * *", "--tz", "Mars/Olympus"], "unknown time zone"),
        (vec!["schedules", "add", "x", "hello.noop", "--every", "0s"], "from one second to a century"),
        (vec!["schedules", "add", "x", "hello.noop", "--every", "1000years"], "from one second to a century"),
        (vec!["schedules", "add", "x", "hello.noop"], "exactly one of"),
        (vec!["schedules", "enable", "nope"], "no schedule named"),
    ] {
        let out = env.celer(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn add_list_disable_enable_remove_and_run_now() {
    let env = Env::new();
    env.install("hello");
    let out = env.celer(&["schedules", "add", "nightly", "hello.noop", "--cron", "0 3 * * *", "--tz", "Europe/London"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout_json(&out)["next_run_at"].is_string());
    let dup = env.celer(&["schedules", "add", "nightly", "hello.noop", "--every", "1h"]);
    assert_eq!(dup.status.code(), Some(2), "a second schedule of the same name is refused");
    let list = stdout_json(&env.celer(&["schedules", "list", "--json"]));
    assert_eq!(list[0]["name"], "nightly");
    assert_eq!(list[0]["timezone"], "Europe/London");
    assert!(env.celer(&["schedules", "disable", "nightly"]).status.success());
    assert_eq!(stdout_json(&env.celer(&["schedules", "list", "--json"]))[0]["enabled"], false);
    assert!(env.celer(&["schedules", "enable", "nightly"]).status.success());

    let _server = env.serve();
    let out = env.celer(&["schedules", "run-now", "nightly"]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    env.wait_state(&id, "succeeded", Duration::from_secs(20));
    assert!(env.celer(&["schedules", "remove", "nightly"]).status.success());
    assert_eq!(stdout_json(&env.celer(&["schedules", "list", "--json"])), serde_json::json!([]));
}

#[test]
fn three_hosts_fire_each_tick_exactly_once_and_survive_the_leader_dying() {
    three_hosts(Env::with_config(&config()));
}

/// The same on the Redis broker, whose hosts elect their leader in Redis.
#[test]
fn three_hosts_on_one_redis_fire_each_tick_exactly_once() {
    three_hosts(Env::with_config(&config()).var("CELER_BROKER_URL", celer_integration::services::REDIS_URL));
}

fn three_hosts(env: Env) {
    env.install("hello");
    let out = env.celer(&["schedules", "add", "every-second", "hello.noop", "--every", "1s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut hosts = vec![env.serve_named("a"), env.serve_named("b"), env.serve_named("c")];
    std::thread::sleep(Duration::from_secs(6));

    // Kill whichever host leads now.
    let leader = hosts
        .iter()
        .position(|h| h.log().lines().filter(|l| l.contains("leadership changed")).last().is_some_and(|l| l.contains("leading=true")))
        .expect("one host leads");
    hosts[leader].sigkill();
    std::thread::sleep(Duration::from_secs(6));
    let survivors: Vec<&Server> = hosts.iter().collect();
    let seen = fired(&survivors, "every-second");
    assert!(seen.len() >= 10, "fired {} ticks in 12 s", seen.len());
    assert_each_tick_once(&seen);
    let leaders = hosts.iter().filter(|h| h.log().contains("leading=true")).count();
    assert!(leaders >= 2, "another host took over");
    // With a Redis broker the lock is taken in Redis, never the fallback.
    assert!(hosts.iter().all(|h| !h.log().contains("using the database lock")), "the Redis lock was not used");
}

#[test]
fn edits_take_effect_without_a_restart() {
    let env = Env::with_config(&config());
    env.install("hello");
    let server = env.serve();
    assert!(env.celer(&["schedules", "add", "tick", "hello.noop", "--every", "1s"]).status.success());
    server.wait_log("schedule=tick", Duration::from_secs(10));
    assert!(env.celer(&["schedules", "disable", "tick"]).status.success());
    std::thread::sleep(Duration::from_millis(600));
    let before = fired(&[&server], "tick").len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fired(&[&server], "tick").len(), before, "a disabled schedule does not fire");
}

/// The Python of the django-celery-beat venv `scripts/services.sh up` makes.
fn django_python() -> std::path::PathBuf {
    let py = celer_integration::repo_root().join("target/services/django-venv/bin/python");
    assert!(py.exists(), "{} is missing: run `scripts/services.sh up django` (make test does)", py.display());
    py
}

/// Imports from tables Django's own migrations created, filled through the
/// django-celery-beat models, on SQLite and on PostgreSQL.
fn import_round_trip(env: &Env, db_arg: &str, url: &str) {
    let make = celer_integration::repo_root().join("tests/django_beat/make_db.py");
    let out = Command::new(django_python()).arg(&make).arg(db_arg).output().expect("run make_db.py");
    assert!(out.status.success(), "make_db.py: {}", String::from_utf8_lossy(&out.stderr));

    let out = env.celer(&["schedules", "import", "--from-django-celery-beat", url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = stdout_json(&out);
    let mut imported: Vec<&str> = report["imported"].as_array().expect("imported").iter().filter_map(|v| v.as_str()).collect();
    imported.sort();
    assert_eq!(imported, vec!["clean-mfa", "complete-ended", "new-year", "weekday-report"], "{report:#}");
    assert!(report["not_imported"]["lights"].as_str().unwrap_or("").contains("solar"), "{report:#}");
    assert!(report["not_imported"]["backend-cleanup"].as_str().unwrap_or("").contains("celery.backend_cleanup"), "{report:#}");

    let list = stdout_json(&env.celer(&["schedules", "list", "--json"]));
    let by_name = |n: &str| list.as_array().expect("list").iter().find(|s| s["name"] == n).cloned().expect(n);
    let mfa = by_name("clean-mfa");
    assert_eq!((mfa["task"].clone(), mfa["expr"].clone(), mfa["timezone"].clone()), (json!("hello.noop"), json!("0 3 * * *"), json!("Europe/London")));
    assert_eq!(mfa["description"], "nightly MFA cleanup");
    let weekday = by_name("weekday-report");
    assert_eq!((weekday["enabled"].clone(), weekday["kwargs"].clone()), (json!(false), json!({"name": "report"})));
    let ended = by_name("complete-ended");
    assert_eq!((ended["kind"].clone(), ended["every_s"].clone(), ended["queue"].clone(), ended["args"].clone()), (json!("interval"), json!(300), json!("events"), json!([1, 2])));
    let once = by_name("new-year");
    assert_eq!((once["kind"].clone(), once["at"].clone(), once["one_off"].clone()), (json!("clocked"), json!("2030-01-01T12:00:00Z"), json!(true)));
}

/// hello's manifest with the seeds' Celery task names as aliases.
fn env_with_aliases() -> Env {
    let env = Env::new();
    let manifest = std::fs::read_to_string(celer_integration::plugin_manifest("hello"))
        .expect("manifest")
        .replace("[limits]", "aliases = { \"modules.auth.accounts.tasks.clean_mfa_data\" = \"hello.noop\", \"apps.events.tasks.mark_ended_events_as_completed\" = \"hello.add\" }\n\n[limits]");
    env.install_files("hello", &std::fs::read(celer_integration::plugin_wasm("hello")).expect("wasm"), &manifest);
    env
}

#[test]
fn import_from_django_celery_beat_on_sqlite() {
    let env = env_with_aliases();
    let db = env.path().join("django.sqlite3");
    import_round_trip(&env, db.to_str().expect("utf8"), &format!("sqlite://{}", db.display()));
}

#[test]
fn import_from_django_celery_beat_on_postgres() {
    let env = env_with_aliases();
    let url = celer_integration::services::DATABASE_URL;
    import_round_trip(&env, url, url);
}

/// The same store on PostgreSQL (what hosts sharing one database use): add,
/// list, disable, remove round-trip there. Names are unique per run because
/// the test database is shared.
#[test]
fn schedules_live_in_postgres_when_database_url_names_it() {
    let env = Env::new().var("DATABASE_URL", celer_integration::services::DATABASE_URL);
    let name = format!("pg-roundtrip-{}", std::process::id());
    let out = env.celer(&["schedules", "add", &name, "hello.noop", "--every", "90s", "--kwargs", r#"{"k":1}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let find = || {
        let list = stdout_json(&env.celer(&["schedules", "list", "--json"]));
        list.as_array().expect("list").iter().find(|s| s["name"] == name.as_str()).cloned()
    };
    let s = find().expect("stored in PostgreSQL");
    assert_eq!((s["every_s"].clone(), s["kwargs"].clone(), s["enabled"].clone()), (json!(90), json!({"k": 1}), json!(true)));
    assert!(env.celer(&["schedules", "disable", &name]).status.success());
    assert_eq!(find().expect("still there")["enabled"], false);
    assert!(env.celer(&["schedules", "remove", &name]).status.success());
    assert!(find().is_none());
    // Nothing of it is in the embedded SQLite file.
    let local = Env::new();
    assert_eq!(stdout_json(&local.celer(&["schedules", "list", "--json"])), json!([]));
}

//! The seed jobs end to end: the first-party plugins (email, export,
//! cleanup, events, audit, permissions) on a real `celer serve`, against the
//! demo schema and data of `examples/` in the embedded default's SQLite file
//! and in the test PostgreSQL (`scripts/services.sh up postgres`, a fresh
//! database per test), with file storage and the mail outbox of the
//! embedded default.
//!
//! What the issue asks of every plugin, on both backends: the export zip
//! holds every row of the organization and none of another's; time
//! comparisons are in UTC (the host runs in UTC+14, PostgreSQL's session
//! time zone too); running each task twice changes nothing more; a plugin
//! asking for a table outside its manifest is denied.
//!
//! Needs: `make plugins` (the six seed plugins), `python3` (the demo-data
//! generator), `sqlite3` and `psql` (as the database tests do).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celer_integration::{Env, TEST_CONFIG, repo_root, services};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(90);
const PLUGINS: [&str; 6] = ["email", "export", "cleanup", "events", "audit", "permissions"];

use celer_integration::{AdminDb, Db, admin_sql, unique_name as unique};

/// A database of its own on the test PostgreSQL, owned by the test role,
/// in a time zone far from UTC; dropped (with the plugin roles the host
/// made for it) when the test ends.
struct PgDatabase {
    name: String,
    url: String,
    role_prefix: String,
}

impl PgDatabase {
    fn create(role_prefix: &str) -> PgDatabase {
        let name = unique("seeds");
        let url = match services::DATABASE_URL.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("services::DATABASE_URL has no database name"),
        };
        admin_psql(&format!("CREATE DATABASE {name} OWNER {}", pg_user()));
        admin_psql(&format!("ALTER DATABASE {name} SET timezone TO 'Pacific/Kiritimati'"));
        PgDatabase { name, url, role_prefix: role_prefix.to_string() }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = try_admin_psql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        if let Ok(roles) = try_admin_psql(&format!(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE '{}%'",
            self.role_prefix.replace('_', "\\_")
        )) {
            for role in roles.lines().filter(|r| !r.is_empty()) {
                let _ = try_admin_psql(&format!("DROP ROLE IF EXISTS \"{role}\""));
            }
        }
    }
}

/// The test role (the user of `services::DATABASE_URL`).
fn pg_user() -> String {
    let rest = services::DATABASE_URL.split("://").nth(1).expect("a URL");
    rest.split(['@', ':']).next().expect("a user").to_string()
}

/// The server's superuser, on the same server (the test cluster trusts
/// loopback connections), for CREATE/DROP DATABASE.
fn admin_url() -> String {
    let (_, server) = services::DATABASE_URL.split_once('@').expect("user@host");
    let host = server.split('/').next().expect("host:port");
    format!("postgres://postgres@{host}/postgres")
}

fn try_admin_psql(sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([&admin_url(), "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        false => Err(String::from_utf8_lossy(&out.stderr).to_string()),
    }
}

fn admin_psql(sql: &str) {
    if let Err(e) = try_admin_psql(sql) {
        panic!("{sql}: {e} (is the test PostgreSQL up? scripts/services.sh up postgres)");
    }
}

/// A `celer serve` with chosen roles, killed when dropped. Without the
/// scheduler role, the plugins' default schedules (some fire at once) do not
/// run tasks behind the test's back.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn start(env: &Env, roles: &str) -> Serve {
        let log = env.path().join(format!("serve-{}.log", roles.replace(',', "-")));
        let child = env
            .command()
            .args(["serve", "--roles", roles])
            .env("CELER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn celer serve");
        let serve = Serve { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !serve.log_text().contains("celer serving") {
            assert!(Instant::now() < deadline, "celer serve did not start:\n{}", serve.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One installation with the demo schema and data, the six plugins and a
/// running host.
struct Seeds {
    env: Env,
    db: Db,
    pg: Option<PgDatabase>,
    serve: Option<Serve>,
}

/// Organizations and rows per organization of the demo data in these tests.
const ORGS: u32 = 2;
const ROWS_PER_ORG: u32 = 120;

impl Seeds {
    fn new(db: Db) -> Seeds {
        Self::with_manifests(db, &[])
    }

    /// `manifests`: plugins installed with this manifest text instead of theirs.
    fn with_manifests(db: Db, manifests: &[(&str, String)]) -> Seeds {
        let role_prefix = format!("{}_", unique("seedp"));
        let config = format!("{TEST_CONFIG}\n[database]\nrole_prefix = \"{role_prefix}\"\n");
        // Far from UTC: a comparison done in local time would show.
        let env = Env::with_config(&config).var("TZ", "Pacific/Kiritimati");
        let pg = (db == Db::Postgres).then(|| PgDatabase::create(&role_prefix));
        let env = match &pg {
            Some(pg) => env.var("DATABASE_URL", &pg.url),
            None => env,
        };
        std::fs::create_dir_all(&env.data).unwrap();
        let seeds = Seeds { env, db, pg, serve: None };
        seeds.generate();
        for name in PLUGINS {
            match manifests.iter().find(|(n, _)| *n == name) {
                Some((_, text)) => seeds.env.install_files(name, &std::fs::read(celer_integration::plugin_wasm(name)).unwrap(), text),
                None => seeds.env.install(name),
            }
        }
        seeds
    }

    /// The Redis broker with two worker shards instead of the embedded broker.
    fn on_redis_with_shards(mut self) -> Seeds {
        let prefix = format!("{}:", unique("seeds"));
        self.env = self.env.var("CELER_BROKER_URL", services::REDIS_URL).var("CELER_BROKER_PREFIX", &prefix).var("CELER_WORKER_SHARDS", "2");
        self
    }

    fn start(mut self) -> Seeds {
        self.serve = Some(Serve::start(&self.env, "worker,api"));
        self
    }

    /// Schema and demo data, as a user would load them.
    fn generate(&self) {
        let script = repo_root().join("examples").join("gen_demo_data.py");
        let sizes = [
            "--orgs".to_string(),
            ORGS.to_string(),
            "--rows-per-org".to_string(),
            ROWS_PER_ORG.to_string(),
        ];
        match &self.pg {
            None => {
                let out = Command::new("python3")
                    .arg(&script)
                    .arg("--sqlite")
                    .arg(self.env.data.join("celer.db"))
                    .args(&sizes)
                    .output()
                    .expect("python3 (runs examples/gen_demo_data.py)");
                assert!(out.status.success(), "generator: {}", String::from_utf8_lossy(&out.stderr));
            }
            Some(pg) => {
                let sql = self.env.path().join("demo.sql");
                let out = Command::new("python3")
                    .arg(&script)
                    .arg("--postgres")
                    .args(&sizes)
                    .stdout(std::fs::File::create(&sql).unwrap())
                    .output()
                    .expect("python3 (runs examples/gen_demo_data.py)");
                assert!(out.status.success(), "generator: {}", String::from_utf8_lossy(&out.stderr));
                let out = Command::new("psql")
                    .args([&pg.url, "-q", "-v", "ON_ERROR_STOP=1", "-f"])
                    .arg(&sql)
                    .output()
                    .expect("psql");
                assert!(out.status.success(), "loading demo data: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    /// Runs SQL as the database's owner: lines of `|`-separated columns.
    fn sql(&self, sql: &str) -> String {
        match &self.pg {
            None => admin_sql(AdminDb::Sqlite(&self.env.data.join("celer.db")), sql),
            Some(pg) => admin_sql(AdminDb::Postgres(&pg.url), sql),
        }
    }

    fn ints(&self, sql: &str) -> Vec<i64> {
        self.sql(sql).lines().filter(|l| !l.is_empty()).map(|l| l.parse().unwrap_or_else(|_| panic!("{sql}: {l}"))).collect()
    }

    fn int(&self, sql: &str) -> i64 {
        self.ints(sql)[0]
    }

    /// A timestamp literal both backends take: ISO-8601 UTC, microseconds.
    fn at(offset: chrono::Duration) -> String {
        (chrono::Utc::now() + offset).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    }

    /// Enqueues `task` and waits for it to finish; its status.
    fn run(&self, task: &str, args: Value) -> Value {
        let id = self.env.enqueue(task, &["--args", &args.to_string(), "--max-retries", "0"]);
        self.env.wait_for(&id, T, |s| matches!(s["state"].as_str(), Some("succeeded" | "failed" | "cancelled" | "expired")))
    }

    /// Like `run`, and the job must succeed: its result.
    fn ok(&self, task: &str, args: Value) -> Value {
        let s = self.run(task, args);
        assert_eq!(s["state"], "succeeded", "{task} on {:?}: {s:#}", self.db);
        s["result"].clone()
    }

    /// Mails in the outbox: (file name, text).
    fn outbox(&self) -> Vec<(String, String)> {
        let dir = self.env.data.join("outbox");
        let mut mails: Vec<(String, String)> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        mails.sort();
        mails
    }

    /// Waits until the follow-up jobs a job enqueued (its status's
    /// `touched.enqueued`) have finished.
    fn wait_children(&self, status: &Value) {
        for child in status["touched"]["enqueued"].as_array().into_iter().flatten() {
            let id = child["id"].as_str().expect("child id");
            let s = self.env.wait_for(id, T, |s| matches!(s["state"].as_str(), Some("succeeded" | "failed")));
            assert_eq!(s["state"], "succeeded", "follow-up job: {s:#}");
        }
    }
}

/// GET over plain HTTP/1.0 (the host's own listener): status and body.
fn http_get(url: &str) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("an http:// link");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(host).expect("connect to the host's listener");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    (status, raw[split + 4..].to_vec())
}

/// Every file of a zip as JSON, read by Python's zipfile: an independent
/// reader, so the zip is checked too, not only our own writer's idea of one.
fn unzip_json(zip: &Path) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             assert z.testzip() is None\n\
             print(json.dumps({n: json.loads(z.read(n)) for n in z.namelist()}))",
        ])
        .arg(zip)
        .output()
        .expect("python3");
    assert!(out.status.success(), "not a valid zip of JSON files: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn ids(rows: &Value) -> Vec<i64> {
    let mut ids: Vec<i64> = rows.as_array().expect("a JSON array").iter().map(|r| r["id"].as_i64().expect("id")).collect();
    ids.sort_unstable();
    ids
}

// ===================================================================== export

/// The SQL naming each exported file's rows, per organization.
const EXPORTED: &[(&str, &str)] = &[
    ("members", "SELECT id FROM memberships WHERE organization_id = {org}"),
    ("contacts", "SELECT id FROM contacts WHERE organization_id = {org}"),
    ("images", "SELECT id FROM images WHERE organization_id = {org}"),
    ("image_relations", "SELECT r.id FROM image_relations r JOIN images i ON i.id = r.image_id WHERE i.organization_id = {org}"),
    ("tags", "SELECT id FROM tags WHERE organization_id = {org}"),
    ("tag_relations", "SELECT r.id FROM tag_relations r JOIN tags t ON t.id = r.tag_id WHERE t.organization_id = {org}"),
    ("events", "SELECT id FROM events WHERE organization_id = {org}"),
    ("event_attendees", "SELECT a.id FROM event_attendees a JOIN events e ON e.id = a.event_id WHERE e.organization_id = {org}"),
];

fn export_holds_every_row_of_the_organization_and_none_of_another(seeds: Seeds) {
    let seeds = seeds.start();
    let owner = seeds.int("SELECT user_id FROM memberships WHERE organization_id = 1 AND role = 'owner'");
    let status = seeds.run("export.organization", json!([1, owner]));
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let result = &status["result"];
    assert_eq!(status["progress"]["done"], status["progress"]["total"], "{status:#}");

    // The link downloads from the host itself.
    let (code, body) = http_get(result["url"].as_str().expect("a link"));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body.len() as u64, result["size_bytes"].as_u64().unwrap());
    let zip = seeds.env.path().join("export.zip");
    std::fs::write(&zip, &body).unwrap();
    let files = unzip_json(&zip);

    assert_eq!(files["organization.json"]["id"], 1);
    assert_eq!(files["export.json"]["organization_id"], 1);
    let mut total = 0;
    for (file, sql) in EXPORTED {
        let got = ids(&files[format!("{file}.json")]);
        let mut want = seeds.ints(&sql.replace("{org}", "1"));
        want.sort_unstable();
        assert!(!want.is_empty(), "{file}: the demo data has rows");
        assert_eq!(got, want, "{file}: every row of organization 1, once");
        let other = seeds.ints(&sql.replace("{org}", "2"));
        assert!(got.iter().all(|id| !other.contains(id)), "{file}: a row of organization 2 leaked");
        assert_eq!(result["tables"][file], want.len(), "{file}");
        total += want.len();
    }
    assert_eq!(result["rows"], total);
    // Members carry email, name, role and language; timestamps are UTC.
    let owner_row = files["members.json"].as_array().unwrap().iter().find(|m| m["role"] == "owner").unwrap().clone();
    assert_eq!(owner_row["email"], "owner1@example.com");
    assert!(owner_row["name"].is_string() && owner_row["language"].is_string());
    assert!(owner_row["joined_at"].as_str().unwrap().ends_with('Z'), "{owner_row}");
    // The owner of organization 2 is a plain member of organization 1: that
    // membership is exported, theirs in organization 2 is not.
    let members = files["members.json"].as_array().unwrap();
    assert!(members.iter().any(|m| m["email"] == "owner2@example.com" && m["role"] == "member"));

    // Recorded, and mailed to the requester.
    let key = result["storage_key"].as_str().unwrap();
    assert_eq!(seeds.int(&format!("SELECT count(*) FROM data_exports WHERE storage_key = '{key}' AND status = 'COMPLETED'")), 1);
    assert!(seeds.env.data.join("storage").join(key).exists());
    let mail_job = result["email_job"].as_str().expect("the email job");
    let mail = seeds.env.wait_state(mail_job, "succeeded", T);
    assert_eq!(mail["result"]["template"], "export_ready");
    let outbox = seeds.outbox();
    let (_, eml) = outbox.iter().find(|(_, m)| m.contains("X-Celer-Template: export_ready")).expect("the mail is in the outbox");
    assert!(eml.contains("owner1@example.com") && eml.contains("Subject: Your data export of Organization 1 is ready"), "{eml}");
}

#[test]
fn export_holds_every_row_of_the_organization_and_none_of_another_sqlite() {
    export_holds_every_row_of_the_organization_and_none_of_another(Seeds::new(Db::Sqlite));
}

#[test]
fn export_holds_every_row_of_the_organization_and_none_of_another_postgres() {
    export_holds_every_row_of_the_organization_and_none_of_another(Seeds::new(Db::Postgres));
}

/// The same on the Redis broker with two worker shards: the database,
/// storage, mail and HTTP calls are made from the shards' own event loops.
#[test]
fn export_holds_every_row_of_the_organization_and_none_of_another_on_redis_with_worker_shards() {
    export_holds_every_row_of_the_organization_and_none_of_another(Seeds::new(Db::Postgres).on_redis_with_shards());
}

fn only_owners_and_admins_may_export(db: Db) {
    let seeds = Seeds::new(db).start();
    let admin = seeds.int("SELECT user_id FROM memberships WHERE organization_id = 1 AND role = 'admin'");
    assert_eq!(seeds.run("export.organization", json!([1, admin]))["state"], "succeeded");
    let member = seeds.int("SELECT user_id FROM memberships WHERE organization_id = 1 AND role = 'member' ORDER BY id LIMIT 1");
    let s = seeds.run("export.organization", json!([1, member]));
    assert_eq!(s["state"], "failed", "{s:#}");
    assert!(s["error"]["message"].as_str().unwrap().contains("role is `member`"), "{s:#}");
    let outsider = seeds.int("SELECT user_id FROM memberships WHERE organization_id = 2 AND role = 'admin'");
    let s = seeds.run("export.organization", json!([1, outsider]));
    assert!(s["error"]["message"].as_str().unwrap().contains("not a member"), "{s:#}");
    let s = seeds.run("export.organization", json!([999, admin]));
    assert!(s["error"]["message"].as_str().unwrap().contains("no organization with id 999"), "{s:#}");
    assert_eq!(seeds.int("SELECT count(*) FROM data_exports WHERE storage_key LIKE 'exports/1/%' AND storage_key <> 'exports/1/demo-old.zip'"), 1);
}

#[test]
fn only_owners_and_admins_may_export_sqlite() {
    only_owners_and_admins_may_export(Db::Sqlite);
}

#[test]
fn only_owners_and_admins_may_export_postgres() {
    only_owners_and_admins_may_export(Db::Postgres);
}

// ================================================================== UTC time

fn time_comparisons_are_in_utc(db: Db) {
    let seeds = Seeds::new(db);
    let m = |n: i64| chrono::Duration::minutes(n);
    let (h, d) = (chrono::Duration::hours, chrono::Duration::days);
    let insert = |name: &str, status: &str, start: String, end: String| {
        seeds.sql(&format!(
            "INSERT INTO events (organization_id, name, status, start_date, end_date, created_at, updated_at) \
             VALUES (1, '{name}', '{status}', '{start}', '{end}', '{start}', '{start}')"
        ));
    };
    // Two minutes either side of now, and either side of the 90-day and
    // 24-hour bounds: a local-time (UTC+14) comparison gets them wrong.
    insert("tz-ended", "CONFIRMED", Seeds::at(-h(1)), Seeds::at(-m(2)));
    insert("tz-not-ended", "ONGOING", Seeds::at(-h(1)), Seeds::at(m(2)));
    insert("tz-old", "COMPLETED", Seeds::at(-d(91)), Seeds::at(-d(90) - m(2)));
    insert("tz-recent", "COMPLETED", Seeds::at(-d(91)), Seeds::at(-d(90) + m(2)));
    insert("tz-soon", "CONFIRMED", Seeds::at(h(24) - m(2)), Seeds::at(h(25)));
    insert("tz-later", "CONFIRMED", Seeds::at(h(24) + m(2)), Seeds::at(h(26)));
    let user = seeds.int("SELECT user_id FROM memberships WHERE organization_id = 1 AND role = 'member' ORDER BY id LIMIT 1");
    for name in ["tz-soon", "tz-later"] {
        seeds.sql(&format!(
            "INSERT INTO event_attendees (event_id, user_id, created_at) SELECT id, {user}, created_at FROM events WHERE name = '{name}'"
        ));
    }
    let seeds = seeds.start();
    seeds.ok("events.complete_ended", json!([]));
    seeds.ok("events.archive_completed", json!([]));
    seeds.ok("events.send_reminders", json!([]));
    let status = |name: &str| seeds.sql(&format!("SELECT status FROM events WHERE name = '{name}'"));
    assert_eq!(status("tz-ended"), "COMPLETED");
    assert_eq!(status("tz-not-ended"), "ONGOING");
    assert_eq!(status("tz-old"), "ARCHIVED");
    assert_eq!(status("tz-recent"), "COMPLETED");
    let reminded = |name: &str| {
        seeds.int(&format!(
            "SELECT count(*) FROM event_attendees a JOIN events e ON e.id = a.event_id \
             WHERE e.name = '{name}' AND a.reminder_sent_at IS NOT NULL"
        ))
    };
    assert_eq!(reminded("tz-soon"), 1);
    assert_eq!(reminded("tz-later"), 0);
}

#[test]
fn time_comparisons_are_in_utc_sqlite() {
    time_comparisons_are_in_utc(Db::Sqlite);
}

#[test]
fn time_comparisons_are_in_utc_postgres() {
    time_comparisons_are_in_utc(Db::Postgres);
}

// ============================================================ run it twice

/// What the scheduled tasks change, to compare before and after.
const SNAPSHOT: &[&str] = &[
    "SELECT status, count(*) FROM events GROUP BY status ORDER BY status",
    "SELECT count(*) FROM event_attendees WHERE reminder_sent_at IS NOT NULL",
    "SELECT count(*) FROM images",
    "SELECT count(*) FROM tags",
    "SELECT count(*) FROM tag_relations",
    "SELECT count(*) FROM totp_devices",
    "SELECT count(*) FROM backup_codes",
    "SELECT count(*) FROM data_exports",
];

fn snapshot(seeds: &Seeds) -> Vec<String> {
    SNAPSHOT.iter().map(|q| seeds.sql(q)).collect()
}

fn each_task_twice_changes_nothing_more(db: Db) {
    let seeds = Seeds::new(db);
    // The stored files of every image, so that orphans' files can be seen to go.
    let images: Vec<(i64, String)> = seeds
        .sql("SELECT id, storage_key FROM images ORDER BY id")
        .lines()
        .map(|l| {
            let (id, key) = l.split_once('|').unwrap();
            (id.parse().unwrap(), key.to_string())
        })
        .collect();
    for (_, key) in &images {
        let path = seeds.env.data.join("storage").join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"\xff\xd8\xff not really a jpeg").unwrap();
    }
    let orphans = seeds.ints(
        "SELECT id FROM images i WHERE NOT EXISTS (SELECT 1 FROM image_relations r WHERE r.image_id = i.id) ORDER BY id",
    );
    assert!(!orphans.is_empty());
    let due_reminders = seeds.int(&format!(
        "SELECT count(*) FROM event_attendees a JOIN events e ON e.id = a.event_id \
         WHERE e.status = 'CONFIRMED' AND a.reminder_sent_at IS NULL AND e.start_date >= '{}' AND e.start_date < '{}'",
        Seeds::at(chrono::Duration::minutes(1)),
        Seeds::at(chrono::Duration::hours(24)),
    ));
    assert!(due_reminders > 0, "the demo data has reminders due");
    let seeds = seeds.start();

    let first: Vec<(&str, Value)> = [
        "events.complete_ended",
        "events.archive_completed",
        "events.send_reminders",
        "cleanup.orphan_images",
        "cleanup.orphan_tags",
        "cleanup.mfa",
        "cleanup.expired_exports",
    ]
    .into_iter()
    .map(|t| {
        let s = seeds.run(t, json!([]));
        assert_eq!(s["state"], "succeeded", "{t}: {s:#}");
        seeds.wait_children(&s);
        (t, s["result"].clone())
    })
    .collect();
    let after_first = snapshot(&seeds);
    let mails_after_first = seeds.outbox().len();
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    for (task, result) in &first {
        let did = match *task {
            "events.complete_ended" | "events.archive_completed" => count(result, "updated"),
            "events.send_reminders" => count(result, "reminders"),
            "cleanup.mfa" => count(result, "totp_devices") + count(result, "backup_codes"),
            _ => count(result, "deleted"),
        };
        assert!(did > 0, "{task} had something to do in the demo data: {result}");
    }
    // Orphan images lost their stored files too; the others kept theirs.
    for (id, key) in &images {
        let exists = seeds.env.data.join("storage").join(key).exists();
        assert_eq!(exists, !orphans.contains(id), "image {id} ({key})");
    }
    let reminders = first.iter().find(|(t, _)| *t == "events.send_reminders").unwrap().1["reminders"].as_u64().unwrap();
    let reminder_mails = seeds.outbox().iter().filter(|(_, m)| m.contains("Subject: Reminder: ")).count() as u64;
    assert_eq!(reminder_mails, reminders, "one mail per reminder");
    assert_eq!(reminders, due_reminders as u64, "every attendee due, once");

    // The second run: nothing left to do, nothing changes. Through the
    // Celery alias for complete_ended, as django-celery-beat would call it.
    for task in [
        "apps.events.tasks.mark_ended_events_as_completed",
        "events.archive_completed",
        "events.send_reminders",
        "cleanup.orphan_images",
        "cleanup.orphan_tags",
        "modules.auth.accounts.tasks.clean_mfa_data",
        "cleanup.expired_exports",
    ] {
        let r = seeds.ok(task, json!([]));
        for k in ["updated", "reminders", "deleted", "totp_devices", "backup_codes", "objects_deleted"] {
            if let Some(n) = r.get(k) {
                assert_eq!(n, 0, "{task} did more the second time: {r}");
            }
        }
    }
    assert_eq!(snapshot(&seeds), after_first);
    assert_eq!(seeds.outbox().len(), mails_after_first, "no reminder twice");
}

#[test]
fn each_task_twice_changes_nothing_more_sqlite() {
    each_task_twice_changes_nothing_more(Db::Sqlite);
}

#[test]
fn each_task_twice_changes_nothing_more_postgres() {
    each_task_twice_changes_nothing_more(Db::Postgres);
}

// ===================================================== audit and email

fn audit_log_records_events_and_skips_unknown_users(db: Db) {
    let seeds = Seeds::new(db).start();
    let before = seeds.int("SELECT count(*) FROM auth_audit_log");
    let r = seeds.ok(
        "modules.auth.accounts.tasks.log_auth_event_task",
        json!([1, "login", "192.0.2.7", "Mozilla/5.0", {"os": "Linux"}, true, {"method": "password"}]),
    );
    assert_eq!(r, json!({"recorded": true, "user_id": 1, "event_type": "login"}));
    let r = seeds.ok("audit.log_auth_event", json!([987654, "login_failed", "192.0.2.8", "curl", null, false, null]));
    assert_eq!(r["skipped"], "unknown user 987654");
    assert_eq!(seeds.int("SELECT count(*) FROM auth_audit_log") - before, 2);
    assert_eq!(
        seeds.sql("SELECT event_type, ip_address, skipped_reason FROM auth_audit_log WHERE user_id IS NULL"),
        "login_failed|192.0.2.8|unknown user 987654"
    );
    assert_eq!(seeds.int("SELECT count(*) FROM auth_audit_log WHERE user_id = 1 AND event_type = 'login' AND job_id IS NOT NULL"), 1);
}

#[test]
fn audit_log_records_events_and_skips_unknown_users_sqlite() {
    audit_log_records_events_and_skips_unknown_users(Db::Sqlite);
}

#[test]
fn audit_log_records_events_and_skips_unknown_users_postgres() {
    audit_log_records_events_and_skips_unknown_users(Db::Postgres);
}

fn emails_use_the_users_language_and_land_in_the_outbox(db: Db) {
    let seeds = Seeds::new(db).start();
    let german = seeds.int("SELECT id FROM users WHERE language = 'de' ORDER BY id LIMIT 1");
    let french = seeds.int("SELECT id FROM users WHERE language = 'fr' ORDER BY id LIMIT 1");
    let r = seeds.ok("modules.auth.accounts.tasks.send_welcome_email", json!([german]));
    assert_eq!((r["template"].as_str(), r["language"].as_str()), (Some("welcome"), Some("de")));
    let r = seeds.ok("email.welcome", json!([french]));
    assert_eq!(r["language"], "en", "no French templates: English");
    let r = seeds.ok(
        "email.send",
        json!(["password_reset", "someone@example.org", null, {"reset_url": "https://app.test/reset/abc"}, "de"]),
    );
    assert_eq!(r["to"], "someone@example.org");
    let mails = seeds.outbox();
    assert_eq!(mails.len(), 3);
    let reset = mails.iter().map(|(_, m)| m).find(|m| m.contains("someone@example.org")).unwrap();
    assert!(reset.contains("multipart/alternative") && reset.contains("text/html"), "{reset}");
    assert!(reset.contains("https://app.test/reset/abc"), "{reset}");
    let s = seeds.run("email.send", json!(["password_reset", "x@example.org"]));
    assert_eq!(s["state"], "failed");
    assert!(s["error"]["message"].as_str().unwrap().contains("needs `reset_url`"), "{s:#}");
}

#[test]
fn emails_use_the_users_language_and_land_in_the_outbox_sqlite() {
    emails_use_the_users_language_and_land_in_the_outbox(Db::Sqlite);
}

#[test]
fn emails_use_the_users_language_and_land_in_the_outbox_postgres() {
    emails_use_the_users_language_and_land_in_the_outbox(Db::Postgres);
}

// ============================================================ permissions

#[test]
fn permission_cache_keys_are_deleted_in_the_shared_redis() {
    let env = Env::with_config(TEST_CONFIG).var("CELER_REDIS_URL", services::REDIS_URL);
    env.install("permissions");
    let _serve = Serve::start(&env, "worker,api");
    // Keys as Django's cache would hold them (KEY_PREFIX "", VERSION 1).
    let (user, org) = (std::process::id() as i64, 4242);
    let redis = |args: &[&str]| {
        let port = services::REDIS_URL.rsplit(':').next().unwrap();
        let out = Command::new("redis-cli").args(["-p", port]).args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for role in ["member", "admin", "owner"] {
        redis(&["SET", &format!(":1:is_{role}_{user}_{org}"), "1"]);
    }
    redis(&["SET", &format!(":1:is_member_{user}_{}", org + 1), "1"]);
    let run = || {
        let id = env.enqueue("permissions.invalidate", &["--args", &json!([user, org]).to_string()]);
        env.wait_state(&id, "succeeded", T)["result"].clone()
    };
    assert_eq!(run()["deleted"].as_array().unwrap().len(), 3);
    assert_eq!(redis(&["EXISTS", &format!(":1:is_owner_{user}_{org}")]), "0");
    assert_eq!(redis(&["EXISTS", &format!(":1:is_member_{user}_{}", org + 1)]), "1", "another pair is untouched");
    assert_eq!(run()["deleted"], json!([]), "a second run deletes nothing more");
    redis(&["DEL", &format!(":1:is_member_{user}_{}", org + 1)]);
}

// ================================================================= grants

fn a_table_outside_the_manifest_is_denied(db: Db) {
    // The export plugin without `contacts`, the audit plugin without `users`.
    let export = std::fs::read_to_string(celer_integration::plugin_manifest("export"))
        .unwrap()
        .replace("\"contacts\", ", "");
    assert!(!export.contains("\"contacts\""));
    let audit = std::fs::read_to_string(celer_integration::plugin_manifest("audit"))
        .unwrap()
        .replace("database.read  = [\"users\"]", "");
    assert!(!audit.contains("\"users\""));
    let seeds = Seeds::with_manifests(db, &[("export", export), ("audit", audit)]).start();
    let owner = seeds.int("SELECT user_id FROM memberships WHERE organization_id = 1 AND role = 'owner'");
    let s = seeds.run("export.organization", json!([1, owner]));
    assert_eq!(s["state"], "failed", "{s:#}");
    assert_eq!(s["error"]["kind"], "denied", "{s:#}");
    let message = s["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("denied") && message.contains("contacts"), "{s:#}");
    assert!(!s["touched"]["denials"].as_array().map_or(true, Vec::is_empty), "{s:#}");
    assert_eq!(s["attempt"], 0, "a denial is not retried");
    // Nothing half-done stays behind: no export row, no object.
    assert_eq!(seeds.int("SELECT count(*) FROM data_exports WHERE storage_key <> 'exports/1/demo-old.zip' AND organization_id = 1"), 0);
    let dir = seeds.env.data.join("storage").join("exports").join("1");
    let objects: Vec<_> = std::fs::read_dir(&dir).map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(objects.iter().all(|n| n.to_string_lossy().starts_with('.')), "{objects:?}");

    // The audit plugin cannot even look a user up.
    let s = seeds.run("audit.log_auth_event", json!([1, "login"]));
    assert_eq!(s["state"], "failed", "{s:#}");
    assert_eq!(s["error"]["kind"], "denied", "{s:#}");
    assert_eq!(seeds.int("SELECT count(*) FROM auth_audit_log WHERE event_type = 'login' AND job_id IS NOT NULL"), 0);
}

#[test]
fn a_table_outside_the_manifest_is_denied_sqlite() {
    a_table_outside_the_manifest_is_denied(Db::Sqlite);
}

#[test]
fn a_table_outside_the_manifest_is_denied_postgres() {
    a_table_outside_the_manifest_is_denied(Db::Postgres);
}

// ============================================================== schedules

#[test]
fn the_manifests_default_schedules_are_created_at_first_start() {
    let seeds = Seeds::new(Db::Sqlite);
    let serve = Serve::start(&seeds.env, "worker,scheduler,api");
    let deadline = Instant::now() + T;
    let wanted = [
        ("cleanup-orphan-images", "cleanup.orphan_images"),
        ("cleanup-orphan-tags", "cleanup.orphan_tags"),
        ("cleanup-mfa", "cleanup.mfa"),
        ("cleanup-expired-exports", "cleanup.expired_exports"),
        ("events-complete-ended", "events.complete_ended"),
        ("events-archive-completed", "events.archive_completed"),
        ("events-send-reminders", "events.send_reminders"),
    ];
    loop {
        let out = seeds.env.celer(&["schedules", "list", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let found: Vec<(String, String)> = list
            .as_array()
            .map(|a| a.iter().map(|s| (s["name"].as_str().unwrap_or("").to_string(), s["task"].as_str().unwrap_or("").to_string())).collect())
            .unwrap_or_default();
        if wanted.iter().all(|(n, t)| found.contains(&(n.to_string(), t.to_string()))) {
            let mfa = list.as_array().unwrap().iter().find(|s| s["name"] == "cleanup-mfa").unwrap().clone();
            assert!(mfa.to_string().contains("0 3 * * *"), "{mfa:#}");
            break;
        }
        assert!(Instant::now() < deadline, "default schedules missing: {list:#}\n{}", serve.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

//! The `database` capability end to end: a real `celer serve`, the
//! `db_probe` guest plugin, and a real database — the embedded default's
//! SQLite file, and the test PostgreSQL (`scripts/services.sh up postgres`).
//! Every test uses tables (and, on PostgreSQL, plugin roles) of its own, so
//! that tests run side by side.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celer_integration::{Env, Server, TEST_CONFIG, plugin_wasm, services};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

use celer_integration::{AdminDb, Db, admin_sql, unique_name as unique};

/// A test's installation: the env, its database, its table-name suffix.
struct Case {
    env: Env,
    db: Db,
    suffix: String,
}

impl Case {
    fn new(db: Db, extra_config: &str) -> Case {
        let suffix = unique("t");
        // Plugin roles of their own, so that tests do not share grants.
        let config = format!("{TEST_CONFIG}\n[database]\nrole_prefix = \"celer_{suffix}_\"\n{extra_config}");
        let env = Env::with_config(&config);
        let env = match db {
            Db::Sqlite => env,
            Db::Postgres => env.var("DATABASE_URL", services::DATABASE_URL),
        };
        std::fs::create_dir_all(&env.data).unwrap();
        Case { env, db, suffix }
    }

    /// `base` made unique to this test.
    fn table(&self, base: &str) -> String {
        format!("{base}_{}", self.suffix)
    }

    /// Runs SQL as the database's owner (the sqlite3 shell, psql).
    fn admin(&self, sql: &str) -> String {
        match self.db {
            Db::Sqlite => admin_sql(AdminDb::Sqlite(&self.env.data.join("celer.db")), sql),
            Db::Postgres => admin_sql(AdminDb::Postgres(services::DATABASE_URL), sql),
        }
    }

    /// Installs db_probe with these grants and memory limit.
    fn install(&self, read: &[&str], write: &[&str], memory_mb: u32) {
        let list = |t: &[&str]| t.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let manifest = format!(
            "[plugin]\nname = \"db_probe\"\ntasks = [\"db_probe.run\", \"db_probe.stream\", \"db_probe.query_loop\"]\n\
             [limits]\nmemory_mb = {memory_mb}\ntimeout_s = 60\n\
             [grants]\ndatabase.read = [{}]\ndatabase.write = [{}]\n",
            list(read),
            list(write)
        );
        self.env.install_files("db_probe", &std::fs::read(plugin_wasm("db_probe")).unwrap(), &manifest);
    }

    /// Runs `db_probe.run` with `calls`; the job's status once it finished.
    fn run(&self, calls: Value) -> Value {
        let kwargs = json!({ "calls": calls }).to_string();
        let id = self.env.enqueue("db_probe.run", &["--kwargs", &kwargs, "--max-retries", "0"]);
        self.env.wait_for(&id, T, |s| s["state"] == "succeeded" || s["state"] == "failed")
    }

    /// Like `run`, asserting success; the result (one entry per call).
    fn ok(&self, calls: Value) -> Vec<Value> {
        let s = self.run(calls);
        assert_eq!(s["state"], "succeeded", "{s:#}");
        s["result"].as_array().cloned().expect("result array")
    }

    fn cleanup(&self, tables: &[&str]) {
        if self.db == Db::Postgres {
            for t in tables {
                self.admin(&format!("DROP TABLE IF EXISTS {t} CASCADE"));
            }
            let role = format!("celer_{}_db_probe", self.suffix);
            self.admin(&format!(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN \
                 EXECUTE 'DROP OWNED BY {role}'; EXECUTE 'DROP ROLE {role}'; END IF; END $$"
            ));
        }
    }
}

fn query(sql: &str, params: Value) -> Value {
    json!({ "op": "query", "sql": sql, "params": params })
}

fn execute(sql: &str, params: Value) -> Value {
    json!({ "op": "execute", "sql": sql, "params": params })
}

fn op(name: &str) -> Value {
    json!({ "op": name })
}

/// The error kind of one call's entry, if it failed.
fn err_kind(entry: &Value) -> &str {
    entry["err"]["kind"].as_str().unwrap_or("")
}

fn rows(entry: &Value) -> &Vec<Value> {
    entry["ok"]["rows"].as_array().unwrap_or_else(|| panic!("no rows in {entry}"))
}

// ------------------------------------------------------------- round trips

fn round_trips(db: Db) {
    let case = Case::new(db, "");
    let items = case.table("items");
    let ddl = match db {
        Db::Sqlite => format!("CREATE TABLE {items} (id INTEGER PRIMARY KEY, n INTEGER, name TEXT, flag BOOLEAN, at DATETIME, data BLOB, score REAL, doc TEXT)"),
        Db::Postgres => format!("CREATE TABLE {items} (id bigserial PRIMARY KEY, n bigint, name text, flag bool, at timestamptz, data bytea, score float8, doc jsonb)"),
    };
    case.admin(&ddl);
    case.install(&[], &[&items], 32);
    let _server = case.env.serve();

    let every = json!([7, "héllo", true, {"timestamp": 1_795_780_800_123_456_i64}, {"bytes": [0, 1, 255]}, 2.5, {"json": "{\"a\":[1,2]}"}]);
    let out = case.ok(json!([
        execute(&format!("INSERT INTO {items} (n, name, flag, at, data, score, doc) VALUES ($1, $2, $3, $4, $5, $6, $7)"), every),
        execute(&format!("INSERT INTO {items} (n, name, flag, at, data, score, doc) VALUES ($1, $2, $3, $4, $5, $6, $7)"), json!([null, null, null, null, null, null, null])),
        query(&format!("SELECT n, name, flag, at, data, score, doc FROM {items} ORDER BY id"), json!([])),
        // rollback really rolls back
        op("begin"),
        execute(&format!("DELETE FROM {items}"), json!([])),
        query(&format!("SELECT count(*) AS c FROM {items}"), json!([])),
        op("rollback"),
        query(&format!("SELECT count(*) AS c FROM {items}"), json!([])),
        // commit commits
        op("begin"),
        execute(&format!("UPDATE {items} SET name = $1 WHERE n = $2"), json!(["changed", 7])),
        op("commit"),
        query(&format!("SELECT name FROM {items} WHERE n = $1"), json!([7])),
        // protocol errors
        op("commit"),
        query(&format!("SELECT * FROM {items} WHERE n = $1"), json!([])),
        query(&format!("SELECT 1; SELECT 2"), json!([])),
    ]));
    assert_eq!(out[0]["ok"]["affected"], 1, "{out:#?}");
    let json_back = match db {
        Db::Sqlite => json!({"text": "{\"a\":[1,2]}"}),
        Db::Postgres => json!({"json": "{\"a\": [1, 2]}"}),
    };
    assert_eq!(
        rows(&out[2])[0],
        json!([{"int": 7}, {"text": "héllo"}, {"bool": true}, {"timestamp": 1_795_780_800_123_456_i64}, {"bytes": [0, 1, 255]}, {"float": 2.5}, json_back]),
        "{db:?}"
    );
    assert_eq!(rows(&out[2])[1], json!([null, null, null, null, null, null, null]));
    assert_eq!(out[2]["ok"]["columns"], json!(["n", "name", "flag", "at", "data", "score", "doc"]));
    assert_eq!(rows(&out[5])[0], json!([{"int": 0}]), "inside the transaction");
    assert_eq!(rows(&out[7])[0], json!([{"int": 2}]), "after rollback");
    assert_eq!(rows(&out[11])[0], json!([{"text": "changed"}]), "after commit");
    assert_eq!(err_kind(&out[12]), "invalid", "commit without begin");
    assert_eq!(err_kind(&out[13]), "invalid", "missing parameter");
    assert_eq!(err_kind(&out[14]), "invalid", "two statements");

    if db == Db::Sqlite {
        // The stored form of a timestamp on SQLite.
        assert_eq!(case.admin(&format!("SELECT at FROM {items} WHERE n = 7")), "2026-11-27T12:00:00.123456Z");
    }

    // What the job touched, per table.
    let s = case.run(json!([query(&format!("SELECT n FROM {items}"), json!([])), execute(&format!("DELETE FROM {items} WHERE n IS NULL"), json!([]))]));
    assert_eq!(s["touched"]["database"], json!([{"table": items, "read": 2, "written": 1}]), "{s:#}");
    case.cleanup(&[&items]);
}

#[test]
fn sqlite_round_trips_values_and_transactions() {
    round_trips(Db::Sqlite);
}

#[test]
fn postgres_round_trips_values_and_transactions() {
    round_trips(Db::Postgres);
}

// ----------------------------------------------------------------- denials

fn denials(db: Db) {
    let case = Case::new(db, "");
    let (public, private, log) = (case.table("public_t"), case.table("private_t"), case.table("log_t"));
    let (serial, text) = match db {
        Db::Sqlite => ("INTEGER PRIMARY KEY", "TEXT"),
        Db::Postgres => ("serial PRIMARY KEY", "text"),
    };
    case.admin(&format!("CREATE TABLE {public} (id {serial}, v {text})"));
    case.admin(&format!("CREATE TABLE {private} (id {serial}, secret {text})"));
    case.admin(&format!("CREATE TABLE {log} (id {serial}, v {text})"));
    case.admin(&format!("INSERT INTO {private} (secret) VALUES ('hunter2')"));
    case.install(&[&public], &[&log], 32);
    let server = case.env.serve();

    // Layer 1, each refusal on its own: the statement never reaches the database.
    let mut refused = vec![
        query(&format!("SELECT * FROM {private}"), json!([])),
        query(&format!("SELECT * FROM {public} WHERE id IN (SELECT id FROM {private})"), json!([])),
        query(&format!("WITH x AS (SELECT * FROM {private}) SELECT * FROM x"), json!([])),
        query("SELECT * FROM celer_jobs", json!([])),
        query(&format!("DELETE FROM {log}"), json!([])),
        execute(&format!("INSERT INTO {public} (v) VALUES ('x')"), json!([])),
        execute(&format!("INSERT INTO {log} (v) SELECT secret FROM {private}"), json!([])),
        execute(&format!("DROP TABLE {log}"), json!([])),
        execute(&format!("CREATE TABLE {log}_2 (x int)"), json!([])),
        execute("BEGIN", json!([])),
    ];
    match db {
        Db::Sqlite => refused.extend([
            execute("ATTACH DATABASE '/tmp/x.db' AS x", json!([])),
            execute("PRAGMA writable_schema = 1", json!([])),
            query("SELECT load_extension('/tmp/x.so')", json!([])),
            query("SELECT * FROM sqlite_master", json!([])),
        ]),
        Db::Postgres => refused.extend([
            query("SELECT pg_read_file('/etc/passwd')", json!([])),
            execute(&format!("COPY {log} FROM '/etc/passwd'"), json!([])),
            execute("SET ROLE celer", json!([])),
            query("SELECT * FROM pg_catalog.pg_authid", json!([])),
        ]),
    }
    let out = case.ok(Value::Array(refused));
    for (i, entry) in out.iter().enumerate() {
        assert_eq!(err_kind(entry), "denied", "call {i}: {entry}");
        assert!(!entry["err"]["message"].as_str().unwrap().contains("database layer"), "layer 1 refused it: {entry}");
    }
    let s = case.run(json!([query(&format!("SELECT * FROM {private}"), json!([]))]));
    assert_eq!(s["touched"]["denials"][0]["capability"], "database", "{s:#}");
    server.wait_log("denied", T);
    assert_eq!(case.admin(&format!("SELECT count(*) FROM {log}")), "0");

    // Layer 2 on its own: a statement the parser allows (it names only
    // granted tables) that the database itself refuses.
    match db {
        Db::Sqlite => {
            // A trigger on a granted table writes a table outside the grants.
            case.admin(&format!("CREATE TRIGGER {log}_audit AFTER INSERT ON {log} BEGIN INSERT INTO {private} (secret) VALUES (new.v); END"));
        }
        Db::Postgres => {
            // The plugin's role loses its privilege behind the manifest's back.
            case.admin(&format!("REVOKE ALL ON {public} FROM celer_{}_db_probe", case.suffix));
            case.admin(&format!("CREATE FUNCTION {log}_f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO {private} (secret) VALUES (NEW.v); RETURN NEW; END $$"));
            case.admin(&format!("CREATE TRIGGER {log}_audit AFTER INSERT ON {log} FOR EACH ROW EXECUTE FUNCTION {log}_f()"));
        }
    }
    let mut calls = vec![execute(&format!("INSERT INTO {log} (v) VALUES ('x')"), json!([]))];
    if db == Db::Postgres {
        calls.push(query(&format!("SELECT * FROM {public}"), json!([])));
    }
    let out = case.ok(Value::Array(calls));
    for entry in &out {
        assert_eq!(err_kind(entry), "denied", "{entry}");
        assert!(entry["err"]["message"].as_str().unwrap().contains("database layer"), "{entry}");
    }
    assert_eq!(case.admin(&format!("SELECT count(*) FROM {private}")), "1", "the trigger's write did not happen");
    assert_eq!(case.admin(&format!("SELECT count(*) FROM {log}")), "0");
    if db == Db::Postgres {
        case.admin(&format!("DROP FUNCTION IF EXISTS {log}_f() CASCADE"));
    }
    case.cleanup(&[&public, &private, &log]);
}

#[test]
fn sqlite_denies_at_each_layer_on_its_own() {
    denials(Db::Sqlite);
}

#[test]
fn postgres_denies_at_each_layer_on_its_own() {
    denials(Db::Postgres);
}

// ------------------------------------------------------ streaming, budgets

fn fill(case: &Case, table: &str, rows: u32) {
    match case.db {
        Db::Sqlite => {
            case.admin(&format!("CREATE TABLE {table} (id INTEGER PRIMARY KEY, payload TEXT)"));
            case.admin(&format!(
                "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {rows}) \
                 INSERT INTO {table} SELECT n, printf('%0200d', n) FROM s"
            ));
        }
        Db::Postgres => {
            case.admin(&format!("CREATE TABLE {table} (id int PRIMARY KEY, payload text)"));
            case.admin(&format!("INSERT INTO {table} SELECT n, lpad(n::text, 200, '0') FROM generate_series(1, {rows}) n"));
        }
    }
}

fn streaming(db: Db) {
    let case = Case::new(db, "");
    let big = case.table("big");
    fill(&case, &big, 50_000);
    // 50,000 rows of ~210 bytes (~10 MiB of values, more as WIT lists)
    // through a plugin limited to 16 MiB of memory.
    case.install(&[&big], &[], 16);
    let _server = case.env.serve();
    let kwargs = json!({ "sql": format!("SELECT id, payload FROM {big} ORDER BY id"), "batch": 2000 }).to_string();
    let id = case.env.enqueue("db_probe.stream", &["--kwargs", &kwargs, "--max-retries", "0"]);
    let s = case.env.wait_for(&id, T, |s| s["state"] == "succeeded" || s["state"] == "failed");
    assert_eq!(s["state"], "succeeded", "{s:#}");
    assert_eq!(s["result"]["rows"], 50_000, "{s:#}");
    assert_eq!(s["result"]["bytes"], 50_000 * 208, "{s:#}");
    assert_eq!(s["result"]["columns"], json!(["id", "payload"]));
    assert!(s["result"]["largest_batch"].as_u64().unwrap() <= 2000);
    assert_eq!(s["touched"]["database"], json!([{"table": big, "read": 50_000, "written": 0}]));
    case.cleanup(&[&big]);
}

#[test]
fn sqlite_streams_50k_rows_through_a_16_mib_plugin() {
    streaming(Db::Sqlite);
}

#[test]
fn postgres_streams_50k_rows_through_a_16_mib_plugin() {
    streaming(Db::Postgres);
}

fn budget(db: Db) {
    let case = Case::new(db, "max_rows_per_query = 5000\nmax_bytes_per_query = 500000\n");
    let t = case.table("budget");
    fill(&case, &t, 6000);
    case.install(&[&t], &[], 32);
    let _server = case.env.serve();
    let out = case.ok(json!([
        query(&format!("SELECT id FROM {t} WHERE id <= 5000"), json!([])),
        query(&format!("SELECT id FROM {t} WHERE id <= 5001"), json!([])),
        query(&format!("SELECT payload FROM {t} WHERE id <= 4000"), json!([])),
    ]));
    assert_eq!(rows(&out[0]).len(), 5000);
    assert_eq!(err_kind(&out[1]), "budget-exceeded", "{}", out[1]);
    assert_eq!(err_kind(&out[2]), "budget-exceeded", "{}", out[2]);
    assert!(out[1]["err"]["message"].as_str().unwrap().contains("5000 rows"));
    assert!(out[2]["err"]["message"].as_str().unwrap().contains("bytes"));
    case.cleanup(&[&t]);
}

#[test]
fn sqlite_query_budgets_hold() {
    budget(Db::Sqlite);
}

#[test]
fn postgres_query_budgets_hold() {
    budget(Db::Postgres);
}

// ------------------------------------------------------------ unavailable

/// A TCP relay to the test PostgreSQL that the test can cut and restore:
/// the database "goes down" for the host only.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let mut guard = conns2.lock().unwrap();
                guard.push(client.try_clone().unwrap());
                guard.push(server.try_clone().unwrap());
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, up, conns }
    }

    /// Cuts every connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// `celer serve`, once it is all up: it opens its schedule store (in the
/// same database) after logging "celer serving", and stops if that fails;
/// the HTTP listener starts after it.
fn serve_fully(case: &Case) -> Server {
    let server = case.env.serve();
    let deadline = std::time::Instant::now() + T;
    while !healthy(case.env.port) {
        assert!(std::time::Instant::now() < deadline, "celer serve never answered /healthz:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Whether `GET /healthz` answers 200.
fn healthy(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
}

/// The job's first attempt meets a database that is down: `unavailable`,
/// the job is retried (not lost, not failed), and succeeds once the
/// database is back.
fn down_then_back(case: &Case, table: &str, go_down: impl FnOnce(), come_back: impl FnOnce()) {
    let kwargs = json!({ "calls": [execute(&format!("INSERT INTO {table} (v) VALUES ('after the outage')"), json!([]))], "propagate": true }).to_string();
    go_down();
    let id = case.env.enqueue("db_probe.run", &["--kwargs", &kwargs, "--max-retries", "20"]);
    let s = case.env.wait_for(&id, T, |s| s["attempt"].as_u64().unwrap_or(0) >= 1 || s["state"] == "retrying" || s["state"] == "failed" || s["state"] == "succeeded");
    assert!(s["state"] == "retrying" || s["attempt"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    assert!(s["error"]["message"].as_str().unwrap_or("").contains("database"), "{s:#}");
    come_back();
    let s = case.env.wait_state(&id, "succeeded", T);
    assert!(s["attempt"].as_u64().unwrap() >= 1, "{s:#}");
}

#[test]
fn sqlite_busy_is_unavailable_and_the_job_retries() {
    // A domain database of its own (the broker's file stays free), which
    // another process holds the write lock of for longer than the busy
    // timeout (10 s).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("domain.db");
    let case = Case::new(Db::Sqlite, &format!("url = \"sqlite://{}\"\n", file.display()));
    let t = case.table("outage");
    let sqlite = |sql: &str| {
        let out = Command::new("sqlite3").arg(&file).arg(sql).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    sqlite(&format!("PRAGMA journal_mode = WAL; CREATE TABLE {t} (id INTEGER PRIMARY KEY, v TEXT)"));
    case.install(&[], &[&t], 32);
    let _server = serve_fully(&case);

    let go_down = || {
        // `BEGIN EXCLUSIVE` in a shell that then waits on its stdin.
        let mut child = Command::new("sqlite3").arg(&file).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, ".timeout 20000\nBEGIN EXCLUSIVE;\nINSERT INTO {t} (v) VALUES ('lock');").unwrap();
        stdin.flush().unwrap();
        // Locked once another writer is turned away (the shell does not wait).
        let deadline = std::time::Instant::now() + T;
        loop {
            let probe = Command::new("sqlite3").arg(&file).arg("BEGIN IMMEDIATE; ROLLBACK;").output().unwrap();
            if !probe.status.success() && String::from_utf8_lossy(&probe.stderr).contains("locked") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the lock was never taken");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    };
    let child = std::cell::RefCell::new(None);
    down_then_back(
        &case,
        &t,
        || *child.borrow_mut() = Some(go_down()),
        || {
            let mut c: std::process::Child = child.borrow_mut().take().unwrap();
            writeln!(c.stdin.as_mut().unwrap(), "ROLLBACK;").unwrap();
            drop(c.stdin.take());
            c.wait().unwrap();
        },
    );
    assert_eq!(sqlite(&format!("SELECT count(*) FROM {t}")), "1");
}

#[test]
fn postgres_down_is_unavailable_and_the_job_retries() {
    let relay = Relay::start(5433);
    let url = format!("postgres://celer:celer@127.0.0.1:{}/celer_test", relay.port);
    let case = Case::new(Db::Postgres, "");
    let case = Case { env: case.env.var("DATABASE_URL", &url), db: Db::Postgres, suffix: case.suffix };
    let t = case.table("outage");
    case.admin(&format!("CREATE TABLE {t} (id serial PRIMARY KEY, v text)"));
    case.install(&[], &[&t], 32);
    let server = serve_fully(&case);
    server.wait_log("PostgreSQL role prepared", T);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| down_then_back(&case, &t, || relay.cut(), || relay.restore())));
    if let Err(e) = r {
        eprintln!("SERVER LOG:\n{}", server.log());
        std::panic::resume_unwind(e);
    }
    assert_eq!(case.admin(&format!("SELECT count(*) FROM {t}")), "1");
    case.cleanup(&[&t]);
}

#[test]
fn postgres_refuses_to_load_a_plugin_granted_a_missing_table() {
    let case = Case::new(Db::Postgres, "");
    let missing = case.table("missing");
    case.install(&[&missing], &[], 32);
    let server = case.env.serve();
    let log = server.wait_log("plugin refused", T);
    assert!(log.contains(&missing) && log.contains("does not exist"), "{log}");
}

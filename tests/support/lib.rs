//! Support for the end-to-end tests: every test runs real `celer`
//! processes (the binary `make test` builds) on real plugin components, in a
//! temporary directory of its own, and reads results the way a user would —
//! through the CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"))
}

/// The `celer` binary under test.
pub fn celer_bin() -> PathBuf {
    let bin = target_dir().join("debug").join("celer");
    assert!(bin.exists(), "{} is missing: run `make test`, which builds it first", bin.display());
    bin
}

/// A plugin component built by `make plugins`.
pub fn plugin_wasm(name: &str) -> PathBuf {
    let wasm = target_dir().join("wasm32-wasip2").join("release").join(format!("{name}.wasm"));
    assert!(wasm.exists(), "{} is missing: run `make plugins`", wasm.display());
    wasm
}

/// A plugin's manifest as shipped in the repository.
pub fn plugin_manifest(name: &str) -> PathBuf {
    for dir in ["plugins", "tests/plugins"] {
        let m = repo_root().join(dir).join(name).join("celer-plugin.toml");
        if m.exists() {
            return m;
        }
    }
    panic!("no celer-plugin.toml for plugin {name}");
}

/// One isolated celer installation: plugins dir, data dir, config.
pub struct Env {
    dir: tempfile::TempDir,
    pub plugins: PathBuf,
    pub data: PathBuf,
    config: PathBuf,
    vars: Vec<(String, String)>,
    /// The host's HTTP port (`CELER_LISTEN`), free when the Env was made.
    pub port: u16,
}

/// The test services `scripts/services.sh up` starts (see scripts/services/ports.sh).
pub mod services {
    /// PostgreSQL for the database and import tests (scripts/services/postgres.sh).
    pub const DATABASE_URL: &str = "postgres://celer:celer@127.0.0.1:5433/celer_test";
    /// Redis for the cache and broker tests.
    pub const REDIS_URL: &str = "redis://127.0.0.1:6390";
    /// The 3-node Redis Cluster for the broker's cluster tests (scripts/services/redis-cluster.sh).
    pub const REDIS_CLUSTER_URL: &str = "redis+cluster://127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";
    /// The SMTP sink for the mail tests (scripts/services/smtp.sh): accepts
    /// everything, writes each message to `<services dir>/smtp/inbox/<n>.eml`.
    pub const SMTP_URL: &str = "smtp://127.0.0.1:2525";
    /// A loopback port nothing listens on: a backend that is down.
    pub const CLOSED_PORT: u16 = 1;
    /// s3s-fs for the storage tests (scripts/services/s3.sh): checks SigV4
    /// signatures and presigned-URL expiry like real S3.
    pub const S3_ENDPOINT: &str = "http://127.0.0.1:8014";
    pub const S3_BUCKET: &str = "celer-test";
    pub const S3_ACCESS_KEY: &str = "testing";
    pub const S3_SECRET_KEY: &str = "testing";
}

/// Test defaults: fast polling, short leases and backoff, so that tests
/// about timing take seconds, not minutes.
pub const TEST_CONFIG: &str = r#"
[worker]
poll_ms = 20
lease_ms = 1500
grace_ms = 5000
concurrency = 8
[retry]
base_ms = 300
max_ms = 2000
[plugins]
debounce_ms = 100
"#;

impl Env {
    pub fn new() -> Env {
        Self::with_config(TEST_CONFIG)
    }

    pub fn with_config(config_text: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let plugins = dir.path().join("plugins");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&plugins).expect("plugins dir");
        let config = dir.path().join("celer.toml");
        std::fs::write(&config, config_text).expect("config");
        let port = free_port();
        Env { dir, plugins, data, config, vars: Vec::new(), port }
    }

    /// An installation with a 30 s lease (its next renewal 10 s away) and
    /// `hostile` allowed 20 s per job: for showing that a cancel reaches a
    /// running job at once rather than at a renewal.
    pub fn with_long_lease() -> Env {
        let config = TEST_CONFIG.replace("lease_ms = 1500", "lease_ms = 30000");
        assert_ne!(config, TEST_CONFIG, "the test config names its lease");
        let env = Env::with_config(&config);
        let shipped = std::fs::read_to_string(plugin_manifest("hostile")).expect("manifest");
        let manifest = shipped.replace("timeout_s = 2\n", "timeout_s = 20\n");
        assert_ne!(manifest, shipped, "hostile's manifest names its timeout");
        env.install_files("hostile", &std::fs::read(plugin_wasm("hostile")).expect("wasm"), &manifest);
        env
    }

    /// Sets an environment variable for every `celer` this Env runs
    /// (e.g. a backend URL).
    pub fn var(mut self, key: &str, value: &str) -> Env {
        self.vars.push((key.to_string(), value.to_string()));
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Installs a plugin the recommended way: write a dot-file, then rename.
    pub fn install(&self, name: &str) {
        let manifest = std::fs::read_to_string(plugin_manifest(name)).expect("manifest");
        self.install_files(name, &std::fs::read(plugin_wasm(name)).expect("wasm"), &manifest);
    }

    /// Installs arbitrary bytes and manifest text under `name`.
    pub fn install_files(&self, name: &str, wasm: &[u8], manifest: &str) {
        self.put(&format!("{name}.toml"), manifest.as_bytes());
        self.put(&format!("{name}.wasm"), wasm);
    }

    /// Write-then-rename one file into the plugins directory.
    pub fn put(&self, file: &str, bytes: &[u8]) {
        let tmp = self.plugins.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).expect("write plugin file");
        std::fs::rename(&tmp, self.plugins.join(file)).expect("rename plugin file");
    }

    /// A `celer` command bound to this installation.
    pub fn command(&self) -> Command {
        let mut c = Command::new(celer_bin());
        c.current_dir(self.dir.path())
            .env("CELER_CONFIG", &self.config)
            .env("CELER_DATA_DIR", &self.data)
            .env("CELER_PLUGINS_DIR", &self.plugins)
            // Compiled code is shared between tests: compiling a component
            // once per test would dominate the suite's time.
            .env("CELER_CACHE_DIR", target_dir().join("celer-test-cache"))
            .env_remove("DATABASE_URL")
            .env_remove("CELER_BROKER_URL")
            .env_remove("CELER_CONCURRENCY")
            .env_remove("CELER_QUEUES")
            .env_remove("CELER_REDIS_URL")
            .env_remove("REDIS_URL")
            .env_remove("CELER_STORAGE")
            .env_remove("CELER_SMTP_URL");
        // Each test gets its own listener port, so tests can run side by side;
        // and its own Redis key prefix, for when a test puts the broker on Redis.
        c.env("CELER_LISTEN", format!("127.0.0.1:{}", self.port));
        let unique = self.dir.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        c.env("CELER_BROKER_PREFIX", format!("celer-test-{unique}:"));
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Runs `celer ARGS` to completion.
    pub fn celer(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run celer")
    }

    /// `celer enqueue TASK EXTRA…`, returning the job id.
    pub fn enqueue(&self, task: &str, extra: &[&str]) -> String {
        let mut all = vec!["enqueue", task];
        all.extend_from_slice(extra);
        let out = self.celer(&all);
        assert!(out.status.success(), "enqueue {task} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `celer status ID` as JSON.
    pub fn status(&self, id: &str) -> Value {
        let out = self.celer(&["status", id]);
        assert!(out.status.success(), "status {id} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// Polls the job until `done(status)` holds or `timeout` passes.
    pub fn wait_for(&self, id: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(id);
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "job {id} did not get there within {timeout:?}; last status: {s:#}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Polls until the job reaches `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        self.wait_for(id, timeout, |s| s["state"] == state)
    }

    /// Starts `celer serve`; its log goes to a file the test can read.
    pub fn serve(&self) -> Server {
        self.serve_named("serve")
    }

    /// Like [`Env::serve`], with a log file name of its own (several hosts).
    pub fn serve_named(&self, name: &str) -> Server {
        let log_path = self.dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        // Each host gets a listener port of its own (several hosts per Env).
        let port = if name == "serve" { self.port } else { free_port() };
        let child = self
            .command()
            .env("CELER_LISTEN", format!("127.0.0.1:{port}"))
            .arg("serve")
            .env("CELER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn celer serve");
        let server = Server { child: Some(child), log_path };
        server.wait_log("celer serving", Duration::from_secs(60));
        server
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

/// A running `celer serve`; killed when dropped.
pub struct Server {
    child: Option<Child>,
    log_path: PathBuf,
}

impl Server {
    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "server log never said {needle:?} within {timeout:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGTERM: the graceful stop.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) on a child process we spawned and have not reaped.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
    }

    /// SIGKILL: the host vanishes mid-work.
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("server still owned");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit within {timeout:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Parses the single JSON document a command printed.
pub fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}): {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// Which database a test runs against (the plugins' domain database).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A name no other test uses, lower case (also valid as a PostgreSQL
/// database, role or table name).
pub fn unique_name(base: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{base}_{}_{nanos:08x}", std::process::id())
}

/// Where [`admin_sql`] runs its SQL.
pub enum AdminDb<'a> {
    /// The `sqlite3` shell on this file.
    Sqlite(&'a Path),
    /// `psql` on this URL.
    Postgres(&'a str),
}

/// Runs SQL as the database's owner, as an operator would (the `sqlite3`
/// shell, `psql`; `scripts/services.sh up` installs both); returns the
/// output, rows as lines of `|`-separated columns. The shell waits for the
/// write lock: the host may be writing the same file (its embedded queue).
pub fn admin_sql(db: AdminDb<'_>, sql: &str) -> String {
    let out = match db {
        AdminDb::Sqlite(file) => Command::new("sqlite3").args(["-cmd", ".timeout 10000"]).arg(file).arg(sql).output(),
        AdminDb::Postgres(url) => Command::new("psql").args([url, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql]).output(),
    }
    .expect("sqlite3 / psql (scripts/services.sh up installs them)");
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

//! `celer.toml` and its environment overrides. With no file and no
//! environment at all, every value falls back to the embedded default: one
//! machine, nothing else installed, everything under `./celer-data`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::broker::backoff::Backoff;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value in environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded default keeps its database, compiled-code cache,
    /// storage and outbox. `CELER_DATA_DIR`.
    pub data_dir: PathBuf,
    pub plugins: PluginsConfig,
    pub broker: BrokerConfig,
    pub worker: WorkerConfig,
    pub retry: Backoff,
    pub sandbox: SandboxConfig,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    pub storage: StorageConfig,
    pub mail: MailConfig,
    pub http: HttpConfig,
    pub scheduler: crate::scheduler::SchedulerConfig,
    pub celery: CeleryConfig,
}

/// `[database]`: the domain database plugins reach through `database`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://…` or `sqlite://path`; defaults to the embedded SQLite
    /// file (`<data_dir>/celer.db`). `DATABASE_URL`.
    pub url: Option<String>,
    /// Rows one `query` may return before it is `budget-exceeded`.
    pub max_rows_per_query: u64,
    /// Bytes (of values) one `query` may return before it is `budget-exceeded`.
    pub max_bytes_per_query: u64,
    /// PostgreSQL: each plugin's role is `<role_prefix><plugin name>`.
    pub role_prefix: String,
    /// Connections of the plugins' pool (separate from the broker's).
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            max_rows_per_query: 1_000_000,
            max_bytes_per_query: 256 << 20,
            role_prefix: "celer_plugin_".into(),
            max_connections: 10,
        }
    }
}

/// `[cache]`: the cache plugins reach through `cache`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `redis://…`; defaults to an in-process cache. `CELER_REDIS_URL` / `REDIS_URL`.
    pub url: Option<String>,
    /// django-redis `KEY_PREFIX`: keys are stored as `<prefix>:<version>:<key>`.
    pub key_prefix: String,
    /// django-redis `VERSION`.
    pub version: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { url: None, key_prefix: String::new(), version: 1 }
    }
}

/// `[storage]`: the object store plugins reach through `storage`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `s3://bucket/prefix` (with the standard `AWS_*` variables and
    /// `AWS_ENDPOINT_URL`) or `file://dir`; defaults to
    /// `file://<data_dir>/storage`. `CELER_STORAGE`.
    pub url: Option<String>,
    /// Signs `file://` download links; generated and kept in the data dir
    /// when absent. `CELER_LINK_SECRET`.
    pub link_secret: Option<String>,
    /// The host's public base URL for `file://` download links; defaults to
    /// `http://<http.listen>`. `CELER_PUBLIC_URL`.
    pub public_url: Option<String>,
}

/// `[mail]`: outgoing mail plugins send through `mail`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    /// `smtp://user:pass@host:port` (STARTTLS when offered), `smtps://…`,
    /// or `file://dir` for an outbox of `.eml` files; defaults to
    /// `file://<data_dir>/outbox`. `CELER_SMTP_URL`.
    pub url: Option<String>,
    /// Sender when a message names none.
    pub from: String,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig { url: None, from: "celer@localhost".into() }
    }
}

/// `[http]`: the host's HTTP listener (health, metrics, API, download links).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `CELER_LISTEN`.
    pub listen: String,
    /// When set, every route but `/healthz` and signed download links needs
    /// `Authorization: Bearer <token>`. `CELER_API_TOKEN`.
    pub token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: "127.0.0.1:8642".into(), token: None }
    }
}

/// `[plugins]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Watched for `<name>.wasm` + `<name>.toml`. `CELER_PLUGINS_DIR`.
    pub dir: PathBuf,
    /// Compiled code, keyed by the digest of each `.wasm`; defaults to
    /// `<data_dir>/cache`. `CELER_CACHE_DIR`.
    pub cache_dir: Option<PathBuf>,
    /// Quiet time after the last file event before a plugin is (re)loaded,
    /// so that a file still being written is not loaded half-way.
    pub debounce_ms: u64,
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `sqlite://path` for the embedded broker (the default:
    /// `<data_dir>/celer.db`; a `DATABASE_URL` of the form `sqlite://…`
    /// sets it too), or `redis://host:port/db` / `redis+cluster://h:p,h:p`
    /// for the Redis broker (see docs/redis.md). `CELER_BROKER_URL`.
    pub url: Option<String>,
    /// Redis broker: prefix of every key (no braces). `CELER_BROKER_PREFIX`.
    pub prefix: String,
    /// Redis broker: how long a finished job's status stays readable.
    pub result_ttl_s: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig { url: None, prefix: "celer:".into(), result_ttl_s: 86_400 }
    }
}

impl BrokerConfig {
    /// Whether the URL names the Redis broker.
    pub fn is_redis(&self) -> bool {
        self.url.as_deref().is_some_and(|u| u.starts_with("redis") || u.starts_with("unix:"))
    }
}

/// `[celery]`: consume Celery protocol v2 messages from kombu's Redis lists
/// and write Celery results (see docs/celery.md).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CeleryConfig {
    /// `CELER_CELERY_ENABLED=1`.
    pub enabled: bool,
    /// The Redis the Django app's Celery uses as broker and result backend
    /// (its `broker_url`, with the db); defaults to `[broker] url` when that
    /// is Redis. `CELER_CELERY_URL`.
    pub url: Option<String>,
    /// Celery queues (kombu lists) to consume; each becomes the celer queue
    /// of the same name, which this host's worker also consumes.
    pub queues: Vec<String>,
    /// kombu's `global_keyprefix` (transport option), if the app sets one.
    pub key_prefix: String,
    /// Celery's `result_expires`: TTL of `celery-task-meta-<id>`.
    pub result_expires_s: u64,
    /// Celery's `task_track_started`: a task reads `STARTED` while it runs
    /// (a worker setting, so it is set here; off by default, as in Celery).
    /// `CELER_CELERY_TRACK_STARTED`.
    pub track_started: bool,
    /// Celery's `worker_send_task_events` (`celery worker -E`): send
    /// `task-received`, `task-started`, … events for `celery events` and
    /// Flower. Off by default, as in Celery; the `enable_events` control
    /// command (which Flower sends) turns them on at run time.
    /// `CELER_CELERY_TASK_EVENTS`.
    pub task_events: bool,
    /// The name this host answers to as a Celery worker (`celery inspect
    /// ping -d <name>`, Flower), like `celery worker -n`: `%h` is the
    /// machine's hostname, `%n` its part before the first dot. Default
    /// `celer@<host id>`, unique per process. `CELER_CELERY_WORKER_NAME`.
    pub worker_name: Option<String>,
    /// The app's `task_routes` as task name → queue (a key with `*` is a
    /// shell-style pattern, as in Celery): where follow-ups (links, chains,
    /// errbacks) whose signature names no queue are sent; otherwise to the
    /// queue their parent came from.
    pub routes: std::collections::BTreeMap<String, String>,
}

impl Default for CeleryConfig {
    fn default() -> Self {
        CeleryConfig {
            enabled: false,
            url: None,
            queues: vec!["celery".into()],
            key_prefix: String::new(),
            result_expires_s: 86_400,
            track_started: false,
            task_events: false,
            worker_name: None,
            routes: std::collections::BTreeMap::new(),
        }
    }
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Jobs running at once on this host, over all plugins. `CELER_CONCURRENCY`.
    pub concurrency: usize,
    /// Queues this host consumes. `CELER_QUEUES` (comma separated).
    pub queues: Vec<String>,
    /// A running job's lease; renewed every third of it. A job whose host
    /// died runs again once this has passed.
    pub lease_ms: u64,
    /// On SIGTERM, how long running jobs may take to finish before their
    /// leases are handed back.
    pub grace_ms: u64,
    /// How often an idle worker looks for new jobs.
    pub poll_ms: u64,
    /// Names this host in leases and job status; defaults to `hostname-pid`.
    pub host_id: Option<String>,
    /// Worker loops on a Redis broker, each on a thread of its own with its
    /// own event loop and Redis connection, sharing the concurrency
    /// (thread-per-core: a short job no longer hops between threads, which
    /// costs more than the job itself). The number of cores suits hosts of
    /// many short jobs; a CPU-bound job then holds its shard's other jobs'
    /// I/O for up to an epoch tick (10 ms) at a time, so the default is one
    /// loop over all cores. The embedded broker always runs one.
    /// `CELER_WORKER_SHARDS`.
    pub shards: Option<usize>,
}

/// `[sandbox]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The largest `limits.memory_mb` any plugin may ask for; the pooling
    /// allocator reserves this much address space per instance slot.
    pub max_memory_mb: u64,
    /// `limits.memory_mb` of a manifest that does not say.
    pub default_memory_mb: u64,
    /// `limits.timeout_s` of a manifest that does not say.
    pub default_timeout_s: u64,
    /// Guest stdout + stderr + log lines kept per job; the rest is dropped
    /// (and the log says so).
    pub log_cap_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("celer-data"),
            plugins: PluginsConfig::default(),
            broker: BrokerConfig::default(),
            worker: WorkerConfig::default(),
            retry: Backoff::default(),
            sandbox: SandboxConfig::default(),
            database: DatabaseConfig::default(),
            cache: CacheConfig::default(),
            storage: StorageConfig::default(),
            mail: MailConfig::default(),
            http: HttpConfig::default(),
            scheduler: crate::scheduler::SchedulerConfig::default(),
            celery: CeleryConfig::default(),
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig { dir: PathBuf::from("plugins"), cache_dir: None, debounce_ms: 150 }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 16,
            queues: vec![crate::job::DEFAULT_QUEUE.to_string()],
            lease_ms: 30_000,
            grace_ms: 30_000,
            poll_ms: 100,
            host_id: None,
            shards: None,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            max_memory_mb: 512,
            default_memory_mb: 64,
            default_timeout_s: 300,
            log_cap_bytes: 64 * 1024,
        }
    }
}

impl WorkerConfig {
    /// How many worker loops to run: as configured (one when unset); a
    /// broker that cannot share the work (`sharded_broker` false: the
    /// embedded one) runs one. Never more than the concurrency.
    pub fn shard_count(&self, sharded_broker: bool) -> usize {
        let wanted = match sharded_broker {
            true => self.shards.unwrap_or(1),
            false => 1,
        };
        wanted.clamp(1, self.concurrency.max(1))
    }
}

impl Config {
    /// Reads `path` (which must exist), or `./celer.toml` when present, then
    /// applies environment overrides and checks the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let implicit = Path::new("celer.toml");
        let file = match path {
            Some(p) => Some(p),
            None if implicit.exists() => Some(implicit),
            None => None,
        };
        let mut config = match file {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        config.check()?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.message().to_string() })
    }

    /// Applies the documented environment variables; `get` is the
    /// environment (a closure so tests need not mutate the process's).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("CELER_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("CELER_PLUGINS_DIR") {
            self.plugins.dir = PathBuf::from(v);
        }
        if let Some(v) = get("CELER_CACHE_DIR") {
            self.plugins.cache_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("DATABASE_URL") {
            if v.starts_with("sqlite:") {
                self.broker.url = Some(v.clone());
            }
            self.database.url = Some(v);
        }
        if let Some(v) = get("CELER_REDIS_URL").or_else(|| get("REDIS_URL")) {
            // celer's Redis: the cache, and the broker unless one is named
            // (`[broker] url`, `CELER_BROKER_URL`, or a sqlite DATABASE_URL).
            if self.broker.url.is_none() && get("CELER_BROKER_URL").is_none() {
                self.broker.url = Some(v.clone());
            }
            self.cache.url = Some(v);
        }
        if let Some(v) = get("CELER_STORAGE") {
            self.storage.url = Some(v);
        }
        if let Some(v) = get("CELER_LINK_SECRET") {
            self.storage.link_secret = Some(v);
        }
        if let Some(v) = get("CELER_PUBLIC_URL") {
            self.storage.public_url = Some(v);
        }
        if let Some(v) = get("CELER_SMTP_URL") {
            self.mail.url = Some(v);
        }
        if let Some(v) = get("CELER_LISTEN") {
            self.http.listen = v;
        }
        if let Some(v) = get("CELER_API_TOKEN") {
            self.http.token = Some(v);
        }
        if let Some(v) = get("CELER_BROKER_URL") {
            self.broker.url = Some(v);
        }
        if let Some(v) = get("CELER_BROKER_PREFIX") {
            self.broker.prefix = v;
        }
        if let Some(v) = get("CELER_CELERY_URL") {
            self.celery.url = Some(v);
        }
        if let Some(v) = get("CELER_CELERY_ENABLED") {
            self.celery.enabled = truthy(&v);
        }
        if let Some(v) = get("CELER_CELERY_TRACK_STARTED") {
            self.celery.track_started = truthy(&v);
        }
        if let Some(v) = get("CELER_CELERY_WORKER_NAME") {
            self.celery.worker_name = Some(v);
        }
        if let Some(v) = get("CELER_CELERY_TASK_EVENTS") {
            self.celery.task_events = truthy(&v);
        }
        if let Some(v) = get("CELER_CONCURRENCY") {
            self.worker.concurrency = v.parse().map_err(|_| ConfigError::Env {
                var: "CELER_CONCURRENCY",
                message: format!("expected a positive integer, got {v:?}"),
            })?;
        }
        if let Some(v) = get("CELER_WORKER_SHARDS") {
            self.worker.shards = Some(v.parse().map_err(|_| ConfigError::Env {
                var: "CELER_WORKER_SHARDS",
                message: format!("expected a positive integer, got {v:?}"),
            })?);
        }
        if let Some(v) = get("CELER_QUEUES") {
            self.worker.queues =
                v.split(',').map(str::trim).filter(|q| !q.is_empty()).map(String::from).collect();
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.celery.enabled && self.celery_url().is_none() {
            return Err(ConfigError::Invalid(
                "[celery] enabled needs a Redis: set [celery] url or a redis:// [broker] url".into(),
            ));
        }
        if self.worker.concurrency == 0 {
            return Err(ConfigError::Invalid("worker.concurrency must be at least 1".into()));
        }
        if self.worker.shards == Some(0) {
            return Err(ConfigError::Invalid("worker.shards must be at least 1 (or unset: one)".into()));
        }
        if self.worker.queues.is_empty() {
            return Err(ConfigError::Invalid("worker.queues is empty".into()));
        }
        if self.worker.lease_ms < 300 {
            return Err(ConfigError::Invalid("worker.lease_ms must be at least 300".into()));
        }
        if self.sandbox.default_memory_mb > self.sandbox.max_memory_mb {
            return Err(ConfigError::Invalid(
                "sandbox.default_memory_mb is larger than sandbox.max_memory_mb".into(),
            ));
        }
        // Redis refuses an expiry past what its clock holds; a century is
        // "kept", and every result write would otherwise fail.
        if !(1..=100 * 365 * 86_400).contains(&self.celery.result_expires_s) {
            return Err(ConfigError::Invalid("celery.result_expires_s must be from 1 s to a century".into()));
        }
        Ok(())
    }

    /// The compiled-code cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.plugins.cache_dir.clone().unwrap_or_else(|| self.data_dir.join("cache"))
    }

    /// The embedded broker's database file.
    pub fn broker_path(&self) -> PathBuf {
        match &self.broker.url {
            Some(url) if !self.broker.is_redis() => PathBuf::from(
                url.trim_start_matches("sqlite://").trim_start_matches("sqlite:"),
            ),
            _ => self.data_dir.join("celer.db"),
        }
    }

    /// The Redis the Celery consumer reads: `[celery] url`, else the Redis broker's.
    pub fn celery_url(&self) -> Option<String> {
        self.celery.url.clone().or_else(|| self.broker.url.clone().filter(|_| self.broker.is_redis()))
    }

    /// The domain database URL: `[database] url`, or the embedded SQLite file.
    pub fn database_url(&self) -> String {
        self.database.url.clone().unwrap_or_else(|| format!("sqlite://{}", self.broker_path().display()))
    }

    /// This host's name in leases and job status.
    pub fn host_id(&self) -> String {
        self.worker.host_id.clone().unwrap_or_else(|| {
            let host = machine_hostname().unwrap_or_else(|| "host".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// An on/off environment value: `1`, `true`, `yes` or `on` is on.
fn truthy(v: &str) -> bool {
    matches!(v, "1" | "true" | "yes" | "on")
}

/// The machine's hostname, when it can be read.
pub fn machine_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards: as configured, capped by the concurrency; one when unset;
    /// always one on a broker that cannot share the work.
    #[test]
    fn the_shard_count_follows_the_broker_and_the_concurrency() {
        let w = |shards, concurrency| WorkerConfig { shards, concurrency, ..WorkerConfig::default() };
        assert_eq!(w(Some(3), 16).shard_count(true), 3);
        assert_eq!(w(Some(3), 2).shard_count(true), 2);
        assert_eq!(w(Some(3), 16).shard_count(false), 1);
        assert_eq!(w(None, 64).shard_count(true), 1);
        assert_eq!(w(Some(2), 64).shard_count(false), 1);
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c: Config = toml::from_str("").expect("empty config parses");
        assert_eq!(c, Config::default());
        assert_eq!(c.broker_path(), PathBuf::from("celer-data/celer.db"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<Config>("[worker]\nconcurency = 3\n").expect_err("typo refused");
        assert!(err.to_string().contains("concurency"), "{err}");
    }

    #[test]
    fn environment_overrides_file() {
        let mut c: Config = toml::from_str("[worker]\nconcurrency = 3\n").expect("parses");
        c.apply_env(|k| match k {
            "CELER_CONCURRENCY" => Some("7".into()),
            "CELER_QUEUES" => Some("a, b,".into()),
            "DATABASE_URL" => Some("sqlite://x/y.db".into()),
            _ => None,
        })
        .expect("valid env");
        assert_eq!(c.worker.concurrency, 7);
        assert_eq!(c.worker.queues, vec!["a", "b"]);
        assert_eq!(c.broker_path(), PathBuf::from("x/y.db"));
    }

    #[test]
    fn postgres_database_url_does_not_move_the_embedded_queue() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "DATABASE_URL").then(|| "postgres://db/app".into())).expect("ok");
        assert_eq!(c.broker_path(), PathBuf::from("celer-data/celer.db"));
    }

    #[test]
    fn a_redis_url_selects_the_redis_broker_unless_one_is_named() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "CELER_REDIS_URL").then(|| "redis://r:6379/1".into())).expect("ok");
        assert!(c.broker.is_redis());
        assert_eq!((c.broker.url.as_deref(), c.cache.url.as_deref()), (Some("redis://r:6379/1"), Some("redis://r:6379/1")));
        assert_eq!(c.broker_path(), PathBuf::from("celer-data/celer.db"), "the SQLite file stays for domain data");
        assert_eq!(c.celery_url().as_deref(), Some("redis://r:6379/1"));
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "CELER_REDIS_URL" => Some("redis://r".into()),
            "CELER_BROKER_URL" => Some("sqlite://q.db".into()),
            "CELER_BROKER_PREFIX" => Some("app1:".into()),
            _ => None,
        })
        .expect("ok");
        assert!(!c.broker.is_redis());
        assert_eq!(c.broker.prefix, "app1:");
        let text = "[broker]\nurl = \"redis+cluster://a:1,b:2\"\n[celery]\nenabled = true\nqueues = [\"celery\", \"mail\"]\n";
        let c: Config = toml::from_str(text).expect("parses");
        assert!(c.broker.is_redis() && c.celery.enabled);
        assert_eq!(c.celery.queues, vec!["celery", "mail"]);
        assert!(c.check().is_ok());
        let c: Config = toml::from_str("[celery]\nenabled = true\n").expect("parses");
        assert!(c.check().is_err(), "Celery needs a Redis");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let mut c = Config::default();
        let err = c.apply_env(|k| (k == "CELER_CONCURRENCY").then(|| "many".into())).expect_err("bad");
        assert!(err.to_string().contains("CELER_CONCURRENCY"), "{err}");
    }
}

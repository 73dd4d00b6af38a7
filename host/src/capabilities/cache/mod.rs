//! `celer:plugin/cache`: the shared cache, limited to keys that start with a
//! prefix in `grants.cache`.
//!
//! Two backends behind one [`Backend`]: Redis when `[cache] url` (or
//! `CELER_REDIS_URL` / `REDIS_URL`) names one, else the in-process cache of
//! the embedded default ([`inproc`]).
//!
//! **Keys** are the plugin's logical keys (`is_member_7_3`); grants are
//! prefixes of them. The backend stores `<key_prefix>:<version>:<key>`, the
//! form of Django's default `KEY_FUNCTION` that django-redis uses, with
//! `key_prefix` and `version` from `[cache]` (default `""` and `1`, so
//! `:1:is_member_7_3`): a plugin reads and deletes the keys a Django app
//! wrote.
//!
//! **Values** are bytes, stored as given: celer never writes pickle.
//! `incr` leaves a Redis integer, which django-redis reads back as an `int`
//! (it stores ints unpickled for the same reason). For any other value
//! shared with Django, the Django side sets django-redis's JSON serializer
//! and plugins write JSON. Deleting works whatever the codec. See
//! `docs/capabilities.md`.

pub mod inproc;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{BackendError, GrantError, JobInfo, Record, prefix_granted};
use crate::config::Config;
use crate::runtime::bindings::HostError;
use crate::runtime::bindings::celer::plugin::cache::Host;
use crate::runtime::manifest::Grants;

/// Largest value one `set` may store (the same cap as `storage.get`).
pub const MAX_VALUE_BYTES: usize = 16 << 20;

/// An empty prefix would grant every key: refused, so that "everything" is
/// never granted by accident.
pub fn check_grants(grants: &Grants) -> Result<(), GrantError> {
    match grants.cache.iter().any(String::is_empty) {
        true => Err(GrantError { grant: "cache", reason: "an empty key prefix would grant every key".into() }),
        false => Ok(()),
    }
}

/// Why a cache call failed (grants aside).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The backend cannot be reached; the job should retry.
    #[error("{0}")]
    Unavailable(String),
    /// `incr` on a value that is not a 64-bit integer, or that would overflow.
    #[error("the value under {0:?} is not an integer, or adding to it would overflow")]
    NotAnInteger(String),
    /// The Redis key holds a list, hash, set… rather than a string.
    #[error("the Redis key under {0:?} does not hold a string value")]
    WrongType(String),
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("a cache value is at most {MAX_VALUE_BYTES} bytes, got {0}")]
    TooLarge(usize),
}

impl CacheError {
    /// The `host-error` case this error becomes.
    pub fn kind(&self) -> &'static str {
        match self {
            CacheError::Unavailable(_) => "unavailable",
            CacheError::NotAnInteger(_) | CacheError::WrongType(_) => "invalid",
            CacheError::TooLarge(_) => "budget-exceeded",
        }
    }
}

impl From<CacheError> for HostError {
    fn from(e: CacheError) -> HostError {
        let message = format!("cache: {e}");
        match e {
            CacheError::Unavailable(_) => HostError::Unavailable(message),
            CacheError::NotAnInteger(_) | CacheError::WrongType(_) => HostError::Invalid(message),
            CacheError::TooLarge(_) => HostError::BudgetExceeded(message),
        }
    }
}

enum Store {
    InProcess(inproc::InProcess),
    Redis(redis::RedisCache),
}

/// The process-wide cache backend, shared by every job.
pub struct Backend {
    store: Store,
    key_prefix: String,
    version: u32,
}

impl Backend {
    /// Connects to what the configuration names: Redis for a `redis://` or
    /// `unix://` URL (`rediss://`, Redis over TLS, is not built in), else the
    /// in-process cache. A Redis that
    /// does not answer yet is not an error here (calls return `unavailable`
    /// until it does); a URL that cannot be used is.
    pub async fn connect(config: &Config) -> Result<Backend, BackendError> {
        let (key_prefix, version) = (config.cache.key_prefix.clone(), config.cache.version);
        let Some(url) = config.cache.url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
            tracing::info!(backend = "in-process", "cache ready");
            return Ok(Backend::in_process(key_prefix, version));
        };
        let cache = redis::RedisCache::new(url).map_err(|reason| BackendError { capability: "cache", reason })?;
        match tokio::time::timeout(Duration::from_secs(3), cache.ping()).await {
            Ok(Ok(())) => tracing::info!(backend = "redis", url = %cache.display(), "cache ready"),
            Ok(Err(e)) => tracing::warn!(url = %cache.display(), error = %e, "cache: Redis does not answer yet; cache calls return unavailable until it does"),
            Err(_) => tracing::warn!(url = %cache.display(), "cache: Redis did not answer PING within 3 s; cache calls return unavailable until it does"),
        }
        Ok(Backend { store: Store::Redis(cache), key_prefix, version })
    }

    /// The in-process cache, with django-redis key prefix and version.
    pub fn in_process(key_prefix: String, version: u32) -> Backend {
        Backend { store: Store::InProcess(inproc::InProcess::default()), key_prefix, version }
    }

    /// `"redis"` or `"in-process"`.
    pub fn kind(&self) -> &'static str {
        match self.store {
            Store::InProcess(_) => "in-process",
            Store::Redis(_) => "redis",
        }
    }

    /// The key as stored: django-redis's `<key_prefix>:<version>:<key>`.
    pub fn stored_key(&self, key: &str) -> String {
        format!("{}:{}:{}", self.key_prefix, self.version, key)
    }

    /// Prepares the backend for a plugin at load (nothing to do for a cache).
    pub async fn prepare(&self, _plugin: &str, _grants: &Grants) -> Result<(), GrantError> {
        Ok(())
    }

    /// Whether the backend answers, for `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        match &self.store {
            Store::InProcess(_) => Ok(()),
            Store::Redis(r) => r.ping().await.map_err(|e| e.to_string()),
        }
    }

    /// The value under the logical `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let key = self.stored_key(key);
        match &self.store {
            Store::InProcess(c) => Ok(c.get(&key)),
            Store::Redis(r) => r.get(&key).await,
        }
    }

    /// Stores `value`, expiring after `ttl`; a zero `ttl` deletes the key.
    pub async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> Result<(), CacheError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(CacheError::TooLarge(value.len()));
        }
        let key = self.stored_key(key);
        match &self.store {
            Store::InProcess(c) => {
                c.set(&key, value, ttl);
                Ok(())
            }
            Store::Redis(r) => r.set(&key, &value, ttl).await,
        }
    }

    /// Deletes `key`; true when it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let key = self.stored_key(key);
        match &self.store {
            Store::InProcess(c) => Ok(c.delete(&key)),
            Store::Redis(r) => r.delete(&key).await,
        }
    }

    /// Adds `delta` to the integer under `key` (0 when absent), atomically.
    pub async fn incr(&self, key: &str, delta: i64) -> Result<i64, CacheError> {
        let key = self.stored_key(key);
        match &self.store {
            Store::InProcess(c) => c.incr(&key, delta),
            Store::Redis(r) => r.incr(&key, delta).await,
        }
    }
}

/// Per-job state of the cache interface.
pub struct CacheCap {
    info: Arc<JobInfo>,
    grants: Arc<Grants>,
    backend: Arc<Backend>,
    pub(super) record: Record,
}

impl CacheCap {
    pub fn new(info: Arc<JobInfo>, grants: Arc<Grants>, backend: Arc<Backend>) -> Self {
        CacheCap { info, grants, backend, record: Record::default() }
    }

    /// `denied` (recorded and logged) unless a granted prefix covers `key`.
    fn check(&mut self, op: &str, key: &str) -> Result<(), HostError> {
        match prefix_granted(&self.grants.cache, key) {
            true => Ok(()),
            false => Err(self.record.deny(&self.info, "cache", format!("{op} {key:?}"))),
        }
    }

    /// Records a call that reached the backend, and converts its error.
    fn done<T>(&mut self, op: &str, key: String, result: Result<T, CacheError>, outcome: impl FnOnce(&T) -> serde_json::Value) -> Result<T, HostError> {
        let mut entry = json!({"op": op, "key": key});
        match &result {
            Ok(value) => {
                if let serde_json::Value::Object(extra) = outcome(value) {
                    entry.as_object_mut().expect("an object").extend(extra);
                }
            }
            Err(e) => {
                if let CacheError::Unavailable(reason) = e {
                    tracing::warn!(
                        job_id = %self.info.job_id, task = %self.info.task, plugin = %self.info.plugin,
                        attempt = self.info.attempt, op, error = %reason, "cache unavailable"
                    );
                }
                entry["error"] = json!(e.kind());
            }
        }
        self.record.used(entry);
        result.map_err(HostError::from)
    }
}

impl Host for CacheCap {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        self.check("get", &key)?;
        let result = self.backend.get(&key).await;
        self.done("get", key, result, |v| json!({"hit": v.is_some()}))
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), HostError> {
        self.check("set", &key)?;
        let result = self.backend.set(&key, value, ttl_ms.map(Duration::from_millis)).await;
        self.done("set", key, result, |_| json!({"ttl_ms": ttl_ms}))
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        self.check("delete", &key)?;
        let result = self.backend.delete(&key).await;
        self.done("delete", key, result, |existed| json!({"existed": existed}))
    }

    async fn incr(&mut self, key: String, delta: i64) -> Result<i64, HostError> {
        self.check("incr", &key)?;
        let result = self.backend.incr(&key, delta).await;
        self.done("incr", key, result, |value| json!({"delta": delta, "value": value}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_the_django_redis_way() {
        let b = Backend::in_process(String::new(), 1);
        assert_eq!(b.stored_key("is_member_7_3"), ":1:is_member_7_3");
        let b = Backend::in_process("app".into(), 3);
        assert_eq!(b.stored_key("is_member_7_3"), "app:3:is_member_7_3");
    }

    #[tokio::test]
    async fn in_process_backend_round_trips_under_the_stored_key() {
        let b = Backend::in_process("p".into(), 2);
        b.set("k", b"v".to_vec(), None).await.unwrap();
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(b.incr("n", 2).await.unwrap(), 2);
        assert!(b.delete("k").await.unwrap());
        assert!(matches!(b.set("big", vec![0; MAX_VALUE_BYTES + 1], None).await, Err(CacheError::TooLarge(_))));
        assert!(matches!(HostError::from(CacheError::NotAnInteger("k".into())), HostError::Invalid(_)));
        assert!(matches!(HostError::from(CacheError::Unavailable("x".into())), HostError::Unavailable(_)));
    }
}

//! The Redis cache: one [`ConnectionManager`] (a multiplexed connection
//! that reconnects by itself) shared by every job of the process.
//!
//! The manager is created lazily, so that a host whose Redis is down still
//! starts: its cache calls return `unavailable` (and the jobs retry with
//! backoff) until Redis answers again. Connection attempts and replies are
//! bounded in time, so a call never hangs a job until its deadline.

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, ErrorKind, RedisError, ServerErrorKind};

use super::CacheError;

/// Longest time-to-live sent to Redis (100 years): Redis refuses an expiry
/// past the end of its clock, so longer TTLs are clamped to this.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// The Redis cache backend.
pub struct RedisCache {
    manager: ConnectionManager,
    /// The URL without its credentials, for logs and errors.
    display: String,
}

impl RedisCache {
    /// Parses `url` and prepares the connection; nothing is sent yet.
    pub fn new(url: &str) -> Result<RedisCache, String> {
        let display = redact(url);
        let client = ::redis::Client::open(url).map_err(|e| format!("invalid cache URL {display}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cache {display}: {e}"))?;
        Ok(RedisCache { manager, display })
    }

    /// The URL without credentials.
    pub fn display(&self) -> &str {
        &self.display
    }

    fn conn(&self) -> ConnectionManager {
        self.manager.clone()
    }

    fn unavailable(&self, e: &RedisError) -> CacheError {
        CacheError::Unavailable(format!("redis at {}: {e}", self.display))
    }

    /// Errors common to every command: a key holding a list or hash, or a
    /// server that cannot be reached.
    fn classify(&self, key: &str, e: RedisError) -> CacheError {
        if e.code() == Some("WRONGTYPE") {
            return CacheError::WrongType(key.to_owned());
        }
        self.unavailable(&e)
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        let pong: String = ::redis::cmd("PING").query_async(&mut self.conn()).await.map_err(|e| self.unavailable(&e))?;
        match pong.as_str() {
            "PONG" => Ok(()),
            other => Err(CacheError::Unavailable(format!("redis at {} answered PING with {other:?}", self.display))),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.conn().get(key).await.map_err(|e| self.classify(key, e))
    }

    /// `SET key value [PX ms]`; a zero TTL deletes the key, as Django does.
    pub async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), CacheError> {
        let mut conn = self.conn();
        let result = match ttl {
            Some(t) if t.is_zero() => conn.del::<_, i64>(key).await.map(drop),
            Some(t) => {
                let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).clamp(1, MAX_TTL_MS);
                conn.pset_ex::<_, _, ()>(key, value, ms).await
            }
            None => conn.set::<_, _, ()>(key, value).await,
        };
        result.map_err(|e| self.classify(key, e))
    }

    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let removed: i64 = self.conn().del(key).await.map_err(|e| self.classify(key, e))?;
        Ok(removed > 0)
    }

    /// `INCRBY`: atomic on the server, keeps the key's TTL.
    pub async fn incr(&self, key: &str, delta: i64) -> Result<i64, CacheError> {
        self.conn().incr(key, delta).await.map_err(|e| {
            let not_integer = e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
                && e.detail().is_some_and(|d| d.contains("not an integer") || d.contains("overflow"));
            match not_integer {
                true => CacheError::NotAnInteger(key.to_owned()),
                false => self.classify(key, e),
            }
        })
    }
}

/// `url` without user name and password, safe for logs: `redis://host:port/db`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_the_display() {
        assert_eq!(redact("redis://user:s3cret@cache.internal:6379/2"), "redis://cache.internal:6379/2");
        assert_eq!(redact("redis://:s3cret@localhost:6390"), "redis://localhost:6390");
        assert!(!redact("not a url s3cret").contains("s3cret"));
    }

    #[test]
    fn a_bad_url_is_refused_without_its_secret() {
        let err = RedisCache::new("http://:s3cret@localhost").err().expect("refused");
        assert!(!err.contains("s3cret"), "{err}");
    }
}

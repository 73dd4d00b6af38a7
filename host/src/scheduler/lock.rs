//! The scheduler's leader lock. With a Redis broker the lock lives in Redis
//! (`SET NX PX`, renewed by its owner with a compare-and-extend script), so
//! hosts that share only Redis elect one leader; otherwise it is a row in
//! the schedule store's database. Either way the per-tick idempotency key,
//! not the lock, is what makes a tick fire exactly once.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::store::ScheduleStore;

/// Where the lock lives.
#[derive(Clone)]
pub enum LeaderLock {
    Database(ScheduleStore),
    Redis { conn: ConnectionManager, key: String },
}

/// Takes the lock when free, or extends it when `ARGV[1]` already holds it.
const ACQUIRE_OR_RENEW: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// Deletes the lock only if `ARGV[1]` holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

impl LeaderLock {
    /// A Redis lock under `<prefix>scheduler:lock` on the single Redis at `url`.
    pub async fn redis(url: &str, prefix: &str) -> Result<LeaderLock, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let conn = ConnectionManager::new(client).await.map_err(|e| e.to_string())?;
        Ok(LeaderLock::Redis { conn, key: format!("{prefix}scheduler:lock") })
    }

    /// Takes or renews the lock for `owner`; true while it leads.
    pub async fn try_lead(&self, owner: &str, ttl: Duration) -> Result<bool, String> {
        match self {
            LeaderLock::Database(store) => store.try_lead(owner, ttl).await.map_err(|e| e.to_string()),
            LeaderLock::Redis { conn, key } => {
                let mut conn = conn.clone();
                let got: i64 = redis::Script::new(ACQUIRE_OR_RENEW)
                    .key(key)
                    .arg(owner)
                    .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(got == 1)
            }
        }
    }

    /// Gives the lock up so another host takes over at once.
    pub async fn resign(&self, owner: &str) -> Result<(), String> {
        match self {
            LeaderLock::Database(store) => store.resign(owner).await.map_err(|e| e.to_string()),
            LeaderLock::Redis { conn, key } => {
                let mut conn = conn.clone();
                let _: i64 = redis::Script::new(RELEASE).key(key).arg(owner).invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
                Ok(())
            }
        }
    }
}

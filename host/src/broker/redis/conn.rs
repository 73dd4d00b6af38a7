//! One connection type for a single Redis server and for Redis Cluster.
//!
//! A single server goes through [`ConnectionManager`]: one multiplexed
//! connection (concurrent requests share the socket, pipelined), which
//! reconnects by itself after the server restarts. A cluster goes through
//! redis-rs' cluster connection, which routes each command by its key's slot
//! (every script of the broker touches one queue, so one slot), wrapped in
//! [`HealingCluster`]: redis-rs repairs a node's connection by itself, but
//! after every node of the cluster restarted at once a connection was seen
//! to fail every command from then on, so a long run of failures replaces
//! it.
//!
//! URLs: `redis://[user:pass@]host:port[/db]` (or `rediss://`) for one
//! server; `redis+cluster://host:port,host:port,…` for a cluster (any
//! reachable node is enough to discover the others).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value};

/// A connection to one server or to a cluster; cheap to clone (clones share
/// the underlying connection).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(HealingCluster),
}

/// Where to connect, parsed from a URL.
#[derive(Debug, Clone)]
pub enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl Target {
    /// Reads a `redis://`, `rediss://` or `redis+cluster://` URL once, so a typo fails at
    /// start-up with the URL named.
    pub fn parse(url: &str) -> Result<Target, String> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = rest
                .trim_end_matches('/')
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| format!("redis://{n}"))
                .collect();
            if nodes.is_empty() {
                return Err(format!("no cluster nodes in {url}"));
            }
            return Ok(Target::Cluster(nodes));
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") || url.starts_with("unix://") {
            return Ok(Target::Single(url.to_string()));
        }
        Err(format!("not a Redis URL (redis://host:port/db or redis+cluster://host:port,…): {url}"))
    }

    /// Callers that need one server (kombu's lists, pub/sub) refuse a cluster with it.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    /// Connects. `response_timeout: None` waits as long as a command takes
    /// (for blocking reads).
    pub async fn connect(&self, response_timeout: Option<Duration>) -> Result<Conn, RedisError> {
        match self {
            Target::Single(url) => {
                let client = ::redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(response_timeout)
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Ok(Conn::Single(ConnectionManager::new_with_config(client, config).await?))
            }
            Target::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(Duration::from_secs(2))
                    .retries(3)
                    .response_timeout(response_timeout.unwrap_or(Duration::from_secs(3600)))
                    .build()?;
                Ok(Conn::Cluster(HealingCluster::connect(client).await?))
            }
        }
    }
}

/// A cluster connection that replaces itself after a run of connection
/// failures: at least [`HealingCluster::FAILURES_BEFORE_REBUILD`] commands
/// in a row failing for want of a node, over at least
/// [`HealingCluster::FAILING_FOR`], and at most once per
/// [`HealingCluster::REBUILD_EVERY`]. The new connection is made off the
/// failing caller's path. While the cluster is down the rebuild fails too
/// and the old connection is kept; the first command that succeeds, on
/// either, ends the run.
#[derive(Clone)]
pub struct HealingCluster {
    shared: Arc<Healing>,
}

struct Healing {
    client: ClusterClient,
    current: Mutex<ClusterConnection>,
    failures_in_a_row: AtomicU32,
    /// When the run of failures began, in ms after `since` (0: no run).
    run_began_ms: AtomicU64,
    since: Instant,
    /// When the last rebuild started; held while one runs, so clones that
    /// fail meanwhile do not start their own.
    last_rebuild: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

impl HealingCluster {
    /// Enough failures, for long enough, that a node failing over or
    /// restarting alone (which redis-rs repairs by itself within a few
    /// retries) does not cost the whole connection.
    const FAILURES_BEFORE_REBUILD: u32 = 8;
    const FAILING_FOR: Duration = Duration::from_secs(3);
    const REBUILD_EVERY: Duration = Duration::from_secs(2);

    async fn connect(client: ClusterClient) -> RedisResult<HealingCluster> {
        let conn = client.get_async_connection().await?;
        Ok(HealingCluster {
            shared: Arc::new(Healing {
                client,
                current: Mutex::new(conn),
                failures_in_a_row: AtomicU32::new(0),
                run_began_ms: AtomicU64::new(0),
                since: Instant::now(),
                last_rebuild: Arc::new(tokio::sync::Mutex::new(None)),
            }),
        })
    }

    fn current(&self) -> ClusterConnection {
        // A poisoned lock only means a panic elsewhere while cloning; the
        // connection inside is still whole.
        self.shared.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "no run".
        u64::try_from(self.shared.since.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Counts the answer toward a run of failures, and has the connection
    /// replaced once the run is long enough.
    fn observe<T>(&self, result: &RedisResult<T>) {
        let shared = &self.shared;
        match result {
            Err(e) if lost_the_cluster(e) => {
                let n = shared.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                let now = self.now_ms();
                let began = match shared.run_began_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => now,
                    Err(began) => began,
                };
                let failing_for = Duration::from_millis(now.saturating_sub(began));
                if n >= Self::FAILURES_BEFORE_REBUILD && failing_for >= Self::FAILING_FOR {
                    self.rebuild(e.to_string(), n);
                }
            }
            // A success, or an answer from a server (a script's error, a
            // wrong type): the connection works.
            _ => {
                if shared.failures_in_a_row.swap(0, Ordering::Relaxed) > 0 {
                    shared.run_began_ms.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// Connects afresh in a task of its own, unless a rebuild runs or ran
    /// less than [`HealingCluster::REBUILD_EVERY`] ago.
    fn rebuild(&self, cause: String, failures: u32) {
        let Ok(mut last) = self.shared.last_rebuild.clone().try_lock_owned() else { return };
        if last.is_some_and(|t| t.elapsed() < Self::REBUILD_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let this = self.clone();
        tokio::spawn(async move {
            let _running = last;
            match this.shared.client.get_async_connection().await {
                Ok(conn) => {
                    *this.shared.current.lock().unwrap_or_else(|p| p.into_inner()) = conn;
                    this.shared.failures_in_a_row.store(0, Ordering::Relaxed);
                    this.shared.run_began_ms.store(0, Ordering::Relaxed);
                    tracing::warn!(failures, error = %cause, "Redis Cluster connection replaced after failures in a row");
                }
                Err(e) => tracing::debug!(error = %e, "Redis Cluster still unreachable; keeping the old connection"),
            }
        });
    }
}

/// An error that says no node could be reached or the connection broke, as
/// opposed to an answer from a server.
fn lost_the_cluster(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(e.kind(), ErrorKind::ClusterConnectionNotFound | ErrorKind::Server(ServerErrorKind::ClusterDown))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => Box::pin(async move {
                let result = c.current().req_packed_command(cmd).await;
                c.observe(&result);
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => Box::pin(async move {
                let result = c.current().req_packed_commands(pipeline, offset, count).await;
                c.observe(&result);
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.current().get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_that_say_no_node_answered_count_toward_a_rebuild() {
        let io = RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        let no_node = RedisError::from((ErrorKind::ClusterConnectionNotFound, "No connections found"));
        let down = RedisError::from((ErrorKind::Server(ServerErrorKind::ClusterDown), "CLUSTERDOWN"));
        assert!(lost_the_cluster(&io) && lost_the_cluster(&no_node) && lost_the_cluster(&down));
        let script = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR user_script:1"));
        let wrong_type = RedisError::from((ErrorKind::UnexpectedReturnType, "not an integer"));
        assert!(!lost_the_cluster(&script) && !lost_the_cluster(&wrong_type));
    }
}

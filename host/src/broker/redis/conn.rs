//! One connection type for a single Redis server and for Redis Cluster.
//!
//! A single server goes through [`ConnectionManager`]: one multiplexed
//! connection (concurrent requests share the socket, pipelined), which
//! reconnects by itself after the server restarts. A cluster goes through
//! redis-rs' cluster connection, which routes each command by its key's slot
//! (every script of the broker touches one queue, so one slot).
//!
//! URLs: `redis://[user:pass@]host:port[/db]` (or `rediss://`) for one
//! server; `redis+cluster://host:port,host:port,…` for a cluster (any
//! reachable node is enough to discover the others).

use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to one server or to a cluster; cheap to clone (clones share
/// the underlying connection).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
    pub async fn connect(&self, response_timeout: Option<Duration>) -> Result<Conn, ::redis::RedisError> {
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
                let mut builder = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(Duration::from_secs(2))
                    .retries(3);
                if let Some(t) = response_timeout {
                    builder = builder.response_timeout(t);
                } else {
                    builder = builder.response_timeout(Duration::from_secs(3600));
                }
                let client = builder.build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

//! Thread-per-core: `[worker] shards` copies of the worker loop, each on a
//! thread of its own that runs a single-threaded event loop with its own
//! broker connection, and a share of the concurrency.
//!
//! Why: with one event loop over all cores, a short job hops between
//! threads several times (fetched on one, run on another, its outcome
//! written by the connection's task on a third), and those wake-ups cost
//! more CPU than the job itself (measured on the Redis broker: 70 µs of
//! host CPU per noop job with one loop on two threads, about 50 with two
//! shards). A shard keeps a job on one thread from fetch to outcome.
//!
//! Each shard is a consumer of its own (`<host>#<i>`), so leases, the
//! heartbeat and `celer inspect` list it as such; the HTTP API, the
//! scheduler and the Celery consumer stay on the main event loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use super::{BROKER_RETRY, Worker};
use crate::broker::{Broker, BrokerError};

/// Makes a shard's broker. Called on the shard's own thread, so that the
/// connection's I/O runs there too.
pub type ShardBroker =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn Broker>, BrokerError>> + Send>> + Send + Sync>;

impl Worker {
    /// Runs `shards` workers until `shutdown` turns true and every one of
    /// them has drained. With one, this worker runs in place on its own
    /// broker; with more, each shard connects its own.
    pub async fn run_sharded(self, shards: usize, connect: ShardBroker, shutdown: watch::Receiver<bool>) {
        if shards <= 1 {
            return self.run(shutdown).await;
        }
        let mut running = Vec::with_capacity(shards);
        for i in 0..shards {
            let mut shard = self.clone();
            shard.config.concurrency = share(self.config.concurrency, shards, i);
            shard.host = format!("{}#{i}", self.host);
            let (done, ended) = tokio::sync::oneshot::channel::<()>();
            let (connect, stop) = (connect.clone(), shutdown.clone());
            let spawned = std::thread::Builder::new().name(format!("celer-worker-{i}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime.block_on(shard.run_shard(connect, stop)),
                    Err(e) => tracing::error!(shard = i, error = %e, "cannot start a worker shard's event loop"),
                }
                let _ = done.send(());
            });
            match spawned {
                Ok(_) => running.push((i, ended)),
                Err(e) => tracing::error!(shard = i, error = %e, "cannot start a worker shard's thread; the others run"),
            }
        }
        for (i, ended) in running {
            if ended.await.is_err() && !*shutdown.borrow() {
                tracing::error!(shard = i, "a worker shard stopped unexpectedly; the others run on");
            }
        }
    }

    /// Connects (retrying while the broker is unreachable), then runs.
    async fn run_shard(mut self, connect: ShardBroker, mut shutdown: watch::Receiver<bool>) {
        loop {
            match connect().await {
                Ok(broker) => break self.broker = broker,
                Err(e) => {
                    tracing::warn!(host = %self.host, error = %e, "a worker shard cannot reach the broker; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(BROKER_RETRY) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
        self.run(shutdown).await
    }
}

/// Shard `i`'s part of `total` slots: an even split, the first shards
/// taking one more when it does not divide.
fn share(total: usize, shards: usize, i: usize) -> usize {
    total / shards + usize::from(i < total % shards)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn the_shards_share_the_concurrency_exactly() {
        for (total, shards) in [(16, 2), (7, 2), (5, 3), (2, 2)] {
            let parts: Vec<usize> = (0..shards).map(|i| share(total, shards, i)).collect();
            assert_eq!(parts.iter().sum::<usize>(), total, "{parts:?}");
            assert!(parts.iter().all(|p| *p >= 1) && parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1, "{parts:?}");
        }
    }
}

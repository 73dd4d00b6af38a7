//! Thread-per-core: `[worker] shards` copies of the worker loop, each on a
//! thread of its own that runs a single-threaded event loop with its own
//! broker connection, and a share of the concurrency.
//!
//! Why: with one event loop over all cores, a short job hops between
//! threads several times (fetched on one, run on another, its outcome
//! written by the connection's task on a third), and those wake-ups cost
//! more CPU than the job itself (measured on the Redis broker: 70 µs of
//! host CPU per noop job with one loop on two threads, about 50 with two
//! shards). A shard fetches, runs and records a job on one thread (a
//! Celery job's result still goes through the host's Celery connection).
//!
//! The cost, and why it is opt-in: a CPU-bound guest holds its shard's
//! thread between its yields (one per epoch tick, 10 ms), so the other
//! jobs of that shard wait up to that long at each I/O step (measured: a
//! cancel stopped a busy job 0.12–0.18 s after it was asked on a shard,
//! 0.03 s on the shared event loop). Hosts of many short jobs gain; hosts
//! that mix long computations with I/O-bound jobs keep one loop.
//!
//! Each shard is a consumer of its own (`<host>#<i>`), so leases, the
//! heartbeat and `celer inspect` list it as such; the HTTP API, the
//! scheduler and the Celery consumer stay on the main event loop. The
//! clients shared by the whole host (database pools, storage, mail, the
//! Celery result connection) are used from every shard: a connection runs
//! its I/O on the event loop of the thread that opened it, so each shard's
//! loop keeps running until the process exits.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use super::{BROKER_RETRY, Worker};
use crate::broker::{Broker, BrokerError};

/// How many task polls a shard's event loop makes between looks at its
/// sockets and timers. A guest computing yields once per epoch tick
/// (10 ms), one poll each: with tokio's default (61) a running CPU-bound
/// job kept everything else on its shard (stop requests, other jobs' I/O,
/// lease renewals) waiting about 0.6 s; with 4, about 40 ms, and short
/// jobs pay one look per four polls.
const EVENT_INTERVAL: u32 = 4;

/// Makes a shard's broker. Called on the shard's own thread, so that the
/// connection's I/O runs there too.
pub type ShardBroker =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn Broker>, BrokerError>> + Send>> + Send + Sync>;

impl Worker {
    /// Runs `shards` workers until `shutdown` turns true and every one of
    /// them has drained. With one, this worker runs in place on its own
    /// broker; with more, each shard connects its own. A shard that ends
    /// before that (it panicked) stops the host, so that the service
    /// manager starts it again at full capacity rather than leaving it
    /// running on part of it.
    pub async fn run_sharded(self, shards: usize, connect: ShardBroker, shutdown: watch::Sender<bool>) {
        if shards <= 1 {
            return self.run(shutdown.subscribe()).await;
        }
        // Each shard's end, as it comes (a panic in any shard is seen at once).
        let mut running = tokio::task::JoinSet::new();
        for i in 0..shards {
            let mut shard = self.clone();
            shard.config.concurrency = super::intake::share(self.config.concurrency, shards, i);
            shard.intake = self.intake.for_shard(shards, i);
            shard.host = format!("{}#{i}", self.host);
            let (done, ended) = tokio::sync::oneshot::channel::<Result<(), String>>();
            let (connect, stop) = (connect.clone(), shutdown.subscribe());
            let spawned = std::thread::Builder::new().name(format!("celer-worker-{i}")).spawn(move || {
                let built = tokio::runtime::Builder::new_current_thread().event_interval(EVENT_INTERVAL).enable_all().build();
                let runtime = match built {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = done.send(Err(format!("cannot start its event loop: {e}")));
                        return;
                    }
                };
                let ran = std::panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(shard.run_shard(connect, stop))));
                let _ = done.send(ran.map_err(|panic| panic_message(panic.as_ref())));
                // Connections that other parts of the host opened from this
                // thread (a database pool's, a Redis client's after a
                // reconnect) are served by this event loop: it keeps
                // running until the process exits.
                runtime.block_on(std::future::pending::<()>());
            });
            match spawned {
                Ok(_) => {
                    running.spawn(async move { (i, ended.await) });
                }
                Err(e) => {
                    tracing::error!(shard = i, error = %e, "cannot start a worker shard's thread; stopping the host");
                    shutdown.send_replace(true);
                }
            }
        }
        while let Some(ended) = running.join_next().await {
            let Ok((i, ended)) = ended else { continue };
            let why = match ended {
                Ok(Ok(())) if *shutdown.borrow() => continue,
                Ok(Ok(())) => "it stopped".to_string(),
                Ok(Err(why)) => why,
                Err(_) => "its thread ended".to_string(),
            };
            tracing::error!(shard = i, error = %why, "a worker shard ended before shutdown; stopping the host so that it starts again whole");
            shutdown.send_replace(true);
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

/// What a panic said.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    let text = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    format!("panicked: {}", text.unwrap_or("(no message)"))
}

#[cfg(test)]
mod tests {
    use super::super::intake::share;

    #[test]
    fn the_shards_share_the_concurrency_exactly() {
        for (total, shards) in [(16, 2), (7, 2), (5, 3), (2, 2)] {
            let parts: Vec<usize> = (0..shards).map(|i| share(total, shards, i)).collect();
            assert_eq!(parts.iter().sum::<usize>(), total, "{parts:?}");
            assert!(parts.iter().all(|p| *p >= 1) && parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1, "{parts:?}");
        }
    }
}

//! `make bench`: the per-job sandbox cost (fresh store + instantiate + call
//! + drop, noop plugin, pooling allocator) and end-to-end noop jobs/s on the
//! embedded queue. Prints one JSON object per figure.
//!
//! Usage: sandbox <plugins-dir-with-hello> [iterations]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer::broker::Broker;
use celer::broker::embedded::EmbeddedBroker;
use celer::capabilities::Capabilities;
use celer::config::{SandboxConfig, WorkerConfig};
use celer::job::NewJob;
use celer::runtime::Runtime;
use celer::runtime::registry::Registry;
use celer::runtime::sandbox::{JobControl, RunOutcome};
use celer::worker::{Intake, Worker};

mod common;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let plugins: PathBuf = args.next().map(PathBuf::from).ok_or_else(|| anyhow::anyhow!("usage: sandbox <plugins-dir> [iterations]"))?;
    let iterations: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20_000);
    let work = tempfile::tempdir()?;

    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::open(&work.path().join("celer.db")).await?);
    let sandbox = SandboxConfig::default();
    let concurrency = 8;
    let config = celer::config::Config { data_dir: work.path().to_path_buf(), ..Default::default() };
    let capabilities = Capabilities::connect(&config, broker.clone()).await?;
    let runtime = Arc::new(Runtime::new(&sandbox, capabilities, work.path().join("cache"), concurrency + 4)?);
    let registry = Arc::new(Registry::new(runtime.clone(), plugins.clone()));
    registry.scan().await;
    let plugin = registry.lookup("hello.noop").ok_or_else(|| anyhow::anyhow!("hello.noop not loaded from {}", plugins.display()))?;

    // 1. Sandbox cost, one job at a time.
    let job = common::job("hello.noop", serde_json::json!({}), None);
    for _ in 0..500 {
        runtime.run_job(&plugin, &job, Arc::default()).await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let report = runtime.run_job(&plugin, &job, Arc::new(JobControl::default())).await;
        samples.push(t.elapsed());
        anyhow::ensure!(matches!(report.outcome, RunOutcome::Succeeded(_)), "noop failed: {:?}", report.outcome);
    }
    samples.sort();
    println!(
        "{}",
        serde_json::json!({
            "bench": "sandbox_per_job_us",
            "what": "fresh Store + WASI ctx + instantiate (InstancePre, pooling) + run(noop) + drop, incl. capability state",
            "iterations": iterations,
            "median_us": percentile(&samples, 0.5),
            "p99_us": percentile(&samples, 0.99),
            "goal_median_us": 15.0,
        })
    );

    // 2. End-to-end on the embedded queue: enqueue N noop jobs, run a worker until all succeeded.
    let n = (iterations / 4).max(1000);
    let t = Instant::now();
    for _ in 0..n {
        broker.enqueue(NewJob::new("hello.noop", serde_json::json!([]), serde_json::json!({}))).await?;
    }
    let enqueue_s = t.elapsed().as_secs_f64();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = Worker {
        broker: broker.clone(),
        registry: registry.clone(),
        runtime: runtime.clone(),
        config: WorkerConfig { concurrency: concurrency as usize, poll_ms: 1, ..WorkerConfig::default() },
        backoff: Default::default(),
        host: "bench".into(),
        intake: Intake::new(concurrency as usize),
    };
    let t = Instant::now();
    let handle = tokio::spawn(worker.run(stop_rx));
    loop {
        let stats = broker.queue_stats().await?;
        let pending: u64 = stats.iter().map(|q| q.queued + q.delayed + q.running).sum();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run_s = t.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    handle.await?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "embedded_queue_noop",
            "jobs": n,
            "enqueue_jobs_per_s": n as f64 / enqueue_s,
            "run_jobs_per_s": n as f64 / run_s,
            "note": "SQLite embedded broker, one fsync-free WAL write per state change; worker concurrency 8",
        })
    );
    Ok(())
}

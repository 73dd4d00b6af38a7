//! `make bench`: the cost of one cache `get` made from a guest, beside the
//! same call made directly from Rust on the same kind of backend, for the
//! in-process cache and (when reachable) Redis. Prints one JSON object per
//! backend.
//!
//! Guest side: the `cache_probe.get_loop` task makes `n` gets of one key
//! inside ONE job; its time minus the time of the same job with `n = 0`
//! (instantiation, argument decoding, result) divided by `n` is the cost of
//! one call through the component boundary, the grant check, the audit
//! record and the backend. Host side: `cache::Backend::get` in a loop.
//!
//! Usage: cache_call <plugins-dir-with-cache_probe> [n] [redis-url]
//! (`redis-url` defaults to `CELER_BENCH_REDIS_URL`, then the test Redis.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer::broker::Broker;
use celer::broker::embedded::EmbeddedBroker;
use celer::capabilities::Capabilities;
use celer::capabilities::cache;
use celer::config::{CacheConfig, Config, SandboxConfig};
use celer::job::Job;
use celer::runtime::Runtime;
use celer::runtime::registry::Registry;
use celer::runtime::sandbox::{JobControl, RunOutcome};
use serde_json::{Value, json};

const KEY: &str = "probe:bench";
const ROUNDS: usize = 7;

mod common;
use common::median;

fn job(task: &str, kwargs: Value) -> Job {
    common::job(task, kwargs, None)
}

/// Median over ROUNDS of the per-get cost, in µs: (guest, direct). The two
/// are measured in turns, round by round, so that a busy machine weighs on
/// both alike.
async fn measure(plugins: &PathBuf, config: &Config, backend: &cache::Backend, n: u64) -> anyhow::Result<(f64, f64)> {
    let broker: Arc<dyn Broker> = Arc::new(EmbeddedBroker::open(&config.data_dir.join("celer.db")).await?);
    let capabilities = Capabilities::connect(config, broker).await?;
    let runtime = Arc::new(Runtime::new(&SandboxConfig::default(), capabilities, config.data_dir.join("cache"), 4)?);
    let registry = Registry::new(runtime.clone(), plugins.clone());
    registry.scan().await;
    let plugin = registry
        .lookup("cache_probe.get_loop")
        .ok_or_else(|| anyhow::anyhow!("cache_probe not loaded from {}", plugins.display()))?;

    let run = |task: &'static str, kwargs: Value| {
        let (runtime, plugin) = (runtime.clone(), plugin.clone());
        async move {
            let t = Instant::now();
            let report = runtime.run_job(&plugin, &job(task, kwargs), Arc::new(JobControl::default())).await;
            let elapsed = t.elapsed();
            match report.outcome {
                RunOutcome::Succeeded(v) => Ok((elapsed, v)),
                other => Err(anyhow::anyhow!("{task} did not succeed: {other:?}")),
            }
        }
    };
    // The key exists on both sides, so that every get is a hit.
    run("cache_probe.run", json!({"calls": [{"op": "set", "key": KEY, "value": "x".repeat(32)}], "propagate": true})).await?;
    backend.set(KEY, "x".repeat(32).into_bytes(), None).await?;
    let (_, warm) = run("cache_probe.get_loop", json!({"key": KEY, "n": n})).await?;
    anyhow::ensure!(warm["hits"] == json!(n), "expected {n} hits, got {warm}");

    let (mut guest, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (empty, _) = run("cache_probe.get_loop", json!({"key": KEY, "n": 0})).await?;
        let (full, _) = run("cache_probe.get_loop", json!({"key": KEY, "n": n})).await?;
        guest.push(full.saturating_sub(empty).as_secs_f64() * 1e6 / n as f64);

        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(backend.get(KEY).await?);
        }
        direct.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    Ok((median(guest), median(direct)))
}

async fn bench(plugins: &PathBuf, name: &str, url: Option<String>, n: u64) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let config = Config {
        data_dir: work.path().to_path_buf(),
        cache: CacheConfig { url, ..CacheConfig::default() },
        ..Config::default()
    };
    let backend = cache::Backend::connect(&config).await?;
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), backend.ping()).await.unwrap_or(Err("timeout".into())) {
        println!("{}", json!({"bench": "cache_get_guest_vs_direct", "backend": name, "skipped": e}));
        return Ok(());
    }
    let (guest, direct) = measure(plugins, &config, &backend, n).await?;
    println!(
        "{}",
        json!({
            "bench": "cache_get_guest_vs_direct",
            "backend": name,
            "gets_per_job": n,
            "rounds": ROUNDS,
            "guest_us_per_get": (guest * 1000.0).round() / 1000.0,
            "direct_us_per_get": (direct * 1000.0).round() / 1000.0,
            "ratio": (guest / direct * 100.0).round() / 100.0,
            "what": "guest: (job with n gets - job with 0 gets) / n, through the component boundary, grant check and audit record; direct: cache::Backend::get from Rust",
        })
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let plugins: PathBuf = args
        .next()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("usage: cache_call <plugins-dir> [n] [redis-url]"))?;
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20_000);
    let redis = args
        .next()
        .or_else(|| std::env::var("CELER_BENCH_REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6390".into());
    bench(&plugins, "in-process", None, n).await?;
    bench(&plugins, "redis", Some(redis), n / 4).await?;
    Ok(())
}

//! `make bench` (scripts/bench-redis.sh): celer on the Redis broker, measured
//! the way `shared/bench/celery/run.py` measures Celery, so the two print
//! side by side as ratios:
//!
//! 1. enqueue — N jobs, one `enqueue` after the other (as `send_task` in a loop);
//! 2. backlog — a worker starts and drains them; window: first job start to
//!    last job end, as stamped by the broker;
//! 3. live — the worker is idle; N jobs are sent one after the other; window:
//!    first send to last end (the producer shares the cores);
//! 4. latency — M jobs at `rate` jobs/s; enqueue→start and enqueue→end.
//!
//! Completion is recorded the way it always is: the `complete` script writes
//! the job's outcome (one Redis call per job; Celery's side RPUSHes one
//! record per job). Start and end times come from the job hashes (µs).
//!
//! Usage: redis_throughput <plugins-dir-with-bench> <redis-url> [--task noop|json_transform]
//!        [--n N] [--m M] [--rate R] [--concurrency C]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer::broker::Broker;
use celer::broker::redis::{RedisBroker, RedisOptions};
use celer::capabilities::Capabilities;
use celer::config::{SandboxConfig, WorkerConfig};
use celer::job::NewJob;
use celer::runtime::Runtime;
use celer::runtime::registry::Registry;
use celer::worker::{Intake, ShardBroker, Worker};
use serde_json::{Value, json};

/// The allocator `celer serve` runs with (see `src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PREFIX: &str = "celer-bench:";
const QUEUE: &str = "bench";

struct Args {
    plugins: PathBuf,
    url: String,
    task: String,
    n: usize,
    m: usize,
    rate: f64,
    concurrency: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    let plugins = it.next().map(PathBuf::from).ok_or_else(|| anyhow::anyhow!("usage: redis_throughput <plugins-dir> <redis-url> [options]"))?;
    let url = it.next().ok_or_else(|| anyhow::anyhow!("missing redis url"))?;
    let mut a = Args { plugins, url, task: "noop".into(), n: 20_000, m: 500, rate: 50.0, concurrency: 32 };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--task" => a.task = v,
            "--n" => a.n = v.parse()?,
            "--m" => a.m = v.parse()?,
            "--rate" => a.rate = v.parse()?,
            "--concurrency" => a.concurrency = v.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// The ~2 KB order document of the Celery benchmark (run.py's sample_doc).
fn sample_doc() -> String {
    let items: Vec<Value> = (0..18)
        .map(|i| {
            json!({"sku": format!("SKU-{:04}", i % 17), "name": format!("Catalogue item number {i}"),
                   "qty": 1 + i % 5, "unit_cents": 199 + 37 * i, "tags": ["standard", "eu"]})
        })
        .collect();
    json!({"id": "ord_000001", "currency": "EUR", "items": items,
           "customer": {"id": 42, "email": "jane@example.com", "country": "NL"}})
    .to_string()
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// (start µs, end µs) of each job, read from the job hashes in pipelines.
async fn times(b: &RedisBroker, ids: &[String]) -> anyhow::Result<Vec<(i64, i64)>> {
    let mut out = Vec::with_capacity(ids.len());
    let qp = b.queue_prefix(QUEUE);
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HMGET").arg(format!("{qp}j:{id}")).arg("st").arg("fin").arg("state");
        }
        let mut c = b.conn();
        let rows: Vec<(Option<i64>, Option<i64>, Option<String>)> = pipe.query_async(&mut c).await?;
        for (i, (st, fin, state)) in rows.into_iter().enumerate() {
            anyhow::ensure!(state.as_deref() == Some("succeeded"), "job {} ended {:?}", chunk[i], state);
            out.push((st.unwrap_or(0), fin.unwrap_or(0)));
        }
    }
    Ok(out)
}

async fn drain(b: &RedisBroker, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = b.queue_stats().await?;
        if stats.iter().all(|q| q.queued + q.delayed + q.running == 0) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "not drained within {timeout:?}: {stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((p / 100.0 * values.len() as f64).ceil() as usize).max(1) - 1;
    values[i.min(values.len() - 1)]
}

/// CPU seconds (user + system) this process has used so far, all threads.
fn process_cpu_s() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Redis's own CPU seconds and, per command, (calls, µs), from INFO.
async fn redis_cpu(b: &RedisBroker) -> anyhow::Result<(f64, HashMap<String, (f64, f64)>)> {
    let mut c = b.conn();
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut c).await?;
    let field = |name: &str| -> f64 {
        info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok()).unwrap_or(0.0)
    };
    let cpu = field("used_cpu_sys") + field("used_cpu_user");
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut c).await?;
    let mut commands = HashMap::new();
    for line in stats.lines() {
        let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let get = |k: &str| rest.split(',').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<f64>().ok()).unwrap_or(0.0);
        commands.insert(name.to_string(), (get("calls"), get("usec")));
    }
    Ok((cpu, commands))
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// `BENCH_THREADS` (default 2, the cores here; 1 = tokio's current-thread
/// runtime): the runtime of the producer, and of the worker when it runs
/// one shard. `BENCH_SHARDS`: worker shards (`[worker] shards`; default
/// one, as `celer serve`).
fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    runtime.block_on(run(threads))
}

async fn run(threads: usize) -> anyhow::Result<()> {
    let a = parse()?;
    let loadavg: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let work = tempfile::tempdir()?;
    let options = RedisOptions {
        prefix: PREFIX.into(),
        result_ttl: Duration::from_secs(3600),
        block: Duration::from_millis(100),
        ..RedisOptions::new(&a.url)
    };
    let broker = Arc::new(RedisBroker::connect(options.clone()).await?);
    {
        let mut c = broker.conn();
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{PREFIX}*")).query_async(&mut c).await?;
        for chunk in keys.chunks(1000) {
            let _: i64 = redis::cmd("DEL").arg(chunk).query_async(&mut c).await?;
        }
    }
    let dyn_broker: Arc<dyn Broker> = broker.clone();
    let config = celer::config::Config { data_dir: work.path().to_path_buf(), ..Default::default() };
    let capabilities = Capabilities::connect(&config, dyn_broker.clone()).await?;
    let slots = u32::try_from(a.concurrency).unwrap_or(64) + 4;
    let runtime = Arc::new(Runtime::new(&SandboxConfig::default(), capabilities, work.path().join("cache"), slots)?);
    let registry = Arc::new(Registry::new(runtime.clone(), a.plugins.clone()));
    registry.scan().await;
    let task = format!("bench.{}", a.task);
    anyhow::ensure!(registry.lookup(&task).is_some(), "{task} not loaded from {}", a.plugins.display());
    let args = if a.task == "json_transform" { json!([sample_doc()]) } else { json!([]) };
    let job = NewJob { queue: QUEUE.into(), ..NewJob::new(task.clone(), args, json!({})) };

    // 1. The producer alone.
    let t = Instant::now();
    let mut backlog = Vec::with_capacity(a.n);
    for _ in 0..a.n {
        backlog.push(broker.enqueue(job.clone()).await?.id);
    }
    let enqueue_s = t.elapsed().as_secs_f64();
    eprintln!("celer: enqueued {} {task} in {enqueue_s:.2} s", a.n);

    // 2. Backlog.
    let (stop_tx, _) = tokio::sync::watch::channel(false);
    let worker = Worker {
        broker: dyn_broker.clone(),
        registry: registry.clone(),
        runtime: runtime.clone(),
        config: WorkerConfig { concurrency: a.concurrency, queues: vec![QUEUE.into()], poll_ms: 100, ..WorkerConfig::default() },
        backoff: Default::default(),
        host: "bench".into(),
        intake: Intake::new(a.concurrency),
    };
    let (redis_cpu_before, commands_before) = redis_cpu(&broker).await?;
    let host_cpu_before = process_cpu_s();
    // `BENCH_SHARDS` worker shards; unset, one, as `celer serve` runs by default.
    let shard_config = WorkerConfig { shards: std::env::var("BENCH_SHARDS").ok().and_then(|v| v.parse().ok()), ..worker.config.clone() };
    let shards = shard_config.shard_count(true);
    let connect: ShardBroker = {
        let options = options.clone();
        Arc::new(move || {
            let options = options.clone();
            Box::pin(async move { Ok(Arc::new(RedisBroker::connect(options).await?) as Arc<dyn Broker>) })
        })
    };
    let handle = tokio::spawn(worker.run_sharded(shards, connect, stop_tx.clone()));
    drain(&broker, Duration::from_secs(300)).await?;
    let host_cpu_us = (process_cpu_s() - host_cpu_before) * 1e6 / a.n as f64;
    let (redis_cpu_after, commands_after) = redis_cpu(&broker).await?;
    let redis_cpu_us = (redis_cpu_after - redis_cpu_before) * 1e6 / a.n as f64;
    // Where Redis spends its time per job: the costliest commands (a script's
    // inner commands are counted under their own names as well as in evalsha).
    let mut per_command: Vec<(String, f64, f64)> = commands_after
        .iter()
        .map(|(name, (calls, usec))| {
            let (c0, u0) = commands_before.get(name).copied().unwrap_or((0.0, 0.0));
            (name.clone(), (calls - c0) / a.n as f64, (usec - u0) / a.n as f64)
        })
        .filter(|(_, calls, _)| *calls > 0.0)
        .collect();
    per_command.sort_by(|x, y| y.2.total_cmp(&x.2));
    let redis_commands: Vec<Value> = per_command
        .iter()
        .take(12)
        .map(|(name, calls, us)| json!({"command": name, "calls_per_job": (calls * 100.0).round() / 100.0, "us_per_job": (us * 100.0).round() / 100.0}))
        .collect();
    let done = times(&broker, &backlog).await?;
    let backlog_s = (done.iter().map(|d| d.1).max().unwrap_or(0) - done.iter().map(|d| d.0).min().unwrap_or(0)) as f64 / 1e6;
    eprintln!("celer: backlog drained in {backlog_s:.3} s");

    // 3. Live: the worker is idle; N sends one after the other.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first_send = now_us();
    let mut live = Vec::with_capacity(a.n);
    for _ in 0..a.n {
        live.push(broker.enqueue(job.clone()).await?.id);
    }
    drain(&broker, Duration::from_secs(300)).await?;
    let done = times(&broker, &live).await?;
    let live_s = (done.iter().map(|d| d.1).max().unwrap_or(0) - first_send) as f64 / 1e6;
    eprintln!("celer: live run done in {live_s:.3} s");

    // 3b. Live with 32 concurrent producers (what one producer process can do when it pipelines).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first_send = now_us();
    let mut set = tokio::task::JoinSet::new();
    let per = a.n / 32;
    for _ in 0..32 {
        let (b, job) = (broker.clone(), job.clone());
        set.spawn(async move {
            let mut ids = Vec::with_capacity(per);
            for _ in 0..per {
                ids.push(b.enqueue(job.clone()).await.expect("enqueue").id);
            }
            ids
        });
    }
    let mut live2 = Vec::new();
    while let Some(ids) = set.join_next().await {
        live2.extend(ids?);
    }
    let sent_s = (now_us() - first_send) as f64 / 1e6;
    drain(&broker, Duration::from_secs(300)).await?;
    let done = times(&broker, &live2).await?;
    let live2_s = (done.iter().map(|d| d.1).max().unwrap_or(0) - first_send) as f64 / 1e6;

    // 4. Latency: M jobs at `rate`/s, open loop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sent: HashMap<String, i64> = HashMap::new();
    let mut order = Vec::with_capacity(a.m);
    let t0 = Instant::now();
    for i in 0..a.m {
        let due = t0 + Duration::from_secs_f64(i as f64 / a.rate);
        tokio::time::sleep_until(due.into()).await;
        let t = now_us();
        let id = broker.enqueue(job.clone()).await?.id;
        sent.insert(id.clone(), t);
        order.push(id);
    }
    drain(&broker, Duration::from_secs(60)).await?;
    let done = times(&broker, &order).await?;
    let mut to_start: Vec<f64> = order.iter().zip(&done).map(|(id, d)| (d.0 - sent[id]) as f64 / 1e3).collect();
    let mut to_end: Vec<f64> = order.iter().zip(&done).map(|(id, d)| (d.1 - sent[id]) as f64 / 1e3).collect();

    let _ = stop_tx.send(true);
    handle.await?;
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    println!(
        "{}",
        json!({
            "system": "celer", "version": env!("CARGO_PKG_VERSION"), "task": task, "broker": "redis",
            "concurrency": a.concurrency, "runtime_threads": threads, "worker_shards": shards, "n": a.n, "m": a.m, "rate": a.rate,
            "completion": "outcome per batch: one pipeline (HSET + EXPIRE per job, one XACK + XDEL per stream) for successes under a fresh lease, else the complete script",
            "enqueue_per_s": r1(a.n as f64 / enqueue_s),
            "backlog_per_s": r1(a.n as f64 / backlog_s),
            "live_per_s": r1(a.n as f64 / live_s),
            "live_32_producers_per_s": r1(live2.len() as f64 / live2_s),
            "enqueue_32_producers_per_s": r1(live2.len() as f64 / sent_s),
            "start_p50_ms": r3(percentile(&mut to_start, 50.0)),
            "start_p99_ms": r3(percentile(&mut to_start, 99.0)),
            "done_p50_ms": r3(percentile(&mut to_end, 50.0)),
            "done_p99_ms": r3(percentile(&mut to_end, 99.0)),
            "backlog_host_cpu_us_per_job": r1(host_cpu_us),
            "backlog_redis_cpu_us_per_job": r1(redis_cpu_us),
            "backlog_redis_commands": redis_commands,
            "peak_rss_mib": r1(peak_rss_mib()),
            "peak_rss_note": "the whole bench process: producer + host",
            "loadavg_1m_before": loadavg,
        })
    );
    Ok(())
}

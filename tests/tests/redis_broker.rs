//! Many hosts on one Redis: real `celer serve` processes sharing the Redis
//! broker. Every job runs exactly once; a SIGKILLed host's jobs are taken
//! over once their lease runs out and finish once; a Redis restart in the
//! middle of the load loses no acknowledged job and consumption resumes by
//! itself. Each runs on a single Redis and again on a 3-node Redis Cluster
//! (the cluster restart is ignored for now: see its note).
//!
//! Jobs are enqueued in-process through the broker (thousands of `celer
//! enqueue` processes would take minutes); runs are counted from the hosts'
//! logs (`job succeeded … job_id=…`), one line per run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer::broker::Broker;
use celer::broker::redis::{RedisBroker, RedisOptions};
use celer::job::{JobState, NewJob};
use celer_integration::{Env, TEST_CONFIG, plugin_manifest, plugin_wasm, services};
use serde_json::json;

/// A `celer serve --roles worker` process (several share one Env, so no
/// HTTP listener); killed when dropped.
struct Host {
    child: Option<Child>,
    log: PathBuf,
}

impl Host {
    fn start(env: &Env, name: &str) -> Host {
        let log = env.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = env
            .command()
            .args(["serve", "--roles", "worker"])
            .env("CELER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn celer serve");
        let host = Host { child: Some(child), log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !host.log().contains("worker started") {
            assert!(Instant::now() < deadline, "host {name} did not start:\n{}", host.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        host
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Job ids of the `job succeeded` lines, one per run.
    fn runs(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("job succeeded"))
            .filter_map(|l| l.split("job_id=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(String::from)
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

fn prefix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("celer-it-{}-{nanos}:", std::process::id())
}

/// An installation on `url` under its own key prefix, hello with room for 16 jobs at once.
fn redis_env(url: &str, prefix: &str) -> Env {
    let config = TEST_CONFIG.replace("concurrency = 8", "concurrency = 16");
    let env = Env::with_config(&config).var("CELER_BROKER_URL", url).var("CELER_BROKER_PREFIX", prefix);
    let manifest = std::fs::read_to_string(plugin_manifest("hello")).expect("manifest").replace("concurrency = 4", "concurrency = 16");
    env.install_files("hello", &std::fs::read(plugin_wasm("hello")).expect("wasm"), &manifest);
    env.install("hostile");
    env
}

async fn broker(url: &str, prefix: &str) -> Arc<RedisBroker> {
    let options = RedisOptions { prefix: prefix.to_string(), ..RedisOptions::new(url) };
    Arc::new(RedisBroker::connect(options).await.expect("the test Redis (scripts/services.sh up redis)"))
}

/// Enqueues `n` jobs, 64 at a time; retries each until Redis acknowledges
/// it, for at most a minute (a client that never reconnects fails the test
/// instead of hanging it).
async fn enqueue_many(b: &Arc<RedisBroker>, n: usize, job: NewJob) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..n {
        let b = b.clone();
        let job = job.clone();
        pending.spawn(async move {
            loop {
                match b.enqueue(job.clone()).await {
                    Ok(e) => return (i, e.id),
                    Err(e) => {
                        assert!(Instant::now() < deadline, "enqueue still failing after a minute: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                }
            }
        });
        if pending.len() >= 64 {
            ids.push(pending.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(r) = pending.join_next().await {
        ids.push(r.unwrap());
    }
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

/// Waits until no job is queued, delayed or running; panics after `timeout`.
async fn drain(b: &RedisBroker, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match b.queue_stats().await {
            Ok(stats) => {
                if stats.iter().all(|q| q.queued + q.delayed + q.running == 0) {
                    return;
                }
                assert!(Instant::now() < deadline, "jobs still pending after {timeout:?}: {stats:?}");
            }
            Err(e) => assert!(Instant::now() < deadline, "the broker still fails after {timeout:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Status of every job, fetched 64 at a time.
async fn states(b: &Arc<RedisBroker>, ids: &[String]) -> HashMap<String, celer::job::JobStatus> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for id in chunk {
            let (b, id) = (b.clone(), id.clone());
            set.spawn(async move { (id.clone(), b.status(&id).await.expect("status").expect("job exists")) });
        }
        while let Some(r) = set.join_next().await {
            let (id, s) = r.unwrap();
            out.insert(id, s);
        }
    }
    out
}

fn count_runs(hosts: &[&Host]) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for h in hosts {
        for id in h.runs() {
            *runs.entry(id).or_insert(0) += 1;
        }
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_run_ten_thousand_jobs_each_exactly_once() {
    three_hosts_run_each_job_exactly_once(services::REDIS_URL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_on_a_redis_cluster_run_ten_thousand_jobs_each_exactly_once() {
    three_hosts_run_each_job_exactly_once(services::REDIS_CLUSTER_URL).await;
}

async fn three_hosts_run_each_job_exactly_once(url: &str) {
    let prefix = prefix();
    // Two worker shards each: six consumers, two per process.
    let env = redis_env(url, &prefix).var("CELER_WORKER_SHARDS", "2");
    let hosts: Vec<Host> = (0..3).map(|i| Host::start(&env, &format!("host{i}"))).collect();
    let b = broker(url, &prefix).await;
    let t = Instant::now();
    let ids = enqueue_many(&b, 10_000, NewJob::new("hello.noop", json!([]), json!({}))).await;
    drain(&b, Duration::from_secs(120)).await;
    let took = t.elapsed();

    let statuses = states(&b, &ids).await;
    let not_done: Vec<_> = statuses.values().filter(|s| s.state != JobState::Succeeded).collect();
    assert!(not_done.is_empty(), "{} jobs did not succeed, e.g. {:?}", not_done.len(), not_done.first());
    assert!(statuses.values().all(|s| s.job.attempt == 0), "no job needed a second attempt");
    let runs = count_runs(&hosts.iter().collect::<Vec<_>>());
    assert_eq!(runs.len(), 10_000, "every job ran");
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    let per_host: Vec<usize> = hosts.iter().map(|h| h.runs().len()).collect();
    assert!(per_host.iter().all(|n| *n > 0), "every host took part: {per_host:?}");
    for h in &hosts {
        let log = h.log();
        assert!(log.contains("#0 queues=") && log.contains("#1 queues="), "two shards started:\n{log}");
    }
    eprintln!("10000 noop jobs on 3 debug-build hosts ({url}) in {took:?}; per host {per_host:?}");
    drop(hosts);
    let _ = b.dead_purge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_hosts_jobs_are_taken_over_within_the_lease_and_finish_once() {
    sigkilled_hosts_jobs_are_taken_over(services::REDIS_URL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_sigkilled_hosts_jobs_are_taken_over_within_the_lease_and_finish_once() {
    sigkilled_hosts_jobs_are_taken_over(services::REDIS_CLUSTER_URL).await;
}

async fn sigkilled_hosts_jobs_are_taken_over(url: &str) {
    let prefix = prefix();
    let env = redis_env(url, &prefix);
    let mut victim = Host::start(&env, "victim");
    let b = broker(url, &prefix).await;
    // Only the victim runs: it takes these slow jobs (hostile: 2 at a time).
    let slow = NewJob::new("hostile.sleep", json!([]), json!({"ms": 1900}));
    let slow_ids = enqueue_many(&b, 2, slow).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_starts = loop {
        let s = states(&b, &slow_ids).await;
        if s.values().all(|s| s.state == JobState::Running) {
            break s.into_iter().map(|(id, s)| (id, s.started_at.expect("started"))).collect::<HashMap<_, _>>();
        }
        assert!(Instant::now() < deadline, "the victim never started the slow jobs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // It dies mid-run, with both leased; more work arrives for the survivors.
    victim.kill();
    let killed_at = chrono::Utc::now();
    let fast = enqueue_many(&b, 2_000, NewJob::new("hello.noop", json!([]), json!({}))).await;
    let others: Vec<Host> = (0..2).map(|i| Host::start(&env, &format!("survivor{i}"))).collect();
    drain(&b, Duration::from_secs(60)).await;

    let statuses = states(&b, &slow_ids).await;
    for s in statuses.values() {
        assert_eq!(s.state, JobState::Succeeded, "{s:?}");
        assert_eq!(s.job.attempt, 1, "the lost run counts as one attempt");
        let started = s.started_at.expect("started");
        // Never before the first lease deadline (1500 ms after the first
        // start, TEST_CONFIG; renewals only move it later) ...
        let after_first = (started - first_starts[&s.job.id]).num_milliseconds();
        assert!(after_first >= 1_500, "taken over {after_first} ms after its first start: the lease was not respected");
        // ... and soon after it ran out (the survivors start meanwhile).
        let after_kill = (started - killed_at).num_milliseconds();
        assert!(after_kill < 1_500 + 5_000, "taken over {after_kill} ms after the kill");
    }
    let fast_states = states(&b, &fast).await;
    assert!(fast_states.values().all(|s| s.state == JobState::Succeeded));
    let mut all: Vec<&Host> = others.iter().collect();
    all.push(&victim);
    let runs = count_runs(&all);
    let survivors = count_runs(&others.iter().collect::<Vec<_>>());
    for id in slow_ids.iter() {
        assert_eq!(survivors.get(id), Some(&1), "finished once, by a survivor");
    }
    for id in &fast {
        // A job the victim finished but could not record before it died
        // runs again (at least once): never more than once per host.
        let n = runs.get(id).copied().unwrap_or(0);
        assert!(n == 1 || (n == 2 && victim.runs().contains(id)), "{id} ran {n} times");
    }
    let _ = b.dead_purge().await;
}

/// A Redis of the restart tests' own (the shared ones must not restart
/// under the other tests): one server, or a 3-node cluster, each node with
/// an fsync'd AOF so that an acknowledged enqueue survives a crash.
struct OwnRedis {
    nodes: Vec<OwnNode>,
    cluster: bool,
    /// The cluster was created: a restart waits for it to be whole again.
    formed: bool,
}

/// One `redis-server` process and its directory (AOF, `nodes.conf`).
struct OwnNode {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// A loopback port free now (a cluster node also uses port + 10000 for its bus).
fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl OwnRedis {
    fn single() -> OwnRedis {
        let mut r = OwnRedis { nodes: vec![OwnNode::new()], cluster: false, formed: false };
        r.up();
        r
    }

    /// Three masters, no replicas, the slots split between them.
    fn cluster() -> OwnRedis {
        let mut r = OwnRedis { nodes: (0..3).map(|_| OwnNode::new()).collect(), cluster: true, formed: false };
        r.up();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(r.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli (scripts/services.sh installs it)");
        assert!(status.success(), "redis-cli --cluster create failed");
        r.formed = true;
        r.wait_cluster_ok();
        r
    }

    fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        if self.cluster { format!("redis+cluster://{}", nodes.join(",")) } else { format!("redis://{}", nodes[0]) }
    }

    fn up(&mut self) {
        for n in &mut self.nodes {
            n.up(self.cluster);
        }
        if self.formed {
            self.wait_cluster_ok();
        }
    }

    /// SIGKILL every node: with `appendfsync always` every acknowledged
    /// write is on disk (and a cluster node's slots in its `nodes.conf`).
    fn crash(&mut self) {
        for n in &mut self.nodes {
            n.crash();
        }
    }

    fn wait_cluster_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &self.nodes {
            loop {
                let out = Command::new("redis-cli").args(["-p", &n.port.to_string(), "cluster", "info"]).output().expect("redis-cli");
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the test cluster did not reach cluster_state:ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl OwnNode {
    fn new() -> OwnNode {
        OwnNode { port: free_port(), dir: tempfile::tempdir().expect("dir"), child: None }
    }

    fn up(&mut self, cluster: bool) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir"])
            .arg(self.dir.path());
        if cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]);
        }
        let child = cmd.stdout(Stdio::null()).spawn().expect("redis-server (scripts/services.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        self.crash();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_load_loses_no_acknowledged_job_and_consumption_resumes() {
    restart_mid_load(OwnRedis::single()).await;
}

/// Every node of a cluster of its own is SIGKILLed and restarted. Under
/// load, about one run in six left a redis-rs cluster connection failing
/// every command from then on (a host's or the producer's); the broker's
/// connection replaces itself after a run of failures (`conn.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_restart_mid_load_loses_no_acknowledged_job_and_consumption_resumes() {
    restart_mid_load(OwnRedis::cluster()).await;
}

async fn restart_mid_load(mut redis: OwnRedis) {
    let url = redis.url();
    let prefix = "celer:";
    let env = redis_env(&url, prefix);
    let hosts: Vec<Host> = (0..2).map(|i| Host::start(&env, &format!("host{i}"))).collect();
    let b = broker(&url, prefix).await;
    let first = enqueue_many(&b, 1_500, NewJob::new("hello.noop", json!([]), json!({}))).await;
    // Kill Redis while the hosts are busy with the backlog; restart it 300 ms later.
    redis.crash();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.up();
    // Keep producing: these are acknowledged once enqueue returns.
    let second = enqueue_many(&b, 1_500, NewJob::new("hello.noop", json!([]), json!({}))).await;
    drain(&b, Duration::from_secs(60)).await;

    let all: Vec<String> = first.into_iter().chain(second).collect();
    let statuses = states(&b, &all).await;
    let bad: Vec<_> = statuses.values().filter(|s| s.state != JobState::Succeeded).collect();
    assert!(bad.is_empty(), "{} acknowledged jobs did not succeed, e.g. {:?}", bad.len(), bad.first());
    let runs = count_runs(&hosts.iter().collect::<Vec<_>>());
    let more: Vec<_> = runs.iter().filter(|(_, n)| **n > 2).collect();
    assert!(more.is_empty(), "at least once, and only around the outage: {more:?}");
    for (i, h) in hosts.iter().enumerate() {
        let log = h.log();
        let replaced = log.matches("connection replaced after failures in a row").count();
        eprintln!("host{i}: its cluster connections were replaced {replaced} times");
        let last_fetch_error = log.rfind("cannot fetch jobs");
        let last_success = log.rfind("job succeeded");
        assert!(last_success > last_fetch_error, "host{i} consumed again after the restart:\n{}", &log[log.len().saturating_sub(3000)..]);
    }
}

/// A cancel reaches a running job at once (the stop request is pushed to
/// every host), not at its lease's next renewal: with a 30 s lease that
/// renewal is 10 s away, and the job's 20 s timeout would end it first.
#[test]
fn a_cancel_stops_a_running_job_at_once_not_at_its_next_renewal() {
    let prefix = prefix();
    let env = Env::with_long_lease().var("CELER_BROKER_URL", services::REDIS_URL).var("CELER_BROKER_PREFIX", &prefix);
    let _server = env.serve();
    let id = env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":15000}"#]);
    env.wait_state(&id, "running", Duration::from_secs(30));
    // Past the first renewals' window: the stop must not ride on one.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let out = env.celer(&["cancel", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("stop-requested"), "{}", String::from_utf8_lossy(&out.stdout));
    let s = env.wait_state(&id, "cancelled", Duration::from_secs(8));
    assert_eq!(s["error"]["kind"], "cancelled");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "stopped {took:?} after the cancel; the next renewal was ~10 s away");
    eprintln!("a running job stopped {took:?} after its cancel (lease 30 s)");
}

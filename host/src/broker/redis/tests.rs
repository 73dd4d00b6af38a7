//! The Redis broker against the shared broker suite, plus what only Redis
//! has: blocking fetch, group recreation, key layout and TTLs. Needs the
//! test Redis (`scripts/services.sh up redis`, started by `make test`);
//! `CELER_TEST_REDIS_URL` overrides where it is. Every test works under a
//! key prefix of its own, deleted when the test ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use serde_json::json;

use super::{RedisBroker, RedisOptions};
use crate::broker::suite::{self, enqueue, fetch, fetch_one, job, status};
use crate::broker::{Broker, BrokerError, Delivery, FetchRequest, Outcome, RunRecord};
use crate::job::JobState;

use super::test_redis_url as redis_url;

/// Deletes every key under its prefix when dropped.
pub struct Cleanup {
    url: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // A thread of its own: Drop may run inside the async runtime.
        let _ = std::thread::spawn(move || {
            let Ok(client) = ::redis::Client::open(url.as_str()) else { return };
            let Ok(mut c) = client.get_connection() else { return };
            let keys: Vec<String> =
                ::redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut c).unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: Result<i64, _> = ::redis::cmd("DEL").arg(chunk).query(&mut c);
            }
        })
        .join();
    }
}

pub fn unique_prefix() -> String {
    format!("celer-test-{}:", uuid::Uuid::now_v7().simple())
}

pub async fn broker_with(prefix: &str, block: Duration) -> RedisBroker {
    let options = RedisOptions { prefix: prefix.to_string(), block, ..RedisOptions::new(redis_url()) };
    RedisBroker::connect(options)
        .await
        .unwrap_or_else(|e| panic!("the test Redis at {} is not reachable ({e}): run `scripts/services.sh up redis`", redis_url()))
}

async fn fresh() -> (Cleanup, Arc<dyn Broker>) {
    let prefix = unique_prefix();
    let b = broker_with(&prefix, Duration::ZERO).await;
    (Cleanup { url: redis_url(), prefix }, Arc::new(b))
}

crate::broker_suite!(fresh());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hosts_deliver_every_job_exactly_once() {
    let prefix = unique_prefix();
    let _cleanup = Cleanup { url: redis_url(), prefix: prefix.clone() };
    let mut brokers: Vec<Arc<dyn Broker>> = Vec::new();
    for _ in 0..3 {
        brokers.push(Arc::new(broker_with(&prefix, Duration::ZERO).await));
    }
    suite::concurrent_workers_deliver_every_job_exactly_once(brokers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_queue_share_its_hash_tag_and_finished_jobs_expire() {
    let (_c, b) = fresh_redis().await;
    let id = enqueue(&b, job("t")).await;
    let failed = enqueue(&b, job("t")).await;
    let mut c = b.conn();
    let pattern = format!("{}*", b.prefix());
    let keys: Vec<String> = ::redis::cmd("KEYS").arg(&pattern).query_async(&mut c).await.unwrap();
    for k in &keys {
        assert!(k.contains("{default}") || k == &format!("{}queues", b.prefix()), "{k}");
    }
    for d in fetch(&b, 2).await {
        let outcome = if d.job.id == id {
            Outcome::Succeeded { result: json!(1) }
        } else {
            Outcome::Dead { error: crate::job::JobError::new(crate::job::ErrorKind::Plugin, "no") }
        };
        assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
    }
    let ttl: i64 = c.ttl(b.job_key("default", &id)).await.unwrap();
    assert!(ttl > 86_000 && ttl <= 86_400, "a finished job expires after result_ttl: {ttl}");
    let ttl: i64 = c.ttl(b.job_key("default", &failed)).await.unwrap();
    assert_eq!(ttl, -1, "dead letters stay until purged or retried");
}

/// The stream and entry id that hold job `id` (of queue `default`).
async fn entry_of(b: &RedisBroker, id: &str) -> (String, String) {
    let mut c = b.conn();
    ::redis::cmd("HMGET").arg(b.job_key("default", id)).arg("sk").arg("eid").query_async(&mut c).await.unwrap()
}

/// Replaces job `id`'s stream entry by one with `fields`, as an older
/// version or a broken writer would have left it.
async fn replace_entry(b: &RedisBroker, id: &str, fields: &[(&str, &str)]) {
    let (stream, eid) = entry_of(b, id).await;
    let mut c = b.conn();
    let _: i64 = c.xdel(&stream, &[&eid]).await.unwrap();
    let eid: String = c.xadd(&stream, "*", fields).await.unwrap();
    let _: () = c.hset(b.job_key("default", id), "eid", eid.as_str()).await.unwrap();
}

async fn fresh_redis() -> (Cleanup, RedisBroker) {
    let prefix = unique_prefix();
    let b = broker_with(&prefix, Duration::ZERO).await;
    (Cleanup { url: redis_url(), prefix }, b)
}

/// Two brokers on one fresh prefix: a consumer whose fetch blocks for
/// `block` when it finds nothing, and a producer that never blocks.
async fn consumer_and_producer(block: Duration) -> (Cleanup, RedisBroker, RedisBroker) {
    let prefix = unique_prefix();
    let cleanup = Cleanup { url: redis_url(), prefix: prefix.clone() };
    (cleanup, broker_with(&prefix, block).await, broker_with(&prefix, Duration::ZERO).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_fetch_wakes_up_when_a_job_arrives() {
    let (_c, consumer, producer) = consumer_and_producer(Duration::from_secs(3)).await;
    assert!(consumer.fetch_waits());
    // An empty queue: the fetch waits its full block time, then returns nothing.
    let t = Instant::now();
    let queues = vec!["default".to_string()];
    let req = FetchRequest { host: "h", queues: &queues, exclude_tasks: &[], limited: &[], max: 4, lease: Duration::from_secs(30), wait_longer: None };
    let waiter = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            let queues = vec!["default".to_string()];
            let req =
                FetchRequest { host: "h", queues: &queues, exclude_tasks: &[], limited: &[], max: 4, lease: Duration::from_secs(30), wait_longer: None };
            let got = consumer.fetch(req).await.unwrap();
            (got, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    let id = enqueue(&producer, job("t")).await;
    let (got, woke) = waiter.await.unwrap();
    assert_eq!(got.len(), 1, "delivered to the waiting fetch");
    assert_eq!(got[0].job.id, id);
    assert!(woke.duration_since(sent) < Duration::from_millis(500), "woke {:?} after the enqueue", woke.duration_since(sent));
    assert!(t.elapsed() < Duration::from_millis(2_500));
    // A delayed job due in 300 ms wakes a fetch that would block for 3 s.
    let eta = chrono::Utc::now() + chrono::TimeDelta::milliseconds(300);
    enqueue(&producer, crate::job::NewJob { eta: Some(eta), ..job("t") }).await;
    let t = Instant::now();
    let got = consumer.fetch(req.clone()).await.unwrap();
    assert_eq!(got.len(), 1, "the delayed job, once due");
    assert!(t.elapsed() < Duration::from_millis(2_000), "{:?}", t.elapsed());
}

/// A fetch that found only jobs it must send back (a rate-limited task out
/// of starts) waits until that task's next start rather than its usual
/// block time, and a new job still ends the wait at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_asked_to_wait_longer_still_wakes_for_a_new_job() {
    let (_c, consumer, producer) = consumer_and_producer(Duration::from_millis(50)).await;
    enqueue(&producer, job("held")).await;
    // A fetch of the default queue that leaves task "held" out.
    async fn fetch_all_but_held(b: &RedisBroker, wait_longer: Duration) -> Vec<Delivery> {
        let (queues, held) = (vec!["default".to_string()], vec!["held".to_string()]);
        let req = FetchRequest {
            host: "h",
            queues: &queues,
            exclude_tasks: &held,
            limited: &[],
            max: 4,
            lease: Duration::from_secs(30),
            wait_longer: Some(wait_longer),
        };
        b.fetch(req).await.unwrap()
    }
    let t = Instant::now();
    assert!(fetch_all_but_held(&consumer, Duration::from_millis(600)).await.is_empty(), "the held-back job is sent back");
    assert!(t.elapsed() >= Duration::from_millis(550), "waited for the next start, not the 50 ms block: {:?}", t.elapsed());
    let waiter = tokio::spawn({
        let consumer = consumer.clone();
        async move { (fetch_all_but_held(&consumer, Duration::from_secs(5)).await, Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    let id = enqueue(&producer, job("free")).await;
    let (got, woke) = waiter.await.unwrap();
    assert_eq!(got.iter().map(|d| d.job.id.clone()).collect::<Vec<_>>(), vec![id], "the new job, not the held one");
    assert!(woke.duration_since(sent) < Duration::from_millis(1_000), "woke {:?} after the enqueue, not at the 5 s wait's end", woke.duration_since(sent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_when_the_group_and_streams_vanish() {
    let (_c, b) = fresh_redis().await;
    let first = enqueue(&b, job("t")).await;
    assert_eq!(fetch_one(&b).await.job.id, first);
    // What a Redis restart without persistence does to our keys.
    let mut c = b.conn();
    let pattern = format!("{}*", b.prefix());
    let keys: Vec<String> = ::redis::cmd("KEYS").arg(&pattern).query_async(&mut c).await.unwrap();
    let _: i64 = c.del(&keys).await.unwrap();
    let _: () = ::redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    let second = enqueue(&b, job("t")).await;
    let d = fetch_one(&b).await;
    assert_eq!(d.job.id, second);
    assert!(b.complete(&d.lease, Outcome::Succeeded { result: json!(2) }, RunRecord::default()).await.unwrap());
    // Only the group gone (the stream kept): recreated on read.
    let third = enqueue(&b, job("t")).await;
    let stream = format!("{}s:0", b.queue_prefix("default"));
    let _: () = ::redis::cmd("XGROUP").arg("DESTROY").arg(&stream).arg(super::GROUP).query_async(&mut c).await.unwrap();
    assert_eq!(fetch_one(&b).await.job.id, third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_job_goes_to_the_dead_letters_and_a_bad_state_is_corrupt() {
    let (_c, b) = fresh_redis().await;
    let bad = enqueue(&b, job("t")).await;
    let good = enqueue(&b, job("t")).await;
    let mut c = b.conn();
    // The bad job's entry replaced by one whose envelope cannot be parsed.
    let fields = [("id", bad.as_str()), ("env", "not json"), ("task", "t"), ("exp", ""), ("enq", "1764000000000000"), ("a", "0")];
    replace_entry(&b, &bad, &fields).await;
    let got = fetch(&b, 10).await;
    assert_eq!(got.iter().map(|d| d.job.id.clone()).collect::<Vec<_>>(), vec![good.clone()]);
    let state: String = c.hget(b.job_key("default", &bad), "state").await.unwrap();
    assert_eq!(state, "failed");
    let _: () = c.hset(b.job_key("default", &good), "state", "zombie").await.unwrap();
    assert!(matches!(b.status(&good).await, Err(BrokerError::Corrupt { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_taken_over_by_the_next_fetch_before_new_jobs() {
    let (_c, b) = fresh_redis().await;
    let first = enqueue(&b, job("t")).await;
    // A lease long enough that a loaded machine does not stall the fetch
    // past half of it (the fetch then leaves the job to a take-over).
    let d = suite::fetch_with(&b, 1, &[], Duration::from_millis(400)).await.remove(0);
    let _newer = enqueue(&b, job("t")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = fetch_one(&b).await;
    assert_eq!((again.job.id.clone(), again.job.attempt), (first.clone(), 1));
    assert!(!b.complete(&d.lease, Outcome::Succeeded { result: json!(0) }, RunRecord::default()).await.unwrap());
    assert!(b.complete(&again.lease, Outcome::Succeeded { result: json!(1) }, RunRecord::default()).await.unwrap());
    assert_eq!(status(&b, &first).await.state, JobState::Succeeded);
    // The pending entry moved to this consumer and was acked: nothing pending.
    let mut c = b.conn();
    let stream = format!("{}s:0", b.queue_prefix("default"));
    let (count, _, _, _): (i64, Option<String>, Option<String>, ::redis::Value) =
        ::redis::cmd("XPENDING").arg(&stream).arg(super::GROUP).query_async(&mut c).await.unwrap();
    assert_eq!(count, 0, "the taken-over entry was acked; the newer job is not read yet");
}

/// The same suite on a 3-node Redis Cluster (`scripts/services.sh up
/// redis-cluster`; `CELER_TEST_REDIS_CLUSTER_URL` overrides).
mod cluster {
    use super::*;

    const NODES: [&str; 3] = ["redis://127.0.0.1:7101", "redis://127.0.0.1:7102", "redis://127.0.0.1:7103"];

    fn url() -> String {
        std::env::var("CELER_TEST_REDIS_CLUSTER_URL")
            .unwrap_or_else(|_| "redis+cluster://127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103".into())
    }

    /// Deletes the prefix's keys on every node, one by one (no cross-slot DEL).
    struct ClusterCleanup(String);

    impl Drop for ClusterCleanup {
        fn drop(&mut self) {
            let prefix = self.0.clone();
            let _ = std::thread::spawn(move || {
                for node in NODES {
                    let Ok(client) = ::redis::Client::open(node) else { continue };
                    let Ok(mut c) = client.get_connection() else { continue };
                    let keys: Vec<String> =
                        ::redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut c).unwrap_or_default();
                    for k in keys {
                        let _: Result<i64, _> = ::redis::cmd("DEL").arg(k).query(&mut c);
                    }
                }
            })
            .join();
        }
    }

    async fn fresh() -> (ClusterCleanup, Arc<dyn Broker>) {
        let prefix = unique_prefix();
        let options = RedisOptions { prefix: prefix.clone(), ..RedisOptions::new(url()) };
        let b = RedisBroker::connect(options).await.unwrap_or_else(|e| {
            panic!("the test Redis Cluster ({}) is not reachable ({e}): run `scripts/services.sh up redis-cluster`", url())
        });
        (ClusterCleanup(prefix), Arc::new(b))
    }

    crate::broker_suite!(fresh());

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_hosts_deliver_every_job_exactly_once() {
        let (_guard, first) = fresh().await;
        let _ = first;
        let prefix = unique_prefix();
        let _cleanup = ClusterCleanup(prefix.clone());
        let mut brokers: Vec<Arc<dyn Broker>> = Vec::new();
        for _ in 0..3 {
            let options = RedisOptions { prefix: prefix.clone(), ..RedisOptions::new(url()) };
            brokers.push(Arc::new(RedisBroker::connect(options).await.expect("cluster")));
        }
        suite::concurrent_workers_deliver_every_job_exactly_once(brokers).await;
    }
}

/// A fetching host writes a heartbeat (pid, queues, time of the beat) that
/// `hosts()` reports; a host whose heartbeat expired is no longer listed
/// unless it still holds jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetching_host_is_listed_with_its_heartbeat() {
    let (_guard, b) = fresh().await;
    enqueue(&*b, job("t")).await;
    let d = fetch_one(&*b).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let me = loop {
        let hosts = b.hosts().await.expect("hosts");
        if let Some(h) = hosts.into_iter().find(|h| h.host == suite::HOST && h.last_seen.is_some()) {
            break h;
        }
        assert!(Instant::now() < deadline, "no heartbeat within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((me.pid, me.running, me.queues.clone()), (Some(std::process::id()), 1, vec!["default".to_string()]));
    let age = chrono::Utc::now() - me.last_seen.expect("seen");
    assert!(age < chrono::TimeDelta::seconds(3), "beat {age} ago");
    assert!(b.complete(&d.lease, Outcome::Succeeded { result: json!(1) }, RunRecord::default()).await.unwrap());
    assert_eq!(b.hosts().await.unwrap().iter().find(|h| h.host == suite::HOST).map(|h| h.running), Some(0));
}

/// Leases are the pending entries' idle times, and hosts may run with
/// different `lease_ms`: a host with a short lease never takes over a job
/// whose holder has a longer one before that one ran out, and does once it
/// has (XAUTOCLAIM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lease_host_waits_for_the_holders_longer_lease() {
    let (_c, b) = fresh_redis().await;
    let queues = vec!["default".to_string()];
    let req = |host, lease_ms| FetchRequest {
        host,
        queues: &queues,
        exclude_tasks: &[],
        limited: &[],
        max: 4,
        lease: Duration::from_millis(lease_ms),
        wait_longer: None,
    };
    let id = enqueue(&b, job("t")).await;
    let held = b.fetch(req("slow-host", 800)).await.unwrap();
    assert_eq!(held.len(), 1);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Past the fast host's own 60 ms lease, well inside the holder's 800 ms.
    while t.elapsed() < Duration::from_millis(650) {
        assert!(b.fetch(req("fast-host", 60)).await.unwrap().is_empty(), "taken over after {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let again = loop {
        let got = b.fetch(req("fast-host", 60)).await.unwrap();
        if let Some(d) = got.into_iter().next() {
            break d;
        }
        assert!(Instant::now() < deadline, "never taken over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(t.elapsed() >= Duration::from_millis(800), "taken over after {:?}", t.elapsed());
    assert_eq!((again.job.id.as_str(), again.job.attempt), (id.as_str(), 1));
    assert_eq!(status(&b, &id).await.host.as_deref(), Some("fast-host"));
    assert!(!b.complete(&held[0].lease, Outcome::Succeeded { result: json!(0) }, RunRecord::default()).await.unwrap());
    assert!(b.complete(&again.lease, Outcome::Succeeded { result: json!(1) }, RunRecord::default()).await.unwrap());
}

/// Entries written before they carried the envelope (the job id only) are
/// put back on the stream in the current shape and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_of_the_old_shape_still_runs() {
    let (_c, b) = fresh_redis().await;
    let id = enqueue(&b, job("t")).await;
    replace_entry(&b, &id, &[("id", id.as_str())]).await;
    let mut got = fetch(&b, 10).await;
    if got.is_empty() {
        got = fetch(&b, 10).await;
    }
    assert_eq!(got.iter().map(|d| (d.job.id.clone(), d.job.attempt)).collect::<Vec<_>>(), vec![(id.clone(), 0)]);
    assert!(b.complete(&got[0].lease, Outcome::Succeeded { result: json!(1) }, RunRecord::default()).await.unwrap());
    assert_eq!(status(&b, &id).await.state, JobState::Succeeded);
}

/// A host that died between reading an entry and marking its job running
/// leaves it pending and `queued`: it is taken over once the lease runs
/// out, with its attempt unchanged (it never ran), and a cancel in that
/// window asks for a stop instead of cancelling a job a host holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_read_but_never_marked_running_is_taken_over_as_the_same_attempt() {
    let (_c, b) = fresh_redis().await;
    let id = enqueue(&b, job("t")).await;
    let other = enqueue(&b, job("t")).await;
    let mut c = b.conn();
    let stream = format!("{}s:0", b.queue_prefix("default"));
    let _: () = ::redis::cmd("XGROUP").arg("CREATE").arg(&stream).arg(super::GROUP).arg("0").arg("MKSTREAM").query_async(&mut c).await.unwrap();
    // What the dead host did: read both, record its lease, mark nothing.
    let _: ::redis::Value = ::redis::cmd("XREADGROUP").arg("GROUP").arg(super::GROUP).arg("dead-host").arg("COUNT").arg(2).arg("STREAMS").arg(&stream).arg(">").query_async(&mut c).await.unwrap();
    let _: () = c.hset(format!("{}lease-ms", b.queue_prefix("default")), "dead-host", 100).await.unwrap();
    assert_eq!(status(&b, &id).await.state, JobState::Queued);
    assert_eq!(b.cancel(&other).await.unwrap(), crate::broker::CancelOutcome::StopRequested);
    assert!(fetch(&b, 10).await.is_empty(), "held by the dead host until its lease runs out");
    // Past its lease and the pace of the scan for lapsed leases (250 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = fetch(&b, 10).await;
    assert_eq!(got.iter().map(|d| (d.job.id.clone(), d.job.attempt)).collect::<Vec<_>>(), vec![(id.clone(), 0)]);
    assert_eq!(status(&b, &other).await.state, JobState::Cancelled, "the stop requested while its host was gone ends it");
    assert!(b.complete(&got[0].lease, Outcome::Succeeded { result: json!(1) }, RunRecord::default()).await.unwrap());
}

/// A saturated plugin's jobs at the top priority never starve the others:
/// a fetch reads past them (and sends them back) until its free slots are
/// leased or the streams are read to their end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_saturated_plugin_at_the_top_do_not_starve_lower_priorities() {
    let (_c, b) = fresh_redis().await;
    for _ in 0..3 {
        enqueue(&b, crate::job::NewJob { priority: 10, ..job("busy") }).await;
    }
    let low = enqueue(&b, job("low")).await;
    let got = suite::fetch_with(&b, 2, &["busy".to_string()], Duration::from_secs(30)).await;
    assert_eq!(got.iter().map(|d| d.job.id.clone()).collect::<Vec<_>>(), vec![low]);
    assert_eq!(fetch(&b, 10).await.len(), 3, "the busy jobs are all still there");
}

/// A renewal finds the lease lost when the job's pending entry is gone
/// (nothing would keep another host from taking it over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_without_a_pending_entry_is_lost() {
    let (_c, b) = fresh_redis().await;
    let id = enqueue(&b, job("t")).await;
    let d = fetch_one(&b).await;
    let mut c = b.conn();
    let (stream, eid) = entry_of(&b, &id).await;
    let _: i64 = ::redis::cmd("XACK").arg(&stream).arg(super::GROUP).arg(&eid).query_async(&mut c).await.unwrap();
    assert_eq!(b.renew(&d.lease, Duration::from_secs(30)).await.unwrap(), crate::broker::LeaseStatus::Lost);
}

/// Every way a job ends without a run's outcome lists it for whoever
/// answers for it elsewhere (the Celery consumer writes its result): a
/// cancel before it started, and a hand-back of a job asked to stop.
#[tokio::test]
async fn jobs_ended_without_running_are_listed_as_unrun() {
    use crate::broker::CancelOutcome;
    let (_c, b) = fresh_redis().await;
    let waiting = enqueue(&b, job("t")).await;
    assert_eq!(b.cancel(&waiting).await.unwrap(), CancelOutcome::Cancelled);
    let held = enqueue(&b, job("t")).await;
    let delivery = fetch_one(&b).await;
    assert_eq!(delivery.job.id, held);
    assert_eq!(b.cancel(&held).await.unwrap(), CancelOutcome::StopRequested);
    b.release(&delivery.lease).await.unwrap();
    assert_eq!(status(&b, &held).await.state, JobState::Cancelled);
    let mut listed = b.take_unrun("default", 10).await.unwrap();
    listed.sort();
    let mut expected = vec![waiting, held];
    expected.sort();
    assert_eq!(listed, expected);
    b.put_back_unrun("default", &listed[..1]).await.unwrap();
    assert_eq!(b.take_unrun("default", 10).await.unwrap(), listed[..1].to_vec());
}

//! The broker contract as tests, run against every broker: each case takes
//! a fresh, empty broker as `&dyn Broker`, and [`broker_suite!`] turns the
//! list of cases into `#[tokio::test]`s for one broker factory. The
//! embedded broker runs them here (next to its own SQL-specific tests in
//! `embedded.rs`); the Redis broker in `redis/tests.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use uuid::Uuid;

use super::{
    Broker, CancelOutcome, Delivery, Enqueued, FetchRequest, Lease, LeaseStatus, Outcome, PluginRoom,
    QueueStats, RunRecord,
};
use crate::job::{ErrorKind, JobError, JobState, JobStatus, NewJob, Progress};

pub const HOST: &str = "test-host";

pub fn job(task: &str) -> NewJob {
    NewJob::new(task, json!([1, "two"]), json!({"k": true}))
}

pub async fn enqueue(b: &dyn Broker, job: NewJob) -> String {
    let enqueued = b.enqueue(job).await.expect("enqueue");
    assert!(!enqueued.existing);
    enqueued.id
}

fn default_queue() -> Vec<String> {
    vec!["default".to_string()]
}

pub async fn fetch_with(b: &dyn Broker, max: usize, exclude: &[String], lease: Duration) -> Vec<Delivery> {
    fetch_limited(b, &default_queue(), max, exclude, &[], lease).await
}

pub async fn fetch_limited(
    b: &dyn Broker,
    queues: &[String],
    max: usize,
    exclude: &[String],
    limited: &[PluginRoom],
    lease: Duration,
) -> Vec<Delivery> {
    let req = FetchRequest { host: HOST, queues, exclude_tasks: exclude, limited, max, lease, wait_longer: None };
    b.fetch(req).await.expect("fetch")
}

pub async fn fetch(b: &dyn Broker, max: usize) -> Vec<Delivery> {
    fetch_with(b, max, &[], Duration::from_secs(30)).await
}

pub async fn fetch_one(b: &dyn Broker) -> Delivery {
    let mut got = fetch(b, 1).await;
    assert_eq!(got.len(), 1, "expected one delivery");
    got.remove(0)
}

pub async fn status(b: &dyn Broker, id: &str) -> JobStatus {
    b.status(id).await.expect("status").expect("job exists")
}

fn ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.job.id.clone()).collect()
}

fn ids_of(statuses: &[JobStatus]) -> Vec<String> {
    statuses.iter().map(|s| s.job.id.clone()).collect()
}

fn err(kind: ErrorKind, message: &str) -> JobError {
    JobError::new(kind, message)
}

fn ms_precision(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap()
}

pub async fn enqueue_stores_a_queued_job_and_status_reads_it_back(b: &dyn Broker) {
    let mut new = job("mail.send");
    new.priority = 7;
    new.max_retries = 5;
    new.timeout_ms = Some(1_500);
    new.parent_id = Some("parent-1".into());
    new.root_id = Some("root-1".into());
    let before = Utc::now();
    let id = enqueue(b, new.clone()).await;
    assert!(Uuid::parse_str(&id).is_ok_and(|u| u.get_version_num() == 7), "{id}");
    let s = status(b, &id).await;
    assert_eq!(s.state, JobState::Queued);
    assert_eq!(s.job.id, id);
    assert_eq!(s.job.task, "mail.send");
    assert_eq!((s.job.args.value(), s.job.kwargs.value()), (new.args, new.kwargs));
    assert_eq!(s.job.queue, "default");
    assert_eq!((s.job.priority, s.job.attempt, s.job.max_retries), (7, 0, 5));
    assert_eq!(s.job.timeout_ms, Some(1_500));
    assert_eq!(s.job.parent_id.as_deref(), Some("parent-1"));
    assert_eq!(s.job.root_id.as_deref(), Some("root-1"));
    assert_eq!((s.job.eta, s.job.expires_at), (None, None));
    assert!(s.job.enqueued_at >= ms_precision(before) && s.job.enqueued_at <= Utc::now());
    assert_eq!((s.result, s.error, s.progress, s.started_at, s.finished_at), (None, None, None, None, None));
    assert!(b.status("no-such-job").await.unwrap().is_none());
}

pub async fn invalid_jobs_are_refused(b: &dyn Broker) {
    let bad = NewJob::new("t", json!({"not": "an array"}), json!({}));
    assert!(matches!(b.enqueue(bad).await, Err(super::BrokerError::Invalid(_))));
    let empty_task = NewJob::new(" ", json!([]), json!({}));
    assert!(matches!(b.enqueue(empty_task).await, Err(super::BrokerError::Invalid(_))));
    assert!(fetch(b, 10).await.is_empty());
}

pub async fn eta_schedules_the_job_and_it_is_not_fetched_before_its_time(b: &dyn Broker) {
    let eta = Utc::now() + TimeDelta::milliseconds(500);
    let id = enqueue(b, NewJob { eta: Some(eta), ..job("later") }).await;
    assert_eq!(status(b, &id).await.state, JobState::Scheduled);
    assert!(fetch(b, 10).await.is_empty());
    let stats = b.queue_stats().await.unwrap();
    assert_eq!((stats[0].queued, stats[0].delayed), (0, 1));
    tokio::time::sleep(Duration::from_millis(550)).await;
    let d = fetch_one(b).await;
    assert_eq!(d.job.id, id);
    assert_eq!(d.job.eta, Some(ms_precision(eta)));
    assert_eq!(status(b, &id).await.job.eta, Some(ms_precision(eta)), "eta stays the original");
}

pub async fn fetch_leases_by_priority_respects_max_queues_and_excluded_tasks(b: &dyn Broker) {
    let low1 = enqueue(b, job("low")).await;
    let low2 = enqueue(b, job("low")).await;
    let high = enqueue(b, NewJob { priority: 5, ..job("high") }).await;
    let busy = enqueue(b, NewJob { priority: 10, ..job("busy") }).await;
    let _elsewhere = enqueue(b, NewJob { queue: "other".into(), ..job("low") }).await;

    assert!(fetch(b, 0).await.is_empty(), "max 0 leases nothing");
    let excluded = vec!["busy".to_string()];
    let first = fetch_with(b, 2, &excluded, Duration::from_secs(30)).await;
    assert_eq!(ids(&first), vec![high.clone(), low1.clone()], "priority, then age");
    for d in &first {
        assert_eq!(d.lease.job_id, d.job.id);
        assert_eq!(d.job.attempt, 0);
        let s = status(b, &d.job.id).await;
        assert_eq!(s.state, JobState::Running);
        assert_eq!(s.host.as_deref(), Some(HOST));
        assert!(s.started_at.is_some());
    }
    assert_ne!(first[0].lease.token, first[1].lease.token);
    let second = fetch_with(b, 10, &excluded, Duration::from_secs(30)).await;
    assert_eq!(ids(&second), vec![low2]);
    let third = fetch(b, 10).await;
    assert_eq!(ids(&third), vec![busy], "the other queue is not ours");
    assert!(fetch(b, 10).await.is_empty());
}

/// A plugin with room for one more job gets one, over all the queues
/// fetched; the others' jobs fill the rest, and the ones it had no room
/// for stay queued (never marked running on a host that would only hand
/// them back).
pub async fn a_plugin_with_little_room_gets_no_more_jobs_than_it_can_start(b: &dyn Broker) {
    let in_second = NewJob { queue: "second".into(), ..job("small.a") };
    let small: Vec<String> = [
        enqueue(b, job("small.a")).await,
        enqueue(b, job("small.b")).await,
        enqueue(b, job("small.a")).await,
        enqueue(b, in_second).await,
    ]
    .into();
    let other = [enqueue(b, job("other")).await, enqueue(b, job("other")).await];
    let room = [PluginRoom { tasks: vec!["small.a".into(), "small.b".into()], free: 1 }];
    let queues = vec!["default".to_string(), "second".to_string()];
    let got = fetch_limited(b, &queues, 6, &[], &room, Duration::from_secs(30)).await;
    assert_eq!(ids(&got), vec![small[0].clone(), other[0].clone(), other[1].clone()], "one of the plugin's, then the others'");
    for id in &small[1..] {
        assert_eq!(status(b, id).await.state, JobState::Queued, "{id} was not leased");
    }
    let rest = fetch_limited(b, &queues, 6, &[], &[], Duration::from_secs(30)).await;
    assert_eq!(rest.len(), 3, "its other jobs are fetched once it has room");
    assert!(rest.iter().all(|d| small[1..].contains(&d.job.id) && d.job.attempt == 0));
}

pub async fn renew_holds_the_lease_until_it_is_lost(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let d = fetch_one(b).await;
    let renewed = b.renew(&d.lease, Duration::from_secs(60)).await.unwrap();
    assert_eq!(renewed, LeaseStatus::Held { cancel_requested: false });
    let stale = Lease { job_id: id.clone(), token: "not-the-token".into() };
    assert_eq!(b.renew(&stale, Duration::from_secs(60)).await.unwrap(), LeaseStatus::Lost);
    let unknown = Lease { job_id: "nope".into(), token: d.lease.token.clone() };
    assert_eq!(b.renew(&unknown, Duration::from_secs(60)).await.unwrap(), LeaseStatus::Lost);
    let outcome = Outcome::Succeeded { result: json!(1) };
    assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
    assert_eq!(b.renew(&d.lease, Duration::from_secs(60)).await.unwrap(), LeaseStatus::Lost);
}

pub async fn a_renewed_lease_is_never_taken_over(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    // Renewed every 100 ms, a 1 s lease outlives its first deadline by far.
    let d = fetch_with(b, 1, &[], Duration::from_millis(1_000)).await.remove(0);
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            b.renew(&d.lease, Duration::from_millis(1_000)).await.unwrap(),
            LeaseStatus::Held { cancel_requested: false }
        );
        assert!(fetch(b, 10).await.is_empty(), "not handed out while renewed");
    }
    assert!(b.complete(&d.lease, Outcome::Succeeded { result: json!(1) }, RunRecord::default()).await.unwrap());
    assert_eq!(status(b, &id).await.job.attempt, 0);
}

pub async fn progress_is_recorded_only_under_the_lease(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let d = fetch_one(b).await;
    b.progress(&d.lease, 3, 10).await.unwrap();
    assert_eq!(status(b, &id).await.progress, Some(Progress { done: 3, total: 10 }));
    let stale = Lease { job_id: id.clone(), token: "stale".into() };
    b.progress(&stale, 9, 10).await.unwrap();
    assert_eq!(status(b, &id).await.progress, Some(Progress { done: 3, total: 10 }));
}

pub async fn complete_succeeded_stores_result_and_a_stale_token_changes_nothing(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let d = fetch_one(b).await;
    let stale = Lease { job_id: id.clone(), token: "stale".into() };
    let wrote =
        b.complete(&stale, Outcome::Succeeded { result: json!("forged") }, RunRecord::default()).await.unwrap();
    assert!(!wrote);
    let s = status(b, &id).await;
    assert_eq!((s.state, s.result), (JobState::Running, None));

    let record = RunRecord {
        plugin: Some("mailer".into()),
        plugin_version: Some("1.2.0".into()),
        touched: Some(json!({"tables": ["users"]})),
        log: Some("sent 1 mail\n".into()),
        progress: Some(Progress { done: 1, total: 1 }),
    };
    let outcome = Outcome::Succeeded { result: json!({"sent": 1}) };
    assert!(b.complete(&d.lease, outcome, record).await.unwrap());
    let s = status(b, &id).await;
    assert_eq!(s.state, JobState::Succeeded);
    assert_eq!(s.result, Some(json!({"sent": 1})));
    assert_eq!(s.error, None);
    assert!(s.finished_at.is_some() && s.started_at.is_some());
    assert_eq!(s.plugin.as_deref(), Some("mailer"));
    assert_eq!(s.plugin_version.as_deref(), Some("1.2.0"));
    assert_eq!(s.touched, Some(json!({"tables": ["users"]})));
    assert_eq!(s.log.as_deref(), Some("sent 1 mail\n"));
    assert_eq!(s.progress, Some(Progress { done: 1, total: 1 }));

    let again = Outcome::Dead { error: err(ErrorKind::Plugin, "late") };
    assert!(!b.complete(&d.lease, again, RunRecord::default()).await.unwrap());
    assert_eq!(status(b, &id).await.state, JobState::Succeeded);
    assert!(fetch(b, 10).await.is_empty());
}

pub async fn retry_counts_an_attempt_and_waits_for_its_time(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let d = fetch_one(b).await;
    let at = Utc::now() + TimeDelta::milliseconds(500);
    let outcome = Outcome::Retry { error: err(ErrorKind::Timeout, "too slow"), at };
    assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
    let s = status(b, &id).await;
    assert_eq!(s.state, JobState::Retrying);
    assert_eq!(s.job.attempt, 1);
    assert_eq!(s.error, Some(err(ErrorKind::Timeout, "too slow")));
    assert_eq!(s.finished_at, None);
    assert!(fetch(b, 10).await.is_empty(), "not before `at`");
    let stats = b.queue_stats().await.unwrap();
    assert_eq!((stats[0].queued, stats[0].delayed, stats[0].running), (0, 1, 0));
    tokio::time::sleep(Duration::from_millis(550)).await;
    let again = fetch_one(b).await;
    assert_eq!((again.job.id.as_str(), again.job.attempt), (id.as_str(), 1));
    assert_ne!(again.lease.token, d.lease.token);
}

pub async fn dead_letters_list_retry_and_purge(b: &dyn Broker) {
    let first = enqueue(b, job("t")).await;
    let second = enqueue(b, job("t")).await;
    for _ in 0..2 {
        let d = fetch_one(b).await;
        let outcome = Outcome::Dead { error: err(ErrorKind::InvalidArgs, "bad") };
        assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = status(b, &first).await;
    assert_eq!(s.state, JobState::Failed);
    assert_eq!(s.error, Some(err(ErrorKind::InvalidArgs, "bad")));
    let dead = b.dead_list(10).await.unwrap();
    assert_eq!(ids_of(&dead), vec![second.clone(), first.clone()], "newest first");
    assert_eq!(b.dead_list(1).await.unwrap().len(), 1);
    assert_eq!(b.queue_stats().await.unwrap()[0].dead, 2);
    assert!(fetch(b, 10).await.is_empty());

    assert_eq!(b.dead_retry(std::slice::from_ref(&first)).await.unwrap(), 1);
    let s = status(b, &first).await;
    assert_eq!((s.state, s.job.attempt, s.error, s.finished_at), (JobState::Queued, 0, None, None));
    let d = fetch_one(b).await;
    assert_eq!(d.job.id, first);
    let outcome = Outcome::Dead { error: err(ErrorKind::Trap, "again") };
    assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());

    assert_eq!(b.dead_retry(&[]).await.unwrap(), 2);
    assert!(b.dead_list(10).await.unwrap().is_empty());
    for d in fetch(b, 10).await {
        let outcome = Outcome::Dead { error: err(ErrorKind::Trap, "for good") };
        assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
    }
    assert_eq!(b.dead_purge().await.unwrap(), 2);
    assert!(b.status(&first).await.unwrap().is_none());
    assert!(b.dead_list(10).await.unwrap().is_empty());
    assert!(b.queue_stats().await.unwrap().is_empty());
}

pub async fn cancel_before_start_means_never_fetched(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let eta = Utc::now() + TimeDelta::seconds(60);
    let scheduled = enqueue(b, NewJob { eta: Some(eta), ..job("t") }).await;
    assert_eq!(b.cancel(&id).await.unwrap(), CancelOutcome::Cancelled);
    assert_eq!(b.cancel(&scheduled).await.unwrap(), CancelOutcome::Cancelled);
    let s = status(b, &id).await;
    assert_eq!(s.state, JobState::Cancelled);
    assert!(s.finished_at.is_some());
    assert_eq!(s.error.map(|e| e.kind), Some(ErrorKind::Cancelled));
    assert!(fetch(b, 10).await.is_empty());
    assert_eq!(b.cancel(&id).await.unwrap(), CancelOutcome::AlreadyFinished);
    assert_eq!(b.cancel("no-such-job").await.unwrap(), CancelOutcome::NotFound);
}

pub async fn cancel_of_a_running_job_is_seen_by_renew(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let d = fetch_one(b).await;
    assert_eq!(b.cancel(&id).await.unwrap(), CancelOutcome::StopRequested);
    assert_eq!(status(b, &id).await.state, JobState::Running);
    let renewed = b.renew(&d.lease, Duration::from_secs(30)).await.unwrap();
    assert_eq!(renewed, LeaseStatus::Held { cancel_requested: true });
    let outcome = Outcome::Cancelled { error: err(ErrorKind::Cancelled, "stopped") };
    assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
    let s = status(b, &id).await;
    assert_eq!((s.state, s.error), (JobState::Cancelled, Some(err(ErrorKind::Cancelled, "stopped"))));
    assert_eq!(b.cancel(&id).await.unwrap(), CancelOutcome::AlreadyFinished);
}

pub async fn a_retry_reported_after_a_stop_request_cancels_instead(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let d = fetch_one(b).await;
    assert_eq!(b.cancel(&id).await.unwrap(), CancelOutcome::StopRequested);
    let outcome = Outcome::Retry { error: err(ErrorKind::Trap, "boom"), at: Utc::now() };
    assert!(b.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
    let s = status(b, &id).await;
    assert_eq!(s.state, JobState::Cancelled);
    assert_eq!(s.error.map(|e| e.kind), Some(ErrorKind::Cancelled));
    assert!(fetch(b, 10).await.is_empty());
}

pub async fn an_expired_job_is_never_delivered(b: &dyn Broker) {
    let past = Utc::now() - TimeDelta::seconds(1);
    let id = enqueue(b, NewJob { expires_at: Some(past), ..job("t") }).await;
    let future = Utc::now() + TimeDelta::seconds(60);
    let fresh = enqueue(b, NewJob { expires_at: Some(future), ..job("t") }).await;
    let got = fetch(b, 10).await;
    assert_eq!(ids(&got), vec![fresh]);
    let s = status(b, &id).await;
    assert_eq!(s.state, JobState::Expired);
    assert!(s.finished_at.is_some());
    assert!(fetch(b, 10).await.is_empty());
    assert_eq!(b.cancel(&id).await.unwrap(), CancelOutcome::AlreadyFinished);
}

pub async fn an_idempotency_key_returns_the_first_job(b: &dyn Broker) {
    let keyed = NewJob { idempotency_key: Some("order-42".into()), ..job("t") };
    let first = b.enqueue(keyed.clone()).await.unwrap();
    assert!(!first.existing);
    let second = b.enqueue(NewJob { priority: 9, ..keyed }).await.unwrap();
    assert_eq!(second, Enqueued { id: first.id.clone(), existing: true });
    let other = b.enqueue(NewJob { idempotency_key: Some("order-43".into()), ..job("t") });
    assert_ne!(other.await.unwrap().id, first.id);
    assert_eq!(fetch(b, 10).await.len(), 2);
}

pub async fn an_expired_lease_is_redelivered_as_a_new_attempt(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    // Leases of 400 ms: a loaded machine must not stall a fetch past half
    // of one (the Redis fetch then leaves its jobs to a take-over).
    let first = fetch_with(b, 1, &[], Duration::from_millis(400)).await.remove(0);
    assert_eq!(first.job.attempt, 0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = fetch_one(b).await;
    assert_eq!((second.job.id.as_str(), second.job.attempt), (id.as_str(), 1));
    assert_ne!(second.lease.token, first.lease.token);
    let late = Outcome::Succeeded { result: json!("from the dead host") };
    assert!(!b.complete(&first.lease, late, RunRecord::default()).await.unwrap());
    assert_eq!(b.renew(&first.lease, Duration::from_secs(30)).await.unwrap(), LeaseStatus::Lost);
    let outcome = Outcome::Succeeded { result: json!("from the new host") };
    assert!(b.complete(&second.lease, outcome, RunRecord::default()).await.unwrap());
    assert_eq!(status(b, &id).await.result, Some(json!("from the new host")));
}

pub async fn an_expired_lease_with_no_retry_left_fails_as_lost(b: &dyn Broker) {
    let id = enqueue(b, NewJob { max_retries: 0, ..job("t") }).await;
    let d = fetch_with(b, 1, &[], Duration::from_millis(400)).await.remove(0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(fetch(b, 10).await.is_empty());
    let s = status(b, &id).await;
    assert_eq!(s.state, JobState::Failed);
    assert_eq!(s.error.as_ref().map(|e| e.kind), Some(ErrorKind::Lost));
    assert_eq!(ids_of(&b.dead_list(10).await.unwrap()), vec![id]);
    let late = Outcome::Succeeded { result: json!(1) };
    assert!(!b.complete(&d.lease, late, RunRecord::default()).await.unwrap());
}

pub async fn a_stop_requested_on_a_vanished_host_ends_cancelled(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let _d = fetch_with(b, 1, &[], Duration::from_millis(400)).await.remove(0);
    assert_eq!(b.cancel(&id).await.unwrap(), CancelOutcome::StopRequested);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fetch(b, 10).await.is_empty(), "not redelivered");
    assert_eq!(status(b, &id).await.state, JobState::Cancelled);
}

pub async fn release_gives_the_job_back_with_the_same_attempt(b: &dyn Broker) {
    let id = enqueue(b, job("t")).await;
    let d = fetch_one(b).await;
    b.release(&d.lease).await.unwrap();
    let s = status(b, &id).await;
    assert_eq!((s.state, s.job.attempt, s.host), (JobState::Queued, 0, None));
    assert!(!b.complete(&d.lease, Outcome::Succeeded { result: json!(1) }, RunRecord::default()).await.unwrap());
    let again = fetch_one(b).await;
    assert_eq!((again.job.id.as_str(), again.job.attempt), (id.as_str(), 0));
    let stale = Lease { job_id: id.clone(), token: "stale".into() };
    b.release(&stale).await.unwrap();
    assert_eq!(status(b, &id).await.state, JobState::Running, "a stale release does nothing");
}

pub async fn queue_stats_count_per_queue(b: &dyn Broker) {
    enqueue(b, job("t")).await;
    enqueue(b, job("t")).await;
    let later = Utc::now() + TimeDelta::seconds(60);
    enqueue(b, NewJob { eta: Some(later), ..job("t") }).await;
    enqueue(b, NewJob { queue: "mail".into(), ..job("t") }).await;
    let _running = fetch_one(b).await;
    let stats = b.queue_stats().await.unwrap();
    assert_eq!(
        stats,
        vec![
            QueueStats { queue: "default".into(), queued: 1, delayed: 1, running: 1, dead: 0 },
            QueueStats { queue: "mail".into(), queued: 1, delayed: 0, running: 0, dead: 0 },
        ]
    );
}

/// Several workers on handles of the same broker: every job delivered exactly once.
pub async fn concurrent_workers_deliver_every_job_exactly_once(brokers: Vec<Arc<dyn Broker>>) {
    let mut all = HashSet::new();
    for i in 0..200 {
        let producer = &brokers[i % brokers.len()];
        all.insert(enqueue(&**producer, NewJob { priority: (i % 3) as i32, ..job("t") }).await);
    }
    let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..6usize {
        let broker = brokers[w % brokers.len()].clone();
        let delivered = delivered.clone();
        workers.push(tokio::spawn(async move {
            let queues = default_queue();
            let host = format!("host-{w}");
            loop {
                let req = FetchRequest {
                    host: &host,
                    queues: &queues,
                    exclude_tasks: &[],
                    limited: &[],
                    max: 1 + w % 4,
                    lease: Duration::from_secs(60),
                    wait_longer: None,
                };
                let got = broker.fetch(req).await.expect("fetch");
                if got.is_empty() {
                    break;
                }
                for d in got {
                    let outcome = Outcome::Succeeded { result: json!(w) };
                    assert!(broker.complete(&d.lease, outcome, RunRecord::default()).await.unwrap());
                    delivered.lock().unwrap().push(d.job.id);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let delivered = delivered.lock().unwrap().clone();
    let unique: HashSet<String> = delivered.iter().cloned().collect();
    assert_eq!(delivered.len(), 200, "no job delivered twice");
    assert_eq!(unique, all, "every job delivered");
    for id in &all {
        assert_eq!(status(&*brokers[0], id).await.state, JobState::Succeeded);
    }
}

/// One `#[tokio::test]` per case above. `$make` is an async expression
/// giving `(guard, Arc<dyn Broker>)`: a fresh, empty broker, kept alive
/// with its guard (a temp dir, a key prefix to clean up…).
#[macro_export]
#[doc(hidden)]
macro_rules! broker_suite {
    ($make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_guard, broker) = $make.await;
                $crate::broker::suite::$case(&*broker).await;
            }
        )*
    };
    ($make:expr) => {
        $crate::broker_suite!($make;
            enqueue_stores_a_queued_job_and_status_reads_it_back,
            invalid_jobs_are_refused,
            eta_schedules_the_job_and_it_is_not_fetched_before_its_time,
            fetch_leases_by_priority_respects_max_queues_and_excluded_tasks,
            a_plugin_with_little_room_gets_no_more_jobs_than_it_can_start,
            renew_holds_the_lease_until_it_is_lost,
            a_renewed_lease_is_never_taken_over,
            progress_is_recorded_only_under_the_lease,
            complete_succeeded_stores_result_and_a_stale_token_changes_nothing,
            retry_counts_an_attempt_and_waits_for_its_time,
            dead_letters_list_retry_and_purge,
            cancel_before_start_means_never_fetched,
            cancel_of_a_running_job_is_seen_by_renew,
            a_retry_reported_after_a_stop_request_cancels_instead,
            an_expired_job_is_never_delivered,
            an_idempotency_key_returns_the_first_job,
            an_expired_lease_is_redelivered_as_a_new_attempt,
            an_expired_lease_with_no_retry_left_fails_as_lost,
            a_stop_requested_on_a_vanished_host_ends_cancelled,
            release_gives_the_job_back_with_the_same_attempt,
            queue_stats_count_per_queue,
            hosts_and_ping_show_who_holds_running_jobs,
        );
    };
}

/// `celer inspect` and `/readyz`: the broker answers a ping, and lists the
/// host holding running jobs with how many it holds, none once they end.
pub async fn hosts_and_ping_show_who_holds_running_jobs(b: &dyn Broker) {
    b.ping().await.expect("ping");
    enqueue(b, job("t")).await;
    enqueue(b, job("t")).await;
    let leased = fetch(b, 2).await;
    assert_eq!(leased.len(), 2);
    let hosts = b.hosts().await.expect("hosts");
    let me = hosts.iter().find(|h| h.host == HOST).unwrap_or_else(|| panic!("{HOST} listed: {hosts:?}"));
    assert_eq!(me.running, 2, "{hosts:?}");
    for d in &leased {
        assert!(b.complete(&d.lease, Outcome::Succeeded { result: json!(null) }, RunRecord::default()).await.unwrap());
    }
    let hosts = b.hosts().await.expect("hosts");
    assert!(hosts.iter().all(|h| h.running == 0), "nothing runs any more: {hosts:?}");
}

/// The embedded broker against the shared suite (its SQL-specific tests
/// stay in `embedded.rs`).
mod embedded {
    use std::sync::Arc;

    use crate::broker::Broker;
    use crate::broker::embedded::EmbeddedBroker;

    async fn fresh() -> (tempfile::TempDir, Arc<dyn Broker>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = EmbeddedBroker::open(&dir.path().join("celer.db")).await.expect("open");
        (dir, Arc::new(broker))
    }

    crate::broker_suite!(fresh());
}

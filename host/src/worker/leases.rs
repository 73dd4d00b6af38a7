//! Keeps the leases of every running job of one worker alive from a single
//! task, instead of a timer task per job: a short job then costs no task
//! spawn, timer or wake-up for its lease, and a host running many long jobs
//! renews them all in one concurrent round. The same task forwards cancel
//! requests and lease loss to the guests and publishes their progress; when
//! the broker pushes stop requests, it renews the named job's lease at once
//! (which is how the stop is confirmed) instead of at its next turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::{broadcast, watch};

use crate::broker::{Broker, Lease, LeaseStatus};
use crate::job::Progress;
use crate::runtime::sandbox::{JobControl, StopReason};

/// Running jobs, by lease token (one job id can run twice on a host when
/// its lease lapsed and this host took it back: each run keeps its own);
/// shared by the worker and the keeper task.
#[derive(Default)]
pub struct RunningJobs {
    jobs: Mutex<HashMap<String, Tracked>>,
}

struct Tracked {
    lease: Lease,
    control: Arc<JobControl>,
    progress: watch::Receiver<Option<Progress>>,
    renewed: Instant,
}

/// Removes its job from [`RunningJobs`] when the run ends, however it ends.
pub struct Registration {
    jobs: Arc<RunningJobs>,
    token: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.jobs.jobs.lock() {
            jobs.remove(&self.token);
        }
    }
}

impl RunningJobs {
    /// Starts keeping `lease` alive until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, lease: &Lease, control: &Arc<JobControl>) -> Registration {
        let tracked = Tracked {
            lease: lease.clone(),
            control: control.clone(),
            progress: control.progress(),
            renewed: Instant::now(),
        };
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(lease.token.clone(), tracked);
        }
        Registration { jobs: self.clone(), token: lease.token.clone() }
    }

    /// Asks every running guest to stop (shutdown after the grace period).
    pub fn stop_all(&self, reason: StopReason) {
        if let Ok(jobs) = self.jobs.lock() {
            for t in jobs.values() {
                t.control.stop(reason);
            }
        }
    }

    /// Renews every lease older than a third of `ttl` and publishes changed
    /// progress, each `tick`, until the worker drops its handle.
    pub async fn keep(self: Arc<Self>, broker: Arc<dyn Broker>, ttl: Duration) {
        let tick = (ttl / 6).min(PROGRESS_EVERY);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stops = broker.stop_requests();
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                id = next_stop(&mut stops) => {
                    // Off this loop: a slow broker must not hold up the regular round.
                    for (lease, control) in self.named(&id) {
                        tokio::spawn(renew(broker.clone(), lease, control, ttl));
                    }
                    continue;
                }
            }
            // The worker's own handle is gone: it stopped.
            if Arc::strong_count(&self) == 1 {
                return;
            }
            let (renew_now, progress) = self.due(ttl);
            let renewals = renew_now.into_iter().map(|(lease, control)| renew(broker.clone(), lease, control, ttl));
            let published = progress.into_iter().map(|(lease, p)| {
                let broker = broker.clone();
                async move {
                    if let Err(e) = broker.progress(&lease, p.done, p.total).await {
                        tracing::debug!(job_id = %lease.job_id, error = %e, "cannot publish progress");
                    }
                }
            });
            tokio::join!(join_all(renewals), join_all(published));
        }
    }

    /// The runs of job `id` on this host.
    fn named(&self, id: &str) -> Vec<(Lease, Arc<JobControl>)> {
        let Ok(jobs) = self.jobs.lock() else { return Vec::new() };
        jobs.values().filter(|t| t.lease.job_id == id).map(|t| (t.lease.clone(), t.control.clone())).collect()
    }

    /// The leases to renew now (marked renewed) and the progress reports
    /// not yet published.
    fn due(&self, ttl: Duration) -> (Vec<(Lease, Arc<JobControl>)>, Vec<(Lease, Progress)>) {
        let now = Instant::now();
        let (mut renew, mut progress) = (Vec::new(), Vec::new());
        let Ok(mut jobs) = self.jobs.lock() else { return (renew, progress) };
        for t in jobs.values_mut() {
            if now.duration_since(t.renewed) >= ttl / 3 {
                t.renewed = now;
                renew.push((t.lease.clone(), t.control.clone()));
            }
            if t.progress.has_changed().unwrap_or(false) {
                if let Some(p) = *t.progress.borrow_and_update() {
                    progress.push((t.lease.clone(), p));
                }
            }
        }
        (renew, progress)
    }
}

/// Renews one lease and passes on what the renewal says: a stop request,
/// or that another worker owns the job now.
async fn renew(broker: Arc<dyn Broker>, lease: Lease, control: Arc<JobControl>, ttl: Duration) {
    match broker.renew(&lease, ttl).await {
        Ok(LeaseStatus::Held { cancel_requested: true }) => control.stop(StopReason::Cancelled),
        Ok(LeaseStatus::Held { cancel_requested: false }) => {}
        Ok(LeaseStatus::Lost) => control.stop(StopReason::LeaseLost),
        Err(e) => tracing::warn!(job_id = %lease.job_id, error = %e, "cannot renew lease; will try again"),
    }
}

/// The next stop request pushed by the broker; never, when it pushes none.
async fn next_stop(stops: &mut Option<broadcast::Receiver<String>>) -> String {
    loop {
        let Some(rx) = stops.as_mut() else { return std::future::pending().await };
        match rx.recv().await {
            Ok(id) => return id,
            // Missed some: their jobs stop at their next renewal.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => *stops = None,
        }
    }
}

/// At most this often a running job's progress is written to the broker.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(token: &str) -> Lease {
        Lease { job_id: "job-1".into(), token: token.into() }
    }

    /// A job whose lease lapsed can be taken back by the same host: the
    /// old run ending must not stop the new run's renewals.
    #[test]
    fn two_runs_of_one_job_keep_their_own_leases() {
        let jobs = Arc::new(RunningJobs::default());
        let (old, new) = (Arc::new(JobControl::default()), Arc::new(JobControl::default()));
        let old_run = jobs.register(&lease("t-old"), &old);
        let _new_run = jobs.register(&lease("t-new"), &new);
        drop(old_run);
        let ttl = Duration::ZERO; // everything is due
        let (renew, _) = jobs.due(ttl);
        assert_eq!(renew.iter().map(|(l, _)| l.token.as_str()).collect::<Vec<_>>(), vec!["t-new"]);
        jobs.stop_all(StopReason::Shutdown);
        assert_eq!((old.stopped(), new.stopped()), (None, Some(StopReason::Shutdown)));
    }
}

//! Limits an operator puts on one task of a running host, without a
//! restart: how often its jobs may start (Celery's `rate_limit`, e.g. a
//! mail provider throttling the host) and how long one may run (Celery's
//! `time_limit`), as Flower's task page and `celery control` send them.
//! Per host, like a Celery worker's; not kept across a restart.
//!
//! A rate is a token bucket holding at most one start, as in Celery: a
//! task at `10/m` starts a job at most every 6 s on this host. A task out
//! of tokens is left out of the next fetch (its jobs stay in the queue
//! for a host, or a moment, that can take them), so nothing is hoarded.
//! A time limit only shortens: a job runs for the shorter of its own
//! timeout (or its plugin's `limits.timeout_s`) and the limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The limits set on this host's tasks, by task name (a plugin task, not
/// an alias); shared by its worker loops and its Celery consumer.
#[derive(Clone, Debug, Default)]
pub struct TaskLimits {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Whether any limit is set: the hot path reads only this when none is.
    any: AtomicBool,
    by_task: Mutex<HashMap<String, Limits>>,
}

#[derive(Debug, Default)]
struct Limits {
    rate: Option<Bucket>,
    time: Option<Duration>,
}

/// What a fetch may start of the rate-limited tasks ([`TaskLimits::starts_available`]).
#[derive(Debug, Default, PartialEq)]
pub struct Starts {
    /// Tasks with no start available now.
    pub none: Vec<String>,
    /// Tasks with some, and how many.
    pub some: Vec<(String, usize)>,
    /// When the first of `none` has a start again (at most [`MAX_WAIT`]).
    pub next_in: Option<Duration>,
}

/// The longest a fetch waits for a rate-limited task's next start: a slow
/// rate's next start may be hours away, and a waiting fetch holds up a
/// shutdown and the take-over of a dead host's jobs by this host.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// One start's worth of tokens at most, refilled at `per_s`.
#[derive(Debug)]
struct Bucket {
    per_s: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    const CAPACITY: f64 = 1.0;

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_s).min(Self::CAPACITY);
        self.at = now;
    }
}

/// A rate Celery accepts: a number of starts per second, or `"<n>/s"`,
/// `"<n>/m"`, `"<n>/h"`; 0, an empty string or null turn the limit off
/// (`Ok(None)`).
pub fn parse_rate(rate: &serde_json::Value) -> Result<Option<f64>, String> {
    use serde_json::Value;
    let per_s = match rate {
        Value::Null => 0.0,
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n}"))?,
        Value::String(s) if s.is_empty() => 0.0,
        Value::String(s) => {
            let (n, unit) = s.split_once('/').unwrap_or((s.as_str(), "s"));
            let n: f64 = n.trim().parse().map_err(|_| format!("{s:?}: {n:?} is not a number"))?;
            match unit.trim() {
                "s" | "" => n,
                "m" => n / 60.0,
                "h" => n / 3600.0,
                other => return Err(format!("{s:?}: unit {other:?} is not s, m or h")),
            }
        }
        other => return Err(format!("{other}")),
    };
    if !per_s.is_finite() || per_s < 0.0 {
        return Err(format!("{rate}: not a rate"));
    }
    Ok((per_s > 0.0).then_some(per_s))
}

impl TaskLimits {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Limits>> {
        // A panic while holding it leaves a map that is still whole.
        self.shared.by_task.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self, map: &mut HashMap<String, Limits>) {
        map.retain(|_, l| l.rate.is_some() || l.time.is_some());
        self.shared.any.store(!map.is_empty(), Ordering::Relaxed);
    }

    /// Sets (`Some`, starts per second) or lifts (`None`) the rate of
    /// `task`. A new rate starts with one start available.
    pub fn set_rate(&self, task: &str, per_s: Option<f64>) {
        let mut map = self.lock();
        let limits = map.entry(task.to_string()).or_default();
        limits.rate = per_s.map(|per_s| Bucket { per_s, tokens: Bucket::CAPACITY, at: Instant::now() });
        self.changed(&mut map);
        tracing::warn!(task, per_s, "task rate limit changed by remote control");
    }

    /// Sets (`Some`) or lifts (`None`) the time limit of `task`.
    pub fn set_time(&self, task: &str, limit: Option<Duration>) {
        let mut map = self.lock();
        map.entry(task.to_string()).or_default().time = limit;
        self.changed(&mut map);
        tracing::warn!(task, limit_ms = limit.map(|l| l.as_millis() as u64), "task time limit changed by remote control");
    }

    /// For a fetch: the rate-limited tasks with no start available now,
    /// those with some (with how many, at most `max`), and how soon the
    /// first of the former has one again.
    pub fn starts_available(&self, max: usize) -> Starts {
        let mut starts = Starts::default();
        if !self.shared.any.load(Ordering::Relaxed) {
            return starts;
        }
        let now = Instant::now();
        for (task, limits) in self.lock().iter_mut() {
            let Some(bucket) = &mut limits.rate else { continue };
            bucket.refill(now);
            match bucket.tokens.floor() {
                n if n < 1.0 => {
                    starts.none.push(task.clone());
                    let due = Duration::from_secs_f64(((1.0 - bucket.tokens) / bucket.per_s).min(MAX_WAIT.as_secs_f64()));
                    starts.next_in = Some(starts.next_in.map_or(due, |d: Duration| d.min(due)));
                }
                n => starts.some.push((task.clone(), (n as usize).min(max))),
            }
        }
        starts
    }

    /// A job of `task` was taken: one start is used (a job taken past the
    /// tokens, such as one taken over from a dead host, delays the next).
    pub fn took(&self, task: &str) {
        if !self.shared.any.load(Ordering::Relaxed) {
            return;
        }
        if let Some(bucket) = self.lock().get_mut(task).and_then(|l| l.rate.as_mut()) {
            bucket.refill(Instant::now());
            bucket.tokens -= 1.0;
        }
    }

    /// The time limit set on `task`, if any.
    pub fn time_limit(&self, task: &str) -> Option<Duration> {
        if !self.shared.any.load(Ordering::Relaxed) {
            return None;
        }
        self.lock().get(task).and_then(|l| l.time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rates_read_as_celery_reads_them() {
        assert_eq!(parse_rate(&json!("10/m")), Ok(Some(10.0 / 60.0)));
        assert_eq!(parse_rate(&json!("0.5/s")), Ok(Some(0.5)));
        assert_eq!(parse_rate(&json!("36/h")), Ok(Some(0.01)));
        assert_eq!(parse_rate(&json!("4")), Ok(Some(4.0)));
        assert_eq!(parse_rate(&json!(2)), Ok(Some(2.0)));
        for off in [json!(0), json!(""), json!(null), json!("0/m")] {
            assert_eq!(parse_rate(&off), Ok(None), "{off}");
        }
        for bad in [json!("x/m"), json!("10/d"), json!("-1/s"), json!([1])] {
            assert!(parse_rate(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rate_allows_one_start_then_refills_at_its_pace() {
        let limits = TaskLimits::default();
        assert_eq!(limits.starts_available(8), Starts::default(), "no limit set");
        limits.set_rate("mail.send", Some(20.0));
        assert_eq!(limits.starts_available(8).some, vec![("mail.send".to_string(), 1)], "one start at first");
        limits.took("mail.send");
        limits.took("other.task");
        let held = limits.starts_available(8);
        assert_eq!((held.none, held.some), (vec!["mail.send".to_string()], vec![]), "none until refilled");
        assert!(held.next_in.is_some_and(|d| d > Duration::from_millis(30) && d <= Duration::from_millis(50)), "the next start is 1/20 s after the last: {:?}", held.next_in);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limits.starts_available(8).some, vec![("mail.send".to_string(), 1)], "refilled after 1/20 s, never past one");
        limits.set_rate("mail.send", None);
        assert_eq!(limits.starts_available(8), Starts::default(), "lifted");
    }

    #[test]
    fn a_time_limit_is_kept_until_lifted_and_independent_of_the_rate() {
        let limits = TaskLimits::default();
        assert_eq!(limits.time_limit("t"), None);
        limits.set_time("t", Some(Duration::from_millis(400)));
        limits.set_rate("t", Some(1.0));
        limits.set_rate("t", None);
        assert_eq!(limits.time_limit("t"), Some(Duration::from_millis(400)));
        limits.set_time("t", None);
        assert_eq!(limits.time_limit("t"), None);
        assert!(!limits.shared.any.load(Ordering::Relaxed), "nothing left to check on the hot path");
    }
}

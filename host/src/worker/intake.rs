//! How much work a host takes in now: how many of its `[worker]
//! concurrency` slots it uses, and which of its queues it leaves alone.
//! An operator changes both without a restart — fewer slots while
//! something downstream (a database, a mail provider) struggles, a queue
//! left to the other hosts while this one is drained — through Celery's
//! remote control (`pool_shrink` / `pool_grow` / `autoscale`,
//! `cancel_consumer` / `add_consumer`, as Flower's buttons send them).
//! Limits on single tasks (`rate_limit`, `time_limit`) ride along
//! ([`TaskLimits`]). Never more slots than configured: the sandbox's
//! instance pool is sized for that at start. Jobs already running finish;
//! the host just takes fewer new ones. Not kept across a restart.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;

use super::task_limits::TaskLimits;

/// What the host takes now, shared by its worker loops (each shard sees
/// its part of the slots, as with `concurrency`) and its Celery consumer.
#[derive(Clone, Debug)]
pub struct Intake {
    now: Arc<watch::Sender<Now>>,
    configured: usize,
    /// This loop's place among the host's shards: (shards, index).
    part: (usize, usize),
    /// Rate and time limits set on single tasks.
    limits: TaskLimits,
}

/// The host-wide settings, read through [`Intake`]; one channel, so that a
/// loop waiting for a change of either wakes.
#[derive(Clone, Debug, PartialEq)]
pub struct Now {
    slots: usize,
    paused: BTreeSet<String>,
}

impl Intake {
    /// All `configured` slots in use and every queue taken, as at start.
    pub fn new(configured: usize) -> Self {
        let now = Now { slots: configured, paused: BTreeSet::new() };
        Intake { now: Arc::new(watch::Sender::new(now)), configured, part: (1, 0), limits: TaskLimits::default() }
    }

    /// The rate and time limits set on single tasks of this host.
    pub fn limits(&self) -> &TaskLimits {
        &self.limits
    }

    /// The host-wide slots in use now.
    pub fn slots(&self) -> usize {
        self.now.borrow().slots
    }

    /// The configured concurrency, the most slots allowed.
    pub fn configured(&self) -> usize {
        self.configured
    }

    /// Sets the host-wide slots in use (at most the configured number);
    /// returns what it is now.
    pub fn set_slots(&self, slots: usize) -> usize {
        self.change_slots(|_| slots)
    }

    /// Adds `n` slots (up to the configured number), in one step with
    /// reading the size; `Err` with the size when it is already full.
    pub fn grow(&self, n: usize) -> Result<usize, usize> {
        let now = self.slots();
        if now >= self.configured {
            return Err(now);
        }
        Ok(self.change_slots(|now| now.saturating_add(n)))
    }

    /// Takes `n` slots away (down to none), in one step with reading the
    /// size; returns the size now.
    pub fn shrink(&self, n: usize) -> usize {
        self.change_slots(|now| now.saturating_sub(n))
    }

    fn change_slots(&self, to: impl FnOnce(usize) -> usize) -> usize {
        let configured = self.configured;
        let (mut before, mut after) = (0, 0);
        self.now.send_if_modified(|now| {
            before = now.slots;
            now.slots = to(now.slots).min(configured);
            after = now.slots;
            before != after
        });
        if before != after {
            tracing::warn!(before, now = after, configured, "worker pool size changed by remote control");
        }
        after
    }

    /// Stops (`true`) or resumes taking jobs from `queue` on this host.
    pub fn pause(&self, queue: &str, paused: bool) {
        let changed = self.now.send_if_modified(|now| match paused {
            true => now.paused.insert(queue.to_string()),
            false => now.paused.remove(queue),
        });
        if changed {
            tracing::warn!(queue, paused, "queue consumption on this host changed by remote control");
        }
    }

    /// Whether this host leaves `queue` alone now.
    pub fn is_paused(&self, queue: &str) -> bool {
        self.now.borrow().paused.contains(queue)
    }

    /// Of `queues`, those this host takes jobs from now.
    pub(super) fn taken<'a>(&self, queues: &'a [String]) -> Cow<'a, [String]> {
        let now = self.now.borrow();
        if now.paused.is_empty() {
            return Cow::Borrowed(queues);
        }
        Cow::Owned(queues.iter().filter(|q| !now.paused.contains(*q)).cloned().collect())
    }

    /// The view of shard `index` of `shards`.
    pub(super) fn for_shard(&self, shards: usize, index: usize) -> Intake {
        Intake { part: (shards, index), ..self.clone() }
    }

    /// This loop's share of the slots in use now.
    pub(super) fn mine(&self) -> usize {
        let (shards, index) = self.part;
        share(self.slots(), shards, index)
    }

    /// Wakes a waiting loop when the slots or the paused queues change.
    pub fn watch(&self) -> watch::Receiver<Now> {
        self.now.subscribe()
    }
}

/// Shard `i`'s part of `total` split over `shards`: the parts differ by at
/// most one and add up to `total`.
pub(super) fn share(total: usize, shards: usize, i: usize) -> usize {
    let shards = shards.max(1);
    total / shards + usize::from(i < total % shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_see_their_part_of_the_slots_and_never_more_than_configured() {
        let host = Intake::new(10);
        let (a, b) = (host.for_shard(2, 0), host.for_shard(2, 1));
        assert_eq!((a.mine(), b.mine()), (5, 5));
        assert_eq!(host.set_slots(3), 3);
        assert_eq!((a.mine(), b.mine()), (2, 1));
        assert_eq!(host.set_slots(50), 10);
        assert_eq!(a.mine() + b.mine(), 10);
        assert_eq!(host.set_slots(0), 0);
        assert_eq!((a.mine(), b.mine()), (0, 0));
        assert_eq!(host.grow(4), Ok(4));
        assert_eq!(host.shrink(9), 0);
        assert_eq!(host.grow(99), Ok(10));
        assert_eq!(host.grow(1), Err(10));
    }

    #[test]
    fn a_paused_queue_is_left_out_until_resumed() {
        let host = Intake::new(4);
        let queues = vec!["a".to_string(), "b".to_string()];
        let woken = host.watch();
        host.pause("a", true);
        assert!(woken.has_changed().unwrap_or(false));
        assert!(host.for_shard(2, 1).is_paused("a"));
        assert_eq!(host.taken(&queues).as_ref(), ["b".to_string()]);
        host.pause("a", false);
        assert_eq!(host.taken(&queues).as_ref(), queues.as_slice());
    }
}

//! How many of its `[worker] concurrency` slots a host uses now. An
//! operator lowers it without a restart when something downstream (a
//! database, a mail provider) is struggling, and raises it back later:
//! Celery's `pool_shrink` / `pool_grow` / `autoscale`, as Flower's pool
//! buttons send them. Never above the configured concurrency: the
//! sandbox's instance pool is sized for that at start. Jobs already
//! running finish; the host just takes fewer new ones. Not kept across a
//! restart.

use std::sync::Arc;

use tokio::sync::watch;

/// The host-wide number of slots in use now, seen by each worker loop as
/// its own share of it (a shard gets its part, as with `concurrency`).
#[derive(Clone, Debug)]
pub struct Capacity {
    now: Arc<watch::Sender<usize>>,
    configured: usize,
    /// This loop's place among the host's shards: (shards, index).
    part: (usize, usize),
}

impl Capacity {
    /// All `configured` slots in use, as at start.
    pub fn new(configured: usize) -> Self {
        Capacity { now: Arc::new(watch::Sender::new(configured)), configured, part: (1, 0) }
    }

    /// The host-wide slots in use now.
    pub fn get(&self) -> usize {
        *self.now.borrow()
    }

    /// The configured concurrency, the most `set` allows.
    pub fn configured(&self) -> usize {
        self.configured
    }

    /// Sets the host-wide slots in use (at most the configured number);
    /// returns what it is now.
    pub fn set(&self, slots: usize) -> usize {
        let slots = slots.min(self.configured);
        let before = self.now.send_replace(slots);
        if before != slots {
            tracing::warn!(before, now = slots, configured = self.configured, "worker capacity changed by remote control");
        }
        slots
    }

    /// The view of shard `index` of `shards`.
    pub(super) fn for_shard(&self, shards: usize, index: usize) -> Capacity {
        Capacity { part: (shards, index), ..self.clone() }
    }

    /// This loop's share of the slots in use now.
    pub(super) fn mine(&self) -> usize {
        let (shards, index) = self.part;
        share(self.get(), shards, index)
    }

    /// Wakes a waiting loop when the capacity changes.
    pub(super) fn watch(&self) -> watch::Receiver<usize> {
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
    fn shards_see_their_part_of_what_is_set_and_never_more_than_configured() {
        let host = Capacity::new(10);
        let (a, b) = (host.for_shard(2, 0), host.for_shard(2, 1));
        assert_eq!((a.mine(), b.mine()), (5, 5));
        assert_eq!(host.set(3), 3);
        assert_eq!((a.mine(), b.mine()), (2, 1));
        assert_eq!(host.set(50), 10);
        assert_eq!(a.mine() + b.mine(), 10);
        assert_eq!(host.set(0), 0);
        assert_eq!((a.mine(), b.mine()), (0, 0));
    }
}

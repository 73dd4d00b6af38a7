//! The leases this host holds, and when Redis last confirmed each one.
//!
//! A lease can only be taken over once its entry sat idle for the holder's
//! whole lease, and every fetch or renewal resets that idle time. So while
//! less than half a lease has passed since the last confirmation was *sent*,
//! no other host can hold the job, and the outcome of a successful run can
//! be written with a plain pipeline instead of the token-checking script (the
//! hot path's largest Redis cost, see `docs/redis.md`), provided the write
//! lands in that window too: [`WRITE_MARGIN`] is kept free for it, and the
//! check is made again when the write is sent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The longest a write can be on its way: the connection's response
/// timeout, after which the client gives up on it.
pub const WRITE_MARGIN: Duration = super::RESPONSE_TIMEOUT;

/// One lease held by this host.
#[derive(Debug, Clone)]
pub struct HeldLease {
    /// When the fetch or renewal that last confirmed it was sent.
    pub confirmed: Instant,
    pub lease: Duration,
    /// The stream and entry id that hold it (acked and deleted at the end).
    pub stream: String,
    pub entry: String,
    /// Attempt number (an attempt after the first may carry an old error).
    pub attempt: u32,
    /// The job's idempotency key, which expires with it.
    pub idempotency_key: Option<String>,
    /// Whether Redis has answered the fetch's `running` mark of the job.
    pub marked: Marked,
}

/// Whether the `running` mark of a fetched job has been answered.
///
/// A fetch hands its jobs to the worker as soon as the stream read returns
/// and sends their marks (state, lease token, host, start time) without
/// waiting: waiting cost a round trip per fetch during which a busy host sat
/// idle. Everything this host later writes about such a job (its outcome, a
/// hand-back, a renewal, progress) waits for the mark's answer first, so it
/// always lands after the mark, never under it. A mark that failed is
/// logged; the outcome is written all the same (the lease timing of the
/// read still holds), and an outcome the scripts cannot check against the
/// missing token is dropped: the job runs again once its lease lapses.
#[derive(Debug, Clone)]
pub struct Marked(Option<watch::Receiver<bool>>);

impl Marked {
    /// A job marked before it was handed out (by a script).
    pub fn landed() -> Marked {
        Marked(None)
    }

    /// A mark on its way: answer through the sender, once, when it returns.
    pub fn pending() -> (watch::Sender<bool>, Marked) {
        let (tx, rx) = watch::channel(false);
        (tx, Marked(Some(rx)))
    }

    /// Returns once the mark was answered (or its sender is gone).
    pub async fn wait(&self) {
        if let Some(rx) = &self.0 {
            let mut rx = rx.clone();
            let _ = rx.wait_for(|answered| *answered).await;
        }
    }
}

impl HeldLease {
    /// True while no other host can possibly take the job over before a
    /// write sent now lands.
    pub fn certainly_held(&self) -> bool {
        self.confirmed.elapsed() + WRITE_MARGIN < self.lease / 2
    }
}

/// Leases by token.
#[derive(Debug, Default)]
pub struct HeldLeases {
    by_token: Mutex<HashMap<String, HeldLease>>,
}

impl HeldLeases {
    /// Remembered at fetch so that the completion can take the one-round-trip path while
    /// the lease is fresh.
    pub fn insert(&self, token: String, lease: HeldLease) {
        if let Ok(mut m) = self.by_token.lock() {
            m.insert(token, lease);
        }
    }

    /// A renewal sent at `at` found the lease still ours.
    pub fn confirm(&self, token: &str, at: Instant, lease: Duration) {
        if let Ok(mut m) = self.by_token.lock()
            && let Some(h) = m.get_mut(token)
        {
            h.confirmed = at;
            h.lease = lease;
        }
    }

    /// The mark of a lease held here, to wait for before writing about it.
    pub fn marked(&self, token: &str) -> Option<Marked> {
        self.by_token.lock().ok().and_then(|m| m.get(token).map(|h| h.marked.clone()))
    }

    /// Forgets a lease (its attempt ends, or it was lost).
    pub fn take(&self, token: &str) -> Option<HeldLease> {
        self.by_token.lock().ok().and_then(|mut m| m.remove(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(confirmed: Instant, lease_ms: u64) -> HeldLease {
        HeldLease {
            confirmed,
            lease: Duration::from_millis(lease_ms),
            stream: "s".into(),
            entry: "1-0".into(),
            attempt: 0,
            idempotency_key: None,
            marked: Marked::landed(),
        }
    }

    #[test]
    fn a_lease_is_certainly_held_for_half_its_length_after_a_confirmation() {
        let leases = HeldLeases::default();
        let long_ago = Instant::now() - Duration::from_secs(11);
        leases.insert("t".into(), held(long_ago, 30_000));
        leases.insert("u".into(), held(long_ago, 30_000));
        leases.insert("short".into(), held(Instant::now(), 2_000));
        leases.confirm("u", Instant::now(), Duration::from_secs(30));
        assert!(
            !leases.take("t").expect("held").certainly_held(),
            "11 s + the write margin is past half of 30 s"
        );
        assert!(
            leases.take("u").expect("held").certainly_held(),
            "just renewed"
        );
        assert!(leases.take("u").is_none(), "taken once");
        assert!(
            !leases.take("short").expect("held").certainly_held(),
            "a lease shorter than twice the margin never is"
        );
    }
}

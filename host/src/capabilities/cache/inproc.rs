//! The in-process cache of the embedded default: a `HashMap` behind a
//! mutex, with per-key expiry and Redis's semantics for every call.
//!
//! * **Expiry** is checked on every read (an expired key is gone, exactly as
//!   in Redis); expired keys are also swept whenever the cache is full.
//! * **Bounded**: at most [`MAX_ENTRIES`] keys and [`MAX_BYTES`] of keys plus
//!   values. When a write goes past either bound, expired keys are dropped
//!   first, then the least recently *written* keys, down to 90 % of the
//!   bounds, so that a burst of writes does not evict one key per call. A
//!   cache may forget; a job that needs a value for sure keeps it elsewhere.
//! * **`incr`** runs under the lock, so it is atomic across jobs; it keeps
//!   the key's expiry (as `INCRBY` does) and accepts only what Redis accepts
//!   as an integer: optional `-`, no leading zeros, no spaces, 64-bit.
//!
//! The cache lives and dies with the process and is not shared between
//! hosts: with several hosts, configure Redis.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::CacheError;

/// Most keys the in-process cache holds.
pub const MAX_ENTRIES: usize = 100_000;
/// Most bytes (keys + values + a fixed overhead per entry) it holds.
pub const MAX_BYTES: usize = 64 << 20;
/// Accounted per entry on top of its key and value (map slot, expiry, …).
const ENTRY_OVERHEAD: usize = 64;

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
    /// Write order, for eviction: smaller was written earlier.
    written: u64,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }

    fn size(key: &str, value: &[u8]) -> usize {
        key.len() + value.len() + ENTRY_OVERHEAD
    }
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    bytes: usize,
    writes: u64,
}

impl Inner {
    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.map.remove(key)?;
        self.bytes -= Entry::size(key, &entry.value);
        Some(entry)
    }

    /// The live entry under `key`; an expired one is removed on the way.
    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        if self.map.get(key).is_some_and(|e| !e.live(now)) {
            self.remove(key);
        }
        self.map.get_mut(key)
    }

    fn insert(&mut self, key: &str, value: Vec<u8>, expires: Option<Instant>) {
        self.remove(key);
        self.writes += 1;
        self.bytes += Entry::size(key, &value);
        self.map.insert(key.to_owned(), Entry { value, expires, written: self.writes });
    }
}

/// The embedded default's cache.
pub struct InProcess {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for InProcess {
    fn default() -> Self {
        Self::with_bounds(MAX_ENTRIES, MAX_BYTES)
    }
}

impl InProcess {
    /// A cache holding at most `max_entries` keys and `max_bytes` bytes.
    pub fn with_bounds(max_entries: usize, max_bytes: usize) -> Self {
        InProcess { inner: Mutex::new(Inner::default()), max_entries, max_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated
        // in a way that matters to a cache; keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().live(key, Instant::now()).map(|e| e.value.clone())
    }

    /// Stores `value`; `ttl` of zero deletes the key (it would expire at once).
    pub fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) {
        let now = Instant::now();
        let mut inner = self.lock();
        if ttl == Some(Duration::ZERO) {
            inner.remove(key);
            return;
        }
        inner.insert(key, value, ttl.and_then(|t| now.checked_add(t)));
        self.make_room(&mut inner, now);
    }

    /// True when a live key was removed.
    pub fn delete(&self, key: &str) -> bool {
        let mut inner = self.lock();
        let existed = inner.live(key, Instant::now()).is_some();
        inner.remove(key);
        existed
    }

    /// `INCRBY`: atomic, keeps the expiry; an absent key counts as 0.
    pub fn incr(&self, key: &str, delta: i64) -> Result<i64, CacheError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let (current, expires) = match inner.live(key, now) {
            Some(entry) => {
                let n = parse_redis_integer(&entry.value).ok_or_else(|| CacheError::NotAnInteger(key.to_owned()))?;
                (n, entry.expires)
            }
            None => (0, None),
        };
        let next = current.checked_add(delta).ok_or_else(|| CacheError::NotAnInteger(key.to_owned()))?;
        inner.insert(key, next.to_string().into_bytes(), expires);
        self.make_room(&mut inner, now);
        Ok(next)
    }

    /// Number of keys held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(&self, inner: &mut Inner, now: Instant) {
        if inner.map.len() <= self.max_entries && inner.bytes <= self.max_bytes {
            return;
        }
        let expired: Vec<String> = inner.map.iter().filter(|(_, e)| !e.live(now)).map(|(k, _)| k.clone()).collect();
        for key in expired {
            inner.remove(&key);
        }
        let (target_entries, target_bytes) = (self.max_entries / 10 * 9, self.max_bytes / 10 * 9);
        if inner.map.len() <= self.max_entries && inner.bytes <= self.max_bytes {
            return;
        }
        let mut by_age: Vec<(u64, String)> = inner.map.iter().map(|(k, e)| (e.written, k.clone())).collect();
        by_age.sort_unstable();
        for (_, key) in by_age {
            if inner.map.len() <= target_entries && inner.bytes <= target_bytes {
                break;
            }
            inner.remove(&key);
        }
    }
}

/// What Redis's `INCRBY` accepts as the integer held by a string: decimal,
/// an optional `-`, no `+`, no leading zeros, no spaces, within 64 bits.
pub fn parse_redis_integer(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let canonical = match digits {
        [] => false,
        [b'0'] => bytes.len() == 1, // "0", but not "-0"
        [first, rest @ ..] => (b'1'..=b'9').contains(first) && rest.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_delete() {
        let c = InProcess::default();
        assert_eq!(c.get("a"), None);
        c.set("a", b"1".to_vec(), None);
        assert_eq!(c.get("a").as_deref(), Some(&b"1"[..]));
        assert!(c.delete("a"));
        assert!(!c.delete("a"));
        assert_eq!(c.get("a"), None);
    }

    #[test]
    fn ttl_expires_and_zero_ttl_deletes() {
        let c = InProcess::default();
        c.set("t", b"x".to_vec(), Some(Duration::from_millis(30)));
        assert!(c.get("t").is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.get("t"), None);
        assert!(!c.delete("t"), "an expired key does not count as deleted");
        c.set("z", b"x".to_vec(), None);
        c.set("z", b"y".to_vec(), Some(Duration::ZERO));
        assert_eq!(c.get("z"), None);
    }

    #[test]
    fn incr_counts_from_zero_keeps_ttl_and_refuses_non_integers() {
        let c = InProcess::default();
        assert_eq!(c.incr("n", 5).unwrap(), 5);
        assert_eq!(c.incr("n", -7).unwrap(), -2);
        assert_eq!(c.get("n").as_deref(), Some(&b"-2"[..]));
        c.set("e", b"10".to_vec(), Some(Duration::from_millis(40)));
        assert_eq!(c.incr("e", 1).unwrap(), 11);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.get("e"), None, "incr kept the expiry");
        c.set("s", b"abc".to_vec(), None);
        assert!(matches!(c.incr("s", 1), Err(CacheError::NotAnInteger(_))));
        c.set("big", i64::MAX.to_string().into_bytes(), None);
        assert!(matches!(c.incr("big", 1), Err(CacheError::NotAnInteger(_))), "overflow is refused");
        assert_eq!(c.get("big").unwrap(), i64::MAX.to_string().into_bytes(), "and leaves the value alone");
    }

    #[test]
    fn integers_are_what_redis_accepts() {
        for ok in ["0", "7", "-7", "9223372036854775807", "-9223372036854775808"] {
            assert!(parse_redis_integer(ok.as_bytes()).is_some(), "{ok}");
        }
        for bad in ["", "-", "-0", "07", "+7", " 7", "7 ", "1.5", "9223372036854775808", "x"] {
            assert_eq!(parse_redis_integer(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn incr_is_atomic_across_threads() {
        let c = std::sync::Arc::new(InProcess::default());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.incr("k", 1).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(c.get("k").as_deref(), Some(&b"8000"[..]));
    }

    #[test]
    fn bounded_evicts_expired_first_then_oldest_written() {
        let c = InProcess::with_bounds(10, usize::MAX);
        c.set("short", b"x".to_vec(), Some(Duration::from_millis(1)));
        for i in 0..9 {
            c.set(&format!("k{i}"), b"x".to_vec(), None);
        }
        std::thread::sleep(Duration::from_millis(5));
        c.set("k9", b"x".to_vec(), None); // 11 keys: the expired one goes, nothing else
        assert_eq!(c.len(), 10);
        assert!(c.get("k0").is_some());
        c.set("k10", b"x".to_vec(), None); // 11 live keys: down to 9, oldest first
        assert_eq!(c.len(), 9);
        assert_eq!(c.get("k0"), None);
        assert_eq!(c.get("k1"), None);
        assert!(c.get("k10").is_some());

        let c = InProcess::with_bounds(usize::MAX, 1000);
        for i in 0..20 {
            c.set(&format!("b{i}"), vec![0; 100], None);
        }
        assert!(c.lock().bytes <= 1000);
        assert!(c.get("b19").is_some());
        assert_eq!(c.get("b0"), None);
    }
}

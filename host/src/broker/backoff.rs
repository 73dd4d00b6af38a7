//! When a failed attempt runs again: exponential backoff with jitter, so a
//! backend outage is not hammered and retries of many jobs do not fire in
//! lock-step (the "thundering herd").

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

/// Backoff settings (`[retry]` in celer.toml).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Delay before the first retry, before jitter.
    pub base_ms: u64,
    /// No retry waits longer than this.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base_ms: 1_000, max_ms: 600_000 }
    }
}

impl Backoff {
    /// The delay before retry number `attempt + 1`: `base * 2^attempt`,
    /// capped at `max`, then "equal jitter" (a uniform draw from the upper
    /// half), so the delay never drops below half the nominal value.
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self
            .base_ms
            .saturating_mul(1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX))
            .min(self.max_ms);
        let half = nominal / 2;
        let jitter = if nominal > half { rand::rng().random_range(0..=nominal - half) } else { 0 };
        Duration::from_millis(half + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_attempt_within_jitter_bounds() {
        let b = Backoff { base_ms: 100, max_ms: 10_000 };
        for attempt in 0..6u32 {
            let nominal = 100u64 << attempt;
            for _ in 0..200 {
                let d = b.delay(attempt).as_millis() as u64;
                assert!(d >= nominal / 2 && d <= nominal, "attempt {attempt}: {d}ms");
            }
        }
    }

    #[test]
    fn capped_at_max_even_for_huge_attempts() {
        let b = Backoff { base_ms: 100, max_ms: 1_000 };
        for attempt in [10, 31, 32, 63, u32::MAX] {
            let d = b.delay(attempt).as_millis() as u64;
            assert!((500..=1_000).contains(&d), "attempt {attempt}: {d}ms");
        }
    }

    #[test]
    fn jitter_spreads_retries() {
        let b = Backoff { base_ms: 1_000, max_ms: 60_000 };
        let draws: std::collections::HashSet<u128> = (0..50).map(|_| b.delay(3).as_millis()).collect();
        assert!(draws.len() > 10, "jitter gave only {} distinct delays", draws.len());
    }
}

//! Phase 6, `route`: where each try of a request goes, and whether there is another. Fallback
//! lives here: a failure before the first byte is tried again on another deployment (never one
//! already tried), within `resilience.max_attempts` and `resilience.retry_budget_ms`, and only
//! for failures that another deployment could fix. When every try failed, the client gets the
//! most useful of the failures (see [`ApiError::worst_of`]). Pure bookkeeping, no I/O.

use std::time::{Duration, Instant};

use crate::error::ApiError;

/// The tries of one request.
#[derive(Debug)]
pub struct Attempts {
    max: u32,
    budget_end: Instant,
    /// Deployments already tried, a bit each.
    exclude: u64,
    failures: Vec<ApiError>,
}

impl Attempts {
    pub fn new(max: u32, budget: Duration, arrival: Instant) -> Attempts {
        Attempts {
            max: max.max(1),
            budget_end: arrival + budget,
            exclude: 0,
            failures: Vec::new(),
        }
    }

    /// The deployments not to use for the next try.
    pub fn exclude(&self) -> u64 {
        self.exclude
    }

    /// This is the first try (a rejection then is the answer; later, the failures are).
    pub fn is_first(&self) -> bool {
        self.failures.is_empty()
    }

    /// How many tries were made (or are being made).
    pub fn count(&self) -> u32 {
        self.failures.len() as u32 + 1
    }

    /// A try goes to deployment `dep`.
    pub fn trying(&mut self, dep: usize) {
        self.exclude |= 1 << dep.min(63);
    }

    /// The try failed with `e`; whether to try again (`retryable`: another deployment could
    /// succeed where this one failed).
    pub fn failed(&mut self, e: ApiError, retryable: bool, now: Instant) -> bool {
        self.failures.push(e);
        retryable && now < self.budget_end && (self.failures.len() as u32) < self.max
    }

    /// The answer when no try succeeded.
    pub fn give_up(self) -> ApiError {
        let n = self.failures.len().max(1) as u32;
        ApiError::worst_of(self.failures).attempts(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_max_attempts_budget_or_a_final_failure() {
        let t0 = Instant::now();
        let fail = || ApiError::upstream_unavailable("b", "x");
        let mut a = Attempts::new(3, Duration::from_secs(10), t0);
        assert!(a.is_first());
        a.trying(0);
        assert!(a.failed(fail(), true, t0));
        a.trying(1);
        assert_eq!(a.exclude(), 0b11);
        assert!(a.failed(fail(), true, t0));
        assert!(!a.failed(fail(), true, t0), "three tries made");
        assert_eq!(a.give_up().attempts, Some(3));

        let mut a = Attempts::new(3, Duration::from_secs(1), t0);
        assert!(!a.failed(fail(), false, t0), "not retryable");
        let mut a = Attempts::new(3, Duration::from_secs(1), t0);
        assert!(
            !a.failed(fail(), true, t0 + Duration::from_secs(2)),
            "budget spent"
        );
    }
}

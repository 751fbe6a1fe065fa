//! Phase 6, `route`: where each try of a request goes, and whether there is another. Fallback
//! lives here: a failure before the first byte is tried again on another deployment (never one
//! already tried), within `resilience.max_attempts` and `resilience.retry_budget_ms`, and only
//! for failures that another deployment could fix. When every try failed, the client gets the
//! most useful of the failures (see [`ApiError::worst_of`]). It also keeps the 5xx answers
//! whose fault is not yet known ([`Suspect`]s, see `forward`): another deployment's success
//! confirms them, a second 5xx answer to the same request clears them (the request's fault:
//! no more tries, and `x-should-retry: false`). Pure bookkeeping, no I/O.

use std::time::{Duration, Instant};

use super::forward::{Failed, Suspect};
use crate::error::ApiError;

/// The tries of one request.
#[derive(Debug)]
pub(crate) struct Attempts {
    max: u32,
    budget_end: Instant,
    /// Deployments already tried, a bit each.
    exclude: u64,
    failures: Vec<ApiError>,
    /// A 5xx answer not yet blamed on anyone.
    suspect: Option<Suspect>,
    /// The same request got a 5xx answer from two deployments: it is the request's fault.
    request_at_fault: bool,
}

impl Attempts {
    pub(crate) fn new(max: u32, budget: Duration, arrival: Instant) -> Attempts {
        Attempts {
            max: max.max(1),
            budget_end: arrival + budget,
            exclude: 0,
            failures: Vec::new(),
            suspect: None,
            request_at_fault: false,
        }
    }

    /// The deployments not to use for the next try.
    pub(crate) fn exclude(&self) -> u64 {
        self.exclude
    }

    /// This is the first try (a rejection then is the answer; later, the failures are).
    pub(crate) fn is_first(&self) -> bool {
        self.failures.is_empty()
    }

    /// How many tries were made (or are being made).
    pub(crate) fn count(&self) -> u32 {
        self.failures.len() as u32 + 1
    }

    /// A try goes to deployment `dep`.
    pub(crate) fn trying(&mut self, dep: usize) {
        self.exclude |= 1 << dep.min(63);
    }

    /// The try failed; whether to try again (`retryable`: another deployment could succeed
    /// where this one failed; not when a second deployment reproduced a 5xx answer).
    pub(crate) fn failed(&mut self, f: Failed, now: Instant) -> bool {
        self.failures.push(f.error);
        if let Some(s) = f.suspect {
            if self.suspect.take().is_some() {
                // Reproduced: the request's fault; neither deployment is blamed.
                self.request_at_fault = true;
                return false;
            }
            self.suspect = Some(s);
        }
        f.retryable && now < self.budget_end && (self.failures.len() as u32) < self.max
    }

    /// A try succeeded: a 5xx answer held before it was the other deployment's fault.
    pub(crate) fn succeeded(&mut self) {
        if let Some(s) = self.suspect.take() {
            s.confirm();
        }
    }

    /// The answer when no try succeeded, and the 5xx answer that nothing could be compared
    /// with (to be settled by the deployment's health check).
    pub(crate) fn give_up(self) -> (ApiError, Option<Suspect>) {
        let n = self.failures.len().max(1) as u32;
        let mut e = ApiError::worst_of(self.failures).attempts(n);
        if self.request_at_fault {
            e.should_retry = Some(false);
            e.message.push_str(
                " Another deployment failed on the same request too: retrying it will not help.",
            );
        }
        (e, self.suspect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_max_attempts_budget_or_a_final_failure() {
        let t0 = Instant::now();
        let fail = |retryable| Failed {
            error: ApiError::upstream_unavailable("b", "x"),
            retryable,
            suspect: None,
        };
        let mut a = Attempts::new(3, Duration::from_secs(10), t0);
        assert!(a.is_first());
        a.trying(0);
        assert!(a.failed(fail(true), t0));
        a.trying(1);
        assert_eq!(a.exclude(), 0b11);
        assert!(a.failed(fail(true), t0));
        assert!(!a.failed(fail(true), t0), "three tries made");
        let (e, suspect) = a.give_up();
        assert_eq!(e.attempts, Some(3));
        assert!(suspect.is_none());
        assert_eq!(e.should_retry, None);

        let mut a = Attempts::new(3, Duration::from_secs(1), t0);
        assert!(!a.failed(fail(false), t0), "not retryable");
        let mut a = Attempts::new(3, Duration::from_secs(1), t0);
        assert!(
            !a.failed(fail(true), t0 + Duration::from_secs(2)),
            "budget spent"
        );
    }
}

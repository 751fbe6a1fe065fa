//! The closed set of reasons a request is turned away before it runs, and the bounds of the
//! `Retry-After` the gateway sends with them.
//!
//! Owns the names: each [`RejectReason`]'s `as_str()` is the `x-mofa-reject-reason` header,
//! the envelope `code` and the metric label; each [`Reason`]'s, how a request ended (the
//! metric label and the access log's `reason`). Pure data; it imports nothing of the crate and
//! no HTTP crate, so that the decision core can use it.

use std::fmt;

/// Lowest and highest `Retry-After` the gateway ever sends: every OpenAI SDK honours (0, 60].
pub(crate) const RETRY_AFTER_MIN_S: u64 = 1;
pub(crate) const RETRY_AFTER_MAX_S: u64 = 60;
/// Bounds of `retry-after-ms`: never sooner than 100 ms (a retry storm helps no one), never
/// later than `RETRY_AFTER_MAX_S`.
pub(crate) const RETRY_AFTER_MIN_MS: u64 = 100;
pub(crate) const RETRY_AFTER_MAX_MS: u64 = RETRY_AFTER_MAX_S * 1000;

/// Clamps a wait in seconds into the range every SDK honours.
pub(crate) fn clamp_retry_after(secs: u64) -> u64 {
    secs.clamp(RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S)
}

/// Why admission (or the gateway's state) refused a request: always a 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RejectReason {
    /// Every deployment is busy and the request may not wait.
    CapacityExceeded,
    /// The wait queue is full (or it was pushed out of it by a more important request).
    QueueFull,
    /// Its deadline passed while it waited.
    QueueTimeout,
    /// Not enough memory to load a model now.
    MemoryExhausted,
    /// The model needs more memory than the whole budget: retrying cannot help.
    ModelTooLarge,
    /// Every deployment is out of rotation (breaker open, cooling down, or already tried).
    NoHealthyBackend,
    /// The server the pool runs for the model failed to start.
    BackendStartFailed,
    /// The gateway is shutting down.
    ShuttingDown,
    /// The shared rate-limit store does not answer (`redis_failure = "closed"`).
    LimitsUnavailable,
}

impl RejectReason {
    /// Every reason, for exhaustive tests.
    #[cfg(test)]
    pub(crate) const ALL: [RejectReason; 9] = [
        RejectReason::CapacityExceeded,
        RejectReason::QueueFull,
        RejectReason::QueueTimeout,
        RejectReason::MemoryExhausted,
        RejectReason::ModelTooLarge,
        RejectReason::NoHealthyBackend,
        RejectReason::BackendStartFailed,
        RejectReason::ShuttingDown,
        RejectReason::LimitsUnavailable,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RejectReason::CapacityExceeded => "capacity_exceeded",
            RejectReason::QueueFull => "queue_full",
            RejectReason::QueueTimeout => "queue_timeout",
            RejectReason::MemoryExhausted => "memory_exhausted",
            RejectReason::ModelTooLarge => "model_too_large",
            RejectReason::NoHealthyBackend => "no_healthy_backend",
            RejectReason::BackendStartFailed => "backend_start_failed",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::LimitsUnavailable => "limits_unavailable",
        }
    }

    /// Whether a retry can ever succeed (`x-should-retry: false` when not).
    pub(crate) fn retryable(self) -> bool {
        self != RejectReason::ModelTooLarge
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal with the wait to announce: what admission hands back instead of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub reason: RejectReason,
    /// The wait in milliseconds (`retry-after-ms`), already within [`RETRY_AFTER_MIN_MS`,
    /// `RETRY_AFTER_MAX_MS`].
    pub retry_after_ms: u64,
}

impl Rejection {
    /// A refusal with a wait given in whole seconds.
    pub(crate) fn new(reason: RejectReason, retry_after_s: u64) -> Self {
        Self::after_ms(reason, retry_after_s.saturating_mul(1000))
    }

    /// A refusal with a wait given in milliseconds (clamped to the bounds).
    pub(crate) fn after_ms(reason: RejectReason, ms: u64) -> Self {
        Rejection {
            reason,
            retry_after_ms: ms.clamp(RETRY_AFTER_MIN_MS, RETRY_AFTER_MAX_MS),
        }
    }

    /// `Retry-After` in whole seconds: the wait rounded up, within [1, 60].
    pub(crate) fn retry_after_s(&self) -> u64 {
        clamp_retry_after(self.retry_after_ms.div_ceil(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in RejectReason::ALL {
            let s = r.as_str();
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert!(seen.insert(s), "{s} twice");
        }
    }

    #[test]
    fn retry_after_is_clamped() {
        assert_eq!(clamp_retry_after(0), 1);
        assert_eq!(clamp_retry_after(30), 30);
        assert_eq!(clamp_retry_after(3600), 60);
        assert_eq!(
            Rejection::new(RejectReason::QueueFull, 0).retry_after_s(),
            1
        );
        let r = Rejection::after_ms(RejectReason::QueueFull, 1234);
        assert_eq!((r.retry_after_ms, r.retry_after_s()), (1234, 2));
        let r = Rejection::after_ms(RejectReason::QueueFull, 5);
        assert_eq!((r.retry_after_ms, r.retry_after_s()), (100, 1));
        let r = Rejection::after_ms(RejectReason::QueueFull, u64::MAX);
        assert_eq!((r.retry_after_ms, r.retry_after_s()), (60_000, 60));
    }
}

/// How a request ended: a closed set (labels, log fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Ok,
    /// Turned away by admission (503).
    Rejected(RejectReason),
    /// The request was bad (400, 401, 403, 404, 408, 413, 415).
    InvalidRequest,
    /// Over its principal's rate limit (429).
    RateLimited,
    /// Its key has spent its budget (429 `insufficient_quota`).
    OverBudget,
    /// The backend refused the request itself (its 4xx).
    UpstreamRejected,
    /// The backend failed before the first byte (502, its 503).
    UpstreamError,
    /// The backend did not answer in time (504).
    UpstreamTimeout,
    /// A stream broke after its first byte (an SSE error event ended it).
    StreamBroken,
    /// The client went away first (499).
    ClientDisconnect,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::Rejected(r) => r.as_str(),
            Reason::InvalidRequest => "invalid_request",
            Reason::RateLimited => "rate_limited",
            Reason::OverBudget => "over_budget",
            Reason::UpstreamRejected => "upstream_rejected",
            Reason::UpstreamError => "upstream_error",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::StreamBroken => "stream_broken",
            Reason::ClientDisconnect => "client_disconnect",
        }
    }
}

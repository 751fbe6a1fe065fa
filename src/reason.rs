//! The closed set of reasons a request is turned away before it runs, and the bounds of the
//! `Retry-After` the gateway sends with them.
//!
//! Owns the names: each [`RejectReason`]'s `as_str()` is the `x-mofa-reject-reason` header,
//! the envelope `code` and the metric label. Pure data; it imports nothing of the crate and
//! no HTTP crate, so that the decision core can use it.

use std::fmt;

/// Lowest and highest `Retry-After` the gateway ever sends: every OpenAI SDK honours (0, 60].
pub const RETRY_AFTER_MIN_S: u64 = 1;
pub const RETRY_AFTER_MAX_S: u64 = 60;

/// Clamps a wait in seconds into the range every SDK honours.
pub fn clamp_retry_after(secs: u64) -> u64 {
    secs.clamp(RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S)
}

/// Why admission (or the gateway's state) refused a request: always a 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
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
    /// Every reason, for exhaustive tests and metric label sets.
    pub const ALL: [RejectReason; 9] = [
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

    pub fn as_str(self) -> &'static str {
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
    pub fn retryable(self) -> bool {
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
pub struct Rejection {
    pub reason: RejectReason,
    /// Seconds, already within [`RETRY_AFTER_MIN_S`, `RETRY_AFTER_MAX_S`].
    pub retry_after_s: u64,
}

impl Rejection {
    pub fn new(reason: RejectReason, retry_after_s: u64) -> Self {
        Rejection {
            reason,
            retry_after_s: clamp_retry_after(retry_after_s),
        }
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
        assert_eq!(Rejection::new(RejectReason::QueueFull, 0).retry_after_s, 1);
    }
}

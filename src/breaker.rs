//! Circuit breakers and cool-downs: whether a deployment may be tried now.
//!
//! Pure: a breaker is a small state machine fed with outcomes and clock readings; it does no
//! I/O and reads no clock. Closed -> open after `failures` consecutive failures, or an error
//! rate of at least `error_rate` over the last `window` outcomes (once `window / 2` are in);
//! open for `open_for`; then half-open lets exactly one probe through; the probe's success
//! closes it, its failure opens it again. Separately, an upstream's own 429/503 with
//! `Retry-After` cools the deployment down for that long.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Breaker settings of one deployment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BreakerConfig {
    pub failures: u32,
    pub error_rate: f64,
    pub window: usize,
    pub open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// The single probe is out.
    HalfOpen,
}

impl State {
    /// `closed`, `open` or `half_open` (an open breaker past its time is still `open` until
    /// its probe goes out).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    cfg: BreakerConfig,
    state: State,
    consecutive: u32,
    /// Recent outcomes, `true` for a failure.
    recent: VecDeque<bool>,
    /// No request before this (the upstream said `Retry-After`).
    cool_until: Option<Instant>,
}

impl Breaker {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            state: State::Closed,
            consecutive: 0,
            recent: VecDeque::with_capacity(cfg.window),
            cool_until: None,
        }
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// If a request may not be sent now, until when (at the earliest) it may not.
    pub(crate) fn blocked_until(&self, now: Instant) -> Option<Instant> {
        let cool = self.cool_until.filter(|t| *t > now);
        let open = match self.state {
            State::Closed => None,
            State::Open { until } => (until > now).then_some(until),
            // The probe is out: nothing else until it reports (at least a moment).
            State::HalfOpen => Some(now + Duration::from_secs(1)),
        };
        match (cool, open) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// A request is sent: returns whether it is the half-open probe.
    pub(crate) fn on_send(&mut self, now: Instant) -> bool {
        match self.state {
            State::Open { until } if until <= now => {
                self.state = State::HalfOpen;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn on_success(&mut self) {
        self.consecutive = 0;
        self.push(false);
        if self.state != State::Closed {
            self.state = State::Closed;
            self.recent.clear();
        }
    }

    pub(crate) fn on_failure(&mut self, now: Instant) {
        self.consecutive += 1;
        self.push(true);
        let open = match self.state {
            State::HalfOpen | State::Open { .. } => true,
            State::Closed => {
                let n = self.recent.len();
                let failed = self.recent.iter().filter(|f| **f).count();
                self.consecutive >= self.cfg.failures
                    || (n >= (self.cfg.window / 2).max(1)
                        && failed as f64 >= self.cfg.error_rate * n as f64)
            }
        };
        if open {
            self.state = State::Open {
                until: now + self.cfg.open_for,
            };
            self.recent.clear();
        }
    }

    /// The probe ended without an outcome (the client left): let another probe through.
    pub(crate) fn on_abandoned_probe(&mut self, now: Instant) {
        if self.state == State::HalfOpen {
            self.state = State::Open { until: now };
        }
    }

    /// The upstream asked for a pause (429/503 with `Retry-After`).
    pub(crate) fn cool_down(&mut self, until: Instant) {
        self.cool_until = Some(self.cool_until.map_or(until, |t| t.max(until)));
    }

    fn push(&mut self, failed: bool) {
        if self.recent.len() == self.cfg.window.max(1) {
            self.recent.pop_front();
        }
        self.recent.push_back(failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failures: 3,
            error_rate: 0.5,
            window: 10,
            open_for: Duration::from_secs(5),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_half_opens_with_one_probe() {
        let t = Instant::now();
        let mut b = Breaker::new(cfg());
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.blocked_until(t), None);
        b.on_failure(t);
        assert_eq!(b.blocked_until(t), Some(t + Duration::from_secs(5)));
        let later = t + Duration::from_secs(5);
        assert_eq!(b.blocked_until(later), None);
        assert!(
            b.on_send(later),
            "the first request after the open period is the probe"
        );
        assert!(b.blocked_until(later).is_some(), "only one probe");
        b.on_failure(later);
        assert_eq!(
            b.state(),
            State::Open {
                until: later + Duration::from_secs(5)
            }
        );
        let again = later + Duration::from_secs(5);
        assert!(b.on_send(again));
        b.on_success();
        assert_eq!(b.state(), State::Closed);
        assert!(!b.on_send(again));
    }

    #[test]
    fn opens_on_error_rate() {
        let t = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.on_success();
            b.on_failure(t);
        }
        assert_eq!(
            b.state(),
            State::Open {
                until: t + Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn an_abandoned_probe_lets_another_through() {
        let t = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let later = t + Duration::from_secs(6);
        assert!(b.on_send(later));
        b.on_abandoned_probe(later);
        assert_eq!(b.blocked_until(later), None);
        assert!(b.on_send(later));
    }

    #[test]
    fn cool_down_blocks_until_its_end() {
        let t = Instant::now();
        let mut b = Breaker::new(cfg());
        b.cool_down(t + Duration::from_secs(2));
        assert_eq!(b.blocked_until(t), Some(t + Duration::from_secs(2)));
        assert_eq!(b.blocked_until(t + Duration::from_secs(2)), None);
        assert_eq!(b.state(), State::Closed);
    }
}

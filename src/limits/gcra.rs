//! GCRA (the generic cell rate algorithm): a token bucket kept as one number, the theoretical
//! arrival time (TAT). A bucket of `limit` per `period` holds at most one period's allowance
//! (a burst may spend at most that) and refills continuously: there is no window edge at which
//! the rate doubles. Pure integer arithmetic on microseconds; `now` is given.
//!
//! The Redis store runs the same arithmetic in Lua (`quota::redis`); keep them in step.

/// A limit: `limit` units (requests or tokens) per `period_us` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub limit: u64,
    pub period_us: u64,
}

/// One minute, the period of `rpm` and `tpm`.
pub(crate) const MINUTE_US: u64 = 60_000_000;

/// The outcome of charging a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Charged: the bucket's new TAT and what is left.
    Allowed { tat: u64, status: Status },
    /// Not now: it fits exactly `retry_after_us` from now (the bucket is unchanged).
    Denied { retry_after_us: u64, used: u64 },
    /// More than a whole period's allowance: it never fits.
    TooLarge,
}

/// What a bucket has left, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    pub limit: u64,
    /// Units that would fit now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_us: u64,
}

impl Rate {
    /// `limit` per minute.
    pub(crate) fn per_minute(limit: u64) -> Rate {
        Rate {
            limit: limit.max(1),
            period_us: MINUTE_US,
        }
    }

    /// The time `cost` units take to refill, rounded up (so never more than the allowance).
    pub(crate) fn cost_us(&self, cost: u64) -> u64 {
        let t = (u128::from(cost) * u128::from(self.period_us)).div_ceil(u128::from(self.limit));
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Units of the allowance taken at `now` by a bucket at `tat` (rounded up).
    fn used(&self, tat: u64, now: u64) -> u64 {
        let backlog = u128::from(tat.saturating_sub(now));
        let u = (backlog * u128::from(self.limit)).div_ceil(u128::from(self.period_us));
        u64::try_from(u).unwrap_or(u64::MAX).min(self.limit)
    }

    /// What is left at `now` of a bucket at `tat`.
    pub(crate) fn status(&self, tat: u64, now: u64) -> Status {
        let backlog = tat.saturating_sub(now);
        let free = u128::from(self.period_us.saturating_sub(backlog));
        let remaining = (free * u128::from(self.limit)) / u128::from(self.period_us);
        Status {
            limit: self.limit,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset_us: backlog,
        }
    }

    /// Charges `cost` units at `now` to a bucket at `tat` (0: a fresh, full bucket).
    pub(crate) fn check(&self, tat: u64, now: u64, cost: u64) -> Check {
        let inc = self.cost_us(cost);
        if inc > self.period_us {
            return Check::TooLarge;
        }
        let start = tat.max(now);
        let new_tat = start.saturating_add(inc);
        let backlog = new_tat - now;
        if backlog <= self.period_us {
            Check::Allowed {
                tat: new_tat,
                status: self.status(new_tat, now),
            }
        } else {
            Check::Denied {
                retry_after_us: backlog - self.period_us,
                used: self.used(tat, now),
            }
        }
    }

    /// A bucket at `tat` under `old`, moved to this rate keeping the units it has spent (a
    /// reload that changes a limit): a lower limit applies to what was already spent; at
    /// most a full bucket (the new period's allowance spent).
    pub(crate) fn rescale(&self, old: Rate, tat: u64, now: u64) -> u64 {
        if tat <= now || old == *self {
            return tat;
        }
        let spent = old.used(tat, now);
        now.saturating_add(self.cost_us(spent).min(self.period_us))
    }

    /// Corrects a charge after the fact by `delta` units (more used: positive; an estimate
    /// that was too high: negative). A refund never makes the bucket fuller than full.
    pub(crate) fn adjust(&self, tat: u64, now: u64, delta: i64) -> u64 {
        let inc = self.cost_us(delta.unsigned_abs());
        if delta >= 0 {
            tat.max(now).saturating_add(inc)
        } else {
            tat.saturating_sub(inc).max(now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_burst_spends_one_minute_and_refills_smoothly() {
        let r = Rate::per_minute(60);
        let mut tat = 0;
        let now = 1_000_000_000;
        for i in 0..60 {
            match r.check(tat, now, 1) {
                Check::Allowed { tat: t, status } => {
                    tat = t;
                    assert_eq!(status.remaining, 59 - i);
                }
                other => panic!("request {i}: {other:?}"),
            }
        }
        assert_eq!(
            r.check(tat, now, 1),
            Check::Denied {
                retry_after_us: 1_000_000,
                used: 60
            }
        );
        assert!(matches!(
            r.check(tat, now + 1_000_000, 1),
            Check::Allowed { .. }
        ));
        assert_eq!(r.check(0, now, 61), Check::TooLarge);
        assert_eq!(r.status(tat, now).reset_us, MINUTE_US);
    }

    #[test]
    fn rescale_keeps_what_was_spent() {
        let now = 1_000_000;
        let (sixty, ten, one_twenty) = (
            Rate::per_minute(60),
            Rate::per_minute(10),
            Rate::per_minute(120),
        );
        // 50 spent at 60/min: at 10/min the bucket is full (refused), then refills at 10/min.
        let tat = now + sixty.cost_us(50);
        let low = ten.rescale(sixty, tat, now);
        assert!(matches!(ten.check(low, now, 1), Check::Denied { .. }));
        assert!(matches!(
            ten.check(low, now + ten.cost_us(1), 1),
            Check::Allowed { .. }
        ));
        // At 120/min the same 50 leave 70.
        let high = one_twenty.rescale(sixty, tat, now);
        assert_eq!(one_twenty.status(high, now).remaining, 70);
        // Nothing spent: nothing changes.
        assert_eq!(ten.rescale(sixty, now - 5, now), now - 5);
    }

    #[test]
    fn adjust_charges_and_refunds_within_bounds() {
        let r = Rate::per_minute(600);
        let now = 5_000_000;
        assert_eq!(r.adjust(0, now, 6), now + 600_000);
        assert_eq!(r.adjust(now + 600_000, now, -3), now + 300_000);
        assert_eq!(
            r.adjust(now + 100, now, -600),
            now,
            "never fuller than full"
        );
    }

    proptest! {
        /// Over any window of length w, what was admitted is at most one period's allowance
        /// plus what refills in w; and a denial's retry-after is exactly when it fits.
        #[test]
        fn never_more_than_the_allowance_and_retry_after_is_exact(
            limit in 1u64..200,
            steps in proptest::collection::vec((0u64..3_000_000, 1u64..20), 1..300),
        ) {
            let r = Rate::per_minute(limit);
            let mut tat = 0u64;
            let mut now = 10_000_000u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (gap, cost) in steps {
                now += gap;
                match r.check(tat, now, cost) {
                    Check::Allowed { tat: t, status } => {
                        prop_assert!(status.remaining <= limit);
                        tat = t;
                        admitted.push((now, cost));
                    }
                    Check::Denied { retry_after_us, .. } => {
                        prop_assert!(retry_after_us > 0 && retry_after_us <= r.period_us);
                        let at = now + retry_after_us;
                        let fits = matches!(r.check(tat, at, cost), Check::Allowed { .. });
                        let early = matches!(r.check(tat, at - 1, cost), Check::Denied { .. });
                        prop_assert!(fits, "does not fit at its Retry-After");
                        prop_assert!(early, "fits before its Retry-After");
                    }
                    Check::TooLarge => prop_assert!(cost > limit),
                }
            }
            for (i, &(t0, _)) in admitted.iter().enumerate() {
                let mut sum = 0u64;
                for &(t, c) in &admitted[i..] {
                    sum += c;
                    let w = u128::from(t - t0);
                    let refill = (w * u128::from(limit) / u128::from(r.period_us)) as u64;
                    prop_assert!(sum <= limit + refill, "{sum} in {w} us, limit {limit}");
                }
            }
        }
    }
}

//! One model's admission state and decisions: its deployments' slots, its wait queue, the
//! estimates behind `Retry-After`, and the breaker feedback. Takes state and a clock reading,
//! returns decisions.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use super::{Ledger, MemVerdict, Priority, Push, WaitKey, WaitQueue};
use crate::breaker::Breaker;
use crate::reason::{clamp_retry_after, RejectReason};
use crate::routing::{route, Block, Candidate, Policy, Route};

// ---------------------------------------------------------------------------------------------
// One model's core

/// Admission settings of one model.
#[derive(Debug, Clone, Copy)]
pub struct ModelLimits {
    pub policy: Policy,
    pub max_queue: usize,
    pub cost_wait_ms: f64,
}

/// One deployment as admission sees it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub local: bool,
    pub rank: usize,
    pub max: u32,
    pub in_flight: u32,
    pub price: f64,
    /// Entry in the ledger, for deployments that take memory.
    pub mem: Option<usize>,
    /// EWMA of time to first byte.
    pub ttfb_ms: Option<f64>,
    /// EWMA of time from start to release.
    pub service_ms: Option<f64>,
    /// Circuit breaker and upstream cool-down.
    pub breaker: Breaker,
}

/// What became of a request on a deployment, for its breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// It answered (a 2xx, or a client error that is the client's fault).
    Success,
    /// It failed (connect error, 5xx, timeout, broken reply).
    Failure,
    /// It asked for a pause (429/503): skip it until then.
    CoolDown(Instant),
}

/// Weight of a new observation in the EWMAs.
const EWMA_ALPHA: f64 = 0.2;
/// Service time assumed before any is observed.
const DEFAULT_SERVICE_MS: f64 = 1000.0;

fn ewma(old: Option<f64>, x: f64) -> f64 {
    match old {
        Some(o) => o + EWMA_ALPHA * (x - o),
        None => x,
    }
}

/// A request allowed to run on deployment `dep`; `evicted` are the ledger entries it pushed
/// out of memory (their processes must be stopped).
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub dep: usize,
    pub evicted: Vec<usize>,
    /// It is its deployment's half-open probe: report its outcome.
    pub probe: bool,
}

/// Why a request cannot run now.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NotNow {
    Wait { memory: bool },
    Reject(RejectReason),
}

/// The answer to a new request.
#[derive(Debug)]
pub enum Admit<T> {
    Run(Grant),
    /// Queued under this key; `shed` (if any) was pushed out to make room and must be rejected.
    Queued {
        key: WaitKey,
        shed: Option<T>,
    },
    Reject {
        code: RejectReason,
        retry_after_s: u64,
    },
}

/// What a change of state (a release, a tick) does to waiters.
#[derive(Debug)]
pub enum Wake<T> {
    Run(T, Grant),
    Reject(T, RejectReason, u64),
}

/// A model's admission state: its deployments' slots and its wait queue.
#[derive(Debug)]
pub struct ModelCore<T> {
    pub limits: ModelLimits,
    pub slots: Vec<Slot>,
    pub queue: WaitQueue<(Priority, T)>,
    rng: u64,
    /// Completions seen (for the admin view).
    pub completed: u64,
    /// Arrival rate of each priority, lowest first.
    arrivals: [Rate; 4],
}

/// An arrival rate (per second), estimated over windows of at least a second.
#[derive(Debug, Clone, Default)]
struct Rate {
    window_start: Option<Instant>,
    count: u32,
    /// Rate of the last finished windows (smoothed); `None` before the first.
    rate: Option<f64>,
}

impl Rate {
    const WINDOW: Duration = Duration::from_secs(1);

    fn add(&mut self, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Self::WINDOW {
            let current = self.count as f64 / elapsed.as_secs_f64();
            self.rate = Some(self.rate.map_or(current, |r| 0.5 * r + 0.5 * current));
            self.window_start = Some(now);
            self.count = 0;
        }
        self.count += 1;
    }

    /// The rate now: a quiet spell (a window long over with few arrivals) brings it down.
    fn per_sec(&self, now: Instant) -> f64 {
        let Some(start) = self.window_start else {
            return 0.0;
        };
        let elapsed = now.saturating_duration_since(start).as_secs_f64();
        let current = self.count as f64 / elapsed.max(Self::WINDOW.as_secs_f64());
        match self.rate {
            Some(r) if elapsed < 2.0 * Self::WINDOW.as_secs_f64() => r.max(current),
            _ => current,
        }
    }
}

impl<T> ModelCore<T> {
    pub fn new(limits: ModelLimits, slots: Vec<Slot>, seed: u64) -> Self {
        ModelCore {
            queue: WaitQueue::new(limits.max_queue),
            limits,
            slots,
            rng: seed | 1,
            completed: 0,
            arrivals: Default::default(),
        }
    }

    fn next_rng(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545F4914F6CDD1D)
    }

    /// Expected service time of one request, from what was observed.
    fn service_ms(&self) -> f64 {
        let seen: Vec<f64> = self.slots.iter().filter_map(|s| s.service_ms).collect();
        if seen.is_empty() {
            DEFAULT_SERVICE_MS
        } else {
            seen.iter().sum::<f64>() / seen.len() as f64
        }
    }

    /// The wait a newcomer of priority `prio` can expect for a slot, counting the requests of
    /// higher priority that keep arriving and go before it: `(ahead + 1)` services at the
    /// capacity those leave over. Infinite when they take it all; `None` until a service time
    /// has been observed (no guess from the default).
    fn predicted_wait_ms(&self, prio: Priority, now: Instant) -> Option<f64> {
        if self.slots.iter().all(|s| s.service_ms.is_none()) {
            return None;
        }
        let slots: u32 = self.slots.iter().map(|s| s.max).sum::<u32>().max(1);
        let capacity = slots as f64 * 1000.0 / self.service_ms().max(0.001);
        let higher: f64 = Priority::ALL
            .iter()
            .filter(|p| **p > prio)
            .map(|p| self.arrivals[*p as usize].per_sec(now))
            .sum();
        let spare = capacity - higher;
        if spare <= capacity * 0.02 {
            return Some(f64::INFINITY);
        }
        Some((self.queue.ahead_of(prio) as f64 + 1.0) * 1000.0 / spare)
    }

    /// Expected wait, in ms, for a request with `ahead` requests before it.
    pub fn expected_wait_ms(&self, ahead: usize) -> f64 {
        let slots: u32 = self.slots.iter().map(|s| s.max).sum::<u32>().max(1);
        // Every in-flight request, and everyone ahead, must finish before one slot frees
        // for this request: (ahead + 1) services spread over all slots.
        self.service_ms() * (ahead as f64 + 1.0) / slots as f64
    }

    /// `Retry-After` for a rejection of a request of priority `prio`: in [1, 60].
    pub fn retry_after_s(&self, prio: Priority) -> u64 {
        let ms = self.expected_wait_ms(self.queue.ahead_of(prio));
        clamp_retry_after((ms / 1000.0).ceil() as u64)
    }

    fn candidates(
        &self,
        ledger: &Ledger,
        prio: Priority,
        exclude: u64,
        now: Instant,
    ) -> (Vec<Candidate>, Vec<MemVerdict>) {
        let ahead = self.queue.ahead_of(prio);
        let mut verdicts = Vec::with_capacity(self.slots.len());
        let cands = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = s.mem.map_or(MemVerdict::Fits, |id| ledger.check(id, prio));
                let unavailable =
                    exclude & (1 << i.min(63)) != 0 || s.breaker.blocked_until(now).is_some();
                let block = match &v {
                    _ if unavailable => Some(Block::Unavailable),
                    MemVerdict::Blocked(b) => Some(*b),
                    _ if s.in_flight >= s.max => Some(Block::Full),
                    _ => None,
                };
                verdicts.push(v);
                Candidate {
                    local: s.local,
                    rank: s.rank,
                    in_flight: s.in_flight,
                    block,
                    price: s.price,
                    ttfb_ms: s.ttfb_ms,
                    wait_ms: s.service_ms.unwrap_or(DEFAULT_SERVICE_MS) * (ahead as f64 + 1.0)
                        / s.max.max(1) as f64,
                }
            })
            .collect();
        (cands, verdicts)
    }

    /// Routes without queueing; on `Run`, takes the slot (and the memory) and returns the grant.
    fn try_run(
        &mut self,
        ledger: &mut Ledger,
        prio: Priority,
        exclude: u64,
        now: Instant,
    ) -> Result<Grant, NotNow> {
        let (cands, mut verdicts) = self.candidates(ledger, prio, exclude, now);
        let rng = self.next_rng();
        match route(self.limits.policy, &cands, rng, self.limits.cost_wait_ms) {
            Route::Run(i) => {
                self.slots[i].in_flight += 1;
                let evicted = match verdicts.swap_remove(i) {
                    MemVerdict::FitsAfterEvicting(e) => e,
                    _ => Vec::new(),
                };
                if let Some(id) = self.slots[i].mem {
                    ledger.acquire(id, prio, &evicted, now);
                }
                let probe = self.slots[i].breaker.on_send(now);
                Ok(Grant {
                    dep: i,
                    evicted,
                    probe,
                })
            }
            Route::Wait { memory } => Err(NotNow::Wait { memory }),
            Route::Reject(code) => Err(NotNow::Reject(code)),
        }
    }

    /// A new request of priority `prio` that may wait until `deadline` (`None`: may not wait).
    /// `exclude` is a bit set of deployments not to use (already tried by this request): a
    /// retry, which runs now on another deployment or not at all (it never waits).
    pub fn admit(
        &mut self,
        ledger: &mut Ledger,
        prio: Priority,
        deadline: Option<Instant>,
        exclude: u64,
        now: Instant,
        item: T,
    ) -> Admit<T> {
        // Waiters of at least this priority go first: only run now if none are waiting.
        // A retry was admitted once already and does not queue again.
        let retry = exclude != 0;
        if !retry {
            self.arrivals[prio as usize].add(now);
        }
        let may_run_now = retry || self.queue.ahead_of(prio) == 0;
        let route = if may_run_now {
            self.try_run(ledger, prio, exclude, now)
        } else {
            Err(NotNow::Wait { memory: false })
        };
        let deadline = if retry { None } else { deadline };
        let memory = match route {
            Ok(grant) => return Admit::Run(grant),
            Err(NotNow::Reject(code)) => {
                return Admit::Reject {
                    code,
                    retry_after_s: self.reject_retry_after_s(code, prio, now),
                }
            }
            Err(NotNow::Wait { memory }) => memory,
        };
        let waiting_code = if memory {
            RejectReason::MemoryExhausted
        } else {
            RejectReason::CapacityExceeded
        };
        let Some(deadline) = deadline.filter(|d| *d > now) else {
            return Admit::Reject {
                code: waiting_code,
                retry_after_s: self.retry_after_s(prio),
            };
        };
        if self.limits.max_queue == 0 {
            return Admit::Reject {
                code: waiting_code,
                retry_after_s: self.retry_after_s(prio),
            };
        }
        // Shed now what would only time out in the queue: waiting for a slot longer than its
        // deadline allows (memory waits are not predicted: memory frees in steps).
        if !memory {
            let left_ms = deadline.saturating_duration_since(now).as_secs_f64() * 1000.0;
            if self
                .predicted_wait_ms(prio, now)
                .is_some_and(|w| w > left_ms)
            {
                return Admit::Reject {
                    code: RejectReason::CapacityExceeded,
                    retry_after_s: self.retry_after_s(prio),
                };
            }
        }
        match self.queue.push(prio, deadline, (prio, item)) {
            Push::Queued(key) => Admit::Queued { key, shed: None },
            Push::Displaced(key, (_, shed)) => Admit::Queued {
                key,
                shed: Some(shed),
            },
            Push::Full(_) => Admit::Reject {
                code: RejectReason::QueueFull,
                retry_after_s: self.retry_after_s(prio),
            },
        }
    }

    /// Removes every waiter (shutdown).
    pub fn drain(&mut self) -> Vec<T> {
        std::iter::from_fn(|| self.queue.pop().map(|(_, (_, t))| t)).collect()
    }

    /// A waiter that gave up (deadline, disconnect): removes it if still queued.
    pub fn cancel(&mut self, key: &WaitKey) -> Option<T> {
        self.queue.remove(key).map(|(_, t)| t)
    }

    /// Feeds what became of a request on `dep` to its breaker.
    pub fn record(&mut self, dep: usize, outcome: Outcome, now: Instant) {
        let b = &mut self.slots[dep].breaker;
        match outcome {
            Outcome::Success => b.on_success(),
            Outcome::Failure => b.on_failure(now),
            Outcome::CoolDown(until) => b.cool_down(until),
        }
    }

    /// `Retry-After` for a rejection with `code`: for `no_healthy_backend`, the time until the
    /// first deployment may be tried again; otherwise the expected wait.
    fn reject_retry_after_s(&self, code: RejectReason, prio: Priority, now: Instant) -> u64 {
        if code != RejectReason::NoHealthyBackend {
            return self.retry_after_s(prio);
        }
        let soonest = self
            .slots
            .iter()
            .filter_map(|s| s.breaker.blocked_until(now))
            .min()
            .map_or(1, |t| {
                t.saturating_duration_since(now).as_secs_f64().ceil() as u64
            });
        clamp_retry_after(soonest)
    }

    /// A request on `dep` finished after `service`: frees its slot, then serves waiters.
    /// `abandoned_probe`: it was the breaker's probe and ended without an outcome.
    pub fn release(
        &mut self,
        ledger: &mut Ledger,
        dep: usize,
        service: Duration,
        abandoned_probe: bool,
        now: Instant,
    ) -> Vec<Wake<T>> {
        if abandoned_probe {
            self.slots[dep].breaker.on_abandoned_probe(now);
        }
        let s = &mut self.slots[dep];
        s.in_flight = s.in_flight.saturating_sub(1);
        s.service_ms = Some(ewma(s.service_ms, service.as_secs_f64() * 1000.0));
        if let Some(id) = s.mem {
            ledger.release(id, now);
        }
        self.completed += 1;
        self.pump(ledger, now)
    }

    /// Records an observed time to first byte on `dep`.
    pub fn observe_ttfb(&mut self, dep: usize, ttfb: Duration) {
        let s = &mut self.slots[dep];
        s.ttfb_ms = Some(ewma(s.ttfb_ms, ttfb.as_secs_f64() * 1000.0));
    }

    /// Serves waiters in order while they can run; rejects those past their deadline.
    pub fn pump(&mut self, ledger: &mut Ledger, now: Instant) -> Vec<Wake<T>> {
        let mut out = Vec::new();
        for (prio, t) in self.queue.expire(now) {
            out.push(Wake::Reject(
                t,
                RejectReason::QueueTimeout,
                self.retry_after_s(prio),
            ));
        }
        while let Some(((Reverse(prio), _), _)) = self.queue.peek() {
            match self.try_run(ledger, prio, 0, now) {
                Ok(grant) => {
                    if let Some((_, (_, t))) = self.queue.pop() {
                        out.push(Wake::Run(t, grant));
                    }
                }
                Err(NotNow::Reject(code)) => {
                    let ra = self.reject_retry_after_s(code, prio, now);
                    if let Some((_, (_, t))) = self.queue.pop() {
                        out.push(Wake::Reject(t, code, ra));
                    }
                }
                // The first in line cannot run: nobody behind it may (strict priority order).
                Err(NotNow::Wait { .. }) => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::MemoryLimits;
    use proptest::prelude::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn slot(local: bool, max: u32) -> Slot {
        Slot {
            local,
            rank: 0,
            max,
            in_flight: 0,
            price: 0.0,
            mem: None,
            ttfb_ms: None,
            service_ms: None,
            breaker: Breaker::new(crate::breaker::BreakerConfig {
                failures: 5,
                error_rate: 0.5,
                window: 20,
                open_for: Duration::from_secs(10),
            }),
        }
    }

    fn limits(policy: Policy, max_queue: usize) -> ModelLimits {
        ModelLimits {
            policy,
            max_queue,
            cost_wait_ms: 0.0,
        }
    }

    fn no_memory() -> Ledger {
        Ledger::new(MemoryLimits {
            capacity_mb: 0,
            defer: 0.75,
            reject: 0.9,
        })
    }

    #[test]
    fn queue_sheds_lowest_newest_for_a_more_important_newcomer() {
        let now = t0();
        let mut q = WaitQueue::new(3);
        assert!(matches!(q.push(Priority::Low, now, "l1"), Push::Queued(_)));
        assert!(matches!(q.push(Priority::Low, now, "l2"), Push::Queued(_)));
        assert!(matches!(q.push(Priority::High, now, "h1"), Push::Queued(_)));
        assert!(matches!(q.push(Priority::Low, now, "l3"), Push::Full("l3")));
        assert!(matches!(
            q.push(Priority::Normal, now, "n1"),
            Push::Displaced(_, "l2")
        ));
        assert!(matches!(
            q.push(Priority::Normal, now, "n2"),
            Push::Displaced(_, "l1")
        ));
        assert!(matches!(
            q.push(Priority::Normal, now, "n3"),
            Push::Full("n3")
        ));
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|(_, t)| t)).collect();
        assert_eq!(order, ["h1", "n1", "n2"]);
    }

    #[test]
    fn ledger_defer_reject_and_critical_eviction() {
        let now = t0();
        let mut l = Ledger::new(MemoryLimits {
            capacity_mb: 100,
            defer: 0.75,
            reject: 0.9,
        });
        let a = l.register(50);
        let b = l.register(30);
        let c = l.register(200);
        assert_eq!(
            l.check(c, Priority::Critical),
            MemVerdict::Blocked(Block::TooLarge)
        );
        assert_eq!(l.check(a, Priority::Low), MemVerdict::Fits);
        l.acquire(a, Priority::Low, &[], now);
        // 50 + 30 = 80: in the defer band.
        assert_eq!(
            l.check(b, Priority::Normal),
            MemVerdict::Blocked(Block::MemoryDefer)
        );
        assert_eq!(l.check(b, Priority::High), MemVerdict::Fits);
        l.acquire(b, Priority::High, &[], now);
        let d = l.register(20);
        // 100 > 90: over; critical may evict `a` only once it is idle.
        assert_eq!(
            l.check(d, Priority::Critical),
            MemVerdict::Blocked(Block::MemoryExhausted)
        );
        l.release(a, now);
        // `a` is idle now: evictable by anyone at or above its last priority (low).
        assert_eq!(
            l.check(d, Priority::High),
            MemVerdict::FitsAfterEvicting(vec![a])
        );
        assert_eq!(
            l.check(d, Priority::Low),
            MemVerdict::FitsAfterEvicting(vec![a])
        );
        l.acquire(d, Priority::Critical, &[a], now);
        assert_eq!(l.resident_mb(), 50);
        assert!(!l.unload(b));
        // b (last used at high) and d (critical) idle: a normal request may evict neither.
        l.release(d, now);
        l.release(b, now);
        let e = l.register(40);
        assert_eq!(
            l.check(e, Priority::Normal),
            MemVerdict::Blocked(Block::MemoryDefer)
        );
        assert_eq!(l.check(e, Priority::High), MemVerdict::Fits);
        let f = l.register(60);
        assert_eq!(
            l.check(f, Priority::High),
            MemVerdict::FitsAfterEvicting(vec![b])
        );
        assert_eq!(
            l.check(f, Priority::Critical),
            MemVerdict::FitsAfterEvicting(vec![b])
        );
        assert!(l.unload(d));
        assert_eq!(l.resident_mb(), 30);
        assert_eq!(l.load(f, Priority::High, now), Ok(vec![]));
        assert_eq!(l.resident_mb(), 90);
        l.force_unload(f);
        assert_eq!(l.resident_mb(), 30);
    }

    #[test]
    fn admit_runs_then_queues_then_serves_in_order() {
        let now = t0();
        let mut l = no_memory();
        let mut m: ModelCore<&str> =
            ModelCore::new(limits(Policy::LocalOnly, 8), vec![slot(true, 1)], 1);
        let later = Some(now + Duration::from_secs(10));
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, later, 0, now, "a"),
            Admit::Run(Grant { dep: 0, .. })
        ));
        assert!(matches!(
            m.admit(&mut l, Priority::Low, later, 0, now, "low"),
            Admit::Queued { .. }
        ));
        assert!(matches!(
            m.admit(&mut l, Priority::Critical, later, 0, now, "crit"),
            Admit::Queued { .. }
        ));
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, None, 0, now, "x"),
            Admit::Reject {
                code: RejectReason::CapacityExceeded,
                ..
            }
        ));
        let w = m.release(&mut l, 0, Duration::from_millis(10), false, now);
        assert!(matches!(
            w.as_slice(),
            [Wake::Run("crit", Grant { dep: 0, .. })]
        ));
        let w = m.release(&mut l, 0, Duration::from_millis(10), false, now);
        assert!(matches!(w.as_slice(), [Wake::Run("low", _)]));
    }

    #[test]
    fn a_newcomer_that_would_only_time_out_is_shed_at_once() {
        let t = t0();
        let mut l = no_memory();
        let mut m: ModelCore<u32> =
            ModelCore::new(limits(Policy::LocalOnly, 100), vec![slot(true, 1)], 1);
        let soon = |now: Instant| Some(now + Duration::from_millis(500));
        // Service observed: 100 ms. Capacity: 10/s.
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, soon(t), 0, t, 0),
            Admit::Run(_)
        ));
        m.release(&mut l, 0, Duration::from_millis(100), false, t);
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, soon(t), 0, t, 1),
            Admit::Run(_)
        ));
        // Up to four ahead (500 ms expected) fit a 500 ms deadline...
        for i in 2..7 {
            assert!(matches!(
                m.admit(&mut l, Priority::Normal, soon(t), 0, t, i),
                Admit::Queued { .. }
            ));
        }
        // ... a sixth (600 ms) does not: refused at once, not after waiting 500 ms.
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, soon(t), 0, t, 7),
            Admit::Reject {
                code: RejectReason::CapacityExceeded,
                ..
            }
        ));
        // Critical requests arriving at 12/s take the whole capacity: a normal one is refused
        // at once however short the queue, a critical one still queues.
        let mut now = t;
        for i in 0..30 {
            now += Duration::from_millis(83);
            let _ = m.admit(
                &mut l,
                Priority::Critical,
                Some(now + Duration::from_secs(60)),
                0,
                now,
                100 + i,
            );
        }
        assert_eq!(
            m.predicted_wait_ms(Priority::Normal, now),
            Some(f64::INFINITY)
        );
        assert!(m
            .predicted_wait_ms(Priority::Critical, now)
            .unwrap()
            .is_finite());
    }

    #[test]
    fn deadline_passed_waiters_are_rejected_not_served() {
        let now = t0();
        let mut l = no_memory();
        let mut m: ModelCore<u32> =
            ModelCore::new(limits(Policy::LocalOnly, 8), vec![slot(true, 1)], 1);
        m.admit(
            &mut l,
            Priority::Normal,
            Some(now + Duration::from_secs(1)),
            0,
            now,
            0,
        );
        m.admit(
            &mut l,
            Priority::Normal,
            Some(now + Duration::from_millis(100)),
            0,
            now,
            1,
        );
        m.admit(
            &mut l,
            Priority::Normal,
            Some(now + Duration::from_secs(5)),
            0,
            now,
            2,
        );
        let w = m.release(
            &mut l,
            0,
            Duration::from_millis(10),
            false,
            now + Duration::from_millis(500),
        );
        assert!(matches!(
            w.as_slice(),
            [
                Wake::Reject(1, RejectReason::QueueTimeout, _),
                Wake::Run(2, _)
            ]
        ));
    }

    #[test]
    fn retry_after_follows_observed_service_time_and_queue() {
        let now = t0();
        let mut l = no_memory();
        let mut m: ModelCore<u32> =
            ModelCore::new(limits(Policy::LocalOnly, 100), vec![slot(true, 1)], 1);
        m.admit(&mut l, Priority::Normal, None, 0, now, 0);
        m.release(&mut l, 0, Duration::from_secs(4), false, now);
        assert_eq!(m.retry_after_s(Priority::Normal), 4);
        m.admit(&mut l, Priority::Normal, None, 0, now, 0);
        for i in 0..5 {
            m.admit(
                &mut l,
                Priority::Normal,
                Some(now + Duration::from_secs(100)),
                0,
                now,
                i,
            );
        }
        assert_eq!(m.retry_after_s(Priority::Normal), 24);
        assert_eq!(m.retry_after_s(Priority::Critical), 4);
        for i in 0..50 {
            m.admit(
                &mut l,
                Priority::Normal,
                Some(now + Duration::from_secs(100)),
                0,
                now,
                i,
            );
        }
        assert_eq!(m.retry_after_s(Priority::Normal), 60);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive(Priority, u64),
        Finish(usize),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize, 0..500u64).prop_map(|(p, w)| Op::Arrive(Priority::ALL[p], w)),
            3 => (0..64usize).prop_map(Op::Finish),
            1 => (0..300u64).prop_map(Op::Tick),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Whatever happens: slots never over-committed, memory never above the reject line by
        /// admission, waiters served in strict priority order and never after their deadline,
        /// shedding only of the least important, Retry-After always in [1, 60].
        #[test]
        fn core_invariants(ops in proptest::collection::vec(op(), 1..200), maxes in proptest::collection::vec(1..4u32, 1..4), mems in proptest::collection::vec(0..60u64, 1..4), policy in 0..6usize) {
            let policies = [Policy::LocalOnly, Policy::CloudOnly, Policy::LocalFirst, Policy::Latency, Policy::Cost, Policy::DegradationLadder];
            let policy = policies[policy];
            let start = t0();
            let mut now = start;
            let mut ledger = Ledger::new(MemoryLimits { capacity_mb: 100, defer: 0.75, reject: 0.9 });
            let mut slots = Vec::new();
            for (i, max) in maxes.iter().enumerate() {
                let local = i % 2 == 0 || policy == Policy::LocalOnly;
                let mut s = slot(local, *max);
                s.rank = i;
                s.price = if local { 0.0 } else { 1.0 + i as f64 };
                if local {
                    s.mem = Some(ledger.register(mems[i % mems.len()]));
                }
                slots.push(s);
            }
            let n = slots.len();
            let mut m: ModelCore<(u64, Priority, Instant)> = ModelCore::new(ModelLimits { policy, max_queue: 5, cost_wait_ms: 500.0 }, slots, 42);
            let mut running: Vec<(usize, Instant)> = Vec::new();
            let mut id = 0u64;
            let mut served: Vec<(Priority, u64)> = Vec::new();
            let reject_line = 90.0;

            let check_wakes = |wakes: Vec<Wake<(u64, Priority, Instant)>>, now: Instant, running: &mut Vec<(usize, Instant)>, served: &mut Vec<(Priority, u64)>| {
                let mut last: Option<(Priority, u64)> = None;
                for w in wakes {
                    match w {
                        Wake::Run((wid, p, deadline), g) => {
                            assert!(now < deadline, "served after its deadline");
                            if let Some((lp, lid)) = last {
                                assert!(lp > p || (lp == p && lid < wid), "priority order broken");
                            }
                            last = Some((p, wid));
                            served.push((p, wid));
                            running.push((g.dep, now));
                        }
                        Wake::Reject(_, code, ra) => {
                            assert!((1..=60).contains(&ra));
                            assert!([RejectReason::QueueTimeout, RejectReason::MemoryExhausted, RejectReason::ModelTooLarge, RejectReason::NoHealthyBackend].contains(&code));
                        }
                    }
                }
            };

            for op in ops {
                match op {
                    Op::Arrive(p, wait) => {
                        id += 1;
                        let deadline = now + Duration::from_millis(wait);
                        let before: Vec<Priority> = m.queue.items.keys().map(|(Reverse(p), _)| *p).collect();
                        let full = m.queue.len() == 5;
                        match m.admit(&mut ledger, p, (wait > 0).then_some(deadline), 0, now, (id, p, deadline)) {
                            Admit::Run(g) => running.push((g.dep, now)),
                            Admit::Queued { shed, .. } => {
                                if let Some((_, sp, _)) = shed {
                                    assert!(full);
                                    assert!(sp < p, "shed a waiter as important as the newcomer");
                                    assert!(before.iter().all(|b| *b >= sp), "shed was not the least important");
                                }
                            }
                            Admit::Reject { code, retry_after_s } => {
                                assert!((1..=60).contains(&retry_after_s));
                                if code == RejectReason::QueueFull {
                                    assert!(full && before.iter().all(|b| *b >= p));
                                }
                            }
                        }
                    }
                    Op::Finish(k) => {
                        if !running.is_empty() {
                            let (dep, _) = running.remove(k % running.len());
                            let w = m.release(&mut ledger, dep, Duration::from_millis(20), false, now);
                            check_wakes(w, now, &mut running, &mut served);
                        }
                    }
                    Op::Tick(ms) => {
                        now += Duration::from_millis(ms);
                        let w = m.pump(&mut ledger, now);
                        check_wakes(w, now, &mut running, &mut served);
                    }
                }
                for d in 0..n {
                    let s = &m.slots[d];
                    assert!(s.in_flight <= s.max, "over max_concurrency");
                    assert_eq!(s.in_flight as usize, running.iter().filter(|(x, _)| *x == d).count());
                }
                assert!(ledger.resident_mb() as f64 <= reject_line + 1e-9, "memory over the reject line: {}", ledger.resident_mb());
                for e in &ledger.entries {
                    assert!(e.in_flight == 0 || e.resident);
                }
            }
        }
    }
}

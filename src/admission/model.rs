//! One model's admission state and decisions: its deployments' slots, its wait queue, the
//! estimates behind `Retry-After`, and the breaker feedback. Takes state and a clock reading,
//! returns decisions.
//!
//! `Retry-After` tells a rejected client when a slot is expected *for it*: the remaining time
//! of each request in flight (its elapsed time against the deployment's recent service times),
//! then the queue ahead, then the clients already told to come back (the "promised" schedule),
//! each taking the next slot to free. So clients rejected together are spread over the drain
//! time instead of returning as one herd; the queue room their returns need is kept for them
//! until their time comes (then the promise decays). All of it is bounded: a few service times
//! per deployment, the starts of the requests in flight, at most [`MAX_PROMISES`] promises.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use super::{Ledger, MemVerdict, Priority, Push, WaitKey, WaitQueue};
use crate::breaker::{Breaker, State as BreakerState};
use crate::prefix::{Affinity, Preference, Recall, Settings as AffinitySettings, MAX_SLOTS};
use crate::reason::{RejectReason, Rejection, RETRY_AFTER_MAX_MS, RETRY_AFTER_MIN_MS};
use crate::routing::{route, Block, Candidate, Draw, Policy, Route};

// ---------------------------------------------------------------------------------------------
// One model's core

/// Admission settings of one model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelLimits {
    pub policy: Policy,
    pub max_queue: usize,
    pub cost_wait_ms: f64,
    /// The affinity policies' settings (`prefix-aware`, `session`).
    pub affinity: AffinitySettings,
}

/// One deployment as admission sees it.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
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
    /// Removed by a reload: never chosen again; kept (and counted) while requests it took
    /// are in flight, so that slots keep their places.
    pub retired: bool,
}

/// What a reload says of one of the new config's deployments (see [`ModelCore::reconfigure`]).
#[derive(Debug)]
pub(crate) enum Reslot {
    /// It continues slot `idx`, with the new settings of `fresh` (its limit, locality, rank,
    /// price, memory entry); `reset`: it is a different backend now (new URL), so its
    /// breaker and observed times start over. Its requests in flight stay counted.
    Keep {
        idx: usize,
        fresh: Slot,
        reset: bool,
    },
    /// A new deployment: a new slot after the existing ones.
    New(Slot),
}

/// What became of a request on a deployment, for its breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Outcome {
    /// It answered (a 2xx, or a client error that is the client's fault).
    Success,
    /// It failed (connect error, 5xx, timeout, broken reply).
    Failure,
    /// It asked for a pause (429/503): skip it until then.
    CoolDown(Instant),
}

/// Service times kept per deployment for the remaining-time estimate.
const SAMPLES: usize = 32;
/// The prior before a deployment completed anything: a request in flight takes
/// `max(PRIOR_SERVICE_MS, 2 x its elapsed time)` in all (so it has at least as long again to
/// go as it has run), and a queued one `max(PRIOR_SERVICE_MS, the longest elapsed in flight)`.
pub(super) const PRIOR_SERVICE_MS: f64 = 2000.0;
/// A request running longer than every kept sample: this share of the mean service time left.
const OVERDUE_SHARE: f64 = 0.25;
/// Most clients told to come back that are remembered per model (the rest are told the same
/// estimate, without a reservation).
pub(super) const MAX_PROMISES: usize = 1024;
/// The longest queue ahead that a wait is computed for (more waits as long as this).
const MAX_AHEAD: usize = 1 << 20;

/// What admission observed of one deployment: recent service times and the starts of the
/// requests in flight on it (at most its `max_concurrency`).
#[derive(Debug, Clone, Default)]
struct Observed {
    samples: VecDeque<f64>,
    running: Vec<Instant>,
}

impl Observed {
    fn mean(&self) -> Option<f64> {
        (!self.samples.is_empty())
            .then(|| self.samples.iter().sum::<f64>() / self.samples.len() as f64)
    }

    /// Expected remaining ms of a request that has run `elapsed` ms: the mean of `s - elapsed`
    /// over the kept service times `s` longer than that.
    fn remaining_ms(&self, elapsed: f64) -> f64 {
        let Some(mean) = self.mean() else {
            return (PRIOR_SERVICE_MS - elapsed).max(elapsed);
        };
        let (sum, n) = self
            .samples
            .iter()
            .filter(|s| **s > elapsed)
            .fold((0.0, 0u32), |(sum, n), s| (sum + (s - elapsed), n + 1));
        if n == 0 {
            mean * OVERDUE_SHARE
        } else {
            sum / f64::from(n)
        }
    }

    /// Expected ms of a request that starts later.
    fn service_ms(&self, now: Instant) -> f64 {
        self.mean().unwrap_or_else(|| {
            let longest = self
                .running
                .iter()
                .map(|t| now.saturating_duration_since(*t).as_secs_f64() * 1000.0)
                .fold(0.0, f64::max);
            PRIOR_SERVICE_MS.max(longest)
        })
    }

    fn record(&mut self, service_ms: f64, now: Instant) {
        // The request that ended is the one whose start is nearest `now - service`.
        let service = Duration::try_from_secs_f64(service_ms / 1000.0).unwrap_or_default();
        let start = now.checked_sub(service);
        let dist = |t: &Instant| match start {
            Some(s) if *t >= s => *t - s,
            Some(s) => s - *t,
            None => Duration::ZERO,
        };
        if let Some(i) = (0..self.running.len()).min_by_key(|i| dist(&self.running[*i])) {
            self.running.swap_remove(i);
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(service_ms);
    }
}

/// Milliseconds as integer microseconds, for ordering in a heap.
fn micros(ms: f64) -> u64 {
    (ms.max(0.0) * 1000.0).min(u64::MAX as f64 / 2.0) as u64
}

/// Weight of a new observation in the EWMAs.
const EWMA_ALPHA: f64 = 0.2;
/// Service time assumed by routing before any is observed.
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
pub(crate) struct Grant {
    pub dep: usize,
    pub evicted: Vec<usize>,
    /// It is its deployment's half-open probe: report its outcome.
    pub probe: bool,
    /// Under `prefix-aware`: the share of the prompt the deployment was last sent (likely
    /// still in its KV cache), for `x-mofa-prefix-match`.
    pub prefix_share: Option<f64>,
}

/// A request in the wait queue: its priority, what it brings to an affinity policy (it is
/// routed when a slot frees), and the caller's item.
#[derive(Debug)]
pub(crate) struct Waiting<T> {
    prio: Priority,
    wants: Affinity,
    item: T,
}

/// Why a request cannot run now.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NotNow {
    Wait { memory: bool },
    Reject(RejectReason),
}

/// The answer to a new request.
#[derive(Debug)]
pub(crate) enum Admit<T> {
    Run(Grant),
    /// Queued under this key; `shed` (if any) was pushed out to make room and must be rejected.
    Queued {
        key: WaitKey,
        shed: Option<T>,
    },
    Reject(Rejection),
}

/// What a change of state (a release, a tick) does to waiters.
#[derive(Debug)]
pub(crate) enum Wake<T> {
    Run(T, Grant),
    Reject(T, Rejection),
}

/// A model's admission state: its deployments' slots and its wait queue.
#[derive(Debug)]
pub(crate) struct ModelCore<T> {
    pub limits: ModelLimits,
    pub slots: Vec<Slot>,
    pub queue: WaitQueue<Waiting<T>>,
    rng: u64,
    /// Round-robin: the deployment whose turn is next.
    turn: usize,
    /// What the affinity policy remembers (prefixes sent, sessions' deployments).
    recall: Recall,
    /// Per slot with a memory entry: the entry's unload count when `recall` last knew it (a
    /// server stopped since has lost its cache: see [`Self::forget_unloaded`]).
    seen_unloads: Vec<u64>,
    /// Completions seen (for the admin view).
    pub completed: u64,
    /// Arrival rate of each priority, lowest first.
    arrivals: [Rate; 4],
    /// Per deployment: recent service times and starts in flight.
    observed: Vec<Observed>,
    /// When clients told to come back are expected to get a slot, earliest first.
    promised: VecDeque<(Instant, Priority)>,
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
    pub(crate) fn new(limits: ModelLimits, slots: Vec<Slot>, seed: u64) -> Self {
        let slots_len = slots.len();
        ModelCore {
            queue: WaitQueue::new(limits.max_queue),
            recall: Recall::new(limits.policy, &limits.affinity),
            seen_unloads: Vec::new(),
            limits,
            slots,
            rng: seed | 1,
            turn: 0,
            completed: 0,
            arrivals: Default::default(),
            observed: vec![Observed::default(); slots_len],
            promised: VecDeque::new(),
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

    /// The deployments a waiter may get: those not out of rotation (all, if every one is).
    fn usable(&self, now: Instant) -> Vec<usize> {
        let live = || (0..self.slots.len()).filter(|i| !self.slots[*i].retired);
        let open: Vec<usize> = live()
            .filter(|i| self.slots[*i].breaker.blocked_until(now).is_none())
            .collect();
        if open.is_empty() {
            live().collect()
        } else {
            open
        }
    }

    /// How much longer each service takes for a request of priority `prio`, because requests
    /// of higher priority keep arriving and go first: capacity / what they leave over.
    /// Infinite when they take (nearly) all of it.
    fn stretch(&self, prio: Priority, now: Instant) -> f64 {
        let capacity: f64 = self
            .usable(now)
            .iter()
            .map(|i| {
                f64::from(self.slots[*i].max) * 1000.0
                    / self.observed[*i].service_ms(now).max(0.001)
            })
            .sum();
        let higher: f64 = Priority::ALL
            .iter()
            .filter(|p| **p > prio)
            .map(|p| self.arrivals[*p as usize].per_sec(now))
            .sum();
        let spare = capacity - higher;
        if spare <= capacity * 0.02 {
            f64::INFINITY
        } else {
            capacity / spare
        }
    }

    /// Ms from `now` until a slot is expected for a request with `ahead` others before it: the
    /// slots free as the requests in flight end (their remaining time), each of the `ahead`
    /// takes the next slot to free for one service (stretched by `stretch`), and this request
    /// the next after them.
    fn slot_wait_ms(&self, ahead: usize, stretch: f64, now: Instant) -> f64 {
        if !stretch.is_finite() {
            return f64::INFINITY;
        }
        let usable = self.usable(now);
        // Each deployment's expected service, computed once (not once per step below).
        let service: Vec<f64> = (0..self.slots.len())
            .map(|i| self.observed[i].service_ms(now))
            .collect();
        let mut free: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        for &i in &usable {
            let (s, o) = (&self.slots[i], &self.observed[i]);
            for start in o.running.iter().take(s.max as usize) {
                let elapsed = now.saturating_duration_since(*start).as_secs_f64() * 1000.0;
                free.push(Reverse((micros(o.remaining_ms(elapsed)), i)));
            }
            // Free slots (only as many as can matter).
            let idle = s.max.saturating_sub(s.in_flight) as usize;
            for _ in 0..idle.min(ahead + 1) {
                free.push(Reverse((0, i)));
            }
            // In flight but not seen starting (cannot happen through `admit`): a fresh start.
            let unseen = (s.in_flight as usize).saturating_sub(o.running.len());
            for _ in 0..unseen.min(ahead + 1) {
                free.push(Reverse((micros(o.remaining_ms(0.0)), i)));
            }
        }
        // Each queued request takes the next slot to free, for one service. This runs under
        // the model's lock at every arrival that queues, so its cost must not grow with the
        // queue: two rounds of every slot are placed one by one (the in-flight remainders
        // settle into a cycle), then whole rounds are added at once (one request per slot
        // each: exact when the services are alike, the deployments' own pace otherwise), then
        // the last partial round one by one.
        let step = |free: &mut BinaryHeap<Reverse<(u64, usize)>>| {
            if let Some(Reverse((t, i))) = free.pop() {
                free.push(Reverse((t.saturating_add(micros(service[i] * stretch)), i)));
            }
        };
        let ahead = ahead.min(MAX_AHEAD);
        let first = ahead.min(2 * free.len());
        for _ in 0..first {
            step(&mut free);
        }
        let rest = ahead - first;
        if rest > 0 && !free.is_empty() {
            let (rounds, last) = (rest / free.len(), rest % free.len());
            if rounds > 0 {
                free = free
                    .into_iter()
                    .map(|Reverse((t, i))| {
                        let more = micros(rounds as f64 * service[i] * stretch);
                        Reverse((t.saturating_add(more), i))
                    })
                    .collect();
            }
            for _ in 0..last {
                step(&mut free);
            }
        }
        let Some(Reverse((t, _))) = free.peek() else {
            // No slot at all (every max_concurrency is 0): as long as it can be.
            return f64::INFINITY;
        };
        *t as f64 / 1000.0
    }

    /// The wait a newcomer of priority `prio` can expect for a slot if it queued now: the
    /// requests in flight and the queue ahead of it, at the capacity that the requests of
    /// higher priority, which keep arriving and go before it, leave over. Infinite when they
    /// take it all; `None` until a service time has been observed (no shedding on the prior).
    fn predicted_wait_ms(&self, prio: Priority, now: Instant) -> Option<f64> {
        if self.observed.iter().all(|o| o.samples.is_empty()) {
            return None;
        }
        let stretch = self.stretch(prio, now);
        Some(self.slot_wait_ms(self.queue.ahead_of(prio), stretch, now))
    }

    /// Forgets the promises whose time has come: their room is anyone's again.
    fn decay(&mut self, now: Instant) {
        while self.promised.front().is_some_and(|(t, _)| *t <= now) {
            self.promised.pop_front();
        }
    }

    /// Clients of at least priority `prio` told to come back later than `now`.
    fn promised_ahead(&self, prio: Priority) -> usize {
        self.promised.iter().filter(|(_, p)| *p >= prio).count()
    }

    /// Clients of at least priority `prio` told to come back before a newcomer queued now
    /// would leave the queue (its expected wait for a slot): they need its place.
    fn promised_before(&self, prio: Priority, now: Instant) -> usize {
        if !self.promised.iter().any(|(_, p)| *p >= prio) {
            return 0;
        }
        let wait = self.slot_wait_ms(self.queue.ahead_of(prio), self.stretch(prio, now), now);
        let wait = Duration::try_from_secs_f64(wait.clamp(0.0, 3_600_000.0) / 1000.0);
        let leaves = now + wait.unwrap_or(Duration::from_secs(3600));
        self.promised
            .iter()
            .filter(|(t, p)| *p >= prio && *t <= leaves)
            .count()
    }

    /// The wait to announce to a rejected request of priority `prio`, in ms: when a slot is
    /// expected for it behind the requests in flight, the queue ahead and the clients already
    /// told to come back; it is remembered as a promise (its return finds room kept for it).
    pub(crate) fn retry_after_ms(&mut self, prio: Priority, now: Instant) -> u64 {
        self.decay(now);
        let ahead = self.queue.ahead_of(prio) + self.promised_ahead(prio);
        let wait = self.slot_wait_ms(ahead, self.stretch(prio, now), now);
        let ms = if wait.is_finite() {
            (wait.ceil() as u64).clamp(RETRY_AFTER_MIN_MS, RETRY_AFTER_MAX_MS)
        } else {
            RETRY_AFTER_MAX_MS
        };
        if wait <= RETRY_AFTER_MAX_MS as f64 && self.promised.len() < MAX_PROMISES {
            let at = now + Duration::from_millis(ms);
            let pos = self.promised.partition_point(|(t, _)| *t <= at);
            self.promised.insert(pos, (at, prio));
        }
        ms
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
                let unavailable = s.retired
                    || exclude & (1 << i.min(63)) != 0
                    || s.breaker.blocked_until(now).is_some();
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

    /// Forgets, in the affinity policy's memory, every deployment whose server stopped being
    /// resident since it was last looked at (evicted, unloaded when idle, its process gone):
    /// whatever it had cached went with it, so a stale match must not draw a request there
    /// (and, for a server stopped meanwhile, start it again). Compares one counter a slot; the
    /// walk of the index happens once per stop.
    fn forget_unloaded(&mut self, ledger: &Ledger) {
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(id) = slot.mem else { continue };
            let unloads = ledger.unloads(id);
            if self.seen_unloads.len() <= i {
                self.seen_unloads.resize(i + 1, 0);
            }
            if self.seen_unloads[i] != unloads {
                self.seen_unloads[i] = unloads;
                self.recall.forget(i);
            }
        }
    }

    /// Routes without queueing; on `Run`, takes the slot (and the memory) and returns the grant.
    fn try_run(
        &mut self,
        ledger: &mut Ledger,
        prio: Priority,
        wants: &Affinity,
        exclude: u64,
        now: Instant,
    ) -> Result<Grant, NotNow> {
        let (cands, mut verdicts) = self.candidates(ledger, prio, exclude, now);
        let preference = if self.limits.policy.has_affinity() {
            self.forget_unloaded(ledger);
            let loads: Vec<Option<u32>> = cands
                .iter()
                .take(MAX_SLOTS)
                .map(|c| c.block.is_none().then_some(c.in_flight))
                .collect();
            self.recall.prefer(wants, &loads, &self.limits.affinity)
        } else {
            Preference::NONE
        };
        let draw = Draw {
            rng: self.next_rng(),
            turn: self.turn,
            preferred: preference.dep,
            cost_wait_ms: self.limits.cost_wait_ms,
        };
        match route(self.limits.policy, &cands, &draw) {
            Route::Run(i) => {
                self.turn = i + 1;
                self.recall.ran(wants, i);
                self.slots[i].in_flight += 1;
                self.observed[i].running.push(now);
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
                    prefix_share: preference.share_on(i),
                })
            }
            Route::Wait { memory } => Err(NotNow::Wait { memory }),
            Route::Reject(code) => Err(NotNow::Reject(code)),
        }
    }

    /// A new request of priority `prio` that may wait until `deadline` (`None`: may not wait).
    /// `exclude` is a bit set of deployments not to use (already tried by this request): a
    /// retry, which runs now on another deployment or not at all (it never waits). `wants`:
    /// what it brings to an affinity policy (kept with it while it waits).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn admit(
        &mut self,
        ledger: &mut Ledger,
        prio: Priority,
        deadline: Option<Instant>,
        exclude: u64,
        now: Instant,
        wants: Affinity,
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
            self.try_run(ledger, prio, &wants, exclude, now)
        } else {
            Err(NotNow::Wait { memory: false })
        };
        let deadline = if retry { None } else { deadline };
        let memory = match route {
            Ok(grant) => return Admit::Run(grant),
            Err(NotNow::Reject(code)) => return Admit::Reject(self.rejection(code, prio, now)),
            Err(NotNow::Wait { memory }) => memory,
        };
        let waiting_code = if memory {
            RejectReason::MemoryExhausted
        } else {
            RejectReason::CapacityExceeded
        };
        let Some(deadline) = deadline.filter(|d| *d > now) else {
            return Admit::Reject(self.rejection(waiting_code, prio, now));
        };
        if self.limits.max_queue == 0 {
            return Admit::Reject(self.rejection(waiting_code, prio, now));
        }
        // Shed now what would only time out in the queue: waiting for a slot longer than its
        // deadline allows (memory waits are not predicted: memory frees in steps).
        if !memory {
            let left_ms = deadline.saturating_duration_since(now).as_secs_f64() * 1000.0;
            if self
                .predicted_wait_ms(prio, now)
                .is_some_and(|w| w > left_ms)
            {
                return Admit::Reject(self.rejection(RejectReason::CapacityExceeded, prio, now));
            }
        }
        // The room that the clients told to come back will need is kept for them: a newcomer
        // that would hold a place in the queue when one of them is due is behind them.
        self.decay(now);
        let len = self.queue.len();
        if len < self.limits.max_queue
            && len + self.promised_before(prio, now) >= self.limits.max_queue
        {
            return Admit::Reject(self.rejection(RejectReason::QueueFull, prio, now));
        }
        match self
            .queue
            .push(prio, deadline, Waiting { prio, wants, item })
        {
            Push::Queued(key) => Admit::Queued { key, shed: None },
            Push::Displaced(key, shed) => Admit::Queued {
                key,
                shed: Some(shed.item),
            },
            Push::Full(_) => Admit::Reject(self.rejection(RejectReason::QueueFull, prio, now)),
        }
    }

    /// A reload: the model's new settings and deployments (`next`, in the new config's order),
    /// returned as the slot index of each. Slots that no deployment continues are retired:
    /// never chosen again, their requests in flight finish and are released as before. A
    /// lower `max` admits nothing until in-flight falls below it, and cancels nothing. The
    /// waiters are served by the new slots at once, or rejected if no deployment is left.
    pub(crate) fn reconfigure(
        &mut self,
        ledger: &mut Ledger,
        limits: ModelLimits,
        next: Vec<Reslot>,
        now: Instant,
    ) -> (Vec<usize>, Vec<Wake<T>>) {
        let mut continued = vec![false; self.slots.len()];
        if !self.recall.fits(limits.policy, &limits.affinity) {
            self.recall = Recall::new(limits.policy, &limits.affinity);
        }
        let mut order = Vec::with_capacity(next.len());
        for r in next {
            match r {
                Reslot::Keep { idx, fresh, reset } if idx < self.slots.len() => {
                    continued[idx] = true;
                    let s = &mut self.slots[idx];
                    s.local = fresh.local;
                    s.rank = fresh.rank;
                    s.max = fresh.max;
                    s.price = fresh.price;
                    s.mem = fresh.mem;
                    s.retired = false;
                    if reset {
                        // Another backend now: what it was sent is not in its cache.
                        self.recall.forget(idx);
                        s.breaker = fresh.breaker;
                        s.ttfb_ms = None;
                        s.service_ms = None;
                        self.observed[idx].samples.clear();
                    }
                    order.push(idx);
                }
                Reslot::Keep { fresh, .. } | Reslot::New(fresh) => {
                    self.slots.push(Slot {
                        retired: false,
                        in_flight: 0,
                        ..fresh
                    });
                    self.observed.push(Observed::default());
                    continued.push(true);
                    order.push(self.slots.len() - 1);
                }
            }
        }
        for (i, (s, kept)) in self.slots.iter_mut().zip(continued).enumerate() {
            if !kept {
                s.retired = true;
                self.recall.forget(i);
            }
        }
        self.queue.set_cap(limits.max_queue);
        self.limits = limits;
        (order, self.pump(ledger, now))
    }

    /// Removes every waiter (shutdown).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        std::iter::from_fn(|| self.queue.pop().map(|(_, w)| w.item)).collect()
    }

    /// A waiter that gave up (deadline, disconnect): removes it if still queued.
    pub(crate) fn cancel(&mut self, key: &WaitKey) -> Option<T> {
        self.queue.remove(key).map(|w| w.item)
    }

    /// Feeds what became of a request on `dep` to its breaker. A breaker that opens makes
    /// the affinity policy forget the deployment (a server that failed may have restarted
    /// with an empty cache; its sessions move on).
    pub(crate) fn record(&mut self, dep: usize, outcome: Outcome, now: Instant) {
        let b = &mut self.slots[dep].breaker;
        match outcome {
            Outcome::Success => b.on_success(),
            Outcome::Failure => {
                let open = |b: &Breaker| matches!(b.state(), BreakerState::Open { .. });
                let was_open = open(b);
                b.on_failure(now);
                if open(b) && !was_open {
                    self.recall.forget(dep);
                }
            }
            Outcome::CoolDown(until) => b.cool_down(until),
        }
    }

    /// Per slot, the leading blocks of `blocks` the prefix index holds (tests).
    #[cfg(test)]
    fn recall_matches(&self, blocks: &[u64]) -> [u32; MAX_SLOTS] {
        match &self.recall {
            Recall::Prefixes(index) => index.matches(blocks),
            _ => [0; MAX_SLOTS],
        }
    }

    /// What the affinity policy remembers: `(kind, entries, capacity, bytes)`.
    pub(crate) fn recall_size(&self) -> Option<(&'static str, usize, usize, usize)> {
        self.recall.size()
    }

    /// The rejection of a request of priority `prio` with `code`, with its wait: for
    /// `no_healthy_backend`, the time until the first deployment may be tried again; for a
    /// model that can never fit, the longest; otherwise when a slot is expected for it (a
    /// promise, see [`Self::retry_after_ms`]).
    pub(crate) fn rejection(
        &mut self,
        code: RejectReason,
        prio: Priority,
        now: Instant,
    ) -> Rejection {
        let ms = match code {
            RejectReason::NoHealthyBackend => self
                .slots
                .iter()
                .filter_map(|s| s.breaker.blocked_until(now))
                .min()
                .map_or(1000, |t| {
                    u64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
                }),
            RejectReason::ModelTooLarge => RETRY_AFTER_MAX_MS,
            _ => self.retry_after_ms(prio, now),
        };
        Rejection::after_ms(code, ms)
    }

    /// A request on `dep` finished after `service`: frees its slot, then serves waiters.
    /// `abandoned_probe`: it was the breaker's probe and ended without an outcome.
    pub(crate) fn release(
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
        self.observed[dep].record(service.as_secs_f64() * 1000.0, now);
        if let Some(id) = s.mem {
            ledger.release(id, now);
        }
        self.completed += 1;
        self.pump(ledger, now)
    }

    /// Records an observed time to first byte on `dep`.
    pub(crate) fn observe_ttfb(&mut self, dep: usize, ttfb: Duration) {
        let s = &mut self.slots[dep];
        s.ttfb_ms = Some(ewma(s.ttfb_ms, ttfb.as_secs_f64() * 1000.0));
    }

    /// Serves waiters in order while they can run; rejects those past their deadline.
    pub(crate) fn pump(&mut self, ledger: &mut Ledger, now: Instant) -> Vec<Wake<T>> {
        let mut out = Vec::new();
        for w in self.queue.expire(now) {
            let r = self.rejection(RejectReason::QueueTimeout, w.prio, now);
            out.push(Wake::Reject(w.item, r));
        }
        while let Some(((Reverse(prio), _), _)) = self.queue.peek() {
            // The head's affinity, lent to the decision (put back if it keeps waiting).
            let wants = self
                .queue
                .first_mut()
                .map(|w| std::mem::take(&mut w.wants))
                .unwrap_or_default();
            match self.try_run(ledger, prio, &wants, 0, now) {
                Ok(grant) => {
                    if let Some((_, w)) = self.queue.pop() {
                        out.push(Wake::Run(w.item, grant));
                    }
                }
                Err(NotNow::Reject(code)) => {
                    let r = self.rejection(code, prio, now);
                    if let Some((_, w)) = self.queue.pop() {
                        out.push(Wake::Reject(w.item, r));
                    }
                }
                // The first in line cannot run: nobody behind it may (strict priority order).
                Err(NotNow::Wait { .. }) => {
                    if let Some(w) = self.queue.first_mut() {
                        w.wants = wants;
                    }
                    break;
                }
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
            retired: false,
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
            affinity: Default::default(),
        }
    }

    fn no_memory() -> Ledger {
        Ledger::new(MemoryLimits {
            capacity_mb: 0,
            defer: 0.75,
            reject: 0.9,
        })
    }

    fn run(core: &mut ModelCore<u32>, l: &mut Ledger, now: Instant) -> Option<usize> {
        match core.admit(l, Priority::Normal, None, 0, now, Affinity::None, 0) {
            Admit::Run(g) => Some(g.dep),
            _ => None,
        }
    }

    /// A prompt: `conversation`'s 2 KB system prompt and `turns` turns, as block hashes.
    fn prompt(conversation: u8, turns: usize) -> Affinity {
        let mut text = vec![b'a' + conversation; 2048];
        for t in 0..turns {
            text.extend(format!(",{{\"role\":\"user\",\"content\":\"turn {t}\"}}").bytes());
            text.extend(std::iter::repeat_n(b'x', 300));
        }
        let blocks = crate::prefix::blocks(&text, crate::prefix::DEFAULT_BLOCK_BYTES);
        Affinity::Prompt(blocks.into())
    }

    /// Admits `wants` now: (deployment, share of the prompt it held).
    fn run_with(
        core: &mut ModelCore<u32>,
        l: &mut Ledger,
        wants: Affinity,
        now: Instant,
    ) -> Option<(usize, Option<f64>)> {
        match core.admit(l, Priority::Normal, None, 0, now, wants, 0) {
            Admit::Run(g) => Some((g.dep, g.prefix_share)),
            _ => None,
        }
    }

    fn done(core: &mut ModelCore<u32>, l: &mut Ledger, dep: usize, now: Instant) {
        core.release(l, dep, Duration::from_millis(5), false, now);
    }

    #[test]
    fn prefix_aware_keeps_a_conversation_on_its_deployment_and_spreads_new_ones() {
        let now = t0();
        let mut l = no_memory();
        let slots = vec![slot(true, 8), slot(true, 8), slot(true, 8)];
        let mut core: ModelCore<u32> = ModelCore::new(limits(Policy::PrefixAware, 4), slots, 3);
        // Three conversations, one request each in flight: least-load puts them on three
        // deployments (no prompt matches anywhere yet: share 0).
        let mut home = Vec::new();
        for c in 0..3 {
            let (dep, share) = run_with(&mut core, &mut l, prompt(c, 1), now).unwrap();
            assert_eq!(share, Some(0.0));
            home.push(dep);
        }
        home.sort_unstable();
        assert_eq!(home, [0, 1, 2], "least-load spreads new conversations");
        let home: Vec<usize> = (0..3)
            .map(|c| {
                let Affinity::Prompt(b) = prompt(c, 1) else {
                    unreachable!()
                };
                (0..3).find(|&d| core.recall_matches(&b)[d] > 0).unwrap()
            })
            .collect();
        for d in 0..3 {
            done(&mut core, &mut l, d, now);
        }
        // Later turns go home, whatever the load elsewhere, within the balance threshold.
        for turn in 2..6 {
            for c in 0..3u8 {
                let (dep, share) = run_with(&mut core, &mut l, prompt(c, turn), now).unwrap();
                assert_eq!(dep, home[c as usize], "conversation {c} turn {turn}");
                assert!(share.unwrap() > 0.5, "{share:?}");
            }
        }
    }

    #[test]
    fn prefix_aware_moves_off_a_deployment_busier_than_the_balance_allows() {
        let now = t0();
        let mut l = no_memory();
        let mut lim = limits(Policy::PrefixAware, 4);
        lim.affinity.balance = 2;
        let mut core: ModelCore<u32> = ModelCore::new(lim, vec![slot(true, 16), slot(true, 16)], 3);
        let (home, _) = run_with(&mut core, &mut l, prompt(0, 1), now).unwrap();
        let other = 1 - home;
        // The home deployment gets busier: up to balance (2) more than the other, it keeps the
        // conversation.
        for _ in 0..2 {
            assert_eq!(
                run_with(&mut core, &mut l, prompt(0, 2), now).unwrap().0,
                home
            );
        }
        assert_eq!(core.slots[home].in_flight, 3);
        // 3 in flight against 0: past the threshold, least-load takes the next turn.
        let (dep, share) = run_with(&mut core, &mut l, prompt(0, 3), now).unwrap();
        assert_eq!(dep, other);
        assert_eq!(share, Some(0.0), "the other deployment was never sent it");
        // Saturated (every slot taken): the other, too.
        let mut core: ModelCore<u32> = ModelCore::new(
            limits(Policy::PrefixAware, 4),
            vec![slot(true, 1), slot(true, 1)],
            3,
        );
        let (home, _) = run_with(&mut core, &mut l, prompt(1, 1), now).unwrap();
        assert_eq!(
            run_with(&mut core, &mut l, prompt(1, 2), now).unwrap().0,
            1 - home
        );
    }

    #[test]
    fn a_server_stopped_since_is_forgotten_before_its_prefixes_draw_a_request() {
        let now = t0();
        let mut l = Ledger::new(MemoryLimits {
            capacity_mb: 1000,
            defer: 1.0,
            reject: 1.0,
        });
        let mut slots = vec![slot(true, 4), slot(true, 4)];
        let mems: Vec<usize> = slots
            .iter_mut()
            .map(|s| *s.mem.insert(l.register(100)))
            .collect();
        let mut core: ModelCore<u32> = ModelCore::new(limits(Policy::PrefixAware, 4), slots, 3);
        // Two conversations, one on each server (both resident now).
        let (home1, _) = run_with(&mut core, &mut l, prompt(1, 1), now).unwrap();
        let (home2, _) = run_with(&mut core, &mut l, prompt(2, 1), now).unwrap();
        assert_ne!(home1, home2);
        done(&mut core, &mut l, home1, now);
        done(&mut core, &mut l, home2, now);
        let (dep, share) = run_with(&mut core, &mut l, prompt(1, 2), now).unwrap();
        assert_eq!(dep, home1);
        assert!(share.unwrap() > 0.5, "{share:?}");
        done(&mut core, &mut l, dep, now);
        // The pool stops conversation 1's server (idle): its cache is gone, and so is what the
        // index remembered of it; the other server's conversation still matches.
        assert!(l.unload(mems[home1]));
        let (_, share) = run_with(&mut core, &mut l, prompt(1, 3), now).unwrap();
        assert_eq!(share, Some(0.0));
        let (dep, share) = run_with(&mut core, &mut l, prompt(2, 2), now).unwrap();
        assert_eq!(dep, home2);
        assert!(share.unwrap() > 0.5, "{share:?}");
        // Evicted (or crashed) counts the same as unloaded.
        done(&mut core, &mut l, dep, now);
        l.force_unload(mems[home2]);
        let (_, share) = run_with(&mut core, &mut l, prompt(2, 3), now).unwrap();
        assert_eq!(share, Some(0.0));
    }

    #[test]
    fn a_queued_request_keeps_its_prompt_and_is_routed_by_it_when_slots_free() {
        let now = t0();
        let later = now + Duration::from_secs(60);
        let mut l = no_memory();
        let mut core: ModelCore<u32> = ModelCore::new(
            limits(Policy::PrefixAware, 4),
            vec![slot(true, 1), slot(true, 1)],
            5,
        );
        let (a, _) = run_with(&mut core, &mut l, prompt(0, 1), now).unwrap();
        let (b, _) = run_with(&mut core, &mut l, prompt(1, 1), now).unwrap();
        assert_ne!(a, b);
        // Both full: conversation 1's next turn waits.
        assert!(matches!(
            core.admit(
                &mut l,
                Priority::Normal,
                Some(later),
                0,
                now,
                prompt(1, 2),
                7
            ),
            Admit::Queued { .. }
        ));
        // Both free up at once (a reload raises the limits): it goes to b, which holds its
        // prefix, though a is as free.
        let keep = |idx| Reslot::Keep {
            idx,
            fresh: slot(true, 2),
            reset: false,
        };
        let (_, wakes) = core.reconfigure(
            &mut l,
            limits(Policy::PrefixAware, 4),
            vec![keep(0), keep(1)],
            now,
        );
        match wakes.as_slice() {
            [Wake::Run(7, g)] => {
                assert_eq!(g.dep, b);
                assert!(g.prefix_share.unwrap() > 0.5);
            }
            w => panic!("{w:?}"),
        }
    }

    #[test]
    fn a_broken_or_removed_deployment_is_forgotten() {
        let now = t0();
        let mut l = no_memory();
        let mut core: ModelCore<u32> = ModelCore::new(
            limits(Policy::PrefixAware, 4),
            vec![slot(true, 4), slot(true, 4)],
            5,
        );
        let (a, _) = run_with(&mut core, &mut l, prompt(0, 1), now).unwrap();
        let (b, _) = run_with(&mut core, &mut l, prompt(1, 1), now).unwrap();
        let Affinity::Prompt(pa) = prompt(0, 1) else {
            unreachable!()
        };
        let Affinity::Prompt(pb) = prompt(1, 1) else {
            unreachable!()
        };
        assert!(core.recall_matches(&pa)[a] > 0 && core.recall_matches(&pb)[b] > 0);
        let entries = core.recall_size().unwrap().1;
        // a's breaker opens (5 failures): what it was sent is forgotten, b's stays.
        for _ in 0..5 {
            core.record(a, Outcome::Failure, now);
        }
        assert_eq!(core.recall_matches(&pa)[a], 0);
        assert!(core.recall_matches(&pb)[b] > 0);
        assert!(core.recall_size().unwrap().1 < entries);
        // b removed by a reload: forgotten too.
        let (_, _) = core.reconfigure(
            &mut l,
            limits(Policy::PrefixAware, 4),
            vec![Reslot::Keep {
                idx: a,
                fresh: slot(true, 4),
                reset: false,
            }],
            now,
        );
        assert_eq!(core.recall_matches(&pb)[b], 0);
        assert_eq!(core.recall_size().unwrap().1, 0);
        // Another policy: nothing remembered at all.
        core.reconfigure(&mut l, limits(Policy::LeastLoad, 4), vec![], now);
        assert_eq!(core.recall_size(), None);
    }

    #[test]
    fn a_session_stays_on_its_deployment_until_it_is_busy_or_broken() {
        let now = t0();
        let mut l = no_memory();
        let mut lim = limits(Policy::Session, 4);
        lim.affinity.balance = 1;
        let mut core: ModelCore<u32> = ModelCore::new(lim, vec![slot(true, 8), slot(true, 8)], 9);
        let alice = || Affinity::Session(b"alice".as_slice().into());
        let (home, share) = run_with(&mut core, &mut l, alice(), now).unwrap();
        assert_eq!(share, None, "no prefix share under session");
        done(&mut core, &mut l, home, now);
        for _ in 0..5 {
            let (dep, _) = run_with(&mut core, &mut l, alice(), now).unwrap();
            assert_eq!(dep, home);
            done(&mut core, &mut l, dep, now);
        }
        // Two more in flight at home than elsewhere (balance 1): alice moves, and stays moved.
        run_with(&mut core, &mut l, alice(), now).unwrap();
        run_with(&mut core, &mut l, alice(), now).unwrap();
        assert_eq!(core.slots[home].in_flight, 2);
        let (moved, _) = run_with(&mut core, &mut l, alice(), now).unwrap();
        assert_eq!(moved, 1 - home);
        done(&mut core, &mut l, home, now);
        done(&mut core, &mut l, home, now);
        assert_eq!(run_with(&mut core, &mut l, alice(), now).unwrap().0, moved);
        // Its deployment breaks: the session is forgotten, and runs elsewhere.
        for _ in 0..5 {
            core.record(moved, Outcome::Failure, now);
        }
        assert_eq!(core.recall_size().unwrap().1, 0);
        assert_eq!(run_with(&mut core, &mut l, alice(), now).unwrap().0, home);
    }

    #[test]
    fn round_robin_and_least_load_in_the_core() {
        let now = t0();
        let mut l = no_memory();
        let mut core: ModelCore<u32> =
            ModelCore::new(limits(Policy::RoundRobin, 4), vec![slot(true, 8); 3], 9);
        let order: Vec<usize> = (0..6)
            .map(|_| run_with(&mut core, &mut l, Affinity::None, now).unwrap().0)
            .collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        let mut core: ModelCore<u32> =
            ModelCore::new(limits(Policy::LeastLoad, 4), vec![slot(true, 8); 3], 9);
        for _ in 0..9 {
            run_with(&mut core, &mut l, Affinity::None, now).unwrap();
        }
        let loads: Vec<u32> = core.slots.iter().map(|s| s.in_flight).collect();
        assert_eq!(loads, [3, 3, 3]);
    }

    #[test]
    fn a_reload_keeps_in_flight_and_a_lower_max_admits_nothing_until_below_it() {
        let now = t0();
        let mut l = no_memory();
        let mut core: ModelCore<u32> =
            ModelCore::new(limits(Policy::LocalFirst, 4), vec![slot(true, 3)], 1);
        for _ in 0..3 {
            assert_eq!(run(&mut core, &mut l, now), Some(0));
        }
        // max 3 -> 1 with 3 in flight: the slot keeps its place and its count.
        let (order, wakes) = core.reconfigure(
            &mut l,
            limits(Policy::LocalFirst, 4),
            vec![Reslot::Keep {
                idx: 0,
                fresh: slot(true, 1),
                reset: false,
            }],
            now,
        );
        assert_eq!(order, [0]);
        assert!(wakes.is_empty());
        assert_eq!(core.slots[0].in_flight, 3);
        assert_eq!(run(&mut core, &mut l, now), None);
        core.release(&mut l, 0, Duration::from_millis(5), false, now);
        core.release(&mut l, 0, Duration::from_millis(5), false, now);
        assert_eq!(run(&mut core, &mut l, now), None, "1 in flight, max 1");
        core.release(&mut l, 0, Duration::from_millis(5), false, now);
        assert_eq!(run(&mut core, &mut l, now), Some(0));
    }

    #[test]
    fn a_removed_deployment_is_retired_in_place_and_waiters_move_or_are_refused() {
        let now = t0();
        let later = now + Duration::from_secs(60);
        let mut l = no_memory();
        let mut core: ModelCore<u32> = ModelCore::new(
            limits(Policy::LocalFirst, 4),
            vec![slot(true, 1), slot(false, 1)],
            1,
        );
        let a = run(&mut core, &mut l, now).unwrap();
        let b = run(&mut core, &mut l, now).unwrap();
        assert_ne!(a, b);
        // Two waiters.
        for item in [7, 8] {
            assert!(matches!(
                core.admit(
                    &mut l,
                    Priority::Normal,
                    Some(later),
                    0,
                    now,
                    Affinity::None,
                    item
                ),
                Admit::Queued { .. }
            ));
        }
        // Slot 0 removed, a new one added: the new slot comes after, the waiters run on it.
        let (order, wakes) = core.reconfigure(
            &mut l,
            limits(Policy::LocalFirst, 4),
            vec![
                Reslot::Keep {
                    idx: 1,
                    fresh: slot(false, 1),
                    reset: false,
                },
                Reslot::New(slot(true, 2)),
            ],
            now,
        );
        assert_eq!(order, [1, 2]);
        assert!(core.slots[0].retired && core.slots[0].in_flight == 1);
        let ran: Vec<usize> = wakes
            .iter()
            .map(|w| match w {
                Wake::Run(_, g) => g.dep,
                Wake::Reject(..) => panic!("rejected"),
            })
            .collect();
        assert_eq!(ran, [2, 2]);
        // The retired slot's request ends: nothing runs there again.
        core.release(&mut l, 0, Duration::from_millis(5), false, now);
        assert_eq!(core.slots[0].in_flight, 0);
        assert!(matches!(
            core.admit(
                &mut l,
                Priority::Normal,
                Some(later),
                0,
                now,
                Affinity::None,
                9
            ),
            Admit::Queued { .. }
        ));
        // Every deployment removed: the waiter is refused with no_healthy_backend.
        let (order, wakes) = core.reconfigure(&mut l, limits(Policy::LocalFirst, 4), vec![], now);
        assert!(order.is_empty());
        assert!(matches!(
            wakes.as_slice(),
            [Wake::Reject(9, r)] if r.reason == RejectReason::NoHealthyBackend
        ));
        assert!(matches!(
            core.admit(&mut l, Priority::Normal, Some(later), 0, now, Affinity::None, 10),
            Admit::Reject(r) if r.reason == RejectReason::NoHealthyBackend
        ));
    }

    #[test]
    fn a_changed_backend_starts_its_breaker_over_only_when_reset() {
        let now = t0();
        let mut l = no_memory();
        let mut core: ModelCore<u32> =
            ModelCore::new(limits(Policy::LocalFirst, 4), vec![slot(true, 1)], 1);
        for _ in 0..10 {
            core.record(0, Outcome::Failure, now);
        }
        assert!(core.slots[0].breaker.blocked_until(now).is_some());
        let keep = |reset| {
            vec![Reslot::Keep {
                idx: 0,
                fresh: slot(true, 1),
                reset,
            }]
        };
        core.reconfigure(&mut l, limits(Policy::LocalFirst, 4), keep(false), now);
        assert!(core.slots[0].breaker.blocked_until(now).is_some());
        core.reconfigure(&mut l, limits(Policy::LocalFirst, 4), keep(true), now);
        assert!(core.slots[0].breaker.blocked_until(now).is_none());
        assert_eq!(run(&mut core, &mut l, now), Some(0));
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
            m.admit(&mut l, Priority::Normal, later, 0, now, Affinity::None, "a"),
            Admit::Run(Grant { dep: 0, .. })
        ));
        assert!(matches!(
            m.admit(&mut l, Priority::Low, later, 0, now, Affinity::None, "low"),
            Admit::Queued { .. }
        ));
        assert!(matches!(
            m.admit(
                &mut l,
                Priority::Critical,
                later,
                0,
                now,
                Affinity::None,
                "crit"
            ),
            Admit::Queued { .. }
        ));
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, None, 0, now, Affinity::None, "x"),
            Admit::Reject(Rejection {
                reason: RejectReason::CapacityExceeded,
                ..
            })
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
            m.admit(&mut l, Priority::Normal, soon(t), 0, t, Affinity::None, 0),
            Admit::Run(_)
        ));
        m.release(&mut l, 0, Duration::from_millis(100), false, t);
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, soon(t), 0, t, Affinity::None, 1),
            Admit::Run(_)
        ));
        // Up to four ahead (500 ms expected) fit a 500 ms deadline...
        for i in 2..7 {
            assert!(matches!(
                m.admit(&mut l, Priority::Normal, soon(t), 0, t, Affinity::None, i),
                Admit::Queued { .. }
            ));
        }
        // ... a sixth (600 ms) does not: refused at once, not after waiting 500 ms.
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, soon(t), 0, t, Affinity::None, 7),
            Admit::Reject(Rejection {
                reason: RejectReason::CapacityExceeded,
                ..
            })
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
                Affinity::None,
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
            Affinity::None,
            0,
        );
        m.admit(
            &mut l,
            Priority::Normal,
            Some(now + Duration::from_millis(100)),
            0,
            now,
            Affinity::None,
            1,
        );
        m.admit(
            &mut l,
            Priority::Normal,
            Some(now + Duration::from_secs(5)),
            0,
            now,
            Affinity::None,
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
                Wake::Reject(
                    1,
                    Rejection {
                        reason: RejectReason::QueueTimeout,
                        ..
                    }
                ),
                Wake::Run(2, _)
            ]
        ));
    }

    #[test]
    fn retry_after_counts_what_is_left_in_flight_and_the_queue() {
        let t = t0();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let mut l = no_memory();
        let mut m: ModelCore<u32> =
            ModelCore::new(limits(Policy::LocalOnly, 100), vec![slot(true, 1)], 1);
        // Before any observation: the prior (2 s), then as long again as it has run.
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, None, 0, t, Affinity::None, 0),
            Admit::Run(_)
        ));
        assert_eq!(m.slot_wait_ms(0, 1.0, t).round(), 2000.0);
        assert_eq!(m.slot_wait_ms(0, 1.0, at(1500)).round(), 1500.0);
        assert_eq!(m.slot_wait_ms(0, 1.0, at(6000)).round(), 6000.0);
        // Observed: 4 s. A request that has run 1 s has 3 s left; five queued take 4 s each.
        m.release(&mut l, 0, Duration::from_secs(4), false, at(4000));
        let now = at(4000);
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, None, 0, now, Affinity::None, 1),
            Admit::Run(_)
        ));
        for i in 0..5 {
            let d = Some(now + Duration::from_secs(100));
            m.admit(&mut l, Priority::Normal, d, 0, now, Affinity::None, i);
        }
        let later = now + Duration::from_secs(1);
        // Rejected together, told apart: each behind those told before it.
        assert_eq!(m.retry_after_ms(Priority::Normal, later), 23_000);
        assert_eq!(m.retry_after_ms(Priority::Normal, later), 27_000);
        let r = m.rejection(RejectReason::QueueFull, Priority::Normal, later);
        assert_eq!((r.retry_after_ms, r.retry_after_s()), (31_000, 31));
        // A critical request has nobody ahead: the slot in flight only.
        assert_eq!(m.retry_after_ms(Priority::Critical, later), 3_000);
        // The promises decay when their time has come.
        assert_eq!(m.promised.len(), 4);
        m.decay(later + Duration::from_millis(27_000));
        assert_eq!(m.promised.len(), 1);
        // Beyond a minute: 60 s, and no promise.
        for i in 0..50 {
            let d = Some(now + Duration::from_secs(100));
            m.admit(&mut l, Priority::Normal, d, 0, now, Affinity::None, i);
        }
        let r = m.rejection(RejectReason::QueueFull, Priority::Normal, later);
        assert_eq!((r.retry_after_ms, r.retry_after_s()), (60_000, 60));
        // The room kept for a promise: a newcomer behind a due-later promise is turned away
        // when it would take the last place, and finds it once the promise's time has come.
        let mut m: ModelCore<u32> =
            ModelCore::new(limits(Policy::LocalOnly, 1), vec![slot(true, 1)], 1);
        let d = |n: Instant| Some(n + Duration::from_secs(60));
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, d(t), 0, t, Affinity::None, 0),
            Admit::Run(_)
        ));
        assert!(matches!(
            m.admit(&mut l, Priority::Normal, d(t), 0, t, Affinity::None, 1),
            Admit::Queued { .. }
        ));
        let Admit::Reject(r) = m.admit(&mut l, Priority::Normal, d(t), 0, t, Affinity::None, 2)
        else {
            panic!("the queue is full");
        };
        // Prior: 2 s for the one in flight, 2 s for the one queued.
        assert_eq!(r.retry_after_ms, 4000);
        m.release(&mut l, 0, Duration::from_secs(2), false, at(2000));
        // At 3 s the queue has room, but it is promised (at 4 s): refused, and told 6 s.
        let Admit::Reject(r) = m.admit(
            &mut l,
            Priority::Normal,
            d(at(3000)),
            0,
            at(3000),
            Affinity::None,
            3,
        ) else {
            panic!("the room is promised");
        };
        assert_eq!(r.reason, RejectReason::QueueFull);
        assert_eq!(r.retry_after_ms, 3000);
        // At 4 s the first promise is due: the one told to come then gets in (the one told
        // 6 s needs no place before the slot is expected free, at 4.5 s).
        assert!(matches!(
            m.admit(
                &mut l,
                Priority::Normal,
                d(at(4000)),
                0,
                at(4000),
                Affinity::None,
                4
            ),
            Admit::Queued { .. }
        ));
    }

    /// Every deployment with the same constant service time `s`: the exact schedule.
    fn reference_wait(mut left: Vec<f64>, idle: usize, ahead: usize, s: f64) -> f64 {
        left.extend(std::iter::repeat_n(0.0, idle));
        left.sort_by(f64::total_cmp);
        let n = left.len();
        left[ahead % n] + (ahead / n) as f64 * s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// With a constant observed service time, the wait told is the exact schedule: the
        /// time each request in flight has left, then the queue ahead one service per slot.
        #[test]
        fn the_wait_is_the_schedule(maxes in proptest::collection::vec(1..4u32, 1..4), service in 50..5000u64, elapsed in proptest::collection::vec(0..5000u64, 0..12), ahead in 0..40usize) {
            let t = t0();
            let slots: Vec<Slot> = maxes.iter().map(|m| slot(true, *m)).collect();
            let mut m: ModelCore<u32> = ModelCore::new(limits(Policy::LocalFirst, 100), slots, 7);
            for o in &mut m.observed {
                o.samples.extend(std::iter::repeat_n(service as f64, 4));
            }
            let now = t + Duration::from_secs(10);
            let mut left = Vec::new();
            let mut k = 0;
            for (i, s) in m.slots.iter_mut().enumerate() {
                while s.in_flight < s.max && k < elapsed.len() {
                    let e = elapsed[k] % service;
                    k += 1;
                    s.in_flight += 1;
                    m.observed[i].running.push(now - Duration::from_millis(e));
                    left.push((service - e) as f64);
                }
            }
            let idle: usize = m.slots.iter().map(|s| (s.max - s.in_flight) as usize).sum();
            let want = reference_wait(left, idle, ahead, service as f64);
            let got = m.slot_wait_ms(ahead, 1.0, now);
            prop_assert!((got - want).abs() < 0.01, "got {got}, want {want}");
        }

        /// Clients rejected together are told successive times, at least one service per slot
        /// apart (up to the bounds), and never sooner than the slot in flight is expected free;
        /// before any observation, never sooner than the slot has already been held.
        #[test]
        fn rejected_together_are_spread(maxes in proptest::collection::vec(1..4u32, 1..4), service in proptest::option::of(50..3000u64), held in 0..8000u64, queued in 0..6usize, n in 2..30usize) {
            let t = t0();
            let slots: Vec<Slot> = maxes.iter().map(|m| slot(true, *m)).collect();
            let total: u32 = maxes.iter().sum();
            let mut l = no_memory();
            let mut m: ModelCore<usize> = ModelCore::new(limits(Policy::LocalFirst, 100), slots, 7);
            if let Some(s) = service {
                for o in &mut m.observed {
                    o.samples.push_back(s as f64);
                }
            }
            for i in 0..total as usize {
                let ran = matches!(m.admit(&mut l, Priority::Normal, None, 0, t, Affinity::None, i), Admit::Run(_));
                prop_assert!(ran);
            }
            let now = t + Duration::from_millis(held);
            for i in 0..queued {
                let d = Some(now + Duration::from_secs(600));
                let queued = matches!(m.admit(&mut l, Priority::Normal, d, 0, now, Affinity::None, i), Admit::Queued { .. });
                prop_assert!(queued);
            }
            let told: Vec<u64> = (0..n).map(|_| m.retry_after_ms(Priority::Normal, now)).collect();
            // One service per request: every `total` clients told, the time moves one service on.
            let one = service.map_or(PRIOR_SERVICE_MS.max(held as f64), |s| s as f64);
            for w in told.windows(2) {
                prop_assert!(w[0] <= w[1], "{told:?}");
            }
            for w in told.windows(total as usize + 1) {
                let (first, last) = (w[0], w[total as usize]);
                if last < RETRY_AFTER_MAX_MS && first > RETRY_AFTER_MIN_MS {
                    prop_assert!((last - first) as f64 >= one.floor() - 1.0, "{told:?} one {one}");
                }
            }
            if service.is_none() {
                prop_assert!(told[0] >= held.min(RETRY_AFTER_MAX_MS), "{told:?} held {held}");
            }
            prop_assert!(m.promised.len() <= MAX_PROMISES);
            prop_assert!(told.iter().all(|ms| (RETRY_AFTER_MIN_MS..=RETRY_AFTER_MAX_MS).contains(ms)));
        }
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
        /// shedding only of the least important, Retry-After always in [1, 60], `queue_full` only
        /// when the queue is full or its room is promised to clients told to come back.
        #[test]
        // One property over whole sequences of operations (admit, release, cancel, tick):
        // its checks are the invariants, and they read best side by side.
        fn core_invariants(ops in proptest::collection::vec(op(), 1..200), maxes in proptest::collection::vec(1..4u32, 1..4), mems in proptest::collection::vec(0..60u64, 1..4), policy in 0..10usize) {
            let policies = [Policy::LocalOnly, Policy::CloudOnly, Policy::LocalFirst, Policy::Latency, Policy::Cost, Policy::DegradationLadder, Policy::LeastLoad, Policy::RoundRobin, Policy::PrefixAware, Policy::Session];
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
            let mut m: ModelCore<(u64, Priority, Instant)> = ModelCore::new(ModelLimits { policy, max_queue: 5, cost_wait_ms: 500.0, affinity: Default::default() }, slots, 42);
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
                        Wake::Reject(_, r) => {
                            assert!((1..=60).contains(&r.retry_after_s()));
                            assert!((RETRY_AFTER_MIN_MS..=RETRY_AFTER_MAX_MS).contains(&r.retry_after_ms));
                            assert!([RejectReason::QueueTimeout, RejectReason::MemoryExhausted, RejectReason::ModelTooLarge, RejectReason::NoHealthyBackend].contains(&r.reason));
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
                        for q in Priority::ALL {
                            assert_eq!(m.queue.ahead_of(q), before.iter().filter(|b| **b >= q).count(), "ahead_of out of step with the queue");
                        }
                        let full = m.queue.len() == 5;
                        let promised = m.promised.iter().any(|(t, q)| *t > now && *q >= p);
                        // A few conversations (or sessions), a few turns each.
                        let wants = match policy {
                            Policy::PrefixAware => prompt((wait % 3) as u8, (id % 4) as usize),
                            Policy::Session => Affinity::Session(vec![(wait % 3) as u8].into()),
                            _ => Affinity::None,
                        };
                        match m.admit(&mut ledger, p, (wait > 0).then_some(deadline), 0, now, wants, (id, p, deadline)) {
                            Admit::Run(g) => {
                                assert_eq!(g.prefix_share.is_some(), policy == Policy::PrefixAware);
                                assert!(g.prefix_share.is_none_or(|x| (0.0..=1.0).contains(&x)));
                                running.push((g.dep, now));
                            }
                            Admit::Queued { shed, .. } => {
                                if let Some((_, sp, _)) = shed {
                                    assert!(full);
                                    assert!(sp < p, "shed a waiter as important as the newcomer");
                                    assert!(before.iter().all(|b| *b >= sp), "shed was not the least important");
                                }
                            }
                            Admit::Reject(r) => {
                                assert!((1..=60).contains(&r.retry_after_s()));
                                if r.reason == RejectReason::QueueFull {
                                    assert!(full || promised, "queue_full with room that nobody was promised");
                                    if full {
                                        assert!(before.iter().all(|b| *b >= p));
                                    }
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

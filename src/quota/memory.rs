//! The in-process store of the rate limits: one short std mutex per principal around its
//! buckets' TATs and its in-flight count, one per model around the model's (all principals
//! together); never held across an `.await`, always taken principal first. Its size is set
//! by the config (principals + models, grown by a reload that adds some), never by client input. Also the `local` fallback of
//! the Redis store, and its shadow: while Redis answers, each bucket here follows what Redis
//! said of it ([`MemoryStore::mirror`]), so that a replica that falls back starts from the
//! shared counts, not from a fresh allowance, and can restore them in a Redis that restarted
//! empty ([`MemoryStore::backlog`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::{Outcome, Plan, Slot};
use crate::limits::{charge_all, Rate};

/// The buckets of every principal, by index.
pub(super) struct MemoryStore {
    epoch: Instant,
    /// By principal index (stable for a name across reloads: [`super::Limiter`]); grows when a
    /// reload adds a key, never shrinks.
    principals: ArcSwap<Vec<Arc<Mutex<Buckets>>>>,
    /// Per model (by its stable index): its `rpm`, `tpm` TATs.
    models: ArcSwap<Vec<Arc<Mutex<[u64; 2]>>>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Buckets {
    /// The principal's own `rpm`, `tpm`.
    key: [u64; 2],
    in_flight: u32,
}

/// The TAT of `slot`, from the principal's buckets or the model's.
fn tat<'a>(b: &'a mut Buckets, m: &'a mut [u64; 2], slot: Slot) -> &'a mut u64 {
    match slot {
        Slot::Key(d) => &mut b.key[d as usize],
        Slot::Model(_, d) => &mut m[d as usize],
    }
}

impl MemoryStore {
    pub(super) fn new(principals: usize, models: usize) -> MemoryStore {
        let store = MemoryStore {
            epoch: Instant::now(),
            principals: ArcSwap::from_pointee(Vec::new()),
            models: ArcSwap::from_pointee(Vec::new()),
        };
        store.grow(principals, models);
        store
    }

    /// Room for `principals` and `models` (a reload that adds some); existing buckets keep
    /// their counts. Only the reload calls it (one at a time).
    pub(super) fn grow(&self, principals: usize, models: usize) {
        let mut p: Vec<_> = self.principals.load().iter().cloned().collect();
        while p.len() < principals {
            p.push(Arc::new(Mutex::new(Buckets {
                key: [0; 2],
                in_flight: 0,
            })));
        }
        self.principals.store(Arc::new(p));
        let mut m: Vec<_> = self.models.load().iter().cloned().collect();
        while m.len() < models {
            m.push(Arc::new(Mutex::new([0; 2])));
        }
        self.models.store(Arc::new(m));
    }

    /// A limit changed by a reload keeps what was spent: bucket `slot` of principal `who`
    /// (or of the model) holds the units it held under `old`, now at `new`.
    pub(super) fn rescale(&self, who: usize, slot: Slot, old: Rate, new: Rate) {
        let now = self.now();
        self.update(who, slot, |t| *t = new.rescale(old, *t, now));
    }

    /// Changes the TAT of bucket `slot` of principal `who` (or of the model) with `f`.
    fn update(&self, who: usize, slot: Slot, f: impl FnOnce(&mut u64)) {
        match slot {
            Slot::Key(d) => {
                if let Some(b) = self.bucket(who) {
                    f(&mut guard(&b).key[d as usize]);
                }
            }
            Slot::Model(m, d) => {
                if let Some(g) = self.models.load().get(m) {
                    f(&mut guard(g)[d as usize]);
                }
            }
        }
    }

    /// Microseconds since this store began (never 0, the TAT of a fresh bucket).
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX) + 1
    }

    fn bucket(&self, who: usize) -> Option<Arc<Mutex<Buckets>>> {
        self.principals.load().get(who).cloned()
    }

    /// The model's buckets (none for a plan without model limits).
    fn model_of(&self, plan: &Plan) -> Option<Arc<Mutex<[u64; 2]>>> {
        if !plan
            .charges
            .iter()
            .any(|(s, _)| matches!(s, Slot::Model(..)))
        {
            return None;
        }
        self.models.load().get(plan.model).cloned()
    }

    /// Charges `plan` (and takes an in-flight place if it has `max_parallel`), or refuses.
    pub(super) fn acquire(&self, plan: &Plan) -> Outcome {
        let now = self.now();
        let Some(bucket) = self.bucket(plan.who) else {
            return Outcome::Allowed(Vec::new());
        };
        let mut b = guard(&bucket);
        if let Some(max) = plan.max_parallel {
            if b.in_flight >= max {
                return Outcome::Parallel(max);
            }
        }
        let model = self.model_of(plan);
        let mut mg = model.as_deref().map(guard);
        let mut none = [0u64; 2];
        let m: &mut [u64; 2] = mg.as_deref_mut().unwrap_or(&mut none);
        let mut tats: Vec<u64> = plan
            .charges
            .iter()
            .map(|(s, _)| *tat(&mut b, m, *s))
            .collect();
        let charges: Vec<_> = plan.charges.iter().map(|(_, c)| *c).collect();
        match charge_all(&charges, &mut tats, now) {
            Ok(statuses) => {
                for ((slot, _), t) in plan.charges.iter().zip(tats) {
                    *tat(&mut b, m, *slot) = t;
                }
                if plan.max_parallel.is_some() {
                    b.in_flight += 1;
                }
                Outcome::Allowed(statuses)
            }
            Err(d) => Outcome::Limited(d),
        }
    }

    /// Corrects the token buckets of `plan` by `delta` tokens.
    pub(super) fn adjust(&self, plan: &Plan, delta: i64) {
        let now = self.now();
        if let Some(bucket) = self.bucket(plan.who) {
            let mut b = guard(&bucket);
            let model = self.model_of(plan);
            let mut mg = model.as_deref().map(guard);
            let mut none = [0u64; 2];
            let m: &mut [u64; 2] = mg.as_deref_mut().unwrap_or(&mut none);
            for (slot, c) in plan.token_charges() {
                let t = tat(&mut b, m, slot);
                *t = c.rate.adjust(*t, now, delta);
            }
        }
    }

    /// Moves the buckets of `plan` up to what Redis said of them after charging it: `backlogs`
    /// (microseconds each bucket is ahead of now), in the plan's order. Never down: answers
    /// to concurrent requests arrive in any order, and the latest state is the fullest (but
    /// for refunds, which [`MemoryStore::adjust`] applies here too).
    pub(super) fn mirror(&self, plan: &Plan, backlogs: impl Iterator<Item = u64>) {
        let now = self.now();
        if let Some(bucket) = self.bucket(plan.who) {
            let mut b = guard(&bucket);
            let model = self.model_of(plan);
            let mut mg = model.as_deref().map(guard);
            let mut none = [0u64; 2];
            let m: &mut [u64; 2] = mg.as_deref_mut().unwrap_or(&mut none);
            for ((slot, _), backlog) in plan.charges.iter().zip(backlogs) {
                let t = tat(&mut b, m, *slot);
                *t = (*t).max(now.saturating_add(backlog));
            }
        }
    }

    /// Moves bucket `slot` of principal `who` up to `backlog` microseconds ahead of now (what
    /// a refusal by Redis says of it).
    pub(super) fn raise(&self, who: usize, slot: Slot, backlog: u64) {
        let now = self.now();
        self.update(who, slot, |t| *t = (*t).max(now.saturating_add(backlog)));
    }

    /// How far ahead of now the bucket `slot` of principal `who` is (0: full).
    pub(super) fn backlog(&self, who: usize, slot: Slot) -> u64 {
        let now = self.now();
        let t = match slot {
            Slot::Key(d) => self.bucket(who).map(|b| guard(&b).key[d as usize]),
            Slot::Model(m, d) => self.models.load().get(m).map(|g| guard(g)[d as usize]),
        };
        t.map_or(0, |t| t.saturating_sub(now))
    }

    /// Gives back an in-flight place.
    pub(super) fn release(&self, who: usize) {
        if let Some(b) = self.bucket(who) {
            let mut b = guard(&b);
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }

    /// In-flight places taken, by principal.
    pub(super) fn in_flight(&self, who: usize) -> u32 {
        self.bucket(who).map_or(0, |b| guard(&b).in_flight)
    }
}

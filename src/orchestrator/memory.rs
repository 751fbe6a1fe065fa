//! The memory budget shared by local models: the ledger, the process the pool runs for each
//! ledger entry (if any), and the models that wait for memory.
//!
//! The ledger decides what is resident; this module carries its decisions out on the pool
//! (stop what was evicted or unloaded) and keeps the books true to what the pool reports
//! ([`Event`]s: a crash frees memory, a stop lets memory waiters in). Lock order: a model's
//! core, then the ledger, then a process's state; none is held across an `.await`.

use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{lock, ModelRt};
use crate::admission::{Ledger, Priority};
use crate::pool::{Event, Managed, Phase, STOP_GRACE};
use crate::reason::{RejectReason, Rejection};
use crate::routing::Block;

pub(crate) struct Memory {
    pub(super) ledger: Arc<Mutex<Ledger>>,
    /// By ledger id; grows when a reload adds a pool model (entries are never reused).
    procs: Mutex<Vec<Option<Arc<Managed>>>>,
    /// The models that take memory (their waiters are served when memory frees); set at
    /// start and by each reload.
    pub(super) models: ArcSwap<Vec<Weak<ModelRt>>>,
}

/// An unload refused: the model has requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

impl Memory {
    pub(super) fn new(ledger: Ledger) -> Arc<Self> {
        Arc::new(Memory {
            ledger: Arc::new(Mutex::new(ledger)),
            procs: Mutex::new(Vec::new()),
            models: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// A ledger entry of `mb` for a deployment that takes memory, run by the pool as `proc`
    /// (if it is): its id.
    pub(super) fn register(self: &Arc<Self>, mb: u64, proc: Option<Arc<Managed>>) -> usize {
        let id = lock(&self.ledger).register(mb);
        let mut procs = lock(&self.procs);
        procs.resize(id + 1, None);
        if let Some(p) = &proc {
            let weak = Arc::downgrade(self);
            p.on_event(move |e| {
                if let Some(m) = weak.upgrade() {
                    m.on_pool_event(id, e);
                }
            });
        }
        procs[id] = proc;
        id
    }

    /// Entry `id` is no longer configured (a reload removed it) and nothing runs on it: its
    /// memory is released and its process (if any) stopped.
    pub(super) fn remove(&self, id: usize) {
        lock(&self.ledger).force_unload(id);
        self.retire(&[id]);
        if let Some(p) = lock(&self.procs).get_mut(id) {
            if let Some(p) = p.take() {
                tracing::info!(model = %p.name, "stopping a model server the config no longer has");
            }
        }
    }

    /// Whether entry `id` has its pool process (not removed by a reload).
    pub(super) fn runs(&self, id: usize) -> bool {
        lock(&self.procs).get(id).is_some_and(Option::is_some)
    }

    /// What the pool reports about the process of ledger entry `id`.
    fn on_pool_event(&self, id: usize, e: Event) {
        match e {
            // Evicted or unloaded while it was starting: stop it now.
            Event::Ready => self.retire(&[id]),
            Event::Crashed => lock(&self.ledger).force_unload(id),
            Event::Stopped => self.pump_all(None),
        }
    }

    /// Stops the processes of ledger entries that are no longer resident (evicted, unloaded).
    /// One that a request made resident again meanwhile keeps running.
    pub(super) fn retire(&self, ids: &[usize]) {
        let procs = lock(&self.procs);
        for id in ids {
            if let Some(Some(p)) = procs.get(*id) {
                let ledger = lock(&self.ledger);
                if !ledger.entries[*id].resident {
                    p.stop();
                }
            }
        }
    }

    /// Memory freed (a request ended on a resident model, a process stopped): serve the
    /// models' waiters that can run now.
    /// `except`: a model that was just pumped (by its own release) and need not be again.
    pub(super) fn pump_all(&self, except: Option<&ModelRt>) {
        for m in self.models.load().iter() {
            if let Some(m) = m.upgrade() {
                if except.is_some_and(|e| std::ptr::eq(e, &*m)) {
                    continue;
                }
                let wakes = m.decide(|core, ledger| core.pump(ledger, Instant::now()));
                m.deliver(wakes);
            }
        }
    }

    /// Stops models idle for longer than their `idle_ttl_s`.
    pub(super) fn reap_idle(&self) {
        for (id, p) in self.pool() {
            let Some(ttl) = p.idle_ttl() else { continue };
            let unloaded = {
                let mut l = lock(&self.ledger);
                let e = &l.entries[id];
                let idle = e.resident
                    && e.in_flight == 0
                    && e.last_used.is_none_or(|t| t.elapsed() >= ttl);
                idle && p.phase() == Phase::Ready && l.unload(id)
            };
            if unloaded {
                tracing::info!(model = %p.name, ttl_s = ttl.as_secs(), "stopping idle model server");
                self.retire(&[id]);
            }
        }
    }

    /// Stops every process the pool runs (shutdown), waiting up to the stop grace for each.
    pub(crate) async fn stop_all(&self) {
        for (id, _) in self.pool() {
            lock(&self.ledger).force_unload(id);
            self.retire(&[id]);
        }
        for (_, p) in self.pool() {
            p.wait_stopped(STOP_GRACE + Duration::from_secs(1)).await;
        }
    }

    /// The pool's processes with their ledger ids.
    fn pool(&self) -> Vec<(usize, Arc<Managed>)> {
        lock(&self.procs)
            .iter()
            .enumerate()
            .filter_map(|(id, p)| Some((id, p.clone()?)))
            .collect()
    }

    /// The pool's process named `name` (`model` or `model@variant`), with its ledger id.
    pub(crate) fn managed(&self, name: &str) -> Option<(usize, Arc<Managed>)> {
        self.pool().into_iter().find(|(_, p)| p.name == name)
    }

    /// Marks a pool model resident (evicting idle ones if needed) so that it can be started.
    pub(crate) fn load(&self, name: &str) -> Option<Result<(), Rejection>> {
        let (id, _) = self.managed(name)?;
        let evicted = lock(&self.ledger).load(id, Priority::Normal, Instant::now());
        Some(match evicted {
            Ok(evicted) => {
                self.retire(&evicted);
                Ok(())
            }
            Err(b) => {
                let reason = match b {
                    Block::TooLarge => RejectReason::ModelTooLarge,
                    _ => RejectReason::MemoryExhausted,
                };
                Err(Rejection::new(reason, 5))
            }
        })
    }

    /// Releases a pool model's memory and stops it; refused while requests are in flight.
    pub(crate) fn unload(&self, name: &str) -> Option<Result<(), Busy>> {
        let (id, _) = self.managed(name)?;
        if !lock(&self.ledger).unload(id) {
            return Some(Err(Busy));
        }
        self.retire(&[id]);
        Some(Ok(()))
    }

    /// The admin view of one pool process, with its memory books.
    pub(crate) fn process_snapshot(&self, id: usize, p: &Managed) -> Value {
        let (mb, in_flight, last_used_ago) = {
            let l = lock(&self.ledger);
            let e = &l.entries[id];
            (
                e.mb,
                e.in_flight,
                e.last_used.map(|t| t.elapsed().as_secs_f64()),
            )
        };
        let mut v = p.snapshot();
        v["memory_mb"] = json!(mb);
        v["in_flight"] = json!(in_flight);
        v["last_used_s_ago"] = json!(last_used_ago);
        v
    }

    /// The pool's admin view.
    pub(crate) fn pool_snapshot(&self) -> Value {
        let procs: Vec<Value> = self
            .pool()
            .into_iter()
            .map(|(id, p)| self.process_snapshot(id, &p))
            .collect();
        json!({ "models": procs })
    }

    /// The memory part of the admin view.
    pub(crate) fn snapshot(&self) -> Value {
        let ledger = lock(&self.ledger);
        json!({
            "capacity_mb": ledger.limits.capacity_mb,
            "resident_mb": ledger.resident_mb(),
            "defer_threshold": ledger.limits.defer,
            "reject_threshold": ledger.limits.reject,
        })
    }
}

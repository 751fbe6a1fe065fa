//! The memory budget shared by local models: the ledger, the process the pool runs for each
//! ledger entry (if any), and the models that wait for memory.
//!
//! The ledger decides what is resident; this module carries its decisions out on the pool
//! (stop what was evicted or unloaded) and keeps the books true to what the pool reports
//! ([`Event`]s: a crash frees memory, a stop lets memory waiters in). Lock order: a model's
//! core, then the ledger, then a process's state; none is held across an `.await`.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{lock, ModelRt};
use crate::admission::{Ledger, Priority};
use crate::pool::{Event, Managed, Phase, STOP_GRACE};
use crate::reason::{RejectReason, Rejection};
use crate::routing::Block;

pub(crate) struct Memory {
    pub(super) ledger: Arc<Mutex<Ledger>>,
    /// By ledger id.
    procs: Vec<Option<Arc<Managed>>>,
    pub(super) models: OnceLock<Vec<Weak<ModelRt>>>,
}

/// An unload refused: the model has requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

impl Memory {
    pub(super) fn new(ledger: Arc<Mutex<Ledger>>, procs: Vec<Option<Arc<Managed>>>) -> Arc<Self> {
        let memory = Arc::new(Memory {
            ledger,
            procs,
            models: OnceLock::new(),
        });
        for (id, p) in memory.procs.iter().enumerate() {
            if let Some(p) = p {
                let weak = Arc::downgrade(&memory);
                p.on_event(move |e| {
                    if let Some(m) = weak.upgrade() {
                        m.on_pool_event(id, e);
                    }
                });
            }
        }
        memory
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
        for id in ids {
            if let Some(Some(p)) = self.procs.get(*id) {
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
        for m in self.models.get().into_iter().flatten() {
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

    /// Whether any pool model has an idle TTL (then a reaper runs).
    pub(super) fn has_idle_ttl(&self) -> bool {
        self.pool().any(|(_, p)| p.idle_ttl().is_some())
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
    fn pool(&self) -> impl Iterator<Item = (usize, &Arc<Managed>)> {
        self.procs
            .iter()
            .enumerate()
            .filter_map(|(id, p)| Some((id, p.as_ref()?)))
    }

    /// The pool's process named `name` (`model` or `model@variant`), with its ledger id.
    pub(crate) fn managed(&self, name: &str) -> Option<(usize, &Arc<Managed>)> {
        self.pool().find(|(_, p)| p.name == name)
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
            .map(|(id, p)| self.process_snapshot(id, p))
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

//! The orchestrator: the async shell around the admission core.
//!
//! Files: `memory` (the shared memory budget, and the pool's events that change it), `build`
//! (models, deployments and the pool from a validated config).
//!
//! Owns, per model, the lock around its [`ModelCore`] and the waiting of queued requests
//! (a oneshot each, with its deadline), and the [`Permit`] that holds a deployment slot for as
//! long as a request runs (a stream: until its last byte, or the client's disconnect). Locks
//! are std mutexes held only for a decision, never across an `.await`; lock order is model core,
//! then the shared memory ledger. It must not decide anything itself (that is `admission` and
//! `routing`), talk to backends (that is `upstream`), nor know of HTTP: refusals are typed
//! [`Rejection`]s that the caller answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::admission::{
    Admit, Grant, Ledger, MemoryLimits, ModelCore, Outcome, Priority, WaitKey, Wake,
};
use crate::config::DeploymentConfig;
use crate::pool::Managed;
use crate::prefix::Affinity;
use crate::reason::{RejectReason, Rejection};
use crate::routing::Policy;
use crate::upstream::Deployment;

mod build;
mod memory;

pub use build::BuildError;
pub(crate) use memory::Memory;

type Waiter = oneshot::Sender<Result<Permit, Rejection>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take admission down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A model clients can ask for: its deployments and its admission state. A reload changes it
/// in place ([`ModelRt::conf`] swapped, the core reconfigured), so that its queue, slots,
/// breakers and observed times live on.
pub(crate) struct ModelRt {
    pub name: Arc<str>,
    /// The current settings and deployments; replaced whole by a reload.
    conf: ArcSwap<ModelConf>,
    core: Mutex<ModelCore<Waiter>>,
    /// The shared memory budget; its ledger lock is taken only while `uses_memory` (a
    /// deployment declares `memory_mb` or is run by the pool): the others never take it.
    memory: Arc<Memory>,
    uses_memory: AtomicBool,
}

/// A model's settings and deployments, one generation of them. `slots` runs parallel to the
/// core's slots, retired slots included (their requests may still be in flight).
pub(crate) struct ModelConf {
    policy: Policy,
    max_wait: Duration,
    slots: Vec<SlotConf>,
}

/// What one slot runs on, and what the next reload compares and reuses.
#[derive(Clone)]
pub(crate) struct SlotConf {
    deployment: Arc<Deployment>,
    /// The pool's process, when the gateway runs the deployment itself.
    managed: Option<Arc<Managed>>,
    /// Its identity ([`crate::config::deployment_ids`]).
    id: String,
    config: DeploymentConfig,
    /// Its URL (for a simulator, the one it listens on).
    url: String,
    /// Its memory entry (the core's `Slot::mem`).
    mem: Option<usize>,
}

/// Holds a slot on one deployment; dropping it frees the slot and serves the next waiter.
pub(crate) struct Permit {
    model: Arc<ModelRt>,
    dep: usize,
    /// The deployment as configured when the slot was granted: a reload that changes it
    /// lets this request finish on the settings it started with.
    deployment: Arc<Deployment>,
    managed: Option<Arc<Managed>>,
    start: Instant,
    /// It is the breaker's half-open probe.
    probe: bool,
    /// Under `prefix-aware`: the share of its prompt the deployment was sent before.
    prefix_share: Option<f64>,
    /// Its outcome was reported to the breaker (by the permit's [`Feedback`]).
    reported: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Permit({} on {})",
            self.model.name,
            self.deployment().label
        )
    }
}

impl Permit {
    pub(crate) fn deployment(&self) -> &Arc<Deployment> {
        &self.deployment
    }

    /// The pool's process for the deployment, if the gateway runs it.
    pub(crate) fn managed(&self) -> Option<&Arc<Managed>> {
        self.managed.as_ref()
    }

    /// The model it was admitted to.
    pub(crate) fn model_name(&self) -> &str {
        &self.model.name
    }

    /// Which of its model's deployments (its index, for retries' exclusions).
    pub(crate) fn dep_index(&self) -> usize {
        self.dep
    }

    /// Under `prefix-aware`: the share of the prompt its deployment was sent before (likely
    /// still in its KV cache).
    pub(crate) fn prefix_share(&self) -> Option<f64> {
        self.prefix_share
    }

    /// A handle to report on this request after the permit moved on (into a stream).
    pub(crate) fn feedback(&self) -> Feedback {
        Feedback {
            model: self.model.clone(),
            dep: self.dep,
            reported: self.reported.clone(),
        }
    }
}

/// Reports on one request: its time to first byte (for the `latency` policy) and its outcome
/// (for the deployment's breaker).
pub(crate) struct Feedback {
    model: Arc<ModelRt>,
    dep: usize,
    reported: Arc<std::sync::atomic::AtomicBool>,
}

impl Feedback {
    pub(crate) fn observe_ttfb(&self, ttfb: Duration) {
        lock(&self.model.core).observe_ttfb(self.dep, ttfb);
    }

    pub(crate) fn report(&self, outcome: Outcome) {
        lock(&self.model.core).record(self.dep, outcome, Instant::now());
        self.reported
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (dep, service) = (self.dep, self.start.elapsed());
        let abandoned = self.probe && !self.reported.load(std::sync::atomic::Ordering::Relaxed);
        let (wakes, retired_idle) = self.model.decide(|core, ledger| {
            let wakes = core.release(ledger, dep, service, abandoned, Instant::now());
            let s = &core.slots[dep];
            (wakes, s.retired && s.in_flight == 0)
        });
        self.model.deliver(wakes);
        if retired_idle {
            // The last request on a deployment a reload removed: its process may stop.
            self.model.release_retired();
        }
        if self.model.uses_memory.load(Ordering::Relaxed) {
            // This model may now be evictable: other models' memory waiters may fit.
            self.model.memory.pump_all(Some(&self.model));
        }
    }
}

/// Removes a queued request whose future is dropped (client gone) before it was served.
struct QueuedGuard<'a> {
    model: &'a ModelRt,
    key: Option<WaitKey>,
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            // If it was granted meanwhile, the permit sits in the dropped channel and is
            // released when the channel is dropped.
            lock(&self.model.core).cancel(&key);
        }
    }
}

impl ModelRt {
    /// Admits a request of priority `prio` that may wait up to `max_wait` (capped by the
    /// config): a permit to run, or the rejection to answer with.
    /// `exclude`: deployments (a bit each) this request already failed on; a retry runs now on
    /// another deployment or is refused, it never queues. `wants`: what the request brings to
    /// an affinity policy ([`Self::policy`]).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        prio: Priority,
        max_wait: Option<Duration>,
        exclude: u64,
        wants: Affinity,
    ) -> Result<Permit, Rejection> {
        let now = Instant::now();
        let limit = self.conf.load().max_wait;
        let wait = max_wait.map_or(limit, |w| w.min(limit));
        let deadline = (!wait.is_zero()).then(|| now + wait);
        let (tx, mut rx) = oneshot::channel();
        let decision =
            self.decide(|core, ledger| core.admit(ledger, prio, deadline, exclude, now, wants, tx));
        let key = match decision {
            Admit::Run(g) => {
                self.retire(&g.evicted);
                return Ok(self.permit(&g, now));
            }
            Admit::Reject(r) => return Err(r),
            Admit::Queued { key, shed } => {
                if let Some(shed) = shed {
                    let r = lock(&self.core).rejection(RejectReason::QueueFull, Priority::Low, now);
                    let _ = shed.send(Err(r));
                }
                key
            }
        };
        let mut guard = QueuedGuard {
            model: self,
            key: Some(key),
        };
        let deadline = tokio::time::Instant::from_std(deadline.unwrap_or(now));
        tokio::select! {
            r = &mut rx => {
                guard.key = None;
                r.unwrap_or_else(|_| Err(Rejection::new(RejectReason::QueueTimeout, 1)))
            }
            _ = tokio::time::sleep_until(deadline) => {
                guard.key = None;
                let removed = lock(&self.core).cancel(&key).is_some();
                if removed {
                    let r = lock(&self.core).rejection(RejectReason::QueueTimeout, prio, Instant::now());
                    Err(r)
                } else {
                    // Served (or shed) just as the deadline passed: take what was sent.
                    rx.await.unwrap_or_else(|_| Err(Rejection::new(RejectReason::QueueTimeout, 1)))
                }
            }
        }
    }

    /// Runs one decision of the core under the model's lock (and the memory ledger's, for a
    /// model that uses memory; lock order: core, then ledger).
    fn decide<R>(&self, f: impl FnOnce(&mut ModelCore<Waiter>, &mut Ledger) -> R) -> R {
        let mut core = lock(&self.core);
        if self.uses_memory.load(Ordering::Relaxed) {
            f(&mut core, &mut lock(&self.memory.ledger))
        } else {
            f(&mut core, &mut Ledger::new(MemoryLimits::OFF))
        }
    }

    fn retire(&self, evicted: &[usize]) {
        if !evicted.is_empty() {
            self.memory.retire(evicted);
        }
    }

    /// The model's routing policy now.
    pub(crate) fn policy(&self) -> Policy {
        self.conf.load().policy
    }

    /// When a request arriving now must be served by, at the latest, given its `max_wait`.
    pub(crate) fn deadline(&self, arrival: Instant, max_wait: Option<Duration>) -> Instant {
        let limit = self.conf.load().max_wait;
        arrival + max_wait.map_or(limit, |w| w.min(limit))
    }

    /// Releases the memory (and stops the process) of every retired slot with nothing in
    /// flight that still holds a ledger entry no current slot uses.
    fn release_retired(&self) {
        let idle: Vec<usize> = {
            let core = lock(&self.core);
            let live: Vec<usize> = core
                .slots
                .iter()
                .filter(|s| !s.retired)
                .filter_map(|s| s.mem)
                .collect();
            core.slots
                .iter()
                .filter(|s| s.retired && s.in_flight == 0)
                .filter_map(|s| s.mem)
                .filter(|id| !live.contains(id))
                .collect()
        };
        for id in idle {
            self.memory.remove(id);
        }
    }

    fn permit(self: &Arc<Self>, g: &Grant, start: Instant) -> Permit {
        let conf = self.conf.load();
        let slot = &conf.slots[g.dep];
        Permit {
            model: self.clone(),
            dep: g.dep,
            deployment: slot.deployment.clone(),
            managed: slot.managed.clone(),
            start,
            probe: g.probe,
            prefix_share: g.prefix_share,
            reported: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Sends the outcome to each woken waiter, outside every lock.
    fn deliver(self: &Arc<Self>, wakes: Vec<Wake<Waiter>>) {
        let now = Instant::now();
        for w in wakes {
            match w {
                Wake::Run(tx, g) => {
                    self.retire(&g.evicted);
                    let permit = self.permit(&g, now);
                    // A waiter that left meanwhile: its permit is dropped here, freeing the slot.
                    let _ = tx.send(Ok(permit));
                }
                Wake::Reject(tx, r) => {
                    let _ = tx.send(Err(r));
                }
            }
        }
    }

    /// The admin view of this model.
    pub(crate) fn snapshot(&self) -> Value {
        let conf = self.conf.load();
        let core = lock(&self.core);
        let by_prio = core.queue.depth_by_priority();
        let deployments: Vec<Value> = core
            .slots
            .iter()
            .zip(&conf.slots)
            .filter(|(s, _)| !s.retired || s.in_flight > 0)
            .map(|(s, SlotConf { deployment: d, .. })| {
                json!({
                    "backend": &*d.label,
                    "breaker": s.breaker.state().as_str(),
                    "in_flight": s.in_flight,
                    "max_concurrency": s.max,
                    "ttfb_ms_ewma": s.ttfb_ms,
                    "service_ms_ewma": s.service_ms,
                    "service_rate_per_s": s.service_ms.map(|ms| s.max as f64 * 1000.0 / ms.max(0.001)),
                    "removed": s.retired,
                })
            })
            .collect();
        let affinity = core.recall_size().map(|(kind, entries, capacity, bytes)| {
            json!({"kind": kind, "entries": entries, "capacity": capacity, "bytes": bytes})
        });
        json!({
            "policy": conf.policy.to_string(),
            "affinity": affinity,
            "queue": {
                "depth": core.queue.len(),
                "by_priority": {"low": by_prio[0], "normal": by_prio[1], "high": by_prio[2], "critical": by_prio[3]},
            },
            "completed": core.completed,
            "deployments": deployments,
        })
    }
}

/// All models and the shared memory.
pub(crate) struct Orchestrator {
    pub models: HashMap<String, Arc<ModelRt>>,
    pub memory: Arc<Memory>,
}

impl Orchestrator {
    /// The admin view: every model, and memory.
    pub(crate) fn snapshot(&self) -> Value {
        let mut names: Vec<&String> = self.models.keys().collect();
        names.sort();
        let models: serde_json::Map<String, Value> = names
            .into_iter()
            .map(|n| (n.clone(), self.models[n].snapshot()))
            .collect();
        json!({ "models": models, "memory": self.memory.snapshot() })
    }

    /// Shutdown: every queued request gets 503 `shutting_down`.
    pub(crate) fn shutdown(&self) {
        for m in self.models.values() {
            let drained = lock(&m.core).drain();
            for tx in drained {
                let _ = tx.send(Err(Rejection::new(RejectReason::ShuttingDown, 1)));
            }
        }
    }

    /// The pool's admin view.
    pub(crate) fn pool_snapshot(&self) -> Value {
        self.memory.pool_snapshot()
    }
}

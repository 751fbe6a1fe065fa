//! The orchestrator: the async shell around the admission core.
//!
//! Owns, per model, the lock around its [`ModelCore`] and the waiting of queued requests
//! (a oneshot each, with its deadline), and the [`Permit`] that holds a deployment slot for as
//! long as a request runs (a stream: until its last byte, or the client's disconnect). Locks
//! are std mutexes held only for a decision, never across an `.await`; lock order is model core,
//! then the shared memory ledger. It must not decide anything itself (that is `admission` and
//! `routing`) nor talk to backends (that is `upstream`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::admission::{
    Admit, Ledger, MemoryLimits, ModelCore, ModelLimits, Priority, Slot, WaitKey, Wake,
};
use crate::config::{Config, DeploymentKind};
use crate::error::ApiError;
use crate::routing::Policy;
use crate::upstream::Deployment;

type Waiter = oneshot::Sender<Result<Permit, ApiError>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take admission down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A model clients can ask for: its deployments and its admission state.
pub struct ModelRt {
    pub name: String,
    pub policy: Policy,
    pub deployments: Vec<Arc<Deployment>>,
    max_wait: Duration,
    core: Mutex<ModelCore<Waiter>>,
    /// The shared memory ledger, only for models with a deployment that declares `memory_mb`:
    /// the others never take the shared lock.
    ledger: Option<Arc<Mutex<Ledger>>>,
}

/// Holds a slot on one deployment; dropping it frees the slot and serves the next waiter.
pub struct Permit {
    model: Arc<ModelRt>,
    dep: usize,
    start: Instant,
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
    pub fn deployment(&self) -> &Arc<Deployment> {
        &self.model.deployments[self.dep]
    }

    /// A handle to record this request's time to first byte after the permit moved on.
    pub fn ttfb_recorder(&self) -> TtfbRecorder {
        TtfbRecorder {
            model: self.model.clone(),
            dep: self.dep,
        }
    }
}

/// Records an observed time to first byte for one deployment (the `latency` policy uses it).
pub struct TtfbRecorder {
    model: Arc<ModelRt>,
    dep: usize,
}

impl TtfbRecorder {
    pub fn observe(&self, ttfb: Duration) {
        lock(&self.model.core).observe_ttfb(self.dep, ttfb);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (dep, service) = (self.dep, self.start.elapsed());
        let wakes = self
            .model
            .decide(|core, ledger| core.release(ledger, dep, service, Instant::now()));
        self.model.deliver(wakes);
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
    pub async fn admit(
        self: &Arc<Self>,
        prio: Priority,
        max_wait: Option<Duration>,
    ) -> Result<Permit, ApiError> {
        let now = Instant::now();
        let wait = max_wait.map_or(self.max_wait, |w| w.min(self.max_wait));
        let deadline = (!wait.is_zero()).then(|| now + wait);
        let (tx, mut rx) = oneshot::channel();
        let decision = self.decide(|core, ledger| core.admit(ledger, prio, deadline, now, tx));
        let key = match decision {
            Admit::Run(g) => return Ok(self.permit(g.dep, now)),
            Admit::Reject {
                code,
                retry_after_s,
            } => return Err(self.reject(code, retry_after_s)),
            Admit::Queued { key, shed } => {
                if let Some(shed) = shed {
                    let ra = lock(&self.core).retry_after_s(Priority::Low);
                    let _ = shed.send(Err(self.reject("queue_full", ra)));
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
                r.unwrap_or_else(|_| Err(self.reject("queue_timeout", 1)))
            }
            _ = tokio::time::sleep_until(deadline) => {
                guard.key = None;
                let removed = lock(&self.core).cancel(&key).is_some();
                if removed {
                    let ra = lock(&self.core).retry_after_s(prio);
                    Err(self.reject("queue_timeout", ra))
                } else {
                    // Served (or shed) just as the deadline passed: take what was sent.
                    rx.await.unwrap_or_else(|_| Err(self.reject("queue_timeout", 1)))
                }
            }
        }
    }

    /// Runs one decision of the core under the model's lock (and the memory ledger's, for a
    /// model that uses memory; lock order: core, then ledger).
    fn decide<R>(&self, f: impl FnOnce(&mut ModelCore<Waiter>, &mut Ledger) -> R) -> R {
        let mut core = lock(&self.core);
        match &self.ledger {
            Some(shared) => f(&mut core, &mut lock(shared)),
            None => f(&mut core, &mut Ledger::new(MemoryLimits::OFF)),
        }
    }

    fn permit(self: &Arc<Self>, dep: usize, start: Instant) -> Permit {
        Permit {
            model: self.clone(),
            dep,
            start,
        }
    }

    /// Sends the outcome to each woken waiter, outside every lock.
    fn deliver(self: &Arc<Self>, wakes: Vec<Wake<Waiter>>) {
        let now = Instant::now();
        for w in wakes {
            match w {
                Wake::Run(tx, g) => {
                    let permit = self.permit(g.dep, now);
                    // A waiter that left meanwhile: its permit is dropped here, freeing the slot.
                    let _ = tx.send(Ok(permit));
                }
                Wake::Reject(tx, code, ra) => {
                    let _ = tx.send(Err(self.reject(code, ra)));
                }
            }
        }
    }

    fn reject(&self, code: &'static str, retry_after_s: u64) -> ApiError {
        ApiError::rejected(code, &self.name, retry_after_s)
    }

    /// The admin view of this model.
    pub fn snapshot(&self) -> Value {
        let core = lock(&self.core);
        let by_prio = core.queue.depth_by_priority();
        let deployments: Vec<Value> = core
            .slots
            .iter()
            .zip(&self.deployments)
            .map(|(s, d)| {
                json!({
                    "backend": d.label,
                    "in_flight": s.in_flight,
                    "max_concurrency": s.max,
                    "ttfb_ms_ewma": s.ttfb_ms,
                    "service_ms_ewma": s.service_ms,
                    "service_rate_per_s": s.service_ms.map(|ms| s.max as f64 * 1000.0 / ms.max(0.001)),
                })
            })
            .collect();
        json!({
            "policy": self.policy.to_string(),
            "queue": {
                "depth": core.queue.len(),
                "by_priority": {"low": by_prio[0], "normal": by_prio[1], "high": by_prio[2], "critical": by_prio[3]},
            },
            "completed": core.completed,
            "deployments": deployments,
        })
    }
}

/// All models and the shared memory ledger.
pub struct Orchestrator {
    pub models: HashMap<String, Arc<ModelRt>>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Orchestrator {
    /// Builds the admission state of every model; `deployments[i]` are model `i`'s, in config order.
    pub fn build(cfg: &Config, deployments: Vec<Vec<Arc<Deployment>>>) -> Orchestrator {
        let a = &cfg.admission;
        let mut ledger = Ledger::new(MemoryLimits {
            capacity_mb: a.memory_capacity_mb,
            defer: a.defer_threshold,
            reject: a.reject_threshold,
        });
        let mut models = HashMap::new();
        for (mi, (m, deps)) in cfg.models.iter().zip(deployments).enumerate() {
            let mut variants: Vec<&str> = Vec::new();
            let slots = m
                .deployments
                .iter()
                .map(|d| {
                    let local = d.kind != DeploymentKind::Cloud;
                    let rank = match (&d.variant, local) {
                        (Some(v), true) => {
                            variants.iter().position(|x| x == v).unwrap_or_else(|| {
                                variants.push(v);
                                variants.len() - 1
                            })
                        }
                        _ => 0,
                    };
                    Slot {
                        local,
                        rank,
                        max: d.max_concurrency,
                        in_flight: 0,
                        price: d.price_per_1k_tokens.unwrap_or(0.0),
                        mem: d.memory_mb.map(|mb| ledger.register(mb)),
                        ttfb_ms: None,
                        service_ms: None,
                    }
                })
                .collect();
            let policy = m.policy.unwrap_or(cfg.routing.policy);
            let limits = ModelLimits {
                policy,
                max_queue: a.max_queue,
                cost_wait_ms: cfg.routing.cost_max_queue_wait_ms as f64,
            };
            models.insert(
                m.name.clone(),
                (
                    policy,
                    deps,
                    ModelCore::new(limits, slots, 0x9e37_79b9_7f4a_7c15 ^ mi as u64),
                ),
            );
        }
        let ledger = Arc::new(Mutex::new(ledger));
        let models = models
            .into_iter()
            .map(|(name, (policy, deployments, core))| {
                let uses_memory = core.slots.iter().any(|s| s.mem.is_some());
                let rt = Arc::new(ModelRt {
                    name: name.clone(),
                    policy,
                    deployments,
                    max_wait: Duration::from_millis(a.max_queue_wait_ms),
                    core: Mutex::new(core),
                    ledger: uses_memory.then(|| ledger.clone()),
                });
                (name, rt)
            })
            .collect::<HashMap<_, _>>();
        Orchestrator { models, ledger }
    }

    /// The admin view: every model, and memory.
    pub fn snapshot(&self) -> Value {
        let mut names: Vec<&String> = self.models.keys().collect();
        names.sort();
        let models: serde_json::Map<String, Value> = names
            .into_iter()
            .map(|n| (n.clone(), self.models[n].snapshot()))
            .collect();
        let ledger = lock(&self.ledger);
        json!({
            "models": models,
            "memory": {
                "capacity_mb": ledger.limits.capacity_mb,
                "resident_mb": ledger.resident_mb(),
                "defer_threshold": ledger.limits.defer,
                "reject_threshold": ledger.limits.reject,
            }
        })
    }
}

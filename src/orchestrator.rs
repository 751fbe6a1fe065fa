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
    Admit, Grant, Ledger, MemoryLimits, ModelCore, ModelLimits, Outcome, Priority, Slot, WaitKey,
    Wake,
};
use crate::breaker::{Breaker, BreakerConfig};
use crate::config::{Config, DeploymentKind};
use crate::error::ApiError;
use crate::pool::{Managed, Spec};
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
    /// The shared memory ledger, only for models with a deployment that takes memory (declares
    /// `memory_mb`, or is run by the pool): the others never take the shared lock.
    memory: Option<Arc<Memory>>,
}

/// The memory budget shared by local models: the ledger, the process the pool runs for each
/// ledger entry (if any), and the models that wait for memory.
pub struct Memory {
    pub ledger: Arc<Mutex<Ledger>>,
    /// By ledger id.
    pub procs: Vec<Option<Arc<Managed>>>,
    models: std::sync::OnceLock<Vec<std::sync::Weak<ModelRt>>>,
}

impl Memory {
    /// Stops the processes of ledger entries that admission evicted.
    fn retire(&self, evicted: &[usize]) {
        for id in evicted {
            if let Some(Some(p)) = self.procs.get(*id) {
                p.retire();
            }
        }
    }

    /// Memory freed (a request ended on a resident model, a process stopped): serve the
    /// models' waiters that can run now.
    /// `except`: a model that was just pumped (by its own release) and need not be again.
    pub fn pump_all(&self, except: Option<&ModelRt>) {
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
    pub fn reap_idle(&self) {
        for p in self.procs.iter().flatten() {
            let Some(ttl) = p.idle_ttl() else { continue };
            let unloaded = {
                let mut l = lock(&self.ledger);
                let e = &l.entries[p.ledger_id];
                let idle = e.resident
                    && e.in_flight == 0
                    && e.last_used.is_none_or(|t| t.elapsed() >= ttl);
                idle && p.phase() == crate::pool::Phase::Ready && l.unload(p.ledger_id)
            };
            if unloaded {
                tracing::info!(model = %p.name, ttl_s = ttl.as_secs(), "stopping idle model server");
                p.retire();
            }
        }
    }

    /// Stops every process the pool runs (shutdown), waiting up to the stop grace for each.
    pub async fn stop_all(&self) {
        for p in self.procs.iter().flatten() {
            lock(&self.ledger).force_unload(p.ledger_id);
            p.retire();
        }
        for p in self.procs.iter().flatten() {
            p.wait_stopped(crate::pool::STOP_GRACE + Duration::from_secs(1))
                .await;
        }
    }
}

/// Holds a slot on one deployment; dropping it frees the slot and serves the next waiter.
pub struct Permit {
    model: Arc<ModelRt>,
    dep: usize,
    start: Instant,
    /// It is the breaker's half-open probe.
    probe: bool,
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
    pub fn deployment(&self) -> &Arc<Deployment> {
        &self.model.deployments[self.dep]
    }

    /// Which of its model's deployments (its index, for retries' exclusions).
    pub fn dep_index(&self) -> usize {
        self.dep
    }

    /// A handle to report on this request after the permit moved on (into a stream).
    pub fn feedback(&self) -> Feedback {
        Feedback {
            model: self.model.clone(),
            dep: self.dep,
            reported: self.reported.clone(),
        }
    }
}

/// Reports on one request: its time to first byte (for the `latency` policy) and its outcome
/// (for the deployment's breaker).
pub struct Feedback {
    model: Arc<ModelRt>,
    dep: usize,
    reported: Arc<std::sync::atomic::AtomicBool>,
}

impl Feedback {
    pub fn observe_ttfb(&self, ttfb: Duration) {
        lock(&self.model.core).observe_ttfb(self.dep, ttfb);
    }

    pub fn report(&self, outcome: Outcome) {
        lock(&self.model.core).record(self.dep, outcome, Instant::now());
        self.reported
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (dep, service) = (self.dep, self.start.elapsed());
        let abandoned = self.probe && !self.reported.load(std::sync::atomic::Ordering::Relaxed);
        let wakes = self
            .model
            .decide(|core, ledger| core.release(ledger, dep, service, abandoned, Instant::now()));
        self.model.deliver(wakes);
        if let Some(memory) = &self.model.memory {
            // This model may now be evictable: other models' memory waiters may fit.
            memory.pump_all(Some(&self.model));
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
    /// another deployment or is refused, it never queues.
    pub async fn admit(
        self: &Arc<Self>,
        prio: Priority,
        max_wait: Option<Duration>,
        exclude: u64,
    ) -> Result<Permit, ApiError> {
        let now = Instant::now();
        let wait = max_wait.map_or(self.max_wait, |w| w.min(self.max_wait));
        let deadline = (!wait.is_zero()).then(|| now + wait);
        let (tx, mut rx) = oneshot::channel();
        let decision =
            self.decide(|core, ledger| core.admit(ledger, prio, deadline, exclude, now, tx));
        let key = match decision {
            Admit::Run(g) => {
                self.retire(&g.evicted);
                return Ok(self.permit(&g, now));
            }
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
        match &self.memory {
            Some(m) => f(&mut core, &mut lock(&m.ledger)),
            None => f(&mut core, &mut Ledger::new(MemoryLimits::OFF)),
        }
    }

    fn retire(&self, evicted: &[usize]) {
        if let Some(m) = &self.memory {
            m.retire(evicted);
        }
    }

    /// When a request arriving now must be served by, at the latest, given its `max_wait`.
    pub fn deadline(&self, arrival: Instant, max_wait: Option<Duration>) -> Instant {
        arrival + max_wait.map_or(self.max_wait, |w| w.min(self.max_wait))
    }

    fn permit(self: &Arc<Self>, g: &Grant, start: Instant) -> Permit {
        Permit {
            model: self.clone(),
            dep: g.dep,
            start,
            probe: g.probe,
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

/// Probes deployment `dep` of a model every `every` while it is idle, feeding its breaker: a
/// failed probe counts as a failure, a good one closes an open breaker.
async fn health_check(model: std::sync::Weak<ModelRt>, dep: usize, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(m) = model.upgrade() else { return };
        if lock(&m.core).slots[dep].in_flight > 0 {
            continue;
        }
        let d = m.deployments[dep].clone();
        let ok = d.probe().await;
        let outcome = if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        if !ok {
            tracing::warn!(backend = %d.label, "health check failed");
        }
        lock(&m.core).record(dep, outcome, Instant::now());
    }
}

/// All models and the shared memory.
pub struct Orchestrator {
    pub models: HashMap<String, Arc<ModelRt>>,
    pub memory: Arc<Memory>,
}

impl Orchestrator {
    /// Builds every model's deployments and admission state: starts in-process simulators,
    /// registers memory, and sets up the pool's processes (started on demand, not here).
    pub async fn build(cfg: &Config) -> Result<Orchestrator, String> {
        let a = &cfg.admission;
        let mut ledger = Ledger::new(MemoryLimits {
            capacity_mb: a.memory_capacity_mb,
            defer: a.defer_threshold,
            reject: a.reject_threshold,
        });
        // Ledger entries: deployments that declare memory, and every one the pool runs.
        let mem_ids: Vec<Vec<Option<usize>>> = cfg
            .models
            .iter()
            .map(|m| {
                m.deployments
                    .iter()
                    .map(|d| {
                        (d.memory_mb.is_some() || d.command.is_some())
                            .then(|| ledger.register(d.memory_mb.unwrap_or(0)))
                    })
                    .collect()
            })
            .collect();
        let ledger = Arc::new(Mutex::new(ledger));
        let mut procs: Vec<Option<Arc<Managed>>> = vec![None; lock(&ledger).entries.len()];
        let r = &cfg.resilience;
        let breaker_cfg = BreakerConfig {
            failures: r.breaker_failures,
            error_rate: r.breaker_error_rate,
            window: r.breaker_window,
            open_for: Duration::from_millis(r.breaker_open_ms),
        };
        let mut models = Vec::new();
        for (mi, m) in cfg.models.iter().enumerate() {
            let mut deployments = Vec::new();
            let mut slots = Vec::new();
            let mut variants: Vec<&str> = Vec::new();
            for (d, mem) in m.deployments.iter().zip(&mem_ids[mi]) {
                let managed = match (&d.command, mem) {
                    (Some(command), Some(id)) => {
                        let label = d.label(&m.name);
                        let name = label
                            .strip_prefix("local(")
                            .and_then(|l| l.strip_suffix(')'))
                            .unwrap_or(&label)
                            .to_string();
                        let spec = Spec {
                            command: command.clone(),
                            env: d.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                            cwd: d.cwd.clone(),
                            ready_path: d.ready_path.clone(),
                            startup_timeout: Duration::from_secs(d.startup_timeout_s),
                            idle_ttl: (d.idle_ttl_s > 0).then(|| Duration::from_secs(d.idle_ttl_s)),
                            model: d.upstream_model.clone().unwrap_or_else(|| m.name.clone()),
                        };
                        let p = Managed::new(name, spec, *id, ledger.clone());
                        procs[*id] = Some(p.clone());
                        Some(p)
                    }
                    _ => None,
                };
                let url = match d.kind {
                    DeploymentKind::Sim => {
                        let opts = crate::sim::SimOptions {
                            models: vec![d
                                .upstream_model
                                .clone()
                                .unwrap_or_else(|| m.name.clone())],
                            ttft: Duration::from_millis(d.ttft_ms.unwrap_or(0)),
                            tokens_per_sec: d.tokens_per_sec.unwrap_or(0.0),
                            ..Default::default()
                        };
                        let addr = crate::sim::spawn_local(opts).await.map_err(|e| {
                            format!("cannot start the simulator for {}: {e}", m.name)
                        })?;
                        format!("http://{addr}/v1")
                    }
                    _ => d.url.clone().unwrap_or_default(),
                };
                let dep = Deployment::new(&m.name, d, &url, managed, cfg.server.max_response_bytes)
                    .map_err(|e| format!("model {}: {e}", m.name))?;
                deployments.push(Arc::new(dep));
                let local = d.kind != DeploymentKind::Cloud;
                let rank = match (&d.variant, local) {
                    (Some(v), true) => variants.iter().position(|x| x == v).unwrap_or_else(|| {
                        variants.push(v);
                        variants.len() - 1
                    }),
                    _ => 0,
                };
                slots.push(Slot {
                    local,
                    rank,
                    max: d.max_concurrency,
                    in_flight: 0,
                    price: d.price_per_1k_tokens.unwrap_or(0.0),
                    mem: *mem,
                    ttfb_ms: None,
                    service_ms: None,
                    breaker: Breaker::new(breaker_cfg),
                });
            }
            let policy = m.policy.unwrap_or(cfg.routing.policy);
            let limits = ModelLimits {
                policy,
                max_queue: a.max_queue,
                cost_wait_ms: cfg.routing.cost_max_queue_wait_ms as f64,
            };
            let core = ModelCore::new(limits, slots, 0x9e37_79b9_7f4a_7c15 ^ mi as u64);
            models.push((m.name.clone(), policy, deployments, core));
        }
        let memory = Arc::new(Memory {
            ledger,
            procs,
            models: std::sync::OnceLock::new(),
        });
        let models: HashMap<String, Arc<ModelRt>> = models
            .into_iter()
            .map(|(name, policy, deployments, core)| {
                let uses_memory = core.slots.iter().any(|s| s.mem.is_some());
                let rt = Arc::new(ModelRt {
                    name: name.clone(),
                    policy,
                    deployments,
                    max_wait: Duration::from_millis(a.max_queue_wait_ms),
                    core: Mutex::new(core),
                    memory: uses_memory.then(|| memory.clone()),
                });
                (name, rt)
            })
            .collect();
        for (m, rt) in cfg.models.iter().map(|m| (m, &models[&m.name])) {
            for (i, d) in m.deployments.iter().enumerate() {
                if d.health_check_interval_s > 0 {
                    let every = Duration::from_secs(d.health_check_interval_s);
                    tokio::spawn(health_check(Arc::downgrade(rt), i, every));
                }
            }
        }
        let _ = memory.models.set(
            models
                .values()
                .filter(|m| m.memory.is_some())
                .map(Arc::downgrade)
                .collect(),
        );
        for p in memory.procs.iter().flatten() {
            let weak = Arc::downgrade(&memory);
            p.on_free(move || {
                if let Some(m) = weak.upgrade() {
                    m.pump_all(None);
                }
            });
        }
        if memory
            .procs
            .iter()
            .any(|p| p.as_ref().is_some_and(|p| p.idle_ttl().is_some()))
        {
            let weak = Arc::downgrade(&memory);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    match weak.upgrade() {
                        Some(m) => m.reap_idle(),
                        None => return,
                    }
                }
            });
        }
        Ok(Orchestrator { models, memory })
    }

    /// The admin view: every model, and memory.
    pub fn snapshot(&self) -> Value {
        let mut names: Vec<&String> = self.models.keys().collect();
        names.sort();
        let models: serde_json::Map<String, Value> = names
            .into_iter()
            .map(|n| (n.clone(), self.models[n].snapshot()))
            .collect();
        let ledger = lock(&self.memory.ledger);
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

    /// Shutdown: every queued request gets 503 `shutting_down`.
    pub fn shutdown(&self) {
        for m in self.models.values() {
            let drained = lock(&m.core).drain();
            for tx in drained {
                let _ = tx.send(Err(ApiError::shutting_down()));
            }
        }
    }

    /// The pool's admin view.
    pub fn pool_snapshot(&self) -> Value {
        let procs: Vec<Value> = self
            .memory
            .procs
            .iter()
            .flatten()
            .map(|p| p.snapshot())
            .collect();
        json!({ "models": procs })
    }

    /// Marks a pool model resident (evicting idle ones if needed) so that it can be started.
    pub fn load(&self, p: &Managed) -> Result<(), ApiError> {
        let evicted = lock(&self.memory.ledger)
            .load(p.ledger_id, Priority::Normal, Instant::now())
            .map_err(|b| {
                let code = match b {
                    crate::routing::Block::TooLarge => "model_too_large",
                    _ => "memory_exhausted",
                };
                ApiError::rejected(code, &p.name, 5)
            })?;
        self.memory.retire(&evicted);
        Ok(())
    }

    /// Releases a pool model's memory and stops it; refused while requests are in flight.
    pub fn unload(&self, p: &Managed) -> Result<(), ApiError> {
        if !lock(&self.memory.ledger).unload(p.ledger_id) {
            return Err(ApiError::model_busy(&p.name));
        }
        p.retire();
        Ok(())
    }

    /// The pool's process named `name` (`model` or `model@variant`).
    pub fn managed(&self, name: &str) -> Option<&Arc<Managed>> {
        self.memory.procs.iter().flatten().find(|p| p.name == name)
    }
}

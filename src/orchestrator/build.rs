//! Building the orchestrator from a validated config: the memory ledger and the pool's
//! processes, each model's deployments (starting in-process simulators) and admission state,
//! and the background tasks (health checks, the idle reaper); at start, and again at each
//! reload, which reuses what the running generation has (see [`Orchestrator::reload`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use super::{lock, Memory, ModelConf, ModelRt, Orchestrator, SlotConf};
use crate::admission::{Ledger, MemoryLimits, ModelCore, ModelLimits, Outcome, Reslot, Slot};
use crate::breaker::{Breaker, BreakerConfig};
use crate::config::{Config, DeploymentConfig, DeploymentKind, ModelConfig};
use crate::pool::{Managed, Spec};
use crate::routing::Policy;
use crate::upstream::{Deployment, DynamicBase};

/// Why the gateway could not be built from a valid config.
#[derive(Debug)]
pub enum BuildError {
    /// The in-process simulator of a model could not listen.
    Simulator {
        model: String,
        source: std::io::Error,
    },
    /// A deployment could not be set up (its client, its credentials).
    Deployment { model: String, detail: String },
    /// The usage ledger's database could not be opened or migrated.
    Usage(String),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::Simulator { model, source } => {
                write!(f, "cannot start the simulator for {model}: {source}")
            }
            BuildError::Deployment { model, detail } => write!(f, "model {model}: {detail}"),
            BuildError::Usage(detail) => f.write_str(detail),
        }
    }
}

impl std::error::Error for BuildError {}

impl Orchestrator {
    /// Builds every model's deployments and admission state: starts in-process simulators,
    /// registers memory, and sets up the pool's processes (started on demand, not here); and
    /// the idle reaper of the pool.
    pub(crate) async fn build(cfg: &Config) -> Result<Orchestrator, BuildError> {
        let a = &cfg.admission;
        let memory = Memory::new(Ledger::new(MemoryLimits {
            capacity_mb: a.memory_capacity_mb,
            defer: a.defer_threshold,
            reject: a.reject_threshold,
        }));
        let empty = Orchestrator {
            models: HashMap::new(),
            memory: memory.clone(),
        };
        let orch = empty.reload(cfg).await?;
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
        Ok(orch)
    }

    /// The orchestrator of `cfg`, made from this one: a model that stays is the same runtime
    /// (its queue, slots, breakers and pool processes live on) with its settings and
    /// deployments changed in place; a new model is built; a removed one has its deployments
    /// retired (its waiters are refused, its requests in flight finish). Everything that can
    /// fail (starting a simulator, building a client) happens before anything is changed.
    pub(crate) async fn reload(&self, cfg: &Config) -> Result<Orchestrator, BuildError> {
        let mut prepared = Vec::with_capacity(cfg.models.len());
        for (mi, m) in cfg.models.iter().enumerate() {
            let old = self.models.get(&m.name).map(|rt| rt.conf.load_full());
            prepared.push(prepare(cfg, m, mi, old.as_deref(), &self.memory).await?);
        }
        let mut models = HashMap::with_capacity(cfg.models.len());
        for (m, prep) in cfg.models.iter().zip(prepared) {
            let rt = match self.models.get(&m.name) {
                Some(rt) => rt.clone(),
                None => Arc::new(ModelRt {
                    name: m.name.as_str().into(),
                    conf: ArcSwap::from_pointee(ModelConf::empty(prep.limits.policy)),
                    core: Mutex::new(ModelCore::new(prep.limits, Vec::new(), prep.seed)),
                    memory: self.memory.clone(),
                    uses_memory: AtomicBool::new(false),
                }),
            };
            let checks = rt.apply(prep);
            for (dep, d, every) in checks {
                tokio::spawn(health_check(Arc::downgrade(&rt), dep, d, every));
            }
            models.insert(m.name.clone(), rt);
        }
        for (name, rt) in &self.models {
            if !models.contains_key(name) {
                let limits = lock(&rt.core).limits;
                rt.apply(Prepared {
                    limits,
                    max_wait: Duration::ZERO,
                    seed: 0,
                    deps: Vec::new(),
                });
            }
        }
        self.memory.models.store(Arc::new(
            models
                .values()
                .filter(|m| m.uses_memory.load(Ordering::Relaxed))
                .map(Arc::downgrade)
                .collect(),
        ));
        Ok(Orchestrator {
            models,
            memory: self.memory.clone(),
        })
    }
}

/// A model's new settings and deployments, made before anything is changed.
struct Prepared {
    limits: ModelLimits,
    max_wait: Duration,
    seed: u64,
    deps: Vec<PreparedDep>,
}

/// One deployment of the new config, and which slot (if any) it continues.
struct PreparedDep {
    conf: SlotConf,
    /// Its slot as the new config says (limit, locality, rank, price, memory entry).
    fresh: Slot,
    /// The slot it continues, and whether its backend changed (breaker and times start over).
    keep: Option<(usize, bool)>,
    /// A new client (new or changed): its health check (if any) starts.
    built: bool,
}

impl ModelConf {
    fn empty(policy: Policy) -> ModelConf {
        ModelConf {
            policy,
            max_wait: Duration::ZERO,
            slots: Vec::new(),
        }
    }
}

/// The fields of a deployment that make its pool process: a change of any is another process.
fn process_spec(d: &DeploymentConfig) -> impl PartialEq + '_ {
    (
        &d.command,
        &d.env,
        &d.cwd,
        &d.ready_path,
        d.startup_timeout_s,
        d.idle_ttl_s,
        &d.upstream_model,
        d.memory_mb,
    )
}

/// The fields of a `sim` deployment that its in-process simulator was started with.
fn sim_spec(d: &DeploymentConfig) -> impl PartialEq + '_ {
    (
        &d.upstream_model,
        d.ttft_ms,
        d.tokens_per_sec.map(f64::to_bits),
        d.api,
    )
}

/// Makes model `m`'s deployments for `cfg`, reusing what `old` (its running generation, if
/// it has one) already runs: an unchanged deployment is kept whole; a changed one gets a new
/// client on the same slot (and the same process or simulator when those did not change);
/// a pool deployment whose process changed is a new slot and a new process.
async fn prepare(
    cfg: &Config,
    m: &ModelConfig,
    mi: usize,
    old: Option<&ModelConf>,
    memory: &Arc<Memory>,
) -> Result<Prepared, BuildError> {
    let r = &cfg.resilience;
    let breaker_cfg = BreakerConfig {
        failures: r.breaker_failures,
        error_rate: r.breaker_error_rate,
        window: r.breaker_window,
        open_for: Duration::from_millis(r.breaker_open_ms),
    };
    let a = &cfg.admission;
    let policy = m.policy.unwrap_or(cfg.routing.policy);
    let mut deps = Vec::with_capacity(m.deployments.len());
    let mut variants: Vec<&str> = Vec::new();
    let ids = crate::config::deployment_ids(&m.name, &m.deployments);
    for (d, id) in m.deployments.iter().zip(ids) {
        let prev = old.and_then(|o| {
            let i = o.slots.iter().rposition(|s| s.id == id)?;
            Some((i, &o.slots[i]))
        });
        // The slot it continues; `None`: a new slot.
        let same_process = |o: &SlotConf| {
            // A process stopped for good (its slot was retired and went idle) is not reused.
            let live = o.managed.is_none() || o.mem.is_some_and(|id| memory.runs(id));
            process_spec(&o.config) == process_spec(d) && live
        };
        let cont = prev.filter(|(_, o)| same_process(o));
        let unchanged = cont.filter(|(_, o)| o.config == *d);
        let local = d.kind != DeploymentKind::Cloud;
        let rank = match (&d.variant, local) {
            (Some(v), true) => variants.iter().position(|x| x == v).unwrap_or_else(|| {
                variants.push(v);
                variants.len() - 1
            }),
            _ => 0,
        };
        let mut fresh = Slot {
            local,
            rank,
            max: d.max_concurrency,
            in_flight: 0,
            price: d.price_per_1k_tokens.unwrap_or(0.0),
            mem: None,
            ttfb_ms: None,
            service_ms: None,
            retired: false,
            breaker: Breaker::new(breaker_cfg),
        };
        if let Some((i, o)) = unchanged {
            fresh.mem = o.mem;
            deps.push(PreparedDep {
                conf: o.clone(),
                fresh,
                keep: Some((i, false)),
                built: false,
            });
            continue;
        }
        // The pool's process: the one it had, or a new one (with its memory entry).
        let (managed, mem) = match cont {
            Some((_, o)) => (o.managed.clone(), old_mem(o, memory, d)),
            None => match &d.command {
                Some(_) => {
                    let p = managed(m, d);
                    let id = memory.register(d.memory_mb.unwrap_or(0), Some(p.clone()));
                    (Some(p), Some(id))
                }
                None => (None, d.memory_mb.map(|mb| memory.register(mb, None))),
            },
        };
        fresh.mem = mem;
        let url = match (d.kind, cont) {
            (DeploymentKind::Sim, Some((_, o))) if sim_spec(&o.config) == sim_spec(d) => {
                o.url.clone()
            }
            (DeploymentKind::Sim, _) => sim_url(m, d).await?,
            _ => d.url.clone().unwrap_or_default(),
        };
        let dynamic_base = managed.clone().map(|p| {
            let base: DynamicBase = Arc::new(move || p.url());
            base
        });
        let dep = Deployment::new(
            &m.name,
            d,
            &url,
            dynamic_base,
            cfg.server.max_response_bytes,
        )
        .map_err(|detail| BuildError::Deployment {
            model: m.name.clone(),
            detail,
        })?;
        let keep = cont.map(|(i, o)| {
            let c = &o.config;
            (
                i,
                (c.kind, &c.url, c.api) != (d.kind, &d.url, d.api) || o.url != url,
            )
        });
        deps.push(PreparedDep {
            conf: SlotConf {
                deployment: Arc::new(dep),
                managed,
                id,
                config: d.clone(),
                url,
                mem,
            },
            fresh,
            keep,
            built: true,
        });
    }
    Ok(Prepared {
        limits: ModelLimits {
            policy,
            max_queue: a.max_queue,
            cost_wait_ms: cfg.routing.cost_max_queue_wait_ms as f64,
            affinity: cfg.routing.affinity(),
        },
        max_wait: Duration::from_millis(a.max_queue_wait_ms),
        seed: 0x9e37_79b9_7f4a_7c15 ^ mi as u64,
        deps,
    })
}

/// The memory entry of slot `o`, kept for `d` (a deployment that declares no memory and is
/// not run by the pool has none; one that now declares memory gets a new entry).
fn old_mem(o: &SlotConf, memory: &Arc<Memory>, d: &DeploymentConfig) -> Option<usize> {
    match (o.mem, d.memory_mb, &d.command) {
        (Some(id), _, _) if o.config.memory_mb == d.memory_mb => Some(id),
        (_, None, None) => None,
        (_, mb, _) => Some(memory.register(mb.unwrap_or(0), o.managed.clone())),
    }
}

impl ModelRt {
    /// Puts `prep` into effect: the core reconfigured and the new generation of the model's
    /// settings stored under the model's lock (so that a grant and its deployment agree),
    /// waiters served or refused, idle retired deployments released. Returns the health
    /// checks to start (slot, deployment, period).
    fn apply(self: &Arc<Self>, prep: Prepared) -> Vec<(usize, Arc<Deployment>, Duration)> {
        let Prepared {
            limits,
            max_wait,
            deps,
            ..
        } = prep;
        if deps.iter().any(|d| d.fresh.mem.is_some()) {
            self.uses_memory.store(true, Ordering::Relaxed);
        }
        let mut checks = Vec::new();
        let reslots = deps
            .iter()
            .map(|d| match d.keep {
                Some((idx, reset)) => Reslot::Keep {
                    idx,
                    fresh: d.fresh.clone(),
                    reset,
                },
                None => Reslot::New(d.fresh.clone()),
            })
            .collect();
        // Under the model's lock: the core and the settings change together.
        let wakes = self.decide(|core, ledger| {
            let (order, wakes) = core.reconfigure(ledger, limits, reslots, Instant::now());
            let mut slots = self.conf.load().slots.clone();
            for (slot, d) in order.into_iter().zip(deps) {
                if d.built && d.conf.config.health_check_interval_s > 0 {
                    let every = Duration::from_secs(d.conf.config.health_check_interval_s);
                    checks.push((slot, d.conf.deployment.clone(), every));
                }
                match slots.get_mut(slot) {
                    Some(s) => *s = d.conf,
                    None => slots.push(d.conf),
                }
            }
            debug_assert_eq!(slots.len(), core.slots.len());
            self.conf.store(Arc::new(ModelConf {
                policy: limits.policy,
                max_wait,
                slots,
            }));
            wakes
        });
        self.deliver(wakes);
        self.release_retired();
        checks
    }
}

/// The pool's process for a deployment with a `command`, named `model` or `model@variant`.
fn managed(m: &ModelConfig, d: &DeploymentConfig) -> Arc<Managed> {
    let name = match &d.variant {
        Some(v) => format!("{}@{v}", m.name),
        None => m.name.clone(),
    };
    let spec = Spec {
        command: d.command.clone().unwrap_or_default(),
        env: d.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        cwd: d.cwd.clone(),
        ready_path: d.ready_path.clone(),
        startup_timeout: Duration::from_secs(d.startup_timeout_s),
        idle_ttl: (d.idle_ttl_s > 0).then(|| Duration::from_secs(d.idle_ttl_s)),
        model: d.upstream_model.clone().unwrap_or_else(|| m.name.clone()),
    };
    Managed::new(name, spec)
}

/// Starts the in-process simulator of a `sim` deployment; returns its base URL.
async fn sim_url(m: &ModelConfig, d: &DeploymentConfig) -> Result<String, BuildError> {
    let opts = crate::sim::SimOptions {
        models: vec![d.upstream_model.clone().unwrap_or_else(|| m.name.clone())],
        ttft: Duration::from_millis(d.ttft_ms.unwrap_or(0)),
        tokens_per_sec: d.tokens_per_sec.unwrap_or(0.0),
        // The simulator speaks the API the deployment is configured to call.
        api: match d.api {
            crate::config::UpstreamApiKind::OpenAi => crate::sim::SimApi::OpenAi,
            crate::config::UpstreamApiKind::Anthropic => crate::sim::SimApi::Anthropic,
        },
        ..Default::default()
    };
    let addr = crate::sim::spawn_local(opts)
        .await
        .map_err(|source| BuildError::Simulator {
            model: m.name.clone(),
            source,
        })?;
    Ok(format!("http://{addr}/v1"))
}

/// Probes deployment `dep` of a model every `every` while it is idle, feeding its breaker: a
/// failed probe counts as a failure, a good one closes an open breaker. Ends when a reload
/// replaces or removes the deployment (or the model goes).
async fn health_check(model: Weak<ModelRt>, dep: usize, d: Arc<Deployment>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(m) = model.upgrade() else { return };
        if !m
            .conf
            .load()
            .slots
            .get(dep)
            .is_some_and(|s| Arc::ptr_eq(&s.deployment, &d))
        {
            return;
        }
        {
            let core = lock(&m.core);
            if core.slots[dep].retired {
                return;
            }
            if core.slots[dep].in_flight > 0 {
                continue;
            }
        }
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

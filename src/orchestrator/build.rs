//! Building the orchestrator from a validated config: the memory ledger and the pool's
//! processes, each model's deployments (starting in-process simulators) and admission state,
//! and the background tasks (health checks, the idle reaper). Runs once, at start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::{lock, Memory, ModelRt, Orchestrator};
use crate::admission::{Ledger, MemoryLimits, ModelCore, ModelLimits, Outcome, Slot};
use crate::breaker::{Breaker, BreakerConfig};
use crate::config::{Config, DeploymentConfig, DeploymentKind, ModelConfig};
use crate::pool::{Managed, Spec};
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
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::Simulator { model, source } => {
                write!(f, "cannot start the simulator for {model}: {source}")
            }
            BuildError::Deployment { model, detail } => write!(f, "model {model}: {detail}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// A model's parts before its runtime is made.
struct Parts {
    deployments: Vec<Arc<Deployment>>,
    managed: Vec<Option<Arc<Managed>>>,
    slots: Vec<Slot>,
}

impl Orchestrator {
    /// Builds every model's deployments and admission state: starts in-process simulators,
    /// registers memory, and sets up the pool's processes (started on demand, not here).
    pub(crate) async fn build(cfg: &Config) -> Result<Orchestrator, BuildError> {
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
        let mut procs: Vec<Option<Arc<Managed>>> = vec![None; ledger.entries.len()];
        let mut parts = Vec::new();
        for (m, ids) in cfg.models.iter().zip(&mem_ids) {
            parts.push(model_parts(cfg, m, ids, &mut procs).await?);
        }
        let memory = Memory::new(Arc::new(Mutex::new(ledger)), procs);
        let models = runtimes(cfg, parts, &memory);
        spawn_background(cfg, &models, &memory);
        Ok(Orchestrator { models, memory })
    }
}

/// One model's deployments and slots; registers its pool processes in `procs`.
async fn model_parts(
    cfg: &Config,
    m: &ModelConfig,
    mem_ids: &[Option<usize>],
    procs: &mut [Option<Arc<Managed>>],
) -> Result<Parts, BuildError> {
    let r = &cfg.resilience;
    let breaker_cfg = BreakerConfig {
        failures: r.breaker_failures,
        error_rate: r.breaker_error_rate,
        window: r.breaker_window,
        open_for: Duration::from_millis(r.breaker_open_ms),
    };
    let mut parts = Parts {
        deployments: Vec::new(),
        managed: Vec::new(),
        slots: Vec::new(),
    };
    let mut variants: Vec<&str> = Vec::new();
    for (d, mem) in m.deployments.iter().zip(mem_ids) {
        let proc = match (&d.command, mem) {
            (Some(_), Some(id)) => {
                let p = managed(m, d);
                procs[*id] = Some(p.clone());
                Some(p)
            }
            _ => None,
        };
        let dynamic_base = proc.clone().map(|p| {
            let base: DynamicBase = Arc::new(move || p.url());
            base
        });
        parts.managed.push(proc);
        let url = match d.kind {
            DeploymentKind::Sim => sim_url(m, d).await?,
            _ => d.url.clone().unwrap_or_default(),
        };
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
        parts.deployments.push(Arc::new(dep));
        let local = d.kind != DeploymentKind::Cloud;
        let rank = match (&d.variant, local) {
            (Some(v), true) => variants.iter().position(|x| x == v).unwrap_or_else(|| {
                variants.push(v);
                variants.len() - 1
            }),
            _ => 0,
        };
        parts.slots.push(Slot {
            local,
            rank,
            max: d.max_concurrency,
            in_flight: 0,
            price: d.price_per_1k_tokens.unwrap_or(0.0),
            mem: *mem,
            ttfb_ms: None,
            service_ms: None,
            retired: false,
            breaker: Breaker::new(breaker_cfg),
        });
    }
    Ok(parts)
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

/// Each model's runtime, registered with the memory budget if it takes memory.
fn runtimes(
    cfg: &Config,
    parts: Vec<Parts>,
    memory: &Arc<Memory>,
) -> HashMap<String, Arc<ModelRt>> {
    let a = &cfg.admission;
    let models: HashMap<String, Arc<ModelRt>> = cfg
        .models
        .iter()
        .zip(parts)
        .enumerate()
        .map(|(mi, (m, p))| {
            let policy = m.policy.unwrap_or(cfg.routing.policy);
            let limits = ModelLimits {
                policy,
                max_queue: a.max_queue,
                cost_wait_ms: cfg.routing.cost_max_queue_wait_ms as f64,
            };
            let uses_memory = p.slots.iter().any(|s| s.mem.is_some());
            let core = ModelCore::new(limits, p.slots, 0x9e37_79b9_7f4a_7c15 ^ mi as u64);
            let rt = Arc::new(ModelRt {
                name: m.name.as_str().into(),
                policy,
                deployments: p.deployments,
                managed: p.managed,
                max_wait: Duration::from_millis(a.max_queue_wait_ms),
                core: Mutex::new(core),
                memory: uses_memory.then(|| memory.clone()),
            });
            (m.name.clone(), rt)
        })
        .collect();
    let _ = memory.models.set(
        models
            .values()
            .filter(|m| m.memory.is_some())
            .map(Arc::downgrade)
            .collect(),
    );
    models
}

/// Health checks of the deployments that ask for them, and the idle reaper of the pool.
fn spawn_background(cfg: &Config, models: &HashMap<String, Arc<ModelRt>>, memory: &Arc<Memory>) {
    for m in &cfg.models {
        for (i, d) in m.deployments.iter().enumerate() {
            if d.health_check_interval_s > 0 {
                let every = Duration::from_secs(d.health_check_interval_s);
                tokio::spawn(health_check(Arc::downgrade(&models[&m.name]), i, every));
            }
        }
    }
    if memory.has_idle_ttl() {
        let weak = Arc::downgrade(memory);
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
}

/// Probes deployment `dep` of a model every `every` while it is idle, feeding its breaker: a
/// failed probe counts as a failure, a good one closes an open breaker.
async fn health_check(model: Weak<ModelRt>, dep: usize, every: Duration) {
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

//! The async shell of the rate limits: which buckets a request charges (its principal's `rpm`,
//! `tpm`, `max_parallel`, and its model's `rpm`/`tpm`, all principals together), and the store that
//! keeps them: in memory ([`memory`]) or in Redis ([`redis`], shared by every replica, with
//! the `local` / `closed` failure modes). The arithmetic is `limits`' (pure); this module owns
//! the I/O, and must not answer HTTP (that is `error`, through the `limit` phase).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{json, Value};

use crate::config::{Config, LimitStore, RedisFailure};
use crate::limits::{Charge, Denial, Dim, Rate, Status};

mod memory;
mod redis;

use memory::MemoryStore;
use redis::RedisStore;

/// How long a Redis in-flight lease lives without renewal: a replica that dies frees its
/// places after this.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);

/// Which bucket of a principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The principal's own limit.
    Key(Dim),
    /// A model's limit (by model index), all principals together.
    Model(usize, Dim),
}

/// What one request charges: the principal (index), the model, each bucket and its cost.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub who: usize,
    /// The principal's name (Redis keys).
    pub name: Arc<str>,
    pub model: usize,
    pub model_name: Arc<str>,
    pub charges: Vec<(Slot, Charge)>,
    pub max_parallel: Option<u32>,
}

impl Plan {
    pub(crate) fn token_charges(&self) -> impl Iterator<Item = (Slot, Charge)> + '_ {
        self.charges
            .iter()
            .filter(|(_, c)| c.dim == Dim::Tokens)
            .copied()
    }
}

/// What a store answers.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Charged: each bucket's status, in the plan's order.
    Allowed(Vec<Status>),
    Limited(Denial),
    /// `max_parallel` requests are already in flight.
    Parallel(u32),
}

/// Why a request may not run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    Limited(Denial),
    Parallel(u32),
    /// `redis_failure = "closed"` and Redis does not answer.
    Unavailable,
}

/// Where a grant was charged (so that it is settled there).
#[derive(Debug, Clone)]
enum Via {
    Memory,
    Redis { lease: Option<String> },
}

/// What a request holds of its limits until it ends.
#[derive(Debug)]
pub(crate) struct Grant {
    plan: Plan,
    via: Via,
    /// The tokens charged before the call.
    pub estimate: u64,
    /// The most constrained request and token buckets, for the headers.
    pub requests: Option<Status>,
    pub tokens: Option<Status>,
}

/// The limits of one principal.
#[derive(Debug, Clone, PartialEq)]
struct Policy {
    name: Arc<str>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    max_parallel: Option<u32>,
}

/// One model's limits, all principals together.
#[derive(Debug, Clone, PartialEq)]
struct ModelPolicy {
    name: Arc<str>,
    rpm: Option<u64>,
    tpm: Option<u64>,
}

/// The limits of one config generation, by stable index (`None`: not configured now).
#[derive(Debug, Default)]
struct Tables {
    /// Index 0: the anonymous principal (`auth.mode = "none"`); then keys by [`Registry`].
    policies: Vec<Option<Policy>>,
    models: Vec<Option<ModelPolicy>>,
    model_index: HashMap<Arc<str>, usize>,
}

/// The index of every key and model name ever configured in this process: a name keeps its
/// buckets (what it has spent) across reloads. Grows only with the names an operator
/// configures, never with client input.
#[derive(Debug, Default)]
struct Registry {
    principals: HashMap<String, usize>,
    models: HashMap<String, usize>,
}

impl Registry {
    fn principal(&mut self, name: &str) -> usize {
        let next = self.principals.len() + 1;
        *self.principals.entry(name.to_owned()).or_insert(next)
    }

    fn model(&mut self, name: &str) -> usize {
        let next = self.models.len();
        *self.models.entry(name.to_owned()).or_insert(next)
    }
}

/// The rate limits of every principal, and their store.
pub(crate) struct Limiter {
    tables: ArcSwap<Tables>,
    registry: std::sync::Mutex<Registry>,
    /// The buckets without Redis; with it, the `local` fallback and the shadow of Redis's.
    memory: Arc<MemoryStore>,
    redis: Option<Arc<RedisStore>>,
    failure: RedisFailure,
    refused: AtomicU64,
}

impl Limiter {
    /// Built from the config; with Redis, starts its connection and health task (so it must
    /// run inside the runtime). A Redis that is down at start is the same as one that fails
    /// later: `redis_failure` applies until it answers.
    pub(crate) async fn build(cfg: &Config) -> Limiter {
        let memory = Arc::new(MemoryStore::new(0, 0));
        let redis = match (&cfg.limits.store, &cfg.limits.redis_url) {
            (LimitStore::Redis, Some(url)) => Some(
                RedisStore::start(
                    url,
                    Duration::from_millis(cfg.limits.redis_timeout_ms.max(1)),
                    cfg.limits.redis_failure,
                    memory.clone(),
                )
                .await,
            ),
            _ => None,
        };
        let limiter = Limiter {
            tables: ArcSwap::from_pointee(Tables::default()),
            registry: std::sync::Mutex::new(Registry::default()),
            memory,
            redis,
            failure: cfg.limits.redis_failure,
            refused: AtomicU64::new(0),
        };
        limiter.reload(cfg);
        limiter
    }

    /// The limits of `cfg` from now on (the store itself cannot change live). A key or model
    /// keeps its buckets by name: a changed limit applies to what it has already spent (in
    /// this process's buckets; Redis's buckets are kept as they are and the new limit applies
    /// to their backlog). Each key's principal index is then [`Limiter::key_index`].
    pub(crate) fn reload(&self, cfg: &Config) {
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.tables.load_full();
        let mut t = Tables {
            policies: vec![None; 1],
            ..Tables::default()
        };
        t.policies[0] = Some(Policy {
            name: "anonymous".into(),
            rpm: None,
            tpm: None,
            max_parallel: None,
        });
        for k in &cfg.auth.keys {
            let i = reg.principal(&k.name);
            if t.policies.len() <= i {
                t.policies.resize(i + 1, None);
            }
            t.policies[i] = Some(Policy {
                name: k.name.as_str().into(),
                rpm: k.rpm,
                tpm: k.tpm,
                max_parallel: k.max_parallel,
            });
        }
        for m in &cfg.models {
            let i = reg.model(&m.name);
            if t.models.len() <= i {
                t.models.resize(i + 1, None);
            }
            let name: Arc<str> = m.name.as_str().into();
            t.model_index.insert(name.clone(), i);
            t.models[i] = Some(ModelPolicy {
                name,
                rpm: m.rpm,
                tpm: m.tpm,
            });
        }
        self.memory.grow(reg.principals.len() + 1, reg.models.len());
        // Changed limits keep what was spent: the `rpm` and `tpm` buckets of principal `who`
        // (or of a model), from the limits `was` to `now`.
        let rescale = |who: usize,
                       slot: &dyn Fn(Dim) -> Slot,
                       was: [Option<u64>; 2],
                       now: [Option<u64>; 2]| {
            for (i, dim) in [Dim::Requests, Dim::Tokens].into_iter().enumerate() {
                if let (Some(was), Some(now)) = (was[i], now[i]) {
                    let (was, now) = (Rate::per_minute(was), Rate::per_minute(now));
                    self.memory.rescale(who, slot(dim), was, now);
                }
            }
        };
        for (i, p) in t.policies.iter().enumerate() {
            if let (Some(p), Some(Some(o))) = (p, old.policies.get(i)) {
                rescale(i, &Slot::Key, [o.rpm, o.tpm], [p.rpm, p.tpm]);
            }
        }
        for (i, m) in t.models.iter().enumerate() {
            if let (Some(m), Some(Some(o))) = (m, old.models.get(i)) {
                rescale(
                    0,
                    &|dim| Slot::Model(i, dim),
                    [o.rpm, o.tpm],
                    [m.rpm, m.tpm],
                );
            }
        }
        self.tables.store(Arc::new(t));
    }

    /// The principal index of key `name` (0, the anonymous one's, for a name never configured).
    pub(crate) fn key_index(&self, name: &str) -> usize {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.principals.get(name).copied().unwrap_or(0)
    }

    /// The index of a configured model.
    pub(crate) fn model_index(&self, name: &str) -> Option<usize> {
        self.tables.load().model_index.get(name).copied()
    }

    /// Whether a request of `who` to `model` is charged tokens (so that its estimate is
    /// worth computing).
    pub(crate) fn counts_tokens(&self, who: usize, model: usize) -> bool {
        let t = self.tables.load();
        t.policies
            .get(who)
            .is_some_and(|p| p.as_ref().is_some_and(|p| p.tpm.is_some()))
            || t.models
                .get(model)
                .is_some_and(|m| m.as_ref().is_some_and(|m| m.tpm.is_some()))
    }

    /// What request `who` (principal index) to `model` (index) charges, `tokens` estimated;
    /// `None` when no limit applies to it at all.
    pub(crate) fn plan(&self, who: usize, model: usize, tokens: u64) -> Option<Plan> {
        let t = self.tables.load();
        let p = t.policies.get(who)?.as_ref()?;
        let m = t.models.get(model)?.as_ref()?;
        let mut charges = Vec::new();
        let mut add = |slot, limit: Option<u64>, dim, cost| {
            if let Some(l) = limit {
                charges.push((
                    slot,
                    Charge {
                        rate: Rate::per_minute(l),
                        dim,
                        cost,
                    },
                ));
            }
        };
        add(Slot::Key(Dim::Requests), p.rpm, Dim::Requests, 1);
        add(Slot::Key(Dim::Tokens), p.tpm, Dim::Tokens, tokens);
        add(Slot::Model(model, Dim::Requests), m.rpm, Dim::Requests, 1);
        add(Slot::Model(model, Dim::Tokens), m.tpm, Dim::Tokens, tokens);
        if charges.is_empty() && p.max_parallel.is_none() {
            return None;
        }
        Some(Plan {
            who,
            name: p.name.clone(),
            model,
            model_name: m.name.clone(),
            charges,
            max_parallel: p.max_parallel,
        })
    }

    /// Charges `plan` in the configured store (or its fallback), or refuses it.
    pub(crate) async fn acquire(&self, plan: Plan, estimate: u64) -> Result<Grant, Refusal> {
        let (outcome, via) = match &self.redis {
            None => (self.memory.acquire(&plan), Via::Memory),
            Some(r) => {
                let ask = r.is_up() || self.worth_asking(r);
                match if ask { r.acquire(&plan).await } else { Err(()) } {
                    Ok((o, lease)) => {
                        if let Outcome::Allowed(st) = &o {
                            self.memory.mirror(&plan, st.iter().map(|s| s.reset_us));
                        }
                        (o, Via::Redis { lease })
                    }
                    Err(()) => self.fallback(r, &plan)?,
                }
            }
        };
        match outcome {
            Outcome::Allowed(statuses) => {
                let pick = |dim: Dim| {
                    plan.charges
                        .iter()
                        .zip(&statuses)
                        .filter(|((_, c), _)| c.dim == dim)
                        .map(|(_, s)| *s)
                        .min_by_key(|s| (s.remaining, std::cmp::Reverse(s.reset_us)))
                };
                Ok(Grant {
                    requests: pick(Dim::Requests),
                    tokens: pick(Dim::Tokens),
                    plan,
                    via,
                    estimate,
                })
            }
            Outcome::Limited(d) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Limited(d))
            }
            Outcome::Parallel(n) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Parallel(n))
            }
        }
    }

    /// The store is marked down: whether to ask Redis anyway. `closed` does (it would refuse
    /// otherwise: it refuses nothing once Redis answers); `local` starts a ping for the requests
    /// after it and counts locally meanwhile.
    fn worth_asking(&self, r: &Arc<RedisStore>) -> bool {
        match self.failure {
            RedisFailure::Closed => true,
            RedisFailure::Local => {
                r.probe_soon();
                false
            }
        }
    }

    /// Redis does not answer: the local buckets (what they admit is owed to Redis, charged
    /// when it answers again), or a refusal.
    fn fallback(&self, r: &RedisStore, plan: &Plan) -> Result<(Outcome, Via), Refusal> {
        match self.failure {
            RedisFailure::Local => {
                let outcome = self.memory.acquire(plan);
                if matches!(outcome, Outcome::Allowed(_)) {
                    r.owe(plan, None);
                }
                Ok((outcome, Via::Memory))
            }
            RedisFailure::Closed => Err(Refusal::Unavailable),
        }
    }

    /// The request is over: corrects its token charge to `actual` tokens (when known) and
    /// frees its in-flight place. Never waits: Redis is told by a task of its own.
    pub(crate) fn settle(&self, grant: Grant, actual: Option<u64>) {
        let delta = actual.map_or(0, |a| a as i64 - grant.estimate as i64);
        let has_tokens = grant.plan.token_charges().next().is_some();
        match grant.via {
            Via::Memory => {
                if delta != 0 && has_tokens {
                    self.memory.adjust(&grant.plan, delta);
                    if let Some(r) = &self.redis {
                        r.owe(&grant.plan, Some(delta));
                    }
                }
                if grant.plan.max_parallel.is_some() {
                    self.memory.release(grant.plan.who);
                }
            }
            Via::Redis { lease } => {
                if let Some(r) = &self.redis {
                    let delta = if has_tokens { delta } else { 0 };
                    if delta != 0 {
                        // The shadow follows this replica's own corrections.
                        self.memory.adjust(&grant.plan, delta);
                    }
                    r.settle(grant.plan, delta, lease);
                }
            }
        }
    }

    /// `/readyz` detail and the admin view: the store and its state.
    pub(crate) fn health(&self) -> Value {
        match &self.redis {
            None => json!({"store": "memory"}),
            Some(r) => json!({
                "store": "redis",
                "redis": if r.is_up() { "up" } else { "down" },
                "redis_failure": match self.failure {
                    RedisFailure::Local => "local",
                    RedisFailure::Closed => "closed",
                },
                "serving_from": if r.is_up() { "redis" } else {
                    match self.failure { RedisFailure::Local => "local", RedisFailure::Closed => "refusing" }
                },
            }),
        }
    }

    /// The admin view: store state, refusals, and each principal's limits and local in-flight
    /// count (names only, never a key or its hash).
    pub(crate) fn snapshot(&self) -> Value {
        let mut v = self.health();
        v["refused"] = self.refused.load(Ordering::Relaxed).into();
        v["principals"] = self
            .tables
            .load()
            .policies
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.as_ref()?)))
            .map(|(i, p)| {
                json!({
                    "name": &*p.name,
                    "rpm": p.rpm,
                    "tpm": p.tpm,
                    "max_parallel": p.max_parallel,
                    "in_flight_local": self.memory.in_flight(i),
                })
            })
            .collect::<Vec<_>>()
            .into();
        v
    }
}

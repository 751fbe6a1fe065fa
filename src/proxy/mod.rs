//! The request pipeline: every proxied request meets these phases in this order, each in its
//! own module.
//!
//! 1. [`accept`]: request id, arrival time, body limits (for every route, in the HTTP layer);
//! 2. [`parse`]: content type, body, the fields the gateway reads;
//! 3. [`authorize`]: who is asking (their key, checked before the body is read) and what they
//!    may use, at which priority;
//! 4. [`limit`]: their rate limits, before any queue place is taken;
//! 5. [`admit`]: a slot now or a place in the priority queue, or a rejection;
//! 6. [`route`]: which deployment each try goes to, and whether there is another try;
//! 7. [`forward`]: pool start, rewrite, upstream call (and, for a stream, the relay);
//! 8. [`observe`]: one record per finished request: outcome, timings, attempts.
//!
//! The pipeline owns the order and the hand-over between phases, and each request's context
//! ([`context::Ctx`]: what the phases learn, finished into the one [`observe::Record`]); the
//! reply's headers that phases add (`x-ratelimit-*`, ...) are kept apart from it. It answers
//! what `http` asks of the configured models (`/v1/models`, readiness, the admin views); it
//! must not hold HTTP routing (that is `http`) nor decide statuses (that is `error`). A new
//! feature plugs into a phase.
//!
//! Anthropic's Messages API runs on the same phases: `parse` translates the request into an
//! OpenAI chat completion, [`Pipeline::respond`] translates the reply back (a stream through
//! the relay's transform), errors are rendered in the client's format; `count_tokens` stops
//! after `authorize` with the gateway's estimate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;

use crate::config::Config;
use crate::error::ApiError;
use crate::headers::{ATTEMPTS, BACKEND, PRECISION, PREFIX_MATCH, SERVER_TIMING};
use crate::orchestrator::{BuildError, ModelRt, Orchestrator};
use crate::reason::{RejectReason, Rejection};
use crate::upstream::{Deployment, Endpoint, Reply, StreamEnd};
use crate::wire::{ClientApi, Local, ReplyFormat};

pub(crate) mod accept;
pub(crate) mod admit;
pub(crate) mod authorize;
mod context;
pub(crate) mod forward;
pub(crate) mod limit;
mod models;
pub(crate) mod observe;
pub(crate) mod parse;
pub(crate) mod route;

use accept::{Accepted, Limits};
use context::Ctx;
use forward::Forwarded;
use observe::{ClientAddr, Observer, Reason, Tokens};
use parse::Parsed;
use route::Attempts;

/// What phases 2 to 7 produced.
enum Ran {
    /// A try succeeded; the reply goes back as the client's API says.
    Forwarded(Box<(Forwarded, Option<Box<dyn ReplyFormat>>)>),
    /// Answered by the gateway after `authorize` (Anthropic's `count_tokens`).
    Local(Local),
}

/// Everything the phases share. The configuration in effect is one [`Generation`], swapped
/// whole by a reload; a request reads it once, at its start, without a lock. State that must
/// outlive a generation lives beside it (the observer, the limits' buckets) or is carried
/// into the next one by name (the models' runtimes: see `orchestrator`).
pub(crate) struct Pipeline {
    live: ArcSwap<Generation>,
    /// The usage ledger (`[usage]`), flushed at exit.
    usage: Option<Arc<crate::usage::Ledger>>,
    /// The keys' budgets and their spend (kept across reloads).
    budgets: Arc<crate::budget::Budgets>,
    observer: Arc<Observer>,
    limiter: Arc<crate::quota::Limiter>,
    /// When the gateway started (Unix seconds).
    started_unix: u64,
    /// Set by the first shutdown signal: no new requests.
    shutting_down: AtomicBool,
}

/// One generation of the configuration, and what is made of it.
struct Generation {
    cfg: Arc<Config>,
    orch: Orchestrator,
    auth: authorize::Auth,
    /// The configured models as `/v1/models` lists them.
    models: models::Listing,
    limits: Limits,
    max_attempts: u32,
    retry_budget: Duration,
    /// The config's hash and when it was loaded (Unix seconds).
    hash: String,
    loaded_unix: u64,
}

/// Why a reload changed nothing.
#[derive(Debug)]
pub(crate) enum ReloadError {
    /// The new config changes keys that only a restart changes.
    RestartNeeded(Vec<String>),
    /// Something the new config needs could not be made (a simulator, a client).
    Build(BuildError),
    ShuttingDown,
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::RestartNeeded(keys) => write!(
                f,
                "{} cannot change while the gateway runs: restart it to apply the new config \
                 (nothing was changed)",
                keys.join(", ")
            ),
            ReloadError::Build(e) => write!(f, "{e} (nothing was changed)"),
            ReloadError::ShuttingDown => f.write_str("the gateway is shutting down"),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Generation {
    fn new(
        cfg: Config,
        orch: Orchestrator,
        limiter: &crate::quota::Limiter,
        started_unix: u64,
    ) -> Generation {
        Generation {
            orch,
            auth: authorize::Auth::build(&cfg, &|name| limiter.key_index(name)),
            models: models::Listing::new(&cfg, started_unix),
            limits: Limits {
                max_body_bytes: cfg.server.max_body_bytes,
                body_read_timeout: Duration::from_millis(cfg.server.body_read_timeout_ms),
            },
            max_attempts: cfg.resilience.max_attempts,
            retry_budget: Duration::from_millis(cfg.resilience.retry_budget_ms),
            hash: cfg.hash(),
            loaded_unix: unix_now(),
            cfg: Arc::new(cfg),
        }
    }

    /// Its hash and when it was loaded (the admin view, the status page).
    fn config_view(&self) -> serde_json::Value {
        serde_json::json!({"hash": self.hash, "loaded_unix": self.loaded_unix})
    }

    /// The configured model a request names (404 otherwise).
    fn model(&self, req: &Parsed) -> Result<&Arc<ModelRt>, ApiError> {
        self.orch
            .models
            .get(&req.model)
            .ok_or_else(|| ApiError::model_not_found(&req.model))
    }
}

impl Pipeline {
    /// Builds the pipeline from a validated config, starting in-process simulators.
    pub(crate) async fn build(cfg: &Config) -> Result<Pipeline, BuildError> {
        let names: Vec<String> = cfg.models.iter().map(|m| m.name.clone()).collect();
        let observer = Arc::new(Observer::new(&names));
        // Histogram samples wait for the next scrape: move them into buckets now and then.
        let weak = Arc::downgrade(&observer);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(o) => o.metrics.upkeep(),
                    None => break,
                }
            }
        });
        let budgets = Arc::new(crate::budget::Budgets::default());
        budgets.configure(&cfg.auth.keys);
        let redis = match (cfg.limits.store, cfg.limits.redis_url.as_deref()) {
            (crate::config::LimitStore::Redis, Some(url)) => Some((
                url,
                Duration::from_millis(cfg.limits.redis_timeout_ms.max(1)),
            )),
            _ => None,
        };
        let usage = crate::usage::Ledger::start(&cfg.usage, redis, budgets.clone())
            .await
            .map_err(BuildError::Usage)?
            .map(Arc::new);
        if let Some(l) = &usage {
            observer.set_usage(l.clone());
        }
        let orch = Orchestrator::build(cfg).await?;
        let limiter = Arc::new(crate::quota::Limiter::build(cfg).await);
        let started_unix = unix_now();
        let generation = Generation::new(cfg.clone(), orch, &limiter, started_unix);
        observer.metrics.config_loaded(&generation.hash);
        Ok(Pipeline {
            live: ArcSwap::from_pointee(generation),
            usage,
            budgets,
            observer,
            limiter,
            started_unix,
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Puts `cfg` (validated) into effect, entity by entity (see `config::diff`): unchanged
    /// models and deployments keep everything, changed ones take new requests on their new
    /// settings while requests in flight finish on the old, removed ones take no new requests.
    /// Refused whole (nothing changes) when a key that needs a restart changed. Answers what
    /// changed. Reloads must not overlap (one generation is made from the one before): the one
    /// caller, `http::AppState::reload`, holds its lock from reading the file to the swap.
    pub(crate) async fn reload(&self, cfg: Config) -> Result<crate::config::Diff, ReloadError> {
        let result = self.reload_locked(cfg).await;
        let label = match &result {
            Ok(_) => "ok",
            Err(ReloadError::RestartNeeded(_)) => "refused",
            Err(_) => "failed",
        };
        self.observer.metrics.config_reload(label);
        result
    }

    async fn reload_locked(&self, cfg: Config) -> Result<crate::config::Diff, ReloadError> {
        if self.is_shutting_down() {
            return Err(ReloadError::ShuttingDown);
        }
        let cur = self.live.load_full();
        let diff = crate::config::diff(&cur.cfg, &cfg);
        if !diff.restart_needed.is_empty() {
            return Err(ReloadError::RestartNeeded(diff.restart_needed));
        }
        let orch = cur.orch.reload(&cfg).await.map_err(ReloadError::Build)?;
        self.limiter.reload(&cfg);
        self.budgets.configure(&cfg.auth.keys);
        let names: Vec<String> = cfg.models.iter().map(|m| m.name.clone()).collect();
        self.observer.metrics.add_models(&names);
        let generation = Generation::new(cfg, orch, &self.limiter, self.started_unix);
        self.observer.metrics.config_loaded(&generation.hash);
        self.live.store(Arc::new(generation));
        Ok(diff)
    }

    /// The `auth.keys_file` of the config in effect, as written.
    pub(crate) fn keys_file(&self) -> Option<String> {
        self.live.load().cfg.auth.keys_file.clone()
    }

    /// A reload whose file did not validate (counted; nothing changed).
    pub(crate) fn reload_invalid(&self) {
        self.observer.metrics.config_reload("invalid");
    }

    /// The config in effect: its hash and when it was loaded (the admin view, the status page).
    pub(crate) fn config_view(&self) -> serde_json::Value {
        self.live.load().config_view()
    }

    /// Shutdown begins: new and queued requests get 503 `shutting_down`.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.live.load().orch.shutdown();
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// `GET /v1/models`: the models the caller (the key in `headers`) may use.
    pub(crate) fn list_models(&self, headers: &HeaderMap) -> Result<Bytes, ApiError> {
        let g = self.live.load();
        let who = g.auth.authenticate(headers)?;
        Ok(g.models.list(&who))
    }

    /// `GET /v1/models/{id}`: model `id` if the caller may use it. `Err(raw)`: a path that
    /// does not decode (`%ff`), which names no model (404 once the caller is known).
    pub(crate) fn get_model(
        &self,
        headers: &HeaderMap,
        id: Result<&str, &str>,
    ) -> Result<Bytes, ApiError> {
        let g = self.live.load();
        let who = g.auth.authenticate(headers)?;
        match id {
            Ok(id) => g.models.get(&who, id),
            Err(raw) => Err(ApiError::model_not_found(raw)),
        }
    }

    /// `/readyz`: ready unless shutting down; the detail says where the rate limits are
    /// counted (and whether a shared store answers).
    pub(crate) fn readiness(&self) -> Result<serde_json::Value, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        Ok(serde_json::json!({"status": "ready", "limits": self.limiter.health()}))
    }

    /// Whether `headers` carry an admin key (when keys are required).
    pub(crate) fn admin_allowed(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        self.live.load().auth.admin(headers)
    }

    /// `/admin/orchestrator`: queues, slots, memory, the limits' store and counters.
    pub(crate) fn admin_view(&self) -> serde_json::Value {
        let mut v = self.live.load().orch.snapshot();
        v["config"] = self.config_view();
        v["limits"] = self.limiter.snapshot();
        v["counters"] = self.observer.snapshot();
        v["client_disconnects"] = self.observer.client_disconnects().into();
        v
    }

    /// `/admin/pool`: the model servers the gateway runs.
    pub(crate) fn pool_view(&self) -> serde_json::Value {
        self.live.load().orch.pool_snapshot()
    }

    /// The memory budget and the pool's servers (the admin's `load` / `unload`).
    pub(crate) fn memory(&self) -> Arc<crate::orchestrator::Memory> {
        self.live.load().orch.memory.clone()
    }

    /// `/metrics`: the Prometheus text.
    pub(crate) fn metrics_text(&self) -> String {
        let g = self.live.load();
        let usage = self.usage.as_ref().map(|l| (l.written(), l.dropped()));
        self.observer
            .metrics
            .render(&g.orch.snapshot(), &g.orch.pool_snapshot(), usage)
    }

    /// `/status.json`: per model (with its last minute), memory, pool, counters, the chart.
    pub(crate) fn status_view(&self) -> serde_json::Value {
        let g = self.live.load_full();
        let snap = g.orch.snapshot();
        let metrics = &self.observer.metrics;
        let models: Vec<serde_json::Value> = snap["models"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, m)| {
                let mut m = m.clone();
                m["name"] = serde_json::json!(name);
                m["last_minute"] = metrics.last_minute(name);
                m
            })
            .collect();
        serde_json::json!({
            "started_unix": self.started_unix,
            "config": g.config_view(),
            "shutting_down": self.is_shutting_down(),
            "models": models,
            "memory": snap["memory"],
            "pool": g.orch.pool_snapshot()["models"],
            "counters": self.observer.snapshot(),
            "chart": metrics.chart(),
            "spend": self.spend_view(),
        })
    }

    /// Most keys the status page's spend panel lists (the most spent this month first).
    const SPEND_KEYS: usize = 200;

    /// The status page's spend panel: each key's spend today and this month (as the usage
    /// store said at its last re-read) and its budgets (with this gateway's pending spend);
    /// `null` when the ledger is off.
    fn spend_view(&self) -> serde_json::Value {
        use crate::budget::Period;
        use serde_json::json;
        let Some(ledger) = &self.usage else {
            return serde_json::Value::Null;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (day, month) = (Period::Day.window(now).0, Period::Month.window(now).0);
        let zero = json!({"cost": 0.0, "tokens": 0});
        let row = |key: &str| json!({"key": key, "today": zero, "month": zero, "budgets": []});
        let mut rows: std::collections::HashMap<String, serde_json::Value> =
            std::collections::HashMap::new();
        for t in ledger.spent().iter() {
            let slot = match t.period {
                Period::Day if t.label == day => "today",
                Period::Month if t.label == month => "month",
                _ => continue,
            };
            let r = rows.entry(t.key.clone()).or_insert_with(|| row(&t.key));
            r[slot] = json!({"cost": t.cost, "tokens": t.tokens});
        }
        for (key, budgets) in self.budgets.view(now) {
            let r = rows.entry(key.to_string()).or_insert_with(|| row(&key));
            r["budgets"] = budgets
                .iter()
                .map(|b| {
                    json!({
                        "kind": if b.tokens { "tokens" } else { "cost" },
                        "period": b.period.as_str(),
                        "amount": b.amount,
                        "spent": b.spent,
                        "resets": b.resets.map(crate::budget::rfc3339),
                    })
                })
                .collect();
        }
        let mut list: Vec<serde_json::Value> = rows.into_values().collect();
        let month_cost = |v: &serde_json::Value| v["month"]["cost"].as_f64().unwrap_or(0.0);
        list.sort_by(|a, b| {
            month_cost(b)
                .total_cmp(&month_cost(a))
                .then_with(|| a["key"].as_str().cmp(&b["key"].as_str()))
        });
        let listed = list.len();
        list.truncate(Self::SPEND_KEYS);
        json!({"day": day, "month": month, "keys": list, "more": listed - list.len()})
    }

    /// A report of the usage ledger; `None` when it is off.
    pub(crate) fn usage_report(
        &self,
        q: crate::usage::Query,
    ) -> Option<crate::usage::Fut<Result<crate::usage::Report, String>>> {
        self.usage.as_ref().map(|l| l.report(q))
    }

    /// Writes the usage records still queued (at exit, after the requests finished).
    pub(crate) async fn close_usage(&self) {
        if let Some(l) = &self.usage {
            l.close(Duration::from_secs(10)).await;
            tracing::info!(
                written = l.written(),
                dropped = l.dropped(),
                "usage ledger closed"
            );
        }
    }

    /// Stops the model servers the pool runs (at exit).
    pub(crate) async fn stop_models(&self) {
        let memory = self.memory();
        memory.stop_all().await;
    }

    /// Runs a request to `endpoint` from a client speaking `client` through every phase;
    /// always an answer (errors included, in the client's format).
    pub(crate) async fn handle(
        &self,
        path: &'static str,
        endpoint: Endpoint,
        client: &'static dyn ClientApi,
        accepted: &Accepted,
        req: Request,
    ) -> Response {
        let from = req.extensions().get::<ClientAddr>().map(|c| c.0);
        let g = self.live.load_full();
        let mut ctx = Ctx::new(
            self.observer.clone(),
            accepted.id.clone(),
            accepted.arrival,
            from,
        );
        ctx.set_endpoint(path);
        let mut headers = HeaderMap::new();
        match self
            .run(&g, endpoint, client, accepted, req, &mut ctx, &mut headers)
            .await
        {
            Ok(Ran::Forwarded(f)) => {
                let (ok, reply) = *f;
                self.respond(ok, reply, client, ctx, headers)
            }
            Ok(Ran::Local(local)) => {
                let tokens = Tokens {
                    input: local.input_tokens,
                    output: 0,
                    estimated: true,
                };
                ctx.sent(local.body.len() as u64, Some(tokens));
                ctx.finish(StatusCode::OK, Reason::Ok);
                let mut r = Response::new(Body::from(local.body));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r.headers_mut().extend(headers);
                r
            }
            Err(e) => fail(e, client, ctx, headers),
        }
    }

    /// Phases 2 to 7.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        g: &Generation,
        endpoint: Endpoint,
        client: &'static dyn ClientApi,
        accepted: &Accepted,
        req: Request,
        ctx: &mut Ctx,
        headers: &mut HeaderMap,
    ) -> Result<Ran, ApiError> {
        // The key first: an unknown client gets its 401 before its body is read.
        let who = g.auth.authenticate(req.headers())?;
        ctx.set_key(who.name().cloned());
        let mut named = None;
        let mut parsed = match parse::parse(endpoint, client, g.limits, req, &mut named).await {
            Ok(p) => p,
            Err(e) => {
                // A request that named a configured model is counted under it.
                ctx.set_model(named.and_then(|n| g.orch.models.get(&n).map(|m| m.name.clone())));
                return Err(e);
            }
        };
        let model = g.model(&parsed)?;
        ctx.set_model(Some(model.name.clone()));
        ctx.set_request(parsed.priority(), parsed.stream);
        authorize::authorize(&who, &mut parsed, ctx, headers)?;
        if let Some(local) = parsed.local.take() {
            return Ok(Ran::Local(local));
        }
        limit::budget(&self.budgets, &who, ctx, headers)?;
        limit::limit(&self.limiter, &who, &parsed, ctx, headers).await?;
        if self.is_shutting_down() {
            return Err(ApiError::rejected(
                Rejection::new(RejectReason::ShuttingDown, 1),
                &model.name,
            ));
        }
        let ok = self.tries(g, model, &parsed, accepted, ctx).await?;
        Ok(Ran::Forwarded(Box::new((ok, parsed.reply.take()))))
    }

    /// Phases 5 to 7, once per try, until one succeeds or `route` says there is no other.
    async fn tries(
        &self,
        g: &Generation,
        model: &Arc<ModelRt>,
        req: &Parsed,
        accepted: &Accepted,
        ctx: &mut Ctx,
    ) -> Result<Forwarded, ApiError> {
        let mut attempts = Attempts::new(g.max_attempts, g.retry_budget, accepted.arrival);
        let start_by = model.deadline(accepted.arrival, req.max_wait);
        let rid = accepted.id.to_str().unwrap_or_default();
        let wants = admit::affinity(model, req);
        loop {
            // Decided before the first byte, for streams as for the rest. A retry goes to
            // another deployment with a free slot now, or not at all.
            let permit = match admit::admit(model, req, &wants, attempts.exclude()).await {
                Ok((permit, waited)) => {
                    ctx.admitted(waited);
                    permit
                }
                Err(e) if attempts.is_first() => return Err(e),
                Err(_) => break,
            };
            attempts.trying(permit.dep_index());
            let dep = permit.deployment();
            ctx.trying(
                attempts.count(),
                dep.label.clone(),
                dep.prices,
                permit.prefix_share(),
            );
            match forward::forward(permit, req, rid, start_by).await {
                Ok(ok) => {
                    attempts.succeeded();
                    ctx.first_byte(ok.ttfb);
                    return Ok(ok);
                }
                Err(f) => {
                    ctx.attempt_failed(&f.error);
                    if !attempts.failed(f, Instant::now()) {
                        break;
                    }
                }
            }
        }
        let (error, uncompared) = attempts.give_up();
        if let Some(s) = uncompared {
            s.settle().await;
        }
        Err(error)
    }

    /// The client's 200: a full body now (the request is over), or a stream that finishes
    /// its context when it ends; translated back by `format` when the client's API needs it.
    /// `headers`: what the phases add to the reply.
    fn respond(
        &self,
        ok: Forwarded,
        format: Option<Box<dyn ReplyFormat>>,
        client: &'static dyn ClientApi,
        mut ctx: Ctx,
        headers: HeaderMap,
    ) -> Response {
        let Forwarded {
            reply,
            dep,
            permit,
            native,
            ..
        } = ok;
        // A reply in the client's own API needs no translation.
        let format = if native {
            format.and_then(|f| f.native())
        } else {
            format
        };
        let timing = ctx.server_timing();
        let attempts = ctx.attempts();
        let ctx_prefix = ctx.prefix_match();
        let mut resp = match reply {
            Reply::Full {
                content_type,
                body,
                usage,
            } => {
                drop(permit);
                let upstream_bytes = body.len() as u64;
                let (body, content_type) = match &format {
                    None => (body, content_type),
                    Some(f) => match f.whole(&body) {
                        Ok(b) => (b.into(), HeaderValue::from_static("application/json")),
                        Err(detail) => {
                            tracing::warn!(backend = %dep.label, "{detail}");
                            let e = ApiError::upstream_unavailable(&dep.label, detail)
                                .attempts(attempts);
                            return fail(e, client, ctx, headers);
                        }
                    },
                };
                let tokens = usage.map(|u| Tokens {
                    input: u.prompt_tokens,
                    output: u.completion_tokens,
                    estimated: false,
                });
                ctx.sent(upstream_bytes, tokens);
                ctx.finish(StatusCode::OK, Reason::Ok);
                let mut r = Response::new(Body::from(body));
                r.headers_mut().insert(header::CONTENT_TYPE, content_type);
                r
            }
            Reply::Stream(pending) => {
                let on_end: crate::upstream::OnEnd = Box::new(move |end, stats| {
                    drop(permit);
                    let tokens = match stats.usage {
                        Some(u) => Tokens {
                            input: u.prompt_tokens,
                            output: u.completion_tokens,
                            estimated: false,
                        },
                        None => Tokens {
                            input: 0,
                            output: stats.content_events,
                            estimated: true,
                        },
                    };
                    ctx.sent(stats.bytes, Some(tokens));
                    let (status, reason) = match end {
                        StreamEnd::Complete => (StatusCode::OK, Reason::Ok),
                        StreamEnd::Failed => (StatusCode::OK, Reason::StreamBroken),
                        // 499: nginx's "client closed request", for the log.
                        StreamEnd::ClientGone => {
                            tracing::info!(status = 499, "client closed the stream");
                            return ctx.finish_disconnected();
                        }
                    };
                    ctx.finish(status, reason);
                });
                let body = match format {
                    None => pending.relay(on_end),
                    Some(f) => pending.relay_with(on_end, f.stream()),
                };
                let mut r = Response::new(body);
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                r
            }
        };
        stamp_backend(&mut resp, &dep, attempts, timing);
        if let Some(share) = ctx_prefix {
            resp.headers_mut()
                .insert(PREFIX_MATCH, prefix_header(share));
        }
        resp.headers_mut().extend(headers);
        resp
    }
}

/// The one error path: `e` rendered in the client's format, with the headers the phases
/// set (`headers`: `x-ratelimit-*`, ...) and `Server-Timing`; the context finished with it.
fn fail(e: ApiError, client: &'static dyn ClientApi, ctx: Ctx, headers: HeaderMap) -> Response {
    let reason = e.kind.spec().reason;
    if let Some(source) = &e.source {
        tracing::debug!(kind = ?e.kind, "{source}");
    }
    let mut resp = client.error(e);
    if let Some(v) = ctx.server_timing() {
        resp.headers_mut().insert(SERVER_TIMING, v);
    }
    resp.headers_mut().extend(headers);
    ctx.finish(resp.status(), reason);
    resp
}

/// `x-mofa-prefix-match`: a share in [0, 1], two decimals.
fn prefix_header(share: f64) -> HeaderValue {
    let share = if share.is_finite() {
        share.clamp(0.0, 1.0)
    } else {
        0.0
    };
    HeaderValue::try_from(format!("{share:.2}")).unwrap_or(HeaderValue::from_static("0.00"))
}

/// The headers of a reply that ran on `dep`.
fn stamp_backend(
    resp: &mut Response,
    dep: &Deployment,
    attempts: u32,
    timing: Option<HeaderValue>,
) {
    let h = resp.headers_mut();
    if let Some(v) = &dep.label_header {
        h.insert(BACKEND, v.clone());
    }
    if let Some(v) = &dep.variant_header {
        h.insert(PRECISION, v.clone());
    }
    h.insert(ATTEMPTS, HeaderValue::from(attempts));
    if let Some(v) = timing {
        h.insert(SERVER_TIMING, v);
    }
}

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
//! The pipeline owns the order and the hand-over between phases; it must not hold HTTP routing
//! (that is `http`) nor decide statuses (that is `error`). A new feature plugs into a phase.
//!
//! Anthropic's Messages API runs on the same phases: `parse` translates the request into an
//! OpenAI chat completion, [`Pipeline::respond`] translates the reply back (a stream through
//! the relay's transform), errors are rendered in the client's format; `count_tokens` stops
//! after `authorize` with the gateway's estimate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use crate::config::Config;
use crate::error::ApiError;
use crate::headers::{ATTEMPTS, BACKEND, PRECISION, SERVER_TIMING};
use crate::orchestrator::{BuildError, ModelRt, Orchestrator};
use crate::reason::{RejectReason, Rejection};
use crate::upstream::{Deployment, Endpoint, Reply, StreamEnd};
use crate::wire::{ClientApi, Local, ReplyFormat};

pub mod accept;
pub mod admit;
pub mod authorize;
pub mod forward;
pub mod limit;
pub mod observe;
pub mod parse;
pub mod route;

use accept::{Accepted, Limits};
use forward::Forwarded;
use observe::{ClientAddr, Observer, Reason, Record, Tokens};
use parse::Parsed;
use route::Attempts;

/// What phases 2 to 7 produced.
enum Ran {
    /// A try succeeded; the reply goes back as the client's API says.
    Forwarded(Box<(Forwarded, Option<Box<dyn ReplyFormat>>)>),
    /// Answered by the gateway after `authorize` (Anthropic's `count_tokens`).
    Local(Local),
}

/// Everything the phases share. Built once; admission state lives per model in the
/// orchestrator, behind short per-model locks.
pub struct Pipeline {
    pub orch: Orchestrator,
    pub observer: Arc<Observer>,
    pub auth: authorize::Auth,
    pub limiter: Arc<crate::quota::Limiter>,
    limits: Limits,
    max_attempts: u32,
    retry_budget: Duration,
    /// Set by the first shutdown signal: no new requests.
    shutting_down: AtomicBool,
}

impl Pipeline {
    /// Builds the pipeline from a validated config, starting in-process simulators.
    pub async fn build(cfg: &Config) -> Result<Pipeline, BuildError> {
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
        Ok(Pipeline {
            orch: Orchestrator::build(cfg).await?,
            observer,
            auth: authorize::Auth::build(cfg),
            limiter: Arc::new(crate::quota::Limiter::build(cfg).await),
            limits: Limits {
                max_body_bytes: cfg.server.max_body_bytes,
                body_read_timeout: Duration::from_millis(cfg.server.body_read_timeout_ms),
            },
            max_attempts: cfg.resilience.max_attempts,
            retry_budget: Duration::from_millis(cfg.resilience.retry_budget_ms),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Shutdown begins: new and queued requests get 503 `shutting_down`.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.orch.shutdown();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Runs a request to `endpoint` from a client speaking `client` through every phase;
    /// always an answer (errors included, in the client's format).
    pub(crate) async fn handle(
        &self,
        endpoint: Endpoint,
        client: &'static dyn ClientApi,
        accepted: &Accepted,
        req: Request,
    ) -> Response {
        let mut rec = Record::new(self.observer.clone(), accepted.id.clone(), accepted.arrival);
        rec.client = req.extensions().get::<ClientAddr>().map(|c| c.0);
        match self.run(endpoint, client, accepted, req, &mut rec).await {
            Ok(Ran::Forwarded(f)) => {
                let (ok, reply) = *f;
                self.respond(ok, reply, client, rec)
            }
            Ok(Ran::Local(local)) => {
                rec.tokens = Some(Tokens {
                    input: local.input_tokens,
                    output: 0,
                    estimated: true,
                });
                rec.finish(StatusCode::OK, Reason::Ok);
                let mut r = Response::new(Body::from(local.body));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => fail(e, client, rec),
        }
    }

    /// Phases 2 to 7.
    async fn run(
        &self,
        endpoint: Endpoint,
        client: &'static dyn ClientApi,
        accepted: &Accepted,
        req: Request,
        rec: &mut Record,
    ) -> Result<Ran, ApiError> {
        // The key first: an unknown client gets its 401 before its body is read.
        let who = self.auth.authenticate(req.headers())?;
        rec.key = who.name().cloned();
        let mut named = None;
        let mut parsed = match parse::parse(endpoint, client, self.limits, req, &mut named).await {
            Ok(p) => p,
            Err(e) => {
                // A request that named a configured model is counted under it.
                rec.model = named.and_then(|n| self.orch.models.get(&n).map(|m| m.name.clone()));
                return Err(e);
            }
        };
        let model = self.model(&parsed)?;
        rec.model = Some(model.name.clone());
        rec.priority = Some(parsed.priority());
        rec.stream = parsed.stream;
        authorize::authorize(&who, &mut parsed, rec)?;
        if let Some(local) = parsed.local.take() {
            return Ok(Ran::Local(local));
        }
        limit::limit(&self.limiter, &who, &parsed, rec).await?;
        if self.is_shutting_down() {
            return Err(ApiError::rejected(
                Rejection::new(RejectReason::ShuttingDown, 1),
                &model.name,
            ));
        }
        let ok = self.tries(model, &parsed, accepted, rec).await?;
        Ok(Ran::Forwarded(Box::new((ok, parsed.reply.take()))))
    }

    /// The configured model a request names (404 otherwise).
    fn model(&self, req: &Parsed) -> Result<&Arc<ModelRt>, ApiError> {
        self.orch
            .models
            .get(&req.model)
            .ok_or_else(|| ApiError::model_not_found(&req.model))
    }

    /// Phases 5 to 7, once per try, until one succeeds or `route` says there is no other.
    async fn tries(
        &self,
        model: &Arc<ModelRt>,
        req: &Parsed,
        accepted: &Accepted,
        rec: &mut Record,
    ) -> Result<Forwarded, ApiError> {
        let mut attempts = Attempts::new(self.max_attempts, self.retry_budget, accepted.arrival);
        let start_by = model.deadline(accepted.arrival, req.max_wait);
        let rid = accepted.id.to_str().unwrap_or_default();
        loop {
            // Decided before the first byte, for streams as for the rest. A retry goes to
            // another deployment with a free slot now, or not at all.
            let permit = match admit::admit(model, req, attempts.exclude()).await {
                Ok((permit, waited)) => {
                    rec.queue_wait.get_or_insert(waited);
                    permit
                }
                Err(e) if attempts.is_first() => return Err(e),
                Err(_) => break,
            };
            attempts.trying(permit.dep_index());
            rec.attempts = attempts.count();
            rec.backend = Some(permit.deployment().label.clone());
            match forward::forward(permit, req, rid, start_by).await {
                Ok(ok) => {
                    attempts.succeeded();
                    rec.first_byte(ok.ttfb);
                    return Ok(ok);
                }
                Err(f) => {
                    rec.attempt_failed(&f.error);
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
    /// its record when it ends; translated back by `format` when the client's API needs it.
    fn respond(
        &self,
        ok: Forwarded,
        format: Option<Box<dyn ReplyFormat>>,
        client: &'static dyn ClientApi,
        rec: Record,
    ) -> Response {
        let Forwarded {
            reply, dep, permit, ..
        } = ok;
        let timing = rec.server_timing();
        let attempts = rec.attempts;
        let mut rec = rec;
        let extra = std::mem::take(&mut rec.reply_headers);
        let mut resp = match reply {
            Reply::Full {
                content_type,
                body,
                usage,
            } => {
                drop(permit);
                rec.bytes = body.len() as u64;
                rec.tokens = usage.map(|u| Tokens {
                    input: u.prompt_tokens,
                    output: u.completion_tokens,
                    estimated: false,
                });
                let (body, content_type) = match &format {
                    None => (body, content_type),
                    Some(f) => match f.whole(&body) {
                        Ok(b) => (b.into(), HeaderValue::from_static("application/json")),
                        Err(detail) => {
                            tracing::warn!(backend = %dep.label, "{detail}");
                            rec.reply_headers = extra;
                            let e = ApiError::upstream_unavailable(&dep.label, detail)
                                .attempts(attempts);
                            return fail(e, client, rec);
                        }
                    },
                };
                rec.finish(StatusCode::OK, Reason::Ok);
                let mut r = Response::new(Body::from(body));
                r.headers_mut().insert(header::CONTENT_TYPE, content_type);
                r
            }
            Reply::Stream(pending) => {
                let on_end: crate::upstream::OnEnd = Box::new(move |end, stats| {
                    drop(permit);
                    rec.bytes = stats.bytes;
                    rec.tokens = Some(match stats.usage {
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
                    });
                    let (status, reason) = match end {
                        StreamEnd::Complete => (StatusCode::OK, Reason::Ok),
                        StreamEnd::Failed => (StatusCode::OK, Reason::StreamBroken),
                        // 499: nginx's "client closed request", for the log.
                        StreamEnd::ClientGone => {
                            tracing::info!(status = 499, "client closed the stream");
                            return rec.finish_disconnected();
                        }
                    };
                    rec.finish(status, reason);
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
        resp.headers_mut().extend(extra);
        resp
    }
}

/// The one error path: `e` rendered in the client's format, with the headers the phases
/// set (`x-ratelimit-*`, ...) and `Server-Timing`; the record finished with it.
fn fail(e: ApiError, client: &'static dyn ClientApi, mut rec: Record) -> Response {
    let reason = e.kind.spec().reason;
    if let Some(source) = &e.source {
        tracing::debug!(kind = ?e.kind, "{source}");
    }
    let mut resp = client.error(e);
    if let Some(v) = rec.server_timing() {
        resp.headers_mut().insert(SERVER_TIMING, v);
    }
    resp.headers_mut()
        .extend(std::mem::take(&mut rec.reply_headers));
    rec.finish(resp.status(), reason);
    resp
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

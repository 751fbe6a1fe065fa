//! The simulated model server: an OpenAI-compatible upstream with deterministic output,
//! real pacing (time to first token, tokens per second) and fault injection.
//!
//! It is the gateway's default backend (run in-process), the upstream of the tests and of the
//! benchmarks (`mofa-gateway sim`). It owns only its own counters (`GET /sim/stats`), the last
//! request it saw (`GET /sim/last_request`, without credentials), and a model of a prompt cache
//! (which prompt prefixes it was sent: `prompt_cache` in the stats, see [`cache`]). It must depend on nothing of
//! the gateway (it could be its own crate): its envelope and helpers are its own.
//!
//! Output: `max_tokens` (or `max_completion_tokens`) words, finish `"length"`; without them 16
//! words, finish `"stop"`; a `stop` sequence (string or array) cuts the text before it, finish
//! `"stop"`. Tool calls are deterministic, see [`tools`] for the trigger: a chat request with a
//! non-empty `tools` array and `tool_choice` `"required"`, `{"type":"function",...}`, or
//! `"auto"`/absent with `call:NAME[,NAME...]` in the last user message (`say:TEXT` before it:
//! text first). Finish `"tool_calls"`; streamed as OpenAI `delta.tool_calls` chunks.
//!
//! Faults: `fail_rate` and `fail_marker` (500), `max_concurrency` (503), `die_after_tokens`
//! (connection dropped), `hang`; bodies over `max_body_bytes` get 413.
//!
//! With [`SimApi::Anthropic`] it speaks Anthropic's Messages API instead (`POST /v1/messages`,
//! see [`messages`]): the same reply plan, counters, pacing and faults, written in that format.
//! The API is one choice at the router and in the error envelope; everything between is shared.

mod cache;
mod messages;
mod reply;
mod tools;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{json, Value};
use tokio::time::Instant;

use reply::{Gen, Piece, ToolCall};

/// The default request body limit: the gateway's `server.max_body_bytes` default (20 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 20 * 1024 * 1024;

/// The wire format the simulator speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SimApi {
    /// OpenAI's: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`;
    /// `Authorization: Bearer`; errors `{"error":{...}}`.
    #[default]
    OpenAi,
    /// Anthropic's Messages API: `/v1/messages` (and `/count_tokens`), `/v1/models`;
    /// `x-api-key` (or a bearer token); errors `{"type":"error","error":{...}}`, overload as 529.
    Anthropic,
}

/// How the simulator behaves.
#[derive(Clone)]
pub struct SimOptions {
    /// The wire format it speaks.
    pub api: SimApi,
    /// Model ids it serves; any other gets 404 `model_not_found`.
    pub models: Vec<String>,
    pub ttft: Duration,
    /// Tokens per second after the first; 0 means no pacing.
    pub tokens_per_sec: f64,
    /// Requests in flight at once; more get 503. 0 means no limit.
    pub max_concurrency: usize,
    /// Share of requests answered with a 500, in [0, 1].
    pub fail_rate: f64,
    /// Drop the connection after this many generated tokens.
    pub die_after_tokens: Option<u64>,
    /// Never answer.
    pub hang: bool,
    /// If set, requests must carry `Authorization: Bearer <api_key>` (Anthropic: or
    /// `x-api-key: <api_key>`), else 401.
    pub api_key: Option<String>,
    /// Request bodies larger than this get 413 `request_too_large`.
    pub max_body_bytes: usize,
    /// A request whose raw body contains this string gets a 500 (counted `failed`); empty: off.
    pub fail_marker: Option<String>,
}

/// Written by hand so that the API key never reaches a log.
impl std::fmt::Debug for SimOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimOptions")
            .field("api", &self.api)
            .field("models", &self.models)
            .field("ttft", &self.ttft)
            .field("tokens_per_sec", &self.tokens_per_sec)
            .field("max_concurrency", &self.max_concurrency)
            .field("fail_rate", &self.fail_rate)
            .field("die_after_tokens", &self.die_after_tokens)
            .field("hang", &self.hang)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("fail_marker", &self.fail_marker)
            .finish()
    }
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            api: SimApi::OpenAi,
            models: vec!["mofa-sim".into()],
            ttft: Duration::ZERO,
            tokens_per_sec: 0.0,
            max_concurrency: 0,
            fail_rate: 0.0,
            die_after_tokens: None,
            hang: false,
            api_key: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            fail_marker: None,
        }
    }
}

/// Tokens generated when the request sets no `max_tokens`.
const DEFAULT_TOKENS: u64 = 16;
/// Upper bound on generated tokens per request, whatever it asks.
const MAX_TOKENS: u64 = 4096;
/// Upper bound on the pieces of `say:` text before tool calls.
const MAX_SAY_PIECES: usize = 4096;
/// Default length of an embedding vector.
const DEFAULT_DIMENSIONS: usize = 16;
/// Upper bound on embedding inputs and dimensions.
const MAX_EMBED_INPUTS: usize = 2048;
const MAX_DIMENSIONS: usize = 4096;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    ids: AtomicU64,
    tool_ids: AtomicU64,
}

struct Sim {
    opts: SimOptions,
    c: Counters,
    created: u64,
    last_request: Mutex<Option<Value>>,
    /// The prompts it was sent, as a server's prompt cache would hold them.
    prompts: Mutex<cache::PromptCache>,
}

type Shared = Arc<Sim>;

/// Builds the simulator's router.
pub fn router(opts: SimOptions) -> Router {
    let sim = Arc::new(Sim {
        opts,
        c: Counters::default(),
        created: unix_now(),
        last_request: Mutex::new(None),
        prompts: Mutex::new(cache::PromptCache::default()),
    });
    let api = match sim.opts.api {
        SimApi::OpenAi => Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/models/{id}", get(get_model))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings)),
        SimApi::Anthropic => messages::routes(),
    };
    api.route("/sim/stats", get(stats))
        .route("/sim/last_request", get(last_request))
        .with_state(sim)
}

/// Serves the simulator on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, opts: SimOptions) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(opts)).await
}

/// Starts the simulator on an ephemeral loopback port inside this process; returns its address.
pub async fn spawn_local(opts: SimOptions) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, opts).await {
            tracing::error!(error = %e, "in-process simulator stopped");
        }
    });
    Ok(addr)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `{"error":{"message","type","param","code"}}`, as OpenAI writes it.
fn envelope(message: &str, kind: &str, param: Option<&str>, code: &str) -> Bytes {
    let v = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// At most `max` characters of `s`.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    error_param(status, kind, None, code, message)
}

fn error_param(
    status: StatusCode,
    kind: &str,
    param: Option<&str>,
    code: &str,
    message: &str,
) -> Response {
    let body = envelope(message, kind, param, code);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl Sim {
    /// An error in the envelope of the API the simulator speaks: OpenAI's as given, or
    /// Anthropic's for the same status (see [`messages::error`]).
    fn error(&self, status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
        match self.opts.api {
            SimApi::OpenAi => error(status, kind, code, message),
            SimApi::Anthropic => messages::error(status, message),
        }
    }
}

/// Reads the whole body within `limit`: 413 over it, 400 if it cannot be read.
async fn read_body(sim: &Sim, body: Body, limit: usize) -> Result<Bytes, Response> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(sim.error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            &format!("the request body is larger than {limit} bytes"),
        )),
        Err(_) => Err(sim.error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_body",
            "the request body could not be read",
        )),
    }
}

/// Whether `haystack` contains `needle` (an empty needle never matches).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn json_response(v: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

async fn list_models(State(sim): State<Shared>) -> Response {
    let data: Vec<Value> = sim
        .opts
        .models
        .iter()
        .map(
            |m| json!({"id": m, "object": "model", "created": sim.created, "owned_by": "mofa-sim"}),
        )
        .collect();
    json_response(&json!({"object": "list", "data": data}))
}

async fn get_model(State(sim): State<Shared>, Path(id): Path<String>) -> Response {
    if sim.opts.models.contains(&id) {
        json_response(
            &json!({"id": id, "object": "model", "created": sim.created, "owned_by": "mofa-sim"}),
        )
    } else {
        error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            "model not found",
        )
    }
}

async fn stats(State(sim): State<Shared>) -> Response {
    let c = &sim.c;
    json_response(&json!({
        "requests": c.requests.load(Ordering::Relaxed),
        "completed": c.completed.load(Ordering::Relaxed),
        "cancelled": c.cancelled.load(Ordering::Relaxed),
        "failed": c.failed.load(Ordering::Relaxed),
        "rejected": c.rejected.load(Ordering::Relaxed),
        "in_flight": c.in_flight.load(Ordering::Relaxed),
        "peak_in_flight": c.peak_in_flight.load(Ordering::Relaxed),
        "prompt_cache": sim.prompts.lock().map(|p| json!({
            "prompts": p.prompts,
            "bytes": p.bytes,
            "cached_bytes": p.cached_bytes,
            "entries": p.entries(),
        })).unwrap_or(Value::Null),
    }))
}

async fn last_request(State(sim): State<Shared>) -> Response {
    let v = sim
        .last_request
        .lock()
        .map(|g| g.clone())
        .unwrap_or(None)
        .unwrap_or(Value::Null);
    json_response(&v)
}

/// Counts a request in flight until dropped; counts it cancelled unless marked finished.
struct InFlight {
    sim: Shared,
    finished: bool,
}

impl InFlight {
    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.sim.c.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn fail(&mut self) {
        if !self.finished {
            self.finished = true;
            self.sim.c.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.sim.c.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        self.sim.c.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Kind {
    Chat,
    Completion,
}

/// Everything the handlers share before they produce output: auth, limits, faults, parsing.
async fn admit(
    sim: &Shared,
    headers: &HeaderMap,
    path: &str,
    body: Body,
) -> Result<(InFlight, Value), Response> {
    sim.c.requests.fetch_add(1, Ordering::Relaxed);
    check_key(sim, headers)?;
    let body = read_body(sim, body, sim.opts.max_body_bytes).await?;
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Err(sim.error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                "body is not a JSON object",
            ))
        }
    };
    if let Ok(mut g) = sim.last_request.lock() {
        let rid = headers
            .get("x-mofa-request-id")
            .and_then(|v| v.to_str().ok());
        let mut seen = json!({"path": path, "request_id": rid, "body": req.clone()});
        if sim.opts.api == SimApi::Anthropic {
            seen["anthropic_version"] = headers
                .get("anthropic-version")
                .and_then(|v| v.to_str().ok())
                .into();
        }
        *g = Some(seen);
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or_default();
    if !sim.opts.models.iter().any(|m| m == model) {
        return Err(sim.error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            &format!("The model `{}` does not exist.", truncate(model, 100)),
        ));
    }
    let guard = take_slot(sim)?;
    if sim.opts.hang {
        // Never returns: the client gives up, this future is dropped, the guard counts a cancel.
        std::future::pending::<()>().await;
    }
    inject_failure(sim, &body, guard).map(|g| (g, req))
}

/// `Authorization: Bearer <api_key>` (Anthropic: or `x-api-key: <api_key>`) when the sim has a
/// key, else 401.
#[allow(clippy::result_large_err)] // the reply to send, as the handlers return it
fn check_key(sim: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let Some(key) = &sim.opts.api_key else {
        return Ok(());
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Anthropic's own key header; its newer SDKs send the key as a bearer token instead.
    let x_api_key = match sim.opts.api {
        SimApi::OpenAi => None,
        SimApi::Anthropic => headers.get("x-api-key").and_then(|v| v.to_str().ok()),
    };
    if bearer == Some(key.as_str()) || x_api_key == Some(key.as_str()) {
        return Ok(());
    }
    Err(sim.error(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid_api_key",
        "Incorrect API key provided.",
    ))
}

/// A place in flight, or 503 past `max_concurrency`.
#[allow(clippy::result_large_err)] // the reply to send, as the handlers return it
fn take_slot(sim: &Shared) -> Result<InFlight, Response> {
    let now = sim.c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    let mut guard = InFlight {
        sim: sim.clone(),
        finished: false,
    };
    if sim.opts.max_concurrency > 0 && now > sim.opts.max_concurrency {
        sim.c.rejected.fetch_add(1, Ordering::Relaxed);
        guard.finished = true;
        let mut r = sim.error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "sim_overloaded",
            "simulator is at max concurrency",
        );
        r.headers_mut().insert(header::RETRY_AFTER, 1.into());
        return Err(r);
    }
    sim.c.peak_in_flight.fetch_max(now, Ordering::Relaxed);
    Ok(guard)
}

/// The simulated failures: `fail_rate`, and the fail marker in the body.
#[allow(clippy::result_large_err)] // the reply to send, as the handlers return it
fn inject_failure(sim: &Shared, body: &[u8], mut guard: InFlight) -> Result<InFlight, Response> {
    let random = sim.opts.fail_rate > 0.0
        && unit_random(sim.c.ids.fetch_add(1, Ordering::Relaxed)) < sim.opts.fail_rate;
    let marked = sim
        .opts
        .fail_marker
        .as_ref()
        .is_some_and(|m| contains(body, m.as_bytes()));
    if !random && !marked {
        return Ok(guard);
    }
    guard.fail();
    let message = match (random, sim.opts.api) {
        (true, SimApi::OpenAi) => "simulated failure",
        (true, SimApi::Anthropic) => "Overloaded",
        (false, _) => "simulated failure: the request contains the fail marker",
    };
    Err(sim.error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "sim_failure",
        message,
    ))
}

async fn chat(State(sim): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    generate(sim, headers, body, Kind::Chat).await
}

async fn completions(State(sim): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    generate(sim, headers, body, Kind::Completion).await
}

async fn generate(sim: Shared, headers: HeaderMap, body: Body, kind: Kind) -> Response {
    let path = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    };
    let (guard, req) = match admit(&sim, &headers, path, body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    let chat = matches!(kind, Kind::Chat);
    let plan = if chat {
        match tools::plan(&req) {
            Ok(p) => p,
            Err(msg) => {
                let mut guard = guard;
                guard.finish();
                return error_param(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("tool_choice"),
                    "invalid_value",
                    &msg,
                );
            }
        }
    } else {
        None
    };
    let prompt_text = match kind {
        Kind::Chat => req.get("messages").map(message_text).unwrap_or_default(),
        Kind::Completion => req.get("prompt").map(message_text).unwrap_or_default(),
    };
    let prompt_tokens = prompt_text.split_whitespace().count() as u64;
    let field = if chat { "messages" } else { "prompt" };
    if let Some(p) = req.get(field) {
        let bytes = serde_json::to_vec(p).unwrap_or_default();
        if let Ok(mut cache) = sim.prompts.lock() {
            cache.see(&bytes);
        }
    }
    let (pieces, tool_calls, finish) = match plan {
        Some(plan) => tool_reply(&sim, plan, "call_"),
        None => {
            let max = req
                .get("max_completion_tokens")
                .and_then(Value::as_u64)
                .or_else(|| req.get("max_tokens").and_then(Value::as_u64));
            let length = Length::exact(max);
            let (pieces, stopped) = text_reply(&req, fnv(prompt_text.as_bytes()), length);
            (pieces, Vec::new(), length.finish(stopped.is_some()))
        }
    };
    let n = pieces.len() as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n});
    let id_n = sim.c.ids.fetch_add(1, Ordering::Relaxed);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let gen = Gen {
        chat,
        id: format!("{}-sim-{id_n}", if chat { "chatcmpl" } else { "cmpl" }),
        model,
        created: unix_now(),
        pieces,
        tool_calls,
        finish,
        usage,
        include_usage,
        die_after: sim.opts.die_after_tokens,
        ttft: sim.opts.ttft,
        per_token: per_token(sim.opts.tokens_per_sec),
    };
    if stream {
        reply::stream_response(gen, guard)
    } else {
        reply::full_response(gen, guard).await
    }
}

/// The pause between tokens at `tokens_per_sec` (0 or not a number: none).
fn per_token(tokens_per_sec: f64) -> Duration {
    if tokens_per_sec > 0.0 {
        Duration::try_from_secs_f64(1.0 / tokens_per_sec).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

/// How long a plain reply is: `tokens` words; `limited`: cut there by the request's limit
/// (finish `"length"`) rather than ended by the model (finish `"stop"`).
#[derive(Clone, Copy)]
struct Length {
    tokens: u64,
    limited: bool,
}

impl Length {
    /// OpenAI's rule: `max_tokens` words exactly, finish `"length"`; without it
    /// [`DEFAULT_TOKENS`] words, finish `"stop"`.
    fn exact(max: Option<u64>) -> Length {
        Length {
            tokens: max.unwrap_or(DEFAULT_TOKENS).min(MAX_TOKENS),
            limited: max.is_some(),
        }
    }
    /// Anthropic's rule (`max_tokens` is required there, and only a ceiling): the model says
    /// [`DEFAULT_TOKENS`] words unless `max` cuts it shorter.
    fn ceiling(max: u64) -> Length {
        Length {
            tokens: max.min(DEFAULT_TOKENS),
            limited: max < DEFAULT_TOKENS,
        }
    }
    /// The OpenAI finish reason, `stopped`: a stop sequence cut the text.
    fn finish(self, stopped: bool) -> &'static str {
        if self.limited && !stopped {
            "length"
        } else {
            "stop"
        }
    }
}

/// A plain reply of `length` words chosen from `seed`, cut before the first of the request's
/// `stop` sequences; returns the pieces and the stop sequence that cut them, if one did.
fn text_reply(req: &Value, seed: u64, length: Length) -> (Vec<Piece>, Option<String>) {
    let stops = reply::stop_sequences(req);
    let (text, stopped) = reply::text_pieces(seed, length.tokens, &stops);
    (
        text.into_iter().map(Piece::Text).collect(),
        stopped.and_then(|i| stops.get(i).cloned()),
    )
}

/// A tool-calling reply: the `say:` text, then each call's start and argument fragments; call
/// ids are `id_prefix` and a counter.
fn tool_reply(
    sim: &Sim,
    plan: tools::ToolPlan,
    id_prefix: &str,
) -> (Vec<Piece>, Vec<ToolCall>, &'static str) {
    let mut pieces: Vec<Piece> = plan
        .say
        .as_deref()
        .map(|s| reply::say_pieces(s, MAX_SAY_PIECES))
        .unwrap_or_default()
        .into_iter()
        .map(Piece::Text)
        .collect();
    let mut calls = Vec::with_capacity(plan.calls.len());
    for (index, (name, arguments)) in plan.calls.into_iter().enumerate() {
        let id = format!(
            "{id_prefix}{}",
            sim.c.tool_ids.fetch_add(1, Ordering::Relaxed)
        );
        pieces.push(Piece::ToolStart {
            index,
            id: id.clone(),
            name: name.clone(),
        });
        pieces.extend(
            reply::arg_fragments(&arguments)
                .into_iter()
                .map(|args| Piece::ToolArgs { index, args }),
        );
        calls.push(ToolCall {
            id,
            name,
            arguments,
        });
    }
    (pieces, calls, "tool_calls")
}

async fn embeddings(State(sim): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let (mut guard, req) = match admit(&sim, &headers, "/v1/embeddings", body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => {
            items.iter().map(|v| v.to_string()).collect()
        }
        _ => {
            guard.finish();
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                "`input` must be a string or a non-empty array",
            );
        }
    };
    if inputs.len() > MAX_EMBED_INPUTS {
        guard.finish();
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            "too many inputs",
        );
    }
    let dims = req
        .get("dimensions")
        .and_then(Value::as_u64)
        .map(|d| (d as usize).clamp(1, MAX_DIMENSIONS))
        .unwrap_or(DEFAULT_DIMENSIONS);
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    reply::pace(Instant::now(), sim.opts.ttft).await;
    let mut prompt_tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            prompt_tokens += text.split_whitespace().count().max(1) as u64;
            let v = embed(text, dims);
            let embedding = if base64 {
                let mut raw = Vec::with_capacity(v.len() * 4);
                for x in &v {
                    raw.extend_from_slice(&x.to_le_bytes());
                }
                Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    guard.finish();
    json_response(&json!({
        "object": "list", "data": data, "model": req["model"],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    }))
}

/// A deterministic unit vector for `text`.
fn embed(text: &str, dims: usize) -> Vec<f32> {
    let seed = fnv(text.as_bytes());
    let raw: Vec<f32> = (0..dims as u64)
        .map(|i| (splitmix(seed ^ i) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    raw.into_iter().map(|x| x / norm).collect()
}

/// The text of `messages` (strings and content-part `text`s) or of a `prompt`.
fn message_text(v: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                out.push_str(s);
                out.push(' ');
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(o) => {
                if let Some(c) = o.get("content") {
                    walk(c, out);
                } else if let Some(t) = o.get("text") {
                    walk(t, out);
                }
            }
            _ => {}
        }
    }
    let mut out = String::new();
    walk(v, &mut out);
    out
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// A number in [0, 1) from a counter.
fn unit_random(n: u64) -> f64 {
    (splitmix(n ^ 0x5eed) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("hello", 8);
        assert_eq!(a, embed("hello", 8));
        assert_ne!(a, embed("world", 8));
        let n: f32 = a.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
    }

    #[test]
    fn unit_random_is_in_range() {
        for i in 0..10_000 {
            let x = unit_random(i);
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn message_text_reads_parts() {
        let v = json!([{"role": "user", "content": [{"type": "text", "text": "a b"}]}, {"role": "user", "content": "c"}]);
        assert_eq!(message_text(&v).split_whitespace().count(), 3);
    }
}

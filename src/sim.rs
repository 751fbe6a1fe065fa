//! The simulated model server: an OpenAI-compatible upstream with deterministic output,
//! real pacing (time to first token, tokens per second) and fault injection.
//!
//! It is the gateway's default backend (run in-process), the upstream of the tests and of the
//! benchmarks (`mofa-gateway sim`). It owns only its own counters (`GET /sim/stats`) and the last
//! request it saw (`GET /sim/last_request`, without credentials); it knows nothing of the gateway.

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
use serde_json::{json, Value};
use tokio::time::Instant;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
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
    /// If set, requests must carry `Authorization: Bearer <api_key>`, else 401.
    pub api_key: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            models: vec!["mofa-sim".into()],
            ttft: Duration::ZERO,
            tokens_per_sec: 0.0,
            max_concurrency: 0,
            fail_rate: 0.0,
            die_after_tokens: None,
            hang: false,
            api_key: None,
        }
    }
}

/// Tokens generated when the request sets no `max_tokens`.
const DEFAULT_TOKENS: u64 = 16;
/// Upper bound on generated tokens per request, whatever it asks.
const MAX_TOKENS: u64 = 4096;
/// Default length of an embedding vector.
const DEFAULT_DIMENSIONS: usize = 16;
/// Upper bound on embedding inputs and dimensions.
const MAX_EMBED_INPUTS: usize = 2048;
const MAX_DIMENSIONS: usize = 4096;

const VOCAB: [&str; 16] = [
    "the", "gateway", "routes", "each", "request", "to", "a", "model", "that", "can", "serve",
    "it", "quickly", "and", "safely", "today",
];

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
}

struct Sim {
    opts: SimOptions,
    c: Counters,
    created: u64,
    last_request: Mutex<Option<Value>>,
}

type Shared = Arc<Sim>;

/// Builds the simulator's router.
pub fn router(opts: SimOptions) -> Router {
    let sim = Arc::new(Sim {
        opts,
        c: Counters::default(),
        created: unix_now(),
        last_request: Mutex::new(None),
    });
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/sim/stats", get(stats))
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

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = crate::error::envelope(message, kind, None, code);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
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
    body: &Bytes,
) -> Result<(InFlight, Value), Response> {
    sim.c.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(key) = &sim.opts.api_key {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            == Some(key.as_str());
        if !ok {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "Incorrect API key provided.",
            ));
        }
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Err(error(
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
        *g = Some(json!({"path": path, "request_id": rid, "body": req.clone()}));
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or_default();
    if !sim.opts.models.iter().any(|m| m == model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            &format!(
                "The model `{}` does not exist.",
                crate::error::truncate(model, 100)
            ),
        ));
    }
    let now = sim.c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    let guard = InFlight {
        sim: sim.clone(),
        finished: false,
    };
    if sim.opts.max_concurrency > 0 && now > sim.opts.max_concurrency {
        sim.c.rejected.fetch_add(1, Ordering::Relaxed);
        let mut g = guard;
        g.finished = true;
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "sim_overloaded",
            "simulator is at max concurrency",
        );
        r.headers_mut().insert(header::RETRY_AFTER, 1.into());
        return Err(r);
    }
    sim.c.peak_in_flight.fetch_max(now, Ordering::Relaxed);
    if sim.opts.hang {
        // Never returns: the client gives up, this future is dropped, the guard counts a cancel.
        std::future::pending::<()>().await;
    }
    let mut guard = guard;
    if sim.opts.fail_rate > 0.0
        && unit_random(sim.c.ids.fetch_add(1, Ordering::Relaxed)) < sim.opts.fail_rate
    {
        guard.fail();
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "sim_failure",
            "simulated failure",
        ));
    }
    Ok((guard, req))
}

async fn chat(State(sim): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    generate(sim, headers, body, Kind::Chat).await
}

async fn completions(State(sim): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    generate(sim, headers, body, Kind::Completion).await
}

async fn generate(sim: Shared, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    let path = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    };
    let (guard, req) = match admit(&sim, &headers, path, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    let max = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64);
    let n_tokens = max.unwrap_or(DEFAULT_TOKENS).min(MAX_TOKENS);
    let finish = if max.is_some() { "length" } else { "stop" };
    let prompt_text = match kind {
        Kind::Chat => req.get("messages").map(message_text).unwrap_or_default(),
        Kind::Completion => req.get("prompt").map(message_text).unwrap_or_default(),
    };
    let prompt_tokens = prompt_text.split_whitespace().count() as u64;
    let seed = fnv(prompt_text.as_bytes());
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens, "total_tokens": prompt_tokens + n_tokens});
    let id_n = sim.c.ids.fetch_add(1, Ordering::Relaxed);
    let created = unix_now();
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let gen = Gen {
        chat: matches!(kind, Kind::Chat),
        id: format!(
            "{}-sim-{id_n}",
            if matches!(kind, Kind::Chat) {
                "chatcmpl"
            } else {
                "cmpl"
            }
        ),
        model,
        created,
        seed,
        n_tokens,
        finish,
        usage,
        include_usage,
        die_after: sim.opts.die_after_tokens,
        ttft: sim.opts.ttft,
        per_token: if sim.opts.tokens_per_sec > 0.0 {
            Duration::from_secs_f64(1.0 / sim.opts.tokens_per_sec)
        } else {
            Duration::ZERO
        },
    };
    if stream {
        stream_response(gen, guard)
    } else {
        full_response(gen, guard).await
    }
}

struct Gen {
    chat: bool,
    id: String,
    model: String,
    created: u64,
    seed: u64,
    n_tokens: u64,
    finish: &'static str,
    usage: Value,
    include_usage: bool,
    die_after: Option<u64>,
    ttft: Duration,
    per_token: Duration,
}

impl Gen {
    fn token(&self, i: u64) -> &'static str {
        VOCAB[(splitmix(self.seed ^ i) % VOCAB.len() as u64) as usize]
    }
    fn text(&self) -> String {
        let mut s = String::new();
        for i in 0..self.n_tokens {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(self.token(i));
        }
        s
    }
    /// When token `i` (0-based) is due, relative to the start.
    fn due(&self, i: u64) -> Duration {
        self.ttft + self.per_token * (i as u32)
    }
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let v = if self.chat {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        } else {
            json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "text": delta.get("content").and_then(Value::as_str).unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
        };
        sse(&v)
    }
}

/// Waits until `due` after `start`. No wait at all when `due` is zero: a zero sleep still goes
/// through tokio's timer wheel and costs up to a millisecond, which would skew benchmarks.
async fn pace(start: Instant, due: Duration) {
    if !due.is_zero() {
        tokio::time::sleep_until(start + due).await;
    }
}

fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

async fn full_response(gen: Gen, mut guard: InFlight) -> Response {
    let start = Instant::now();
    let last = gen.n_tokens.saturating_sub(1);
    pace(start, gen.due(last)).await;
    let text = gen.text();
    let v = if gen.chat {
        json!({"id": gen.id, "object": "chat.completion", "created": gen.created, "model": gen.model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                            "logprobs": null, "finish_reason": gen.finish}],
               "usage": gen.usage})
    } else {
        json!({"id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": gen.finish}],
               "usage": gen.usage})
    };
    let body = serde_json::to_vec(&v).unwrap_or_default();
    if gen.die_after.is_some_and(|d| d < gen.n_tokens) {
        // Send half the body, then break the connection.
        guard.fail();
        let half = Bytes::copy_from_slice(&body[..body.len() / 2]);
        let s = futures_util::stream::iter(vec![
            Ok(half),
            Err(std::io::Error::other("simulated connection drop")),
        ]);
        return (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(s),
        )
            .into_response();
    }
    guard.finish();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Where a stream is: role chunk, token `i`, finish chunk, usage chunk, `[DONE]`, end.
enum Step {
    Role,
    Token(u64),
    Finish,
    Usage,
    Done,
    End,
}

fn stream_response(gen: Gen, guard: InFlight) -> Response {
    let start = Instant::now();
    let state = (gen, guard, Step::Role, start);
    let s = futures_util::stream::unfold(state, |(gen, mut guard, step, start)| async move {
        let (item, next) = match step {
            Step::Role => {
                pace(start, gen.ttft).await;
                let delta = if gen.chat {
                    json!({"role": "assistant", "content": ""})
                } else {
                    json!({"content": ""})
                };
                let next = if gen.n_tokens == 0 {
                    Step::Finish
                } else {
                    Step::Token(0)
                };
                (Ok(gen.chunk(delta, None)), next)
            }
            Step::Token(i) => {
                pace(start, gen.due(i)).await;
                if gen.die_after.is_some_and(|d| i >= d) {
                    guard.fail();
                    (
                        Err(std::io::Error::other("simulated connection drop")),
                        Step::End,
                    )
                } else {
                    let text = if i == 0 {
                        gen.token(i).to_string()
                    } else {
                        format!(" {}", gen.token(i))
                    };
                    let next = if i + 1 < gen.n_tokens {
                        Step::Token(i + 1)
                    } else {
                        Step::Finish
                    };
                    (Ok(gen.chunk(json!({"content": text}), None)), next)
                }
            }
            Step::Finish => {
                let next = if gen.include_usage {
                    Step::Usage
                } else {
                    Step::Done
                };
                (Ok(gen.chunk(json!({}), Some(gen.finish))), next)
            }
            Step::Usage => {
                let object = if gen.chat {
                    "chat.completion.chunk"
                } else {
                    "text_completion"
                };
                let v = json!({"id": gen.id, "object": object, "created": gen.created, "model": gen.model, "choices": [], "usage": gen.usage});
                (Ok(sse(&v)), Step::Done)
            }
            Step::Done => {
                guard.finish();
                (Ok(Bytes::from_static(b"data: [DONE]\n\n")), Step::End)
            }
            Step::End => return None,
        };
        Some((item, (gen, guard, next, start)))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(s),
    )
        .into_response()
}

async fn embeddings(State(sim): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let (mut guard, req) = match admit(&sim, &headers, "/v1/embeddings", &body).await {
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
    pace(Instant::now(), sim.opts.ttft).await;
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

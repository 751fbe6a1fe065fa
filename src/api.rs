//! The OpenAI-compatible HTTP surface: routes, request validation, and the stamping of every
//! response (`x-request-id`, `x-mofa-backend`, `x-mofa-latency-ms`).
//!
//! Owns reading and checking client requests and turning upstream replies into responses.
//! It must not decide statuses for failures itself (that is `error`), nor talk to a backend
//! directly (that is `upstream`). A request is forwarded as sent; only `model` may be rewritten.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admission::{Outcome, Priority};
use crate::config::Config;
use crate::error::{kind_for_status, ApiError};
use crate::headers::{ATTEMPTS, BACKEND, LATENCY_MS, MAX_WAIT_MS, PRECISION, PRIORITY, REQUEST_ID};
use crate::orchestrator::Orchestrator;
use crate::upstream::{Deployment, Endpoint, Reply};

/// What every handler shares. Immutable after start-up; admission state lives per model in
/// the orchestrator, behind short per-model locks.
pub struct AppState {
    pub orch: Orchestrator,
    /// The `GET /v1/models` body, built once.
    model_list: Bytes,
    created: u64,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    max_attempts: u32,
    retry_budget: Duration,
    /// Clients that went away before their reply was complete (status 499 in the log).
    pub disconnects: Arc<std::sync::atomic::AtomicU64>,
    /// Set by the first shutdown signal: not ready, no new requests.
    shutting_down: std::sync::atomic::AtomicBool,
}

impl AppState {
    /// Builds the runtime state from a validated config, starting in-process simulators.
    pub async fn build(cfg: &Config) -> Result<AppState, String> {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let listed: Vec<Value> = cfg
            .models
            .iter()
            .map(|m| json!({"id": m.name, "object": "model", "created": created, "owned_by": "mofa-gateway"}))
            .collect();
        let model_list = Bytes::from(
            serde_json::to_vec(&json!({"object": "list", "data": listed})).unwrap_or_default(),
        );
        Ok(AppState {
            orch: Orchestrator::build(cfg).await?,
            model_list,
            created,
            max_body_bytes: cfg.server.max_body_bytes,
            body_read_timeout: Duration::from_millis(cfg.server.body_read_timeout_ms),
            max_attempts: cfg.resilience.max_attempts,
            retry_budget: Duration::from_millis(cfg.resilience.retry_budget_ms),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            disconnects: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Shutdown begins: `/readyz` answers 503, new and queued requests get 503 `shutting_down`.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.orch.shutdown();
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// The gateway's router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route(
            "/healthz",
            get(|| async { json_ok(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/admin/orchestrator", get(admin_orchestrator))
        .route("/admin/pool", get(admin_pool))
        .route("/admin/pool/{name}/load", post(admin_load))
        .route("/admin/pool/{name}/unload", post(admin_unload))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(stamp))
        .with_state(state)
}

/// The request id of the request being served, as the stamp layer decided it.
#[derive(Clone)]
struct RequestId(HeaderValue);

/// Stamps every response with `x-request-id`, `x-mofa-backend` (default `gateway`) and
/// `x-mofa-latency-ms`, and turns any error that is not yet an envelope into one.
async fn stamp(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let rid = req
        .headers()
        .get(REQUEST_ID)
        .filter(|v| valid_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(rid.clone()));
    let mut resp = next.run(req).await;
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json(resp.headers()) {
        // A reply from outside our handlers (a layer, an extractor): give it the envelope.
        let code = status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
            .replace(' ', "_");
        let body = crate::error::envelope(
            status.canonical_reason().unwrap_or("error"),
            kind_for_status(status),
            None,
            &code,
        );
        let (mut parts, _) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp = Response::from_parts(parts, Body::from(body));
    }
    let h = resp.headers_mut();
    h.insert(REQUEST_ID, rid);
    h.entry(BACKEND)
        .or_insert(HeaderValue::from_static("gateway"));
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("{ms:.3}")) {
        h.insert(LATENCY_MS, v);
    }
    resp
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// A client's id is echoed if it is 1..=128 visible ASCII characters.
fn valid_request_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

fn new_request_id() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = *PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        t ^ std::process::id().rotate_left(16)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // `req-` + 8 hex digits of the process prefix + 12 of the counter, without `format!`.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"req-00000000000000000000";
    for i in 0..8 {
        id[4 + i] = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    for i in 0..12 {
        id[12 + i] = HEX[((n >> (44 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("req-unknown"))
}

fn json_ok(v: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&v).unwrap_or_default(),
    )
        .into_response()
}

async fn unknown_url(method: Method, uri: Uri) -> ApiError {
    ApiError::unknown_url(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.model_list.clone(),
    )
        .into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if st.is_shutting_down() {
        return ApiError::shutting_down().into_response();
    }
    json_ok(json!({"status": "ready"}))
}

async fn admin_orchestrator(State(st): State<Arc<AppState>>) -> Response {
    let mut v = st.orch.snapshot();
    v["client_disconnects"] = json!(st.disconnects.load(Ordering::Relaxed));
    json_ok(v)
}

async fn admin_pool(State(st): State<Arc<AppState>>) -> Response {
    json_ok(st.orch.pool_snapshot())
}

/// Loads a pool model now (at `normal` priority for memory), and waits until it is ready.
async fn admin_load(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let Some(p) = st.orch.managed(&name) else {
        return ApiError::unknown_pool_model(&name).into_response();
    };
    if let Err(e) = st.orch.load(p) {
        return e.into_response();
    }
    let deadline = std::time::Instant::now() + p.startup_timeout();
    match p.ensure_ready(deadline).await {
        Ok(()) => json_ok(p.snapshot()),
        Err(e) => ApiError::from_start(&name, e).into_response(),
    }
}

/// Stops a pool model that has no request in flight.
async fn admin_unload(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let Some(p) = st.orch.managed(&name) else {
        return ApiError::unknown_pool_model(&name).into_response();
    };
    if let Err(e) = st.orch.unload(p) {
        return e.into_response();
    }
    p.wait_stopped(crate::pool::STOP_GRACE + Duration::from_secs(1))
        .await;
    json_ok(p.snapshot())
}

async fn get_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match st.orch.models.get(&id) {
        Some(m) => json_ok(
            json!({"id": m.name, "object": "model", "created": st.created, "owned_by": "mofa-gateway"}),
        ),
        None => ApiError::model_not_found(&id).into_response(),
    }
}

async fn chat_completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    proxy(st, Endpoint::ChatCompletions, req).await
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    proxy(st, Endpoint::Completions, req).await
}

async fn embeddings(State(st): State<Arc<AppState>>, req: Request) -> Response {
    proxy(st, Endpoint::Embeddings, req).await
}

async fn proxy(st: Arc<AppState>, endpoint: Endpoint, req: Request) -> Response {
    /// Counts the request as abandoned (499) if the client leaves before the response head.
    struct Gone<'a>(Option<&'a AtomicU64>);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            if let Some(c) = self.0 {
                c.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    status = 499,
                    "client closed the request before its response"
                );
            }
        }
    }
    let mut gone = Gone(Some(&st.disconnects));
    let resp = match try_proxy(&st, endpoint, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    gone.0 = None;
    resp
}

/// The parts of a request body the gateway looks at; everything else is forwarded untouched.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<Field<'a>>,
    #[serde(borrow)]
    stream: Option<Field<'a>>,
    #[serde(borrow)]
    messages: Option<Field<'a>>,
    #[serde(borrow)]
    prompt: Option<Field<'a>>,
    #[serde(borrow)]
    input: Option<Field<'a>>,
    #[serde(borrow)]
    priority: Option<Field<'a>>,
}

/// A top-level field, known by its JSON type; strings are kept, containers are skipped.
enum Field<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Array(usize),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Field<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Field<'a>, E> {
                Ok(Field::Bool(v))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_unit<E>(self) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Field<'a>, A::Error> {
                let mut n = 0;
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Field::Array(n))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Field<'a>, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// What a valid request asks for.
struct Parsed {
    model: String,
    stream: bool,
    /// The body's `priority`, which is not forwarded.
    priority: Option<Priority>,
}

/// Checks the content type, size and JSON of a request, and the fields the gateway needs.
fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<Parsed, ApiError> {
    let head: Head = match serde_json::from_slice(body) {
        Ok(h) => h,
        Err(e) if e.is_data() => {
            return Err(ApiError::invalid_json("the body must be a JSON object"))
        }
        Err(e) => return Err(ApiError::invalid_json(e)),
    };
    let model = match head.model {
        Some(Field::Str(m)) if !m.is_empty() => m.into_owned(),
        Some(Field::Str(_)) | None => {
            return Err(ApiError::invalid_value(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(_) => return Err(ApiError::invalid_value("model", "`model` must be a string")),
    };
    let stream = match head.stream {
        // Embeddings do not stream; `stream` there is forwarded untouched.
        _ if endpoint == Endpoint::Embeddings => false,
        None => false,
        Some(Field::Bool(b)) => b,
        Some(_) => {
            return Err(ApiError::invalid_value(
                "stream",
                "`stream` must be a boolean",
            ))
        }
    };
    match endpoint {
        Endpoint::ChatCompletions => match head.messages {
            Some(Field::Array(n)) if n > 0 => {}
            Some(Field::Array(_)) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "`messages` must not be empty",
                ))
            }
            None => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "you must provide a messages parameter",
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "`messages` must be an array",
                ))
            }
        },
        Endpoint::Completions => {
            if !matches!(head.prompt, Some(Field::Str(_) | Field::Array(_))) {
                return Err(ApiError::invalid_value(
                    "prompt",
                    "`prompt` must be a string or an array",
                ));
            }
        }
        Endpoint::Embeddings => match head.input {
            Some(Field::Str(_)) => {}
            Some(Field::Array(n)) if n > 0 => {}
            _ => {
                return Err(ApiError::invalid_value(
                    "input",
                    "`input` must be a string or a non-empty array",
                ))
            }
        },
    }
    let priority = match head.priority {
        None => None,
        Some(Field::Str(p)) => Some(Priority::parse(&p).ok_or_else(bad_priority)?),
        Some(_) => return Err(bad_priority()),
    };
    Ok(Parsed {
        model,
        stream,
        priority,
    })
}

fn bad_priority() -> ApiError {
    ApiError::invalid_value(
        "priority",
        "`priority` (or `x-mofa-priority`) must be one of low, normal, high, critical",
    )
}

/// The admission headers: `x-mofa-priority` and `x-mofa-max-wait-ms`.
fn admission_headers(h: &HeaderMap) -> Result<(Option<Priority>, Option<Duration>), ApiError> {
    let prio = match h.get(PRIORITY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| Priority::parse(s.trim()))
                .ok_or_else(bad_priority)?,
        ),
    };
    let wait = match h.get(MAX_WAIT_MS) {
        None => None,
        Some(v) => Some(Duration::from_millis(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid_value(
                        "x-mofa-max-wait-ms",
                        "`x-mofa-max-wait-ms` must be a whole number of milliseconds",
                    )
                })?,
        )),
    };
    Ok((prio, wait))
}

/// `body` with `model` replaced (if `model` is given) and `priority` removed, other fields and
/// their order kept.
fn rewrite(body: &[u8], model: Option<&str>) -> Result<Bytes, ApiError> {
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    if let Some(model) = model {
        v.insert("model".into(), Value::String(model.to_owned()));
    }
    v.shift_remove("priority");
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(ApiError::invalid_json)
}

async fn read_body(st: &AppState, req: Request) -> Result<Bytes, ApiError> {
    let h = req.headers();
    let json_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(ApiError::unsupported_media_type());
    }
    let limit = st.max_body_bytes;
    if let Some(len) = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    let collect = http_body_util::Limited::new(req.into_body(), limit).collect();
    let collected = tokio::time::timeout(st.body_read_timeout, collect)
        .await
        .map_err(|_| ApiError::request_timeout(st.body_read_timeout))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::invalid_json(format!(
            "the body could not be read: {e}"
        ))),
    }
}

async fn try_proxy(st: &AppState, endpoint: Endpoint, req: Request) -> Result<Response, ApiError> {
    let rid = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(new_request_id);
    let (header_prio, max_wait) = admission_headers(req.headers())?;
    let body = read_body(st, req).await?;
    let parsed = parse_request(endpoint, &body)?;
    let model = st
        .orch
        .models
        .get(&parsed.model)
        .ok_or_else(|| ApiError::model_not_found(&parsed.model))?;
    let prio = header_prio.or(parsed.priority).unwrap_or_default();
    if st.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let arrival = Instant::now();
    let budget_end = arrival + st.retry_budget;
    let rid_str = rid.to_str().unwrap_or_default();
    let mut exclude = 0u64;
    let mut failures: Vec<ApiError> = Vec::new();
    for attempt in 1..=st.max_attempts {
        // Decided before the first byte, for streams as for the rest. A retry goes to another
        // deployment with a free slot now, or not at all.
        let permit = match model.admit(prio, max_wait, exclude).await {
            Ok(p) => p,
            Err(e) if failures.is_empty() => return Err(e),
            Err(_) => break,
        };
        let dep = permit.deployment().clone();
        exclude |= 1 << permit.dep_index().min(63);
        let feedback = permit.feedback();
        if let Some(m) = &dep.managed {
            // A model the pool runs: start it if it is not running (its slot is held meanwhile,
            // so it cannot be evicted), within this request's deadline.
            if let Err(e) = m.ensure_ready(model.deadline(arrival, max_wait)).await {
                failures.push(ApiError::from_start(&model.name, e).at(&dep.label));
                if Instant::now() >= budget_end {
                    break;
                }
                continue;
            }
        }
        let new_model = dep.upstream_model.as_deref().filter(|m| *m != parsed.model);
        let forward = if new_model.is_some() || parsed.priority.is_some() {
            rewrite(&body, new_model)?
        } else {
            body.clone()
        };
        let sent = Instant::now();
        let disconnects = st.disconnects.clone();
        match dep
            .call(
                endpoint,
                forward,
                rid_str,
                parsed.stream,
                permit,
                disconnects,
            )
            .await
        {
            Ok(reply) => {
                feedback.observe_ttfb(sent.elapsed());
                feedback.report(Outcome::Success);
                return Ok(with_attempts(respond(reply, &dep), attempt));
            }
            Err(e) => {
                feedback.report(e.outcome(Instant::now()));
                let retry = e.retryable();
                tracing::warn!(backend = %dep.label, attempt, retry, "upstream failed: {e:?}");
                failures.push(ApiError::from_upstream(&dep.label, e));
                if !retry || Instant::now() >= budget_end {
                    break;
                }
            }
        }
    }
    let n = failures.len().max(1) as u32;
    Err(ApiError::worst_of(failures).attempts(n))
}

fn with_attempts(mut resp: Response, attempts: u32) -> Response {
    resp.headers_mut()
        .insert(ATTEMPTS, HeaderValue::from(attempts));
    resp
}

fn respond(reply: Reply, dep: &Deployment) -> Response {
    let mut resp = match reply {
        Reply::Full { content_type, body } => {
            let mut r = Response::new(Body::from(body));
            r.headers_mut().insert(header::CONTENT_TYPE, content_type);
            r
        }
        Reply::Stream(body) => {
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
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&dep.label) {
        h.insert(BACKEND, v);
    }
    if let Some(Ok(v)) = dep.variant.as_deref().map(HeaderValue::from_str) {
        h.insert(PRECISION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(e: Endpoint, s: &str) -> Result<Parsed, ApiError> {
        parse_request(e, s.as_bytes())
    }

    #[test]
    fn parse_accepts_a_chat_request() {
        let p = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"x":{"y":[1]}}"#,
        )
        .unwrap();
        assert_eq!(p.model, "m");
        assert!(p.stream);
    }

    #[test]
    fn parse_names_the_bad_field() {
        let cases = [
            (Endpoint::ChatCompletions, r#"{"messages":[{}]}"#, "model"),
            (
                Endpoint::ChatCompletions,
                r#"{"model":1,"messages":[{}]}"#,
                "model",
            ),
            (Endpoint::ChatCompletions, r#"{"model":"m"}"#, "messages"),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[]}"#,
                "messages",
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":"hi"}"#,
                "messages",
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[{}],"stream":"yes"}"#,
                "stream",
            ),
            (Endpoint::Completions, r#"{"model":"m"}"#, "prompt"),
            (Endpoint::Embeddings, r#"{"model":"m","input":[]}"#, "input"),
        ];
        for (e, body, param) in cases {
            let err = parse(e, body)
                .err()
                .unwrap_or_else(|| panic!("{body} passed"));
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param, Some(param), "{body}");
        }
    }

    #[test]
    fn parse_rejects_non_objects_and_broken_json() {
        for body in ["[1]", "\"m\"", "{\"model\":", "", "nul"] {
            let err = parse(Endpoint::ChatCompletions, body).err().unwrap();
            assert_eq!(err.code, "invalid_json", "{body}");
        }
    }

    #[test]
    fn rewrite_keeps_order_and_unknown_fields() {
        let out = rewrite(br#"{"z":1,"model":"a","tools":[{"x":null}]}"#, Some("b")).unwrap();
        assert_eq!(&out[..], br#"{"z":1,"model":"b","tools":[{"x":null}]}"#);
        let out = rewrite(br#"{"model":"a","priority":"high","n":1}"#, None).unwrap();
        assert_eq!(&out[..], br#"{"model":"a","n":1}"#);
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(a.to_str().unwrap().starts_with("req-"));
        assert!(a.as_bytes()[4..].iter().all(|c| c.is_ascii_hexdigit()));
    }
}

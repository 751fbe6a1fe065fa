//! The upstream client: sends one request to one deployment and reports what came back.
//!
//! Owns the connection pool and timeouts of each deployment, the credentials sent upstream
//! (from the deployment's config, never from the client), and the rule that nothing reaches the
//! client before the upstream's first body byte: until then every failure is an
//! [`UpstreamError`] that the caller can still answer with a proper status (or retry). After
//! it, failures become an SSE `error` event that ends the stream without `[DONE]`.
//! It must not choose deployments or build client-facing error bodies (see `error`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};

use crate::admission::Outcome;
use crate::config::DeploymentConfig;
use crate::headers::UPSTREAM_REQUEST_ID;

mod api;
mod client;
mod messages;
mod relay;
mod wire;

use api::UpstreamApi;
use client::{Coalesce, HttpClient};

pub(crate) use api::StreamStats;
pub(crate) use client::{set_lane, set_lanes};
pub(crate) use relay::{OnEnd, PendingStream, StreamEnd, Transform};
pub(crate) use wire::{envelope, error_message, is_envelope, Usage};

/// The endpoints the gateway forwards: OpenAI's, and Anthropic's Messages for a deployment
/// that speaks it natively (a Messages client's request as sent, see
/// [`api::UpstreamApi::takes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Messages,
}

/// One place a model can run, ready to be called.
pub(crate) struct Deployment {
    /// The `x-mofa-backend` value, e.g. `local(llama-3-8b@q8)`.
    pub label: Arc<str>,
    /// `label` as a header value, built once (`None` if it is not a valid one).
    pub label_header: Option<HeaderValue>,
    /// The variant (precision) label, e.g. `q4`, as the `x-mofa-precision` header value.
    pub variant_header: Option<HeaderValue>,
    pub upstream_model: Option<String>,
    /// A cloud provider's OpenAI API (it refuses parameters beyond OpenAI's, such as `top_k`;
    /// Anthropic's Messages API takes `top_k`).
    pub cloud: bool,
    /// What its tokens cost (the usage ledger).
    pub prices: crate::usage::Prices,
    base_url: String,
    /// The API it speaks (`api` in its config).
    api: Arc<dyn UpstreamApi>,
    /// `base_url` + each endpoint's path, parsed once (indexed by `Endpoint as usize`); `None`
    /// for a server the pool runs, whose port changes.
    urls: Option<[Uri; 4]>,
    /// `<base>` + the API's probe path (`/models`), for the health probe.
    models_url: Option<Uri>,
    /// For a server the gateway runs: where it listens now (its port changes at each start;
    /// `None` while it is not running).
    dynamic_base: Option<DynamicBase>,
    /// The headers that carry `api_key` (sensitive).
    credentials: Vec<(HeaderName, HeaderValue)>,
    /// `Host` for the fixed URLs, built once (the client would format it per request).
    host: Option<HeaderValue>,
    extra_headers: Vec<(HeaderName, HeaderValue)>,
    client: HttpClient,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    total_timeout: Option<Duration>,
    max_response_bytes: usize,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("label", &self.label)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// The current base URL of a deployment whose address changes (a server the pool runs).
pub(crate) type DynamicBase = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Why an upstream call failed before anything reached the client.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// Could not connect, or the connection broke before the reply's first body byte.
    Connect(String),
    /// No reply (head or first body byte) within the deadline; names the deadline.
    Timeout(&'static str),
    /// The upstream answered with a non-2xx status.
    Status {
        status: StatusCode,
        retry_after: Option<u64>,
        body: Bytes,
    },
    /// A 2xx whose body carries an error object, or is not what was asked for.
    Invalid(String),
    /// A non-streaming reply larger than `server.max_response_bytes`.
    TooLarge(usize),
    /// The deployment's API cannot carry the request as asked (a parameter it has no
    /// equivalent for, an endpoint it lacks): never sent. `param`: the request field at fault.
    Unsupported {
        param: Option<&'static str>,
        message: String,
    },
    /// The upstream refused the gateway's own credentials (its 401 or 403, with its error
    /// type): the deployment's configuration is at fault, not the client's request.
    Credentials {
        status: StatusCode,
        kind: Option<String>,
    },
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(d) => write!(f, "connection failed: {d}"),
            UpstreamError::Timeout(what) => write!(f, "timed out ({what})"),
            UpstreamError::Status { status, .. } => write!(f, "answered {}", status.as_u16()),
            UpstreamError::Invalid(d) => write!(f, "invalid reply: {d}"),
            UpstreamError::TooLarge(n) => write!(f, "reply larger than {n} bytes"),
            UpstreamError::Unsupported { message, .. } => write!(f, "unsupported: {message}"),
            UpstreamError::Credentials { status, .. } => {
                write!(f, "refused the credentials ({})", status.as_u16())
            }
        }
    }
}

impl std::error::Error for UpstreamError {}

impl UpstreamError {
    /// Whether another deployment should be tried: connection failures, timeouts, broken
    /// replies, refused credentials, 5xx (529 included), 408 and 429, and a request this API
    /// cannot carry (another deployment's API may). Never a client error (other 4xx) or an
    /// oversized reply.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            UpstreamError::Connect(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::Invalid(_)
            | UpstreamError::Unsupported { .. }
            | UpstreamError::Credentials { .. } => true,
            UpstreamError::TooLarge(_) => false,
            UpstreamError::Status { status, .. } => {
                status.is_server_error() || matches!(status.as_u16(), 408 | 429)
            }
        }
    }

    /// What it says of the deployment, for its breaker: a 429 or a 529 (Anthropic's
    /// `overloaded_error`), or a 503 with `Retry-After`, asks for a pause; a client error, or a
    /// request its API cannot carry, says nothing bad of it.
    pub(crate) fn outcome(&self, now: std::time::Instant) -> Outcome {
        match self {
            UpstreamError::Status {
                status,
                retry_after,
                ..
            } => match (status.as_u16(), retry_after) {
                (429 | 529, ra) | (503, ra @ Some(_)) => {
                    Outcome::CoolDown(now + Duration::from_secs(ra.unwrap_or(1).min(3600)))
                }
                (s, _) if s >= 500 || s == 408 => Outcome::Failure,
                _ => Outcome::Success,
            },
            UpstreamError::TooLarge(_) | UpstreamError::Unsupported { .. } => Outcome::Success,
            _ => Outcome::Failure,
        }
    }
}

/// A successful upstream reply, ready to send.
pub(crate) enum Reply {
    /// A complete body (non-streaming), already checked.
    Full {
        content_type: HeaderValue,
        body: Bytes,
        /// Its `usage`, when it has one.
        usage: Option<Usage>,
    },
    /// A stream whose first chunk has arrived and is not an error; relayed once it is given
    /// its [`OnEnd`].
    Stream(PendingStream),
}

impl Deployment {
    /// Builds a deployment from its config; `url` overrides the config's (for in-process sims);
    /// `dynamic_base` gives the address of a server the pool runs (a deployment with a `command`).
    pub(crate) fn new(
        model: &str,
        cfg: &DeploymentConfig,
        url: &str,
        dynamic_base: Option<DynamicBase>,
        max_response_bytes: usize,
    ) -> Result<Deployment, String> {
        let client = HttpClient::new(Duration::from_millis(cfg.connect_timeout_ms))?;
        let api = for_deployment(cfg)?;
        let mut credentials = match &cfg.api_key {
            Some(key) => api.credentials(key)?,
            None => Vec::new(),
        };
        credentials.extend(api.headers());
        let url = api.base(url);
        let extra_headers = cfg
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        let label: Arc<str> = cfg.label(model).into();
        let urls = endpoint_urls(&*api, url);
        let host = urls
            .as_ref()
            .and_then(|u| u[0].authority())
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        Ok(Deployment {
            label_header: HeaderValue::from_str(&label).ok(),
            label,
            variant_header: cfg
                .variant
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok()),
            upstream_model: cfg.upstream_model.clone(),
            cloud: cfg.kind == crate::config::DeploymentKind::Cloud
                && cfg.api == crate::config::UpstreamApiKind::OpenAi,
            prices: crate::usage::Prices::of(cfg),
            base_url: url.to_owned(),
            urls,
            models_url: format!("{url}{}", api.probe_path()).parse().ok(),
            api,
            dynamic_base,
            credentials,
            host,
            extra_headers,
            client,
            first_byte_timeout: Duration::from_millis(cfg.first_byte_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
            total_timeout: (cfg.total_timeout_ms > 0)
                .then(|| Duration::from_millis(cfg.total_timeout_ms)),
            max_response_bytes,
        })
    }

    /// Whether it takes `endpoint`'s requests as they are (see [`api::UpstreamApi::takes`]).
    pub(crate) fn takes(&self, endpoint: Endpoint) -> bool {
        self.api.takes(endpoint)
    }

    /// `GET <base>/models`, the active health check: whether it answered 2xx in time.
    pub(crate) async fn probe(&self) -> bool {
        let url = match &self.dynamic_base {
            Some(m) => match m() {
                Some(u) => format!("{}{}", self.api.base(&u), self.api.probe_path())
                    .parse::<Uri>()
                    .ok(),
                None => return true, // not running: the pool's business, not a failure
            },
            None => self.models_url.clone(),
        };
        let Some(url) = url else { return false };
        let build = || {
            let mut req = Request::new(Full::new(Bytes::new()));
            *req.uri_mut() = url.clone();
            for (k, v) in &self.credentials {
                req.headers_mut().insert(k.clone(), v.clone());
            }
            req
        };
        let probe = async {
            match self.client.send(build(), || Some(build())).await {
                Ok(r) => {
                    let ok = r.status().is_success();
                    // Read to the end so that the connection can be reused.
                    let _ = r.into_body().collect().await;
                    ok
                }
                Err(_) => false,
            }
        };
        tokio::time::timeout(self.first_byte_timeout.min(Duration::from_secs(10)), probe)
            .await
            .unwrap_or(false)
    }

    /// Sends `body` to `endpoint` and waits for the reply's first body byte (streaming) or its
    /// whole body (non-streaming).
    pub(crate) async fn call(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        request_id: &str,
        stream: bool,
    ) -> Result<Reply, UpstreamError> {
        let deadline = self.total_timeout.map(|t| tokio::time::Instant::now() + t);
        let first_byte_by = {
            let fb = tokio::time::Instant::now() + self.first_byte_timeout;
            deadline.map_or(fb, |d| d.min(fb))
        };
        let request = body.clone();
        let body = self.api.request_body(endpoint, body)?;
        let req = self.request(endpoint, body.clone(), request_id, stream)?;
        let again = || self.request(endpoint, body, request_id, stream).ok();
        let first = async {
            let resp = self
                .client
                .send(req, again)
                .await
                .map_err(|e| send_error(&e.error))?;
            let status = resp.status();
            let is_sse = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            if !status.is_success() || !stream || !is_sse {
                return Ok(Err(resp));
            }
            let mut body = Coalesce::new(resp.into_body());
            let first = loop {
                match body.next().await {
                    Some(Ok(chunk)) if chunk.is_empty() => continue,
                    Some(Ok(chunk)) => break chunk,
                    Some(Err(e)) => return Err(UpstreamError::Connect(error_chain(&e))),
                    None => {
                        return Err(UpstreamError::Connect(
                            "the stream ended before its first event".into(),
                        ))
                    }
                }
            };
            Ok(Ok((first, body)))
        };
        let got = tokio::time::timeout_at(first_byte_by, first)
            .await
            .map_err(|_| UpstreamError::Timeout("first byte"))??;
        match got {
            Ok((first, rest)) => {
                let mut reader = if endpoint == Endpoint::Messages {
                    self.api.stream_native()
                } else {
                    self.api.stream(&request)
                };
                let mut stats = StreamStats {
                    bytes: first.len() as u64,
                    chunks: 1,
                    ..StreamStats::default()
                };
                let first = reader.read(first, &mut stats);
                if let Some(e) = reader.failure() {
                    return Err(e);
                }
                Ok(Reply::Stream(PendingStream {
                    first,
                    stats,
                    reader,
                    rest: Box::pin(rest),
                    limits: relay::Limits {
                        idle: self.idle_timeout,
                        deadline,
                    },
                    label: self.label.clone(),
                }))
            }
            Err(resp) => self.read_full(endpoint, resp, deadline).await,
        }
    }

    /// The request to send: the endpoint's URL (a pool server's current address), the body,
    /// the headers the deployment adds (credentials, `x-mofa-request-id`, extra headers).
    fn request(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        request_id: &str,
        stream: bool,
    ) -> Result<Request<Full<Bytes>>, UpstreamError> {
        let mut host = None;
        let url = match &self.dynamic_base {
            Some(m) => {
                let path = self.api.path(endpoint);
                match m().and_then(|b| format!("{}{path}", self.api.base(&b)).parse::<Uri>().ok()) {
                    Some(url) => url,
                    None => {
                        return Err(UpstreamError::Connect(
                            "the model server is not running".into(),
                        ))
                    }
                }
            }
            None => match &self.urls {
                Some(urls) => {
                    host = self.host.clone();
                    urls[endpoint as usize].clone()
                }
                None => return Err(UpstreamError::Connect("no URL is configured".into())),
            },
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = url;
        let h = req.headers_mut();
        h.reserve(5 + self.extra_headers.len());
        if let Some(host) = host {
            h.insert(header::HOST, host);
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static(if stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert(UPSTREAM_REQUEST_ID, v);
        }
        for (k, v) in &self.credentials {
            h.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.extra_headers {
            h.append(k.clone(), v.clone());
        }
        Ok(req)
    }

    /// Reads a whole (non-streaming or error) reply, bounded in size and idle time.
    async fn read_full(
        &self,
        endpoint: Endpoint,
        resp: axum::http::Response<hyper::body::Incoming>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Reply, UpstreamError> {
        let (head, mut body) = resp.into_parts();
        let content_type = head
            .headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/json"));
        let limit = self.max_response_bytes;
        // One chunk (the usual case) is kept as it came; more are joined.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut len = 0usize;
        loop {
            let idle_end = tokio::time::Instant::now() + self.idle_timeout;
            let until = deadline.map_or(idle_end, |d| d.min(idle_end));
            match tokio::time::timeout_at(until, body.frame()).await {
                Err(_) => return Err(UpstreamError::Timeout("reading the body")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(UpstreamError::Connect(error_chain(&e))),
                Ok(Some(Ok(frame))) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue;
                    };
                    if len + chunk.len() > limit {
                        return Err(UpstreamError::TooLarge(limit));
                    }
                    len += chunk.len();
                    match first.take() {
                        None if buf.is_empty() => first = Some(chunk),
                        None => buf.extend_from_slice(&chunk),
                        Some(f) => {
                            buf.reserve(f.len() + chunk.len());
                            buf.extend_from_slice(&f);
                            buf.extend_from_slice(&chunk);
                        }
                    }
                }
            }
        }
        let body = first.unwrap_or_else(|| buf.freeze());
        if !head.status.is_success() {
            return Err(self.api.classify(head.status, &head.headers, body));
        }
        let (body, usage) = if endpoint == Endpoint::Messages {
            self.api.read_native(body)?
        } else {
            self.api.read_reply(body)?
        };
        Ok(Reply::Full {
            content_type,
            body,
            usage,
        })
    }
}

/// The upstream API of a deployment configured as `cfg` (its `api` and that API's keys).
pub(crate) fn for_deployment(cfg: &DeploymentConfig) -> Result<Arc<dyn api::UpstreamApi>, String> {
    Ok(match cfg.api {
        crate::config::UpstreamApiKind::OpenAi => Arc::new(api::OpenAiCompatible),
        crate::config::UpstreamApiKind::Anthropic => Arc::new(messages::MessagesApi::new(
            cfg.anthropic_version.as_deref(),
        )?),
    })
}

/// The URL of each endpoint under `base` (as [`UpstreamApi::base`] gave it), in `Endpoint`
/// order.
fn endpoint_urls(api: &dyn UpstreamApi, base: &str) -> Option<[Uri; 4]> {
    let url = |e: Endpoint| format!("{base}{}", api.path(e)).parse::<Uri>().ok();
    Some([
        url(Endpoint::ChatCompletions)?,
        url(Endpoint::Completions)?,
        url(Endpoint::Embeddings)?,
        url(Endpoint::Messages)?,
    ])
}

/// A failure to send (connect, write, or read the reply's head).
fn send_error(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    if client::is_connect_timeout(e) {
        UpstreamError::Timeout("connect")
    } else {
        UpstreamError::Connect(error_chain(e))
    }
}

/// A streamed reply body, as the relay reads it.
pub(crate) type BodyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, hyper::Error>> + Send>>;

/// The error and its causes on one line (hyper's own Display stops at the top).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

//! The one place that turns a gateway error into an HTTP response.
//!
//! A failure is an [`ErrorKind`] (a closed set) with its message, the request field at fault,
//! its cause (for the log only) and its retry advice. One `match` ([`ErrorKind::spec`]) derives
//! from the kind everything else: the status, the OpenAI `type` and `code`, the Anthropic status
//! and `type`, the metric and log reason, `connection: close`. No table maps a status back to a
//! label (a reply the gateway did not make itself is given a kind once, [`ErrorKind::of_foreign`]).
//!
//! Every non-2xx reply the gateway produces goes through [`ApiError`], so every one carries the
//! OpenAI error envelope `{"error":{"message","type","param","code"}}` with the status that
//! `docs/http-contract.md` gives for it, plus `Retry-After` / `x-should-retry` where they apply.
//! A client API that reads errors otherwise renders the same failure its way, with the same
//! headers ([`ApiError::render`]; Anthropic's: 503 becomes 529 `overloaded_error`, and so on).
//! This module decides statuses and envelopes; it must not do I/O or know about routing.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::headers::{BACKEND, REJECT_REASON, RETRY_AFTER_MS, SHOULD_RETRY};
use crate::limits::Dim;
use crate::pool::StartError;
use crate::reason::{clamp_retry_after, Reason, RejectReason, Rejection, RETRY_AFTER_MAX_S};
use crate::upstream::{envelope, is_envelope, UpstreamError};

/// `retry-after-ms` of a `max_parallel` refusal: a slot frees when a request ends.
const PARALLEL_RETRY_MS: u64 = 250;

/// What went wrong: a closed set. Everything a reply says of a failure derives from it in one
/// `match` ([`ErrorKind::spec`]): the status, the OpenAI `type` and `code`, the Anthropic status
/// and `type`, the metric and log reason, whether the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    // The request itself.
    InvalidJson,
    InvalidValue,
    /// A `Transfer-Encoding` other than `chunked`: the body cannot be read as sent.
    UnsupportedTransferEncoding,
    AmbiguousCredentials,
    /// The HTTP layer could not read the request (its head, or its body's framing).
    MalformedRequest,
    HeadTooLarge,
    UriTooLong,
    VersionNotSupported,
    /// A query string or path an endpoint could not read (no such case on `/v1`).
    BadRequest,
    UnsupportedMediaType,
    TooLarge,
    RequestTimeout,
    UnknownUrl,
    MethodNotAllowed,
    ModelNotFound,
    // Who asks.
    MissingApiKey,
    InvalidApiKey,
    ModelNotAllowed,
    AdminKeyRequired,
    // Its limits.
    RateLimited(Dim),
    TooManyInFlight,
    /// The key has spent its `budget` or `token_budget` for the period.
    OverBudget,
    // Admission and the gateway's state (every one a 503).
    Rejected(RejectReason),
    /// `/admin/pool/{name}/unload` while it has requests in flight.
    ModelBusy,
    // `/admin/reload`.
    /// The new config file does not validate (the old one keeps serving).
    InvalidConfig,
    /// The new config changes a key that needs a restart, or there is no file to read.
    ReloadRefused,
    // `/admin/usage`.
    /// `[usage] store = "off"`: there is no ledger to read.
    UsageOff,
    /// The usage store did not answer the report.
    UsageUnavailable,
    // The backend, before the first byte.
    UpstreamUnavailable,
    UpstreamTimeout,
    UpstreamOverloaded,
    /// Its own 4xx (other than 408 and 429), passed on with its status.
    UpstreamRejected(StatusCode),
    /// A 5xx the gateway did not make itself (a safety net: a layer's own reply).
    Internal,
}

/// What an [`ErrorKind`] answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spec {
    pub status: StatusCode,
    /// OpenAI envelope `type` and `code`.
    pub openai_type: &'static str,
    pub code: &'static str,
    /// Anthropic's status and error `type` (Messages API routes).
    pub anthropic: (StatusCode, &'static str),
    /// The metric label and the access log's `reason`.
    pub reason: Reason,
    /// `connection: close`: the connection cannot carry another request.
    pub close: bool,
}

impl ErrorKind {
    /// See [`Spec`]: the one table of the error contract (docs/http-contract.md).
    pub(crate) fn spec(self) -> Spec {
        use ErrorKind as K;
        const BAD: &str = "invalid_request_error";
        let s = |n: u16| StatusCode::from_u16(n).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let client = |status: u16, code: &'static str, anthropic: &'static str| Spec {
            status: s(status),
            openai_type: BAD,
            code,
            anthropic: (s(status), anthropic),
            reason: Reason::InvalidRequest,
            close: false,
        };
        let closing = |status: u16, code: &'static str| Spec {
            close: true,
            ..client(status, code, BAD)
        };
        match self {
            K::InvalidJson => client(400, "invalid_json", BAD),
            K::InvalidValue => client(400, "invalid_value", BAD),
            K::UnsupportedTransferEncoding => closing(400, "invalid_value"),
            K::AmbiguousCredentials => client(400, "ambiguous_credentials", BAD),
            K::MalformedRequest => closing(400, "malformed_request"),
            K::HeadTooLarge => closing(431, "request_header_fields_too_large"),
            K::UriTooLong => closing(414, "uri_too_long"),
            K::VersionNotSupported => closing(505, "http_version_not_supported"),
            K::BadRequest => client(400, "bad_request", BAD),
            K::UnsupportedMediaType => Spec {
                anthropic: (s(400), BAD),
                ..client(415, "unsupported_media_type", BAD)
            },
            K::TooLarge => client(413, "request_too_large", "request_too_large"),
            K::RequestTimeout => client(408, "request_timeout", BAD),
            K::UnknownUrl => client(404, "unknown_url", "not_found_error"),
            K::MethodNotAllowed => client(405, "method_not_allowed", BAD),
            K::ModelNotFound => client(404, "model_not_found", "not_found_error"),
            K::MissingApiKey | K::InvalidApiKey => {
                client(401, "invalid_api_key", "authentication_error")
            }
            K::ModelNotAllowed => Spec {
                openai_type: "permission_error",
                ..client(403, "model_not_allowed", "permission_error")
            },
            K::AdminKeyRequired => Spec {
                openai_type: "permission_error",
                ..client(403, "admin_key_required", "permission_error")
            },
            K::RateLimited(dim) => Spec {
                openai_type: dim.as_str(),
                reason: Reason::RateLimited,
                ..client(429, "rate_limit_exceeded", "rate_limit_error")
            },
            K::TooManyInFlight => Spec {
                openai_type: "requests",
                reason: Reason::RateLimited,
                ..client(429, "rate_limit_exceeded", "rate_limit_error")
            },
            K::OverBudget => Spec {
                openai_type: "insufficient_quota",
                reason: Reason::OverBudget,
                ..client(429, "insufficient_quota", "rate_limit_error")
            },
            K::Rejected(r) => Spec {
                status: s(503),
                openai_type: "service_unavailable",
                code: r.as_str(),
                anthropic: (s(529), "overloaded_error"),
                reason: Reason::Rejected(r),
                close: false,
            },
            K::ModelBusy => client(409, "model_busy", BAD),
            K::InvalidConfig => client(400, "invalid_config", BAD),
            K::ReloadRefused => client(409, "reload_refused", BAD),
            K::UsageOff => client(404, "usage_ledger_off", "not_found_error"),
            K::UsageUnavailable => Spec {
                status: s(503),
                openai_type: "service_unavailable",
                code: "usage_store_unavailable",
                anthropic: (s(529), "overloaded_error"),
                reason: Reason::UpstreamError,
                close: false,
            },
            K::UpstreamUnavailable => Spec {
                status: s(502),
                openai_type: "upstream_error",
                code: "upstream_unavailable",
                anthropic: (s(500), "api_error"),
                reason: Reason::UpstreamError,
                close: false,
            },
            K::UpstreamTimeout => Spec {
                status: s(504),
                openai_type: "upstream_error",
                code: "upstream_timeout",
                anthropic: (s(504), "timeout_error"),
                reason: Reason::UpstreamTimeout,
                close: false,
            },
            K::UpstreamOverloaded => Spec {
                status: s(503),
                openai_type: "service_unavailable",
                code: "upstream_overloaded",
                anthropic: (s(529), "overloaded_error"),
                reason: Reason::UpstreamError,
                close: false,
            },
            K::UpstreamRejected(status) => {
                let (openai_type, anthropic) = match status.as_u16() {
                    401 => ("authentication_error", "authentication_error"),
                    403 => ("permission_error", "permission_error"),
                    404 => (BAD, "not_found_error"),
                    413 => (BAD, "request_too_large"),
                    _ => (BAD, BAD),
                };
                Spec {
                    status,
                    openai_type,
                    code: "upstream_error",
                    anthropic: (status, anthropic),
                    reason: Reason::UpstreamRejected,
                    close: false,
                }
            }
            K::Internal => Spec {
                status: s(500),
                openai_type: "server_error",
                code: "internal_error",
                anthropic: (s(500), "api_error"),
                reason: Reason::UpstreamError,
                close: false,
            },
        }
    }

    /// The kind of a reply the gateway did not make itself (a layer's or an extractor's), by
    /// its status: the safety net of the `http` stamp layer and of the server's rewrite of
    /// the HTTP library's own replies.
    pub(crate) fn of_foreign(status: StatusCode) -> ErrorKind {
        match status.as_u16() {
            404 => ErrorKind::UnknownUrl,
            405 => ErrorKind::MethodNotAllowed,
            408 => ErrorKind::RequestTimeout,
            413 => ErrorKind::TooLarge,
            414 => ErrorKind::UriTooLong,
            415 => ErrorKind::UnsupportedMediaType,
            431 => ErrorKind::HeadTooLarge,
            505 => ErrorKind::VersionNotSupported,
            n if n >= 500 => ErrorKind::Internal,
            _ => ErrorKind::BadRequest,
        }
    }
}

/// A failure to be answered with an error reply (boxed: it travels in `Result`s).
#[derive(Debug, Clone)]
pub(crate) struct ApiError(Box<ErrorReply>);

impl std::ops::Deref for ApiError {
    type Target = ErrorReply;
    fn deref(&self) -> &ErrorReply {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ErrorReply {
        &mut self.0
    }
}

/// An [`ApiError`]'s kind and what it says beyond it.
#[derive(Debug, Clone)]
pub(crate) struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
    /// Envelope `param`: the request field at fault, if any.
    pub param: Option<&'static str>,
    /// What caused it, for the log only (never sent: addresses, a library's words).
    pub source: Option<String>,
    /// When to retry: `Retry-After` in seconds (clamped to [1, 60] by the constructors),
    /// `retry-after-ms` when known more exactly, `x-should-retry` when retrying cannot help.
    pub retry_after: Option<u64>,
    pub retry_after_ms: Option<u64>,
    pub should_retry: Option<bool>,
    /// `x-mofa-backend` for this reply; `None` leaves the default (`gateway`).
    pub backend: Option<String>,
    /// An upstream's own error envelope, sent as it came instead of one built here.
    pub passthrough: Option<Bytes>,
    /// `x-mofa-attempts`: deployments tried.
    pub attempts: Option<u32>,
}

impl ApiError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError(Box::new(ErrorReply {
            kind,
            message: message.into(),
            param: None,
            source: None,
            retry_after: None,
            retry_after_ms: None,
            should_retry: None,
            backend: None,
            passthrough: None,
            attempts: None,
        }))
    }

    /// The reply's status.
    pub(crate) fn status(&self) -> StatusCode {
        self.kind.spec().status
    }

    /// The envelope's `code`.
    #[cfg(test)]
    pub(crate) fn code(&self) -> &'static str {
        self.kind.spec().code
    }

    /// Sets what caused it (for the log).
    pub(crate) fn caused_by(mut self, source: impl std::fmt::Display) -> Self {
        self.source = Some(source.to_string());
        self
    }

    pub(crate) fn invalid_json(detail: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::InvalidJson,
            format!("We could not parse the JSON body of your request: {detail}"),
        )
    }

    pub(crate) fn invalid_value(param: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorKind::InvalidValue, message);
        e.param = Some(param);
        e
    }

    pub(crate) fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            ErrorKind::ModelNotFound,
            format!(
                "The model `{}` does not exist or you do not have access to it.",
                truncate(model, 200)
            ),
        );
        e.param = Some("model");
        e
    }

    /// The body's framing is broken (a chunk size that is not one, a connection that ended
    /// within the body): the connection is closed after the reply.
    pub(crate) fn malformed_body() -> Self {
        Self::new(
            ErrorKind::MalformedRequest,
            "The request body could not be read: its framing is invalid (a malformed chunk, or \
             fewer bytes than announced).",
        )
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            ErrorKind::TooLarge,
            format!("The request body is larger than the limit of {limit} bytes."),
        )
    }

    pub(crate) fn unsupported_media_type() -> Self {
        Self::new(
            ErrorKind::UnsupportedMediaType,
            "The request body must be JSON, sent with `Content-Type: application/json`.",
        )
    }

    /// A `Transfer-Encoding` other than `chunked` (`gzip, chunked`): the gateway decodes none.
    pub(crate) fn unsupported_transfer_encoding(coding: &str) -> Self {
        let mut e = Self::new(
            ErrorKind::UnsupportedTransferEncoding,
            format!(
                "Transfer-Encoding `{}` is not supported; send the body as is or chunked.",
                truncate(coding, 40)
            ),
        );
        e.param = Some("transfer-encoding");
        e
    }

    /// The gateway is shutting down.
    pub(crate) fn shutting_down() -> Self {
        Self::rejected(Rejection::new(RejectReason::ShuttingDown, 1), "")
    }

    /// No API key, or one the gateway does not know (as OpenAI: no hint which keys exist, and
    /// never the key itself).
    pub(crate) fn invalid_api_key(missing: bool) -> Self {
        let message = if missing {
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        } else {
            "Incorrect API key provided."
        };
        let kind = if missing {
            ErrorKind::MissingApiKey
        } else {
            ErrorKind::InvalidApiKey
        };
        Self::new(kind, message)
    }

    /// Two credentials that disagree (two `Authorization` or `x-api-key` headers, or one of
    /// each with different keys): which one is meant cannot be known.
    pub(crate) fn ambiguous_credentials() -> Self {
        let mut e = Self::new(
            ErrorKind::AmbiguousCredentials,
            "The request carries more than one API key (two Authorization or x-api-key headers, \
             or one of each with different keys); send exactly one.",
        );
        e.param = Some("authorization");
        e
    }

    /// The key may not use this model.
    pub(crate) fn model_not_allowed(model: &str) -> Self {
        let mut e = Self::new(
            ErrorKind::ModelNotAllowed,
            format!(
                "Your API key is not allowed to use the model `{}`.",
                truncate(model, 200)
            ),
        );
        e.param = Some("model");
        e
    }

    /// `/admin/*` with a client key.
    pub(crate) fn admin_key_required() -> Self {
        Self::new(
            ErrorKind::AdminKeyRequired,
            "This endpoint needs an admin key.",
        )
    }

    /// Over a rate limit (429, as OpenAI): `Retry-After` and `retry-after-ms` say when the
    /// request fits; one that never fits (more than a minute's allowance) says
    /// `x-should-retry: false`.
    pub(crate) fn rate_limited(d: &crate::limits::Denial, key: &str) -> Self {
        use crate::limits::Dim;
        let what = match d.dim {
            Dim::Requests => "requests per min (RPM)",
            Dim::Tokens => "tokens per min (TPM)",
        };
        let message = match d.retry_after_us {
            Some(us) => {
                let (_, ms) = crate::limits::retry_after(us);
                format!(
                    "Rate limit reached for {what} on key `{key}`: Limit {}, Used {}, Requested {}. Please try again in {}.",
                    d.limit, d.used, d.requested, crate::limits::openai_duration(ms * 1000)
                )
            }
            None => format!(
                "Request too large for {what} on key `{key}`: Limit {}, Requested {}. Send a smaller request.",
                d.limit, d.requested
            ),
        };
        let mut e = Self::new(ErrorKind::RateLimited(d.dim), message);
        match d.retry_after_us {
            Some(us) => {
                let (secs, ms) = crate::limits::retry_after(us);
                e.retry_after = Some(secs);
                e.retry_after_ms = Some(ms);
            }
            None => e.should_retry = Some(false),
        }
        e
    }

    /// The key has spent a budget: OpenAI's `insufficient_quota`, which no retry helps before
    /// the period resets (`x-should-retry: false`; `Retry-After` is when it resets).
    pub(crate) fn over_budget(over: &crate::budget::Over, key: &str, now: u64) -> Self {
        let what = if over.tokens {
            format!("token budget of {} tokens", over.amount)
        } else {
            format!("budget of {:.2}", over.amount)
        };
        let spent = if over.tokens {
            format!("{} tokens", over.spent)
        } else {
            format!("{:.4}", over.spent)
        };
        let when = match over.resets {
            Some(t) => format!(
                "It resets at {} (the next UTC {}).",
                crate::budget::rfc3339(t),
                over.period.as_str()
            ),
            None => "It is a total budget and does not reset; raise it in the config.".into(),
        };
        let mut e = Self::new(
            ErrorKind::OverBudget,
            format!(
                "You exceeded your current quota: key `{key}` has spent its {what} {} ({spent} spent). {when}",
                match over.period {
                    crate::budget::Period::Day => "per day",
                    crate::budget::Period::Month => "per month",
                    crate::budget::Period::Total => "in total",
                }
            ),
        );
        e.should_retry = Some(false);
        e.retry_after = over.resets.map(|t| t.saturating_sub(now).max(1));
        e
    }

    /// `max_parallel` requests of the key are in flight: a short retry, not a whole window.
    pub(crate) fn too_many_in_flight(limit: u32, key: &str) -> Self {
        let mut e = Self::new(
            ErrorKind::TooManyInFlight,
            format!(
                "Too many requests in flight on key `{key}`: Limit {limit} at once. Please try again when one has finished."
            ),
        );
        e.retry_after = Some(1);
        e.retry_after_ms = Some(PARALLEL_RETRY_MS);
        e
    }

    /// The shared rate-limit store does not answer and `redis_failure = "closed"`.
    pub(crate) fn limits_unavailable() -> Self {
        Self::rejected(Rejection::new(RejectReason::LimitsUnavailable, 1), "")
    }

    /// The client did not send its body in time.
    pub(crate) fn request_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            ErrorKind::RequestTimeout,
            format!(
                "The request body was not received within {} ms.",
                limit.as_millis()
            ),
        )
    }

    pub(crate) fn unknown_url(method: &str, path: &str) -> Self {
        Self::new(
            ErrorKind::UnknownUrl,
            format!("Unknown request URL: {method} {}.", truncate(path, 200)),
        )
    }

    pub(crate) fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            ErrorKind::MethodNotAllowed,
            format!("{method} is not allowed on {}.", truncate(path, 200)),
        )
    }

    /// Upstream could not be reached, or broke, before the first byte reached the client.
    /// `why` is the gateway's own words: never an address nor the HTTP library's text (those
    /// go to the log), so a client learns the deployment's label and nothing internal.
    pub(crate) fn upstream_unavailable(backend: &str, why: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            ErrorKind::UpstreamUnavailable,
            format!("The backend {backend} failed before responding: {why}."),
        );
        e.backend = Some(backend.to_owned());
        e
    }

    /// Upstream did not send its first byte in time.
    pub(crate) fn upstream_timeout(backend: &str, what: &str) -> Self {
        let mut e = Self::new(
            ErrorKind::UpstreamTimeout,
            format!("The backend {backend} timed out ({what})."),
        );
        e.backend = Some(backend.to_owned());
        e
    }

    /// Upstream itself is overloaded (its 429 or 503): the client may retry later.
    pub(crate) fn upstream_busy(
        backend: &str,
        upstream_status: StatusCode,
        retry_after: u64,
    ) -> Self {
        let mut e = Self::new(
            ErrorKind::UpstreamOverloaded,
            format!(
                "The backend {backend} is overloaded (it answered {}).",
                upstream_status.as_u16()
            ),
        );
        e.retry_after = Some(clamp_retry_after(retry_after));
        e.backend = Some(backend.to_owned());
        e
    }

    /// Maps a failed upstream call (nothing sent to the client yet) to the client's answer:
    /// connect failure 502, timeout 504, upstream 429/503/529 503 with `Retry-After`, other 5xx
    /// 502, other 4xx passed through with their status (wrapped in the envelope if they were
    /// not); refused credentials 502; a request the deployment's API cannot carry 400 naming
    /// the field.
    pub(crate) fn from_upstream(backend: &str, e: UpstreamError) -> Self {
        let source = e.to_string();
        let err = match e {
            // The details (addresses, the HTTP library's text) are logged by `forward`; the
            // client gets the label and what kind of failure it was.
            UpstreamError::Connect(_) => Self::upstream_unavailable(
                backend,
                "it could not be reached, or closed the connection",
            ),
            UpstreamError::Timeout(what) => Self::upstream_timeout(backend, what),
            // The backend's own error message (as for its 4xx), or the gateway's words.
            UpstreamError::Invalid(detail) => {
                Self::upstream_unavailable(backend, truncate(&detail, 300))
            }
            UpstreamError::TooLarge(limit) => Self::upstream_unavailable(
                backend,
                format!("its reply is larger than server.max_response_bytes ({limit})"),
            ),
            // The client's key is not the one refused: never its 401.
            UpstreamError::Credentials { status, kind } => Self::upstream_unavailable(
                backend,
                format!(
                    "it refused the gateway's credentials for it ({}{}); check the deployment's api_key",
                    status.as_u16(),
                    kind.map(|k| format!(" {}", truncate(&k, 60))).unwrap_or_default()
                ),
            ),
            UpstreamError::Unsupported { param, message } => {
                let mut e = Self::new(
                    ErrorKind::InvalidValue,
                    format!("The backend {backend} cannot carry this request: {message}"),
                )
                .at(backend);
                e.param = param;
                e
            }
            UpstreamError::Status {
                status,
                retry_after,
                body,
            } => match status.as_u16() {
                429 | 503 | 529 => {
                    Self::upstream_busy(backend, status, retry_after.unwrap_or(1))
                }
                408 => Self::upstream_timeout(backend, "the backend answered 408"),
                400..=499 => {
                    let mut e = Self::new(
                        ErrorKind::UpstreamRejected(status),
                        crate::upstream::error_message(&body).unwrap_or_else(|| {
                            format!(
                                "The backend {backend} rejected the request ({}): {}",
                                status.as_u16(),
                                truncate(&String::from_utf8_lossy(&body), 300)
                            )
                        }),
                    )
                    .at(backend);
                    if is_envelope(&body) {
                        e.passthrough = Some(body);
                    }
                    e
                }
                _ => {
                    Self::upstream_unavailable(backend, format!("it answered {}", status.as_u16()))
                }
            },
        };
        err.caused_by(source)
    }

    /// An admission rejection: 503 with `Retry-After`, `x-mofa-backend: rejected` and
    /// `x-mofa-reject-reason`; one that retrying cannot fix also says `x-should-retry: false`.
    pub(crate) fn rejected(r: Rejection, model: &str) -> Self {
        let model = truncate(model, 200);
        let message = match r.reason {
            RejectReason::QueueFull => format!("Model `{model}` has too many requests waiting; retry later."),
            RejectReason::QueueTimeout => format!("No capacity for model `{model}` freed up in time; retry later."),
            RejectReason::CapacityExceeded => format!("Every deployment of model `{model}` is busy and this request may not wait; retry later."),
            RejectReason::MemoryExhausted => format!("Not enough memory to load model `{model}` now; retry later."),
            RejectReason::ModelTooLarge => format!("Model `{model}` needs more memory than the budget allows; it cannot be served here."),
            RejectReason::NoHealthyBackend => format!("No deployment of model `{model}` can serve requests now."),
            RejectReason::BackendStartFailed => format!("The server for model `{model}` failed to start; retry later."),
            RejectReason::ShuttingDown => "The gateway is shutting down; retry on another replica or later.".to_string(),
            RejectReason::LimitsUnavailable => "The shared rate-limit store does not answer; retry later.".to_string(),
        };
        let mut e = Self::new(ErrorKind::Rejected(r.reason), message);
        e.retry_after = Some(r.retry_after_s());
        e.retry_after_ms = Some(r.retry_after_ms);
        if !r.reason.retryable() {
            e.should_retry = Some(false);
        }
        e
    }

    /// The answer when every try failed: an overload (503, the shortest `Retry-After`) if any
    /// deployment asked to come back later, else a timeout (504) if any timed out, else the
    /// last failure (502 or a client error).
    pub(crate) fn worst_of(mut failures: Vec<ApiError>) -> ApiError {
        let busy = failures
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    ErrorKind::UpstreamOverloaded | ErrorKind::Rejected(_)
                )
            })
            .min_by_key(|e| e.retry_after.unwrap_or(RETRY_AFTER_MAX_S))
            .cloned();
        if let Some(e) = busy {
            return e;
        }
        if let Some(e) = failures
            .iter()
            .rev()
            .find(|e| e.kind == ErrorKind::UpstreamTimeout)
        {
            return e.clone();
        }
        failures.pop().unwrap_or_else(|| {
            Self::new(ErrorKind::UpstreamUnavailable, "No backend could be tried.")
        })
    }

    /// Sets `x-mofa-attempts`.
    pub(crate) fn attempts(mut self, n: u32) -> Self {
        self.attempts = Some(n);
        self
    }

    /// A pool model could not be made ready for this request.
    pub(crate) fn from_start(model: &str, e: StartError) -> Self {
        match e {
            StartError::Failed {
                message,
                retry_after_s,
            } => {
                let r = Rejection::new(RejectReason::BackendStartFailed, retry_after_s);
                let mut err = Self::rejected(r, model);
                err.message = format!("{} ({message})", err.message);
                err
            }
            // Still starting: come back when the start is expected to be over.
            StartError::Deadline { ready_in_ms } => Self::rejected(
                Rejection::after_ms(RejectReason::QueueTimeout, ready_in_ms),
                model,
            ),
        }
    }

    pub(crate) fn unknown_pool_model(name: &str) -> Self {
        Self::new(
            ErrorKind::ModelNotFound,
            format!(
                "No model server named `{}` is run by the pool.",
                truncate(name, 200)
            ),
        )
    }

    /// A reload's new config does not validate: `detail` names the key and the fix.
    pub(crate) fn invalid_config(detail: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::InvalidConfig,
            format!("The new configuration is invalid; the running one stays in effect: {detail}"),
        )
    }

    /// A reload that cannot be applied live (`detail` says why); nothing changed.
    /// `x-should-retry: false`: the SDKs retry a 409 by default, and the same file is refused
    /// again until it changes.
    pub(crate) fn reload_refused(detail: impl std::fmt::Display) -> Self {
        let mut e = Self::new(ErrorKind::ReloadRefused, detail.to_string());
        e.should_retry = Some(false);
        e
    }

    /// `/admin/usage` with `[usage] store = "off"`.
    pub(crate) fn usage_off() -> Self {
        Self::new(
            ErrorKind::UsageOff,
            "The usage ledger is off: set [usage] store = \"sqlite\" or \"postgres\" to record \
             and report usage.",
        )
    }

    /// The usage store did not answer a report (`source`, for the log only: it may name the
    /// database's host).
    pub(crate) fn usage_unavailable(source: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            ErrorKind::UsageUnavailable,
            "The usage store did not answer; try again.",
        )
        .caused_by(source);
        e.retry_after = Some(1);
        e
    }

    pub(crate) fn model_busy(name: &str) -> Self {
        Self::new(
            ErrorKind::ModelBusy,
            format!(
                "`{}` has requests in flight; unload it when they are done.",
                truncate(name, 200)
            ),
        )
    }

    /// Sets the backend named in `x-mofa-backend`.
    pub(crate) fn at(mut self, backend: &str) -> Self {
        self.backend = Some(backend.to_owned());
        self
    }

    /// The envelope as JSON bytes.
    pub(crate) fn envelope(&self) -> Bytes {
        let spec = self.kind.spec();
        envelope(&self.message, spec.openai_type, self.param, spec.code)
    }

    /// `body` with `status` and the headers of this error.
    pub(crate) fn render(self, status: StatusCode, body: Bytes) -> Response {
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(n) = self.attempts {
            h.insert(crate::headers::ATTEMPTS, HeaderValue::from(n));
        }
        let spec = self.kind.spec();
        if spec.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            let ms = self.retry_after_ms.unwrap_or(secs.saturating_mul(1000));
            h.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
        }
        if let Some(retry) = self.should_retry {
            h.insert(
                SHOULD_RETRY,
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        if let ErrorKind::Rejected(r) = self.kind {
            h.insert(REJECT_REASON, HeaderValue::from_static(r.as_str()));
            h.insert(BACKEND, HeaderValue::from_static("rejected"));
        } else if let Some(b) = self.backend.as_deref() {
            if let Ok(v) = HeaderValue::from_str(b) {
                h.insert(BACKEND, v);
            }
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match &self.passthrough {
            Some(b) => b.clone(),
            None => self.envelope(),
        };
        let status = self.status();
        self.render(status, body)
    }
}

/// Shortens client-supplied text quoted back in a message.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a deployment's failure becomes for the client (the upstream APIs say which
    /// failure a reply is: see their tests).
    #[test]
    fn upstream_failures_become_the_clients_answers() {
        let status = |n| StatusCode::from_u16(n).unwrap();
        // A request the deployment's API cannot carry: 400 naming the field and the deployment.
        let err = ApiError::from_upstream(
            "cloud(anthropic)",
            UpstreamError::Unsupported {
                param: Some("n"),
                message: "one reply per request".into(),
            },
        );
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.kind, ErrorKind::InvalidValue);
        assert_eq!(err.param, Some("n"));
        assert!(err.message.contains("cloud(anthropic)"), "{}", err.message);
        let env: serde_json::Value = serde_json::from_slice(&err.envelope()).unwrap();
        assert_eq!(env["error"]["type"], "invalid_request_error");
        assert_eq!(env["error"]["param"], "n");
        // An overload (Anthropic's 529 as OpenAI's 429 and 503): 503 with its Retry-After.
        for n in [529, 429, 503] {
            let err = ApiError::from_upstream(
                "b",
                UpstreamError::Status {
                    status: status(n),
                    retry_after: Some(7),
                    body: Bytes::new(),
                },
            );
            assert_eq!(err.kind, ErrorKind::UpstreamOverloaded, "{n}");
            assert_eq!(err.retry_after, Some(7), "{n}");
        }
        // The deployment's own key refused: a 502 naming it and the provider's error type,
        // never the client's 401.
        for n in [401, 403] {
            let err = ApiError::from_upstream(
                "cloud(anthropic)",
                UpstreamError::Credentials {
                    status: status(n),
                    kind: Some("authentication_error".into()),
                },
            );
            assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
            assert!(err.message.contains("cloud(anthropic)"), "{}", err.message);
            assert!(
                err.message.contains("authentication_error"),
                "{}",
                err.message
            );
        }
        // A 400 in the OpenAI envelope: its status, the provider's message, passed through.
        let body = crate::upstream::envelope(
            "temperature: must be <= 1",
            "invalid_request_error",
            None,
            "invalid_request_error",
        );
        let err = ApiError::from_upstream(
            "cloud(anthropic)",
            UpstreamError::Status {
                status: StatusCode::BAD_REQUEST,
                retry_after: None,
                body,
            },
        );
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.message, "temperature: must be <= 1");
        assert!(err.passthrough.is_some());
        // Another 5xx: 502.
        let err = ApiError::from_upstream(
            "b",
            UpstreamError::Status {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                retry_after: None,
                body: Bytes::new(),
            },
        );
        assert_eq!(err.kind, ErrorKind::UpstreamUnavailable);
    }

    #[test]
    fn envelope_has_all_four_fields() {
        let v: serde_json::Value =
            serde_json::from_slice(&ApiError::model_not_found("x").envelope()).unwrap();
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "model_not_found");
        assert_eq!(e["param"], "model");
        assert!(e["message"].as_str().unwrap().contains("`x`"));
        let v: serde_json::Value =
            serde_json::from_slice(&ApiError::unsupported_media_type().envelope()).unwrap();
        assert!(v["error"].as_object().unwrap().contains_key("param"));
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn anthropic_statuses_and_envelope() {
        use crate::reason::Rejection;
        let cases = [
            (
                ApiError::invalid_value("model", "x"),
                400,
                "invalid_request_error",
            ),
            (
                ApiError::unsupported_media_type(),
                400,
                "invalid_request_error",
            ),
            (ApiError::model_not_found("m"), 404, "not_found_error"),
            (ApiError::too_large(10), 413, "request_too_large"),
            (
                ApiError::rejected(Rejection::new(RejectReason::QueueFull, 3), "m"),
                529,
                "overloaded_error",
            ),
            (
                ApiError::upstream_busy("b", StatusCode::TOO_MANY_REQUESTS, 2),
                529,
                "overloaded_error",
            ),
            (ApiError::upstream_unavailable("b", "x"), 500, "api_error"),
            (ApiError::upstream_timeout("b", "x"), 504, "timeout_error"),
        ];
        for (e, status, kind) in cases {
            let (s, k) = e.kind.spec().anthropic;
            assert_eq!((s.as_u16(), k), (status, kind), "{}", e.message);
        }
        for (upstream, kind) in [
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (422, "invalid_request_error"),
        ] {
            let k = ErrorKind::UpstreamRejected(StatusCode::from_u16(upstream).unwrap());
            assert_eq!(k.spec().anthropic.1, kind);
            assert_eq!(k.spec().status.as_u16(), upstream);
        }
        assert_eq!(
            ErrorKind::InvalidApiKey.spec().anthropic.1,
            "authentication_error"
        );
        assert_eq!(
            ErrorKind::RateLimited(Dim::Tokens).spec().anthropic.1,
            "rate_limit_error"
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("hi", 10), "hi");
    }

    #[test]
    fn every_kind_is_an_error_status_with_a_code() {
        use ErrorKind as K;
        let mut kinds = vec![
            K::InvalidJson,
            K::InvalidValue,
            K::AmbiguousCredentials,
            K::MalformedRequest,
            K::HeadTooLarge,
            K::UriTooLong,
            K::VersionNotSupported,
            K::BadRequest,
            K::UnsupportedMediaType,
            K::TooLarge,
            K::RequestTimeout,
            K::UnknownUrl,
            K::MethodNotAllowed,
            K::ModelNotFound,
            K::MissingApiKey,
            K::InvalidApiKey,
            K::ModelNotAllowed,
            K::AdminKeyRequired,
            K::RateLimited(Dim::Requests),
            K::TooManyInFlight,
            K::OverBudget,
            K::ModelBusy,
            K::InvalidConfig,
            K::ReloadRefused,
            K::UsageOff,
            K::UsageUnavailable,
            K::UpstreamUnavailable,
            K::UpstreamTimeout,
            K::UpstreamOverloaded,
            K::UpstreamRejected(StatusCode::BAD_REQUEST),
            K::Internal,
        ];
        kinds.extend(RejectReason::ALL.map(K::Rejected));
        for k in kinds {
            let s = k.spec();
            assert!(s.status.as_u16() >= 400, "{k:?}");
            assert!(s.anthropic.0.as_u16() >= 400, "{k:?}");
            assert!(!s.code.is_empty() && !s.openai_type.is_empty(), "{k:?}");
            // A failure is never counted as a success.
            assert_ne!(s.reason, Reason::Ok, "{k:?}");
            // Statuses the HTTP layer makes are what `of_foreign` reads back.
            if matches!(k, K::HeadTooLarge | K::UriTooLong | K::VersionNotSupported) {
                assert_eq!(K::of_foreign(s.status), k);
            }
        }
    }
}

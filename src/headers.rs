//! Names of the headers the gateway reads and writes. Constants only.

use axum::http::HeaderName;

/// Where the request ran: `local(model)`, `cloud(provider)`, `sim(model)`, `rejected`, `gateway`.
pub const BACKEND: HeaderName = HeaderName::from_static("x-mofa-backend");
/// Milliseconds from the request's arrival to the response head.
pub const LATENCY_MS: HeaderName = HeaderName::from_static("x-mofa-latency-ms");
/// The client's request id, echoed, or one the gateway made.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The code of an admission rejection (`queue_full`, ...).
pub const REJECT_REASON: HeaderName = HeaderName::from_static("x-mofa-reject-reason");
/// Read by the OpenAI SDKs: `false` stops their retries.
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// Read by the OpenAI SDKs before `Retry-After`.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

//! Names of the headers the gateway reads and writes. Constants only.

use axum::http::HeaderName;

/// Where the request ran: `local(model)`, `cloud(provider)`, `sim(model)`, `rejected`, `gateway`.
pub(crate) const BACKEND: HeaderName = HeaderName::from_static("x-mofa-backend");
/// Milliseconds from the request's arrival to the response head.
pub(crate) const LATENCY_MS: HeaderName = HeaderName::from_static("x-mofa-latency-ms");
/// The client's request id, echoed, or one the gateway made.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The code of an admission rejection (`queue_full`, ...).
pub(crate) const REJECT_REASON: HeaderName = HeaderName::from_static("x-mofa-reject-reason");
/// Read by the OpenAI SDKs: `false` stops their retries.
pub(crate) const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// Read by the OpenAI SDKs before `Retry-After`.
pub(crate) const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// The variant (precision) of the local model that served the request, e.g. `q4`.
pub(crate) const PRECISION: HeaderName = HeaderName::from_static("x-mofa-precision");
/// A request's priority: `low`, `normal`, `high`, `critical`.
pub(crate) const PRIORITY: HeaderName = HeaderName::from_static("x-mofa-priority");
/// The longest a request will wait in the queue, in ms (only lowers the configured bound).
pub(crate) const MAX_WAIT_MS: HeaderName = HeaderName::from_static("x-mofa-max-wait-ms");
/// A client's session, for the `session` routing policy (wins over the body's `user`).
pub(crate) const SESSION: HeaderName = HeaderName::from_static("x-mofa-session");
/// Under `prefix-aware`: the share of the prompt the deployment chosen was sent before.
pub(crate) const PREFIX_MATCH: HeaderName = HeaderName::from_static("x-mofa-prefix-match");
/// How many deployments were tried for the request.
pub(crate) const ATTEMPTS: HeaderName = HeaderName::from_static("x-mofa-attempts");
/// The request id as sent upstream. Not `x-request-id`: some servers (llama-cpp-python's)
/// reject an `x-request-id` that is not a UUID with a bare 400.
pub(crate) const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-mofa-request-id");
/// Where the time went (`queue`, `upstream`, `total`, in ms), as browsers' tools read it.
pub(crate) const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// The request id as the Anthropic SDKs read it (on the Messages routes; same as `x-request-id`).
pub(crate) const ANTHROPIC_REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

//! Phase 7, `forward`: runs one try on the deployment admission chose: starts its server if
//! the pool runs it (within the request's deadline, its slot held meanwhile so it cannot be
//! evicted), rewrites the body for the deployment (`model` renamed, the gateway's `priority`
//! removed; otherwise the client's bytes untouched), calls it, and feeds the outcome to the
//! deployment's breaker and latency estimate. It must not decide whether to try again (that
//! is `route`) nor answer the client (that is the pipeline and `error`).
//!
//! Whose fault a failure is (the breaker rule, see docs/http-contract.md): a connection
//! failure, a timeout or a broken reply counts against the deployment at once; a 4xx never
//! does; a 5xx *answer* (other than 503, which asks for a pause) may be the request's doing, so
//! it is held as a [`Suspect`] until `route` knows more: another deployment served the same
//! request (the deployment's fault: it counts), or reproduced the 5xx (the request's fault:
//! it counts for neither), or there was nothing to compare with (the deployment's health check
//! decides: it counts only if `GET <url>/models` fails too).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::parse::Parsed;
use crate::admission::Outcome;
use crate::error::ApiError;
use crate::orchestrator::{Feedback, Permit};
use crate::upstream::{Deployment, Reply, UpstreamError};

/// How long the health check that settles an uncompared 5xx may take.
const SETTLE_PROBE_LIMIT: Duration = Duration::from_secs(2);

/// A successful try.
pub struct Forwarded {
    pub reply: Reply,
    pub dep: Arc<Deployment>,
    /// From sending to the first byte.
    pub ttfb: Duration,
    /// The slot: a stream holds it until its end.
    pub permit: Permit,
}

/// A failed try: the answer it would give, and whether another deployment could do better.
pub struct Failed {
    pub error: ApiError,
    pub retryable: bool,
    /// A 5xx answer not yet reported to the deployment's breaker.
    pub suspect: Option<Suspect>,
}

/// A deployment's 5xx answer to a request, held until it is known whose fault it was (see the
/// module doc). Dropped without [`Suspect::confirm`] or [`Suspect::settle`]: the request's
/// fault, nothing is reported.
pub struct Suspect {
    feedback: Feedback,
    dep: Arc<Deployment>,
}

impl std::fmt::Debug for Suspect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suspect")
            .field("backend", &self.dep.label)
            .finish()
    }
}

impl Suspect {
    /// Another deployment served the same request: the failure was this deployment's.
    pub fn confirm(self) {
        self.feedback.report(Outcome::Failure);
    }

    /// Nothing to compare with: it counts only if the deployment's health check fails too.
    pub async fn settle(self) {
        let healthy = tokio::time::timeout(SETTLE_PROBE_LIMIT, self.dep.probe())
            .await
            .unwrap_or(false);
        if !healthy {
            tracing::warn!(backend = %self.dep.label, "5xx answer and failed health check");
            self.feedback.report(Outcome::Failure);
        }
    }
}

/// A 5xx answer that is not an overload signal: the request may have caused it.
fn maybe_the_requests_fault(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Status { status, .. }
        if status.is_server_error() && status.as_u16() != 503)
}

/// Runs one try of `req` under `permit`; `start_by`: the latest a pool server may take to
/// start for it.
pub async fn forward(
    permit: Permit,
    req: &Parsed,
    request_id: &str,
    start_by: Instant,
) -> Result<Forwarded, Failed> {
    let dep = permit.deployment().clone();
    if let Some(m) = permit.managed() {
        if let Err(e) = m.ensure_ready(start_by).await {
            let error = ApiError::from_start(permit.model_name(), e).at(&dep.label);
            return Err(Failed {
                error,
                retryable: true,
                suspect: None,
            });
        }
    }
    let new_model = dep.upstream_model.as_deref().filter(|m| *m != req.model);
    // A Messages request's `top_k`: local servers take it, cloud APIs refuse it.
    let drop_top_k = dep.cloud && req.anthropic.as_ref().is_some_and(|a| a.top_k);
    let body = if new_model.is_some() || req.strip_priority || drop_top_k {
        rewrite(&req.body, new_model, req.strip_priority, drop_top_k).map_err(|error| Failed {
            error,
            retryable: false,
            suspect: None,
        })?
    } else {
        req.body.clone()
    };
    let feedback = permit.feedback();
    let sent = Instant::now();
    match dep.call(req.endpoint, body, request_id, req.stream).await {
        Ok(reply) => {
            let ttfb = sent.elapsed();
            feedback.observe_ttfb(ttfb);
            feedback.report(Outcome::Success);
            Ok(Forwarded {
                reply,
                dep,
                ttfb,
                permit,
            })
        }
        Err(e) => {
            let retryable = e.retryable();
            // The detail (addresses, the HTTP library's text) goes to the log only.
            tracing::warn!(backend = %dep.label, retry = retryable, "upstream failed: {e}");
            let suspect = if maybe_the_requests_fault(&e) {
                Some(Suspect {
                    feedback,
                    dep: dep.clone(),
                })
            } else {
                feedback.report(e.outcome(Instant::now()));
                None
            };
            Err(Failed {
                error: ApiError::from_upstream(&dep.label, e),
                retryable,
                suspect,
            })
        }
    }
}

/// `body` with `model` replaced (if `model` is given), `priority` removed (if
/// `strip_priority`: it was the gateway's) and `top_k` (if `drop_top_k`), other fields and
/// their order kept.
fn rewrite(
    body: &[u8],
    model: Option<&str>,
    strip_priority: bool,
    drop_top_k: bool,
) -> Result<Bytes, ApiError> {
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    if let Some(model) = model {
        v.insert("model".into(), Value::String(model.to_owned()));
    }
    if strip_priority {
        v.shift_remove("priority");
    }
    if drop_top_k {
        v.shift_remove("top_k");
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(ApiError::invalid_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_keeps_order_and_unknown_fields() {
        let out = rewrite(
            br#"{"z":1,"model":"a","tools":[{"x":null}],"priority":5}"#,
            Some("b"),
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            br#"{"z":1,"model":"b","tools":[{"x":null}],"priority":5}"#
        );
        let out = rewrite(
            br#"{"model":"a","priority":"high","n":1}"#,
            None,
            true,
            false,
        )
        .unwrap();
        assert_eq!(&out[..], br#"{"model":"a","n":1}"#);
        let out = rewrite(br#"{"model":"a","top_k":5,"n":1}"#, None, false, true).unwrap();
        assert_eq!(&out[..], br#"{"model":"a","n":1}"#);
    }
}

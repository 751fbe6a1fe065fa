//! Phase 7, `forward`: runs one try on the deployment admission chose: starts its server if
//! the pool runs it (within the request's deadline, its slot held meanwhile so it cannot be
//! evicted), rewrites the body for the deployment (`model` renamed, the gateway's `priority`
//! removed; otherwise the client's bytes untouched), calls it, and feeds the outcome to the
//! deployment's breaker and latency estimate. It must not decide whether to try again (that
//! is `route`) nor answer the client (that is the pipeline and `error`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::parse::Parsed;
use crate::admission::Outcome;
use crate::error::ApiError;
use crate::orchestrator::Permit;
use crate::upstream::{Deployment, Reply};

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
            });
        }
    }
    let new_model = dep.upstream_model.as_deref().filter(|m| *m != req.model);
    // A Messages request's `top_k`: local servers take it, cloud APIs refuse it.
    let drop_top_k = dep.cloud && req.anthropic.as_ref().is_some_and(|a| a.top_k);
    let body = if new_model.is_some() || req.body_priority.is_some() || drop_top_k {
        rewrite(&req.body, new_model, drop_top_k).map_err(|error| Failed {
            error,
            retryable: false,
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
            feedback.report(e.outcome(Instant::now()));
            let retryable = e.retryable();
            tracing::warn!(backend = %dep.label, retry = retryable, "upstream failed: {e}");
            Err(Failed {
                error: ApiError::from_upstream(&dep.label, e),
                retryable,
            })
        }
    }
}

/// `body` with `model` replaced (if `model` is given), `priority` (and `top_k` if asked)
/// removed, other fields and their order kept.
fn rewrite(body: &[u8], model: Option<&str>, drop_top_k: bool) -> Result<Bytes, ApiError> {
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    if let Some(model) = model {
        v.insert("model".into(), Value::String(model.to_owned()));
    }
    v.shift_remove("priority");
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
            br#"{"z":1,"model":"a","tools":[{"x":null}]}"#,
            Some("b"),
            false,
        )
        .unwrap();
        assert_eq!(&out[..], br#"{"z":1,"model":"b","tools":[{"x":null}]}"#);
        let out = rewrite(br#"{"model":"a","priority":"high","n":1}"#, None, false).unwrap();
        assert_eq!(&out[..], br#"{"model":"a","n":1}"#);
        let out = rewrite(br#"{"model":"a","top_k":5,"n":1}"#, None, true).unwrap();
        assert_eq!(&out[..], br#"{"model":"a","n":1}"#);
    }
}

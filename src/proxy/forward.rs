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

use super::parse::Parsed;
use crate::admission::Outcome;
use crate::error::ApiError;
use crate::jsonspan::{member_key, top_level_members};
use crate::orchestrator::{Feedback, Permit};
use crate::upstream::{Deployment, Reply, UpstreamError};

/// How long the health check that settles an uncompared 5xx may take.
const SETTLE_PROBE_LIMIT: Duration = Duration::from_secs(2);

/// A successful try.
pub(crate) struct Forwarded {
    pub reply: Reply,
    pub dep: Arc<Deployment>,
    /// From sending to the first byte.
    pub ttfb: Duration,
    /// The slot: a stream holds it until its end.
    pub permit: Permit,
    /// The request went in the client's own API (its reply comes back in it).
    pub native: bool,
}

/// A failed try: the answer it would give, and whether another deployment could do better.
pub(crate) struct Failed {
    pub error: ApiError,
    pub retryable: bool,
    /// A 5xx answer not yet reported to the deployment's breaker.
    pub suspect: Option<Suspect>,
}

/// A deployment's 5xx answer to a request, held until it is known whose fault it was (see the
/// module doc). Dropped without [`Suspect::confirm`] or [`Suspect::settle`]: the request's
/// fault, nothing is reported.
pub(crate) struct Suspect {
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
    pub(crate) fn confirm(self) {
        self.feedback.report(Outcome::Failure);
    }

    /// Nothing to compare with: it counts only if the deployment's health check fails too.
    pub(crate) async fn settle(self) {
        let healthy = tokio::time::timeout(SETTLE_PROBE_LIMIT, self.dep.probe())
            .await
            .unwrap_or(false);
        if !healthy {
            tracing::warn!(backend = %self.dep.label, "5xx answer and failed health check");
            self.feedback.report(Outcome::Failure);
        }
    }
}

/// A 5xx answer that is not an overload signal (503, Anthropic's 529): the request may have
/// caused it.
fn maybe_the_requests_fault(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Status { status, .. }
        if status.is_server_error() && !matches!(status.as_u16(), 503 | 529))
}

/// Runs one try of `req` under `permit`; `start_by`: the latest a pool server may take to
/// start for it.
pub(crate) async fn forward(
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
    // A deployment that speaks the client's own API gets the request as the client sent it.
    let native = req.native.as_ref().filter(|n| dep.takes(n.endpoint));
    let (endpoint, body, strip_priority, cloud_drops) = match native {
        Some(n) => (n.endpoint, &n.body, n.strip_priority, &[][..]),
        // What the client's API says a cloud deployment refuses (a Messages request's `top_k`).
        None => (
            req.endpoint,
            &req.body,
            req.strip_priority,
            if dep.cloud { req.cloud_drops } else { &[] },
        ),
    };
    let body = if new_model.is_some() || strip_priority || !cloud_drops.is_empty() {
        rewrite(body, new_model, strip_priority, cloud_drops).map_err(|error| Failed {
            error,
            retryable: false,
            suspect: None,
        })?
    } else {
        body.clone()
    };
    let feedback = permit.feedback();
    let sent = Instant::now();
    match dep.call(endpoint, body, request_id, req.stream).await {
        Ok(reply) => {
            let ttfb = sent.elapsed();
            feedback.observe_ttfb(ttfb);
            feedback.report(Outcome::Success);
            Ok(Forwarded {
                reply,
                dep,
                ttfb,
                permit,
                native: native.is_some(),
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

/// `body` with `model`'s value replaced (if `model` is given), `priority` removed (if
/// `strip_priority`: it was the gateway's) and the fields in `drop`: edited in the raw
/// bytes, so that every other byte goes out as the client sent it (an integer beyond 2^53, a
/// number beyond `f64`, the spacing, the key order). `body` passed `parse` (a valid object).
fn rewrite(
    body: &[u8],
    model: Option<&str>,
    strip_priority: bool,
    drop: &[&str],
) -> Result<Bytes, ApiError> {
    let members = top_level_members(body)
        .ok_or_else(|| ApiError::invalid_json("the body is not a JSON object"))?;
    let dropped: Vec<bool> = members
        .iter()
        .map(|m| {
            let key = member_key(body, m);
            (strip_priority && key == "priority") || drop.contains(&key.as_ref())
        })
        .collect();
    // The members after the last one kept go with the comma before them; every other member
    // dropped goes with the comma after it.
    let last_kept = dropped.iter().rposition(|d| !d);
    let mut edits: Vec<(std::ops::Range<usize>, Option<&str>)> = Vec::new();
    for (i, m) in members.iter().enumerate() {
        if dropped[i] {
            match (last_kept, members.get(i + 1)) {
                (Some(k), Some(next)) if i < k => edits.push((m.key.start..next.key.start, None)),
                (Some(k), _) if i == k + 1 => {
                    let end = members.last().map_or(m.value.end, |l| l.value.end);
                    edits.push((members[k].value.end..end, None));
                }
                (None, _) if i == 0 => {
                    let end = members.last().map_or(m.value.end, |l| l.value.end);
                    edits.push((m.key.start..end, None));
                }
                _ => {}
            }
        } else if model.is_some() && member_key(body, m) == "model" {
            edits.push((m.value.clone(), model));
        }
    }
    let mut out = Vec::with_capacity(body.len() + model.map_or(0, str::len));
    let mut at = 0;
    for (range, with) in edits {
        out.extend_from_slice(&body[at..range.start]);
        if let Some(text) = with {
            serde_json::to_writer(&mut out, text).map_err(ApiError::invalid_json)?;
        }
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Bytes::from(out))
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
            &[],
        )
        .unwrap();
        assert_eq!(
            &out[..],
            br#"{"z":1,"model":"b","tools":[{"x":null}],"priority":5}"#
        );
        let out = rewrite(br#"{"model":"a","priority":"high","n":1}"#, None, true, &[]).unwrap();
        assert_eq!(&out[..], br#"{"model":"a","n":1}"#);
        let out = rewrite(br#"{"model":"a","top_k":5,"n":1}"#, None, false, &["top_k"]).unwrap();
        assert_eq!(&out[..], br#"{"model":"a","n":1}"#);
    }

    #[test]
    fn rewrite_touches_only_what_it_must() {
        // Every other byte as sent: big numbers, spacing, escapes, strings that look like keys.
        let body = br#"{ "seed" : 18446744073709551615, "x": [1e400, {"model": "in"}],
            "mod\u0065l":"a\"b", "s": "\"model\":1", "priority" : null ,"top_k":3}"#;
        let out = rewrite(body, Some("up/\"q\""), true, &["top_k"]).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "seed" : 18446744073709551615, "x": [1e400, {"model": "in"}],
            "mod\u0065l":"up/\"q\"", "s": "\"model\":1"}"#
        );
        // The last member removed takes the comma before it; the only one leaves `{}`.
        let out = rewrite(br#"{"model":"a","priority":"low"}"#, None, true, &[]).unwrap();
        assert_eq!(&out[..], br#"{"model":"a"}"#);
        let out = rewrite(br#"{"priority":"low"}"#, None, true, &[]).unwrap();
        assert_eq!(&out[..], br#"{}"#);
        let out = rewrite(
            br#"{"model":"a","priority":"low", "top_k":1}"#,
            None,
            true,
            &["top_k"],
        );
        assert_eq!(&out.unwrap()[..], br#"{"model":"a"}"#);
        let out = rewrite(
            br#"{"top_k":1,"priority":"low","n":2}"#,
            Some("b"),
            true,
            &["top_k"],
        );
        assert_eq!(&out.unwrap()[..], br#"{"n":2}"#);
        let out = rewrite(br#"{"top_k":1, "priority":"low"}"#, None, true, &["top_k"]);
        assert_eq!(&out.unwrap()[..], br#"{}"#);
        assert!(rewrite(b"[1]", Some("m"), false, &[]).is_err());
    }
}

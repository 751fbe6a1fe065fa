//! Phase 4, `limit`: the per-principal rate limits (requests and tokens per minute, requests
//! in flight, and a model's `rpm`/`tpm` per principal), before admission, so that a request
//! over its limit never takes a queue place or a slot. Tokens are charged with an estimate
//! before the call and corrected from the record's tokens when the request is over (a hook on
//! the [`Record`], which also frees the in-flight place). Every limited reply carries OpenAI's
//! `x-ratelimit-*` headers. The arithmetic is `limits`', the stores `quota`'s; statuses and
//! envelopes are `error`'s.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::authorize::Principal;
use super::observe::Record;
use super::parse::Parsed;
use crate::error::ApiError;
use crate::limits::{openai_duration, Denial, Dim, Status};
use crate::quota::{Limiter, Refusal};

const LIMIT_REQ: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQ: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQ: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOK: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOK: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOK: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// Charges `req` to `who`'s limits, or refuses it (429; 503 when the shared store is down and
/// `redis_failure = "closed"`). What it holds is given back when `rec` finishes.
pub async fn limit(
    limiter: &std::sync::Arc<Limiter>,
    who: &Principal,
    req: &Parsed,
    rec: &mut Record,
) -> Result<(), ApiError> {
    let Some(model) = limiter.model_index(&req.model) else {
        return Ok(());
    };
    let who_ix = who.index();
    let est = if limiter.counts_tokens(who_ix, model) {
        req.token_estimate()
    } else {
        Default::default()
    };
    let Some(plan) = limiter.plan(who_ix, model, est.total()) else {
        return Ok(());
    };
    let name = plan.name.clone();
    match limiter.acquire(plan, est.total()).await {
        Ok(grant) => {
            stamp(&mut rec.reply_headers, grant.requests, Dim::Requests);
            stamp(&mut rec.reply_headers, grant.tokens, Dim::Tokens);
            let l = limiter.clone();
            rec.on_finish(Box::new(move |fin| {
                // From `usage`; a stream without it: the prompt estimate and its content
                // chunks; nothing ran (an error before the upstream): nothing was used.
                let actual = fin.tokens.map_or(0, |t| {
                    let input = if t.estimated { est.prompt } else { t.input };
                    input.saturating_add(t.output)
                });
                l.settle(grant, Some(actual));
            }));
            Ok(())
        }
        Err(Refusal::Limited(d)) => {
            stamp_denial(&mut rec.reply_headers, &d);
            Err(ApiError::rate_limited(&d, &name))
        }
        Err(Refusal::Parallel(n)) => Err(ApiError::too_many_in_flight(n, &name)),
        Err(Refusal::Unavailable) => Err(ApiError::limits_unavailable()),
    }
}

/// The `x-ratelimit-*` headers of one dimension.
fn stamp(h: &mut HeaderMap, s: Option<Status>, dim: Dim) {
    let Some(s) = s else { return };
    let (l, r, t) = names(dim);
    h.insert(l, HeaderValue::from(s.limit));
    h.insert(r, HeaderValue::from(s.remaining));
    if let Ok(v) = HeaderValue::from_str(&openai_duration(s.reset_us)) {
        h.insert(t, v);
    }
}

/// The headers of the dimension that refused: nothing remains.
fn stamp_denial(h: &mut HeaderMap, d: &Denial) {
    let period = crate::limits::gcra::MINUTE_US as u128;
    let reset = (u128::from(d.used) * period / u128::from(d.limit.max(1))) as u64;
    stamp(
        h,
        Some(Status {
            limit: d.limit,
            remaining: 0,
            reset_us: reset.max(d.retry_after_us.unwrap_or(0)),
        }),
        d.dim,
    );
}

fn names(dim: Dim) -> (HeaderName, HeaderName, HeaderName) {
    match dim {
        Dim::Requests => (LIMIT_REQ, REMAINING_REQ, RESET_REQ),
        Dim::Tokens => (LIMIT_TOK, REMAINING_TOK, RESET_TOK),
    }
}

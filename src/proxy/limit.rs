//! Phase 4, `limit`: the per-principal rate limits (requests and tokens per minute, requests
//! in flight, and a model's `rpm`/`tpm`, all principals together), before admission, so that
//! a request over its limit never takes a queue place or a slot. Tokens are charged with an
//! estimate before the call and corrected from the record's tokens when the request is over (a
//! hook on the request's context, which also frees the in-flight place). Every limited reply carries OpenAI's
//! `x-ratelimit-*` headers. The arithmetic is `limits`', the stores `quota`'s; statuses and
//! envelopes are `error`'s.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::authorize::Principal;
use super::context::Ctx;
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
/// `redis_failure = "closed"`). What it holds is given back when `ctx` finishes; the reply's
/// `x-ratelimit-*` go into `headers`.
pub(crate) async fn limit(
    limiter: &std::sync::Arc<Limiter>,
    who: &Principal,
    req: &Parsed,
    ctx: &mut Ctx,
    headers: &mut HeaderMap,
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
    let start = std::time::Instant::now();
    let charged = limiter.acquire(plan, est.total()).await;
    ctx.limit_waited(start.elapsed());
    match charged {
        Ok(grant) => {
            stamp(headers, grant.requests, Dim::Requests);
            stamp(headers, grant.tokens, Dim::Tokens);
            let l = limiter.clone();
            ctx.on_finish(Box::new(move |fin| {
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
            stamp_denial(headers, &d);
            let limit = match d.dim {
                Dim::Requests => "requests",
                Dim::Tokens => "tokens",
            };
            ctx.rate_limited(limit);
            Err(ApiError::rate_limited(&d, &name))
        }
        Err(Refusal::Parallel(n)) => {
            ctx.rate_limited("parallel");
            Err(ApiError::too_many_in_flight(n, &name))
        }
        Err(Refusal::Unavailable) => Err(ApiError::limits_unavailable()),
    }
}

const LIMIT_BUDGET: HeaderName = HeaderName::from_static("x-ratelimit-limit-budget");
const REMAINING_BUDGET: HeaderName = HeaderName::from_static("x-ratelimit-remaining-budget");
const RESET_BUDGET: HeaderName = HeaderName::from_static("x-ratelimit-reset-budget");
const LIMIT_BUDGET_TOK: HeaderName = HeaderName::from_static("x-ratelimit-limit-budget-tokens");
const REMAINING_BUDGET_TOK: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-budget-tokens");
const RESET_BUDGET_TOK: HeaderName = HeaderName::from_static("x-ratelimit-reset-budget-tokens");

/// Refuses a request of a key that has spent its `budget` or `token_budget` (429
/// `insufficient_quota`); a budgeted key's replies carry `x-ratelimit-*-budget[-tokens]`
/// (limit, remaining, seconds to the reset). Enforced here, at admission: a request that
/// starts under budget may finish over it.
pub(crate) fn budget(
    budgets: &crate::budget::Budgets,
    who: &Principal,
    ctx: &mut Ctx,
    headers: &mut HeaderMap,
) -> Result<(), ApiError> {
    let Some(key) = who.name() else {
        return Ok(());
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(standing) = budgets.standing(key, now) else {
        return Ok(());
    };
    let names = [
        (LIMIT_BUDGET, REMAINING_BUDGET, RESET_BUDGET),
        (LIMIT_BUDGET_TOK, REMAINING_BUDGET_TOK, RESET_BUDGET_TOK),
    ];
    for (left, (l, r, t)) in standing.left.into_iter().zip(names) {
        let Some((limit, remaining, ends)) = left else {
            continue;
        };
        let num = |v: f64| HeaderValue::from_str(&format!("{}", (v * 1e6).round() / 1e6));
        if let (Ok(lv), Ok(rv)) = (num(limit), num(remaining)) {
            headers.insert(l, lv);
            headers.insert(r, rv);
        }
        if let Some(end) = ends {
            headers.insert(t, HeaderValue::from(end.saturating_sub(now)));
        }
    }
    match standing.over {
        None => Ok(()),
        Some(o) => {
            ctx.rate_limited(if o.tokens { "token_budget" } else { "budget" });
            Err(ApiError::over_budget(&o, key, now))
        }
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

/// The CPU a keyed, rate-limited request adds with the memory store, measured by
/// `bench/limits.sh` (release mode) and recorded in docs/benchmarks.md: a benchmark, not a
/// test (it asserts nothing of time). Both loops run the same phases on the same request
/// (authenticate, authorize, limit, the record's finish with its metrics); the keyed one has a
/// key with `rpm`, `tpm` and `max_parallel`, so it hashes the key, estimates the tokens, charges
/// three buckets and settles them when the record finishes.
#[cfg(test)]
mod bench {
    use std::sync::Arc;
    use std::time::Instant;

    use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
    use bytes::Bytes;

    use crate::config::Config;
    use crate::proxy::authorize::{authorize, digest, Auth};
    use crate::proxy::context::Ctx;
    use crate::proxy::observe::{Observer, Reason, Tokens};
    use crate::proxy::parse::Parsed;
    use crate::quota::Limiter;
    use crate::upstream::Endpoint;

    const SECRET: &str = "sk-mofa-bench-0123456789abcdef";
    const BODY: &[u8] =
        br#"{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;

    fn parsed() -> Parsed {
        Parsed {
            endpoint: Endpoint::ChatCompletions,
            model: "mofa-sim".into(),
            stream: false,
            body_priority: None,
            strip_priority: false,
            header_priority: None,
            default_priority: None,
            max_priority: None,
            max_wait: None,
            body: Bytes::from_static(BODY),
            cloud_drops: &[],
            reply: None,
            local: None,
            native: None,
            session: None,
        }
    }

    /// ns of CPU per request through the phases with `config`, the median of 7 rounds.
    async fn cost(config: &str) -> f64 {
        let cfg = Config::parse(config, &|_| None).expect("bench config");
        let limiter = Arc::new(Limiter::build(&cfg).await);
        let auth = Auth::build(&cfg, &|n| limiter.key_index(n));
        let obs = Arc::new(Observer::new(&["mofa-sim".to_string()]));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap(),
        );
        let mut rounds = Vec::new();
        for round in 0..8 {
            let n = 20_000;
            let start = crate::benchclock::thread_cpu_ns();
            for _ in 0..n {
                let who = auth.authenticate(std::hint::black_box(&h)).unwrap();
                let mut req = parsed();
                let mut ctx = Ctx::new(
                    obs.clone(),
                    HeaderValue::from_static("r"),
                    Instant::now(),
                    None,
                );
                let mut headers = HeaderMap::new();
                authorize(&who, &mut req, &mut ctx, &mut headers).unwrap();
                super::limit(&limiter, &who, &req, &mut ctx, &mut headers)
                    .await
                    .unwrap();
                ctx.sent(
                    0,
                    Some(Tokens {
                        input: 9,
                        output: 16,
                        estimated: false,
                    }),
                );
                ctx.finish(StatusCode::OK, Reason::Ok);
            }
            if round > 0 {
                rounds.push((crate::benchclock::thread_cpu_ns() - start) as f64 / n as f64);
            }
        }
        rounds.sort_by(f64::total_cmp);
        rounds[3]
    }

    #[tokio::test(flavor = "current_thread")]
    #[ignore = "benchmark: bench/limits.sh runs it in release mode"]
    async fn memory_store_cost_per_request() {
        let model = "[[models]]\nname = \"mofa-sim\"\n[[models.deployments]]\nkind = \"local\"\nurl = \"http://127.0.0.1:9/v1\"\n";
        let hex: String = digest(SECRET).iter().map(|b| format!("{b:02x}")).collect();
        let keyed = format!(
            "[auth]\nmode = \"keys\"\n[[auth.keys]]\nname = \"bench\"\nhash = \"sha256:{hex}\"\nrpm = 1000000000\ntpm = 1000000000\nmax_parallel = 1000000\n\n{model}"
        );
        // Interleaved, so that a drift of the machine hits both alike.
        let (mut plain, mut limited) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            plain.push(cost(model).await);
            limited.push(cost(&keyed).await);
        }
        plain.sort_by(f64::total_cmp);
        limited.sort_by(f64::total_cmp);
        println!("limit phase, thread CPU ns per request (median of 3 runs x 7 rounds x 20000 requests):");
        println!("  unkeyed (no [auth]):                 {:.0} ns", plain[1]);
        println!(
            "  keyed, rpm + tpm + max_parallel:     {:.0} ns",
            limited[1]
        );
        println!(
            "  added by keys and limits (memory):   {:.0} ns",
            limited[1] - plain[1]
        );
    }
}

//! The admin routes: `/admin/orchestrator` (queues, slots, memory, counters, rate-limit store
//! and principals by name), `/admin/pool` and a pool model's `load` / `unload`, `/admin/reload`,
//! `/admin/usage` (a report of the usage ledger),
//! all behind [`guard`] (an admin key when `auth.mode = "keys"`). Views only, the pool's two
//! commands and the reload; it must not change admission state otherwise, nor show a key or
//! its hash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{json_ok, AppState};
use crate::error::ApiError;
use crate::pool::STOP_GRACE;
use crate::usage::{Format, Query};

/// Lets a request through to `/admin/*` only with an admin key (when keys are required).
pub(super) async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match st.pipeline.admin_allowed(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Reads the config file again and puts it into effect: 200 with what changed, 400
/// `invalid_config` with the key at fault, 409 `reload_refused` (a key that needs a restart,
/// or no file); in both refusals nothing changed.
pub(super) async fn reload(State(st): State<Arc<AppState>>) -> Response {
    match st.reload().await {
        Ok(v) => json_ok(v),
        Err(e) => e.into_response(),
    }
}

/// `GET /admin/usage?from=&to=&key=&model=&group_by=&format=`: a report of the usage ledger
/// (JSON by default, `csv` as a download, `table` as text). 400 naming a parameter it cannot
/// read, 404 `usage_ledger_off` without a ledger, 503 when the store does not answer.
pub(super) async fn usage(State(st): State<Arc<AppState>>, RawQuery(raw): RawQuery) -> Response {
    let raw = raw.unwrap_or_default();
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .take(32)
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let parsed = Query::from_params(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())), now);
    let (q, format) = match parsed {
        Ok(v) => v,
        Err((param, message)) => return ApiError::invalid_value(param, message).into_response(),
    };
    let Some(report) = st.pipeline.usage_report(q) else {
        return ApiError::usage_off().into_response();
    };
    let report = match report.await {
        Ok(r) => r,
        Err(e) => return ApiError::usage_unavailable(e).into_response(),
    };
    let body = report.render(format);
    match format {
        Format::Json => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Format::Csv => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"usage.csv\"",
                ),
            ],
            body,
        )
            .into_response(),
        Format::Table => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
        }
    }
}

pub(super) async fn orchestrator(State(st): State<Arc<AppState>>) -> Response {
    json_ok(st.pipeline.admin_view())
}

pub(super) async fn pool(State(st): State<Arc<AppState>>) -> Response {
    json_ok(st.pipeline.pool_view())
}

/// Loads a pool model now (at `normal` priority for memory), and waits until it is ready.
pub(super) async fn load(
    State(st): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Response {
    let name = pool_name(name, &uri);
    let memory = st.pipeline.memory();
    let Some((id, p)) = memory.managed(&name) else {
        return ApiError::unknown_pool_model(&name).into_response();
    };
    if let Some(Err(r)) = memory.load(&name) {
        return ApiError::rejected(r, &name).into_response();
    }
    let deadline = Instant::now() + p.startup_timeout();
    match p.ensure_ready(deadline).await {
        Ok(()) => json_ok(memory.process_snapshot(id, &p)),
        Err(e) => ApiError::from_start(&name, e).into_response(),
    }
}

/// Stops a pool model that has no request in flight.
pub(super) async fn unload(
    State(st): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Response {
    let name = pool_name(name, &uri);
    let memory = st.pipeline.memory();
    let Some((id, p)) = memory.managed(&name) else {
        return ApiError::unknown_pool_model(&name).into_response();
    };
    if let Some(Err(_)) = memory.unload(&name) {
        return ApiError::model_busy(&name).into_response();
    }
    p.wait_stopped(STOP_GRACE + Duration::from_secs(1)).await;
    json_ok(memory.process_snapshot(id, &p))
}

/// The pool model a path names; one that does not decode (`%ff`) names none, and is quoted as
/// sent (it then gets 404 `unknown_pool_model`, as any unknown name).
fn pool_name(name: Result<Path<String>, PathRejection>, uri: &Uri) -> String {
    match name {
        Ok(Path(n)) => n,
        Err(_) => uri
            .path()
            .trim_start_matches("/admin/pool/")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

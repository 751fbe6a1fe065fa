//! The operator's views: `GET /metrics` (Prometheus text format), the status page `GET /` and
//! `GET /status` (one self-contained HTML file, compiled in: no build step, no CDN), and the
//! JSON it polls every second, `GET /status.json`. Views only: they read the orchestrator's
//! and the pool's snapshots and the observer's metrics, and change nothing (the page's
//! load/unload buttons call the admin routes).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{json_ok, AppState};

/// The status page.
const PAGE: &str = include_str!("status.html");

pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let orch = &st.pipeline.orch;
    let text = st
        .pipeline
        .observer
        .metrics
        .render(&orch.snapshot(), &orch.pool_snapshot());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub async fn status_json(State(st): State<Arc<AppState>>) -> Response {
    let p = &st.pipeline;
    let snap = p.orch.snapshot();
    let metrics = &p.observer.metrics;
    let models: Vec<Value> = snap["models"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, m)| {
            let mut m = m.clone();
            m["name"] = json!(name);
            m["last_minute"] = metrics.last_minute(name);
            m
        })
        .collect();
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json_ok(json!({
        "now_unix": now_unix,
        "started_unix": st.created,
        "shutting_down": p.is_shutting_down(),
        "models": models,
        "memory": snap["memory"],
        "pool": p.orch.pool_snapshot()["models"],
        "counters": p.observer.snapshot(),
        "chart": metrics.chart(),
    }))
}

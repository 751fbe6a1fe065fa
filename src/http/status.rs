//! The operator's views: `GET /metrics` (Prometheus text format), the status page `GET /` and
//! `GET /status` (one self-contained HTML file, compiled in: no build step, no CDN), and the
//! JSON it polls every second, `GET /status.json`. Views only: they ask the pipeline for its
//! snapshots and metrics, and change nothing (the page's
//! load/unload buttons call the admin routes).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{json_ok, AppState};

/// The status page.
const PAGE: &str = include_str!("status.html");

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

pub(super) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.pipeline.metrics_text(),
    )
        .into_response()
}

pub(super) async fn status_json(State(st): State<Arc<AppState>>) -> Response {
    let mut v = st.pipeline.status_view();
    v["now_unix"] = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .into();
    json_ok(v)
}

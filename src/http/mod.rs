//! The HTTP surface: the axum router, the routes' handlers, the layer that stamps every
//! response, and the operator's views (`admin`; `status`: metrics and the status page). It
//! parses nothing itself and contains no retry loop: a proxied request goes through the
//! [`Pipeline`]; errors become responses in `error`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::anthropic::Messages;
use crate::config::Config;
use crate::error::ApiError;
use crate::orchestrator::BuildError;
use crate::proxy::accept::{accept, Accepted};
use crate::proxy::Pipeline;
use crate::reload::{stamps, Source, Stamp};
use crate::upstream::Endpoint;
use crate::wire::openai::OpenAi;
use crate::wire::ClientApi;

mod admin;
mod stamp;
mod status;

/// What every handler shares. The configuration in it changes only by a reload (see
/// [`AppState::reload`]).
pub(crate) struct AppState {
    pipeline: Pipeline,
    /// Where a reload reads the configuration from (`None`: the gateway was given a config,
    /// not a file, and a reload has nothing to read).
    source: Option<Source>,
    /// One reload at a time (from the file's reading to the swap).
    reloading: tokio::sync::Mutex<()>,
    /// The identity of the watched files when they were last read (`--watch` compares).
    read_stamps: std::sync::Mutex<Vec<Option<Stamp>>>,
}

impl AppState {
    /// Builds the runtime state from a validated config, starting in-process simulators.
    pub(crate) async fn build(
        cfg: &Config,
        source: Option<Source>,
    ) -> Result<AppState, BuildError> {
        let state = AppState {
            pipeline: Pipeline::build(cfg).await?,
            source,
            reloading: tokio::sync::Mutex::new(()),
            read_stamps: std::sync::Mutex::new(Vec::new()),
        };
        let now = stamps(&state.watched_files()).await;
        state.set_read_stamps(now);
        Ok(state)
    }

    /// Reads the config file again and puts it into effect (`SIGHUP`, `POST /admin/reload`,
    /// `--watch`): the answer names what changed; an invalid file, or one that changes what
    /// only a restart can, changes nothing and says why. One log line either way (names,
    /// never secrets).
    pub(crate) async fn reload(&self) -> Result<Value, ApiError> {
        let _one = self.reloading.lock().await;
        let Some(source) = self.source.clone() else {
            return Err(ApiError::reload_refused(
                "the gateway was started without a config file (--config): there is nothing to \
                 reload",
            ));
        };
        // The files' identity before they are read: a change after this is a change to read.
        let now = stamps(&self.watched_files()).await;
        self.set_read_stamps(now);
        let path = source.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let mut cfg = match loaded {
            Ok(Ok(cfg)) => cfg,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "config reload: invalid file; the running config stays");
                self.pipeline.reload_invalid();
                return Err(ApiError::invalid_config(e));
            }
            Err(e) => {
                return Err(ApiError::reload_refused(format!(
                    "cannot read the file: {e}"
                )))
            }
        };
        if let Some(listen) = source.listen {
            cfg.server.listen = listen;
        }
        let started = std::time::Instant::now();
        match self.pipeline.reload(cfg).await {
            Ok(diff) => {
                let hash = self.pipeline.config_view()["hash"].clone();
                let summary = diff.describe();
                tracing::info!(hash = %hash, ms = started.elapsed().as_millis() as u64, "config reloaded: {summary}");
                Ok(json!({"status": "reloaded", "hash": hash, "summary": summary, "changed": diff}))
            }
            Err(e) => {
                tracing::warn!("config reload refused: {e}");
                Err(ApiError::reload_refused(e))
            }
        }
    }

    /// The watched files' identity when they were last read.
    pub(crate) fn read_stamps(&self) -> Vec<Option<Stamp>> {
        self.read_stamps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_read_stamps(&self, now: Vec<Option<Stamp>>) {
        *self.read_stamps.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// The files a reload reads: the config file and its `keys_file` (as the config in
    /// effect names it), for `--watch`.
    pub(crate) fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let Some(source) = &self.source else {
            return Vec::new();
        };
        let mut files = vec![source.path.clone()];
        if let Some(keys) = self.pipeline.keys_file() {
            let dir = source.path.parent().unwrap_or(std::path::Path::new("."));
            files.push(dir.join(keys));
        }
        files
    }

    /// Shutdown begins: `/readyz` answers 503, new and queued requests get 503 `shutting_down`.
    pub(crate) fn begin_shutdown(&self) {
        self.pipeline.begin_shutdown();
    }

    /// Stops the model servers the gateway runs (at exit).
    pub(crate) async fn stop_models(&self) {
        self.pipeline.stop_models().await;
        self.pipeline.close_usage().await;
    }
}

/// What the server serves: a proxied request (`POST` to one of the [`ROUTES`]) goes
/// straight to its handler under the stamp layer (the same code the router runs for it,
/// without the router's layers of boxed futures, a few thousand instructions a request);
/// every other request goes through [`router`], which also has those routes.
#[derive(Clone)]
pub(crate) struct App {
    router: Router,
    state: Arc<AppState>,
}

/// The future of one request to [`App`].
pub(crate) type AppFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Infallible>> + Send>>;

/// One proxied route: its path (`POST`), the endpoint it runs, the API its clients speak.
pub(crate) struct Route {
    pub path: &'static str,
    pub endpoint: Endpoint,
    pub client: &'static dyn ClientApi,
}

/// Every proxied route: the one table the hot path ([`App`]), the [`router`] and the stamp
/// layer (which API reads a path's errors, [`client_of`]) are made from. A new client API is
/// a module and its rows here.
pub(crate) static ROUTES: &[Route] = &[
    Route {
        path: "/v1/chat/completions",
        endpoint: Endpoint::ChatCompletions,
        client: &OpenAi,
    },
    Route {
        path: "/v1/completions",
        endpoint: Endpoint::Completions,
        client: &OpenAi,
    },
    Route {
        path: "/v1/embeddings",
        endpoint: Endpoint::Embeddings,
        client: &OpenAi,
    },
    Route {
        path: "/v1/messages",
        endpoint: Endpoint::ChatCompletions,
        client: &Messages { count: false },
    },
    Route {
        path: "/v1/messages/count_tokens",
        endpoint: Endpoint::ChatCompletions,
        client: &Messages { count: true },
    },
];

/// The proxied route of a request, if it is one.
fn route_of(method: &Method, path: &str) -> Option<&'static Route> {
    if method != Method::POST {
        return None;
    }
    ROUTES.iter().find(|r| r.path == path)
}

/// The API whose clients read the errors of `path`: its route's, or (for a path under a
/// route, `/v1/messages/x`) the longest route it lies under; OpenAI's otherwise.
pub(crate) fn client_of(path: &str) -> &'static dyn ClientApi {
    ROUTES
        .iter()
        .filter(|r| {
            path.strip_prefix(r.path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .max_by_key(|r| r.path.len())
        .map_or(&OpenAi, |r| r.client)
}

impl App {
    pub(crate) fn new(state: Arc<AppState>) -> App {
        App {
            router: router(state.clone()),
            state,
        }
    }

    pub(crate) fn state(&self) -> &Arc<AppState> {
        &self.state
    }
}

impl hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for App {
    type Response = Response;
    type Error = Infallible;
    type Future = AppFuture;

    fn call(&self, req: axum::http::Request<hyper::body::Incoming>) -> AppFuture {
        let req = req.map(axum::body::Body::new);
        match route_of(req.method(), req.uri().path()) {
            Some(route) => {
                let st = self.state.clone();
                Box::pin(async move {
                    Ok(
                        stamp::stamp_with(req, route.client, move |req| proxy(st, route, req))
                            .await,
                    )
                })
            }
            None => Box::pin(tower_service::Service::call(&mut self.router.clone(), req)),
        }
    }
}

/// The gateway's router.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let admin = Router::new()
        .route("/admin/orchestrator", get(admin::orchestrator))
        .route("/admin/pool", get(admin::pool))
        .route("/admin/pool/{name}/load", post(admin::load))
        .route("/admin/pool/{name}/unload", post(admin::unload))
        .route("/admin/reload", post(admin::reload))
        .route("/admin/usage", get(admin::usage))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::guard,
        ));
    let mut r = Router::new();
    for route in ROUTES {
        r = r.route(
            route.path,
            post(move |State(st): State<Arc<AppState>>, req: Request| proxy(st, route, req)),
        );
    }
    r.route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route(
            "/healthz",
            get(|| async { json_ok(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/", get(status::page))
        .route("/status", get(status::page))
        .route("/status.json", get(status::status_json))
        .route("/metrics", get(status::metrics))
        .merge(admin)
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(stamp::stamp))
        .with_state(state)
}

pub(crate) fn json_ok(v: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&v).unwrap_or_default(),
    )
        .into_response()
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    client_of(uri.path()).error(ApiError::unknown_url(method.as_str(), uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    client_of(uri.path()).error(ApiError::method_not_allowed(method.as_str(), uri.path()))
}

/// The models the caller may use (with keys: its allow-list; 401 without a known key).
async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match st.pipeline.list_models(&headers) {
        Ok(body) => json_bytes(body),
        Err(e) => e.into_response(),
    }
}

/// One model, if it exists and the caller may use it (404 otherwise, as OpenAI); an id that
/// does not decode (`%ff`) names no model: 404 too.
async fn get_model(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Response {
    let raw = uri.path().strip_prefix("/v1/models/").unwrap_or(uri.path());
    let id = match &id {
        Ok(Path(id)) => Ok(id.as_str()),
        Err(_) => Err(raw),
    };
    match st.pipeline.get_model(&headers, id) {
        Ok(body) => json_bytes(body),
        Err(e) => e.into_response(),
    }
}

/// Ready unless shutting down (see [`Pipeline::readiness`]).
async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    match st.pipeline.readiness() {
        Ok(v) => json_ok(v),
        Err(e) => e.into_response(),
    }
}

fn json_bytes(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A proxied request: through the pipeline.
async fn proxy(st: Arc<AppState>, route: &'static Route, req: Request) -> Response {
    let accepted = match req.extensions().get::<Accepted>() {
        Some(a) => a.clone(),
        None => accept(req.headers()),
    };
    st.pipeline
        .handle(route.path, route.endpoint, route.client, &accepted, req)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// Shutdown begun (the listener closed, connections still open): `/readyz` says so, and a
    /// request that is not admitted yet gets 503 `shutting_down` with `retry-after`. Only the
    /// app in process can see this: once serving stops, no new request reaches it.
    #[tokio::test]
    async fn readyz_turns_503_and_new_requests_are_refused_once_shutdown_begins() {
        let state = Arc::new(
            AppState::build(&Config::default_config(), None)
                .await
                .unwrap(),
        );
        let app = router(state.clone());
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let resp = app.clone().oneshot(get("/readyz")).await.unwrap();
        assert_eq!(resp.status(), 200);

        state.begin_shutdown();
        let resp = app.clone().oneshot(get("/readyz")).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-mofa-reject-reason"], "shutting_down");
        let resp = app.clone().oneshot(get("/healthz")).await.unwrap();
        assert_eq!(resp.status(), 200, "still alive while draining");
        let body = r#"{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}]}"#;
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-mofa-reject-reason"], "shutting_down");
        assert!(resp.headers().contains_key("retry-after"));
    }
}

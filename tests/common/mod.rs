//! Shared helpers for the integration tests: start simulators and gateways on ephemeral
//! loopback ports, and check the headers every gateway response must carry.

#![allow(dead_code)]

use std::net::SocketAddr;

use mofa_gateway::config::Config;
use mofa_gateway::server::Gateway;
use mofa_gateway::sim::SimOptions;
use serde_json::Value;

/// Starts a simulator in this process; returns its base URL (`http://127.0.0.1:P/v1`).
pub async fn sim(opts: SimOptions) -> String {
    let addr = mofa_gateway::sim::spawn_local(opts).await.unwrap();
    format!("http://{addr}/v1")
}

/// Simulator options serving `model` with no pacing.
pub fn sim_opts(model: &str) -> SimOptions {
    SimOptions {
        models: vec![model.to_string()],
        ..Default::default()
    }
}

/// Starts a gateway for the TOML `config`; `env` supplies `${VAR}`s. Returns its address.
pub async fn gateway_env(config: &str, env: &[(&str, &str)]) -> SocketAddr {
    let cfg = Config::parse(config, &|k| {
        env.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap_or_else(|e| panic!("bad test config: {e}\n{config}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::build(&cfg, listener)
        .await
        .unwrap()
        .spawn()
        .unwrap()
}

pub async fn gateway(config: &str) -> SocketAddr {
    gateway_env(config, &[]).await
}

/// A config with one model `name` served by one local deployment at `url`, plus `extra`
/// lines appended to the deployment table.
pub fn one_model(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\n[[models.deployments]]\nkind = \"local\"\nurl = \"{url}\"\n{extra}\n"
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 5,
        "stream": stream,
    })
}

/// POSTs JSON to the gateway at `addr`.
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("http://{addr}{path}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Asserts the headers every response carries; returns `x-mofa-backend`.
pub fn assert_stamped(resp: &reqwest::Response) -> String {
    let h = resp.headers();
    let rid = h
        .get("x-request-id")
        .expect("x-request-id")
        .to_str()
        .unwrap();
    assert!(!rid.is_empty());
    let ms: f64 = h
        .get("x-mofa-latency-ms")
        .expect("x-mofa-latency-ms")
        .to_str()
        .unwrap()
        .parse()
        .expect("x-mofa-latency-ms is a number");
    assert!((0.0..60_000.0).contains(&ms), "latency {ms}");
    h.get("x-mofa-backend")
        .expect("x-mofa-backend")
        .to_str()
        .unwrap()
        .to_string()
}

/// The `Retry-After` of a response, checked to be a whole number of seconds in [1, 60].
pub fn retry_after(resp: &reqwest::Response) -> u64 {
    let ra: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is a whole number of seconds");
    assert!((1..=60).contains(&ra), "Retry-After {ra}");
    ra
}

/// The ids of a `GET /v1/models` list, in order.
pub fn model_ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Reads an error reply and checks the envelope: returns `error` (message, type, param, code).
pub async fn envelope(resp: reqwest::Response) -> Value {
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(ct.as_deref(), Some("application/json"));
    let v: Value = resp.json().await.expect("error body is JSON");
    let e = v.get("error").expect("envelope has `error`").clone();
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "envelope lacks {key}: {v}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    e
}

/// Splits an SSE body into its events' `data:` payloads, and says whether any event was named `error`.
pub fn sse_events(body: &str) -> (Vec<String>, bool) {
    let mut data = Vec::new();
    let mut named_error = false;
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        for line in event.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.trim().to_string());
            } else if line.trim() == "event: error" {
                named_error = true;
            }
        }
    }
    (data, named_error)
}

/// GETs `url` and parses its JSON body.
pub async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The gateway's admin view `path` (`orchestrator`, `pool`).
pub async fn admin(gw: SocketAddr, path: &str) -> Value {
    get_json(&format!("http://{gw}/admin/{path}")).await
}

/// The simulator's counters.
pub async fn sim_stats(sim_url: &str) -> Value {
    get_json(&format!("{}/sim/stats", sim_url.trim_end_matches("/v1"))).await
}

/// The last request the simulator received.
pub async fn sim_last_request(sim_url: &str) -> Value {
    get_json(&format!(
        "{}/sim/last_request",
        sim_url.trim_end_matches("/v1")
    ))
    .await
}

/// The `mofa-gateway` binary, killed when dropped (the test passes or fails).
pub struct Binary(pub std::process::Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the binary with `args`; returns it and the URL it printed (`... listening on URL`).
pub fn run_binary(args: &[&str]) -> (Binary, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "printed {line:?}");
    (Binary(child), url)
}

/// Runs `mofa-gateway serve` on `config` (written to a temporary file); returns it and its address.
pub fn run_gateway_binary(config: &str) -> (Binary, SocketAddr) {
    let file = std::env::temp_dir().join(format!(
        "mofa-test-{}-{}.toml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&file, config).unwrap();
    let (bin, url) = run_binary(&[
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let _ = std::fs::remove_file(&file);
    (bin, url.trim_start_matches("http://").parse().unwrap())
}

/// A loopback URL on which nothing listens.
pub async fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/v1")
}

/// An upstream that answers every request with this status, content type and body.
pub async fn fixed_upstream(status: u16, content_type: &'static str, body: &'static str) -> String {
    use axum::http::StatusCode;
    let app = axum::Router::new().fallback(move || async move {
        (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", content_type)],
            body,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

/// What a [`toggle_upstream`] answers.
pub const OK: u8 = 0;
pub const FAIL_500: u8 = 1;
pub const BUSY_429: u8 = 2;

/// An upstream whose behaviour the test switches: `OK` (a chat completion), `FAIL_500`, or
/// `BUSY_429` (with `Retry-After: 2`). Returns its URL, the switch and a hit counter.
pub async fn toggle_upstream() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicU8>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    use std::sync::Arc;
    let mode = Arc::new(AtomicU8::new(OK));
    let hits = Arc::new(AtomicU64::new(0));
    let (m, h) = (mode.clone(), hits.clone());
    let app = axum::Router::new().fallback(move || {
        let (m, h) = (m.clone(), h.clone());
        async move {
            use axum::response::IntoResponse;
            h.fetch_add(1, Ordering::SeqCst);
            match m.load(Ordering::SeqCst) {
                OK => (
                    [("content-type", "application/json")],
                    r#"{"id":"t","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#,
                )
                    .into_response(),
                FAIL_500 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
                _ => (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "2"), ("content-type", "application/json")],
                    r#"{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}"#,
                )
                    .into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), mode, hits)
}

/// A model `m` that is local first (at `local`), with a cloud fallback (at `cloud`).
pub fn local_then_cloud(local: &str, cloud: &str, top: &str) -> String {
    format!(
        "{top}\n[[models]]\nname = \"m\"\npolicy = \"local-first\"\n\
         [[models.deployments]]\nkind = \"local\"\nurl = \"{local}\"\n\
         [[models.deployments]]\nkind = \"cloud\"\nprovider = \"backup\"\nurl = \"{cloud}\"\n"
    )
}

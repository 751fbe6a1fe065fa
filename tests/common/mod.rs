//! The one harness of the integration tests. It owns: starting simulators and gateways on
//! ephemeral loopback ports (in process, or as the real binary), every HTTP request a test sends
//! (JSON posts with custom headers, raw bodies, GETs, raw TCP bytes), reading SSE bodies, the
//! checks every gateway reply must pass, and [`eventually`], the only way a test waits for
//! something it can observe. It must not: reach anything beyond 127.0.0.1, sleep to synchronise,
//! or use gateway internals beyond `config::Config`, `server::Gateway` and `sim`.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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

/// A gateway whose model `busy` has one slot and no queue, in front of a sim that streams
/// 10 tokens a second: while one request holds the slot, every other is rejected at once.
pub async fn busy_gateway() -> SocketAddr {
    let slow = sim(SimOptions {
        tokens_per_sec: 10.0,
        ..sim_opts("busy")
    })
    .await;
    gateway(&format!(
        "[admission]\nmax_queue = 0\n{}",
        one_model("busy", &slow, "max_concurrency = 1")
    ))
    .await
}

/// A config with one model `name` served by one local deployment at `url`, plus `extra`
/// lines appended to the deployment table.
pub fn one_model(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\n[[models.deployments]]\nkind = \"local\"\nurl = \"{url}\"\n{extra}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Waiting.

/// Polls `cond` until it holds; panics naming `what` if it still does not after `timeout`.
/// This is how a test waits for anything it can observe (a request in flight, a queue filled,
/// a counter reached, a process gone): never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(what, timeout, || {
        let f = cond();
        async move { f.await.then_some(()) }
    })
    .await
}

/// Like [`eventually`], for a condition that yields a value once it holds: returns that value.
pub async fn eventually_some<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if Instant::now() >= end {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The usual bound of an [`eventually`]: generous, since the machine may be busy; a condition
/// that holds returns at once.
pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Requests.

/// A client for one request (never shared between tests: each test has its own runtime).
fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn with_headers(
    mut req: reqwest::RequestBuilder,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// A chat body for `model`: one user message, 5 tokens.
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
    post_with(addr, path, body, &[]).await
}

/// POSTs JSON with extra request headers (`x-mofa-priority`, `authorization`, ...).
pub async fn post_with(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    with_headers(client().post(format!("http://{addr}{path}")), headers)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// POSTs a body as given (bytes, a string or a `reqwest::Body` stream), with `content_type`
/// if any: for malformed, oversized or non-JSON requests.
pub async fn post_raw(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = client().post(format!("http://{addr}{path}")).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    req.send().await.unwrap()
}

/// POST with an empty body, e.g. the admin actions `/admin/pool/NAME/load`.
pub async fn post_empty(addr: SocketAddr, path: &str) -> reqwest::Response {
    client()
        .post(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap()
}

/// POSTs `body` to `/v1/chat/completions`.
pub async fn chat(addr: SocketAddr, body: &Value) -> reqwest::Response {
    post(addr, "/v1/chat/completions", body).await
}

/// POSTs `body` to `/v1/chat/completions` with extra request headers.
pub async fn chat_with(
    addr: SocketAddr,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    post_with(addr, "/v1/chat/completions", body, headers).await
}

/// POSTs `body` to `/v1/completions`.
pub async fn completions(addr: SocketAddr, body: &Value) -> reqwest::Response {
    post(addr, "/v1/completions", body).await
}

/// POSTs `body` to `/v1/embeddings`.
pub async fn embeddings(addr: SocketAddr, body: &Value) -> reqwest::Response {
    post(addr, "/v1/embeddings", body).await
}

/// GETs `path` from the gateway at `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> reqwest::Response {
    get_with(addr, path, &[]).await
}

/// GETs `path` with extra request headers.
pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    with_headers(client().get(format!("http://{addr}{path}")), headers)
        .send()
        .await
        .unwrap()
}

/// The address of a base URL such as `http://127.0.0.1:P` or `http://127.0.0.1:P/v1`.
pub fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Opens a TCP connection to `addr` and writes `bytes` as they are: for tests of what an HTTP
/// client library would not send (headers or bodies that never end).
pub async fn raw_http(addr: SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp
}

/// Whether `addr` accepts a new TCP connection.
pub async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

// ---------------------------------------------------------------------------------------------
// Replies.

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

/// A streamed reply read to its end.
pub struct Sse {
    /// The whole body, for failure messages.
    pub text: String,
    /// Each event's `data:` payload, in order.
    pub data: Vec<String>,
    /// Whether any event was named `error`.
    pub named_error: bool,
}

impl Sse {
    /// Whether the stream ended normally, with `data: [DONE]` as its last event.
    pub fn done(&self) -> bool {
        self.data.last().map(String::as_str) == Some("[DONE]")
    }
}

/// Reads a streamed reply to its end and splits it into events.
pub async fn read_sse(resp: reqwest::Response) -> Sse {
    let text = resp.text().await.expect("the stream ends cleanly");
    let (data, named_error) = sse_events(&text);
    Sse {
        text,
        data,
        named_error,
    }
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

/// Requests of `model` holding a deployment slot, over all its deployments.
pub async fn in_flight(gw: SocketAddr, model: &str) -> u64 {
    let a = admin(gw, "orchestrator").await;
    a["models"][model]["deployments"]
        .as_array()
        .unwrap_or_else(|| panic!("no model {model}: {a}"))
        .iter()
        .map(|d| d["in_flight"].as_u64().unwrap())
        .sum()
}

/// Requests of `model` waiting in its queue.
pub async fn queue_depth(gw: SocketAddr, model: &str) -> u64 {
    let a = admin(gw, "orchestrator").await;
    a["models"][model]["queue"]["depth"]
        .as_u64()
        .unwrap_or_else(|| panic!("no model {model}: {a}"))
}

/// Waits until `n` requests of `model` hold a slot (panics after [`WAIT`]).
pub async fn wait_in_flight(gw: SocketAddr, model: &str, n: u64) {
    eventually(
        &format!("{n} request(s) of {model} in flight"),
        WAIT,
        || async move { in_flight(gw, model).await == n },
    )
    .await
}

/// Waits until `n` requests of `model` are queued (panics after [`WAIT`]).
pub async fn wait_queued(gw: SocketAddr, model: &str, n: u64) {
    eventually(
        &format!("{n} request(s) of {model} queued"),
        WAIT,
        || async move { queue_depth(gw, model).await == n },
    )
    .await
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

// ---------------------------------------------------------------------------------------------
// The real binary.

/// The `mofa-gateway` binary, killed when dropped (the test passes or fails).
pub struct Binary(tokio::process::Child);

impl Binary {
    pub fn pid(&self) -> u32 {
        self.0.id().expect("the binary was not waited for yet")
    }

    /// Sends `sig` (as `kill` spells it: `-TERM`, `-KILL`).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().await.unwrap()
    }
}

/// Runs the binary with `args`; returns it and the URL it printed (`... listening on URL`).
pub async fn run_binary(args: &[&str]) -> (Binary, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    tokio::time::timeout(WAIT, stdout.read_line(&mut line))
        .await
        .expect("the binary did not print its address")
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
pub async fn run_gateway_binary(config: &str) -> (Binary, SocketAddr) {
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
    ])
    .await;
    let _ = std::fs::remove_file(&file);
    (bin, addr_of(&url))
}

// ---------------------------------------------------------------------------------------------
// Upstreams made for a test.

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

// ---------------------------------------------------------------------------------------------
// The official Python SDKs (tests behind the `external` feature).

/// The python of the SDK venv (`scripts/setup-test-env`, which makes it on first use).
pub async fn sdk_python() -> std::path::PathBuf {
    let out = tokio::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/setup-test-env"
        ))
        .output()
        .await
        .expect("run scripts/setup-test-env");
    assert!(
        out.status.success(),
        "scripts/setup-test-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs the named checks of the SDK script `tests/sdk/<script>` against `base_url` (with the
/// variables `unset` removed from its environment); asserts each reported `ok <check>`.
pub async fn run_sdk_checks(script: &str, base_url: &str, checks: &[&str], unset: &[&str]) {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(sdk_python().await);
    cmd.arg(path)
        .arg(base_url)
        .args(checks)
        .env("NO_PROXY", "127.0.0.1,localhost");
    for var in unset {
        cmd.env_remove(var);
    }
    let out = cmd.output().await.expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK checks failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in checks {
        assert!(
            stdout.lines().any(|l| l == format!("ok {c}")),
            "{c} did not report ok: {stdout}"
        );
    }
}

//! Observability, as an operator sees it: `/metrics` in the Prometheus text format (checked by
//! `promtool check metrics`) with exact counts after a known sequence of requests (ok, 404,
//! 503 rejection, cut stream, client disconnect); the access log of a gateway process, one
//! line per request with the expected fields and no secret; and the status page in a real
//! headless browser (Debian's `chromium`, driven over the DevTools protocol): no console
//! error, live values shown, load/unload buttons working, long values fitting their tiles, a
//! screenshot saved under `target/observe/`.
//!
//! Needs `promtool` and `chromium` on the PATH (`.ci/run` installs Debian's `prometheus` and
//! `chromium`). Everything listens on 127.0.0.1 ephemeral ports.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use mofa_gateway::sim::SimOptions;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_mofa-gateway");
const CLIENT_SECRET: &str = "sk-client-SECRET-4242";
const UPSTREAM_SECRET: &str = "sk-upstream-SECRET-1717";
const PROMPT: &str = "TOP-SECRET-PROMPT words";

// --- the known sequence --------------------------------------------------------------------

/// Backends of the sequence: `ok` answers at once, `slow` streams 2 tokens/s with one slot,
/// `cut` drops the connection after 2 tokens.
async fn backends() -> (String, String, String) {
    let ok = sim(sim_opts("ok")).await;
    let slow = sim(SimOptions {
        tokens_per_sec: 2.0,
        ..sim_opts("slow")
    })
    .await;
    // Paced, so that each chunk leaves the simulator before it drops the connection.
    let cut = sim(SimOptions {
        die_after_tokens: Some(2),
        tokens_per_sec: 100.0,
        ..sim_opts("cut")
    })
    .await;
    (ok, slow, cut)
}

/// The models of the sequence; `ok`'s upstream key comes from `${OBS_UPSTREAM_KEY}`.
fn config(ok: &str, slow: &str, cut: &str) -> GatewayBuilder {
    GatewayBuilder::new()
        .model("ok", |m| {
            m.deployment(Deployment::local(ok).api_key("${OBS_UPSTREAM_KEY}"))
        })
        .model("slow", |m| {
            m.deployment(Deployment::local(slow).max_concurrency(1))
        })
        .local_model("cut", cut)
}

fn chat(model: &str, stream: bool, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// Runs the sequence against the gateway at `gw`: 200 ok, 404 unknown model, a stream held
/// on `slow`'s one slot while a request that may not wait gets 503 `capacity_exceeded`, the
/// held stream left by its client (499), and a stream cut by its backend.
async fn sequence(gw: SocketAddr) {
    const CHAT: &str = "/v1/chat/completions";
    let bearer = format!("Bearer {CLIENT_SECRET}");
    let r = post_with(
        gw,
        CHAT,
        &chat("ok", false, 5),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    let r = post(gw, CHAT, &chat("no-such-model", false, 5)).await;
    assert_eq!(r.status(), 404);

    let held = post(gw, CHAT, &chat("slow", true, 100)).await;
    assert_eq!(held.status(), 200);
    let mut body = held.bytes_stream();
    body.next().await.unwrap().unwrap();
    let r = post_with(
        gw,
        CHAT,
        &chat("slow", false, 5),
        &[("x-mofa-max-wait-ms", "0")],
    )
    .await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-mofa-reject-reason"], "capacity_exceeded");
    drop(body);

    let r = post(gw, CHAT, &chat("cut", true, 20)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap_or_default();
    assert!(
        !text.contains("[DONE]"),
        "a cut stream has no [DONE]: {text}"
    );
}

// --- /metrics ------------------------------------------------------------------------------

/// One sample of the text format: name, labels, value.
type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

fn parse_metrics(text: &str) -> Samples {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value.parse().expect("a number");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // Label values here never hold `",` (config names).
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.push((name.to_string(), map, value));
    }
    out
}

/// The sum of the samples named `name` whose labels include `labels`.
fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

async fn metrics_text(gw: SocketAddr) -> String {
    let r = get(gw, "/metrics").await;
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    r.text().await.unwrap()
}

/// Waits until the gateway has finished `n` requests (a dropped stream is finished by the
/// gateway when it notices), then returns the metrics.
async fn metrics_after(gw: SocketAddr, n: f64) -> (String, Samples) {
    eventually_some(&format!("{n} requests counted"), WAIT, || async move {
        let text = metrics_text(gw).await;
        let s = parse_metrics(&text);
        (value(&s, "mofa_gateway_requests_total", &[]) >= n).then_some((text, s))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence_exactly_and_pass_promtool() {
    let (ok, slow, cut) = backends().await;
    let gw = config(&ok, &slow, &cut)
        .env("OBS_UPSTREAM_KEY", UPSTREAM_SECRET)
        .start()
        .await;
    // Before any request: valid, with the state gauges of every model.
    let (text, s) = metrics_after(gw, 0.0).await;
    promtool_check(&text);
    assert_eq!(
        value(&s, "mofa_gateway_queue_depth", &[("model", "slow")]),
        0.0
    );

    sequence(gw).await;
    let (text, s) = metrics_after(gw, 5.0).await;
    promtool_check(&text);
    let req = "mofa_gateway_requests_total";
    let expect = [
        (("ok", "local(ok)", "200", "ok"), 1.0),
        (("", "", "404", "invalid_request"), 1.0),
        (("slow", "", "503", "capacity_exceeded"), 1.0),
        (("slow", "local(slow)", "499", "client_disconnect"), 1.0),
        (("cut", "local(cut)", "200", "stream_broken"), 1.0),
    ];
    for ((model, backend, status, reason), n) in expect {
        let labels = [
            ("model", model),
            ("backend", backend),
            ("status", status),
            ("reason", reason),
        ];
        assert_eq!(value(&s, req, &labels), n, "{labels:?}\n{text}");
    }
    assert_eq!(value(&s, req, &[]), 5.0, "{text}");
    // The unknown model name a client sent is no label value.
    assert!(!text.contains("no-such-model"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");

    // Histograms: every request has a duration; streams that sent a byte a TTFT.
    let dur = "mofa_gateway_request_duration_seconds_count";
    assert_eq!(value(&s, dur, &[]), 5.0);
    assert_eq!(value(&s, dur, &[("model", "slow")]), 2.0);
    assert_eq!(
        value(
            &s,
            "mofa_gateway_request_duration_seconds_bucket",
            &[("model", "ok"), ("le", "+Inf")]
        ),
        1.0
    );
    let ttft = "mofa_gateway_time_to_first_token_seconds_count";
    assert_eq!(value(&s, ttft, &[]), 2.0);
    assert_eq!(
        value(&s, ttft, &[("model", "cut"), ("backend", "local(cut)")]),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "mofa_gateway_queue_wait_seconds_count",
            &[("priority", "normal")]
        ),
        3.0
    );
    // Tokens from usage: the non-streaming reply reported 3 prompt words... and 5 completion
    // tokens; the streams sent no usage chunk (no include_usage), so they count none.
    let tok = "mofa_gateway_tokens_total";
    assert_eq!(value(&s, tok, &[("model", "ok"), ("type", "output")]), 5.0);
    assert!(value(&s, tok, &[("model", "ok"), ("type", "input")]) >= 1.0);
    assert_eq!(value(&s, tok, &[("model", "cut")]), 0.0);
    // Three tries reached a backend and got its first byte; none failed before it.
    let att = "mofa_gateway_upstream_attempts_total";
    assert_eq!(value(&s, att, &[("outcome", "ok")]), 3.0);
    assert_eq!(value(&s, att, &[]), 3.0);
    // State gauges, read now: nothing in flight or queued, breakers closed.
    assert_eq!(value(&s, "mofa_gateway_in_flight", &[]), 0.0);
    assert_eq!(value(&s, "mofa_gateway_queue_depth", &[]), 0.0);
    assert_eq!(value(&s, "mofa_gateway_breaker_state", &[]), 0.0);
    assert_eq!(
        value(
            &s,
            "mofa_gateway_max_concurrency",
            &[("model", "slow"), ("deployment", "local(slow)")]
        ),
        1.0
    );
}

// --- access log ----------------------------------------------------------------------------

/// A gateway process; its stderr collected, killed on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("mofa-obs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_gateway(config: &GatewayBuilder, tag: &str) -> Proc {
    let dir = TempDir::new(tag);
    let path = dir.0.join("gateway.toml");
    std::fs::write(&path, config.toml()).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env("OBS_UPSTREAM_KEY", UPSTREAM_SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().unwrap();
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}; stderr: {}", stderr.lock().unwrap()));
    Proc {
        child,
        addr,
        stderr,
        _dir: dir,
    }
}

/// The access log lines (JSON) in `stderr`, once there are `n` of them.
async fn access_lines(p: &Proc, n: usize) -> Vec<Value> {
    eventually_some(&format!("{n} access log lines"), WAIT, || async move {
        let lines: Vec<Value> = p
            .stderr
            .lock()
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "mofa_gateway::access")
            .collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_json_line_per_request_and_no_secret() {
    let (ok, slow, cut) = backends().await;
    let p = spawn_gateway(&config(&ok, &slow, &cut).log_format("json"), "json");
    sequence(p.addr).await;
    let lines = access_lines(&p, 5).await;
    let all = p.stderr.lock().unwrap().clone();
    assert_eq!(lines.len(), 5, "{all}");
    for l in &lines {
        for field in [
            "timestamp",
            "level",
            "request_id",
            "client",
            "key",
            "model",
            "backend",
            "priority",
            "status",
            "reason",
            "attempts",
            "total_ms",
            "bytes",
        ] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
        assert!(
            l["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{l}"
        );
        assert!(l["request_id"].as_str().unwrap().starts_with("req-"), "{l}");
        assert_eq!(l["key"], "-", "no API keys configured: {l}");
    }
    let by = |model: &str, status: u64| -> &Value {
        lines
            .iter()
            .find(|l| l["model"] == model && l["status"] == status)
            .unwrap_or_else(|| panic!("no line for {model} {status}: {lines:?}"))
    };
    let ok = by("ok", 200);
    assert_eq!(ok["reason"], "ok");
    assert_eq!(ok["backend"], "local(ok)");
    assert_eq!(ok["priority"], "normal");
    assert_eq!(ok["attempts"], 1);
    assert_eq!(ok["tokens_out"], 5);
    assert_eq!(ok["tokens_estimated"], false);
    assert!(ok["bytes"].as_u64().unwrap() > 0);
    for f in ["queue_ms", "ttfb_ms", "upstream_ttfb_ms"] {
        assert!(ok[f].as_f64().is_some(), "{f} in {ok}");
    }
    let missing = by("-", 404);
    assert_eq!(missing["reason"], "invalid_request");
    assert_eq!(missing["backend"], "-");
    assert_eq!(by("slow", 503)["reason"], "capacity_exceeded");
    let gone = by("slow", 499);
    assert_eq!(gone["reason"], "client_disconnect");
    assert!(gone["ttfb_ms"].as_f64().is_some());
    let cut = by("cut", 200);
    assert_eq!(cut["reason"], "stream_broken");
    assert_eq!(cut["stream"], true);
    // Neither the client's key, the deployment's key, nor the prompt is ever logged.
    for secret in [CLIENT_SECRET, UPSTREAM_SECRET, "TOP-SECRET-PROMPT"] {
        assert!(!all.contains(secret), "{secret} logged:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_request_refused_later_is_logged_under_its_key_and_model() {
    // Once the key is known, its name is in every line; the model is whenever the body named a
    // configured one (a 400 on another field), and the metric counts it under that model.
    let ok = sim(sim_opts("ok")).await;
    let cfg = GatewayBuilder::new()
        .log_format("json")
        .admin_key(CLIENT_SECRET)
        .key(Key::new("team", CLIENT_SECRET))
        .local_model("ok", &ok);
    let p = spawn_gateway(&cfg, "attribution");
    let bearer = format!("Bearer {CLIENT_SECRET}");
    let auth = [("authorization", bearer.as_str())];
    let bad_stream = json!({"model": "ok", "stream": "yes",
                            "messages": [{"role": "user", "content": "hi"}]});
    let r = post_with(p.addr, "/v1/chat/completions", &bad_stream, &auth).await;
    assert_eq!(r.status(), 400);
    let r = post_with(
        p.addr,
        "/v1/chat/completions",
        &chat("nope", false, 2),
        &auth,
    )
    .await;
    assert_eq!(r.status(), 404);
    let lines = access_lines(&p, 2).await;
    let line = |status: u64| {
        lines
            .iter()
            .find(|l| l["status"] == status)
            .unwrap_or_else(|| panic!("no {status} line: {lines:?}"))
    };
    assert_eq!(line(400)["key"], "team", "{lines:?}");
    assert_eq!(line(400)["model"], "ok", "{lines:?}");
    assert_eq!(line(404)["key"], "team", "{lines:?}");
    assert_eq!(line(404)["model"], "-", "an unknown model is never a label");
    let m = get_with(p.addr, "/metrics", &auth)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("mofa_gateway_requests_total{")
                && l.contains("model=\"ok\"")
                && l.contains("status=\"400\"")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_access_log_is_readable_text() {
    let ok = sim(sim_opts("ok")).await;
    let p = spawn_gateway(&GatewayBuilder::new().local_model("ok", &ok), "text");
    let r = post(p.addr, "/v1/chat/completions", &chat("ok", false, 3)).await;
    assert_eq!(r.status(), 200);
    let line = eventually_some("an access log line", WAIT, || async {
        let all = p.stderr.lock().unwrap().clone();
        all.lines()
            .find(|l| l.contains("mofa_gateway::access"))
            .map(str::to_string)
    })
    .await;
    assert!(
        !line.contains('\u{1b}'),
        "no colour codes off a terminal: {line}"
    );
    for part in [
        "request finished",
        "model=\"ok\"",
        "backend=\"local(ok)\"",
        "status=200",
        "reason=\"ok\"",
        "client=127.0.0.1:",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
}

// --- the status page in a browser ------------------------------------------------------------

/// A headless chromium, killed on drop.
struct Browser {
    child: Child,
    _dir: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts chromium with a DevTools port; returns it and the port.
fn chromium() -> (Browser, u16) {
    let dir = TempDir::new("chromium");
    let mut child = Command::new(require_binary("chromium", "chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1200,1500",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", dir.0.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut port = None;
    let mut seen = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(rest) = line
            .trim()
            .strip_prefix("DevTools listening on ws://127.0.0.1:")
        {
            port = rest.split('/').next().and_then(|p| p.parse().ok());
            break;
        }
        seen.push_str(&line);
        line.clear();
    }
    // Keep draining its stderr so that it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
    let port = port.unwrap_or_else(|| panic!("no DevTools port from chromium:\n{seen}"));
    (Browser { child, _dir: dir }, port)
}

/// A DevTools protocol session with one page (blocking; run it off the async runtime).
struct Cdp {
    ws: tungstenite::WebSocket<std::net::TcpStream>,
    next: u64,
    /// Console errors, exceptions and failed loads seen so far.
    errors: Vec<Value>,
}

impl Cdp {
    fn connect(port: u16) -> Cdp {
        // The page targets (HTTP/1.1: the DevTools server answers nothing to 1.0, and
        // keeps the connection open, so the body is read by its Content-Length).
        let list: Value = {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(
                s,
                "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
            )
            .unwrap();
            let mut r = BufReader::new(s);
            let mut len = 0;
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 && line.trim() != "" {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap();
                    }
                }
                line.clear();
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            serde_json::from_slice(&body).unwrap()
        };
        let url = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(patience(Duration::from_secs(30))))
            .unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
        let mut cdp = Cdp {
            ws,
            next: 0,
            errors: Vec::new(),
        };
        for m in ["Runtime.enable", "Log.enable", "Page.enable"] {
            cdp.call(m, json!({}));
        }
        cdp
    }

    /// Sends a command and returns its result, noting the events that arrive meanwhile.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(tungstenite::Message::text(msg)).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.note(&v);
        }
    }

    fn note(&mut self, v: &Value) {
        let p = &v["params"];
        let bad = match v["method"].as_str() {
            Some("Runtime.exceptionThrown") => true,
            Some("Runtime.consoleAPICalled") => {
                matches!(p["type"].as_str(), Some("error" | "assert"))
            }
            Some("Log.entryAdded") => p["entry"]["level"] == "error",
            _ => false,
        };
        if bad {
            self.errors.push(v.clone());
        }
    }

    /// Evaluates `expr` in the page; its value (awaited if a promise).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until it is true (the page polls every second).
    fn wait_for(&mut self, expr: &str, what: &str) {
        let deadline = Instant::now() + patience(Duration::from_secs(30));
        while self.eval(expr) != json!(true) {
            if Instant::now() > deadline {
                let dom = self.eval("document.body.innerText");
                panic!("the page never showed {what}; it shows:\n{dom}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_values_and_its_buttons_work_in_a_browser() {
    let chat_url = sim(SimOptions {
        tokens_per_sec: 4.0,
        ..sim_opts("chat")
    })
    .await;
    let gw = GatewayBuilder::new()
        .admission(|a| {
            a.memory_capacity_mb(100)
                .defer_threshold(0.8)
                .reject_threshold(0.9)
        })
        .model("chat", |m| {
            m.deployment(Deployment::local(&chat_url).max_concurrency(1))
        })
        .model("pooled", |m| {
            m.deployment(
                Deployment::sim_command(&[])
                    .memory_mb(40)
                    .startup_timeout_s(20),
            )
        })
        .start()
        .await;
    // Live values: one request done on each model, one stream in flight on `chat`'s only
    // slot, and one request queued behind it.
    for m in ["chat", "pooled"] {
        let r = post(gw, "/v1/chat/completions", &chat(m, false, 1)).await;
        assert_eq!(r.status(), 200);
    }
    let held = post(gw, "/v1/chat/completions", &chat("chat", true, 400)).await;
    let mut held = held.bytes_stream();
    held.next().await.unwrap().unwrap();
    let queued = tokio::spawn(async move {
        let body = chat("chat", false, 1);
        post_with(
            gw,
            "/v1/chat/completions",
            &body,
            &[("x-mofa-priority", "high")],
        )
        .await
    });

    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/observe/status.png");
    let page = format!("http://{gw}/");
    let (errors, shown) = tokio::task::spawn_blocking(move || {
        let (_browser, port) = chromium();
        let mut cdp = Cdp::connect(port);
        cdp.call("Page.navigate", json!({"url": page}));
        cdp.wait_for(
            "!!document.querySelector('[data-model=\"chat\"] .in-flight')",
            "the model cards",
        );
        cdp.wait_for(
            "document.querySelector('[data-model=\"chat\"] .in-flight').textContent === '1 / 1'",
            "chat's request in flight",
        );
        cdp.wait_for(
            "document.querySelector('[data-model=\"chat\"] [data-queue=\"high\"] b').textContent === '1'",
            "the queued high-priority request",
        );
        cdp.wait_for(
            "document.querySelector('[data-model=\"pooled\"] .rps b').textContent !== '0.00'",
            "pooled's requests/s",
        );
        cdp.wait_for(
            "document.querySelector('[data-pool=\"pooled\"] .badge').dataset.state === 'ready'",
            "the pool server ready",
        );
        let resident = cdp.eval("document.querySelector('.mem-resident b').textContent");
        cdp.screenshot(&shot);
        // The buttons: unload, then load again.
        cdp.eval("document.querySelector('[data-pool=\"pooled\"] button[data-action=\"unload\"]').click()");
        cdp.wait_for(
            "document.querySelector('[data-pool=\"pooled\"] .badge').dataset.state === 'stopped'",
            "the pool server stopped after Unload",
        );
        let after_unload = cdp.eval("document.querySelector('.mem-resident b').textContent");
        cdp.eval("document.querySelector('[data-pool=\"pooled\"] button[data-action=\"load\"]').click()");
        cdp.wait_for(
            "document.querySelector('[data-pool=\"pooled\"] .badge').dataset.state === 'ready'",
            "the pool server ready after Load",
        );
        let msg = cdp.eval("document.getElementById('msg').textContent");
        let meta = cdp.eval("document.getElementById('meta').textContent");
        // Narrow window: still no horizontal scrolling of the page.
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 390, "height": 1600, "deviceScaleFactor": 1, "mobile": true}),
        );
        cdp.wait_for("window.innerWidth === 390", "the narrow window");
        let overflow =
            cdp.eval("document.documentElement.scrollWidth <= window.innerWidth + 1");
        let narrow = shot.with_file_name("status-narrow.png");
        cdp.screenshot(&narrow);
        (cdp.errors, json!([resident, after_unload, msg, overflow, meta]))
    })
    .await
    .unwrap();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    assert_eq!(shown[0], "40 MB", "{shown}");
    assert_eq!(shown[1], "0 MB", "{shown}");
    assert!(shown[2].as_str().unwrap().contains("load done"), "{shown}");
    assert_eq!(
        shown[3], true,
        "the page scrolls sideways in a narrow window"
    );
    // The config in effect, by its hash, as the admin view says.
    let hash = admin(gw, "orchestrator").await["config"]["hash"].clone();
    let meta = shown[4].as_str().unwrap();
    assert!(
        meta.contains(&format!("config {} loaded", hash.as_str().unwrap())),
        "{meta}"
    );
    // The gateway agrees with what the page showed.
    let pool = admin(gw, "pool").await;
    assert_eq!(pool["models"][0]["state"], "ready");
    drop(held);
    let _ = queued.await;
}

/// Renders the page with the last-minute values `VALUES` for its first model (polling
/// stopped, so that they stay) and returns the tiles whose value does not fit, the p50 and
/// p99 shown, the p99's tooltip and the caption under the tiles.
const RENDER_VALUES: &str = r#"(() => {
  const show = window.shownRender || (window.shownRender = render);
  render = () => {};
  poll = async () => {};
  clearTimeout(timer);
  const d = JSON.parse(JSON.stringify(last));
  Object.assign(d.models[0].last_minute, VALUES);
  show(d);
  const card = document.querySelector('[data-model]');
  const tiles = [...card.querySelectorAll('.kpi')];
  const spills = e => e.scrollWidth > e.clientWidth;
  return {
    over: tiles.filter(t => spills(t) || spills(t.querySelector('b')))
      .map(t => `${t.className} "${t.textContent}": ${t.scrollWidth} > ${t.clientWidth}`),
    page_over: document.documentElement.scrollWidth > window.innerWidth + 1,
    p50: card.querySelector('.p50 b').textContent,
    p99: card.querySelector('.p99 b').textContent,
    title: card.querySelector('.p99').title,
    caption: (card.querySelector('.caption') || {}).textContent,
  };
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_values_fit_their_tiles_on_the_status_page() {
    // A p99 of 1950.0 used to spill out of its tile; any latency up to 100 s must fit, as
    // must 12k requests/s and a 100% 503 rate, in a wide window and a narrow one.
    let ok = sim(sim_opts("ok")).await;
    let gw = GatewayBuilder::new().local_model("ok", &ok).start().await;
    let page = format!("http://{gw}/");
    let shot =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/observe/status-long.png");
    let (errors, shown) = tokio::task::spawn_blocking(move || {
        let (_browser, port) = chromium();
        let mut cdp = Cdp::connect(port);
        cdp.call("Page.navigate", json!({"url": page}));
        cdp.wait_for(
            "!!document.querySelector('[data-model=\"ok\"] .p99')",
            "the model card",
        );
        let mut shown = Vec::new();
        for width in [1200, 390] {
            cdp.call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": 1500, "deviceScaleFactor": 1, "mobile": width < 500}),
            );
            cdp.wait_for(&format!("window.innerWidth === {width}"), "the window size");
            for values in [
                json!({"requests": 123456, "served": 99999, "rps": 12345.67, "p50_ms": 1950.0,
                       "p99_ms": 99999.0, "ttft_p50_ms": 1950.0, "ttft_p99_ms": 99999.0,
                       "rate_503": 1, "rate_429": 0.0123}),
                json!({"requests": 99999, "served": 88888, "rps": 9999.4, "p50_ms": 999.4,
                       "p99_ms": 9994.9, "ttft_p50_ms": 0.04, "ttft_p99_ms": 99.94,
                       "rate_503": 0.0999, "rate_429": 0.999}),
                json!({"requests": 60, "served": 60, "rps": 1.0, "p50_ms": 0.25,
                       "p99_ms": 0.49, "ttft_p50_ms": null, "ttft_p99_ms": null,
                       "rate_503": 0, "rate_429": 0}),
            ] {
                let js = RENDER_VALUES.replace("VALUES", &values.to_string());
                shown.push((width, cdp.eval(&js)));
            }
            cdp.screenshot(&shot.with_file_name(format!("status-long-{width}.png")));
        }
        (cdp.errors, shown)
    })
    .await
    .unwrap();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    for (i, (width, v)) in shown.iter().enumerate() {
        assert_eq!(
            v["over"],
            json!([]),
            "{width} px: values spill out of their tiles: {v}"
        );
        assert_eq!(
            v["page_over"], false,
            "{width} px: the page scrolls sideways: {v}"
        );
        // Compact: 1950 ms is 1.95 s (the unit set apart, smaller), 99999 ms 100 s.
        // (999.4 ms is 999 ms, 9994.9 ms 9.99 s, 0.25 ms 0.3 ms.)
        let (p50, p99, served) = [
            ("1.95s", "100s", "99999"),
            ("999ms", "9.99s", "88888"),
            ("0.3ms", "0.5ms", "60"),
        ][i % 3];
        assert_eq!(
            (v["p50"].as_str(), v["p99"].as_str()),
            (Some(p50), Some(p99)),
            "{v}"
        );
        // The page says what the percentiles are of.
        let title = v["title"].as_str().unwrap_or_default();
        assert!(title.contains(&format!("{served} requests served")), "{v}");
        let caption = v["caption"].as_str().unwrap_or_default();
        assert!(caption.contains("served requests"), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_keys_spend_and_its_budget_bar_in_a_browser() {
    let dir = TempDir::new("spend-panel");
    let upstream = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .usage_sqlite(&dir.0.join("usage.db"))
        .key(Key::new("team-a", "sk-a").token_budget(60, "day"))
        .key(Key::new("team-b", "sk-b"))
        .model("m", |m| {
            m.deployment(Deployment::local(&upstream).price_per_1k_tokens(0.01))
        })
        .start()
        .await;
    // team-a spends past its budget (refused after), team-b one request.
    let mut told_a = 0;
    loop {
        let r = post_with(
            gw,
            "/v1/chat/completions",
            &chat("m", false, 8),
            &[("authorization", "Bearer sk-a")],
        )
        .await;
        if r.status() == 429 {
            break;
        }
        assert_eq!(r.status(), 200);
        told_a += r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap();
        assert!(told_a < 1000, "never refused");
    }
    let r = post_with(
        gw,
        "/v1/chat/completions",
        &chat("m", false, 3),
        &[("authorization", "Bearer sk-b")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let told_b = r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();

    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/observe/spend.png");
    let page = format!("http://{gw}/");
    let (errors, shown) = tokio::task::spawn_blocking(move || {
        let (_browser, port) = chromium();
        let mut cdp = Cdp::connect(port);
        cdp.call("Page.navigate", json!({"url": page}));
        // The store is re-read every second: wait until both keys' records are in.
        cdp.wait_for(
            &format!(
                "!!document.querySelector('#spend tr[data-key=\"team-b\"]') && \
                 document.querySelector('#spend tr[data-key=\"team-b\"] td:nth-child(2)').textContent.includes('{told_b} tokens') && \
                 document.querySelector('#spend tr[data-key=\"team-a\"] td:nth-child(3)').textContent.includes('{told_a} tokens')"
            ),
            "both keys' spend",
        );
        cdp.screenshot(&shot);
        let v = cdp.eval(
            "(() => { const a = document.querySelector('#spend tr[data-key=\"team-a\"] .budget');
               const rows = [...document.querySelectorAll('#spend tbody tr')].map(r => r.dataset.key);
               return { kind: a.dataset.kind, spent: Number(a.dataset.spent), amount: Number(a.dataset.amount),
                        over: a.classList.contains('over'), text: a.textContent, title: a.title,
                        width: a.querySelector('.bar i').style.width, rows,
                        b: document.querySelector('#spend tr[data-key=\"team-b\"] td:nth-child(4)').textContent,
                        panel: document.getElementById('spend').innerText }; })()",
        );
        (cdp.errors, v)
    })
    .await
    .unwrap();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    assert_eq!(shown["kind"], "tokens", "{shown}");
    assert_eq!(shown["spent"], told_a, "{shown}");
    assert_eq!(shown["amount"], 60, "{shown}");
    assert_eq!(shown["over"], true, "{shown}");
    assert_eq!(shown["width"], "100%", "{shown}");
    let text = shown["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("{told_a} of 60 tokens a day")),
        "{text}"
    );
    assert!(
        shown["title"].as_str().unwrap().starts_with("resets 20"),
        "{shown}"
    );
    // The key that spent more this month first; a key without a budget says so.
    assert_eq!(shown["rows"], json!(["team-a", "team-b"]));
    assert_eq!(shown["b"], "none");
    let panel = shown["panel"].as_str().unwrap();
    assert!(
        !panel.contains("null") && !panel.contains("undefined"),
        "{panel}"
    );
}

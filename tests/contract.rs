//! Contract hardening (issue 9, request path), over TCP on loopback: the whole body is checked
//! before anything is forwarded, one client cannot open a breaker for everyone, 502/504 never
//! show addresses, `priority` belongs to the gateway only in its own words, one error event
//! per stream, one `stream` rule, duplicate keys named, `%ff` model ids, refused transfer
//! codings, and what a client sees after SIGTERM. Each test failed before its fix.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::{eventually, wait_queued, Deployment, GatewayBuilder, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---- helpers (gateways and waiting from tests/common; the request helpers are small copies
// of its own, kept as this file's contract checks were written) ----

/// What the test upstream saw.
#[derive(Default)]
struct Seen {
    /// Completion requests (POSTs).
    posts: AtomicU64,
    /// `GET .../models` (health checks).
    models: AtomicU64,
    last_body: Mutex<Vec<u8>>,
    /// Held requests wait for this.
    release: tokio::sync::Notify,
}

/// A small OpenAI-like upstream: a body containing `POISON` gets 500 (and so does its health
/// check if `sick`); `HOLD` waits for `release`; `stream: true` sends one content event, then
/// its own `event: error`, then closes; anything else gets a chat completion.
async fn upstream(sick: bool) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let s = s.clone();
        async move { answer(&s, sick, req).await }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), seen)
}

async fn answer(s: &Seen, sick: bool, req: Request) -> Response {
    if req.method() == axum::http::Method::GET {
        s.models.fetch_add(1, Ordering::SeqCst);
        if sick {
            return (StatusCode::INTERNAL_SERVER_ERROR, "sick").into_response();
        }
        return (
            [("content-type", "application/json")],
            r#"{"object":"list","data":[]}"#,
        )
            .into_response();
    }
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    s.posts.fetch_add(1, Ordering::SeqCst);
    *s.last_body.lock().unwrap() = body.to_vec();
    let has = |w: &[u8]| body.windows(w.len()).any(|x| x == w);
    if sick || has(b"POISON") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "cannot parse that").into_response();
    }
    if has(b"HOLD") {
        s.release.notified().await;
    }
    if has(b"\"stream\":true") {
        let chunks: Vec<&'static str> = vec![
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "event: error\ndata: {\"error\":{\"message\":\"the model crashed\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
        ];
        let stream = futures_util::stream::unfold(0usize, move |i| {
            let chunks = chunks.clone();
            async move {
                let c = *chunks.get(i)?;
                if i > 0 {
                    // Two separate reads for the gateway: the first byte goes out first.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some((
                    Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes())),
                    i + 1,
                ))
            }
        });
        return (
            [("content-type", "text/event-stream")],
            Body::from_stream(stream),
        )
            .into_response();
    }
    (
        [("content-type", "application/json")],
        r#"{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
    )
        .into_response()
}

/// Model `m`, local first: the first URL a `local` deployment, the others `cloud` ones named
/// `p1`, `p2`, ...; each deployment shaped by `extra`.
fn config_with(deployments: &[&str], extra: impl Fn(Deployment) -> Deployment) -> GatewayBuilder {
    GatewayBuilder::new().model("m", |mut m| {
        m = m.policy("local-first");
        for (i, url) in deployments.iter().enumerate() {
            let d = if i == 0 {
                Deployment::local(url)
            } else {
                Deployment::cloud(&format!("p{i}"), url)
            };
            m = m.deployment(extra(d));
        }
        m
    })
}

/// [`config_with`], every deployment at its defaults.
fn config(deployments: &[&str]) -> GatewayBuilder {
    config_with(deployments, |d| d)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post_raw(gw: SocketAddr, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    client()
        .post(format!("http://{gw}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn post(gw: SocketAddr, body: &Value) -> reqwest::Response {
    post_raw(gw, "/v1/chat/completions", body.to_string()).await
}

fn chat(content: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": content}]})
}

/// Reads an error reply, checks the envelope and its content type; returns `error`.
async fn envelope(resp: reqwest::Response) -> Value {
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    let v: Value = resp.json().await.unwrap();
    let e = v["error"].clone();
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "no {k}: {v}");
    }
    e
}

/// Sends raw bytes over one TCP connection and returns the whole reply (the gateway closes).
async fn raw_http(gw: SocketAddr, request: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(gw).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---- item 1: the whole body is checked; one client cannot open a breaker ----

#[tokio::test]
async fn a_malformed_body_is_400_naming_where_and_never_reaches_the_backend() {
    let (url, seen) = upstream(false).await;
    let gw = config(&[&url]).start().await;

    // A prompt saved as Windows-1252.
    let cp1252: &[u8] =
        b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}]}";
    let resp = post_raw(gw, "/v1/chat/completions", cp1252).await;
    assert_eq!(resp.status(), 400);
    let e = envelope(resp).await;
    assert_eq!(e["code"], "invalid_json");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("`messages[0].content`") && m.contains("column"),
        "{m}"
    );

    // A lone surrogate escape, in a field the gateway does not read.
    let resp = post_raw(
        gw,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"user":"\udc00"}"#,
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert!(envelope(resp).await["message"]
        .as_str()
        .unwrap()
        .contains("`user`"));

    // Nesting: 64 levels (the body object is the first) pass, 65 do not.
    let nested = |levels: usize| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"metadata":{}1{}}}"#,
            "[".repeat(levels - 1),
            "]".repeat(levels - 1)
        )
    };
    let resp = post_raw(gw, "/v1/chat/completions", nested(65)).await;
    assert_eq!(resp.status(), 400);
    let e = envelope(resp).await;
    assert_eq!(e["code"], "invalid_json");
    assert!(e["message"].as_str().unwrap().contains("deeper than 64"));
    assert_eq!(
        seen.posts.load(Ordering::SeqCst),
        0,
        "nothing was forwarded"
    );

    let resp = post_raw(gw, "/v1/chat/completions", nested(64)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(seen.posts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn one_client_cannot_open_the_breaker_of_a_healthy_deployment() {
    // One deployment that answers 500 to one kind of body, and its health check with 200.
    let (url, seen) = upstream(false).await;
    let breaker = |r: common::Resilience| r.breaker_failures(3).breaker_open_ms(60000);
    let gw = config(&[&url]).resilience(breaker).start().await;
    for i in 0..6 {
        let resp = post(gw, &chat("POISON")).await;
        assert_eq!(resp.status(), 502, "bad request {i}");
        assert_eq!(envelope(resp).await["code"], "upstream_unavailable");
    }
    let resp = post(gw, &chat("hello")).await;
    assert_eq!(resp.status(), 200, "the breaker stayed closed");
    assert_eq!(resp.headers()["x-mofa-backend"], "local(m)");
    assert_eq!(seen.posts.load(Ordering::SeqCst), 7);

    // A 500 that another deployment reproduces is the request's: no more tries, no retry
    // advised, and neither deployment is blamed.
    let (other, other_seen) = upstream(false).await;
    let gw = config(&[&url, &other]).resilience(breaker).start().await;
    for _ in 0..6 {
        let resp = post(gw, &chat("POISON")).await;
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()["x-mofa-attempts"], "2");
        assert_eq!(resp.headers()["x-should-retry"], "false");
        envelope(resp).await;
    }
    assert_eq!(other_seen.posts.load(Ordering::SeqCst), 6);
    let resp = post(gw, &chat("hello")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mofa-backend"], "local(m)");
    assert_eq!(resp.headers()["x-mofa-attempts"], "1");
}

#[tokio::test]
async fn a_deployment_that_fails_what_another_serves_is_still_taken_out() {
    // Sick: 500 to everything. The request succeeds elsewhere, so the 500s are its own.
    let (sick, sick_seen) = upstream(true).await;
    let (good, _) = upstream(false).await;
    let breaker = |r: common::Resilience| r.breaker_failures(2).breaker_open_ms(60000);
    let gw = config(&[&sick, &good]).resilience(breaker).start().await;
    for _ in 0..2 {
        let resp = post(gw, &chat("hello")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-mofa-attempts"], "2");
    }
    let resp = post(gw, &chat("hello")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-mofa-attempts"],
        "1",
        "the sick one is skipped"
    );
    assert_eq!(sick_seen.posts.load(Ordering::SeqCst), 2);

    // Alone, a deployment whose health check fails as well is taken out.
    let gw = config(&[&sick]).resilience(breaker).start().await;
    for _ in 0..2 {
        assert_eq!(post(gw, &chat("hello")).await.status(), 502);
    }
    let resp = post(gw, &chat("hello")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-mofa-reject-reason"], "no_healthy_backend");
}

// ---- item 6: no addresses or library text in 502/504 ----

#[tokio::test]
async fn upstream_failures_name_the_label_never_the_url() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        format!("http://{a}/v1")
    };
    let gw = config(&[&dead]).start().await;
    let resp = post(gw, &chat("hello")).await;
    assert_eq!(resp.status(), 502);
    let e = envelope(resp).await;
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("local(m)"), "{m}");
    for leak in [
        "127.0.0.1",
        "http://",
        "error sending request",
        "tcp connect",
        "refused",
    ] {
        assert!(!m.contains(leak), "{leak} in {m}");
    }

    // A timeout (the upstream holds the request past first_byte_timeout_ms).
    let (slow, seen) = upstream(false).await;
    let gw = config_with(&[&slow], |d| d.first_byte_timeout_ms(200))
        .start()
        .await;
    let resp = post(gw, &chat("HOLD")).await;
    assert_eq!(resp.status(), 504);
    let m = envelope(resp).await["message"].as_str().unwrap().to_owned();
    assert!(m.contains("local(m)") && !m.contains("127.0.0.1"), "{m}");
    seen.release.notify_one();
}

// ---- item 7: priority ----

#[tokio::test]
async fn only_the_gateways_priority_words_are_removed() {
    let (url, seen) = upstream(false).await;
    let gw = config(&[&url]).start().await;
    let forwarded = |prio: Value| {
        let seen = seen.clone();
        async move {
            let mut body = chat("hello");
            body["priority"] = prio;
            let resp = post(gw, &body).await;
            assert_eq!(resp.status(), 200, "{body}");
            let sent: Value = serde_json::from_slice(&seen.last_body.lock().unwrap()).unwrap();
            sent.get("priority").cloned()
        }
    };
    assert_eq!(forwarded(json!(5)).await, Some(json!(5)), "vLLM's integer");
    assert_eq!(forwarded(json!("HIGH")).await, None);
    assert_eq!(forwarded(json!("critical")).await, None);
    assert_eq!(forwarded(Value::Null).await, None, "null is not forwarded");

    let resp = client()
        .post(format!("http://{gw}/v1/chat/completions"))
        .header("x-mofa-priority", "urgent")
        .json(&chat("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e = envelope(resp).await;
    assert_eq!(e["code"], "invalid_value");
    assert_eq!(e["param"], "x-mofa-priority");
}

// ---- item 9: one error event per stream ----

#[tokio::test]
async fn the_upstreams_own_error_event_is_the_only_one() {
    let (url, _) = upstream(false).await;
    let gw = config(&[&url]).start().await;
    let mut body = chat("hello");
    body["stream"] = json!(true);
    let resp = post(gw, &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(text.matches("event: error").count(), 1, "{text}");
    assert_eq!(text.matches("\"error\"").count(), 1, "{text}");
    assert!(text.contains("the model crashed"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
}

// ---- items 11 and 12 ----

#[tokio::test]
async fn stream_must_be_a_boolean_on_every_endpoint() {
    let (url, seen) = upstream(false).await;
    let gw = config(&[&url]).start().await;
    let bodies = [
        (
            "/v1/embeddings",
            json!({"model": "m", "input": "x", "stream": "yes"}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "stream": "yes"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
        ),
    ];
    for (path, body) in bodies {
        let resp = post_raw(gw, path, body.to_string()).await;
        assert_eq!(resp.status(), 400, "{path}");
        let e = envelope(resp).await;
        assert_eq!(
            (e["code"].as_str(), e["param"].as_str()),
            (Some("invalid_value"), Some("stream")),
            "{path}"
        );
    }
    assert_eq!(seen.posts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn duplicate_keys_bad_ids_and_transfer_codings_get_contract_codes() {
    let (url, seen) = upstream(false).await;
    let gw = config(&[&url]).start().await;

    let resp = post_raw(
        gw,
        "/v1/chat/completions",
        r#"{"model":"m","model":"b","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(resp.status(), 400);
    let e = envelope(resp).await;
    assert_eq!(e["code"], "invalid_json");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key `model`"),
        "{e}"
    );

    let resp = client()
        .get(format!("http://{gw}/v1/models/%ff"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(envelope(resp).await["code"], "model_not_found");

    let body = r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         transfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let reply = raw_http(gw, req.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("\"param\":\"transfer-encoding\""), "{reply}");
    assert!(reply
        .to_ascii_lowercase()
        .contains("content-type: application/json"));
    assert_eq!(seen.posts.load(Ordering::SeqCst), 0);

    // Plain chunked is fine.
    let req = req.replace("gzip, chunked", "chunked");
    let reply = raw_http(gw, req.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

// ---- item 14: what a client sees after SIGTERM ----

#[tokio::test]
async fn after_shutdown_begins_queued_requests_get_503_and_new_connections_are_refused() {
    let (url, seen) = upstream(false).await;
    let gw = config_with(&[&url], |d| d.max_concurrency(1))
        .admission(|a| a.max_queue(4).max_queue_wait_ms(30000))
        .build()
        .await;
    let addr = gw.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gw.serve(async {
        let _ = stopped.await;
    }));
    // One request in flight (held upstream), one queued behind it.
    let held = tokio::spawn(async move { post(addr, &chat("HOLD")).await });
    eventually("the held request at the upstream", WAIT, || async {
        seen.posts.load(Ordering::SeqCst) > 0
    })
    .await;
    let queued = tokio::spawn(async move { post(addr, &chat("hello")).await });
    // The admin view is open (no `[auth]`): the request is in the queue, not on its way.
    wait_queued(addr, "m", 1).await;

    stop.send(()).unwrap();
    let resp = queued.await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(envelope(resp).await["code"], "shutting_down");
    // The listener is closed: a new connection is refused (no 503 can be seen on it).
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // The request in flight finishes.
    seen.release.notify_one();
    assert_eq!(held.await.unwrap().status(), 200);
    served.await.unwrap().unwrap();
}

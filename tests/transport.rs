//! Transport: upstream connection reuse (issue 9 item 2), replies made below the app
//! (issue 9 item 10), HTTP/1.1 and h2 prior knowledge on one port (issue 9 item 13).
//! Everything on 127.0.0.1 ephemeral ports.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Deployment, GatewayBuilder};
use mofa_gateway::sim::SimOptions;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A gateway whose model `name` is served by one local deployment at `url`.
async fn one_model(name: &str, url: &str) -> SocketAddr {
    GatewayBuilder::new()
        .model(name, |m| {
            m.deployment(Deployment::local(url).max_concurrency(64))
        })
        .start()
        .await
}

async fn sim(model: &str) -> String {
    let addr = mofa_gateway::sim::spawn_local(SimOptions {
        models: vec![model.to_string()],
        ..Default::default()
    })
    .await
    .unwrap();
    format!("http://{addr}/v1")
}

const SMALL_REPLY: &str = r#"{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
const TOO_LARGE: &str = r#"{"error":{"message":"body too large","type":"invalid_request_error","param":null,"code":"too_large"}}"#;

/// An upstream that refuses bodies over 1 MiB with 413 as soon as it has the head, without
/// reading the body and without `connection: close`, then closes the connection a moment later
/// (the unread body makes that a reset); smaller requests are read and answered on a kept-alive connection.
async fn early_413_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve_early_413(conn));
        }
    });
    format!("http://{addr}/v1")
}

async fn serve_early_413(mut conn: TcpStream) {
    let mut buf = Vec::with_capacity(8192);
    loop {
        // Read a head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if len > 1024 * 1024 {
            let reply = format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{TOO_LARGE}",
                TOO_LARGE.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
            // Closed a moment later with the body unread (as a server that drains nothing).
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + len);
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{SMALL_REPLY}",
            SMALL_REPLY.len()
        );
        if conn.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_body_never_breaks_another_clients_request() {
    let up = early_413_upstream().await;
    let gw = one_model("m", &up).await;
    let url = format!("http://{gw}/v1/chat/completions");
    let big = {
        let prompt = "x".repeat(3 * 1024 * 1024);
        serde_json::to_vec(&serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": prompt}]
        }))
        .unwrap()
    };
    let small = serde_json::to_vec(&serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}]
    }))
    .unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut bigs = Vec::new();
    for _ in 0..2 {
        let (url, big, done, c) = (url.clone(), big.clone(), done.clone(), client());
        bigs.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(big.clone())
                    .send()
                    .await
                    .unwrap();
                statuses.push(r.status().as_u16());
            }
            statuses
        }));
    }
    let mut smalls = Vec::new();
    for _ in 0..2 {
        let (url, small, c) = (url.clone(), small.clone(), client());
        smalls.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..400 {
                let r = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(small.clone())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                if status != 200 {
                    failures.push(format!("{status} {}", r.text().await.unwrap_or_default()));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for s in smalls {
        failures.extend(s.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut big_statuses = Vec::new();
    for b in bigs {
        big_statuses.extend(b.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of 800 small requests failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert!(!big_statuses.is_empty());
    // The big ones get the upstream's refusal, never a success.
    assert!(big_statuses.iter().all(|s| *s != 200), "{big_statuses:?}");
}

/// Sends raw bytes, reads the reply to the connection's end.
async fn raw(gw: SocketAddr, bytes: &[u8]) -> (u16, String, Value) {
    let mut conn = TcpStream::connect(gw).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no end of reply");
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("the body is not JSON: {text:?}"));
    (status, head.to_ascii_lowercase(), body)
}

fn assert_envelope(what: &str, got: (u16, String, Value), status: u16) {
    let (s, head, body) = got;
    assert_eq!(s, status, "{what}: {head}");
    assert!(
        head.contains("\r\ncontent-type: application/json"),
        "{what}: {head}"
    );
    assert!(head.contains("\r\nx-request-id: "), "{what}: {head}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
    assert!(body["error"]["code"].is_string(), "{what}: {body}");
}

#[tokio::test]
async fn replies_made_below_the_app_are_envelopes() {
    let up = sim("mofa-sim").await;
    let gw = one_model("mofa-sim", &up).await;
    let post = |extra: &str| {
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}\r\n")
    };
    let mut many = String::new();
    for i in 0..101 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    assert_envelope(
        "101 header lines",
        raw(
            gw,
            format!("GET /v1/models HTTP/1.1\r\nhost: x\r\n{many}\r\n").as_bytes(),
        )
        .await,
        431,
    );
    let huge = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    assert_envelope(
        "a head over max_header_bytes",
        raw(
            gw,
            format!("GET /v1/models HTTP/1.1\r\nhost: x\r\n{huge}\r\n").as_bytes(),
        )
        .await,
        431,
    );
    assert_envelope(
        "a control byte in a header",
        raw(
            gw,
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: b\x01c\r\n\r\n",
        )
        .await,
        400,
    );
    assert_envelope(
        "content-length: abc",
        raw(gw, post("content-length: abc\r\n").as_bytes()).await,
        400,
    );
    assert_envelope(
        "two different Content-Lengths",
        raw(
            gw,
            post("content-length: 2\r\ncontent-length: 3\r\n").as_bytes(),
        )
        .await,
        400,
    );
    assert_envelope(
        "transfer-encoding: identity",
        raw(gw, post("transfer-encoding: identity\r\n").as_bytes()).await,
        400,
    );
    assert_envelope(
        "a space in the path",
        raw(gw, b"GET /v1/mo dels HTTP/1.1\r\nhost: x\r\n\r\n").await,
        400,
    );
    let body = r#"{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}]}"#;
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let (s, head, env) = raw(
        gw,
        format!("{}{chunked}", post("transfer-encoding: gzip, chunked\r\n")).as_bytes(),
    )
    .await;
    assert_envelope("gzip, chunked", (s, head, env.clone()), 400);
    assert_eq!(env["error"]["param"], "transfer-encoding");
    // A plain chunked body is fine.
    let (s, head, _) = raw(
        gw,
        format!(
            "{}{chunked}",
            post("transfer-encoding: chunked\r\nconnection: close\r\n")
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{head}");
}

#[tokio::test]
async fn http_layer_refusals_follow_the_contract_table() {
    let up = sim("mofa-sim").await;
    let gw = one_model("mofa-sim", &up).await;
    // A version other than HTTP/1.0 or 1.1 on an HTTP/1 request line: 505, not 400.
    for v in ["HTTP/2.0", "HTTP/3.0", "HTTP/1.2", "HTTP/9.9"] {
        let got = raw(
            gw,
            format!("GET /v1/models {v}\r\nhost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(got.2["error"]["code"], "http_version_not_supported", "{v}");
        assert!(got.1.contains("\r\nconnection: close"), "{v}: {}", got.1);
        assert_envelope(v, got, 505);
    }
    // A chunked body whose framing is broken: malformed_request, never the library's words,
    // and the connection is closed.
    let head =
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                transfer-encoding: chunked\r\n\r\n";
    for body in [
        "zz\r\n{}\r\n0\r\n\r\n",
        "5\r\n{\"model\r\n0\r\n\r\n",
        "-1\r\n{}\r\n0\r\n\r\n",
    ] {
        let got = raw(gw, format!("{head}{body}").as_bytes()).await;
        assert_eq!(
            got.2["error"]["code"], "malformed_request",
            "{body:?}: {}",
            got.2
        );
        assert_eq!(got.2["error"]["type"], "invalid_request_error");
        assert!(
            got.1.contains("\r\nconnection: close"),
            "{body:?}: {}",
            got.1
        );
        assert_envelope(body, got, 400);
    }
    // A path segment that does not decode names no pool model: 404, a listed code.
    let got = raw(
        gw,
        b"POST /admin/pool/%ff/load HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.2["error"]["code"], "model_not_found", "{}", got.2);
    assert_envelope("%ff", got, 404);
}

#[tokio::test]
async fn http1_and_h2_prior_knowledge_on_one_port() {
    let up = sim("m").await;
    let gw = one_model("m", &up).await;
    let h1 = client();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (c, version) in [
        (&h1, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ] {
        let r = c
            .get(format!("http://{gw}/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-request-id"));
        for stream in [false, true] {
            let r = c
                .post(format!("http://{gw}/v1/chat/completions"))
                .json(&serde_json::json!({
                    "model": "m", "stream": stream, "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hello"}]
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.version(), version);
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-mofa-backend"], "local(m)");
            let text = r.text().await.unwrap();
            if stream {
                assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
            } else {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert!(v["choices"][0]["message"]["content"].is_string());
            }
        }
        // Errors are envelopes on both.
        let r = c
            .post(format!("http://{gw}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "application/json");
    }
}

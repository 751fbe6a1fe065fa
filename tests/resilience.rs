//! Under faults the gateway keeps answering correctly: fallback before the first byte, upstream
//! cool-downs, circuit breakers (one half-open probe), timeouts, client disconnects, slow
//! clients, and the graceful shutdown sequence of the real binary.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use mofa_gateway::sim::SimOptions;

async fn attempts_and_backend(gw: std::net::SocketAddr, stream: bool) -> (u16, String, String) {
    let resp = chat(gw, &chat_body("m", stream)).await;
    let status = resp.status().as_u16();
    let backend = assert_stamped(&resp);
    let attempts = resp
        .headers()
        .get("x-mofa-attempts")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.text().await.unwrap();
    if status == 200 && stream {
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    }
    (status, backend, attempts)
}

#[tokio::test]
async fn falls_back_on_connect_refused_500_and_429_with_no_client_visible_error() {
    let cloud = sim(sim_opts("m")).await;

    // Connection refused locally: every request still succeeds, on the cloud deployment.
    let gw = local_then_cloud(&dead_url().await, &cloud).start().await;
    let first = attempts_and_backend(gw, false).await;
    assert_eq!(first, (200, "cloud(backup)".into(), "2".into()));
    for i in 0..10 {
        let (status, backend, _) = attempts_and_backend(gw, i % 2 == 0).await;
        assert_eq!(
            (status, backend.as_str()),
            (200, "cloud(backup)"),
            "request {i}"
        );
    }

    // A 500 locally.
    let failing = sim(SimOptions {
        fail_rate: 1.0,
        ..sim_opts("m")
    })
    .await;
    let gw = local_then_cloud(&failing, &cloud).start().await;
    for stream in [false, true] {
        assert_eq!(
            attempts_and_backend(gw, stream).await,
            (200, "cloud(backup)".into(), "2".into())
        );
    }

    // A 429 with Retry-After: 2 puts the local deployment in cool-down, skipped meanwhile.
    let (busy, mode, hits) = toggle_upstream().await;
    mode.store(BUSY_429, Ordering::SeqCst);
    let gw = local_then_cloud(&busy, &cloud).start().await;
    assert_eq!(
        attempts_and_backend(gw, false).await,
        (200, "cloud(backup)".into(), "2".into())
    );
    for _ in 0..3 {
        assert_eq!(
            attempts_and_backend(gw, false).await,
            (200, "cloud(backup)".into(), "1".into())
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the cooling deployment was not skipped"
    );
    // After the pause it is tried again (and now answers).
    mode.store(OK, Ordering::SeqCst);
    // The scenario, not a synchronisation: wait out the 2 s cool-down the 429 asked for.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        attempts_and_backend(gw, false).await,
        (200, "local(m)".into(), "1".into())
    );
}

#[tokio::test]
async fn a_client_error_is_never_retried() {
    let cloud = sim(sim_opts("m")).await;
    let picky = fixed_upstream(400, "application/json", r#"{"error":{"message":"bad tool schema","type":"invalid_request_error","param":"tools","code":null}}"#).await;
    let gw = local_then_cloud(&picky, &cloud).start().await;
    let (status, backend, attempts) = attempts_and_backend(gw, false).await;
    assert_eq!(
        (status, backend.as_str(), attempts.as_str()),
        (400, "local(m)", "1")
    );
    assert_eq!(sim_stats(&cloud).await["requests"], 0);
}

#[tokio::test]
async fn when_every_deployment_fails_the_status_says_what_helps() {
    // Both overloaded: a 503 with the shorter Retry-After, not the first error.
    let (a, ma, _) = toggle_upstream().await;
    ma.store(BUSY_429, Ordering::SeqCst);
    let b = sim(SimOptions {
        fail_rate: 1.0,
        ..sim_opts("m")
    })
    .await;
    let gw = local_then_cloud(&b, &a).start().await;
    let resp = chat(gw, &chat_body("m", false)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-mofa-attempts"], "2");
    assert_eq!(resp.headers()["retry-after"], "2");
    assert_eq!(envelope(resp).await["code"], "upstream_overloaded");

    // Refused + 500: a 502.
    let gw = local_then_cloud(&dead_url().await, &b).start().await;
    let resp = chat(gw, &chat_body("m", true)).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-mofa-attempts"], "2");
    envelope(resp).await;
}

#[tokio::test]
async fn breaker_opens_skips_and_half_opens_with_exactly_one_probe() {
    let cloud = sim(sim_opts("m")).await;
    let (local, mode, hits) = toggle_upstream().await;
    mode.store(FAIL_500, Ordering::SeqCst);
    let gw = local_then_cloud(&local, &cloud)
        .resilience(|r| r.breaker_failures(3).breaker_open_ms(400))
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(
            attempts_and_backend(gw, false).await,
            (200, "cloud(backup)".into(), "2".into())
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // Open: skipped.
    for _ in 0..5 {
        assert_eq!(
            attempts_and_backend(gw, false).await,
            (200, "cloud(backup)".into(), "1".into())
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    // Half-open: of many concurrent requests, exactly one probes the local deployment.
    // The scenario, not a synchronisation: wait past breaker_open_ms (400).
    tokio::time::sleep(Duration::from_millis(450)).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { attempts_and_backend(gw, false).await }))
        .collect();
    for t in tasks {
        let (status, backend, _) = t.await.unwrap();
        assert_eq!((status, backend.as_str()), (200, "cloud(backup)"));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 4, "one probe, not all");

    // The probe failed: open again. Then the backend recovers: the next probe closes it.
    mode.store(OK, Ordering::SeqCst);
    assert_eq!(attempts_and_backend(gw, false).await.1, "cloud(backup)");
    // Again past breaker_open_ms, for the next probe.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        attempts_and_backend(gw, false).await,
        (200, "local(m)".into(), "1".into())
    );
    for _ in 0..3 {
        assert_eq!(attempts_and_backend(gw, false).await.1, "local(m)");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn with_every_breaker_open_the_answer_is_503_no_healthy_backend() {
    let (local, mode, _) = toggle_upstream().await;
    mode.store(FAIL_500, Ordering::SeqCst);
    let gw = GatewayBuilder::new()
        .resilience(|r| r.breaker_failures(2).breaker_open_ms(3000))
        .local_model("m", &local)
        .start()
        .await;
    for _ in 0..2 {
        let resp = chat(gw, &chat_body("m", false)).await;
        assert_eq!(resp.status(), 502);
    }
    let resp = chat(gw, &chat_body("m", true)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(assert_stamped(&resp), "rejected");
    assert_eq!(resp.headers()["x-mofa-reject-reason"], "no_healthy_backend");
    let ra = retry_after(&resp);
    assert!(
        (2..=3).contains(&ra),
        "Retry-After {ra}: the time until the breaker half-opens"
    );
    assert_eq!(envelope(resp).await["code"], "no_healthy_backend");
}

#[tokio::test]
async fn an_active_health_check_opens_the_breaker_of_a_dead_idle_deployment() {
    let cloud = sim(sim_opts("m")).await;
    let (local, mode, hits) = toggle_upstream().await;
    let gw = GatewayBuilder::new()
        .resilience(|r| r.breaker_failures(2).breaker_open_ms(60000))
        .model("m", |m| {
            m.deployment(Deployment::local(&local).health_check_interval_s(1))
                .deployment(Deployment::cloud("backup", &cloud))
        })
        .start()
        .await;
    mode.store(FAIL_500, Ordering::SeqCst);
    // Two failed probes (about 2 s) open it, with no client request involved. Probes run one
    // after another, so a third one shows that the second's failure was recorded.
    eventually("a third health probe", WAIT, || async {
        hits.load(Ordering::SeqCst) >= 3
    })
    .await;
    let probes = hits.load(Ordering::SeqCst);
    assert!(probes >= 2, "{probes} probes");
    assert_eq!(
        attempts_and_backend(gw, false).await,
        (200, "cloud(backup)".into(), "1".into())
    );
}

#[tokio::test]
async fn total_timeout_ends_a_stream_with_an_error_event_and_is_504_before_the_first_byte() {
    let slow = sim(SimOptions {
        tokens_per_sec: 20.0,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(&slow).total_timeout_ms(500))
        })
        .start()
        .await;
    let mut body = chat_body("m", true);
    body["max_tokens"] = serde_json::json!(40);
    let resp = chat(gw, &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let (data, named_error) = sse_events(&text);
    assert!(named_error, "{text}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    assert!(data.last().unwrap().contains("total_timeout_ms"), "{text}");
    body["stream"] = serde_json::json!(false);
    let resp = chat(gw, &body).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(envelope(resp).await["code"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_leaving_mid_stream_free_everything() {
    let slow = sim(SimOptions {
        tokens_per_sec: 20.0,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(
                Deployment::local(&slow)
                    .max_concurrency(2000)
                    .connect_timeout_ms(30000),
            )
        })
        .start()
        .await;
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            tokio::spawn(async move {
                let mut body = chat_body("m", true);
                body["max_tokens"] = serde_json::json!(200);
                let mut resp = chat(gw, &body).await;
                assert_eq!(resp.status(), 200);
                // Read the first chunk, then go away.
                assert!(resp.chunk().await.unwrap().is_some());
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let gone = Instant::now();
    let a = eventually_some(
        "everything freed within 1 s of the last disconnect",
        Duration::from_secs(1),
        || async {
            let a = admin(gw, "orchestrator").await;
            let s = sim_stats(&slow).await;
            (a["models"]["m"]["deployments"][0]["in_flight"] == 0
                && a["models"]["m"]["queue"]["depth"] == 0
                && s["cancelled"] == 1000
                && s["in_flight"] == 0)
                .then_some(a)
        },
    )
    .await;
    assert_eq!(a["client_disconnects"], 1000, "{a}");
    assert!(gone.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    use tokio::io::AsyncReadExt;
    let s = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .server(|s| s.header_read_timeout_ms(300).body_read_timeout_ms(300))
        .local_model("m", &s)
        .start()
        .await;

    // Headers that never end: the connection is closed.
    let mut tcp = raw_http(gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection stayed open");

    // A body that never ends: 408 with the envelope.
    let mut tcp = raw_http(gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":").await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");

    // Headers larger than the limit are refused.
    let big = "a".repeat(100_000);
    let resp = get_with(gw, "/v1/models", &[("x-big", &big)]).await;
    assert_eq!(resp.status(), 431);
}

/// The binary's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A connection that never completes its head: HTTP/1.1 that sends one byte every 200 ms after
/// a first wait, or an h2 preface (and SETTINGS) and then nothing. How long after connecting
/// the gateway closed it (`None`: still open after 5 s).
async fn held_open(gw: SocketAddr, h2: bool) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(gw).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        if h2 {
            // The preface and an empty SETTINGS frame.
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            let _ = wr.write_all(&hello).await;
            std::future::pending::<()>().await;
        }
        // Slowloris: the first byte late (more than half the head timeout), then a byte at a time.
        tokio::time::sleep(Duration::from_millis(600)).await;
        for b in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut sink)).await;
    writer.abort();
    closed.is_ok().then(|| start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_gets_one_deadline_from_accept_for_http1_and_h2() {
    // `header_read_timeout_ms = 1000` covers the whole head from the moment the connection is
    // accepted: the protocol sniff, HTTP/1.1's head, h2's first HEADERS frame. 100 such
    // connections (half slowloris, half a silent h2 preface) are each closed within 1.5 s,
    // clients are served meanwhile, and the descriptors come back.
    let s = sim(sim_opts("m")).await;
    let (proc, gw) = GatewayBuilder::new()
        .server(|s| s.header_read_timeout_ms(1000).worker_threads(1))
        .local_model("m", &s)
        .start_binary()
        .await;
    // One lane: one upstream connection, made by a first request.
    assert_eq!(chat(gw, &chat_body("m", false)).await.status(), 200);
    let baseline = open_fds(proc.pid());
    let held: Vec<_> = (0..100)
        .map(|i| tokio::spawn(held_open(gw, i % 2 == 1)))
        .collect();
    // Served meanwhile, on new connections.
    for _ in 0..10 {
        let r = chat(gw, &chat_body("m", false)).await;
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, h) in held.into_iter().enumerate() {
        let kind = if i % 2 == 1 {
            "h2 preface"
        } else {
            "slowloris"
        };
        match h.await.unwrap() {
            Some(t) => assert!(
                t < Duration::from_millis(1500),
                "{kind} {i} closed after {t:?}"
            ),
            None => panic!("{kind} {i} still open after 5 s"),
        }
    }
    eventually("descriptors back to the baseline", WAIT, || async {
        open_fds(proc.pid()) <= baseline
    })
    .await;
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_with_goaway() {
    // Served once, then idle: closed after header_read_timeout_ms (as HTTP/1.1 keep-alive
    // connections are), with a GOAWAY first.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .server(|s| s.header_read_timeout_ms(500))
        .local_model("m", &s)
        .start()
        .await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("http://{gw}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // And by hand: a request (HEADERS with END_STREAM for GET /v1/models, HPACK-encoded), then
    // silence: GOAWAY, then the close.
    let mut tcp = tokio::net::TcpStream::connect(gw).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // :method GET (idx 2), :scheme http (idx 6), :path (idx 4, literal "/v1/models"),
    // :authority (idx 1, literal "x").
    let mut block = vec![0x82, 0x86, 0x04, 10];
    block.extend_from_slice(b"/v1/models");
    block.extend_from_slice(&[0x01, 1, b'x']);
    let len = block.len();
    hello.extend_from_slice(&[0, 0, len as u8, 1, 0x05, 0, 0, 0, 1]);
    hello.extend_from_slice(&block);
    tcp.write_all(&hello).await.unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    let took = start.elapsed();
    // Frames: find a GOAWAY (type 7).
    let mut at = 0;
    let mut types = Vec::new();
    while at + 9 <= got.len() {
        let l = (usize::from(got[at]) << 16)
            | (usize::from(got[at + 1]) << 8)
            | usize::from(got[at + 2]);
        types.push(got[at + 3]);
        at += 9 + l;
    }
    assert!(read.is_ok(), "an idle h2 connection stayed open: {types:?}");
    assert!(took < Duration::from_millis(1500), "closed after {took:?}");
    assert!(types.contains(&1), "the request was answered: {types:?}");
    assert!(types.contains(&7), "no GOAWAY before the close: {types:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_streams_refuses_new_work_and_exits_0() {
    let slow = sim(SimOptions {
        tokens_per_sec: 20.0,
        ..sim_opts("m")
    })
    .await;
    let (mut gw_proc, gw) = GatewayBuilder::new()
        .server(|s| s.shutdown_grace_s(10))
        .model("m", |m| {
            m.deployment(Deployment::local(&slow).max_concurrency(1))
        })
        .start_binary()
        .await;
    // A stream of about a second in progress, and a request queued behind it.
    let mut body = chat_body("m", true);
    body["max_tokens"] = serde_json::json!(20);
    let mut stream = chat(gw, &body).await;
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.unwrap().unwrap();
    let queued = tokio::spawn(async move { chat(gw, &chat_body("m", false)).await });
    wait_queued(gw, "m", 1).await;

    gw_proc.signal("-TERM");
    // The queued request is refused with 503 shutting_down.
    let q = queued.await.unwrap();
    assert_eq!(q.status(), 503);
    assert_eq!(q.headers()["x-mofa-reject-reason"], "shutting_down");
    // New connections are refused.
    eventually(
        "the listener stops accepting (within 1 s)",
        Duration::from_secs(1),
        || async { !accepts(gw).await },
    )
    .await;
    // The stream in progress completes.
    let mut rest = String::from_utf8_lossy(&first).to_string();
    while let Some(c) = stream.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let status = gw_proc.wait().await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_lanes_every_connection_is_served_and_shutdown_waits_for_each() {
    // `worker_threads = 3`: the binary serves on three threads ("lanes"); each new connection
    // goes to the lane with the fewest, and lives there. Six streams on six connections at
    // once must all be served whole, also across a graceful shutdown begun mid-stream.
    let slow = sim(SimOptions {
        tokens_per_sec: 20.0,
        ..sim_opts("m")
    })
    .await;
    let (mut gw_proc, gw) = GatewayBuilder::new()
        .server(|s| s.worker_threads(3).shutdown_grace_s(10))
        .local_model("m", &slow)
        .start_binary()
        .await;
    let pid = gw_proc.pid();
    let lanes = move || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|name| name.starts_with("mofa-lane-"))
                    .count()
            })
            .unwrap_or(0)
    };
    // The main thread and two more serve (started just after the port is printed).
    eventually(
        "two more serving threads",
        WAIT,
        || async move { lanes() == 2 },
    )
    .await;
    let mut body = chat_body("m", true);
    body["max_tokens"] = serde_json::json!(20);
    let mut streams = Vec::new();
    for _ in 0..6 {
        // A client each: a connection each.
        let r = reqwest::Client::new()
            .post(format!("http://{gw}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    gw_proc.signal("-TERM");
    for mut s in streams {
        let mut text = String::new();
        while let Some(c) = s.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&c));
        }
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        // The role chunk (empty content), then the 20 tokens: none lost.
        assert_eq!(text.matches("\"content\":").count(), 21, "{text}");
    }
    assert_eq!(gw_proc.wait().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let slow = sim(SimOptions {
        tokens_per_sec: 5.0,
        ..sim_opts("m")
    })
    .await;
    let (mut gw_proc, gw) = GatewayBuilder::new()
        .server(|s| s.shutdown_grace_s(30))
        .local_model("m", &slow)
        .start_binary()
        .await;
    let mut body = chat_body("m", true);
    body["max_tokens"] = serde_json::json!(100);
    let mut stream = chat(gw, &body).await;
    assert!(stream.chunk().await.unwrap().is_some());
    gw_proc.signal("-TERM");
    // The first signal was handled: the gateway is draining and no longer accepts.
    eventually("the listener stops accepting", WAIT, || async {
        !accepts(gw).await
    })
    .await;
    let start = Instant::now();
    gw_proc.signal("-TERM");
    let status = gw_proc.wait().await;
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_ne!(status.code(), Some(0));
}

#[tokio::test]
async fn a_client_leaving_a_non_streaming_request_cancels_it_upstream() {
    let slow = sim(SimOptions {
        tokens_per_sec: 10.0,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(&slow).max_concurrency(1))
        })
        .start()
        .await;
    let mut body = chat_body("m", false);
    body["max_tokens"] = serde_json::json!(30);
    // Running, and one queued behind it; both clients give up after 300 ms (the timeout drops
    // the request, closing its connection).
    let impatient = Duration::from_millis(300);
    let (a, b) = tokio::join!(
        tokio::time::timeout(impatient, chat(gw, &body)),
        tokio::time::timeout(impatient, chat(gw, &body))
    );
    assert!(a.is_err() && b.is_err());
    let o = eventually_some(
        "the upstream request cancelled within 1 s",
        Duration::from_secs(1),
        || async {
            let o = admin(gw, "orchestrator").await;
            let s = sim_stats(&slow).await;
            (o["models"]["m"]["deployments"][0]["in_flight"] == 0
                && o["models"]["m"]["queue"]["depth"] == 0
                && s["cancelled"] == 1)
                .then_some(o)
        },
    )
    .await;
    assert_eq!(o["client_disconnects"], 2, "{o}");
}

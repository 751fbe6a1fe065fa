//! Admission control and routing over real TCP: overload with mixed priorities, every policy's
//! choice, memory admission, and the 503 + Retry-After contract for streams and non-streams.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mofa_gateway::sim::SimOptions;
use serde_json::{json, Value};

/// A simulator taking `ms_per_token` per token.
async fn slow_sim(model: &str, tokens_per_sec: f64, max_concurrency: usize) -> String {
    sim(SimOptions {
        tokens_per_sec,
        max_concurrency,
        ..sim_opts(model)
    })
    .await
}

/// Checks a rejection: 503, envelope, code, Retry-After in [1, 60], `rejected` headers.
async fn assert_rejected(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 503);
    assert_eq!(assert_stamped(&resp), "rejected");
    retry_after(&resp);
    let reason = resp.headers()["x-mofa-reject-reason"]
        .to_str()
        .unwrap()
        .to_string();
    let e = envelope(resp).await;
    assert_eq!(e["type"], "service_unavailable");
    assert_eq!(e["code"], reason.as_str());
    reason
}

/// Sends a chat request of `tokens` tokens with a priority; returns the response.
async fn chat_as(
    gw: std::net::SocketAddr,
    model: &str,
    prio: &str,
    stream: bool,
    tokens: u64,
) -> reqwest::Response {
    let mut body = chat_body(model, stream);
    body["max_tokens"] = json!(tokens);
    chat_with(gw, &body, &[("x-mofa-priority", prio)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_low_priority_and_serves_critical_and_high() {
    const N: usize = 4;
    // 10 tokens at 50/s: about 200 ms a request; N at a time.
    let sim_url = slow_sim("m", 50.0, N).await;
    let gw = GatewayBuilder::new()
        .admission(|a| a.max_queue(8).max_queue_wait_ms(5000))
        .model("m", |m| {
            m.deployment(Deployment::local(&sim_url).max_concurrency(N as u64))
        })
        .start()
        .await;
    let prios = ["low", "normal", "high", "critical"];
    // Requests answered and read to their end (served or rejected).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..10 * N {
        // Lows and normals first, then the important ones: these must displace queued lows.
        let prio = match i {
            i if i < 16 => "low",
            i if i < 32 => "normal",
            i if i < 36 => "high",
            _ => "critical",
        };
        let stream = i % 2 == 0;
        let finished = Finished(done.clone());
        tasks.push(tokio::spawn(async move {
            let _finished = finished;
            let resp = chat_as(gw, "m", prio, stream, 10).await;
            let status = resp.status().as_u16();
            if status == 200 {
                assert_eq!(assert_stamped(&resp), "local(m)");
                if stream {
                    let text = resp.text().await.unwrap();
                    let (data, err) = sse_events(&text);
                    assert!(
                        !err && data.last().map(String::as_str) == Some("[DONE]"),
                        "{text}"
                    );
                    assert_eq!(data.len(), 13, "role + 10 tokens + finish + [DONE]");
                } else {
                    let v: Value = resp.json().await.unwrap();
                    assert_eq!(v["usage"]["completion_tokens"], 10);
                }
                (prio, None)
            } else {
                (prio, Some(assert_rejected(resp).await))
            }
        }));
        if i == 31 {
            // Let the lows and normals fill the slots and the queue first: each of the 32 is
            // in a slot, queued, or answered.
            let done = done.clone();
            eventually("the first 32 requests placed", WAIT, || {
                let done = done.clone();
                async move {
                    let placed = in_flight(gw, "m").await + queue_depth(gw, "m").await;
                    placed + done.load(std::sync::atomic::Ordering::SeqCst) == 32
                }
            })
            .await;
        }
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let ok = |p: &str| {
        outcomes
            .iter()
            .filter(|(q, r)| *q == p && r.is_none())
            .count()
    };
    let rejected = |p: &str| {
        outcomes
            .iter()
            .filter(|(q, r)| *q == p && r.is_some())
            .count()
    };
    assert_eq!(ok("critical"), 4, "{outcomes:?}");
    assert_eq!(ok("high"), 4, "{outcomes:?}");
    assert!(rejected("low") >= 8, "lows were not shed: {outcomes:?}");
    for (_, r) in &outcomes {
        if let Some(code) = r {
            assert!(
                ["queue_full", "queue_timeout", "capacity_exceeded"].contains(&code.as_str()),
                "{code}"
            );
        }
    }
    assert_eq!(
        ok("low")
            + ok("normal")
            + ok("high")
            + ok("critical")
            + prios.iter().map(|p| rejected(p)).sum::<usize>(),
        10 * N
    );

    // Drained: nothing queued, nothing in flight; the simulator never saw more than N.
    eventually("the gateway and the simulator drained", WAIT, || async {
        in_flight(gw, "m").await == 0 && sim_stats(&sim_url).await["in_flight"] == 0
    })
    .await;
    let a = admin(gw, "orchestrator").await;
    let m = &a["models"]["m"];
    assert_eq!(m["queue"]["depth"], 0, "{a}");
    assert_eq!(m["deployments"][0]["in_flight"], 0, "{a}");
    let stats = sim_stats(&sim_url).await;
    assert!(
        stats["peak_in_flight"].as_u64().unwrap() <= N as u64,
        "{stats}"
    );
    assert_eq!(
        stats["rejected"], 0,
        "the gateway over-committed the backend: {stats}"
    );
    assert_eq!(stats["in_flight"], 0);
}

/// Counts a finished task when dropped (also when its assertions panic).
struct Finished(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_streaming_rejection_is_the_same_503_json() {
    let sim_url = slow_sim("m", 20.0, 0).await;
    let gw = one_slot(&sim_url).await;
    let hold = tokio::spawn(async move { chat_as(gw, "m", "normal", false, 10).await.status() });
    wait_in_flight(gw, "m", 1).await;
    for stream in [true, false] {
        let mut body = chat_body("m", stream);
        body["max_tokens"] = json!(1);
        let resp = chat_with(gw, &body, &[("x-mofa-max-wait-ms", "0")]).await;
        assert_eq!(
            assert_rejected(resp).await,
            "capacity_exceeded",
            "stream={stream}"
        );
    }
    assert_eq!(hold.await.unwrap(), 200);
}

#[tokio::test]
async fn a_queued_request_times_out_at_its_own_deadline() {
    let sim_url = slow_sim("m", 10.0, 0).await;
    let gw = one_slot(&sim_url).await;
    let hold = tokio::spawn(async move { chat_as(gw, "m", "normal", false, 10).await.status() });
    wait_in_flight(gw, "m", 1).await;
    let start = Instant::now();
    let resp = chat_with(gw, &chat_body("m", true), &[("x-mofa-max-wait-ms", "300")]).await;
    let waited = start.elapsed();
    assert_eq!(assert_rejected(resp).await, "queue_timeout");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert_eq!(hold.await.unwrap(), 200);
    // A waiter that was served: queued behind the holder, then run.
    let hold = tokio::spawn(async move { chat_as(gw, "m", "normal", false, 3).await.status() });
    wait_in_flight(gw, "m", 1).await;
    let resp = chat_as(gw, "m", "normal", false, 1).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(hold.await.unwrap(), 200);
}

#[tokio::test]
async fn priority_comes_from_header_or_body_and_is_not_forwarded() {
    let sim_url = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .local_model("m", &sim_url)
        .start()
        .await;
    let mut body = chat_body("m", false);
    body["priority"] = json!("critical");
    body["extra"] = json!(1);
    let resp = chat(gw, &body).await;
    assert_eq!(resp.status(), 200);
    let got = sim_last_request(&sim_url).await["body"].clone();
    assert!(got.get("priority").is_none(), "{got}");
    assert_eq!(got["extra"], 1);

    // Issue 9 item 7: a `priority` that is not one of the gateway's words is the backend's
    // (vLLM's integer, say) and passes through; a bad header names the header.
    body["priority"] = json!("urgent");
    let resp = chat(gw, &body).await;
    assert_eq!(resp.status(), 200);
    let got = sim_last_request(&sim_url).await["body"].clone();
    assert_eq!(got["priority"], "urgent", "{got}");
    let resp = chat_as(gw, "m", "asap", false, 1).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(envelope(resp).await["param"], "x-mofa-priority");
    let resp = chat_with(
        gw,
        &chat_body("m", false),
        &[("x-mofa-max-wait-ms", "soon")],
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(envelope(resp).await["param"], "x-mofa-max-wait-ms");
}

/// A gateway whose model `m` has one local deployment at `url` with one slot.
async fn one_slot(url: &str) -> std::net::SocketAddr {
    GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(url).max_concurrency(1))
        })
        .start()
        .await
}

/// Two simulators: one `local`, one standing in for a cloud provider.
async fn local_and_cloud(policy: &str) -> (std::net::SocketAddr, String, String) {
    let local = slow_sim("m", 20.0, 0).await;
    let cloud = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .routing(|r| r.cost_max_queue_wait_ms(0))
        .model("m", |m| {
            m.policy(policy)
                .deployment(Deployment::local(&local).max_concurrency(1))
                .deployment(Deployment::cloud("sim-cloud", &cloud).price_per_1k_tokens(0.5))
        })
        .start()
        .await;
    (gw, local, cloud)
}

async fn backend_of(gw: std::net::SocketAddr, headers: &[(&str, &str)]) -> String {
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1
    });
    let resp = chat_with(gw, &body, headers).await;
    let status = resp.status();
    let backend = assert_stamped(&resp);
    if status == 200 {
        backend
    } else {
        format!(
            "{backend}:{}",
            envelope(resp).await["code"].as_str().unwrap()
        )
    }
}

/// Occupies the single local slot for about a second.
fn hold_local(gw: std::net::SocketAddr) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let resp = chat_as(gw, "m", "normal", false, 20).await;
        assert_eq!(resp.status(), 200);
        resp.headers()["x-mofa-backend"]
            .to_str()
            .unwrap()
            .to_string()
    })
}

#[tokio::test]
async fn local_first_falls_back_to_cloud_when_local_is_busy() {
    let (gw, _, _) = local_and_cloud("local-first").await;
    assert_eq!(backend_of(gw, &[]).await, "local(m)");
    let h = hold_local(gw);
    wait_in_flight(gw, "m", 1).await;
    assert_eq!(backend_of(gw, &[]).await, "cloud(sim-cloud)");
    assert_eq!(h.await.unwrap(), "local(m)");
}

#[tokio::test]
async fn local_only_and_cloud_only_never_cross() {
    let (gw, _, _) = local_and_cloud("local-only").await;
    let h = hold_local(gw);
    wait_in_flight(gw, "m", 1).await;
    assert_eq!(
        backend_of(gw, &[("x-mofa-max-wait-ms", "0")]).await,
        "rejected:capacity_exceeded"
    );
    h.await.unwrap();
    let (gw, _, _) = local_and_cloud("cloud-only").await;
    for _ in 0..3 {
        assert_eq!(backend_of(gw, &[]).await, "cloud(sim-cloud)");
    }
}

#[tokio::test]
async fn cost_prefers_free_local_and_pays_for_cloud_only_when_local_is_busy() {
    let (gw, _, _) = local_and_cloud("cost").await;
    assert_eq!(backend_of(gw, &[]).await, "local(m)");
    let h = hold_local(gw);
    wait_in_flight(gw, "m", 1).await;
    // cost_max_queue_wait_ms = 0: not worth waiting for local.
    assert_eq!(backend_of(gw, &[]).await, "cloud(sim-cloud)");
    h.await.unwrap();
}

#[tokio::test]
async fn latency_prefers_the_deployment_with_the_fastest_first_byte() {
    let slow = sim(SimOptions {
        ttft: Duration::from_millis(150),
        ..sim_opts("m")
    })
    .await;
    let fast = sim(SimOptions {
        ttft: Duration::from_millis(5),
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.policy("latency")
                .deployment(Deployment::local(&slow).variant("slow"))
                .deployment(Deployment::local(&fast).variant("fast"))
        })
        .start()
        .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(backend_of(gw, &[]).await);
    }
    // Each is tried once (nothing observed yet), then the fast one wins every time.
    assert!(seen[..2].contains(&"local(m@slow)".to_string()), "{seen:?}");
    assert!(seen[2..].iter().all(|b| b == "local(m@fast)"), "{seen:?}");
    let a = admin(gw, "orchestrator").await;
    let ttfb = a["models"]["m"]["deployments"][0]["ttfb_ms_ewma"]
        .as_f64()
        .unwrap();
    assert!(ttfb >= 150.0, "{a}");
}

/// A ladder f16 (60 MB) / q8 (35) / q4 (20) beside model `other` (50 MB), in a budget of 100 MB.
/// `other` is kept busy (so it cannot be evicted) by a request of about a second, returned.
async fn ladder() -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<reqwest::StatusCode>,
) {
    let s = sim(sim_opts("m")).await;
    let o = slow_sim("other", 20.0, 0).await;
    let variant = |name: &str, mb: u64| Deployment::local(&s).variant(name).memory_mb(mb);
    let gw = GatewayBuilder::new()
        .admission(|a| a.memory_capacity_mb(100))
        .model("other", |m| {
            m.policy("local-only")
                .deployment(Deployment::local(&o).memory_mb(50))
        })
        .model("m", |m| {
            m.policy("degradation-ladder")
                .deployment(variant("f16", 60))
                .deployment(variant("q8", 35))
                .deployment(variant("q4", 20))
        })
        .start()
        .await;
    let busy =
        tokio::spawn(async move { chat_as(gw, "other", "normal", false, 20).await.status() });
    wait_in_flight(gw, "other", 1).await;
    (gw, busy)
}

#[tokio::test]
async fn ladder_steps_down_to_the_precision_that_fits() {
    // 50 resident and busy: f16 would make 110 (over 90), q8 85 (defer band), q4 70 (fits).
    let (gw, busy) = ladder().await;
    let resp = chat_as(gw, "m", "normal", false, 1).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mofa-backend"], "local(m@q4)");
    assert_eq!(resp.headers()["x-mofa-precision"], "q4");
    // q4 is now resident: it keeps serving.
    assert_eq!(backend_of(gw, &[]).await, "local(m@q4)");
    let a = admin(gw, "orchestrator").await;
    assert_eq!(a["memory"]["resident_mb"], 70, "{a}");
    assert_eq!(busy.await.unwrap(), 200);

    // A high-priority request skips the defer band: q8 (85) is admitted.
    let (gw, busy) = ladder().await;
    assert_eq!(
        backend_of(gw, &[("x-mofa-priority", "high")]).await,
        "local(m@q8)"
    );
    assert_eq!(busy.await.unwrap(), 200);
    // Once `other` is idle, idle models may be evicted to load the highest precision.
    assert_eq!(
        backend_of(gw, &[("x-mofa-priority", "high")]).await,
        "local(m@f16)"
    );
    let (gw, busy) = ladder().await;
    assert_eq!(busy.await.unwrap(), 200);
    assert_eq!(backend_of(gw, &[]).await, "local(m@f16)");
    let a = admin(gw, "orchestrator").await;
    assert_eq!(a["memory"]["resident_mb"], 60, "{a}");
}

#[tokio::test]
async fn memory_rejections_defer_and_eviction() {
    let s = sim(SimOptions {
        models: vec!["big".into(), "huge".into(), "mid".into()],
        ..Default::default()
    })
    .await;
    let o = slow_sim("other", 20.0, 0).await;
    fn local(url: &str, mb: u64) -> impl FnOnce(Model) -> Model + '_ {
        move |m| m.deployment(Deployment::local(url).memory_mb(mb))
    }
    let gw = GatewayBuilder::new()
        .admission(|a| a.memory_capacity_mb(100).max_queue_wait_ms(2000))
        .routing(|r| r.policy("local-only"))
        .model("other", local(&o, 50))
        .model("big", local(&s, 45))
        .model("huge", local(&s, 500))
        .model("mid", local(&s, 30))
        .start()
        .await;

    // Larger than the budget: never, and the SDK is told not to retry.
    let resp = chat(gw, &chat_body("huge", true)).await;
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(assert_rejected(resp).await, "model_too_large");

    // `other` (50) busy for about a second, so it cannot be evicted.
    let busy =
        tokio::spawn(async move { chat_as(gw, "other", "normal", false, 20).await.status() });
    wait_in_flight(gw, "other", 1).await;
    // 50 + 30 = 80: the defer band. A normal request waits for memory, then times out.
    let start = Instant::now();
    let resp = chat_with(
        gw,
        &chat_body("mid", false),
        &[("x-mofa-max-wait-ms", "300")],
    )
    .await;
    assert_eq!(assert_rejected(resp).await, "queue_timeout");
    assert!(start.elapsed() >= Duration::from_millis(300));
    // 50 + 45 = 95: over the reject line, for every priority while `other` is busy.
    for prio in ["high", "critical"] {
        let resp = chat_as(gw, "big", prio, false, 1).await;
        assert_eq!(assert_rejected(resp).await, "memory_exhausted");
    }
    // A waiter for memory is served as soon as `other` finishes and can be evicted.
    let waiter = tokio::spawn(async move { chat(gw, &chat_body("mid", false)).await.status() });
    assert_eq!(busy.await.unwrap(), 200);
    assert_eq!(waiter.await.unwrap(), 200);
    let a = admin(gw, "orchestrator").await;
    assert_eq!(a["memory"]["resident_mb"], 30, "{a}");
}

#[tokio::test]
async fn admin_view_shows_queue_in_flight_and_memory() {
    let sim_url = slow_sim("m", 20.0, 0).await;
    let gw = one_slot(&sim_url).await;
    let h = hold_local(gw);
    wait_in_flight(gw, "m", 1).await;
    let waiter = tokio::spawn(async move { chat_as(gw, "m", "high", false, 1).await.status() });
    wait_queued(gw, "m", 1).await;
    let a = admin(gw, "orchestrator").await;
    let m = &a["models"]["m"];
    assert_eq!(m["policy"], "local-first");
    assert_eq!(m["queue"]["depth"], 1, "{a}");
    assert_eq!(m["queue"]["by_priority"]["high"], 1, "{a}");
    assert_eq!(m["deployments"][0]["in_flight"], 1);
    assert_eq!(m["deployments"][0]["max_concurrency"], 1);
    assert_eq!(m["deployments"][0]["backend"], "local(m)");
    assert_eq!(a["memory"]["capacity_mb"], 0);
    h.await.unwrap();
    assert_eq!(waiter.await.unwrap(), 200);
    let a = admin(gw, "orchestrator").await;
    assert_eq!(a["models"]["m"]["completed"], 2);
    assert!(
        a["models"]["m"]["deployments"][0]["service_rate_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_slot_and_queue_place() {
    let sim_url = slow_sim("m", 20.0, 0).await;
    let gw = one_slot(&sim_url).await;
    // A stream the client drops after its first chunk, and a waiter that gives up.
    let resp = chat_as(gw, "m", "normal", true, 40).await;
    assert_eq!(resp.status(), 200);
    let waiter = tokio::spawn(async move { chat_as(gw, "m", "normal", false, 1).await });
    wait_queued(gw, "m", 1).await;
    assert_eq!(
        admin(gw, "orchestrator").await["models"]["m"]["queue"]["depth"],
        1
    );
    waiter.abort();
    drop(resp);
    eventually(
        "the slot, the queue place and the upstream request freed",
        WAIT,
        || async {
            in_flight(gw, "m").await == 0
                && queue_depth(gw, "m").await == 0
                && sim_stats(&sim_url).await["in_flight"] == 0
        },
    )
    .await;
    let a = admin(gw, "orchestrator").await;
    assert_eq!(a["models"]["m"]["queue"]["depth"], 0, "{a}");
    assert_eq!(a["models"]["m"]["deployments"][0]["in_flight"], 0, "{a}");
    let stats = sim_stats(&sim_url).await;
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["cancelled"], 1, "{stats}");
}

//! `Retry-After` over TCP: it tells the truth (the time left in flight and the queue ahead,
//! an honest prior before any observation), `retry-after-ms` carries the exact wait, clients
//! rejected together are spread instead of sent back as one herd, and a request whose
//! deadline passes while its pool model starts is told when the start is expected to end.

mod common;

use std::time::Duration;

use common::*;
use mofa_gateway::sim::SimOptions;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_mofa-gateway");

/// The `retry-after-ms` of a 503, checked against its `Retry-After` (the same wait in whole
/// seconds, rounded up, within [1, 60]).
fn retry_after_ms(resp: &reqwest::Response) -> u64 {
    let ms: u64 = resp.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .expect("retry-after-ms is a whole number");
    assert!((100..=60_000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(retry_after(resp), ms.div_ceil(1000).clamp(1, 60));
    ms
}

/// A gateway in front of a sim answering in about `tokens` x 30 ms, one slot, `queue` places.
async fn one_slot(tokens_per_sec: f64, queue: usize) -> std::net::SocketAddr {
    let url = sim(SimOptions {
        tokens_per_sec,
        ..sim_opts("m")
    })
    .await;
    GatewayBuilder::new()
        .admission(|a| a.max_queue(queue as u64).max_queue_wait_ms(20000))
        .model("m", |m| {
            m.deployment(Deployment::local(&url).max_concurrency(1))
        })
        .start()
        .await
}

async fn chat(
    gw: std::net::SocketAddr,
    tokens: u64,
    max_wait_ms: Option<u64>,
) -> reqwest::Response {
    let mut body = chat_body("m", false);
    body["max_tokens"] = json!(tokens);
    let wait = max_wait_ms.map(|w| w.to_string());
    let headers: Vec<(&str, &str)> = wait
        .as_deref()
        .map(|w| ("x-mofa-max-wait-ms", w))
        .into_iter()
        .collect();
    chat_with(gw, &body, &headers).await
}

async fn service_ms(gw: std::net::SocketAddr) -> f64 {
    admin(gw, "orchestrator").await["models"]["m"]["deployments"][0]["service_ms_ewma"]
        .as_f64()
        .expect("a service time was observed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_any_observation_the_wait_is_never_shorter_than_the_slot_was_held() {
    // A slot held ~3 s (60 tokens at 20/s), nothing completed yet.
    let gw = one_slot(20.0, 0).await;
    let long = tokio::spawn(async move { chat(gw, 60, None).await.status() });
    let held = std::time::Instant::now();
    let mut first = None;
    // Look while it runs (it may be asked any time): the wait told covers the 2 s prior and,
    // later, at least as long again as the slot has been held.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = held.elapsed().as_millis() as u64;
        let resp = chat(gw, 1, Some(0)).await;
        // The gateway decided between `before` and `after`: the prior's share is measured
        // against the latest it can have seen (a fixed `before` raced the request's own trip).
        let after = held.elapsed().as_millis() as u64;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-mofa-reject-reason"], "capacity_exceeded");
        let ms = retry_after_ms(&resp);
        assert!(
            ms >= 2000 - after.min(1000),
            "told {ms} ms after {before}..{after} ms held"
        );
        assert!(ms >= before, "told {ms} ms after {before} ms held");
        first.get_or_insert(ms);
    }
    assert_eq!(long.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_rejected_together_is_spread_and_succeeds_when_it_retries_as_told() {
    // ~300 ms a request (10 tokens at 33/s), one slot, three places in the queue: the issue's
    // case of 12 concurrent requests, 8 of which are turned away.
    let gw = one_slot(33.0, 3).await;
    assert_eq!(chat(gw, 10, None).await.status(), 200);
    let one = service_ms(gw).await;

    let mut tasks = Vec::new();
    for i in 0..12u64 {
        tasks.push(tokio::spawn(async move {
            // Arrive in order (a few ms apart), as a burst.
            tokio::time::sleep(Duration::from_millis(5 * i)).await;
            let resp = chat(gw, 10, None).await;
            if resp.status() == 200 {
                return (None, None);
            }
            assert_eq!(resp.status(), 503);
            let ms = retry_after_ms(&resp);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let again = chat(gw, 10, None).await.status();
            (Some(ms), Some(again == 200))
        }));
    }
    let mut told = Vec::new();
    let mut hits = 0;
    for t in tasks {
        if let (Some(ms), Some(hit)) = t.await.unwrap() {
            told.push(ms);
            hits += usize::from(hit);
        }
    }
    assert!(told.len() >= 6, "the burst was turned away: {told:?}");
    // Told apart: no two the same, about one service time between successive ones.
    let mut sorted = told.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        told.len(),
        "the same wait told twice: {told:?}"
    );
    let spread = (sorted[sorted.len() - 1] - sorted[0]) as f64;
    assert!(
        spread >= 0.5 * one * (told.len() - 1) as f64,
        "not spread over the drain time ({one} ms a request): {told:?}"
    );
    assert!(
        hits * 10 >= told.len() * 8,
        "{hits} of {} succeeded on their first retry: {told:?}",
        told.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_during_a_start_is_told_the_observed_start_time() {
    // A model server that takes about a second to start (the shell waits, then execs the sim).
    let line = format!("sleep 1 && exec {BIN} sim --listen {{host}}:{{port}} --model {{model}}");
    let gw = GatewayBuilder::new()
        .model("a", |m| {
            m.deployment(Deployment::command(&["sh", "-c", &line]).startup_timeout_s(30))
        })
        .start()
        .await;
    let ask = |wait: u64| async move {
        let wait = wait.to_string();
        chat_with(gw, &chat_body("a", false), &[("x-mofa-max-wait-ms", &wait)]).await
    };
    // First start, nothing observed: the prior is startup_timeout_s.
    let resp = ask(200).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-mofa-reject-reason"], "queue_timeout");
    assert!(retry_after_ms(&resp) > 20_000);
    // Once it has started (in ~1 s), a restart is expected to take as long.
    assert_eq!(ask(20_000).await.status(), 200);
    let r = post_empty(gw, "/admin/pool/a/unload").await;
    assert_eq!(r.status(), 200);
    let resp = ask(200).await;
    assert_eq!(resp.status(), 503);
    let ms = retry_after_ms(&resp);
    assert!(
        ms < 5_000,
        "told {ms} ms for a start observed to take about 1 s"
    );
}

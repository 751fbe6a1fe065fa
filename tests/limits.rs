//! Per-key rate limits (issue 10): `rpm`, `tpm` (estimated before, settled after from `usage`)
//! and `max_parallel` give 429 with `Retry-After`, `retry-after-ms` and OpenAI's
//! `x-ratelimit-*` headers, after which the request succeeds; and, with a real `redis-server`
//! (Debian's, started here on an ephemeral loopback port without persistence), two gateway
//! processes enforce one limit together, keep answering (`local`) or refuse (`closed`) while
//! Redis is down, share again when it is back, and free a dead replica's in-flight places when
//! its leases expire. The official `openai` SDK retrying a 429 is behind the `external` feature.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mofa_gateway::sim::SimOptions;
use serde_json::{json, Value};

const SECRET: &str = "sk-mofa-limits-test-0123456789abcdef";
const OTHER: &str = "sk-mofa-limits-test-other-0123456789";

/// A config with the client key `team` (SECRET, its limits set by `limits`) and the admin key
/// OTHER.
fn keyed(limits: impl FnOnce(Key) -> Key) -> GatewayBuilder {
    GatewayBuilder::new()
        .admin_key(OTHER)
        .key(limits(Key::new("team", SECRET)))
}

fn auth() -> [(&'static str, String); 1] {
    [("authorization", format!("Bearer {SECRET}"))]
}

async fn keyed_chat(gw: SocketAddr, body: &Value) -> reqwest::Response {
    let a = auth();
    chat_with(gw, body, &[(a[0].0, a[0].1.as_str())]).await
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
        .to_string()
}

fn num(r: &reqwest::Response, name: &str) -> u64 {
    header(r, name).parse().unwrap()
}

/// Asserts a 429 as OpenAI sends it; returns its `retry-after-ms`.
async fn assert_429(r: reqwest::Response, kind: &str) -> (u64, Value) {
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "content-type"), "application/json");
    let secs = num(&r, "retry-after");
    let ms = num(&r, "retry-after-ms");
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    assert!(
        ms >= 1 && ms <= secs * 1000 && ms > (secs - 1) * 1000,
        "{ms} ms vs {secs} s"
    );
    let e = envelope(r).await;
    assert_eq!(e["type"], kind);
    assert_eq!(e["code"], "rate_limit_exceeded");
    (ms, e)
}

/// `GET /admin/orchestrator` with the admin key.
async fn admin_view(gw: SocketAddr) -> Value {
    get_with(
        gw,
        "/admin/orchestrator",
        &[("authorization", &format!("Bearer {OTHER}"))],
    )
    .await
    .json()
    .await
    .unwrap()
}

fn chat_tokens(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}],
           "max_tokens": max_tokens})
}

#[tokio::test]
async fn rpm_gives_429_with_headers_and_retry_after_is_when_it_fits() {
    let up = sim(sim_opts("m")).await;
    let gw = keyed(|k| k.rpm(60)).local_model("m", &up).start().await;
    let r = keyed_chat(gw, &chat_body("m", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(num(&r, "x-ratelimit-limit-requests"), 60);
    let first = num(&r, "x-ratelimit-remaining-requests");
    assert_eq!(first, 59);
    let reset = header(&r, "x-ratelimit-reset-requests");
    assert!(reset.ends_with("ms") || reset.ends_with('s'), "{reset}");
    let mut last = first;
    let mut refused = None;
    for _ in 0..80 {
        let r = keyed_chat(gw, &chat_body("m", false)).await;
        if r.status() == 429 {
            assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 0);
            assert_eq!(num(&r, "x-ratelimit-limit-requests"), 60);
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
        last = num(&r, "x-ratelimit-remaining-requests");
    }
    assert!(last < first, "x-ratelimit-remaining-requests decreases");
    let (ms, e) = assert_429(refused.expect("no 429 within 80 requests"), "requests").await;
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("Limit 60") && msg.contains("Requested 1"),
        "{msg}"
    );
    // A stream gets the same JSON 429 before any byte.
    let r = keyed_chat(gw, &chat_body("m", true)).await;
    if r.status() == 429 {
        assert_429(r, "requests").await;
    }
    // At Retry-After it fits.
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let r = keyed_chat(gw, &chat_body("m", true)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
    assert!(r.text().await.unwrap().contains("[DONE]"));
}

#[tokio::test]
async fn tpm_charges_an_estimate_then_the_usage() {
    let up = sim(sim_opts("m")).await;
    let gw = keyed(|k| k.tpm(60)).local_model("m", &up).start().await;
    // "user" + "hello there": 15 characters, 4 tokens; plus max_tokens.
    let r = keyed_chat(gw, &chat_tokens("m", 5)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(num(&r, "x-ratelimit-limit-tokens"), 60);
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 51);
    let usage: Value = r.json().await.unwrap();
    let used = usage["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 0);
    // A whole minute's allowance does not fit while the first request's usage is charged.
    let r = keyed_chat(gw, &chat_tokens("m", 56)).await;
    let (ms, e) = assert_429(r, "tokens").await;
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("Limit 60") && msg.contains("Requested 60"),
        "{msg}"
    );
    assert!(
        ms <= used * 1000,
        "charged the usage ({used}), not more: {ms} ms"
    );
    // More than a minute's allowance never fits: no retry.
    let r = keyed_chat(gw, &chat_tokens("m", 500)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-should-retry"), "false");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    assert_eq!(keyed_chat(gw, &chat_tokens("m", 56)).await.status(), 200);
}

#[tokio::test]
async fn max_parallel_refuses_with_a_short_retry_and_frees_at_the_end() {
    let slow = sim(SimOptions {
        tokens_per_sec: 4.0,
        ..sim_opts("m")
    })
    .await;
    let gw = keyed(|k| k.max_parallel(1))
        .local_model("m", &slow)
        .start()
        .await;
    let held = keyed_chat(gw, &chat_body("m", true)).await;
    assert_eq!(held.status(), 200);
    let r = keyed_chat(gw, &chat_body("m", false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(num(&r, "retry-after"), 1);
    assert!(num(&r, "retry-after-ms") < 1000, "a short retry");
    let e = envelope(r).await;
    assert_eq!(e["code"], "rate_limit_exceeded");
    // Admission never saw it: one slot taken (the held stream), nobody queued.
    let a = admin_view(gw).await;
    assert_eq!(a["models"]["m"]["queue"]["depth"], 0, "{a}");
    let slots: u64 = a["models"]["m"]["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["in_flight"].as_u64().unwrap())
        .sum();
    assert_eq!(slots, 1, "{a}");
    assert_eq!(a["limits"]["refused"], 1, "{a}");
    drop(held); // the client leaves: the place is freed
    eventually("the in-flight place is freed", WAIT, || async {
        keyed_chat(gw, &chat_body("m", false)).await.status() == 200
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Redis.

/// [`keyed`], its limits counted in `redis` with `redis_failure = failure`.
fn redis_config(
    redis: &Redis,
    failure: &str,
    key_limits: impl FnOnce(Key) -> Key,
) -> GatewayBuilder {
    keyed(key_limits).limits(|l| {
        l.store("redis")
            .redis_url(&redis.url())
            .redis_failure(failure)
            .redis_timeout_ms(200)
    })
}

/// Sends `n` requests through `gws` at once (round robin, 16 at a time); counts the 200s.
async fn hammer(gws: &[SocketAddr], n: usize) -> (u64, Duration) {
    let ok = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (ok, next, gws) = (ok.clone(), next.clone(), gws.to_vec());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                if i >= n {
                    break;
                }
                let r = keyed_chat(gws[i % gws.len()], &chat_body("m", false)).await;
                match r.status().as_u16() {
                    200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    429 => {}
                    s => panic!("unexpected {s}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (ok.load(Ordering::SeqCst), start.elapsed())
}

async fn redis_state(gw: SocketAddr) -> String {
    let v = get_json(&format!("http://{gw}/readyz")).await;
    v["limits"]["redis"].as_str().unwrap_or("").to_string()
}

/// A gateway process for `cfg` (with `store = "redis"`), once it sees Redis up.
async fn replica(cfg: &GatewayBuilder) -> (Binary, SocketAddr) {
    let (proc, gw) = cfg.start_binary().await;
    eventually(
        "redis up",
        WAIT,
        || async move { redis_state(gw).await == "up" },
    )
    .await;
    (proc, gw)
}

#[tokio::test]
async fn two_replicas_share_one_limit_through_redis_and_survive_its_loss() {
    let mut redis = Redis::start().await;
    let up = sim(sim_opts("m")).await;
    let (_a, a) =
        replica(&redis_config(&redis, "local", |k| k.rpm(60)).local_model("m", &up)).await;
    let (_b, b) =
        replica(&redis_config(&redis, "closed", |k| k.rpm(60)).local_model("m", &up)).await;
    let start = Instant::now();

    // One limit for both: 60, plus what refills (1 a second) while the burst lasts, plus one.
    let (ok, took) = hammer(&[a, b], 240).await;
    let bound = 61 + took.as_secs();
    assert!(
        ok >= 60 && ok <= bound,
        "{ok} admitted in {took:?} (bound {bound})"
    );

    // Redis gone: the `local` replica keeps answering from its own buckets, the `closed` one
    // refuses with 503.
    redis.kill();
    // `a`'s local bucket starts where Redis last was (spent but for what refills), not full.
    let local = alternate(&[a], 10).await;
    assert!(local <= 2, "{local} of 10 admitted locally after the burst");
    assert_429(keyed_chat(a, &chat_body("m", false)).await, "requests").await;
    let r = keyed_chat(b, &chat_body("m", false)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-mofa-reject-reason"), "limits_unavailable");
    assert_eq!(envelope(r).await["code"], "limits_unavailable");
    assert_eq!(redis_state(a).await, "down");
    let ready = get_json(&format!("http://{b}/readyz")).await;
    assert_eq!(ready["limits"]["serving_from"], "refusing");

    // Back (empty: no persistence): both go back to Redis by themselves, and share again. What
    // was spent before the outage stays spent: only what refilled since is admitted, not a
    // fresh 60.
    redis.restart().await;
    for gw in [a, b] {
        eventually("redis up again", Duration::from_secs(20), || async move {
            redis_state(gw).await == "up"
        })
        .await;
    }
    let (ok, _) = hammer(&[a, b], 240).await;
    let refilled = start.elapsed().as_secs() + 1;
    assert!(
        ok <= refilled,
        "{ok} admitted after the restart ({refilled} refilled)"
    );
    for gw in [a, b] {
        assert_eq!(redis_state(gw).await, "up");
    }
}

#[tokio::test]
async fn a_killed_replica_frees_its_in_flight_places_when_its_leases_expire() {
    let redis = Redis::start().await;
    let slow = sim(SimOptions {
        tokens_per_sec: 1.0,
        ..sim_opts("slow")
    })
    .await;
    let fast = sim(sim_opts("m")).await;
    let cfg = redis_config(&redis, "local", |k| k.max_parallel(2))
        .local_model("slow", &slow)
        .local_model("m", &fast);
    let (mut c, c_addr) = replica(&cfg).await;
    let (_d, d) = replica(&cfg).await;
    let long = json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 1000, "stream": true});
    let h1 = keyed_chat(c_addr, &long).await;
    let h2 = keyed_chat(c_addr, &long).await;
    assert_eq!((h1.status().as_u16(), h2.status().as_u16()), (200, 200));
    // The places are counted in Redis: the other replica refuses a third.
    let r = keyed_chat(d, &chat_body("m", false)).await;
    assert_eq!(r.status(), 429, "max_parallel shared through Redis");
    c.signal("-KILL");
    c.wait().await;
    drop((h1, h2));
    // The dead replica's leases expire (10 s) and the places are free again.
    eventually("the leases expire", Duration::from_secs(30), || async {
        keyed_chat(d, &chat_body("m", false)).await.status() == 200
    })
    .await;
}

#[tokio::test]
async fn what_one_replica_settles_reaches_the_other_at_once_not_at_lease_expiry() {
    // A replica tells Redis what a finished request gives back (its in-flight place, its
    // token correction) with its next call, or within a few ms: the other replica can use
    // both right away, long before a lease would expire (10 s) or the tokens refill (24 s).
    let redis = Redis::start().await;
    let up = sim(sim_opts("m")).await;
    let cfg = redis_config(&redis, "local", |k| k.max_parallel(1).tpm(1000)).local_model("m", &up);
    let (_a, a) = replica(&cfg).await;
    let (_b, b) = replica(&cfg).await;
    // Estimated at 401 tokens (1600 characters / 4 + max_tokens 1); the sim counts 2.
    let body = json!({"model": "m", "max_tokens": 1,
                      "messages": [{"role": "user", "content": "x".repeat(1600)}]});
    let start = Instant::now();
    for i in 0..12 {
        let gw = if i % 2 == 0 { a } else { b };
        let remaining = eventually_some(
            "served by the other replica",
            Duration::from_secs(2),
            || {
                let body = body.clone();
                async move {
                    let r = keyed_chat(gw, &body).await;
                    match r.status().as_u16() {
                        200 => Some(num(&r, "x-ratelimit-remaining-tokens")),
                        429 => {
                            let e = envelope(r).await;
                            assert_eq!(e["type"], "requests", "only the place may lag: {e}");
                            None
                        }
                        s => panic!("unexpected {s}"),
                    }
                }
            },
        )
        .await;
        // Without the corrections, the third request would not fit.
        assert!(
            remaining >= 1000 - 2 * 401,
            "request {i}: {remaining} tokens left"
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_models_limit_is_shared_through_redis_and_a_keys_refusal_gives_its_charge_back() {
    // The model `m` allows 3 requests a minute from everyone together, counted in Redis; key
    // `team` allows itself 1. A request that `team`'s own limit refuses must not spend the
    // model's allowance (it is given back), whichever replica saw it.
    const FREE: &str = "sk-mofa-limits-test-free-0123456789ab";
    let redis = Redis::start().await;
    let up = sim(sim_opts("m")).await;
    let cfg = keyed(|k| k.rpm(1))
        .key(Key::new("free", FREE))
        .limits(|l| {
            l.store("redis")
                .redis_url(&redis.url())
                .redis_timeout_ms(200)
        })
        .model("m", |m| m.rpm(3).deployment(Deployment::local(&up)));
    let (_a, a) = replica(&cfg).await;
    let (_b, b) = replica(&cfg).await;
    let free = |gw: SocketAddr| async move {
        let h = format!("Bearer {FREE}");
        chat_with(gw, &chat_body("m", false), &[("authorization", h.as_str())]).await
    };
    assert_eq!(keyed_chat(a, &chat_body("m", false)).await.status(), 200);
    // `team` is over its own limit on both replicas: refused, and the model's charge returned.
    assert_429(keyed_chat(b, &chat_body("m", false)).await, "requests").await;
    assert_429(keyed_chat(a, &chat_body("m", false)).await, "requests").await;
    // So the model still has 2 of its 3 for `free`, through either replica...
    assert_eq!(free(b).await.status(), 200);
    assert_eq!(free(a).await.status(), 200);
    // ...and then none, on either: the model's limit is one count for both replicas.
    let (_, e) = assert_429(free(b).await, "requests").await;
    assert!(
        e["message"].as_str().unwrap_or("").contains('3'),
        "names the model's limit: {e}"
    );
    assert_eq!(free(a).await.status(), 429);
}

/// Whether the Redis at `port` answers a PING (a client of the test's own, not a gateway's).
async fn redis_pings(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"+PONG\r\n"
    )
}

/// Sends `n` requests alternating between `gws`, one at a time; counts the 200s (and panics on
/// anything but 200 or 429).
async fn alternate(gws: &[SocketAddr], n: usize) -> u64 {
    let mut ok = 0;
    for i in 0..n {
        let r = keyed_chat(gws[i % gws.len()], &chat_body("m", false)).await;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {}
            s => panic!("request {i}: unexpected {s}: {:?}", r.text().await),
        }
    }
    ok
}

/// A Redis, a sim of model `m`, and two gateway processes with key limits `limits` sharing
/// them through it with `redis_failure = failure`, once both see Redis up.
async fn two_replicas(
    failure: &str,
    limits: impl FnOnce(Key) -> Key,
) -> (Redis, Binary, SocketAddr, Binary, SocketAddr) {
    let redis = Redis::start().await;
    let up = sim(sim_opts("m")).await;
    let cfg = redis_config(&redis, failure, limits).local_model("m", &up);
    let (pa, a) = replica(&cfg).await;
    let (pb, b) = replica(&cfg).await;
    (redis, pa, a, pb, b)
}

/// At most `limit` a minute plus one: what refills (limit/60 a second) while the test runs.
fn window_bound(limit: u64, took: Duration) -> u64 {
    limit + 1 + took.as_secs() * limit / 60
}

#[tokio::test]
async fn replicas_keep_one_limit_across_a_redis_restart_while_idle() {
    // Redis restarts (and forgets everything: no persistence) while both replicas are idle, so
    // their connections are dead without their knowing. Their next calls reconnect at once
    // (not a fall-back to local buckets that each admit the whole limit), and what they
    // admitted before the restart is restored from what they last saw.
    let (mut redis, _a, a, _b, b) = two_replicas("local", |k| k.rpm(20)).await;
    let start = Instant::now();
    let before = alternate(&[a, b], 8).await;
    assert_eq!(before, 8);
    redis.kill();
    redis.restart().await;
    assert_eq!(redis_state(a).await, "up", "an idle replica did not notice");
    let after = alternate(&[a, b], 30).await;
    let bound = window_bound(20, start.elapsed());
    assert!(
        before + after <= bound,
        "{before} before and {after} after the restart (bound {bound})"
    );
    assert!(after >= 20 - before - 1, "only {after} after the restart");
    for gw in [a, b] {
        assert_eq!(redis_state(gw).await, "up", "never fell back");
    }
}

#[tokio::test]
async fn what_a_replica_admits_locally_during_an_outage_is_charged_to_redis_once() {
    let (mut redis, _a, a, _b, b) = two_replicas("local", |k| k.rpm(20)).await;
    let start = Instant::now();
    assert_eq!(alternate(&[a, b], 4).await, 4);
    redis.kill();
    // `a` counts on its local buckets, which start from what Redis last told it: it admits
    // what is left of the limit (16), not a fresh 20.
    let local = alternate(&[a], 30).await;
    assert_eq!(redis_state(a).await, "down");
    assert!(
        (16..=17).contains(&local),
        "{local} admitted locally after 4 of 20 (it saw 3 or 4 of them)"
    );
    redis.restart().await;
    eventually("a sees redis again", WAIT, || async {
        redis_state(a).await == "up"
    })
    .await;
    // `b` was idle: it sees the 4 (restored) and `a`'s local admissions (charged once), so
    // both admit only what refilled since (20 a minute). Without the debt, 12 more.
    let after = alternate(&[b, a], 30).await;
    let refilled = start.elapsed().as_secs() / 3 + 1;
    assert!(
        after <= refilled,
        "4 + {local} local + {after} after recovery (refilled: {refilled})"
    );
}

#[tokio::test]
async fn closed_mode_serves_as_soon_as_redis_answers_a_ping() {
    let (mut redis, _a, a, _b, b) = two_replicas("closed", |k| k.rpm(600)).await;
    assert_eq!(alternate(&[a, b], 2).await, 2);
    // Restarted while both are idle: neither refuses once Redis is back.
    redis.kill();
    redis.restart().await;
    assert!(redis_pings(redis.port).await);
    for gw in [a, b, a, b] {
        let r = keyed_chat(gw, &chat_body("m", false)).await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    // `a` sees the outage (503, limits_unavailable) ...
    redis.kill();
    let r = keyed_chat(a, &chat_body("m", false)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-mofa-reject-reason"), "limits_unavailable");
    assert_eq!(redis_state(a).await, "down");
    // ... and serves again the moment Redis answers a PING, not at its next health probe.
    redis.restart().await;
    assert!(redis_pings(redis.port).await);
    for gw in [a, b, a] {
        let r = keyed_chat(gw, &chat_body("m", false)).await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
}

// ---------------------------------------------------------------------------------------------
// The official SDK (PyPI: only with the `external` feature).

#[cfg(feature = "external")]
#[tokio::test]
async fn official_python_sdk_retries_a_429_and_succeeds() {
    let up = sim(sim_opts("m")).await;
    let gw = keyed(|k| k.rpm(60)).local_model("m", &up).start().await;
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new("bash")
        .arg(format!("{root}/scripts/setup-test-env"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "scripts/setup-test-env failed");
    let python = String::from_utf8(out.stdout).unwrap();
    let out = tokio::process::Command::new(python.trim())
        .arg(format!("{root}/tests/sdk/ratelimit.py"))
        .arg(format!("http://{gw}/v1"))
        .arg(SECRET)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok retried_429"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway refused at least once, and the SDK's retry then went through.
    let v: Value = get_with(
        gw,
        "/admin/orchestrator",
        &[("authorization", &format!("Bearer {OTHER}"))],
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(v["limits"]["refused"].as_u64().unwrap() >= 1, "{v}");
}

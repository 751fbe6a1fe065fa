//! Live configuration with the real binary: a config file changed under a serving gateway and
//! reloaded by `POST /admin/reload`, `SIGHUP` or `--watch` (an atomic rename). Keys, models,
//! deployments and the pool change without a restart and without losing a request; a file
//! that is invalid, or that changes what only a restart can, changes nothing.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use mofa_gateway::sim::SimOptions;
use serde_json::Value;

const ADMIN: &str = "sk-admin-reload-test";

/// A config file in a temporary directory, replaced the way editors and ConfigMaps do: the
/// new text written beside it, then renamed over it.
struct ConfigFile {
    dir: TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = TempDir::new("reload");
        let path = dir.replace("gateway.toml", text);
        ConfigFile { dir, path }
    }

    fn replace(&self, text: &str) {
        self.dir.replace("gateway.toml", text);
    }
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// `POST /admin/reload` with the admin key: its status and body.
async fn reload(gw: std::net::SocketAddr) -> (u16, Value) {
    let auth = bearer(ADMIN);
    let r = post_with(
        gw,
        "/admin/reload",
        &Value::Null,
        &[("authorization", &auth)],
    )
    .await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// An admin view, with the admin key.
async fn admin_view(gw: std::net::SocketAddr, path: &str) -> Value {
    let r = get_with(
        gw,
        &format!("/admin/{path}"),
        &[("authorization", &bearer(ADMIN))],
    )
    .await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn chat_as(
    gw: std::net::SocketAddr,
    model: &str,
    secret: &str,
    stream: bool,
) -> reqwest::Response {
    let auth = bearer(secret);
    chat_with(gw, &chat_body(model, stream), &[("authorization", &auth)]).await
}

/// A slow simulator: each reply takes about `ms` before its first token.
async fn slow_sim(model: &str, ms: u64) -> String {
    sim(SimOptions {
        ttft: Duration::from_millis(ms),
        tokens_per_sec: 20.0,
        ..sim_opts(model)
    })
    .await
}

#[tokio::test]
async fn keys_added_and_revoked_apply_on_the_next_request_and_streams_finish() {
    let upstream = slow_sim("m", 300).await;
    let base = |keys: &[(&str, &str)]| {
        let mut b = GatewayBuilder::new()
            .admin_key(ADMIN)
            .local_model("m", &upstream);
        for (name, secret) in keys {
            b = b.key(Key::new(name, secret));
        }
        b.toml()
    };
    let file = ConfigFile::new(&base(&[("alice", "sk-alice")]));
    let (_bin, gw) = run_gateway_file(&file.path, &[]).await;
    assert_eq!(chat_as(gw, "m", "sk-alice", false).await.status(), 200);
    assert_eq!(chat_as(gw, "m", "sk-bob", false).await.status(), 401);
    // Alice's stream is in flight when her key is revoked.
    let stream =
        tokio::spawn(async move { read_sse(chat_as(gw, "m", "sk-alice", true).await).await });
    wait_until_in_flight(gw, "m", 1).await;
    file.replace(&base(&[("bob", "sk-bob")]));
    let (status, body) = reload(gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"]["keys_added"], serde_json::json!(["bob"]));
    assert_eq!(
        body["changed"]["keys_removed"],
        serde_json::json!(["alice"])
    );
    let summary = body["summary"].as_str().unwrap();
    assert!(
        summary.contains("keys added: bob") && !summary.contains("sk-"),
        "{summary}"
    );
    let r = chat_as(gw, "m", "sk-alice", false).await;
    assert_eq!(r.status(), 401);
    assert_eq!(envelope(r).await["code"], "invalid_api_key");
    assert_eq!(chat_as(gw, "m", "sk-bob", false).await.status(), 200);
    let sse = stream.await.unwrap();
    assert!(
        sse.done(),
        "the revoked key's stream finishes: {}",
        sse.text
    );
    assert!(!sse.named_error, "{}", sse.text);
}

/// Waits until `n` requests of `model` hold a slot (the admin view behind the admin key).
async fn wait_until_in_flight(gw: std::net::SocketAddr, model: &str, n: u64) {
    eventually(&format!("{n} in flight on {model}"), WAIT, || async move {
        let v = admin_view(gw, "orchestrator").await;
        let total: u64 = v["models"][model]["deployments"]
            .as_array()
            .map(|a| a.iter().map(|d| d["in_flight"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        total == n
    })
    .await
}

#[tokio::test]
async fn an_invalid_file_or_a_restart_only_change_leaves_the_old_config_serving() {
    let upstream = sim(sim_opts("m")).await;
    let good = GatewayBuilder::new()
        .admin_key(ADMIN)
        .key(Key::new("alice", "sk-alice"))
        .local_model("m", &upstream);
    let file = ConfigFile::new(&good.toml());
    let (_bin, gw) = run_gateway_file(&file.path, &[]).await;
    let hash = admin_view(gw, "orchestrator").await["config"]["hash"].clone();
    assert!(hash.as_str().is_some_and(|h| h.len() == 12), "{hash}");

    // Invalid: a misspelt key. 400, the key's path named; the old config serves on.
    let bad = good.clone().key(Key::new("bob", "sk-bob")).toml();
    file.replace(&format!("{bad}\n[server]\nlisten_typo = 1\n"));
    let (status, body) = reload(gw).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("running one stays in effect"), "{msg}");
    assert!(msg.contains("server.listen_typo"), "{msg}");
    assert_eq!(chat_as(gw, "m", "sk-alice", false).await.status(), 200);
    assert_eq!(chat_as(gw, "m", "sk-bob", false).await.status(), 401);

    // A restart-only key changed along with a key added: refused whole (409), nothing applied.
    let restart = good
        .clone()
        .key(Key::new("bob", "sk-bob"))
        .server(|s| s.worker_threads(1))
        .toml();
    file.replace(&restart);
    let auth = bearer(ADMIN);
    let r = post_with(
        gw,
        "/admin/reload",
        &Value::Null,
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status(), 409);
    // The SDKs retry a 409; the same file would be refused again.
    assert_eq!(r.headers()["x-should-retry"], "false");
    let body = envelope(r).await;
    assert_eq!(body["code"], "reload_refused");
    let body = serde_json::json!({ "error": body });
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("server.worker_threads") && msg.contains("restart"),
        "{msg}"
    );
    assert_eq!(chat_as(gw, "m", "sk-bob", false).await.status(), 401);
    assert_eq!(admin_view(gw, "orchestrator").await["config"]["hash"], hash);

    // The metrics count each result; config_info names the config in effect.
    let metrics = get_with(gw, "/metrics", &[("authorization", &bearer(ADMIN))])
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"mofa_gateway_config_reloads_total{result="invalid"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"mofa_gateway_config_reloads_total{result="refused"} 1"#),
        "{metrics}"
    );
    let info = format!("mofa_gateway_config_info{{hash={hash}}} 1");
    assert!(metrics.contains(&info), "{info} in {metrics}");

    // Fixed: it applies.
    file.replace(&good.clone().key(Key::new("bob", "sk-bob")).toml());
    let (status, body) = reload(gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(chat_as(gw, "m", "sk-bob", false).await.status(), 200);
    assert_ne!(admin_view(gw, "orchestrator").await["config"]["hash"], hash);
}

#[tokio::test]
async fn a_stream_across_a_reload_of_its_own_deployment_completes_and_new_requests_use_the_new_settings(
) {
    let a = slow_sim("m", 400).await;
    let b = sim(sim_opts("m")).await;
    let with = |url: &str, max: u64| {
        GatewayBuilder::new()
            .model("m", |m| {
                m.deployment(Deployment::local(url).max_concurrency(max))
            })
            .toml()
    };
    let file = ConfigFile::new(&with(&a, 4));
    let (_bin, gw) = run_gateway_file(&file.path, &[]).await;
    let stream = tokio::spawn(async move { read_sse(chat(gw, &chat_body("m", true)).await).await });
    wait_in_flight(gw, "m", 1).await;
    // The same deployment (`local(m)`), another URL and a lower limit.
    file.replace(&with(&b, 1));
    let (status, body) = reload_open(gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["changed"]["models_changed"]["m"]["deployments_changed"],
        serde_json::json!(["local(m)"])
    );
    let view = admin(gw, "orchestrator").await;
    let deps = view["models"]["m"]["deployments"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(deps.len(), 1, "{view}");
    assert_eq!(deps[0]["max_concurrency"], 1);
    assert_eq!(deps[0]["in_flight"], 1, "the stream still holds its slot");
    // max_concurrency 1 with the old stream in flight: a new request waits for it, then runs
    // on the new URL.
    let r = chat(gw, &chat_body("m", false)).await;
    assert_eq!(r.status(), 200);
    let sse = stream.await.unwrap();
    assert!(sse.done(), "{}", sse.text);
    assert_eq!(
        sim_stats(&a).await["requests"],
        1,
        "only the stream ran on the old URL"
    );
    assert_eq!(sim_stats(&b).await["requests"], 1);
}

/// `POST /admin/reload` on a gateway without keys.
async fn reload_open(gw: std::net::SocketAddr) -> (u16, Value) {
    let r = post(gw, "/admin/reload", &Value::Null).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn queued_requests_survive_a_reload_and_are_served() {
    let upstream = slow_sim("m", 600).await;
    let with = |max: u64, extra_model: bool| {
        let mut b = GatewayBuilder::new()
            .admission(|a| a.max_queue_wait_ms(20_000))
            .model("m", |m| {
                m.deployment(Deployment::local(&upstream).max_concurrency(max))
            });
        if extra_model {
            b = b.local_model("other", &upstream);
        }
        b.toml()
    };
    let file = ConfigFile::new(&with(1, false));
    let (_bin, gw) = run_gateway_file(&file.path, &[]).await;
    let mut calls = Vec::new();
    for _ in 0..3 {
        calls.push(tokio::spawn(async move {
            chat(gw, &chat_body("m", false)).await.status().as_u16()
        }));
    }
    wait_in_flight(gw, "m", 1).await;
    wait_queued(gw, "m", 2).await;
    // A reload that does not touch `m`: its queue and its slot are as they were.
    file.replace(&with(1, true));
    assert_eq!(reload_open(gw).await.0, 200);
    assert_eq!(queue_depth(gw, "m").await, 2);
    assert_eq!(in_flight(gw, "m").await, 1);
    // One that raises its limit: the queued requests run at once.
    file.replace(&with(3, true));
    assert_eq!(reload_open(gw).await.0, 200);
    wait_in_flight(gw, "m", 3).await;
    assert_eq!(queue_depth(gw, "m").await, 0);
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn a_removed_models_queued_requests_get_503_and_its_request_in_flight_finishes() {
    let upstream = slow_sim("gone", 800).await;
    let other = sim(sim_opts("kept")).await;
    let both = GatewayBuilder::new()
        .admission(|a| a.max_queue_wait_ms(20_000))
        .model("gone", |m| {
            m.deployment(Deployment::local(&upstream).max_concurrency(1))
        })
        .local_model("kept", &other);
    let file = ConfigFile::new(&both.toml());
    let (_bin, gw) = run_gateway_file(&file.path, &[]).await;
    let running =
        tokio::spawn(async move { chat(gw, &chat_body("gone", false)).await.status().as_u16() });
    wait_in_flight(gw, "gone", 1).await;
    let queued = tokio::spawn(async move { chat(gw, &chat_body("gone", false)).await });
    wait_queued(gw, "gone", 1).await;
    file.replace(&GatewayBuilder::new().local_model("kept", &other).toml());
    let (status, body) = reload_open(gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["changed"]["models_removed"],
        serde_json::json!(["gone"])
    );
    let r = queued.await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(retry_after(&r) >= 1);
    assert_eq!(envelope(r).await["code"], "no_healthy_backend");
    assert_eq!(
        running.await.unwrap(),
        200,
        "the request in flight finishes"
    );
    let r = chat(gw, &chat_body("gone", false)).await;
    assert_eq!(r.status(), 404);
    let list = get(gw, "/v1/models").await.json::<Value>().await.unwrap();
    assert_eq!(model_ids(&list), ["kept"]);
    assert_eq!(chat(gw, &chat_body("kept", false)).await.status(), 200);
}

#[tokio::test]
async fn an_unchanged_pool_server_keeps_its_pid_and_a_removed_one_is_stopped() {
    let cfg = |with_b: bool| {
        let mut b = GatewayBuilder::new()
            .admission(|a| a.memory_capacity_mb(100))
            .model("a", |m| {
                m.deployment(
                    Deployment::sim_command(&[])
                        .memory_mb(10)
                        .startup_timeout_s(20),
                )
            });
        if with_b {
            b = b.model("b", |m| {
                m.deployment(
                    Deployment::sim_command(&[])
                        .memory_mb(10)
                        .startup_timeout_s(20),
                )
            });
        }
        b.toml()
    };
    let file = ConfigFile::new(&cfg(true));
    let (_bin, gw) = run_gateway_file(&file.path, &[]).await;
    assert_eq!(chat(gw, &chat_body("a", false)).await.status(), 200);
    assert_eq!(chat(gw, &chat_body("b", false)).await.status(), 200);
    let pid_of = |pool: &Value, name: &str| {
        pool["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["pid"].as_u64())
    };
    let pool = admin(gw, "pool").await;
    let (pa, pb) = (
        pid_of(&pool, "a").expect("a runs"),
        pid_of(&pool, "b").expect("b runs"),
    );
    // `b` removed, `a` unchanged.
    file.replace(&cfg(false));
    assert_eq!(reload_open(gw).await.0, 200);
    let pool = admin(gw, "pool").await;
    assert_eq!(pid_of(&pool, "a"), Some(pa), "{pool}");
    assert_eq!(chat(gw, &chat_body("a", false)).await.status(), 200);
    eventually("the removed model's server stops", WAIT, || async move {
        !std::path::Path::new(&format!("/proc/{pb}")).exists()
            || std::fs::read_to_string(format!("/proc/{pb}/stat")).is_ok_and(|s| s.contains(") Z "))
    })
    .await;
    assert_eq!(pid_of(&admin(gw, "pool").await, "b"), None);
}

/// A simulator that serves models `m` and `n`.
async fn two_model_sim() -> String {
    sim(SimOptions {
        models: vec!["m".into(), "n".into()],
        ..Default::default()
    })
    .await
}

/// A config with model `m`, and one with `m` and `n`, both on `upstream`.
fn m_then_m_and_n(upstream: &str) -> (String, String) {
    let m = GatewayBuilder::new().local_model("m", upstream);
    (m.toml(), m.local_model("n", upstream).toml())
}

#[tokio::test]
async fn sighup_reloads_the_file() {
    let upstream = two_model_sim().await;
    let (only_m, m_and_n) = m_then_m_and_n(&upstream);
    let file = ConfigFile::new(&only_m);
    let (bin, gw) = run_gateway_file(&file.path, &[]).await;
    assert_eq!(chat(gw, &chat_body("n", false)).await.status(), 404);
    file.replace(&m_and_n);
    bin.signal("-HUP");
    eventually("model n served after SIGHUP", WAIT, || async move {
        chat(gw, &chat_body("n", false)).await.status() == 200
    })
    .await;
    assert_eq!(chat(gw, &chat_body("m", false)).await.status(), 200);
}

#[tokio::test]
async fn watch_reloads_on_an_atomic_rename() {
    let upstream = two_model_sim().await;
    let (only_m, m_and_n) = m_then_m_and_n(&upstream);
    let file = ConfigFile::new(&only_m);
    let (_bin, gw) = run_gateway_file(&file.path, &["--watch"]).await;
    assert_eq!(chat(gw, &chat_body("n", false)).await.status(), 404);
    file.replace(&m_and_n);
    eventually("model n served after the rename", WAIT, || async move {
        chat(gw, &chat_body("n", false)).await.status() == 200
    })
    .await;
    // A broken file in between changes nothing; the next good one applies.
    file.replace("[[models]]\nname = ");
    eventually("the broken file seen and refused", WAIT, || async move {
        let m = get(gw, "/metrics").await.text().await.unwrap();
        m.contains(r#"mofa_gateway_config_reloads_total{result="invalid"} 1"#)
    })
    .await;
    assert_eq!(chat(gw, &chat_body("n", false)).await.status(), 200);
    file.replace(&GatewayBuilder::new().local_model("n", &upstream).toml());
    eventually("model m gone after the next rename", WAIT, || async move {
        chat(gw, &chat_body("m", false)).await.status() == 404
    })
    .await;
}

#[tokio::test]
async fn a_lower_rpm_applies_to_what_the_key_already_spent() {
    let upstream = sim(sim_opts("m")).await;
    // The keys in either order: what a key spent follows its name, not its place.
    let with_rpm = |rpm: u64, bob_first: bool| {
        let (alice, bob) = (
            Key::new("alice", "sk-alice").rpm(rpm),
            Key::new("bob", "sk-bob").rpm(rpm),
        );
        let b = GatewayBuilder::new().admin_key(ADMIN);
        let b = if bob_first {
            b.key(bob).key(alice)
        } else {
            b.key(alice).key(bob)
        };
        b.local_model("m", &upstream).toml()
    };
    let file = ConfigFile::new(&with_rpm(60, false));
    let (_bin, gw) = run_gateway_file(&file.path, &[]).await;
    for _ in 0..5 {
        assert_eq!(chat_as(gw, "m", "sk-alice", false).await.status(), 200);
    }
    // rpm 60 -> 3: alice spent 5 in this minute, so she is over; bob spent nothing.
    file.replace(&with_rpm(3, true));
    let (status, body) = reload(gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["changed"]["keys_changed"],
        serde_json::json!(["bob", "alice"]),
        "in the new file's order"
    );
    let r = chat_as(gw, "m", "sk-alice", false).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
    assert!(retry_after(&r) >= 1);
    for _ in 0..3 {
        assert_eq!(chat_as(gw, "m", "sk-bob", false).await.status(), 200);
    }
    assert_eq!(chat_as(gw, "m", "sk-bob", false).await.status(), 429);
}

#[tokio::test]
async fn watch_sees_a_new_keys_file() {
    let upstream = sim(sim_opts("m")).await;
    let keys = |name: &str, secret: &str| {
        format!(
            "[[keys]]\nname = \"{name}\"\nhash = \"{}\"\n",
            key_hash(secret)
        )
    };
    let file = ConfigFile::new(&format!(
        "[auth]\nmode = \"keys\"\nkeys_file = \"keys.toml\"\n\n{}",
        GatewayBuilder::new().local_model("m", &upstream).toml()
    ));
    let replace_keys = |text: String| {
        file.dir.replace("keys.toml", &text);
    };
    replace_keys(keys("alice", "sk-alice"));
    let (_bin, gw) = run_gateway_file(&file.path, &["--watch"]).await;
    assert_eq!(chat_as(gw, "m", "sk-alice", false).await.status(), 200);
    replace_keys(keys("bob", "sk-bob"));
    eventually(
        "bob's key works after the keys file changed",
        WAIT,
        || async move { chat_as(gw, "m", "sk-bob", false).await.status() == 200 },
    )
    .await;
    assert_eq!(chat_as(gw, "m", "sk-alice", false).await.status(), 401);
}

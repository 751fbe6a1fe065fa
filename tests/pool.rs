//! The model pool with real processes: `mofa-gateway sim` launched by the gateway as a managed
//! local model server. Start on demand, one start for concurrent requests, eviction order,
//! idle TTL, crashes, failed starts, admin load/unload, and no orphans.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mofa-gateway");

/// A managed deployment running `mofa-gateway sim` for the model (with `sim_args` after its
/// own), taking `mb` of memory.
fn managed(mb: u64, sim_args: &[&str]) -> Deployment {
    Deployment::sim_command(sim_args)
        .memory_mb(mb)
        .startup_timeout_s(20)
}

/// Budget 100 MB; loads may fill it to 90.
fn budget() -> GatewayBuilder {
    GatewayBuilder::new().admission(|a| {
        a.memory_capacity_mb(100)
            .defer_threshold(0.9)
            .reject_threshold(0.9)
    })
}

/// [`budget`] with models named `names`, each a [`managed`] deployment of 40 MB.
fn managed_40(names: &[&str]) -> GatewayBuilder {
    names.iter().fold(budget(), |b, name| {
        b.model(name, |m| m.deployment(managed(40, &[])))
    })
}

async fn pool(gw: SocketAddr) -> Vec<Value> {
    admin(gw, "pool").await["models"]
        .as_array()
        .unwrap()
        .clone()
}

async fn proc_of(gw: SocketAddr, name: &str) -> Value {
    pool(gw)
        .await
        .into_iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in the pool"))
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

async fn chat_ok(gw: SocketAddr, model: &str) -> reqwest::Response {
    let resp = chat(gw, &chat_body(model, false)).await;
    assert_eq!(resp.status(), 200, "{model}");
    resp
}

#[tokio::test]
async fn starts_on_demand_once_for_concurrent_requests() {
    let gw = managed_40(&["a"]).start().await;
    let p = proc_of(gw, "a").await;
    assert_eq!(p["state"], "stopped");
    assert!(p["pid"].is_null());

    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(async move {
            let resp = chat(gw, &chat_body("a", i % 2 == 0)).await;
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-mofa-backend"], "local(a)");
            resp.text().await.unwrap()
        }));
    }
    for t in tasks {
        assert!(!t.await.unwrap().is_empty());
    }
    let p = proc_of(gw, "a").await;
    assert_eq!(p["state"], "ready", "{p}");
    assert_eq!(p["starts"], 1, "one start for all: {p}");
    assert_eq!(p["restarts"], 0);
    assert!(alive(p["pid"].as_u64().unwrap()));
    assert!(
        p["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("listening")),
        "{p}"
    );
}

#[tokio::test]
async fn evicts_the_least_recently_used_idle_model_to_fit() {
    // Two of the three fit (80 <= 90); the third needs one evicted.
    let gw = managed_40(&["a", "b", "c"]).start().await;
    chat_ok(gw, "a").await;
    chat_ok(gw, "b").await;
    chat_ok(gw, "a").await; // a is now the more recently used
    let b_pid = proc_of(gw, "b").await["pid"].as_u64().unwrap();
    chat_ok(gw, "c").await;
    eventually("b evicted", WAIT, || async {
        proc_of(gw, "b").await["state"] == "stopped"
    })
    .await;
    assert_eq!(proc_of(gw, "a").await["state"], "ready");
    assert_eq!(proc_of(gw, "c").await["state"], "ready");
    assert!(!alive(b_pid), "evicted process {b_pid} still runs");
    let a = admin(gw, "orchestrator").await;
    assert_eq!(a["memory"]["resident_mb"], 80, "{a}");
}

#[tokio::test]
async fn a_model_with_requests_in_flight_is_never_evicted() {
    let gw = budget()
        .model("a", |m| {
            m.deployment(managed(40, &["--tokens-per-sec", "20"]))
        })
        .model("b", |m| m.deployment(managed(40, &[])))
        .model("c", |m| m.deployment(managed(40, &[])))
        .start()
        .await;
    chat_ok(gw, "a").await;
    chat_ok(gw, "b").await;
    // `a` (the least recently used) busy with a stream of about a second.
    let mut body = chat_body("a", true);
    body["max_tokens"] = serde_json::json!(20);
    let stream = tokio::spawn(async move {
        let resp = chat(gw, &body).await;
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    });
    wait_in_flight(gw, "a", 1).await;
    chat_ok(gw, "c").await;
    eventually("b evicted", WAIT, || async {
        proc_of(gw, "b").await["state"] == "stopped"
    })
    .await;
    assert_eq!(proc_of(gw, "a").await["state"], "ready");
    let text = stream.await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[tokio::test]
async fn an_idle_model_is_stopped_after_its_ttl() {
    let gw = budget()
        .model("a", |m| m.deployment(managed(40, &[]).idle_ttl_s(1)))
        .start()
        .await;
    chat_ok(gw, "a").await;
    let pid = proc_of(gw, "a").await["pid"].as_u64().unwrap();
    eventually(
        "a stopped after its idle TTL",
        Duration::from_secs(5),
        || async { proc_of(gw, "a").await["state"] == "stopped" },
    )
    .await;
    assert!(!alive(pid));
    let a = admin(gw, "orchestrator").await;
    assert_eq!(a["memory"]["resident_mb"], 0, "{a}");
    // And it starts again on the next request.
    chat_ok(gw, "a").await;
    assert_eq!(proc_of(gw, "a").await["starts"], 2);
}

#[tokio::test]
async fn a_killed_model_fails_its_requests_and_restarts_on_the_next() {
    let gw = budget()
        .model("a", |m| {
            m.deployment(managed(40, &["--tokens-per-sec", "20"]))
        })
        .start()
        .await;
    let mut long = chat_body("a", true);
    long["max_tokens"] = serde_json::json!(40);
    let resp = chat(gw, &long).await;
    assert_eq!(resp.status(), 200);
    let pid = proc_of(gw, "a").await["pid"].as_u64().unwrap();
    let mut nonstream = chat_body("a", false);
    nonstream["max_tokens"] = serde_json::json!(40);
    let pending = tokio::spawn(async move { chat(gw, &nonstream).await });
    // Both requests have reached the model server before it is killed.
    let port = proc_of(gw, "a").await["port"].as_u64().unwrap();
    let server = format!("http://127.0.0.1:{port}/v1");
    eventually("both requests at the model server", WAIT, || async {
        sim_stats(&server).await["in_flight"] == 2
    })
    .await;
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();

    // The stream in progress ends with an error event, no [DONE]; the non-stream gets a 502.
    let text = resp.text().await.unwrap();
    let (data, named_error) = sse_events(&text);
    assert!(named_error, "{text}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let r = pending.await.unwrap();
    assert_eq!(r.status(), 502);
    envelope(r).await;
    eventually("a marked failed", Duration::from_secs(5), || async {
        proc_of(gw, "a").await["state"] == "failed"
    })
    .await;

    // The next request restarts it.
    chat_ok(gw, "a").await;
    let p = proc_of(gw, "a").await;
    assert_eq!(p["state"], "ready");
    assert_eq!(p["restarts"], 1);
    assert_ne!(p["pid"].as_u64().unwrap(), pid);
}

#[tokio::test]
async fn a_server_that_never_becomes_ready_is_killed_and_gets_503() {
    let gw = budget()
        .model("dud", |m| {
            m.deployment(
                Deployment::command(&["sh", "-c", "echo not listening on {port}; exec sleep 60"])
                    .memory_mb(10)
                    .startup_timeout_s(1),
            )
        })
        .start()
        .await;
    let start = Instant::now();
    let resp = chat(gw, &chat_body("dud", true)).await;
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-mofa-reject-reason"],
        "backend_start_failed"
    );
    retry_after(&resp);
    let e = envelope(resp).await;
    assert_eq!(e["code"], "backend_start_failed");
    let p = proc_of(gw, "dud").await;
    assert_eq!(p["state"], "failed", "{p}");
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("startup_timeout_s"),
        "{p}"
    );
    assert!(
        p["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("not listening on")),
        "{p}"
    );
    let a = admin(gw, "orchestrator").await;
    assert_eq!(
        a["memory"]["resident_mb"], 0,
        "a failed start frees its memory: {a}"
    );
}

#[tokio::test]
async fn admin_load_and_unload() {
    let gw = budget()
        .model("a", |m| {
            m.deployment(managed(40, &["--tokens-per-sec", "20"]))
        })
        .start()
        .await;
    let r = post_empty(gw, "/admin/pool/a/load").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["state"], "ready");
    let pid = v["pid"].as_u64().unwrap();
    assert!(alive(pid));

    // Busy: unload refused.
    let mut body = chat_body("a", false);
    body["max_tokens"] = serde_json::json!(20);
    let busy = tokio::spawn(async move { chat(gw, &body).await.status() });
    wait_in_flight(gw, "a", 1).await;
    let r = post_empty(gw, "/admin/pool/a/unload").await;
    assert_eq!(r.status(), 409);
    assert_eq!(envelope(r).await["code"], "model_busy");
    assert_eq!(busy.await.unwrap(), 200);

    let r = post_empty(gw, "/admin/pool/a/unload").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "stopped");
    assert!(!alive(pid));
    let r = post_empty(gw, "/admin/pool/nope/load").await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn no_model_server_outlives_the_gateway() {
    for signal in ["-TERM", "-KILL"] {
        let (mut gw_proc, gw) = managed_40(&["a"]).start_binary().await;
        chat_ok(gw, "a").await;
        let pid = proc_of(gw, "a").await["pid"].as_u64().unwrap();
        assert!(alive(pid));
        gw_proc.signal(signal);
        let status = gw_proc.wait().await;
        if signal == "-TERM" {
            assert!(status.success(), "graceful stop exits 0: {status}");
        }
        eventually(
            &format!("model server {pid} gone after the gateway ({signal})"),
            WAIT,
            || async move { !alive(pid) },
        )
        .await;
    }
}

/// The command lines of every live process that holds `marker` in its command line.
fn processes_with(marker: &str) -> Vec<(u64, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(marker) && alive(pid) {
            found.push((pid, cmd));
        }
    }
    found
}

/// Run by [`a_test_binary_that_ends_in_any_way_leaves_no_model_server`] in a process of its
/// own (`MOFA_ORPHAN_MARKER` set): starts pool servers in-process, one of them behind an
/// `sh -c` wrapper, then ends as `MOFA_ORPHAN_END` says: `return` (without any shutdown, as
/// every test does), `panic`, or `hold` (waits to be killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by another test, in a process of its own"]
async fn child_starts_pool_servers_and_ends() {
    let Ok(marker) = std::env::var("MOFA_ORPHAN_MARKER") else {
        return;
    };
    // The shell line of `w`, not a config: its server also answers to the marker.
    let wrapper = format!("exec {BIN} sim --listen {{host}}:{{port}} --model w --model {marker}-w");
    let gw = budget()
        .model("a", |m| m.deployment(managed(20, &["--model", &marker])))
        .model("w", |m| {
            m.deployment(
                Deployment::command(&["sh", "-c", &wrapper])
                    .memory_mb(20)
                    .startup_timeout_s(20),
            )
        })
        .start()
        .await;
    chat_ok(gw, "a").await;
    chat_ok(gw, "w").await;
    let servers = processes_with(&marker)
        .into_iter()
        .filter(|(_, cmd)| cmd.starts_with(&format!("{BIN} sim ")))
        .count();
    assert_eq!(servers, 2, "{:?}", processes_with(&marker));
    println!("SERVERS-UP");
    match std::env::var("MOFA_ORPHAN_END").as_deref() {
        Ok("panic") => panic!("ending with a panic, as asked"),
        Ok("hold") => std::future::pending::<()>().await,
        _ => {}
    }
}

#[tokio::test]
async fn a_test_binary_that_ends_in_any_way_leaves_no_model_server() {
    // The pool's promise, "never leaves a server behind", whatever way the process that owns
    // it ends: a test binary whose in-process gateway is never shut down (its runtime just
    // ends), one that panics, one killed with SIGKILL.
    use tokio::io::AsyncBufReadExt;
    for end in ["return", "panic", "hold"] {
        let marker = format!(
            "orphan-check-{end}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_starts_pool_servers_and_ends",
                "--nocapture",
            ])
            .env("MOFA_ORPHAN_MARKER", &marker)
            .env("MOFA_ORPHAN_END", end)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let up = tokio::time::timeout(patience(WAIT), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains("SERVERS-UP") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(up.ok(), Some(true), "{end}: the servers never came up");
        if end == "hold" {
            child.start_kill().unwrap();
        }
        let status = child.wait().await.unwrap();
        assert_eq!(status.success(), end == "return", "{end}: {status}");
        eventually(
            &format!("{end}: no model server outlives the test binary"),
            Duration::from_secs(5),
            || {
                let marker = marker.clone();
                async move { processes_with(&marker).is_empty() }
            },
        )
        .await;
    }
}

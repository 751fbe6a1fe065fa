//! Conformance with the official OpenAI Python SDK (`openai` from PyPI): the gateway must work
//! with it unchanged. Needs the network the first time, so it only builds with the `external`
//! feature (`cargo test --release --features external`, what `.ci/run` runs). The SDK lives in a
//! venv made by `scripts/setup-test-env` (run by `.ci/run`; run here too if it is missing).
//! It must not reach anything but the gateway on 127.0.0.1 once the venv exists.

mod common;

use std::path::PathBuf;

use common::*;
use mofa_gateway::sim::SimOptions;

/// The venv's python, made on first use.
pub async fn sdk_python() -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new("bash")
        .arg(format!("{root}/scripts/setup-test-env"))
        .output()
        .await
        .expect("run scripts/setup-test-env");
    assert!(
        out.status.success(),
        "scripts/setup-test-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs the named checks of tests/sdk/conformance.py against `base_url`; asserts each passed.
pub async fn run_checks(base_url: &str, checks: &[&str]) {
    let python = sdk_python().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/conformance.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(base_url)
        .args(checks)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("run python");
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

#[tokio::test]
async fn official_python_sdk_works_unchanged() {
    let ok = sim(sim_opts("mofa-sim")).await;
    let cut = sim(SimOptions {
        die_after_tokens: Some(3),
        tokens_per_sec: 100.0,
        ..sim_opts("cut")
    })
    .await;
    let cfg = format!(
        "{}\n{}",
        one_model("mofa-sim", &ok, ""),
        one_model("cut", &cut, "")
    );
    let gw = gateway(&cfg).await;
    run_checks(
        &format!("http://{gw}/v1"),
        &[
            "models",
            "chat",
            "stream",
            "embeddings",
            "not_found",
            "bad_request",
            "stream_cut",
        ],
    )
    .await;
}

#[tokio::test]
async fn official_python_sdk_sees_503_and_retries_after_retry_after() {
    // One slot, no queue: while the slot is held, requests are rejected with 503.
    let slow = sim(SimOptions {
        tokens_per_sec: 10.0,
        ..sim_opts("busy")
    })
    .await;
    let cfg = format!(
        "[admission]\nmax_queue = 0\n{}",
        one_model("busy", &slow, "max_concurrency = 1")
    );
    let gw = gateway(&cfg).await;
    // The script holds the slot from a thread of its own, then calls without and with retries.
    run_checks(&format!("http://{gw}/v1"), &["rejected_503", "retry_503"]).await;
}

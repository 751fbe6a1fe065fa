//! Conformance with the official OpenAI Python SDK (`openai` from PyPI): the gateway must work
//! with it unchanged. Needs the network the first time, so it only builds with the `external`
//! feature (`cargo test --release --features external`, what `.ci/run` runs). The SDK lives in a
//! venv made by `scripts/setup-test-env` on first use (safe when several tests make it at once).
//! It must not reach anything but the gateway on 127.0.0.1 once the venv exists.

mod common;

use common::*;
use mofa_gateway::sim::SimOptions;

/// Runs the named checks of tests/sdk/conformance.py against `base_url`; asserts each passed.
async fn run_checks(base_url: &str, checks: &[&str]) {
    run_sdk_checks("conformance.py", base_url, checks, &[]).await
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
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &ok)
        .local_model("cut", &cut)
        .start()
        .await;
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
    let gw = busy_gateway().await;
    // The script holds the slot from a thread of its own, then calls without and with retries.
    run_checks(&format!("http://{gw}/v1"), &["rejected_503", "retry_503"]).await;
}

/// The SDK in front of a gateway whose model `claude` speaks Anthropic's Messages API upstream
/// (the simulator in its Messages mode); the model `oracle`, the same simulator in its OpenAI
/// mode, says what `claude` must.
#[tokio::test]
async fn official_python_sdk_works_unchanged_on_an_anthropic_deployment() {
    let anthropic = sim(SimOptions {
        api: mofa_gateway::sim::SimApi::Anthropic,
        ..sim_opts("m")
    })
    .await;
    let oracle = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .model("claude", |m| {
            m.deployment(
                Deployment::cloud("anthropic", &anthropic)
                    .api("anthropic")
                    .upstream_model("m"),
            )
        })
        .model("oracle", |m| {
            m.deployment(Deployment::local(&oracle).upstream_model("m"))
        })
        .start()
        .await;
    run_sdk_checks(
        "anthropic_provider.py",
        &format!("http://{gw}/v1"),
        &["chat", "stream", "tools", "stream_tools", "refused"],
        &[],
    )
    .await;
}

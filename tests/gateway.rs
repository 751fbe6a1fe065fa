//! The gateway over real TCP in front of the simulator: the success paths, the forwarding
//! rules, and every row of the error contract (status, envelope, headers).

mod common;

use common::*;
use mofa_gateway::sim::SimOptions;
use serde_json::{json, Value};

#[tokio::test]
async fn chat_non_streaming_is_forwarded_and_stamped() {
    let sim_url = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .local_model("m", &sim_url)
        .start()
        .await;
    let resp = chat_with(
        gw,
        &chat_body("m", false),
        &[("x-request-id", "client-id-123")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "local(m)");
    assert_eq!(resp.headers()["x-request-id"], "client-id-123");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "m");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split(' ').count(), 5, "{content}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // The request id goes upstream too, as x-mofa-request-id.
    assert_eq!(
        sim_last_request(&sim_url).await["request_id"],
        "client-id-123"
    );
}

#[tokio::test]
async fn request_id_is_made_when_missing_or_invalid() {
    let sim_url = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .local_model("m", &sim_url)
        .start()
        .await;
    let a = chat(gw, &chat_body("m", false)).await;
    let b = chat_with(gw, &chat_body("m", false), &[("x-request-id", "has space")]).await;
    let ida = a.headers()["x-request-id"].to_str().unwrap().to_string();
    let idb = b.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(
        ida.starts_with("req-") && idb.starts_with("req-"),
        "{ida} {idb}"
    );
    assert_ne!(ida, idb);
}

#[tokio::test]
async fn chat_streaming_relays_every_chunk_then_done() {
    let sim_url = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .local_model("m", &sim_url)
        .start()
        .await;
    let mut body = chat_body("m", true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = chat(gw, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "local(m)");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let Sse {
        text,
        data,
        named_error,
    } = read_sse(resp).await;
    assert!(!named_error);
    // role, 5 tokens, finish, usage, [DONE]
    assert_eq!(data.len(), 9, "{text}");
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..8]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks[1..6]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content.split(' ').count(), 5);
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[7]["usage"]["completion_tokens"], 5);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
}

#[tokio::test]
async fn completions_embeddings_and_models() {
    let sim_url = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .local_model("m", &sim_url)
        .model("other", |m| m.deployment(Deployment::sim()))
        .start()
        .await;

    let resp = completions(gw, &json!({"model": "m", "prompt": "say", "max_tokens": 3})).await;
    assert_eq!(resp.status(), 200);
    assert_stamped(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().split(' ').count(),
        3
    );

    let resp = embeddings(
        gw,
        &json!({"model": "m", "input": ["a", "b", "c"], "dimensions": 4}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "local(m)");
    let v: Value = resp.json().await.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[2]["index"], 2);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 4);

    let resp = get(gw, "/v1/models").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "gateway");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids = model_ids(&v);
    assert_eq!(ids, ["m", "other"]);

    let resp = get(gw, "/v1/models/other").await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "other");
    assert_eq!(v["object"], "model");

    let resp = get(gw, "/v1/models/nope").await;
    assert_eq!(resp.status(), 404);
    assert_stamped(&resp);
    assert_eq!(envelope(resp).await["code"], "model_not_found");

    // The in-process sim deployment answers too, named sim(other).
    let resp = chat(gw, &chat_body("other", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "sim(other)");

    for path in ["/healthz", "/readyz"] {
        let resp = get(gw, path).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_stamped(&resp);
    }
}

#[tokio::test]
async fn request_is_forwarded_as_sent_with_only_model_rewritten() {
    let sim_url = sim(sim_opts("upstream-name")).await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(&sim_url).upstream_model("upstream-name"))
        })
        .start()
        .await;
    let sent = json!({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:x"}}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "response_format": {"type": "json_object"},
        "logprobs": true, "n": 1, "temperature": 0.25,
        "x_vendor_extension": {"nested": [1, 2, null]},
        "max_tokens": 2
    });
    let resp = chat(gw, &sent).await;
    assert_eq!(resp.status(), 200);
    let got = sim_last_request(&sim_url).await;
    let mut expected = sent.clone();
    expected["model"] = json!("upstream-name");
    assert_eq!(got["body"], expected);
    assert_eq!(got["path"], "/v1/chat/completions");
    // Key order is kept too.
    let keys: Vec<&String> = got["body"].as_object().unwrap().keys().collect();
    let want: Vec<&String> = expected.as_object().unwrap().keys().collect();
    assert_eq!(keys, want);
}

#[tokio::test]
async fn upstream_auth_comes_from_the_deployment_never_the_client() {
    let sim_url = sim(SimOptions {
        api_key: Some("sk-upstream".into()),
        ..sim_opts("m")
    })
    .await;
    let good = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(&sim_url).api_key("${UP_KEY}"))
        })
        .env("UP_KEY", "sk-upstream")
        .start()
        .await;
    let resp = chat_with(
        good,
        &chat_body("m", false),
        &[("authorization", "Bearer sk-client-key")],
    )
    .await;
    assert_eq!(resp.status(), 200);

    // A client key is not passed on: with no deployment key the upstream refuses, and its
    // 401 reaches the client as an envelope with the upstream's status.
    let keyless = GatewayBuilder::new()
        .local_model("m", &sim_url)
        .start()
        .await;
    let resp = chat_with(
        keyless,
        &chat_body("m", false),
        &[("authorization", "Bearer sk-upstream")],
    )
    .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(assert_stamped(&resp), "local(m)");
    let e = envelope(resp).await;
    assert_eq!(e["type"], "authentication_error");
    assert_eq!(e["code"], "invalid_api_key");
}

#[tokio::test]
async fn bad_input_gets_400_404_413_415_405_with_the_envelope() {
    let sim_url = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .server(|s| s.max_body_bytes(2048))
        .local_model("m", &sim_url)
        .start()
        .await;
    const CHAT: &str = "/v1/chat/completions";
    const JSON: Option<&str> = Some("application/json");
    let too_large = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(4096));
    // Each case is a request not yet sent (futures are lazy), its status, code and param.
    type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = reqwest::Response> + 'a>>;
    let chat_json = |body: Value| -> Pending { Box::pin(async move { chat(gw, &body).await }) };
    let cases: Vec<(Pending, u16, &str, Option<&str>)> = vec![
        (
            Box::pin(post_raw(gw, CHAT, JSON, "{\"model\":")),
            400,
            "invalid_json",
            None,
        ),
        (
            Box::pin(post_raw(gw, CHAT, JSON, "[1,2]")),
            400,
            "invalid_json",
            None,
        ),
        (
            chat_json(json!({"messages": [{"role": "user", "content": "x"}]})),
            400,
            "invalid_value",
            Some("model"),
        ),
        (
            chat_json(json!({"model": "m"})),
            400,
            "invalid_value",
            Some("messages"),
        ),
        (
            chat_json(json!({"model": "m", "messages": [{}], "stream": "yes"})),
            400,
            "invalid_value",
            Some("stream"),
        ),
        (
            chat_json(chat_body("nope", false)),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            chat_json(chat_body("nope", true)),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            Box::pin(post_raw(gw, CHAT, JSON, too_large.clone())),
            413,
            "request_too_large",
            None,
        ),
        (
            Box::pin(post_raw(gw, CHAT, Some("text/plain"), "{}")),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            Box::pin(post_raw(gw, CHAT, None, "{}")),
            415,
            "unsupported_media_type",
            None,
        ),
        (Box::pin(get(gw, CHAT)), 405, "method_not_allowed", None),
        (Box::pin(get(gw, "/v2/whatever")), 404, "unknown_url", None),
        (
            Box::pin(async move { embeddings(gw, &json!({"model": "m"})).await }),
            400,
            "invalid_value",
            Some("input"),
        ),
    ];
    for (i, (req, status, code, param)) in cases.into_iter().enumerate() {
        let resp = req.await;
        assert_eq!(resp.status().as_u16(), status, "case {i}");
        assert_eq!(assert_stamped(&resp), "gateway", "case {i}");
        let e = envelope(resp).await;
        assert_eq!(e["code"], code, "case {i}: {e}");
        assert_eq!(e["param"].as_str(), param, "case {i}: {e}");
    }
    // Nothing reached the upstream.
    assert_eq!(sim_stats(&sim_url).await["requests"], 0);
}

#[tokio::test]
async fn a_body_too_large_without_content_length_is_413() {
    let sim_url = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .server(|s| s.max_body_bytes(1024))
        .local_model("m", &sim_url)
        .start()
        .await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b' '; 512])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = post_raw(gw, "/v1/chat/completions", Some("application/json"), body).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(envelope(resp).await["code"], "request_too_large");
}

#[tokio::test]
async fn upstream_refusing_connections_is_502() {
    let gw = GatewayBuilder::new()
        .local_model("m", &dead_url().await)
        .start()
        .await;
    for stream in [false, true] {
        let resp = chat(gw, &chat_body("m", stream)).await;
        assert_eq!(resp.status(), 502, "stream={stream}");
        assert_eq!(assert_stamped(&resp), "local(m)");
        let e = envelope(resp).await;
        assert_eq!(e["type"], "upstream_error");
        assert_eq!(e["code"], "upstream_unavailable");
    }
}

#[tokio::test]
async fn upstream_hanging_is_504() {
    let sim_url = sim(SimOptions {
        hang: true,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(&sim_url).first_byte_timeout_ms(200))
        })
        .start()
        .await;
    for stream in [false, true] {
        let resp = chat(gw, &chat_body("m", stream)).await;
        assert_eq!(resp.status(), 504, "stream={stream}");
        assert_eq!(assert_stamped(&resp), "local(m)");
        let e = envelope(resp).await;
        assert_eq!(e["code"], "upstream_timeout");
    }
    // The gateway dropped its upstream requests when it gave up.
    let stats = eventually_some("both upstream requests cancelled", WAIT, || async {
        let s = sim_stats(&sim_url).await;
        (s["in_flight"] == 0 && s["cancelled"] == 2).then_some(s)
    })
    .await;
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["cancelled"], 2, "{stats}");
}

#[tokio::test]
async fn upstream_500_is_502_and_upstream_overload_is_503_with_retry_after() {
    let failing = sim(SimOptions {
        fail_rate: 1.0,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .local_model("m", &failing)
        .start()
        .await;
    for stream in [false, true] {
        let resp = chat(gw, &chat_body("m", stream)).await;
        assert_eq!(resp.status(), 502);
        assert_eq!(envelope(resp).await["code"], "upstream_unavailable");
    }

    // A simulator at its concurrency limit answers 503 + Retry-After; the client gets a 503
    // with a Retry-After in [1, 60].
    let busy = sim(SimOptions {
        hang: true,
        max_concurrency: 1,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new().local_model("m", &busy).start().await;
    let hold = tokio::spawn(async move { chat(gw, &chat_body("m", false)).await });
    eventually("the simulator's one slot is taken", WAIT, || async {
        sim_stats(&busy).await["in_flight"] == 1
    })
    .await;
    let resp = chat(gw, &chat_body("m", true)).await;
    assert_eq!(resp.status(), 503);
    retry_after(&resp);
    let e = envelope(resp).await;
    assert_eq!(e["type"], "service_unavailable");
    assert_eq!(e["code"], "upstream_overloaded");
    hold.abort();
}

#[tokio::test]
async fn stream_cut_mid_way_ends_with_an_error_event_and_no_done() {
    // Paced, so that each chunk leaves the simulator before it drops the connection.
    let sim_url = sim(SimOptions {
        die_after_tokens: Some(2),
        tokens_per_sec: 100.0,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .local_model("m", &sim_url)
        .start()
        .await;
    let resp = chat(gw, &chat_body("m", true)).await;
    // The first byte had already been relayed: the status is 200, the end is an error event.
    assert_eq!(resp.status(), 200);
    assert_eq!(assert_stamped(&resp), "local(m)");
    let text = resp
        .text()
        .await
        .expect("the gateway ends the stream cleanly");
    let (data, named_error) = sse_events(&text);
    assert!(named_error, "{text}");
    assert!(!data.iter().any(|d| d == "[DONE]"), "{text}");
    // role + 2 tokens relayed, then the error.
    assert_eq!(data.len(), 4, "{text}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_disconnected");
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("local(m)"));

    // Non-streaming: the body broke before the client saw a byte, so it is a 502.
    let resp = chat(gw, &chat_body("m", false)).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(envelope(resp).await["code"], "upstream_unavailable");
}

#[tokio::test]
async fn stream_idle_gap_ends_with_an_error_event() {
    // 2 tokens per second: a gap of 500 ms between chunks, over an idle limit of 150 ms.
    let sim_url = sim(SimOptions {
        tokens_per_sec: 2.0,
        ..sim_opts("m")
    })
    .await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(&sim_url).idle_timeout_ms(150))
        })
        .start()
        .await;
    let resp = chat(gw, &chat_body("m", true)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let (data, named_error) = sse_events(&text);
    assert!(named_error, "{text}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_4xx_is_passed_through_and_wrapped_when_not_an_envelope() {
    let plain = fixed_upstream(422, "text/plain", "field x is wrong").await;
    let gw = GatewayBuilder::new().local_model("m", &plain).start().await;
    let resp = chat(gw, &chat_body("m", true)).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(assert_stamped(&resp), "local(m)");
    let e = envelope(resp).await;
    assert_eq!(e["type"], "invalid_request_error");
    assert!(
        e["message"].as_str().unwrap().contains("field x is wrong"),
        "{e}"
    );

    let own = fixed_upstream(400, "application/json", r#"{"error":{"message":"context too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#).await;
    let gw = GatewayBuilder::new().local_model("m", &own).start().await;
    let resp = chat(gw, &chat_body("m", false)).await;
    assert_eq!(resp.status(), 400);
    let e = envelope(resp).await;
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "messages");
}

#[tokio::test]
async fn upstream_200_carrying_an_error_is_never_a_200() {
    let inband = fixed_upstream(
        200,
        "application/json",
        r#"{"error":{"message":"model crashed"}}"#,
    )
    .await;
    let gw = GatewayBuilder::new()
        .local_model("m", &inband)
        .start()
        .await;
    let resp = chat(gw, &chat_body("m", false)).await;
    assert_eq!(resp.status(), 502);
    let e = envelope(resp).await;
    assert!(
        e["message"].as_str().unwrap().contains("model crashed"),
        "{e}"
    );

    let sse = fixed_upstream(
        200,
        "text/event-stream",
        "data: {\"error\":{\"message\":\"out of memory\"}}\n\n",
    )
    .await;
    let gw = GatewayBuilder::new().local_model("m", &sse).start().await;
    let resp = chat(gw, &chat_body("m", true)).await;
    assert_eq!(resp.status(), 502);
    let e = envelope(resp).await;
    assert!(
        e["message"].as_str().unwrap().contains("out of memory"),
        "{e}"
    );

    let garbage = fixed_upstream(200, "application/json", "<html>proxy login</html>").await;
    let gw = GatewayBuilder::new()
        .local_model("m", &garbage)
        .start()
        .await;
    let resp = chat(gw, &chat_body("m", false)).await;
    assert_eq!(resp.status(), 502);
    envelope(resp).await;
}

/// An upstream that keeps the raw body of the last request and answers a chat completion.
async fn recording_upstream() -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::sync::{Arc, Mutex};
    let last = Arc::new(Mutex::new(Vec::new()));
    let keep = last.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let keep = keep.clone();
        async move {
            *keep.lock().unwrap() = body.to_vec();
            (
                [("content-type", "application/json")],
                r#"{"id":"r","object":"chat.completion","created":0,"model":"x","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), last)
}

#[tokio::test]
async fn a_renamed_model_leaves_every_other_byte_as_sent() {
    // `upstream_model` renames `model` in the raw bytes: integers beyond 2^53, numbers beyond
    // f64, spacing and escapes reach the backend byte for byte; the gateway's `priority` goes.
    let (url, last) = recording_upstream().await;
    let gw = GatewayBuilder::new()
        .model("m", |m| {
            m.deployment(Deployment::local(&url).upstream_model("up/m"))
        })
        .start()
        .await;
    let body = concat!(
        "{ \"seed\": 18446744073709551615,\n  \"model\" : \"m\", \"big\": 1e400, ",
        "\"tiny\": -2.5E-400, \"long\": 123456789012345678901234567890, ",
        "\"messages\": [{\"role\": \"user\", \"content\": \"caf\\u00e9 \\\"model\\\": 1e400\"}],",
        " \"priority\": \"high\", \"temperature\": 0.10000000000000001 }"
    );
    let r = post_raw(gw, "/v1/chat/completions", Some("application/json"), body).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let sent = String::from_utf8(last.lock().unwrap().clone()).unwrap();
    let want = body
        .replace("\"model\" : \"m\"", "\"model\" : \"up/m\"")
        .replace(", \"priority\": \"high\"", "");
    assert_eq!(sent, want);
    // Without a rename nothing is touched at all.
    let (url, last) = recording_upstream().await;
    let gw = GatewayBuilder::new().local_model("m", &url).start().await;
    let plain = body.replace(", \"priority\": \"high\"", "");
    let r = post_raw(
        gw,
        "/v1/chat/completions",
        Some("application/json"),
        plain.clone(),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        String::from_utf8(last.lock().unwrap().clone()).unwrap(),
        plain
    );
    // A number that is not JSON is still refused.
    for bad in ["01", "1e", "-", "1.", "+1", ".5", "1e400e1"] {
        let b = format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}],\"n\":{bad}}}");
        let r = post_raw(gw, "/v1/chat/completions", Some("application/json"), b).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(envelope(r).await["code"], "invalid_json", "{bad}");
    }
}

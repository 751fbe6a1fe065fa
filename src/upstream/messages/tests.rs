use axum::http::header;
use serde_json::{json, Value};

use super::*;
use crate::upstream::api::StreamStats;

fn api() -> MessagesApi {
    MessagesApi::new(None).unwrap()
}

/// The SSE text of Anthropic events, each `(name, data)`.
fn sse(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect()
}

/// The `data:` payloads of OpenAI SSE `text` (`[DONE]` as the string).
fn data_of(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_owned())))
        .collect()
}

fn tool_stream() -> String {
    sse(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [], "stop_reason": null, "usage": {"input_tokens": 20, "output_tokens": 1, "cache_read_input_tokens": 4}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking \"both\"."}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "weather", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Rome\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 3}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 42}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ])
}

/// Feeds `text` to a fresh reader in pieces of `size` bytes (0: whole).
fn run(
    text: &str,
    size: usize,
    include_usage: bool,
) -> (String, StreamStats, Box<dyn StreamReader>) {
    let req = if include_usage {
        json!({"stream": true, "stream_options": {"include_usage": true}})
    } else {
        json!({"stream": true})
    };
    let mut r = api().stream(req.to_string().as_bytes());
    let mut stats = StreamStats::default();
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let size = if size == 0 { bytes.len().max(1) } else { size };
    for piece in bytes.chunks(size) {
        out.extend_from_slice(&r.read(Bytes::copy_from_slice(piece), &mut stats));
    }
    (String::from_utf8(out).unwrap(), stats, r)
}

#[test]
fn a_stream_with_parallel_tool_calls_becomes_openai_chunks() {
    let (text, stats, r) = run(&tool_stream(), 0, true);
    let d = data_of(&text);
    assert_eq!(d.len(), 10, "{text}");
    for c in &d[..9] {
        assert_eq!(c["id"], "msg_1");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "claude-x");
    }
    assert_eq!(
        d[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(
        d[1]["choices"][0]["delta"],
        json!({"content": "Checking \"both\"."})
    );
    assert_eq!(
        d[2]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "id": "toolu_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]})
    );
    assert_eq!(
        d[3]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Pa"}}]})
    );
    assert_eq!(
        d[4]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "ris\"}"}}]})
    );
    assert_eq!(d[5]["choices"][0]["delta"]["tool_calls"][0]["index"], 1);
    assert_eq!(
        d[5]["choices"][0]["delta"]["tool_calls"][0]["id"],
        "toolu_b"
    );
    assert_eq!(d[6]["choices"][0]["delta"]["tool_calls"][0]["index"], 1);
    assert_eq!(d[7]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(d[7]["choices"][0]["delta"], json!({}));
    assert_eq!(d[8]["choices"], json!([]));
    assert_eq!(d[9], json!("[DONE]"));
    // The usage chunk comes before [DONE], with no choices.
    let usage_at = text.find("\"choices\":[]").expect("a usage chunk");
    assert!(usage_at < text.find("[DONE]").unwrap());
    assert!(r.complete());
    assert_eq!(r.error(), None);
    assert_eq!(
        stats.usage,
        Some(Usage {
            prompt_tokens: 24,
            completion_tokens: 42
        })
    );
    assert_eq!(stats.content_events, 4);
}

#[test]
fn the_usage_chunk_only_when_asked() {
    let (with, _, _) = run(&tool_stream(), 0, true);
    let chunk: Value = with
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find(|d| d.contains("\"choices\":[]"))
        .map(|d| serde_json::from_str(d).unwrap())
        .unwrap();
    assert_eq!(
        chunk["usage"],
        json!({"prompt_tokens": 24, "completion_tokens": 42, "total_tokens": 66,
               "prompt_tokens_details": {"cached_tokens": 4}, "cache_read_input_tokens": 4})
    );
    let (without, stats, r) = run(&tool_stream(), 0, false);
    assert!(!without.contains("\"usage\""), "{without}");
    assert!(r.complete());
    // Billed all the same.
    assert_eq!(stats.usage.map(|u| u.completion_tokens), Some(42));
}

/// `text` with every `"created":<seconds>` as `"created":0` (the clock may tick between runs).
fn without_created(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("\"created\":") {
        let (head, tail) = rest.split_at(i + "\"created\":".len());
        out.push_str(head);
        out.push('0');
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

#[test]
fn chunks_split_anywhere_give_the_same_output() {
    let text = tool_stream().replace('\n', "\r\n");
    let (whole, _, _) = run(&text, 0, true);
    let whole = without_created(&whole);
    assert!(whole.contains("\"created\":0,"), "{whole}");
    for size in [1, 2, 3, 7, 64, 1000] {
        let (split, stats, r) = run(&text, size, true);
        assert_eq!(without_created(&split), whole, "pieces of {size}");
        assert!(r.complete());
        assert_eq!(stats.usage.map(|u| u.prompt_tokens), Some(24));
    }
}

#[test]
fn a_text_stream_ends_with_stop_and_done() {
    let text = sse(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_2", "model": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 2}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let (out, stats, r) = run(&text, 5, false);
    let d = data_of(&out);
    let content: String = d
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hi there");
    assert_eq!(d[d.len() - 2]["choices"][0]["finish_reason"], "length");
    assert!(out.ends_with("data: [DONE]\n\n"));
    assert!(r.complete());
    assert_eq!(stats.content_events, 2);
    assert_eq!(
        stats.usage,
        Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 2
        })
    );
}

#[test]
fn a_mid_stream_error_is_one_openai_error_event_and_no_done() {
    let text = format!(
        "{}event: error\ndata: {}\n\n{}",
        sse(&[
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_3", "model": "m", "usage": {"input_tokens": 9}}})
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "par"}})
            ),
        ]),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        sse(&[("message_stop", json!({"type": "message_stop"}))]),
    );
    for size in [0, 1, 13] {
        let (out, stats, r) = run(&text, size, true);
        assert_eq!(r.error(), Some("Overloaded"));
        assert!(!r.complete());
        assert!(!r.error_announced());
        assert!(!out.contains("[DONE]"), "{out}");
        let at = out.find("event: error\ndata: ").expect("an error event");
        let ev: Value = serde_json::from_str(
            out[at..]
                .lines()
                .nth(1)
                .unwrap()
                .strip_prefix("data: ")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ev["error"]["message"], "Overloaded");
        assert_eq!(ev["error"]["code"], "overloaded_error");
        assert_eq!(out.matches("event: error").count(), 1);
        // What it used is still billed: the prompt, and the text it streamed.
        assert_eq!(
            stats.usage,
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 1
            })
        );
        // Before the client got anything, an overload is an overload (fallback, cool-down).
        assert!(matches!(
            r.failure(),
            Some(UpstreamError::Status { status, .. }) if status.as_u16() == 529
        ));
    }
    // An error announced whose data never came: nothing relayed, so the relay's own event
    // is due (the reader says neither error nor announcement).
    let (out, _, r) = run("event: error\n", 0, false);
    assert!(out.is_empty());
    assert_eq!(r.error(), None);
    assert!(!r.error_announced() && !r.complete());
    // Another error type before the first byte: a broken reply.
    let (_, _, r) = run(
        &sse(&[(
            "error",
            json!({"type": "error", "error": {"type": "api_error", "message": "boom"}}),
        )]),
        0,
        false,
    );
    assert!(matches!(r.failure(), Some(UpstreamError::Invalid(m)) if m == "boom"));
}

#[test]
fn broken_events_end_the_stream_with_an_error() {
    let (out, _, r) = run("data: {not json\n\n", 0, false);
    assert!(r.error().is_some());
    assert!(out.starts_with("event: error\n"), "{out}");
    // Arguments for a block that is not a tool call.
    let (_, _, r) = run(
        &sse(&[(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 5, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        )]),
        0,
        false,
    );
    assert!(r.error().is_some());
    // An event larger than the bound, never ended: the reader does not grow past it.
    let mut r = api().stream(b"{}");
    let mut stats = StreamStats::default();
    let piece = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut out = Vec::new();
    out.extend_from_slice(&r.read(Bytes::from_static(b"data: "), &mut stats));
    for _ in 0..(stream::MAX_EVENT / piece.len() + 2) {
        out.extend_from_slice(&r.read(piece.clone(), &mut stats));
    }
    assert!(r.error().is_some_and(|e| e.contains("larger than")));
    assert_eq!(
        String::from_utf8_lossy(&out)
            .matches("event: error")
            .count(),
        1
    );
    // After the error, nothing more.
    assert!(r.read(Bytes::from(tool_stream()), &mut stats).is_empty());
    // Comments, unknown fields and unknown events are ignored.
    let (out, _, r) = run(
        ": keepalive\nid: 7\nretry: 10\nevent: future\ndata: {\"type\":\"future_event\"}\n\n",
        0,
        false,
    );
    assert!(out.is_empty() && r.error().is_none());
}

/// A tiny deterministic generator (xorshift), for the garbage test.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn garbage_never_panics() {
    let real = tool_stream().into_bytes();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..300 {
        let mut bytes = if round % 2 == 0 {
            real.clone()
        } else {
            (0..(xorshift(&mut seed) % 2048))
                .map(|_| xorshift(&mut seed) as u8)
                .collect()
        };
        // Flip, drop and insert bytes (newlines and braces more often than chance).
        for _ in 0..(xorshift(&mut seed) % 16) {
            if bytes.is_empty() {
                break;
            }
            let at = (xorshift(&mut seed) as usize) % bytes.len();
            match xorshift(&mut seed) % 4 {
                0 => bytes[at] = xorshift(&mut seed) as u8,
                1 => {
                    bytes.remove(at);
                }
                2 => bytes.insert(at, b'\n'),
                _ => bytes.insert(at, b'{'),
            }
        }
        let mut r = api().stream(&bytes);
        let mut stats = StreamStats::default();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = 1 + (xorshift(&mut seed) as usize) % 97;
            let (a, b) = rest.split_at(n.min(rest.len()));
            let out = r.read(Bytes::copy_from_slice(a), &mut stats);
            // Whatever comes out is SSE text whose data lines are JSON or [DONE].
            let text = std::str::from_utf8(&out).expect("UTF-8 out");
            for d in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
                assert!(
                    d == "[DONE]" || serde_json::from_str::<Value>(d).is_ok(),
                    "{d}"
                );
            }
            rest = b;
        }
        let _ = r.failure();
        let _ = api().read_reply(Bytes::from(bytes.clone()));
        let _ = api().request_body(Endpoint::ChatCompletions, Bytes::from(bytes));
        let _ = api().classify(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            Bytes::from_static(b"\xff{"),
        );
    }
}

#[test]
fn credentials_version_paths_and_base() {
    let api = api();
    let creds = api.credentials(&Secret::new("sk-ant-x")).unwrap();
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].0, "x-api-key");
    assert!(creds[0].1.is_sensitive());
    assert_eq!(
        api.headers(),
        vec![(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static("2023-06-01")
        )]
    );
    let v = MessagesApi::new(Some("2099-01-01")).unwrap();
    assert_eq!(v.headers()[0].1, "2099-01-01");
    assert!(MessagesApi::new(Some("a\nb")).is_err());
    assert!(api.credentials(&Secret::new("bad\nkey")).is_err());
    assert_eq!(api.path(Endpoint::ChatCompletions), "/v1/messages");
    assert_eq!(api.probe_path(), "/v1/models");
    for url in [
        "https://api.anthropic.com",
        "https://api.anthropic.com/",
        "https://api.anthropic.com/v1",
        "https://api.anthropic.com/v1/",
    ] {
        assert_eq!(api.base(url), "https://api.anthropic.com", "{url}");
    }
    assert_eq!(api.base("http://proxy/anthropic"), "http://proxy/anthropic");
}

#[test]
fn a_deployment_sends_to_v1_messages_with_its_headers() {
    let cfg: crate::config::DeploymentConfig = toml::from_str(
        r#"
        kind = "cloud"
        api = "anthropic"
        provider = "anthropic"
        url = "https://api.anthropic.com/v1"
        api_key = "sk-ant-secret"
        anthropic_version = "2024-10-22"
        headers = { "anthropic-beta" = "x" }
        "#,
    )
    .unwrap();
    let d =
        crate::upstream::Deployment::new("m", &cfg, "https://api.anthropic.com/v1", None, 1 << 20)
            .unwrap();
    // A Messages request's `top_k` is not dropped for it (see `proxy::forward`).
    assert!(!d.cloud);
    let dbg = format!("{d:?}");
    assert!(dbg.contains("https://api.anthropic.com\""), "{dbg}");
    assert!(!dbg.contains("sk-ant-secret"), "{dbg}");
}

#[test]
fn refusals_are_unsupported_naming_the_field() {
    let body = Bytes::from(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}).to_string(),
    );
    let e = api()
        .request_body(Endpoint::ChatCompletions, body)
        .unwrap_err();
    assert!(e.retryable(), "another deployment's API may carry it");
    assert_eq!(
        e.outcome(std::time::Instant::now()),
        crate::admission::Outcome::Success
    );
    assert!(
        matches!(
            &e,
            UpstreamError::Unsupported {
                param: Some("n"),
                ..
            }
        ),
        "{e}"
    );
    for endpoint in [Endpoint::Embeddings, Endpoint::Completions] {
        let e = api()
            .request_body(
                endpoint,
                Bytes::from_static(b"{\"model\":\"m\",\"input\":\"x\"}"),
            )
            .unwrap_err();
        assert!(
            matches!(&e, UpstreamError::Unsupported { param: None, message } if message.contains("Messages API")),
            "{e}"
        );
    }
}

/// How `error` turns these into replies is tested there (`error::tests`).
#[test]
fn errors_classify_as_the_gateway_reads_them() {
    let api = api();
    let env = |kind: &str, msg: &str| {
        Bytes::from(json!({"type": "error", "error": {"type": kind, "message": msg}}).to_string())
    };
    let mut h = HeaderMap::new();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
    let now = std::time::Instant::now();

    // 529: an overload with its Retry-After: tried elsewhere, cooled down.
    let e = api.classify(
        StatusCode::from_u16(529).unwrap(),
        &h,
        env("overloaded_error", "Overloaded"),
    );
    assert!(e.retryable());
    assert!(matches!(
        e.outcome(now),
        crate::admission::Outcome::CoolDown(_)
    ));
    assert!(
        matches!(e, UpstreamError::Status { status, retry_after: Some(7), .. } if status.as_u16() == 529)
    );
    // Also without Retry-After.
    let e = api.classify(
        StatusCode::from_u16(529).unwrap(),
        &HeaderMap::new(),
        env("overloaded_error", "Overloaded"),
    );
    assert!(matches!(
        e.outcome(now),
        crate::admission::Outcome::CoolDown(_)
    ));
    // 429: the same as an OpenAI 429.
    let e = api.classify(
        StatusCode::TOO_MANY_REQUESTS,
        &h,
        env("rate_limit_error", "slow"),
    );
    assert!(matches!(
        e,
        UpstreamError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(7),
            ..
        }
    ));

    // 401/403: the deployment's key, never the client's.
    for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
        let e = api.classify(status, &h, env("authentication_error", "invalid x-api-key"));
        assert!(e.retryable());
        assert_eq!(e.outcome(now), crate::admission::Outcome::Failure);
        assert!(
            matches!(&e, UpstreamError::Credentials { status: s, kind: Some(k) } if *s == status && k == "authentication_error"),
            "{e}"
        );
    }

    // 400: its status and the provider's message, in the OpenAI envelope.
    let e = api.classify(
        StatusCode::BAD_REQUEST,
        &h,
        env("invalid_request_error", "temperature: must be <= 1"),
    );
    assert!(!e.retryable());
    let UpstreamError::Status { status, body, .. } = e else {
        panic!("{e}")
    };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let out: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(out["error"]["message"], "temperature: must be <= 1");
    assert_eq!(out["error"]["type"], "invalid_request_error");
    assert!(out.get("type").is_none(), "not Anthropic's envelope: {out}");

    // 500: as any 5xx.
    let e = api.classify(StatusCode::INTERNAL_SERVER_ERROR, &h, env("api_error", "x"));
    assert!(matches!(
        e,
        UpstreamError::Status {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..
        }
    ));
}

#[test]
fn a_whole_reply_reads_through_the_api() {
    let (body, usage) = api()
        .read_reply(Bytes::from(
            json!({"id": "msg_9", "type": "message", "role": "assistant", "model": "m",
                   "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": 2, "output_tokens": 1}})
            .to_string(),
        ))
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "ok");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(usage.map(|u| u.prompt_tokens), Some(2));
}

#[test]
fn include_usage_is_read_from_the_request() {
    assert!(include_usage(
        br#"{"stream_options":{"include_usage":true}}"#
    ));
    assert!(!include_usage(
        br#"{"stream_options":{"include_usage":false}}"#
    ));
    assert!(!include_usage(br#"{"stream_options":null}"#));
    assert!(!include_usage(b"{}"));
    assert!(!include_usage(b"garbage"));
}

/// Relays `text` (the first `first` bytes as the first chunk, then pieces of 5 bytes) through
/// the relay, as a client without a transform gets it; and how it ended.
async fn relayed(text: &str, first: usize) -> (String, crate::upstream::StreamEnd, StreamStats) {
    use crate::upstream::relay::{Limits, PendingStream};
    use http_body_util::BodyExt;
    let mut reader = api().stream(br#"{"stream_options":{"include_usage":true}}"#);
    let mut stats = StreamStats::default();
    let first_out = reader.read(
        Bytes::copy_from_slice(&text.as_bytes()[..first]),
        &mut stats,
    );
    let rest: Vec<Result<Bytes, hyper::Error>> = text.as_bytes()[first..]
        .chunks(5)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let p = PendingStream {
        first: first_out,
        rest: Box::pin(futures_util::stream::iter(rest)),
        limits: Limits {
            idle: std::time::Duration::from_secs(5),
            deadline: None,
        },
        label: "cloud(anthropic)".into(),
        stats,
        reader,
    };
    let end = std::sync::Arc::new(std::sync::Mutex::new(None));
    let e = end.clone();
    let body = p.relay(Box::new(move |how, stats| {
        *e.lock().unwrap() = Some((how, stats));
    }));
    let bytes = body.collect().await.unwrap().to_bytes();
    let (how, stats) = end.lock().unwrap().take().unwrap();
    (String::from_utf8(bytes.to_vec()).unwrap(), how, stats)
}

#[tokio::test]
async fn the_relay_ends_a_messages_stream_as_an_openai_one() {
    use crate::upstream::StreamEnd;
    let (out, end, stats) = relayed(&tool_stream(), 40).await;
    assert_eq!(end, StreamEnd::Complete);
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
    assert_eq!(stats.usage.map(|u| u.completion_tokens), Some(42));

    // Its error event: relayed once, the stream ends there, no [DONE].
    let text = format!(
        "{}{}",
        &tool_stream()[..tool_stream().find("event: content_block_start").unwrap()],
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"boom\"}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    );
    let (out, end, _) = relayed(&text, 10).await;
    assert_eq!(end, StreamEnd::Failed);
    assert_eq!(out.matches("event: error").count(), 1, "{out}");
    assert!(out.contains("boom") && !out.contains("[DONE]"), "{out}");

    // Cut before message_stop: the relay's own error event.
    let cut = &tool_stream()[..tool_stream().find("event: message_delta").unwrap()];
    let (out, end, stats) = relayed(cut, 10).await;
    assert_eq!(end, StreamEnd::Failed);
    assert_eq!(out.matches("event: error").count(), 1, "{out}");
    assert!(
        out.contains("upstream_disconnected") && !out.contains("[DONE]"),
        "{out}"
    );
    // Billed what it streamed: the prompt, and at least a token per fragment.
    assert_eq!(
        stats.usage,
        Some(Usage {
            prompt_tokens: 24,
            completion_tokens: 4
        })
    );

    // An announced error whose data never came: the relay's event, once.
    let text = format!(
        "{}event: error\n",
        &tool_stream()[..tool_stream().find("event: content_block_start").unwrap()]
    );
    let (out, end, _) = relayed(&text, 10).await;
    assert_eq!(end, StreamEnd::Failed);
    assert_eq!(out.matches("event: error").count(), 1, "{out}");
}

//! The simulator in Anthropic's Messages API ([`super::SimApi::Anthropic`]): `POST /v1/messages`
//! (whole and streamed), `POST /v1/messages/count_tokens`, `GET /v1/models[/{id}]`, and the
//! Anthropic error envelope `{"type":"error","error":{"type","message"}}` for every failure.
//!
//! It owns only the Messages form: reading a Messages request into the chat shape the shared
//! reply plan reads ([`to_chat`]: `system` first, `tool_result` blocks as `tool` messages before
//! the rest of their user turn, `tools`' `input_schema` as `parameters`, `tool_choice` `auto` /
//! `any` / `tool` / `none`, `stop_sequences` as `stop`), and writing the plan as a message or as
//! the documented event stream: `message_start`, per block `content_block_start` (the first one
//! followed by `ping`), `content_block_delta` (`text_delta` / `input_json_delta`),
//! `content_block_stop`, then `message_delta` (stop reason, output tokens) and `message_stop`.
//!
//! The decisions stay in the shared code: what is said (same words, same tool calls as the
//! OpenAI mode for the same conversation), pacing, counting, faults. Differences, by the
//! protocol: `max_tokens` is required and only a ceiling (the model says 16 words unless it is
//! lower: `stop_reason` `max_tokens`); failures are 529 `overloaded_error`; a stream cut by
//! `die_after_tokens` ends with `event: error` and nothing after it (no `content_block_stop`,
//! no `message_stop`). It must not depend on the gateway's own Messages types (`crate::anthropic`):
//! the simulator is the independent other side of the gateway's translation, and keeps nothing
//! beyond the request it answers.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::reply::{self, Piece, ToolCall};
use super::{admit, fnv, message_text, per_token, tool_reply, tools, InFlight, Length, Shared};

/// When the models were "created", as Anthropic's model list writes it.
const CREATED_AT: &str = "2025-01-01T00:00:00Z";

/// The Messages API's routes; anything else is a 404 in its envelope.
pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/messages", post(create))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found") })
}

/// The Anthropic error reply for what the shared code answers with `status`: 400
/// `invalid_request_error`, 401 `authentication_error`, 404 `not_found_error`, 413
/// `request_too_large`; the simulated failures (500) and max concurrency (503) are Anthropic's
/// overload, 529 `overloaded_error`.
pub(super) fn error(status: StatusCode, message: &str) -> Response {
    let (code, kind) = match status.as_u16() {
        400 => (400, "invalid_request_error"),
        401 => (401, "authentication_error"),
        403 => (403, "permission_error"),
        404 => (404, "not_found_error"),
        413 => (413, "request_too_large"),
        429 => (429, "rate_limit_error"),
        500 | 503 | 529 => (529, "overloaded_error"),
        _ => (500, "api_error"),
    };
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
        .into_response()
}

fn json_response(v: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

fn model_object(id: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": id, "created_at": CREATED_AT})
}

async fn list_models(State(sim): State<Shared>) -> Response {
    let data: Vec<Value> = sim.opts.models.iter().map(|m| model_object(m)).collect();
    json_response(&json!({
        "data": data, "has_more": false,
        "first_id": sim.opts.models.first(), "last_id": sim.opts.models.last(),
    }))
}

async fn get_model(State(sim): State<Shared>, Path(id): Path<String>) -> Response {
    if sim.opts.models.contains(&id) {
        json_response(&model_object(&id))
    } else {
        error(
            StatusCode::NOT_FOUND,
            &format!("model: {}", super::truncate(&id, 100)),
        )
    }
}

/// The parts of a Messages request the reply depends on, read and checked.
struct Request {
    model: String,
    stream: bool,
    max_tokens: u64,
    /// The conversation in the chat shape the shared plan reads (see [`to_chat`]).
    chat: Value,
}

/// Reads a Messages request (`Err`: the 400's message, named after the field as Anthropic
/// does). `max_tokens` is required, a positive integer.
fn read(mut req: Value) -> Result<Request, String> {
    let max_tokens = match req.get("max_tokens") {
        None | Some(Value::Null) => return Err("max_tokens: Field required".into()),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or("max_tokens: must be an integer of at least 1")?,
    };
    let stream = match req.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("stream: Input should be a valid boolean".into()),
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let chat = to_chat(&mut req)?;
    Ok(Request {
        model,
        stream,
        max_tokens,
        chat,
    })
}

/// The Messages request `req` (taken apart) in the chat shape of the OpenAI mode, as far as the
/// reply plan reads it: `messages` (with `system` first, and each user turn's `tool_result`
/// blocks as `tool` messages before the rest of it), `tools`, `tool_choice` and `stop`.
fn to_chat(req: &mut Value) -> Result<Value, String> {
    let Some(list) = req.get_mut("messages").and_then(Value::as_array_mut) else {
        return Err("messages: Field required (an array of messages)".into());
    };
    let list = std::mem::take(list);
    let mut messages = Vec::with_capacity(list.len() + 1);
    match req.get_mut("system").map(Value::take) {
        None | Some(Value::Null) => {}
        Some(s @ (Value::String(_) | Value::Array(_))) => {
            messages.push(json!({"role": "system", "content": s}));
        }
        Some(_) => return Err("system: Input should be a string or a list of text blocks".into()),
    }
    for (i, mut m) in list.into_iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r.to_owned(),
            _ => return Err(format!("messages.{i}.role: must be `user` or `assistant`")),
        };
        match m.get_mut("content").map(Value::take) {
            Some(Value::Array(blocks)) if role == "user" => {
                let (results, rest): (Vec<Value>, Vec<Value>) = blocks
                    .into_iter()
                    .partition(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"));
                let only_results = !results.is_empty() && rest.is_empty();
                for mut r in results {
                    messages.push(json!({
                        "role": "tool",
                        "tool_call_id": r.get_mut("tool_use_id").map(Value::take),
                        "content": r.get_mut("content").map(Value::take).unwrap_or_default(),
                    }));
                }
                if !only_results {
                    messages.push(json!({"role": "user", "content": rest}));
                }
            }
            Some(c @ (Value::String(_) | Value::Array(_))) => {
                messages.push(json!({"role": role, "content": c}));
            }
            _ => {
                return Err(format!(
                    "messages.{i}.content: must be a string or a list of content blocks"
                ))
            }
        }
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let functions: Vec<Value> = tools
            .iter()
            .filter_map(|t| {
                let name = t.get("name")?.as_str()?;
                let mut f = json!({"name": name});
                if let Some(schema) = t.get("input_schema") {
                    f["parameters"] = schema.clone();
                }
                Some(json!({"type": "function", "function": f}))
            })
            .collect();
        chat.insert("tools".into(), Value::Array(functions));
    }
    match req.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(tc) => {
            let choice = match tc.get("type").and_then(Value::as_str) {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => {
                    json!({"type": "function", "function": {"name": tc.get("name")}})
                }
                _ => {
                    return Err(
                        "tool_choice: `type` must be `auto`, `any`, `tool` or `none`".into(),
                    )
                }
            };
            chat.insert("tool_choice".into(), choice);
        }
    }
    if let Some(stops) = req.get_mut("stop_sequences").map(Value::take) {
        chat.insert("stop".into(), stops);
    }
    Ok(Value::Object(chat))
}

/// The prompt's tokens as the simulator counts them (words, as `prompt_tokens` in the OpenAI
/// mode) and the text that seeds the reply.
fn prompt(chat: &Value) -> (u64, String) {
    let text = chat.get("messages").map(message_text).unwrap_or_default();
    (text.split_whitespace().count() as u64, text)
}

async fn count_tokens(State(sim): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let (mut guard, mut req) = match admit(&sim, &headers, "/v1/messages/count_tokens", body).await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    guard.finish();
    match to_chat(&mut req) {
        Ok(chat) => json_response(&json!({"input_tokens": prompt(&chat).0})),
        Err(m) => error(StatusCode::BAD_REQUEST, &m),
    }
}

async fn create(State(sim): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let (mut guard, req) = match admit(&sim, &headers, "/v1/messages", body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let req = match read(req) {
        Ok(r) => r,
        Err(m) => {
            guard.finish();
            return error(StatusCode::BAD_REQUEST, &m);
        }
    };
    let plan = match tools::plan(&req.chat) {
        Ok(p) => p,
        Err(m) => {
            guard.finish();
            return error(StatusCode::BAD_REQUEST, &m);
        }
    };
    let (input_tokens, text) = prompt(&req.chat);
    let (pieces, calls, stop_reason, stop_sequence) = match plan {
        Some(plan) => {
            let (pieces, calls, _) = tool_reply(&sim, plan, "toolu_sim_");
            (pieces, calls, "tool_use", None)
        }
        None => {
            let length = Length::ceiling(req.max_tokens);
            let (pieces, stop) = super::text_reply(&req.chat, fnv(text.as_bytes()), length);
            let reason = match (&stop, length.finish(stop.is_some())) {
                (Some(_), _) => "stop_sequence",
                (None, "length") => "max_tokens",
                (None, _) => "end_turn",
            };
            (pieces, Vec::new(), reason, stop)
        }
    };
    let id_n = sim.c.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let gen = Gen {
        id: format!("msg_sim_{id_n}"),
        model: req.model,
        pieces,
        calls,
        stop_reason,
        stop_sequence,
        input_tokens,
        die_after: sim.opts.die_after_tokens,
        ttft: sim.opts.ttft,
        per_token: per_token(sim.opts.tokens_per_sec),
    };
    if req.stream {
        stream_response(gen, guard)
    } else {
        full_response(gen, guard).await
    }
}

/// Everything needed to send one Messages reply.
struct Gen {
    id: String,
    model: String,
    pieces: Vec<Piece>,
    calls: Vec<ToolCall>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    input_tokens: u64,
    die_after: Option<u64>,
    ttft: Duration,
    per_token: Duration,
}

impl Gen {
    fn due(&self, i: usize) -> Duration {
        reply::due(self.ttft, self.per_token, i)
    }

    fn output_tokens(&self) -> u64 {
        self.pieces.len() as u64
    }

    /// Whether the stream breaks at piece `i` (`die_after_tokens`).
    fn dies_at(&self, i: usize) -> bool {
        self.die_after.is_some_and(|d| i as u64 >= d)
    }

    /// The message: its text as one `text` block, then one `tool_use` block per call.
    fn message(&self) -> Value {
        let text: String = self
            .pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        let mut content = Vec::with_capacity(1 + self.calls.len());
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        for c in &self.calls {
            let input: Value =
                serde_json::from_str(&c.arguments).unwrap_or_else(|_| Value::Object(Map::new()));
            content.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}));
        }
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": content, "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
            "usage": self.usage(self.output_tokens()),
        })
    }

    fn usage(&self, output_tokens: u64) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        })
    }
}

async fn full_response(gen: Gen, guard: InFlight) -> Response {
    let start = Instant::now();
    reply::pace(start, gen.due(gen.pieces.len().saturating_sub(1))).await;
    let body = serde_json::to_vec(&gen.message()).unwrap_or_default();
    // As the OpenAI mode: half the body, then the connection breaks.
    let cut = gen.die_after.is_some_and(|d| d < gen.pieces.len() as u64);
    reply::whole_or_cut(body, cut, guard)
}

/// Writes one SSE event: `event: <its type>`, `data: <it>`.
fn event(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(
        v.get("type")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .as_bytes(),
    );
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
}

/// Where a stream is: `message_start`, piece `i`, the end (`message_delta`, `message_stop`).
enum Step {
    Start,
    Piece(usize),
    Finish,
    End,
}

/// The content blocks of a stream so far: the open one (its index, whether it is text), the
/// next index, whether the `ping` was sent.
#[derive(Default)]
struct Blocks {
    open: Option<(u32, bool)>,
    next: u32,
    pinged: bool,
}

impl Blocks {
    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            event(out, &json!({"type": "content_block_stop", "index": index}));
        }
    }

    fn ping(&mut self, out: &mut Vec<u8>) {
        if !self.pinged {
            self.pinged = true;
            event(out, &json!({"type": "ping"}));
        }
    }

    /// Closes the open block and opens `block` (the first is followed by the `ping`).
    fn open(&mut self, block: Value, text: bool, out: &mut Vec<u8>) -> u32 {
        self.close(out);
        let index = self.next;
        self.next += 1;
        self.open = Some((index, text));
        event(
            out,
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        self.ping(out);
        index
    }

    /// The events of one piece: a block start when it begins a block, and its delta.
    fn piece(&mut self, piece: &Piece, out: &mut Vec<u8>) {
        match piece {
            Piece::Text(t) => {
                let index = match self.open {
                    Some((index, true)) => index,
                    _ => self.open(json!({"type": "text", "text": ""}), true, out),
                };
                event(
                    out,
                    &json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "text_delta", "text": t}}),
                );
            }
            Piece::ToolStart { id, name, .. } => {
                let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
                self.open(block, false, out);
            }
            Piece::ToolArgs { args, .. } => {
                if let Some((index, false)) = self.open {
                    event(
                        out,
                        &json!({"type": "content_block_delta", "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": args}}),
                    );
                }
            }
        }
    }
}

fn stream_response(gen: Gen, guard: InFlight) -> Response {
    let start = Instant::now();
    let state = (gen, guard, Blocks::default(), Step::Start, start);
    let s = futures_util::stream::unfold(
        state,
        |(gen, mut guard, mut blocks, step, start)| async move {
            let mut out = Vec::new();
            let next = match step {
                Step::Start => {
                    reply::pace(start, gen.ttft).await;
                    let mut message = gen.message();
                    message["content"] = json!([]);
                    message["stop_reason"] = Value::Null;
                    message["stop_sequence"] = Value::Null;
                    message["usage"] = gen.usage(gen.output_tokens().min(1));
                    event(
                        &mut out,
                        &json!({"type": "message_start", "message": message}),
                    );
                    if gen.pieces.is_empty() {
                        Step::Finish
                    } else {
                        Step::Piece(0)
                    }
                }
                Step::Piece(i) => {
                    reply::pace(start, gen.due(i)).await;
                    if gen.dies_at(i) {
                        guard.fail();
                        let e = json!({"type": "error", "error": {"type": "overloaded_error",
                            "message": format!("Overloaded (simulated: the stream broke after {i} tokens)")}});
                        event(&mut out, &e);
                        Step::End
                    } else {
                        if let Some(p) = gen.pieces.get(i) {
                            blocks.piece(p, &mut out);
                        }
                        if i + 1 < gen.pieces.len() {
                            Step::Piece(i + 1)
                        } else {
                            Step::Finish
                        }
                    }
                }
                Step::Finish => {
                    blocks.close(&mut out);
                    blocks.ping(&mut out);
                    event(
                        &mut out,
                        &json!({"type": "message_delta",
                                "delta": {"stop_reason": gen.stop_reason, "stop_sequence": gen.stop_sequence},
                                "usage": {"output_tokens": gen.output_tokens()}}),
                    );
                    event(&mut out, &json!({"type": "message_stop"}));
                    guard.finish();
                    Step::End
                }
                Step::End => return None,
            };
            let item = Ok::<Bytes, std::io::Error>(Bytes::from(out));
            Some((item, (gen, guard, blocks, next, start)))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(s),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_become_tool_messages_before_the_rest_of_the_turn() {
        let mut req = json!({"model": "m", "max_tokens": 8, "system": "be brief",
            "messages": [
                {"role": "user", "content": "call:get_time"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}]},
            ],
            "tools": [{"name": "get_time", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"}, "stop_sequences": ["x"]});
        let chat = to_chat(&mut req).unwrap();
        let roles: Vec<&str> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(chat["messages"][3]["content"], "12:00");
        assert_eq!(chat["tools"][0]["function"]["name"], "get_time");
        assert_eq!(chat["tool_choice"], "required");
        assert_eq!(chat["stop"], json!(["x"]));
    }

    #[test]
    fn a_tool_result_with_text_is_a_live_user_turn() {
        let mut req = json!({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "ok"}]},
            {"type": "text", "text": "call:f"}]}]});
        let chat = to_chat(&mut req).unwrap();
        assert_eq!(chat["messages"][0]["role"], "tool");
        assert_eq!(chat["messages"][1]["role"], "user");
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (req, field) in [
            (json!({"messages": []}), "max_tokens"),
            (json!({"max_tokens": 0, "messages": []}), "max_tokens"),
            (json!({"max_tokens": "5", "messages": []}), "max_tokens"),
            (json!({"max_tokens": 5}), "messages"),
            (
                json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages.0.role",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user"}]}),
                "messages.0.content",
            ),
            (
                json!({"max_tokens": 5, "messages": [], "system": 3}),
                "system",
            ),
            (
                json!({"max_tokens": 5, "messages": [], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"max_tokens": 5, "messages": [], "tool_choice": {"type": "x"}}),
                "tool_choice",
            ),
        ] {
            let e = read(req.clone())
                .err()
                .unwrap_or_else(|| panic!("{req} was accepted"));
            assert!(e.starts_with(field), "{req}: {e}");
        }
    }

    /// JSON made of the words a Messages request uses, nested: mostly nonsense, sometimes a
    /// request.
    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        const WORDS: [&str; 22] = [
            "model",
            "max_tokens",
            "messages",
            "role",
            "content",
            "type",
            "text",
            "user",
            "assistant",
            "tool_result",
            "tool_use",
            "tool_use_id",
            "tools",
            "name",
            "input_schema",
            "tool_choice",
            "stop_sequences",
            "system",
            "stream",
            "any",
            "call:f",
            "say:x call:name",
        ];
        let word = proptest::sample::select(&WORDS[..]).prop_map(str::to_string);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            word.clone().prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((word.clone(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever the body, reading it and planning the reply answers (a reply or a 400's
        /// message) and never panics.
        #[test]
        fn any_body_is_answered_without_a_panic(v in arb_json(), max in 0u64..40) {
            let mut req = json!({"model": "m", "max_tokens": max, "messages": []});
            if let Value::Object(extra) = v.clone() {
                for (k, x) in extra {
                    req[k] = x;
                }
            }
            for body in [v, req] {
                if let Ok(r) = read(body) {
                    let _ = tools::plan(&r.chat);
                    let (_, text) = prompt(&r.chat);
                    let length = Length::ceiling(r.max_tokens);
                    let (pieces, _) = super::super::text_reply(&r.chat, fnv(text.as_bytes()), length);
                    proptest::prop_assert!(pieces.len() as u64 <= length.tokens);
                }
            }
        }
    }

    #[tokio::test]
    async fn error_statuses_and_types() {
        for (given, status, kind) in [
            (400, 400, "invalid_request_error"),
            (401, 401, "authentication_error"),
            (404, 404, "not_found_error"),
            (413, 413, "request_too_large"),
            (500, 529, "overloaded_error"),
            (503, 529, "overloaded_error"),
            (502, 500, "api_error"),
        ] {
            let r = error(StatusCode::from_u16(given).unwrap(), "m");
            assert_eq!(r.status().as_u16(), status);
            let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                v,
                json!({"type": "error", "error": {"type": kind, "message": "m"}})
            );
        }
    }
}

//! The stream translator: a state machine over the OpenAI chunks of a streamed chat completion
//! that writes the Messages events a client of `POST /v1/messages` expects, as they arrive.
//!
//! - `message_start` first, with the first data line: its `usage.input_tokens` is the backend's
//!   `prompt_tokens` when that line carries `usage` (a backend that reports usage in every chunk,
//!   such as vLLM's continuous usage stats), else the gateway's estimate; the backend's count,
//!   when it sends one at the end (`stream_options.include_usage`, which the translation asks
//!   for), comes in `message_delta`, which the SDKs take as the final figure;
//! - one content block open at a time, numbered from 0 in order: text deltas go to a `text`
//!   block, each tool call to its own `tool_use` block whose arguments are streamed as
//!   `input_json_delta` fragments the moment they arrive (never dropped, never re-sent); a new
//!   block closes the previous one, so each block gets exactly one `content_block_stop`;
//! - at the backend's `finish_reason` the open block is closed; at `[DONE]`, `message_delta`
//!   (stop reason, usage: `tool_use` whenever a tool call was streamed, see
//!   [`super::response`]) and `message_stop`;
//! - `ping` after every gap of [`PING_EVERY`] (sent by the relay, see `upstream::Transform`);
//! - a failure (the backend's in-band error, a cut stream, a gap past the idle limit) is one
//!   `event: error`, after which nothing: no `content_block_stop` for a block left open (a
//!   client must not run a tool on truncated arguments), never a `message_stop`.
//!
//! It must not allocate per chunk beyond what it writes, nor hold more than one partial line.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::response::{stop_reason, Message, OutUsage, Usage};
use super::{error_event, estimate_tokens, message_id, Context};
use crate::upstream::Transform;

/// The longest silence before a `ping`.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(10);
/// The longest SSE line kept while waiting for its end.
const MAX_LINE: usize = 16 * 1024 * 1024;
/// The most tool calls one reply may stream.
const MAX_TOOL_CALLS: usize = 1024;

/// A JSON string literal kept as the backend escaped it (quotes included): text and argument
/// fragments go out as they came in, without unescaping and escaping them again.
#[derive(Clone, Copy, Serialize)]
#[serde(transparent)]
struct JsonStr<'a>(&'a RawValue);

impl<'de: 'a, 'a> Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&RawValue>::deserialize(d)?;
        if raw.get().starts_with('"') {
            Ok(JsonStr(raw))
        } else {
            Err(serde::de::Error::custom("expected a string"))
        }
    }
}

impl JsonStr<'_> {
    fn is_empty(self) -> bool {
        self.0.get() == "\"\""
    }

    /// The characters between the quotes, escapes counted as written (for the token estimate).
    fn chars(self) -> u64 {
        self.0.get().chars().count().saturating_sub(2) as u64
    }
}

/// One OpenAI stream chunk (the parts the translation reads).
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<DeltaIn<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    stop_reason: Option<Value>,
}

#[derive(Deserialize)]
struct DeltaIn<'a> {
    #[serde(default, borrow)]
    content: Option<JsonStr<'a>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolDelta<'a> {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<JsonStr<'a>>,
}

/// The Messages stream events.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: Message<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: StartBlock<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: Delta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: MessageDeltaBody<'a>,
        usage: OutUsage,
    },
    MessageStop,
    Ping,
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Ping => "ping",
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock<'a> {
    Text {
        text: &'static str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Empty,
    },
}

/// `{}`.
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Delta<'a> {
    TextDelta { text: JsonStr<'a> },
    InputJsonDelta { partial_json: JsonStr<'a> },
}

#[derive(Serialize)]
struct MessageDeltaBody<'a> {
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
}

/// The block that is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text(u32),
    /// A tool call: its block index and its place in `tools`.
    Tool(u32, usize),
}

/// A tool call the backend started: how the backend names it.
struct ToolSeen {
    index: Option<u32>,
    id: Option<String>,
}

/// See the module doc.
pub(crate) struct Translator {
    ctx: Context,
    id: String,
    /// A line whose end has not arrived yet.
    line: Vec<u8>,
    started: bool,
    next_block: u32,
    open: Option<Open>,
    tools: Vec<ToolSeen>,
    finish: Option<String>,
    matched: Option<Value>,
    usage: Option<Usage>,
    output_chars: u64,
    done: bool,
    broken: bool,
    ping_every: Duration,
}

impl Translator {
    pub(crate) fn new(ctx: Context) -> Translator {
        Translator {
            ctx,
            id: message_id(),
            line: Vec::new(),
            started: false,
            next_block: 0,
            open: None,
            tools: Vec::new(),
            finish: None,
            matched: None,
            usage: None,
            output_chars: 0,
            done: false,
            broken: false,
            ping_every: PING_EVERY,
        }
    }

    /// The same, with pings after `every` (tests).
    #[cfg(test)]
    pub(crate) fn with_ping(mut self, every: Duration) -> Translator {
        self.ping_every = every;
        self
    }

    fn emit(out: &mut Vec<u8>, ev: &Event) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(ev.name().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Writing into a Vec cannot fail; the types hold no map with non-string keys.
        let _ = serde_json::to_writer(&mut *out, ev);
        out.extend_from_slice(b"\n\n");
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        self.started = true;
        let message = Message {
            id: &self.id,
            kind: "message",
            role: "assistant",
            model: &self.ctx.model,
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: OutUsage {
                input_tokens: self
                    .usage
                    .map_or(self.ctx.input_estimate, |u| u.prompt_tokens),
                output_tokens: 0,
            },
        };
        Self::emit(out, &Event::MessageStart { message });
    }

    fn start_once(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.start(out);
        }
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(Open::Text(index) | Open::Tool(index, _)) = self.open.take() {
            Self::emit(out, &Event::ContentBlockStop { index });
        }
    }

    fn open_block(&mut self) -> u32 {
        let i = self.next_block;
        self.next_block += 1;
        i
    }

    /// One line of the upstream's SSE.
    fn line_in(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if self.done || self.broken {
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return; // `event:`, `id:`, comments, the blank line between events
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            self.start_once(out);
            self.complete(out);
            return;
        }
        // One UTF-8 check of the whole line (std's ASCII fast path), then serde reads it as a
        // `str` without checking each string again.
        let Ok(data) = std::str::from_utf8(data) else {
            return;
        };
        let chunk: Chunk = match serde_json::from_str(data) {
            Ok(c) => c,
            Err(_) => return, // not a chunk (a keep-alive, a vendor extension)
        };
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        self.start_once(out);
        if let Some(e) = chunk.error {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string());
            self.fail(&format!("the backend failed mid-stream: {message}"), out);
            return;
        }
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    self.text(text, out);
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    if !self.tool(call, out) {
                        return;
                    }
                }
            }
            if let Some(f) = choice.finish_reason {
                self.close(out);
                self.finish = Some(f.into_owned());
                self.matched = choice.stop_reason;
            }
        }
    }

    fn text(&mut self, text: JsonStr, out: &mut Vec<u8>) {
        let index = match self.open {
            Some(Open::Text(i)) => i,
            _ => {
                self.close(out);
                let i = self.open_block();
                self.open = Some(Open::Text(i));
                Self::emit(
                    out,
                    &Event::ContentBlockStart {
                        index: i,
                        content_block: StartBlock::Text { text: "" },
                    },
                );
                i
            }
        };
        self.output_chars += text.chars();
        Self::emit(
            out,
            &Event::ContentBlockDelta {
                index,
                delta: Delta::TextDelta { text },
            },
        );
    }

    /// A tool call fragment; `false` if it broke the stream.
    fn tool(&mut self, call: ToolDelta, out: &mut Vec<u8>) -> bool {
        let id = call.id.as_deref().filter(|i| !i.is_empty());
        let known = match (call.index, id) {
            (Some(i), _) => self.tools.iter().position(|t| t.index == Some(i)),
            (None, Some(id)) => self.tools.iter().position(|t| t.id.as_deref() == Some(id)),
            (None, None) => match self.open {
                Some(Open::Tool(_, k)) => Some(k),
                _ => None,
            },
        };
        let (name, args) = match call.function {
            Some(f) => (f.name, f.arguments),
            None => (None, None),
        };
        let index = match (known, self.open) {
            (Some(k), Some(Open::Tool(index, open))) if k == open => index,
            (Some(_), _) => {
                // Its block was closed already: the Messages stream cannot reopen it.
                self.fail(
                    "the backend interleaved the arguments of parallel tool calls, which a Messages stream cannot carry",
                    out,
                );
                return false;
            }
            (None, _) => {
                if self.tools.len() >= MAX_TOOL_CALLS {
                    self.fail("the backend streamed too many tool calls", out);
                    return false;
                }
                self.close(out);
                let index = self.open_block();
                let generated;
                let tool_id = match id {
                    Some(id) => id,
                    None => {
                        generated = format!("toolu_{}_{}", &self.id[4..], self.tools.len());
                        &generated
                    }
                };
                Self::emit(
                    out,
                    &Event::ContentBlockStart {
                        index,
                        content_block: StartBlock::ToolUse {
                            id: tool_id,
                            name: name.as_deref().unwrap_or_default(),
                            input: Empty {},
                        },
                    },
                );
                self.tools.push(ToolSeen {
                    index: call.index,
                    id: id.map(str::to_owned),
                });
                self.open = Some(Open::Tool(index, self.tools.len() - 1));
                index
            }
        };
        if let Some(args) = args.filter(|a| !a.is_empty()) {
            self.output_chars += args.chars();
            Self::emit(
                out,
                &Event::ContentBlockDelta {
                    index,
                    delta: Delta::InputJsonDelta { partial_json: args },
                },
            );
        }
        true
    }

    /// `[DONE]`: the end of the message.
    fn complete(&mut self, out: &mut Vec<u8>) {
        self.close(out);
        let (reason, seq) = stop_reason(
            self.finish.as_deref(),
            !self.tools.is_empty(),
            self.matched.as_ref(),
            &self.ctx,
        );
        let usage = match self.usage {
            Some(u) => OutUsage {
                input_tokens: u.prompt_tokens,
                output_tokens: u.completion_tokens,
            },
            None => OutUsage {
                input_tokens: self.ctx.input_estimate,
                output_tokens: estimate_tokens(self.output_chars),
            },
        };
        Self::emit(
            out,
            &Event::MessageDelta {
                delta: MessageDeltaBody {
                    stop_reason: reason,
                    stop_sequence: seq.as_deref(),
                },
                usage,
            },
        );
        Self::emit(out, &Event::MessageStop);
        self.done = true;
    }

    /// The start of a line whose end is still to come (bounded).
    fn keep(&mut self, part: &[u8], out: &mut Vec<u8>) {
        if part.is_empty() {
            return;
        }
        if self.line.len() + part.len() > MAX_LINE {
            self.fail("the backend sent an SSE line longer than 16 MiB", out);
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(part);
    }

    fn fail(&mut self, message: &str, out: &mut Vec<u8>) {
        if self.done || self.broken {
            return;
        }
        // A stream whose head is out is a message: its start comes first, even here.
        self.start_once(out);
        self.broken = true;
        out.extend_from_slice(&error_event("api_error", message));
    }
}

impl Transform for Translator {
    fn chunk(&mut self, upstream: &[u8], out: &mut Vec<u8>) {
        if self.done || self.broken {
            return;
        }
        let mut rest = upstream;
        if !self.line.is_empty() {
            let Some(i) = memchr::memchr(b'\n', rest) else {
                self.keep(rest, out);
                return;
            };
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(&rest[..i]);
            self.line_in(&line, out);
            line.clear();
            self.line = line;
            rest = &rest[i + 1..];
        }
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.line_in(&rest[..i], out);
            rest = &rest[i + 1..];
        }
        self.keep(rest, out);
    }

    fn failed(&mut self, message: &str, _code: &str) -> Bytes {
        let mut out = Vec::new();
        self.fail(message, &mut out);
        Bytes::from(out)
    }

    fn broken(&self) -> bool {
        self.broken
    }

    fn keepalive_every(&self) -> Option<Duration> {
        Some(self.ping_every)
    }

    fn keepalive(&mut self) -> Bytes {
        if self.done || self.broken {
            return Bytes::new();
        }
        let mut out = Vec::with_capacity(40);
        Self::emit(&mut out, &Event::Ping);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Context {
        Context {
            model: "m".into(),
            stop_sequences: vec!["END".into()],
            input_estimate: 5,
            top_k: false,
        }
    }

    /// OpenAI SSE for these chunks, then `[DONE]`.
    fn sse(chunks: &[Value]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(format!("data: {c}\n\n").as_bytes());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }

    /// The events written, as (name, data).
    fn events(bytes: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(bytes).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let mut lines = e.lines();
                let name = lines.next().unwrap().strip_prefix("event: ").unwrap();
                let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
                let v: Value = serde_json::from_str(data).unwrap();
                if name != "error" {
                    assert_eq!(v["type"], name, "the event name is its type");
                }
                (name.to_string(), v)
            })
            .collect()
    }

    fn run(upstream: &[u8]) -> Vec<(String, Value)> {
        let mut t = Translator::new(ctx());
        let mut out = Vec::new();
        t.chunk(upstream, &mut out);
        events(&out)
    }

    fn names(ev: &[(String, Value)]) -> Vec<&str> {
        ev.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn text(s: &str) -> Value {
        json!({"choices": [{"index": 0, "delta": {"content": s}, "finish_reason": null}]})
    }

    fn finish(reason: &str) -> Value {
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    }

    fn tool_start(index: u32, id: &str, name: &str, args: &str) -> Value {
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": args}}
        ]}}]})
    }

    fn tool_args(index: u32, args: &str) -> Value {
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": index, "function": {"arguments": args}}
        ]}}]})
    }

    /// Every block: started once, stopped exactly once, indices 0.. in order, one open at a time.
    fn check_blocks(ev: &[(String, Value)]) {
        let mut open: Option<u64> = None;
        let mut next = 0;
        for (name, v) in ev {
            match name.as_str() {
                "content_block_start" => {
                    assert_eq!(open, None, "a block started while another is open");
                    assert_eq!(v["index"], next);
                    open = Some(next);
                    next += 1;
                }
                "content_block_delta" => assert_eq!(Some(v["index"].as_u64().unwrap()), open),
                "content_block_stop" => {
                    assert_eq!(
                        Some(v["index"].as_u64().unwrap()),
                        open,
                        "stop of a block not open"
                    );
                    open = None;
                }
                _ => {}
            }
        }
        assert_eq!(open, None);
    }

    #[test]
    fn text_stream() {
        let ev = run(&sse(&[
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            text("Hello"),
            text(" world"),
            finish("stop"),
            json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}}),
        ]));
        assert_eq!(
            names(&ev),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let m = &ev[0].1["message"];
        assert_eq!(m["model"], "m");
        assert_eq!(m["role"], "assistant");
        assert_eq!(m["content"], json!([]));
        assert_eq!(
            m["usage"]["input_tokens"], 5,
            "the estimate until the backend's count"
        );
        assert_eq!(
            ev[1].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        assert_eq!(
            ev[2].1["delta"],
            json!({"type": "text_delta", "text": "Hello"})
        );
        assert_eq!(
            ev[5].1,
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"input_tokens": 11, "output_tokens": 2}})
        );
        check_blocks(&ev);
    }

    #[test]
    fn message_start_has_the_backends_count_when_its_first_chunk_carries_one() {
        // vLLM's continuous usage stats: usage in every chunk, the first one included.
        let ev = run(&sse(&[
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                   "usage": {"prompt_tokens": 6, "completion_tokens": 0}}),
            json!({"choices": [{"index": 0, "delta": {"content": "Hi"}}],
                   "usage": {"prompt_tokens": 6, "completion_tokens": 1}}),
            finish("stop"),
            json!({"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 1}}),
        ]));
        assert_eq!(ev[0].0, "message_start");
        assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], 6);
        let delta = ev.iter().find(|(n, _)| n == "message_delta").unwrap();
        assert_eq!(delta.1["usage"]["input_tokens"], 6);
        // A stream that fails at once still starts with message_start.
        let mut t = Translator::new(ctx());
        let end = t.failed("boom", "x");
        let text = String::from_utf8(end.to_vec()).unwrap();
        assert!(text.starts_with("event: message_start"), "{text}");
        assert!(text.contains("event: error"), "{text}");
    }

    #[test]
    fn tool_use_after_streamed_tool_calls_even_if_the_backend_says_stop() {
        // Named bug: `end_turn` instead of `tool_use` after streamed tool calls.
        for backend_finish in ["tool_calls", "stop"] {
            let ev = run(&sse(&[
                tool_start(0, "call_0", "get_weather", ""),
                tool_args(0, "{\"ci"),
                tool_args(0, "ty\":\"Pa"),
                tool_args(0, "ris\"}"),
                finish(backend_finish),
            ]));
            let delta = ev.iter().find(|(n, _)| n == "message_delta").unwrap();
            assert_eq!(
                delta.1["delta"]["stop_reason"], "tool_use",
                "{backend_finish}"
            );
            assert_eq!(
                ev[1].1["content_block"],
                json!({"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {}})
            );
            check_blocks(&ev);
        }
    }

    #[test]
    fn every_argument_fragment_is_streamed_as_it_arrives() {
        // Named bug: dropped `input_json_delta` (including the one sent with the name).
        let mut t = Translator::new(ctx());
        let mut all = Vec::new();
        let parts = ["{\"city\":", "\"Paris\",", "\"days\":", "1}"];
        let mut out = Vec::new();
        let start = format!("data: {}\n\n", tool_start(0, "call_0", "f", parts[0]));
        t.chunk(start.as_bytes(), &mut out);
        // The start chunk's arguments are out before the next chunk arrives.
        let first = events(&out);
        assert_eq!(
            first.last().unwrap().1["delta"],
            json!({"type": "input_json_delta", "partial_json": parts[0]})
        );
        all.extend(first);
        let mut t2 = Translator::new(ctx());
        let mut chunks = vec![tool_start(0, "call_0", "f", parts[0])];
        chunks.extend(parts[1..].iter().map(|p| tool_args(0, p)));
        chunks.push(finish("tool_calls"));
        let mut out = Vec::new();
        t2.chunk(&sse(&chunks), &mut out);
        let ev = events(&out);
        let json: String = ev
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(json, parts.concat());
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v, json!({"city": "Paris", "days": 1}));
    }

    #[test]
    fn text_then_tool_and_parallel_tools_get_their_own_indices() {
        // Named bug: duplicate `content_block_stop` (a tool runs twice).
        let ev = run(&sse(&[
            text("Let me check."),
            tool_start(0, "call_0", "get_weather", "{\"city\":"),
            tool_args(0, "\"Paris\"}"),
            tool_start(1, "call_1", "get_time", ""),
            tool_args(1, "{\"tz\":"),
            tool_args(1, "\"CET\"}"),
            finish("tool_calls"),
        ]));
        check_blocks(&ev);
        let starts: Vec<&Value> = ev
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(starts.len(), 3);
        assert_eq!(starts[0]["content_block"]["type"], "text");
        assert_eq!(starts[1]["content_block"]["id"], "call_0");
        assert_eq!(starts[1]["index"], 1);
        assert_eq!(starts[2]["content_block"]["name"], "get_time");
        assert_eq!(starts[2]["index"], 2);
        let stops: Vec<u64> = ev
            .iter()
            .filter(|(n, _)| n == "content_block_stop")
            .map(|(_, v)| v["index"].as_u64().unwrap())
            .collect();
        assert_eq!(stops, [0, 1, 2], "exactly one stop per block");
        let args_of = |i: u64| -> String {
            ev.iter()
                .filter(|(n, v)| n == "content_block_delta" && v["index"] == i)
                .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(args_of(1), "{\"city\":\"Paris\"}");
        assert_eq!(args_of(2), "{\"tz\":\"CET\"}");
        assert_eq!(names(&ev).last(), Some(&"message_stop"));
    }

    #[test]
    fn chunks_split_anywhere_translate_the_same() {
        let upstream = sse(&[
            text("héllo"),
            tool_start(0, "call_0", "f", "{\"a\":"),
            tool_args(0, "1}"),
            finish("tool_calls"),
        ]);
        let whole = run(&upstream);
        let strip_ids = |ev: Vec<(String, Value)>| -> Vec<(String, Value)> {
            ev.into_iter()
                .map(|(n, mut v)| {
                    if n == "message_start" {
                        v["message"]["id"] = Value::Null;
                    }
                    (n, v)
                })
                .collect()
        };
        let whole = strip_ids(whole);
        for cut in 1..upstream.len() {
            let mut t = Translator::new(ctx());
            let mut out = Vec::new();
            t.chunk(&upstream[..cut], &mut out);
            t.chunk(&upstream[cut..], &mut out);
            assert_eq!(strip_ids(events(&out)), whole, "split at {cut}");
        }
    }

    #[test]
    fn escaped_text_and_arguments_arrive_with_the_same_meaning() {
        // Fragments are relayed as the backend escaped them; a client decodes the same string.
        let text_in = "quote \" back\\slash \u{e9} tab\t nl\n \u{1F600}";
        let args_in = "{\"q\": \"a \\\"b\\\"\"}";
        let ev = run(&sse(&[
            text(text_in),
            tool_start(0, "call_0", "f", args_in),
            json!({"choices": [{"index": 0, "delta": {"content": 5}}]}),
            finish("tool_calls"),
        ]));
        let deltas: Vec<&Value> = ev
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, v)| &v["delta"])
            .collect();
        assert_eq!(deltas.len(), 2, "a non-string content is not a text delta");
        assert_eq!(deltas[0], &json!({"type": "text_delta", "text": text_in}));
        assert_eq!(
            deltas[1],
            &json!({"type": "input_json_delta", "partial_json": args_in})
        );
        check_blocks(&ev);
    }

    #[test]
    fn crlf_comments_and_named_events_are_read() {
        let body = "event: chunk\r\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\r\n\r\n: keep-alive\r\n\r\ndata:{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\r\n\r\ndata: [DONE]\r\n\r\n";
        let ev = run(body.as_bytes());
        let delta = ev.iter().find(|(n, _)| n == "message_delta").unwrap();
        assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
        assert_eq!(names(&ev).last(), Some(&"message_stop"));
    }

    #[test]
    fn stop_sequence_named_by_the_backend() {
        let ev = run(&sse(&[
            text("a"),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}]}),
        ]));
        let delta = &ev.iter().find(|(n, _)| n == "message_delta").unwrap().1;
        assert_eq!(
            delta["delta"],
            json!({"stop_reason": "stop_sequence", "stop_sequence": "END"})
        );
    }

    #[test]
    fn a_cut_stream_ends_with_one_error_and_no_stop() {
        let mut t = Translator::new(ctx());
        let mut out = Vec::new();
        let mut partial = sse(&[tool_start(0, "call_0", "f", "{\"a\":")]);
        partial.truncate(partial.len() - b"data: [DONE]\n\n".len());
        t.chunk(&partial, &mut out);
        out.extend_from_slice(&t.failed("the backend closed the stream", "upstream_disconnected"));
        let ev = events(&out);
        assert_eq!(
            names(&ev),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "error"
            ],
            "no content_block_stop for the truncated tool call, no message_stop"
        );
        assert_eq!(ev[3].1["type"], "error");
        assert_eq!(ev[3].1["error"]["type"], "api_error");
        assert!(t.failed("again", "x").is_empty(), "one error event");
        let mut more = Vec::new();
        t.chunk(b"data: [DONE]\n\n", &mut more);
        assert!(more.is_empty(), "nothing after the error");
        assert!(t.keepalive().is_empty());
    }

    #[test]
    fn an_in_band_error_breaks_the_stream() {
        let mut t = Translator::new(ctx());
        let mut out = Vec::new();
        t.chunk(
            &sse(&[
                text("a"),
                json!({"error": {"message": "model crashed", "type": "server_error"}}),
            ]),
            &mut out,
        );
        let ev = events(&out);
        assert_eq!(names(&ev).last(), Some(&"error"));
        assert!(!names(&ev).contains(&"message_stop"));
        assert!(ev.last().unwrap().1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model crashed"));
        assert!(t.broken());
    }

    #[test]
    fn interleaved_tool_arguments_are_an_error_not_a_corruption() {
        let ev = run(&sse(&[
            tool_start(0, "call_0", "f", "{"),
            tool_start(1, "call_1", "g", "{"),
            tool_args(0, "}"),
            tool_args(1, "}"),
            finish("tool_calls"),
        ]));
        assert_eq!(names(&ev).last(), Some(&"error"));
        assert!(!names(&ev).contains(&"message_stop"));
    }

    #[test]
    fn ping_and_the_usage_estimate_without_a_usage_chunk() {
        let mut t = Translator::new(ctx()).with_ping(Duration::from_millis(5));
        assert_eq!(t.keepalive_every(), Some(Duration::from_millis(5)));
        let ping = t.keepalive();
        assert_eq!(
            events(&ping),
            [("ping".to_string(), json!({"type": "ping"}))]
        );
        let mut out = Vec::new();
        t.chunk(&sse(&[text("abcdefgh"), finish("stop")]), &mut out);
        let ev = events(&out);
        let delta = &ev.iter().find(|(n, _)| n == "message_delta").unwrap().1;
        assert_eq!(
            delta["usage"],
            json!({"input_tokens": 5, "output_tokens": 2})
        );
    }
}

/// The cost of translating one streamed chunk, measured by `bench/anthropic.sh` (release
/// mode); recorded in docs/benchmarks.md. A benchmark, not a test: it asserts nothing of time.
#[cfg(test)]
mod bench {
    use super::*;

    /// An OpenAI chunk as vLLM and llama.cpp send them (one event per read).
    fn text_chunk(i: usize) -> Vec<u8> {
        format!(
            "data: {{\"id\":\"chatcmpl-8f3a9c2e\",\"object\":\"chat.completion.chunk\",\"created\":1764250000,\"model\":\"llama-3-8b\",\"system_fingerprint\":\"b4600\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        )
        .into_bytes()
    }

    fn args_chunk(i: usize) -> Vec<u8> {
        format!(
            "data: {{\"id\":\"chatcmpl-8f3a9c2e\",\"object\":\"chat.completion.chunk\",\"created\":1764250000,\"model\":\"llama-3-8b\",\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":\"\\\"k{i}\\\": 1, \"}}}}]}},\"finish_reason\":null}}]}}\n\n"
        )
        .into_bytes()
    }

    /// ns per chunk of feeding `chunks` to fresh translators, the median of 7 rounds.
    fn cost(prelude: &[Vec<u8>], chunks: &[Vec<u8>]) -> f64 {
        let mut rounds = Vec::new();
        let mut out = Vec::with_capacity(1 << 16);
        // One round to warm the caches and the allocator, then 7 measured.
        for round in 0..8 {
            let reps = 200;
            let start = crate::benchclock::thread_cpu_ns();
            for _ in 0..reps {
                let mut t = Translator::new(Context::default());
                for c in prelude {
                    t.chunk(c, &mut out);
                }
                out.clear();
                for c in chunks {
                    t.chunk(std::hint::black_box(c), &mut out);
                    out.clear();
                }
            }
            if round > 0 {
                rounds.push(
                    (crate::benchclock::thread_cpu_ns() - start) as f64
                        / (reps * chunks.len()) as f64,
                );
            }
        }
        rounds.sort_by(f64::total_cmp);
        rounds[3]
    }

    #[test]
    #[ignore = "benchmark: bench/anthropic.sh runs it in release mode"]
    fn translation_cost_per_chunk() {
        let text: Vec<Vec<u8>> = (0..500).map(text_chunk).collect();
        let start_tool = vec![b"data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_0\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n".to_vec()];
        let args: Vec<Vec<u8>> = (0..500).map(args_chunk).collect();
        let t = cost(&[], &text);
        let a = cost(&start_tool, &args);
        // The same text chunks split in two reads each (a line completed across chunks).
        let halves: Vec<Vec<u8>> = text
            .iter()
            .flat_map(|c| [c[..c.len() / 2].to_vec(), c[c.len() / 2..].to_vec()])
            .collect();
        let h = cost(&[], &halves);
        println!("anthropic stream translation, thread CPU ns per upstream chunk (median of 7 rounds x 200 streams x 500 chunks):");
        println!("  text delta ({} B):           {t:.0} ns", text[0].len());
        println!("  tool-argument delta ({} B):  {a:.0} ns", args[0].len());
        println!("  text delta split in 2 reads: {h:.0} ns per read");
    }
}

//! A streamed Messages reply, read event by event into OpenAI `chat.completion.chunk` SSE as
//! the events arrive (a state machine; the upstream's chunks may split anywhere, mid-line
//! included: a partial event is kept, up to [`MAX_EVENT`] bytes).
//!
//! - `message_start`: the first chunk, `delta: {role: "assistant", content: ""}` (its `id`
//!   and `model` name every chunk);
//! - `text_delta`: `delta.content`; a `tool_use` block's start: `delta.tool_calls[i]` with its
//!   `id`, `type`, `function.name` and empty `arguments`, then each `input_json_delta` as
//!   `function.arguments` (`i` counts the tool calls, not the content blocks). Text and
//!   argument fragments go out as the upstream escaped them (not re-encoded); `thinking` and
//!   other blocks are left out;
//! - `message_delta`: the chunk with `finish_reason`; `message_stop`: the usage chunk
//!   (`choices: []`) when the request asked for it (`stream_options.include_usage`), then
//!   `data: [DONE]`; `ping` and unknown events: nothing;
//! - `event: error` (or an event that is not JSON, or too large): an OpenAI error event
//!   (`event: error`, `{"error":{…}}`), after which the reader reads nothing and never says
//!   `[DONE]`; the relay ends the stream there.
//!
//! `stats.usage` is kept current: the prompt from `message_start`, the output from
//! `message_delta` (until then, at least one token per content delta), so that a stream cut
//! short is still billed what it used. It must not do I/O.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::reply::{finish_reason, now, ErrorBody, TokenCounts};
use crate::upstream::api::StreamReader;
use crate::upstream::api::StreamStats;
use crate::upstream::wire::envelope;
use crate::upstream::UpstreamError;

/// The largest event (its lines so far) kept while waiting for its end.
pub(super) const MAX_EVENT: usize = 1024 * 1024;
/// The most content blocks one reply may have.
const MAX_BLOCKS: usize = 4096;

/// What a content block is, for its deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Text,
    /// A tool call: its position among the reply's tool calls.
    Tool(usize),
    /// Thinking, a server tool's block, ...: not relayed.
    Other,
}

/// Reads one streamed Messages reply (see the module doc).
pub(super) struct MessagesStream {
    include_usage: bool,
    /// The events go on as they came (a Messages client's stream); they are only read.
    native: bool,
    /// The current line, until its end.
    line: Vec<u8>,
    /// The current event's `event:` name and `data:` lines (joined by `\n`).
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    id: String,
    model: String,
    created: u64,
    /// Content block index and kind, in the order they started.
    blocks: Vec<(u64, BlockKind)>,
    tool_calls: usize,
    counts: TokenCounts,
    /// The output count is the upstream's final one (`message_delta` came).
    final_output: bool,
    content_events: u64,
    finished: bool,
    error: Option<(String, Option<String>)>,
    done: bool,
}

impl MessagesStream {
    pub(super) fn new(include_usage: bool) -> MessagesStream {
        MessagesStream {
            include_usage,
            native: false,
            line: Vec::new(),
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            id: String::new(),
            model: String::new(),
            created: now(),
            blocks: Vec::new(),
            tool_calls: 0,
            counts: TokenCounts::default(),
            final_output: false,
            content_events: 0,
            finished: false,
            error: None,
            done: false,
        }
    }

    /// A reader whose output is its input (a Messages client's stream, relayed as it came):
    /// only its usage, its end and its error are read.
    pub(super) fn native() -> MessagesStream {
        MessagesStream {
            native: true,
            ..MessagesStream::new(false)
        }
    }

    /// Whether the reader reads no more (an error, or the end).
    fn over(&self) -> bool {
        self.done || self.error.is_some()
    }

    /// One complete line (without its end of line).
    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return, // a comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            _ => {} // id, retry
        }
    }

    /// The end of an event (a blank line).
    fn dispatch(&mut self, out: &mut Vec<u8>) {
        let data = std::mem::take(&mut self.data);
        let named_error = self.event == b"error";
        let had_data = std::mem::take(&mut self.has_data);
        self.event.clear();
        if had_data {
            self.event_data(&data, named_error, out);
        }
        self.data = data;
        self.data.clear();
    }

    fn event_data(&mut self, data: &[u8], named_error: bool, out: &mut Vec<u8>) {
        let ev: Event = match serde_json::from_slice(data) {
            Ok(ev) => ev,
            Err(_) => {
                return self.fail(
                    "the backend sent a stream event that is not a Messages event".into(),
                    None,
                    out,
                )
            }
        };
        let kind = ev
            .kind
            .as_deref()
            .unwrap_or(if named_error { "error" } else { "" });
        match kind {
            "message_start" => {
                let m = ev.message.unwrap_or_default();
                self.id = m.id.unwrap_or_else(|| "msg".into());
                self.model = m.model.unwrap_or_default();
                if let Some(c) = m.usage {
                    self.counts.update(&c);
                }
                self.chunk(
                    Delta {
                        role: Some("assistant"),
                        content: empty_str(),
                        ..Delta::default()
                    },
                    None,
                    out,
                );
            }
            "content_block_start" => {
                let Some(index) = ev.index else { return };
                let Some(block) = ev.content_block else {
                    return;
                };
                if self.blocks.len() >= MAX_BLOCKS {
                    return self.fail(
                        format!("the backend streamed more than {MAX_BLOCKS} content blocks"),
                        None,
                        out,
                    );
                }
                let kind = match block.kind.as_deref() {
                    Some("text") => BlockKind::Text,
                    Some("tool_use") => {
                        self.tool_calls += 1;
                        BlockKind::Tool(self.tool_calls - 1)
                    }
                    _ => BlockKind::Other,
                };
                self.blocks.push((index, kind));
                match kind {
                    BlockKind::Text => {
                        if let Some(t) = block.text.filter(is_text) {
                            self.content(t, out);
                        }
                    }
                    BlockKind::Tool(i) => {
                        let call = ToolCallDelta {
                            index: i,
                            id: Some(block.id.as_deref().unwrap_or_default()),
                            kind: Some("function"),
                            function: FunctionDelta {
                                name: Some(block.name.as_deref().unwrap_or_default()),
                                arguments: empty_str(),
                            },
                        };
                        self.chunk(
                            Delta {
                                tool_calls: Some([call]),
                                ..Delta::default()
                            },
                            None,
                            out,
                        );
                    }
                    BlockKind::Other => {}
                }
            }
            "content_block_delta" => {
                let (Some(index), Some(delta)) = (ev.index, ev.delta) else {
                    return;
                };
                let block = self
                    .blocks
                    .iter()
                    .rev()
                    .find(|(i, _)| *i == index)
                    .map(|(_, k)| *k);
                match (delta.kind.as_deref(), block) {
                    (Some("text_delta"), Some(BlockKind::Text) | None) => {
                        if let Some(t) = delta.text.filter(is_text) {
                            self.content(t, out);
                        }
                    }
                    (Some("input_json_delta"), Some(BlockKind::Tool(i))) => {
                        let Some(p) = delta.partial_json.filter(is_text) else {
                            return;
                        };
                        self.content_events += 1;
                        self.bump();
                        let call = ToolCallDelta {
                            index: i,
                            id: None,
                            kind: None,
                            function: FunctionDelta {
                                name: None,
                                arguments: Some(p),
                            },
                        };
                        self.chunk(
                            Delta {
                                tool_calls: Some([call]),
                                ..Delta::default()
                            },
                            None,
                            out,
                        );
                    }
                    (Some("input_json_delta"), _) => self.fail(
                        "the backend streamed tool arguments for a block that is not a tool call"
                            .into(),
                        None,
                        out,
                    ),
                    // Thinking, signatures, citations: not part of an OpenAI reply.
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(c) = ev.usage {
                    self.counts.update(&c);
                    self.final_output |= c.output_tokens.is_some();
                }
                let stop = ev.delta.and_then(|d| d.stop_reason);
                if let Some(stop) = stop {
                    self.finish(finish_reason(&stop), out);
                }
            }
            "message_stop" => {
                if !self.finished {
                    let reason = if self.tool_calls > 0 {
                        "tool_calls"
                    } else {
                        "stop"
                    };
                    self.finish(reason, out);
                }
                if self.include_usage {
                    let usage = self.counts.openai();
                    let chunk = Chunk {
                        id: &self.id,
                        object: "chat.completion.chunk",
                        created: self.created,
                        model: &self.model,
                        choices: &[],
                        usage: Some(usage),
                    };
                    write_event(&chunk, out);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.done = true;
            }
            "error" => {
                let e = ev.error.unwrap_or(ErrorBody {
                    kind: None,
                    message: None,
                });
                let message = e
                    .message
                    .unwrap_or_else(|| "the backend ended its stream with an error".into());
                self.fail(message, e.kind, out)
            }
            _ => {} // ping, content_block_stop, and what later versions add
        }
    }

    /// A text fragment (a JSON string literal, as the upstream escaped it).
    fn content(&mut self, text: &RawValue, out: &mut Vec<u8>) {
        self.content_events += 1;
        self.bump();
        self.chunk(
            Delta {
                content: Some(text),
                ..Delta::default()
            },
            None,
            out,
        );
    }

    /// The final output count is not known yet: at least one token per content event.
    fn bump(&mut self) {
        if !self.final_output {
            let n = self.counts.output_tokens.unwrap_or(0);
            self.counts.output_tokens = Some(n.max(self.content_events));
        }
    }

    fn finish(&mut self, reason: &'static str, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.chunk(Delta::default(), Some(reason), out);
    }

    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&'static str>, out: &mut Vec<u8>) {
        // A native stream goes on as it came: no chunk of OpenAI's to write.
        if self.native {
            return;
        }
        let choices = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }];
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: &choices,
            usage: None,
        };
        write_event(&chunk, out);
    }

    /// The stream failed: its OpenAI error event, and nothing more is read.
    fn fail(&mut self, message: String, kind: Option<String>, out: &mut Vec<u8>) {
        let code = kind.as_deref().unwrap_or("upstream_error");
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(&envelope(&message, "upstream_error", None, code));
        out.extend_from_slice(b"\n\n");
        self.error = Some((message, kind));
    }
}

impl StreamReader for MessagesStream {
    fn read(&mut self, chunk: Bytes, stats: &mut StreamStats) -> Bytes {
        let mut out = Vec::new();
        let mut rest = &chunk[..];
        while !rest.is_empty() && !self.over() {
            let (part, complete) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = &rest[(part.len() + usize::from(complete)).min(rest.len())..];
            let held = self.line.len() + self.data.len() + self.event.len();
            if held + part.len() > MAX_EVENT {
                self.line.clear();
                self.fail(
                    format!("the backend sent a stream event larger than {MAX_EVENT} bytes"),
                    None,
                    &mut out,
                );
                break;
            }
            if !complete {
                self.line.extend_from_slice(part);
            } else if self.line.is_empty() {
                self.line(part, &mut out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(part);
                self.line(&line, &mut out);
                line.clear();
                self.line = line;
            }
        }
        stats.content_events = self.content_events;
        if self.counts != TokenCounts::default() {
            stats.usage = Some(self.counts.usage());
        }
        if self.native {
            return chunk;
        }
        Bytes::from(out)
    }

    fn error(&self) -> Option<&str> {
        self.error.as_ref().map(|(m, _)| m.as_str())
    }

    /// Never: the reader relays an error event only once it has read it whole, so an
    /// announcement cut short has relayed nothing, and the relay's own error event is due.
    fn error_announced(&self) -> bool {
        false
    }

    fn complete(&self) -> bool {
        self.done
    }

    /// Anthropic's `overloaded_error` and `rate_limit_error` before anything reached the
    /// client are its 529 and 429: an overload, handled as one (fallback, cool-down).
    fn failure(&self) -> Option<UpstreamError> {
        let (message, kind) = self.error.as_ref()?;
        let status = match kind.as_deref() {
            Some("overloaded_error") => 529,
            Some("rate_limit_error") => 429,
            _ => return Some(UpstreamError::Invalid(message.clone())),
        };
        Some(UpstreamError::Status {
            status: axum::http::StatusCode::from_u16(status)
                .unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE),
            retry_after: None,
            body: Bytes::new(),
        })
    }
}

/// Whether a raw JSON value is a non-empty string literal.
fn is_text(v: &&RawValue) -> bool {
    let s = v.get();
    s.starts_with('"') && s != "\"\""
}

/// `""` as a raw JSON value.
fn empty_str() -> Option<&'static RawValue> {
    serde_json::from_str::<&RawValue>("\"\"").ok()
}

fn write_event<T: Serialize>(v: &T, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    // Serializing these types cannot fail (no maps with non-string keys, no floats).
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

// ---------------------------------------------------------------------------------------------
// The Messages events (one flat shape for all: what each has is optional).

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default, borrow)]
    content_block: Option<StartBlock<'a>>,
    #[serde(default, borrow)]
    delta: Option<EventDelta<'a>>,
    #[serde(default)]
    usage: Option<TokenCounts>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize, Default)]
struct StartMessage {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<TokenCounts>,
}

#[derive(Deserialize)]
struct StartBlock<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// A `content_block_delta`'s delta, or a `message_delta`'s.
#[derive(Deserialize)]
struct EventDelta<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
    #[serde(default, borrow)]
    partial_json: Option<&'a RawValue>,
    #[serde(default)]
    stop_reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The OpenAI chunks.

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<super::reply::OpenAiUsage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a RawValue>,
}

/// The cost of reading one streamed Messages event into OpenAI chunks (bench/anthropic.sh).
#[cfg(test)]
mod bench {
    use super::*;

    /// `message_start` as Anthropic sends it (the prelude of every stream).
    const MESSAGE_START: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n";

    /// A text delta as Anthropic streams them: a few words per event, one event per read.
    fn text_event(i: usize) -> Vec<u8> {
        format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" routes each request to a model that can serve it, quickly and safely (part {i:04}), then\\nwrites the reply back\"}}}}\n\n"
        )
        .into_bytes()
    }

    /// A fragment of a tool call's arguments (escaped JSON inside a JSON string).
    fn args_event(i: usize) -> Vec<u8> {
        format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":1,\"delta\":{{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"location\\\": \\\"San Francisco, CA\\\", \\\"unit\\\": \\\"celsius\\\", \\\"days\\\": 3, \\\"lang\\\": 1, \\\"k{i:04}\\\": 1, \"}}}}\n\n"
        )
        .into_bytes()
    }

    /// ns per read of feeding `reads` to fresh readers (after `prelude`), the median of 7 rounds.
    fn cost(prelude: &[Bytes], reads: &[Bytes]) -> f64 {
        let mut rounds = Vec::new();
        // One round to warm the caches and the allocator, then 7 measured.
        for round in 0..8 {
            let reps = 200;
            let start = crate::benchclock::thread_cpu_ns();
            for _ in 0..reps {
                let mut r = MessagesStream::new(false);
                let mut stats = StreamStats::default();
                for c in prelude {
                    r.read(c.clone(), &mut stats);
                }
                for c in reads {
                    let out = r.read(std::hint::black_box(c.clone()), &mut stats);
                    std::hint::black_box(out);
                }
                assert!(r.error().is_none());
            }
            if round > 0 {
                rounds.push(
                    (crate::benchclock::thread_cpu_ns() - start) as f64
                        / (reps * reads.len()) as f64,
                );
            }
        }
        rounds.sort_by(f64::total_cmp);
        rounds[3]
    }

    #[test]
    #[ignore = "benchmark: bench/anthropic.sh runs it in release mode"]
    fn provider_translation_cost_per_delta() {
        let text: Vec<Vec<u8>> = (0..500).map(text_event).collect();
        let args: Vec<Vec<u8>> = (0..500).map(args_event).collect();
        let bytes = |v: &[Vec<u8>]| -> Vec<Bytes> { v.iter().cloned().map(Bytes::from).collect() };
        let text_start = bytes(&[
            MESSAGE_START.to_vec(),
            b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_vec(),
        ]);
        let tool_start = bytes(&[
            MESSAGE_START.to_vec(),
            b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_vec(),
            b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".to_vec(),
            b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01T1x1fJ34qAmk2tNTrN7Up6\",\"name\":\"get_weather\",\"input\":{}}}\n\n".to_vec(),
        ]);
        // Check the shapes once: each delta is one OpenAI chunk.
        let mut r = MessagesStream::new(false);
        let mut stats = StreamStats::default();
        for c in &tool_start {
            r.read(c.clone(), &mut stats);
        }
        let out = r.read(Bytes::from(args[0].clone()), &mut stats);
        let out = std::str::from_utf8(&out).unwrap();
        assert!(out.starts_with("data: {") && out.ends_with("\n\n"), "{out}");
        assert!(out.contains("\"arguments\":\"\\\"location"), "{out}");
        let t = cost(&text_start, &bytes(&text));
        let a = cost(&tool_start, &bytes(&args));
        // The same text events split in two reads each (a line completed across reads).
        let halves: Vec<Vec<u8>> = text
            .iter()
            .flat_map(|c| [c[..c.len() / 2].to_vec(), c[c.len() / 2..].to_vec()])
            .collect();
        let h = cost(&text_start, &bytes(&halves));
        println!("anthropic provider stream translation (Messages events to OpenAI chunks), thread CPU ns per delta (median of 7 rounds x 200 streams x 500 deltas):");
        println!("  text_delta event ({} B):        {t:.0} ns", text[0].len());
        println!("  input_json_delta event ({} B):  {a:.0} ns", args[0].len());
        println!(
            "  text_delta split in 2 reads:     {:.0} ns per delta ({h:.0} ns per read)",
            2.0 * h
        );
    }
}

//! The stream translator: a state machine over the OpenAI chunks of a streamed chat completion
//! that writes the Messages events a client of `POST /v1/messages` expects, as they arrive.
//!
//! - `message_start` first (its `usage.input_tokens` is the gateway's estimate; the backend's
//!   count, when it sends one, comes in `message_delta`);
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
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::response::{stop_reason, Message, OutUsage, Usage};
use super::{error_event, estimate_tokens, message_id, Context};
use crate::upstream::Transform;

/// The longest silence before a `ping`.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// The longest SSE line kept while waiting for its end.
const MAX_LINE: usize = 16 * 1024 * 1024;
/// The most tool calls one reply may stream.
const MAX_TOOL_CALLS: usize = 1024;

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
    content: Option<Cow<'a, str>>,
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
    arguments: Option<Cow<'a, str>>,
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
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
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
pub struct Translator {
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
    pub fn new(ctx: Context) -> Translator {
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
    pub fn with_ping(mut self, every: Duration) -> Translator {
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
                input_tokens: self.ctx.input_estimate,
                output_tokens: 0,
            },
        };
        Self::emit(out, &Event::MessageStart { message });
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
            self.complete(out);
            return;
        }
        let chunk: Chunk = match serde_json::from_slice(data) {
            Ok(c) => c,
            Err(_) => return, // not a chunk (a keep-alive, a vendor extension)
        };
        if let Some(e) = chunk.error {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string());
            self.fail(&format!("the backend failed mid-stream: {message}"), out);
            return;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    self.text(&text, out);
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

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
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
        self.output_chars += text.chars().count() as u64;
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
            self.output_chars += args.len() as u64;
            Self::emit(
                out,
                &Event::ContentBlockDelta {
                    index,
                    delta: Delta::InputJsonDelta {
                        partial_json: &args,
                    },
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
        self.broken = true;
        out.extend_from_slice(&error_event("api_error", message));
    }
}

impl Transform for Translator {
    fn chunk(&mut self, upstream: &[u8], out: &mut Vec<u8>) {
        if !self.started {
            self.start(out);
        }
        if self.done || self.broken {
            return;
        }
        let mut rest = upstream;
        if !self.line.is_empty() {
            let Some(i) = rest.iter().position(|b| *b == b'\n') else {
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
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
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

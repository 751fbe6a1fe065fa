//! What the simulated model answers to a chat or text completion, and how it is sent: the
//! output as a list of pieces (text tokens, tool-call starts, argument fragments), `stop`
//! sequences, then either one JSON body or an SSE stream paced piece by piece.
//!
//! It owns no state: counting belongs to the caller's `InFlight` guard.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{splitmix, InFlight};

const VOCAB: [&str; 16] = [
    "the", "gateway", "routes", "each", "request", "to", "a", "model", "that", "can", "serve",
    "it", "quickly", "and", "safely", "today",
];

/// Upper bound on `stop` sequences considered.
const MAX_STOPS: usize = 16;
/// Upper bound on the characters of one streamed argument fragment.
const MAX_ARG_CHUNK: usize = 16;

/// One unit of output: streamed as one chunk, paced as one token.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Piece {
    Text(String),
    /// The first chunk of tool call `index`: its id and name, empty arguments.
    ToolStart {
        index: usize,
        id: String,
        name: String,
    },
    /// A fragment of tool call `index`'s arguments.
    ToolArgs {
        index: usize,
        args: String,
    },
}

/// A finished tool call, for the non-streaming reply.
pub(super) struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// The generated text of a plain reply, as pieces (`"w0"`, `" w1"`, ...): `n_tokens` words
/// chosen from `seed`, cut before the first `stop` sequence. Returns which stop (its index in
/// `stops`) cut it, if one did.
pub(super) fn text_pieces(
    seed: u64,
    n_tokens: u64,
    stops: &[String],
) -> (Vec<String>, Option<usize>) {
    let mut pieces: Vec<String> = (0..n_tokens)
        .map(|i| {
            let w = VOCAB[(splitmix(seed ^ i) % VOCAB.len() as u64) as usize];
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    let full: String = pieces.concat();
    let Some((cut, which)) = stops
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((full.find(s.as_str())?, i)))
        .min()
    else {
        return (pieces, None);
    };
    let mut start = 0;
    let mut keep = 0;
    for p in pieces.iter_mut() {
        if start >= cut {
            break;
        }
        let end = start + p.len();
        if end > cut {
            p.truncate(cut - start);
        }
        start = end;
        keep += 1;
    }
    pieces.truncate(keep);
    pieces.retain(|p| !p.is_empty());
    (pieces, Some(which))
}

/// The request's `stop`: a string or an array of strings; empty ones are ignored.
pub(super) fn stop_sequences(req: &Value) -> Vec<String> {
    match req.get("stop") {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| !s.is_empty())
            .take(MAX_STOPS)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// Splits `text` into pieces that keep its exact characters: words with their trailing space.
pub(super) fn say_pieces(text: &str, max: usize) -> Vec<String> {
    text.split_inclusive(' ')
        .take(max)
        .map(str::to_string)
        .collect()
}

/// Splits a call's arguments into fragments: at least 3 when it has 3 characters or more.
pub(super) fn arg_fragments(args: &str) -> Vec<String> {
    let chars: Vec<char> = args.chars().collect();
    let size = (chars.len() / 3).clamp(1, MAX_ARG_CHUNK);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// Everything needed to send one reply.
pub(super) struct Gen {
    pub chat: bool,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub pieces: Vec<Piece>,
    pub tool_calls: Vec<ToolCall>,
    pub finish: &'static str,
    pub usage: Value,
    pub include_usage: bool,
    pub die_after: Option<u64>,
    pub ttft: Duration,
    pub per_token: Duration,
}

/// When piece `i` (0-based) is due, relative to the start: the first at `ttft`, then one every
/// `per_token`.
pub(super) fn due(ttft: Duration, per_token: Duration, i: usize) -> Duration {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    ttft.saturating_add(per_token.saturating_mul(i))
}

impl Gen {
    /// When piece `i` (0-based) is due, relative to the start.
    fn due(&self, i: usize) -> Duration {
        due(self.ttft, self.per_token, i)
    }
    fn text(&self) -> String {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let v = if self.chat {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        } else {
            json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "text": delta.get("content").and_then(Value::as_str).unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
        };
        sse(&v)
    }
    fn piece_delta(piece: &Piece) -> Value {
        match piece {
            Piece::Text(t) => json!({"content": t}),
            Piece::ToolStart { index, id, name } => json!({"tool_calls": [{
                "index": index, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            Piece::ToolArgs { index, args } => {
                json!({"tool_calls": [{"index": index, "function": {"arguments": args}}]})
            }
        }
    }
}

/// Waits until `due` after `start`. No wait at all when `due` is zero: a zero sleep still goes
/// through tokio's timer wheel and costs up to a millisecond, which would skew benchmarks.
pub(super) async fn pace(start: Instant, due: Duration) {
    if !due.is_zero() {
        match start.checked_add(due) {
            Some(at) => tokio::time::sleep_until(at).await,
            // Beyond the clock's range: tokio sleeps "forever" for an overflowing duration.
            None => tokio::time::sleep(due).await,
        }
    }
}

pub(super) fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

pub(super) async fn full_response(gen: Gen, guard: InFlight) -> Response {
    let start = Instant::now();
    pace(start, gen.due(gen.pieces.len().saturating_sub(1))).await;
    let text = gen.text();
    let v = if gen.chat {
        let mut message = json!({"role": "assistant", "content": text, "refusal": null});
        if !gen.tool_calls.is_empty() {
            if text.is_empty() {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = gen
                .tool_calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
        }
        json!({"id": gen.id, "object": "chat.completion", "created": gen.created, "model": gen.model,
               "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": gen.finish}],
               "usage": gen.usage})
    } else {
        json!({"id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": gen.finish}],
               "usage": gen.usage})
    };
    let body = serde_json::to_vec(&v).unwrap_or_default();
    let cut = gen.die_after.is_some_and(|d| d < gen.pieces.len() as u64);
    whole_or_cut(body, cut, guard)
}

/// A whole JSON reply; or, `cut` (the reply would pass `die_after_tokens`), half of it and
/// then a broken connection.
pub(super) fn whole_or_cut(body: Vec<u8>, cut: bool, mut guard: InFlight) -> Response {
    if cut {
        guard.fail();
        let half = Bytes::copy_from_slice(&body[..body.len() / 2]);
        let s = futures_util::stream::iter(vec![
            Ok(half),
            Err(std::io::Error::other("simulated connection drop")),
        ]);
        return (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(s),
        )
            .into_response();
    }
    guard.finish();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Where a stream is: role chunk, piece `i`, finish chunk, usage chunk, `[DONE]`, end.
enum Step {
    Role,
    Piece(usize),
    Finish,
    Usage,
    Done,
    End,
}

pub(super) fn stream_response(gen: Gen, guard: InFlight) -> Response {
    let start = Instant::now();
    let state = (gen, guard, Step::Role, start);
    let s = futures_util::stream::unfold(state, |(gen, mut guard, step, start)| async move {
        let (item, next) = match step {
            Step::Role => {
                pace(start, gen.ttft).await;
                let tool_only = !gen.tool_calls.is_empty()
                    && !gen.pieces.iter().any(|p| matches!(p, Piece::Text(_)));
                let delta = match (gen.chat, tool_only) {
                    (true, true) => json!({"role": "assistant", "content": null}),
                    (true, false) => json!({"role": "assistant", "content": ""}),
                    (false, _) => json!({"content": ""}),
                };
                let next = if gen.pieces.is_empty() {
                    Step::Finish
                } else {
                    Step::Piece(0)
                };
                (Ok(gen.chunk(delta, None)), next)
            }
            Step::Piece(i) => {
                pace(start, gen.due(i)).await;
                if gen.die_after.is_some_and(|d| i as u64 >= d) {
                    guard.fail();
                    (
                        Err(std::io::Error::other("simulated connection drop")),
                        Step::End,
                    )
                } else {
                    let next = if i + 1 < gen.pieces.len() {
                        Step::Piece(i + 1)
                    } else {
                        Step::Finish
                    };
                    let delta = gen
                        .pieces
                        .get(i)
                        .map(Gen::piece_delta)
                        .unwrap_or_else(|| json!({}));
                    (Ok(gen.chunk(delta, None)), next)
                }
            }
            Step::Finish => {
                let next = if gen.include_usage {
                    Step::Usage
                } else {
                    Step::Done
                };
                (Ok(gen.chunk(json!({}), Some(gen.finish))), next)
            }
            Step::Usage => {
                let object = if gen.chat {
                    "chat.completion.chunk"
                } else {
                    "text_completion"
                };
                let v = json!({"id": gen.id, "object": object, "created": gen.created, "model": gen.model, "choices": [], "usage": gen.usage});
                (Ok(sse(&v)), Step::Done)
            }
            Step::Done => {
                guard.finish();
                (Ok(Bytes::from_static(b"data: [DONE]\n\n")), Step::End)
            }
            Step::End => return None,
        };
        Some((item, (gen, guard, next, start)))
    });
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
    fn stop_cuts_before_the_sequence() {
        let (all, cut) = text_pieces(42, 12, &[]);
        assert_eq!(cut, None);
        let full = all.concat();
        let words: Vec<&str> = full.split(' ').collect();
        // Cut in the middle of a word and at a piece boundary.
        let stop = format!("{} {}", words[4], &words[5][..1]);
        let (pieces, cut) = text_pieces(42, 12, &["zzz".into(), stop.clone()]);
        assert_eq!(cut, Some(1));
        let text = pieces.concat();
        assert_eq!(text, full[..full.find(&stop).unwrap()]);
        assert!(!text.contains(&stop));
        let (pieces, cut) = text_pieces(42, 12, &[words[0].to_string()]);
        assert_eq!(cut, Some(0));
        assert!(pieces.is_empty());
    }

    #[test]
    fn fragments_keep_the_text() {
        for s in [
            "",
            "{}",
            "{\"a\"}",
            r#"{"city":"Paris","unit":"celsius"}"#,
            "{\"é\":\"ü€\"}",
        ] {
            let f = arg_fragments(s);
            assert_eq!(f.concat(), s);
            if s.chars().count() >= 3 {
                assert!(f.len() >= 3, "{s}: {f:?}");
            }
        }
        assert_eq!(say_pieces("Let me check.", 100).concat(), "Let me check.");
    }

    #[test]
    fn stop_accepts_string_or_array() {
        assert_eq!(stop_sequences(&json!({"stop": "x"})), ["x"]);
        assert_eq!(
            stop_sequences(&json!({"stop": ["a", "", 3, "b"]})),
            ["a", "b"]
        );
        assert!(stop_sequences(&json!({"stop": null})).is_empty());
        assert!(stop_sequences(&json!({"stop": ""})).is_empty());
    }
}

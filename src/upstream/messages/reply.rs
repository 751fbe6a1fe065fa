//! A whole Messages reply, as an OpenAI `chat.completion`: its text blocks joined as
//! `message.content`, its `tool_use` blocks as `tool_calls` (`input` as the JSON string
//! `arguments`), `stop_reason` as `finish_reason` ([`finish_reason`]), `usage` as OpenAI's
//! ([`TokenCounts`]). Other blocks (`thinking`, server tools' results) are left out.
//! It must not do I/O; a reply it cannot read is an `UpstreamError::Invalid`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::upstream::{UpstreamError, Usage};

/// Anthropic's token counts (`usage` of a message, of `message_start` and `message_delta`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub(super) struct TokenCounts {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
}

impl TokenCounts {
    /// The counts of `later` where it has them (a `message_delta`'s counts are cumulative).
    pub(super) fn update(&mut self, later: &TokenCounts) {
        let keep = |a: &mut Option<u64>, b: Option<u64>| {
            if b.is_some() {
                *a = b;
            }
        };
        keep(&mut self.input_tokens, later.input_tokens);
        keep(&mut self.output_tokens, later.output_tokens);
        keep(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        keep(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
    }

    /// Prompt tokens: the uncached input, plus what was read from and written to the cache
    /// (all of it is the prompt; Anthropic counts the three apart).
    pub(super) fn prompt(&self) -> u64 {
        let n = |v: Option<u64>| v.unwrap_or(0);
        n(self.input_tokens)
            .saturating_add(n(self.cache_read_input_tokens))
            .saturating_add(n(self.cache_creation_input_tokens))
    }

    pub(super) fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt(),
            completion_tokens: self.output_tokens.unwrap_or(0),
        }
    }

    /// OpenAI's `usage` object: `prompt_tokens_details.cached_tokens` is the cache read; the
    /// cache counts are kept under Anthropic's names too (as LiteLLM does).
    pub(super) fn openai(&self) -> OpenAiUsage {
        let completion = self.output_tokens.unwrap_or(0);
        OpenAiUsage {
            prompt_tokens: self.prompt(),
            completion_tokens: completion,
            total_tokens: self.prompt().saturating_add(completion),
            prompt_tokens_details: PromptDetails {
                cached_tokens: self.cache_read_input_tokens.unwrap_or(0),
            },
            cache_creation_input_tokens: self.cache_creation_input_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens,
        }
    }
}

#[derive(Serialize, Debug)]
pub(super) struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Serialize, Debug)]
struct PromptDetails {
    cached_tokens: u64,
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`: `end_turn`, `stop_sequence`,
/// `pause_turn` (and any new one) are `stop`; `max_tokens` and
/// `model_context_window_exceeded` are `length`; `tool_use` is `tool_calls`; `refusal` is
/// `content_filter`.
pub(super) fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Seconds since the epoch (`created`).
pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A Messages reply (the parts read), or its error envelope.
#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Vec<InBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<TokenCounts>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
pub(super) struct ErrorBody {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum InBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice; 1],
    usage: OpenAiUsage,
}

#[derive(Serialize)]
struct Choice {
    index: u32,
    message: Message,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
}

#[derive(Serialize)]
struct ToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function,
}

#[derive(Serialize)]
struct Function {
    name: String,
    arguments: String,
}

/// `Ok` for a reply whose `type` is `message` and that carries no `error`.
fn is_message(kind: Option<&str>, error: Option<ErrorBody>) -> Result<(), UpstreamError> {
    if let Some(e) = error {
        return Err(UpstreamError::Invalid(
            e.message
                .unwrap_or_else(|| "the reply carries an error".into()),
        ));
    }
    if kind != Some("message") {
        return Err(UpstreamError::Invalid(
            "the reply is not a Messages reply".into(),
        ));
    }
    Ok(())
}

/// The usage of a Messages reply `body` that goes back as it is (a Messages client's).
pub(super) fn native_usage(body: &[u8]) -> Result<Usage, UpstreamError> {
    #[derive(Deserialize)]
    struct Native {
        #[serde(rename = "type")]
        kind: Option<String>,
        error: Option<ErrorBody>,
        usage: Option<TokenCounts>,
    }
    let r: Native = serde_json::from_slice(body)
        .map_err(|_| UpstreamError::Invalid("the reply is not a Messages reply".into()))?;
    is_message(r.kind.as_deref(), r.error)?;
    Ok(r.usage.unwrap_or_default().usage())
}

/// The chat completion for a Messages reply `body`, and its usage.
pub(super) fn to_openai(body: &[u8]) -> Result<(Bytes, Option<Usage>), UpstreamError> {
    let r: Reply = serde_json::from_slice(body)
        .map_err(|_| UpstreamError::Invalid("the reply is not a Messages reply".into()))?;
    is_message(r.kind.as_deref(), r.error)?;
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for b in r.content {
        match b {
            InBlock::Text { text: t } => text.get_or_insert_with(String::new).push_str(&t),
            InBlock::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                kind: "function",
                function: Function {
                    name,
                    arguments: if input.is_null() {
                        "{}".into()
                    } else {
                        input.to_string()
                    },
                },
            }),
            InBlock::Other => {}
        }
    }
    let counts = r.usage.unwrap_or_default();
    let finish = match r.stop_reason.as_deref() {
        Some(s) => finish_reason(s),
        None if !tool_calls.is_empty() => "tool_calls",
        None => "stop",
    };
    let out = Completion {
        id: r.id.as_deref().unwrap_or("msg"),
        object: "chat.completion",
        created: now(),
        model: r.model.as_deref().unwrap_or_default(),
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content: text,
                tool_calls,
            },
            logprobs: None,
            finish_reason: finish,
        }],
        usage: counts.openai(),
    };
    let bytes = serde_json::to_vec(&out)
        .map_err(|_| UpstreamError::Invalid("the reply cannot be rendered".into()))?;
    Ok((Bytes::from(bytes), r.usage.map(|c| c.usage())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(v: Value) -> (Value, Option<Usage>) {
        let (b, u) = to_openai(&serde_json::to_vec(&v).unwrap()).unwrap();
        (serde_json::from_slice(&b).unwrap(), u)
    }

    #[test]
    fn text_tool_calls_finish_and_usage() {
        let (out, usage) = read(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me "},
                {"type": "text", "text": "check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}}
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5}
        }));
        assert_eq!(out["id"], "msg_1");
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["model"], "claude-x");
        assert!(out["created"].as_u64().unwrap() > 1_600_000_000);
        let c = &out["choices"][0];
        assert_eq!(c["index"], 0);
        assert_eq!(c["finish_reason"], "tool_calls");
        assert_eq!(c["message"]["role"], "assistant");
        assert_eq!(c["message"]["content"], "Let me check.");
        assert_eq!(
            c["message"]["tool_calls"],
            json!([
                {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "toolu_2", "type": "function", "function": {"name": "time", "arguments": "{}"}}
            ])
        );
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 115, "completion_tokens": 7, "total_tokens": 122,
                   "prompt_tokens_details": {"cached_tokens": 100},
                   "cache_creation_input_tokens": 5, "cache_read_input_tokens": 100})
        );
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 115,
                completion_tokens: 7
            })
        );
    }

    #[test]
    fn stop_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
            ("something_new", "stop"),
        ] {
            let (out, _) = read(
                json!({"type": "message", "content": [{"type": "text", "text": "x"}],
                "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}}),
            );
            assert_eq!(out["choices"][0]["finish_reason"], finish, "{stop}");
        }
        // No text: content is null, as OpenAI's.
        let (out, usage) =
            read(json!({"type": "message", "content": [], "stop_reason": "end_turn"}));
        assert!(out["choices"][0]["message"]["content"].is_null());
        assert!(out["choices"][0]["message"].get("tool_calls").is_none());
        assert_eq!(usage, None);
    }

    #[test]
    fn errors_and_garbage_are_invalid() {
        let e = to_openai(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert!(matches!(e, Err(UpstreamError::Invalid(m)) if m == "Overloaded"));
        for body in [
            &b"<html>"[..],
            b"[]",
            b"{}",
            b"{\"type\":\"completion\"}",
            b"",
            b"\xff\xfe",
        ] {
            assert!(matches!(to_openai(body), Err(UpstreamError::Invalid(_))));
        }
    }
}

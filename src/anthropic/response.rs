//! A whole OpenAI chat completion, translated into a Messages reply: the text as a `text`
//! block, each tool call as a `tool_use` block (its JSON arguments as `input`), `stop_reason`
//! from `finish_reason` (see [`stop_reason`]), `usage` from the backend's counts (or the
//! gateway's estimate when it sent none).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{message_id, Context};

/// The parts of an OpenAI chat completion the translation reads.
#[derive(Deserialize)]
struct ChatCompletion {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
    /// vLLM: the stop string (or token id) that ended the generation.
    #[serde(default)]
    stop_reason: Option<Value>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize)]
struct ToolCall {
    #[serde(default)]
    id: Option<String>,
    function: Function,
}

#[derive(Deserialize)]
struct Function {
    #[serde(default)]
    name: String,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize, Clone, Copy, Default)]
pub(super) struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// A Messages reply.
#[derive(Serialize)]
pub(super) struct Message<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: &'a str,
    pub content: Vec<OutBlock>,
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Option<String>,
    pub usage: OutUsage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum OutBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

#[derive(Serialize, Clone, Copy, Default)]
pub(super) struct OutUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The Messages `stop_reason` (and `stop_sequence`) of a generation that ended with
/// `finish` (OpenAI's `finish_reason`): `length` is `max_tokens`; any tool call is `tool_use`,
/// whatever the backend said (some say `stop` after tool calls); a stop the backend names
/// (vLLM's `stop_reason`) that is one of the request's `stop_sequences` is `stop_sequence`;
/// `content_filter` is `refusal`; everything else `end_turn`.
pub(super) fn stop_reason(
    finish: Option<&str>,
    tool_use: bool,
    matched: Option<&Value>,
    ctx: &Context,
) -> (&'static str, Option<String>) {
    match finish {
        Some("length") => return ("max_tokens", None),
        Some("content_filter") => return ("refusal", None),
        _ => {}
    }
    if tool_use || matches!(finish, Some("tool_calls" | "function_call")) {
        return ("tool_use", None);
    }
    if let Some(Value::String(s)) = matched {
        if ctx.stop_sequences.iter().any(|q| q == s) {
            return ("stop_sequence", Some(s.clone()));
        }
    }
    ("end_turn", None)
}

/// Translates a whole OpenAI chat completion `body` into a Messages reply for `ctx`; `Err`
/// says what is wrong with it (the backend's fault: a 5xx).
pub(crate) fn from_openai(body: &[u8], ctx: &Context) -> Result<Vec<u8>, String> {
    let c: ChatCompletion = serde_json::from_slice(body)
        .map_err(|e| format!("the backend's reply is not a chat completion: {e}"))?;
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or("the backend's reply has no choices")?;
    let id = message_id();
    let mut content = Vec::new();
    let mut output_chars = 0u64;
    if let Some(m) = choice.message {
        if let Some(text) = m.content.filter(|t| !t.is_empty()) {
            output_chars += text.chars().count() as u64;
            content.push(OutBlock::Text { text });
        }
        for (n, call) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
            let args = call.function.arguments.unwrap_or_default();
            output_chars += args.len() as u64;
            let input = if args.trim().is_empty() {
                Value::Object(Default::default())
            } else {
                serde_json::from_str(&args).map_err(|_| {
                    format!(
                        "the backend's call of `{}` has arguments that are not JSON",
                        super::request::short(&call.function.name)
                    )
                })?
            };
            content.push(OutBlock::ToolUse {
                id: call
                    .id
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| format!("toolu_{}_{n}", &id[4..])),
                name: call.function.name,
                input,
            });
        }
    }
    let tool_use = content
        .iter()
        .any(|b| matches!(b, OutBlock::ToolUse { .. }));
    let (reason, seq) = stop_reason(
        choice.finish_reason.as_deref(),
        tool_use,
        choice.stop_reason.as_ref(),
        ctx,
    );
    let usage = match c.usage {
        Some(u) => OutUsage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
        },
        None => OutUsage {
            input_tokens: ctx.input_estimate,
            output_tokens: super::estimate_tokens(output_chars),
        },
    };
    let msg = Message {
        id: &id,
        kind: "message",
        role: "assistant",
        model: &ctx.model,
        content,
        stop_reason: Some(reason),
        stop_sequence: seq,
        usage,
    };
    serde_json::to_vec(&msg).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Context {
        Context {
            model: "claude-local".into(),
            stop_sequences: vec!["END".into()],
            input_estimate: 9,
            top_k: false,
        }
    }

    fn translate(v: Value) -> Value {
        serde_json::from_slice(&from_openai(v.to_string().as_bytes(), &ctx()).unwrap()).unwrap()
    }

    #[test]
    fn text_reply() {
        let m = translate(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        }));
        assert!(m["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(m["type"], "message");
        assert_eq!(m["role"], "assistant");
        assert_eq!(m["model"], "claude-local");
        assert_eq!(
            m["content"],
            json!([{"type": "text", "text": "Hello there"}])
        );
        assert_eq!(m["stop_reason"], "end_turn");
        assert_eq!(m["stop_sequence"], Value::Null);
        assert_eq!(m["usage"], json!({"input_tokens": 7, "output_tokens": 2}));
    }

    #[test]
    fn tool_calls_become_tool_use_blocks() {
        let m = translate(json!({
            "choices": [{"message": {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": ""}}
            ]}, "finish_reason": "tool_calls"}]
        }));
        assert_eq!(
            m["content"],
            json!([
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}
            ])
        );
        assert_eq!(m["stop_reason"], "tool_use");
        // No usage from the backend: the estimates.
        assert_eq!(m["usage"]["input_tokens"], 9);
    }

    #[test]
    fn stop_reasons() {
        // Named bug: `end_turn` after tool calls. A backend that says `stop` after them still
        // gets `tool_use`.
        let m = translate(
            json!({"choices": [{"message": {"content": null, "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": "stop"}]}),
        );
        assert_eq!(m["stop_reason"], "tool_use");
        let m = translate(
            json!({"choices": [{"message": {"content": "a b"}, "finish_reason": "length"}]}),
        );
        assert_eq!(m["stop_reason"], "max_tokens");
        let m = translate(
            json!({"choices": [{"message": {"content": "a"}, "finish_reason": "stop", "stop_reason": "END"}]}),
        );
        assert_eq!(m["stop_reason"], "stop_sequence");
        assert_eq!(m["stop_sequence"], "END");
        let m = translate(
            json!({"choices": [{"message": {"content": "a"}, "finish_reason": "stop", "stop_reason": 2}]}),
        );
        assert_eq!(m["stop_reason"], "end_turn");
    }

    #[test]
    fn broken_replies_are_errors() {
        for body in [
            "not json",
            "{\"choices\":[]}",
            r#"{"choices":[{"message":{"tool_calls":[{"function":{"name":"f","arguments":"{oops"}}]}}]}"#,
        ] {
            assert!(from_openai(body.as_bytes(), &ctx()).is_err(), "{body}");
        }
    }
}

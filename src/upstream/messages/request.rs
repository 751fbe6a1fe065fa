//! An OpenAI chat completion request, as the body of an Anthropic `POST /v1/messages`.
//!
//! - `system` and `developer` messages become `system` (joined by a blank line, in order);
//! - `user` content becomes `text` and `image` blocks (a `data:image/...;base64,` URL as a
//!   base64 source, an http(s) URL as a url source); an assistant's `tool_calls` become
//!   `tool_use` blocks (`arguments` parsed into the `input` object); `tool` messages become
//!   `tool_result` blocks of a user turn; consecutive turns of one role are merged into one (the
//!   Messages API wants them alternating), a user turn's `tool_result` blocks first;
//! - `max_completion_tokens`, else `max_tokens`, else [`DEFAULT_MAX_TOKENS`] (the Messages API
//!   requires one) becomes `max_tokens`; `stop` becomes `stop_sequences`; `temperature`,
//!   `top_p`, `top_k` and `stream` keep their names; `user` becomes `metadata.user_id`;
//! - function `tools` become `{name, description, input_schema}`; `tool_choice` `auto` /
//!   `required` / `none` / a named function becomes `auto` / `any` / `none` / `tool` (left
//!   out without tools), and `parallel_tool_calls: false` becomes its
//!   `disable_parallel_tool_use: true`.
//!
//! What the Messages API cannot do is refused ([`Refused`], a 400 naming the field), never
//! silently lost: `n` > 1, `logprobs`, `top_logprobs`, a JSON `response_format`, non-zero
//! `presence_penalty` / `frequency_penalty`, `logit_bias`, audio, the legacy `functions` /
//! `function_call` and `function` messages, parts other than text and images, tools other than
//! functions. Fields that change nothing in the reply (`seed`, `store`, `metadata`,
//! `service_tier`, `stream_options`: read by the stream reader) and unknown ones are left out.
//! It must not do I/O, nor edit JSON as text.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `max_tokens` when the request sets none: the Messages API requires one.
pub(crate) const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Why a request cannot be sent as a Messages request: the field at fault and what is wrong.
#[derive(Debug, PartialEq)]
pub(crate) struct Refused {
    pub param: Option<&'static str>,
    pub message: String,
}

fn refuse(param: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        param: Some(param),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The OpenAI side (what the translation reads; other fields are ignored).

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<InToolChoice>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    user: Option<String>,
    // Refused when they ask for what the Messages API has not.
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    logit_bias: Option<Map<String, Value>>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    modalities: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
enum InMessage {
    System {
        content: InContent,
    },
    Developer {
        content: InContent,
    },
    User {
        content: InContent,
    },
    Assistant {
        #[serde(default)]
        content: Option<InContent>,
        #[serde(default)]
        tool_calls: Option<Vec<InToolCall>>,
    },
    Tool {
        tool_call_id: String,
        content: InContent,
    },
    Function {},
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InContent {
    Text(String),
    Parts(Vec<InPart>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum InPart {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: InImage,
    },
    Refusal {
        refusal: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct InImage {
    url: String,
}

#[derive(Deserialize)]
struct InToolCall {
    id: String,
    function: InFunctionCall,
}

#[derive(Deserialize)]
struct InFunctionCall {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Deserialize)]
struct InTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    function: Option<InFunction>,
}

#[derive(Deserialize)]
struct InFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InToolChoice {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Deserialize)]
struct NamedFunction {
    name: String,
}

// ---------------------------------------------------------------------------------------------
// The Messages side.

#[derive(Serialize)]
struct MessagesRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    max_tokens: u64,
    messages: Vec<Turn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<OutTool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<OutToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata>,
}

#[derive(Serialize, Debug, PartialEq)]
struct Turn {
    role: Role,
    content: Vec<Block>,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Role {
    User,
    Assistant,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        content: Vec<Block>,
    },
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Serialize)]
struct OutTool {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    input_schema: Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutToolChoice {
    Auto {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    Any {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    Tool {
        name: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    None,
}

#[derive(Serialize)]
struct Metadata {
    user_id: String,
}

// ---------------------------------------------------------------------------------------------

/// The top-level fields, as `param` names (for a body whose shape is wrong).
const PARAMS: [&str; 12] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stream",
    "tools",
    "tool_choice",
    "user",
];

/// The Messages request for the OpenAI chat completion request `body`.
pub(crate) fn to_messages(body: &[u8]) -> Result<Vec<u8>, Refused> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: ChatRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let top = path.split(['.', '[']).next().unwrap_or_default();
        Refused {
            param: PARAMS.iter().copied().find(|p| *p == top),
            message: format!("{path}: {}", e.inner()),
        }
    })?;
    refusals(&req)?;
    let (system, messages) = turns(req.messages)?;
    let tools = match req.tools {
        Some(t) if !t.is_empty() => Some(tools(t)?),
        _ => None,
    };
    let disable_parallel = req.parallel_tool_calls == Some(false);
    // Without tools, a tool choice means nothing (the Messages API refuses one).
    let tool_choice = match req.tool_choice {
        Some(_) if tools.is_none() => None,
        Some(c) => Some(tool_choice(c, disable_parallel)?),
        None if disable_parallel && tools.is_some() => Some(OutToolChoice::Auto {
            disable_parallel_tool_use: true,
        }),
        None => None,
    };
    let out = MessagesRequest {
        model: req.model,
        max_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS),
        messages,
        system,
        stop_sequences: match req.stop {
            None => None,
            Some(Stop::One(s)) => Some(vec![s]),
            Some(Stop::Many(v)) if v.is_empty() => None,
            Some(Stop::Many(v)) => Some(v),
        },
        stream: req.stream.unwrap_or(false),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        tools,
        tool_choice,
        metadata: req.user.map(|user_id| Metadata { user_id }),
    };
    serde_json::to_vec(&out).map_err(|e| refuse("messages", e.to_string()))
}

/// What the Messages API has no equivalent for.
fn refusals(r: &ChatRequest) -> Result<(), Refused> {
    if r.n.is_some_and(|n| n > 1) {
        return Err(refuse(
            "n",
            "Anthropic's Messages API returns one choice per request; n must be 1",
        ));
    }
    if r.logprobs == Some(true) {
        return Err(refuse(
            "logprobs",
            "Anthropic's Messages API does not return log probabilities",
        ));
    }
    if r.top_logprobs.is_some_and(|n| n > 0) {
        return Err(refuse(
            "top_logprobs",
            "Anthropic's Messages API does not return log probabilities",
        ));
    }
    if let Some(f) = &r.response_format {
        if f.kind != "text" {
            return Err(refuse(
                "response_format",
                format!(
                    "Anthropic's Messages API has no `{}` response format; describe the format in the prompt or use a tool",
                    f.kind
                ),
            ));
        }
    }
    for (param, v) in [
        ("presence_penalty", r.presence_penalty),
        ("frequency_penalty", r.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(refuse(
                param,
                format!("Anthropic's Messages API has no {param}"),
            ));
        }
    }
    if r.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(refuse(
            "logit_bias",
            "Anthropic's Messages API has no logit_bias",
        ));
    }
    for (param, v) in [
        ("functions", &r.functions),
        ("function_call", &r.function_call),
    ] {
        if v.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(refuse(param, "use tools and tool_choice instead"));
        }
    }
    let audio = r.audio.as_ref().is_some_and(|v| !v.is_null())
        || r.modalities
            .as_ref()
            .is_some_and(|m| m.iter().any(|m| m == "audio"));
    if audio {
        return Err(refuse(
            "modalities",
            "Anthropic's Messages API does not generate audio",
        ));
    }
    Ok(())
}

/// `system` and the alternating turns of `messages`.
fn turns(messages: Vec<InMessage>) -> Result<(Option<String>, Vec<Turn>), Refused> {
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let (role, blocks) = match m {
            InMessage::System { content } | InMessage::Developer { content } => {
                let text = text_only(content, i)?;
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            InMessage::User { content } => (Role::User, blocks(content, i)?),
            InMessage::Assistant {
                content,
                tool_calls,
            } => {
                let mut b = match content {
                    Some(c) => blocks(c, i)?,
                    None => Vec::new(),
                };
                for (j, call) in tool_calls.unwrap_or_default().into_iter().enumerate() {
                    b.push(tool_use(call, i, j)?);
                }
                (Role::Assistant, b)
            }
            InMessage::Tool {
                tool_call_id,
                content,
            } => (
                Role::User,
                vec![Block::ToolResult {
                    tool_use_id: tool_call_id,
                    content: blocks(content, i)?,
                }],
            ),
            InMessage::Function {} => {
                return Err(refuse(
                    "messages",
                    format!("messages[{i}]: `function` messages are not supported; use tools and `tool` messages"),
                ))
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => turns.push(Turn {
                role,
                content: blocks,
            }),
        }
    }
    // In a user turn, the tool results come first (what the Messages API expects).
    for t in turns.iter_mut().filter(|t| t.role == Role::User) {
        if t.content.len() > 1 {
            let (mut results, rest): (Vec<Block>, Vec<Block>) = std::mem::take(&mut t.content)
                .into_iter()
                .partition(|b| matches!(b, Block::ToolResult { .. }));
            results.extend(rest);
            t.content = results;
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    Ok((system, turns))
}

/// The text of a system message (images cannot be part of a system prompt).
fn text_only(content: InContent, i: usize) -> Result<String, Refused> {
    match content {
        InContent::Text(t) => Ok(t),
        InContent::Parts(parts) => {
            let mut out: Vec<String> = Vec::new();
            for p in parts {
                match p {
                    InPart::Text { text } => out.push(text),
                    _ => {
                        return Err(refuse(
                            "messages",
                            format!("messages[{i}]: a system message may only have text parts"),
                        ))
                    }
                }
            }
            Ok(out.join("\n"))
        }
    }
}

/// The blocks of a message's content (empty text left out: the Messages API refuses it).
fn blocks(content: InContent, i: usize) -> Result<Vec<Block>, Refused> {
    let parts = match content {
        InContent::Text(t) if t.is_empty() => return Ok(Vec::new()),
        InContent::Text(text) => return Ok(vec![Block::Text { text }]),
        InContent::Parts(p) => p,
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, p) in parts.into_iter().enumerate() {
        match p {
            InPart::Text { text } | InPart::Refusal { refusal: text } => {
                if !text.is_empty() {
                    out.push(Block::Text { text });
                }
            }
            InPart::ImageUrl { image_url } => out.push(Block::Image {
                source: image_source(image_url.url).ok_or_else(|| {
                    refuse(
                        "messages",
                        format!("messages[{i}].content[{j}].image_url.url: give a data:image/...;base64, URL or an http(s) URL"),
                    )
                })?,
            }),
            InPart::Other => {
                return Err(refuse(
                    "messages",
                    format!("messages[{i}].content[{j}]: Anthropic's Messages API takes text and image_url parts only"),
                ))
            }
        }
    }
    Ok(out)
}

/// The source of an image URL: `data:<media type>;base64,<data>`, or an http(s) URL.
fn image_source(url: String) -> Option<ImageSource> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest.split_once(";base64,")?;
        if !media_type.starts_with("image/") || data.is_empty() {
            return None;
        }
        return Some(ImageSource::Base64 {
            media_type: media_type.to_owned(),
            data: data.to_owned(),
        });
    }
    let lower = url.get(..8).unwrap_or(&url).to_ascii_lowercase();
    (lower.starts_with("https://") || lower.starts_with("http://"))
        .then_some(ImageSource::Url { url })
}

/// An assistant's tool call as a `tool_use` block (`arguments` parsed: a JSON object).
fn tool_use(call: InToolCall, i: usize, j: usize) -> Result<Block, Refused> {
    let args = call.function.arguments.trim();
    let input = if args.is_empty() {
        Value::Object(Map::new())
    } else {
        match serde_json::from_str::<Value>(args) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Err(refuse(
                    "messages",
                    format!(
                        "messages[{i}].tool_calls[{j}].function.arguments: must be a JSON object"
                    ),
                ))
            }
        }
    };
    Ok(Block::ToolUse {
        id: call.id,
        name: call.function.name,
        input,
    })
}

fn tools(tools: Vec<InTool>) -> Result<Vec<OutTool>, Refused> {
    tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| match (t.kind.as_str(), t.function) {
            ("function", Some(f)) => Ok(OutTool {
                name: f.name,
                description: f.description,
                input_schema: f
                    .parameters
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            }),
            _ => Err(refuse(
                "tools",
                format!("tools[{i}]: Anthropic's Messages API takes function tools only"),
            )),
        })
        .collect()
}

fn tool_choice(c: InToolChoice, disable_parallel: bool) -> Result<OutToolChoice, Refused> {
    let d = disable_parallel;
    Ok(match c {
        InToolChoice::Mode(m) => match m.as_str() {
            "auto" => OutToolChoice::Auto {
                disable_parallel_tool_use: d,
            },
            "required" => OutToolChoice::Any {
                disable_parallel_tool_use: d,
            },
            "none" => OutToolChoice::None,
            _ => {
                return Err(refuse(
                    "tool_choice",
                    format!("`{m}` is not one of auto, required, none"),
                ))
            }
        },
        InToolChoice::Named { kind, function } if kind == "function" => OutToolChoice::Tool {
            name: function.name,
            disable_parallel_tool_use: d,
        },
        InToolChoice::Named { kind, .. } => {
            return Err(refuse(
                "tool_choice",
                format!("a `{kind}` tool choice is not supported; name a function"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn translate(v: Value) -> Value {
        let out = to_messages(&serde_json::to_vec(&v).unwrap()).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn refused(v: Value) -> Refused {
        to_messages(&serde_json::to_vec(&v).unwrap()).unwrap_err()
    }

    #[test]
    fn system_developer_sampling_stop_and_default_max_tokens() {
        let out = translate(json!({
            "model": "claude-x",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": "hi"}
            ],
            "temperature": 0.5, "top_p": 0.9, "stop": "END", "stream": true,
            "stream_options": {"include_usage": true}, "seed": 7, "user": "u-1", "n": 1
        }));
        assert_eq!(
            out,
            json!({
                "model": "claude-x",
                "max_tokens": DEFAULT_MAX_TOKENS,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "system": "Be brief.\n\nUse French.",
                "stop_sequences": ["END"],
                "stream": true,
                "temperature": 0.5,
                "top_p": 0.9,
                "metadata": {"user_id": "u-1"}
            })
        );
        let out = translate(json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10, "max_completion_tokens": 20, "stop": ["a", "b"]
        }));
        assert_eq!(out["max_tokens"], 20);
        assert_eq!(out["stop_sequences"], json!(["a", "b"]));
        let out = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}),
        );
        assert_eq!(out["max_tokens"], 10);
        assert!(out.get("stream").is_none() && out.get("system").is_none());
    }

    #[test]
    fn tools_and_tool_choice() {
        let tools = json!([{"type": "function", "function": {"name": "get", "description": "d", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
                           {"type": "function", "function": {"name": "now"}}]);
        let base = |choice: Value, parallel: Value| {
            let mut req = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools});
            if !choice.is_null() {
                req["tool_choice"] = choice;
            }
            if !parallel.is_null() {
                req["parallel_tool_calls"] = parallel;
            }
            translate(req)
        };
        let out = base(Value::Null, Value::Null);
        assert_eq!(
            out["tools"],
            json!([
                {"name": "get", "description": "d", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}}
            ])
        );
        assert!(out.get("tool_choice").is_none());
        assert_eq!(
            base(json!("auto"), Value::Null)["tool_choice"],
            json!({"type": "auto"})
        );
        assert_eq!(
            base(json!("required"), Value::Null)["tool_choice"],
            json!({"type": "any"})
        );
        assert_eq!(
            base(json!("none"), Value::Null)["tool_choice"],
            json!({"type": "none"})
        );
        assert_eq!(
            base(
                json!({"type": "function", "function": {"name": "get"}}),
                json!(false)
            )["tool_choice"],
            json!({"type": "tool", "name": "get", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            base(Value::Null, json!(false))["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            base(json!("required"), json!(false))["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert!(base(Value::Null, json!(true)).get("tool_choice").is_none());
        let r = refused(json!({"model": "m", "messages": [], "tools": [{"type": "web_search"}]}));
        assert_eq!(r.param, Some("tools"));
        let r = refused(
            json!({"model": "m", "messages": [], "tools": tools, "tool_choice": "sometimes"}),
        );
        assert_eq!(r.param, Some("tool_choice"));
        let out = translate(
            json!({"model": "m", "messages": [], "tool_choice": "none", "parallel_tool_calls": false}),
        );
        assert!(out.get("tool_choice").is_none() && out.get("tools").is_none());
    }

    #[test]
    fn a_tool_round_trip_alternates_and_merges_tool_results() {
        let out = translate(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": ""}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
                {"role": "user", "content": "thanks"},
                {"role": "user", "content": "and Oslo?"},
                {"role": "assistant", "content": "Let me see."},
                {"role": "assistant", "content": ""}
            ]
        }));
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "weather in Paris and Rome?"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
                    {"type": "text", "text": "thanks"},
                    {"type": "text", "text": "and Oslo?"}
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me see."}]}
            ])
        );
        // A user's text before a tool result in one merged turn: the result goes first.
        let out = translate(json!({"model": "m", "messages": [
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": "wait"},
            {"role": "tool", "tool_call_id": "c", "content": ""}
        ]}));
        assert_eq!(
            out["messages"][1]["content"],
            json!([{"type": "tool_result", "tool_use_id": "c"}, {"type": "text", "text": "wait"}])
        );
        let r = refused(json!({"model": "m", "messages": [
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}
        ]}));
        assert_eq!(r.param, Some("messages"));
        assert!(
            r.message
                .contains("messages[0].tool_calls[0].function.arguments"),
            "{}",
            r.message
        );
    }

    #[test]
    fn images() {
        let out = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}}
            ]}]}),
        );
        assert_eq!(
            out["messages"][0]["content"],
            json!([
                {"type": "text", "text": "what is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
            ])
        );
        for url in [
            "ftp://x/y.png",
            "data:text/plain;base64,AAAA",
            "data:image/png,raw",
        ] {
            let r = refused(
                json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]}),
            );
            assert_eq!(r.param, Some("messages"), "{url}");
        }
        let r = refused(
            json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
        );
        assert!(
            r.message.contains("messages[0].content[0]"),
            "{}",
            r.message
        );
        let r = refused(
            json!({"model": "m", "messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
        );
        assert_eq!(r.param, Some("messages"));
    }

    #[test]
    fn what_the_messages_api_cannot_do_is_refused_naming_the_field() {
        let m = json!([{"role": "user", "content": "x"}]);
        for (extra, param) in [
            (json!({"n": 2}), "n"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
                "response_format",
            ),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"frequency_penalty": -1}), "frequency_penalty"),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
        ] {
            let mut req = json!({"model": "m", "messages": m});
            for (k, v) in extra.as_object().unwrap() {
                req[k] = v.clone();
            }
            let r = refused(req);
            assert_eq!(r.param, Some(param), "{extra}: {}", r.message);
        }
        // Their neutral values pass.
        translate(
            json!({"model": "m", "messages": m, "n": 1, "logprobs": false, "top_logprobs": 0,
            "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "functions": null, "modalities": ["text"]}),
        );
        // A body of the wrong shape names the field.
        let r = refused(json!({"model": "m", "messages": "hi"}));
        assert_eq!(r.param, Some("messages"));
        let r = refused(
            json!({"model": "m", "messages": [{"role": "function", "name": "f", "content": "x"}]}),
        );
        assert_eq!(r.param, Some("messages"));
        let r = refused(json!({"model": "m", "messages": [], "max_tokens": "many"}));
        assert_eq!(r.param, Some("max_tokens"));
        assert!(to_messages(b"not json").is_err());
    }
}

//! A Messages request, and its translation into an OpenAI chat completion request.
//!
//! - `system` (a string or text blocks) becomes the first, `system`, message;
//! - `text` and `image` blocks (base64 or URL) become the user's content (a string when it is
//!   all text, else parts with `image_url` data URLs);
//! - an assistant's `tool_use` blocks become its `tool_calls` (`input` as the JSON `arguments`);
//!   a user's `tool_result` blocks become `tool` messages, before the rest of that user turn;
//!   `thinking` blocks of earlier turns are dropped;
//! - `tools` become functions (`input_schema` as `parameters`); `tool_choice` `auto` / `any` /
//!   `tool` / `none` become `"auto"` / `"required"` / a named function / `"none"`, and
//!   `disable_parallel_tool_use` becomes `parallel_tool_calls: false`;
//! - `stop_sequences` become `stop`, `max_tokens`, `temperature`, `top_p` and `top_k` keep their
//!   names (`top_k` is dropped for cloud deployments, see `proxy::forward`), `metadata.user_id`
//!   becomes `user`; a stream asks for the final usage chunk (`stream_options.include_usage`).
//!
//! Anything the OpenAI format cannot carry (documents, server tools, images in tool results) is
//! a 400 naming it, never silently lost.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{estimate_tokens, Context};

/// Why a Messages request cannot be translated.
#[derive(Debug, PartialEq)]
pub(crate) enum Invalid {
    /// The body is not JSON (or not an object).
    Json(String),
    /// A field is missing or wrong: its top-level name, and what is wrong.
    Value {
        param: &'static str,
        message: String,
    },
}

/// A translated request.
#[derive(Debug)]
pub(crate) struct Translated {
    /// The OpenAI chat completion request to send upstream.
    pub body: Bytes,
    pub model: String,
    pub stream: bool,
    /// The body's `priority` field, if any: the gateway's when it is one of its words (never
    /// forwarded: a Messages backend has no such field).
    pub priority: Option<Value>,
    pub context: Context,
}

/// The fields a Messages request may have that the gateway reads; others are ignored
/// (`cache_control`, `service_tier`, ...).
#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    messages: Vec<InputMessage>,
    #[serde(default)]
    system: Option<System>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<u64>,
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
    #[serde(default)]
    priority: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum System {
    Text(String),
    Blocks(Vec<SystemBlock>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum SystemBlock {
    Text { text: String },
}

#[derive(Deserialize)]
struct InputMessage {
    role: Role,
    content: Content,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Role {
    User,
    Assistant,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Deserialize)]
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
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<ToolResultContent>,
        #[serde(default)]
        is_error: bool,
    },
    Thinking {},
    RedactedThinking {},
    Document {},
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ToolResultContent {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct Tool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// Absent for Anthropic's server tools (`web_search_...`), which no OpenAI backend runs.
    #[serde(default)]
    input_schema: Option<Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToolChoice {
    Auto {
        #[serde(default)]
        disable_parallel_tool_use: bool,
    },
    Any {
        #[serde(default)]
        disable_parallel_tool_use: bool,
    },
    Tool {
        name: String,
        #[serde(default)]
        disable_parallel_tool_use: bool,
    },
    None {},
}

// ---------------------------------------------------------------------------------------------
// The OpenAI side.

/// An OpenAI chat completion request, as the gateway sends it.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<ChatMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<&'a [String]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<ChatTool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ChatToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "role", rename_all = "snake_case")]
enum ChatMessage {
    System {
        content: String,
    },
    User {
        content: UserContent,
    },
    Assistant {
        content: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
    },
    Tool {
        tool_call_id: String,
        content: String,
    },
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
enum UserContent {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Serialize, Debug, PartialEq)]
struct ImageUrl {
    url: String,
}

#[derive(Serialize, Debug, PartialEq)]
struct ToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall,
}

#[derive(Serialize, Debug, PartialEq)]
struct FunctionCall {
    name: String,
    arguments: String,
}

#[derive(Serialize)]
struct ChatTool {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionDef,
}

#[derive(Serialize)]
struct FunctionDef {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    parameters: Value,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChatToolChoice {
    Mode(&'static str),
    Named {
        #[serde(rename = "type")]
        kind: &'static str,
        function: NamedFunction,
    },
}

#[derive(Serialize)]
struct NamedFunction {
    name: String,
}

// ---------------------------------------------------------------------------------------------

/// The top-level fields, as `param` names.
const PARAMS: [&str; 14] = [
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "tools",
    "tool_choice",
    "priority",
    "body",
];

fn invalid(param: &'static str, message: impl Into<String>) -> Invalid {
    Invalid::Value {
        param,
        message: message.into(),
    }
}

/// Translates a Messages request body (`count_only`: for `count_tokens`, where `max_tokens`
/// may be absent). See the module doc.
pub(crate) fn translate(body: &[u8], count_only: bool) -> Result<Translated, Invalid> {
    // serde would take an array for a struct: only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Invalid::Json("the body must be a JSON object".into()));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: MessagesRequest = match serde_path_to_error::deserialize(de) {
        Ok(r) => r,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if !inner.is_data() {
                return Err(Invalid::Json(inner.to_string()));
            }
            let message = inner.to_string();
            let top = match path.as_str() {
                // At the top: a missing field, or not an object at all.
                "." => match message
                    .strip_prefix("missing field `")
                    .and_then(|m| m.split('`').next())
                {
                    Some(field) => field.to_string(),
                    None => return Err(Invalid::Json("the body must be a JSON object".into())),
                },
                p => p.split(['.', '[']).next().unwrap_or_default().to_string(),
            };
            let param = PARAMS.iter().copied().find(|p| *p == top).unwrap_or("body");
            let message = match message {
                m if m.starts_with("data did not match any variant") => {
                    format!("{path}: not one of the accepted forms")
                }
                m if path == "." => format!("{top}: Field required ({m})"),
                m => format!("{path}: {m}"),
            };
            return Err(invalid(param, message));
        }
    };
    if req.model.is_empty() {
        return Err(invalid("model", "model: must not be empty"));
    }
    if req.messages.is_empty() {
        return Err(invalid(
            "messages",
            "messages: at least one message is required",
        ));
    }
    let max_tokens = match req.max_tokens {
        Some(0) => return Err(invalid("max_tokens", "max_tokens: must be at least 1")),
        None if !count_only => return Err(invalid("max_tokens", "max_tokens: Field required")),
        m => m,
    };
    let mut chars = 0u64;
    let mut count = |s: &str| chars += s.chars().count() as u64;
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    match &req.system {
        Some(System::Text(t)) if !t.is_empty() => {
            count(t);
            messages.push(ChatMessage::System { content: t.clone() });
        }
        Some(System::Blocks(blocks)) if !blocks.is_empty() => {
            let text = join(
                blocks
                    .iter()
                    .map(|SystemBlock::Text { text }| text.as_str()),
            );
            count(&text);
            messages.push(ChatMessage::System { content: text });
        }
        _ => {}
    }
    for (i, m) in req.messages.iter().enumerate() {
        match (&m.content, m.role) {
            (Content::Text(t), Role::User) => {
                count(t);
                messages.push(ChatMessage::User {
                    content: UserContent::Text(t.clone()),
                });
            }
            (Content::Text(t), Role::Assistant) => {
                count(t);
                messages.push(ChatMessage::Assistant {
                    content: t.clone(),
                    tool_calls: Vec::new(),
                });
            }
            (Content::Blocks(blocks), Role::User) => {
                user_turn(i, blocks, &mut messages, &mut count)?
            }
            (Content::Blocks(blocks), Role::Assistant) => {
                assistant_turn(i, blocks, &mut messages, &mut count)?
            }
        }
    }
    let tools = match &req.tools {
        Some(tools) if !tools.is_empty() => Some(
            tools
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let Some(schema) = &t.input_schema else {
                        return Err(invalid(
                            "tools",
                            format!(
                                "tools[{i}]: `{}` has no input_schema: server tools are not supported by this gateway",
                                short(&t.name)
                            ),
                        ));
                    };
                    count(&t.name);
                    count(t.description.as_deref().unwrap_or_default());
                    count(&schema.to_string());
                    Ok(ChatTool {
                        kind: "function",
                        function: FunctionDef {
                            name: t.name.clone(),
                            description: t.description.clone(),
                            parameters: schema.clone(),
                        },
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let (tool_choice, parallel) = match &req.tool_choice {
        None => (None, None),
        Some(ToolChoice::None {}) => (Some(ChatToolChoice::Mode("none")), None),
        Some(ToolChoice::Auto {
            disable_parallel_tool_use: d,
        }) => (Some(ChatToolChoice::Mode("auto")), d.then_some(false)),
        Some(ToolChoice::Any {
            disable_parallel_tool_use: d,
        }) => (Some(ChatToolChoice::Mode("required")), d.then_some(false)),
        Some(ToolChoice::Tool {
            name,
            disable_parallel_tool_use: d,
        }) => (
            Some(ChatToolChoice::Named {
                kind: "function",
                function: NamedFunction { name: name.clone() },
            }),
            d.then_some(false),
        ),
    };
    // A choice without tools means nothing to an OpenAI backend (some refuse it).
    let (tool_choice, parallel) = if tools.is_some() {
        (tool_choice, parallel)
    } else {
        (None, None)
    };
    let stream = req.stream.unwrap_or(false);
    let stop = req.stop_sequences.as_deref().filter(|s| !s.is_empty());
    let chat = ChatRequest {
        model: &req.model,
        messages,
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop,
        stream,
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
        tools,
        tool_choice,
        parallel_tool_calls: parallel,
        user: req.metadata.as_ref().and_then(|m| m.user_id.clone()),
    };
    let body = serde_json::to_vec(&chat).map_err(|e| Invalid::Json(e.to_string()))?;
    Ok(Translated {
        body: Bytes::from(body),
        stream,
        priority: req.priority.clone(),
        context: Context {
            top_k: req.top_k.is_some(),
            model: req.model.clone(),
            stop_sequences: req.stop_sequences.clone().unwrap_or_default(),
            input_estimate: estimate_tokens(chars),
        },
        model: req.model,
    })
}

/// A user turn of blocks: its tool results first (each a `tool` message, as OpenAI wants
/// them right after the assistant's calls), then its text and images as one user message.
fn user_turn(
    i: usize,
    blocks: &[Block],
    out: &mut Vec<ChatMessage>,
    count: &mut impl FnMut(&str),
) -> Result<(), Invalid> {
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match b {
            Block::Text { text } => {
                count(text);
                parts.push(Part::Text { text: text.clone() });
            }
            Block::Image { source } => parts.push(Part::ImageUrl {
                image_url: ImageUrl {
                    url: image_url(source),
                },
            }),
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                let text = match content {
                    None => String::new(),
                    Some(ToolResultContent::Text(t)) => t.clone(),
                    Some(ToolResultContent::Blocks(inner)) => {
                        let mut texts = Vec::with_capacity(inner.len());
                        for b in inner {
                            match b {
                                Block::Text { text } => texts.push(text.as_str()),
                                _ => {
                                    return Err(invalid(
                                        "messages",
                                        format!("messages[{i}].content[{j}].content: only text blocks can be sent as a tool result to an OpenAI-compatible backend"),
                                    ))
                                }
                            }
                        }
                        join(texts.into_iter())
                    }
                };
                // OpenAI has no error flag on a tool result: the model reads it in the text.
                let content = if *is_error {
                    format!("Error: {text}")
                } else {
                    text
                };
                count(&content);
                out.push(ChatMessage::Tool {
                    tool_call_id: tool_use_id.clone(),
                    content,
                });
            }
            Block::ToolUse { .. } => {
                return Err(invalid(
                    "messages",
                    format!(
                        "messages[{i}].content[{j}]: tool_use blocks belong to assistant messages"
                    ),
                ))
            }
            Block::Thinking {} | Block::RedactedThinking {} => {}
            Block::Document {} => return Err(unsupported(i, j, "document")),
        }
    }
    if !parts.is_empty() {
        let all_text = parts.iter().all(|p| matches!(p, Part::Text { .. }));
        let content = if all_text {
            UserContent::Text(join(parts.iter().map(|p| match p {
                Part::Text { text } => text.as_str(),
                Part::ImageUrl { .. } => "",
            })))
        } else {
            UserContent::Parts(parts)
        };
        out.push(ChatMessage::User { content });
    }
    Ok(())
}

/// An assistant turn of blocks: its text, and its `tool_use` blocks as `tool_calls`.
fn assistant_turn(
    i: usize,
    blocks: &[Block],
    out: &mut Vec<ChatMessage>,
    count: &mut impl FnMut(&str),
) -> Result<(), Invalid> {
    let mut texts = Vec::new();
    let mut tool_calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match b {
            Block::Text { text } => {
                count(text);
                texts.push(text.as_str());
            }
            Block::ToolUse { id, name, input } => {
                let arguments = match input {
                    Value::Null => "{}".to_string(),
                    v => v.to_string(),
                };
                count(name);
                count(&arguments);
                tool_calls.push(ToolCall {
                    id: id.clone(),
                    kind: "function",
                    function: FunctionCall {
                        name: name.clone(),
                        arguments,
                    },
                });
            }
            Block::Thinking {} | Block::RedactedThinking {} => {}
            Block::Image { .. } => return Err(unsupported(i, j, "image (in an assistant turn)")),
            Block::ToolResult { .. } => {
                return Err(invalid(
                    "messages",
                    format!(
                        "messages[{i}].content[{j}]: tool_result blocks belong to user messages"
                    ),
                ))
            }
            Block::Document {} => return Err(unsupported(i, j, "document")),
        }
    }
    out.push(ChatMessage::Assistant {
        content: join(texts.into_iter()),
        tool_calls,
    });
    Ok(())
}

fn unsupported(i: usize, j: usize, what: &str) -> Invalid {
    invalid(
        "messages",
        format!("messages[{i}].content[{j}]: {what} blocks are not supported by this gateway"),
    )
}

fn image_url(source: &ImageSource) -> String {
    match source {
        ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        ImageSource::Url { url } => url.clone(),
    }
}

/// Texts of consecutive blocks, one after another (as a model reads consecutive blocks).
fn join<'a>(texts: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for t in texts {
        if !out.is_empty() && !t.is_empty() {
            out.push('\n');
        }
        out.push_str(t);
    }
    out
}

/// A client string quoted in a message, shortened.
pub(super) fn short(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn openai(req: Value) -> Value {
        let t = translate(req.to_string().as_bytes(), false).unwrap();
        serde_json::from_slice(&t.body).unwrap()
    }

    fn err(req: Value) -> Invalid {
        translate(req.to_string().as_bytes(), false).unwrap_err()
    }

    #[test]
    fn a_plain_request_keeps_its_fields() {
        let out = openai(json!({
            "model": "m", "max_tokens": 50,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 0.2, "top_p": 0.9, "top_k": 40,
            "metadata": {"user_id": "u-1"},
            "cache_control": {"type": "ephemeral"},
        }));
        assert_eq!(
            out,
            json!({
                "model": "m",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"}
                ],
                "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "user": "u-1"
            })
        );
    }

    #[test]
    fn stop_sequences_become_stop() {
        // Named bug: `stop_sequences` not mapped to `stop`.
        let out = openai(json!({
            "model": "m", "max_tokens": 5, "stop_sequences": ["\n\nHuman:", "END"],
            "messages": [{"role": "user", "content": "Hi"}]
        }));
        assert_eq!(out["stop"], json!(["\n\nHuman:", "END"]));
        let t = translate(
            json!({"model": "m", "max_tokens": 5, "stop_sequences": ["END"],
                   "messages": [{"role": "user", "content": "Hi"}]})
            .to_string()
            .as_bytes(),
            false,
        )
        .unwrap();
        assert_eq!(t.context.stop_sequences, ["END"]);
    }

    #[test]
    fn system_blocks_text_and_images() {
        let out = openai(json!({
            "model": "m", "max_tokens": 5,
            "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
            ]}]
        }));
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": "A\nB"})
        );
        assert_eq!(
            out["messages"][1]["content"],
            json!([
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
            ])
        );
    }

    #[test]
    fn tools_tool_use_and_tool_results() {
        let out = openai(json!({
            "model": "m", "max_tokens": 5,
            "tools": [{"name": "get_weather", "description": "Weather",
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "boom"}], "is_error": true},
                    {"type": "text", "text": "Thanks"}
                ]}
            ]
        }));
        assert_eq!(
            out["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
        );
        assert_eq!(out["tool_choice"], "required");
        assert_eq!(out["parallel_tool_calls"], false);
        let m = &out["messages"];
        assert_eq!(
            m[1],
            json!({"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]})
        );
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"})
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"})
        );
        assert_eq!(m[4], json!({"role": "user", "content": "Thanks"}));
    }

    #[test]
    fn tool_choice_forms() {
        let with = |choice: Value| {
            openai(json!({"model": "m", "max_tokens": 5, "tool_choice": choice,
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "messages": [{"role": "user", "content": "x"}]}))
        };
        assert_eq!(with(json!({"type": "auto"}))["tool_choice"], "auto");
        assert_eq!(with(json!({"type": "none"}))["tool_choice"], "none");
        assert_eq!(
            with(json!({"type": "tool", "name": "f"}))["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert!(with(json!({"type": "auto"}))
            .get("parallel_tool_calls")
            .is_none());
    }

    #[test]
    fn a_stream_asks_for_usage() {
        let out = openai(json!({"model": "m", "max_tokens": 5, "stream": true,
            "messages": [{"role": "user", "content": "x"}]}));
        assert_eq!(out["stream"], true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let cases = [
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": []}),
                "messages",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}),
                "messages",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
                "messages",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "web_search", "type": "web_search_20250305"}]}),
                "tools",
            ),
            (
                json!({"model": "m", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}),
                "stream",
            ),
        ];
        for (req, param) in cases {
            match err(req.clone()) {
                Invalid::Value { param: p, message } => {
                    assert_eq!(p, param, "{req}: {message}");
                    assert!(!message.is_empty());
                }
                other => panic!("{req}: {other:?}"),
            }
        }
        assert!(matches!(translate(b"[1]", false), Err(Invalid::Json(_))));
        assert!(matches!(
            translate(b"{\"model\":", false),
            Err(Invalid::Json(_))
        ));
        // count_tokens does not need max_tokens.
        assert!(translate(
            br#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#,
            true
        )
        .is_ok());
    }

    #[test]
    fn the_estimate_counts_characters() {
        let t = translate(
            br#"{"model":"m","max_tokens":3,"system":"abcd","messages":[{"role":"user","content":"efgh"}]}"#,
            false,
        )
        .unwrap();
        assert_eq!(t.context.input_estimate, 2);
    }
}

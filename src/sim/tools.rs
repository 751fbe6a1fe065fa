//! Deterministic tool calls: decides from a chat request whether the simulated model calls
//! tools, which ones, with which arguments, and what text it says first.
//!
//! The trigger (a chat request with a non-empty `tools` array):
//! - `tool_choice: "required"`: calls the tools named by `call:` in the last user message, else
//!   the first tool;
//! - `tool_choice: {"type":"function","function":{"name":N}}`: calls N (400 if N is not in `tools`);
//! - `tool_choice: "auto"` or absent: calls the tools named by `call:` in the last user message,
//!   if that message is the last of the conversation (no tool results after it);
//! - `tool_choice: "none"`: never.
//!
//! `call:get_weather,get_time` names two parallel calls (names not in `tools` are skipped);
//! `say:Let me check. call:get_weather` says "Let me check." before the call. Arguments are
//! built from each tool's `parameters` schema: its `required` properties, recursively, with
//! fixed values (`enum`/`const`: the first value; string `"Paris"`, integer `1`, number `1.5`,
//! boolean `true`, array: one item, object: its own required properties).
//!
//! Pure: no I/O, no clock, no randomness; owns nothing.

use serde_json::{Map, Value};

/// Upper bound on calls in one reply, whatever `call:` lists.
const MAX_CALLS: usize = 64;
/// Upper bound on the nesting of generated arguments.
const MAX_DEPTH: u32 = 8;

/// What the model does instead of generating text.
#[derive(Debug, PartialEq)]
pub(super) struct ToolPlan {
    /// Text said before the calls (`say:`), if any.
    pub say: Option<String>,
    /// `(name, arguments as a JSON string)` per call, in order.
    pub calls: Vec<(String, String)>,
}

/// The tool calls a chat request triggers: `Ok(None)` for a plain text reply, `Err(message)`
/// for a request that names a tool it does not define.
pub(super) fn plan(req: &Value) -> Result<Option<ToolPlan>, String> {
    let tools: Vec<(&str, Option<&Value>)> = match req.get("tools").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .filter_map(|t| {
                let f = t.get("function")?;
                Some((f.get("name")?.as_str()?, f.get("parameters")))
            })
            .collect(),
        None => return Ok(None),
    };
    let Some(first) = tools.first() else {
        return Ok(None);
    };
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let last_user = messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let last_text = last_user
        .map(|i| content_text(&messages[i]))
        .unwrap_or_default();
    let (say, named) = directives(&last_text);
    let live = last_user.is_some_and(|i| i + 1 == messages.len());
    let defined: Vec<&str> = named
        .into_iter()
        .filter(|n| tools.iter().any(|(t, _)| t == n))
        .take(MAX_CALLS)
        .collect();
    let names: Vec<&str> = match req.get("tool_choice") {
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "required" => {
            if defined.is_empty() {
                vec![first.0]
            } else {
                defined
            }
        }
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            match tools.iter().find(|(t, _)| *t == name) {
                Some((t, _)) => vec![*t],
                None => return Err("`tool_choice` names a function that is not in `tools`".into()),
            }
        }
        _ if live && !defined.is_empty() => defined,
        _ => return Ok(None),
    };
    let calls = names
        .into_iter()
        .map(|name| {
            let schema = tools.iter().find(|(t, _)| *t == name).and_then(|(_, p)| *p);
            (name.to_string(), arguments(schema))
        })
        .collect();
    Ok(Some(ToolPlan { say, calls }))
}

/// The text of one message's `content` (a string, or the `text` of its parts).
fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// `say:` text (up to `call:` or the end) and the names after `call:` (comma-separated).
fn directives(text: &str) -> (Option<String>, Vec<&str>) {
    let call_at = text.find("call:");
    let names = match call_at {
        Some(i) => {
            let rest = text[i + "call:".len()..].trim_start();
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == ','))
                .unwrap_or(rest.len());
            rest[..end].split(',').filter(|n| !n.is_empty()).collect()
        }
        None => Vec::new(),
    };
    let say = text.find("say:").and_then(|i| {
        let start = i + "say:".len();
        let end = match call_at {
            Some(c) if c >= start => c,
            _ => text.len(),
        };
        let s = text[start..end].trim();
        (!s.is_empty()).then(|| s.to_string())
    });
    (say, names)
}

/// The arguments of a call to a tool with `parameters` schema `schema`: always a JSON object.
fn arguments(schema: Option<&Value>) -> String {
    let v = match schema.map(|s| example(s, 0)) {
        Some(v @ Value::Object(_)) => v,
        _ => Value::Object(Map::new()),
    };
    serde_json::to_string(&v).unwrap_or_else(|_| "{}".into())
}

/// A fixed value that satisfies the simple parts of a JSON schema.
fn example(schema: &Value, depth: u32) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    if let Some(v) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        return v.clone();
    }
    if let Some(v) = schema.get("const") {
        return v.clone();
    }
    let ty = match schema.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match ty {
        "object" => {
            let props = schema.get("properties");
            let mut out = Map::new();
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let sub = props.and_then(|p| p.get(name)).unwrap_or(&Value::Null);
                out.insert(name.to_string(), example(sub, depth + 1));
            }
            Value::Object(out)
        }
        "array" => match schema.get("items") {
            Some(items) => Value::Array(vec![example(items, depth + 1)]),
            None => Value::Array(Vec::new()),
        },
        "integer" => Value::from(1),
        "number" => Value::from(1.5),
        "boolean" => Value::Bool(true),
        "null" => Value::Null,
        _ => Value::from("Paris"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"}},
            "required": ["city", "unit"]}}})
    }

    fn time() -> Value {
        json!({"type": "function", "function": {"name": "get_time"}})
    }

    fn req(content: &str, choice: Option<Value>) -> Value {
        let mut r = json!({"model": "m", "tools": [weather(), time()],
                           "messages": [{"role": "user", "content": content}]});
        if let Some(c) = choice {
            r["tool_choice"] = c;
        }
        r
    }

    #[test]
    fn call_directive_names_parallel_calls() {
        let p = plan(&req("please call:get_weather,get_time.", None))
            .unwrap()
            .unwrap();
        assert_eq!(p.say, None);
        assert_eq!(
            p.calls,
            vec![
                (
                    "get_weather".to_string(),
                    r#"{"city":"Paris","unit":"celsius"}"#.to_string()
                ),
                ("get_time".to_string(), "{}".to_string()),
            ]
        );
    }

    #[test]
    fn say_comes_before_the_calls() {
        let p = plan(&req(
            "say:Let me check. call:get_weather",
            Some(json!("auto")),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.say.as_deref(), Some("Let me check."));
        assert_eq!(p.calls.len(), 1);
    }

    #[test]
    fn no_trigger_without_directive_or_tools() {
        assert_eq!(plan(&req("hello", None)).unwrap(), None);
        assert_eq!(plan(&req("call:unknown_tool", None)).unwrap(), None);
        assert_eq!(
            plan(&req("call:get_time", Some(json!("none")))).unwrap(),
            None
        );
        let mut r = req("call:get_time", None);
        r["tools"] = json!([]);
        assert_eq!(plan(&r).unwrap(), None);
        // A tool result after the user's message: the model answers in text.
        let mut r = req("call:get_time", None);
        r["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "tool", "tool_call_id": "call_0", "content": "12:00"}));
        assert_eq!(plan(&r).unwrap(), None);
    }

    #[test]
    fn tool_choice_required_and_named() {
        let p = plan(&req("hello", Some(json!("required"))))
            .unwrap()
            .unwrap();
        assert_eq!(p.calls[0].0, "get_weather");
        let p = plan(&req(
            "hello",
            Some(json!({"type": "function", "function": {"name": "get_time"}})),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.calls, vec![("get_time".to_string(), "{}".to_string())]);
        assert!(plan(&req(
            "hello",
            Some(json!({"type": "function", "function": {"name": "nope"}})),
        ))
        .is_err());
    }

    #[test]
    fn arguments_follow_nested_schemas() {
        let s = json!({"type": "object", "required": ["a", "b", "c", "d"], "properties": {
            "a": {"type": ["integer", "null"]}, "b": {"type": "array", "items": {"type": "number"}},
            "c": {"type": "object", "required": ["x"], "properties": {"x": {"type": "boolean"}}},
            "d": {"const": 7}}});
        assert_eq!(
            arguments(Some(&s)),
            r#"{"a":1,"b":[1.5],"c":{"x":true},"d":7}"#
        );
        assert_eq!(arguments(Some(&json!("not a schema"))), "{}");
        assert_eq!(arguments(None), "{}");
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        for r in [
            json!({"tools": "x"}),
            json!({"tools": [1, null, {"function": {}}]}),
            json!({"tools": [{"function": {"name": "f"}}], "messages": "x"}),
            json!({"tools": [{"function": {"name": "f"}}], "messages": [{"role": "user", "content": "call:"}]}),
            json!({"tools": [{"function": {"name": "f"}}], "messages": [{"role": "user", "content": "say:call:f"}]}),
            json!({"tools": [{"function": {"name": "f"}}], "tool_choice": {"type": "function"}}),
        ] {
            let _ = plan(&r);
        }
        let p = plan(&json!({"tools": [{"function": {"name": "f"}}],
                             "messages": [{"role": "user", "content": "say:call:f"}]}))
        .unwrap()
        .unwrap();
        assert_eq!(p.say, None);
        assert_eq!(p.calls.len(), 1);
    }
}

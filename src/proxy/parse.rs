//! Phase 2, `parse`: reads and checks the request: its content type (415), its body within
//! the size and time limits (413, 408), the WHOLE body as JSON in one pass (valid UTF-8 in every
//! string and key, lone surrogate escapes refused, nesting at most [`MAX_DEPTH`], no duplicate
//! top-level key: 400 `invalid_json` naming the path and position), the fields the gateway reads
//! (`model`, `stream`, `messages` / `prompt` / `input`, `priority`) and the admission headers
//! (`x-mofa-priority`, `x-mofa-max-wait-ms`): 400 naming the field. A body that passes is
//! forwarded as sent (only `model` renamed and the gateway's own `priority` removed, in
//! `forward`), so a backend never sees bytes the gateway could not read. A request on an
//! Anthropic route (its [`WireFormat`], set by the router) is a Messages request: it is
//! translated here into the OpenAI chat completion the rest of the pipeline handles (see
//! `anthropic::request`). It must not look up models or admit.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::accept::Limits;
use crate::admission::Priority;
use crate::anthropic::{self, WireFormat};
use crate::error::ApiError;
use crate::headers::{MAX_WAIT_MS, PRIORITY};
use crate::upstream::Endpoint;

/// The deepest nesting of arrays and objects a body may have; the body object is level 1.
pub const MAX_DEPTH: usize = 64;

/// Reads and checks a request for `endpoint`: see the module doc. `named`: the `model` the
/// body names, once known (also when the request is refused after that).
pub async fn parse(
    endpoint: Endpoint,
    limits: Limits,
    req: Request,
    named: &mut Option<String>,
) -> Result<Parsed, ApiError> {
    let wire = wire_format(&req);
    let (header_priority, max_wait) = admission_headers(req.headers())?;
    let body = read_body(limits, req).await?;
    if wire.is_anthropic() {
        return messages_request(wire, &body, header_priority, max_wait, named);
    }
    let f = parse_fields(endpoint, &body, named)?;
    Ok(Parsed {
        endpoint,
        model: f.model,
        stream: f.stream,
        body_priority: f.priority,
        strip_priority: f.strip_priority,
        header_priority,
        default_priority: None,
        max_priority: None,
        max_wait,
        body,
        wire,
        anthropic: None,
    })
}

/// The wire format of a request's route (OpenAI unless the router said otherwise).
pub fn wire_format(req: &Request) -> WireFormat {
    req.extensions()
        .get::<WireFormat>()
        .copied()
        .unwrap_or_default()
}

/// A Messages request, translated into an OpenAI chat completion request.
fn messages_request(
    wire: WireFormat,
    body: &[u8],
    header_priority: Option<Priority>,
    max_wait: Option<Duration>,
    named: &mut Option<String>,
) -> Result<Parsed, ApiError> {
    // The same whole-body check as an OpenAI body (UTF-8, lone surrogates, nesting, duplicate
    // keys), so that both formats refuse the same bodies with the same messages.
    let head = parse_head(body)?;
    let t = anthropic::translate(body, wire == WireFormat::AnthropicCount).map_err(|e| {
        if let Some(Field::Str(m)) = head.model {
            *named = Some(m.into_owned());
        }
        match e {
            anthropic::Invalid::Json(m) => ApiError::invalid_json(m),
            anthropic::Invalid::Value { param, message } => ApiError::invalid_value(param, message),
        }
    })?;
    let body_priority = t
        .priority
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .and_then(priority_word);
    Ok(Parsed {
        endpoint: Endpoint::ChatCompletions,
        model: t.model,
        stream: t.stream,
        body_priority,
        // The translation carries no `priority`: nothing to strip.
        strip_priority: false,
        header_priority,
        default_priority: None,
        max_priority: None,
        max_wait,
        body: t.body,
        wire,
        anthropic: Some(t.context),
    })
}

/// What a valid request asks for.
pub struct Parsed {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// The body's `priority` when it is one of the gateway's words.
    pub body_priority: Option<Priority>,
    /// The body's `priority` is the gateway's (one of its words, or `null`): not forwarded.
    pub strip_priority: bool,
    /// `x-mofa-priority`, which wins over the body's.
    pub header_priority: Option<Priority>,
    /// The principal's priority for requests that name none (`authorize` sets it).
    pub default_priority: Option<Priority>,
    /// The principal's ceiling: a higher priority is lowered to it (`authorize` sets it).
    pub max_priority: Option<Priority>,
    /// `x-mofa-max-wait-ms`.
    pub max_wait: Option<Duration>,
    /// The body as the client sent it (a Messages request: its OpenAI translation).
    pub body: Bytes,
    /// The wire format the client speaks.
    pub wire: WireFormat,
    /// A Messages request: what its reply translation needs.
    pub anthropic: Option<anthropic::Context>,
}

/// The tokens a request is charged before it runs (see [`Parsed::token_estimate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenEstimate {
    /// Prompt characters / 4, rounded up.
    pub prompt: u64,
    /// `max_tokens` or `max_completion_tokens` (0 when unset).
    pub completion: u64,
}

impl TokenEstimate {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

impl Parsed {
    /// The priority the request asks for (header, then body, then its principal's default,
    /// then `normal`).
    pub fn requested_priority(&self) -> Priority {
        self.header_priority
            .or(self.body_priority)
            .or(self.default_priority)
            .unwrap_or_default()
    }

    /// The priority it runs at: the one it asks for, lowered to its principal's ceiling.
    pub fn priority(&self) -> Priority {
        let p = self.requested_priority();
        self.max_priority.map_or(p, |max| p.min(max))
    }

    /// The tokens to charge before the call, as OpenAI counts them: the characters of the
    /// prompt (`messages`, `prompt` or `input`: every string in them) / 4, plus `max_tokens`
    /// or `max_completion_tokens`. Parses the body again: call it only when tokens are limited.
    pub fn token_estimate(&self) -> TokenEstimate {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Counted {
            messages: Chars,
            prompt: Chars,
            input: Chars,
            max_tokens: Option<serde_json::Value>,
            max_completion_tokens: Option<serde_json::Value>,
        }
        let c: Counted = serde_json::from_slice(&self.body)
            .or_else(|_| serde_json::from_slice(&numbers_blanked(&self.body)))
            .unwrap_or_default();
        let chars = c.messages.0 + c.prompt.0 + c.input.0;
        let completion = c
            .max_completion_tokens
            .or(c.max_tokens)
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        TokenEstimate {
            prompt: crate::limits::estimate_tokens(chars, 0),
            completion,
        }
    }
}

/// The characters of every string in a JSON value (keys excluded).
#[derive(Default)]
struct Chars(u64);

impl<'de> Deserialize<'de> for Chars {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Chars;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<Chars, E> {
                Ok(Chars(v.chars().count() as u64))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Chars, E> {
                Ok(Chars(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Chars, E> {
                Ok(Chars(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Chars, E> {
                Ok(Chars(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Chars, E> {
                Ok(Chars(0))
            }
            fn visit_unit<E>(self) -> Result<Chars, E> {
                Ok(Chars(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Chars, A::Error> {
                let mut n = 0u64;
                while let Some(c) = a.next_element::<Chars>()? {
                    n = n.saturating_add(c.0);
                }
                Ok(Chars(n))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Chars, A::Error> {
                let mut n = 0u64;
                while let Some((_, c)) = a.next_entry::<serde::de::IgnoredAny, Chars>()? {
                    n = n.saturating_add(c.0);
                }
                Ok(Chars(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of a body, before the headers are added.
struct Fields {
    model: String,
    stream: bool,
    priority: Option<Priority>,
    strip_priority: bool,
}

/// Checks the whole body and the fields the gateway needs.
fn parse_fields(
    endpoint: Endpoint,
    body: &[u8],
    named: &mut Option<String>,
) -> Result<Fields, ApiError> {
    let head = parse_head(body)?;
    let model = match &head.model {
        Some(Field::Str(m)) if !m.is_empty() => m.to_string(),
        Some(Field::Str(_)) | None => {
            return Err(ApiError::invalid_value(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(_) => return Err(ApiError::invalid_value("model", "`model` must be a string")),
    };
    // The rest is checked knowing the model: a refusal names it (`named`), not the success
    // path (no second copy of the name per request).
    let rest = (|| {
        // One rule on every endpoint: `stream` is a boolean (`null` is the same as absent).
        // Embeddings do not stream; their `stream` is forwarded untouched.
        let stream = match head.stream {
            None | Some(Field::Null) => false,
            Some(Field::Bool(b)) => b && endpoint != Endpoint::Embeddings,
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "stream",
                    "`stream` must be a boolean",
                ))
            }
        };
        check_input(endpoint, &head)?;
        // Only the gateway's words (and `null`) are the gateway's `priority`; anything else (vLLM's
        // integer priority, ...) belongs to the backend and is forwarded unchanged.
        let (priority, strip_priority) = match head.priority {
            Some(Field::Str(p)) => match priority_word(&p) {
                Some(p) => (Some(p), true),
                None => (None, false),
            },
            Some(Field::Null) => (None, true),
            _ => (None, false),
        };
        Ok((stream, priority, strip_priority))
    })();
    let (stream, priority, strip_priority) = match rest {
        Ok(r) => r,
        Err(e) => {
            *named = Some(model);
            return Err(e);
        }
    };
    Ok(Fields {
        model,
        stream,
        priority,
        strip_priority,
    })
}

/// The field an endpoint takes its input from: `messages`, `prompt` or `input`.
fn check_input(endpoint: Endpoint, head: &Head) -> Result<(), ApiError> {
    match endpoint {
        Endpoint::ChatCompletions => match &head.messages {
            Some(Field::Array(n)) if *n > 0 => {}
            Some(Field::Array(_)) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "`messages` must not be empty",
                ))
            }
            None => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "you must provide a messages parameter",
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "`messages` must be an array",
                ))
            }
        },
        Endpoint::Completions => {
            if !matches!(&head.prompt, Some(Field::Str(_) | Field::Array(_))) {
                return Err(ApiError::invalid_value(
                    "prompt",
                    "`prompt` must be a string or an array",
                ));
            }
        }
        Endpoint::Embeddings => match &head.input {
            Some(Field::Str(_)) => {}
            Some(Field::Array(n)) if *n > 0 => {}
            _ => {
                return Err(ApiError::invalid_value(
                    "input",
                    "`input` must be a string or a non-empty array",
                ))
            }
        },
    }
    Ok(())
}

/// `low`, `normal`, `high` or `critical`, in any case.
fn priority_word(s: &str) -> Option<Priority> {
    Priority::ALL
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(s))
}

/// The admission headers: `x-mofa-priority` and `x-mofa-max-wait-ms`.
fn admission_headers(h: &HeaderMap) -> Result<(Option<Priority>, Option<Duration>), ApiError> {
    let prio = match h.get(PRIORITY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| priority_word(s.trim()))
                .ok_or_else(|| {
                    ApiError::invalid_value(
                        "x-mofa-priority",
                        "`x-mofa-priority` must be one of low, normal, high, critical",
                    )
                })?,
        ),
    };
    let wait = match h.get(MAX_WAIT_MS) {
        None => None,
        Some(v) => Some(Duration::from_millis(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid_value(
                        "x-mofa-max-wait-ms",
                        "`x-mofa-max-wait-ms` must be a whole number of milliseconds",
                    )
                })?,
        )),
    };
    Ok((prio, wait))
}

/// The top-level fields the gateway looks at; every other value is checked, then forwarded.
#[derive(Default)]
struct Head<'a> {
    model: Option<Field<'a>>,
    stream: Option<Field<'a>>,
    messages: Option<Field<'a>>,
    prompt: Option<Field<'a>>,
    input: Option<Field<'a>>,
    priority: Option<Field<'a>>,
}

impl Head<'_> {
    fn into_owned(self) -> Head<'static> {
        let own = |f: Option<Field<'_>>| {
            f.map(|f| match f {
                Field::Str(s) => Field::Str(Cow::Owned(s.into_owned())),
                Field::Bool(b) => Field::Bool(b),
                Field::Array(n) => Field::Array(n),
                Field::Null => Field::Null,
                Field::Other => Field::Other,
            })
        };
        Head {
            model: own(self.model),
            stream: own(self.stream),
            messages: own(self.messages),
            prompt: own(self.prompt),
            input: own(self.input),
            priority: own(self.priority),
        }
    }
}

/// A top-level field, known by its JSON type; strings are kept, containers are checked.
enum Field<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Array(usize),
    Null,
    Other,
}

/// One step of the path to a value, innermost first while an error travels up.
enum Seg {
    Key(String),
    Index(usize),
}

/// Parses and checks the whole body in one pass: see the module doc.
///
/// serde_json holds a number as an `f64`, `u64` or `i64` and refuses one beyond them (`1e400`),
/// but JSON sets no range: such a body is checked again with every number blanked (`0` and
/// spaces, [`numbers_blanked`]), so that its numbers are checked for their syntax only. The
/// body is forwarded as sent either way.
fn parse_head(body: &[u8]) -> Result<Head<'_>, ApiError> {
    let mut path = Vec::new();
    match walk_head(body, &mut path) {
        Err(e) if is_out_of_range(&e) => {
            let blanked = numbers_blanked(body);
            let mut path = Vec::new();
            walk_head(&blanked, &mut path)
                .map(Head::into_owned)
                .map_err(|e| json_error(e, &path))
        }
        other => other.map_err(|e| json_error(e, &path)),
    }
}

fn walk_head<'a>(body: &'a [u8], path: &mut Vec<Seg>) -> Result<Head<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    HeadSeed { path }
        .deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h))
}

fn json_error(e: serde_json::Error, path: &[Seg]) -> ApiError {
    if path.is_empty() {
        ApiError::invalid_json(e)
    } else {
        ApiError::invalid_json(format_args!("{e} (in `{}`)", PathDisplay(path)))
    }
}

/// serde_json's refusal of a number beyond `f64` (its category is shared with real syntax
/// errors: the message tells them apart).
fn is_out_of_range(e: &serde_json::Error) -> bool {
    e.to_string().starts_with("number out of range")
}

/// `body` with every number outside strings replaced by `0` and spaces: the same length (so
/// the same positions in error messages), the same structure, every number in range. A token
/// that is not a JSON number becomes `-` and spaces, which serde_json refuses as one.
pub(crate) fn numbers_blanked(body: &[u8]) -> Vec<u8> {
    let numeric = |b: u8| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E');
    let mut out = body.to_vec();
    let (mut i, mut in_word) = (0, false);
    while i < out.len() {
        match out[i] {
            b'"' => {
                // Skip the string (escapes included).
                i += 1;
                while i < out.len() && out[i] != b'"' {
                    i += if out[i] == b'\\' { 2 } else { 1 };
                }
                in_word = false;
            }
            b'0'..=b'9' | b'-' if !in_word => {
                let end = (i..out.len())
                    .find(|&j| !numeric(out[j]))
                    .unwrap_or(out.len());
                out[i] = if is_json_number(&body[i..end]) {
                    b'0'
                } else {
                    b'-'
                };
                out[i + 1..end].fill(b' ');
                i = end;
                continue;
            }
            b'a'..=b'z' | b'A'..=b'Z' => in_word = true,
            _ => in_word = false,
        }
        i += 1;
    }
    out
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, RFC 8259's number.
fn is_json_number(t: &[u8]) -> bool {
    let digits = |i: usize| {
        i + t[i.min(t.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut i = usize::from(t.first() == Some(&b'-'));
    match t.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i),
        _ => return false,
    }
    if t.get(i) == Some(&b'.') {
        let j = digits(i + 1);
        if j == i + 1 {
            return false;
        }
        i = j;
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let j = digits(i);
        if j == i {
            return false;
        }
        i = j;
    }
    i == t.len()
}

struct PathDisplay<'a>(&'a [Seg]);

impl fmt::Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().rev().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A key, as a client's text quoted back (shortened).
fn key_seg(k: &str) -> Seg {
    Seg::Key(crate::error::truncate(k, 64).to_owned())
}

struct HeadSeed<'p> {
    path: &'p mut Vec<Seg>,
}

impl<'de, 'p> DeserializeSeed<'de> for HeadSeed<'p> {
    type Value = Head<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Head<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

/// The top-level keys of a body met so far: a short list (a body has a handful: compared
/// without hashing), a set once there are more than [`Seen::FEW`].
enum Seen<'de> {
    Few(Vec<Cow<'de, str>>),
    Many(HashSet<Cow<'de, str>>),
}

impl<'de> Seen<'de> {
    const FEW: usize = 16;

    /// Whether `key` is new (and now seen).
    fn insert(&mut self, key: Cow<'de, str>) -> bool {
        match self {
            Seen::Few(keys) => {
                if keys.contains(&key) {
                    return false;
                }
                keys.push(key);
                if keys.len() > Self::FEW {
                    *self = Seen::Many(std::mem::take(keys).into_iter().collect());
                }
                true
            }
            Seen::Many(keys) => keys.insert(key),
        }
    }
}

impl<'de, 'p> Visitor<'de> for HeadSeed<'p> {
    type Value = Head<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the body to be a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head::default();
        let mut seen = Seen::Few(Vec::with_capacity(8));
        while let Some(key) = a.next_key_seed(KeySeed)? {
            if !seen.insert(key.clone()) {
                return Err(A::Error::custom(format_args!(
                    "duplicate key `{}` in the body",
                    crate::error::truncate(&key, 64)
                )));
            }
            let slot = match key.as_ref() {
                "model" => &mut head.model,
                "stream" => &mut head.stream,
                "messages" => &mut head.messages,
                "prompt" => &mut head.prompt,
                "input" => &mut head.input,
                "priority" => &mut head.priority,
                _ => {
                    let check = Check {
                        depth: 2,
                        path: &mut *self.path,
                    };
                    if let Err(e) = a.next_value_seed(check) {
                        self.path.push(key_seg(&key));
                        return Err(e);
                    }
                    continue;
                }
            };
            match a.next_value_seed(FieldSeed {
                path: &mut *self.path,
            }) {
                Ok(f) => *slot = Some(f),
                Err(e) => {
                    self.path.push(key_seg(&key));
                    return Err(e);
                }
            }
        }
        Ok(head)
    }
}

/// A key, validated (UTF-8, escapes), borrowed when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// A top-level field the gateway reads: its type (and text), its contents checked.
struct FieldSeed<'p> {
    path: &'p mut Vec<Seg>,
}

impl<'de, 'p> DeserializeSeed<'de> for FieldSeed<'p> {
    type Value = Field<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Field<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'p> Visitor<'de> for FieldSeed<'p> {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
        Ok(Field::Bool(v))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
        walk_seq(a, 2, self.path).map(Field::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
        walk_map(a, 2, self.path).map(|()| Field::Other)
    }
}

/// Any value, checked and dropped: strings and keys are decoded (so validated), containers
/// counted against [`MAX_DEPTH`]. `depth`: the level a container here would be at.
struct Check<'p> {
    depth: usize,
    path: &'p mut Vec<Seg>,
}

impl<'de, 'p> DeserializeSeed<'de> for Check<'p> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'p> Visitor<'de> for Check<'p> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, _: &'de str) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<(), A::Error> {
        walk_seq(a, self.depth, self.path).map(|_| ())
    }
    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<(), A::Error> {
        walk_map(a, self.depth, self.path)
    }
}

fn too_deep<E: serde::de::Error>() -> E {
    E::custom(format_args!(
        "the body is nested deeper than {MAX_DEPTH} levels"
    ))
}

/// Checks an array at level `depth`; returns its length.
fn walk_seq<'de, A: SeqAccess<'de>>(
    mut a: A,
    depth: usize,
    path: &mut Vec<Seg>,
) -> Result<usize, A::Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let mut n = 0;
    loop {
        let check = Check {
            depth: depth + 1,
            path: &mut *path,
        };
        match a.next_element_seed(check) {
            Ok(Some(())) => n += 1,
            Ok(None) => return Ok(n),
            Err(e) => {
                path.push(Seg::Index(n));
                return Err(e);
            }
        }
    }
}

/// Checks an object at level `depth`.
fn walk_map<'de, A: MapAccess<'de>>(
    mut a: A,
    depth: usize,
    path: &mut Vec<Seg>,
) -> Result<(), A::Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    while let Some(key) = a.next_key_seed(KeySeed)? {
        let check = Check {
            depth: depth + 1,
            path: &mut *path,
        };
        if let Err(e) = a.next_value_seed(check) {
            path.push(key_seg(&key));
            return Err(e);
        }
    }
    Ok(())
}

async fn read_body(limits: Limits, req: Request) -> Result<Bytes, ApiError> {
    let h = req.headers();
    let json_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(ApiError::unsupported_media_type());
    }
    let limit = limits.max_body_bytes;
    if let Some(len) = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    let collect = http_body_util::Limited::new(req.into_body(), limit).collect();
    let collected = tokio::time::timeout(limits.body_read_timeout, collect)
        .await
        .map_err(|_| ApiError::request_timeout(limits.body_read_timeout))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        // Framing (a bad chunk size, an early end): the HTTP layer's own text stays in the log.
        Err(e) => {
            tracing::debug!(error = %e, "request body unreadable");
            Err(ApiError::malformed_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn parse(e: Endpoint, s: &str) -> Result<Fields, ApiError> {
        parse_fields(e, s.as_bytes(), &mut None)
    }

    #[test]
    fn numbers_beyond_f64_are_checked_for_their_syntax_only() {
        for n in [
            "1e400",
            "-2.5E-400",
            "18446744073709551615",
            "1e+999",
            "0.1e-99999",
        ] {
            let body = format!(r#"{{"model":"m","messages":[{{"content":[{n}]}}],"x":{n}}}"#);
            assert!(parse(Endpoint::ChatCompletions, &body).is_ok(), "{n}");
        }
        let long = format!(
            r#"{{"model":"m","messages":[{{}}],"x":1{}}}"#,
            "0".repeat(400)
        );
        assert!(parse(Endpoint::ChatCompletions, &long).is_ok());
        for bad in [
            "01", "1e", "-", "1.", ".5", "1e400e1", "1e400.", "--1", "1e400x",
        ] {
            let body = format!(r#"{{"model":"m","messages":[{{}}],"x":{bad},"big":1e400}}"#);
            let e = parse(Endpoint::ChatCompletions, &body).err();
            let code = e.map(|e| e.code().to_string());
            assert_eq!(code.as_deref(), Some("invalid_json"), "{bad}");
        }
        assert_eq!(
            &numbers_blanked(br#"{"a":[1e400,"1e400"],"b":-0.5}"#)[..],
            br#"{"a":[0    ,"1e400"],"b":0   }"#
        );
    }

    #[test]
    fn parse_accepts_a_chat_request() {
        let p = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"x":{"y":[1]}}"#,
        )
        .unwrap();
        assert_eq!(p.model, "m");
        assert!(p.stream);
    }

    #[test]
    fn parse_names_the_bad_field() {
        let cases = [
            (Endpoint::ChatCompletions, r#"{"messages":[{}]}"#, "model"),
            (
                Endpoint::ChatCompletions,
                r#"{"model":1,"messages":[{}]}"#,
                "model",
            ),
            (Endpoint::ChatCompletions, r#"{"model":"m"}"#, "messages"),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[]}"#,
                "messages",
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":"hi"}"#,
                "messages",
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[{}],"stream":"yes"}"#,
                "stream",
            ),
            (Endpoint::Completions, r#"{"model":"m"}"#, "prompt"),
            (Endpoint::Embeddings, r#"{"model":"m","input":[]}"#, "input"),
            (
                Endpoint::Embeddings,
                r#"{"model":"m","input":"x","stream":"yes"}"#,
                "stream",
            ),
        ];
        for (e, body, param) in cases {
            let err = parse(e, body)
                .err()
                .unwrap_or_else(|| panic!("{body} passed"));
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param, Some(param), "{body}");
        }
    }

    #[test]
    fn token_estimate_counts_prompt_characters_and_the_budget() {
        let p = Parsed {
            endpoint: Endpoint::ChatCompletions,
            model: "m".into(),
            stream: false,
            body_priority: Some(Priority::Critical),
            header_priority: None,
            default_priority: Some(Priority::Low),
            max_priority: Some(Priority::High),
            max_wait: None,
            strip_priority: true,
            body: Bytes::from_static(
                br#"{"model":"m","messages":[{"role":"user","content":"12345678"}],"max_tokens":10}"#,
            ),
            wire: WireFormat::OpenAi,
            anthropic: None,
        };
        assert_eq!(p.token_estimate().prompt, 3, "\"user\" + 8 characters, / 4");
        assert_eq!(p.token_estimate().total(), 13);
        assert_eq!(p.priority(), Priority::High, "lowered to the ceiling");
        assert_eq!(p.requested_priority(), Priority::Critical);
    }

    #[test]
    fn parse_rejects_non_objects_and_broken_json() {
        for body in ["[1]", "\"m\"", "{\"model\":", "", "nul"] {
            let err = parse(Endpoint::ChatCompletions, body).err().unwrap();
            assert_eq!(err.code(), "invalid_json", "{body}");
        }
    }

    fn bytes_err(body: &[u8]) -> String {
        let e = parse_fields(Endpoint::ChatCompletions, body, &mut None)
            .err()
            .unwrap_or_else(|| panic!("{} passed", String::from_utf8_lossy(body)));
        assert_eq!(e.code(), "invalid_json");
        e.message.clone()
    }

    #[test]
    fn the_whole_body_is_checked() {
        // Invalid UTF-8 deep in a string, in a key, and a lone surrogate escape.
        let m = bytes_err(
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}]}",
        );
        assert!(m.contains("`messages[0].content`"), "{m}");
        assert!(m.contains("column"), "{m}");
        let m = bytes_err(b"{\"model\":\"m\",\"messages\":[{}],\"tools\":{\"k\xff\":1}}");
        assert!(m.contains("`tools`"), "{m}");
        let m = bytes_err(br#"{"model":"m","messages":[{"content":"\ud800"}]}"#);
        assert!(m.contains("`messages[0].content`"), "{m}");
        // Nesting: 64 levels pass, 65 do not.
        let nest = |levels: usize| {
            let inner = levels - 1; // the body object is level 1
            format!(
                r#"{{"model":"m","messages":[{{}}],"x":{}1{}}}"#,
                "[".repeat(inner),
                "]".repeat(inner)
            )
        };
        assert!(parse(Endpoint::ChatCompletions, &nest(MAX_DEPTH)).is_ok());
        let m = bytes_err(nest(MAX_DEPTH + 1).as_bytes());
        assert!(m.contains("nested deeper than 64"), "{m}");
        let deep = format!(
            r#"{{"model":"m","messages":[{}]}}"#,
            "{\"a\":".repeat(200) + "1" + &"}".repeat(200)
        );
        assert!(bytes_err(deep.as_bytes()).contains("nested deeper"));
        // Duplicate top-level keys are named; nested ones are the backend's business.
        let m = bytes_err(br#"{"model":"a","model":"b","messages":[{}]}"#);
        assert!(m.contains("duplicate key `model`"), "{m}");
        // Past the short list of keys too, and a key written with an escape is the same key.
        let many: String = (0..40).map(|i| format!(r#""k{i}":{i},"#)).collect();
        let body = format!(r#"{{"model":"a",{many}"messages":[{{}}]}}"#);
        assert!(parse(Endpoint::ChatCompletions, &body).is_ok());
        let m =
            bytes_err(format!(r#"{{"model":"a",{many}"k\u0033":1,"messages":[{{}}]}}"#).as_bytes());
        assert!(m.contains("duplicate key `k3`"), "{m}");
        let m = bytes_err(br#"{"model":"a","mod\u0065l":"b","messages":[{}]}"#);
        assert!(m.contains("duplicate key `model`"), "{m}");
        assert!(parse(
            Endpoint::ChatCompletions,
            r#"{"model":"a","messages":[{"a":1,"a":2}]}"#
        )
        .is_ok());
        // Escaped text is fine.
        assert!(parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"content":"caf\u00e9 \ud83d\ude00 \"q\""}],"k\u00e9":1}"#
        )
        .is_ok());
    }

    #[test]
    fn only_the_gateways_words_are_its_priority() {
        let p = |prio: &str| {
            let f = parse(
                Endpoint::ChatCompletions,
                &format!(r#"{{"model":"m","messages":[{{}}],"priority":{prio}}}"#),
            )
            .unwrap_or_else(|e| panic!("{prio}: {}", e.message));
            (f.priority, f.strip_priority)
        };
        assert_eq!(p(r#""HIGH""#), (Some(Priority::High), true));
        assert_eq!(p(r#""low""#), (Some(Priority::Low), true));
        assert_eq!(p("null"), (None, true));
        assert_eq!(p("5"), (None, false));
        assert_eq!(p(r#""urgent""#), (None, false));
        assert_eq!(p(r#"{"x":1}"#), (None, false));
    }

    #[test]
    fn a_bad_priority_header_is_named() {
        let mut h = HeaderMap::new();
        h.insert(PRIORITY, "urgent".parse().unwrap());
        let e = admission_headers(&h).err().unwrap();
        assert_eq!(e.param, Some("x-mofa-priority"));
        h.insert(PRIORITY, " Critical ".parse().unwrap());
        assert_eq!(admission_headers(&h).unwrap().0, Some(Priority::Critical));
    }
}

//! Phase 2, `parse`: reads and checks the request: its content type (415), its body within
//! the size and time limits (413, 408), its JSON, and the fields the gateway reads (`model`,
//! `stream`, `messages` / `prompt` / `input`, `priority`) and the admission headers
//! (`x-mofa-priority`, `x-mofa-max-wait-ms`): 400 naming the field. Everything else in the body
//! is the backend's business and is forwarded as sent. A request on an Anthropic route (its
//! [`WireFormat`], set by the router) is a Messages request: it is translated here into the
//! OpenAI chat completion the rest of the pipeline handles (see `anthropic::request`). It must
//! not look up models or admit.

use std::borrow::Cow;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::accept::Limits;
use crate::admission::Priority;
use crate::anthropic::{self, WireFormat};
use crate::error::ApiError;
use crate::headers::{MAX_WAIT_MS, PRIORITY};
use crate::upstream::Endpoint;

/// Reads and checks a request for `endpoint`: see the module doc.
pub async fn parse(endpoint: Endpoint, limits: Limits, req: Request) -> Result<Parsed, ApiError> {
    let wire = wire_format(&req);
    let (header_priority, max_wait) = admission_headers(req.headers())?;
    let body = read_body(limits, req).await?;
    if wire.is_anthropic() {
        return messages_request(wire, &body, header_priority, max_wait);
    }
    let f = parse_fields(endpoint, &body)?;
    Ok(Parsed {
        endpoint,
        model: f.model,
        stream: f.stream,
        body_priority: f.priority,
        header_priority,
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
) -> Result<Parsed, ApiError> {
    let t =
        anthropic::translate(body, wire == WireFormat::AnthropicCount).map_err(|e| match e {
            anthropic::Invalid::Json(m) => ApiError::invalid_json(m),
            anthropic::Invalid::Value { param, message } => ApiError::invalid_value(param, message),
        })?;
    let body_priority = match t.priority.as_deref() {
        None => None,
        Some(p) => Some(Priority::parse(p).ok_or_else(bad_priority)?),
    };
    Ok(Parsed {
        endpoint: Endpoint::ChatCompletions,
        model: t.model,
        stream: t.stream,
        body_priority,
        header_priority,
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
    /// The body's `priority`, which is not forwarded.
    pub body_priority: Option<Priority>,
    /// `x-mofa-priority`, which wins over the body's.
    pub header_priority: Option<Priority>,
    /// `x-mofa-max-wait-ms`.
    pub max_wait: Option<Duration>,
    /// The body as the client sent it (a Messages request: its OpenAI translation).
    pub body: Bytes,
    /// The wire format the client speaks.
    pub wire: WireFormat,
    /// A Messages request: what its reply translation needs.
    pub anthropic: Option<anthropic::Context>,
}

impl Parsed {
    /// The priority the request asks for (header, then body, then `normal`).
    pub fn priority(&self) -> Priority {
        self.header_priority
            .or(self.body_priority)
            .unwrap_or_default()
    }
}

/// The fields of a body, before the headers are added.
struct Fields {
    model: String,
    stream: bool,
    priority: Option<Priority>,
}

/// Checks the content type, size and JSON of a request, and the fields the gateway needs.
fn parse_fields(endpoint: Endpoint, body: &[u8]) -> Result<Fields, ApiError> {
    let head: Head = match serde_json::from_slice(body) {
        Ok(h) => h,
        Err(e) if e.is_data() => {
            return Err(ApiError::invalid_json("the body must be a JSON object"))
        }
        Err(e) => return Err(ApiError::invalid_json(e)),
    };
    let model = match head.model {
        Some(Field::Str(m)) if !m.is_empty() => m.into_owned(),
        Some(Field::Str(_)) | None => {
            return Err(ApiError::invalid_value(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(_) => return Err(ApiError::invalid_value("model", "`model` must be a string")),
    };
    let stream = match head.stream {
        // Embeddings do not stream; `stream` there is forwarded untouched.
        _ if endpoint == Endpoint::Embeddings => false,
        None => false,
        Some(Field::Bool(b)) => b,
        Some(_) => {
            return Err(ApiError::invalid_value(
                "stream",
                "`stream` must be a boolean",
            ))
        }
    };
    match endpoint {
        Endpoint::ChatCompletions => match head.messages {
            Some(Field::Array(n)) if n > 0 => {}
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
            if !matches!(head.prompt, Some(Field::Str(_) | Field::Array(_))) {
                return Err(ApiError::invalid_value(
                    "prompt",
                    "`prompt` must be a string or an array",
                ));
            }
        }
        Endpoint::Embeddings => match head.input {
            Some(Field::Str(_)) => {}
            Some(Field::Array(n)) if n > 0 => {}
            _ => {
                return Err(ApiError::invalid_value(
                    "input",
                    "`input` must be a string or a non-empty array",
                ))
            }
        },
    }
    let priority = match head.priority {
        None => None,
        Some(Field::Str(p)) => Some(Priority::parse(&p).ok_or_else(bad_priority)?),
        Some(_) => return Err(bad_priority()),
    };
    Ok(Fields {
        model,
        stream,
        priority,
    })
}

fn bad_priority() -> ApiError {
    ApiError::invalid_value(
        "priority",
        "`priority` (or `x-mofa-priority`) must be one of low, normal, high, critical",
    )
}

/// The admission headers: `x-mofa-priority` and `x-mofa-max-wait-ms`.
fn admission_headers(h: &HeaderMap) -> Result<(Option<Priority>, Option<Duration>), ApiError> {
    let prio = match h.get(PRIORITY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| Priority::parse(s.trim()))
                .ok_or_else(bad_priority)?,
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

/// The parts of a request body the gateway looks at; everything else is forwarded untouched.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<Field<'a>>,
    #[serde(borrow)]
    stream: Option<Field<'a>>,
    #[serde(borrow)]
    messages: Option<Field<'a>>,
    #[serde(borrow)]
    prompt: Option<Field<'a>>,
    #[serde(borrow)]
    input: Option<Field<'a>>,
    #[serde(borrow)]
    priority: Option<Field<'a>>,
}

/// A top-level field, known by its JSON type; strings are kept, containers are skipped.
enum Field<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Array(usize),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Field<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Field<'a>, E> {
                Ok(Field::Bool(v))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_unit<E>(self) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Field<'a>, A::Error> {
                let mut n = 0;
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Field::Array(n))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Field<'a>, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
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
        Err(e) => Err(ApiError::invalid_json(format!(
            "the body could not be read: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn parse(e: Endpoint, s: &str) -> Result<Fields, ApiError> {
        parse_fields(e, s.as_bytes())
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
        ];
        for (e, body, param) in cases {
            let err = parse(e, body)
                .err()
                .unwrap_or_else(|| panic!("{body} passed"));
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param, Some(param), "{body}");
        }
    }

    #[test]
    fn parse_rejects_non_objects_and_broken_json() {
        for body in ["[1]", "\"m\"", "{\"model\":", "", "nul"] {
            let err = parse(Endpoint::ChatCompletions, body).err().unwrap();
            assert_eq!(err.code, "invalid_json", "{body}");
        }
    }
}

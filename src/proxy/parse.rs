//! Phase 2, `parse`: reads and checks the request: its admission headers (`x-mofa-priority`,
//! `x-mofa-max-wait-ms`: 400 naming the header), its content type (415), its body within the size
//! and time limits (413, 408, a broken framing 400), then hands the body to the API the client
//! speaks ([`ClientApi`]: the whole-body JSON check and the fields the gateway reads, or a
//! translation into the OpenAI request the rest of the pipeline runs). It must not look up
//! models or admit.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::accept::Limits;
use crate::admission::Priority;
use crate::error::ApiError;
use crate::headers::{MAX_WAIT_MS, PRIORITY, SESSION};
use crate::upstream::Endpoint;
use crate::wire::json::numbers_blanked;
use crate::wire::{ClientApi, Local, Native, ReplyFormat};

/// Reads and checks a request for `endpoint` from a client speaking `client`: see the module
/// doc. `named`: the `model` the body names, once known (also when the request is refused after
/// that).
pub(crate) async fn parse(
    endpoint: Endpoint,
    client: &'static dyn ClientApi,
    limits: Limits,
    req: Request,
    named: &mut Option<String>,
) -> Result<Parsed, ApiError> {
    let (header_priority, max_wait) = admission_headers(req.headers())?;
    let session = req.headers().get(SESSION).map(|v| v.as_bytes().into());
    let body = read_body(limits, req).await?;
    let r = client.parse(endpoint, body, named)?;
    Ok(Parsed {
        endpoint: r.endpoint,
        model: r.model,
        stream: r.stream,
        body_priority: r.priority,
        strip_priority: r.strip_priority,
        header_priority,
        default_priority: None,
        max_priority: None,
        max_wait,
        body: r.body,
        cloud_drops: r.cloud_drops,
        reply: r.reply,
        local: r.local,
        native: r.native,
        session,
    })
}

/// What a valid request asks for.
pub(crate) struct Parsed {
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
    /// The OpenAI-form body to forward (the client's, or its translation).
    pub body: Bytes,
    /// Top-level fields a cloud deployment refuses.
    pub cloud_drops: &'static [&'static str],
    /// How the reply goes back; `None`: as the backend sent it.
    pub reply: Option<Box<dyn ReplyFormat>>,
    /// Answered by the gateway itself (no backend).
    pub local: Option<Local>,
    /// The request in the client's own API, for a deployment that speaks it.
    pub native: Option<Native>,
    /// `x-mofa-session`, for the `session` routing policy.
    pub session: Option<Box<[u8]>>,
}

/// The tokens a request is charged before it runs (see [`Parsed::token_estimate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TokenEstimate {
    /// Prompt characters / 4, rounded up.
    pub prompt: u64,
    /// `max_tokens` or `max_completion_tokens` (0 when unset).
    pub completion: u64,
}

impl TokenEstimate {
    pub(crate) fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

impl Parsed {
    /// The priority the request asks for (header, then body, then its principal's default,
    /// then `normal`).
    pub(crate) fn requested_priority(&self) -> Priority {
        self.header_priority
            .or(self.body_priority)
            .or(self.default_priority)
            .unwrap_or_default()
    }

    /// The priority it runs at: the one it asks for, lowered to its principal's ceiling.
    pub(crate) fn priority(&self) -> Priority {
        let p = self.requested_priority();
        self.max_priority.map_or(p, |max| p.min(max))
    }

    /// The tokens to charge before the call, as OpenAI counts them: the characters of the
    /// prompt (`messages`, `prompt` or `input`: every string in them) / 4, plus `max_tokens`
    /// or `max_completion_tokens`. Parses the body again: call it only when tokens are limited.
    pub(crate) fn token_estimate(&self) -> TokenEstimate {
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

/// The admission headers: `x-mofa-priority` and `x-mofa-max-wait-ms`.
fn admission_headers(h: &HeaderMap) -> Result<(Option<Priority>, Option<Duration>), ApiError> {
    let prio = match h.get(PRIORITY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| Priority::from_word(s.trim()))
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
            cloud_drops: &[],
            reply: None,
            local: None,
            native: None,
            session: None,
        };
        assert_eq!(p.token_estimate().prompt, 3, "\"user\" + 8 characters, / 4");
        assert_eq!(p.token_estimate().total(), 13);
        assert_eq!(p.priority(), Priority::High, "lowered to the ceiling");
        assert_eq!(p.requested_priority(), Priority::Critical);
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

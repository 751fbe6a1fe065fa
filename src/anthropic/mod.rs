//! Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) as a second wire
//! format on the same pipeline: a Messages request becomes an OpenAI chat completion request
//! ([`request`]), which is admitted, limited, routed and retried like any other; its reply, whole
//! ([`response`]) or streamed ([`stream`]: a state machine over OpenAI chunks), is translated
//! back. Both formats are serde types; no string surgery on JSON.
//!
//! It is a client API ([`Messages`], behind `wire::ClientApi`): owns the two formats and the
//! translation between them, and the Anthropic error envelope. It must not decide statuses
//! (`error`'s kinds say which Anthropic status each failure has), do I/O, or know about
//! admission.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;

use crate::admission::Priority;
use crate::error::ApiError;
use crate::headers::ANTHROPIC_REQUEST_ID;
use crate::upstream::{Endpoint, Transform};
use crate::wire::json::{self, Field};
use crate::wire::{ClientApi, ClientRequest, Local, Native, ReplyFormat};

pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod stream;

pub(crate) use request::{translate, Invalid};
pub(crate) use response::from_openai;
pub(crate) use stream::Translator;

/// Anthropic's Messages API as a client API: `POST /v1/messages`, and (`count`)
/// `/v1/messages/count_tokens`, which the gateway answers itself with its estimate.
pub(crate) struct Messages {
    pub count: bool,
}

impl ClientApi for Messages {
    fn parse(
        &self,
        _endpoint: Endpoint,
        body: Bytes,
        named: &mut Option<String>,
    ) -> Result<ClientRequest, ApiError> {
        // The same whole-body check as an OpenAI body (UTF-8, lone surrogates, nesting,
        // duplicate keys), so that both formats refuse the same bodies with the same messages.
        let head = json::check(&body)?;
        let t = translate(&body, self.count).map_err(|e| {
            if let Some(Field::Str(m)) = head.model {
                *named = Some(m.into_owned());
            }
            match e {
                Invalid::Json(m) => ApiError::invalid_json(m),
                Invalid::Value { param, message } => ApiError::invalid_value(param, message),
            }
        })?;
        let priority = t
            .priority
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .and_then(Priority::from_word);
        let local = self.count.then(|| {
            let n = t.context.input_estimate;
            Local {
                body: Bytes::from(format!("{{\"input_tokens\":{n}}}")),
                input_tokens: n,
            }
        });
        Ok(ClientRequest {
            endpoint: Endpoint::ChatCompletions,
            model: t.model,
            stream: t.stream,
            priority,
            // The translation carries no `priority`: nothing to strip.
            strip_priority: false,
            body: t.body,
            // Local servers take `top_k`, cloud OpenAI APIs refuse it.
            cloud_drops: if t.context.top_k { &["top_k"] } else { &[] },
            reply: Some(Box::new(Reply(t.context))),
            local,
            // A deployment that speaks the Messages API gets the request as it came.
            native: (!self.count).then(|| Native {
                endpoint: Endpoint::Messages,
                strip_priority: t.priority.is_some(),
                body,
            }),
        })
    }

    fn error(&self, e: ApiError) -> Response {
        let (status, kind) = e.kind.spec().anthropic;
        let body = error_body(kind, &e.message);
        e.render(status, body)
    }

    fn stamp(&self, headers: &mut HeaderMap, request_id: &HeaderValue) {
        headers.insert(ANTHROPIC_REQUEST_ID, request_id.clone());
    }
}

/// A Messages request's reply: the chat completion translated back, whole or streamed.
struct Reply(Context);

impl ReplyFormat for Reply {
    fn whole(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        from_openai(body, &self.0)
    }

    fn stream(self: Box<Self>) -> Box<dyn Transform> {
        Box::new(Translator::new(self.0))
    }

    fn native(self: Box<Self>) -> Option<Box<dyn ReplyFormat>> {
        Some(Box::new(Relayed))
    }
}

/// A reply that came from a deployment speaking the Messages API: it goes back as it came;
/// only the gateway's own failure mid-stream is written (as Anthropic's `error` event), unless
/// the backend's own error event already ended the stream.
struct Relayed;

impl ReplyFormat for Relayed {
    fn whole(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        Ok(body.to_vec())
    }

    fn stream(self: Box<Self>) -> Box<dyn Transform> {
        Box::new(Passthrough { ended: false })
    }
}

struct Passthrough {
    /// The backend's `event: error` went through.
    ended: bool,
}

impl Transform for Passthrough {
    fn chunk(&mut self, upstream: &[u8], out: &mut Vec<u8>) {
        self.ended |= upstream
            .split(|b| *b == b'\n')
            .any(|l| matches!(l.trim_ascii(), b"event: error" | b"event:error"));
        out.extend_from_slice(upstream);
    }

    fn failed(&mut self, message: &str, _code: &str) -> Bytes {
        if self.ended {
            return Bytes::new();
        }
        self.ended = true;
        error_event("api_error", message)
    }
}

/// What the pipeline needs to know of a Messages request beyond its OpenAI translation: for
/// its reply, and for the deployments that refuse part of it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Context {
    /// The model as the client named it (echoed in `model`).
    pub model: String,
    /// The request's `stop_sequences` (to name the one a backend says it stopped at).
    pub stop_sequences: Vec<String>,
    /// The gateway's estimate of the prompt's tokens (until the backend reports its count).
    pub input_estimate: u64,
    /// The request carries `top_k` (removed for cloud deployments, which refuse it).
    pub top_k: bool,
}

/// `{"type":"error","error":{"type":...,"message":...}}`.
#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// The Anthropic error envelope with error type `kind` (e.g. `overloaded_error`).
pub(crate) fn error_body(kind: &str, message: &str) -> Bytes {
    let env = ErrorEnvelope {
        kind: "error",
        error: ErrorDetail { kind, message },
    };
    Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
}

/// The SSE `error` event that ends a Messages stream which failed after its first byte.
pub(crate) fn error_event(kind: &str, message: &str) -> Bytes {
    let body = error_body(kind, message);
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// A new message id: `msg_` + 24 hex digits (a per-process prefix and a counter).
pub(crate) fn message_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let prefix = *PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ u64::from(std::process::id()).rotate_left(32)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("msg_{:08x}{:016x}", prefix as u32, n)
}

/// Prompt tokens estimated from characters (4 per token, rounded up), as the gateway counts
/// them when no backend has: `count_tokens` and the `message_start` of a stream.
pub(crate) fn estimate_tokens(chars: u64) -> u64 {
    chars.div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_and_event_shapes() {
        let v: serde_json::Value =
            serde_json::from_slice(&error_body("overloaded_error", "busy")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","error":{"type":"overloaded_error","message":"busy"}})
        );
        let ev = error_event("api_error", "cut");
        let s = std::str::from_utf8(&ev).unwrap();
        assert!(
            s.starts_with("event: error\ndata: {\"type\":\"error\""),
            "{s}"
        );
        assert!(s.ends_with("\n\n"));
    }

    #[test]
    fn errors_read_as_anthropic_with_the_same_headers() {
        use crate::headers::REJECT_REASON;
        use crate::reason::{RejectReason, Rejection};
        use axum::http::header;
        let r = Messages { count: false }.error(ApiError::rejected(
            Rejection::new(RejectReason::QueueFull, 3),
            "m",
        ));
        assert_eq!(r.status().as_u16(), 529);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(r.headers()[REJECT_REASON], "queue_full");
    }

    #[test]
    fn message_ids_are_distinct() {
        let (a, b) = (message_id(), message_id());
        assert_ne!(a, b);
        assert!(a.starts_with("msg_") && a.len() == 28, "{a}");
    }
}

//! Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) as a second wire
//! format on the same pipeline: a Messages request becomes an OpenAI chat completion request
//! ([`request`]), which is admitted, limited, routed and retried like any other; its reply, whole
//! ([`response`]) or streamed ([`stream`]: a state machine over OpenAI chunks), is translated
//! back. Both formats are serde types; no string surgery on JSON.
//!
//! Owns the two formats and the translation between them, and the Anthropic error envelope's
//! shape. It must not decide statuses (that is `error`), do I/O, or know about admission.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::Serialize;

pub mod request;
pub mod response;
pub mod stream;

pub use request::{translate, Invalid};
pub use response::from_openai;
pub use stream::Translator;

/// The wire format a client speaks on its route: set by the router as a request extension,
/// read by `parse` (which body to expect) and by the error rendering (which envelope).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WireFormat {
    /// The OpenAI API (`/v1/chat/completions`, ...).
    #[default]
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
    /// `POST /v1/messages/count_tokens`: parsed like a Messages request, answered by the gateway.
    AnthropicCount,
}

impl WireFormat {
    pub fn is_anthropic(self) -> bool {
        self != WireFormat::OpenAi
    }
}

/// What the pipeline needs to know of a Messages request beyond its OpenAI translation: for
/// its reply, and for the deployments that refuse part of it.
#[derive(Debug, Clone, Default)]
pub struct Context {
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
pub fn error_body(kind: &str, message: &str) -> Bytes {
    let env = ErrorEnvelope {
        kind: "error",
        error: ErrorDetail { kind, message },
    };
    Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
}

/// The SSE `error` event that ends a Messages stream which failed after its first byte.
pub fn error_event(kind: &str, message: &str) -> Bytes {
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
pub fn estimate_tokens(chars: u64) -> u64 {
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
    fn message_ids_are_distinct() {
        let (a, b) = (message_id(), message_id());
        assert_ne!(a, b);
        assert!(a.starts_with("msg_") && a.len() == 28, "{a}");
    }
}

//! The OpenAI wire format as the upstream client and the error mapping need it: the error
//! envelope, the SSE error event, `Retry-After` of a reply, the error inside a 2xx. Pure
//! functions on bytes and headers; no I/O.

use axum::http::{header, HeaderMap};
use bytes::Bytes;

/// The token counts of a reply (OpenAI's `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The `usage` of the SSE events in `chunk` (the last one with a non-null `usage`), if any.
pub(super) fn sse_usage(chunk: &[u8]) -> Option<Usage> {
    if !chunk.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Event {
        usage: Option<Usage>,
    }
    let text = std::str::from_utf8(chunk).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data:"))
        .find_map(|d| serde_json::from_str::<Event>(d.trim()).ok()?.usage)
}

/// How many SSE events in `chunk` carry generated text (a non-empty `"content"` or `"text"`
/// string): the output token estimate of a stream without a usage chunk.
pub(super) fn sse_content_events(chunk: &[u8]) -> u64 {
    let mut n = 0;
    for line in chunk.split(|b| *b == b'\n') {
        if !line.starts_with(b"data:") {
            continue;
        }
        let has = |key: &[u8]| {
            line.windows(key.len())
                .position(|w| w == key)
                .is_some_and(|i| line.get(i + key.len()) != Some(&b'"'))
        };
        if has(b"\"content\":\"") || has(b"\"text\":\"") {
            n += 1;
        }
    }
    n
}

/// Builds `{"error":{"message","type","param","code"}}`.
pub(crate) fn envelope(message: &str, kind: &str, param: Option<&str>, code: &str) -> Bytes {
    let v = serde_json::json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    });
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// The SSE event that ends a stream that failed after its first byte (no `[DONE]` follows).
pub(super) fn sse_error_event(message: &str, code: &str) -> Bytes {
    let env = envelope(message, "upstream_error", None, code);
    let mut out = Vec::with_capacity(env.len() + 24);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&env);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Whether `body` is an OpenAI error envelope (an object whose `error` has a string `message`).
pub(crate) fn is_envelope(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.get("message")?.as_str().map(|_| ()))
        .is_some()
}

/// `Retry-After` (seconds or `retry-after-ms`) of an upstream reply, rounded up to seconds.
pub(super) fn retry_after_secs(h: &HeaderMap) -> Option<u64> {
    if let Some(ms) = h
        .get(crate::headers::RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some((ms / 1000.0).ceil() as u64);
    }
    h.get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v.ceil() as u64)
}

/// `error.message` of an OpenAI envelope, if `body` is one.
pub(crate) fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?;
    Some(
        e.get("message")
            .and_then(|m| m.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| e.to_string()),
    )
}

/// If a chunk of SSE holds a `data:` event whose JSON has an `error` key, its message.
pub(super) fn sse_error_in(chunk: &[u8]) -> Option<String> {
    if !chunk.windows(7).any(|w| w == b"\"error\"") {
        return None;
    }
    let text = std::str::from_utf8(chunk).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .find_map(|d| error_message(d.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after_secs(&h), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2.5"));
        assert_eq!(retry_after_secs(&h), Some(3));
        h.insert(
            crate::headers::RETRY_AFTER_MS,
            HeaderValue::from_static("1200"),
        );
        assert_eq!(retry_after_secs(&h), Some(2));
        h.insert(
            crate::headers::RETRY_AFTER_MS,
            HeaderValue::from_static("-5"),
        );
        assert_eq!(retry_after_secs(&h), Some(3));
    }

    #[test]
    fn sse_error_is_found_only_in_data_events() {
        assert_eq!(
            sse_error_in(b"data: {\"error\":{\"message\":\"boom\"}}\n\n").as_deref(),
            Some("boom")
        );
        assert_eq!(sse_error_in(b"data: {\"choices\":[]}\n\n"), None);
        assert_eq!(
            sse_error_in(b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"error\\\"\"}}]}\n\n"),
            None
        );
    }

    #[test]
    fn usage_and_content_of_sse_chunks() {
        let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        assert_eq!(sse_content_events(chunk), 1);
        assert_eq!(
            sse_usage(chunk),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 2
            })
        );
        assert_eq!(sse_usage(b"data: {\"usage\":null}\n\n"), None);
    }

    #[test]
    fn sse_error_event_is_one_event() {
        let ev = sse_error_event("boom", "upstream_disconnected");
        let s = std::str::from_utf8(&ev).unwrap();
        assert!(s.starts_with("event: error\ndata: {\"error\":"));
        assert!(s.ends_with("\n\n"));
        assert!(!s.contains("[DONE]"));
    }
}

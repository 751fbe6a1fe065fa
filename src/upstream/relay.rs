//! Relaying a stream to the client once its first byte is out: chunk by chunk, within the idle
//! and total limits. A failure, an idle gap or an end without `data: [DONE]` appends one SSE
//! `error` event and ends the stream (never a `[DONE]` after a failure). An upstream that sends
//! its own error event (`event: error`, or a `data:` JSON with an `error` key) has it relayed,
//! and the stream ends right there: one error event, never two. Its error text names the
//! deployment's label; the HTTP library's detail goes to the log only. It tells its [`OnEnd`]
//! how the stream ended, exactly once; it must not decide anything else.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;

use super::error_chain;
use super::wire::{sse_content_events, sse_error_event, sse_error_in, sse_usage, Usage};

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Its last byte (`[DONE]`) was relayed.
    Complete,
    /// The backend failed, or went idle, after the first byte: an error event ended it.
    Failed,
    /// The client went away before the end.
    ClientGone,
}

/// What was relayed.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamStats {
    pub bytes: u64,
    pub chunks: u64,
    /// The usage chunk's counts, when the upstream sent one.
    pub usage: Option<Usage>,
    /// Events that carried generated text (the output estimate without a usage chunk).
    pub content_events: u64,
}

/// Told how a stream ended, once; what it holds (a slot) is freed with it.
pub type OnEnd = Box<dyn FnOnce(StreamEnd, StreamStats) + Send>;

/// The limits of a relay.
pub(super) struct Limits {
    pub idle: Duration,
    pub deadline: Option<tokio::time::Instant>,
}

/// The relay's state. Dropped before its end: the client went away.
struct Relay {
    on_end: Option<OnEnd>,
    rest: super::BodyStream,
    first: Option<Bytes>,
    tail: Tail,
    limits: Limits,
    label: String,
    stats: StreamStats,
    /// The upstream sent an `event: error` line (its data may follow in the next chunk).
    named_error: bool,
    /// The upstream sent a complete error event: the stream ends after it.
    upstream_error: bool,
}

impl Relay {
    fn end(&mut self, how: StreamEnd) {
        if let Some(f) = self.on_end.take() {
            f(how, self.stats);
        }
    }

    fn count(&mut self, chunk: &Bytes) {
        self.tail.push(chunk);
        self.stats.bytes += chunk.len() as u64;
        self.stats.chunks += 1;
        self.stats.content_events += sse_content_events(chunk);
        if let Some(u) = sse_usage(chunk) {
            self.stats.usage = Some(u);
        }
        if has_error_event_line(chunk) {
            self.named_error = true;
        }
        if sse_error_in(chunk).is_some() {
            self.upstream_error = true;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.end(StreamEnd::ClientGone);
    }
}

/// A stream whose first chunk arrived: what [`PendingStream::relay`] sends on.
pub struct PendingStream {
    pub(super) first: Bytes,
    pub(super) rest: super::BodyStream,
    pub(super) limits: Limits,
    pub(super) label: String,
}

impl PendingStream {
    /// The response body: `first`, then the rest of the stream. See the module doc.
    pub fn relay(self, on_end: OnEnd) -> Body {
        relay(self, on_end)
    }
}

fn relay(p: PendingStream, on_end: OnEnd) -> Body {
    let PendingStream {
        first,
        rest,
        limits,
        label,
    } = p;
    let state = Relay {
        on_end: Some(on_end),
        rest,
        first: Some(first),
        tail: Tail::default(),
        limits,
        label,
        stats: StreamStats::default(),
        named_error: false,
        upstream_error: false,
    };
    let s = futures_util::stream::unfold(state, |mut st| async move {
        // Ended (its `on_end` was told): nothing more.
        st.on_end.as_ref()?;
        if let Some(first) = st.first.take() {
            st.count(&first);
            return Some((Ok::<_, std::convert::Infallible>(first), st));
        }
        // The upstream's own error event went out: that is the end (no second one).
        if st.upstream_error {
            tracing::warn!(backend = %st.label, "the backend ended its stream with an error event");
            st.end(StreamEnd::Failed);
            return None;
        }
        // The next chunk is due within the idle limit, and before the total deadline.
        let idle_end = tokio::time::Instant::now() + st.limits.idle;
        let (until, what) = match st.limits.deadline {
            Some(d) if d < idle_end => (d, "total_timeout_ms"),
            _ => (idle_end, "idle_timeout_ms"),
        };
        let (failure, code) = match tokio::time::timeout_at(until, st.rest.next()).await {
            Ok(Some(Ok(chunk))) => {
                st.count(&chunk);
                return Some((Ok(chunk), st));
            }
            Ok(None) if st.tail.ends_with_done() => {
                st.end(StreamEnd::Complete);
                return None;
            }
            Ok(None) if st.named_error => {
                tracing::warn!(backend = %st.label, "the backend ended its stream with an error event");
                st.end(StreamEnd::Failed);
                return None;
            }
            Ok(None) => (
                format!(
                    "the backend {} closed the stream before it was complete",
                    st.label
                ),
                "upstream_disconnected",
            ),
            Ok(Some(Err(e))) => {
                tracing::warn!(backend = %st.label, error = %error_chain(&e), "stream broken");
                (
                    format!("the backend {} broke off the stream", st.label),
                    "upstream_disconnected",
                )
            }
            Err(_) => (
                format!("the backend {} timed out mid-stream ({what})", st.label),
                "upstream_timeout",
            ),
        };
        tracing::warn!(backend = %st.label, "{failure}");
        st.end(StreamEnd::Failed);
        Some((Ok(sse_error_event(&failure, code)), st))
    });
    Body::from_stream(s)
}

/// Whether `chunk` has an SSE `event: error` line.
fn has_error_event_line(chunk: &[u8]) -> bool {
    chunk.split(|b| *b == b'\n').any(|l| {
        let l = l.trim_ascii();
        l == b"event: error" || l == b"event:error"
    })
}

/// The last bytes of a stream, to tell whether it ended with `data: [DONE]`.
#[derive(Default)]
pub(super) struct Tail {
    buf: Vec<u8>,
}

impl Tail {
    const KEEP: usize = 32;

    fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= Self::KEEP {
            self.buf.clear();
            self.buf
                .extend_from_slice(&chunk[chunk.len() - Self::KEEP..]);
        } else {
            self.buf.extend_from_slice(chunk);
            let extra = self.buf.len().saturating_sub(Self::KEEP);
            self.buf.drain(..extra);
        }
    }

    fn ends_with_done(&self) -> bool {
        let end = self
            .buf
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let t = &self.buf[..end];
        t.ends_with(b"data: [DONE]") || t.ends_with(b"data:[DONE]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_event_lines() {
        assert!(has_error_event_line(
            b"data: {}\n\nevent: error\r\ndata: {}\n\n"
        ));
        assert!(has_error_event_line(b"event:error\n"));
        assert!(!has_error_event_line(
            b"data: {\"content\":\"event: error\"}\n\n"
        ));
    }

    #[test]
    fn tail_sees_done_across_chunks() {
        let mut t = Tail::default();
        t.push(b"data: {\"x\":1}\n\ndata: [DO");
        assert!(!t.ends_with_done());
        t.push(b"NE]\n\n");
        assert!(t.ends_with_done());
        t.push(b"data: {\"content\":\"[DONE]\"}\n\n");
        assert!(!t.ends_with_done());
        let mut t = Tail::default();
        t.push(&[b'x'; 100]);
        t.push(b"\ndata:[DONE]\r\n");
        assert!(t.ends_with_done());
    }
}

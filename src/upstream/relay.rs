//! Relaying a stream to the client once its first byte is out: chunk by chunk, within the idle
//! and total limits. A failure, an idle gap or an end without `data: [DONE]` appends one SSE
//! `error` event and ends the stream (never a `[DONE]` after a failure). An upstream that sends
//! its own error event (`event: error`, or a `data:` JSON with an `error` key) has it relayed,
//! and the stream ends right there: one error event, never two. Its error text names the
//! deployment's label; the HTTP library's detail goes to the log only. It tells its [`OnEnd`]
//! how the stream ended, exactly once; it must not decide anything else. A [`Transform`]
//! (another wire format's events) may rewrite what the client gets, its failure event included;
//! the relay still counts and checks the upstream's own bytes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;

use super::api::{StreamReader, StreamStats};
use super::error_chain;
use super::wire::sse_error_event;

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// Its last byte (`[DONE]`) was relayed.
    Complete,
    /// The backend failed, or went idle, after the first byte: an error event ended it.
    Failed,
    /// The client went away before the end.
    ClientGone,
}

/// Told how a stream ended, once; what it holds (a slot) is freed with it.
pub(crate) type OnEnd = Box<dyn FnOnce(StreamEnd, StreamStats) + Send>;

/// Rewrites a relayed stream for a client that speaks another wire format (the Anthropic
/// Messages events, say). The relay feeds it every upstream chunk as it arrives.
pub(crate) trait Transform: Send {
    /// Appends to `out` what the client gets for one upstream chunk (possibly nothing).
    fn chunk(&mut self, upstream: &[u8], out: &mut Vec<u8>);
    /// The event that ends the stream when it failed after its first byte (instead of the
    /// OpenAI `error` event); empty if the transform already ended it.
    fn failed(&mut self, message: &str, code: &str) -> Bytes;
    /// Whether the transform itself ended the stream with an error (the backend's in-band one).
    fn broken(&self) -> bool {
        false
    }
    /// The longest gap after which [`Transform::keepalive`] is sent; `None`: never.
    fn keepalive_every(&self) -> Option<Duration> {
        None
    }
    /// What to send after a gap (a `ping`); it does not count as upstream activity.
    fn keepalive(&mut self) -> Bytes {
        Bytes::new()
    }
}

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
    limits: Limits,
    label: Arc<str>,
    stats: StreamStats,
    /// Reads the upstream's chunks into the common form (and what they say).
    reader: Box<dyn StreamReader>,
    transform: Option<Box<dyn Transform>>,
    /// When the upstream's next chunk is due (set when the wait starts; kept across keepalives).
    idle_end: Option<tokio::time::Instant>,
}

impl Relay {
    /// What the client gets for `chunk`: the chunk itself, or its transform (`None`: nothing).
    fn out(&mut self, chunk: Bytes) -> Option<Bytes> {
        match &mut self.transform {
            None => Some(chunk),
            Some(t) => {
                let mut out = Vec::new();
                t.chunk(&chunk, &mut out);
                if t.broken() {
                    // It ended the stream with its error event: read no more.
                    self.end(StreamEnd::Failed);
                }
                (!out.is_empty()).then(|| Bytes::from(out))
            }
        }
    }

    /// The upstream ended its stream with its own error event: already relayed as it came, or
    /// (with a transform) rendered now if the transform has not rendered it yet.
    fn upstream_failed(mut self) -> Option<(Result<Bytes, std::convert::Infallible>, Relay)> {
        tracing::warn!(backend = %self.label, "the backend ended its stream with an error event");
        self.end(StreamEnd::Failed);
        let message = format!("the backend {} ended its stream with an error", self.label);
        let event = self.transform.as_mut()?.failed(&message, "upstream_error");
        (!event.is_empty()).then_some((Ok(event), self))
    }

    fn end(&mut self, how: StreamEnd) {
        if let Some(f) = self.on_end.take() {
            f(how, self.stats);
        }
    }

    /// One upstream chunk, read: what goes on towards the client (possibly nothing).
    fn read(&mut self, chunk: Bytes) -> Bytes {
        self.stats.bytes += chunk.len() as u64;
        self.stats.chunks += 1;
        self.reader.read(chunk, &mut self.stats)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.end(StreamEnd::ClientGone);
    }
}

/// A stream whose first chunk arrived: what [`PendingStream::relay`] sends on.
pub(crate) struct PendingStream {
    /// The first chunk, already read (in the common form).
    pub(super) first: Bytes,
    pub(super) rest: super::BodyStream,
    pub(super) limits: Limits,
    pub(super) label: Arc<str>,
    /// What the first chunk said.
    pub(super) stats: StreamStats,
    pub(super) reader: Box<dyn StreamReader>,
}

impl PendingStream {
    /// The response body: `first`, then the rest of the stream. See the module doc.
    pub(crate) fn relay(self, on_end: OnEnd) -> Body {
        relay(self, on_end, None)
    }

    /// The same, rewritten by `transform` for the client.
    pub(crate) fn relay_with(self, on_end: OnEnd, transform: Box<dyn Transform>) -> Body {
        relay(self, on_end, Some(transform))
    }
}

fn relay(p: PendingStream, on_end: OnEnd, transform: Option<Box<dyn Transform>>) -> Body {
    let PendingStream {
        first,
        rest,
        limits,
        label,
        stats,
        reader,
    } = p;
    let state = Relay {
        on_end: Some(on_end),
        rest,
        first: Some(first),
        limits,
        label,
        stats,
        reader,
        transform,
        idle_end: None,
    };
    let s = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            // Ended (its `on_end` was told): nothing more.
            st.on_end.as_ref()?;
            if let Some(first) = st.first.take().filter(|f| !f.is_empty()) {
                match st.out(first) {
                    Some(b) => return Some((Ok::<_, std::convert::Infallible>(b), st)),
                    None => continue,
                }
            }
            // The upstream's own error event went out (or, with a transform, its rendering):
            // that is the end (no second one).
            if st.reader.error().is_some() {
                return st.upstream_failed();
            }
            // The next chunk is due within the idle limit, and before the total deadline.
            let now = tokio::time::Instant::now();
            let idle_end = *st.idle_end.get_or_insert(now + st.limits.idle);
            let (until, what) = match st.limits.deadline {
                Some(d) if d < idle_end => (d, "total_timeout_ms"),
                _ => (idle_end, "idle_timeout_ms"),
            };
            // A transform may send something (a ping) meanwhile.
            let wake = match st.transform.as_ref().and_then(|t| t.keepalive_every()) {
                Some(every) => until.min(now + every),
                None => until,
            };
            let (failure, code) = match tokio::time::timeout_at(wake, st.rest.next()).await {
                Err(_) if wake < until => {
                    let ping = st
                        .transform
                        .as_mut()
                        .map(|t| t.keepalive())
                        .unwrap_or_default();
                    if ping.is_empty() {
                        continue;
                    }
                    return Some((Ok(ping), st));
                }
                Ok(Some(Ok(chunk))) => {
                    st.idle_end = None;
                    let chunk = st.read(chunk);
                    if chunk.is_empty() {
                        continue;
                    }
                    match st.out(chunk) {
                        Some(b) => return Some((Ok(b), st)),
                        None => continue,
                    }
                }
                Ok(None) if st.reader.complete() => {
                    let broken = st.transform.as_ref().is_some_and(|t| t.broken());
                    st.end(if broken {
                        StreamEnd::Failed
                    } else {
                        StreamEnd::Complete
                    });
                    return None;
                }
                Ok(None) if st.reader.error_announced() => return st.upstream_failed(),
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
            let event = match st.transform.as_mut() {
                Some(t) => t.failed(&failure, code),
                None => sse_error_event(&failure, code),
            };
            return (!event.is_empty()).then_some((Ok(event), st));
        }
    });
    Body::from_stream(s)
}

#[cfg(test)]
mod transform_tests {
    use super::*;
    use crate::upstream::api::UpstreamApi;
    use http_body_util::BodyExt;

    /// Upper-cases what it relays, pings every 10 s, and says `failed:<code>` on failure.
    struct Upper;

    impl Transform for Upper {
        fn chunk(&mut self, upstream: &[u8], out: &mut Vec<u8>) {
            out.extend(upstream.iter().map(u8::to_ascii_uppercase));
        }
        fn failed(&mut self, _message: &str, code: &str) -> Bytes {
            Bytes::from(format!("failed:{code}"))
        }
        fn keepalive_every(&self) -> Option<Duration> {
            Some(Duration::from_millis(10))
        }
        fn keepalive(&mut self) -> Bytes {
            Bytes::from_static(b"ping;")
        }
    }

    /// `first`, then after `gap` each of `rest`, then the end.
    fn pending(
        first: &'static str,
        gap: Duration,
        idle: Duration,
        rest: Vec<&'static str>,
    ) -> PendingStream {
        let s = futures_util::stream::unfold(rest.into_iter(), move |mut it| async move {
            let next = it.next()?;
            tokio::time::sleep(gap).await;
            Some((Ok(Bytes::from_static(next.as_bytes())), it))
        });
        PendingStream {
            first: Bytes::from_static(first.as_bytes()),
            rest: Box::pin(s),
            limits: Limits {
                idle,
                deadline: None,
            },
            label: "b".into(),
            stats: StreamStats::default(),
            reader: super::super::api::OpenAiCompatible.stream(b"{}"),
        }
    }

    async fn body_of(p: PendingStream) -> (String, StreamEnd) {
        let end = std::sync::Arc::new(std::sync::Mutex::new(None));
        let e = end.clone();
        let body = p.relay_with(
            Box::new(move |how, _| *e.lock().unwrap() = Some(how)),
            Box::new(Upper),
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        let how = end.lock().unwrap().take().unwrap();
        (String::from_utf8(bytes.to_vec()).unwrap(), how)
    }

    #[tokio::test]
    async fn a_transform_rewrites_pings_in_gaps_and_renders_the_failure() {
        // A gap far longer than the ping interval, under the idle limit: pings, then the rest.
        let (text, end) = body_of(pending(
            "data: a\n\n",
            Duration::from_millis(300),
            Duration::from_secs(30),
            vec!["data: [DONE]\n\n"],
        ))
        .await;
        let pings = text
            .strip_prefix("DATA: A\n\n")
            .and_then(|t| t.strip_suffix("DATA: [DONE]\n\n"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(!pings.is_empty(), "a ping in the gap: {text}");
        assert!(pings.split_terminator(';').all(|p| p == "ping"), "{text}");
        assert_eq!(end, StreamEnd::Complete);

        // Pings do not count as upstream activity: the idle limit still ends a silent stream.
        let (text, end) = body_of(pending(
            "data: a\n\n",
            Duration::from_secs(30),
            Duration::from_millis(200),
            vec!["data: [DONE]\n\n"],
        ))
        .await;
        assert!(text.starts_with("DATA: A\n\nping;"), "{text}");
        assert!(text.ends_with(";failed:upstream_timeout"), "{text}");
        assert_eq!(end, StreamEnd::Failed);

        // An end without [DONE]: the transform's failure event.
        let (text, end) = body_of(pending(
            "data: a\n\n",
            Duration::ZERO,
            Duration::from_secs(30),
            vec![],
        ))
        .await;
        assert_eq!(text, "DATA: A\n\nfailed:upstream_disconnected");
        assert_eq!(end, StreamEnd::Failed);
    }
}

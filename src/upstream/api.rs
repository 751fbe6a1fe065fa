//! The seam of the APIs deployments speak ([`UpstreamApi`]): where each endpoint lives under a
//! deployment's base URL, how its credentials are sent, how an OpenAI-form request becomes its
//! body, how its replies, streams and errors read as the gateway's common form (OpenAI's reply,
//! OpenAI's SSE chunks, an [`UpstreamError`]). A deployment names its API in the config:
//! `api = "openai"` ([`OpenAiCompatible`], the default) or `api = "anthropic"`
//! ([`super::messages::MessagesApi`]).
//!
//! Adding an upstream API is one module that implements [`UpstreamApi`] (and [`StreamReader`])
//! plus its value in `config::UpstreamApiKind` and `upstream::for_deployment`. The client, its
//! timeouts, the relay and the breakers stay as they are.
//!
//! It must not do I/O (the client in `upstream` does), nor decide retries or routing: it says
//! what a reply is, the caller decides what to do with it.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::wire::{error_message, retry_after_secs, sse_content_events, sse_error_in, sse_usage};
use super::{Endpoint, UpstreamError, Usage};
use crate::config::Secret;

/// An API a deployment speaks (see the module doc).
pub(crate) trait UpstreamApi: Send + Sync {
    /// `endpoint`'s path under the base URL (`/chat/completions`).
    fn path(&self, endpoint: Endpoint) -> &'static str;

    /// The path the health probe reads (2xx: healthy).
    fn probe_path(&self) -> &'static str;

    /// The base URL the paths go under, from the configured `url` (without a trailing `/`).
    fn base<'a>(&self, url: &'a str) -> &'a str {
        url.trim_end_matches('/')
    }

    /// The headers that carry the deployment's `api_key` (marked sensitive).
    fn credentials(&self, key: &Secret) -> Result<Vec<(HeaderName, HeaderValue)>, String>;

    /// Headers every request of this API carries, the probe's included, beside the
    /// credentials (a version header).
    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        Vec::new()
    }

    /// The body to send for an OpenAI-form request body (already renamed and trimmed for the
    /// deployment); `Err`: this API cannot carry it.
    fn request_body(&self, endpoint: Endpoint, body: Bytes) -> Result<Bytes, UpstreamError>;

    /// A whole 2xx reply as an OpenAI-form body, with its usage; `Err`: it is not a reply (an
    /// error inside a 2xx, or not what was asked for).
    fn read_reply(&self, body: Bytes) -> Result<(Bytes, Option<Usage>), UpstreamError>;

    /// Whether it takes requests to `endpoint` as they are: every OpenAI endpoint (or refuses
    /// it in [`UpstreamApi::request_body`]); `Endpoint::Messages` only an API whose own it is.
    fn takes(&self, endpoint: Endpoint) -> bool {
        endpoint != Endpoint::Messages
    }

    /// A whole 2xx reply to an `Endpoint::Messages` request, as it goes back (unchanged), with
    /// its usage (only for an API that [`UpstreamApi::takes`] it).
    fn read_native(&self, _body: Bytes) -> Result<(Bytes, Option<Usage>), UpstreamError> {
        Err(UpstreamError::Invalid(
            "this API does not speak the client's".into(),
        ))
    }

    /// A reader for one streamed reply to an `Endpoint::Messages` request: the bytes go on
    /// unchanged, what they say is read (only for an API that [`UpstreamApi::takes`] it).
    fn stream_native(&self) -> Box<dyn StreamReader> {
        Box::new(OpenAiStream::default())
    }

    /// A reader for one streamed reply to `request` (the OpenAI-form body given to
    /// [`UpstreamApi::request_body`]: it says what the client asked for, such as the final
    /// usage chunk).
    fn stream(&self, request: &[u8]) -> Box<dyn StreamReader>;

    /// A non-2xx reply as an error: its status, retry advice and body.
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: Bytes) -> UpstreamError;
}

/// What was relayed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StreamStats {
    pub bytes: u64,
    pub chunks: u64,
    /// The usage chunk's counts, when the upstream sent one.
    pub usage: Option<Usage>,
    /// Events that carried generated text (the output estimate without a usage chunk).
    pub content_events: u64,
}

/// Reads one streamed reply of a deployment into the common events: OpenAI SSE chunks, and
/// what they say (usage, generated text, an error, the end).
pub(crate) trait StreamReader: Send {
    /// Reads one upstream chunk: returns what the client-side of the relay gets (OpenAI SSE
    /// bytes; possibly empty) and adds what it says to `stats`.
    fn read(&mut self, chunk: Bytes, stats: &mut StreamStats) -> Bytes;

    /// The error the stream's events carried so far, once one is complete: the stream ends
    /// after it.
    fn error(&self) -> Option<&str>;

    /// An error event was announced (`event: error`) whose data may not have come.
    fn error_announced(&self) -> bool;

    /// The stream's end marker came (`data: [DONE]`): an end without it is a cut.
    fn complete(&self) -> bool;

    /// [`StreamReader::error`] as a failure of the call, when it came before anything reached
    /// the client (in the first chunk): by default a broken reply; an API whose in-stream
    /// errors say more (an overload) says so.
    fn failure(&self) -> Option<UpstreamError> {
        self.error().map(|m| UpstreamError::Invalid(m.to_owned()))
    }
}

/// The OpenAI-compatible API (OpenAI, llama-server, vLLM, Ollama, the simulator): requests go
/// as they are, with `Authorization: Bearer`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenAiCompatible;

impl UpstreamApi for OpenAiCompatible {
    fn path(&self, endpoint: Endpoint) -> &'static str {
        match endpoint {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            // Never sent: `takes` says no.
            Endpoint::Messages => "/messages",
        }
    }

    fn probe_path(&self) -> &'static str {
        "/models"
    }

    fn credentials(&self, key: &Secret) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| "api_key is not a valid header value".to_string())?;
        v.set_sensitive(true);
        Ok(vec![(header::AUTHORIZATION, v)])
    }

    fn request_body(&self, _endpoint: Endpoint, body: Bytes) -> Result<Bytes, UpstreamError> {
        Ok(body)
    }

    fn read_reply(&self, body: Bytes) -> Result<(Bytes, Option<Usage>), UpstreamError> {
        #[derive(Deserialize)]
        struct Probe {
            error: Option<IgnoredAny>,
            usage: Option<Usage>,
        }
        match serde_json::from_slice::<Probe>(&body) {
            Ok(Probe { error: None, usage }) => Ok((body, usage)),
            Ok(Probe { error: Some(_), .. }) => Err(UpstreamError::Invalid(
                error_message(&body).unwrap_or_else(|| "the reply carries an error".into()),
            )),
            Err(_) => Err(UpstreamError::Invalid("the reply is not JSON".into())),
        }
    }

    fn stream(&self, _request: &[u8]) -> Box<dyn StreamReader> {
        Box::new(OpenAiStream::default())
    }

    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: Bytes) -> UpstreamError {
        UpstreamError::Status {
            status,
            retry_after: retry_after_secs(headers),
            body,
        }
    }
}

/// An OpenAI SSE stream, read as it is relayed (the bytes go on unchanged).
#[derive(Default)]
struct OpenAiStream {
    tail: Tail,
    error: Option<String>,
    announced: bool,
}

impl StreamReader for OpenAiStream {
    fn read(&mut self, chunk: Bytes, stats: &mut StreamStats) -> Bytes {
        self.tail.push(&chunk);
        stats.content_events += sse_content_events(&chunk);
        if let Some(u) = sse_usage(&chunk) {
            stats.usage = Some(u);
        }
        if has_error_event_line(&chunk) {
            self.announced = true;
        }
        if self.error.is_none() {
            self.error = sse_error_in(&chunk);
        }
        chunk
    }

    fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn error_announced(&self) -> bool {
        self.announced
    }

    fn complete(&self) -> bool {
        self.tail.ends_with_done()
    }
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
struct Tail {
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
    fn openai_stream_reads_usage_content_errors_and_the_end() {
        let api = OpenAiCompatible;
        let mut r = api.stream(b"{}");
        let mut stats = StreamStats::default();
        let chunk = Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
        );
        let out = r.read(chunk.clone(), &mut stats);
        assert_eq!(out, chunk, "the bytes go on unchanged");
        assert_eq!(stats.content_events, 1);
        assert_eq!(stats.usage.map(|u| u.prompt_tokens), Some(7));
        assert!(!r.complete());
        // `[DONE]` split across chunks still ends it.
        r.read(Bytes::from_static(b"data: [DO"), &mut stats);
        r.read(Bytes::from_static(b"NE]\n\n"), &mut stats);
        assert!(r.complete());
        assert_eq!(r.error(), None);

        let mut r = api.stream(b"{}");
        r.read(Bytes::from_static(b"event: error\n"), &mut stats);
        assert!(r.error_announced());
        assert_eq!(r.error(), None);
        r.read(
            Bytes::from_static(b"data: {\"error\":{\"message\":\"boom\"}}\n\n"),
            &mut stats,
        );
        assert_eq!(r.error(), Some("boom"));
    }

    #[test]
    fn openai_replies_and_errors() {
        let api = OpenAiCompatible;
        let (body, usage) = api
            .read_reply(Bytes::from_static(
                b"{\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}",
            ))
            .unwrap();
        assert!(body.starts_with(b"{\"choices\""));
        assert_eq!(usage.map(|u| u.completion_tokens), Some(4));
        assert!(matches!(
            api.read_reply(Bytes::from_static(b"{\"error\":{\"message\":\"x\"}}")),
            Err(UpstreamError::Invalid(m)) if m == "x"
        ));
        assert!(matches!(
            api.read_reply(Bytes::from_static(b"<html>")),
            Err(UpstreamError::Invalid(_))
        ));
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert!(matches!(
            api.classify(StatusCode::TOO_MANY_REQUESTS, &h, Bytes::new()),
            UpstreamError::Status { status, retry_after: Some(7), .. } if status == 429
        ));
        let creds = api.credentials(&Secret::new("sk-x")).unwrap();
        assert_eq!(creds[0].0, header::AUTHORIZATION);
        assert!(creds[0].1.is_sensitive());
        assert_eq!(api.path(Endpoint::Embeddings), "/embeddings");
    }

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

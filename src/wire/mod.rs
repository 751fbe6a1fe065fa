//! The seam of the APIs clients speak to the gateway ([`ClientApi`]): how a body becomes the
//! request the pipeline runs (an OpenAI-form request: chat completion, completion, embeddings),
//! how its reply goes back ([`ReplyFormat`]: as sent, or translated whole and streamed), and how
//! its errors read. OpenAI's is [`openai::OpenAi`]; Anthropic's Messages API is
//! `anthropic::Messages`. The routes that use them are one table (`http::ROUTES`).
//!
//! Adding a client API is one module that implements [`ClientApi`] (and, if its replies differ
//! from OpenAI's, [`ReplyFormat`]) plus its rows in `http::ROUTES`. [`json`] is the whole-body
//! check every API's body passes first. The APIs deployments speak are the other seam
//! (`upstream::UpstreamApi`).
//!
//! It must not do I/O nor decide admission, limits or routing.

use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;

use crate::admission::Priority;
use crate::error::ApiError;
use crate::upstream::{Endpoint, Transform};

pub(crate) mod json;
pub(crate) mod openai;

/// An API clients speak to the gateway (see the module doc).
pub(crate) trait ClientApi: Send + Sync {
    /// Reads a request's body (already within the size and time limits, its content type
    /// checked) into what the pipeline runs. `named`: the model the body names, once known
    /// (also when it is refused after that, for the log).
    fn parse(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        named: &mut Option<String>,
    ) -> Result<ClientRequest, ApiError>;

    /// `e` as this API's clients read errors (status, body; the headers are `e`'s).
    fn error(&self, e: ApiError) -> Response;

    /// Headers this API's clients read on every reply, beside `x-request-id` (`request_id`).
    fn stamp(&self, _headers: &mut HeaderMap, _request_id: &HeaderValue) {}
}

/// What the pipeline runs for a client's request: an OpenAI-form request to `endpoint`.
pub(crate) struct ClientRequest {
    pub endpoint: Endpoint,
    /// The configured model it names.
    pub model: String,
    pub stream: bool,
    /// The priority the body asks for (one of the gateway's words).
    pub priority: Option<Priority>,
    /// The body's `priority` is the gateway's: not forwarded.
    pub strip_priority: bool,
    /// The OpenAI-form body to forward.
    pub body: Bytes,
    /// Top-level fields a cloud deployment refuses (removed before sending there).
    pub cloud_drops: &'static [&'static str],
    /// How the reply goes back; `None`: as the backend sent it.
    pub reply: Option<Box<dyn ReplyFormat>>,
    /// Answered by the gateway itself once the key may use the model, no backend called.
    pub local: Option<Local>,
    /// The request as the client sent it, for a deployment whose API is the client's own.
    pub native: Option<Native>,
}

/// A request in the client's own API (a Messages request), sent as it came (its model
/// renamed) to a deployment that speaks that API, and its reply relayed as it came.
#[derive(Debug, Clone)]
pub(crate) struct Native {
    pub endpoint: Endpoint,
    pub body: Bytes,
    /// The body has the gateway's `priority`: removed before sending.
    pub strip_priority: bool,
}

/// A reply the gateway makes itself (Anthropic's `count_tokens`).
pub(crate) struct Local {
    pub body: Bytes,
    /// The input tokens it counted (an estimate), for the record.
    pub input_tokens: u64,
}

/// How an OpenAI-form reply goes back to a client that speaks another format.
pub(crate) trait ReplyFormat: Send + Sync {
    /// A whole reply (a chat completion), translated; `Err`: it cannot be (the backend's
    /// fault: a 502).
    fn whole(&self, body: &[u8]) -> Result<Vec<u8>, String>;

    /// The transform of a streamed reply (OpenAI chunks in, this format's events out).
    fn stream(self: Box<Self>) -> Box<dyn Transform>;

    /// The format of a reply that came in the client's own API (the request went as
    /// [`Native`]): nothing to translate, but the gateway's own failures still in the
    /// client's format. `None`: as it came.
    fn native(self: Box<Self>) -> Option<Box<dyn ReplyFormat>> {
        None
    }
}

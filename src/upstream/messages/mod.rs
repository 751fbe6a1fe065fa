//! Anthropic's Messages API as an upstream API (`api = "anthropic"`): a chat completion is sent
//! as `POST <url>/v1/messages` ([`request`]), its reply read back as a chat completion
//! ([`reply`]) or its stream as OpenAI chunks ([`stream`]); `x-api-key` and
//! `anthropic-version` carry the credentials; Anthropic's error envelope and its 529 are read
//! as the gateway's common errors ([`MessagesApi::classify`]).
//!
//! `url` is the API's root (`https://api.anthropic.com`); a `url` ending in `/v1` is taken as
//! the same root (the `/v1` is not doubled). Completions and embeddings have no Messages
//! endpoint: such a request is refused before it is sent ([`UpstreamError::Unsupported`]).
//! It must not do I/O, decide retries, or know the client's API (a Messages client's request
//! comes here in its OpenAI translation).

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use serde::Deserialize;

use super::api::{StreamReader, UpstreamApi};
use super::wire::{envelope, retry_after_secs};
use super::{Endpoint, UpstreamError, Usage};
use crate::config::Secret;

mod reply;
mod request;
mod stream;

/// `anthropic-version` when the config sets none.
pub(crate) const DEFAULT_VERSION: &str = "2023-06-01";

/// Anthropic's Messages API (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct MessagesApi {
    version: HeaderValue,
}

impl MessagesApi {
    /// The API with `anthropic-version: version` (default [`DEFAULT_VERSION`]).
    pub(crate) fn new(version: Option<&str>) -> Result<MessagesApi, String> {
        let version = HeaderValue::from_str(version.unwrap_or(DEFAULT_VERSION))
            .map_err(|_| "anthropic_version is not a valid header value".to_string())?;
        Ok(MessagesApi { version })
    }
}

impl UpstreamApi for MessagesApi {
    /// Only chat completions exist here; the others are refused by `request_body` before a
    /// URL is used (these paths are never called).
    fn path(&self, endpoint: Endpoint) -> &'static str {
        match endpoint {
            Endpoint::ChatCompletions => "/v1/messages",
            Endpoint::Completions => "/v1/complete",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Messages => "/v1/messages",
        }
    }

    /// A Messages client's request goes as it came (its model renamed), its reply back as
    /// it came: no translation either way.
    fn takes(&self, _endpoint: Endpoint) -> bool {
        true
    }

    fn read_native(&self, body: Bytes) -> Result<(Bytes, Option<Usage>), UpstreamError> {
        let usage = reply::native_usage(&body)?;
        Ok((body, Some(usage)))
    }

    fn stream_native(&self) -> Box<dyn StreamReader> {
        Box::new(stream::MessagesStream::native())
    }

    fn probe_path(&self) -> &'static str {
        "/v1/models"
    }

    fn base<'a>(&self, url: &'a str) -> &'a str {
        let url = url.trim_end_matches('/');
        url.strip_suffix("/v1").unwrap_or(url)
    }

    fn credentials(&self, key: &Secret) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let mut v = HeaderValue::from_str(key.expose())
            .map_err(|_| "api_key is not a valid header value".to_string())?;
        v.set_sensitive(true);
        Ok(vec![(HeaderName::from_static("x-api-key"), v)])
    }

    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        vec![(
            HeaderName::from_static("anthropic-version"),
            self.version.clone(),
        )]
    }

    fn request_body(&self, endpoint: Endpoint, body: Bytes) -> Result<Bytes, UpstreamError> {
        let what = match endpoint {
            Endpoint::Messages => return Ok(body),
            Endpoint::ChatCompletions => {
                return request::to_messages(&body).map(Bytes::from).map_err(|r| {
                    UpstreamError::Unsupported {
                        param: r.param,
                        message: r.message,
                    }
                })
            }
            Endpoint::Completions => "completions (`/v1/completions`)",
            Endpoint::Embeddings => "embeddings (`/v1/embeddings`)",
        };
        Err(UpstreamError::Unsupported {
            param: None,
            message: format!("it speaks Anthropic's Messages API, which has no {what}; use `/v1/chat/completions`"),
        })
    }

    fn read_reply(&self, body: Bytes) -> Result<(Bytes, Option<Usage>), UpstreamError> {
        reply::to_openai(&body)
    }

    fn stream(&self, request: &[u8]) -> Box<dyn StreamReader> {
        Box::new(stream::MessagesStream::new(include_usage(request)))
    }

    /// 401 and 403 refuse the deployment's key: [`UpstreamError::Credentials`] (a 502 for the
    /// client, never its own 401). Other 4xx (but 408 and 429) keep their status, their message
    /// in an OpenAI envelope; 429, 529 and 5xx keep theirs with `retry-after`.
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: Bytes) -> UpstreamError {
        let error = anthropic_error(&body);
        match status.as_u16() {
            401 | 403 => UpstreamError::Credentials {
                status,
                kind: error.and_then(|e| e.kind),
            },
            408 | 429 => UpstreamError::Status {
                status,
                retry_after: retry_after_secs(headers),
                body,
            },
            400..=499 => {
                let body = match error {
                    Some(e) => envelope(
                        e.message.as_deref().unwrap_or("the request was refused"),
                        "invalid_request_error",
                        None,
                        e.kind.as_deref().unwrap_or("invalid_request_error"),
                    ),
                    None => body,
                };
                UpstreamError::Status {
                    status,
                    retry_after: None,
                    body,
                }
            }
            _ => UpstreamError::Status {
                status,
                retry_after: retry_after_secs(headers),
                body,
            },
        }
    }
}

/// The `error` of Anthropic's envelope `{"type":"error","error":{"type","message"}}`.
fn anthropic_error(body: &[u8]) -> Option<reply::ErrorBody> {
    #[derive(Deserialize)]
    struct Envelope {
        error: reply::ErrorBody,
    }
    serde_json::from_slice::<Envelope>(body)
        .ok()
        .map(|e| e.error)
}

/// Whether the OpenAI-form `request` asks for the final usage chunk.
fn include_usage(request: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Request {
        #[serde(default)]
        stream_options: Option<StreamOptions>,
    }
    #[derive(Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: Option<bool>,
    }
    serde_json::from_slice::<Request>(request)
        .ok()
        .and_then(|r| r.stream_options?.include_usage)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;

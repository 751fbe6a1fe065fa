//! The layer around every route: takes the request in (phase `accept`: its id and arrival),
//! and stamps every response with `x-request-id`, `x-mofa-backend` (default `gateway`) and
//! `x-mofa-latency-ms` (whole milliseconds), turning any error that is not yet an envelope into
//! one. Under `/v1/messages` (Anthropic's clients) the same id also goes in `request-id`, the
//! header the Anthropic SDKs read. It refuses a request whose `Transfer-Encoding` has a coding other than `chunked`
//! (`gzip, chunked`): the HTTP layer removes only the chunking, and the gateway decodes no
//! other coding, so such a body would be read as something it is not. It must not look at
//! bodies.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::anthropic::WireFormat;
use crate::error::{ApiError, ErrorKind};
use crate::headers::{ANTHROPIC_REQUEST_ID, BACKEND, LATENCY_MS, REQUEST_ID};
use crate::proxy::accept::accept;

/// See the module doc (the router's middleware).
pub async fn stamp(req: Request, next: Next) -> Response {
    stamp_with(req, |req| next.run(req)).await
}

/// The layer around `run` (the handler of a route the server dispatches itself: see
/// [`super::App`]).
pub async fn stamp_with<F, Fut>(mut req: Request, run: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let accepted = accept(req.headers());
    let (rid, start) = (accepted.id.clone(), accepted.arrival);
    req.extensions_mut().insert(accepted);
    let wire = wire_of(req.uri());
    let mut resp = match unsupported_transfer_coding(req.headers()) {
        Some(coding) => ApiError::unsupported_transfer_encoding(&coding).into_response_for(wire),
        None => run(req).await,
    };
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json(resp.headers()) {
        resp = envelope_for(resp);
    }
    let h = resp.headers_mut();
    if wire.is_anthropic() {
        h.insert(ANTHROPIC_REQUEST_ID, rid.clone());
    }
    h.insert(REQUEST_ID, rid);
    h.entry(BACKEND)
        .or_insert(HeaderValue::from_static("gateway"));
    let ms = start.elapsed().as_millis() as u64;
    h.insert(LATENCY_MS, HeaderValue::from(ms));
    resp
}

/// The error format a URL's clients read: Anthropic's under `/v1/messages`, else OpenAI's.
pub fn wire_of(uri: &axum::http::Uri) -> WireFormat {
    if uri.path().starts_with("/v1/messages") {
        WireFormat::Anthropic
    } else {
        WireFormat::default()
    }
}

/// A reply from outside our handlers (a layer, an extractor), given the envelope of its kind.
fn envelope_for(resp: Response) -> Response {
    let status = resp.status();
    let reason = status.canonical_reason().unwrap_or("error");
    let body = ApiError::new(ErrorKind::of_foreign(status), reason).envelope();
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// The first transfer coding of the request other than `chunked`, if it has one.
fn unsupported_transfer_coding(h: &HeaderMap) -> Option<String> {
    h.get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .find(|c| !c.eq_ignore_ascii_case(b"chunked"))
        .map(|c| String::from_utf8_lossy(c).chars().take(40).collect())
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

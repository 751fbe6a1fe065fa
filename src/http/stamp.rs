//! The layer around every route: takes the request in (phase `accept`: its id and arrival),
//! and stamps every response with `x-request-id`, `x-mofa-backend` (default `gateway`) and
//! `x-mofa-latency-ms` (whole milliseconds), turning any error that is not yet an envelope into
//! one in the format of the API the path's clients speak (`http::client_of`), with that API's
//! own headers (Anthropic's `request-id`). It refuses a request whose `Transfer-Encoding` is
//! anything but one `chunked` (`gzip, chunked`): the only such check. It must not look at
//! bodies.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::{ApiError, ErrorKind};
use crate::headers::{BACKEND, LATENCY_MS, REQUEST_ID};
use crate::proxy::accept::accept;
use crate::wire::ClientApi;

/// See the module doc (the router's middleware).
pub(super) async fn stamp(req: Request, next: Next) -> Response {
    let client = super::client_of(req.uri().path());
    stamp_with(req, client, |req| next.run(req)).await
}

/// The layer around `run` (the handler of a route the server dispatches itself: see
/// [`super::App`]).
pub(super) async fn stamp_with<F, Fut>(
    mut req: Request,
    client: &'static dyn ClientApi,
    run: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let accepted = accept(req.headers());
    let (rid, start) = (accepted.id.clone(), accepted.arrival);
    req.extensions_mut().insert(accepted);
    let mut resp = match unsupported_transfer_coding(req.headers()) {
        Some(coding) => client.error(ApiError::unsupported_transfer_encoding(&coding)),
        None => run(req).await,
    };
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json(resp.headers()) {
        resp = envelope_for(resp);
    }
    let h = resp.headers_mut();
    client.stamp(h, &rid);
    h.insert(REQUEST_ID, rid);
    h.entry(BACKEND)
        .or_insert(HeaderValue::from_static("gateway"));
    let ms = start.elapsed().as_millis() as u64;
    h.insert(LATENCY_MS, HeaderValue::from(ms));
    resp
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

/// The request's transfer codings when they are anything but exactly one `chunked` (the HTTP
/// layer removes only the chunking, and the gateway decodes no other coding, so such a body
/// would be read as something it is not): the first other coding, or the whole list.
fn unsupported_transfer_coding(h: &HeaderMap) -> Option<String> {
    let codings: Vec<&[u8]> = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .collect();
    match codings.as_slice() {
        [] => None,
        [c] if c.eq_ignore_ascii_case(b"chunked") => None,
        _ => {
            let other = codings
                .iter()
                .find(|c| !c.eq_ignore_ascii_case(b"chunked"))
                .map_or_else(|| codings.join(&b", "[..]), |c| c.to_vec());
            Some(String::from_utf8_lossy(&other).chars().take(40).collect())
        }
    }
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

//! Phase 1, `accept`: what the gateway decides the moment a request arrives, before reading
//! it: its id (the client's `x-request-id` if it is sane, else a new one), its arrival time,
//! and the limits its body must keep (size, read time). Runs for every route. It must not read
//! the body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};

use crate::headers::REQUEST_ID;

/// A request the gateway took in.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    /// `x-request-id` of the reply, and `x-mofa-request-id` upstream.
    pub id: HeaderValue,
    pub arrival: Instant,
}

/// The limits every request body must keep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
}

/// Takes a request in: see the module doc.
pub(crate) fn accept(h: &HeaderMap) -> Accepted {
    let id = h
        .get(REQUEST_ID)
        .filter(|v| valid_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id);
    Accepted {
        id,
        arrival: Instant::now(),
    }
}

/// A client's id is echoed if it is 1..=128 visible ASCII characters.
fn valid_request_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// `req-` + 8 hex digits of a per-process prefix + 12 of a counter, without `format!`.
fn new_request_id() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = *PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        t ^ std::process::id().rotate_left(16)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"req-00000000000000000000";
    for i in 0..8 {
        id[4 + i] = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    for i in 0..12 {
        id[12 + i] = HEX[((n >> (44 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("req-unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(a.to_str().unwrap().starts_with("req-"));
        assert!(a.as_bytes()[4..].iter().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_sane_client_id_is_kept() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("my-id-1"));
        assert_eq!(accept(&h).id, "my-id-1");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(accept(&h).id.to_str().unwrap().starts_with("req-"));
    }
}

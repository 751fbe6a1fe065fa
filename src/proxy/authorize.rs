//! Phase 3, `authorize`: who is asking, and what they may ask for. Empty for now: every
//! request is anonymous and may use every model (the API-key work fills this phase: keys by
//! hash, allow-lists, priority ceilings). It must not count anything (that is `limit`).

use axum::http::HeaderMap;

use super::parse::Parsed;
use crate::error::ApiError;

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No keys are configured: anyone who reaches the port.
    Anonymous,
}

/// Decides who sends `req` and whether they may.
pub fn authorize(_headers: &HeaderMap, _req: &Parsed) -> Result<Principal, ApiError> {
    Ok(Principal::Anonymous)
}

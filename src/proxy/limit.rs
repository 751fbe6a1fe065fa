//! Phase 4, `limit`: the per-principal rate limits (requests, tokens, in flight). Empty for
//! now: nothing is limited (the rate-limit work fills this phase). It runs before admission,
//! so that a request over its limit never takes a queue place or a slot.

use super::authorize::Principal;
use super::parse::Parsed;
use crate::error::ApiError;

/// What a request holds of its principal's limits until it ends (nothing yet).
#[derive(Debug)]
pub struct Allowance;

/// Charges `req` to `who`'s limits, or refuses it.
pub fn limit(_who: &Principal, _req: &Parsed) -> Result<Allowance, ApiError> {
    Ok(Allowance)
}

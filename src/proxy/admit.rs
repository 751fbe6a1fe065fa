//! Phase 5, `admit`: a place for the request on one of its model's deployments, now or after a
//! wait in the model's priority queue, or a rejection (503 with `Retry-After`). The deployment
//! is chosen by the model's routing policy inside the same decision (`routing`), so that a
//! slot and a choice are never out of step. The decisions are the orchestrator's and the core's.

use std::sync::Arc;
use std::time::Instant;

use super::parse::Parsed;
use crate::error::ApiError;
use crate::orchestrator::{ModelRt, Permit};
use crate::prefix::Affinity;

/// What `req` brings to `model`'s affinity policy (its prompt's block hashes, its session),
/// computed once per request, before any lock is taken; nothing under other policies.
pub(crate) fn affinity(model: &ModelRt, req: &Parsed) -> Affinity {
    let policy = model.policy();
    if !policy.has_affinity() {
        return Affinity::None;
    }
    Affinity::of(policy, &req.body, req.session.as_deref())
}

/// Admits `req` to `model`, avoiding the deployments in `exclude` (a bit each: a retry runs now
/// on another deployment or not at all). Returns the permit and the time it waited.
pub(crate) async fn admit(
    model: &Arc<ModelRt>,
    req: &Parsed,
    wants: &Affinity,
    exclude: u64,
) -> Result<(Permit, std::time::Duration), ApiError> {
    let start = Instant::now();
    match model
        .admit(req.priority(), req.max_wait, exclude, wants.clone())
        .await
    {
        Ok(p) => Ok((p, start.elapsed())),
        Err(r) => Err(ApiError::rejected(r, &model.name)),
    }
}

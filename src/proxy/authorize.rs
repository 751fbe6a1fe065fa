//! Phase 3, `authorize`: who is asking, and what they may ask for. With `[auth] mode = "keys"`
//! a request names its key (`Authorization: Bearer <key>`, or `x-api-key`); the gateway holds
//! only SHA-256 hashes of keys, looks the key's hash up and compares it in constant time, and
//! answers 401 (`invalid_api_key`, no hint which keys exist) or 403 (`model_not_allowed`). The
//! key's priority ceiling and default are applied to the request here, before the queue.
//! `/admin/*` needs an admin key. It must never log, echo or keep a key's secret, and must not
//! count anything (that is `limit`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::context::Ctx;
use super::parse::Parsed;
use crate::admission::Priority;
use crate::config::{AuthMode, Config};
use crate::error::ApiError;
use crate::headers::PRIORITY;

/// Who a request comes from.
#[derive(Debug, Clone)]
pub(crate) enum Principal {
    /// `auth.mode = "none"`: anyone who reaches the port.
    Anonymous,
    /// A client key, by its configured entry.
    Key(Arc<KeyEntry>),
}

/// A configured client key (its name, never its secret).
#[derive(Debug)]
pub(crate) struct KeyEntry {
    /// The principal's index for the limits (stable for its name across reloads).
    pub index: usize,
    pub name: Arc<str>,
    digest: [u8; 32],
    /// The models it may use; `None`: all.
    models: Option<HashSet<String>>,
    max_priority: Priority,
    default_priority: Priority,
}

impl Principal {
    /// The index of the principal's limits (0: anonymous).
    pub(crate) fn index(&self) -> usize {
        match self {
            Principal::Anonymous => 0,
            Principal::Key(k) => k.index,
        }
    }

    /// The key's name (logs, headers), if it is a key.
    pub(crate) fn name(&self) -> Option<&Arc<str>> {
        match self {
            Principal::Anonymous => None,
            Principal::Key(k) => Some(&k.name),
        }
    }

    /// Whether the principal may use `model`.
    pub(crate) fn may_use(&self, model: &str) -> bool {
        match self {
            Principal::Anonymous => true,
            Principal::Key(k) => k.models.as_ref().is_none_or(|m| m.contains(model)),
        }
    }
}

/// The keys the gateway knows, by the SHA-256 of their secret.
pub(crate) struct Auth {
    mode: AuthMode,
    keys: HashMap<[u8; 32], Arc<KeyEntry>>,
    admin: Vec<[u8; 32]>,
}

/// The SHA-256 of a key's secret.
pub(crate) fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Auth {
    /// The keys of `cfg`; `index`: each key's principal index (the limits', by name).
    pub(crate) fn build(cfg: &Config, index: &dyn Fn(&str) -> usize) -> Auth {
        let keys = cfg
            .auth
            .keys
            .iter()
            .map(|k| {
                let e = KeyEntry {
                    index: index(&k.name),
                    name: k.name.as_str().into(),
                    digest: *k.hash.digest(),
                    models: k.models.as_ref().map(|m| m.iter().cloned().collect()),
                    max_priority: k.max_priority,
                    default_priority: k.default_priority,
                };
                (e.digest, Arc::new(e))
            })
            .collect();
        Auth {
            mode: cfg.auth.mode,
            keys,
            admin: cfg.auth.admin_keys.iter().map(|h| *h.digest()).collect(),
        }
    }

    pub(crate) fn keys_required(&self) -> bool {
        self.mode == AuthMode::Keys
    }

    /// Who sends a request with these headers: 401 when keys are required and it names none
    /// that is known.
    pub(crate) fn authenticate(&self, h: &HeaderMap) -> Result<Principal, ApiError> {
        if !self.keys_required() {
            return Ok(Principal::Anonymous);
        }
        let Some(secret) = presented_key(h)? else {
            return Err(ApiError::invalid_api_key(true));
        };
        // The map is keyed by the digest, which an attacker cannot steer towards a stored one;
        // the final comparison is constant-time all the same.
        let d = digest(secret);
        match self.keys.get(&d) {
            Some(e) if bool::from(e.digest.ct_eq(&d)) => Ok(Principal::Key(e.clone())),
            _ => Err(ApiError::invalid_api_key(false)),
        }
    }

    /// Whether these headers carry an admin key (always true without `mode = "keys"`): 401
    /// without a known key, 403 with a client key.
    pub(crate) fn admin(&self, h: &HeaderMap) -> Result<(), ApiError> {
        if !self.keys_required() {
            return Ok(());
        }
        let Some(secret) = presented_key(h)? else {
            return Err(ApiError::invalid_api_key(true));
        };
        let d = digest(secret);
        let is_admin = self
            .admin
            .iter()
            .fold(subtle::Choice::from(0), |acc, a| acc | a.ct_eq(&d));
        if bool::from(is_admin) {
            Ok(())
        } else if self.keys.contains_key(&d) {
            Err(ApiError::admin_key_required())
        } else {
            Err(ApiError::invalid_api_key(false))
        }
    }
}

/// The key a request presents: `Authorization: Bearer <key>` and/or `x-api-key` (`None`:
/// none, or an `Authorization` that is not a bearer key). Two of either header, or one of each
/// with different keys, are ambiguous: 400, whatever their order.
fn presented_key(h: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let only = |name| {
        let mut all = h.get_all(name).iter();
        let first = all.next();
        match all.next() {
            Some(_) => Err(ApiError::ambiguous_credentials()),
            None => Ok(first),
        }
    };
    let bearer = only(header::AUTHORIZATION)?.map(|v| {
        let v = v.to_str().ok()?.trim();
        let (scheme, rest) = v.split_once(' ')?;
        let rest = rest.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty()).then_some(rest)
    });
    let api_key = only(header::HeaderName::from_static("x-api-key"))?
        .map(|v| v.to_str().ok().map(str::trim).filter(|s| !s.is_empty()));
    match (bearer, api_key) {
        (Some(b), Some(k)) if b == k => Ok(b),
        (Some(_), Some(_)) => Err(ApiError::ambiguous_credentials()),
        (Some(b), None) => Ok(b),
        (None, Some(k)) => Ok(k),
        (None, None) => Ok(None),
    }
}

/// Decides whether `who` may send `req` (403 `model_not_allowed`), and applies the key's
/// default priority and ceiling to it; the reply says the priority it ran at (`headers`).
pub(crate) fn authorize(
    who: &Principal,
    req: &mut Parsed,
    ctx: &mut Ctx,
    headers: &mut HeaderMap,
) -> Result<(), ApiError> {
    let Principal::Key(k) = who else {
        return Ok(());
    };
    if !who.may_use(&req.model) {
        return Err(ApiError::model_not_allowed(&req.model));
    }
    req.default_priority = Some(k.default_priority);
    req.max_priority = Some(k.max_priority);
    let p = req.priority();
    ctx.set_priority(p);
    headers.insert(PRIORITY, HeaderValue::from_static(p.as_str()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> (Auth, &'static str) {
        let secret = "sk-mofa-test-secret";
        let hex: String = digest(secret).iter().map(|b| format!("{b:02x}")).collect();
        let toml = format!(
            "[auth]\nmode = \"keys\"\n[[auth.keys]]\nname = \"a\"\nhash = \"sha256:{hex}\"\n\
             [[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"sim\"\n"
        );
        let cfg = Config::parse(&toml, &|_| None).unwrap();
        (Auth::build(&cfg, &|_| 1), secret)
    }

    #[test]
    fn keys_by_bearer_or_x_api_key() {
        let (a, secret) = auth();
        let mut h = HeaderMap::new();
        assert_eq!(a.authenticate(&h).unwrap_err().status(), 401);
        h.insert("x-api-key", HeaderValue::from_static("sk-mofa-test-secret"));
        assert_eq!(a.authenticate(&h).unwrap().index(), 1);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {secret}x")).unwrap(),
        );
        // Two keys that disagree: which one is meant cannot be known.
        let e = a.authenticate(&h).unwrap_err();
        assert_eq!(e.code(), "ambiguous_credentials");
        assert!(!e.message.contains(secret));
        h.remove("x-api-key");
        let e = a.authenticate(&h).unwrap_err();
        assert_eq!(e.code(), "invalid_api_key");
        assert!(!e.message.contains(secret));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("bearer {secret}")).unwrap(),
        );
        assert_eq!(a.authenticate(&h).unwrap().name().unwrap().as_ref(), "a");
        assert_eq!(a.admin(&h).unwrap_err().status(), 403);
    }
}

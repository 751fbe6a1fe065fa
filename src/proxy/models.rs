//! The configured models as clients list them (`GET /v1/models`, `GET /v1/models/{id}`):
//! OpenAI's model objects, filtered by what the caller's key may use. The list for a caller
//! that may use every model is rendered once. It must not authenticate (the pipeline does).

use bytes::Bytes;
use serde_json::{json, Value};

use super::authorize::Principal;
use crate::config::Config;
use crate::error::ApiError;

/// The configured models, listed.
pub(super) struct Listing {
    /// The names, in the config's order.
    names: Vec<String>,
    /// The list body for a caller that may use every model.
    all: Bytes,
    /// `created` of every model object: when the gateway started (Unix seconds).
    created: u64,
}

impl Listing {
    /// The models of `cfg`, each `created` at `created` (when the gateway started).
    pub(super) fn new(cfg: &Config, created: u64) -> Listing {
        let names: Vec<String> = cfg.models.iter().map(|m| m.name.clone()).collect();
        let all = list_body(names.iter().map(|n| object(n, created)));
        Listing {
            names,
            all,
            created,
        }
    }

    /// The list `who` may use.
    pub(super) fn list(&self, who: &Principal) -> Bytes {
        if matches!(who, Principal::Anonymous) {
            return self.all.clone();
        }
        list_body(
            self.names
                .iter()
                .filter(|m| who.may_use(m))
                .map(|m| object(m, self.created)),
        )
    }

    /// Model `id`, if it is configured and `who` may use it (404 otherwise, as OpenAI says).
    pub(super) fn get(&self, who: &Principal, id: &str) -> Result<Bytes, ApiError> {
        match self.names.iter().find(|n| *n == id) {
            Some(n) if who.may_use(n) => Ok(Bytes::from(
                serde_json::to_vec(&object(n, self.created)).unwrap_or_default(),
            )),
            _ => Err(ApiError::model_not_found(id)),
        }
    }
}

fn object(name: &str, created: u64) -> Value {
    json!({"id": name, "object": "model", "created": created, "owned_by": "mofa-gateway"})
}

fn list_body(data: impl Iterator<Item = Value>) -> Bytes {
    let data: Vec<Value> = data.collect();
    Bytes::from(serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default())
}

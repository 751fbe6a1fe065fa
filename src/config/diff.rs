//! What changed between two valid configs: entity by entity (models and their deployments,
//! keys, by name) and section by section, and which changes need a restart. Pure: it compares,
//! it applies nothing (that is the pipeline's reload) and never shows a secret (only names).
//!
//! A deployment's identity within its model is its `x-mofa-backend` label and its place among
//! the model's deployments with that label (`local(m@q8)`, `local(m@q8)#2`, ...): a deployment
//! whose label stays is the same deployment, changed or not; one whose kind or variant changes
//! is another deployment.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Config, DeploymentConfig};

/// The keys that only a restart changes: the listening socket and its threads, the connection
/// settings every connection was made with, the limits' store, the log's setup, and what every
/// deployment's client and breaker were built with.
const RESTART_ONLY: &[&str] = &[
    "server.listen",
    "server.worker_threads",
    "server.header_read_timeout_ms",
    "server.max_header_bytes",
    "server.shutdown_grace_s",
    "server.max_response_bytes",
    "admission.memory_capacity_mb",
    "admission.defer_threshold",
    "admission.reject_threshold",
    "resilience.breaker_failures",
    "resilience.breaker_error_rate",
    "resilience.breaker_window",
    "resilience.breaker_open_ms",
    "limits.store",
    "limits.redis_url",
    "limits.redis_failure",
    "limits.redis_timeout_ms",
    "log",
    "usage",
];

/// The difference between the running config and a new one.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Diff {
    /// Keys whose change needs a restart (a reload that has any is refused whole).
    pub restart_needed: Vec<String>,
    pub models_added: Vec<String>,
    pub models_removed: Vec<String>,
    /// Models whose own settings or deployments changed, with what changed in them.
    pub models_changed: BTreeMap<String, ModelChange>,
    pub keys_added: Vec<String>,
    pub keys_removed: Vec<String>,
    pub keys_changed: Vec<String>,
    /// Live keys outside models and keys that changed (`auth.mode`, `admission.max_queue`, ...).
    pub settings_changed: Vec<String>,
}

/// What changed in one model.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ModelChange {
    /// Its own settings (`policy`, `rpm`, `tpm`).
    pub settings: bool,
    pub deployments_added: Vec<String>,
    pub deployments_removed: Vec<String>,
    pub deployments_changed: Vec<String>,
}

impl Diff {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }

    /// The reload's one log line: what changed, by name.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut list = |what: &str, names: &[String]| {
            if !names.is_empty() {
                parts.push(format!("{what} {}", names.join(", ")));
            }
        };
        list("models added:", &self.models_added);
        list("models removed:", &self.models_removed);
        let changed: Vec<String> = self.models_changed.keys().cloned().collect();
        list("models changed:", &changed);
        list("keys added:", &self.keys_added);
        list("keys removed:", &self.keys_removed);
        list("keys changed:", &self.keys_changed);
        list("settings changed:", &self.settings_changed);
        if parts.is_empty() {
            "nothing changed".into()
        } else {
            parts.join("; ")
        }
    }
}

/// Each deployment of a model by its identity (see the module doc), in config order.
pub fn deployment_ids(model: &str, deployments: &[DeploymentConfig]) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    deployments
        .iter()
        .map(|d| {
            let label = d.label(model);
            let n = seen.entry(label.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                label
            } else {
                format!("{label}#{n}")
            }
        })
        .collect()
}

/// What changed from `old` to `new` (both valid).
pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut d = Diff::default();
    let (o, n) = (
        serde_json::json!(old.sections()),
        serde_json::json!(new.sections()),
    );
    for (section, ov) in o.as_object().into_iter().flatten() {
        let nv = &n[section];
        if ov == nv {
            continue;
        }
        let keys: Vec<&String> = match (ov.as_object(), nv.as_object()) {
            (Some(a), Some(b)) => a.keys().chain(b.keys()).collect(),
            _ => Vec::new(),
        };
        let mut keys: Vec<&String> = keys.into_iter().filter(|k| ov[*k] != nv[*k]).collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            keys.push(section);
        }
        for k in keys {
            let path = if k == section {
                section.clone()
            } else {
                format!("{section}.{k}")
            };
            if RESTART_ONLY.contains(&path.as_str()) || RESTART_ONLY.contains(&section.as_str()) {
                d.restart_needed.push(path);
            } else {
                d.settings_changed.push(path);
            }
        }
    }
    d.settings_changed.sort();
    d.settings_changed.dedup();

    let (added, removed, changed) = by_name(&old.models, &new.models, |m| &m.name);
    d.models_added = added;
    d.models_removed = removed;
    d.models_changed = changed
        .into_iter()
        .map(|(o, m)| (m.name.clone(), model_change(o, m)))
        .collect();
    let (added, removed, changed) = by_name(&old.auth.keys, &new.auth.keys, |k| &k.name);
    d.keys_added = added;
    d.keys_removed = removed;
    d.keys_changed = changed.into_iter().map(|(_, k)| k.name.clone()).collect();
    d
}

/// Entities matched by `name` (compared whole; a secret compares by its value): the names
/// added (in `new`'s order), the names removed (in `old`'s), and the changed pairs (old, new).
#[allow(clippy::type_complexity)]
fn by_name<'a, T: PartialEq>(
    old: &'a [T],
    new: &'a [T],
    name: impl Fn(&T) -> &str,
) -> (Vec<String>, Vec<String>, Vec<(&'a T, &'a T)>) {
    let (mut added, mut changed) = (Vec::new(), Vec::new());
    for n in new {
        match old.iter().find(|o| name(o) == name(n)) {
            None => added.push(name(n).to_owned()),
            Some(o) if o == n => {}
            Some(o) => changed.push((o, n)),
        }
    }
    let removed = old
        .iter()
        .filter(|o| !new.iter().any(|n| name(n) == name(o)))
        .map(|o| name(o).to_owned())
        .collect();
    (added, removed, changed)
}

fn model_change(old: &super::ModelConfig, new: &super::ModelConfig) -> ModelChange {
    fn with_ids(m: &super::ModelConfig) -> Vec<(String, &DeploymentConfig)> {
        deployment_ids(&m.name, &m.deployments)
            .into_iter()
            .zip(&m.deployments)
            .collect()
    }
    let (o, n) = (with_ids(old), with_ids(new));
    let (added, removed, changed) = by_name(&o, &n, |(id, _)| id);
    ModelChange {
        settings: (old.policy, old.rpm, old.tpm) != (new.policy, new.rpm, new.tpm),
        deployments_added: added,
        deployments_removed: removed,
        deployments_changed: changed.into_iter().map(|(_, (id, _))| id.clone()).collect(),
    }
}

impl Config {
    /// The sections other than `models` and the client keys, for [`diff`].
    fn sections(&self) -> serde_json::Value {
        let mut auth = serde_json::json!(&self.auth);
        if let Some(a) = auth.as_object_mut() {
            a.remove("keys");
        }
        serde_json::json!({
            "server": &self.server,
            "admission": &self.admission,
            "routing": &self.routing,
            "resilience": &self.resilience,
            "auth": auth,
            "limits": &self.limits,
            "log": &self.log,
            "usage": &self.usage,
        })
    }

    /// A short hash of the whole resolved config (secrets included, so that a changed key is
    /// a changed config; the hash shows none of them).
    pub fn hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let text = format!("{self:?}|{}", self.secrets_fingerprint());
        let h = Sha256::digest(text.as_bytes());
        h.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    fn secrets_fingerprint(&self) -> String {
        self.models
            .iter()
            .flat_map(|m| &m.deployments)
            .map(|d| d.api_key.as_ref().map_or("", |s| s.expose()))
            .collect::<Vec<_>>()
            .join("\u{0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, &|_| Some("secret".into())).unwrap()
    }

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
[auth]
mode = "keys"
[[auth.keys]]
name = "alice"
hash = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
rpm = 60
[[auth.keys]]
name = "bob"
hash = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
[[models]]
name = "a"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:9/v1"
max_concurrency = 4
[[models.deployments]]
kind = "cloud"
provider = "openai"
url = "http://127.0.0.1:10/v1"
api_key = "${KEY}"
[[models]]
name = "b"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:11/v1"
"#;

    #[test]
    fn the_same_file_is_no_change() {
        let d = diff(&parse(BASE), &parse(BASE));
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.describe(), "nothing changed");
        assert_eq!(parse(BASE).hash(), parse(BASE).hash());
    }

    #[test]
    fn entities_are_compared_by_name() {
        let new = BASE
            .replace("max_concurrency = 4", "max_concurrency = 1")
            .replace("rpm = 60", "rpm = 10")
            .replace("name = \"bob\"\nhash = \"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\n", "name = \"carol\"\nhash = \"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc\"\n")
            .replace("name = \"b\"", "name = \"c\"");
        let d = diff(&parse(BASE), &parse(&new));
        assert_eq!(d.models_added, ["c"]);
        assert_eq!(d.models_removed, ["b"]);
        assert_eq!(d.models_changed.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(d.models_changed["a"].deployments_changed, ["local(a)"]);
        assert!(d.models_changed["a"].deployments_added.is_empty());
        assert_eq!(d.keys_added, ["carol"]);
        assert_eq!(d.keys_removed, ["bob"]);
        assert_eq!(d.keys_changed, ["alice"]);
        assert!(
            d.restart_needed.is_empty() && d.settings_changed.is_empty(),
            "{d:?}"
        );
        let line = d.describe();
        assert!(
            line.contains("models changed: a") && line.contains("keys added: carol"),
            "{line}"
        );
        assert!(!line.contains("sha256"), "{line}");
    }

    #[test]
    fn a_deployment_of_another_kind_is_another_deployment() {
        let new = BASE.replace(
            "kind = \"local\"\nurl = \"http://127.0.0.1:9/v1\"",
            "kind = \"local\"\nvariant = \"q4\"\nurl = \"http://127.0.0.1:9/v1\"",
        );
        let d = diff(&parse(BASE), &parse(&new));
        let c = &d.models_changed["a"];
        assert_eq!(c.deployments_added, ["local(a@q4)"]);
        assert_eq!(c.deployments_removed, ["local(a)"]);
    }

    #[test]
    fn a_changed_provider_key_is_a_change_that_names_no_secret() {
        let old = Config::parse(BASE, &|_| Some("one".into())).unwrap();
        let new = Config::parse(BASE, &|_| Some("two".into())).unwrap();
        let d = diff(&old, &new);
        assert_eq!(d.models_changed["a"].deployments_changed, ["cloud(openai)"]);
        assert_ne!(old.hash(), new.hash());
        assert!(!format!("{d:?}").contains("two"));
    }

    #[test]
    fn restart_only_keys_are_named() {
        let new = BASE.replace("127.0.0.1:8080", "127.0.0.1:8081")
            + "[limits]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1:1\"\n";
        let d = diff(&parse(BASE), &parse(&new));
        assert_eq!(
            d.restart_needed,
            ["server.listen", "limits.redis_url", "limits.store"]
        );
        let live = BASE.replace("[server]\n", "[server]\nmax_body_bytes = 1000\n")
            + "[resilience]\nmax_attempts = 1\n";
        let d = diff(&parse(BASE), &parse(&live));
        assert!(d.restart_needed.is_empty(), "{d:?}");
        assert_eq!(
            d.settings_changed,
            ["resilience.max_attempts", "server.max_body_bytes"]
        );
    }

    #[test]
    fn identities_count_repeated_labels() {
        let c = parse(BASE);
        let mut deps = c.models[0].deployments.clone();
        deps.push(deps[0].clone());
        assert_eq!(
            deployment_ids("a", &deps),
            ["local(a)", "cloud(openai)", "local(a)#2"]
        );
    }
}

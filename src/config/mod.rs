//! Configuration: the TOML schema, `${ENV}` interpolation and validation at start-up.
//!
//! Owns turning a file (or the embedded default) into a [`Config`] that is known to be valid;
//! every error names the key (or the line) at fault and how to fix it, and `check-config`'s
//! rendering with secrets masked. It must not start anything: the server builds its runtime
//! state from the validated config. The schema is documented, key by key, in
//! `docs/configuration.md`.
//!
//! Parts: `sections` (the schema of the gateway's sections), `auth` (`[auth]` and its keys
//! file), `interpolate` (`${ENV}`), `validate` (the checks), `mask` (what `check-config`
//! shows), `error` ([`ConfigError`]).

mod auth;
mod diff;
mod error;
mod interpolate;
mod mask;
mod sections;
mod validate;

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use auth::{AuthConfig, AuthMode, Budget, KeyConfig, KeyHash, Period};
pub use diff::{deployment_ids, diff, Diff, ModelChange};
pub use error::ConfigError;
pub use sections::*;

/// The configuration used when no file is given: one simulated model, `mofa-sim`.
pub const DEFAULT_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:8080"

[[models]]
name = "mofa-sim"

[[models.deployments]]
kind = "sim"
ttft_ms = 20
tokens_per_sec = 200
"#;

/// A secret (an API key). Never printed: `Debug` and `Serialize` show `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: only for building an upstream request header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub resilience: ResilienceConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Paths of the values that came from `${ENV}`, for masking.
    #[serde(skip)]
    from_env: BTreeSet<String>,
}

impl Config {
    /// Parses, interpolates `${ENV}` (with `env`), and validates a TOML document. A
    /// `keys_file` is read relative to the working directory (see [`Config::parse_in`]).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::parse_in(text, env, Path::new("."))
    }

    /// [`Config::parse`], with `auth.keys_file` read relative to `dir`; its keys are appended
    /// to `auth.keys`.
    pub fn parse_in(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        dir: &Path,
    ) -> Result<Config, ConfigError> {
        let mut value = parse_toml(text)?;
        let mut from_env = BTreeSet::new();
        interpolate::interpolate(&mut value, env, &mut |path| {
            from_env.insert(path.to_string());
        })?;
        let mut cfg: Config = deserialize(value)?;
        cfg.from_env = from_env;
        let file_keys = match &cfg.auth.keys_file {
            Some(file) => Some(auth::read_keys_file(file, dir, env)?),
            None => None,
        };
        validate::config(&cfg, file_keys.as_ref())?;
        if let Some(f) = file_keys {
            cfg.auth.keys.extend(f.keys);
        }
        Ok(cfg)
    }

    /// Reads `path`, interpolating from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let in_file = |e: ConfigError| ConfigError::InFile {
            file: path.display().to_string(),
            source: Box::new(e),
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Config::parse_in(&text, &|k| std::env::var(k).ok(), dir).map_err(in_file)
    }

    /// The embedded default configuration.
    pub fn default_config() -> Config {
        Config::parse(DEFAULT_CONFIG, &|_| None).expect("the embedded default config is valid")
    }

    /// The resolved configuration as TOML, secrets shown as `***` (see `mask`).
    pub fn to_masked_toml(&self) -> String {
        let shown = mask::masked(self, &self.from_env);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl DeploymentConfig {
    /// The `x-mofa-backend` value for this deployment of `model`.
    pub fn label(&self, model: &str) -> String {
        let base = match self.kind {
            DeploymentKind::Local => format!("local({model}"),
            DeploymentKind::Cloud => {
                format!("cloud({}", self.provider.as_deref().unwrap_or("cloud"))
            }
            DeploymentKind::Sim => format!("sim({model}"),
        };
        match &self.variant {
            Some(v) => format!("{base}@{v})"),
            None => format!("{base})"),
        }
    }
}

/// TOML text to a value; a syntax error is located by line and column.
fn parse_toml(text: &str) -> Result<toml::Value, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::syntax(text, &e))
}

/// A value to a schema type; an error names the key's path.
fn deserialize<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::invalid(path, e.into_inner().message().trim())
    })
}

#[cfg(test)]
mod tests;

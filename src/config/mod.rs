//! Configuration: the TOML schema, `${ENV}` interpolation and validation at start-up.
//!
//! Owns turning a file (or the embedded default) into a [`Config`] that is known to be valid;
//! every error names the key at fault and how to fix it. It must not start anything: the
//! server builds its runtime state from the validated config.
//! The schema is documented, key by key, in `docs/configuration.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::routing::Policy;

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

/// A start-up configuration error: says which key is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(key: impl fmt::Display, msg: impl fmt::Display) -> Result<T, ConfigError> {
    Err(ConfigError(format!("{key}: {msg}")))
}

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

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResilienceConfig {
    /// Tries per request, over different deployments, before the first byte (1: no retry).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Time for all tries together, from the first; no new try starts after it.
    #[serde(default = "default_retry_budget_ms")]
    pub retry_budget_ms: u64,
    /// Consecutive failures that open a deployment's breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// Error rate over the recent window that opens it.
    #[serde(default = "default_breaker_error_rate")]
    pub breaker_error_rate: f64,
    /// Outcomes in that window.
    #[serde(default = "default_breaker_window")]
    pub breaker_window: usize,
    /// How long an open breaker stays open before one probe is let through.
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            max_attempts: default_max_attempts(),
            retry_budget_ms: default_retry_budget_ms(),
            breaker_failures: default_breaker_failures(),
            breaker_error_rate: default_breaker_error_rate(),
            breaker_window: default_breaker_window(),
            breaker_open_ms: default_breaker_open_ms(),
        }
    }
}

fn default_max_attempts() -> u32 {
    3
}
fn default_retry_budget_ms() -> u64 {
    30_000
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_error_rate() -> f64 {
    0.5
}
fn default_breaker_window() -> usize {
    20
}
fn default_breaker_open_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Waiters per model; beyond it the least important newest one is shed (503 `queue_full`).
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Longest a request waits for a slot (503 `queue_timeout` after); `x-mofa-max-wait-ms` may
    /// lower it per request. 0: never wait.
    #[serde(default = "default_max_queue_wait_ms")]
    pub max_queue_wait_ms: u64,
    /// Memory budget of local models that declare `memory_mb`; 0 turns memory admission off.
    #[serde(default)]
    pub memory_capacity_mb: u64,
    /// Share of the budget above which `low`/`normal` requests that would load a model wait.
    #[serde(default = "default_defer_threshold")]
    pub defer_threshold: f64,
    /// Share of the budget above which loading is refused (`critical` may evict idle models first).
    #[serde(default = "default_reject_threshold")]
    pub reject_threshold: f64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_queue: default_max_queue(),
            max_queue_wait_ms: default_max_queue_wait_ms(),
            memory_capacity_mb: 0,
            defer_threshold: default_defer_threshold(),
            reject_threshold: default_reject_threshold(),
        }
    }
}

fn default_max_queue() -> usize {
    256
}
fn default_max_queue_wait_ms() -> u64 {
    30_000
}
fn default_defer_threshold() -> f64 {
    0.75
}
fn default_reject_threshold() -> f64 {
    0.90
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Policy of models that do not set their own.
    #[serde(default)]
    pub policy: Policy,
    /// `cost` policy: the longest expected wait worth taking for a cheaper deployment.
    #[serde(default = "default_cost_max_queue_wait_ms")]
    pub cost_max_queue_wait_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: Policy::default(),
            cost_max_queue_wait_ms: default_cost_max_queue_wait_ms(),
        }
    }
}

fn default_cost_max_queue_wait_ms() -> u64 {
    2_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest non-streaming upstream reply the gateway will hold; larger ones get 502.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// A client must send its request head within this time.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// ... and its body within this time (408 after).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Largest request head (request line and headers).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// On SIGTERM/SIGINT: how long in-flight requests and streams may take to finish.
    #[serde(default = "default_shutdown_grace_s")]
    pub shutdown_grace_s: u64,
    /// Runtime worker threads; 0: one per CPU core.
    #[serde(default)]
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            max_body_bytes: default_max_body_bytes(),
            max_response_bytes: default_max_response_bytes(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            max_header_bytes: default_max_header_bytes(),
            shutdown_grace_s: default_shutdown_grace_s(),
            worker_threads: 0,
        }
    }
}

fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    30_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_shutdown_grace_s() -> u64 {
    30
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body_bytes() -> usize {
    20 * 1024 * 1024
}
fn default_max_response_bytes() -> usize {
    64 * 1024 * 1024
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    /// Overrides `routing.policy` for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentKind {
    /// A model server on this machine (llama-server, vLLM, Ollama, ...).
    Local,
    /// A cloud provider's OpenAI-compatible API.
    Cloud,
    /// The built-in simulator, run inside the gateway process.
    Sim,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub kind: DeploymentKind,
    /// Base URL of the OpenAI-compatible API, ending in `/v1` (not for `sim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `cloud` only: the provider's name, shown as `cloud(<provider>)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// A label for this variant (e.g. `q8`), shown as `local(<model>@<variant>)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Sent upstream as `Authorization: Bearer <api_key>`. Use `${ENV_VAR}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    /// Replaces `model` in the forwarded request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    /// `local`/`sim`: memory the model takes when loaded, for memory admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Price per 1k tokens, for the `cost` policy (local and sim: 0 unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_1k_tokens: Option<f64>,
    /// `local` only: run the model server ourselves (instead of `url`). `{port}`, `{host}` and
    /// `{model}` are filled in at each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// With `command`: the path that answers 2xx once the server is ready.
    #[serde(default = "default_ready_path")]
    pub ready_path: String,
    /// With `command`: how long a start may take before it is killed.
    #[serde(default = "default_startup_timeout_s")]
    pub startup_timeout_s: u64,
    /// With `command`: stop the server after this long without requests; 0 = never.
    #[serde(default)]
    pub idle_ttl_s: u64,
    /// With `command`: extra environment variables (values may use `${ENV}` and the placeholders).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// With `command`: its working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Most requests in flight on this deployment at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// Time allowed to open a TCP (and TLS) connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed from sending the request to the first byte of the reply's body.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Longest silence allowed between two chunks of a reply.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Longest a whole upstream exchange may take, stream included; 0: no limit.
    #[serde(default)]
    pub total_timeout_ms: u64,
    /// Probe the deployment (`GET <url>/models`) this often when idle; 0: no active check.
    #[serde(default)]
    pub health_check_interval_s: u64,
    /// Extra headers sent upstream (e.g. `OpenAI-Organization`); values may use `${ENV}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// `sim` only: time to first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    /// `sim` only: generation speed; 0 means as fast as possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
}

fn default_ready_path() -> String {
    "/v1/models".into()
}
fn default_startup_timeout_s() -> u64 {
    120
}
fn default_max_concurrency() -> u32 {
    64
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_first_byte_timeout_ms() -> u64 {
    120_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
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

impl Config {
    /// Parses, interpolates `${ENV}` (with `env`), and validates a TOML document.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError(format!("not valid TOML: {}", e.message())))?;
        interpolate(&mut value, &mut String::new(), env)?;
        let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError(format!("{path}: {}", e.into_inner()))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `path`, interpolating from the process environment.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text, &|k| std::env::var(k).ok())
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// The embedded default configuration.
    pub fn default_config() -> Config {
        Config::parse(DEFAULT_CONFIG, &|_| None).expect("the embedded default config is valid")
    }

    /// The resolved configuration as TOML, secrets shown as `***`.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_body_bytes == 0 {
            return err("server.max_body_bytes", "must be at least 1");
        }
        if self.server.max_response_bytes == 0 {
            return err("server.max_response_bytes", "must be at least 1");
        }
        if self.server.max_header_bytes < 8192 {
            return err("server.max_header_bytes", "must be at least 8192");
        }
        for (name, v) in [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.body_read_timeout_ms",
                self.server.body_read_timeout_ms,
            ),
        ] {
            if v == 0 {
                return err(name, "must be at least 1 (milliseconds)");
            }
        }
        if self.server.worker_threads > 1024 {
            return err(
                "server.worker_threads",
                "at most 1024 (0: one per CPU core)",
            );
        }
        let r = &self.resilience;
        if r.max_attempts == 0 {
            return err(
                "resilience.max_attempts",
                "must be at least 1 (1: no retries)",
            );
        }
        if r.breaker_failures == 0 || r.breaker_window == 0 || r.breaker_window > 10_000 {
            return err(
                "resilience.breaker_failures",
                "breaker_failures and breaker_window (up to 10000) must be at least 1",
            );
        }
        if !(r.breaker_error_rate > 0.0 && r.breaker_error_rate <= 1.0) {
            return err("resilience.breaker_error_rate", "must be in (0, 1]");
        }
        let a = &self.admission;
        if !(a.defer_threshold > 0.0
            && a.defer_threshold <= a.reject_threshold
            && a.reject_threshold <= 1.0)
        {
            return err(
                "admission.defer_threshold",
                format!(
                    "need 0 < defer_threshold <= reject_threshold <= 1, got {} and {}",
                    a.defer_threshold, a.reject_threshold
                ),
            );
        }
        if self.models.is_empty() {
            return err(
                "models",
                "no model is configured; add a [[models]] table with a name and at least one [[models.deployments]]",
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = format!("models[{i}]");
            if m.name.trim().is_empty() || m.name.len() > 256 {
                return err(
                    format!("{key}.name"),
                    "must be 1 to 256 characters: the name clients send as \"model\"",
                );
            }
            if !seen.insert(m.name.as_str()) {
                return err(
                    format!("{key}.name"),
                    format!("model \"{}\" is defined twice; merge its deployments into one [[models]] table", m.name),
                );
            }
            if m.deployments.len() > 64 {
                return err(
                    format!("{key}.deployments"),
                    "at most 64 deployments per model",
                );
            }
            if m.deployments.is_empty() {
                return err(
                    format!("{key}.deployments"),
                    format!("model \"{}\" has no deployment; add a [[models.deployments]] table (kind = \"local\", \"cloud\" or \"sim\")", m.name),
                );
            }
            for (j, d) in m.deployments.iter().enumerate() {
                d.validate(&format!("{key}.deployments[{j}]"))?;
            }
            let policy = m.policy.unwrap_or(self.routing.policy);
            let has = |k: DeploymentKind| m.deployments.iter().any(|d| d.kind == k);
            let has_local = has(DeploymentKind::Local) || has(DeploymentKind::Sim);
            let pkey = if m.policy.is_some() {
                format!("{key}.policy")
            } else {
                "routing.policy".to_string()
            };
            match policy {
                Policy::LocalOnly if !has_local => {
                    return err(
                        pkey,
                        format!(
                            "\"local-only\" but model \"{}\" has no local or sim deployment",
                            m.name
                        ),
                    );
                }
                Policy::CloudOnly if !has(DeploymentKind::Cloud) => {
                    return err(
                        pkey,
                        format!(
                            "\"cloud-only\" but model \"{}\" has no cloud deployment",
                            m.name
                        ),
                    );
                }
                Policy::DegradationLadder => {
                    if !has_local {
                        return err(
                            pkey,
                            format!(
                                "\"degradation-ladder\" but model \"{}\" has no local variants",
                                m.name
                            ),
                        );
                    }
                    for (j, d) in m.deployments.iter().enumerate() {
                        if d.kind != DeploymentKind::Cloud && d.variant.is_none() {
                            return err(
                                format!("{key}.deployments[{j}].variant"),
                                "required under \"degradation-ladder\": name each local variant (e.g. \"f16\", \"q8\", \"q4\"), listed from highest precision to lowest",
                            );
                        }
                    }
                }
                Policy::Cost => {
                    for (j, d) in m.deployments.iter().enumerate() {
                        if d.kind == DeploymentKind::Cloud && d.price_per_1k_tokens.is_none() {
                            return err(
                                format!("{key}.deployments[{j}].price_per_1k_tokens"),
                                "required for a cloud deployment under the \"cost\" policy, e.g. price_per_1k_tokens = 0.15",
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl DeploymentConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if let Some(cmd) = &self.command {
            if self.kind != DeploymentKind::Local {
                return err(
                    format!("{key}.command"),
                    "only a \"local\" deployment can be launched by the gateway; remove it",
                );
            }
            if self.url.is_some() {
                return err(
                    format!("{key}.url"),
                    "give either url (a server you run) or command (the gateway runs it), not both",
                );
            }
            if cmd.is_empty() || cmd[0].trim().is_empty() {
                return err(format!("{key}.command"), "must name a program, e.g. command = [\"llama-server\", \"-m\", \"model.gguf\", \"--port\", \"{port}\"]");
            }
            if !cmd.iter().any(|a| a.contains("{port}"))
                && !self.env.values().any(|v| v.contains("{port}"))
            {
                return err(format!("{key}.command"), "must pass \"{port}\" to the server (in an argument or env), so that the gateway knows where it listens");
            }
            if !self.ready_path.starts_with('/') {
                return err(
                    format!("{key}.ready_path"),
                    "must start with '/', e.g. \"/v1/models\" or \"/health\"",
                );
            }
            if self.startup_timeout_s == 0 {
                return err(format!("{key}.startup_timeout_s"), "must be at least 1");
            }
        } else {
            for (name, set) in [
                ("idle_ttl_s", self.idle_ttl_s != 0),
                ("env", !self.env.is_empty()),
                ("cwd", self.cwd.is_some()),
            ] {
                if set {
                    return err(
                        format!("{key}.{name}"),
                        "only applies with command (a server the gateway runs); remove it",
                    );
                }
            }
        }
        match (self.kind, &self.url) {
            (_, None) if self.command.is_some() => {}
            (DeploymentKind::Sim, Some(_)) => {
                return err(
                    format!("{key}.url"),
                    "a \"sim\" deployment runs inside the gateway and takes no url; remove it, or use kind = \"local\" for a separate `mofa-gateway sim`",
                )
            }
            (DeploymentKind::Local | DeploymentKind::Cloud, None) => {
                return err(
                    format!("{key}.url"),
                    "required: the base URL of an OpenAI-compatible API, e.g. url = \"http://127.0.0.1:9001/v1\" (or, for kind = \"local\", a command the gateway runs)",
                )
            }
            (_, Some(url)) => match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return err(
                        format!("{key}.url"),
                        format!("\"{url}\" is not an http(s) URL; write it as \"http://host:port/v1\""),
                    )
                }
            },
            (DeploymentKind::Sim, None) => {}
        }
        if self.kind == DeploymentKind::Cloud {
            match &self.provider {
                Some(p) if valid_label(p) => {}
                Some(_) => {
                    return err(
                        format!("{key}.provider"),
                        "use letters, digits, '-', '_' or '.' (e.g. \"openai\")",
                    )
                }
                None => {
                    return err(
                        format!("{key}.provider"),
                        "required for kind = \"cloud\", e.g. provider = \"openai\"",
                    )
                }
            }
        } else if self.provider.is_some() {
            return err(
                format!("{key}.provider"),
                "only a \"cloud\" deployment has a provider; remove it",
            );
        }
        if let Some(v) = &self.variant {
            if !valid_label(v) {
                return err(
                    format!("{key}.variant"),
                    "use letters, digits, '-', '_' or '.' (e.g. \"q8\")",
                );
            }
        }
        if self.kind == DeploymentKind::Sim && self.api_key.is_some() {
            return err(
                format!("{key}.api_key"),
                "a \"sim\" deployment takes no api_key; remove it",
            );
        }
        if let Some(k) = &self.api_key {
            if k.expose().is_empty() || k.expose().chars().any(|c| c.is_control()) {
                return err(
                    format!("{key}.api_key"),
                    "is empty or has control characters; check the environment variable it names",
                );
            }
        }
        if let Some(m) = &self.upstream_model {
            if m.is_empty() {
                return err(
                    format!("{key}.upstream_model"),
                    "is empty; remove it to forward the client's model name",
                );
            }
        }
        if self.memory_mb.is_some() && self.kind == DeploymentKind::Cloud {
            return err(
                format!("{key}.memory_mb"),
                "a cloud deployment takes no local memory; remove it",
            );
        }
        if let Some(p) = self.price_per_1k_tokens {
            if !(p.is_finite() && p >= 0.0) {
                return err(
                    format!("{key}.price_per_1k_tokens"),
                    "must be a number >= 0",
                );
            }
        }
        if self.max_concurrency == 0 {
            return err(format!("{key}.max_concurrency"), "must be at least 1");
        }
        for (name, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("first_byte_timeout_ms", self.first_byte_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if ms == 0 {
                return err(format!("{key}.{name}"), "must be at least 1 (milliseconds)");
            }
        }
        for (name, value) in &self.headers {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || axum::http::HeaderValue::from_str(value).is_err()
            {
                return err(
                    format!("{key}.headers.{name}"),
                    "is not a valid HTTP header name and value",
                );
            }
            if name.eq_ignore_ascii_case("authorization") {
                return err(
                    format!("{key}.headers.{name}"),
                    "set the key with api_key instead, so that it stays masked",
                );
            }
        }
        if self.health_check_interval_s > 0 && self.kind == DeploymentKind::Sim {
            return err(
                format!("{key}.health_check_interval_s"),
                "the in-process simulator needs no health check; remove it",
            );
        }
        if self.kind != DeploymentKind::Sim {
            if self.ttft_ms.is_some() {
                return err(
                    format!("{key}.ttft_ms"),
                    "only a \"sim\" deployment takes ttft_ms; remove it",
                );
            }
            if self.tokens_per_sec.is_some() {
                return err(
                    format!("{key}.tokens_per_sec"),
                    "only a \"sim\" deployment takes tokens_per_sec; remove it",
                );
            }
        }
        if let Some(t) = self.tokens_per_sec {
            if !(t.is_finite() && t >= 0.0) {
                return err(
                    format!("{key}.tokens_per_sec"),
                    "must be a number >= 0 (0: as fast as possible)",
                );
            }
        }
        Ok(())
    }
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Replaces `${NAME}` in every string value with the variable's value; `$${` writes `${`.
fn interpolate(
    v: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match v {
        toml::Value::String(s) if s.contains('$') => {
            *s = interpolate_str(s, path, env)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate(item, path, env)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                interpolate(item, path, env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn interpolate_str(
    s: &str,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return err(path, "has \"${\" without a closing \"}\"; write ${NAME}, or $${ for a literal \"${\"");
            };
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return err(
                    path,
                    format!("\"${{{name}}}\" is not a variable name; use letters, digits and '_'"),
                );
            }
            match env(name) {
                Some(val) => out.push_str(&val),
                None => {
                    return err(
                        path,
                        format!("environment variable {name} is not set; export {name}=... before starting, or remove the key"),
                    )
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &|k| (k == "KEY").then(|| "sk-test".to_string()))
    }

    const CLOUD: &str = r#"
        [[models]]
        name = "m"
        [[models.deployments]]
        kind = "cloud"
        provider = "openai"
        url = "https://api.example.test/v1"
        api_key = "${KEY}"
    "#;

    /// The examples in docs/configuration.md are valid, and the documented default is the real one.
    #[test]
    fn documented_examples_parse() {
        let doc = include_str!("../docs/configuration.md");
        let blocks: Vec<&str> = doc
            .split("```toml")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .collect();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].trim(), DEFAULT_CONFIG.trim());
        let c = Config::parse(blocks[1], &|k| Some(format!("value-of-{k}"))).unwrap();
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.models[0].deployments.len(), 4);
        assert!(c.models[1].deployments[0].command.is_some());
        assert_eq!(c.admission.memory_capacity_mb, 24000);
    }

    #[test]
    fn default_config_is_one_sim_model() {
        let c = Config::default_config();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].name, "mofa-sim");
        assert_eq!(c.models[0].deployments[0].kind, DeploymentKind::Sim);
        assert_eq!(
            c.models[0].deployments[0].label("mofa-sim"),
            "sim(mofa-sim)"
        );
    }

    #[test]
    fn env_is_interpolated_and_masked() {
        let c = parse(CLOUD).unwrap();
        let d = &c.models[0].deployments[0];
        assert_eq!(d.api_key.as_ref().unwrap().expose(), "sk-test");
        assert_eq!(d.label("m"), "cloud(openai)");
        let shown = c.to_masked_toml();
        assert!(!shown.contains("sk-test"), "{shown}");
        assert!(shown.contains("***"));
        assert!(!format!("{c:?}").contains("sk-test"));
    }

    #[test]
    fn missing_env_names_key_and_variable() {
        let e = parse(&CLOUD.replace("${KEY}", "${NOPE}")).unwrap_err().0;
        assert!(e.starts_with("models[0].deployments[0].api_key:"), "{e}");
        assert!(e.contains("NOPE is not set"), "{e}");
    }

    #[test]
    fn dollar_escapes() {
        assert_eq!(interpolate_str("a$${b}", "k", &|_| None).unwrap(), "a${b}");
        assert_eq!(interpolate_str("$5", "k", &|_| None).unwrap(), "$5");
        assert!(interpolate_str("${A", "k", &|_| None).is_err());
        assert!(interpolate_str("${A-B}", "k", &|_| None).is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&CLOUD.replace("api_key", "apikey")).unwrap_err().0;
        assert!(e.starts_with("models[0].deployments[0].apikey"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                CLOUD.replace("\"cloud\"", "\"gpu\""),
                "models[0].deployments[0].kind",
            ),
            (
                CLOUD.replace("https://api.example.test/v1", "ftp://x"),
                "models[0].deployments[0].url",
            ),
            (
                CLOUD.replace("provider = \"openai\"", ""),
                "models[0].deployments[0].provider",
            ),
            (
                format!("{CLOUD}\nmax_concurrency = 0"),
                "models[0].deployments[0].max_concurrency",
            ),
            (
                format!("{CLOUD}\nttft_ms = 5"),
                "models[0].deployments[0].ttft_ms",
            ),
            (
                format!(
                    "{CLOUD}\n[[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"sim\""
                ),
                "models[1].name",
            ),
            (
                "[[models]]\nname = \"x\"".to_string(),
                "models[0].deployments",
            ),
            (
                "[server]\nlisten = \"nowhere\"".to_string(),
                "server.listen",
            ),
            (String::new(), "models"),
            (format!("{CLOUD}\nmemory_mb = 5"), "models[0].deployments[0].memory_mb"),
            (format!("{CLOUD}\ncommand = [\"x\", \"{{port}}\"]"), "models[0].deployments[0].command"),
            (format!("{CLOUD}\nidle_ttl_s = 5"), "models[0].deployments[0].idle_ttl_s"),
            ("[[models]]\nname = \"x\"\n[[models.deployments]]\nkind = \"local\"\ncommand = [\"srv\"]".to_string(), "models[0].deployments[0].command"),
            ("[[models]]\nname = \"x\"\n[[models.deployments]]\nkind = \"local\"\ncommand = []".to_string(), "models[0].deployments[0].command"),
            ("[[models]]\nname = \"x\"\n[[models.deployments]]\nkind = \"local\"\ncommand = [\"s\", \"{port}\"]\nurl = \"http://a/v1\"".to_string(), "models[0].deployments[0].url"),
            (format!("[admission]\ndefer_threshold = 0.95\n{CLOUD}"), "admission.defer_threshold"),
            (format!("[routing]\npolicy = \"local-only\"\n{CLOUD}"), "routing.policy"),
            (format!("[routing]\npolicy = \"fastest\"\n{CLOUD}"), "routing.policy"),
            (CLOUD.replace("name = \"m\"", "name = \"m\"\npolicy = \"cost\""), "models[0].deployments[0].price_per_1k_tokens"),
            ("[[models]]\nname = \"x\"\npolicy = \"degradation-ladder\"\n[[models.deployments]]\nkind = \"sim\"".to_string(), "models[0].deployments[0].variant"),
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err().0;
            assert!(
                e.starts_with(&format!("{key}:")) || e.starts_with(&format!("{key}.")),
                "want {key}, got {e}"
            );
        }
    }
}

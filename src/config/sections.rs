//! The schema of the gateway's own sections: `[server]`, `[admission]`, `[routing]`,
//! `[resilience]`, `[[models]]` with their `[[models.deployments]]`, `[limits]` and `[log]`,
//! with their defaults. Types and defaults only: checks live in `validate`, `${ENV}` in
//! `interpolate`; nothing here reads files or the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::Secret;
use crate::prefix::MinMatch;
use crate::routing::Policy;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Policy of models that do not set their own.
    #[serde(default)]
    pub policy: Policy,
    /// `cost` policy: the longest expected wait worth taking for a cheaper deployment.
    #[serde(default = "default_cost_max_queue_wait_ms")]
    pub cost_max_queue_wait_ms: u64,
    /// `prefix-aware`: the least match that sends a request to the deployment holding its
    /// prefix: a share of the prompt (a float) or bytes (an integer).
    #[serde(default)]
    pub prefix_min_match: MinMatch,
    /// `prefix-aware` and `session`: how many more requests in flight than the least-loaded
    /// deployment the preferred one may have and still be chosen.
    #[serde(default = "default_prefix_balance_threshold")]
    pub prefix_balance_threshold: u32,
    /// `prefix-aware`: prompt blocks (256 bytes each) remembered per model.
    #[serde(default = "default_affinity_entries")]
    pub prefix_cache_entries: usize,
    /// `session`: sessions remembered per model.
    #[serde(default = "default_affinity_entries")]
    pub session_cache_entries: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: Policy::default(),
            cost_max_queue_wait_ms: default_cost_max_queue_wait_ms(),
            prefix_min_match: MinMatch::default(),
            prefix_balance_threshold: default_prefix_balance_threshold(),
            prefix_cache_entries: default_affinity_entries(),
            session_cache_entries: default_affinity_entries(),
        }
    }
}

impl RoutingConfig {
    /// The affinity policies' settings.
    pub(crate) fn affinity(&self) -> crate::prefix::Settings {
        crate::prefix::Settings {
            min_match: self.prefix_min_match,
            balance: self.prefix_balance_threshold,
            prefix_entries: self.prefix_cache_entries,
            session_entries: self.session_cache_entries,
        }
    }
}

fn default_prefix_balance_threshold() -> u32 {
    crate::prefix::Settings::default().balance
}
fn default_affinity_entries() -> usize {
    crate::prefix::Settings::default().prefix_entries
}

fn default_cost_max_queue_wait_ms() -> u64 {
    2_000
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    /// Overrides `routing.policy` for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Requests per minute for this model, all keys together (not enforced yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute for this model, all keys together (not enforced yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
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

/// The API a deployment speaks.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum UpstreamApiKind {
    /// OpenAI's API, as OpenAI, llama-server, vLLM, Ollama and the simulator serve it.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API (`POST /v1/messages`), with `x-api-key` and
    /// `anthropic-version`.
    #[serde(rename = "anthropic")]
    Anthropic,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub kind: DeploymentKind,
    /// The API it speaks: `openai` (the default) or `anthropic`.
    #[serde(default)]
    pub api: UpstreamApiKind,
    /// `api = "anthropic"` only: the `anthropic-version` header (default `2023-06-01`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic_version: Option<String>,
    /// Base URL of the API: an OpenAI-compatible one ending in `/v1`; Anthropic's root
    /// (`https://api.anthropic.com`, a trailing `/v1` accepted). Not for `sim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `cloud` only: the provider's name, shown as `cloud(<provider>)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// A label for this variant (e.g. `q8`), shown as `local(<model>@<variant>)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Sent upstream as `Authorization: Bearer <api_key>` (`x-api-key` with
    /// `api = "anthropic"`). Use `${ENV_VAR}`.
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
    /// The usage ledger's price of input tokens, per million (default: from
    /// `price_per_1k_tokens`, else 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_price_per_1m: Option<f64>,
    /// The usage ledger's price of output tokens, per million (default: from
    /// `price_per_1k_tokens`, else 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_price_per_1m: Option<f64>,
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

/// Where per-key limits keep their counters.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LimitStore {
    /// In this process: each replica counts on its own.
    #[default]
    Memory,
    /// In Redis (`redis_url`): replicas share one count.
    Redis,
}

/// What the limits do while Redis does not answer.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailure {
    /// Keep serving, counting in a local bucket until Redis answers again.
    #[default]
    Local,
    /// Refuse keyed requests (503) until Redis answers again.
    Closed,
}

/// `[limits]`: where rate limits are counted (read by no feature yet).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub store: LimitStore,
    /// `store = "redis"`: e.g. `redis://127.0.0.1:6379`; a password in it is masked by
    /// `check-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub redis_failure: RedisFailure,
    /// Longest a Redis round trip may take before `redis_failure` applies.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            store: LimitStore::default(),
            redis_url: None,
            redis_failure: RedisFailure::default(),
            redis_timeout_ms: default_redis_timeout_ms(),
        }
    }
}

fn default_redis_timeout_ms() -> u64 {
    50
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]` (read by no feature yet).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

/// Where the usage ledger writes.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UsageStore {
    /// No ledger.
    #[default]
    Off,
    /// A SQLite file (`path`), embedded.
    Sqlite,
    /// A PostgreSQL server (`url`), shared by replicas.
    Postgres,
}

/// `[usage]`: the usage ledger (docs/configuration.md).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    #[serde(default)]
    pub store: UsageStore,
    /// `store = "sqlite"`: the database file, relative to the working directory.
    #[serde(default = "default_usage_path")]
    pub path: String,
    /// Records held in memory while the database is slow or down; beyond, dropped and counted.
    #[serde(default = "default_usage_queue")]
    pub queue_capacity: usize,
    /// Longest a record waits before it is written (at most 1000).
    #[serde(default = "default_usage_flush_ms")]
    pub flush_interval_ms: u64,
    /// `store = "postgres"`: `postgres://user:password@host:port/db` (`${VAR}` for the
    /// password). Its password is never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How often budgets re-read what other replicas spent (milliseconds).
    #[serde(default = "default_usage_sync_ms")]
    pub budget_sync_ms: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            store: UsageStore::default(),
            path: default_usage_path(),
            queue_capacity: default_usage_queue(),
            flush_interval_ms: default_usage_flush_ms(),
            url: None,
            budget_sync_ms: default_usage_sync_ms(),
        }
    }
}

fn default_usage_path() -> String {
    "mofa-usage.db".into()
}

fn default_usage_queue() -> usize {
    100_000
}

fn default_usage_sync_ms() -> u64 {
    1000
}

fn default_usage_flush_ms() -> u64 {
    1000
}

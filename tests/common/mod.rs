//! The one harness of the integration tests. It owns: the configuration a test gives a gateway
//! ([`GatewayBuilder`], typed, validated by production's `Config::parse`), starting simulators
//! and gateways on ephemeral loopback ports (in process, or as the real binary), every HTTP
//! request a test sends (JSON posts with custom headers, raw bodies, GETs, raw TCP bytes),
//! reading SSE bodies, the checks every gateway reply must pass, [`eventually`], the only way a
//! test waits for something it can observe (its patience stretched by `RUST_TEST_PATIENCE_MS`,
//! see [`patience`]), and [`require_binary`] for the programs a test needs (`redis-server`,
//! `promtool`, `chromium`). It must not: reach anything beyond 127.0.0.1, sleep to synchronise,
//! or use gateway internals beyond `config::Config`, `server::Gateway` and `sim`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mofa_gateway::config::Config;
use mofa_gateway::sim::SimOptions;
use mofa_gateway::Gateway;
use serde::Serialize;
use serde_json::Value;

/// Starts a simulator in this process; returns its base URL (`http://127.0.0.1:P/v1`).
pub async fn sim(opts: SimOptions) -> String {
    let addr = mofa_gateway::sim::spawn_local(opts).await.unwrap();
    format!("http://{addr}/v1")
}

/// Simulator options serving `model` with no pacing.
pub fn sim_opts(model: &str) -> SimOptions {
    SimOptions {
        models: vec![model.to_string()],
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Configurations.
//
// A test says what it configures, typed, and nothing else: `GatewayBuilder` renders it as TOML
// (only the keys a test set; production fills in every default) and parses that with
// `Config::parse`, so a test config is validated exactly as an operator's file is.
//
//     GatewayBuilder::new()
//         .admission(|a| a.max_queue(0))
//         .model("m", |m| m.deployment(Deployment::local(&url).max_concurrency(1)))
//         .key(Key::new("team-a", "sk-a").rpm(20).models(&["m"]))
//         .start()
//         .await
//
// Enumerated values (policies, priorities, `store`, `redis_failure`, the log format) are given
// as the config file spells them; `Config::parse` refuses a misspelt one. Tests about the
// configuration itself (parse and validation errors, `check-config`, `${ENV}` in a file, key
// files) write TOML, as an operator would.

/// Generates `pub fn NAME(self, v: T) -> Self` setters for `Option` fields.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $t:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, v: $t) -> Self {
                self.$name = Some(v.into());
                self
            }
        )*
    };
}

/// A gateway configuration under construction; see the section comment above.
#[derive(Clone, Default)]
pub struct GatewayBuilder {
    cfg: TestConfig,
    /// What `${VAR}`s resolve to (in process) or the environment of the binary.
    env: Vec<(String, String)>,
}

#[derive(Clone, Default, Serialize)]
struct TestConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<Server>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admission: Option<Admission>,
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<Routing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resilience: Option<Resilience>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<Auth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<Limits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<Log>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    models: Vec<Model>,
}

/// `[usage]`.
#[derive(Clone, Serialize)]
struct Usage {
    store: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    flush_interval_ms: u64,
    budget_sync_ms: u64,
}

impl GatewayBuilder {
    /// No models, every section at its defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the model `name` (after those added before), shaped by `f`.
    pub fn model(mut self, name: &str, f: impl FnOnce(Model) -> Model) -> Self {
        self.cfg.models.push(f(Model {
            name: name.to_string(),
            ..Model::default()
        }));
        self
    }

    /// Adds the model `name` served by one local deployment at `url`, all defaults.
    pub fn local_model(self, name: &str, url: &str) -> Self {
        self.model(name, |m| m.deployment(Deployment::local(url)))
    }

    /// `[server]`.
    pub fn server(mut self, f: impl FnOnce(Server) -> Server) -> Self {
        self.cfg.server = Some(f(self.cfg.server.take().unwrap_or_default()));
        self
    }

    /// `[admission]`.
    pub fn admission(mut self, f: impl FnOnce(Admission) -> Admission) -> Self {
        self.cfg.admission = Some(f(self.cfg.admission.take().unwrap_or_default()));
        self
    }

    /// `[routing]`.
    pub fn routing(mut self, f: impl FnOnce(Routing) -> Routing) -> Self {
        self.cfg.routing = Some(f(self.cfg.routing.take().unwrap_or_default()));
        self
    }

    /// `[resilience]`.
    pub fn resilience(mut self, f: impl FnOnce(Resilience) -> Resilience) -> Self {
        self.cfg.resilience = Some(f(self.cfg.resilience.take().unwrap_or_default()));
        self
    }

    /// `[limits]`.
    pub fn limits(mut self, f: impl FnOnce(Limits) -> Limits) -> Self {
        self.cfg.limits = Some(f(self.cfg.limits.take().unwrap_or_default()));
        self
    }

    /// `[usage]`: the ledger in the SQLite file `path`, written every 100 ms.
    pub fn usage_sqlite(mut self, path: &std::path::Path) -> Self {
        self.cfg.usage = Some(Usage {
            store: "sqlite",
            path: Some(path.to_str().unwrap().to_string()),
            url: None,
            flush_interval_ms: 100,
            budget_sync_ms: 100,
        });
        self
    }

    /// `[usage] store = "postgres"` at `url`, written every 100 ms, budgets re-read as often.
    pub fn usage_postgres(mut self, url: &str) -> Self {
        self.cfg.usage = Some(Usage {
            store: "postgres",
            path: None,
            url: Some(url.to_string()),
            flush_interval_ms: 100,
            budget_sync_ms: 100,
        });
        self
    }

    /// `[log] format` (`text` or `json`).
    pub fn log_format(mut self, format: &str) -> Self {
        self.cfg.log = Some(Log {
            format: format.to_string(),
        });
        self
    }

    fn auth(&mut self) -> &mut Auth {
        self.cfg.auth.get_or_insert_with(|| Auth {
            mode: "keys",
            admin_keys: Vec::new(),
            keys: Vec::new(),
        })
    }

    /// A client key (`[[auth.keys]]`, after those added before); turns `auth.mode` to `keys`.
    pub fn key(mut self, key: Key) -> Self {
        self.auth().keys.push(key);
        self
    }

    /// An admin key, by its secret; turns `auth.mode` to `keys`.
    pub fn admin_key(self, secret: &str) -> Self {
        self.admin_hash(&key_hash(secret))
    }

    /// An admin key, by its `sha256:...` hash as written in the config.
    pub fn admin_hash(mut self, hash: &str) -> Self {
        self.auth().admin_keys.push(hash.to_string());
        self
    }

    /// Sets `${name}` to `value`: for the gateway in this process, and in the binary's
    /// environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// The configuration as a TOML file (for the real binary or `check-config`).
    pub fn toml(&self) -> String {
        toml::to_string(&self.cfg).expect("a test config renders as TOML")
    }

    /// The configuration parsed and validated as production does; panics if it is refused.
    pub fn config(&self) -> Config {
        let text = self.toml();
        Config::parse(&text, &|k| {
            self.env
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|e| panic!("bad test config: {e}\n{text}"))
    }

    /// A gateway for this configuration in this process, bound to an ephemeral loopback port,
    /// not serving yet (for tests that drive `serve` and its shutdown themselves).
    pub async fn build(&self) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Gateway::build(&self.config(), listener).await.unwrap()
    }

    /// A gateway for this configuration serving in this process; returns its address.
    pub async fn start(&self) -> SocketAddr {
        self.build().await.spawn().unwrap()
    }

    /// `mofa-gateway serve` on this configuration (written to a temporary file), with its
    /// `env`; returns it and its address.
    pub async fn start_binary(&self) -> (Binary, SocketAddr) {
        run_gateway_binary_env(&self.toml(), &self.env).await
    }
}

/// `[server]`.
#[derive(Clone, Default, Serialize)]
pub struct Server {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_response_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header_read_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_read_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_header_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shutdown_grace_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_threads: Option<u64>,
}

impl Server {
    setters! {
        max_body_bytes: u64,
        max_response_bytes: u64,
        header_read_timeout_ms: u64,
        body_read_timeout_ms: u64,
        max_header_bytes: u64,
        shutdown_grace_s: u64,
        worker_threads: u64,
    }
}

/// `[admission]`.
#[derive(Clone, Default, Serialize)]
pub struct Admission {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_queue: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_queue_wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_capacity_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    defer_threshold: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reject_threshold: Option<f64>,
}

impl Admission {
    setters! {
        max_queue: u64,
        max_queue_wait_ms: u64,
        memory_capacity_mb: u64,
        defer_threshold: f64,
        reject_threshold: f64,
    }
}

/// `[routing]`.
#[derive(Clone, Default, Serialize)]
pub struct Routing {
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_max_queue_wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_min_match: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_balance_threshold: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_cache_entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_cache_entries: Option<u64>,
}

impl Routing {
    setters! {
        /// The default policy, as the file spells it (`local-first`, `cost`, ...).
        policy: &str,
        cost_max_queue_wait_ms: u64,
        /// A share (`json!(0.5)`) or bytes (`json!(4096)`).
        prefix_min_match: Value,
        prefix_balance_threshold: u64,
        prefix_cache_entries: u64,
        session_cache_entries: u64,
    }
}

/// `[resilience]`.
#[derive(Clone, Default, Serialize)]
pub struct Resilience {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_budget_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_failures: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_error_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_window: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_open_ms: Option<u64>,
}

impl Resilience {
    setters! {
        max_attempts: u64,
        retry_budget_ms: u64,
        breaker_failures: u64,
        breaker_error_rate: f64,
        breaker_window: u64,
        breaker_open_ms: u64,
    }
}

/// `[limits]`.
#[derive(Clone, Default, Serialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_failure: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_timeout_ms: Option<u64>,
}

impl Limits {
    setters! {
        /// `memory` or `redis`.
        store: &str,
        redis_url: &str,
        /// `local` or `closed`.
        redis_failure: &str,
        redis_timeout_ms: u64,
    }
}

/// `[log]`.
#[derive(Clone, Serialize)]
struct Log {
    format: String,
}

/// `[auth]`: present once a key is added.
#[derive(Clone, Serialize)]
struct Auth {
    mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    admin_keys: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    keys: Vec<Key>,
}

/// `sha256:<hex>` of a key's secret, as `mofa-gateway keys hash` prints it.
pub fn key_hash(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// One `[[auth.keys]]` table.
#[derive(Clone, Serialize)]
pub struct Key {
    name: String,
    hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_priority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default_priority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rpm: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tpm: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_parallel: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<Budget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_budget: Option<Budget>,
}

/// `{ amount, period }` of a key's budget.
#[derive(Clone, Serialize)]
pub struct Budget {
    amount: f64,
    period: String,
}

impl Key {
    /// The key `name` whose secret is `secret` (the config holds its hash).
    pub fn new(name: &str, secret: &str) -> Key {
        Key::hashed(name, &key_hash(secret))
    }

    /// The key `name` by its `sha256:...` hash, as written in the config.
    pub fn hashed(name: &str, hash: &str) -> Key {
        Key {
            name: name.to_string(),
            hash: hash.to_string(),
            models: None,
            max_priority: None,
            default_priority: None,
            rpm: None,
            tpm: None,
            max_parallel: None,
            budget: None,
            token_budget: None,
        }
    }

    /// `budget = { amount, period }` (currency units; `day`, `month` or `total`).
    pub fn budget(mut self, amount: f64, period: &str) -> Key {
        self.budget = Some(Budget {
            amount,
            period: period.to_string(),
        });
        self
    }

    /// `token_budget = { amount, period }`.
    pub fn token_budget(mut self, amount: u64, period: &str) -> Key {
        self.token_budget = Some(Budget {
            amount: amount as f64,
            period: period.to_string(),
        });
        self
    }

    /// The models this key may use (all if never called).
    pub fn models(mut self, models: &[&str]) -> Key {
        self.models = Some(models.iter().map(|m| m.to_string()).collect());
        self
    }

    setters! {
        /// `low`, `normal`, `high` or `critical`.
        max_priority: &str,
        default_priority: &str,
        rpm: u64,
        tpm: u64,
        max_parallel: u64,
    }
}

/// One `[[models]]` table.
#[derive(Clone, Default, Serialize)]
pub struct Model {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rpm: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tpm: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deployments: Vec<Deployment>,
}

impl Model {
    /// Adds a deployment (after those added before).
    pub fn deployment(mut self, d: Deployment) -> Model {
        self.deployments.push(d);
        self
    }

    setters! {
        /// As the file spells it: `local-first`, `latency`, `degradation-ladder`, ...
        policy: &str,
        rpm: u64,
        tpm: u64,
    }
}

/// One `[[models.deployments]]` table.
#[derive(Clone, Serialize)]
pub struct Deployment {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    api: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anthropic_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price_per_1k_tokens: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_price_per_1m: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_price_per_1m: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    startup_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_ttl_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_concurrency: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_byte_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_check_interval_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttft_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

impl Deployment {
    fn of(kind: &'static str) -> Deployment {
        Deployment {
            kind,
            api: None,
            anthropic_version: None,
            url: None,
            provider: None,
            variant: None,
            api_key: None,
            upstream_model: None,
            memory_mb: None,
            price_per_1k_tokens: None,
            input_price_per_1m: None,
            output_price_per_1m: None,
            command: None,
            ready_path: None,
            startup_timeout_s: None,
            idle_ttl_s: None,
            cwd: None,
            max_concurrency: None,
            connect_timeout_ms: None,
            first_byte_timeout_ms: None,
            idle_timeout_ms: None,
            total_timeout_ms: None,
            health_check_interval_s: None,
            ttft_ms: None,
            tokens_per_sec: None,
            env: BTreeMap::new(),
            headers: BTreeMap::new(),
        }
    }

    /// `kind = "local"` at `url`.
    pub fn local(url: &str) -> Deployment {
        Deployment::of("local").url(url)
    }

    /// `kind = "cloud"`, shown as `cloud(<provider>)`, at `url`.
    pub fn cloud(provider: &str, url: &str) -> Deployment {
        Deployment::of("cloud").provider(provider).url(url)
    }

    /// `kind = "sim"`: the simulator inside the gateway.
    pub fn sim() -> Deployment {
        Deployment::of("sim")
    }

    /// `kind = "local"` run by the gateway's pool: `argv` (`{host}`, `{port}` and `{model}`
    /// are filled in at each start).
    pub fn command(argv: &[&str]) -> Deployment {
        let mut d = Deployment::of("local");
        d.command = Some(argv.iter().map(|a| a.to_string()).collect());
        d
    }

    /// `kind = "local"` run by the gateway's pool: this crate's own `mofa-gateway sim` serving
    /// the model, with `sim_args` after its own arguments.
    pub fn sim_command(sim_args: &[&str]) -> Deployment {
        let mut argv = vec![
            env!("CARGO_BIN_EXE_mofa-gateway"),
            "sim",
            "--listen",
            "{host}:{port}",
            "--model",
            "{model}",
        ];
        argv.extend_from_slice(sim_args);
        Deployment::command(&argv)
    }

    /// One extra header sent upstream.
    pub fn header(mut self, name: &str, value: &str) -> Deployment {
        self.headers.insert(name.to_string(), value.to_string());
        self
    }

    /// One environment variable of the `command`.
    pub fn env(mut self, name: &str, value: &str) -> Deployment {
        self.env.insert(name.to_string(), value.to_string());
        self
    }

    setters! {
        /// The API it speaks: `openai` (the default) or `anthropic`.
        api: &str,
        /// `api = "anthropic"` only: the `anthropic-version` header.
        anthropic_version: &str,
        url: &str,
        provider: &str,
        variant: &str,
        /// Sent upstream as a bearer token; `${VAR}` is interpolated (see `GatewayBuilder::env`).
        api_key: &str,
        upstream_model: &str,
        memory_mb: u64,
        price_per_1k_tokens: f64,
        input_price_per_1m: f64,
        output_price_per_1m: f64,
        ready_path: &str,
        startup_timeout_s: u64,
        idle_ttl_s: u64,
        cwd: &str,
        max_concurrency: u64,
        connect_timeout_ms: u64,
        first_byte_timeout_ms: u64,
        idle_timeout_ms: u64,
        total_timeout_ms: u64,
        health_check_interval_s: u64,
        ttft_ms: u64,
        tokens_per_sec: f64,
    }
}

/// A gateway whose model `busy` has one slot and no queue, in front of a sim that streams
/// 10 tokens a second: while one request holds the slot, every other is rejected at once.
pub async fn busy_gateway() -> SocketAddr {
    let slow = sim(SimOptions {
        tokens_per_sec: 10.0,
        ..sim_opts("busy")
    })
    .await;
    GatewayBuilder::new()
        .admission(|a| a.max_queue(0))
        .model("busy", |m| {
            m.deployment(Deployment::local(&slow).max_concurrency(1))
        })
        .start()
        .await
}

/// A model `m` that is local first (at `local`), with a cloud fallback `backup` (at `cloud`).
pub fn local_then_cloud(local: &str, cloud: &str) -> GatewayBuilder {
    GatewayBuilder::new().model("m", |m| {
        m.policy("local-first")
            .deployment(Deployment::local(local))
            .deployment(Deployment::cloud("backup", cloud))
    })
}

// ---------------------------------------------------------------------------------------------
// Files.

/// A directory of its own under the system's temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty directory, named after `tag`, this process and the time (never reused).
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "mofa-test-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `text` to `file` in it, in place; returns its path.
    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Replaces `file` with `text` the way editors and ConfigMaps do: written beside it, then
    /// renamed over it. Returns its path.
    pub fn replace(&self, file: &str, text: &str) -> PathBuf {
        let tmp = self.0.join(format!(".{file}.new"));
        std::fs::write(&tmp, text).unwrap();
        let path = self.0.join(file);
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Programs the tests need.

/// The path of the program `name` on the PATH; panics, naming the Debian package that has it,
/// when it is missing (rather than letting a test time out or fail to spawn obscurely).
pub fn require_binary(name: &str, debian_package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} not found on PATH: install Debian's `{debian_package}` package \
             (apt-get install {debian_package}), as .ci/run does"
        )
    })
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

// ---------------------------------------------------------------------------------------------
// Waiting.

/// Polls `cond` until it holds; panics naming `what` if it still does not after `timeout`
/// (stretched by [`patience`]). This is how a test waits for anything it can observe (a request
/// in flight, a queue filled, a counter reached, a process gone): never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(what, timeout, || {
        let f = cond();
        async move { f.await.then_some(()) }
    })
    .await
}

/// Like [`eventually`], for a condition that yields a value once it holds: returns that value.
pub async fn eventually_some<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let timeout = patience(timeout);
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if Instant::now() >= end {
            panic!(
                "timed out after {timeout:?} waiting for: {what} \
                 (on a slow machine, set {PATIENCE_VAR} above {} to wait longer)",
                WAIT.as_millis()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The usual bound of an [`eventually`]: generous, since the machine may be busy; a condition
/// that holds returns at once. Stretched, as every harness timeout, by [`patience`].
pub const WAIT: Duration = Duration::from_secs(10);

/// The environment variable that stretches every wait of the harness (as linkerd's tests'):
/// see [`patience`].
pub const PATIENCE_VAR: &str = "RUST_TEST_PATIENCE_MS";

/// `timeout` stretched for a slow machine. `RUST_TEST_PATIENCE_MS=N` (a whole number of
/// milliseconds, read once) makes [`WAIT`] N ms instead of 10000, and multiplies every other
/// harness timeout by the same factor N / 10000: the timeouts given to [`eventually`] and
/// [`eventually_some`], the wait for a binary's address, for `redis-server` to listen, for the
/// browser. N below 10000 changes nothing (no wait is ever shortened); unset, the factor is 1.
/// Bounds that are the assertion itself (a reply within 1.5 s) are not stretched, except where a
/// test states them as an `eventually` bound (those loosen with the factor).
pub fn patience(timeout: Duration) -> Duration {
    static FACTOR: OnceLock<f64> = OnceLock::new();
    let factor = *FACTOR.get_or_init(|| match std::env::var(PATIENCE_VAR) {
        Ok(v) => {
            let ms: u64 = v.trim().parse().unwrap_or_else(|_| {
                panic!("{PATIENCE_VAR}={v:?}: expected a whole number of milliseconds")
            });
            (ms as f64 / WAIT.as_millis() as f64).max(1.0)
        }
        Err(_) => 1.0,
    });
    timeout.mul_f64(factor)
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// A client for one request (never shared between tests: each test has its own runtime).
fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn with_headers(
    mut req: reqwest::RequestBuilder,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// A chat body for `model`: one user message, 5 tokens.
pub fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 5,
        "stream": stream,
    })
}

/// POSTs JSON to the gateway at `addr`.
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> reqwest::Response {
    post_with(addr, path, body, &[]).await
}

/// POSTs JSON with extra request headers (`x-mofa-priority`, `authorization`, ...).
pub async fn post_with(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    with_headers(client().post(format!("http://{addr}{path}")), headers)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// POSTs a body as given (bytes, a string or a `reqwest::Body` stream), with `content_type`
/// if any: for malformed, oversized or non-JSON requests.
pub async fn post_raw(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = client().post(format!("http://{addr}{path}")).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    req.send().await.unwrap()
}

/// POST with an empty body, e.g. the admin actions `/admin/pool/NAME/load`.
pub async fn post_empty(addr: SocketAddr, path: &str) -> reqwest::Response {
    client()
        .post(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap()
}

/// POSTs `body` to `/v1/chat/completions`.
pub async fn chat(addr: SocketAddr, body: &Value) -> reqwest::Response {
    post(addr, "/v1/chat/completions", body).await
}

/// POSTs `body` to `/v1/chat/completions` with extra request headers.
pub async fn chat_with(
    addr: SocketAddr,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    post_with(addr, "/v1/chat/completions", body, headers).await
}

/// POSTs `body` to `/v1/completions`.
pub async fn completions(addr: SocketAddr, body: &Value) -> reqwest::Response {
    post(addr, "/v1/completions", body).await
}

/// POSTs `body` to `/v1/embeddings`.
pub async fn embeddings(addr: SocketAddr, body: &Value) -> reqwest::Response {
    post(addr, "/v1/embeddings", body).await
}

/// GETs `path` from the gateway at `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> reqwest::Response {
    get_with(addr, path, &[]).await
}

/// GETs `path` with extra request headers.
pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    with_headers(client().get(format!("http://{addr}{path}")), headers)
        .send()
        .await
        .unwrap()
}

/// The address of a base URL such as `http://127.0.0.1:P` or `http://127.0.0.1:P/v1`.
pub fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Opens a TCP connection to `addr` and writes `bytes` as they are: for tests of what an HTTP
/// client library would not send (headers or bodies that never end).
pub async fn raw_http(addr: SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp
}

/// Whether `addr` accepts a new TCP connection.
pub async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// Asserts the headers every response carries; returns `x-mofa-backend`.
pub fn assert_stamped(resp: &reqwest::Response) -> String {
    let h = resp.headers();
    let rid = h
        .get("x-request-id")
        .expect("x-request-id")
        .to_str()
        .unwrap();
    assert!(!rid.is_empty());
    let ms: f64 = h
        .get("x-mofa-latency-ms")
        .expect("x-mofa-latency-ms")
        .to_str()
        .unwrap()
        .parse()
        .expect("x-mofa-latency-ms is a number");
    assert!((0.0..60_000.0).contains(&ms), "latency {ms}");
    h.get("x-mofa-backend")
        .expect("x-mofa-backend")
        .to_str()
        .unwrap()
        .to_string()
}

/// The `Retry-After` of a response, checked to be a whole number of seconds in [1, 60].
pub fn retry_after(resp: &reqwest::Response) -> u64 {
    let ra: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is a whole number of seconds");
    assert!((1..=60).contains(&ra), "Retry-After {ra}");
    ra
}

/// The ids of a `GET /v1/models` list, in order.
pub fn model_ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Reads an error reply and checks the envelope: returns `error` (message, type, param, code).
pub async fn envelope(resp: reqwest::Response) -> Value {
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(ct.as_deref(), Some("application/json"));
    let v: Value = resp.json().await.expect("error body is JSON");
    let e = v.get("error").expect("envelope has `error`").clone();
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "envelope lacks {key}: {v}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    e
}

/// Splits an SSE body into its events' `data:` payloads, and says whether any event was named `error`.
pub fn sse_events(body: &str) -> (Vec<String>, bool) {
    let mut data = Vec::new();
    let mut named_error = false;
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        for line in event.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.trim().to_string());
            } else if line.trim() == "event: error" {
                named_error = true;
            }
        }
    }
    (data, named_error)
}

/// A streamed reply read to its end.
pub struct Sse {
    /// The whole body, for failure messages.
    pub text: String,
    /// Each event's `data:` payload, in order.
    pub data: Vec<String>,
    /// Whether any event was named `error`.
    pub named_error: bool,
}

impl Sse {
    /// Whether the stream ended normally, with `data: [DONE]` as its last event.
    pub fn done(&self) -> bool {
        self.data.last().map(String::as_str) == Some("[DONE]")
    }
}

/// Reads a streamed reply to its end and splits it into events.
pub async fn read_sse(resp: reqwest::Response) -> Sse {
    let text = resp.text().await.expect("the stream ends cleanly");
    let (data, named_error) = sse_events(&text);
    Sse {
        text,
        data,
        named_error,
    }
}

/// GETs `url` and parses its JSON body.
pub async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The gateway's admin view `path` (`orchestrator`, `pool`).
pub async fn admin(gw: SocketAddr, path: &str) -> Value {
    get_json(&format!("http://{gw}/admin/{path}")).await
}

/// Requests of `model` holding a deployment slot, over all its deployments.
pub async fn in_flight(gw: SocketAddr, model: &str) -> u64 {
    let a = admin(gw, "orchestrator").await;
    a["models"][model]["deployments"]
        .as_array()
        .unwrap_or_else(|| panic!("no model {model}: {a}"))
        .iter()
        .map(|d| d["in_flight"].as_u64().unwrap())
        .sum()
}

/// Requests of `model` waiting in its queue.
pub async fn queue_depth(gw: SocketAddr, model: &str) -> u64 {
    let a = admin(gw, "orchestrator").await;
    a["models"][model]["queue"]["depth"]
        .as_u64()
        .unwrap_or_else(|| panic!("no model {model}: {a}"))
}

/// Waits until `n` requests of `model` hold a slot (panics after [`WAIT`]).
pub async fn wait_in_flight(gw: SocketAddr, model: &str, n: u64) {
    eventually(
        &format!("{n} request(s) of {model} in flight"),
        WAIT,
        || async move { in_flight(gw, model).await == n },
    )
    .await
}

/// Waits until `n` requests of `model` are queued (panics after [`WAIT`]).
pub async fn wait_queued(gw: SocketAddr, model: &str, n: u64) {
    eventually(
        &format!("{n} request(s) of {model} queued"),
        WAIT,
        || async move { queue_depth(gw, model).await == n },
    )
    .await
}

/// The simulator's counters.
pub async fn sim_stats(sim_url: &str) -> Value {
    get_json(&format!("{}/sim/stats", sim_url.trim_end_matches("/v1"))).await
}

/// The last request the simulator received.
pub async fn sim_last_request(sim_url: &str) -> Value {
    get_json(&format!(
        "{}/sim/last_request",
        sim_url.trim_end_matches("/v1")
    ))
    .await
}

// ---------------------------------------------------------------------------------------------
// The real binary.

/// The `mofa-gateway` binary, killed when dropped (the test passes or fails).
pub struct Binary(tokio::process::Child);

impl Binary {
    pub fn pid(&self) -> u32 {
        self.0.id().expect("the binary was not waited for yet")
    }

    /// Sends `sig` (as `kill` spells it: `-TERM`, `-KILL`).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().await.unwrap()
    }
}

/// Runs the binary with `args`; returns it and the URL it printed (`... listening on URL`).
pub async fn run_binary(args: &[&str]) -> (Binary, String) {
    run_binary_env(args, &[]).await
}

/// [`run_binary`] with extra environment variables.
pub async fn run_binary_env(args: &[&str], env: &[(String, String)]) -> (Binary, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    tokio::time::timeout(patience(WAIT), stdout.read_line(&mut line))
        .await
        .expect("the binary did not print its address")
        .unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "printed {line:?}");
    (Binary(child), url)
}

/// Runs `cmd` with `input` on its stdin, its stdout and stderr captured; its output once it
/// exits.
pub fn run_with_stdin(mut cmd: std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `promtool check metrics` (Debian's `prometheus`) passes on `text`.
pub fn promtool_check(text: &str) {
    let mut cmd = std::process::Command::new(require_binary("promtool", "prometheus"));
    cmd.args(["check", "metrics"]);
    let out = run_with_stdin(cmd, text);
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `mofa-gateway serve --config file` (on an ephemeral port) with `extra` arguments
/// (`--watch`); the file stays, for tests that change it and reload.
pub async fn run_gateway_file(file: &std::path::Path, extra: &[&str]) -> (Binary, SocketAddr) {
    let mut args = vec![
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (bin, url) = run_binary_env(&args, &[]).await;
    (bin, addr_of(&url))
}

/// Runs `mofa-gateway serve` on `config` (written to a temporary file) with `env`; returns it
/// and its address. Tests build `config` with [`GatewayBuilder::start_binary`].
async fn run_gateway_binary_env(config: &str, env: &[(String, String)]) -> (Binary, SocketAddr) {
    let file = std::env::temp_dir().join(format!(
        "mofa-test-{}-{}.toml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&file, config).unwrap();
    let (bin, url) = run_binary_env(
        &[
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        env,
    )
    .await;
    let _ = std::fs::remove_file(&file);
    (bin, addr_of(&url))
}

// ---------------------------------------------------------------------------------------------
// Upstreams made for a test.

/// A loopback port free now (bound and released), for a server a test starts on it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback URL on which nothing listens.
pub async fn dead_url() -> String {
    format!("http://127.0.0.1:{}/v1", free_port())
}

/// An upstream that answers every request with this status, content type and body.
pub async fn fixed_upstream(status: u16, content_type: &'static str, body: &'static str) -> String {
    use axum::http::StatusCode;
    let app = axum::Router::new().fallback(move || async move {
        (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", content_type)],
            body,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

/// What a [`toggle_upstream`] answers.
pub const OK: u8 = 0;
pub const FAIL_500: u8 = 1;
pub const BUSY_429: u8 = 2;

/// An upstream whose behaviour the test switches: `OK` (a chat completion), `FAIL_500`, or
/// `BUSY_429` (with `Retry-After: 2`). Returns its URL, the switch and a hit counter.
pub async fn toggle_upstream() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicU8>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    use std::sync::Arc;
    let mode = Arc::new(AtomicU8::new(OK));
    let hits = Arc::new(AtomicU64::new(0));
    let (m, h) = (mode.clone(), hits.clone());
    let app = axum::Router::new().fallback(move || {
        let (m, h) = (m.clone(), h.clone());
        async move {
            use axum::response::IntoResponse;
            h.fetch_add(1, Ordering::SeqCst);
            match m.load(Ordering::SeqCst) {
                OK => (
                    [("content-type", "application/json")],
                    r#"{"id":"t","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#,
                )
                    .into_response(),
                FAIL_500 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
                _ => (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "2"), ("content-type", "application/json")],
                    r#"{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}"#,
                )
                    .into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), mode, hits)
}

// ---------------------------------------------------------------------------------------------
// The official Python SDKs (tests behind the `external` feature).

/// The python of the SDK venv (`scripts/setup-test-env`, which makes it on first use).
pub async fn sdk_python() -> std::path::PathBuf {
    let out = tokio::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/setup-test-env"
        ))
        .output()
        .await
        .expect("run scripts/setup-test-env");
    assert!(
        out.status.success(),
        "scripts/setup-test-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs the named checks of the SDK script `tests/sdk/<script>` against `base_url` (with the
/// variables `unset` removed from its environment); asserts each reported `ok <check>`.
pub async fn run_sdk_checks(script: &str, base_url: &str, checks: &[&str], unset: &[&str]) {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(sdk_python().await);
    cmd.arg(path)
        .arg(base_url)
        .args(checks)
        .env("NO_PROXY", "127.0.0.1,localhost");
    for var in unset {
        cmd.env_remove(var);
    }
    let out = cmd.output().await.expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK checks failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in checks {
        assert!(
            stdout.lines().any(|l| l == format!("ok {c}")),
            "{c} did not report ok: {stdout}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.

/// A PostgreSQL server of its own (Debian's `postgresql` package: `initdb` + `pg_ctl`) on a
/// loopback port in a temporary directory, trusting local connections, no fsync; stopped when
/// dropped. As root (CI), it runs as the `postgres` user the package creates.
pub struct PgServer {
    dir: TempDir,
    pub port: u16,
    bin: PathBuf,
    as_user: Option<&'static str>,
}

impl PgServer {
    /// `initdb` a cluster and start it.
    pub async fn start() -> PgServer {
        let bin = pg_bin_dir();
        let dir = TempDir::new("pg");
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let as_user = root.then_some("postgres");
        if let Some(u) = as_user {
            let ok = std::process::Command::new("chown")
                .args(["-R", u])
                .arg(&dir.0)
                .status()
                .unwrap();
            assert!(ok.success(), "chown {} to {u}", dir.0.display());
        }
        let port = free_port();
        let pg = PgServer {
            dir,
            port,
            bin,
            as_user,
        };
        let data = pg.dir.0.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "mofa",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        pg.start_again().await;
        pg
    }

    /// `prog` of the server's binaries, run as the server's user.
    fn command(&self, prog: &str) -> std::process::Command {
        let exe = self.bin.join(prog);
        match self.as_user {
            Some(u) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        }
    }

    fn run(&self, prog: &str, args: &[&str]) {
        let out = self
            .command(prog)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{prog}: {e}"));
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again, after [`PgServer::stop`]) and waits until it accepts.
    pub async fn start_again(&self) {
        let data = self.dir.0.join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.0.display()
        );
        let log = self.dir.0.join("pg.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        eventually("postgres accepts", WAIT, || accepts(addr)).await;
    }

    /// Stops the server (fast: open connections are cut).
    pub fn stop(&self) {
        let data = self.dir.0.join("data");
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// `postgres://mofa@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://mofa@127.0.0.1:{}/postgres", self.port)
    }

    /// A client connection (its driver task spawned).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.0.join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// Where `initdb` and `pg_ctl` are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin.
fn pg_bin_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(d) = std::env::split_paths(&path)
            .find(|d| is_executable(&d.join("initdb")) && is_executable(&d.join("pg_ctl")))
        {
            return d;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| is_executable(&d.join("initdb")))
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("initdb not found on PATH nor in /usr/lib/postgresql/*/bin: install Debian's `postgresql` package (apt-get install postgresql), as .ci/run does")
    })
}

/// A `redis-server` on a loopback port, without persistence; killed when dropped.
pub struct Redis {
    child: Option<std::process::Child>,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        let port = free_port();
        let mut r = Redis { child: None, port };
        r.restart().await;
        r
    }

    pub async fn restart(&mut self) {
        let child = std::process::Command::new(require_binary("redis-server", "redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        eventually("redis-server accepts", WAIT, || accepts(addr)).await;
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

//! The checks a parsed config must pass before the gateway starts, one named step per section
//! and per concern. Every error names the key at fault and the fix. Pure: it must not read
//! files or the environment, and must never repeat a secret's value.

use std::collections::HashSet;

use super::auth::{AuthMode, FileKeys, KeyConfig};
use super::error::{err, ConfigError};
use super::{
    Config, DeploymentConfig, DeploymentKind, LimitStore, ModelConfig, UpstreamApiKind, UsageStore,
};
use crate::prefix::MinMatch;
use crate::routing::Policy;

type Check = Result<(), ConfigError>;

/// Checks the whole config; `file_keys` are the keys of `auth.keys_file`, not merged yet.
pub(super) fn config(cfg: &Config, file_keys: Option<&FileKeys>) -> Check {
    server(cfg)?;
    resilience(cfg)?;
    admission(cfg)?;
    routing(cfg)?;
    models(cfg)?;
    auth(cfg, file_keys)?;
    limits(cfg)?;
    usage(cfg, file_keys)
}

fn usage(cfg: &Config, file_keys: Option<&FileKeys>) -> Check {
    let u = &cfg.usage;
    if u.store == UsageStore::Sqlite && u.path.trim().is_empty() {
        return err(
            "usage.path",
            "is empty; name the SQLite file, e.g. path = \"mofa-usage.db\"",
        );
    }
    if u.store == UsageStore::Postgres && u.url.as_deref().is_none_or(|s| s.trim().is_empty()) {
        return err(
            "usage.url",
            "is missing; store = \"postgres\" needs url = \"postgres://user:${PGPASSWORD}@host:5432/db\"",
        );
    }
    if u.budget_sync_ms == 0 || u.budget_sync_ms > 60_000 {
        return err(
            "usage.budget_sync_ms",
            "must be from 1 to 60000 (milliseconds)",
        );
    }
    let file = file_keys.map(|f| f.keys.as_slice()).unwrap_or_default();
    for k in cfg.auth.keys.iter().chain(file) {
        for (what, b) in [("budget", k.budget), ("token_budget", k.token_budget)] {
            let Some(b) = b else { continue };
            let at = format!("auth.keys[{}].{what}", k.name);
            if !(b.amount.is_finite() && b.amount > 0.0) {
                return err(&at, "amount must be a positive number");
            }
            if u.store == UsageStore::Off {
                return err(
                    &at,
                    "needs the usage ledger (budgets are counted from it): set [usage] store = \"sqlite\" (or \"postgres\")",
                );
            }
        }
    }
    if u.queue_capacity == 0 || u.queue_capacity > 10_000_000 {
        return err(
            "usage.queue_capacity",
            "must be from 1 to 10000000 (records)",
        );
    }
    if u.flush_interval_ms == 0 || u.flush_interval_ms > 1000 {
        return err(
            "usage.flush_interval_ms",
            "must be from 1 to 1000 (milliseconds)",
        );
    }
    Ok(())
}

fn routing(cfg: &Config) -> Check {
    let r = &cfg.routing;
    if let MinMatch::Share(s) = r.prefix_min_match {
        if !(0.0..=1.0).contains(&s) {
            return err(
                "routing.prefix_min_match",
                "a share of the prompt must be from 0.0 to 1.0 (e.g. 0.5); an integer is a length in bytes (e.g. 4096)",
            );
        }
    }
    for (key, n) in [
        ("routing.prefix_cache_entries", r.prefix_cache_entries),
        ("routing.session_cache_entries", r.session_cache_entries),
    ] {
        if n == 0 || n > 100_000_000 {
            return err(
                key,
                "must be from 1 to 100000000 (entries; about 80 bytes each)",
            );
        }
    }
    Ok(())
}

fn server(cfg: &Config) -> Check {
    let s = &cfg.server;
    if s.max_body_bytes == 0 {
        return err("server.max_body_bytes", "must be at least 1");
    }
    if s.max_response_bytes == 0 {
        return err("server.max_response_bytes", "must be at least 1");
    }
    if s.max_header_bytes < 8192 {
        return err("server.max_header_bytes", "must be at least 8192");
    }
    for (name, v) in [
        ("server.header_read_timeout_ms", s.header_read_timeout_ms),
        ("server.body_read_timeout_ms", s.body_read_timeout_ms),
    ] {
        if v == 0 {
            return err(name, "must be at least 1 (milliseconds)");
        }
    }
    if s.worker_threads > 1024 {
        return err(
            "server.worker_threads",
            "at most 1024 (0: one per CPU core)",
        );
    }
    Ok(())
}

fn resilience(cfg: &Config) -> Check {
    let r = &cfg.resilience;
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
    Ok(())
}

fn admission(cfg: &Config) -> Check {
    let a = &cfg.admission;
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
    Ok(())
}

fn models(cfg: &Config) -> Check {
    if cfg.models.is_empty() {
        return err(
            "models",
            "no model is configured; add a [[models]] table with a name and at least one [[models.deployments]]",
        );
    }
    let mut seen = HashSet::new();
    for (i, m) in cfg.models.iter().enumerate() {
        let key = format!("models[{i}]");
        if !seen.insert(m.name.as_str()) {
            return err(
                format!("{key}.name"),
                format!("model \"{}\" is defined twice; merge its deployments into one [[models]] table", m.name),
            );
        }
        model(m, &key)?;
        for (j, d) in m.deployments.iter().enumerate() {
            deployment(d, &format!("{key}.deployments[{j}]"))?;
        }
        model_policy(cfg, m, &key)?;
    }
    Ok(())
}

/// One `[[models]]` table on its own: name, deployment count, limits.
fn model(m: &ModelConfig, key: &str) -> Check {
    if m.name.trim().is_empty() || m.name.len() > 256 {
        return err(
            format!("{key}.name"),
            "must be 1 to 256 characters: the name clients send as \"model\"",
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
    positive(&format!("{key}.rpm"), m.rpm, "requests per minute")?;
    positive(&format!("{key}.tpm"), m.tpm, "tokens per minute")
}

/// An optional limit is absent or at least 1.
fn positive<T: Into<u64> + Copy>(key: &str, v: Option<T>, what: &str) -> Check {
    match v {
        Some(n) if n.into() == 0 => err(
            key,
            format!("must be at least 1 ({what}); remove it for no limit"),
        ),
        _ => Ok(()),
    }
}

/// The model's policy can be served by its deployments.
fn model_policy(cfg: &Config, m: &ModelConfig, key: &str) -> Check {
    let policy = m.policy.unwrap_or(cfg.routing.policy);
    let has = |k: DeploymentKind| m.deployments.iter().any(|d| d.kind == k);
    let has_local = has(DeploymentKind::Local) || has(DeploymentKind::Sim);
    let pkey = if m.policy.is_some() {
        format!("{key}.policy")
    } else {
        "routing.policy".to_string()
    };
    let name = &m.name;
    match policy {
        Policy::LocalOnly if !has_local => err(
            pkey,
            format!("\"local-only\" but model \"{name}\" has no local or sim deployment"),
        ),
        Policy::CloudOnly if !has(DeploymentKind::Cloud) => err(
            pkey,
            format!("\"cloud-only\" but model \"{name}\" has no cloud deployment"),
        ),
        Policy::DegradationLadder if !has_local => err(
            pkey,
            format!("\"degradation-ladder\" but model \"{name}\" has no local variants"),
        ),
        Policy::DegradationLadder => ladder_variants(m, key),
        Policy::Cost => cost_prices(m, key),
        _ => Ok(()),
    }
}

fn ladder_variants(m: &ModelConfig, key: &str) -> Check {
    for (j, d) in m.deployments.iter().enumerate() {
        if d.kind != DeploymentKind::Cloud && d.variant.is_none() {
            return err(
                format!("{key}.deployments[{j}].variant"),
                "required under \"degradation-ladder\": name each local variant (e.g. \"f16\", \"q8\", \"q4\"), listed from highest precision to lowest",
            );
        }
    }
    Ok(())
}

fn cost_prices(m: &ModelConfig, key: &str) -> Check {
    for (j, d) in m.deployments.iter().enumerate() {
        if d.kind == DeploymentKind::Cloud && d.price_per_1k_tokens.is_none() {
            return err(
                format!("{key}.deployments[{j}].price_per_1k_tokens"),
                "required for a cloud deployment under the \"cost\" policy, e.g. price_per_1k_tokens = 0.15",
            );
        }
    }
    Ok(())
}

/// One `[[models.deployments]]` table, `key` being its path.
fn deployment(d: &DeploymentConfig, key: &str) -> Check {
    match &d.command {
        Some(cmd) => launched(d, cmd, key)?,
        None => not_launched(d, key)?,
    }
    url(d, key)?;
    names(d, key)?;
    credentials(d, key)?;
    sizes(d, key)?;
    timeouts(d, key)?;
    headers(d, key)?;
    anthropic(d, key)?;
    sim_only(d, key)
}

/// A deployment with `command`: a server the gateway runs.
fn launched(d: &DeploymentConfig, cmd: &[String], key: &str) -> Check {
    if d.kind != DeploymentKind::Local {
        return err(
            format!("{key}.command"),
            "only a \"local\" deployment can be launched by the gateway; remove it",
        );
    }
    if d.url.is_some() {
        return err(
            format!("{key}.url"),
            "give either url (a server you run) or command (the gateway runs it), not both",
        );
    }
    if cmd.first().is_none_or(|p| p.trim().is_empty()) {
        return err(format!("{key}.command"), "must name a program, e.g. command = [\"llama-server\", \"-m\", \"model.gguf\", \"--port\", \"{port}\"]");
    }
    if !cmd.iter().any(|a| a.contains("{port}")) && !d.env.values().any(|v| v.contains("{port}")) {
        return err(format!("{key}.command"), "must pass \"{port}\" to the server (in an argument or env), so that the gateway knows where it listens");
    }
    if !d.ready_path.starts_with('/') {
        return err(
            format!("{key}.ready_path"),
            "must start with '/', e.g. \"/v1/models\" or \"/health\"",
        );
    }
    if d.startup_timeout_s == 0 {
        return err(format!("{key}.startup_timeout_s"), "must be at least 1");
    }
    Ok(())
}

/// Keys that only a launched server takes.
fn not_launched(d: &DeploymentConfig, key: &str) -> Check {
    for (name, set) in [
        ("idle_ttl_s", d.idle_ttl_s != 0),
        ("env", !d.env.is_empty()),
        ("cwd", d.cwd.is_some()),
    ] {
        if set {
            return err(
                format!("{key}.{name}"),
                "only applies with command (a server the gateway runs); remove it",
            );
        }
    }
    Ok(())
}

fn url(d: &DeploymentConfig, key: &str) -> Check {
    match (d.kind, &d.url) {
        (_, None) if d.command.is_some() => Ok(()),
        (DeploymentKind::Sim, Some(_)) => err(
            format!("{key}.url"),
            "a \"sim\" deployment runs inside the gateway and takes no url; remove it, or use kind = \"local\" for a separate `mofa-gateway sim`",
        ),
        (DeploymentKind::Local | DeploymentKind::Cloud, None) if d.api == UpstreamApiKind::Anthropic => err(
            format!("{key}.url"),
            "required: the root URL of the Messages API, e.g. url = \"https://api.anthropic.com\"",
        ),
        (DeploymentKind::Local | DeploymentKind::Cloud, None) => err(
            format!("{key}.url"),
            "required: the base URL of an OpenAI-compatible API, e.g. url = \"http://127.0.0.1:9001/v1\" (or, for kind = \"local\", a command the gateway runs)",
        ),
        (_, Some(url)) => match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
            _ => err(
                format!("{key}.url"),
                format!("\"{url}\" is not an http(s) URL; write it as \"http://host:port/v1\""),
            ),
        },
        (DeploymentKind::Sim, None) => Ok(()),
    }
}

/// `provider` and `variant`.
fn names(d: &DeploymentConfig, key: &str) -> Check {
    match (&d.provider, d.kind) {
        (Some(p), DeploymentKind::Cloud) if !valid_label(p) => {
            return err(
                format!("{key}.provider"),
                "use letters, digits, '-', '_' or '.' (e.g. \"openai\")",
            )
        }
        (None, DeploymentKind::Cloud) => {
            return err(
                format!("{key}.provider"),
                "required for kind = \"cloud\", e.g. provider = \"openai\"",
            )
        }
        (Some(_), DeploymentKind::Local | DeploymentKind::Sim) => {
            return err(
                format!("{key}.provider"),
                "only a \"cloud\" deployment has a provider; remove it",
            )
        }
        _ => {}
    }
    match &d.variant {
        Some(v) if !valid_label(v) => err(
            format!("{key}.variant"),
            "use letters, digits, '-', '_' or '.' (e.g. \"q8\")",
        ),
        _ => Ok(()),
    }
}

fn credentials(d: &DeploymentConfig, key: &str) -> Check {
    let Some(k) = &d.api_key else {
        return Ok(());
    };
    if d.kind == DeploymentKind::Sim {
        return err(
            format!("{key}.api_key"),
            "a \"sim\" deployment takes no api_key; remove it",
        );
    }
    if k.expose().is_empty() || k.expose().chars().any(|c| c.is_control()) {
        return err(
            format!("{key}.api_key"),
            "is empty or has control characters; check the environment variable it names",
        );
    }
    Ok(())
}

/// `upstream_model`, `memory_mb`, `price_per_1k_tokens`, `max_concurrency`.
fn sizes(d: &DeploymentConfig, key: &str) -> Check {
    if d.upstream_model.as_ref().is_some_and(|m| m.is_empty()) {
        return err(
            format!("{key}.upstream_model"),
            "is empty; remove it to forward the client's model name",
        );
    }
    if d.memory_mb.is_some() && d.kind == DeploymentKind::Cloud {
        return err(
            format!("{key}.memory_mb"),
            "a cloud deployment takes no local memory; remove it",
        );
    }
    if d.price_per_1k_tokens
        .is_some_and(|p| !(p.is_finite() && p >= 0.0))
    {
        return err(
            format!("{key}.price_per_1k_tokens"),
            "must be a number >= 0",
        );
    }
    for (name, v) in [
        ("input_price_per_1m", d.input_price_per_1m),
        ("output_price_per_1m", d.output_price_per_1m),
    ] {
        if v.is_some_and(|p| !(p.is_finite() && p >= 0.0)) {
            return err(format!("{key}.{name}"), "must be a number >= 0");
        }
    }
    if d.max_concurrency == 0 {
        return err(format!("{key}.max_concurrency"), "must be at least 1");
    }
    Ok(())
}

fn timeouts(d: &DeploymentConfig, key: &str) -> Check {
    for (name, ms) in [
        ("connect_timeout_ms", d.connect_timeout_ms),
        ("first_byte_timeout_ms", d.first_byte_timeout_ms),
        ("idle_timeout_ms", d.idle_timeout_ms),
    ] {
        if ms == 0 {
            return err(format!("{key}.{name}"), "must be at least 1 (milliseconds)");
        }
    }
    if d.health_check_interval_s > 0 && d.kind == DeploymentKind::Sim {
        return err(
            format!("{key}.health_check_interval_s"),
            "the in-process simulator needs no health check; remove it",
        );
    }
    Ok(())
}

fn headers(d: &DeploymentConfig, key: &str) -> Check {
    for (name, value) in &d.headers {
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
    Ok(())
}

/// `api = "anthropic"`: its `anthropic_version`, and no header that would carry a second key or
/// version; `anthropic_version` with another API.
fn anthropic(d: &DeploymentConfig, key: &str) -> Check {
    if d.api != UpstreamApiKind::Anthropic {
        if d.anthropic_version.is_some() {
            return err(
                format!("{key}.anthropic_version"),
                "only applies with api = \"anthropic\"; remove it",
            );
        }
        return Ok(());
    }
    if let Some(v) = &d.anthropic_version {
        if v.trim().is_empty() || axum::http::HeaderValue::from_str(v).is_err() {
            return err(
                format!("{key}.anthropic_version"),
                "is not a valid header value; write it as anthropic_version = \"2023-06-01\"",
            );
        }
    }
    for name in d.headers.keys() {
        if name.eq_ignore_ascii_case("x-api-key") {
            return err(
                format!("{key}.headers.{name}"),
                "set the key with api_key instead, so that it stays masked",
            );
        }
        if name.eq_ignore_ascii_case("anthropic-version") {
            return err(
                format!("{key}.headers.{name}"),
                "set it with anthropic_version instead",
            );
        }
    }
    Ok(())
}

/// `ttft_ms` and `tokens_per_sec`.
fn sim_only(d: &DeploymentConfig, key: &str) -> Check {
    if d.kind != DeploymentKind::Sim {
        for (name, set) in [
            ("ttft_ms", d.ttft_ms.is_some()),
            ("tokens_per_sec", d.tokens_per_sec.is_some()),
        ] {
            if set {
                return err(
                    format!("{key}.{name}"),
                    format!("only a \"sim\" deployment takes {name}; remove it"),
                );
            }
        }
    }
    if d.tokens_per_sec
        .is_some_and(|t| !(t.is_finite() && t >= 0.0))
    {
        return err(
            format!("{key}.tokens_per_sec"),
            "must be a number >= 0 (0: as fast as possible)",
        );
    }
    Ok(())
}

/// `[auth]`, with the keys of `keys_file`.
fn auth(cfg: &Config, file_keys: Option<&FileKeys>) -> Check {
    let a = &cfg.auth;
    let inline = a
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("auth.keys[{i}]"), k));
    let from_file = file_keys.into_iter().flat_map(|f| {
        f.keys
            .iter()
            .enumerate()
            .map(move |(i, k)| (format!("{}: keys[{i}]", f.label), k))
    });
    let all: Vec<(String, &KeyConfig)> = inline.chain(from_file).collect();
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    for (key, k) in &all {
        api_key(cfg, k, key)?;
        if !names.insert(k.name.as_str()) {
            return err(
                format!("{key}.name"),
                format!(
                    "key \"{}\" is declared twice; give each key its own name",
                    k.name
                ),
            );
        }
        if !hashes.insert(&k.hash) {
            return err(
                format!("{key}.hash"),
                "the same secret is declared for two keys; give each client its own key (`mofa-gateway keys new`)",
            );
        }
    }
    match a.mode {
        AuthMode::Keys if all.is_empty() => err(
            "auth.keys",
            "mode = \"keys\" but no key is declared, so every request would be refused; add a [[auth.keys]] table (`mofa-gateway keys new --name NAME` prints one), or set mode = \"none\"",
        ),
        AuthMode::None if !all.is_empty() || !a.admin_keys.is_empty() => err(
            "auth.mode",
            "keys are declared but mode = \"none\" lets every request in without one; set mode = \"keys\" to require them, or remove the keys",
        ),
        _ => Ok(()),
    }
}

/// One `[[auth.keys]]` table, `key` being its path.
fn api_key(cfg: &Config, k: &KeyConfig, key: &str) -> Check {
    if !valid_label(&k.name) {
        return err(
            format!("{key}.name"),
            "must be 1 to 64 letters, digits, '-', '_' or '.' (e.g. \"team-a\")",
        );
    }
    if let Some(models) = &k.models {
        if models.is_empty() {
            return err(
                format!("{key}.models"),
                "is empty, so the key could use no model; list the models it may use, or remove it to allow all",
            );
        }
        for (i, m) in models.iter().enumerate() {
            if !cfg.models.iter().any(|c| &c.name == m) {
                return err(
                    format!("{key}.models[{i}]"),
                    format!(
                        "\"{m}\" is not a configured model; use a name from a [[models]] table"
                    ),
                );
            }
        }
    }
    if k.default_priority > k.max_priority {
        return err(
            format!("{key}.default_priority"),
            format!(
                "\"{}\" is above max_priority \"{}\" (default_priority defaults to \"normal\"); set default_priority to at most \"{}\"",
                k.default_priority, k.max_priority, k.max_priority
            ),
        );
    }
    positive(&format!("{key}.rpm"), k.rpm, "requests per minute")?;
    positive(&format!("{key}.tpm"), k.tpm, "tokens per minute")?;
    positive(
        &format!("{key}.max_parallel"),
        k.max_parallel,
        "requests in flight",
    )
}

/// `[limits]`.
fn limits(cfg: &Config) -> Check {
    let l = &cfg.limits;
    match (l.store, &l.redis_url) {
        (LimitStore::Redis, None) => {
            return err(
                "limits.redis_url",
                "required with store = \"redis\", e.g. redis_url = \"redis://127.0.0.1:6379\" (${REDIS_URL} allowed)",
            )
        }
        (LimitStore::Memory, Some(_)) => {
            return err(
                "limits.redis_url",
                "only used with store = \"redis\"; set store = \"redis\" to share limits, or remove it",
            )
        }
        (LimitStore::Redis, Some(url)) => redis_url(url)?,
        (LimitStore::Memory, None) => {}
    }
    if l.redis_timeout_ms == 0 || l.redis_timeout_ms > 60_000 {
        return err(
            "limits.redis_timeout_ms",
            "must be from 1 to 60000 (milliseconds)",
        );
    }
    Ok(())
}

/// The URL is never repeated: it may hold a password.
fn redis_url(url: &str) -> Check {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host().is_some() => Ok(()),
        Ok(u) if matches!(u.scheme(), "redis+unix" | "unix") => Ok(()),
        _ => err(
            "limits.redis_url",
            "is not a Redis URL; write it as \"redis://[:password@]host:port[/db]\" (rediss:// for TLS, unix:///path for a socket)",
        ),
    }
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

//! Metrics: the Prometheus registry behind `GET /metrics`, and the recent-history windows
//! behind the status page.
//!
//! Owns the metric names (prefix `mofa_gateway_`, base units, `_total` counters), their help
//! texts and histogram buckets (OpenTelemetry GenAI conventions), and a per-model ring of the
//! last five minutes, one slot a second. It is fed by `proxy::observe` (one [`Sample`] per
//! finished request, one call per upstream attempt) and, for `rate_limited_total`, by the limit
//! phase through [`Metrics::rate_limited`]; state gauges are read from the orchestrator's
//! snapshots at scrape time ([`Metrics::render`]), never updated on the request path.
//!
//! The windows' latency percentiles are of *served* requests only (status 2xx: the head of a
//! 200 was sent, including a stream its backend cut afterwards), so that a burst of instant
//! 503 rejections never shows as a fast p50; the rejections are counted in the outcome rates.
//!
//! It must not take a label value from client input: model, backend, deployment and key names
//! come from the config, reasons and priorities from closed sets; a name it does not know is
//! counted under the empty label. It imports nothing of the crate and does no I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::{counter, gauge, histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use serde_json::{json, Value};

const REQUESTS: &str = "mofa_gateway_requests_total";
const DURATION: &str = "mofa_gateway_request_duration_seconds";
const TTFT: &str = "mofa_gateway_time_to_first_token_seconds";
const TPOT: &str = "mofa_gateway_time_per_output_token_seconds";
const QUEUE_WAIT: &str = "mofa_gateway_queue_wait_seconds";
const TOKENS: &str = "mofa_gateway_tokens_total";
const ATTEMPTS: &str = "mofa_gateway_upstream_attempts_total";
const RATE_LIMITED: &str = "mofa_gateway_rate_limited_total";
const IN_FLIGHT: &str = "mofa_gateway_in_flight";
const MAX_CONCURRENCY: &str = "mofa_gateway_max_concurrency";
const QUEUE_DEPTH: &str = "mofa_gateway_queue_depth";
const MEM_RESIDENT: &str = "mofa_gateway_memory_resident_bytes";
const MEM_CAPACITY: &str = "mofa_gateway_memory_capacity_bytes";
const POOL_STATE: &str = "mofa_gateway_pool_state";
const BREAKER: &str = "mofa_gateway_breaker_state";
const RELOADS: &str = "mofa_gateway_config_reloads_total";
const CONFIG_INFO: &str = "mofa_gateway_config_info";
const COST: &str = "mofa_gateway_cost_total";
const USAGE_WRITTEN: &str = "mofa_gateway_usage_written_total";
const USAGE_DROPPED: &str = "mofa_gateway_usage_dropped_total";
const PREFIX_MATCH: &str = "mofa_gateway_prefix_match_ratio";
const AFFINITY_ENTRIES: &str = "mofa_gateway_affinity_entries";
const AFFINITY_CAPACITY: &str = "mofa_gateway_affinity_capacity_entries";
const AFFINITY_BYTES: &str = "mofa_gateway_affinity_bytes";

/// Shares of the prompt found on the deployment chosen (0: none; 1: all).
pub(crate) const PREFIX_BUCKETS: [f64; 12] =
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0];

/// OpenTelemetry GenAI `gen_ai.server.time_to_first_token` buckets.
pub(crate) const TTFT_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// OpenTelemetry GenAI `gen_ai.server.request.duration` buckets.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// OpenTelemetry GenAI `gen_ai.server.time_per_output_token` buckets.
pub(crate) const TPOT_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// Queue waits: from a free slot at once to the longest configured wait.
pub(crate) const QUEUE_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

const MIB: f64 = 1_048_576.0;
const PRIORITIES: [&str; 4] = ["low", "normal", "high", "critical"];
const POOL_STATES: [&str; 5] = ["stopped", "starting", "ready", "stopping", "failed"];

/// One finished request, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample<'a> {
    /// A configured model name, or `""` (the request named none the gateway serves).
    pub model: &'a str,
    /// The deployment that served it, or `""`.
    pub backend: &'a str,
    pub status: u16,
    /// A closed set (`observe::Reason`).
    pub reason: &'static str,
    pub total: Duration,
    /// From arrival to the first byte of a stream.
    pub ttft: Option<Duration>,
    pub queue_wait: Option<(&'static str, Duration)>,
    /// Input and output tokens, from the upstream's `usage`.
    pub tokens: Option<(u64, u64)>,
    /// Under `prefix-aware`: the share of the prompt the deployment was sent before.
    pub prefix_match: Option<f64>,
}

/// The registry, its recent-history windows, and when it started.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    recent: Recent,
    /// The handles of each (model, backend)'s series, resolved once: the request path then
    /// adds to atomics, without building label sets and looking them up in the registry.
    /// By model, then backend; at most [`MAX_SERIES`] in all.
    series: RwLock<HashMap<String, HashMap<String, Arc<Series>>>>,
    /// `queue_wait_seconds` by priority ([`PRIORITIES`] order).
    queue_wait: [Histogram; 4],
    /// `upstream_attempts_total` by outcome (a closed set).
    attempts: Mutex<Vec<(&'static str, Counter)>>,
    /// The hash of the config in effect, for `config_info` (rendered by hand: one series, the
    /// current one, not one per config ever loaded).
    config_hash: Mutex<String>,
    /// `cost_total` by model, then key: currency units, a float (its bits in the atomic), so
    /// rendered by hand (the recorder's counters count integers). Resolved once per pair, as
    /// `series` is; at most [`MAX_SERIES`] pairs, names from the config.
    costs: RwLock<HashMap<String, HashMap<String, Arc<AtomicU64>>>>,
}

/// The most (model, backend) pairs and (status, reason) pairs per pair whose handles are
/// kept; beyond them (never with label values from the config) series are looked up each time.
const MAX_SERIES: usize = 4096;
const MAX_OUTCOMES: usize = 256;

/// The series of one (model, backend).
struct Series {
    model: String,
    backend: String,
    duration: Histogram,
    ttft: Histogram,
    tpot: Histogram,
    tokens_in: Counter,
    tokens_out: Counter,
    /// `prefix_match_ratio`, registered on first use (only `prefix-aware` models have it).
    prefix_match: std::sync::OnceLock<Histogram>,
    /// `requests_total` by (status, reason).
    requests: Mutex<Vec<((u16, &'static str), Counter)>>,
}

impl Series {
    /// Registers the series (call under the local recorder).
    fn new(model: &str, backend: &str) -> Series {
        let (m, b) = (model.to_owned(), backend.to_owned());
        Series {
            duration: histogram!(DURATION, "model" => m.clone(), "backend" => b.clone()),
            ttft: histogram!(TTFT, "model" => m.clone(), "backend" => b.clone()),
            tpot: histogram!(TPOT, "model" => m.clone(), "backend" => b.clone()),
            tokens_in: counter!(TOKENS, "model" => m.clone(), "backend" => b.clone(), "type" => "input"),
            tokens_out: counter!(TOKENS, "model" => m.clone(), "backend" => b.clone(), "type" => "output"),
            requests: Mutex::new(Vec::new()),
            prefix_match: std::sync::OnceLock::new(),
            model: m,
            backend: b,
        }
    }

    /// The `requests_total` counter of (status, reason).
    fn requests(&self, rec: &PrometheusRecorder, status: u16, reason: &'static str) -> Counter {
        cached(&self.requests, (status, reason), || {
            metrics::with_local_recorder(rec, || {
                counter!(REQUESTS, "model" => self.model.clone(), "backend" => self.backend.clone(),
                    "status" => status_label(status), "reason" => reason)
            })
        })
    }
}

/// The counter kept under `key` in `seen`, registered with `register` on first use; at most
/// [`MAX_OUTCOMES`] are kept (beyond, each use registers again: the registry finds the series).
fn cached<K: PartialEq>(
    seen: &Mutex<Vec<(K, Counter)>>,
    key: K,
    register: impl FnOnce() -> Counter,
) -> Counter {
    let mut seen = lock(seen);
    if let Some((_, c)) = seen.iter().find(|(k, _)| *k == key) {
        return c.clone();
    }
    let c = register();
    if seen.len() < MAX_OUTCOMES {
        seen.push((key, c.clone()));
    }
    c
}

impl Metrics {
    /// A registry for a gateway serving `models` (the windows are kept per model).
    pub(crate) fn new(models: &[String]) -> Metrics {
        let mut b = PrometheusBuilder::new();
        for (name, buckets) in [
            (TTFT, &TTFT_BUCKETS[..]),
            (DURATION, &DURATION_BUCKETS[..]),
            (TPOT, &TPOT_BUCKETS[..]),
            (QUEUE_WAIT, &QUEUE_BUCKETS[..]),
            (PREFIX_MATCH, &PREFIX_BUCKETS[..]),
        ] {
            b = b
                .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                .expect("constant, non-empty buckets");
        }
        let recorder = b.build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        let queue_wait = metrics::with_local_recorder(&recorder, || {
            PRIORITIES.map(|p| histogram!(QUEUE_WAIT, "priority" => p))
        });
        Metrics {
            recorder,
            handle,
            recent: Recent::new(models),
            series: RwLock::new(HashMap::new()),
            queue_wait,
            attempts: Mutex::new(Vec::new()),
            config_hash: Mutex::new(String::new()),
            costs: RwLock::new(HashMap::new()),
        }
    }

    /// The series of (model, backend), registered on first use.
    fn series(&self, model: &str, backend: &str) -> Arc<Series> {
        let known = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .and_then(|m| m.get(backend))
            .cloned();
        if let Some(s) = known {
            return s;
        }
        let s = Arc::new(metrics::with_local_recorder(&self.recorder, || {
            Series::new(model, backend)
        }));
        let mut map = self.series.write().unwrap_or_else(|e| e.into_inner());
        if map.values().map(HashMap::len).sum::<usize>() < MAX_SERIES {
            map.entry(model.to_owned())
                .or_default()
                .entry(backend.to_owned())
                .or_insert_with(|| s.clone());
        }
        s
    }

    /// Counts a finished request.
    pub(crate) fn finished(&self, s: &Sample<'_>) {
        let series = self.series(s.model, s.backend);
        series
            .requests(&self.recorder, s.status, s.reason)
            .increment(1);
        series.duration.record(s.total.as_secs_f64());
        if let Some(t) = s.ttft {
            series.ttft.record(t.as_secs_f64());
            if let Some((_, out)) = s.tokens.filter(|(_, out)| *out > 1) {
                let per = s.total.saturating_sub(t).as_secs_f64() / (out - 1) as f64;
                series.tpot.record(per);
            }
        }
        if let Some((prio, wait)) = s.queue_wait {
            if let Some(i) = PRIORITIES.iter().position(|p| *p == prio) {
                self.queue_wait[i].record(wait.as_secs_f64());
            }
        }
        if let Some((input, output)) = s.tokens {
            series.tokens_in.increment(input);
            series.tokens_out.increment(output);
        }
        if let Some(share) = s.prefix_match {
            let h = series.prefix_match.get_or_init(|| {
                metrics::with_local_recorder(&self.recorder, || {
                    histogram!(PREFIX_MATCH, "model" => series.model.clone(), "backend" => series.backend.clone())
                })
            });
            h.record(share);
        }
        self.recent.record(s);
    }

    /// Counts one try on an upstream: `ok` (it answered), or why it failed (a closed set).
    pub(crate) fn upstream_attempt(&self, outcome: &'static str) {
        cached(&self.attempts, outcome, || {
            metrics::with_local_recorder(
                &self.recorder,
                || counter!(ATTEMPTS, "outcome" => outcome),
            )
        })
        .increment(1);
    }

    /// Counts a request refused by a rate limit: `key` is the key's configured `name` (never
    /// its secret), `limit` which limit it hit (`requests`, `tokens`, `concurrency`).
    pub(crate) fn rate_limited(&self, key: &str, limit: &'static str) {
        let key = key.to_owned();
        metrics::with_local_recorder(&self.recorder, || {
            counter!(RATE_LIMITED, "key" => key, "limit" => limit).increment(1);
        });
    }

    /// Moves recorded histogram samples into their buckets (bounds the memory they take
    /// between two scrapes); run every few seconds.
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition, with the state gauges read now from `orch` (the
    /// orchestrator's admin view) and `pool` (the pool's).
    /// `usage`: the ledger's records written and dropped, when it has a store.
    pub(crate) fn render(&self, orch: &Value, pool: &Value, usage: Option<(u64, u64)>) -> String {
        metrics::with_local_recorder(&self.recorder, || set_gauges(orch, pool));
        let mut text = self.handle.render();
        if let Some((written, dropped)) = usage {
            use std::fmt::Write;
            let _ = write!(
                text,
                "# HELP {USAGE_WRITTEN} Usage records written to the ledger's store.\n\
                 # TYPE {USAGE_WRITTEN} counter\n{USAGE_WRITTEN} {written}\n\
                 # HELP {USAGE_DROPPED} Usage records dropped: the queue to the store was full.\n\
                 # TYPE {USAGE_DROPPED} counter\n{USAGE_DROPPED} {dropped}\n"
            );
        }
        {
            let costs = self.costs.read().unwrap_or_else(|e| e.into_inner());
            let mut pairs: Vec<(&String, &String, f64)> = costs
                .iter()
                .flat_map(|(m, keys)| {
                    keys.iter()
                        .map(move |(k, v)| (m, k, f64::from_bits(v.load(Ordering::Relaxed))))
                })
                .collect();
            pairs.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            if !pairs.is_empty() {
                use std::fmt::Write;
                let _ = write!(
                    text,
                    "# HELP {COST} Cost of the tokens used, from the serving deployment's prices, by model and API key name.\n# TYPE {COST} counter\n"
                );
                for (model, key, v) in pairs {
                    let _ = writeln!(
                        text,
                        "{COST}{{model=\"{}\",key=\"{}\"}} {v}",
                        escape_label(model),
                        escape_label(key)
                    );
                }
            }
        }
        let hash = lock(&self.config_hash).clone();
        if !hash.is_empty() {
            use std::fmt::Write;
            let _ = write!(
                text,
                "# HELP {CONFIG_INFO} The configuration in effect, by its hash (always 1).\n\
                 # TYPE {CONFIG_INFO} gauge\n{CONFIG_INFO}{{hash=\"{hash}\"}} 1\n"
            );
        }
        text
    }

    /// Adds `amount` to the cost of `model` (a configured name, or `""`) for `key` (a key's
    /// configured name, or `""` without keys).
    pub(crate) fn cost(&self, model: &str, key: &str, amount: f64) {
        let known = self
            .costs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .and_then(|keys| keys.get(key))
            .cloned();
        let total = match known {
            Some(t) => t,
            None => {
                let mut map = self.costs.write().unwrap_or_else(|e| e.into_inner());
                let known = map.get(model).and_then(|keys| keys.get(key)).cloned();
                match known {
                    Some(t) => t,
                    None if map.values().map(HashMap::len).sum::<usize>() < MAX_SERIES => map
                        .entry(model.to_owned())
                        .or_default()
                        .entry(key.to_owned())
                        .or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits())))
                        .clone(),
                    None => return,
                }
            }
        };
        let _ = total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + amount).to_bits())
        });
    }

    /// A config was put into effect (at start, or by a reload): its hash (hex).
    pub(crate) fn config_loaded(&self, hash: &str) {
        *lock(&self.config_hash) = hash.to_owned();
    }

    /// Counts a reload by its result: `ok`, `invalid` (the file did not validate), `refused`
    /// (it changes a key that needs a restart), `failed` (the new config could not be built).
    pub(crate) fn config_reload(&self, result: &'static str) {
        metrics::with_local_recorder(&self.recorder, || {
            counter!(RELOADS, "result" => result).increment(1);
        });
    }

    /// Windows for models a reload added.
    pub(crate) fn add_models(&self, models: &[String]) {
        self.recent.add(models);
    }

    /// The last minute of `model` for the status page: requests/s and outcome rates of every
    /// request, p50/p99 of the served ones (status 2xx; `served` says how many).
    pub(crate) fn last_minute(&self, model: &str) -> Value {
        self.recent.last_minute(model)
    }

    /// The last five minutes of all models, a point a second, for the status page's chart.
    pub(crate) fn chart(&self) -> Value {
        self.recent.chart()
    }
}

/// A label value as the Prometheus text format writes it.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn status_label(status: u16) -> String {
    status.to_string()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS,
        "Requests finished, by model, deployment, status (499: the client left) and reason."
    );
    describe_histogram!(
        DURATION,
        Unit::Seconds,
        "Time from arrival to the last byte of the reply."
    );
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Streams: time from arrival to the first byte sent to the client."
    );
    describe_histogram!(
        TPOT,
        Unit::Seconds,
        "Streams: time per output token after the first (tokens from usage)."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time admitted requests waited for a slot."
    );
    describe_counter!(
        TOKENS,
        "Tokens from the upstreams' usage, input and output."
    );
    describe_counter!(
        ATTEMPTS,
        "Tries on upstream deployments: ok, or why the try failed."
    );
    describe_counter!(
        RELOADS,
        "Configuration reloads, by result: ok, invalid (did not validate), refused (needs a \
         restart), failed (could not be built)."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused with 429, by key name and the limit hit."
    );
    describe_histogram!(
        PREFIX_MATCH,
        "prefix-aware models: the share of each request's prompt that the deployment chosen had \
         been sent before (likely still in its KV cache)."
    );
    describe_gauge!(
        AFFINITY_ENTRIES,
        "Entries the affinity policy of a model remembers: prompt blocks (kind=prefix) or \
         sessions (kind=session)."
    );
    describe_gauge!(
        AFFINITY_CAPACITY,
        "The most entries the affinity policy of a model remembers (routing.prefix_cache_entries \
         or routing.session_cache_entries)."
    );
    describe_gauge!(
        AFFINITY_BYTES,
        Unit::Bytes,
        "Memory the affinity policy's index of a model takes, approximately."
    );
    describe_gauge!(IN_FLIGHT, "Requests running on a deployment now.");
    describe_gauge!(MAX_CONCURRENCY, "Slots of a deployment.");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting for a slot, by priority.");
    describe_gauge!(
        MEM_RESIDENT,
        Unit::Bytes,
        "Memory of the resident local models (their declared memory_mb, in bytes)."
    );
    describe_gauge!(
        MEM_CAPACITY,
        Unit::Bytes,
        "The memory budget of local models (memory_capacity_mb, in bytes)."
    );
    describe_gauge!(
        POOL_STATE,
        "Managed model servers: 1 for the state each is in, 0 for the others."
    );
    describe_gauge!(
        BREAKER,
        "Circuit breaker of a deployment: 0 closed, 1 half-open, 2 open."
    );
}

/// Sets the state gauges from the admin views (read at scrape time).
fn set_gauges(orch: &Value, pool: &Value) {
    if let Some(models) = orch["models"].as_object() {
        for (name, m) in models {
            for prio in PRIORITIES {
                let depth = m["queue"]["by_priority"][prio].as_f64().unwrap_or(0.0);
                gauge!(QUEUE_DEPTH, "model" => name.clone(), "priority" => prio).set(depth);
            }
            let a = &m["affinity"];
            if let Some(kind) = a["kind"].as_str() {
                let labels = [("model", name.clone()), ("kind", kind.to_owned())];
                gauge!(AFFINITY_ENTRIES, &labels).set(a["entries"].as_f64().unwrap_or(0.0));
                gauge!(AFFINITY_CAPACITY, &labels).set(a["capacity"].as_f64().unwrap_or(0.0));
                gauge!(AFFINITY_BYTES, &labels).set(a["bytes"].as_f64().unwrap_or(0.0));
            }
            for d in m["deployments"].as_array().into_iter().flatten() {
                let dep = d["backend"].as_str().unwrap_or_default().to_owned();
                let labels = [("model", name.clone()), ("deployment", dep)];
                gauge!(IN_FLIGHT, &labels).set(d["in_flight"].as_f64().unwrap_or(0.0));
                gauge!(MAX_CONCURRENCY, &labels).set(d["max_concurrency"].as_f64().unwrap_or(0.0));
                let breaker = match d["breaker"].as_str() {
                    Some("half_open") => 1.0,
                    Some("open") => 2.0,
                    _ => 0.0,
                };
                gauge!(BREAKER, &labels).set(breaker);
            }
        }
    }
    let mem = &orch["memory"];
    // The config's MB are MiB (2^20 bytes); Prometheus wants base units.
    let bytes = |v: &Value| v.as_f64().unwrap_or(0.0) * MIB;
    gauge!(MEM_RESIDENT).set(bytes(&mem["resident_mb"]));
    gauge!(MEM_CAPACITY).set(bytes(&mem["capacity_mb"]));
    for p in pool["models"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        let now = p["state"].as_str().unwrap_or_default();
        for state in POOL_STATES {
            let v = if state == now { 1.0 } else { 0.0 };
            gauge!(POOL_STATE, "model" => name.to_owned(), "state" => state).set(v);
        }
    }
}

// --- recent history --------------------------------------------------------------------------

/// Seconds of history kept (the chart's five minutes).
const HISTORY_S: usize = 300;
/// Upper bounds (seconds) of the windows' latency buckets; one more bucket for the rest.
const LAT_BOUNDS: [f64; 17] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0,
    100.0,
];
const NB: usize = LAT_BOUNDS.len() + 1;

/// How a request ended, for the status page's rates and chart.
#[derive(Clone, Copy)]
enum Class {
    Ok = 0,
    /// 503 from admission.
    Rejected,
    /// 429.
    Limited,
    /// Other 4xx (the request was bad).
    Invalid,
    /// 5xx from upstream, or a stream broken after its first byte.
    Error,
    /// 499: the client left.
    Gone,
}
const CLASSES: [&str; 6] = ["ok", "rejected", "limited", "invalid", "error", "gone"];

fn class_of(s: &Sample<'_>) -> Class {
    match (s.status, s.reason) {
        (200, "ok") => Class::Ok,
        (200, _) => Class::Error,
        (499, _) => Class::Gone,
        (429, _) => Class::Limited,
        (503, r) if r != "upstream_error" => Class::Rejected,
        (400..=499, _) => Class::Invalid,
        _ => Class::Error,
    }
}

/// Whether a request's latency counts in the windows' percentiles: it was served (status
/// 2xx: a 200 head was sent, whether the body then completed or its stream was cut). The time
/// of a rejection, a bad request, an upstream error or a client that left says nothing of how
/// fast the model serves (an instant 503 would pull the p50 towards 0).
fn served(s: &Sample<'_>) -> bool {
    (200..300).contains(&s.status)
}

/// One second of one model.
#[derive(Clone, Copy, Default)]
struct Sec {
    /// Which second (since start) this slot holds.
    t: u64,
    /// Every finished request, by outcome.
    by_class: [u32; 6],
    /// Served requests only ([`served`]): time from arrival to the last byte.
    total: [u32; NB],
    /// Streams that sent a first byte (a 200 head; the client may have left later).
    ttft: [u32; NB],
}

struct Ring {
    secs: Box<[Sec]>,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            secs: vec![Sec::default(); HISTORY_S].into_boxed_slice(),
        }
    }

    fn slot(&mut self, t: u64) -> &mut Sec {
        let s = &mut self.secs[(t % HISTORY_S as u64) as usize];
        if s.t != t {
            *s = Sec {
                t,
                ..Sec::default()
            };
        }
        s
    }

    /// The slot of second `t`, if it still holds it.
    fn get(&self, t: u64) -> Option<&Sec> {
        let s = &self.secs[(t % HISTORY_S as u64) as usize];
        (s.t == t).then_some(s)
    }
}

fn bucket(d: Duration) -> usize {
    let x = d.as_secs_f64();
    LAT_BOUNDS.iter().position(|b| x <= *b).unwrap_or(NB - 1)
}

/// The `q` quantile of bucket counts, in milliseconds (linear within a bucket), or null.
fn quantile_ms(counts: &[u32; NB], q: f64) -> Value {
    let n: u64 = counts.iter().map(|c| u64::from(*c)).sum();
    if n == 0 {
        return Value::Null;
    }
    let rank = q * n as f64;
    let mut seen = 0.0;
    for (i, c) in counts.iter().enumerate() {
        let c = f64::from(*c);
        if c > 0.0 && seen + c >= rank {
            let lo = if i == 0 { 0.0 } else { LAT_BOUNDS[i - 1] };
            let hi = LAT_BOUNDS.get(i).copied().unwrap_or(lo * 2.0);
            let v = lo + (hi - lo) * ((rank - seen) / c).clamp(0.0, 1.0);
            return json!((v * 1e6).round() / 1e3);
        }
        seen += c;
    }
    Value::Null
}

/// Per-model rings (models from the config, plus one for requests that named none). A reload
/// that adds a model adds its ring; a removed model's ring stays (its last minutes are real).
struct Recent {
    start: Instant,
    models: ArcSwap<Vec<(String, Arc<Mutex<Ring>>)>>,
    other: Arc<Mutex<Ring>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Recent {
    fn new(models: &[String]) -> Recent {
        Recent {
            start: Instant::now(),
            models: ArcSwap::from_pointee(
                models
                    .iter()
                    .map(|m| (m.clone(), Arc::new(Mutex::new(Ring::new()))))
                    .collect(),
            ),
            other: Arc::new(Mutex::new(Ring::new())),
        }
    }

    /// Adds the rings of `models` that have none (a reload).
    fn add(&self, models: &[String]) {
        let mut all: Vec<_> = self.models.load().iter().cloned().collect();
        for m in models {
            if !all.iter().any(|(n, _)| n == m) {
                all.push((m.clone(), Arc::new(Mutex::new(Ring::new()))));
            }
        }
        self.models.store(Arc::new(all));
    }

    fn ring(&self, model: &str) -> Arc<Mutex<Ring>> {
        self.models
            .load()
            .iter()
            .find(|(m, _)| m == model)
            .map_or_else(|| self.other.clone(), |(_, r)| r.clone())
    }

    fn now_s(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn record(&self, s: &Sample<'_>) {
        self.record_at(self.now_s(), s);
    }

    /// Counts `s` in second `t` (since start).
    fn record_at(&self, t: u64, s: &Sample<'_>) {
        let class = class_of(s) as usize;
        let ring = self.ring(s.model);
        let mut ring = lock(&ring);
        let slot = ring.slot(t);
        slot.by_class[class] += 1;
        if served(s) {
            slot.total[bucket(s.total)] += 1;
        }
        if let Some(ttft) = s.ttft {
            slot.ttft[bucket(ttft)] += 1;
        }
    }

    fn last_minute(&self, model: &str) -> Value {
        self.last_minute_at(model, self.now_s())
    }

    /// The last minute of `model` as of second `now` (since start).
    fn last_minute_at(&self, model: &str, now: u64) -> Value {
        // The current second is partial: the minute is the 60 whole seconds before it, or
        // everything since start while it is younger than that.
        let from = now.saturating_sub(60);
        let span = (now - from).max(1) as f64;
        let mut sum = Sec::default();
        {
            let ring = self.ring(model);
            let ring = lock(&ring);
            for t in from..now {
                if let Some(s) = ring.get(t) {
                    add(&mut sum, s);
                }
            }
        }
        let n: u32 = sum.by_class.iter().sum();
        let rate = |c: Class| {
            if n == 0 {
                0.0
            } else {
                f64::from(sum.by_class[c as usize]) / f64::from(n)
            }
        };
        json!({
            "requests": n,
            "rps": (f64::from(n) / span * 100.0).round() / 100.0,
            // The requests the percentiles are of (see `served`).
            "served": sum.total.iter().sum::<u32>(),
            "p50_ms": quantile_ms(&sum.total, 0.5),
            "p99_ms": quantile_ms(&sum.total, 0.99),
            "ttft_p50_ms": quantile_ms(&sum.ttft, 0.5),
            "ttft_p99_ms": quantile_ms(&sum.ttft, 0.99),
            "rate_503": rate(Class::Rejected),
            "rate_429": rate(Class::Limited),
            "by_outcome": by_class(&sum),
        })
    }

    fn chart(&self) -> Value {
        let now = self.now_s();
        let from = now.saturating_sub(HISTORY_S as u64 - 1);
        let all: Vec<Arc<Mutex<Ring>>> = self
            .models
            .load()
            .iter()
            .map(|(_, r)| r.clone())
            .chain(std::iter::once(self.other.clone()))
            .collect();
        let rings: Vec<MutexGuard<'_, Ring>> = all.iter().map(|r| lock(r)).collect();
        let points: Vec<Value> = (from..now)
            .map(|t| {
                let mut sum = Sec::default();
                for r in &rings {
                    if let Some(s) = r.get(t) {
                        add(&mut sum, s);
                    }
                }
                json!({
                    "t": t,
                    "by_outcome": by_class(&sum),
                    "ttft_p50_ms": quantile_ms(&sum.ttft, 0.5),
                    "ttft_p99_ms": quantile_ms(&sum.ttft, 0.99),
                })
            })
            .collect();
        json!({ "now_s": now, "outcomes": CLASSES, "points": points })
    }
}

fn add(sum: &mut Sec, s: &Sec) {
    for (a, b) in sum.by_class.iter_mut().zip(s.by_class) {
        *a += b;
    }
    for (a, b) in sum.total.iter_mut().zip(s.total) {
        *a += b;
    }
    for (a, b) in sum.ttft.iter_mut().zip(s.ttft) {
        *a += b;
    }
}

fn by_class(s: &Sec) -> Value {
    CLASSES
        .iter()
        .zip(s.by_class)
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(model: &'a str, status: u16, reason: &'static str, ms: u64) -> Sample<'a> {
        Sample {
            model,
            backend: "sim(x)",
            status,
            reason,
            total: Duration::from_millis(ms),
            ttft: Some(Duration::from_millis(ms / 2)),
            queue_wait: Some(("normal", Duration::ZERO)),
            tokens: Some((3, 5)),
            prefix_match: None,
        }
    }

    #[test]
    fn counts_and_histograms_render_with_help_and_type() {
        let m = Metrics::new(&["a".into()]);
        m.finished(&sample("a", 200, "ok", 30));
        m.finished(&sample("a", 503, "queue_full", 1));
        m.rate_limited("team-a", "requests");
        let text = m.render(
            &json!({"models": {}, "memory": {}}),
            &json!({"models": []}),
            None,
        );
        assert!(
            text.contains("# TYPE mofa_gateway_requests_total counter"),
            "{text}"
        );
        assert!(text.contains(
            r#"mofa_gateway_requests_total{model="a",backend="sim(x)",status="200",reason="ok"} 1"#
        ));
        assert!(text.contains(r#"mofa_gateway_request_duration_seconds_bucket{model="a",backend="sim(x)",le="0.04"} 2"#), "{text}");
        assert!(text
            .contains(r#"mofa_gateway_tokens_total{model="a",backend="sim(x)",type="output"} 10"#));
        assert!(
            text.contains(r#"mofa_gateway_rate_limited_total{key="team-a",limit="requests"} 1"#)
        );
    }

    #[test]
    fn the_last_minutes_percentiles_are_of_served_requests_only() {
        let r = Recent::new(&["m".into()]);
        let at = |status, reason, ms| r.record_at(5, &sample("m", status, reason, ms));
        // 20 served in (1 s, 2 s], 1 stream cut after its 200 head (served, 1.5 s), and
        // 200 requests refused at once: rejected, limited, invalid, upstream errors, gone.
        for _ in 0..20 {
            at(200, "ok", 1500);
        }
        at(200, "stream_broken", 1500);
        for _ in 0..40 {
            at(503, "queue_full", 0);
            at(503, "upstream_error", 1);
            at(429, "rate_limited", 0);
            at(400, "invalid_request", 0);
            at(499, "client_disconnect", 3);
        }
        let v = r.last_minute_at("m", 6);
        assert_eq!(v["requests"], 221, "{v}");
        assert_eq!(v["served"], 21, "{v}");
        for q in ["p50_ms", "p99_ms"] {
            let ms = v[q].as_f64().unwrap_or_else(|| panic!("{q}: {v}"));
            assert!((1000.0..=2000.0).contains(&ms), "{q} {ms}: {v}");
        }
        // The rejections are still counted, in the rates.
        assert_eq!(v["by_outcome"]["rejected"], 40, "{v}");
        assert!((v["rate_503"].as_f64().unwrap() - 40.0 / 221.0).abs() < 1e-9);
        // With nothing served, no percentile (not a 0 ms one).
        let r = Recent::new(&["m".into()]);
        r.record_at(5, &sample("m", 503, "queue_full", 0));
        let v = r.last_minute_at("m", 6);
        assert_eq!(
            (v["served"].clone(), v["p50_ms"].clone()),
            (json!(0), Value::Null)
        );
    }

    #[test]
    fn cost_is_a_float_counter_by_model_and_key_with_labels_escaped() {
        let m = Metrics::new(&["m".to_string()]);
        m.cost("m", "team-a", 0.25);
        m.cost("m", "team-a", 0.125);
        m.cost("say \"hi\"", "", 1.0);
        let text = m.render(
            &json!({"models": {}, "memory": {}}),
            &json!({"models": []}),
            None,
        );
        assert!(
            text.contains("# TYPE mofa_gateway_cost_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("mofa_gateway_cost_total{model=\"m\",key=\"team-a\"} 0.375\n"),
            "{text}"
        );
        assert!(
            text.contains("mofa_gateway_cost_total{model=\"say \\\"hi\\\"\",key=\"\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut c = [0u32; NB];
        c[bucket(Duration::from_millis(15))] = 100;
        // All in (10 ms, 20 ms]: the median half way.
        assert_eq!(quantile_ms(&c, 0.5), json!(15.0));
        assert_eq!(quantile_ms(&[0; NB], 0.5), Value::Null);
    }
}

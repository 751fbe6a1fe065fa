//! Phase 8, `observe`: one finished [`Record`] per request that reached the pipeline, built
//! once from its context (`context::Ctx`) when the request is really over (a stream: its last
//! byte, its failure, or the client leaving; a request whose future is dropped: the client
//! left, 499). The [`Observer`] counts it, writes the access log line (target
//! `mofa_gateway::access`) and feeds the metrics ([`crate::metrics`]: counters, histograms, the
//! status page's windows); hooks ([`OnFinish`]) read it too. It never sees a prompt, a
//! completion or a secret: a key is logged by its configured name only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;

use crate::admission::Priority;
use crate::error::ApiError;
use crate::metrics::{Metrics, Sample};
pub(crate) use crate::reason::Reason;
use crate::usage::{Ledger, Prices, UsageRecord};

pub(crate) mod line;

/// The client's address, put into each request's extensions by the server's accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// Counters of finished requests (the admin view), and the metrics.
pub(crate) struct Observer {
    /// The usage ledger, when `[usage]` has a store: every finished record goes to it.
    usage: std::sync::OnceLock<Arc<Ledger>>,
    requests: AtomicU64,
    retries: AtomicU64,
    client_disconnects: AtomicU64,
    pub metrics: Metrics,
}

impl Default for Observer {
    fn default() -> Self {
        Observer::new(&[])
    }
}

impl Observer {
    /// The observer of a gateway serving `models` (the configured names).
    pub(crate) fn new(models: &[String]) -> Observer {
        Observer {
            usage: std::sync::OnceLock::new(),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            client_disconnects: AtomicU64::new(0),
            metrics: Metrics::new(models),
        }
    }

    /// Sends every finished record to `ledger` from now on (set once, at build).
    pub(crate) fn set_usage(&self, ledger: Arc<Ledger>) {
        let _ = self.usage.set(ledger);
    }

    pub(crate) fn client_disconnects(&self) -> u64 {
        self.client_disconnects.load(Ordering::Relaxed)
    }

    /// The admin view of the counters.
    pub(crate) fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "client_disconnects": self.client_disconnects(),
        })
    }
}

/// One finished request: what the phases learned of it (through its [`Ctx`]) and how it
/// ended. Built once, when the request is over; the metrics, the access log and every
/// [`OnFinish`] hook read it, nothing writes it after.
///
/// [`Ctx`]: super::context::Ctx
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub request_id: HeaderValue,
    /// Where the request came from.
    pub client: Option<SocketAddr>,
    /// The API key's name (never the key).
    pub key: Option<Arc<str>>,
    /// The configured model's name (never an unknown name a client sent).
    pub model: Option<Arc<str>>,
    /// The deployment that served it (its label), or the last one tried.
    pub backend: Option<Arc<str>>,
    pub priority: Option<Priority>,
    /// A streaming request (`stream: true`).
    pub stream: bool,
    /// The status the client got (499: it went away first; a stream that failed after its
    /// first byte is a 200 with reason `stream_broken`).
    pub status: u16,
    pub reason: Reason,
    /// Deployments tried.
    pub attempts: u32,
    /// Time the rate-limit store took to charge the request (a Redis round trip, with Redis).
    pub limit_wait: Option<Duration>,
    /// Time spent waiting for admission.
    pub queue_wait: Option<Duration>,
    /// Time from sending upstream to its first byte.
    pub upstream_ttfb: Option<Duration>,
    /// From arrival to the first byte of the reply.
    pub first_byte: Option<Duration>,
    /// From arrival to the end.
    pub total: Duration,
    /// Body bytes relayed to the client (streams) or sent (whole replies).
    pub bytes: u64,
    /// Tokens in and out: from `usage` when the upstream reported it, else estimated.
    pub tokens: Option<Tokens>,
    /// The route it came in on (`/v1/chat/completions`, ...).
    pub endpoint: &'static str,
    /// The prices of the deployment that served it (the last one tried).
    pub prices: Prices,
    /// Under `prefix-aware`: the share of the prompt that deployment was sent before.
    pub prefix_match: Option<f64>,
}

impl Record {
    /// An empty record of request `request_id` (what a [`Ctx`] starts from).
    ///
    /// [`Ctx`]: super::context::Ctx
    pub(crate) fn new(request_id: HeaderValue) -> Record {
        Record {
            request_id,
            client: None,
            key: None,
            model: None,
            backend: None,
            priority: None,
            stream: false,
            status: 0,
            reason: Reason::Ok,
            attempts: 0,
            limit_wait: None,
            queue_wait: None,
            upstream_ttfb: None,
            first_byte: None,
            total: Duration::ZERO,
            bytes: 0,
            tokens: None,
            endpoint: "",
            prices: Prices::default(),
            prefix_match: None,
        }
    }
}

impl Record {
    /// What its tokens cost (input, output) at the prices of the deployment that served it;
    /// nothing when no deployment did.
    fn cost(&self) -> (f64, f64) {
        let t = self.tokens.unwrap_or_default();
        match self.backend {
            Some(_) => self.prices.cost(t.input, t.output),
            None => (0.0, 0.0),
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tokens {
    pub input: u64,
    pub output: u64,
    /// Counted by the gateway (no `usage` from the upstream).
    pub estimated: bool,
}

/// A hook run when a request is over, with its record.
pub(crate) type OnFinish = Box<dyn FnOnce(&Record) + Send>;

impl Observer {
    /// Counts `rec`, feeds the metrics and writes its access log line.
    pub(crate) fn finished(&self, rec: &Record) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if rec.attempts > 1 {
            self.retries
                .fetch_add(u64::from(rec.attempts - 1), Ordering::Relaxed);
        }
        if rec.reason == Reason::ClientDisconnect {
            self.client_disconnects.fetch_add(1, Ordering::Relaxed);
        }
        let cost = rec.cost();
        if rec.backend.is_some() && rec.tokens.is_some() {
            self.metrics.cost(
                rec.model.as_deref().unwrap_or_default(),
                rec.key.as_deref().unwrap_or_default(),
                cost.0 + cost.1,
            );
        }
        if let Some(ledger) = self.usage.get() {
            ledger.push(usage_record(rec, cost, std::time::SystemTime::now()));
        }
        let priority = rec.priority.map(Priority::as_str);
        self.metrics.finished(&Sample {
            model: rec.model.as_deref().unwrap_or_default(),
            backend: rec.backend.as_deref().unwrap_or_default(),
            status: rec.status,
            reason: rec.reason.as_str(),
            total: rec.total,
            ttft: rec.first_byte.filter(|_| rec.stream),
            queue_wait: priority.zip(rec.queue_wait),
            tokens: rec
                .tokens
                .filter(|t| !t.estimated)
                .map(|t| (t.input, t.output)),
            prefix_match: rec.prefix_match,
        });
        line::Line {
            request_id: rec.request_id.to_str().unwrap_or_default(),
            client: rec.client,
            key: rec.key.as_deref().unwrap_or("-"),
            model: rec.model.as_deref().unwrap_or("-"),
            backend: rec.backend.as_deref().unwrap_or("-"),
            priority: priority.unwrap_or("-"),
            stream: rec.stream,
            status: rec.status,
            reason: rec.reason.as_str(),
            attempts: rec.attempts,
            queue: rec.queue_wait,
            ttfb: rec.first_byte,
            upstream_ttfb: rec.upstream_ttfb,
            total: rec.total,
            bytes: rec.bytes,
            tokens: rec.tokens.map(|t| (t.input, t.output, t.estimated)),
        }
        .log();
    }

    /// A try on an upstream failed with `e` (another may follow), or succeeded (`None`).
    pub(crate) fn upstream_attempt(&self, e: Option<&ApiError>) {
        let outcome = e.map_or("ok", |e| e.kind.spec().reason.as_str());
        self.metrics.upstream_attempt(outcome);
    }

    /// A request was refused by the rate limit `limit` (`requests`, `tokens`, ...) of the
    /// key named `key` (its configured name, never the secret).
    pub(crate) fn rate_limited(&self, key: &str, limit: &'static str) {
        self.metrics.rate_limited(key, limit);
    }
}

/// The usage ledger's row of `rec`, finished at `now`, its tokens costing `cost` (input,
/// output; see [`Record::cost`]).
fn usage_record(rec: &Record, cost: (f64, f64), now: std::time::SystemTime) -> UsageRecord {
    let tokens = rec.tokens.unwrap_or_default();
    let (cost_input, cost_output) = cost;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    UsageRecord {
        request_id: rec.request_id.clone(),
        ts: now,
        key: rec.key.clone(),
        model: rec.model.clone(),
        deployment: rec.backend.clone(),
        priority: rec.priority.map(Priority::as_str),
        endpoint: rec.endpoint,
        stream: rec.stream,
        status: rec.status,
        reason: rec.reason.as_str(),
        attempts: rec.attempts,
        tokens_in: tokens.input,
        tokens_out: tokens.output,
        tokens_estimated: tokens.estimated,
        cost_input,
        cost_output,
        cost: cost_input + cost_output,
        ttft_ms: rec.first_byte.map(ms),
        total_ms: ms(rec.total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_of_errors() {
        use crate::reason::{RejectReason, Rejection};
        let e = ApiError::rejected(Rejection::new(RejectReason::QueueFull, 2), "m");
        assert_eq!(e.kind.spec().reason.as_str(), "queue_full");
        assert_eq!(
            ApiError::model_not_found("x").kind.spec().reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            ApiError::upstream_timeout("b", "x").kind.spec().reason,
            Reason::UpstreamTimeout
        );
    }
}

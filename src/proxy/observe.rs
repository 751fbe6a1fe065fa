//! Phase 8, `observe`: one [`Record`] per request that reached the pipeline, finished exactly
//! once, when the request is really over (a stream: its last byte, its failure, or the client
//! leaving; a request whose future is dropped: the client left, 499). Finishing it counts it
//! and writes the access log line (target `mofa_gateway::access`), and feeds the metrics
//! ([`crate::metrics`]: counters, histograms, the status page's windows). The metrics and logs
//! read these records; nothing else is threaded through the pipeline's signatures. It never
//! sees a prompt, a completion or a secret: a key is logged by its configured name only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode};

use crate::admission::Priority;
use crate::error::ApiError;
use crate::metrics::{Metrics, Sample};
pub use crate::reason::Reason;

pub mod line;

/// The client's address, put into each request's extensions by the server's accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Counters of finished requests (the admin view), and the metrics.
pub struct Observer {
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
    pub fn new(models: &[String]) -> Observer {
        Observer {
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            client_disconnects: AtomicU64::new(0),
            metrics: Metrics::new(models),
        }
    }

    pub fn client_disconnects(&self) -> u64 {
        self.client_disconnects.load(Ordering::Relaxed)
    }

    /// The admin view of the counters.
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "client_disconnects": self.client_disconnects(),
        })
    }
}

/// What is known of one request; finished once (see the module doc).
pub struct Record {
    obs: Arc<Observer>,
    id: HeaderValue,
    arrival: Instant,
    /// The configured model's name (never an unknown name a client sent).
    pub model: Option<Arc<str>>,
    /// The deployment that served it (its label).
    pub backend: Option<Arc<str>>,
    pub priority: Option<Priority>,
    /// The API key's name (never the key).
    pub key: Option<Arc<str>>,
    /// Headers a phase adds to the reply, whatever it is (the rate-limit headers, the
    /// priority a key's ceiling lowered the request to).
    pub reply_headers: HeaderMap,
    /// Deployments tried.
    pub attempts: u32,
    /// Time the rate-limit store took to charge the request (a Redis round trip, with Redis).
    pub limit_wait: Option<Duration>,
    /// Time spent waiting for admission.
    pub queue_wait: Option<Duration>,
    /// Time from sending upstream to its first byte.
    pub upstream_ttfb: Option<Duration>,
    /// Body bytes relayed to the client (streams).
    pub bytes: u64,
    /// A streaming request (`stream: true`).
    pub stream: bool,
    /// From arrival to the first byte of the reply.
    pub first_byte: Option<Duration>,
    /// Where the request came from.
    pub client: Option<SocketAddr>,
    /// Tokens in and out: from `usage` when the upstream reported it, else estimated.
    pub tokens: Option<Tokens>,
    /// Told of the end, in order, once: what a phase holds until the request is over
    /// (a rate-limit allowance to settle, say) plugs in here.
    on_finish: Vec<OnFinish>,
    finished: bool,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    /// Counted by the gateway (no `usage` from the upstream).
    pub estimated: bool,
}

/// How a request ended, for the hooks of [`Record::on_finish`].
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // `status` and `reason` are for hooks that need them (the limit phase reads tokens)
pub struct Finished {
    pub status: u16,
    pub reason: Reason,
    pub tokens: Option<Tokens>,
}

/// A hook run when a request is over.
pub type OnFinish = Box<dyn FnOnce(&Finished) + Send>;

impl Record {
    pub fn new(obs: Arc<Observer>, id: HeaderValue, arrival: Instant) -> Record {
        Record {
            obs,
            id,
            arrival,
            model: None,
            backend: None,
            priority: None,
            key: None,
            reply_headers: HeaderMap::new(),
            attempts: 0,
            limit_wait: None,
            queue_wait: None,
            upstream_ttfb: None,
            bytes: 0,
            stream: false,
            first_byte: None,
            client: None,
            tokens: None,
            on_finish: Vec::new(),
            finished: false,
        }
    }

    /// Runs `f` when the request is over, whatever its end.
    pub fn on_finish(&mut self, f: OnFinish) {
        self.on_finish.push(f);
    }

    /// The upstream answered (its first byte) `ttfb` after it was sent: the try succeeded.
    pub fn first_byte(&mut self, ttfb: Duration) {
        self.upstream_ttfb = Some(ttfb);
        self.first_byte = Some(self.arrival.elapsed());
        self.obs.metrics.upstream_attempt("ok");
    }

    /// A try on an upstream failed with `e` (another may follow).
    pub fn attempt_failed(&mut self, e: &ApiError) {
        self.obs
            .metrics
            .upstream_attempt(e.kind.spec().reason.as_str());
    }

    /// The request was refused by the rate limit `limit` (`requests`, `tokens`, ...) of the
    /// key named `key` (its configured name, never the secret).
    #[allow(dead_code)] // called by the limit phase, which comes with API keys
    pub fn rate_limited(&self, key: &str, limit: &'static str) {
        self.obs.metrics.rate_limited(key, limit);
    }

    /// The `Server-Timing` header: the rate-limit charge, queue wait, upstream time to first
    /// byte, total so far.
    pub fn server_timing(&self) -> Option<HeaderValue> {
        // Whole microseconds as milliseconds with three decimals, in integer arithmetic (one
        // buffer, no `core::fmt`: this runs for every reply).
        let part = |out: &mut Vec<u8>, name: &[u8], d: Duration| {
            if !out.is_empty() {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b";dur=");
            line::push_ms(out, d);
        };
        let mut out = Vec::with_capacity(80);
        if let Some(l) = self.limit_wait {
            part(&mut out, b"limit", l);
        }
        if let Some(q) = self.queue_wait {
            part(&mut out, b"queue", q);
        }
        if let Some(u) = self.upstream_ttfb {
            part(&mut out, b"upstream", u);
        }
        part(&mut out, b"total", self.arrival.elapsed());
        HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
    }

    pub fn finish(mut self, status: StatusCode, reason: Reason) {
        self.finish_mut(status.as_u16(), reason);
    }

    /// The client went away before the end (logged as 499).
    pub fn finish_disconnected(mut self) {
        self.finish_mut(499, Reason::ClientDisconnect);
    }

    fn finish_mut(&mut self, status: u16, reason: Reason) {
        if self.finished {
            return;
        }
        self.finished = true;
        let o = &self.obs;
        o.requests.fetch_add(1, Ordering::Relaxed);
        if self.attempts > 1 {
            o.retries
                .fetch_add(u64::from(self.attempts - 1), Ordering::Relaxed);
        }
        if reason == Reason::ClientDisconnect {
            o.client_disconnects.fetch_add(1, Ordering::Relaxed);
        }
        let total = self.arrival.elapsed();
        let priority = self.priority.map(Priority::as_str);
        self.obs.metrics.finished(&Sample {
            model: self.model.as_deref().unwrap_or_default(),
            backend: self.backend.as_deref().unwrap_or_default(),
            status,
            reason: reason.as_str(),
            total,
            ttft: self.first_byte.filter(|_| self.stream),
            queue_wait: priority.zip(self.queue_wait),
            tokens: self
                .tokens
                .filter(|t| !t.estimated)
                .map(|t| (t.input, t.output)),
        });
        line::Line {
            request_id: self.id.to_str().unwrap_or_default(),
            client: self.client,
            key: self.key.as_deref().unwrap_or("-"),
            model: self.model.as_deref().unwrap_or("-"),
            backend: self.backend.as_deref().unwrap_or("-"),
            priority: priority.unwrap_or("-"),
            stream: self.stream,
            status,
            reason: reason.as_str(),
            attempts: self.attempts,
            queue: self.queue_wait,
            ttfb: self.first_byte,
            upstream_ttfb: self.upstream_ttfb,
            total,
            bytes: self.bytes,
            tokens: self.tokens.map(|t| (t.input, t.output, t.estimated)),
        }
        .log();
        let fin = Finished {
            status,
            reason,
            tokens: self.tokens,
        };
        for f in self.on_finish.drain(..) {
            f(&fin);
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // Not finished by the pipeline: its future was dropped, the client went away.
        self.finish_mut(499, Reason::ClientDisconnect);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(obs: &Arc<Observer>) -> Record {
        Record::new(obs.clone(), HeaderValue::from_static("r"), Instant::now())
    }

    #[test]
    fn a_record_counts_once_and_a_dropped_one_is_a_disconnect() {
        let obs = Arc::new(Observer::default());
        let mut r = record(&obs);
        r.attempts = 3;
        r.finish(StatusCode::OK, Reason::Ok);
        drop(record(&obs));
        let v = obs.snapshot();
        assert_eq!(v["requests"], 2);
        assert_eq!(v["retries"], 2);
        assert_eq!(v["client_disconnects"], 1);
    }

    #[test]
    fn hooks_run_once_with_the_outcome() {
        let obs = Arc::new(Observer::default());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut r = record(&obs);
        let s = seen.clone();
        r.on_finish(Box::new(move |f| {
            s.lock().unwrap().push((f.status, f.reason))
        }));
        drop(r);
        assert_eq!(*seen.lock().unwrap(), [(499, Reason::ClientDisconnect)]);
    }

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

    #[test]
    fn server_timing_names_its_parts() {
        let obs = Arc::new(Observer::default());
        let mut r = record(&obs);
        r.limit_wait = Some(Duration::from_micros(1_234));
        r.queue_wait = Some(Duration::from_micros(12));
        r.upstream_ttfb = Some(Duration::from_millis(104));
        let v = r.server_timing().unwrap();
        let s = v.to_str().unwrap();
        assert!(
            s.starts_with("limit;dur=1.234, queue;dur=0.012, upstream;dur=104.000, total;dur="),
            "{s}"
        );
        r.finish(StatusCode::OK, Reason::Ok);
    }
}

//! The request context (pingora's `CTX`): what the phases learn of one request while it runs
//! (who asked, for which model, at which priority, where it went, how long each step took, the
//! tokens), and the hooks a phase wants run when it is over. The pipeline owns it and hands it
//! to each phase in turn; phases write it through its methods. Reply headers are not part of it
//! (the pipeline keeps them apart).
//!
//! It is finished exactly once: by the pipeline with the reply's status, by a stream's end, or,
//! when its future is dropped first, as a client that went away (499). Finishing builds the
//! request's [`Record`], hands it to the [`Observer`] (metrics, access log) and to the hooks.
//! It must not decide anything about the request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode};

use super::observe::{line, Observer, OnFinish, Reason, Record, Tokens};
use crate::admission::Priority;
use crate::error::ApiError;
use crate::usage::Prices;

/// One request's context (see the module doc).
pub(crate) struct Ctx {
    obs: Arc<Observer>,
    arrival: Instant,
    /// What is known so far; complete once finished.
    rec: Record,
    on_finish: Vec<OnFinish>,
    finished: bool,
}

impl Ctx {
    /// The context of request `id`, which arrived at `arrival` from `client`.
    pub(crate) fn new(
        obs: Arc<Observer>,
        id: HeaderValue,
        arrival: Instant,
        client: Option<SocketAddr>,
    ) -> Ctx {
        let mut rec = Record::new(id);
        rec.client = client;
        Ctx {
            obs,
            arrival,
            rec,
            on_finish: Vec::new(),
            finished: false,
        }
    }

    /// The key's name, once authenticated (`None`: no keys configured).
    pub(crate) fn set_key(&mut self, name: Option<Arc<str>>) {
        self.rec.key = name;
    }

    /// The configured model the request runs on.
    pub(crate) fn set_model(&mut self, name: Option<Arc<str>>) {
        self.rec.model = name;
    }

    /// The priority it runs at, and whether it streams.
    pub(crate) fn set_request(&mut self, priority: Priority, stream: bool) {
        self.rec.priority = Some(priority);
        self.rec.stream = stream;
    }

    /// The priority it runs at (after the key's default and ceiling).
    pub(crate) fn set_priority(&mut self, priority: Priority) {
        self.rec.priority = Some(priority);
    }

    /// The rate-limit store took `d` to charge it.
    pub(crate) fn limit_waited(&mut self, d: Duration) {
        self.rec.limit_wait = Some(d);
    }

    /// A refusal by the limit `limit` (`requests`, `tokens`, `parallel`, ...) of its key.
    pub(crate) fn rate_limited(&self, limit: &'static str) {
        let key = self.rec.key.as_deref().unwrap_or("-");
        self.obs.rate_limited(key, limit);
    }

    /// Admitted after waiting `d` (the first admission's wait counts).
    pub(crate) fn admitted(&mut self, d: Duration) {
        self.rec.queue_wait.get_or_insert(d);
    }

    /// Try number `attempt` goes to the deployment labelled `backend`, which (under
    /// `prefix-aware`) was sent `prefix_match` of the prompt before.
    pub(crate) fn trying(
        &mut self,
        attempt: u32,
        backend: Arc<str>,
        prices: Prices,
        prefix_match: Option<f64>,
    ) {
        self.rec.attempts = attempt;
        self.rec.backend = Some(backend);
        self.rec.prices = prices;
        self.rec.prefix_match = prefix_match;
    }

    /// Under `prefix-aware`: the share of the prompt the deployment tried last was sent before.
    pub(crate) fn prefix_match(&self) -> Option<f64> {
        self.rec.prefix_match
    }

    /// The route the request came in on.
    pub(crate) fn set_endpoint(&mut self, path: &'static str) {
        self.rec.endpoint = path;
    }

    /// Deployments tried so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.rec.attempts
    }

    /// The upstream answered (its first byte) `ttfb` after it was sent: the try succeeded.
    pub(crate) fn first_byte(&mut self, ttfb: Duration) {
        self.rec.upstream_ttfb = Some(ttfb);
        self.rec.first_byte = Some(self.arrival.elapsed());
        self.obs.upstream_attempt(None);
    }

    /// A try on an upstream failed with `e` (another may follow).
    pub(crate) fn attempt_failed(&mut self, e: &ApiError) {
        self.obs.upstream_attempt(Some(e));
    }

    /// What went to the client: `bytes` of body, and the tokens (`None`: unknown).
    pub(crate) fn sent(&mut self, bytes: u64, tokens: Option<Tokens>) {
        self.rec.bytes = bytes;
        self.rec.tokens = tokens;
    }

    /// Runs `f` with the record when the request is over, whatever its end.
    pub(crate) fn on_finish(&mut self, f: OnFinish) {
        self.on_finish.push(f);
    }

    /// The `Server-Timing` header: the rate-limit charge, queue wait, upstream time to first
    /// byte, total so far.
    pub(crate) fn server_timing(&self) -> Option<HeaderValue> {
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
        if let Some(l) = self.rec.limit_wait {
            part(&mut out, b"limit", l);
        }
        if let Some(q) = self.rec.queue_wait {
            part(&mut out, b"queue", q);
        }
        if let Some(u) = self.rec.upstream_ttfb {
            part(&mut out, b"upstream", u);
        }
        part(&mut out, b"total", self.arrival.elapsed());
        HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
    }

    /// The request is over with `status` for `reason`.
    pub(crate) fn finish(mut self, status: StatusCode, reason: Reason) {
        self.finish_mut(status.as_u16(), reason);
    }

    /// The client went away before the end (logged as 499).
    pub(crate) fn finish_disconnected(mut self) {
        self.finish_mut(499, Reason::ClientDisconnect);
    }

    fn finish_mut(&mut self, status: u16, reason: Reason) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.rec.status = status;
        self.rec.reason = reason;
        self.rec.total = self.arrival.elapsed();
        self.obs.finished(&self.rec);
        for f in self.on_finish.drain(..) {
            f(&self.rec);
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // Not finished by the pipeline: its future was dropped, the client went away.
        self.finish_mut(499, Reason::ClientDisconnect);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(obs: &Arc<Observer>) -> Ctx {
        Ctx::new(
            obs.clone(),
            HeaderValue::from_static("r"),
            Instant::now(),
            None,
        )
    }

    #[test]
    fn a_context_finishes_once_and_a_dropped_one_is_a_disconnect() {
        let obs = Arc::new(Observer::default());
        let mut c = ctx(&obs);
        c.trying(3, "b".into(), Prices::default(), None);
        c.finish(StatusCode::OK, Reason::Ok);
        drop(ctx(&obs));
        let v = obs.snapshot();
        assert_eq!(v["requests"], 2);
        assert_eq!(v["retries"], 2);
        assert_eq!(v["client_disconnects"], 1);
    }

    #[test]
    fn hooks_run_once_with_the_finished_record() {
        let obs = Arc::new(Observer::default());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut c = ctx(&obs);
        c.set_key(Some("team-a".into()));
        c.sent(
            10,
            Some(Tokens {
                input: 3,
                output: 4,
                estimated: false,
            }),
        );
        let s = seen.clone();
        c.on_finish(Box::new(move |r| {
            s.lock().unwrap().push((
                r.status,
                r.reason,
                r.key.clone(),
                r.tokens.map(|t| t.output),
                r.request_id.clone(),
            ))
        }));
        drop(c);
        assert_eq!(
            *seen.lock().unwrap(),
            [(
                499,
                Reason::ClientDisconnect,
                Some("team-a".into()),
                Some(4),
                HeaderValue::from_static("r")
            )]
        );
    }

    #[test]
    fn server_timing_names_its_parts() {
        let obs = Arc::new(Observer::default());
        let mut c = ctx(&obs);
        c.limit_waited(Duration::from_micros(1_234));
        c.admitted(Duration::from_micros(12));
        c.admitted(Duration::from_micros(99)); // a retry's wait does not replace the first
        c.rec.upstream_ttfb = Some(Duration::from_millis(104));
        let v = c.server_timing().unwrap();
        let s = v.to_str().unwrap();
        assert!(
            s.starts_with("limit;dur=1.234, queue;dur=0.012, upstream;dur=104.000, total;dur="),
            "{s}"
        );
        c.finish(StatusCode::OK, Reason::Ok);
    }
}

//! `loadgen`: a small open-loop HTTP load generator (used by the scripts in `bench/`).
//! It owns its own schedule and report; it must not talk to anything but the `--url` given.
//!
//! Open loop: the i-th request is launched at `t0 + i / rate`, whether or not earlier requests
//! have completed, so a slow server faces the offered rate instead of slowing the client down.
//! If `--max-outstanding` requests are already in flight, the launch is skipped and counted as
//! `dropped_by_loadgen` (the client's own limit, not the server's answer).
//!
//! The first `--warmup-s` seconds are sent but not reported. The measurement window is the
//! next `--duration-s` seconds of the schedule; every request launched in it is followed to
//! its end (outcome, latency from send to the last byte of the body), then one JSON object is
//! printed on stdout:
//!   * `outcomes`: count per outcome among the requests launched in the window: the status
//!     code (`200`), for a 503 also its `x-mofa-reject-reason` (`503:queue_full`, `503:-` if
//!     absent), transport failures as `error:connect|timeout|body|request`, and
//!     `dropped_by_loadgen`;
//!   * `goodput_rps`: 2xx responses that *completed* inside the window, per second of window
//!     (the server's useful throughput in steady state, warm-up excluded);
//!   * `latency_ms`: p50/p90/p99/max per outcome; `rejections_503_latency_ms` over all 503s
//!     together, and `rejections_503_fast`: how many came back within `--fast-reject-ms`;
//!   * `checks_503`: 503s without `Retry-After`, and 503s whose `x-mofa-reject-reason` is not
//!     the body's `error.code`;
//!   * `priorities`: per priority sent, succeeded, success rate, share of all successes, and
//!     the latency of its successes and of its 503s;
//!   * `launch_lag_ms`: how late launches were against the schedule (a busy client shows here);
//!   * `launched_all`: requests launched in the whole run, warm-up included (to divide a
//!     process's CPU time measured over the whole run);
//!   * `attempts`: among the window's responses, how many carried `x-mofa-attempts` and the
//!     sum of `attempts - 1` over them (tries that failed and were retried on another
//!     deployment).
//!
//!   * `server_timing_ms`: p50/p90/p99/max of each `Server-Timing` entry (`limit`, `queue`,
//!     `upstream`, `total`) over the window's 2xx responses: the gateway's own account of
//!     where a request's time went, free of the client's and the network's share.
//!
//! `--header NAME:VALUE` (repeatable) adds a header to every request.
//!
//! `--retry-as-told`: a request answered 503 is sent once more, exactly `retry-after-ms` (else
//! `Retry-After` seconds) later; `retry_as_told` reports, over the window's requests, how many
//! were retried, how many of those retries succeeded (`hit_rate`), and the waits told.
//!
//! Timing uses the monotonic clock (`Instant`); percentiles are nearest-rank on sorted values.
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080/v1/chat/completions \
//!     --rate 800 --duration-s 30 --warmup-s 3 --max-outstanding 2000 \
//!     --body '{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":20}' \
//!     --priority-mix low=70,normal=20,high=8,critical=2
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use serde_json::{json, Map, Value};

const PRIORITIES: [&str; 4] = ["low", "normal", "high", "critical"];

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Open-loop HTTP POST load generator")]
struct Args {
    /// URL to POST to (e.g. http://127.0.0.1:8080/v1/chat/completions).
    #[arg(long)]
    url: String,
    /// Requests launched per second, whatever the server does (open loop).
    #[arg(long)]
    rate: f64,
    /// Length of the measurement window, in seconds (after the warm-up).
    #[arg(long)]
    duration_s: f64,
    /// Most requests in flight at once; launches beyond it count as `dropped_by_loadgen`.
    #[arg(long, default_value_t = 4096)]
    max_outstanding: usize,
    /// JSON request body.
    #[arg(long)]
    body: String,
    /// `x-mofa-priority` mix by weight, e.g. `low=70,normal=20,high=8,critical=2`; without it
    /// no priority header is sent.
    #[arg(long)]
    priority_mix: Option<String>,
    /// Seconds of load sent before the measurement window and not reported.
    #[arg(long, default_value_t = 0.0)]
    warmup_s: f64,
    /// Per-request timeout in seconds (counted as `error:timeout`).
    #[arg(long, default_value_t = 30.0)]
    timeout_s: f64,
    /// Also report how many 503s came back within this many milliseconds.
    #[arg(long, default_value_t = 5.0)]
    fast_reject_ms: f64,
    /// Extra request header `NAME:VALUE`, sent with every request (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Retry a 503 once, exactly when it says (`retry-after-ms`, else `Retry-After`).
    #[arg(long)]
    retry_as_told: bool,
    /// Also write one line per request of the window to this file: its launch (ms since the
    /// Unix epoch), its latency (ms) and its outcome, tab-separated.
    #[arg(long, value_name = "FILE")]
    latencies: Option<std::path::PathBuf>,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A response whose body was read to the end; for a 503, its `x-mofa-reject-reason`.
    Status(u16, Option<String>),
    /// No complete response: `connect`, `timeout`, `body` or `request`.
    Transport(&'static str),
}

impl Outcome {
    fn key(&self) -> String {
        match self {
            Outcome::Status(503, reason) => format!("503:{}", reason.as_deref().unwrap_or("-")),
            Outcome::Status(code, _) => code.to_string(),
            Outcome::Transport(kind) => format!("error:{kind}"),
        }
    }

    fn is_success(&self) -> bool {
        matches!(self, Outcome::Status(code, _) if (200..300).contains(code))
    }
}

/// One finished request. Times are offsets from the start of the schedule.
struct Record {
    in_window: bool,
    prio: Option<usize>,
    end: Duration,
    latency: Duration,
    outcome: Outcome,
    /// For a 503: what did not match the contract (see [`Checks`]).
    checks: Checks,
    /// The response's `x-mofa-attempts`, when it had one.
    attempts: Option<u32>,
    /// The response's `Server-Timing` entries (name, ms).
    timing: Vec<(String, f64)>,
    /// `--retry-as-told`: the wait told (ms) and whether the retry then succeeded.
    retry: Option<(u64, bool)>,
}

/// Contract checks on a 503: it has a `Retry-After`, and the body's `error.code` is the
/// `x-mofa-reject-reason` header.
#[derive(Default, Clone, Copy)]
struct Checks {
    no_retry_after: bool,
    reason_mismatch: bool,
    /// The wait told: `retry-after-ms`, else `Retry-After` x 1000.
    told_ms: Option<u64>,
}

fn check_503(headers: &reqwest::header::HeaderMap, reason: Option<&str>, body: &[u8]) -> Checks {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/code")?.as_str().map(str::to_owned));
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Checks {
        no_retry_after: !headers.contains_key(reqwest::header::RETRY_AFTER),
        reason_mismatch: reason.is_some() && code.as_deref() != reason,
        told_ms: header("retry-after-ms").or_else(|| header("retry-after").map(|s| s * 1000)),
    }
}

/// Smooth weighted round-robin (as in nginx): an exact, evenly interleaved priority mix.
struct Mix {
    weights: Vec<(usize, i64)>,
    current: Vec<i64>,
    total: i64,
}

impl Mix {
    fn parse(s: &str) -> Result<Mix, String> {
        let mut weights = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| format!("--priority-mix: `{part}` is not NAME=WEIGHT"))?;
            let idx = PRIORITIES
                .iter()
                .position(|p| *p == name.trim())
                .ok_or_else(|| {
                    format!(
                        "--priority-mix: unknown priority `{name}` (low, normal, high, critical)"
                    )
                })?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("--priority-mix: weight `{w}` is not a whole number"))?;
            if weights.iter().any(|(i, _)| *i == idx) {
                return Err(format!("--priority-mix: `{name}` given twice"));
            }
            if w > 0 {
                weights.push((idx, i64::from(w)));
            }
        }
        let total: i64 = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err("--priority-mix: the weights add up to 0".into());
        }
        let current = vec![0; weights.len()];
        Ok(Mix {
            weights,
            current,
            total,
        })
    }

    fn next(&mut self) -> usize {
        let mut best = 0;
        for (i, (_, w)) in self.weights.iter().enumerate() {
            self.current[i] += w;
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        self.weights[best].0
    }
}

/// Nearest-rank percentile of sorted `v` (non-empty), `p` in (0, 100].
fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Count and p50/p90/p99/max of `v`, in ms (sorts `v`).
fn summary(v: &mut [f64]) -> Value {
    if v.is_empty() {
        return json!({"count": 0});
    }
    v.sort_by(f64::total_cmp);
    json!({
        "count": v.len(),
        "p50": round3(percentile(v, 50.0)),
        "p90": round3(percentile(v, 90.0)),
        "p99": round3(percentile(v, 99.0)),
        "max": round3(v[v.len() - 1]),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn classify(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
}

/// What one request gave: outcome, latency, 503 checks, `x-mofa-attempts`, and the
/// `Server-Timing` entries (name, ms).
type Answer = (Outcome, Duration, Checks, Option<u32>, Vec<(String, f64)>);

/// The `name;dur=ms` entries of a `Server-Timing` header.
fn server_timing(headers: &reqwest::header::HeaderMap) -> Vec<(String, f64)> {
    let Some(v) = headers.get("server-timing").and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    v.split(',')
        .filter_map(|part| {
            let mut it = part.trim().split(';');
            let name = it.next()?.trim();
            let dur = it.find_map(|p| p.trim().strip_prefix("dur="))?;
            Some((name.to_string(), dur.parse().ok()?))
        })
        .collect()
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    body: Bytes,
    prio: Option<usize>,
) -> Answer {
    let mut req = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(p) = prio {
        req = req.header("x-mofa-priority", PRIORITIES[p]);
    }
    let start = Instant::now();
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => {
            return (
                Outcome::Transport(classify(&e)),
                start.elapsed(),
                Checks::default(),
                None,
                Vec::new(),
            )
        }
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let reason = headers
        .get("x-mofa-reject-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let attempts = headers
        .get("x-mofa-attempts")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let timing = server_timing(&headers);
    match resp.bytes().await {
        Ok(body) => {
            let latency = start.elapsed();
            let checks = if status == 503 {
                check_503(&headers, reason.as_deref(), &body)
            } else {
                Checks::default()
            };
            (
                Outcome::Status(status, reason),
                latency,
                checks,
                attempts,
                timing,
            )
        }
        Err(e) => (
            Outcome::Transport(classify(&e)),
            start.elapsed(),
            Checks::default(),
            attempts,
            timing,
        ),
    }
}

fn check(args: &Args) -> Result<(), String> {
    let finite_pos = |x: f64| x.is_finite() && x > 0.0;
    if !finite_pos(args.rate) {
        return Err("--rate must be a number > 0".into());
    }
    if !finite_pos(args.duration_s) {
        return Err("--duration-s must be a number > 0".into());
    }
    if !(args.warmup_s.is_finite() && args.warmup_s >= 0.0) {
        return Err("--warmup-s must be a number >= 0".into());
    }
    if !finite_pos(args.timeout_s) {
        return Err("--timeout-s must be a number > 0".into());
    }
    if !(args.fast_reject_ms.is_finite() && args.fast_reject_ms >= 0.0) {
        return Err("--fast-reject-ms must be a number >= 0".into());
    }
    if args.max_outstanding == 0 {
        return Err("--max-outstanding must be > 0".into());
    }
    serde_json::from_str::<Value>(&args.body)
        .map_err(|e| format!("--body is not valid JSON: {e}"))?;
    Ok(())
}

/// The `--header NAME:VALUE` arguments as a header map.
fn parse_headers(args: &[String]) -> Result<reqwest::header::HeaderMap, String> {
    use reqwest::header::{HeaderName, HeaderValue};
    let mut map = reqwest::header::HeaderMap::new();
    for arg in args {
        let (name, value) = arg
            .split_once(':')
            .ok_or_else(|| format!("--header: `{arg}` is not NAME:VALUE"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("--header: `{}` is not a header name", name.trim()))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("--header: the value for `{name}` is not a header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let mut mix = match args.priority_mix.as_deref().map(Mix::parse).transpose() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let headers = match parse_headers(&args.headers) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match reqwest::Client::builder()
        .no_proxy()
        .default_headers(headers)
        .pool_max_idle_per_host(args.max_outstanding)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs_f64(args.timeout_s))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url: Arc<str> = Arc::from(args.url.as_str());
    let body = Bytes::from(args.body.clone());

    // The schedule: request i is due at i / rate; the window holds i in [first, end).
    let first = (args.warmup_s * args.rate).ceil() as u64;
    let end = ((args.warmup_s + args.duration_s) * args.rate).ceil() as u64;
    let window_start = Duration::from_secs_f64(args.warmup_s);
    let window_end = Duration::from_secs_f64(args.warmup_s + args.duration_s);
    let records = Arc::new(Mutex::new(Vec::with_capacity(end.min(50_000_000) as usize)));
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut launched = 0u64;
    let mut launched_all = 0u64;
    let mut dropped = 0u64;
    let mut dropped_by_prio = [0u64; PRIORITIES.len()];
    let mut launched_by_prio = [0u64; PRIORITIES.len()];
    let mut lags = Vec::with_capacity((end - first).min(50_000_000) as usize);

    let t0 = Instant::now();
    let t0_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    for i in 0..end {
        let due = t0 + Duration::from_secs_f64(i as f64 / args.rate);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let in_window = i >= first;
        if in_window {
            lags.push(ms(Instant::now().saturating_duration_since(due)));
        }
        let prio = mix.as_mut().map(Mix::next);
        if outstanding.load(Ordering::Relaxed) >= args.max_outstanding {
            if in_window {
                dropped += 1;
                if let Some(p) = prio {
                    dropped_by_prio[p] += 1;
                }
            }
            continue;
        }
        if in_window {
            launched += 1;
            if let Some(p) = prio {
                launched_by_prio[p] += 1;
            }
        }
        launched_all += 1;
        outstanding.fetch_add(1, Ordering::Relaxed);
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        let (records, outstanding) = (records.clone(), outstanding.clone());
        let retry_as_told = args.retry_as_told;
        tokio::spawn(async move {
            let (outcome, latency, checks, attempts, timing) =
                one_request(&client, &url, body.clone(), prio).await;
            let mut retry = None;
            if let (true, Some(told)) = (retry_as_told, checks.told_ms) {
                tokio::time::sleep(Duration::from_millis(told)).await;
                let (again, ..) = one_request(&client, &url, body, prio).await;
                retry = Some((told, again.is_success()));
            }
            let rec = Record {
                in_window,
                prio,
                end: t0.elapsed(),
                latency,
                outcome,
                checks,
                attempts,
                timing,
                retry,
            };
            records.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
            outstanding.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let sent_for = t0.elapsed();

    // Follow every launched request to its end (each has its own timeout).
    // (A retry as told waits up to 60 s, then has its own timeout.)
    let retry_s = if args.retry_as_told {
        60.0 + args.timeout_s
    } else {
        0.0
    };
    let drain_limit = Instant::now() + Duration::from_secs_f64(args.timeout_s + retry_s + 2.0);
    while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < drain_limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let records = std::mem::take(&mut *records.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(path) = &args.latencies {
        use std::fmt::Write;
        let mut text = String::new();
        for r in records.iter().filter(|r| r.in_window) {
            let start = t0_unix_ms + ms(r.end.saturating_sub(r.latency));
            let _ = writeln!(
                text,
                "{start:.1}\t{:.3}\t{}",
                ms(r.latency),
                r.outcome.key()
            );
        }
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }

    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut lat: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut rejections = Vec::new();
    let mut timing: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ok_by_prio = [0u64; PRIORITIES.len()];
    let mut ok_lat_by_prio: [Vec<f64>; 4] = Default::default();
    let mut rej_lat_by_prio: [Vec<f64>; 4] = Default::default();
    let mut ok_launched = 0u64;
    let mut ok_in_window = 0u64;
    let mut finished = 0u64;
    let (mut no_retry_after, mut reason_mismatch) = (0u64, 0u64);
    let (mut with_attempts, mut retries) = (0u64, 0u64);
    let (mut retried, mut retry_ok, mut told) = (0u64, 0u64, Vec::new());
    for r in &records {
        let success = r.outcome.is_success();
        if success && r.end >= window_start && r.end <= window_end {
            ok_in_window += 1;
        }
        if !r.in_window {
            continue;
        }
        finished += 1;
        no_retry_after += u64::from(r.checks.no_retry_after);
        if let Some((ms, ok)) = r.retry {
            retried += 1;
            retry_ok += u64::from(ok);
            told.push(ms as f64);
        }
        reason_mismatch += u64::from(r.checks.reason_mismatch);
        if let Some(n) = r.attempts {
            with_attempts += 1;
            retries += u64::from(n.saturating_sub(1));
        }
        let key = r.outcome.key();
        *counts.entry(key.clone()).or_default() += 1;
        lat.entry(key).or_default().push(ms(r.latency));
        if matches!(r.outcome, Outcome::Status(503, _)) {
            rejections.push(ms(r.latency));
            if let Some(p) = r.prio {
                rej_lat_by_prio[p].push(ms(r.latency));
            }
        }
        if success {
            for (name, dur) in &r.timing {
                timing.entry(name.clone()).or_default().push(*dur);
            }
            ok_launched += 1;
            if let Some(p) = r.prio {
                ok_by_prio[p] += 1;
                ok_lat_by_prio[p].push(ms(r.latency));
            }
        }
    }
    let unfinished = launched - finished;
    if dropped > 0 {
        counts.insert("dropped_by_loadgen".into(), dropped);
    }
    if unfinished > 0 {
        counts.insert("unfinished".into(), unfinished);
    }
    let offered = launched + dropped;
    let shares: Map<String, Value> = counts
        .iter()
        .map(|(k, n)| (k.clone(), json!(round3(*n as f64 / offered.max(1) as f64))))
        .collect();
    let latency_ms: Map<String, Value> = lat
        .iter_mut()
        .map(|(k, v)| (k.clone(), summary(v)))
        .collect();
    let fast_rejects = rejections
        .iter()
        .filter(|l| **l <= args.fast_reject_ms)
        .count();
    let priorities: Option<Map<String, Value>> = mix.as_ref().map(|_| {
        PRIORITIES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let sent = launched_by_prio[i];
                (
                    name.to_string(),
                    json!({
                        "offered": sent + dropped_by_prio[i],
                        "sent": sent,
                        "ok": ok_by_prio[i],
                        "success_rate": round3(ok_by_prio[i] as f64 / sent.max(1) as f64),
                        "share_of_successes": round3(ok_by_prio[i] as f64 / ok_launched.max(1) as f64),
                        "ok_latency_ms": summary(&mut ok_lat_by_prio[i]),
                        "rejections_503_latency_ms": summary(&mut rej_lat_by_prio[i]),
                    }),
                )
            })
            .collect()
    });
    let out = json!({
        "url": args.url,
        "t0_unix_ms": t0_unix_ms,
        "warmup_s": args.warmup_s,
        "duration_s": args.duration_s,
        "offered_rps": args.rate,
        "offered": offered,
        "launched": launched,
        "launched_rps": round3(launched as f64 / args.duration_s),
        "schedule_took_s": round3(sent_for.as_secs_f64()),
        "outcomes": counts,
        "outcome_shares": shares,
        "goodput_rps": round3(ok_in_window as f64 / args.duration_s),
        "ok_of_launched_per_s": round3(ok_launched as f64 / args.duration_s),
        "latency_ms": latency_ms,
        "server_timing_ms": timing
            .iter_mut()
            .map(|(k, v)| (k.clone(), summary(v)))
            .collect::<Map<String, Value>>(),
    "rejections_503_latency_ms": summary(&mut rejections),
        "rejections_503_fast": {
            "within_ms": args.fast_reject_ms,
            "count": fast_rejects,
        },
        "checks_503": {
            "without_retry_after": no_retry_after,
            "reason_header_not_body_code": reason_mismatch,
        },
        "priorities": priorities,
        "launch_lag_ms": summary(&mut lags),
        "launched_all": launched_all,
        "attempts": {
            "responses_with_header": with_attempts,
            "retries": retries,
        },
        "retry_as_told": {
            "retried": retried,
            "succeeded": retry_ok,
            "hit_rate": if retried > 0 { round3(retry_ok as f64 / retried as f64) } else { 0.0 },
            "told_ms": summary(&mut told),
        },
    });
    println!("{out}");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_exact_over_a_period() {
        let mut m = Mix::parse("low=70,normal=20,high=8,critical=2").unwrap();
        let mut n = [0; 4];
        for _ in 0..100 {
            n[m.next()] += 1;
        }
        assert_eq!(n, [70, 20, 8, 2]);
        assert!(Mix::parse("low=0").is_err());
        assert!(Mix::parse("urgent=1").is_err());
        assert!(Mix::parse("low=1,low=2").is_err());
    }

    #[test]
    fn headers_parse() {
        let h = parse_headers(&["authorization: Bearer k".into(), "x-a:1".into()]).unwrap();
        assert_eq!(h["authorization"], "Bearer k");
        assert_eq!(h["x-a"], "1");
        assert!(parse_headers(&["no-colon".into()]).is_err());
        assert!(parse_headers(&["bad name:1".into()]).is_err());
    }

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}

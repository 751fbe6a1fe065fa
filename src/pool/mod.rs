//! The model pool: a process supervisor for the local model servers the gateway manages
//! (deployments with a `command`).
//!
//! Owns each managed process's life: start on demand (one start however many requests wait for
//! it), readiness polling of `ready_path`, crash detection, restart backoff, stop (SIGTERM to the
//! process group, SIGKILL after a grace period), idle-TTL stops, a bounded ring buffer of its
//! output, and no orphans (`process`: process groups, `PR_SET_PDEATHSIG`, stop on shutdown).
//! It knows nothing of memory or admission: it starts and stops when told, and reports what
//! really happened as [`Event`]s (`Ready`, `Crashed`, `Stopped`) to one listener, which keeps
//! the memory books. A process's state lock is never held across an `.await`, nor while the
//! listener runs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{oneshot, Notify};

mod process;

pub(crate) use process::STOP_GRACE;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lines of a process's output kept for the admin API.
const LOG_LINES: usize = 200;
/// Longest output line kept (longer ones are cut).
const LOG_LINE_MAX: usize = 2000;
/// Longest wait between restarts after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A process up this long before it crashed restarts without backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Time between two readiness probes.
const READY_POLL: Duration = Duration::from_millis(100);

/// How to run one managed model server.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// argv, with `{port}`, `{host}` and `{model}` still in it.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub ready_path: String,
    pub startup_timeout: Duration,
    /// `None`: never stopped for being idle.
    pub idle_ttl: Option<Duration>,
    /// What `{model}` stands for.
    pub model: String,
}

/// Where a managed process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Stopped,
    Starting,
    Ready,
    Stopping,
    Failed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }
}

struct ProcState {
    phase: Phase,
    pid: Option<u32>,
    port: Option<u16>,
    /// Starts so far (the first included).
    starts: u64,
    /// Restarts after a crash or a failed start.
    restarts: u64,
    consecutive_failures: u32,
    /// No new start before this (backoff after failures).
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Asks the supervising task to stop the process.
    stop_tx: Option<oneshot::Sender<()>>,
    /// Unix time of the last start, for the admin view.
    started_at: Option<u64>,
    /// When it last became ready: a crash after a long healthy run starts the backoff afresh.
    ready_at: Option<Instant>,
    /// When the current (or last) start began, and how long the last successful one took:
    /// the `Retry-After` of a request whose deadline passes during a start.
    start_began: Option<Instant>,
    last_start: Option<Duration>,
}

/// Why a managed model could not be made ready.
#[derive(Debug, Clone)]
pub(crate) enum StartError {
    /// It failed to start (or is in backoff after failures): retry after this many seconds.
    Failed { message: String, retry_after_s: u64 },
    /// Still starting when the request's deadline passed; it is expected to be ready in this
    /// many ms (from the last start's duration, or `startup_timeout` before any).
    Deadline { ready_in_ms: u64 },
}

/// What happened to a managed process, as its listener hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// It answers on its ready path.
    Ready,
    /// It died, or its start failed: whatever it held is free (sent before its waiters learn).
    Crashed,
    /// It is gone (after a stop or a crash): waiters for what it held may be served.
    Stopped,
}

type Listener = Box<dyn Fn(Event) + Send + Sync>;

/// One managed model server.
pub(crate) struct Managed {
    /// Shown in logs and the admin API, e.g. `llama-3-8b@q8`.
    pub name: String,
    spec: Spec,
    state: Mutex<ProcState>,
    changed: Notify,
    logs: Mutex<VecDeque<String>>,
    /// Told of every [`Event`].
    listener: Mutex<Option<Listener>>,
    this: Weak<Managed>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Backoff before start number `failures + 1`: none after the first failure, then 1 s, 2 s, ... 30 s.
pub(crate) fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(5)).min(MAX_BACKOFF),
    }
}

/// `template` with `{port}`, `{host}` and `{model}` filled in.
pub(crate) fn fill(template: &str, host: &str, port: u16, model: &str) -> String {
    template
        .replace("{port}", &port.to_string())
        .replace("{host}", host)
        .replace("{model}", model)
}

impl Managed {
    pub(crate) fn new(name: String, spec: Spec) -> Arc<Managed> {
        Arc::new_cyclic(|this| Managed {
            name,
            spec,
            state: Mutex::new(ProcState {
                phase: Phase::Stopped,
                pid: None,
                port: None,
                starts: 0,
                restarts: 0,
                consecutive_failures: 0,
                retry_at: None,
                last_error: None,
                stop_tx: None,
                started_at: None,
                ready_at: None,
                start_began: None,
                last_start: None,
            }),
            changed: Notify::new(),
            logs: Mutex::new(VecDeque::new()),
            listener: Mutex::new(None),
            this: this.clone(),
        })
    }

    /// Sets who hears of this process's [`Event`]s.
    pub(crate) fn on_event(&self, f: impl Fn(Event) + Send + Sync + 'static) {
        *lock(&self.listener) = Some(Box::new(f));
    }

    fn emit(&self, e: Event) {
        if let Some(f) = lock(&self.listener).as_ref() {
            f(e);
        }
    }

    /// The base URL while the process is ready.
    pub(crate) fn url(&self) -> Option<String> {
        let st = lock(&self.state);
        match (st.phase, st.port) {
            (Phase::Ready, Some(p)) => Some(format!("http://127.0.0.1:{p}/v1")),
            _ => None,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        lock(&self.state).phase
    }

    pub(crate) fn startup_timeout(&self) -> Duration {
        self.spec.startup_timeout
    }

    pub(crate) fn idle_ttl(&self) -> Option<Duration> {
        self.spec.idle_ttl
    }

    fn set_phase(&self, st: &mut ProcState, phase: Phase) {
        st.phase = phase;
        self.changed.notify_waiters();
    }

    /// Waits until the process is ready, starting it if needed (once, however many wait).
    /// A start that fails while this request waits for it is its failure too.
    pub(crate) async fn ensure_ready(&self, deadline: Instant) -> Result<(), StartError> {
        let mut saw_start = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut st = lock(&self.state);
                let now = Instant::now();
                match st.phase {
                    Phase::Ready => return Ok(()),
                    Phase::Failed if saw_start => return Err(Self::start_error(&st, now)),
                    Phase::Starting => {
                        saw_start = true;
                        deadline
                    }
                    Phase::Stopping => deadline,
                    Phase::Stopped | Phase::Failed => match st.retry_at.filter(|at| *at > now) {
                        // Backing off after failures, past this request's deadline.
                        Some(at) if at >= deadline => return Err(Self::start_error(&st, now)),
                        // Backing off: wait for it to end, then start.
                        Some(at) => at,
                        None => {
                            st.starts += 1;
                            st.start_began = Some(now);
                            st.pid = None;
                            st.port = None;
                            self.set_phase(&mut st, Phase::Starting);
                            if let Some(me) = self.this.upgrade() {
                                tokio::spawn(me.run());
                            }
                            saw_start = true;
                            deadline
                        }
                    },
                }
            };
            let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(wait_until));
            tokio::select! {
                _ = &mut notified => {}
                _ = timer => {
                    if wait_until >= deadline {
                        return Err(self.deadline_error());
                    }
                }
            }
        }
    }

    /// The request's deadline passed while the process starts: when it is expected ready.
    fn deadline_error(&self) -> StartError {
        let st = lock(&self.state);
        let expected = st.last_start.unwrap_or(self.spec.startup_timeout);
        let elapsed = st.start_began.map_or(Duration::ZERO, |t| t.elapsed());
        // Overdue against the last start: at least a quarter of it more.
        let left = expected.saturating_sub(elapsed).max(expected / 4);
        StartError::Deadline {
            ready_in_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn start_error(st: &ProcState, now: Instant) -> StartError {
        let secs = st.retry_at.map_or(1, |at| {
            at.saturating_duration_since(now).as_secs_f64().ceil() as u64
        });
        StartError::Failed {
            message: st
                .last_error
                .clone()
                .unwrap_or_else(|| "it failed to start".into()),
            retry_after_s: secs.max(1),
        }
    }

    /// Starts the process, waits for it to be ready, and supervises it until it stops.
    async fn run(self: Arc<Self>) {
        let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(a) => a.port(),
            Err(e) => return self.start_failed(format!("no free port: {e}"), None).await,
        };
        let argv: Vec<String> = self
            .spec
            .command
            .iter()
            .map(|a| fill(a, "127.0.0.1", port, &self.spec.model))
            .collect();
        let env = self
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), fill(v, "127.0.0.1", port, &self.spec.model)));
        let mut child = match process::spawn(&argv, env, self.spec.cwd.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                return self
                    .start_failed(format!("cannot run {:?}: {e}", argv[0]), None)
                    .await
            }
        };
        let pid = child.id();
        {
            let mut st = lock(&self.state);
            st.pid = pid;
            st.port = Some(port);
            st.started_at = Some(unix_now());
        }
        tracing::info!(model = %self.name, pid, port, "starting model server");
        if let Some(out) = child.stdout.take() {
            tokio::spawn(self.clone().pipe_logs(out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(self.clone().pipe_logs(err));
        }
        let probe = format!("http://127.0.0.1:{port}{}", self.spec.ready_path);
        let ready = tokio::select! {
            r = tokio::time::timeout(self.spec.startup_timeout, poll_ready(&probe)) => r.is_ok(),
            status = child.wait() => {
                process::kill_leftovers(pid);
                let msg = match status {
                    Ok(s) => format!("it exited while starting ({s})"),
                    Err(e) => format!("it could not be watched: {e}"),
                };
                return self.start_failed(msg, None).await;
            }
        };
        if !ready {
            let msg = format!(
                "it did not answer {} within startup_timeout_s ({} s)",
                self.spec.ready_path,
                self.spec.startup_timeout.as_secs()
            );
            return self.start_failed(msg, Some(child)).await;
        }
        self.supervise(child, pid, port).await;
    }

    /// Runs a ready process until it dies or is told to stop.
    async fn supervise(&self, mut child: process::Server, pid: Option<u32>, port: u16) {
        let (stop_tx, stop_rx) = oneshot::channel();
        {
            let mut st = lock(&self.state);
            st.retry_at = None;
            st.ready_at = Some(Instant::now());
            st.last_start = st.start_began.map(|t| t.elapsed());
            st.stop_tx = Some(stop_tx);
            self.set_phase(&mut st, Phase::Ready);
        }
        tracing::info!(model = %self.name, pid, port, "model server ready");
        // The listener stops it at once if it is no longer wanted (evicted while starting).
        self.emit(Event::Ready);
        tokio::select! {
            status = child.wait() => {
                process::kill_leftovers(pid);
                let msg = match status {
                    Ok(s) => format!("it exited ({s})"),
                    Err(e) => format!("it could not be watched: {e}"),
                };
                tracing::warn!(model = %self.name, pid, "model server died: {msg}");
                self.crashed(msg);
            }
            _ = stop_rx => {
                process::terminate(&mut child).await;
                tracing::info!(model = %self.name, pid, "model server stopped");
                let mut st = lock(&self.state);
                st.pid = None;
                st.port = None;
                st.stop_tx = None;
                self.set_phase(&mut st, Phase::Stopped);
            }
        }
        self.emit(Event::Stopped);
    }

    /// A start failed: kill what is left, back off, free the memory, wake the waiters.
    async fn start_failed(&self, msg: String, child: Option<process::Server>) {
        if let Some(mut c) = child {
            process::terminate(&mut c).await;
        }
        tracing::warn!(model = %self.name, "model server failed to start: {msg}");
        self.push_log(format!("[mofa-gateway] start failed: {msg}"));
        self.crashed(msg);
        self.emit(Event::Stopped);
    }

    fn crashed(&self, msg: String) {
        self.emit(Event::Crashed);
        let mut st = lock(&self.state);
        st.pid = None;
        st.port = None;
        st.stop_tx = None;
        st.restarts += 1;
        if st.ready_at.is_some_and(|t| t.elapsed() >= HEALTHY_RUN) {
            st.consecutive_failures = 0;
        }
        st.ready_at = None;
        st.consecutive_failures += 1;
        st.retry_at = Some(Instant::now() + backoff(st.consecutive_failures));
        st.last_error = Some(msg);
        self.set_phase(&mut st, Phase::Failed);
    }

    /// Stops the process if it is ready. The caller decides whether it should stop (the
    /// memory books); one that is starting is stopped by the listener of its `Ready` event if
    /// it is no longer wanted then.
    pub(crate) fn stop(&self) {
        let stop = {
            let mut st = lock(&self.state);
            if st.phase != Phase::Ready {
                return;
            }
            let tx = st.stop_tx.take();
            self.set_phase(&mut st, Phase::Stopping);
            tx
        };
        if let Some(tx) = stop {
            let _ = tx.send(());
        }
    }

    /// Waits until the process is stopped (or failed), up to `timeout`.
    pub(crate) async fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if matches!(self.phase(), Phase::Stopped | Phase::Failed) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    async fn pipe_logs(self: Arc<Self>, out: impl AsyncRead + Unpin) {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = truncate(&line, LOG_LINE_MAX).to_string();
            tracing::info!(model = %self.name, "{line}");
            self.push_log(line);
        }
    }

    fn push_log(&self, line: String) {
        let mut logs = lock(&self.logs);
        if logs.len() == LOG_LINES {
            logs.pop_front();
        }
        logs.push_back(line);
    }

    /// The admin view of this process (the memory books add their own fields).
    pub(crate) fn snapshot(&self) -> Value {
        let st = lock(&self.state);
        let logs: Vec<String> = lock(&self.logs)
            .iter()
            .rev()
            .take(20)
            .rev()
            .cloned()
            .collect();
        json!({
            "name": self.name,
            "state": st.phase.as_str(),
            "pid": st.pid,
            "port": st.port,
            "started_at": st.started_at,
            "starts": st.starts,
            "restarts": st.restarts,
            "last_error": st.last_error,
            "idle_ttl_s": self.spec.idle_ttl.map(|d| d.as_secs()),
            "log": logs,
        })
    }
}

/// Polls `url` until it answers 2xx.
async fn poll_ready(url: &str) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(_) => return std::future::pending().await,
    };
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// `s` cut to at most `max` characters, on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

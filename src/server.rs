//! Starting and stopping the gateway: builds the state from a config, accepts connections
//! (HTTP/1.1 and h2 with prior knowledge on one port, with the slow-client limits: header read
//! timeout, header size), and shuts down gracefully. It must not hold request-path logic.
//!
//! Replies made below the app are envelopes too: what hyper answers by itself to a request it
//! cannot parse (400: a bad header byte, `content-length: abc`, two Content-Lengths, a
//! Transfer-Encoding that does not end in `chunked`, a space in the path; 431: a head over
//! `server.max_header_bytes` or over 100 header lines; 414; 505) is rewritten on its way out
//! ([`EnvelopeIo`]) into the JSON envelope with `content-type: application/json`,
//! `x-request-id` and `connection: close`. (A `Transfer-Encoding` hyper takes but the gateway
//! cannot read, `gzip, chunked`, is the `http` stamp layer's refusal.)
//!
//! `serve` (the binary) runs on lanes ([`Builder::lanes`]): one one-thread runtime per
//! core; the first accepts and hands each connection to the lane with the fewest, which keeps
//! it. Tests and embedders use one lane (the default) on the runtime they have:
//! [`Gateway::serve`] or [`Gateway::spawn`].
//!
//! Shutdown (the first SIGTERM/SIGINT): the listener closes (new connections are refused);
//! `/readyz` turns 503; a request on an open connection that is not admitted yet, and every
//! queued one, gets 503 `shutting_down`; requests and streams in flight may finish for up to
//! `server.shutdown_grace_s`; then the model servers the pool runs are stopped and `serve`
//! returns. A second signal exits at once (see `main`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{Request, StatusCode};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::error::{ApiError, ErrorKind};
use crate::headers::REQUEST_ID;

use crate::config::{Config, ServerConfig};
use crate::http::{App, AppFuture, AppState};
use crate::proxy::observe::ClientAddr;
use crate::reload::Source;

use crate::orchestrator::BuildError;

/// The app, with the connection's peer address put into each request's extensions (for
/// the access log).
#[derive(Clone)]
struct WithPeer {
    inner: App,
    peer: SocketAddr,
}

impl Service<Request<hyper::body::Incoming>> for WithPeer {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = AppFuture;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(ClientAddr(self.peer));
        self.inner.call(req)
    }
}

/// A gateway bound to a port but not serving yet: [`Gateway::build`], or
/// [`Gateway::builder`] for the options.
pub struct Gateway {
    listener: TcpListener,
    app: App,
    server: ServerConfig,
    lanes: usize,
}

/// The options of a [`Gateway`] before it is built.
pub struct Builder<'a> {
    cfg: &'a Config,
    lanes: usize,
    source: Option<Source>,
}

impl Builder<'_> {
    /// Serves on `lanes` threads (default 1): the one [`Gateway::serve`] runs on, a
    /// one-thread runtime, and `lanes - 1` more, each a one-thread runtime. The lane that
    /// accepts hands each new connection to the lane with the fewest live connections (itself
    /// included); a connection then lives on its lane, with the lane's own upstream pool, so a
    /// request never wakes another thread (one hand-over per connection, not per request).
    /// The state (admission, limits, metrics) is shared. The lane count is process-wide: the
    /// deployments' clients of the gateway built last follow it.
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.clamp(1, 1024);
        self
    }

    /// The file the config came from: [`Reloader::reload`] (and `POST /admin/reload`) read it
    /// again. `listen`: the address that overrides its `server.listen` (the command line's
    /// `--listen`), kept across reloads. Without it, a reload answers that there is no file.
    pub fn config_file(mut self, path: impl Into<PathBuf>, listen: Option<SocketAddr>) -> Self {
        self.source = Some(Source {
            path: path.into(),
            listen,
        });
        self
    }

    /// Builds the gateway on `listener` (which overrides `server.listen`): the deployments'
    /// clients, the simulators the config starts, the limits' store, the model pool.
    pub async fn build(self, listener: TcpListener) -> Result<Gateway, BuildError> {
        // Before the deployments are built: each lane gets its own upstream pool.
        crate::upstream::set_lanes(self.lanes);
        let state = Arc::new(AppState::build(self.cfg, self.source).await?);
        Ok(Gateway {
            listener,
            app: App::new(state),
            server: self.cfg.server.clone(),
            lanes: self.lanes,
        })
    }
}

impl Gateway {
    /// The options for a gateway serving `cfg`.
    pub fn builder(cfg: &Config) -> Builder<'_> {
        Builder {
            cfg,
            lanes: 1,
            source: None,
        }
    }

    /// Builds the gateway for `cfg` on `listener` (which overrides `server.listen`), on one
    /// lane.
    pub async fn build(cfg: &Config, listener: TcpListener) -> Result<Gateway, BuildError> {
        Gateway::builder(cfg).build(listener).await
    }

    /// A handle that reloads the config file ([`Builder::config_file`]) while it serves.
    pub fn reloader(&self) -> Reloader {
        Reloader::new(self.app.state().clone())
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully (see the module doc), on
    /// the runtime it runs on and on the other lanes ([`Builder::lanes`]).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let lanes = self.lanes;
        let grace = Duration::from_secs(self.server.shutdown_grace_s);
        let live: Arc<[AtomicUsize]> = (0..lanes.max(1)).map(|_| AtomicUsize::new(0)).collect();
        let mut others = Vec::new();
        for lane in 1..lanes {
            match start_lane(lane, self.app.clone(), self.server.clone(), grace) {
                Ok(lane) => others.push(lane),
                Err(e) => {
                    tracing::warn!(lane, error = %e, "cannot start a serving thread; serving on fewer");
                    break;
                }
            }
        }
        let hand = Handover {
            live,
            lanes: others.iter().map(|(tx, _)| tx.clone()).collect(),
        };
        let state = self.app.state().clone();
        let graceful = accept_loop(self.listener, self.app, &self.server, shutdown, hand).await;
        state.begin_shutdown();
        tracing::info!(
            grace_s = grace.as_secs(),
            "listener closed; finishing requests in flight"
        );
        let others_started = !others.is_empty();
        let all = async {
            graceful.finish().await;
            for (tx, ended) in others {
                drop(tx);
                let _ = ended.await;
            }
        };
        // The other lanes each wait `grace` for their own: a moment more for them to say so.
        let margin = if others_started {
            Duration::from_millis(500)
        } else {
            Duration::ZERO
        };
        if tokio::time::timeout(grace + margin, all).await.is_err() {
            tracing::warn!("shutdown grace period over; closing the connections left");
        }
        state.stop_models().await;
        Ok(())
    }

    /// Starts serving on a background task (tests, embedding); returns the address.
    pub fn spawn(self) -> std::io::Result<SocketAddr> {
        let addr = self.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = self.serve(std::future::pending()).await {
                tracing::error!(error = %e, "gateway stopped");
            }
        });
        Ok(addr)
    }
}

/// Reloads a serving gateway's config file (the binary calls it on `SIGHUP` and `--watch`).
#[derive(Clone)]
pub struct Reloader {
    state: Arc<AppState>,
}

impl Reloader {
    fn new(state: Arc<AppState>) -> Reloader {
        Reloader { state }
    }

    /// Reads the config file again and puts it into effect, entity by entity; an invalid
    /// file, or one that changes a key only a restart changes, changes nothing. `Ok`: what
    /// changed, by name; `Err`: why nothing did. Either is also logged.
    pub async fn reload(&self) -> Result<String, String> {
        match self.state.reload().await {
            Ok(v) => Ok(v["summary"].as_str().unwrap_or_default().to_owned()),
            Err(e) => Err(e.message.clone()),
        }
    }

    /// Reloads whenever the config file or its `keys_file` changes (checked every `every`),
    /// until the gateway is gone (see `reload::watch`).
    pub async fn watch(self, every: Duration) {
        let weak = Arc::downgrade(&self.state);
        drop(self);
        let files = || weak.upgrade().map(|s| s.watched_files());
        let read = || weak.upgrade().map(|s| s.read_stamps()).unwrap_or_default();
        let reload = || {
            let state = weak.upgrade();
            async move {
                if let Some(s) = state {
                    let _ = s.reload().await;
                }
            }
        };
        crate::reload::watch(every, files, read, reload).await;
    }
}

/// A connection handed to another lane: the socket (out of the acceptor's runtime), its peer,
/// its count among the lane's live connections, and when it was accepted.
type Handed = (std::net::TcpStream, SocketAddr, Live, Instant);

/// Connections waiting for a lane, at most (beyond, the acceptor serves it itself).
const HANDOVER_QUEUE: usize = 256;

/// How the acceptor hands connections over: each lane's live connections (index 0: the
/// acceptor's own) and a channel to each other lane.
struct Handover {
    live: Arc<[AtomicUsize]>,
    lanes: Vec<tokio::sync::mpsc::Sender<Handed>>,
}

impl Handover {
    /// The lane with the fewest live connections (the first such, so the acceptor on a tie).
    fn pick(&self) -> usize {
        let n = self.live.len().min(self.lanes.len() + 1);
        (0..n)
            .min_by_key(|&i| self.live[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// Counts a live connection of a lane while it is held.
struct Live(Arc<[AtomicUsize]>, usize);

impl Live {
    fn new(live: &Arc<[AtomicUsize]>, lane: usize) -> Live {
        if let Some(c) = live.get(lane) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Live(live.clone(), lane)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(c) = self.0.get(self.1) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Starts lane `lane` on a thread of its own: it serves the connections it is handed until
/// the sender is dropped, then lets them finish (up to `grace`). Returns the sender and a
/// receiver that resolves when the lane has stopped.
fn start_lane(
    lane: usize,
    app: App,
    server: ServerConfig,
    grace: Duration,
) -> std::io::Result<(
    tokio::sync::mpsc::Sender<Handed>,
    tokio::sync::oneshot::Receiver<()>,
)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Handed>(HANDOVER_QUEUE);
    let (done, ended) = tokio::sync::oneshot::channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("mofa-lane-{lane}"))
        .spawn(move || {
            rt.block_on(async move {
                crate::upstream::set_lane(lane);
                let conns = Connections::new(app, &server);
                while let Some((std_tcp, peer, held, accepted)) = rx.recv().await {
                    match tokio::net::TcpStream::from_std(std_tcp) {
                        Ok(tcp) => conns.serve(tcp, peer, held, accepted),
                        Err(e) => tracing::warn!(lane, error = %e, "a handed connection failed"),
                    }
                }
                let _ = tokio::time::timeout(grace, conns.drain.finish()).await;
            });
            let _ = done.send(());
        })?;
    Ok((tx, ended))
}

/// What serves the connections of one lane: the HTTP builder, the app, and the handle that
/// tells them to finish and waits for them at shutdown.
struct Connections {
    http: auto::Builder<TokioExecutor>,
    service: App,
    head_timeout: Duration,
    drain: Drain,
}

/// How often an h2 connection's peer is pinged, and how long it has to answer.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

impl Connections {
    fn new(app: App, server: &ServerConfig) -> Connections {
        let head_timeout = Duration::from_millis(server.header_read_timeout_ms);
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            // The read buffer bounds the head: a larger one is 431.
            .max_buf_size(server.max_header_bytes.max(8192));
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_KEEP_ALIVE))
            .keep_alive_timeout(H2_KEEP_ALIVE)
            .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX));
        Connections {
            http,
            service: app,
            head_timeout,
            drain: Drain::new(),
        }
    }

    /// Serves one connection on a task of this runtime; `held` is dropped when it ends.
    ///
    /// One deadline, `header_read_timeout_ms` from `accepted`, covers the protocol sniff and
    /// the first request head (HTTP/1.1's head, h2's first HEADERS frame): a connection that
    /// has not sent one by then is closed. After it, HTTP/1.1 is hyper's (its header timer
    /// covers each next head, and closes a keep-alive connection idle that long); an h2
    /// connection with no stream open for that long is closed with a GOAWAY, and its peer is
    /// pinged ([`H2_KEEP_ALIVE`]).
    fn serve(&self, tcp: tokio::net::TcpStream, peer: SocketAddr, held: Live, accepted: Instant) {
        // Small SSE chunks must leave at once, not wait for Nagle and a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let http = self.http.clone();
        let app = self.service.clone();
        let mut stop = self.drain.watch();
        let open = self.drain.open();
        let head_timeout = self.head_timeout;
        tokio::spawn(async move {
            let _held = (held, open);
            let deadline = tokio::time::Instant::from_std(accepted + head_timeout);
            // The auto builder would wait for the first bytes without limit.
            let Ok(Ok(h2)) = tokio::time::timeout_at(deadline, protocol_known(&tcp)).await else {
                return;
            };
            let tracker = Arc::new(Tracker::new());
            let service = Tracked {
                inner: WithPeer { inner: app, peer },
                tracker: tracker.clone(),
                h2,
            };
            let io = TokioIo::new(EnvelopeIo::new(tcp));
            let conn = http.serve_connection(io, service).into_owned();
            tokio::pin!(conn);
            let mut closing = *stop.borrow_and_update();
            if closing {
                conn.as_mut().graceful_shutdown();
            }
            let mut wake = Some(deadline);
            loop {
                tokio::select! {
                    // A client that went away, or sent garbage: nothing to answer.
                    _ = conn.as_mut() => return,
                    _ = stop.changed(), if !closing => {
                        // Shutdown: the grace period bounds what follows.
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        wake = None;
                    }
                    _ = sleep_until_some(wake), if wake.is_some() => {
                        if closing || !tracker.seen.load(Ordering::Relaxed) {
                            // No head by the deadline, or a GOAWAY the peer does not see
                            // through: closed without a word (as hyper does).
                            return;
                        }
                        wake = match (h2, tracker.idle_since()) {
                            (false, _) => None,
                            (true, None) => Some(tokio::time::Instant::now() + head_timeout),
                            (true, Some(since)) if since.elapsed() >= head_timeout => {
                                // GOAWAY, then a PING the peer must answer before the close:
                                // as long again, at most.
                                conn.as_mut().graceful_shutdown();
                                closing = true;
                                Some(tokio::time::Instant::now() + head_timeout)
                            }
                            (true, Some(since)) => {
                                Some(tokio::time::Instant::from_std(since + head_timeout))
                            }
                        };
                    }
                }
            }
        });
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Tells a lane's connections to finish (HTTP/1.1: after the request in progress; h2: a GOAWAY)
/// and waits until they have.
struct Drain {
    stop: tokio::sync::watch::Sender<bool>,
    open: Arc<OpenCount>,
}

struct OpenCount {
    n: AtomicUsize,
    none: tokio::sync::Notify,
}

/// One open connection of a lane, while held.
struct Open(Arc<OpenCount>);

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

impl Drain {
    fn new() -> Drain {
        Drain {
            stop: tokio::sync::watch::Sender::new(false),
            open: Arc::new(OpenCount {
                n: AtomicUsize::new(0),
                none: tokio::sync::Notify::new(),
            }),
        }
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    fn open(&self) -> Open {
        self.open.n.fetch_add(1, Ordering::AcqRel);
        Open(self.open.clone())
    }

    /// Tells every connection to finish, and waits until none is open.
    async fn finish(&self) {
        self.stop.send_replace(true);
        loop {
            let none = self.open.none.notified();
            tokio::pin!(none);
            none.as_mut().enable();
            if self.open.n.load(Ordering::Acquire) == 0 {
                return;
            }
            none.await;
        }
    }
}

/// What a connection has done: whether a request head arrived, and (h2) how many streams are
/// open and since when none is.
struct Tracker {
    seen: AtomicBool,
    open_streams: AtomicUsize,
    born: Instant,
    /// Milliseconds after `born` that the last stream ended.
    last_end_ms: AtomicU64,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            seen: AtomicBool::new(false),
            open_streams: AtomicUsize::new(0),
            born: Instant::now(),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// Since when no stream is open (`None`: one is).
    fn idle_since(&self) -> Option<Instant> {
        (self.open_streams.load(Ordering::Acquire) == 0)
            .then(|| self.born + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire)))
    }
}

/// An open h2 stream: its reply's body holds it until the body is done or dropped.
struct StreamOpen(Arc<Tracker>);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        let t = &self.0;
        let ms = u64::try_from(t.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        t.last_end_ms.store(ms, Ordering::Release);
        t.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The app, noting each request in the connection's [`Tracker`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    tracker: Arc<Tracker>,
    h2: bool,
}

impl<S> Service<Request<hyper::body::Incoming>> for Tracked<S>
where
    S: Service<Request<hyper::body::Incoming>, Response = Response>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        self.tracker.seen.store(true, Ordering::Relaxed);
        let open = self.h2.then(|| {
            self.tracker.open_streams.fetch_add(1, Ordering::AcqRel);
            StreamOpen(self.tracker.clone())
        });
        TrackedFuture {
            inner: self.inner.call(req),
            open,
        }
    }
}

/// The reply of a [`Tracked`] service: an h2 stream's body keeps the stream counted.
struct TrackedFuture<F> {
    inner: F,
    open: Option<StreamOpen>,
}

impl<F, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response, E>> + Unpin,
{
    type Output = Result<Response, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        Poll::Ready(resp.map(|r| match self.open.take() {
            Some(open) => r.map(|body| {
                axum::body::Body::new(CountedBody {
                    inner: body,
                    _open: open,
                })
            }),
            None => r,
        }))
    }
}

/// A reply body that holds its stream open (see [`StreamOpen`]).
struct CountedBody {
    inner: axum::body::Body,
    _open: StreamOpen,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts on `listener` until `stop` resolves, serving each connection here or handing it
/// to another lane (`hand`, which may have none); then closes the listener and returns the handle that waits for
/// this lane's connections to end.
async fn accept_loop(
    listener: TcpListener,
    app: App,
    server: &ServerConfig,
    stop: impl Future<Output = ()>,
    hand: Handover,
) -> Drain {
    let conns = Connections::new(app, server);
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let accepted = Instant::now();
        let lane = hand.pick();
        let Some(tx) = lane.checked_sub(1).and_then(|i| hand.lanes.get(i)) else {
            conns.serve(tcp, peer, Live::new(&hand.live, 0), accepted);
            continue;
        };
        let std_tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection over");
                continue;
            }
        };
        if let Err(e) = tx.try_send((std_tcp, peer, Live::new(&hand.live, lane), accepted)) {
            // That lane is stuck or gone: serve it here (its count drops with the tuple).
            let (std_tcp, peer, _, _) = match e {
                tokio::sync::mpsc::error::TrySendError::Full(c)
                | tokio::sync::mpsc::error::TrySendError::Closed(c) => c,
            };
            if let Ok(tcp) = tokio::net::TcpStream::from_std(std_tcp) {
                conns.serve(tcp, peer, Live::new(&hand.live, 0), accepted);
            }
        }
    }
    drop(listener);
    conns.drain
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Waits until the first bytes of a connection tell HTTP/1.1 from the h2 preface (or the
/// client closed it); whether it is h2.
async fn protocol_known(tcp: &tokio::net::TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 || n == PREFACE.len() || !PREFACE.starts_with(&buf[..n]) {
            return Ok(n == PREFACE.len() && buf[..] == *PREFACE);
        }
        // A partial preface (rare: real clients send it whole): the rest is already on its way.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The client connection, with hyper's own error replies rewritten into envelopes (see the
/// module doc). Everything else passes untouched.
struct EnvelopeIo<T> {
    io: T,
    /// A rewritten reply still being written: bytes and how many are out.
    pending: Option<(Bytes, usize)>,
    /// The first bytes read since the last reply head went out: the start of the head being
    /// read (its request line), which tells a version hyper refuses (a 505) from other 400s.
    line: [u8; LINE_KEPT],
    line_len: usize,
}

/// How much of a head's start [`EnvelopeIo`] keeps: a request line up to its version.
const LINE_KEPT: usize = 96;

impl<T> EnvelopeIo<T> {
    fn new(io: T) -> Self {
        EnvelopeIo {
            io,
            pending: None,
            line: [0; LINE_KEPT],
            line_len: 0,
        }
    }

    /// Notes what a read brought (the start of it, while the head's first bytes are wanted).
    fn read_in(&mut self, got: &[u8]) {
        let n = got.len().min(LINE_KEPT - self.line_len);
        self.line[self.line_len..self.line_len + n].copy_from_slice(&got[..n]);
        self.line_len += n;
    }

    /// A reply head goes out: the next bytes read start the next head.
    fn reply_out(&mut self, buf: &[u8]) {
        if buf.starts_with(b"HTTP/1.") {
            self.line_len = 0;
        }
    }
}

/// Whether a request line's version is one HTTP/1 cannot serve (`HTTP/2.0`, `HTTP/1.2`, ...):
/// `METHOD TARGET HTTP/d.d` with a version other than 1.0 and 1.1.
fn unsupported_version(line: &[u8]) -> bool {
    let line = line
        .split(|b| *b == b'\r' || *b == b'\n')
        .next()
        .unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ').filter(|p| !p.is_empty());
    let (Some(_), Some(_), Some(v), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    matches!(v, [b'H', b'T', b'T', b'P', b'/', a, b'.', b] if a.is_ascii_digit() && b.is_ascii_digit())
        && v != b"HTTP/1.0"
        && v != b"HTTP/1.1"
}

impl<T: tokio::io::AsyncWrite + Unpin> EnvelopeIo<T> {
    /// Writes what is left of a rewritten reply; `Ready(Ok)` once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((bytes, off)) = &mut self.pending {
            match Pin::new(&mut self.io).poll_write(cx, &bytes[*off..]) {
                Poll::Ready(Ok(0)) => {
                    self.pending = None;
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    *off += n;
                    if *off >= bytes.len() {
                        self.pending = None;
                    }
                }
                Poll::Ready(Err(e)) => {
                    self.pending = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// If `buf` starts with one of hyper's own error replies, queues its envelope instead and
    /// returns how many bytes of `buf` it replaces.
    fn rewrite(&mut self, buf: &[u8]) -> Option<usize> {
        let head_len = own_error_head(buf)?;
        let mut status = std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())?;
        if status == StatusCode::BAD_REQUEST && unsupported_version(&self.line[..self.line_len]) {
            // hyper answers a version it cannot parse with 400: the table says 505.
            status = StatusCode::HTTP_VERSION_NOT_SUPPORTED;
        }
        self.pending = Some((error_reply(status), 0));
        Some(head_len)
    }
}

/// The length of the head at the start of `buf` if it is an error reply hyper wrote itself
/// (a 4xx/5xx head without `x-request-id`, which every reply of the app carries).
fn own_error_head(buf: &[u8]) -> Option<usize> {
    if buf.len() < 16
        || !(buf.starts_with(b"HTTP/1.1 ") || buf.starts_with(b"HTTP/1.0 "))
        || !matches!(buf[9], b'4' | b'5')
    {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = &buf[..end];
    let has_id = head.windows(REQUEST_ID.as_str().len() + 1).any(|w| {
        w[..w.len() - 1].eq_ignore_ascii_case(REQUEST_ID.as_str().as_bytes())
            && w[w.len() - 1] == b':'
    });
    (!has_id).then_some(end)
}

/// The envelope reply for a status hyper produced (the kind it stands for: a head too large,
/// a path too long, a version, else a request that is not HTTP).
fn error_reply(status: StatusCode) -> Bytes {
    let kind = match ErrorKind::of_foreign(status) {
        k @ (ErrorKind::HeadTooLarge | ErrorKind::UriTooLong | ErrorKind::VersionNotSupported) => k,
        _ => ErrorKind::MalformedRequest,
    };
    let message = match kind {
        ErrorKind::HeadTooLarge => {
            "the request head is too large (over server.max_header_bytes or 100 header lines)"
        }
        ErrorKind::UriTooLong => "the request path is too long",
        ErrorKind::VersionNotSupported => {
            "only HTTP/1.1 (and h2 with prior knowledge) are supported"
        }
        _ => {
            "the request is not valid HTTP: a malformed request line, path, header name or \
             value, Content-Length or Transfer-Encoding"
        }
    };
    let status = kind.spec().status;
    let body = ApiError::new(kind, message).envelope();
    let id = crate::proxy::accept::accept(&axum::http::HeaderMap::new()).id;
    let mut out = BytesMut::with_capacity(body.len() + 256);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("Error").as_bytes());
    out.put_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.put_slice(body.len().to_string().as_bytes());
    out.put_slice(b"\r\nx-request-id: ");
    out.put_slice(id.as_bytes());
    out.put_slice(
        b"\r\nx-mofa-backend: gateway\r\nx-mofa-latency-ms: 0\r\nconnection: close\r\n\r\n",
    );
    out.put_slice(&body);
    out.freeze()
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EnvelopeIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.line_len < LINE_KEPT && buf.filled().len() > before {
            let me = &mut *self;
            me.read_in(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for EnvelopeIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if let Some(n) = self.rewrite(buf) {
            // Written as far as hyper knows; the envelope goes out now or at the flush.
            self.line_len = 0;
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(n));
        }
        self.reply_out(buf);
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if let Some(n) = self.rewrite(first) {
                self.line_len = 0;
                let _ = self.drain(cx)?;
                return Poll::Ready(Ok(n));
            }
            self.reply_out(first);
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_error_heads_are_rewritten() {
        let own = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(own_error_head(own), Some(own.len()));
        let app = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nx-request-id: r\r\n\r\n{}";
        assert_eq!(own_error_head(app), None);
        assert_eq!(own_error_head(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(own_error_head(b"{\"HTTP/1.1 400\"}"), None);
        assert!(unsupported_version(b"GET / HTTP/2.0\r\nhost: x"));
        assert!(unsupported_version(b"POST /v1/x HTTP/9.9"));
        assert!(!unsupported_version(b"GET / HTTP/1.1\r\n"));
        assert!(!unsupported_version(b"GET / HTTP/1.0"));
        assert!(
            !unsupported_version(b"GET /a b HTTP/2.0"),
            "a space in the path"
        );
        assert!(!unsupported_version(b"GET / HTTP/2"));
        let reply = error_reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let text = std::str::from_utf8(&reply).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 "));
        assert!(text.contains("content-type: application/json\r\n"));
        assert!(text.ends_with("}}"));
    }
}

//! The HTTP client under one deployment: hyper-util's pooled client (HTTP/1.1 keep-alive,
//! `http` and `https` through rustls), with no redirect policy and no per-request URL parse
//! (the caller hands it pre-built `Uri`s), a cap on concurrent connects (a burst waits for a
//! warm connection or a connect slot instead of opening hundreds of sockets at once), and the
//! connection-reuse rules of a careful proxy:
//! - a connection whose reply was not 2xx is not reused (the upstream may have answered before
//!   reading the whole request, and then closes with the rest unread); a reply not read to its
//!   end closes its connection (hyper);
//! - a request that fails on a reused connection with a reset or close before any reply byte
//!   (the upstream had closed it) is sent once more on a fresh connection.
//!
//! It also coalesces the chunks of a streamed body that are already available into one.
//! It must not interpret replies (see `upstream`) or know about clients.
//!
//! Lanes: when the gateway serves on several threads of their own (`server`), each thread
//! ("lane", [`set_lane`]) has its own pool, so that a request and the connection task that
//! carries it run on one thread (no wake-up across threads per request). [`set_lanes`] says
//! how many before the deployments are built; the connect cap is shared by all.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Request, Response, Uri};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{
    capture_connection, Connected, Connection, HttpConnector,
};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Semaphore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Pooled = Client<Connector, Full<Bytes>>;

/// Connects in progress per deployment, at most: beyond, a request waits for a connection to
/// come back to the pool or for a connect to finish.
pub(super) const MAX_CONNECTS: usize = 16;
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// A streamed chunk is not grown past this by coalescing.
const COALESCE_MAX: usize = 64 * 1024;

/// How many lanes the clients built from now on have a pool for (at least 1).
static LANES: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The lane of the serving thread this code runs on (0 outside lanes).
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// How many serving threads (lanes) the clients built after this call serve.
pub(crate) fn set_lanes(n: usize) {
    LANES.store(n.clamp(1, 1024), Ordering::Relaxed);
}

/// Marks the current thread as serving lane `i`.
pub(crate) fn set_lane(i: usize) {
    LANE.with(|l| l.set(i));
}

/// One deployment's client: a pool per lane, and a pool-less twin for the one retry on a
/// fresh connection. All share the connect cap.
#[derive(Clone)]
pub(super) struct HttpClient {
    pooled: Arc<[Pooled]>,
    fresh: Pooled,
}

/// How a request failed before its reply's head.
pub(super) struct SendError {
    pub error: hyper_util::client::legacy::Error,
}

impl HttpClient {
    pub(super) fn new(connect_timeout: Duration) -> Result<HttpClient, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let connector = Connector {
            inner: https,
            connects: Arc::new(Semaphore::new(MAX_CONNECTS)),
        };
        let build = |max_idle: usize| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_max_idle_per_host(max_idle)
                .build(connector.clone())
        };
        let lanes = LANES.load(Ordering::Relaxed).max(1);
        Ok(HttpClient {
            pooled: (0..lanes).map(|_| build(usize::MAX)).collect(),
            fresh: build(0),
        })
    }

    /// Sends `req` and returns the reply's head (its body not read yet); see the module doc
    /// for the connection rules. `again` builds the same request once more (if it still can), for
    /// the one try on a fresh connection: built only then, as most requests never need it.
    pub(super) async fn send(
        &self,
        req: Request<Full<Bytes>>,
        again: impl FnOnce() -> Option<Request<Full<Bytes>>>,
    ) -> Result<Response<Incoming>, SendError> {
        let lane = LANE.with(Cell::get) % self.pooled.len();
        match self.send_on(&self.pooled[lane], req).await {
            Ok(resp) => Ok(resp),
            Err((error, reused)) if reused && closed_before_reply(&error) => {
                let Some(req) = again() else {
                    return Err(SendError { error });
                };
                tracing::debug!("a reused upstream connection was closed; retrying on a new one");
                self.send_on(&self.fresh, req)
                    .await
                    .map_err(|(error, _)| SendError { error })
            }
            Err((error, _)) => Err(SendError { error }),
        }
    }

    async fn send_on(
        &self,
        client: &Pooled,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, (hyper_util::client::legacy::Error, bool)> {
        let capture = capture_connection(&mut req);
        match client.request(req).await {
            Ok(resp) => {
                let meta = capture.connection_metadata();
                if let Some(conn) = meta.as_ref() {
                    if !resp.status().is_success() {
                        conn.poison();
                    }
                    if let Some(info) = info_of(conn) {
                        info.used.store(true, Ordering::Relaxed);
                    }
                }
                Ok(resp)
            }
            Err(e) => {
                let reused = capture
                    .connection_metadata()
                    .as_ref()
                    .and_then(info_of)
                    .is_some_and(|i| i.used.load(Ordering::Relaxed));
                Err((e, reused))
            }
        }
    }
}

fn info_of(conn: &Connected) -> Option<Arc<ConnInfo>> {
    let mut ext = axum::http::Extensions::new();
    conn.get_extras(&mut ext);
    ext.get::<Arc<ConnInfo>>().cloned()
}

/// Whether the connection broke before the reply's head (reset, broken pipe, closed): on a
/// reused connection this is the upstream having closed it, not a verdict on the request.
fn closed_before_reply(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Whether a send failed on the connect itself timing out.
pub(super) fn is_connect_timeout(e: &hyper_util::client::legacy::Error) -> bool {
    if !e.is_connect() {
        return false;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// What the gateway knows of one upstream connection.
#[derive(Debug, Default)]
struct ConnInfo {
    /// A reply head came back on it: a later request on it is on a reused connection.
    used: AtomicBool,
}

/// The connector: TCP (+ TLS), under the per-deployment connect cap.
#[derive(Clone)]
struct Connector {
    inner: HttpsConnector<HttpConnector>,
    connects: Arc<Semaphore>,
}

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Tracked;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Tracked, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let connects = self.connects.clone();
        Box::pin(async move {
            let _slot = connects.acquire_owned().await?;
            let io = inner.call(uri).await?;
            Ok(Tracked {
                io,
                info: Arc::new(ConnInfo::default()),
            })
        })
    }
}

/// A connection with its [`ConnInfo`] (handed to each reply through `Connected::extra`).
struct Tracked {
    io: Io,
    info: Arc<ConnInfo>,
}

impl Connection for Tracked {
    fn connected(&self) -> Connected {
        self.io.connected().extra(self.info.clone())
    }
}

impl hyper::rt::Read for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// A streamed reply body as data chunks, the chunks already available joined into one (never
/// waiting for one that is not: a chunk that is ready leaves at once).
pub(super) struct Coalesce {
    body: Incoming,
    /// An error met after some data was gathered: given on the next poll.
    error: Option<hyper::Error>,
    done: bool,
}

impl Coalesce {
    pub(super) fn new(body: Incoming) -> Coalesce {
        Coalesce {
            body,
            error: None,
            done: false,
        }
    }
}

impl Stream for Coalesce {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let mut first: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        let mut len = 0;
        while !this.done && len < COALESCE_MAX {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers
                    };
                    if data.is_empty() {
                        continue;
                    }
                    len += data.len();
                    match (&mut first, &mut joined) {
                        (None, _) => first = Some(data),
                        (Some(f), None) => {
                            let mut b = BytesMut::with_capacity(f.len() + data.len() * 4);
                            b.extend_from_slice(f);
                            b.extend_from_slice(&data);
                            joined = Some(b);
                        }
                        (Some(_), Some(b)) => b.extend_from_slice(&data),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    if first.is_none() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    this.error = Some(e);
                    break;
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => break,
            }
        }
        match (joined, first) {
            (Some(b), _) => Poll::Ready(Some(Ok(b.freeze()))),
            (None, Some(f)) => Poll::Ready(Some(Ok(f))),
            (None, None) if this.done => Poll::Ready(None),
            (None, None) => Poll::Pending,
        }
    }
}

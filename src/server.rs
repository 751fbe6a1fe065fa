//! Starting and stopping the gateway: builds the state from a config, accepts connections
//! (with the slow-client limits: header read timeout, header size), and shuts down gracefully.
//! It must not hold request-path logic.
//!
//! Shutdown (the first SIGTERM/SIGINT): the listener closes (new connections are refused);
//! `/readyz` turns 503; a request on an open connection that is not admitted yet, and every
//! queued one, gets 503 `shutting_down`; requests and streams in flight may finish for up to
//! `server.shutdown_grace_s`; then the model servers the pool runs are stopped and `serve`
//! returns. A second signal exits at once (see `main`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use tokio::net::TcpListener;

use crate::config::{Config, ServerConfig};
use crate::http::{router, AppState};
use crate::proxy::observe::ClientAddr;

type Service = TowerToHyperService<axum::Router>;

/// The router, with the connection's peer address put into each request's extensions (for
/// the access log).
#[derive(Clone)]
struct WithPeer {
    inner: Service,
    peer: SocketAddr,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for WithPeer {
    type Response =
        <Service as hyper::service::Service<hyper::Request<hyper::body::Incoming>>>::Response;
    type Error = <Service as hyper::service::Service<hyper::Request<hyper::body::Incoming>>>::Error;
    type Future = TowerToHyperServiceFuture<axum::Router, hyper::Request<hyper::body::Incoming>>;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(ClientAddr(self.peer));
        self.inner.call(req)
    }
}

/// A gateway bound to a port but not serving yet.
pub struct Gateway {
    listener: TcpListener,
    app: axum::Router,
    state: Arc<AppState>,
    server: ServerConfig,
}

impl Gateway {
    /// Builds the gateway for `cfg` on `listener` (which overrides `server.listen`).
    pub async fn build(cfg: &Config, listener: TcpListener) -> Result<Gateway, String> {
        let state = Arc::new(AppState::build(cfg).await.map_err(|e| e.to_string())?);
        Ok(Gateway {
            listener,
            app: router(state.clone()),
            state,
            server: cfg.server.clone(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully (see the module doc).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(self.server.header_read_timeout_ms))
            .max_header_size(self.server.max_header_bytes);
        let graceful = GracefulShutdown::new();
        let service = TowerToHyperService::new(self.app);
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // Small SSE chunks must leave at once, not wait for Nagle and a delayed ACK.
            let _ = tcp.set_nodelay(true);
            let service = WithPeer {
                inner: service.clone(),
                peer,
            };
            let conn = http.serve_connection(TokioIo::new(tcp), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                // A client that went away, or sent garbage: nothing to answer.
                let _ = conn.await;
            });
        }
        drop(self.listener);
        self.state.begin_shutdown();
        let grace = Duration::from_secs(self.server.shutdown_grace_s);
        tracing::info!(
            grace_s = grace.as_secs(),
            "listener closed; finishing requests in flight"
        );
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing the connections left");
        }
        // No model server outlives the gateway.
        self.state.pipeline.orch.memory.stop_all().await;
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

//! Starting and stopping the gateway: builds the state from a config and serves it on a
//! listener until a shutdown signal. It must not hold request-path logic.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{router, AppState};
use crate::config::Config;

/// A gateway bound to a port but not serving yet.
pub struct Gateway {
    listener: TcpListener,
    app: axum::Router,
    state: Arc<AppState>,
}

impl Gateway {
    /// Builds the gateway for `cfg` on `listener` (which overrides `server.listen`).
    pub async fn build(cfg: &Config, listener: TcpListener) -> Result<Gateway, String> {
        let state = Arc::new(AppState::build(cfg).await?);
        Ok(Gateway {
            listener,
            app: router(state.clone()),
            state,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        // Small SSE chunks must leave at once, not wait for Nagle and a delayed ACK.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(listener, self.app)
            .with_graceful_shutdown(shutdown)
            .await;
        // No model server outlives the gateway.
        self.state.orch.memory.stop_all().await;
        served
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
    tracing::info!("shutdown signal received; finishing in-flight requests");
}

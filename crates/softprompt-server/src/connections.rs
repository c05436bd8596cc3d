//! The accept loop: every connection served by hyper with a header-read timeout (a client that
//! never finishes its header loses the connection, not the server's time), and at shutdown a
//! drain that ends within `drain_timeout` whatever the clients do.

use crate::config::ServerConfig;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;

/// Accepts until `shutdown` resolves, then gives the open connections `drain_timeout` to finish
/// their requests.
pub async fn accept(
    listener: tokio::net::TcpListener,
    app: Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // out of file descriptors and the like: that connection is lost, the server is not
                Err(e) => {
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still open {} ms after shutdown began; leaving them",
            config.drain_timeout.as_millis()
        );
    }
}

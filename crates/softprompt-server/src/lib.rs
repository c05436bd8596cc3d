//! `softprompt serve`: one frozen model, many adapters, and requests for different tasks batched
//! into one backbone pass.
//!
//! ```text
//! HTTP requests (routes) → Batcher queue → one worker thread forms batches across adapters
//!                        → multitask::classify_rows (rows of similar length share a backbone pass)
//!                        → each request its answers
//! ```
//!
//! `generation` answers /v1/generate (one decoding loop per request, from the adapter's prefix
//! cache). `registry` holds the adapters by name (loaded and unloaded while serving), `config` the limits,
//! `metrics` what /metrics reports, and `loadgen` drives a server for measurements.

pub mod batcher;
pub mod config;
mod generation;
pub mod loadgen;
pub mod metrics;
pub mod registry;
pub mod routes;

pub use config::{Overlong, ServerConfig};
pub use routes::{router, AppState};

/// Serves until `shutdown` resolves, then lets the requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

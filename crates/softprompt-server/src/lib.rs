//! `softprompt serve`: one frozen model, many adapters, and requests for different tasks batched
//! into one backbone pass.
//!
//! ```text
//! HTTP request → routes (metrics, API key, slot) → classify: its inputs × member adapters → rows
//!              → batcher: one worker thread forms batches across adapters
//!              → softprompt::inference::classify_rows (rows of similar length share a pass)
//!              → each request its answers
//! ```
//!
//! `connections` accepts them (header-read timeout, bounded drain at shutdown). `generation`
//! answers /v1/generate, whose texts `decoding` writes together, a token for all of them a step
//! (each from its adapter's prefix cache). `api`
//! holds the request and response bodies (`body` reads them), `error` the errors and their HTTP
//! statuses, `state` what handlers share, `registry` the adapters by name (loaded and unloaded
//! while serving), `config` the limits, `metrics` what /metrics reports.

pub mod api;
pub mod batcher;
mod body;
mod classify;
pub mod config;
mod connections;
mod decoding;
pub mod error;
mod generation;
pub mod metrics;
pub mod registry;
pub mod routes;
pub mod state;

pub use config::{Overlong, ServerConfig};
pub use routes::router;
pub use state::AppState;

/// Serves until `shutdown` resolves, then gives the requests in flight the configured drain
/// timeout to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let config = state.config.clone();
    connections::accept(listener, router(state), &config, shutdown).await
}

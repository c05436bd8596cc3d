//! `softprompt serve`: one frozen model, many adapters, and requests for different tasks batched
//! into one backbone pass.
//!
//! ```text
//! HTTP requests (axum) → Batcher queue → one worker thread forms batches across adapters
//!                      → multitask::classify_rows (one backbone pass) → each request its answers
//! ```

pub mod batcher;
pub mod registry;
pub mod routes;

pub use routes::{router, AppState};

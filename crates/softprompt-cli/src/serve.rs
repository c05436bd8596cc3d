//! `softprompt serve`: every adapter of the given directories from one model over HTTP.

use crate::args::ModelArgs;
use anyhow::{bail, Context};
use clap::Args;
use softprompt_server::{AppState, Overlong, ServerConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A directory whose subdirectories are adapters, served under their subdirectory names
    /// (repeatable). POST /v1/adapters loads more from these directories only.
    #[arg(long = "adapters", required = true)]
    adapters: Vec<PathBuf>,
    /// Listen here; the default answers only this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every path but /health.
    #[arg(long, env = "SOFTPROMPT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Positions (prompt + tokens) one batch takes at most, over all requests in it.
    #[arg(long, default_value_t = 8192)]
    max_batch_tokens: usize,
    /// How long a request waits for others to share its batch, in milliseconds.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Batch only requests for the same adapter together (to measure what mixing buys).
    #[arg(long)]
    no_mixed_batches: bool,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Most inputs one classify request may carry (422 beyond).
    #[arg(long, default_value_t = 64)]
    max_inputs_per_request: usize,
    /// Most tokens per input (classify and generate); default: 512, or what the longest prompt
    /// leaves of the model's positions where that is less.
    #[arg(long)]
    max_input_tokens: Option<usize>,
    /// An input over --max-input-tokens: truncate, or reject with 422.
    #[arg(long, default_value_t = Overlong::Truncate)]
    overlong: Overlong,
    /// Requests handled at once (429 beyond).
    #[arg(long, default_value_t = 256)]
    max_concurrent_requests: usize,
    /// A request unanswered after this many milliseconds gets 504.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// The most tokens one /v1/generate request may ask for.
    #[arg(long, default_value_t = ServerConfig::default().max_new_tokens)]
    max_new_tokens: usize,
    /// The most adapters one classify request may name (an ensemble's members).
    #[arg(long, default_value_t = ServerConfig::default().max_ensemble)]
    max_ensemble: usize,
    /// The most backbone rows (inputs × adapters) one classify request may cost (422 beyond).
    #[arg(long, default_value_t = ServerConfig::default().max_rows_per_request)]
    max_rows_per_request: usize,
    /// The most positions (rows × (prompt + tokens)) one classify request may cost (422 beyond).
    #[arg(long, default_value_t = ServerConfig::default().max_positions_per_request)]
    max_positions_per_request: usize,
    /// A request's headers, then its body, must arrive within this many milliseconds (a slow
    /// body gets 408; a half-sent header loses its connection).
    #[arg(long, default_value_t = ServerConfig::default().read_timeout.as_millis() as u64)]
    read_timeout_ms: u64,
    /// At SIGTERM or Ctrl-C, how long the requests in flight get to finish, in milliseconds.
    #[arg(long, default_value_t = ServerConfig::default().drain_timeout.as_millis() as u64)]
    drain_timeout_ms: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig {
        adapter_dirs: args.adapters,
        max_batch_tokens: args.max_batch_tokens,
        max_wait: Duration::from_millis(args.max_wait_ms),
        mix_adapters: !args.no_mixed_batches,
        api_key: args.api_key,
        max_body_bytes: args.max_body_bytes,
        max_inputs_per_request: args.max_inputs_per_request,
        max_input_tokens: args.max_input_tokens,
        overlong: args.overlong,
        max_concurrent_requests: args.max_concurrent_requests,
        request_timeout: Duration::from_millis(args.timeout_ms),
        max_new_tokens: args.max_new_tokens,
        max_ensemble: args.max_ensemble,
        max_rows_per_request: args.max_rows_per_request,
        max_positions_per_request: args.max_positions_per_request,
        read_timeout: Duration::from_millis(args.read_timeout_ms),
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
    };
    config.validate()?;
    let model = args.model.load()?;
    let state = AppState::new(model, config)?;
    if state.registry.is_empty() {
        bail!("no adapters found under {:?}", state.config.adapter_dirs);
    }
    let names: Vec<String> = state.registry.list().into_iter().map(|(n, _)| n).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    let served = runtime.block_on(async move {
        let address = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        eprintln!(
            "serving {} on http://{}",
            names.join(", "),
            listener.local_addr()?
        );
        softprompt_server::serve(listener, state, shutdown_signal()).await;
        anyhow::Ok(())
    });
    // a decode on a blocking thread past the drain would otherwise hold the exit
    runtime.shutdown_timeout(Duration::from_millis(100));
    served
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

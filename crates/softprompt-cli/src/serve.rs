//! `softprompt serve` and `softprompt loadgen`: the HTTP server and the load that measures it.

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use softprompt::data::{read_examples, Columns, Labels};
use softprompt::model::Model;
use softprompt_server::loadgen::{self, LoadConfig};
use softprompt_server::{AppState, Overlong, ServerConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long)]
    model: PathBuf,
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
    /// Most tokens per input; default: what the longest prompt leaves of the model's positions.
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
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
}

pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
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
    };
    config.validate()?;
    let model = Model::load(&args.model, DType::F32, &Device::Cpu)?;
    let state = AppState::new(model, config)?;
    if state.registry.is_empty() {
        bail!("no adapters found under {:?}", state.config.adapter_dirs);
    }
    let names: Vec<String> = state.registry.list().into_iter().map(|(n, _)| n).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let address = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        eprintln!(
            "serving {} on http://{}",
            names.join(", "),
            listener.local_addr()?
        );
        softprompt_server::serve(listener, state, shutdown_signal()).await?;
        anyhow::Ok(())
    })
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

#[derive(Args)]
pub struct LoadgenArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Adapters to spread the requests over, at random (repeatable).
    #[arg(long = "adapter", required = true)]
    adapters: Vec<String>,
    /// Texts to send, from the `text` column of a TSV, CSV or JSONL file.
    #[arg(long)]
    data: PathBuf,
    /// Clients, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Requests per second over all clients (default: as fast as answered).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    inputs_per_request: usize,
    #[arg(long, env = "SOFTPROMPT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run_loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    let columns = Columns {
        text: "text".into(),
        text_pair: None,
        label: "label".into(),
    };
    let texts = read_examples(&args.data, &columns, Labels::Optional)?
        .into_iter()
        .map(|e| e.text)
        .collect();
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    let config = LoadConfig {
        url: args.url,
        adapters: args.adapters,
        texts,
        inputs_per_request: args.inputs_per_request,
        concurrency: args.concurrency,
        duration: Duration::from_secs_f64(args.duration),
        max_requests: args.requests,
        rate: args.rate,
        api_key: args.api_key,
        seed: args.seed,
    };
    let report = tokio::runtime::Runtime::new()?.block_on(loadgen::run(&config))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} requests ({} ok) in {:.1} s: {:.1} inputs/s; latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; errors {:?}",
            report.requests,
            report.ok,
            report.seconds,
            report.inputs_per_second,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.max_ms,
            report.errors
        );
    }
    Ok(())
}

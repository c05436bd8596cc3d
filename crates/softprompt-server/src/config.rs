//! What a server is told at start: where its adapters live, how it batches, and the limits that
//! keep one client from starving the others.

use softprompt::bail;
use std::path::PathBuf;
use std::time::Duration;

/// What happens to an input longer than `max_input_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// cut to the limit (the tokenizer keeps its special tokens)
    Truncate,
    /// answer 422
    Reject,
}
softprompt::named_choice!(Overlong, "truncate", "reject");

/// Tokens per input unless `--max-input-tokens` says otherwise: a classifier's input rarely
/// needs more, and a model's whole context (8k for SmolLM2) would make one input cost as much as
/// hundreds of ordinary ones.
pub const DEFAULT_MAX_INPUT_TOKENS: usize = 512;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directories whose subdirectories are adapters; also the only places `POST /v1/adapters`
    /// may load from.
    pub adapter_dirs: Vec<PathBuf>,
    /// Positions (prompt + tokens) one batch takes at most, over all requests in it.
    pub max_batch_tokens: usize,
    /// How long the first request of a batch waits for others.
    pub max_wait: Duration,
    /// Off: a batch holds requests for one adapter (or one ensemble) only, the way a server that
    /// cannot mix prompts in a batch must work. Kept as a switch to measure what mixing buys.
    pub mix_adapters: bool,
    /// Required as `Authorization: Bearer KEY` on everything but /health.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_inputs_per_request: usize,
    /// Tokens per input, special tokens included; `None`: `DEFAULT_MAX_INPUT_TOKENS`, or less
    /// where the longest prompt leaves less of the model's positions.
    pub max_input_tokens: Option<usize>,
    pub overlong: Overlong,
    /// Requests handled at once; more get 429.
    pub max_concurrent_requests: usize,
    /// A request not answered by then gets 504 (and its rows leave the queue).
    pub request_timeout: Duration,
    /// The most tokens one /v1/generate request may ask for.
    pub max_new_tokens: usize,
    /// The most adapters one classify request may name (a prompt ensemble's members).
    pub max_ensemble: usize,
    /// The most backbone rows (inputs × adapters) one classify request may cost.
    pub max_rows_per_request: usize,
    /// The most positions (rows × (prompt + tokens)) one classify request may cost: what bounds
    /// its backbone time, whatever its size in bytes.
    pub max_positions_per_request: usize,
    /// A request's headers, and then its body, must arrive within this: a body gets 408, a
    /// half-sent header loses its connection. Slow clients cost a connection, never a slot.
    pub read_timeout: Duration,
    /// At shutdown, how long the requests in flight get to finish before the server exits anyway.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            adapter_dirs: Vec::new(),
            max_batch_tokens: 8192,
            max_wait: Duration::from_millis(5),
            mix_adapters: true,
            api_key: None,
            max_body_bytes: 1 << 20,
            max_inputs_per_request: 64,
            max_input_tokens: None,
            overlong: Overlong::Truncate,
            max_concurrent_requests: 256,
            request_timeout: Duration::from_secs(30),
            max_new_tokens: 256,
            max_ensemble: 16,
            max_rows_per_request: 256,
            max_positions_per_request: 4096,
            read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> softprompt::Result<()> {
        if self.adapter_dirs.is_empty() {
            bail!("give at least one adapters directory");
        }
        for (what, value) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_body_bytes", self.max_body_bytes),
            ("max_inputs_per_request", self.max_inputs_per_request),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_new_tokens", self.max_new_tokens),
        ] {
            if value == 0 {
                bail!("{what} must be at least 1");
            }
        }
        if self.max_input_tokens == Some(0) {
            bail!("max_input_tokens must be at least 1");
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(3600) {
            bail!("the request timeout must be longer than 0 and at most an hour");
        }
        if self.read_timeout.is_zero() || self.read_timeout > Duration::from_secs(600) {
            bail!(
                "the read timeout (--read-timeout-ms) must be longer than 0 and at most 10 minutes"
            );
        }
        if self.drain_timeout > Duration::from_secs(600) {
            bail!("the drain timeout (--drain-timeout-ms) is at most 10 minutes");
        }
        if self.max_wait > Duration::from_secs(10) {
            bail!("max_wait (--max-wait-ms) is at most 10 s: every request waits that long for company");
        }
        if self.max_rows_per_request == 0
            || self.max_ensemble == 0
            || self.max_positions_per_request == 0
        {
            bail!("max_rows_per_request, max_positions_per_request and max_ensemble must be at least 1");
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            bail!("the API key is empty");
        }
        Ok(())
    }
}

//! What every handler shares: the adapters, the batching queue, the metrics, the limits, and the
//! request slots.

use crate::batcher::{Batcher, BatcherConfig};
use crate::config::{Overlong, ServerConfig};
use crate::decoding::Decoding;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use softprompt::model::Model;
use softprompt::template::Template;
use softprompt::tokenize::Encoded;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub batcher: Arc<Batcher>,
    /// where /v1/generate's texts join the decoding batch
    pub decoding: Arc<Decoding>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServerConfig>,
    /// one permit per request being handled
    slots: Arc<Semaphore>,
}

impl AppState {
    /// Loads the adapters and starts the batcher, which owns the model's backbone from then on.
    pub fn new(model: Model, config: ServerConfig) -> softprompt::Result<Self> {
        config.validate()?;
        let model = Arc::new(model);
        let registry = Arc::new(Registry::open(
            model.clone(),
            &config.adapter_dirs,
            config.max_input_tokens,
        )?);
        let metrics = Arc::new(Metrics::new());
        metrics.adapters.set(registry.len() as i64);
        let batcher = Batcher::start(
            model,
            BatcherConfig {
                max_batch_tokens: config.max_batch_tokens,
                max_wait: config.max_wait,
                mix_adapters: config.mix_adapters,
            },
            metrics.clone(),
        );
        Ok(Self {
            decoding: Arc::new(Decoding::start(
                registry.clone(),
                metrics.clone(),
                config.max_wait,
            )),
            registry,
            batcher: Arc::new(batcher),
            metrics,
            slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            config: Arc::new(config),
        })
    }

    /// Input `i` of a request written into `template` and tokenized; too long, it is cut or
    /// refused (422), as `--overlong` says.
    pub fn encode(
        &self,
        template: Option<&Template>,
        text: &str,
        i: usize,
    ) -> Result<Encoded, ApiError> {
        let encoder = &self.registry.encoder;
        let (encoded, truncated) = encoder
            .encode_fitted(template, text, None, encoder.max_tokens())
            .map_err(|e| ApiError::Invalid(format!("input {i}: {}", e.chain())))?;
        if truncated && self.config.overlong == Overlong::Reject {
            return Err(ApiError::Invalid(format!(
                "input {i} has more than {} tokens",
                encoder.max_tokens()
            )));
        }
        Ok(encoded)
    }

    /// A slot for one request, or 429 when all are taken.
    pub fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy(self.config.max_concurrent_requests))
    }

    /// 504 for a request that took longer than the request timeout.
    pub fn timed_out(&self) -> ApiError {
        ApiError::Timeout(self.config.request_timeout.as_millis())
    }
}

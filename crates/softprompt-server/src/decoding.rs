//! `/v1/generate`'s decoding: one thread owns every request's text as a row of one batch, and
//! each step decodes a token for all of them in one backbone pass, whatever their adapters
//! (each row its own KV cache, started from its adapter's prefix cache). A CPU decode step is
//! bound by reading the weights, so 8 rows cost little more than 1.
//!
//! ```text
//! requests ──channel──▶ join: read the input alone (prefill), pick the first token
//!                       step: one token for every row, one pass ──▶ each row's text to its request
//!                       leave: done (EOS, stop, limit), cancelled (client gone, timeout)
//! ```
//! Requests join and leave between tokens; a joining request's prefill holds the others back
//! for its length. An idle loop waits up to `--max-wait` after the first request for others to
//! start with it, as the classification batcher does.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use softprompt::generate::{step, Generation, PromptCache, SamplingConfig, Sequence, Writer};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// One request's text to write.
pub struct Job {
    /// its adapter's prefix cache
    pub prefix: PromptCache,
    pub ids: Vec<u32>,
    pub config: SamplingConfig,
    /// each piece of text as it becomes final; false stops it (the answer is no longer awaited)
    pub on_text: Box<dyn FnMut(&str) -> bool + Send>,
    /// what it wrote, or why it failed
    pub done: oneshot::Sender<Result<Generation, ApiError>>,
    /// the request's slot, given back when it is done
    pub slot: OwnedSemaphorePermit,
}

/// Where requests join the decoding batch.
pub struct Decoding {
    jobs: Sender<Job>,
}

impl Decoding {
    /// Starts the thread that decodes for every request on `registry`'s model.
    pub fn start(registry: Arc<Registry>, metrics: Arc<Metrics>, max_wait: Duration) -> Self {
        let (jobs, waiting) = channel();
        std::thread::Builder::new()
            .name("decoding".into())
            .spawn(move || decode(&registry, &metrics, &waiting, max_wait))
            .expect("the decoding thread starts");
        Self { jobs }
    }

    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.jobs
            .send(job)
            .map_err(|_| ApiError::Internal("the decoding thread has stopped".into()))
    }
}

/// A row's request: where its answer goes, and its slot.
struct Owner {
    done: oneshot::Sender<Result<Generation, ApiError>>,
    _slot: OwnedSemaphorePermit,
}

/// The loop: take whoever is waiting (block while nobody decodes), one step for all, answer
/// whoever is done; until the server drops its sender.
fn decode(registry: &Registry, metrics: &Metrics, waiting: &Receiver<Job>, max_wait: Duration) {
    let backbone = &registry.model.backbone;
    let eos = &registry.model.eos_token_ids;
    let mut rows: Vec<Sequence> = Vec::new();
    let mut owners: Vec<Owner> = Vec::new();
    loop {
        let mut joining: Vec<Job> = Vec::new();
        if rows.is_empty() {
            match waiting.recv() {
                Ok(job) => joining.push(job),
                Err(_) => return,
            }
            let until = Instant::now() + max_wait;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match waiting.recv_timeout(left) {
                    Ok(job) => joining.push(job),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
        joining.extend(waiting.try_iter());
        for job in joining {
            let writer = Writer::text(&registry.encoder, &job.config, job.on_text);
            match Sequence::start(backbone, &job.prefix, &job.ids, eos, &job.config, writer) {
                Ok(sequence) => {
                    rows.push(sequence);
                    owners.push(Owner {
                        done: job.done,
                        _slot: job.slot,
                    });
                }
                Err(e) => drop(job.done.send(Err(ApiError::from(e)))),
            }
        }
        let decoding = rows.iter_mut().map(|r| !r.done()).filter(|&d| d).count();
        if decoding > 0 {
            metrics.generation_step_rows.observe(decoding as f64);
        }
        if let Err(e) = step(backbone, &mut rows) {
            let message = e.chain();
            for owner in owners.drain(..) {
                let _ = owner.done.send(Err(ApiError::Internal(message.clone())));
            }
            rows.clear();
            continue;
        }
        for i in (0..rows.len()).rev() {
            if rows[i].done() {
                let answer = rows
                    .swap_remove(i)
                    .into_generation()
                    .map_err(ApiError::from);
                let _ = owners.swap_remove(i).done.send(answer);
            }
        }
    }
}

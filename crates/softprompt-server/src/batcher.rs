//! The queue: one worker thread owns the frozen backbone and turns whatever requests are waiting,
//! for any mix of adapters, into one batch — up to a token budget, waiting at most `max_wait` for
//! company — then hands each request its own rows' logits.

use crate::error::ApiError;
use crate::metrics::Metrics;
use softprompt::batch::Padding;
use softprompt::inference::{classify_rows, LoadedAdapter};
use softprompt::model::Model;
use softprompt::tokenize::Encoded;
use std::collections::VecDeque;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_batch_tokens: usize,
    pub max_wait: Duration,
    /// false: every batch holds jobs of one adapter set only
    pub mix_adapters: bool,
}

/// One request's rows: (task, tokens), answered with one logits vector per row.
pub type Rows = Vec<(Arc<LoadedAdapter>, Encoded)>;

/// The positions rows take in backbone passes: each row's prompt and tokens.
pub fn positions(rows: &Rows) -> usize {
    rows.iter().map(|(t, e)| t.prompt_len() + e.ids.len()).sum()
}

struct Job {
    rows: Rows,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, ApiError>>,
}

impl Job {
    fn positions(&self) -> usize {
        positions(&self.rows)
    }

    /// The adapters a job uses, by identity: jobs may share a batch without mixing only if
    /// these are equal.
    fn adapters(&self) -> Vec<*const LoadedAdapter> {
        let mut tasks: Vec<_> = self.rows.iter().map(|(t, _)| Arc::as_ptr(t)).collect();
        tasks.dedup();
        tasks
    }
}

pub struct Batcher {
    queue: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the worker thread, which runs the model's backbone from now on.
    pub fn start(model: Arc<Model>, config: BatcherConfig, metrics: Arc<Metrics>) -> Self {
        let (queue, jobs) = mpsc::channel();
        let worker_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("softprompt-batcher".into())
            .spawn(move || work(&model, jobs, &config, &worker_metrics))
            .expect("the batcher thread starts");
        Self { queue, metrics }
    }

    /// Queues rows and waits for their logits. Dropping the future takes the rows out of the
    /// queue before they cost a backbone pass.
    pub async fn run(&self, rows: Rows) -> Result<Vec<Vec<f32>>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.metrics.queue_depth.inc();
        self.queue
            .send(Job { rows, reply })
            .map_err(|_| ApiError::Internal("the batcher has stopped".into()))?;
        answer
            .await
            .map_err(|_| ApiError::Internal("the batcher dropped the request".into()))?
    }
}

fn work(model: &Model, jobs: mpsc::Receiver<Job>, config: &BatcherConfig, metrics: &Metrics) {
    // jobs that arrived while a batch for other adapters was forming (only without mixing)
    let mut held: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + config.max_wait;
        let key = (!config.mix_adapters).then(|| first.adapters());
        let fits = |job: &Job| key.as_ref().is_none_or(|k| &job.adapters() == k);
        let mut positions = first.positions();
        let mut batch = vec![first];
        let mut i = 0;
        while i < held.len() && positions < config.max_batch_tokens {
            if fits(&held[i]) {
                let job = held.remove(i).expect("index in range");
                positions += job.positions();
                batch.push(job);
            } else {
                i += 1;
            }
        }
        while positions < config.max_batch_tokens {
            let left = deadline.saturating_duration_since(Instant::now());
            match jobs.recv_timeout(left) {
                Ok(job) if fits(&job) => {
                    positions += job.positions();
                    batch.push(job);
                }
                Ok(job) => held.push_back(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queue_depth.sub(batch.len() as i64);
        // a client that went away (or timed out) is not worth a backbone pass
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        run_batch(model, batch, config, metrics);
    }
}

/// Rows of similar length share a backbone pass: every row is padded to the longest of its pass,
/// and on a CPU a pass costs the same per row at any size, so splitting by length only saves.
/// A pass also holds at most `max_batch_tokens` positions, so one large request is cut into
/// bounded passes rather than run as one pass of any size.
const MAX_PADDING_RATIO: f64 = 1.25;

fn run_batch(model: &Model, batch: Vec<Job>, config: &BatcherConfig, metrics: &Metrics) {
    let rows: Vec<(usize, &LoadedAdapter, &Encoded)> = batch
        .iter()
        .enumerate()
        .flat_map(|(j, job)| job.rows.iter().map(move |(t, e)| (j, t.as_ref(), e)))
        .collect();
    metrics.batch_rows.observe(rows.len() as f64);
    let timer = metrics.batch_seconds.start_timer();
    let gone = |j: usize| batch[j].reply.is_closed();
    let result = classify_by_length(model, &rows, config.max_batch_tokens, &gone);
    timer.observe_duration();
    match result {
        Ok(logits) => {
            let mut logits = logits.into_iter();
            for job in batch {
                let mine = logits.by_ref().take(job.rows.len()).collect();
                let _ = job.reply.send(Ok(mine));
            }
        }
        Err(e) => {
            let message = e.chain();
            for job in batch {
                let _ = job.reply.send(Err(ApiError::Internal(message.clone())));
            }
        }
    }
}

/// `classify_rows` on passes of rows of similar length (the longest at most `MAX_PADDING_RATIO`
/// times the shortest) and of at most `max_positions` positions (one row at least), answers in
/// the rows' order. Before each pass, the rows of jobs whose client has `gone` are dropped (their
/// answers stay empty): a request past its deadline stops costing.
fn classify_by_length(
    model: &Model,
    rows: &[(usize, &LoadedAdapter, &Encoded)],
    max_positions: usize,
    gone: &dyn Fn(usize) -> bool,
) -> softprompt::Result<Vec<Vec<f32>>> {
    let length = |i: usize| rows[i].1.prompt_len() + rows[i].2.ids.len();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| length(i));
    let mut answers = vec![Vec::new(); rows.len()];
    let mut start = 0;
    while start < order.len() {
        let longest = MAX_PADDING_RATIO * length(order[start]) as f64;
        let mut end = start;
        let mut positions = 0;
        while end < order.len()
            && length(order[end]) as f64 <= longest
            && (end == start || positions + length(order[end]) <= max_positions)
        {
            positions += length(order[end]);
            end += 1;
        }
        let pass: Vec<usize> = order[start..end]
            .iter()
            .copied()
            .filter(|&i| !gone(rows[i].0))
            .collect();
        start = end;
        if pass.is_empty() {
            continue;
        }
        let members: Vec<(&LoadedAdapter, &Encoded)> =
            pass.iter().map(|&i| (rows[i].1, rows[i].2)).collect();
        let logits = classify_rows(
            &model.backbone,
            &members,
            Padding::Right,
            &candle_core::Device::Cpu,
        )?;
        for (&i, l) in pass.iter().zip(logits) {
            answers[i] = l;
        }
    }
    Ok(answers)
}

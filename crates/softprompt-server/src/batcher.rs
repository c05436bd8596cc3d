//! The queue: one worker thread owns the frozen backbone and turns whatever requests are waiting,
//! for any mix of adapters, into one batch — up to a token budget, waiting at most `max_wait` for
//! company — then hands each request its own rows' logits.

use softprompt::backbone::bert::Bert;
use softprompt::multitask::{classify_rows, Task};
use softprompt::tokenize::Encoded;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// rows are added to a batch until their positions (prompt + tokens) reach this
    pub max_batch_tokens: usize,
    /// how long the first request of a batch waits for others
    pub max_wait: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 8192,
            max_wait: Duration::from_millis(5),
        }
    }
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub requests: AtomicU64,
}

/// One request's rows: (task, tokens), answered with one logits vector per row.
type Rows = Vec<(Arc<Task>, Encoded)>;

struct Job {
    rows: Rows,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

impl Job {
    fn positions(&self) -> usize {
        self.rows
            .iter()
            .map(|(t, e)| t.prompt_len() + e.ids.len())
            .sum()
    }
}

pub struct Batcher {
    queue: mpsc::Sender<Job>,
    pub stats: Arc<Stats>,
}

impl Batcher {
    /// Starts the worker thread, which owns the backbone from now on.
    pub fn start(backbone: Bert, config: BatcherConfig) -> Self {
        let (queue, jobs) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("softprompt-batcher".into())
            .spawn(move || work(backbone, jobs, config, &worker_stats))
            .expect("the batcher thread starts");
        Self { queue, stats }
    }

    /// Queues rows and waits for their logits.
    pub async fn run(&self, rows: Rows) -> Result<Vec<Vec<f32>>, String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { rows, reply })
            .map_err(|_| "the batcher has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the batcher dropped the request".to_string())?
    }
}

fn work(backbone: Bert, jobs: mpsc::Receiver<Job>, config: BatcherConfig, stats: &Stats) {
    while let Ok(first) = jobs.recv() {
        let deadline = Instant::now() + config.max_wait;
        let mut positions = first.positions();
        let mut batch = vec![first];
        while positions < config.max_batch_tokens {
            let left = deadline.saturating_duration_since(Instant::now());
            match jobs.recv_timeout(left) {
                Ok(job) => {
                    positions += job.positions();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // a client that went away is not worth a backbone pass
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let rows: Vec<(&Task, &Encoded)> = batch
            .iter()
            .flat_map(|job| job.rows.iter().map(|(t, e)| (t.as_ref(), e)))
            .collect();
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
        match classify_rows(&backbone, &rows, &candle_core::Device::Cpu) {
            Ok(logits) => {
                let mut logits = logits.into_iter();
                for job in batch {
                    let mine = logits.by_ref().take(job.rows.len()).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(format!("{e:#}")));
                }
            }
        }
    }
}

//! The loop, top to bottom, as nanoGPT's `train.py` reads: set the learning rate, forward and
//! backward, stop on a non-finite loss, clip, step, log; every `eval_every` steps evaluate on
//! dev, keep the best adapter, checkpoint, maybe stop early.
//!
//! Data-parallel over a `Collective`'s ranks, each rank takes its shard of every batch and of the
//! dev set; the gradients and the dev counts are summed across them, so that every rank takes the
//! same optimizer step and the same decisions. Rank 0 alone writes the run's files.

use super::checkpoint::{self, Fingerprint, Progress, CHECKPOINT};
use super::config::TrainConfig;
use super::log::{EvalRecord, MetricsLog, Record, StepRecord};
use crate::adapter::{all_finite, PeftConfig};
use crate::batch::{epoch_batches, Batch, Batching, EncodedSet};
use crate::collective::{self, shard, Collective};
use crate::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use crate::prompted::Trainee;
use crate::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the loop reports as it goes (the CLI draws a progress bar from it). The listener answers
/// `ControlFlow::Break` to stop the run at the end of the step (Ctrl-C).
pub enum Event<'a> {
    Start {
        total_steps: usize,
        steps_per_epoch: usize,
        resumed_at: usize,
        train_examples: usize,
    },
    /// what metrics.jsonl records of the step
    Step(&'a StepRecord),
    /// what metrics.jsonl records of the evaluation; `improved`: the best yet, saved
    Eval {
        record: &'a EvalRecord,
        improved: bool,
    },
    EarlyStop {
        step: usize,
    },
}

impl Event<'_> {
    /// The line a person reads of this event (the start, an evaluation, an early stop); a step
    /// has none, it moves a progress bar.
    pub fn describe(&self) -> Option<String> {
        match self {
            Event::Start {
                total_steps,
                steps_per_epoch,
                resumed_at,
                train_examples,
            } => {
                let resumed = match resumed_at {
                    0 => String::new(),
                    n => format!("; resumed at step {n}"),
                };
                Some(format!("training on {train_examples} examples: {steps_per_epoch} steps an epoch, {total_steps} steps in all{resumed}"))
            }
            Event::Step(_) => None,
            Event::Eval { record, improved } => {
                let measures = match record.dev_macro_f1 {
                    Some(f1) => format!("accuracy {:.4}, macro-F1 {f1:.4}", record.dev_accuracy),
                    None => format!("exact match {:.4}", record.dev_accuracy),
                };
                let mark = if *improved { "  (best, saved)" } else { "" };
                Some(format!(
                    "step {}: dev {measures}, loss {:.4}{mark}",
                    record.step, record.dev_loss
                ))
            }
            Event::EarlyStop { step } => Some(format!(
                "stopping early at step {step}: dev accuracy stopped improving"
            )),
        }
    }
}

pub struct Summary {
    pub steps: usize,
    /// stopped by the listener before the end: checkpointed at `steps`, for `resume`
    pub interrupted: bool,
    pub best_dev_accuracy: Option<f64>,
    pub adapter: PathBuf,
}

/// One run: what it trains, on what, and where it writes.
pub struct Trainer<'a> {
    pub trainee: &'a dyn Trainee,
    pub train_set: &'a EncodedSet,
    pub dev_set: Option<&'a EncodedSet>,
    /// the adapter_config.json of every adapter it saves
    pub peft: &'a PeftConfig,
    pub config: &'a TrainConfig,
    /// what the run reads (model, data), which a resumed run must read too
    pub fingerprint: &'a Fingerprint,
    pub output: &'a Path,
    pub device: &'a Device,
    /// the ranks this run is spread over (`SingleProcess`: this process alone)
    pub collective: &'a dyn Collective,
}

impl Trainer<'_> {
    pub fn run(
        &self,
        resume: bool,
        on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<Summary> {
        let config = self.config;
        let params = self.trainee.params();
        let named: Vec<(String, &Var)> = self
            .trainee
            .param_names()
            .into_iter()
            .zip(params.iter().copied())
            .collect();
        let mut optimizer = Optimizer::new(
            OptimizerConfig {
                kind: config.optimizer,
                weight_decay: config.weight_decay,
                ..Default::default()
            },
            &params,
        )?;
        let (ranks, writes) = (self.collective, self.collective.rank() == 0);
        if writes {
            std::fs::create_dir_all(self.output)
                .with_context(|| format!("cannot create {}", self.output.display()))?;
        }
        let checkpoint_path = self.output.join(CHECKPOINT);
        let mut progress = match resume {
            true => {
                // rank 0's file: the other ranks' machines may not share its disk
                let mut bytes = Vec::new();
                if writes {
                    bytes = std::fs::read(&checkpoint_path)
                        .with_context(|| format!("cannot read {}", checkpoint_path.display()))?;
                }
                ranks.broadcast(&mut bytes)?;
                let progress = checkpoint::load(
                    &bytes,
                    &checkpoint_path,
                    config,
                    self.fingerprint,
                    &named,
                    &mut optimizer,
                    self.device,
                )?;
                // killed between the checkpoint and the adapter it promised: write it now
                if writes && progress.adapter_step == Some(progress.step) {
                    self.save_adapter()?;
                }
                progress
            }
            false => Progress::default(),
        };
        let mut log = match writes {
            true => MetricsLog::open(self.output, progress.step)?,
            false => MetricsLog::discarding(),
        };
        let dev_shard = self
            .dev_set
            .map(|dev| dev.part(shard(dev.data.len(), ranks.rank(), ranks.size())));

        let lengths: Vec<usize> = self.train_set.data.iter().map(|e| e.ids.len()).collect();
        let steps_per_epoch = lengths.len().div_ceil(config.batch_size);
        let total = config
            .max_steps
            .unwrap_or((steps_per_epoch * config.epochs).max(config.min_steps));
        let eval_every = config.eval_every.unwrap_or((steps_per_epoch / 4).max(1));
        let started = on_event(Event::Start {
            total_steps: total,
            steps_per_epoch,
            resumed_at: progress.step,
            train_examples: lengths.len(),
        });
        let mut interrupted = collective::any(ranks, started.is_break())?;
        let mut checkpointed_at = progress.step;
        let save_checkpoint = |progress: &mut Progress, optimizer: &Optimizer| {
            progress.optimizer_steps = optimizer.steps();
            if !writes {
                return Ok(());
            }
            checkpoint::save(
                &checkpoint_path,
                config,
                self.fingerprint,
                &named,
                optimizer,
                progress,
            )
        };

        let mut epoch_plan: (usize, Vec<Vec<usize>>) = (usize::MAX, Vec::new());
        while progress.step < total && !progress.stopped && !interrupted {
            if epoch_plan.0 != progress.epoch {
                let batches =
                    epoch_batches(&lengths, config.batch_size, config.seed, progress.epoch);
                epoch_plan = (progress.epoch, batches);
            }
            let rows = &epoch_plan.1[progress.batch];
            let mine = &rows[shard(rows.len(), ranks.rank(), ranks.size())];
            let span = tracing::debug_span!("step", step = progress.step + 1).entered();
            let started = Instant::now();
            let lr = config
                .schedule
                .lr(config.lr(), progress.step, config.warmup_steps, total);
            let (loss, mut grads) = self.shard_gradients(mine, &params)?;
            if !loss.is_finite() {
                bail!(
                    "the loss became {loss} at step {}: lower --lr",
                    progress.step + 1
                );
            }
            let grad_norm = {
                let _span = tracing::trace_span!("optimizer").entered();
                let norm =
                    clip_grad_norm(&mut grads, config.max_grad_norm.unwrap_or(f64::INFINITY))?;
                optimizer.step(&params, &grads, lr)?;
                norm
            };
            let finite = params.iter().map(|p| all_finite(p.as_tensor()));
            if !finite.collect::<Result<Vec<bool>>>()?.iter().all(|&f| f) {
                bail!(
                    "the prompt became NaN or infinite at step {}: lower --lr",
                    progress.step + 1
                );
            }
            let examples_per_s = rows.len() as f64 / started.elapsed().as_secs_f64();
            drop(span);

            progress.step += 1;
            progress.batch += 1;
            if progress.batch == epoch_plan.1.len() {
                progress.epoch += 1;
                progress.batch = 0;
            }
            let record = StepRecord {
                epoch: progress.epoch,
                examples_per_s,
                grad_norm,
                loss,
                lr,
                step: progress.step,
            };
            let mut stop = on_event(Event::Step(&record)).is_break();
            log.write(&Record::Step(record))?;

            if progress.step % eval_every == 0 || progress.step == total {
                let _span = tracing::debug_span!("evaluate").entered();
                stop |= self
                    .evaluate(dev_shard.as_ref(), &mut progress, &mut log, on_event)?
                    .is_break();
                progress.stopped = config
                    .patience
                    .is_some_and(|p| progress.evals_without_gain >= p);
                // the checkpoint first, then the adapter it records: a run killed between the two
                // writes the adapter when it resumes
                save_checkpoint(&mut progress, &optimizer)?;
                checkpointed_at = progress.step;
                if writes && progress.adapter_step == Some(progress.step) {
                    self.save_adapter()?;
                }
                if progress.stopped {
                    stop |= on_event(Event::EarlyStop {
                        step: progress.step,
                    })
                    .is_break();
                }
            }
            // a Ctrl-C heard by any rank stops every rank after this step
            interrupted = collective::any(ranks, stop)?;
        }
        if interrupted && checkpointed_at != progress.step {
            log.flush()?;
            save_checkpoint(&mut progress, &optimizer)?;
        }
        // every rank returns once rank 0's files are written
        ranks.barrier()?;
        Ok(Summary {
            steps: progress.step,
            interrupted: interrupted && progress.step < total && !progress.stopped,
            best_dev_accuracy: progress.best,
            adapter: self.output.to_path_buf(),
        })
    }

    /// The loss and gradients of the global batch, of which this rank computes those of `rows`
    /// (it may have none: a batch smaller than the ranks' count).
    fn shard_gradients(&self, rows: &[usize], params: &[&Var]) -> Result<(f64, Vec<Tensor>)> {
        let (loss, terms, grads) = match rows.is_empty() {
            true => {
                let zeros = params.iter().map(|p| p.as_tensor().zeros_like());
                (0.0, 0, zeros.collect::<candle_core::Result<Vec<_>>>()?)
            }
            false => {
                let set = self.train_set;
                let labels = set.labels.as_deref();
                let padding = self.config.padding;
                let batch = Batch::new(&set.data, labels, rows, padding, self.device)?
                    .with_tasks(set.tasks.as_deref())?;
                let (loss, grads) = self.trainee.loss_and_grads(&batch)?;
                (loss, self.trainee.loss_terms(&batch)?, grads)
            }
        };
        collective::mean_over_ranks(self.collective, loss, terms, grads)
    }

    fn save_adapter(&self) -> Result<()> {
        self.trainee.adapter(self.peft)?.save(self.output)
    }

    /// Scores the dev set and marks the adapter for saving when it is the best so far (ties in
    /// accuracy go to the lower dev loss); without a dev set, every time.
    fn evaluate(
        &self,
        dev_shard: Option<&EncodedSet>,
        progress: &mut Progress,
        log: &mut MetricsLog,
        on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>> {
        let Some(dev) = dev_shard else {
            progress.adapter_step = Some(progress.step);
            log.flush()?;
            return Ok(ControlFlow::Continue(()));
        };
        let config = self.config;
        let batching = Batching {
            size: config.batch_size,
            padding: config.padding,
            device: self.device.clone(),
        };
        let tally = self.trainee.tally(dev, &batching)?;
        let score = match self.collective.size() {
            1 => tally.score(),
            _ => {
                let mut sums = tally.sums();
                self.collective.all_reduce_sum_f64(&mut sums)?;
                tally.with_sums(&sums).score()
            }
        };
        let improved = match (progress.best, progress.best_loss) {
            (Some(best), best_loss) => {
                score.accuracy > best
                    || (score.accuracy == best && best_loss.is_none_or(|l| score.loss < l))
            }
            (None, _) => true,
        };
        if improved {
            progress.best = Some(score.accuracy);
            progress.best_loss = Some(score.loss);
            progress.evals_without_gain = 0;
            progress.adapter_step = Some(progress.step);
        } else {
            progress.evals_without_gain += 1;
        }
        let record = EvalRecord {
            dev_accuracy: score.accuracy,
            dev_loss: score.loss,
            dev_macro_f1: score.macro_f1,
            step: progress.step,
        };
        let flow = on_event(Event::Eval {
            record: &record,
            improved,
        });
        log.write(&Record::Eval(record))?;
        log.flush()?;
        Ok(flow)
    }
}

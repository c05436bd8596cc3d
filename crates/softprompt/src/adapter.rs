//! Adapters on disk, in Hugging Face PEFT's format so that they move to and from PEFT:
//!
//! ```text
//! ADAPTER/adapter_config.json        PEFT's PromptTuningConfig (peft_type PROMPT_TUNING; P_TUNING,
//!                                    PREFIX_TUNING, MULTITASK_PROMPT_TUNING)
//! ADAPTER/adapter_model.safetensors  prompt_embeddings [M, D] (a prefix: [M, L·2·Hkv·K]);
//!                                    a multitask prompt's prefix_task_cols [N, M, r] and
//!                                    prefix_task_rows [N, r, D];
//!                                    base_model.classifier.{weight,bias}
//! ADAPTER/softprompt.json            what PEFT has no field for: label names, pooling, template,
//!                                    label words, task names
//! ```
//! A PEFT SEQ_CLS adapter has no softprompt.json: it loads with `Pool::Pooler` (the head of
//! BertForSequenceClassification) and labels LABEL_0, LABEL_1, ... A verbalizer adapter is
//! task_type CAUSAL_LM (SEQ_2_SEQ_LM on T5) with only prompt_embeddings: the frozen LM head
//! scores the label words.

use crate::backbone::any::AnyBackbone;
use crate::backbone::Backbone;
use crate::data::listing;
use crate::files::{load_tensors, save_tensors, write_atomic};
use crate::prompt::{Placement, TaskFactors};
use crate::prompt_encoder::Method;
use crate::task::classify::Pool;
use crate::task::TaskKind;
use crate::template::Template;
use crate::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const EXTRA_FILE: &str = "softprompt.json";
const PROMPT_KEY: &str = "prompt_embeddings";
const TASK_COLS_KEY: &str = "prefix_task_cols";
const TASK_ROWS_KEY: &str = "prefix_task_rows";
const HEAD_WEIGHT_KEY: &str = "base_model.classifier.weight";
const HEAD_BIAS_KEY: &str = "base_model.classifier.bias";

/// PEFT's `PeftType`: which method an adapter holds. softprompt reads and writes prompt tuning
/// and P-tuning (whose `prompt_embeddings` are its encoder's output, a prompt like any other);
/// any other value is kept as it is written, so that the error can name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeftType {
    #[serde(rename = "PROMPT_TUNING")]
    PromptTuning,
    #[serde(rename = "P_TUNING")]
    PTuning,
    #[serde(rename = "PREFIX_TUNING")]
    PrefixTuning,
    #[serde(rename = "MULTITASK_PROMPT_TUNING")]
    MultitaskPromptTuning,
    #[serde(untagged)]
    Other(String),
}

/// PEFT's `TaskType`: what the base model does with the prompt. Values equal PEFT's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskType {
    /// sequence classification: a `classifier` head on the pooled hidden state
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    /// a decoder: the verbalizer's label words, or generation
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    /// an encoder-decoder (T5): the prompt in front of the encoder's input, the decoder writes
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    #[serde(untagged)]
    Other(String),
}

impl TaskType {
    /// PEFT's name of it ("SEQ_CLS").
    pub fn name(&self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(name)) => name,
            _ => format!("{self:?}"),
        }
    }

    /// The task type of an adapter trained for `task`, on an encoder-decoder or not: a
    /// verbalizer's is its model's, whose LM head scores the label words.
    pub fn of(task: TaskKind, seq2seq: bool) -> Self {
        match (task, seq2seq) {
            (TaskKind::Classify, _) => Self::SeqCls,
            (TaskKind::Verbalizer, true) | (TaskKind::Seq2Seq, _) => Self::Seq2SeqLm,
            (TaskKind::Verbalizer | TaskKind::CausalLm, _) => Self::CausalLm,
        }
    }
}

/// The fields of PEFT's PromptTuningConfig and PromptEncoderConfig (peft/tuners/prompt_tuning/
/// config.py, peft/tuners/p_tuning/config.py and their bases); each method's own fields are left
/// out of the other's file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: PeftType,
    pub task_type: Option<TaskType>,
    pub num_virtual_tokens: usize,
    pub token_dim: Option<usize>,
    #[serde(default = "one")]
    pub num_transformer_submodules: usize,
    pub num_attention_heads: Option<usize>,
    pub num_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init_text: Option<String>,
    /// P-tuning: "MLP" or "LSTM"
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_reparameterization_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_num_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_dropout: Option<f64>,
    /// prefix tuning: whether PEFT computes the prefix through its MLP (`transform`); the
    /// adapter file holds the computed prefix either way
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
    /// multitask prompt tuning: the tasks, and the rank of each task's factors
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_tasks: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_ranks: Option<usize>,
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub auto_mapping: Option<serde_json::Value>,
    #[serde(default)]
    pub tokenizer_kwargs: Option<serde_json::Value>,
}

fn one() -> usize {
    1
}

/// softprompt's own record of an adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extra {
    pub labels: Vec<String>,
    /// linear heads only
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
    /// verbalizer adapters only: one word per label
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_words: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Template>,
    /// how the prompt was trained (PEFT's file says it for P-tuning, not for the residual method)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// a multitask prompt's task names, by id (PEFT's task ids are numbers: "0", "1", ...)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<String>>,
}

/// What turns the backbone's last hidden state into label scores.
#[derive(Clone)]
pub enum AdapterHead {
    /// PEFT's `classifier`: weight [C, D] and bias [C] on the `pool`ed vector.
    Linear {
        weight: Tensor,
        bias: Tensor,
        pool: Pool,
    },
    /// The model's own LM head scores each label's word (task/verbalizer.rs); nothing is stored
    /// but the words.
    Verbalizer { words: Vec<String> },
    /// A causal-LM prompt without label words (PEFT's CAUSAL_LM prompt tuning): it steers what
    /// the model writes (`softprompt generate`) and cannot classify.
    Generation,
}

/// An adapter in memory: a prompt, and what reads the hidden state behind it.
#[derive(Clone)]
pub struct Adapter {
    pub config: PeftConfig,
    /// [M, D]; a multitask adapter's shared prompt, which each task scales by its `tasks` factors
    pub prompt: Tensor,
    /// a multitask adapter's tasks
    pub tasks: Option<TaskFactors>,
    pub head: AdapterHead,
    pub labels: Vec<String>,
    /// the text each input is written into
    pub template: Option<Template>,
    /// what computed the prompt in training (every method's adapter holds the prompt itself)
    pub method: Method,
}

impl Adapter {
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.check_finite()
            .with_context(|| format!("refusing to write the adapter {}", dir.display()))?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create adapter directory {}", dir.display()))?;
        let mut tensors = vec![(PROMPT_KEY.to_string(), self.prompt.clone())];
        if let Some(tasks) = &self.tasks {
            tensors.push((TASK_COLS_KEY.to_string(), tasks.cols.clone()));
            tensors.push((TASK_ROWS_KEY.to_string(), tasks.rows.clone()));
        }
        let mut extra = Extra {
            labels: self.labels.clone(),
            pool: None,
            label_words: None,
            template: self.template.clone(),
            method: (self.method != Method::Prompt).then_some(self.method),
            tasks: self.tasks.as_ref().map(|t| t.names.clone()),
        };
        match &self.head {
            AdapterHead::Linear { weight, bias, pool } => {
                tensors.push((HEAD_WEIGHT_KEY.to_string(), weight.clone()));
                tensors.push((HEAD_BIAS_KEY.to_string(), bias.clone()));
                extra.pool = Some(*pool);
            }
            AdapterHead::Verbalizer { words } => extra.label_words = Some(words.clone()),
            AdapterHead::Generation => {}
        }
        let format = Some([("format".to_string(), "pt".to_string())].into());
        save_tensors(&dir.join(WEIGHTS_FILE), &tensors, format)?;
        write_atomic(
            &dir.join(CONFIG_FILE),
            serde_json::to_string_pretty(&self.config)?.as_bytes(),
        )?;
        write_atomic(
            &dir.join(EXTRA_FILE),
            serde_json::to_string_pretty(&extra)?.as_bytes(),
        )
    }

    /// Loads and checks an adapter for a model of hidden size `hidden`.
    pub fn load(dir: &Path, hidden: usize, device: &Device) -> Result<Self> {
        Self::read(dir, Some(hidden), device)
    }

    /// Loads and checks an adapter on its own, at the hidden size its config gives (or its
    /// prompt's): `fits` checks it against a model later.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::read(dir, None, device)
    }

    /// Where the prompt enters the backbone: the method's place, but a SEQ_2_SEQ_LM multitask
    /// prompt of two submodules (PEFT's default for T5) is 2M rows, the second M in front of the
    /// decoder's input, as PEFT's forward reads it.
    pub fn placement(&self) -> Placement {
        let c = &self.config;
        match (self.method, &c.task_type, c.num_transformer_submodules) {
            (Method::Multitask, Some(TaskType::Seq2SeqLm), 2) => Placement::EncoderDecoder,
            (method, ..) => method.placement(),
        }
    }

    /// The adapter as it serves `task`: a multitask adapter's prompt for that task (a plain
    /// prompt adapter then); any other adapter serves its one task and takes no task name.
    pub fn for_task(&self, task: Option<&str>) -> Result<std::borrow::Cow<'_, Adapter>> {
        use std::borrow::Cow;
        let Some(factors) = &self.tasks else {
            return match task {
                None => Ok(Cow::Borrowed(self)),
                Some(task) => bail!(
                    "a task ({task:?}) was named, but the adapter serves one task and takes none"
                ),
            };
        };
        let names = listing(&factors.names);
        let task = task.with_context(|| {
            format!("the adapter is a multitask prompt: name one of its tasks ({names})")
        })?;
        let t = factors
            .id(task)
            .with_context(|| format!("the adapter has no task {task:?} (its tasks: {names})"))?;
        Ok(Cow::Owned(Adapter {
            prompt: factors.prompts(&self.prompt)?.get(t)?,
            tasks: None,
            ..self.clone()
        }))
    }

    /// Whether the adapter was made for a model of `backbone`'s shape: its prompt vectors as wide
    /// as the hidden state, or its prefix as wide as every layer's keys and values.
    pub fn fits(&self, backbone: &AnyBackbone) -> Result<()> {
        let seq2seq = self.config.task_type == Some(TaskType::Seq2SeqLm);
        match (seq2seq, backbone.seq2seq().is_some()) {
            (true, false) => bail!(
                "the adapter is a SEQ_2_SEQ_LM prompt, for an encoder-decoder (T5), and the model is a {}: it was trained for another model",
                backbone.architecture()
            ),
            (false, true) => bail!(
                "the model is an encoder-decoder (T5), which reads SEQ_2_SEQ_LM adapters, and this one is {}: it was trained for another model",
                self.config.task_type.as_ref().map_or("SEQ_CLS".into(), TaskType::name)
            ),
            _ => {}
        }
        let dim = self.prompt.dim(1)?;
        match self.placement() {
            Placement::Embeddings | Placement::EncoderDecoder => {
                let hidden = backbone.hidden_size();
                if dim != hidden {
                    bail!("the adapter's prompt vectors have {dim} dimensions, but the model's hidden size is {hidden}: it was trained for another model");
                }
            }
            Placement::Prefix => {
                let shape = backbone.shape();
                if dim != shape.prefix_width() {
                    let c = &self.config;
                    let field = |v: Option<usize>| v.map_or("?".to_string(), |v| v.to_string());
                    bail!(
                        "the adapter's prefix has {dim} values a position (num_layers {} × 2 × token_dim {}), but the model needs {} ({} layers × 2 × {} key/value heads × {}): it was trained for another model",
                        field(c.num_layers),
                        field(c.token_dim),
                        shape.prefix_width(),
                        shape.layers,
                        shape.kv_heads,
                        shape.head_dim
                    );
                }
            }
        }
        Ok(())
    }

    fn read(dir: &Path, hidden: Option<usize>, device: &Device) -> Result<Self> {
        let at = dir.display();
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{at} is not an adapter: cannot read {CONFIG_FILE}"))?;
        let config: PeftConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a PEFT adapter config", config_path.display()))?;
        if let PeftType::Other(other) = &config.peft_type {
            bail!("adapter {at} has peft_type {other:?}; softprompt reads PROMPT_TUNING, P_TUNING, PREFIX_TUNING and MULTITASK_PROMPT_TUNING adapters");
        }
        let prefix = config.peft_type == PeftType::PrefixTuning;
        // a prefix's token_dim is the key/value width, which grouped-query attention makes narrower
        if let (Some(dim), Some(hidden), false) = (config.token_dim, hidden, prefix) {
            if dim != hidden {
                bail!("adapter {at} has token_dim {dim}, but the model's hidden size is {hidden}: it was trained for another model");
            }
        }
        let extra_path = dir.join(EXTRA_FILE);
        let extra: Option<Extra> = if extra_path.exists() {
            let text = std::fs::read_to_string(&extra_path)
                .with_context(|| format!("cannot read {}", extra_path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is malformed", extra_path.display()))?,
            )
        } else {
            None
        };
        let (mut tensors, _) = load_tensors(&dir.join(WEIGHTS_FILE), device)?;
        let mut take = |key: &str| {
            tensors
                .remove(key)
                .with_context(|| format!("adapter {at}: {WEIGHTS_FILE} has no tensor '{key}'"))
        };
        let prompt = take(PROMPT_KEY)?;
        let hidden = match (hidden, config.token_dim, prompt.dims(), prefix) {
            (Some(hidden), ..) => hidden,
            // the classifier of a prefix adapter read without a model says the hidden size
            (None, .., true) => match tensors.get(HEAD_WEIGHT_KEY).map(|w| w.dims()) {
                Some(&[_, hidden]) => hidden,
                _ => 0,
            },
            (None, Some(hidden), ..) => hidden,
            (None, None, [_, hidden], _) => *hidden,
            (None, None, dims, _) => bail!(
                "adapter {at}: prompt_embeddings has shape {dims:?}, expected [num_virtual_tokens, token_dim]"
            ),
        };
        let mut take = |key: &str| {
            tensors
                .remove(key)
                .with_context(|| format!("adapter {at}: {WEIGHTS_FILE} has no tensor '{key}'"))
        };
        // PEFT saves a prefix's first num_virtual_tokens rows only, however many submodules read
        // it (a SEQ_2_SEQ_LM prefix says 2)
        let submodules = if prefix {
            1
        } else {
            config.num_transformer_submodules
        };
        let m = config
            .num_virtual_tokens
            .checked_mul(submodules)
            .filter(|&m| m > 0)
            .with_context(|| {
                format!(
                    "adapter {at}: num_virtual_tokens {} × num_transformer_submodules {} is no prompt length",
                    config.num_virtual_tokens, config.num_transformer_submodules
                )
            })?;
        let width = match (prefix, config.num_layers, config.token_dim) {
            (false, ..) => Some(hidden),
            (true, Some(layers), Some(dim)) => Some(layers * 2 * dim),
            // checked against the model's shape by `fits`
            (true, ..) => None,
        };
        match (prompt.dims(), width) {
            (&[rows, _], None) if rows == m => {}
            (&[rows, w], Some(width)) if rows == m && w == width => {}
            (dims, width) => bail!(
                "adapter {at}: prompt_embeddings has shape {dims:?}, expected [{m}, {}]",
                width.map_or("num_layers × 2 × token_dim".to_string(), |w| w
                    .to_string())
            ),
        }
        // PEFT makes a SEQ_2_SEQ_LM prompt [2M, D] (num_transformer_submodules 2), but its prompt
        // tuning and P-tuning read only the first M rows, in front of the encoder's input, in
        // training and generation alike: the other M never move. Those M rows are the adapter.
        let encoder_only = matches!(config.peft_type, PeftType::PromptTuning | PeftType::PTuning);
        let (prompt, config) = match (&config.task_type, encoder_only) {
            (Some(TaskType::Seq2SeqLm), true) if config.num_transformer_submodules > 1 => (
                prompt.narrow(0, 0, config.num_virtual_tokens)?,
                PeftConfig {
                    num_transformer_submodules: 1,
                    ..config
                },
            ),
            _ => (prompt, config),
        };
        let method = extra.as_ref().and_then(|e| e.method);
        let tasks = match config.peft_type {
            PeftType::MultitaskPromptTuning => {
                let names = extra.as_ref().and_then(|e| e.tasks.clone());
                let factors = TaskFactors {
                    names: Vec::new(),
                    cols: take(TASK_COLS_KEY)?,
                    rows: take(TASK_ROWS_KEY)?,
                };
                Some(
                    task_factors(factors, names, m, hidden, config.num_tasks)
                        .with_context(|| format!("adapter {at}"))?,
                )
            }
            _ => None,
        };
        let task = config.task_type.clone().unwrap_or(TaskType::SeqCls);
        let (head, labels, template) = match (task, extra) {
            (TaskType::SeqCls, extra) => {
                let (weight, bias) = (take(HEAD_WEIGHT_KEY)?, take(HEAD_BIAS_KEY)?);
                let classes = weight.dim(0)?;
                if weight.dims() != [classes, hidden] || bias.dims() != [classes] {
                    bail!(
                        "adapter {at}: the classifier has shapes {:?} and {:?}, expected [C, {hidden}] and [C]",
                        weight.dims(),
                        bias.dims()
                    );
                }
                let (labels, pool, template) = match extra {
                    Some(e) => (e.labels, e.pool.unwrap_or(Pool::Pooler), e.template),
                    None => (
                        (0..classes).map(|i| format!("LABEL_{i}")).collect(),
                        Pool::Pooler,
                        None,
                    ),
                };
                if labels.len() != classes {
                    bail!(
                        "adapter {at}: {} label names for a classifier of {classes} classes",
                        labels.len()
                    );
                }
                (AdapterHead::Linear { weight, bias, pool }, labels, template)
            }
            (TaskType::CausalLm | TaskType::Seq2SeqLm, Some(Extra { labels, label_words: Some(words), template, .. })) => {
                if words.len() != labels.len() {
                    bail!("adapter {at}: {} label words for {} labels", words.len(), labels.len());
                }
                (AdapterHead::Verbalizer { words }, labels, template)
            }
            (TaskType::CausalLm | TaskType::Seq2SeqLm, extra) => (
                AdapterHead::Generation,
                Vec::new(),
                extra.and_then(|e| e.template),
            ),
            (TaskType::Other(other), _) => bail!(
                "adapter {at} is for task_type {other}; softprompt reads SEQ_CLS, CAUSAL_LM and SEQ_2_SEQ_LM adapters"
            ),
        };
        if !matches!(head, AdapterHead::Generation) {
            check_labels(&labels).with_context(|| format!("adapter {at}"))?;
        }
        let method = match (&config.peft_type, method) {
            (_, Some(method)) => method,
            (PeftType::PTuning, None) => Method::PTuning,
            (PeftType::PrefixTuning, _) => Method::Prefix,
            (PeftType::MultitaskPromptTuning, _) => Method::Multitask,
            _ => Method::Prompt,
        };
        let adapter = Self {
            config,
            prompt,
            tasks,
            head,
            labels,
            template,
            method,
        };
        adapter
            .check_finite()
            .with_context(|| format!("adapter {at}"))?;
        Ok(adapter)
    }

    /// An adapter with a NaN or infinite number in it answers nonsense: refused on both sides.
    fn check_finite(&self) -> Result<()> {
        let mut tensors = vec![(PROMPT_KEY, &self.prompt)];
        if let Some(t) = &self.tasks {
            tensors.extend([(TASK_COLS_KEY, &t.cols), (TASK_ROWS_KEY, &t.rows)]);
        }
        if let AdapterHead::Linear { weight, bias, .. } = &self.head {
            tensors.extend([(HEAD_WEIGHT_KEY, weight), (HEAD_BIAS_KEY, bias)]);
        }
        for (name, tensor) in tensors {
            if !all_finite(tensor)? {
                bail!("{name} holds NaN or infinite values");
            }
        }
        Ok(())
    }
}

/// A multitask adapter's factors checked against its prompt of `m` vectors of `hidden`, named by
/// `names` (softprompt.json's) or by their ids, as PEFT's task ids are.
fn task_factors(
    factors: TaskFactors,
    names: Option<Vec<String>>,
    m: usize,
    hidden: usize,
    num_tasks: Option<usize>,
) -> Result<TaskFactors> {
    let (cols, rows) = (factors.cols.dims(), factors.rows.dims());
    let fits = match (cols, rows) {
        (&[n, cm, r], &[rn, rr, d]) => cm == m && rn == n && rr == r && d == hidden && n > 0,
        _ => false,
    };
    if !fits {
        bail!("{TASK_COLS_KEY} has shape {cols:?} and {TASK_ROWS_KEY} {rows:?}, expected [num_tasks, {m}, num_ranks] and [num_tasks, num_ranks, {hidden}]");
    }
    let n = cols[0];
    if num_tasks.is_some_and(|t| t != n) {
        bail!(
            "num_tasks is {}, but the factors hold {n} tasks",
            num_tasks.unwrap_or(0)
        );
    }
    let names = names.unwrap_or_else(|| (0..n).map(|t| t.to_string()).collect());
    if names.len() != n {
        bail!("{} task names for {n} tasks", names.len());
    }
    Ok(TaskFactors { names, ..factors })
}

/// Whether every value of `tensor` is a finite number.
pub fn all_finite(tensor: &Tensor) -> Result<bool> {
    let values = tensor.to_dtype(candle_core::DType::F32)?.flatten_all()?;
    Ok(values.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
}

/// Label names a classifier can be read by: at least two, none empty, no two alike.
pub fn check_labels(labels: &[String]) -> Result<()> {
    if labels.len() < 2 {
        bail!(
            "a classifier needs at least two labels, and this one has {}",
            labels.len()
        );
    }
    if let Some(empty) = labels.iter().position(|l| l.trim().is_empty()) {
        bail!("label {empty} has an empty name");
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = labels.iter().find(|l| !seen.insert(l.as_str())) {
        bail!("the label {twice:?} appears twice");
    }
    Ok(())
}

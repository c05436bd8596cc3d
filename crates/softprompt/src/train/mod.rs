//! Training: read and encode the data, build the prompted model for the task, and run the loop.
//!
//! ```text
//! config.rs      TrainConfig (every option and its default), TrainPaths
//! trainer.rs     Trainer::run: the loop, evaluation, the best adapter, early stopping
//! checkpoint.rs  checkpoint.safetensors: tensors, optimizer state, progress (exact --resume)
//! log.rs         metrics.jsonl as typed records
//! ```

mod checkpoint;
mod config;
pub mod log;
mod trainer;

pub use config::{TrainConfig, TrainData, TrainPaths};
pub use trainer::{Event, Summary, Trainer};

use crate::adapter::{PeftConfig, PeftType, TaskType, CONFIG_FILE};
use crate::backbone::any::AnyBackbone;
use crate::backbone::Backbone;
use crate::batch::EncodedSet;
use crate::collective::{self, Collective};
use crate::data::{label_ids, label_set, task_ids, task_set, Columns, DataSource, Labels};
use crate::files::DirLock;
use crate::model::Model;
use crate::prompt::{InitSource, Placement, PromptInit, SoftPrompt};
use crate::prompt_encoder::{Method, PromptEncoder, TrainablePrompt, LSTM_LAYERS};
use crate::prompted::{CausalLm, Classifier, Head, PromptedModel, Trainee};
use crate::task::causal_lm::encode_pairs;
use crate::task::classify::ClassificationHead;
use crate::task::TaskKind;
use crate::tokenize::{encode_all, TextEncoder};
use crate::{bail, Error, Result};
use candle_core::{DType, Device, Tensor};
use checkpoint::{Fingerprint, CHECKPOINT};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::ops::ControlFlow;
use std::path::Path;

/// The label and task names of a data set (the training set's define them for the dev set's).
struct Names {
    labels: Vec<String>,
    /// a multitask prompt's tasks; empty for any other
    tasks: Vec<String>,
}

/// Reads a data set and writes each input into the template. Classification tasks tokenize the
/// inputs and map the labels to `known`'s (or to the set's own, sorted); a causal LM appends
/// each target to its input, an encoder-decoder (whose decoder starts at `decoder_start`) gives
/// it to the decoder. A multitask run's rows map their tasks the same way.
fn load_set(
    source: &DataSource,
    columns: &Columns,
    known: Option<&Names>,
    encoder: &TextEncoder,
    config: &TrainConfig,
    eos: Option<u32>,
    decoder_start: Option<u32>,
) -> Result<(EncodedSet, Names)> {
    let examples = source.examples(columns, Labels::Required)?;
    let (template, name) = (config.template.as_ref(), source.name());
    let names = match known {
        Some(n) => Names {
            labels: n.labels.clone(),
            tasks: n.tasks.clone(),
        },
        None => Names {
            labels: label_set(&examples),
            tasks: task_set(&examples),
        },
    };
    let tasks = match columns.task {
        Some(_) => Some(task_ids(&examples, &names.tasks, name)?),
        None => None,
    };
    let set = match config.task {
        TaskKind::CausalLm | TaskKind::Seq2Seq => EncodedSet {
            data: encode_pairs(encoder, &examples, template, name, eos, decoder_start)?,
            labels: None,
            tasks,
        },
        TaskKind::Classify | TaskKind::Verbalizer => EncodedSet {
            labels: Some(label_ids(&examples, &names.labels, name)?),
            data: encode_all(encoder, &examples, template, name)?,
            tasks,
        },
    };
    Ok((set, names))
}

/// Trains a prompt (and the task's head) on `paths.data` and writes the adapter to
/// `paths.output`; with `resume`, continues the run whose checkpoint is there. `on_event` hears
/// every step and evaluation; when it answers `Break`, the run stops at the end of that step,
/// checkpointed there, and `resume` continues it exactly.
///
/// Every rank of `ranks` calls it with the same arguments; each trains on its shard of every
/// batch, and rank 0 writes the run's files (`SingleProcess`: this process alone).
pub fn train(
    paths: &TrainPaths,
    config: &TrainConfig,
    resume: bool,
    device: &Device,
    ranks: &dyn Collective,
    on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
) -> Result<Summary> {
    // options and the output directory are checked before a model that may take minutes to load
    let _lock = claim_output(&paths.output, config, resume, ranks)?;
    let model = Model::load_with(&paths.model, DType::F32, device, paths.keep_quantized)?
        .hold_weights(paths.weights)?;
    let run = Run {
        model: &model,
        data: &paths.data,
        output: &paths.output,
        config,
        resume,
        device,
        ranks,
    };
    run.train(on_event)
}

/// `train` on a model already loaded (the Python binding keeps one for many runs).
pub fn train_model(
    model: &Model,
    data: &TrainData,
    output: &Path,
    config: &TrainConfig,
    resume: bool,
    ranks: &dyn Collective,
    on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
) -> Result<Summary> {
    let _lock = claim_output(output, config, resume, ranks)?;
    let device = model.backbone.word_embeddings().device();
    let run = Run {
        model,
        data,
        output,
        config,
        resume,
        device: &device,
        ranks,
    };
    run.train(on_event)
}

/// Checks the options, and (on the rank that writes) that `output` holds a run to resume or none
/// at all; the lock it returns refuses a second run into the same directory until this one ends.
fn claim_output(
    output: &Path,
    config: &TrainConfig,
    resume: bool,
    ranks: &dyn Collective,
) -> Result<Option<DirLock>> {
    config.validate()?;
    if ranks.rank() != 0 {
        return Ok(None);
    }
    let lock = DirLock::acquire(output, "training run")?;
    let shown = output.display();
    let checkpoint_path = output.join(CHECKPOINT);
    if !resume && checkpoint_path.exists() {
        bail!("{shown} already holds a training run; pass --resume to continue it, or choose another --output");
    }
    if !resume && output.join(CONFIG_FILE).exists() {
        bail!(
            "{shown} already holds an adapter; choose another --output (nothing was overwritten)"
        );
    }
    if resume && !checkpoint_path.exists() {
        bail!("--resume: there is no checkpoint in {shown}");
    }
    Ok(Some(lock))
}

/// One training run, its output claimed.
struct Run<'a> {
    model: &'a Model,
    data: &'a TrainData,
    output: &'a Path,
    config: &'a TrainConfig,
    resume: bool,
    device: &'a Device,
    ranks: &'a dyn Collective,
}

impl Run<'_> {
    fn train(&self, on_event: &mut dyn FnMut(Event) -> ControlFlow<()>) -> Result<Summary> {
        let Run {
            model,
            data,
            output,
            config,
            resume,
            device,
            ranks,
        } = *self;
        model.check_task(config.task, config.template.as_ref())?;
        if config.task.writes_targets() {
            model.lm_head("--task causal-lm")?;
        }
        let decoder_start = model.decoder_start();
        let m = config.num_virtual_tokens;
        let encoder = model.encoder(m, config.max_tokens)?;
        let eos = model.eos_token_ids.first().copied();
        match (config.method, &data.columns.task) {
            (Method::Multitask, None) => {
                bail!("--method multitask needs --task-column: the column naming each row's task")
            }
            (Method::Multitask, Some(_)) | (_, None) => {}
            (_, Some(_)) => bail!("--task-column is for --method multitask"),
        }
        let (train_set, names) = load_set(
            &data.train,
            &data.columns,
            None,
            &encoder,
            config,
            eos,
            decoder_start,
        )?;
        let (label_names, task_names) = (names.labels.clone(), names.tasks.clone());
        if !config.task.writes_targets() && label_names.len() < 2 {
            bail!(
                "{}: training needs at least two different labels, found {:?}",
                data.train.name().display(),
                label_names
            );
        }
        let dev_set = match &data.dev {
            Some(dev) => {
                // a causal LM's dev targets need not be its training targets
                let known = match config.task.writes_targets() {
                    true => Names {
                        labels: Vec::new(),
                        tasks: names.tasks.clone(),
                    },
                    false => names,
                };
                let columns = &data.columns;
                let set = load_set(
                    dev,
                    columns,
                    Some(&known),
                    &encoder,
                    config,
                    eos,
                    decoder_start,
                );
                Some(set?.0)
            }
            None => None,
        };

        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let label_words = label_words(config, &label_names);
        let prompt = initial_prompt(model, &encoder, config, &label_words, &mut rng)?;
        let peft = peft_config(model, config, task_names.len());
        let prompt = trainable(model, prompt, config, task_names, &mut rng)?;
        let template = config.template.clone();
        let fingerprint = fingerprint(model, data)?;
        // every rank must train the same thing: the same options, model and data as rank 0
        collective::agree(ranks, &job_description(config, &fingerprint, resume)?)?;
        let trainer = |trainee: &dyn Trainee,
                       on_event: &mut dyn FnMut(Event) -> ControlFlow<()>| {
            Trainer {
                trainee,
                train_set: &train_set,
                dev_set: dev_set.as_ref(),
                peft: &peft,
                config,
                fingerprint: &fingerprint,
                output,
                device,
                collective: ranks,
            }
            .run(resume, on_event)
        };
        match config.task {
            TaskKind::CausalLm | TaskKind::Seq2Seq => {
                let head = CausalLm {
                    lm_head: model.lm_head("--task causal-lm")?.dense()?,
                };
                trainer(&prompted(&model.backbone, prompt, head, template), on_event)
            }
            TaskKind::Classify | TaskKind::Verbalizer => {
                let (head, words) = if config.task == TaskKind::Verbalizer {
                    let t = template.as_ref().map(|t| t.as_str()).unwrap_or_default();
                    let head = model.verbalizer_head(t, &label_names, &label_words)?;
                    (head, Some(label_words))
                } else {
                    let d = model.backbone.hidden_size();
                    let n = label_names.len();
                    let pooler = model.pooler_for(config.pool);
                    let head =
                        ClassificationHead::init(n, d, config.pool, pooler, &mut rng, device)?;
                    (head, None)
                };
                let head = Classifier {
                    head,
                    labels: label_names,
                    label_words: words,
                };
                trainer(&prompted(&model.backbone, prompt, head, template), on_event)
            }
        }
    }
}

fn prompted<H: Head>(
    backbone: &AnyBackbone,
    prompt: TrainablePrompt,
    head: H,
    template: Option<crate::template::Template>,
) -> PromptedModel<&AnyBackbone, H> {
    PromptedModel {
        backbone,
        prompt,
        head,
        template,
    }
}

/// The prompt as `config.method` trains it: `initial` itself, or an encoder over it (for a
/// prefix, PEFT's projection from `initial` to every layer's keys and values; for a multitask
/// prompt, each of `tasks`' factors).
fn trainable(
    model: &Model,
    initial: SoftPrompt,
    config: &TrainConfig,
    tasks: Vec<String>,
    rng: &mut ChaCha8Rng,
) -> Result<TrainablePrompt> {
    let table = initial.embeddings.as_tensor();
    match config.method {
        Method::Prompt => return Ok(initial.into()),
        Method::Prefix if !config.prefix_projection => {
            if model.backbone.seq2seq().is_some() {
                bail!("--prefix-projection false starts the prefix from the model's keys and values of the init's vectors, which an encoder-decoder's prefix (its decoder's) has none of; use the projection");
            }
            // the table starts as the keys and values the model computes for the init's vectors
            // alone: what attention would read of those vectors as a prompt that sees no input
            let (kv, _) = model.backbone.prompt_pass(table)?;
            let kv = kv.to_dtype(table.dtype())?;
            return Ok(SoftPrompt::placed(&kv, Placement::Prefix)?.into());
        }
        Method::Multitask => {
            let rank = config.task_rank.unwrap_or(1);
            let placement = placement(model, config);
            let encoder = PromptEncoder::multitask(table, tasks, rank, placement, rng)?;
            return Ok(TrainablePrompt::Encoded(encoder));
        }
        _ => {}
    }
    let hidden = config.encoder_hidden_size.unwrap_or(table.dim(1)?);
    let width = match config.method.placement() {
        Placement::Embeddings | Placement::EncoderDecoder => table.dim(1)?,
        Placement::Prefix => model.backbone.shape().prefix_width(),
    };
    let encoder = PromptEncoder::init(config.method, config.encoder, hidden, width, table, rng)?;
    Ok(TrainablePrompt::Encoded(encoder))
}

/// Where the run's prompt enters the backbone: its method's place, but a multitask prompt on an
/// encoder-decoder is also in front of the decoder, as PEFT's SEQ_2_SEQ_LM multitask prompt
/// trains (num_transformer_submodules 2).
fn placement(model: &Model, config: &TrainConfig) -> Placement {
    match (config.method, model.backbone.seq2seq().is_some()) {
        (Method::Multitask, true) => Placement::EncoderDecoder,
        (method, _) => method.placement(),
    }
}

/// The adapter_config.json of the run's adapters. A P-tuning adapter is PEFT's P_TUNING with its
/// encoder's fields (PEFT, like softprompt, reads its prompt_embeddings as the prompt); a prefix
/// is PREFIX_TUNING; the residual method has no PEFT type and is written as the prompt it computes;
/// a multitask prompt of `tasks` is MULTITASK_PROMPT_TUNING.
fn peft_config(model: &Model, config: &TrainConfig, tasks: usize) -> PeftConfig {
    let seq2seq = model.decoder_start().is_some();
    let (task, m) = (
        TaskType::of(config.task, seq2seq),
        config.num_virtual_tokens,
    );
    let init = (config.init.peft_name(), config.init_text.clone());
    let mut peft = model.peft_config(task, m, init.0, init.1);
    if config.method == Method::PTuning {
        peft.peft_type = PeftType::PTuning;
        peft.prompt_tuning_init = None;
        peft.prompt_tuning_init_text = None;
        peft.encoder_reparameterization_type = Some(config.encoder.peft_name().into());
        peft.encoder_hidden_size = Some(
            config
                .encoder_hidden_size
                .unwrap_or(model.backbone.hidden_size()),
        );
        peft.encoder_num_layers = Some(LSTM_LAYERS);
        peft.encoder_dropout = Some(0.0);
    }
    if config.method == Method::Multitask {
        // PEFT's multitask TEXT init would tokenize the text again on loading; its RANDOM does not
        peft.peft_type = PeftType::MultitaskPromptTuning;
        if placement(model, config) == Placement::EncoderDecoder {
            peft.num_transformer_submodules = 2;
        }
        peft.prompt_tuning_init = Some("RANDOM".into());
        peft.prompt_tuning_init_text = None;
        peft.num_tasks = Some(tasks);
        peft.num_ranks = Some(config.task_rank.unwrap_or(1));
    }
    if config.method == Method::Prefix {
        // The file holds the computed prefix, which PEFT reads as its table without the
        // projection (trainable there too); the projection lives in softprompt's checkpoint.
        let shape = model.backbone.shape();
        peft.peft_type = PeftType::PrefixTuning;
        if model.backbone.seq2seq().is_some() {
            // what PEFT's SEQ_2_SEQ_LM prefix says, and what its forward reads the prefix by
            peft.num_transformer_submodules = 2;
        }
        peft.token_dim = Some(shape.kv_width());
        peft.num_attention_heads = Some(shape.kv_heads);
        peft.prompt_tuning_init = None;
        peft.prompt_tuning_init_text = None;
        peft.prefix_projection = Some(false);
        peft.encoder_hidden_size = Some(
            config
                .encoder_hidden_size
                .unwrap_or(model.backbone.hidden_size()),
        );
    }
    peft
}

/// The run as ranks compare it: one `name: value` line per option, the model's and the data's
/// hashes, and whether it resumes.
fn job_description(
    config: &TrainConfig,
    fingerprint: &Fingerprint,
    resume: bool,
) -> Result<String> {
    let mut lines = Vec::new();
    for part in [
        serde_json::to_value(config)?,
        serde_json::to_value(fingerprint)?,
    ] {
        if let serde_json::Value::Object(fields) = part {
            lines.extend(
                fields
                    .iter()
                    .map(|(name, value)| format!("{name}: {value}")),
            );
        }
    }
    lines.push(format!("resume: {resume}"));
    Ok(lines.join("\n"))
}

/// What this run reads, for `--resume` to check.
fn fingerprint(model: &Model, data: &TrainData) -> Result<Fingerprint> {
    let content = |source: &DataSource| Ok::<_, Error>(checkpoint::hash(&source.content()?));
    let backbone = &model.backbone;
    let table = backbone.word_embeddings();
    let rows = table.dims()[0].min(64);
    let first_rows = table
        .rows(&Tensor::arange(0u32, rows as u32, &table.device())?)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let shape = backbone.shape();
    let mut described = format!(
        "{} d{} l{} h{} v{} p{}",
        backbone.architecture(),
        backbone.hidden_size(),
        shape.layers,
        shape.heads,
        table.dims()[0],
        backbone.max_positions()
    )
    .into_bytes();
    described.extend(first_rows.iter().flat_map(|v| v.to_le_bytes()));
    let columns = format!("{:?}", data.columns);
    Ok(Fingerprint {
        model: checkpoint::hash(&described),
        // which columns are read is part of what the data is
        train: format!(
            "{} {}",
            content(&data.train)?,
            checkpoint::hash(columns.as_bytes())
        ),
        dev: data.dev.as_ref().map(content).transpose()?,
    })
}

/// The words `--init labels` starts from: `--label-words`, or the labels themselves ("very_good"
/// reads "very good"). A causal LM's "labels" are its distinct targets.
fn label_words(config: &TrainConfig, label_names: &[String]) -> Vec<String> {
    config.label_words.clone().unwrap_or_else(|| {
        label_names
            .iter()
            .map(|l| l.replace(['_', '-'], " "))
            .collect()
    })
}

/// The table a run of `config` on `data` starts its prompt from [M, D] (an encoder's input): the
/// run's seed draws it first, so this is what the run's prompt moved from (the paper's section 7).
pub fn starting_prompt(model: &Model, data: &TrainData, config: &TrainConfig) -> Result<Tensor> {
    let encoder = model.encoder(config.num_virtual_tokens, config.max_tokens)?;
    let examples = data.train.examples(&data.columns, Labels::Required)?;
    let words = label_words(config, &label_set(&examples));
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let prompt = initial_prompt(model, &encoder, config, &words, &mut rng)?;
    Ok(prompt.embeddings.as_tensor().clone())
}

/// The prompt as `config.init` starts it, from the model's embeddings and the task's tokens.
fn initial_prompt(
    model: &Model,
    encoder: &TextEncoder,
    config: &TrainConfig,
    label_words: &[String],
    rng: &mut ChaCha8Rng,
) -> Result<SoftPrompt> {
    let m = placement(model, config).rows(config.num_virtual_tokens);
    // Only `--init labels` reads them, and only one word per prompt vector: a causal LM may have
    // thousands of distinct targets.
    let label_token_ids = match config.init {
        PromptInit::Labels => label_words
            .iter()
            .take(m)
            .map(|w| encoder.plain_ids(w))
            .collect::<Result<Vec<_>>>()?,
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
    SoftPrompt::init(config.init, m, &source, rng)
}

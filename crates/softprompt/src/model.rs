//! A frozen model and its tokenizer: a Hugging Face directory (config.json, *.safetensors,
//! tokenizer.json) of BERT, GPT-2, the Llama family or T5, or a Llama-family GGUF file.

use crate::adapter::{AdapterHead, PeftConfig, PeftType, TaskType};
use crate::backbone::any::AnyBackbone;
use crate::backbone::bert::Bert;
use crate::backbone::gpt2::Gpt2;
use crate::backbone::llama::Llama;
use crate::backbone::t5::T5;
use crate::backbone::{gguf, read_config, Backbone};
use crate::kernels::{Linear, Weight};
use crate::task::classify::{ClassificationHead, Pool};
use crate::task::verbalizer;
use crate::task::TaskKind;
use crate::template::Template;
use crate::tokenize::TextEncoder;
use crate::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct Model {
    /// the directory or GGUF file it came from
    pub path: PathBuf,
    pub backbone: AnyBackbone,
    tokenizer: Tokenizer,
    /// tokens that end a generation
    pub eos_token_ids: Vec<u32>,
}

/// How a model's frozen matrices are held in memory (`--dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
}
crate::named_choice!(WeightDtype, "f32", "bf16");

/// What config.json (or generation_config.json) says beyond the architecture's own fields.
#[derive(serde::Deserialize)]
struct ModelType {
    model_type: Option<String>,
    /// one id or a list
    eos_token_id: Option<serde_json::Value>,
}

fn ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Model {
    /// The same model with its matrices held as `weights` says: in bf16 they take half the
    /// memory and multiply on the CPU's bf16 dot product where it has one (f32 sums, f32
    /// activations); elsewhere each is widened to f32 as it is used, which costs time.
    pub fn hold_weights(self, weights: WeightDtype) -> crate::Result<Self> {
        match weights {
            WeightDtype::F32 => Ok(self),
            WeightDtype::Bf16 => {
                let words = self.backbone.word_embeddings();
                if words.dtype() != DType::F32 {
                    bail!("--dtype bf16 rounds an f32 model's matrices, and this one is loaded as {:?}", words.dtype());
                }
                if matches!(words, Weight::Quantized { .. }) {
                    bail!("--dtype bf16 and --keep-quantized both choose how the matrices are held: give one");
                }
                if !crate::kernels::bf16_native() {
                    tracing::warn!("this CPU has no AVX512-BF16: --dtype bf16 halves the matrices' memory, but each is widened to f32 as it is used, which makes every step slower than --dtype f32");
                }
                Ok(Self {
                    backbone: self.backbone.map_weights(&|w| w.to_bf16())?,
                    ..self
                })
            }
        }
    }

    pub fn load(path: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        Self::load_with(path, dtype, device, false)
    }

    /// `load`; with `keep_quantized`, a GGUF file's quantized matrices stay quantized in memory
    /// and are dequantized one at a time as they are used (`--keep-quantized`): less memory, the
    /// same numbers, some time spent dequantizing.
    pub fn load_with(
        path: &Path,
        dtype: DType,
        device: &Device,
        keep_quantized: bool,
    ) -> crate::Result<Self> {
        let is_gguf = path.extension().is_some_and(|e| e == "gguf");
        if keep_quantized && !is_gguf {
            bail!(
                "--keep-quantized reads quantized GGUF files, and {} is not one",
                path.display()
            );
        }
        if path.is_file() && is_gguf {
            let gguf = gguf::load_llama(path, dtype, device, keep_quantized)?;
            return Self {
                path: path.to_path_buf(),
                backbone: AnyBackbone::Llama(gguf.llama),
                tokenizer: gguf.tokenizer,
                eos_token_ids: gguf.eos_token_id.into_iter().collect(),
            }
            .without_unknown_eos()
            .check_vocabulary();
        }
        if !path.is_dir() {
            bail!(
                "model {} does not exist (give a model directory or a .gguf file)",
                path.display()
            );
        }
        let missing: Vec<&str> = ["config.json", "tokenizer.json"]
            .into_iter()
            .filter(|f| !path.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "model directory {} lacks {}",
                path.display(),
                missing.join(" and ")
            );
        }
        let config = path.join("config.json");
        let kind: ModelType = read_config(&config, "Hugging Face")?;
        let backbone = match kind.model_type.as_deref().unwrap_or("bert") {
            "bert" => AnyBackbone::Bert(Bert::load(path, dtype, device)?),
            "gpt2" => AnyBackbone::Gpt2(Gpt2::load(path, dtype, device)?),
            "llama" | "qwen2" | "mistral" => AnyBackbone::Llama(Llama::load(path, dtype, device)?),
            "t5" | "mt5" => AnyBackbone::T5(T5::load(path, dtype, device)?),
            other => bail!(
                "{}: model_type {other:?} is not supported (bert, gpt2, llama, qwen2, mistral, t5, mt5)",
                config.display()
            ),
        };
        let tokenizer_file = path.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_file).map_err(|e| {
            crate::invalid!(
                "cannot load the tokenizer {}: {e}",
                tokenizer_file.display()
            )
        })?;
        let generation = path.join("generation_config.json");
        let mut eos_token_ids = ids(kind.eos_token_id.as_ref());
        if eos_token_ids.is_empty() && generation.is_file() {
            let generation: ModelType = read_config(&generation, "generation")?;
            eos_token_ids = ids(generation.eos_token_id.as_ref());
        }
        Self {
            path: path.to_path_buf(),
            backbone,
            tokenizer,
            eos_token_ids,
        }
        .without_unknown_eos()
        .check_vocabulary()
    }

    /// A tokenizer that can write ids the model has no embedding for fails only when such a
    /// token appears: refuse the pair at load instead.
    fn check_vocabulary(self) -> crate::Result<Self> {
        let rows = self.backbone.word_embeddings().dims()[0];
        let ids = self
            .tokenizer
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, |m| m + 1);
        if ids as usize > rows {
            bail!(
                "{}: the tokenizer has ids up to {} and the model embeds {rows} tokens: they do not belong together",
                self.path.display(),
                ids - 1
            );
        }
        Ok(self)
    }

    /// Drops EOS ids the model has no embedding for (tiny test checkpoints keep GPT-2's 50256
    /// with a smaller vocabulary): they could never be written, and reading one would fail.
    fn without_unknown_eos(mut self) -> Self {
        let vocab = self.backbone.word_embeddings().dims()[0];
        self.eos_token_ids.retain(|&id| (id as usize) < vocab);
        self
    }

    /// A tokenizer whose encodings, with a prompt of `prompt_len` in front, fit the model.
    pub fn encoder(
        &self,
        prompt_len: usize,
        max_tokens: Option<usize>,
    ) -> crate::Result<TextEncoder> {
        let limit = self.backbone.max_positions().saturating_sub(prompt_len);
        if limit < 2 {
            bail!(
                "a prompt of {prompt_len} vectors leaves no room in a model of {} positions",
                self.backbone.max_positions()
            );
        }
        TextEncoder::new(
            self.tokenizer.clone(),
            max_tokens.map_or(limit, |m| m.min(limit)),
        )
    }

    /// The PEFT config that describes a prompt for this model.
    pub fn peft_config(
        &self,
        task_type: TaskType,
        num_virtual_tokens: usize,
        init: &str,
        init_text: Option<String>,
    ) -> PeftConfig {
        let shape = self.backbone.shape();
        let name = Some(self.path.display().to_string());
        let modules_to_save =
            (task_type == TaskType::SeqCls).then(|| vec!["classifier".into(), "score".into()]);
        PeftConfig {
            peft_type: PeftType::PromptTuning,
            task_type: Some(task_type),
            num_virtual_tokens,
            token_dim: Some(self.backbone.hidden_size()),
            num_transformer_submodules: 1,
            num_attention_heads: Some(shape.heads),
            num_layers: Some(shape.layers),
            prompt_tuning_init: Some(init.into()),
            prompt_tuning_init_text: init_text,
            encoder_reparameterization_type: None,
            encoder_hidden_size: None,
            encoder_num_layers: None,
            encoder_dropout: None,
            prefix_projection: None,
            num_tasks: None,
            num_ranks: None,
            tokenizer_name_or_path: name.clone(),
            base_model_name_or_path: name,
            inference_mode: true,
            modules_to_save,
            revision: None,
            auto_mapping: None,
            tokenizer_kwargs: None,
        }
    }

    /// A linear head on this model: BERT's frozen pooler comes with `Pool::Pooler`.
    pub fn linear_head(
        &self,
        weight: &Tensor,
        bias: &Tensor,
        pool: Pool,
    ) -> crate::Result<ClassificationHead> {
        ClassificationHead::from_tensors(weight, bias, pool, self.pooler_for(pool))
    }

    /// The backbone's pooler where `pool` reads through it (and the model has one).
    pub fn pooler_for(&self, pool: Pool) -> Option<Linear> {
        (pool == Pool::Pooler)
            .then(|| self.backbone.pooler())
            .flatten()
    }

    /// The verbalizer head of `labels` spelled as `words` after `template`, from the LM head. An
    /// encoder-decoder writes the word first thing in its decoder, after no template.
    pub fn verbalizer_head(
        &self,
        template: &str,
        labels: &[String],
        words: &[String],
    ) -> crate::Result<ClassificationHead> {
        let lm_head = self.lm_head("a verbalizer")?;
        let before = match self.decoder_start() {
            Some(_) => "",
            None => template,
        };
        let tokens = verbalizer::label_tokens(&self.encoder(0, None)?, before, labels, words)?;
        verbalizer::head(lm_head, &tokens)
    }

    /// [V, D]: the decoder's output layer, which `what` needs; an encoder has none.
    pub fn lm_head(&self, what: &str) -> crate::Result<&Weight> {
        self.backbone.lm_head().with_context(|| {
            format!(
                "{what} needs a language model's output layer, and {} is a {} encoder (use a GPT-2 or Llama-family model)",
                self.path.display(),
                self.backbone.architecture()
            )
        })
    }

    /// An encoder-decoder's decoder start token (T5's pad, 0); None for the other models.
    pub fn decoder_start(&self) -> Option<u32> {
        self.backbone.decoder_start()
    }

    /// Refuses a task this model cannot do: an encoder-decoder writes its answers with its
    /// decoder (`--task seq2seq`, or a label word as its first token), the others never do. A
    /// decoder's verbalizer needs the `template` its label word continues.
    pub fn check_task(&self, task: TaskKind, template: Option<&Template>) -> crate::Result<()> {
        let (at, arch) = (self.path.display(), self.backbone.architecture());
        match (self.backbone.seq2seq().is_some(), task) {
            (false, TaskKind::Verbalizer) if template.is_none() => bail!(
                "--task verbalizer needs --template, e.g. \"Review: {{text}}\\nSentiment:\" (the label word comes next)"
            ),
            (true, TaskKind::Seq2Seq | TaskKind::Verbalizer) | (false, TaskKind::Classify | TaskKind::Verbalizer | TaskKind::CausalLm) => Ok(()),
            (true, other) => bail!(
                "{at} is an encoder-decoder (T5), which writes its answers with its decoder: use --task seq2seq or verbalizer, not {other}"
            ),
            (false, _) => bail!(
                "--task seq2seq needs an encoder-decoder (T5), and {at} is a {arch} model (a decoder learns to write targets with --task causal-lm)"
            ),
        }
    }

    /// The head an adapter describes, on this model.
    pub fn head(
        &self,
        head: &AdapterHead,
        labels: &[String],
        template: Option<&Template>,
    ) -> crate::Result<ClassificationHead> {
        match head {
            AdapterHead::Linear { weight, bias, pool } => {
                let device = &self.backbone.word_embeddings().device();
                self.linear_head(&weight.to_device(device)?, &bias.to_device(device)?, *pool)
            }
            AdapterHead::Verbalizer { words } => {
                let template = template.map_or("", |t| t.as_str());
                self.verbalizer_head(template, labels, words)
            }
            AdapterHead::Generation => bail!(
                "this is a generation adapter (causal LM, no labels): it writes text with `softprompt generate` and cannot classify"
            ),
        }
    }
}

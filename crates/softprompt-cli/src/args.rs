//! Argument groups that several subcommands share, and the parsing of free-text flags.

use clap::Args;
use softprompt::batch::{Batching, Padding};
use softprompt::data::Columns;
use softprompt::model::{Model, WeightDtype};
use softprompt::template::Template;
use softprompt::train::TrainConfig;
use std::path::PathBuf;

/// "\n" and "\t" typed on a command line, as the characters: every free-text flag (templates,
/// label words, init text, stop strings) reads its value through this.
pub fn unescaped(text: &str) -> Result<String, String> {
    Ok(text.replace("\\n", "\n").replace("\\t", "\t"))
}

/// A count that must be at least 1 (`--batch-size`).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A `--template` value: unescaped, then checked for its `{text}`.
pub fn template(text: &str) -> Result<Template, String> {
    Template::parse(&unescaped(text)?).map_err(|e| e.to_string())
}

/// The model to load, and how.
#[derive(Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json) of BERT,
    /// GPT-2 or the Llama family, or a Llama-family .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Keep a GGUF model's quantized matrices quantized in memory, dequantizing each as it is used:
    /// less memory, the same results; slower training steps, faster generation.
    #[arg(long)]
    pub keep_quantized: bool,
    /// How the frozen matrices are held: f32, or bf16 (half the memory; on a CPU with
    /// AVX512-BF16 its bf16 dot products do the multiplying, with f32 sums; elsewhere each matrix
    /// is widened to f32 as it is used, which is slower).
    #[arg(long, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Model> {
        let device = candle_core::Device::Cpu;
        let dtype = candle_core::DType::F32;
        let model = Model::load_with(&self.model, dtype, &device, self.keep_quantized)?;
        Ok(model.hold_weights(self.dtype)?)
    }
}

#[derive(Args)]
pub struct ColumnArgs {
    /// Column (or JSON field) holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Column holding a second text, for sentence-pair tasks.
    #[arg(long)]
    pub text_pair_column: Option<String>,
    /// Column holding the label (with --task causal-lm, the target text).
    #[arg(long, default_value = "label")]
    pub label_column: String,
}

impl ColumnArgs {
    pub fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            text_pair: self.text_pair_column.clone(),
            label: self.label_column.clone(),
            task: None,
        }
    }
}

/// How many rows go through the model at once, and which end of a row its padding goes on.
#[derive(Args)]
pub struct BatchArgs {
    #[arg(long, default_value_t = TrainConfig::default().batch_size, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Which end of a row its padding goes on: right or left (the results are the same).
    #[arg(long, default_value_t = Padding::Right)]
    pub padding_side: Padding,
}

impl BatchArgs {
    pub fn batching(&self) -> Batching {
        Batching {
            size: self.batch_size,
            padding: self.padding_side,
            device: candle_core::Device::Cpu,
        }
    }
}

/// What inference reads: the model and the adapters (or none, for a zero-shot baseline).
#[derive(Args)]
pub struct InferenceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter directory (softprompt's or PEFT's); give several for a prompt ensemble (majority vote,
    /// mean probability), all members in one batch.
    #[arg(long = "adapter", required_unless_present = "zero_shot")]
    pub adapters: Vec<PathBuf>,
    /// No adapter: the decoder alone scores each label's word after --template (the baseline a
    /// verbalizer prompt should beat; T5 scores it as its decoder's first word and needs no
    /// template). Labels come from the data.
    #[arg(long, conflicts_with = "adapters")]
    pub zero_shot: bool,
    /// With --zero-shot: what each input is written into, {text} marking where (\n is a newline);
    /// a decoder needs one.
    #[arg(long, requires = "zero_shot", value_parser = template)]
    pub template: Option<Template>,
    /// With --zero-shot: one word per label, comma-separated [default: the labels themselves].
    #[arg(long, value_delimiter = ',', requires = "zero_shot", value_parser = unescaped)]
    pub label_words: Option<Vec<String>>,
    /// A multitask adapter's task: the prompt every input is read with (each --adapter must serve it).
    #[arg(long)]
    pub task: Option<String>,
    #[command(flatten)]
    pub batch: BatchArgs,
}

/// `--profile`: where the time goes, by span (phase, layer, kernel), each matmul's GFLOP/s.
#[derive(Args)]
pub struct ProfileArgs {
    /// Print where the time went: each phase, layer and kernel's seconds, and each matmul's
    /// GFLOP/s.
    #[arg(long)]
    pub profile: bool,
    /// The machine's FMA peak in GFLOP/s (scripts/fma_peak.sh measures it), so that rates are also
    /// given as a share of it.
    #[arg(long)]
    pub fma_peak: Option<f64>,
}

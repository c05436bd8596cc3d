//! `softprompt eval`: an adapter (or an ensemble, or the zero-shot baseline) on labelled data.
//! Classifiers report accuracy, macro-F1, per-class figures and the confusion matrix; a
//! generation adapter reports exact match, token accuracy and token loss.

use crate::adapters::Inference;
use crate::args::{ColumnArgs, InferenceArgs};
use crate::output::emit;
use candle_core::Device;
use clap::Args;
use softprompt::adapter::{Adapter, AdapterHead};
use softprompt::backbone::Backbone;
use softprompt::data::{label_ids, label_set, read_examples, Example, Labels};
use softprompt::metrics::Report;
use softprompt::model::Model;
use softprompt::prompt::SoftPrompt;
use softprompt::prompted::CausalLm;
use softprompt::task::causal_lm::encode_pairs;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    inference: InferenceArgs,
    /// Labelled data: .tsv, .csv or .jsonl.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    columns: ColumnArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let examples = read_examples(&args.data, &args.columns.columns(), Labels::Required)?;
    let model = args.inference.model.load()?;
    if let [adapter] = args.inference.adapters.as_slice() {
        let adapter = Adapter::load(adapter, model.backbone.hidden_size(), &Device::Cpu)?;
        if matches!(adapter.head, AdapterHead::Generation) {
            return eval_generation(model, adapter, examples, &args);
        }
    }
    let inference = Inference::load(model, &args.inference, Some(label_set(&examples)))?;
    let gold = label_ids(&examples, inference.labels(), &args.data)?;
    let data = inference.encode(&examples, &args.data)?;
    let answers = inference.answers(&data, &args.inference.batch)?;
    let labels = inference.labels();
    let predicted: Vec<u32> = answers
        .iter()
        .map(|a| labels.iter().position(|l| *l == a.label).unwrap_or(0) as u32)
        .collect();
    let report = Report::new(labels, &gold, &predicted);
    emit(args.json, &report, &report)
}

/// A generation adapter's exact match and token loss on (input, target) pairs.
fn eval_generation(
    model: Model,
    adapter: Adapter,
    examples: Vec<Example>,
    args: &EvalArgs,
) -> anyhow::Result<()> {
    let encoder = model.encoder(adapter.prompt.dim(0)?, None)?;
    let eos = model.eos_token_ids.first().copied();
    let data = encode_pairs(
        &encoder,
        &examples,
        adapter.template.as_ref(),
        &args.data,
        eos,
    )?;
    let head = CausalLm {
        lm_head: model.lm_head("a generation adapter")?.dense()?,
    };
    let prompt = SoftPrompt::from_tensor(&adapter.prompt)?;
    let batching = args.inference.batch.batching();
    let score = head.target_score(&model.backbone, &prompt, &data, &batching)?;
    emit(args.json, &score, score)
}

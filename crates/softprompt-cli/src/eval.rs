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
use softprompt::data::{label_set, read_examples, Labels};
use softprompt::prompted::generation_score;
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
    let batching = args.inference.batch.batching();
    if let [adapter] = args.inference.adapters.as_slice() {
        let adapter = Adapter::load(adapter, model.backbone.hidden_size(), &Device::Cpu)?;
        if matches!(adapter.head, AdapterHead::Generation) {
            let adapter = adapter.for_task(args.inference.task.as_deref())?;
            let score = generation_score(&model, &adapter, &examples, &args.data, &batching)?;
            return emit(args.json, &score, score);
        }
    }
    let inference = Inference::load(model, &args.inference, Some(label_set(&examples)))?;
    let report = inference
        .members
        .report(&inference.backbone, &examples, &args.data, &batching)?;
    emit(args.json, &report, &report)
}

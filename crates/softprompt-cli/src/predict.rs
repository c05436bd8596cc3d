//! `softprompt predict`: label texts from the command line or a file with an adapter (or an
//! ensemble of adapters, in one batch).

use crate::adapters::Inference;
use crate::args::{ColumnArgs, InferenceArgs};
use crate::output::{emit, one_line};
use anyhow::bail;
use clap::Args;
use serde::Serialize;
use softprompt::data::{read_examples, Example, Labels};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    inference: InferenceArgs,
    /// Texts to label.
    texts: Vec<String>,
    /// A file of texts (.tsv, .csv or .jsonl) to label, in addition to TEXT arguments.
    #[arg(long)]
    input: Option<PathBuf>,
    #[command(flatten)]
    columns: ColumnArgs,
    /// Print JSON lines: text, label, scores (probability per label), logits.
    #[arg(long)]
    json: bool,
}

/// One `--json` line.
#[derive(Serialize)]
struct Prediction<'a> {
    text: &'a str,
    label: &'a str,
    scores: BTreeMap<&'a str, f32>,
    /// an ensemble's members' labels
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<&'a [String]>,
    /// a single adapter's logits
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<&'a [f32]>,
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let mut examples: Vec<Example> = args
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| Example {
            text: t.clone(),
            text_pair: None,
            label: None,
            task: None,
            line: i + 1,
        })
        .collect();
    if let Some(input) = &args.input {
        examples.extend(read_examples(
            input,
            &args.columns.columns(),
            Labels::Optional,
        )?);
    }
    if examples.is_empty() {
        bail!("nothing to label: give TEXT arguments or --input FILE");
    }
    if let Some(e) = examples.iter().find(|e| e.text.trim().is_empty()) {
        bail!("text {} is empty", e.line);
    }
    let inference = Inference::load(args.inference.model.load()?, &args.inference, None)?;
    let members = &inference.members;
    let data = members.encode(&examples, Path::new("input"))?;
    let ensemble = members.adapters.len() > 1;
    let batching = args.inference.batch.batching();
    let answers = members.answers(&inference.backbone, &data, &batching)?;
    for (example, answer) in examples.iter().zip(&answers) {
        let prediction = Prediction {
            text: &example.text,
            label: &answer.label,
            scores: members
                .labels()
                .iter()
                .map(String::as_str)
                .zip(answer.scores.iter().copied())
                .collect(),
            members: ensemble.then_some(answer.members.as_slice()),
            logits: (!ensemble).then_some(answer.logits[0].as_slice()),
        };
        emit(
            args.json,
            &prediction,
            format_args!("{}\t{}\n", answer.label, one_line(&example.text)),
        )?;
    }
    Ok(())
}

//! `softprompt inspect`: the vocabulary tokens nearest to each prompt vector (the paper's
//! section 7 reading of what a prompt learned).

use crate::args::ModelArgs;
use crate::output::emit;
use candle_core::Device;
use clap::Args;
use serde::Serialize;
use softprompt::adapter::Adapter;
use softprompt::backbone::Backbone;
use softprompt::prompt::{nearest_tokens, Placement};
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The adapter directory whose prompt to read.
    #[arg(long)]
    adapter: PathBuf,
    /// A multitask adapter's task, whose prompt to read [default: the prompt the tasks share].
    #[arg(long)]
    task: Option<String>,
    /// Tokens to show per prompt vector.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON lines: position, tokens, cosines.
    #[arg(long)]
    json: bool,
}

/// One prompt vector's nearest tokens.
#[derive(Serialize)]
struct Nearest {
    position: usize,
    tokens: Vec<String>,
    cosines: Vec<f32>,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    // Only the prompt is read: a generation adapter, which has no head, is inspected too.
    let model = args.model.load()?;
    let d = model.backbone.hidden_size();
    let adapter = Adapter::load(&args.adapter, d, &Device::Cpu)?;
    adapter.fits(&model.backbone)?;
    let shared = match (&adapter.tasks, &args.task) {
        (Some(tasks), None) => format!(
            " (the prompt its tasks {} share; --task reads one task's)",
            tasks.names.join(", ")
        ),
        _ => String::new(),
    };
    let adapter = match &args.task {
        Some(task) => adapter.for_task(Some(task))?.into_owned(),
        None => adapter,
    };
    if adapter.placement() == Placement::Prefix {
        let shape = model.backbone.shape();
        eprintln!(
            "{}: a prefix of {} positions of keys and values at each of {} layers (--method prefix): they are not word vectors, so they have no nearest tokens",
            args.adapter.display(),
            adapter.prompt.dim(0)?,
            shape.layers
        );
        return Ok(());
    }
    // stderr, so that stdout stays one line per vector
    eprintln!(
        "{}: {} prompt vectors, trained with --method {}{shared}",
        args.adapter.display(),
        adapter.prompt.dim(0)?,
        adapter.method
    );
    let encoder = model.encoder(0, None)?;
    let table = model.backbone.word_embeddings().dense()?;
    for (position, tokens) in nearest_tokens(&adapter.prompt, &table, args.top)?
        .into_iter()
        .enumerate()
    {
        let nearest = Nearest {
            position,
            tokens: tokens
                .iter()
                .map(|(id, _)| encoder.token(*id).unwrap_or_else(|| format!("#{id}")))
                .collect(),
            cosines: tokens.iter().map(|(_, c)| *c).collect(),
        };
        let shown: Vec<String> = nearest
            .tokens
            .iter()
            .zip(&nearest.cosines)
            .map(|(n, c)| format!("{n} ({c:.2})"))
            .collect();
        let text = format!("{position:>3}  {}\n", shown.join("  "));
        emit(args.json, &nearest, text)?;
    }
    Ok(())
}

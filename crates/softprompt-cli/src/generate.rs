//! `softprompt generate`: continue texts with a decoder, optionally behind an adapter's prompt,
//! streaming one text's tokens to the terminal as they come; several texts are written together
//! (a token for all of them a step) and printed in order.

use crate::args::{template, unescaped, ModelArgs};
use crate::output::emit;
use candle_core::{DType, Device};
use clap::Args;
use serde::Serialize;
use softprompt::adapter::Adapter;
use softprompt::backbone::Backbone;
use softprompt::generate::{Continuation, FinishReason, Generation, SamplingConfig};
use softprompt::prompt::Placement;
use softprompt::template::Template;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An adapter whose prompt goes in front (any prompt-tuning adapter for this model).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A multitask adapter's task: the prompt to write with.
    #[arg(long, requires = "adapter")]
    task: Option<String>,
    /// Texts to continue, one generation each (several are decoded together).
    #[arg(required = true)]
    texts: Vec<String>,
    /// What each text is written into, {text} marking where [default: the adapter's template].
    #[arg(long, value_parser = template)]
    template: Option<Template>,
    #[arg(long, default_value_t = SamplingConfig::default().max_new_tokens)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    /// Stop before this text (repeatable); \n is a newline.
    #[arg(long, value_parser = unescaped)]
    stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON line per text (text, tokens, finish) instead of streaming.
    #[arg(long)]
    json: bool,
}

/// One `--json` line.
#[derive(Serialize)]
struct Written<'a> {
    input: &'a str,
    text: &'a str,
    tokens: &'a [u32],
    finish: FinishReason,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let config = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        stop: args.stop.clone(),
        seed: args.seed,
    };
    config.validate()?;
    let model = args.model.load()?;
    let d = model.backbone.hidden_size();
    let adapter = args
        .adapter
        .as_deref()
        .map(|a| -> anyhow::Result<Adapter> {
            let adapter = Adapter::load(a, d, &Device::Cpu)?;
            Ok(adapter.for_task(args.task.as_deref())?.into_owned())
        })
        .transpose()?;
    let template = args
        .template
        .clone()
        .or_else(|| adapter.as_ref().and_then(|a| a.template.clone()));
    let (prompt, placement) = match &adapter {
        Some(a) => {
            a.fits(&model.backbone)?;
            (a.prompt.clone(), a.placement())
        }
        None => (
            candle_core::Tensor::zeros((0, d), DType::F32, &Device::Cpu)?,
            Placement::Embeddings,
        ),
    };
    let continuation = Continuation::new(&model, &prompt, placement, template)?;
    // a text's --json line, or `shown` of it
    let print = |text: &str, generated: &Generation, shown: &str| {
        let written = Written {
            input: text,
            text: &generated.text,
            tokens: &generated.tokens,
            finish: generated.finish,
        };
        emit(args.json, &written, shown)
    };
    if let [text] = args.texts.as_slice() {
        let mut stdout = std::io::stdout().lock();
        let mut stream = |piece: &str| {
            if !args.json {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
            true
        };
        let generated = continuation.write(&model, text, &config, &mut stream)?;
        // the text itself was streamed as it came
        return print(text, &generated, "\n");
    }
    for (text, generated) in
        args.texts
            .iter()
            .zip(continuation.write_all(&model, &args.texts, &config)?)
    {
        print(text, &generated, &format!("{}\n", generated.text))?;
    }
    Ok(())
}

//! `softprompt generate`: continue texts with a decoder, optionally behind an adapter's prompt,
//! streaming the tokens to the terminal as they come.

use crate::commands::unescape;
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use softprompt::adapter::Adapter;
use softprompt::backbone::Backbone;
use softprompt::generate::{generate, prefix_cache, SamplingConfig};
use softprompt::model::Model;
use softprompt::task::verbalizer::check_template;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// A GPT-2 or Llama-family model directory, or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Keep a GGUF model's quantized matrices quantized in memory: less memory, slower to train, faster to generate.
    #[arg(long)]
    keep_quantized: bool,
    /// An adapter whose prompt goes in front (any prompt-tuning adapter for this model).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Texts to continue, one generation each.
    #[arg(required = true)]
    texts: Vec<String>,
    /// What each text is written into, {text} marking where [default: the adapter's template].
    #[arg(long)]
    template: Option<String>,
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
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON line per text (text, tokens, finish) instead of streaming.
    #[arg(long)]
    json: bool,
}

pub fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let config = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        stop: args.stop.iter().map(|s| unescape(s)).collect(),
        seed: args.seed,
    };
    config.validate()?;
    let model = Model::load_with(&args.model, DType::F32, &Device::Cpu, args.keep_quantized)?;
    let d = model.backbone.hidden_size();
    let adapter = args
        .adapter
        .as_deref()
        .map(|a| Adapter::load(a, d, &Device::Cpu))
        .transpose()?;
    let template = match (&args.template, &adapter) {
        (Some(t), _) => Some(unescape(t)),
        (None, Some(a)) => a.template.clone(),
        (None, None) => None,
    };
    if let Some(t) = &template {
        check_template(t)?;
    }
    let prompt = match &adapter {
        Some(a) => a.prompt.clone(),
        None => candle_core::Tensor::zeros((0, d), DType::F32, &Device::Cpu)?,
    };
    // the adapter's prompt is read once, for every text
    let prefix = prefix_cache(&model.backbone, &prompt)?;
    let encoder = model.encoder(prefix.len(), None)?;
    let mut stdout = std::io::stdout().lock();
    for text in &args.texts {
        if text.trim().is_empty() {
            bail!("a text to continue is empty");
        }
        let ids = encoder
            .encode_fitted(template.as_deref(), text, None, encoder.max_tokens())
            .with_context(|| format!("cannot tokenize {text:?}"))?
            .0
            .ids;
        let mut stream = |piece: &str| {
            if !args.json {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
            true
        };
        let generated = generate(
            &model.backbone,
            &encoder,
            &prefix,
            &ids,
            &model.eos_token_ids,
            &config,
            &mut stream,
        )?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"input": text, "text": generated.text,
                    "tokens": generated.tokens, "finish": generated.finish})
            );
        } else {
            println!();
        }
    }
    Ok(())
}

//! `softprompt bench`: a train step, a forward pass or greedy generation, timed on random weights
//! of a known shape (no assets needed).

use crate::args::ProfileArgs;
use crate::output::emit;
use anyhow::bail;
use candle_core::quantized::GgmlDType;
use clap::Args;
use softprompt::bench::{self, BenchConfig, Mode};
use softprompt::model::WeightDtype;
use softprompt::profile::Profiler;

#[derive(Args)]
pub struct BenchArgs {
    /// train or forward, or generate (GPT-2 small).
    mode: BenchMode,
    /// bert-base, minilm-l6, gpt2-small, t5-small or t5-base (train, forward); generate runs on
    /// gpt2-small.
    #[arg(long)]
    arch: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Real tokens per row (the prompt comes on top); for generate, the input tokens [default 16].
    #[arg(long)]
    seq: Option<usize>,
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    /// generate: tokens to write.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// generate: round the matrices to these GGUF blocks (q8_0, q4_1, q4_0), as --keep-quantized
    /// holds a GGUF model; f32 by default.
    #[arg(long)]
    weights: Option<BenchWeights>,
    /// train, forward: how the random matrices are held (f32, or bf16 as `--dtype bf16` holds a
    /// model's).
    #[arg(long, default_value_t = WeightDtype::F32)]
    dtype: WeightDtype,
    /// Timed steps (after warm-up); the median, min and max are reported.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub profile: ProfileArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchWeights {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchMode {
    Train,
    Forward,
    Generate,
}

pub fn run(args: BenchArgs, profiler: Option<Profiler>) -> anyhow::Result<()> {
    let mode = match args.mode {
        BenchMode::Train => Mode::Train,
        BenchMode::Forward => Mode::Forward,
        BenchMode::Generate => return run_generate(&args),
    };
    let config = BenchConfig {
        mode,
        arch: args
            .arch
            .as_deref()
            .unwrap_or("bert-base")
            .parse()
            .map_err(|e| anyhow::anyhow!("--arch: {e}"))?,
        batch: args.batch,
        seq: args.seq.unwrap_or(128),
        num_virtual_tokens: args.num_virtual_tokens,
        weights: args.dtype,
        steps: args.steps,
        warmup: 3,
        profiler,
        fma_peak_gflop_per_s: args.profile.fma_peak,
    };
    let r = bench::run(&config)?;
    let peak = r.share_of_peak.map_or(String::new(), |s| {
        format!(" ({:.0} % of the FMA peak)", 100.0 * s)
    });
    let mut text = format!(
        "{} {} {} batch {} x ({} + {}): median {:.3} s (min {:.3}, max {:.3}) over {} steps, {:.1} GFLOP/s done{peak} ({:.1} GFLOP/s of the reference's model FLOPs), peak RSS {:.0} MiB\n",
        r.arch, r.mode, r.weights, r.batch, r.seq, r.num_virtual_tokens, r.median_s, r.min_s, r.max_s, r.steps, r.gflop_per_s, r.model_gflop_per_s, r.peak_rss_mib
    );
    if let Some(profile) = &r.profile {
        text.push_str(&profile.table(0.002));
    }
    emit(args.json, &r, text)
}

fn run_generate(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(arch) = args.arch.as_deref().filter(|a| *a != "gpt2-small") {
        bail!("bench generate runs on gpt2-small, not {arch}");
    }
    let weights = args.weights.map(|w| match w {
        BenchWeights::Q8_0 => GgmlDType::Q8_0,
        BenchWeights::Q4_1 => GgmlDType::Q4_1,
        BenchWeights::Q4_0 => GgmlDType::Q4_0,
    });
    let r = bench::generation::run(
        args.seq.unwrap_or(16),
        args.num_virtual_tokens,
        args.new_tokens,
        args.steps,
        weights,
    )?;
    let text = format!(
        "{} ({}) generate, batch 1, {} + {} prompt tokens, {} new: median {:.3} s (min {:.3}, max {:.3}) over {} runs, {:.1} tokens/s; same tokens as without a cache: {}; peak RSS {:.0} MiB\n",
        r.arch, r.weights, r.num_virtual_tokens, r.input_tokens, r.new_tokens, r.median_s, r.min_s, r.max_s, r.steps, r.tokens_per_s, r.matches_no_cache, r.peak_rss_mib
    );
    emit(args.json, &r, text)
}

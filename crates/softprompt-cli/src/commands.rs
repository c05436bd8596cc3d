use anyhow::{bail, Context};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use softprompt::adapter::{Adapter, AdapterHead};
use softprompt::backbone::any::AnyBackbone;
use softprompt::backbone::Backbone;
use softprompt::batch::Padding;
use softprompt::bench::{self, BenchConfig, Mode};
use softprompt::data::{label_ids, label_set, read_examples, Columns, Example, Labels};
use softprompt::metrics::Report;
use softprompt::model::Model;
use softprompt::multitask::{check_members, ensemble_all, EnsembleAnswer, Task};
use softprompt::optim::{OptimizerKind, Schedule};
use softprompt::prompt::{nearest_tokens, PromptInit, SoftPrompt};
use softprompt::task::causal_lm::{encode_pairs, PromptLm};
use softprompt::task::classify::Pool;
use softprompt::task::verbalizer::check_template;
use softprompt::task::TaskKind;
use softprompt::tokenize::Encoded;
use softprompt::tokenize::{encode_all, TextEncoder};
use softprompt::train::{train, Event, TrainConfig, TrainPaths};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "softprompt",
    version,
    about = "Prompt tuning of frozen transformers (Lester et al. 2021)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a soft prompt and a classification head on a frozen model.
    Train(TrainArgs),
    /// Score an adapter on labelled data: accuracy, macro-F1, per-class precision / recall, confusion.
    Eval(EvalArgs),
    /// Label texts with an adapter.
    Predict(PredictArgs),
    /// Time a train step or a forward pass on random weights of a known shape (no assets needed).
    Bench(BenchArgs),
    /// Show the vocabulary tokens nearest to each prompt vector (cosine similarity).
    Inspect(InspectArgs),
    /// Serve every adapter of the given directories from one model over HTTP, batching across tasks.
    Serve(crate::serve::ServeArgs),
    /// Continue texts with a decoder (GPT-2, Llama family), optionally behind an adapter's prompt.
    Generate(crate::generate::GenerateArgs),
    /// Drive a running server with classify requests for many adapters; report throughput and latency.
    Loadgen(crate::serve::LoadgenArgs),
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    inference: InferenceArgs,
    /// Tokens to show per prompt vector.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON lines: position, tokens, cosines.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// train or forward, or generate (GPT-2 small).
    mode: BenchMode,
    /// bert-base, minilm-l6 or gpt2-small (train, forward); generate runs on gpt2-small.
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
    /// Timed steps (after warm-up); the median, min and max are reported.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
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

#[derive(Args)]
struct ColumnArgs {
    /// Column (or JSON field) holding the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Column holding a second text, for sentence-pair tasks.
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Column holding the label (with --task causal-lm, the target text).
    #[arg(long, default_value = "label")]
    label_column: String,
}

impl ColumnArgs {
    fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            text_pair: self.text_pair_column.clone(),
            label: self.label_column.clone(),
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json) of BERT,
    /// GPT-2 or the Llama family, or a Llama-family .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// classify (a linear head on a pooled vector), verbalizer (a decoder's frozen LM head
    /// scores each label's word after --template; only the prompt trains), or causal-lm (a
    /// decoder learns to write the label column's text after the input, scored on those tokens only).
    #[arg(long, default_value_t = TrainConfig::default().task)]
    task: TaskKind,
    /// What each input is written into, {text} marking where, e.g. "Review: {text}\nSentiment:"
    /// (\n is a newline).
    #[arg(long)]
    template: Option<String>,
    /// Verbalizer: one word per label, comma-separated, in the labels' sorted order
    /// [default: the labels themselves].
    #[arg(long, value_delimiter = ',')]
    label_words: Option<Vec<String>>,
    /// Training data: .tsv, .csv or .jsonl.
    #[arg(long)]
    train: PathBuf,
    /// Development data, for evaluation, early stopping and keeping the best adapter.
    #[arg(long)]
    dev: Option<PathBuf>,
    /// Adapter directory to write (also holds metrics.jsonl and the training checkpoint).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    columns: ColumnArgs,
    /// Soft prompt length M.
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    /// Prompt initialisation: uniform, normal, vocab, text, labels.
    #[arg(long, default_value_t = TrainConfig::default().init)]
    init: PromptInit,
    /// Text whose token embeddings start the prompt (with --init text).
    #[arg(long)]
    init_text: Option<String>,
    /// What the head reads: first, pooler, cls, mean.
    #[arg(long, default_value_t = TrainConfig::default().pool)]
    pool: Pool,
    /// adamw or adafactor.
    #[arg(long, default_value_t = TrainConfig::default().optimizer)]
    optimizer: OptimizerKind,
    /// Learning rate [default: 1e-2 for adamw, 0.3 for adafactor].
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// constant, or linear (warm-up, then linear decay to 0).
    #[arg(long, default_value_t = TrainConfig::default().schedule)]
    schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    /// Train at least this many steps, even past --epochs (small data sets).
    #[arg(long, default_value_t = TrainConfig::default().min_steps)]
    min_steps: usize,
    /// Stop after this many steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Which end of a row its padding goes on: right or left (the results are the same).
    #[arg(long, default_value_t = Padding::Right)]
    padding_side: Padding,
    /// Clip the gradients' joint norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Evaluate on dev (and checkpoint) every N steps [default: four times an epoch].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after N evaluations without a better dev accuracy (ties go to the lower dev loss;
    /// 0: never stop early).
    #[arg(long, default_value_t = 4)]
    patience: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Cut each example to at most this many tokens (never more than the model's limit minus the prompt).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Continue the interrupted run in --output from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Keep a GGUF model's quantized matrices quantized in memory, dequantizing each as it is used:
    /// less memory, the same results, somewhat slower steps.
    #[arg(long)]
    keep_quantized: bool,
}

/// What inference reads: the model, the adapter, and how many texts go through at once.
#[derive(Args)]
struct InferenceArgs {
    /// The model directory or .gguf file the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// Adapter directory (softprompt's or PEFT's); give several for a prompt ensemble (majority vote,
    /// mean probability), all members in one batch.
    #[arg(long = "adapter", required_unless_present = "zero_shot")]
    adapters: Vec<PathBuf>,
    /// No adapter: the decoder alone scores each label's word after --template (the baseline a
    /// verbalizer prompt should beat). Labels come from the data.
    #[arg(long, conflicts_with = "adapters", requires = "template")]
    zero_shot: bool,
    /// With --zero-shot: what each input is written into, {text} marking where.
    #[arg(long, requires = "zero_shot")]
    template: Option<String>,
    /// With --zero-shot: one word per label, comma-separated [default: the labels themselves].
    #[arg(long, value_delimiter = ',', requires = "zero_shot")]
    label_words: Option<Vec<String>>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Which end of a row its padding goes on: right or left (the results are the same).
    #[arg(long, default_value_t = Padding::Right)]
    padding_side: Padding,
    /// Keep a GGUF model's quantized matrices quantized in memory: less memory, slower to train, faster to generate.
    #[arg(long)]
    keep_quantized: bool,
}

impl InferenceArgs {
    fn load_model(&self) -> anyhow::Result<Model> {
        Model::load_with(&self.model, DType::F32, &Device::Cpu, self.keep_quantized)
    }
}

#[derive(Args)]
struct EvalArgs {
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

#[derive(Args)]
struct PredictArgs {
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

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => run_train(args),
        Command::Eval(args) => run_eval(args),
        Command::Predict(args) => run_predict(args),
        Command::Bench(args) => run_bench(args),
        Command::Inspect(args) => run_inspect(args),
        Command::Serve(args) => crate::serve::run_serve(args),
        Command::Loadgen(args) => crate::serve::run_loadgen(args),
        Command::Generate(args) => crate::generate::run_generate(args),
    }
}

fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let config = TrainConfig {
        task: args.task,
        template: args.template.as_deref().map(unescape),
        label_words: args.label_words,
        num_virtual_tokens: args.num_virtual_tokens,
        init: args.init,
        init_text: args.init_text,
        pool: args.pool,
        optimizer: args.optimizer,
        lr: args.lr,
        weight_decay: args.weight_decay,
        schedule: args.schedule,
        warmup_steps: args.warmup_steps,
        epochs: args.epochs,
        min_steps: args.min_steps,
        max_steps: args.max_steps,
        batch_size: args.batch_size,
        padding: args.padding_side,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        eval_every: args.eval_every,
        patience: (args.patience > 0).then_some(args.patience),
        seed: args.seed,
        max_tokens: args.max_tokens,
    };
    let paths = TrainPaths {
        model: args.model,
        keep_quantized: args.keep_quantized,
        train: args.train,
        dev: args.dev,
        output: args.output,
        columns: args.columns.columns(),
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    let say = |bar: &ProgressBar, line: String| {
        if bar.is_hidden() {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
    };
    let mut last_dev = String::new();
    let summary = train(
        &paths,
        &config,
        args.resume,
        &Device::Cpu,
        &mut |event| match event {
            Event::Start {
                total_steps,
                steps_per_epoch,
                resumed_at,
                train_examples,
            } => {
                bar.set_length(total_steps as u64);
                bar.set_position(resumed_at as u64);
                bar.reset_eta();
                say(&bar, format!("training on {train_examples} examples: {steps_per_epoch} steps an epoch, {total_steps} steps in all"));
                if resumed_at > 0 {
                    say(&bar, format!("resumed at step {resumed_at}"));
                }
            }
            Event::Step {
                step,
                loss,
                examples_per_s,
                ..
            } => {
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "loss {loss:.4}{last_dev}  {examples_per_s:.0} ex/s"
                ));
            }
            Event::Eval {
                step,
                score,
                improved,
            } => {
                last_dev = format!("  dev acc {:.4}", score.accuracy);
                let mark = if improved { "  (best, saved)" } else { "" };
                let measures = match score.macro_f1 {
                    Some(f1) => format!("accuracy {:.4}, macro-F1 {f1:.4}", score.accuracy),
                    None => format!("exact match {:.4}", score.accuracy),
                };
                say(
                    &bar,
                    format!("step {step}: dev {measures}, loss {:.4}{mark}", score.loss),
                );
            }
            Event::EarlyStop { step } => say(
                &bar,
                format!("stopping early at step {step}: dev accuracy stopped improving"),
            ),
        },
    )?;
    bar.finish_and_clear();
    match summary.best_dev_accuracy {
        Some(acc) => println!(
            "best dev accuracy {acc:.4}; adapter in {}",
            summary.adapter.display()
        ),
        None => println!(
            "trained {} steps; adapter in {}",
            summary.steps,
            summary.adapter.display()
        ),
    }
    Ok(())
}

/// What inference runs on: the backbone, one task per adapter, and a tokenizer that leaves room for
/// the longest prompt.
struct Inference {
    backbone: AnyBackbone,
    tasks: Vec<Task>,
    encoder: TextEncoder,
}

impl Inference {
    /// `data_labels`: the labels of a zero-shot run (eval reads them from the data).
    fn load(
        model: Model,
        args: &InferenceArgs,
        data_labels: Option<Vec<String>>,
    ) -> anyhow::Result<Self> {
        let d = model.backbone.hidden_size();
        let tasks = if args.zero_shot {
            let labels =
                data_labels.context("--zero-shot needs labelled data (softprompt eval)")?;
            let template = unescape(args.template.as_deref().unwrap_or_default());
            check_template(&template)?;
            let words = args.label_words.clone().unwrap_or_else(|| labels.clone());
            let table = model.backbone.word_embeddings();
            vec![Task {
                prompt: Tensor::zeros((0, d), table.dtype(), &table.device())?,
                head: model.verbalizer_head(&template, &labels, &words)?,
                labels,
                template: Some(template),
            }]
        } else {
            args.adapters
                .iter()
                .map(|a| Task::new(&model, &Adapter::load(a, d, &Device::Cpu)?))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        check_members(&tasks.iter().collect::<Vec<_>>())?;
        let longest = tasks.iter().map(Task::prompt_len).max().unwrap_or(0);
        let encoder = model.encoder(longest, None)?;
        Ok(Self {
            backbone: model.backbone,
            tasks,
            encoder,
        })
    }

    fn answers(
        &self,
        data: &[Encoded],
        args: &InferenceArgs,
    ) -> anyhow::Result<Vec<EnsembleAnswer>> {
        let tasks: Vec<&Task> = self.tasks.iter().collect();
        let (size, padding) = (args.batch_size, args.padding_side);
        ensemble_all(&self.backbone, &tasks, data, size, padding, &Device::Cpu)
    }

    fn labels(&self) -> &[String] {
        &self.tasks[0].labels
    }

    /// Inputs written into the members' template, then tokenized.
    fn encode(&self, examples: &[Example], path: &Path) -> anyhow::Result<Vec<Encoded>> {
        let template = self.tasks[0].template.as_deref();
        encode_all(&self.encoder, examples, template, path)
    }
}

/// "\n" and "\t" typed on a command line, as the characters.
pub(crate) fn unescape(text: &str) -> String {
    text.replace("\\n", "\n").replace("\\t", "\t")
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let examples = read_examples(&args.data, &args.columns.columns(), Labels::Required)?;
    let model = args.inference.load_model()?;
    if let [adapter] = args.inference.adapters.as_slice() {
        let adapter = Adapter::load(adapter, model.backbone.hidden_size(), &Device::Cpu)?;
        if matches!(adapter.head, AdapterHead::Generation) {
            return eval_generation(model, adapter, examples, &args);
        }
    }
    let inference = Inference::load(model, &args.inference, Some(label_set(&examples)))?;
    let gold = label_ids(&examples, inference.labels(), &args.data)?;
    let data = inference.encode(&examples, &args.data)?;
    let answers = inference.answers(&data, &args.inference)?;
    let labels = inference.labels();
    let predicted: Vec<u32> = answers
        .iter()
        .map(|a| labels.iter().position(|l| *l == a.label).unwrap_or(0) as u32)
        .collect();
    let report = Report::new(labels, &gold, &predicted);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
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
    let template = adapter.template.as_deref();
    let data = encode_pairs(&encoder, &examples, template, &args.data, eos)?;
    let lm = PromptLm {
        lm_head: model.lm_head("a generation adapter")?.dense()?,
        backbone: model.backbone,
        prompt: SoftPrompt::from_tensor(&adapter.prompt)?,
        template: adapter.template,
    };
    let (size, padding) = (args.inference.batch_size, args.inference.padding_side);
    let score = lm.score(&data, size, padding, &Device::Cpu)?;
    if args.json {
        println!("{}", serde_json::to_string(&score)?);
    } else {
        print!("{score}");
    }
    Ok(())
}

fn run_predict(args: PredictArgs) -> anyhow::Result<()> {
    let mut examples: Vec<Example> = args
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| Example {
            text: t.clone(),
            text_pair: None,
            label: None,
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
    let inference = Inference::load(args.inference.load_model()?, &args.inference, None)?;
    let data = inference.encode(&examples, Path::new("input"))?;
    let ensemble = inference.tasks.len() > 1;
    for (example, answer) in examples
        .iter()
        .zip(inference.answers(&data, &args.inference)?)
    {
        if args.json {
            let scores: serde_json::Map<String, serde_json::Value> = inference
                .labels()
                .iter()
                .zip(&answer.scores)
                .map(|(l, p)| (l.clone(), (*p).into()))
                .collect();
            let mut line =
                serde_json::json!({"text": example.text, "label": answer.label, "scores": scores});
            if ensemble {
                line["members"] = answer.members.into();
            } else {
                line["logits"] = answer.logits[0].clone().into();
            }
            println!("{line}");
        } else {
            println!("{}\t{}", answer.label, example.text);
        }
    }
    Ok(())
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let mode = match args.mode {
        BenchMode::Train => Mode::Train,
        BenchMode::Forward => Mode::Forward,
        BenchMode::Generate => {
            if let Some(arch) = args.arch.as_deref().filter(|a| *a != "gpt2-small") {
                bail!("bench generate runs on gpt2-small, not {arch}");
            }
            let seq = args.seq.unwrap_or(16);
            let weights = args.weights.map(|w| match w {
                BenchWeights::Q8_0 => GgmlDType::Q8_0,
                BenchWeights::Q4_1 => GgmlDType::Q4_1,
                BenchWeights::Q4_0 => GgmlDType::Q4_0,
            });
            let r = bench::generation::run(
                seq,
                args.num_virtual_tokens,
                args.new_tokens,
                args.steps,
                weights,
            )?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} ({}) generate, batch 1, {} + {} prompt tokens, {} new: median {:.3} s (min {:.3}, max {:.3}) over {} runs, {:.1} tokens/s; same tokens as without a cache: {}; peak RSS {:.0} MiB",
                    r.arch, r.weights, r.num_virtual_tokens, r.input_tokens, r.new_tokens, r.median_s, r.min_s, r.max_s, r.steps, r.tokens_per_s, r.matches_no_cache, r.peak_rss_mib
                );
            }
            return Ok(());
        }
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
        steps: args.steps,
        warmup: 3,
    };
    let r = bench::run(&config)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} {} batch {} x ({} + {}): median {:.3} s (min {:.3}, max {:.3}) over {} steps, {:.1} GFLOP/s, peak RSS {:.0} MiB",
            r.arch, r.mode, r.batch, r.seq, r.num_virtual_tokens, r.median_s, r.min_s, r.max_s, r.steps, r.gflop_per_s, r.peak_rss_mib
        );
    }
    Ok(())
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    if args.inference.adapters.len() != 1 {
        bail!("inspect reads one adapter at a time");
    }
    // Only the prompt is read: a generation adapter, which has no head, is inspected too.
    let model = args.inference.load_model()?;
    let d = model.backbone.hidden_size();
    let adapter = Adapter::load(&args.inference.adapters[0], d, &Device::Cpu)?;
    let encoder = model.encoder(0, None)?;
    let nearest = nearest_tokens(
        &adapter.prompt,
        &model.backbone.word_embeddings().dense()?,
        args.top,
    )?;
    for (position, tokens) in nearest.iter().enumerate() {
        let names: Vec<String> = tokens
            .iter()
            .map(|(id, _)| encoder.token(*id).unwrap_or_else(|| format!("#{id}")))
            .collect();
        if args.json {
            let cosines: Vec<f32> = tokens.iter().map(|(_, c)| *c).collect();
            println!(
                "{}",
                serde_json::json!({"position": position, "tokens": names, "cosines": cosines})
            );
        } else {
            let shown: Vec<String> = names
                .iter()
                .zip(tokens)
                .map(|(n, (_, c))| format!("{n} ({c:.2})"))
                .collect();
            println!("{position:>3}  {}", shown.join("  "));
        }
    }
    Ok(())
}

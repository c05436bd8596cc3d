//! `softprompt sweep`: a grid of ordinary training runs from a TOML file, run one after another
//! on one loaded model, each scored on the test sets, with a report (tables and PNG plots).
//!
//! ```toml
//! model = "assets/models/all-MiniLM-L6-v2"      # paths relative to the working directory
//! train = "assets/data/movie-reviews/train.tsv"
//! dev = "assets/data/movie-reviews/dev.tsv"
//! test = ["assets/data/movie-reviews/test.tsv"]  # each run is scored on each
//! seeds = [0, 1, 2]                              # every value runs once per seed
//!
//! [base]                    # options of every run: `softprompt train`'s, by name (- or _)
//! epochs = 3
//!
//! [[experiment]]
//! name = "prompt-length"
//! title = "Prompt length (the paper's Figure 3a)"
//! vary = "num_virtual_tokens"
//! values = [1, 5, 20, 50, 100]
//! with = { method = "prompt" }  # this experiment's own fixed options
//! ensemble = true               # also score each value's runs (one a seed) as one prompt ensemble
//!
//! [[experiment]]
//! name = "probe"
//! vary = "pool"
//! values = ["mean", "cls"]
//! probe = true    # the frozen linear probe (softprompt::probe), not a training run: `base` does
//!                 # not apply; `with` and `vary` set its options (pool, lr, epochs, batch_size)
//! ```
//!
//! ```text
//! OUTPUT/runs/EXPERIMENT/VALUE-seedN/   each run's adapter, metrics.jsonl, checkpoint
//! OUTPUT/results.jsonl                  one line a finished run
//! OUTPUT/report.md, OUTPUT/EXPERIMENT.png
//! ```
//! Finished runs (a line in results.jsonl) are skipped; an interrupted one resumes from its
//! checkpoint. A run whose options are those of a run already finished (the default value of
//! one experiment is often another's) is not trained again: it reads that run. Ctrl-C stops the
//! run at its step, checkpointed, and the sweep there.

use crate::plot::{chart, Curves, Series};
use crate::train::{interrupted, stop_on_signals};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use plotters::prelude::*;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use softprompt::adapter::{Adapter, AdapterHead};
use softprompt::backbone::Backbone;
use softprompt::batch::{Batching, Padding};
use softprompt::collective::SingleProcess;
use softprompt::data::{read_examples, Columns, DataSource, Labels};
use softprompt::files::{load_tensors, write_atomic};
use softprompt::inference::{LoadedAdapter, Members};
use softprompt::model::Model;
use softprompt::probe::{train_probe, ProbeConfig};
use softprompt::prompt::{nearest_tokens, Placement};
use softprompt::prompt_encoder::Method;
use softprompt::prompted::generation_score;
use softprompt::train::{starting_prompt, train_model, TrainConfig, TrainData};
use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct SweepArgs {
    /// The grid: a TOML file (see `softprompt sweep --help` and experiments/*.toml).
    #[arg(long)]
    config: PathBuf,
    /// Where the runs, results.jsonl and report.md go; a sweep there before is continued.
    #[arg(long)]
    output: PathBuf,
    /// Check the grid and list its runs (done or to do); train nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The sweep file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grid {
    model: PathBuf,
    train: PathBuf,
    dev: Option<PathBuf>,
    #[serde(default)]
    test: Vec<PathBuf>,
    #[serde(default = "one_seed")]
    seeds: Vec<u64>,
    #[serde(default)]
    base: toml::Table,
    experiment: Vec<Experiment>,
}

fn one_seed() -> Vec<u64> {
    vec![0]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Experiment {
    name: String,
    title: Option<String>,
    vary: String,
    values: Vec<toml::Value>,
    #[serde(default)]
    with: toml::Table,
    /// this experiment's seeds, if not the sweep's
    seeds: Option<Vec<u64>>,
    /// each value's runs over its seeds are also scored together, as a prompt ensemble (the
    /// paper's Table 3: the ensemble against its members' mean and best)
    #[serde(default)]
    ensemble: bool,
    /// a frozen linear probe of each value instead of a training run
    #[serde(default)]
    probe: bool,
}

/// One finished run: a line of results.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunResult {
    experiment: String,
    value: String,
    seed: u64,
    best_dev: Option<f64>,
    /// accuracy (a generation adapter: exact match) on each test set, by file stem
    test: BTreeMap<String, f64>,
    /// trainable values: the prompt (or its encoder) and the head
    trained_values: usize,
    steps: usize,
    seconds: f64,
    /// a prompt of input vectors: how far it moved from its initialisation, ‖P − P₀‖ / ‖P₀‖
    #[serde(default, skip_serializing_if = "Option::is_none")]
    moved: Option<f64>,
    /// ... and the vocabulary token nearest to each of its vectors (the paper's section 7)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nearest: Option<Vec<String>>,
    /// the run directory (under OUTPUT/runs) of the run with the same options this one reads,
    /// where it was not trained itself
    #[serde(default, skip_serializing_if = "Option::is_none")]
    same_as: Option<PathBuf>,
}

impl RunResult {
    /// Its run directory under OUTPUT/runs: its own, or that of the run it reads.
    fn dir(&self) -> PathBuf {
        self.same_as.clone().unwrap_or_else(|| {
            Path::new(&self.experiment).join(run_dir_name(&self.value, self.seed))
        })
    }
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let grid: Grid = toml::from_str(&text)
        .with_context(|| format!("{} is not a sweep file", args.config.display()))?;
    let plan = plan(&grid)?;
    if args.dry_run {
        let done = read_results(&args.output.join("results.jsonl"))?;
        for p in &plan {
            let state = if done.iter().any(|r| p.is(r)) {
                "done"
            } else {
                "to do"
            };
            println!(
                "{} {}={} seed {}: {state}",
                p.experiment, p.vary, p.value, p.seed
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let results_path = args.output.join("results.jsonl");
    let mut results = read_results(&results_path)?;
    let model = Model::load(&grid.model, DType::F32, &Device::Cpu)?;
    stop_on_signals();
    let todo: Vec<&Planned> = plan
        .iter()
        .filter(|p| !results.iter().any(|r| p.is(r)))
        .collect();
    eprintln!(
        "{} runs: {} done before, {} to go",
        plan.len(),
        plan.len() - todo.len(),
        todo.len()
    );
    let started = Instant::now();
    for (i, planned) in todo.iter().enumerate() {
        let twin = plan
            .iter()
            .filter(|p| p.same_training(planned))
            .find_map(|p| results.iter().find(|r| p.is(r) && r.same_as.is_none()));
        let result = match twin {
            Some(twin) => Some(RunResult {
                experiment: planned.experiment.clone(),
                value: planned.value.clone(),
                same_as: Some(twin.dir()),
                ..twin.clone()
            }),
            None => match &planned.job {
                Job::Train(config) => {
                    let dir = args.output.join("runs").join(&planned.experiment);
                    let dir = dir.join(planned.dir_name());
                    train_and_score(&model, &grid, planned, config, &dir)?
                }
                Job::Probe(config) => Some(probe_and_score(&model, &grid, planned, config)?),
            },
        };
        let Some(result) = result else {
            eprintln!("interrupted: `softprompt sweep` again continues the run where it stopped");
            return Ok(());
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)?;
        writeln!(file, "{}", serde_json::to_string(&result)?)?;
        let per_run = started.elapsed().as_secs_f64() / (i + 1) as f64;
        let left = per_run * (todo.len() - i - 1) as f64;
        let tests: Vec<String> = result
            .test
            .iter()
            .map(|(n, a)| format!("{n} {a:.4}"))
            .collect();
        eprintln!(
            "[{}/{}] {} {}={} seed {}: {}; {:.0} s (ETA {})",
            i + 1,
            todo.len(),
            planned.experiment,
            planned.vary,
            planned.value,
            planned.seed,
            tests.join(", "),
            result.seconds,
            minutes(left)
        );
        results.push(result);
    }
    let ensembles_path = args.output.join("ensembles.json");
    let scored_before = read_ensembles(&ensembles_path)?;
    let ensembles = ensembles(&model, &grid, &results, &args.output, &scored_before)?;
    write_atomic(
        &ensembles_path,
        serde_json::to_string_pretty(&ensembles)?.as_bytes(),
    )?;
    let report = report(&grid, &results, &ensembles, &args.output)?;
    write_atomic(&args.output.join("report.md"), report.as_bytes())?;
    eprintln!("wrote {}", args.output.join("report.md").display());
    Ok(())
}

/// One run of the grid.
struct Planned {
    experiment: String,
    vary: String,
    value: String,
    seed: u64,
    job: Job,
}

/// What a run does.
enum Job {
    Train(Box<TrainConfig>),
    Probe(ProbeConfig),
}

impl Planned {
    fn is(&self, r: &RunResult) -> bool {
        r.experiment == self.experiment && r.value == self.value && r.seed == self.seed
    }

    fn dir_name(&self) -> String {
        run_dir_name(&self.value, self.seed)
    }

    /// Another run of the grid that trains the same way (its learning rate given or the default).
    fn same_training(&self, other: &Planned) -> bool {
        let explicit = |c: &TrainConfig| TrainConfig {
            lr: Some(c.lr()),
            ..c.clone()
        };
        let same = match (&self.job, &other.job) {
            (Job::Train(a), Job::Train(b)) => explicit(a) == explicit(b),
            (Job::Probe(a), Job::Probe(b)) => a == b,
            _ => false,
        };
        same && !(self.experiment == other.experiment && self.value == other.value)
    }
}

/// A run's directory under its experiment's: the value (anything but letters, digits, '.' and
/// '-' made '_') and the seed.
fn run_dir_name(value: &str, seed: u64) -> String {
    let safe: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}-seed{seed}")
}

/// Every run the grid asks for, its options checked before any trains.
fn plan(grid: &Grid) -> anyhow::Result<Vec<Planned>> {
    let mut plan = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for e in &grid.experiment {
        if !names.insert(&e.name) || e.name.is_empty() || e.name.contains(['/', '\\']) {
            bail!(
                "experiment names must be distinct, non-empty plain names: {:?}",
                e.name
            );
        }
        if e.values.is_empty() {
            bail!("experiment {:?} has no values", e.name);
        }
        if e.probe && e.ensemble {
            bail!(
                "experiment {:?}: probes are not scored as ensembles",
                e.name
            );
        }
        for value in &e.values {
            for &seed in e.seeds.as_ref().unwrap_or(&grid.seeds) {
                let mut options = match e.probe {
                    true => toml::Table::new(),
                    false => grid.base.clone(),
                };
                options.extend(e.with.clone());
                options.insert(e.vary.clone(), value.clone());
                let job = match e.probe {
                    true => with_options(&options, seed).and_then(|config: ProbeConfig| {
                        config.validate()?;
                        Ok(Job::Probe(config))
                    }),
                    false => with_options(&options, seed).and_then(|config: TrainConfig| {
                        config.validate()?;
                        Ok(Job::Train(Box::new(config)))
                    }),
                }
                .with_context(|| format!("experiment {:?}, {} = {value}", e.name, e.vary))?;
                plan.push(Planned {
                    experiment: e.name.clone(),
                    vary: e.vary.clone(),
                    value: label(value),
                    seed,
                    job,
                });
            }
        }
    }
    Ok(plan)
}

/// Options by name (`softprompt train`'s, or a probe's) over the defaults of `T`'s fields, and
/// the seed.
fn with_options<T: Default + Serialize + DeserializeOwned>(
    options: &toml::Table,
    seed: u64,
) -> anyhow::Result<T> {
    let mut config = serde_json::to_value(T::default())?;
    let fields = config
        .as_object_mut()
        .context("the options are an object")?;
    for (name, value) in options {
        let key = name.replace('-', "_");
        if key == "seed" {
            bail!("'seed' is set by the sweep's seeds");
        }
        if !fields.contains_key(&key) {
            let known: Vec<&String> = fields.keys().collect();
            bail!(
                "no training option '{name}' (options: {})",
                softprompt::data::listing(&known)
            );
        }
        fields.insert(key, serde_json::to_value(value)?);
    }
    fields.insert("seed".into(), seed.into());
    serde_json::from_value(config).context("an option has a value of the wrong kind")
}

/// A value as the report shows it: strings without quotes.
fn label(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn read_results(path: &Path) -> anyhow::Result<Vec<RunResult>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a run's result", path.display(), i + 1))
        })
        .collect()
}

/// Trains `planned` into `dir` (continuing a run there) and scores it; None if interrupted.
fn train_and_score(
    model: &Model,
    grid: &Grid,
    planned: &Planned,
    config: &TrainConfig,
    dir: &Path,
) -> anyhow::Result<Option<RunResult>> {
    let data = TrainData {
        train: DataSource::File(grid.train.clone()),
        dev: grid.dev.clone().map(DataSource::File),
        columns: Columns::default(),
    };
    let resume = dir.join("checkpoint.safetensors").exists();
    let started = Instant::now();
    let mut quiet = |_: softprompt::train::Event| match interrupted() {
        true => ControlFlow::Break(()),
        false => ControlFlow::Continue(()),
    };
    let summary = train_model(
        model,
        &data,
        dir,
        config,
        resume,
        &SingleProcess,
        &mut quiet,
    )?;
    if summary.interrupted {
        return Ok(None);
    }
    let seconds = started.elapsed().as_secs_f64();
    let adapter = Adapter::load(dir, model.backbone.hidden_size(), &Device::Cpu)?;
    let test = match adapter.head {
        AdapterHead::Generation => {
            let mut test = BTreeMap::new();
            for path in &grid.test {
                let examples = read_examples(path, &Columns::default(), Labels::Required)?;
                let score = generation_score(model, &adapter, &examples, path, &TEST_BATCHING)?;
                test.insert(test_name(path), score.exact_match);
            }
            test
        }
        _ => {
            let members = Members::new(model, vec![LoadedAdapter::new(model, &adapter)?])?;
            test_accuracy(model, grid, &members)?
        }
    };
    // the words nearest to the vectors a backbone reads; how far they moved from the table they
    // started as, where the vectors are that table (not an encoder's output)
    let (moved, nearest) = match (adapter.method, adapter.placement()) {
        (_, Placement::Prefix | Placement::EncoderDecoder) | (Method::Multitask, _) => (None, None),
        (method, Placement::Embeddings) => {
            let start = match method {
                Method::Prompt => Some(starting_prompt(model, &data, config)?),
                _ => None,
            };
            let (moved, nearest) = inspect(model, start.as_ref(), &adapter.prompt)?;
            (moved, Some(nearest))
        }
    };
    Ok(Some(RunResult {
        experiment: planned.experiment.clone(),
        value: planned.value.clone(),
        seed: planned.seed,
        best_dev: summary.best_dev_accuracy,
        test,
        trained_values: trained_values(dir)?,
        steps: summary.steps,
        seconds,
        moved,
        nearest,
        same_as: None,
    }))
}

/// How the runs are scored on the test sets.
const TEST_BATCHING: Batching = Batching {
    size: 32,
    padding: Padding::Right,
    device: Device::Cpu,
};

/// A test set's name in results and reports: its file's stem.
fn test_name(path: &Path) -> String {
    path.file_stem()
        .map_or("test".into(), |s| s.to_string_lossy().into_owned())
}

/// Accuracy on each test set: one adapter's, or an ensemble's.
fn test_accuracy(
    model: &Model,
    grid: &Grid,
    members: &Members,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut test = BTreeMap::new();
    for path in &grid.test {
        let examples = read_examples(path, &Columns::default(), Labels::Required)?;
        let report = members.report(&model.backbone, &examples, path, &TEST_BATCHING)?;
        test.insert(test_name(path), report.accuracy);
    }
    Ok(test)
}

/// Trains a frozen linear probe and scores it on the test sets (it has no run directory: the
/// backbone's vectors are computed once, and the head trains in seconds).
fn probe_and_score(
    model: &Model,
    grid: &Grid,
    planned: &Planned,
    config: &ProbeConfig,
) -> anyhow::Result<RunResult> {
    let started = Instant::now();
    let train = read_examples(&grid.train, &Columns::default(), Labels::Required)?;
    let dev = match &grid.dev {
        Some(path) => Some(read_examples(path, &Columns::default(), Labels::Required)?),
        None => None,
    };
    let dev = dev.as_deref().zip(grid.dev.as_deref());
    let probe = train_probe(model, (&train, &grid.train), dev, config, &TEST_BATCHING)?;
    let seconds = started.elapsed().as_secs_f64();
    let head = &probe.adapter.head;
    let trained_values = head.weight.elem_count() + head.bias.elem_count();
    let members = Members::new(model, vec![probe.adapter])?;
    Ok(RunResult {
        experiment: planned.experiment.clone(),
        value: planned.value.clone(),
        seed: planned.seed,
        best_dev: probe.best_dev,
        test: test_accuracy(model, grid, &members)?,
        trained_values,
        steps: probe.steps,
        seconds,
        moved: None,
        nearest: None,
        same_as: None,
    })
}

/// A value's runs scored together as one prompt ensemble (majority vote; `inference::ensemble`).
/// Kept in OUTPUT/ensembles.json, so that a sweep called again scores only ensembles whose
/// members changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EnsembleResult {
    experiment: String,
    value: String,
    /// its members' run directories, under OUTPUT/runs
    members: Vec<PathBuf>,
    /// the ensemble's accuracy on each test set
    test: BTreeMap<String, f64>,
}

/// Every `ensemble = true` experiment's values with at least two finished runs, scored as
/// ensembles of those runs' adapters on every test set (one backbone pass per batch for all
/// the members), unless `scored_before` holds the same members' scores.
fn ensembles(
    model: &Model,
    grid: &Grid,
    results: &[RunResult],
    output: &Path,
    scored_before: &[EnsembleResult],
) -> anyhow::Result<Vec<EnsembleResult>> {
    let mut scored = Vec::new();
    for e in grid.experiment.iter().filter(|e| e.ensemble) {
        for value in e.values.iter().map(label) {
            let members: Vec<PathBuf> = results
                .iter()
                .filter(|r| r.experiment == e.name && r.value == value)
                .map(RunResult::dir)
                .collect();
            if members.len() < 2 {
                continue;
            }
            let before = scored_before
                .iter()
                .find(|s| s.experiment == e.name && s.value == value && s.members == members);
            if let Some(before) = before {
                scored.push(before.clone());
                continue;
            }
            let mut adapters = Vec::new();
            for dir in &members {
                let adapter = Adapter::load(
                    &output.join("runs").join(dir),
                    model.backbone.hidden_size(),
                    &Device::Cpu,
                )?;
                adapters.push(LoadedAdapter::new(model, &adapter)?);
            }
            let loaded = Members::new(model, adapters)
                .with_context(|| format!("experiment {:?}'s runs as an ensemble", e.name))?;
            scored.push(EnsembleResult {
                experiment: e.name.clone(),
                value,
                members,
                test: test_accuracy(model, grid, &loaded)?,
            });
        }
    }
    Ok(scored)
}

/// The ensembles scored by an earlier call (none if the file is missing).
fn read_ensembles(path: &Path) -> anyhow::Result<Vec<EnsembleResult>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not the ensembles a sweep scored", path.display()))
}

/// How far `prompt` [M, D] moved from `start`, relative to `start`'s size, and the vocabulary
/// token nearest to each of its vectors by cosine.
fn inspect(
    model: &Model,
    start: Option<&Tensor>,
    prompt: &Tensor,
) -> anyhow::Result<(Option<f64>, Vec<String>)> {
    let prompt = prompt.to_dtype(DType::F32)?;
    let norm = |t: &Tensor| -> anyhow::Result<f64> {
        Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)
    };
    let moved = match start {
        Some(start) => {
            let start = start.to_dtype(DType::F32)?;
            Some(norm(&(&prompt - &start)?)? / norm(&start)?.max(1e-12))
        }
        None => None,
    };
    let table = model.backbone.word_embeddings().dense()?;
    let encoder = model.encoder(0, None)?;
    let nearest = nearest_tokens(&prompt, &table, 1)?
        .into_iter()
        .map(|best| match best.first() {
            Some(&(id, _)) => encoder.token(id).unwrap_or_else(|| format!("#{id}")),
            None => "?".into(),
        })
        .collect();
    Ok((moved, nearest))
}

/// The values training moved: the checkpoint's tensors but the optimizer's.
fn trained_values(dir: &Path) -> anyhow::Result<usize> {
    let (tensors, _) = load_tensors(&dir.join("checkpoint.safetensors"), &Device::Cpu)?;
    Ok(tensors
        .iter()
        .filter(|(name, _)| !name.starts_with("optim."))
        .map(|(_, t)| t.elem_count())
        .sum())
}

/// mean and sample standard deviation (0 for one value)
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    let var = match values.len() {
        0 | 1 => 0.0,
        _ => values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0),
    };
    (mean, var.sqrt())
}

/// Prompt vectors whose nearest tokens the report lists.
const NEAREST_SHOWN: usize = 10;

fn minutes(seconds: f64) -> String {
    match seconds {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// report.md: per experiment, a table of each value's runs (mean ± standard deviation over seeds)
/// and a plot of the test scores against the value; each run's curves beside it.
fn report(
    grid: &Grid,
    results: &[RunResult],
    ensembles: &[EnsembleResult],
    output: &Path,
) -> anyhow::Result<String> {
    let mut md = String::from("# Sweep report\n\n");
    md.push_str(&format!(
        "Model `{}`, training data `{}`, dev `{}`; each value's figures are the mean ± standard deviation over its seeds (`n` runs).\n\n",
        grid.model.display(),
        grid.train.display(),
        grid.dev.as_ref().map_or("none".into(), |d| d.display().to_string())
    ));
    for e in &grid.experiment {
        let values: Vec<String> = e.values.iter().map(label).collect();
        let runs = |v: &str| -> Vec<&RunResult> {
            results
                .iter()
                .filter(|r| r.experiment == e.name && r.value == v)
                .collect()
        };
        let tests: Vec<String> = grid.test.iter().map(|p| test_name(p)).collect();
        md.push_str(&format!("## {}\n\n", e.title.as_deref().unwrap_or(&e.name)));
        md.push_str(&format!("`{}` varies", e.vary));
        if !e.with.is_empty() {
            let with: Vec<String> = e.with.iter().map(|(k, v)| format!("`{k} = {v}`")).collect();
            md.push_str(&format!(", with {}", with.join(", ")));
        }
        md.push_str(".\n\n");
        let mut header = format!("| {} | n | best dev accuracy |", e.vary);
        for t in &tests {
            header.push_str(&format!(" accuracy on {t} |"));
        }
        header.push_str(" trained values | seconds a run | prompt moved ‖P − P₀‖ / ‖P₀‖ |\n");
        md.push_str(&header);
        md.push_str(&format!("|{}\n", " --- |".repeat(6 + tests.len())));
        let pm = |xs: Vec<f64>| match mean_sd(&xs) {
            _ if xs.is_empty() => "—".to_string(),
            (m, s) if xs.len() > 1 => format!("{m:.4} ± {s:.4}"),
            (m, _) => format!("{m:.4}"),
        };
        let mut series: Vec<(String, Points)> = tests
            .iter()
            .map(|t| (format!("accuracy on {t}"), Vec::new()))
            .collect();
        let numeric = e
            .values
            .iter()
            .all(|v| v.as_integer().is_some() || v.as_float().is_some());
        for (i, v) in values.iter().enumerate() {
            let rs = runs(v);
            let mut row = format!(
                "| {v} | {} | {} |",
                rs.len(),
                pm(rs.iter().filter_map(|r| r.best_dev).collect())
            );
            for (t, (_, points)) in tests.iter().zip(&mut series) {
                let scores: Vec<f64> = rs.iter().filter_map(|r| r.test.get(t).copied()).collect();
                row.push_str(&format!(" {} |", pm(scores.clone())));
                if !scores.is_empty() {
                    let x = match numeric {
                        true => v.parse::<f64>().unwrap_or(i as f64),
                        false => i as f64,
                    };
                    let (m, s) = mean_sd(&scores);
                    points.push((x, m, s));
                }
            }
            let trained = rs
                .first()
                .map_or("—".into(), |r| r.trained_values.to_string());
            let secs: Vec<f64> = rs.iter().map(|r| r.seconds).collect();
            let (s, _) = mean_sd(&secs);
            let secs = if secs.is_empty() {
                "—".into()
            } else {
                format!("{s:.0}")
            };
            let moved = pm(rs.iter().filter_map(|r| r.moved).collect());
            row.push_str(&format!(" {trained} | {secs} | {moved} |\n"));
            md.push_str(&row);
        }
        let nearest: Vec<String> = values
            .iter()
            .filter_map(|v| {
                let r = runs(v).into_iter().find(|r| r.nearest.is_some())?;
                let words = r.nearest.as_ref()?.iter().take(NEAREST_SHOWN).cloned();
                Some(format!(
                    "- {} = {v} (seed {}): {}",
                    e.vary,
                    r.seed,
                    words.collect::<Vec<_>>().join(" · ")
                ))
            })
            .collect();
        if !nearest.is_empty() {
            md.push_str(&format!(
                "\nThe vocabulary token nearest to each of the first {NEAREST_SHOWN} prompt vectors, by cosine:\n\n{}\n",
                nearest.join("\n")
            ));
        }
        for ens in ensembles.iter().filter(|x| x.experiment == e.name) {
            md.push_str(&ensemble_table(ens, &runs(&ens.value), &tests));
        }
        if series.iter().any(|(_, p)| !p.is_empty()) {
            let png = format!("{}.png", e.name);
            draw_experiment(&output.join(&png), e, &values, numeric, &series)?;
            md.push_str(&format!("\n![{}]({png})\n", e.name));
        }
        let curves: Vec<Curves> = values
            .iter()
            .filter_map(|v| runs(v).first().map(|r| (v, *r)))
            .filter_map(|(v, r)| {
                Curves::read(&output.join("runs").join(r.dir()))
                    .ok()
                    .map(|c| Curves {
                        name: format!("{} = {v}", e.vary),
                        ..c
                    })
            })
            .collect();
        if !curves.is_empty() {
            let png = format!("{}-curves.png", e.name);
            crate::plot::draw_curves(&curves, &output.join(&png))?;
            md.push_str(&format!("\n![{} curves]({png})\n", e.name));
        }
        md.push('\n');
    }
    Ok(md)
}

/// The ensemble against its members, on each test set: the paper's Table 3.
fn ensemble_table(ens: &EnsembleResult, members: &[&RunResult], tests: &[String]) -> String {
    let mut md = format!(
        "\nThe {} runs of {} as one prompt ensemble (majority vote, ties to the higher mean probability):\n\n\
         | test set | ensemble | members' mean ± sd | best member | worst member |\n| --- | --- | --- | --- | --- |\n",
        ens.members.len(), ens.value
    );
    for t in tests {
        let scores: Vec<f64> = members
            .iter()
            .filter_map(|r| r.test.get(t).copied())
            .collect();
        let (Some(&together), false) = (ens.test.get(t), scores.is_empty()) else {
            continue;
        };
        let (mean, sd) = mean_sd(&scores);
        let best = scores.iter().copied().fold(f64::MIN, f64::max);
        let worst = scores.iter().copied().fold(f64::MAX, f64::min);
        md.push_str(&format!(
            "| {t} | **{together:.4}** | {mean:.4} ± {sd:.4} | {best:.4} | {worst:.4} |\n"
        ));
    }
    md
}

/// A plot's points: (x, mean, standard deviation).
type Points = Vec<(f64, f64, f64)>;

/// The test scores against the experiment's values, ± a standard deviation.
fn draw_experiment(
    path: &Path,
    e: &Experiment,
    values: &[String],
    numeric: bool,
    series: &[(String, Points)],
) -> anyhow::Result<()> {
    crate::plot::register_font()?;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let series: Vec<Series> = series
        .iter()
        .map(|(name, points)| Series {
            name,
            points: points.clone(),
        })
        .collect();
    let caption = e.title.as_deref().unwrap_or(&e.name);
    let names = (!numeric).then_some(values);
    chart(&root, caption, &e.vary, "test accuracy", &series, names)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

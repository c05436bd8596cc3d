//! The `softprompt` command: thin wrappers over the library, one file per subcommand; `args`
//! holds the argument groups they share, `output` the `--json`-or-text printing, `adapters` what
//! eval and predict run on.

mod adapters;
mod args;
mod bench;
mod eval;
mod generate;
mod inspect;
mod loadgen;
mod output;
mod plot;
mod predict;
mod ranks;
mod serve;
mod sweep;
mod train;

use clap::{Parser, Subcommand};

use softprompt::collective::{Collective, SingleProcess};
use softprompt::profile::Profiler;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Parser)]
#[command(
    name = "softprompt",
    version,
    about = "Prompt tuning of frozen transformers (Lester et al. 2021)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for the engine's kernels [default: the cores this process may use; under mpirun or
    /// srun, shared among the job's ranks on each machine unless each rank is bound to its own].
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a soft prompt (and the task's head: a classifier, a verbalizer or a causal LM) on a frozen model.
    Train(train::TrainArgs),
    /// Score an adapter on labelled data: accuracy, macro-F1, per-class precision / recall, confusion.
    Eval(eval::EvalArgs),
    /// Label texts with an adapter.
    Predict(predict::PredictArgs),
    /// Time a train step or a forward pass on random weights of a known shape (no assets needed).
    Bench(bench::BenchArgs),
    /// Show the vocabulary tokens nearest to each prompt vector (cosine similarity).
    Inspect(inspect::InspectArgs),
    /// Serve every adapter of the given directories from one model over HTTP, batching across tasks.
    Serve(serve::ServeArgs),
    /// Continue texts with a decoder (GPT-2, Llama family), optionally behind an adapter's prompt.
    Generate(generate::GenerateArgs),
    /// Drive a running server with classify requests for many adapters; report throughput and latency.
    Loadgen(loadgen::LoadgenArgs),
    /// Draw runs' training loss and dev accuracy against the step as a PNG (several runs overlaid).
    Plot(plot::PlotArgs),
    /// Run a grid of trainings from a TOML file (resumable), score each on test sets, write a report.
    Sweep(sweep::SweepArgs),
}

impl Command {
    fn profiles(&self) -> bool {
        match self {
            Command::Train(args) => args.profile.profile,
            Command::Bench(args) => args.profile.profile,
            _ => false,
        }
    }
}

fn run(cli: Cli, profiler: Option<Profiler>, ranks: &dyn Collective) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => train::run(args, profiler, ranks),
        Command::Eval(args) => eval::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Bench(args) => bench::run(args, profiler),
        Command::Inspect(args) => inspect::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Loadgen(args) => loadgen::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Sweep(args) => sweep::run(args),
    }
}

fn main() -> std::process::ExitCode {
    // Output piped into `head` and the like ends quietly, as for any Unix tool, instead of a panic
    // in println! on the closed pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    softprompt::memory::keep_freed_memory();
    let cli = Cli::parse();
    let profiler = cli.command.profiles().then(Profiler::default);
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOFTPROMPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        );
    // the profiler hears every span of the engine, whatever SOFTPROMPT_LOG lets through
    let engine_spans = tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span() && meta.target().starts_with("softprompt")
    });
    tracing_subscriber::registry()
        .with(log)
        .with(profiler.clone().map(|p| p.with_filter(engine_spans)))
        .init();
    let threads = cli.threads.or_else(ranks::default_threads);
    softprompt::threads::tell_candle(
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    );
    if let Some(threads) = threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads);
        if let Err(err) = pool.build_global() {
            return failed(&anyhow::Error::new(err).context("--threads"), "");
        }
    }
    // MPI starts on this thread, before the training runs on a worker below
    let ranks: Box<dyn Collective> = match &cli.command {
        Command::Train(_) => match ranks::join() {
            Ok(ranks) => ranks,
            Err(err) => return failed(&err, ""),
        },
        _ => Box::new(SingleProcess),
    };
    // The engine's parallel kernels are started from a worker of rayon's pool, not from this
    // thread: otherwise each of the thousands of parallel calls a step makes waits for a worker
    // to wake (the same training ran 7-10 % faster from Python, whose calls run on a worker).
    // The server's threads are its own.
    let outcome = match cli.command {
        Command::Serve(_) | Command::Loadgen(_) => run(cli, profiler, &*ranks),
        _ => rayon::scope(|_| run(cli, profiler, &*ranks)),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // the other ranks may wait for this one in a collective: end them all
        Err(err) if ranks.size() > 1 => {
            failed(
                &err,
                &format!("rank {} of {}: ", ranks.rank(), ranks.size()),
            );
            ranks.abort(1)
        }
        Err(err) => failed(&err, ""),
    }
}

/// Prints `err` and its causes (`speaker` in front: which rank of a job says it).
fn failed(err: &anyhow::Error, speaker: &str) -> std::process::ExitCode {
    let mut said = format!("{speaker}error: {err}\n");
    for cause in err.chain().skip(1) {
        said.push_str(&format!("{speaker}  caused by: {cause}\n"));
    }
    ranks::say(&said);
    std::process::ExitCode::FAILURE
}

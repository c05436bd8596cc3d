//! The `softprompt` command: thin wrappers over the library, one function per subcommand.

mod commands;
mod generate;
mod serve;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Output piped into `head` and the like ends quietly, as for any Unix tool, instead of a panic
    // in println! on the closed pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOFTPROMPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

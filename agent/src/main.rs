//! `kvbroker`: parse the command line, run it, choose the exit code (0, 1, or 2 for usage).

use std::process::ExitCode;

use clap::Parser;

/// Every freed block is wiped, so no copy of a secret outlives the buffer that held it.
#[global_allocator]
static ALLOC: kvbroker_agent::ZeroOnFree = kvbroker_agent::ZeroOnFree;

fn main() -> ExitCode {
    let cli = kvbroker_agent::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.command.default_log_level()));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match kvbroker_agent::execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvbroker: {e}");
            ExitCode::from(1)
        }
    }
}

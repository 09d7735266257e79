//! `kvbroker`: parse the command line, run it, choose the exit code (0, 1, or 2 for usage).

use std::process::ExitCode;

use clap::Parser;
use kvbroker_agent::config::{Config, LogFormat};

/// Every freed block is wiped, so no copy of a secret outlives the buffer that held it.
#[global_allocator]
static ALLOC: kvbroker_agent::ZeroOnFree = kvbroker_agent::ZeroOnFree;

fn main() -> ExitCode {
    let cli = kvbroker_agent::Cli::parse();
    // An agent's `[log]` (format, level) applies from the first line; `RUST_LOG` wins.
    let log = cli.command.agent_config().map(Config::log_settings).unwrap_or_default();
    let level = log.level.as_deref().unwrap_or_else(|| cli.command.default_log_level());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let logger = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        // One JSON object per line: the same fields, at the top level, and the spans.
        LogFormat::Json => logger.json().flatten_event(true).with_span_list(true).init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            logger.with_ansi(std::io::stderr().is_terminal()).init();
        }
    }
    match kvbroker_agent::execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvbroker: {e}");
            ExitCode::from(1)
        }
    }
}

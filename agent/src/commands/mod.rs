//! One module per `kvbroker` subcommand; [`execute`] dispatches a parsed command line to it.
//! Commands print their results; only `main` chooses the exit code for an error.

pub(crate) mod audit;
pub(crate) mod check_config;
pub(crate) mod ctl;
pub(crate) mod dev;
pub(crate) mod doctor;
pub(crate) mod explain;
pub(crate) mod health;
pub(crate) mod launch;
pub(crate) mod rotate;
pub(crate) mod run;

use std::process::ExitCode;

use crate::Error;
use crate::cli::{Cli, Command, PolicyCommand};

/// Runs a parsed command line; returns the exit code for success and explained failures.
pub fn execute(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Run { config } => run::run(&config)?,
        Command::Dev { dir, command: None } => dev::dev(&dir)?,
        Command::Dev { dir, command: Some(crate::cli::DevCommand::Rotate { name, value, generate }) } => {
            dev::rotate(&dir, &name, value, generate)?;
        }
        Command::CheckConfig { config } => check_config::check_config(&config)?,
        Command::Ctl { config, socket, dir, command } => {
            return ctl::ctl(ctl::Target { socket, config, dir }, command);
        }
        Command::Rotate(args) => rotate::command(args)?,
        Command::Doctor(args) => return doctor::command(&args),
        Command::Health(args) => return health::command(&args),
        Command::Launch(args) => return launch::command(args),
        Command::Policy { command: PolicyCommand::Explain(args) } => explain::command(args)?,
        Command::Audit { command } => audit::command(command)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The multi-threaded runtime the agent and the commands that talk to it run on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    crate::sys::limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(Error::Runtime)
}

//! Command-line types for `kvb`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// kvb: read secrets from the local kvbroker agent.
#[derive(Debug, Parser)]
#[command(name = "kvb", version, about)]
pub(crate) struct Cli {
    /// The agent socket (default: $KVBROKER_SOCKET, else /run/kvbroker/agent.sock).
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print a secret's value (or write it to a file with mode 0600).
    Get {
        /// The secret's name.
        name: String,
        /// The vault alias (default: the agent's default vault).
        #[arg(long)]
        vault: Option<String>,
        /// A version id (32 hex characters) instead of the current version.
        #[arg(long)]
        version: Option<String>,
        /// Write the value to FILE (created with mode 0600) instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print the secret's current version id, then each new version id as it is cached.
    Watch {
        /// The secret's name.
        name: String,
        /// The vault alias (default: the agent's default vault).
        #[arg(long)]
        vault: Option<String>,
    },
    /// Run a command with secrets in its environment.
    Exec {
        /// VAR=NAME: set environment variable VAR to the value of secret NAME.
        #[arg(long = "env", value_name = "VAR=NAME", required = true)]
        env: Vec<String>,
        /// The vault alias (default: the agent's default vault).
        #[arg(long)]
        vault: Option<String>,
        /// Do not mask the values in the command's output (by default, each value kvb handed
        /// over, and its JSON, base64 and URL encodings, becomes *** in stdout and stderr).
        #[arg(long)]
        no_mask: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

//! Command-line types for `kvbroker`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// kvbroker: a node-local secret broker for Azure Key Vault.
#[derive(Debug, Parser)]
#[command(name = "kvbroker", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (systemd Type=notify).
    Run {
        /// The agent's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a local agent with demo secrets, for trying kvbroker out (not for production).
    Dev {
        /// Where to keep its socket, demo vault, policy and audit log.
        #[arg(long, value_name = "DIR", default_value = ".kvbroker-dev")]
        dir: PathBuf,
    },
    /// Validate a config file and the policy and vault files it names.
    CheckConfig {
        /// The agent's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Work with audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of one or more audit files, oldest first.
    Verify {
        /// Audit files in chain order (rotated files first).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

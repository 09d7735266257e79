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

/// What to do after a followed file was rewritten.
#[derive(Debug, clap::Args)]
pub(crate) struct Notify {
    /// With --follow: run CMD with `sh -c` after each rewrite (KVB_FILE names the file).
    #[arg(long, value_name = "CMD", requires = "follow")]
    pub(crate) on_change: Option<String>,
    /// With --follow: send signal SIG (HUP, USR1, …) after each rewrite, to --pid or --pid-file.
    #[arg(long, value_name = "SIG", requires = "follow", conflicts_with = "on_change")]
    pub(crate) signal: Option<String>,
    /// The process --signal goes to.
    #[arg(long, value_name = "PID", requires = "signal", conflicts_with = "pid_file")]
    pub(crate) pid: Option<u32>,
    /// A file holding the pid --signal goes to (read at each rewrite).
    #[arg(long, value_name = "FILE", requires = "signal")]
    pub(crate) pid_file: Option<PathBuf>,
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
        /// Keep FILE current: write each new version to a new file and rename it over FILE
        /// (readers never see a partial file; mode 0600, owner kept). Runs until killed.
        #[arg(long, requires = "output", conflicts_with = "version")]
        follow: bool,
        #[command(flatten)]
        notify: Notify,
    },
    /// Print the secret's current version id, then each new version id as it is cached.
    Watch {
        /// The secret's name.
        name: String,
        /// The vault alias (default: the agent's default vault).
        #[arg(long)]
        vault: Option<String>,
    },
    /// Render TEMPLATE to FILE (mode 0600) with {{ secret "NAME" }} (or secret("NAME",
    /// vault="A", version="ID")) replaced by values; with --follow, again after each rotation
    /// of any secret it uses. A missing secret or template error names TEMPLATE:LINE and
    /// writes nothing.
    Render {
        /// The template (minijinja syntax; `secret` is the only function).
        template: PathBuf,
        /// The file to write.
        #[arg(short = 'o', long = "output", value_name = "FILE", required = true)]
        output: PathBuf,
        /// The vault alias for secrets without vault= (default: the agent's default vault).
        #[arg(long)]
        vault: Option<String>,
        /// Keep FILE current: render again when any secret it uses rotates. Runs until killed.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        notify: Notify,
    },
    /// Run a command with secrets in its environment.
    Exec {
        /// VAR=NAME: set environment variable VAR to the value of secret NAME.
        #[arg(long = "env", value_name = "VAR=NAME", required_unless_present = "file_env")]
        env: Vec<String>,
        /// VAR=NAME: set VAR to /proc/KVB_PID/fd/N, a sealed in-memory file held by kvb with the
        /// value of NAME (nothing on disk, no value in the environment, no fd inherited by the
        /// command or its children), for libraries that want a path.
        #[arg(long = "file-env", value_name = "VAR=NAME")]
        file_env: Vec<String>,
        /// Follow the secrets: when one rotates, stop the command (--signal, then SIGKILL after
        /// --grace) and start it again with the new values.
        #[arg(long)]
        restart_on_change: bool,
        /// The signal that stops the command before a restart (default TERM).
        #[arg(long, value_name = "SIG", requires = "restart_on_change")]
        signal: Option<String>,
        /// How long the command may take to stop before SIGKILL (default 10s).
        #[arg(long, value_name = "DURATION", requires = "restart_on_change")]
        grace: Option<String>,
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

//! Command-line types for `kvbroker`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
        #[arg(long, value_name = "DIR", default_value = ".kvbroker-dev", global = true)]
        dir: PathBuf,
        #[command(subcommand)]
        command: Option<DevCommand>,
    },
    /// Validate a config file and the policy and vault files it names.
    CheckConfig {
        /// The agent's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Talk to a running agent's admin socket (root only). Never shows values.
    Ctl {
        /// Find the admin socket in this config file.
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        /// The admin socket (default: --config's or --dir's, else $KVBROKER_ADMIN_SOCKET,
        /// else /run/kvbroker/admin.sock).
        #[arg(long, value_name = "PATH", global = true)]
        socket: Option<PathBuf>,
        /// A `kvbroker dev` directory: reach the dev agent's admin socket.
        #[arg(long, value_name = "DIR", global = true)]
        dir: Option<PathBuf>,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Write a new version of a secret to Key Vault with the operator's credential; prints
    /// the new version id (never the value).
    Rotate(RotateArgs),
    /// Check a node: config and policy, identity and token, each vault's reach (DNS, TCP,
    /// proxy, TLS, bearer challenge), the secrets policy rules name, and file permissions.
    /// Prints each check as it runs; exit 0 only if all pass. Never prints a value or token.
    Doctor(DoctorArgs),
    /// Ask a running agent's socket for /v1/health (for probes): exit 0 if it answers ok,
    /// 1 if degraded, not ready or not answering (the reason on stderr).
    Health(HealthArgs),
    /// Run a command under a private broker for its process tree (Azure ML jobs); exits with
    /// the command's status.
    Launch(LaunchArgs),
    /// Work with the policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Work with audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Write a new version of a secret to the dev vault (its secrets.toml) and tell the running
    /// dev agent, whose watchers and long polls then see it as they would a Key Vault
    /// rotation. Prints the new version id, never the value.
    Rotate {
        /// The secret's name (a new name adds a secret).
        name: String,
        /// The new value (visible to other users in the process list: for demo values only).
        #[arg(long, value_name = "V", conflicts_with = "generate")]
        value: Option<String>,
        /// A random value of N bytes, written as base64url text (16 to 4096; the default is 32).
        #[arg(long, value_name = "N")]
        generate: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the facts used, each rule and why it does or does not allow VAULT/NAME, and the
    /// decision.
    Explain(ExplainArgs),
}

impl Command {
    /// The config file of a command that runs an agent, whose `[log]` sets up its log.
    pub fn agent_config(&self) -> Option<&std::path::Path> {
        match self {
            Command::Run { config } => Some(config),
            Command::Launch(a) => a.config.as_deref(),
            _ => None,
        }
    }

    /// The log level when `RUST_LOG` is not set: the agent's own progress for the commands
    /// that run an agent, only warnings for one-shot commands (whose output is their answer:
    /// `check-config` prints one line, not the Azure SDK's client set-up).
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Run { .. } | Command::Dev { command: None, .. } | Command::Launch(_) => "info",
            // Doctor reports every failure itself.
            Command::Doctor(_) => "error",
            _ => "warn",
        }
    }
}

/// `kvbroker doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The agent's config file.
    #[arg(long, value_name = "FILE", default_value = "/etc/kvbroker/config.toml")]
    pub config: PathBuf,
    /// One JSON object per check, one per line, as each runs.
    #[arg(long)]
    pub json: bool,
    /// Each secret a rule names must stay valid (before its `exp`) at least this long.
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = humantime::parse_duration)]
    pub min_validity: std::time::Duration,
}

/// `kvbroker health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The agent socket (default: $KVBROKER_SOCKET, else /run/kvbroker/agent.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Ask whether it is ready to serve (`/v1/health?ready`), not only alive.
    #[arg(long)]
    pub ready: bool,
    /// Give up (exit 1) after this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// `kvbroker rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The vault's URL, like `https://NAME.vault.azure.net`.
    #[arg(long, value_name = "URL")]
    pub vault: String,
    /// The secret's name.
    pub name: String,
    /// Take the value from FILE (UTF-8 text, used as is).
    #[arg(long, value_name = "FILE", conflicts_with = "generate")]
    pub from_file: Option<PathBuf>,
    /// Generate BYTES random bytes (16 to 4096), written as base64url text.
    #[arg(long, value_name = "BYTES")]
    pub generate: Option<usize>,
    /// Whose credential: azure-cli (default) or the environment's identity (auto, …).
    #[arg(long, value_name = "SOURCE", default_value = "azure-cli", value_parser = str::parse::<crate::config::IdentitySource>)]
    pub identity: crate::config::IdentitySource,
    /// A user-assigned identity's client id.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// An extra trusted CA (PEM), for emulators and private endpoints.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// HOST:PORT:ADDRESS:PORT connection override (repeatable).
    #[arg(long, value_name = "HOST:PORT:ADDR:PORT", value_parser = parse_connect_to)]
    pub connect_to: Vec<crate::config::ConnectTo>,
    /// Refuse any address outside loopback (tests).
    #[arg(long)]
    pub loopback_only: bool,
    /// The new version's content type (default: the current version's).
    #[arg(long, value_name = "TYPE")]
    pub content_type: Option<String>,
    /// The new version's expiry, RFC 3339 (`2027-01-01T00:00:00Z`), or `never` (default:
    /// the current version's).
    #[arg(long, value_name = "TIME|never")]
    pub expires: Option<String>,
    /// Set a tag on the new version (repeatable; the current version's tags are kept).
    #[arg(long, value_name = "KEY=VALUE")]
    pub tag: Vec<String>,
}

/// `kvbroker launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// An agent config (its vaults, identity and policy); sockets and audit log are moved
    /// into the launch's own places.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A vault to read, like `https://NAME.vault.azure.net` (repeatable; the first is default).
    #[arg(long, value_name = "URL")]
    pub vault: Vec<String>,
    /// Secrets to fetch before the command starts, comma-separated (NAME or VAULT/NAME).
    #[arg(long, value_name = "NAME,…", value_delimiter = ',')]
    pub prefetch: Vec<String>,
    /// Fail if a prefetched secret expires sooner than this.
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    pub min_validity: String,
    /// Where the audit log goes (Azure ML uploads ./outputs with the run).
    #[arg(long, value_name = "DIR", default_value = "outputs/kvbroker")]
    pub audit_dir: PathBuf,
    /// Do not mask served values in the command's stdout and stderr (recorded in the audit
    /// log's agent.start). By default every value served to the job, and its JSON, base64 and
    /// URL encodings, becomes *** before it reaches the job's log.
    #[arg(long)]
    pub no_mask: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `kvbroker policy explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The agent's config file (its policy and default vault are used).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// A running process to judge, read from /proc.
    #[arg(long, conflicts_with_all = ["uid", "gid", "groups", "exe", "cgroup"])]
    pub pid: Option<u32>,
    /// A caller given by hand: its uid.
    #[arg(long)]
    pub uid: Option<u32>,
    /// Its primary gid (default: the uid).
    #[arg(long, requires = "uid")]
    pub gid: Option<u32>,
    /// Its supplementary groups, comma-separated.
    #[arg(long, requires = "uid", value_delimiter = ',')]
    pub groups: Vec<u32>,
    /// Its executable path (also hashed, if a rule uses exe_sha256).
    #[arg(long, requires = "uid")]
    pub exe: Option<String>,
    /// Its cgroup v2 path (systemd_unit and container_id are derived from it).
    #[arg(long, requires = "uid")]
    pub cgroup: Option<String>,
    /// The secret, as VAULT/NAME (or NAME for the default vault).
    pub secret: String,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Cached secrets (names, versions, ages, errors), audit and policy state.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Refresh one secret from the vault now.
    Refresh {
        /// The secret's name.
        name: String,
        /// The vault alias (default: the default vault).
        #[arg(long)]
        vault: Option<String>,
    },
    /// Reload the policy file (like SIGHUP); the old policy stays if the new one is bad.
    Reload,
}

fn parse_connect_to(s: &str) -> Result<crate::config::ConnectTo, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of one or more audit files, oldest first.
    Verify {
        /// Audit files in chain order (rotated files first: audit.jsonl.3 … .1, audit.jsonl).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The HMAC key file, for logs written in keyed mode.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Who read what, when: a table by default, JSON lines with --json, counts with --summary.
    Query {
        /// Audit files, oldest first.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// NAME or VAULT/NAME (case-insensitive; * and ? allowed).
        #[arg(long)]
        secret: Option<String>,
        /// Only this caller uid.
        #[arg(long)]
        uid: Option<u32>,
        /// allowed, denied, error (reads) or ok, failed (other events).
        #[arg(long)]
        outcome: Option<String>,
        /// An RFC 3339 time, or a duration back from now (1h, 30m).
        #[arg(long)]
        since: Option<String>,
        /// Print the matching records as JSON lines.
        #[arg(long, conflicts_with = "summary")]
        json: bool,
        /// Reads per secret per caller (uid and unit or exe), and denials.
        #[arg(long)]
        summary: bool,
    },
    /// Print the last records of a live log, then follow it (across rotation) until Ctrl-C.
    Tail {
        /// The live audit file.
        file: PathBuf,
        /// How many existing records to show first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Print raw JSON lines.
        #[arg(long)]
        json: bool,
    },
}

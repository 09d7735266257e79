//! `kvb`: read secrets from the local kvbroker agent, for shell scripts and non-Rust jobs.
//!
//! Exit codes: 0 success; 1 a failure the message explains; 2 bad usage; 3 denied by policy.

mod cli;
mod exec;

use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use kvbroker_client::{Error, GetOptions, blocking::Client};

use cli::{Cli, Command};

/// How a command failed, which decides the exit code.
pub(crate) enum Failure {
    Usage(String),
    Denied(String),
    Other(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::PermissionDenied(_) => Failure::Denied(e.to_string()),
            Error::InvalidRequest(_) => Failure::Usage(e.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match cli.socket {
        Some(p) => Client::with_socket(p),
        None => Client::new(),
    };
    let result = client.map_err(Failure::from).and_then(|client| run(&client, cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("kvb: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Denied(m)) => {
            eprintln!("kvb: {m}");
            ExitCode::from(3)
        }
        Err(Failure::Other(m)) => {
            eprintln!("kvb: {m}");
            ExitCode::from(1)
        }
    }
}

fn run(client: &Client, command: Command) -> Result<(), Failure> {
    match command {
        Command::Get { name, vault, version, output } => {
            let mut opts = GetOptions::default();
            if let Some(v) = vault {
                opts = opts.vault(v);
            }
            if let Some(v) = version {
                opts = opts.version(v);
            }
            let secret = client.get_with(&name, &opts)?;
            match output {
                Some(path) => write_private(&path, secret.expose_secret())
                    .map_err(|e| Failure::Other(format!("cannot write {}: {e}", path.display()))),
                None => {
                    let mut out = std::io::stdout().lock();
                    let newline = out.is_terminal();
                    out.write_all(secret.expose_secret())
                        .and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) })
                        .and_then(|()| out.flush())
                        .map_err(|e| Failure::Other(format!("cannot write to standard output: {e}")))
                }
            }
        }
        Command::Watch { name, vault } => {
            let mut opts = GetOptions::default();
            if let Some(v) = vault {
                opts = opts.vault(v);
            }
            client.watch(&name, &opts, |version| {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{version}").and_then(|()| out.flush()).is_ok()
            })?;
            Ok(())
        }
        Command::Exec { env, vault, command } => Err(exec::run(client, &env, vault.as_deref(), &command)),
    }
}

/// Writes `bytes` to `path` with mode 0600: into a new file beside it, then renamed over,
/// so no reader ever sees a partial value or a wider mode.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("not a file path"))?;
    let tmp = dir.join(format!(".{}.kvb-{}", name.to_string_lossy(), std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

//! `kvbroker-emulator [--dir DIR] [--secrets FILE]`: Azure Key Vault and the managed identity
//! endpoints on 127.0.0.1, for testing kvbroker (or anything that talks to Key Vault)
//! offline. Prints its JSON description as the first line of output, writes the same to
//! `DIR/emulator.json` with an agent config beside it, and runs until SIGTERM or Ctrl-C.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Azure Key Vault and the managed identity endpoints, on 127.0.0.1 only, for trying and
/// testing kvbroker offline.
///
/// At start it writes into DIR: ca.pem (the CA of its TLS certificate), emulator.json (how to
/// reach it; also printed as the first line of output), and agent.toml with policy.toml: a
/// config that `kvbroker run --config DIR/agent.toml` uses as it is, reading this emulator's
/// secrets through IMDS, with a socket and audit log in DIR and a policy letting the user who
/// started the emulator read every secret. The files are rewritten at each start (the ports
/// change). Runs until SIGTERM or Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "kvbroker-emulator", version, after_help = AFTER_HELP)]
struct Cli {
    /// Where to write ca.pem, emulator.json, agent.toml and policy.toml (and where the agent
    /// config puts the agent's socket and audit log). Created if missing.
    #[arg(long, value_name = "DIR", default_value = ".kvbroker-emulator")]
    dir: PathBuf,

    /// The secrets to start with: a TOML file of `name = "value"` lines, each loaded as that
    /// secret's first version. More versions can be added through Key Vault's PUT or the
    /// control API. Default: none (an empty vault).
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
}

const AFTER_HELP: &str = "\
Then, in another terminal:
  kvbroker run --config DIR/agent.toml
  KVBROKER_SOCKET=DIR/agent.sock kvb get NAME

docs/emulator.md describes emulator.json, the control API and fault injection.";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let secrets = match cli.secrets.as_deref().map(load_secrets).transpose() {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            eprintln!("kvbroker-emulator: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvbroker-emulator: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let emu = match kvbroker_tests::emulator::Emulator::start(&cli.dir, secrets).await {
            Ok(e) => e,
            Err(e) => {
                eprintln!("kvbroker-emulator: {e}");
                return ExitCode::from(1);
            }
        };
        println!("{}", serde_json::to_string(&emu.info).unwrap_or_default());
        // For a person at a terminal; scripts read the JSON line on stdout.
        if std::io::stderr().is_terminal() {
            let dir = emu.info.agent_config.parent().unwrap_or(&cli.dir).display();
            eprintln!(
                "\nkvbroker-emulator: Key Vault at {} (on 127.0.0.1)\n\nRun the agent against it:\n  \
                 kvbroker run --config {}\nthen read a secret:\n  KVBROKER_SOCKET={dir}/agent.sock kvb get NAME\n\n\
                 Stop with Ctrl-C.",
                emu.info.vault_url,
                emu.info.agent_config.display(),
            );
        }
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return ExitCode::from(1);
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        ExitCode::SUCCESS
    })
}

/// Reads `name = "value"` pairs. Errors name the file and never quote a value.
fn load_secrets(f: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| format!("{}: not a TOML file of name = \"value\": {}", f.display(), e.message()))?;
    table
        .into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => Ok((k, s)),
            _ => Err(format!("{}: {k} is not a string", f.display())),
        })
        .collect()
}

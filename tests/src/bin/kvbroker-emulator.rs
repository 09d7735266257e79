//! `kvbroker-emulator --dir DIR [--secrets FILE]`: Azure Key Vault and the managed identity
//! endpoints on 127.0.0.1, for testing kvbroker (or anything that talks to Key Vault)
//! offline. Prints its JSON description as the first line of output, writes the same to
//! `DIR/emulator.json`, and runs until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: kvbroker-emulator --dir DIR [--secrets FILE]   (FILE: TOML of name = \"value\")");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut secrets_file) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--secrets" => secrets_file = args.next().map(PathBuf::from),
            "-h" | "--help" => return usage(),
            _ => return usage(),
        }
    }
    let Some(dir) = dir else { return usage() };
    let mut secrets = Vec::new();
    if let Some(f) = secrets_file {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("kvbroker-emulator: {}: {e}", f.display());
                return ExitCode::from(1);
            }
        };
        let table: toml::Table = match toml::from_str(&text) {
            Ok(t) => t,
            Err(e) => {
                eprintln!(
                    "kvbroker-emulator: {}: not a TOML file of name = \"value\": {}",
                    f.display(),
                    e.message()
                );
                return ExitCode::from(1);
            }
        };
        for (k, v) in table {
            match v {
                toml::Value::String(s) => secrets.push((k, s)),
                _ => {
                    eprintln!("kvbroker-emulator: {}: {k} is not a string", f.display());
                    return ExitCode::from(1);
                }
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvbroker-emulator: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let emu = match kvbroker_tests::emulator::Emulator::start(&dir, secrets).await {
            Ok(e) => e,
            Err(e) => {
                eprintln!("kvbroker-emulator: {e}");
                return ExitCode::from(1);
            }
        };
        println!("{}", serde_json::to_string(&emu.info).unwrap_or_default());
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return ExitCode::from(1);
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        ExitCode::SUCCESS
    })
}

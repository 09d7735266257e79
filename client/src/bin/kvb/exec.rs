//! `kvb exec`: fetch every secret first, then replace this process with the command.
//! Nothing is exec'd if any read fails, so a job never starts half-configured.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;

use kvbroker_client::{GetOptions, SecretValue, blocking::Client};

use crate::Failure;

pub(crate) fn run(client: &Client, env: &[String], vault: Option<&str>, command: &[String]) -> Failure {
    let mut pairs: Vec<(&str, SecretValue)> = Vec::with_capacity(env.len());
    let mut opts = GetOptions::default();
    if let Some(v) = vault {
        opts = opts.vault(v);
    }
    for spec in env {
        let Some((var, name)) = spec.split_once('=') else {
            return Failure::Usage(format!("--env {spec:?}: write VAR=NAME"));
        };
        let valid_var = !var.is_empty()
            && !var.as_bytes()[0].is_ascii_digit()
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_var {
            return Failure::Usage(format!("--env {spec:?}: {var:?} is not an environment variable name"));
        }
        match crate::get_retrying(client, name, &opts) {
            Ok(s) => {
                let value = s.into_value();
                if value.expose_secret().contains(&0) {
                    return Failure::Other(format!(
                        "secret {name} contains a NUL byte and cannot go in an environment variable; \
                         use kvb get -o FILE instead"
                    ));
                }
                pairs.push((var, value));
            }
            Err(f) => return f,
        }
    }
    let Some((program, args)) = command.split_first() else {
        return Failure::Usage("no command given after --".into());
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    for (var, value) in &pairs {
        cmd.env(var, OsStr::from_bytes(value.expose_secret()));
    }
    // Only returns on failure.
    exec_failure(program, &cmd.exec())
}

/// What a shell would say and exit with when it cannot start `program`: 127 if there is no
/// such command, 126 if it exists but cannot be executed.
fn exec_failure(program: &str, err: &std::io::Error) -> Failure {
    match err.kind() {
        std::io::ErrorKind::NotFound if program.contains('/') => {
            Failure::Exec(127, format!("{program}: no such file or directory"))
        }
        std::io::ErrorKind::NotFound => Failure::Exec(127, format!("{program}: command not found in PATH")),
        std::io::ErrorKind::PermissionDenied => Failure::Exec(
            126,
            format!("{program}: permission denied (is it a directory, or missing the execute bit?)"),
        ),
        _ => Failure::Exec(126, format!("{program}: cannot execute: {}", io_reason(err))),
    }
}

/// An I/O error's reason without Rust's " (os error N)" suffix.
fn io_reason(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.rsplit_once(" (os error ") {
        Some((reason, _)) => reason.to_owned(),
        None => text,
    }
}

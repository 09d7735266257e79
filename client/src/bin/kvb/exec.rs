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
        match client.get_with(name, &opts) {
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
            Err(e) => return Failure::from(e),
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
    let err = cmd.exec();
    Failure::Other(format!("cannot run {program}: {err}"))
}

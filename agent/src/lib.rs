//! The kvbroker agent: a node-local secret broker for Azure Key Vault.
//!
//! `main.rs` only parses the command line and maps [`Error`] to an exit code; everything
//! else lives here so tests drive the same code. Modules, lowest first (an arrow only ever
//! points down this list; docs/architecture.md draws it):
//!
//! - `sys`: every `unsafe` syscall wrapper. `shutdown`: signals. `terminal`: escaping and
//!   tables for what commands print. `supervise`: restarting background tasks that die.
//!   `metrics`: the Prometheus counters every layer above counts into.
//! - `peer`: kernel-attested caller facts. [`config`]: TOML → validated `Config`.
//! - `policy`: deciding. `identity`: managed identity credentials, over `transport` (rustls,
//!   connect_to overrides, loopback-only guard). `kube`: the node's kubelet and its pod
//!   cache, for `k8s_*` selectors.
//! - `vault`: secret backends. [`audit`]: the hash-chained audit log, its verifier and query.
//! - `cache`: single-flight fetches, refresh-ahead, stale-on-error, versions, long polls.
//! - `state`: what the two sockets share (policy in force, cache, auditor, limits).
//! - `server`: the agent socket; `admin`: the admin socket and `kvbroker ctl`'s client.
//! - `app`: wiring and the run loop; `notify`: systemd's READY/STATUS/WATCHDOG/STOPPING,
//!   earned by a health round trip through the agent's own socket (`probe`, lowest layer).
//! - `commands`: one module per subcommand; [`cli`]: their clap types.
//!
//! No module logs or formats a secret value; values live only in `SecretValue`.

mod admin;
mod app;
pub mod audit;
mod cache;
pub mod cli;
mod commands;
pub mod config;
mod gather;
mod identity;
mod kube;
mod metrics;
mod notify;
mod peer;
mod policy;
mod probe;
mod rate;
mod server;
mod shutdown;
mod state;
mod supervise;
mod sys;
mod terminal;
mod transport;
mod trust;
mod vault;

pub use cli::{AuditCommand, Cli, Command, CtlCommand, PolicyCommand};
pub use commands::dev::DevError;
pub use commands::execute;
pub use commands::explain::ExplainError;
pub use commands::launch::LaunchError;
pub use commands::rotate::RotateError;
pub use config::Config;
pub use sys::ZeroOnFree;
pub use trust::Untrusted;

/// Everything that can stop a command. Each message says what failed and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Vault(#[from] vault::VaultSetupError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Socket(#[from] server::SocketError),
    #[error(transparent)]
    Verify(#[from] audit::verify::VerifyError),
    #[error(transparent)]
    Query(#[from] audit::query::QueryError),
    #[error(transparent)]
    Ctl(#[from] admin::client::CtlError),
    #[error(transparent)]
    Rotate(#[from] RotateError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Explain(#[from] ExplainError),
    #[error(transparent)]
    Dev(#[from] DevError),
    #[error(transparent)]
    Kubelet(#[from] kube::KubeletError),
    #[error("cannot start the async runtime: {0} (is the process out of threads or memory?)")]
    Runtime(std::io::Error),
}

/// Entry points for the fuzz targets in `proto/fuzz/` (docs/fuzzing.md), for parsers that are
/// not otherwise public. Not an API: nothing outside the fuzz targets may use it.
#[doc(hidden)]
pub mod fuzz_api {
    use std::path::Path;

    /// Parses and validates policy text, as `Policy::load` does after reading the file.
    pub fn policy_from_toml(text: &str) -> Result<(), String> {
        crate::policy::Policy::from_toml(Path::new("fuzz/policy.toml"), text)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Parses and validates config text, as `Config::load` does after reading the file.
    pub fn config_from_toml(text: &str) -> Result<(), String> {
        crate::config::Config::from_toml(Path::new("fuzz/config.toml"), text)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Starts a real agent in this process — `kvbroker dev`'s setup under `dir`: a local vault
    /// of demo secrets, a policy for this process's uid, an audit log — on a thread of its
    /// own, and returns its socket once it accepts connections. For the `http_request` fuzz
    /// target, which sends each input to it as the bytes of a request.
    pub fn start_agent(dir: &Path) -> Result<std::path::PathBuf, String> {
        crate::sys::ignore_sigpipe();
        let path = crate::commands::dev::prepare(dir).map_err(|e| e.to_string())?;
        let config = crate::config::Config::load(&path).map_err(|e| e.to_string())?;
        let socket = config.agent.socket.clone();
        let runtime = crate::commands::runtime().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let ran =
                runtime.block_on(crate::app::run_until(config, crate::app::RunInfo::default(), None, |_| {
                    std::future::pending::<Result<((), &'static str), crate::Error>>()
                }));
            // The agent stopping is the finding: say why and end the run.
            let why = ran.err().map_or_else(|| "no error".to_owned(), |e| e.to_string());
            eprintln!("the fuzzed agent stopped: {why}");
            std::process::abort();
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(format!("{}: the agent did not start serving within 20 s", socket.display()));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(socket)
    }

    /// `kvbroker audit verify` over `bytes` as the one log file, with `key` if given.
    pub fn audit_verify(bytes: &[u8], key: Option<&[u8]>) -> Result<u64, String> {
        crate::audit::verify::verify_bytes(Path::new("fuzz/audit.log"), bytes, key)
            .map(|v| v.records)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod layering {
    //! The module map in this crate's doc, enforced: every `crate::…` path in a module names
    //! a module on its own layer or a lower one (docs/architecture.md).

    use std::path::Path;

    /// Lowest first. A module may use modules on its own layer or below.
    const LAYERS: &[&[&str]] = &[
        &[
            "sys",
            "shutdown",
            "transport",
            "rate",
            "terminal",
            "trust",
            "supervise",
            "probe",
            "metrics",
            "gather",
        ],
        &["peer", "config"],
        &["policy", "identity", "kube"],
        &["vault", "audit"],
        &["cache"],
        &["state"],
        &["server", "admin"],
        &["app", "notify"],
        &["commands", "cli"],
    ];

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&module))
    }

    /// The top-level modules a source text names through `crate::`.
    fn uses(text: &str) -> Vec<String> {
        let ident =
            |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
        let mut out = Vec::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                out.extend(inner.split(',').map(|p| ident(p.trim())).filter(|p| !p.is_empty()));
            } else {
                out.push(ident(rest));
            }
        }
        out
    }

    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|e| e == "rs") {
                files.push(p);
            }
        }
    }

    #[test]
    fn every_module_uses_only_its_layer_or_below() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let mut wrong = Vec::new();
        for file in &files {
            let rel = file.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_owned();
            if top == "lib" || top == "main" {
                continue;
            }
            let from = layer(&top).unwrap_or_else(|| panic!("module {top} is not in LAYERS"));
            for used in uses(&std::fs::read_to_string(file).unwrap()) {
                // The crate root's items (`Error`, re-exports) are not a layer.
                if used.chars().next().is_some_and(char::is_uppercase) || used == top {
                    continue;
                }
                match layer(&used) {
                    Some(to) if to <= from => {}
                    _ => wrong.push(format!("{} uses crate::{used}", rel.display())),
                }
            }
        }
        assert!(wrong.is_empty(), "arrows pointing up (or to unknown modules):\n{}", wrong.join("\n"));
    }

    #[test]
    fn finds_plain_and_grouped_uses() {
        let text = "use crate::state::State;\nuse crate::{Error, cli, peer};\nlet x = crate::sys::f();";
        assert_eq!(uses(text), ["state", "Error", "cli", "peer", "sys"]);
    }
}

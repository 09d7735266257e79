//! The kvbroker agent: a node-local secret broker for Azure Key Vault.
//!
//! `main.rs` only parses the command line and maps [`Error`] to an exit code; everything
//! else lives here so tests drive the same code. Modules, lowest first (an arrow only ever
//! points down this list; docs/architecture.md draws it):
//!
//! - `sys`: every `unsafe` syscall wrapper. `shutdown`: signals.
//! - `peer`: kernel-attested caller facts. [`config`]: TOML → validated `Config`.
//! - `policy`: deciding. `identity`: managed identity credentials, over `transport` (rustls,
//!   connect_to overrides, loopback-only guard).
//! - `vault`: secret backends. [`audit`]: the hash-chained audit log, its verifier and query.
//! - `cache`: single-flight fetches, refresh-ahead, stale-on-error, versions, long polls.
//! - `state`: what the two sockets share (policy in force, cache, auditor, limits).
//! - `server`: the agent socket; `admin`: the admin socket and `kvbroker ctl`'s client.
//! - `app`: wiring and the run loop.
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
mod identity;
mod peer;
mod policy;
mod server;
mod shutdown;
mod state;
mod sys;
mod transport;
mod vault;

pub use cli::{AuditCommand, Cli, Command, CtlCommand, PolicyCommand};
pub use commands::dev::DevError;
pub use commands::execute;
pub use commands::explain::ExplainError;
pub use commands::launch::LaunchError;
pub use commands::rotate::RotateError;
pub use config::Config;
pub use sys::ZeroOnFree;

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
    #[error("cannot start the async runtime: {0} (is the process out of threads or memory?)")]
    Runtime(std::io::Error),
}

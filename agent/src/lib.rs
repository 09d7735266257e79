//! The kvbroker agent: a node-local secret broker for Azure Key Vault.
//!
//! `main.rs` only parses the command line and maps [`Error`] to an exit code; everything
//! else lives here so tests drive the same code. Module map (docs/architecture.md):
//!
//! - [`config`]: TOML → validated `Config`.
//! - `app`: wiring and the run loop; `server`: the socket and HTTP; `shutdown`: signals.
//! - `peer`: kernel-attested caller facts; `policy`: deciding; `vault`: secret backends.
//! - `identity`: managed identity credentials; `transport`: the HTTP client they and the
//!   Key Vault client use (rustls, connect_to overrides, loopback-only guard).
//! - `cache`: single-flight fetches, refresh-ahead, stale-on-error, versions, long polls.
//! - `audit`: the hash-chained audit log and its verifier.
//!
//! No module logs or formats a secret value; values live only in `SecretValue`.

mod admin;
pub mod app;
pub mod audit;
mod cache;
pub mod cli;
pub mod config;
pub mod dev;
mod explain;
mod identity;
pub mod launch;
pub(crate) mod peer;
mod policy;
mod rate;
pub mod rotate;
mod server;
mod shutdown;
mod transport;
mod vault;

use std::process::ExitCode;

pub use app::RunInfo;
pub use cli::{AuditCommand, Cli, Command, CtlCommand, PolicyCommand};
pub use config::Config;
pub use peer::sys::ZeroOnFree;

/// Everything that can stop a command.
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
    Ctl(#[from] admin::CtlError),
    #[error(transparent)]
    Rotate(#[from] rotate::RotateError),
    #[error("launch: {0}")]
    Launch(String),
    #[error("policy explain: {0}")]
    Explain(String),
    #[error("kvbroker dev: {0}")]
    Dev(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs a parsed command line; returns the exit code for success and explained failures.
pub fn execute(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(app::run(config, RunInfo::default()))?;
        }
        Command::Dev { dir } => {
            let path = dev::prepare(&dir)?;
            let config = Config::load(&path)?;
            println!("{}", dev::banner(&config));
            runtime()?.block_on(app::run(config, RunInfo::default()))?;
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            vault::Vaults::from_config(&config)?;
            let policy = policy::Policy::load(&config.policy.file)?;
            println!(
                "{}: ok ({} vault(s), {} policy rule(s))",
                config.path.display(),
                config.vaults.len(),
                policy.len()
            );
        }
        Command::Ctl { config, socket, command } => {
            let socket = match (socket, config) {
                (Some(s), _) => s,
                (None, Some(c)) => Config::load(&c)?.agent.admin_socket,
                (None, None) => std::path::PathBuf::from("/run/kvbroker/admin.sock"),
            };
            return runtime()?.block_on(ctl(&socket, command));
        }
        Command::Rotate {
            vault,
            name,
            from_file,
            generate,
            identity,
            client_id,
            ca_file,
            connect_to,
            loopback_only,
        } => {
            let value = match (from_file, generate) {
                (Some(f), None) => rotate::NewValue::File(f),
                (None, Some(n)) => rotate::NewValue::Generate(n),
                _ => {
                    return Err(Error::Rotate(rotate::RotateError::Input(
                        "give exactly one of --from-file FILE or --generate BYTES".into(),
                    )));
                }
            };
            let target = rotate::RotateTarget {
                vault_url: vault,
                name,
                source: identity,
                client_id,
                ca_file,
                connect_to,
                loopback_only,
            };
            let version = runtime()?.block_on(rotate::rotate(target, value))?;
            println!("{version}");
        }
        Command::Launch { config, vault, prefetch, min_validity, audit_dir, command } => {
            return launch::launch(launch::LaunchArgs {
                config,
                vaults: vault,
                prefetch,
                min_validity: config::parse_duration(&min_validity).map_err(Error::Launch)?,
                audit_dir,
                command,
            });
        }
        Command::Policy {
            command: PolicyCommand::Explain { config, pid, uid, gid, groups, exe, cgroup, secret },
        } => {
            let config = Config::load(&config)?;
            let policy = policy::Policy::load(&config.policy.file)?;
            let facts = match (pid, uid) {
                (Some(pid), None) => {
                    peer::facts_of_pid(pid).map_err(|e| Error::Explain(format!("--pid {pid}: {e}")))?
                }
                (None, Some(uid)) => peer::PeerFacts::given(uid, gid.unwrap_or(uid), groups, exe, cgroup),
                _ => {
                    return Err(Error::Explain(
                        "give --pid PID, or --uid U with optional --gid, --groups, --exe, --cgroup".into(),
                    ));
                }
            };
            let (vault, name) = match secret.split_once('/') {
                Some((v, n)) => (v.to_owned(), n.to_owned()),
                None => match config.default_vault() {
                    Some(v) => (v.to_string(), secret.clone()),
                    None => {
                        return Err(Error::Explain(format!("{secret}: write VAULT/NAME (no default vault)")));
                    }
                },
            };
            name.parse::<kvbroker_proto::SecretName>().map_err(|e| Error::Explain(format!("{name}: {e}")))?;
            let (text, _) = explain::render(&policy, &facts, &vault, &name);
            print!("{text}");
        }
        Command::Audit {
            command: AuditCommand::Query { files, secret, uid, outcome, since, json, summary },
        } => {
            let filter = audit::query::Filter { secret, uid, outcome, since };
            print!("{}", audit::query::query(&files, &filter, json, summary)?);
        }
        Command::Audit { command: AuditCommand::Tail { file, lines, json } } => {
            use std::io::Write;
            audit::query::tail(&file, lines, json, |s| {
                let mut out = std::io::stdout().lock();
                out.write_all(s.as_bytes()).and_then(|()| out.flush()).is_ok()
            })?;
        }
        Command::Audit { command: AuditCommand::Verify { files, key_file } } => {
            let key = key_file.as_deref().map(audit::read_key).transpose()?;
            let v = audit::verify::verify(&files, key.as_ref().map(|k| k.as_slice()))?;
            println!(
                "ok: {} record(s) in {} file(s), seq {}..{}, head {}",
                v.records, v.files, v.first_seq, v.last_seq, v.head
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn ctl(socket: &std::path::Path, command: CtlCommand) -> Result<ExitCode, Error> {
    use http::Method;
    match command {
        CtlCommand::Status { json } => {
            let (_, v) = admin::call(socket, Method::GET, "/v1/status").await?;
            if json {
                println!("{v}");
            } else {
                print!("{}", admin::render_status(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        CtlCommand::Refresh { name, vault } => {
            let mut path = format!("/v1/refresh?name={name}");
            if let Some(v) = vault {
                path.push_str(&format!("&vault={v}"));
            }
            let (status, v) = admin::call(socket, Method::POST, &path).await?;
            if status == 200 {
                println!(
                    "refreshed {}/{}: version {}",
                    v["vault"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("?"),
                    v["version"].as_str().unwrap_or("?")
                );
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Error::Ctl(admin::CtlError::Refused(format!(
                    "refresh {name}: {}",
                    v["error"].as_str().unwrap_or("failed")
                ))))
            }
        }
        CtlCommand::Reload => {
            let (status, v) = admin::call(socket, Method::POST, "/v1/reload").await?;
            let message = v["message"].as_str().unwrap_or("?").to_owned();
            if status == 200 {
                println!("policy reloaded: {message}");
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Error::Ctl(admin::CtlError::Refused(format!("policy reload failed: {message}"))))
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(Error::Runtime)
}

//! `kvbroker launch`: a private broker for one job's process tree, for places where no
//! node-level agent can run (Azure ML compute clusters and serverless compute).
//!
//! The launcher is the agent. It serves on a socket in a fresh directory (mode 0700, owned
//! by the job's uid), fetches `--prefetch` secrets and fails fast if one is missing,
//! disabled, not yet valid or about to expire, then runs the command — in the same process
//! group — with `KVBROKER_SOCKET` set. Only the command and its verified descendants are
//! served (a config file's policy can narrow that further). SIGTERM and SIGINT are forwarded
//! to the command; when it exits, the cache is wiped, `agent.stop` written, the socket and
//! directory removed, and the launcher exits with the command's status (128 + signal if it
//! was killed).
//!
//! Unless `--no-mask`, the command's stdout and stderr are pipes the launcher copies to its
//! own through a `proto::mask::Masker` each: the server teaches the masker every value just
//! before it answers with it, so whatever the job prints of it (as is, JSON/repr-escaped,
//! base64, URL-encoded) reaches the log as `***`. Each stream keeps its order and every masked
//! chunk is flushed at once.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kvbroker_proto::SecretPath;
use kvbroker_proto::mask::{MaskValues, Masker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use zeroize::Zeroizing;

use crate::app::{self, RunInfo};
use crate::config::{Config, LaunchDefaults};
use crate::state::{LaunchRoot, State};
use crate::{Error, cli, peer};

/// Why `kvbroker launch` could not run the command (or lost track of it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    #[error("launch: no command given after --")]
    NoCommand,
    #[error("launch: give --config or --vault, not both")]
    ConfigAndVault,
    #[error("launch: give --vault https://NAME.vault.azure.net (or --config FILE)")]
    NoVault,
    #[error("launch: --min-validity {value:?}: {reason}")]
    MinValidity { value: String, reason: String },
    #[error("launch: {path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("launch: cannot create a private socket directory under {base} (16 names were taken)")]
    NoPrivateDir { base: PathBuf },
    #[error("launch: prefetch {secret}: {reason}; the command was not started")]
    Prefetch { secret: String, reason: String },
    #[error("launch: cannot run {command}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("launch: {what}: {source}")]
    Watch { what: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
}

/// What `kvbroker launch` was asked to do, checked.
struct LaunchArgs {
    config: Option<PathBuf>,
    vaults: Vec<String>,
    prefetch: Vec<String>,
    min_validity: Duration,
    audit_dir: PathBuf,
    mask: bool,
    command: Vec<String>,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError {
    let path = path.to_owned();
    move |source| LaunchError::Io { path, what, source }
}

/// `kvbroker launch`: the command's exit status, or why it could not run.
pub(crate) fn command(a: cli::LaunchArgs) -> Result<ExitCode, Error> {
    let min_validity = crate::config::parse_duration(&a.min_validity)
        .map_err(|reason| LaunchError::MinValidity { value: a.min_validity.clone(), reason })?;
    launch(LaunchArgs {
        config: a.config,
        vaults: a.vault,
        prefetch: a.prefetch,
        min_validity,
        audit_dir: a.audit_dir,
        mask: !a.no_mask,
        command: a.command,
    })
}

/// Runs the command under a private broker; returns its exit status.
fn launch(args: LaunchArgs) -> Result<ExitCode, Error> {
    if args.command.is_empty() {
        return Err(LaunchError::NoCommand.into());
    }
    let dir = PrivateDir::create()?;
    std::fs::create_dir_all(&args.audit_dir)
        .map_err(io_err("cannot create the audit directory", &args.audit_dir))?;
    let audit_dir = args.audit_dir.canonicalize().unwrap_or_else(|_| args.audit_dir.clone());
    let config = config_for(&args, &dir.0, &audit_dir)?;
    let socket = config.agent.socket.clone();
    let mask = args.mask.then(|| Arc::new(MaskValues::new()));
    let info = RunInfo {
        run_id: std::env::var("AZUREML_RUN_ID").ok().filter(|v| !v.is_empty()),
        mask: mask.clone(),
        output_masking: Some(args.mask),
    };
    let root: LaunchRoot = Arc::new(std::sync::OnceLock::new());
    crate::sys::limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let code = rt.block_on(app::run_until(config, info, Some(Arc::clone(&root)), |ctx| async move {
        prefetch(&ctx, &args.prefetch, args.min_validity).await?;
        ctx.set_ready();
        run_command(&args.command, &socket, &root, mask).await
    }))?;
    drop(dir);
    Ok(ExitCode::from(code))
}

/// The fresh directory holding the sockets (and a default policy); removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> Result<Self, LaunchError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        for _ in 0..16 {
            let p = base.join(format!("kvbroker-launch-{:016x}", fastrand::u64(..)));
            match std::fs::create_dir(&p) {
                Ok(()) => {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))
                        .map_err(io_err("cannot set mode 0700", &p))?;
                    return Ok(Self(p));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("cannot create the private socket directory", &p)(e)),
            }
        }
        Err(LaunchError::NoPrivateDir { base })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's config: the given file with its sockets and audit log moved into place, or
/// one built from `--vault`.
fn config_for(args: &LaunchArgs, dir: &Path, audit_dir: &Path) -> Result<Config, Error> {
    let uid = std::fs::metadata(dir).map_err(io_err("cannot inspect", dir))?.uid();
    // Only the job's own uid; the launch check adds "and a descendant of the command". Used
    // with --vault, and with --config when the file has no [policy].
    let policy = dir.join("policy.toml");
    let write_policy = || {
        std::fs::write(
            &policy,
            format!("[[rule]]\nname = \"launched-job\"\nuids = [{uid}]\nsecrets = [\"*/*\"]\n"),
        )
        .map_err(io_err("cannot write the launch policy", &policy))
    };
    let mut config = match (&args.config, args.vaults.as_slice()) {
        (Some(_), [_, ..]) => return Err(LaunchError::ConfigAndVault.into()),
        (Some(path), []) => {
            write_policy()?;
            let defaults = LaunchDefaults { audit: audit_dir.join("audit.jsonl"), policy: policy.clone() };
            Config::load_for_launch(path, &defaults)?
        }
        (None, []) => return Err(LaunchError::NoVault.into()),
        (None, urls) => {
            write_policy()?;
            let mut text = String::from("[identity]\nsource = \"auto\"\n");
            for (i, url) in urls.iter().enumerate() {
                let alias = if i == 0 { "default".to_owned() } else { format!("vault{}", i + 1) };
                text.push_str(&format!("[[vault]]\nalias = {alias:?}\nurl = {url:?}\n"));
            }
            text.push_str(&format!("[audit]\npath = \"audit.jsonl\"\n[policy]\nfile = {:?}\n", policy));
            Config::from_toml(&dir.join("launch.toml"), &text)?
        }
    };
    config.agent.socket = dir.join("agent.sock");
    config.agent.admin_socket = dir.join("admin.sock");
    config.agent.socket_mode = 0o600;
    config.agent.socket_group = None;
    config.audit.path = audit_dir.join("audit.jsonl");
    Ok(config)
}

/// Fetches each `--prefetch` secret; fails if one is missing, not usable, or expires within
/// `min_validity`.
async fn prefetch(ctx: &State, names: &[String], min_validity: Duration) -> Result<(), LaunchError> {
    for spec in names {
        let bad = |reason: String| LaunchError::Prefetch { secret: spec.clone(), reason };
        let (asked, name) = spec.parse::<SecretPath>().map_err(|e| bad(e.to_string()))?.into_parts();
        let vault =
            ctx.cache.vaults().resolve(asked.as_ref()).cloned().ok_or_else(|| bad("no such vault".into()))?;
        let got = ctx.cache.get(&vault, &name, None).await.map_err(|e| bad(e.to_string()))?;
        let now = SystemTime::now();
        if let Some(why) = got.fetched.unusable(|| now) {
            return Err(bad(format!("not usable: {why}")));
        }
        if let Some(exp) = got.fetched.expires_on {
            let left = exp.duration_since(now).unwrap_or_default();
            if left < min_validity {
                return Err(bad(format!(
                    "expires in {}s (exp {}), sooner than --min-validity {}s",
                    left.as_secs(),
                    humantime::format_rfc3339_seconds(exp),
                    min_validity.as_secs()
                )));
            }
        }
        tracing::info!(secret = %spec, version = %got.fetched.version, "prefetched");
    }
    Ok(())
}

/// Runs the command, forwarding SIGTERM/SIGINT; returns its exit status as a shell would.
async fn run_command(
    command: &[String],
    socket: &Path,
    root: &LaunchRoot,
    mask: Option<Arc<MaskValues>>,
) -> Result<(u8, &'static str), Error> {
    let mut term = signal(SignalKind::terminate()).map_err(Error::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Runtime)?;
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]).env(kvbroker_proto::SOCKET_ENV, socket);
    if mask.is_some() {
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    }
    let mut child =
        cmd.spawn().map_err(|source| LaunchError::Spawn { command: command[0].clone(), source })?;
    let pumps = mask.map(|m| {
        [
            child.stdout.take().map(|o| tokio::spawn(pump(o, tokio::io::stdout(), Arc::clone(&m)))),
            child.stderr.take().map(|e| tokio::spawn(pump(e, tokio::io::stderr(), Arc::clone(&m)))),
        ]
    });
    let pid = child.id().ok_or_else(|| LaunchError::Watch {
        what: "the command exited before it could be watched",
        source: "no pid".into(),
    })?;
    // Pin the pid to this process: descendants are checked against (pid, start time).
    let start = peer::start_time_of(pid)
        .map_err(|e| LaunchError::Watch { what: "cannot read the command's start time", source: e.into() })?;
    let _ = root.set((pid, start));
    let status = loop {
        tokio::select! {
            s = child.wait() => break s.map_err(|e| LaunchError::Watch { what: "waiting for the command", source: e.into() })?,
            _ = term.recv() => forward(pid, libc::SIGTERM),
            _ = int.recv() => forward(pid, libc::SIGINT),
        }
    };
    // Let the output drain (a background process the command left may hold the pipes open:
    // wait for it a little, not forever).
    if let Some(pumps) = pumps {
        let _ = tokio::time::timeout(DRAIN_GRACE, async {
            for p in pumps.into_iter().flatten() {
                let _ = p.await;
            }
        })
        .await;
    }
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
        (None, None) => 1,
    };
    Ok((code, "the launched command exited"))
}

/// After the command exits, how long its masked output may still drain.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Copies `from` to `to` through a masker, flushing each masked chunk. If `to` fails (the
/// reader went away), the rest is read and dropped so the command never blocks on a full
/// pipe.
async fn pump<R, W>(mut from: R, mut to: W, values: Arc<MaskValues>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut masker = Masker::new(values);
    // What the command wrote may hold a value: both buffers are wiped when dropped.
    let mut buf = Zeroizing::new(vec![0u8; 64 * 1024]);
    let mut out = Zeroizing::new(Vec::with_capacity(64 * 1024 + 1024));
    let mut writable = true;
    loop {
        out.clear();
        let n = from.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            masker.finish(&mut out);
        } else {
            masker.push(&buf[..n], &mut out);
        }
        if writable && !out.is_empty() {
            writable = to.write_all(&out).await.is_ok() && to.flush().await.is_ok();
        }
        if n == 0 {
            return;
        }
    }
}

fn forward(pid: u32, sig: libc::c_int) {
    tracing::info!(pid, signal = sig, "forwarding signal to the launched command");
    if let Err(e) = crate::sys::send_signal(pid, sig) {
        tracing::warn!(error = %e, "cannot forward the signal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    #[test]
    fn vault_flags_build_a_private_config() {
        let dir = PrivateDir::create().unwrap();
        let args = LaunchArgs {
            config: None,
            vaults: vec!["https://a.vault.azure.net".into(), "https://b.vault.azure.net".into()],
            prefetch: vec![],
            min_validity: Duration::ZERO,
            audit_dir: dir.0.join("audit"),
            mask: true,
            command: vec!["true".into()],
        };
        let c = config_for(&args, &dir.0, &dir.0.join("audit")).unwrap();
        assert_eq!(c.agent.socket, dir.0.join("agent.sock"));
        assert_eq!(c.agent.socket_mode, 0o600);
        assert_eq!(c.audit.path, dir.0.join("audit").join("audit.jsonl"));
        assert_eq!(c.default_vault().unwrap().as_str(), "default");
        assert!(
            matches!(&c.vaults[1].backend, BackendConfig::KeyVault { url, .. } if url == "https://b.vault.azure.net")
        );
        let policy = std::fs::read_to_string(&c.policy.file).unwrap();
        assert!(policy.contains("uids = [0]"), "{policy}");
        let with_both = LaunchArgs { config: Some("x.toml".into()), ..args };
        assert!(config_for(&with_both, &dir.0, &dir.0).is_err());
        let path = dir.0.clone();
        drop(dir);
        assert!(!path.exists(), "the private directory is removed");
    }
}

//! `kvb exec`: fetch every secret first, then run the command with the values in its
//! environment. Nothing is started if any read fails, so a job never starts half-configured.
//!
//! By default the command's stdout and stderr go through a [`Masker`] (`proto::mask`): kvb
//! stays as the parent, pumps each stream through its own masker to its own stdout or
//! stderr (each keeps its order; every chunk is flushed as it is masked, so a terminal stays
//! line by line), forwards SIGTERM, SIGINT and SIGHUP to the command, and exits with its
//! status (128 + signal if it was killed). `--no-mask` keeps the old behaviour: kvb replaces
//! itself with the command.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;

use std::sync::Arc;
use std::time::Duration;

use kvbroker_client::{GetOptions, SecretValue, blocking::Client};
use kvbroker_proto::mask::{MaskValues, Masker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use zeroize::Zeroizing;

use crate::Failure;

/// After the command exits, how long its output may still drain (a background process it
/// left behind may hold the pipes open); then kvb exits.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

pub(crate) fn run(
    client: &Client,
    env: &[String],
    vault: Option<&str>,
    mask: bool,
    command: &[String],
) -> Failure {
    let mut pairs: Vec<(&str, SecretValue)> = Vec::with_capacity(env.len());
    // (name, version) of each value handed over: the masker follows their rotations.
    let mut served: Vec<(String, String)> = Vec::with_capacity(env.len());
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
                served.push((name.to_owned(), s.version().to_owned()));
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
    if !mask {
        // Only returns on failure.
        return exec_failure(program, &cmd.exec());
    }
    let values = Arc::new(MaskValues::new());
    for (_, value) in &pairs {
        values.learn(value.expose_secret());
    }
    drop(pairs);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Failure::Other(format!("cannot start the output masker: {e}")),
    };
    let follow = Follow {
        client: kvbroker_client::Client::builder().socket(client.socket_path()).build(),
        opts,
        served,
    };
    rt.block_on(run_masked(program, cmd, values, follow))
}

/// The secrets handed to the command, followed while it runs so that a new version the
/// command reads for itself (a rotation) is masked too.
struct Follow {
    client: kvbroker_client::Client,
    opts: GetOptions,
    served: Vec<(String, String)>,
}

impl Follow {
    /// One long poll per secret; each new version's value is taught to the masker. Passing
    /// errors (agent restarting, vault failing) are retried after a pause; a denial or a
    /// deleted secret ends that follow. Masking what is known goes on regardless.
    fn spawn(self, values: &Arc<MaskValues>) -> Vec<tokio::task::JoinHandle<()>> {
        self.served
            .into_iter()
            .map(|(name, version)| {
                let mut watch = self.client.watch_with(&name, &self.opts).after_version(&version);
                let values = Arc::clone(values);
                tokio::spawn(async move {
                    loop {
                        match watch.next().await {
                            Ok(secret) => {
                                values.learn(secret.expose_secret());
                            }
                            // No longer ours to read (policy changed, secret deleted): stop.
                            Err(
                                kvbroker_client::Error::PermissionDenied(_)
                                | kvbroker_client::Error::SecretNotFound(_)
                                | kvbroker_client::Error::InvalidRequest(_),
                            ) => return,
                            Err(_) => tokio::time::sleep(FOLLOW_RETRY).await,
                        }
                    }
                })
            })
            .collect()
    }
}

/// How long a failed follow of a rotation waits before asking again.
const FOLLOW_RETRY: Duration = Duration::from_secs(2);

/// Runs the command with its output masked; the command's status as a shell reports it.
async fn run_masked(
    program: &str,
    cmd: std::process::Command,
    values: Arc<MaskValues>,
    follow: Follow,
) -> Failure {
    let signals = [SignalKind::terminate(), SignalKind::interrupt(), SignalKind::hangup()]
        .map(|kind| signal(kind).map(|s| (kind.as_raw_value(), s)));
    let mut signals = match signals.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(s) => s,
        Err(e) => return Failure::Other(format!("cannot set up signal forwarding: {e}")),
    };
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return exec_failure(program, &e),
    };
    let pid = child.id();
    let followers = follow.spawn(&values);
    let pumps = [
        child.stdout.take().map(|o| tokio::spawn(pump(o, tokio::io::stdout(), Arc::clone(&values)))),
        child.stderr.take().map(|e| tokio::spawn(pump(e, tokio::io::stderr(), Arc::clone(&values)))),
    ];
    let status = loop {
        let any_signal = futures_any(&mut signals);
        tokio::select! {
            s = child.wait() => break s,
            sig = any_signal => {
                if let Some(pid) = pid {
                    forward(pid, sig);
                }
            }
        }
    };
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        for p in pumps.into_iter().flatten() {
            let _ = p.await;
        }
    });
    let _ = drained.await;
    for f in followers {
        f.abort();
    }
    match status {
        Ok(s) => Failure::Exit(exit_code(s)),
        Err(e) => Failure::Other(format!("lost track of {program}: {}", io_reason(&e))),
    }
}

/// The first of `signals` to arrive, as its number.
async fn futures_any(signals: &mut [(i32, tokio::signal::unix::Signal)]) -> i32 {
    std::future::poll_fn(|cx| {
        for (n, s) in signals.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*n);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The exit code a shell would report: the code, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
        (None, None) => 1,
    }
}

/// Copies `from` to `to` through a masker, flushing each masked chunk. If `to` fails (the
/// reader went away), the rest is read and dropped so the command is never blocked on a
/// full pipe.
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

/// Sends `sig` to the command (kvb no longer `exec`s, so signals meant for the job reach kvb).
#[allow(unsafe_code, reason = "kill(2) has no safe wrapper in std; one call, no pointers")]
fn forward(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes no pointers. The pid is our own unreaped child (it is reaped only
    // by `child.wait()`, which has not returned), so it cannot have been reused.
    unsafe {
        libc::kill(pid, sig);
    }
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

//! `kvb exec`: fetch every secret first, then run the command with the values in its
//! environment (`--env VAR=NAME`) or in sealed in-memory files (`--file-env VAR=NAME`:
//! `VAR=/proc/KVB_PID/fd/N`). Nothing is started if any read fails, so a job never starts
//! half-configured.
//!
//! By default the command's stdout and stderr go through a [`Masker`] (`proto::mask`): kvb
//! stays as the parent, pumps each stream through its own masker to its own stdout or
//! stderr (each keeps its order; every chunk is flushed as it is masked, so a terminal stays
//! line by line), forwards SIGTERM, SIGINT and SIGHUP to the command, and exits with its
//! status (128 + signal if it was killed). `--no-mask` without `--restart-on-change` keeps
//! the old behaviour: kvb replaces itself with the command.
//!
//! `--restart-on-change`: kvb follows every secret it handed over; when one rotates, it
//! stops the command (`--signal`, default TERM; SIGKILL after `--grace`) and starts it again
//! with the new values. When the command exits by itself, kvb exits with its status.
//!
//! A `--file-env` memfd is created close-on-exec and stays in kvb alone: the command gets
//! the path `/proc/KVB_PID/fd/N`, which it opens like any file (the kernel lets a process of
//! kvb's uid open it, as it lets it read kvb's memory; no other uid can). No process kvb
//! starts holds the fd — not the command, not its children — so nothing can leak it by
//! inheritance, and it is closed when the command exits (a restart gets a new one). kvb
//! therefore stays as the command's parent whenever `--file-env` is used, even with
//! `--no-mask`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;

use kvbroker_client::{Client, Error, GetOptions, Secret};
use kvbroker_proto::mask::{MaskValues, Masker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use zeroize::Zeroizing;

use crate::Failure;

/// After the command exits, how long its output may still drain (a background process it
/// left behind may hold the pipes open); then kvb exits.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What `kvb exec` was asked to do.
pub(crate) struct ExecArgs {
    pub(crate) env: Vec<String>,
    pub(crate) file_env: Vec<String>,
    pub(crate) vault: Option<String>,
    pub(crate) mask: bool,
    pub(crate) restart: bool,
    /// The signal that stops the command before a restart.
    pub(crate) stop_signal: Option<String>,
    /// How long it may take to stop before SIGKILL.
    pub(crate) grace: Option<String>,
    pub(crate) command: Vec<String>,
}

/// One `--env` or `--file-env`.
struct Spec {
    var: String,
    name: String,
    file: bool,
}

pub(crate) fn run(client: &crate::Client, a: ExecArgs) -> Failure {
    let specs = match parse_specs(&a.env, &a.file_env) {
        Ok(s) => s,
        Err(f) => return f,
    };
    let Some((program, args)) = a.command.split_first() else {
        return Failure::Usage("no command given after --".into());
    };
    let stop_signal = match a.stop_signal.as_deref().map(|s| (s, crate::sys::parse_signal(s))) {
        None => libc::SIGTERM,
        Some((_, Some(n))) => n,
        Some((s, None)) => {
            return Failure::Usage(format!("--signal {s:?}: not a signal name (TERM, HUP…) or number"));
        }
    };
    let grace = match a.grace.as_deref().map(parse_duration) {
        None => Duration::from_secs(10),
        Some(Some(d)) => d,
        Some(None) => return Failure::Usage("--grace: write a duration like 10s, 500ms or 2m".into()),
    };
    let mut opts = GetOptions::default();
    if let Some(v) = &a.vault {
        opts = opts.vault(v);
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Failure::Other(format!("cannot start: {e}")),
    };
    let async_client = Client::builder().socket(client.socket_path()).build();
    let fetched = match rt.block_on(fetch_all(&async_client, &specs, &opts)) {
        Ok(f) => f,
        Err(f) => return f,
    };
    let launch = match Launch::new(program, args, &specs, &fetched) {
        Ok(l) => l,
        Err(f) => return f,
    };
    if !a.mask && !a.restart && a.file_env.is_empty() {
        let Launch { mut cmd, memfds } = launch;
        // Only returns on failure; the memfds stay open across the exec (in this process).
        let e = cmd.exec();
        drop(memfds);
        return exec_failure(program, &e);
    }
    let values = Arc::new(MaskValues::new());
    for s in &fetched {
        values.learn(s.expose_secret());
    }
    let plan = Plan {
        program,
        args,
        specs: &specs,
        opts,
        client: async_client,
        mask: a.mask,
        restart: a.restart.then_some((stop_signal, grace)),
    };
    rt.block_on(supervise(plan, launch, fetched, values))
}

fn parse_specs(env: &[String], file_env: &[String]) -> Result<Vec<Spec>, Failure> {
    let both = env.iter().map(|s| (s, false)).chain(file_env.iter().map(|s| (s, true)));
    let mut out = Vec::new();
    for (spec, file) in both {
        let flag = if file { "--file-env" } else { "--env" };
        let Some((var, name)) = spec.split_once('=') else {
            return Err(Failure::Usage(format!("{flag} {spec:?}: write VAR=NAME")));
        };
        let valid_var = !var.is_empty()
            && !var.as_bytes()[0].is_ascii_digit()
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_var {
            return Err(Failure::Usage(format!(
                "{flag} {spec:?}: {var:?} is not an environment variable name"
            )));
        }
        out.push(Spec { var: var.to_owned(), name: name.to_owned(), file });
    }
    if out.is_empty() {
        return Err(Failure::Usage("give at least one --env VAR=NAME or --file-env VAR=NAME".into()));
    }
    Ok(out)
}

/// Reads every secret, waiting out the agent's rate limit a few times; the first failure
/// stops everything.
async fn fetch_all(client: &Client, specs: &[Spec], opts: &GetOptions) -> Result<Vec<Secret>, Failure> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut retries = 0;
        let secret = loop {
            match client.get_with(&spec.name, opts).await {
                Err(Error::TooManyRequests { retry_after, .. }) if retries < 3 => {
                    retries += 1;
                    tokio::time::sleep(crate::retry_wait(retry_after)).await;
                }
                other => break other.map_err(Failure::from)?,
            }
        };
        if !spec.file && secret.expose_secret().contains(&0) {
            return Err(Failure::Other(format!(
                "secret {} contains a NUL byte and cannot go in an environment variable; \
                 use --file-env {}={} instead",
                spec.name, spec.var, spec.name
            )));
        }
        out.push(secret);
    }
    Ok(out)
}

/// The command, ready to start, with the memfds its `--file-env` paths name.
struct Launch {
    cmd: std::process::Command,
    memfds: Vec<OwnedFd>,
}

impl Launch {
    fn new(program: &str, args: &[String], specs: &[Spec], fetched: &[Secret]) -> Result<Launch, Failure> {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        let mut memfds = Vec::new();
        for (spec, secret) in specs.iter().zip(fetched) {
            if spec.file {
                let fd = crate::sys::sealed_memfd(&spec.name, secret.expose_secret()).map_err(|e| {
                    Failure::Other(format!("cannot create the in-memory file for {}: {e}", spec.name))
                })?;
                cmd.env(&spec.var, format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()));
                memfds.push(fd);
            } else {
                cmd.env(&spec.var, OsStr::from_bytes(secret.expose_secret()));
            }
        }
        Ok(Launch { cmd, memfds })
    }
}

/// Everything needed to start the command again.
struct Plan<'a> {
    program: &'a str,
    args: &'a [String],
    specs: &'a [Spec],
    opts: GetOptions,
    client: Client,
    mask: bool,
    /// `--restart-on-change`: the stop signal and the grace before SIGKILL.
    restart: Option<(i32, Duration)>,
}

/// Runs the command (restarting it on rotations if asked) until it exits by itself; its
/// status as a shell reports it.
async fn supervise(plan: Plan<'_>, first: Launch, fetched: Vec<Secret>, values: Arc<MaskValues>) -> Failure {
    let signals = [SignalKind::terminate(), SignalKind::interrupt(), SignalKind::hangup()]
        .map(|kind| signal(kind).map(|s| (kind.as_raw_value(), s)));
    let mut signals = match signals.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(s) => s,
        Err(e) => return Failure::Other(format!("cannot set up signal forwarding: {e}")),
    };
    // The version of each secret the running command was given.
    let mut current: HashMap<String, String> =
        plan.specs.iter().zip(&fetched).map(|(s, f)| (s.name.clone(), f.version().to_owned())).collect();
    drop(fetched);
    let (tx, mut rotated) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let followers = follow(&plan, &current, &values, plan.restart.is_some().then_some(tx));
    let mut launch = first;
    let outcome = loop {
        let mut cmd = tokio::process::Command::from(launch.cmd);
        if plan.mask {
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        }
        let spawned = cmd.spawn();
        // Open in kvb (only) while this command runs: its --file-env paths name them.
        let memfds = launch.memfds;
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => break exec_failure(plan.program, &e),
        };
        let pid = child.id();
        let pumps = [
            child.stdout.take().map(|o| tokio::spawn(pump(o, tokio::io::stdout(), Arc::clone(&values)))),
            child.stderr.take().map(|e| tokio::spawn(pump(e, tokio::io::stderr(), Arc::clone(&values)))),
        ];
        let why = loop {
            let any_signal = futures_any(&mut signals);
            tokio::select! {
                s = child.wait() => break Ok(s),
                sig = any_signal => {
                    if let Some(pid) = pid {
                        forward(pid, sig);
                    }
                }
                Some((name, version)) = rotated.recv() => {
                    if current.get(&name) != Some(&version) {
                        break Err((name, version));
                    }
                }
            }
        };
        let status = match why {
            Ok(s) => {
                drain(pumps).await;
                break match s {
                    Ok(s) => Failure::Exit(exit_code(s)),
                    Err(e) => Failure::Other(format!("lost track of {}: {}", plan.program, io_reason(&e))),
                };
            }
            Err((name, version)) => {
                // Rotations are reported only with --restart-on-change.
                let (sig, grace) = plan.restart.unwrap_or((libc::SIGTERM, DRAIN_GRACE));
                eprintln!("kvb: {name} rotated to version {version}: restarting {}", plan.program);
                stop(&mut child, sig, grace).await
            }
        };
        drain(pumps).await;
        drop(memfds);
        if let Err(e) = status {
            break Failure::Other(format!("lost track of {}: {}", plan.program, io_reason(&e)));
        }
        let fetched = match fetch_all(&plan.client, plan.specs, &plan.opts).await {
            Ok(f) => f,
            Err(f) => break f,
        };
        for s in &fetched {
            values.learn(s.expose_secret());
        }
        current =
            plan.specs.iter().zip(&fetched).map(|(s, f)| (s.name.clone(), f.version().to_owned())).collect();
        launch = match Launch::new(plan.program, plan.args, plan.specs, &fetched) {
            Ok(l) => l,
            Err(f) => break f,
        };
    };
    for f in followers {
        f.abort();
    }
    outcome
}

/// Stops the command: `sig`, then SIGKILL if it is still running after `grace`.
async fn stop(child: &mut tokio::process::Child, sig: i32, grace: Duration) -> std::io::Result<()> {
    if let Some(pid) = child.id() {
        forward(pid, sig);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => {
            eprintln!("kvb: the command did not stop within {grace:?}: killing it");
            child.kill().await
        }
    }
}

/// Waits for the output pumps of a command that has exited, for at most [`DRAIN_GRACE`].
async fn drain(pumps: [Option<tokio::task::JoinHandle<()>>; 2]) {
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        for p in pumps.into_iter().flatten() {
            let _ = p.await;
        }
    });
    let _ = drained.await;
}

/// Follows each secret handed over: a new version's value is taught to the masker (so a
/// value the command reads for itself is masked too) and, with `--restart-on-change`,
/// reported on `tx`. The watch waits out a restarting agent; a denial or a deleted secret
/// ends that follow.
fn follow(
    plan: &Plan<'_>,
    current: &HashMap<String, String>,
    values: &Arc<MaskValues>,
    tx: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    current
        .iter()
        .map(|(name, version)| {
            let mut watch = plan.client.watch_with(name, &plan.opts).after_version(version);
            let (values, tx, name) = (Arc::clone(values), tx.clone(), name.clone());
            tokio::spawn(async move {
                loop {
                    match watch.next().await {
                        Ok(secret) => {
                            values.learn(secret.expose_secret());
                            if let Some(tx) = &tx {
                                let _ = tx.send((name.clone(), secret.version().to_owned()));
                            }
                        }
                        Err(
                            Error::PermissionDenied(_) | Error::SecretNotFound(_) | Error::InvalidRequest(_),
                        ) => {
                            return;
                        }
                        Err(_) => tokio::time::sleep(FOLLOW_RETRY).await,
                    }
                }
            })
        })
        .collect()
}

/// How long a failed follow of a rotation waits before asking again.
const FOLLOW_RETRY: Duration = Duration::from_secs(2);

/// `10s`, `500ms`, `2m`, or a number of seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        _ => None,
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
/// The pid is our own unreaped child (reaped only by `child.wait()`), so it is not reused.
fn forward(pid: u32, sig: i32) {
    let _ = crate::sys::kill(pid, sig);
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

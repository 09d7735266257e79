//! Files that follow rotations (`kvb get -o FILE --follow`, `kvb render --follow`): each new
//! content is written to a fresh file beside FILE and renamed over it (a reader sees the old
//! file or the new one, never a part), mode 0600, owner and group kept; then the consumer is
//! told (`--on-change CMD`, or `--signal SIG` to `--pid`/`--pid-file`).
//!
//! Never prints a value: messages name the file, the secret and the version.

use std::path::{Path, PathBuf};

use kvbroker_client::{Client, GetOptions};
use zeroize::Zeroizing;

use crate::Failure;

/// What to do after FILE was rewritten.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    Nothing,
    /// `sh -c CMD`, with `KVB_FILE` (and `KVB_VERSION` for one secret) in its environment.
    Run(String),
    Signal {
        sig: i32,
        target: Target,
    },
}

#[derive(Debug, Clone)]
pub(crate) enum Target {
    Pid(u32),
    /// Read at each signal, so a restarted consumer is found.
    PidFile(PathBuf),
}

impl Action {
    /// From `--on-change`, `--signal`, `--pid` and `--pid-file`, checked together.
    pub(crate) fn from_args(
        on_change: Option<String>,
        signal: Option<String>,
        pid: Option<u32>,
        pid_file: Option<PathBuf>,
    ) -> Result<Action, Failure> {
        match (on_change, signal, pid, pid_file) {
            (None, None, None, None) => Ok(Action::Nothing),
            (Some(cmd), None, None, None) => Ok(Action::Run(cmd)),
            (None, Some(s), p, f) => {
                let sig = crate::sys::parse_signal(&s).ok_or_else(|| {
                    Failure::Usage(format!("--signal {s:?}: not a signal name (HUP, USR1, TERM…) or number"))
                })?;
                let target = match (p, f) {
                    (Some(p), None) => Target::Pid(p),
                    (None, Some(f)) => Target::PidFile(f),
                    _ => {
                        return Err(Failure::Usage(
                            "--signal needs exactly one of --pid PID or --pid-file FILE".into(),
                        ));
                    }
                };
                Ok(Action::Signal { sig, target })
            }
            (Some(_), Some(_), ..) => Err(Failure::Usage("give --on-change or --signal, not both".into())),
            _ => Err(Failure::Usage("--pid and --pid-file go with --signal SIG".into())),
        }
    }
}

/// FILE and what to do when it changes.
pub(crate) struct Sink {
    pub(crate) path: PathBuf,
    pub(crate) action: Action,
}

impl Sink {
    /// Writes `bytes` to FILE unless it already holds exactly them, then runs the action if
    /// the content changed. On the first write the action runs only if FILE existed with
    /// other content (a consumer may be reading an old value); a new FILE has no reader yet.
    pub(crate) async fn deliver(
        &self,
        bytes: &[u8],
        version: Option<&str>,
        first: bool,
    ) -> Result<(), Failure> {
        let before = read_existing(&self.path);
        if before.as_ref().is_some_and(|b| b.as_slice() == bytes) {
            return Ok(());
        }
        crate::write_private(&self.path, bytes)
            .map_err(|e| Failure::Other(format!("cannot write {}: {e}", self.path.display())))?;
        match version {
            Some(v) => eprintln!("kvb: {}: version {v} written", self.path.display()),
            None => eprintln!("kvb: {}: rendered", self.path.display()),
        }
        if first && before.is_none() {
            return Ok(());
        }
        self.notify(version).await;
        Ok(())
    }

    /// Runs the action; its failure is reported and following goes on (the next rotation
    /// tries again).
    async fn notify(&self, version: Option<&str>) {
        match &self.action {
            Action::Nothing => {}
            Action::Run(cmd) => {
                let mut c = tokio::process::Command::new("sh");
                c.arg("-c").arg(cmd).env("KVB_FILE", &self.path).stdin(std::process::Stdio::null());
                if let Some(v) = version {
                    c.env("KVB_VERSION", v);
                }
                match c.status().await {
                    Ok(s) if s.success() => {}
                    Ok(s) => eprintln!("kvb: --on-change command failed ({s}); still following"),
                    Err(e) => eprintln!("kvb: cannot run --on-change command with sh: {e}; still following"),
                }
            }
            Action::Signal { sig, target } => {
                let pid = match target {
                    Target::Pid(p) => Ok(*p),
                    Target::PidFile(f) => std::fs::read_to_string(f)
                        .map_err(|e| format!("cannot read {}: {e}", f.display()))
                        .and_then(|t| {
                            t.trim()
                                .parse::<u32>()
                                .map_err(|_| format!("{} does not hold a pid", f.display()))
                        }),
                };
                let sent = pid.and_then(|p| {
                    crate::sys::kill(p, *sig).map_err(|e| format!("cannot signal pid {p}: {e}"))
                });
                if let Err(e) = sent {
                    eprintln!("kvb: {e}; still following");
                }
            }
        }
    }
}

/// FILE's current content, if it is a regular file kvb can read (else `None`: it will be
/// replaced, and a consumer told only if one could have read something).
fn read_existing(path: &Path) -> Option<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let len = usize::try_from(meta.len()).ok()?.min(1 << 24);
    // Sized up front: the buffer never reallocates, so no unwiped copy is left.
    let mut buf = Zeroizing::new(Vec::with_capacity(len + 1));
    f.by_ref().take(len as u64 + 1).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// `kvb get NAME -o FILE --follow`: writes the current version, then each new one, until
/// killed or the secret can no longer be read (denied, deleted).
pub(crate) fn get(socket: &Path, name: &str, opts: &GetOptions, sink: Sink) -> Failure {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Failure::Other(format!("cannot start: {e}")),
    };
    rt.block_on(async {
        let client = Client::builder().socket(socket).build();
        let mut watch = client.watch_with(name, opts);
        let mut first = true;
        loop {
            let secret = match watch.next().await {
                Ok(s) => s,
                Err(e) => return Failure::from(e),
            };
            if let Err(f) = sink.deliver(secret.expose_secret(), Some(secret.version()), first).await {
                return f;
            }
            first = false;
        }
    })
}

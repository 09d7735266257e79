//! `kvb`: read secrets from the local kvbroker agent, for shell scripts and non-Rust jobs.
//!
//! Exit codes: 0 success; 1 a failure the message explains; 2 bad usage; 3 denied by policy;
//! from `kvb exec`, 126 when the command cannot be executed and 127 when it is not found
//! (as a shell does).

mod cli;
mod exec;
mod follow;
mod render;
mod sys;

use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kvbroker_client::{Error, GetOptions, Secret, blocking::Client};

use cli::{Cli, Command};

/// How a command failed, which decides the exit code.
pub(crate) enum Failure {
    Usage(String),
    Denied(String),
    Other(String),
    /// `kvb exec` could not start the command: 126 or 127, like a shell.
    Exec(u8, String),
    /// `kvb exec` ran the command (masking its output): exit with its status, say nothing.
    Exit(u8),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::PermissionDenied(_) => Failure::Denied(e.to_string()),
            Error::InvalidRequest(_) => Failure::Usage(e.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match cli.socket {
        Some(p) => Client::with_socket(p),
        None => Client::new(),
    };
    let result = client.map_err(Failure::from).and_then(|client| run(&client, cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("kvb: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Denied(m)) => {
            eprintln!("kvb: {m}");
            ExitCode::from(3)
        }
        Err(Failure::Other(m)) => {
            eprintln!("kvb: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Exec(code, m)) => {
            eprintln!("kvb: {m}");
            ExitCode::from(code)
        }
        Err(Failure::Exit(code)) => ExitCode::from(code),
    }
}

fn run(client: &Client, command: Command) -> Result<(), Failure> {
    match command {
        Command::Get { name, vault, version, output, follow, notify } => {
            let mut opts = GetOptions::default();
            if let Some(v) = vault {
                opts = opts.vault(v);
            }
            if let Some(v) = version {
                opts = opts.version(v);
            }
            if let (true, Some(path)) = (follow, output.as_ref()) {
                let action =
                    follow::Action::from_args(notify.on_change, notify.signal, notify.pid, notify.pid_file)?;
                let sink = follow::Sink { path: path.clone(), action };
                return Err(follow::get(client.socket_path(), &name, &opts, sink));
            }
            if let Some(path) = &output {
                replaceable(path)
                    .map_err(|e| Failure::Other(format!("cannot write {}: {e}", path.display())))?;
            }
            let secret = get_retrying(client, &name, &opts)?;
            match output {
                Some(path) => write_private(&path, secret.expose_secret())
                    .map_err(|e| Failure::Other(format!("cannot write {}: {e}", path.display()))),
                None => {
                    let mut out = std::io::stdout().lock();
                    let newline = out.is_terminal();
                    out.write_all(secret.expose_secret())
                        .and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) })
                        .and_then(|()| out.flush())
                        .map_err(|e| Failure::Other(format!("cannot write to standard output: {e}")))
                }
            }
        }
        Command::Watch { name, vault } => {
            let mut opts = GetOptions::default();
            if let Some(v) = vault {
                opts = opts.vault(v);
            }
            client.watch(&name, &opts, |version| {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{version}").and_then(|()| out.flush()).is_ok()
            })?;
            Ok(())
        }
        Command::Render { template, output, vault, follow, notify } => {
            let action =
                follow::Action::from_args(notify.on_change, notify.signal, notify.pid, notify.pid_file)?;
            let sink = follow::Sink { path: output, action };
            match render::run(client.socket_path(), &template, vault.as_deref(), follow, sink) {
                Failure::Exit(0) => Ok(()),
                f => Err(f),
            }
        }
        Command::Exec { env, file_env, vault, no_mask, restart_on_change, signal, grace, command } => {
            let args = exec::ExecArgs {
                env,
                file_env,
                vault,
                mask: !no_mask,
                restart: restart_on_change,
                stop_signal: signal,
                grace,
                command,
            };
            Err(exec::run(client, args))
        }
    }
}

/// Retries after a 429 at most this many times.
const MAX_RETRIES: u32 = 3;
/// Never waits longer than this for one retry, whatever `Retry-After` says.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Reads a secret, waiting out the agent's rate limit a few times (`Retry-After`, capped)
/// before giving up with a message that says so.
pub(crate) fn get_retrying(client: &Client, name: &str, opts: &GetOptions) -> Result<Secret, Failure> {
    let mut retries = 0;
    loop {
        match client.get_with(name, opts) {
            Err(Error::TooManyRequests { retry_after, .. }) if retries < MAX_RETRIES => {
                retries += 1;
                std::thread::sleep(retry_wait(retry_after));
            }
            Err(e @ Error::TooManyRequests { .. }) => {
                return Err(Failure::Other(format!("gave up after {MAX_RETRIES} retries: {e}")));
            }
            other => return other.map_err(Failure::from),
        }
    }
}

/// How long to wait before retrying: `Retry-After` (1 s if absent or zero), at most
/// [`MAX_RETRY_WAIT`].
pub(crate) fn retry_wait(retry_after: Option<Duration>) -> Duration {
    retry_after.filter(|d| !d.is_zero()).unwrap_or(Duration::from_secs(1)).min(MAX_RETRY_WAIT)
}

/// Writes `bytes` to `path` with mode 0600: into a new file beside it, then renamed over,
/// so no reader ever sees a partial value or a wider mode. A file already there keeps its
/// owner and group (the new file is given them before the rename; if that is not allowed,
/// nothing is replaced). The directory is synced after the rename. Only a regular file is
/// ever replaced: a device (`/dev/null`, `/dev/stdout`), a FIFO, a socket, a directory or a
/// symlink at `path` is refused, never swapped for a file holding the value.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replaceable(path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("not a file path"))?;
    // An unpredictable temporary name, created with O_EXCL (never through a file or symlink
    // someone else put there) and retried on a clash: someone who can write the directory
    // can neither guess it in advance nor make the write fail by squatting a name.
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let tmp = dir.join(format!(".{}.kvb-{}", name.to_string_lossy(), random_suffix()));
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let written = keep_owner(&f, path)
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a crash only once the directory is synced.
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Whether `path` may be replaced by a file holding a value: nothing there, or a regular
/// file. A device (`/dev/null`, `/dev/stdout`), a FIFO, a socket, a directory or a symlink
/// is refused — checked before the value is even asked for, and again before writing.
pub(crate) fn replaceable(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            let what = if m.file_type().is_symlink() {
                "a symlink (give the path of the file it names)"
            } else if m.is_dir() {
                "a directory"
            } else {
                "a device, FIFO or socket"
            };
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "it is {what}, and kvb replaces only regular files: choose a file path, or omit -o for standard output"
                ),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Gives the new file `f` the owner and group of the file at `path`, if there is one and
/// they differ from the new file's.
fn keep_owner(f: &std::fs::File, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(old) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let new = f.metadata()?;
    if !old.is_file() || (old.uid(), old.gid()) == (new.uid(), new.gid()) {
        return Ok(());
    }
    std::os::unix::fs::fchown(f, Some(old.uid()), Some(old.gid())).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot keep its owner {}:{} ({e}); run kvb as that user or as root",
                old.uid(),
                old.gid()
            ),
        )
    })
}

/// 128 random bits in hex, from the kernel (falling back to std's randomly keyed hasher).
pub(crate) fn random_suffix() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        use std::hash::{BuildHasher, Hasher};
        for chunk in b.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13: the temporary name was `.NAME.kvb-PID`, so anyone who could write the
    /// directory could squat it and make `kvb get -o` fail. The old name no longer matters,
    /// the file is 0600, and no temporary file is left behind.
    #[test]
    fn write_private_survives_a_squatted_temporary_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kvb-wp-{}", random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let squat = dir.join(format!(".out.kvb-{}", std::process::id()));
        std::fs::write(&squat, "someone else's").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join(".out.kvb-0")).unwrap();
        write_private(&out, b"value").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"value");
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 3, "only out and the two squatters: {left:?}");
        let a = random_suffix();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_suffix());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `kvb get NAME -o PATH` replaced whatever was at PATH: as root, `-o /dev/null` would
    /// have left the value in a file where the device was. Only regular files are replaced.
    #[test]
    fn write_private_replaces_only_a_regular_file() {
        use std::os::unix::fs::FileTypeExt;
        let dir = std::env::temp_dir().join(format!("kvb-wp-{}", random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, "kept").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        for (path, said) in [(&link, "a symlink"), (&fifo, "a device, FIFO or socket"), (&sub, "a directory")]
        {
            let e = write_private(path, b"value").unwrap_err();
            assert!(e.to_string().contains(said), "{}: {e}", path.display());
        }
        // A socket stands for a device here: were the check to regress, a test run as root
        // must not replace a real `/dev` entry.
        let sock = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = write_private(&sock, b"value").unwrap_err();
        assert!(e.to_string().contains("a device, FIFO or socket"), "{e}");
        assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(std::fs::read(&target).unwrap(), b"kept");
        // A regular file is replaced, as before.
        write_private(&target, b"value").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"value");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 5, "no temporary file left behind: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn retry_waits_follow_retry_after_within_the_cap() {
        assert_eq!(retry_wait(Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert_eq!(retry_wait(Some(Duration::from_secs(3600))), MAX_RETRY_WAIT);
        assert_eq!(retry_wait(Some(Duration::ZERO)), Duration::from_secs(1));
        assert_eq!(retry_wait(None), Duration::from_secs(1));
    }
}

//! Files and directories that decide access: the socket's directory (and every directory
//! above it), the policy, local vault files and the audit HMAC key. Whoever can write one of
//! them can swap the socket or rewrite who may read what, so each must be owned by root or
//! by the agent's own user, and writable by no one else. Checked at startup, by
//! `check-config`, and at every policy reload.
//!
//! Those files are read only if they are regular files of bounded size ([`read_regular`]):
//! a FIFO or a device named there would block or never end.
//!
//! One exception, for directories *above* the socket's own: a sticky directory such as
//! `/tmp` (mode 1777, owned by root) may be writable by all, because the sticky bit stops
//! anyone but an entry's owner from renaming or removing it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file or directory that others than root (or the agent's user) could change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Untrusted {
    #[error(
        "{path}: {what} is owned by uid {uid}, so that user could change it: run `chown root {path}` \
         (or run the agent as that user)"
    )]
    Owner { path: PathBuf, what: &'static str, uid: u32 },
    #[error("{path}: {what} is writable by group or others (mode {mode:04o}): run `chmod go-w {path}`")]
    Writable { path: PathBuf, what: &'static str, mode: u32 },
    #[error("{path}: cannot inspect {what}: {reason}")]
    Unreadable { path: PathBuf, what: &'static str, reason: String },
}

/// Reads the file at `path` (after symlinks), if it is a regular file of at most `max`
/// bytes. Anything else is refused before a byte is read: a FIFO would block the reader
/// until someone writes to it, a device such as `/dev/zero` never ends, and a runaway file
/// would be held whole in memory. It is opened without blocking (opening a FIFO waits for a
/// writer otherwise), and what is read is what was checked (the opened file's own
/// metadata). The errors say which and what to do. What was read is wiped if it is refused
/// (a vault file's text holds values).
pub(crate) fn read_regular_bytes(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let (f, m) = open_regular(path)?;
    let too_large = |size: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {size} bytes, more than the {max} such a file may be: is it the right file?"),
        )
    };
    if m.len() > max {
        return Err(too_large(m.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(m.len()).unwrap_or(0) + 1);
    let read = (&f).take(max + 1).read_to_end(&mut bytes);
    if read.is_err() || bytes.len() as u64 > max {
        let size = bytes.len() as u64;
        zeroize::Zeroize::zeroize(&mut bytes);
        return Err(read.err().unwrap_or_else(|| too_large(size)));
    }
    Ok(bytes)
}

/// Opens the regular file at `path` (after symlinks) for reading, with its metadata, or says
/// why not: a FIFO, socket, device or directory is refused before anything is read. The open
/// itself does not block (opening a FIFO waits for a writer otherwise); the reads then do,
/// as for any file (some filesystems would answer a non-blocking read with `EAGAIN`).
pub(crate) fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        let kind = if m.is_dir() { "a directory" } else { "a FIFO, socket or device" };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {kind}, not a regular file: give the path of a file"),
        ));
    }
    crate::sys::set_blocking(std::os::fd::AsFd::as_fd(&f))?;
    Ok((f, m))
}

/// [`read_regular_bytes`], as UTF-8 text.
pub(crate) fn read_regular(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_regular_bytes(path, max)?).map_err(|e| {
        zeroize::Zeroize::zeroize(&mut e.into_bytes());
        std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text: is it the right file?")
    })
}

/// The owners allowed: root and the agent's own user.
fn owner_ok(uid: u32) -> bool {
    uid == 0 || uid == crate::sys::effective_uid()
}

/// The file at `path` (after symlinks) is owned by root or the agent and not writable by
/// group or others.
pub(crate) fn check_file(path: &Path, what: &'static str) -> Result<(), Untrusted> {
    let m = std::fs::metadata(path).map_err(|e| Untrusted::Unreadable {
        path: path.to_owned(),
        what,
        reason: e.to_string(),
    })?;
    check_meta(path, what, m.uid(), m.mode(), false)
}

/// `dir` and every directory above it up to `/` are owned by root or the agent and not
/// writable by others (sticky directories above `dir` excepted).
pub(crate) fn check_dir_chain(dir: &Path, what: &'static str) -> Result<(), Untrusted> {
    let dir = std::path::absolute(dir).map_err(|e| Untrusted::Unreadable {
        path: dir.to_owned(),
        what,
        reason: e.to_string(),
    })?;
    let mut first = true;
    for d in dir.ancestors() {
        let m = std::fs::metadata(d).map_err(|e| Untrusted::Unreadable {
            path: d.to_owned(),
            what,
            reason: e.to_string(),
        })?;
        check_meta(d, if first { what } else { "a directory above it" }, m.uid(), m.mode(), !first)?;
        first = false;
    }
    Ok(())
}

fn check_meta(
    path: &Path,
    what: &'static str,
    uid: u32,
    mode: u32,
    sticky_ok: bool,
) -> Result<(), Untrusted> {
    if !owner_ok(uid) {
        return Err(Untrusted::Owner { path: path.to_owned(), what, uid });
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Err(Untrusted::Writable { path: path.to_owned(), what, mode: mode & 0o7777 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy, config, vault or key file that is a FIFO froze whoever read it (a reload
    /// stalled the agent until someone wrote to the FIFO); `/dev/zero` was read until memory
    /// ran out. Each is refused at once, with what it is.
    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = std::env::temp_dir().join(format!("kvb-trust-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || tx.send(read_regular(&f, 1 << 20).map_err(|e| e.to_string())));
        let e =
            rx.recv_timeout(std::time::Duration::from_secs(5)).expect("reading a FIFO blocked").unwrap_err();
        assert!(e.contains("a FIFO, socket or device, not a regular file"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a FIFO, socket or device"), "{e}");
        let e = read_regular(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let file = dir.join("policy.toml");
        std::fs::write(&file, "x".repeat(100)).unwrap();
        assert_eq!(read_regular(&file, 100).unwrap().len(), 100);
        let e = read_regular(&file, 99).unwrap_err().to_string();
        assert!(e.contains("100 bytes, more than the 99"), "{e}");
        std::fs::write(&file, [0xff, 0xfe, 0x00, 0x01]).unwrap();
        assert_eq!(read_regular_bytes(&file, 100).unwrap(), [0xff, 0xfe, 0x00, 0x01]);
        let e = read_regular(&file, 100).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        assert_eq!(read_regular(&dir.join("missing"), 100).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn owner_and_mode_rules() {
        let p = Path::new("/x");
        assert_eq!(check_meta(p, "policy", 0, 0o100644, false), Ok(()));
        assert!(matches!(
            check_meta(p, "policy", 4242, 0o100644, false),
            Err(Untrusted::Owner { uid: 4242, .. })
        ));
        assert!(matches!(
            check_meta(p, "policy", 0, 0o100664, false),
            Err(Untrusted::Writable { mode: 0o664, .. })
        ));
        // /tmp above a socket directory: fine; as the socket directory itself: not.
        assert_eq!(check_meta(p, "dir", 0, 0o41777, true), Ok(()));
        assert!(check_meta(p, "dir", 0, 0o41777, false).is_err());
        assert!(check_meta(p, "dir", 0, 0o40777, true).is_err(), "world-writable without sticky");
    }

    #[test]
    fn messages_say_the_fix() {
        let e = Untrusted::Owner { path: "/etc/kvbroker/policy.toml".into(), what: "policy file", uid: 1000 };
        assert_eq!(
            e.to_string(),
            "/etc/kvbroker/policy.toml: policy file is owned by uid 1000, so that user could change it: run \
             `chown root /etc/kvbroker/policy.toml` (or run the agent as that user)"
        );
        let e = Untrusted::Writable { path: "/run/kvbroker".into(), what: "socket directory", mode: 0o775 };
        assert_eq!(
            e.to_string(),
            "/run/kvbroker: socket directory is writable by group or others (mode 0775): run `chmod go-w /run/kvbroker`"
        );
    }

    #[test]
    fn the_root_chain_is_trusted() {
        assert_eq!(check_dir_chain(Path::new("/usr/bin"), "dir"), Ok(()));
    }
}

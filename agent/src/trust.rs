//! Files and directories that decide access: the socket's directory (and every directory
//! above it), the policy, local vault files and the audit HMAC key. Whoever can write one of
//! them can swap the socket or rewrite who may read what, so each must be owned by root or
//! by the agent's own user, and writable by no one else. Checked at startup, by
//! `check-config`, and at every policy reload.
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

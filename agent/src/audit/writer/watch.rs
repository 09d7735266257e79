//! The inotify watch of the audit log's directory: a watcher thread that raises a flag when
//! an entry of the log's name changes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// The inotify watch of the log's directory, as the writer sees it.
pub(super) struct Watch {
    /// Raised by the watcher thread when an entry of the log's name changed.
    pub(super) changed: Arc<AtomicBool>,
    /// False when no watcher thread runs: then every batch compares the path.
    pub(super) live: Arc<AtomicBool>,
}

impl Watch {
    /// Starts a watcher thread on `path`'s directory; without inotify, a watch that is not live.
    pub(super) fn start(path: &Path) -> Self {
        let changed = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicBool::new(false));
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let Some(name) = path.file_name().map(|n| n.as_encoded_bytes().to_vec()) else {
            return Self { changed, live };
        };
        let fd = match crate::sys::watch_dir_entries(&dir) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot watch the audit directory with inotify: the audit path is checked before every write instead"
                );
                return Self { changed, live };
            }
        };
        live.store(true, Ordering::Release);
        let (weak, live2) = (Arc::downgrade(&changed), Arc::clone(&live));
        let spawned = std::thread::Builder::new()
            .name("kvbroker-audit-watch".into())
            .spawn(move || watch_loop(&fd, &name, &weak, &live2));
        if spawned.is_err() {
            live.store(false, Ordering::Release);
        }
        Self { changed, live }
    }

    /// Not watching: every batch compares the path (tests use this to force either path).
    #[cfg(test)]
    pub(super) fn none() -> Self {
        Self { changed: Arc::new(AtomicBool::new(false)), live: Arc::new(AtomicBool::new(false)) }
    }
}

/// The watcher thread: raises `changed` on events about the log's name; on losing the watch
/// (the directory removed or moved, an error) marks it not live and ends. Ends too, within
/// a second, once the writer state (the only strong holder of `changed`) is gone.
fn watch_loop(fd: &std::os::fd::OwnedFd, name: &[u8], changed: &Weak<AtomicBool>, live: &AtomicBool) {
    use std::os::fd::AsFd;
    const LOST: u32 = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED | libc::IN_UNMOUNT;
    loop {
        let events = crate::sys::read_dir_events(fd.as_fd(), 1000);
        let Some(flag) = changed.upgrade() else { return };
        match events {
            Ok(events) => {
                for e in events {
                    if e.mask & LOST != 0 {
                        live.store(false, Ordering::Release);
                        flag.store(true, Ordering::Release);
                        return;
                    }
                    if e.mask & libc::IN_Q_OVERFLOW != 0 || e.name == name {
                        flag.store(true, Ordering::Release);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit directory watch failed: the audit path is checked before every write instead");
                live.store(false, Ordering::Release);
                flag.store(true, Ordering::Release);
                return;
            }
        }
    }
}

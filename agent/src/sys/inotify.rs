//! inotify: changes to the names in one directory (the audit log's).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Names-change events on one directory: an inotify descriptor watching `dir` for entries
/// created, deleted or renamed in it, and for the directory itself being removed or moved.
pub(crate) fn watch_dir_entries(dir: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let cdir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))?;
    // SAFETY: a plain syscall with flags only; the returned descriptor is checked below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask = libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MOVED_FROM
        | libc::IN_MOVED_TO
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF
        | libc::IN_ONLYDIR;
    // SAFETY: a valid descriptor and a NUL-terminated path that outlives the call.
    let wd = unsafe { libc::inotify_add_watch(owned.as_raw_fd(), cdir.as_ptr(), mask) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// One inotify event, reduced to what the audit watcher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirEvent {
    pub(crate) mask: u32,
    /// The entry's name (empty for events about the watched directory itself).
    pub(crate) name: Vec<u8>,
}

/// Waits up to `timeout_ms` for events on an inotify descriptor from [`watch_dir_entries`]
/// and returns those read (none on timeout).
pub(crate) fn read_dir_events(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<Vec<DirEvent>> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid, initialised pollfd, and its count.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted { Ok(Vec::new()) } else { Err(err) };
    }
    if rc == 0 {
        return Ok(Vec::new());
    }
    // Aligned for `inotify_event`, large enough for many events with names up to NAME_MAX.
    let mut buf = vec![0u64; 4096 / 8];
    // SAFETY: the buffer is valid for writes of its full length in bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len() * 8) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Vec::new()),
            _ => Err(err),
        };
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).take(n.unsigned_abs()).collect();
    let head = size_of::<libc::inotify_event>();
    let mut out = Vec::new();
    let mut at = 0;
    while at + head <= bytes.len() {
        let field = |off: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at + off..at + off + 4]);
            u32::from_ne_bytes(b)
        };
        // struct inotify_event { int wd; uint32_t mask; uint32_t cookie; uint32_t len; char name[]; }
        let (mask, len) = (field(4), field(12) as usize);
        let name = bytes.get(at + head..at + head + len).unwrap_or(&[]);
        let name = name.split(|&b| b == 0).next().unwrap_or(&[]).to_vec();
        out.push(DirEvent { mask, name });
        at += head + len;
    }
    Ok(out)
}

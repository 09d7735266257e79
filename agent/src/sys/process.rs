//! Processes and ids: pidfd liveness, signals, `RLIMIT_NOFILE`, SIGPIPE, the effective uid
//! and group names (`getgrnam_r`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Whether the process a pidfd refers to is still running (not exited, not reaped).
pub(crate) fn pidfd_alive(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: a plain syscall with a valid descriptor, signal 0 (no signal is sent, only
    // permission and existence are checked) and a null siginfo, which the kernel allows.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        // Alive but not ours to signal: still alive.
        Some(libc::EPERM) => Ok(true),
        _ => Err(err),
    }
}

/// The gid of a group name, or `None` if there is no such group.
pub(crate) fn group_id(name: &str) -> io::Result<Option<u32>> {
    let cname = CString::new(name).map_err(|_| io::Error::other("group name contains NUL"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `group` is plain old data that getgrnam_r fills in; zeroed is a valid
        // initial state for it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local or to `buf`, whose length we pass; the
        // strings getgrnam_r stores in `grp` point into `buf` and are not used after it.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &raw mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(grp.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Sends `sig` to process `pid` (forwarding a signal to the launched command).
pub(crate) fn send_signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes no pointers; a stale pid yields ESRCH, reported as an error.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit (systemd's default soft limit of
/// 1,024 is far below what the agent may need); returns the soft limit now in force.
pub(crate) fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `lim`, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one rlimit from `raised`, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Ok(lim.rlim_cur);
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Ignores SIGPIPE, as every Rust binary's startup does: a write to a connection its peer
/// closed then fails with EPIPE instead of killing the process. Only for hosts whose `main`
/// is not Rust's (the libFuzzer harness of the `http_request` fuzz target).
pub(crate) fn ignore_sigpipe() {
    // SAFETY: installs the SIG_IGN disposition; no handler code, no pointers of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// The agent's effective uid: the admin socket also serves its own user (`kvbroker dev`
/// run by a non-root user), besides root.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Clears `O_NONBLOCK` on `fd`: a file opened without blocking (so that opening a FIFO does
/// not wait for a writer) is read with blocking reads once it is known to be a regular file.
pub(crate) fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is a valid descriptor for the call; F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes an int of flags.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

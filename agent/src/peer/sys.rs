//! The agent's only `unsafe` code: syscalls that have no safe wrapper in std or tokio.
//!
//! - `getsockopt(SO_PEERPIDFD)`: a pidfd for the peer of a Unix socket (Linux 6.5+).
//! - `pidfd_send_signal(fd, 0)`: is the process behind a pidfd still alive?
//! - `getgrnam_r`: a group name to its gid (through NSS, so LDAP groups work too).
//!
//! Each call checks its own return value and turns it into `io::Result`; nothing here keeps
//! a raw pointer past the call that uses it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Linux's `SO_PEERPIDFD` (not yet in every libc release).
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd for the process at the other end of a connected Unix socket.
pub(crate) fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `sock` is a valid open descriptor for the duration of the call; `fd` and `len`
    // are live stack locals of the sizes the kernel writes (an int and its length).
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, (&raw mut fd).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(io::Error::other("kernel returned no pidfd"));
    }
    // SAFETY: on success the kernel gave us a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_group_resolves() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-kvb").unwrap(), None);
    }

    #[test]
    fn pidfd_of_socket_pair_names_ourselves() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        match peer_pidfd(a.as_fd()) {
            Ok(fd) => assert!(pidfd_alive(fd.as_fd()).unwrap()),
            // Kernels before 6.5 lack SO_PEERPIDFD; the agent falls back to start times.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOPROTOOPT), "{e}"),
        }
    }
}

//! The agent's only `unsafe` code: syscalls that have no safe wrapper in std or tokio.
//!
//! - `getsockopt(SO_PEERPIDFD)`: a pidfd for the peer of a Unix socket (Linux 6.5+).
//! - `pidfd_send_signal(fd, 0)`: is the process behind a pidfd still alive?
//! - `getgrnam_r`: a group name to its gid (through NSS, so LDAP groups work too).
//! - `mlock` + `madvise(MADV_DONTDUMP)`: keep cached secret values out of swap and core
//!   dumps; `prctl(PR_SET_DUMPABLE, 0)`: no core dumps or ptrace by non-root at all.
//! - [`ZeroOnFree`]: the agent's global allocator, which wipes every block as it is freed,
//!   so buffers we do not own (the Azure SDK's response bodies, hyper's and rustls's
//!   buffers) leave no copy of a value behind in freed memory.
//!
//! Each call checks its own return value and turns it into `io::Result`; nothing here keeps
//! a raw pointer past the call that uses it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A pidfd for the process at the other end of a connected Unix socket.
pub(crate) fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `sock` is a valid open descriptor for the duration of the call; `fd` and `len`
    // are live stack locals of the sizes the kernel writes (an int and its length).
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &raw mut len,
        )
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

/// Locks the pages holding `bytes` in memory and excludes them from core dumps. Pages are
/// never unlocked: a page may hold another value too, and locking is not counted.
pub(crate) fn lock_and_hide(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
    let start = bytes.as_ptr() as usize & !(page - 1);
    let end = (bytes.as_ptr() as usize + bytes.len()).div_ceil(page) * page;
    let ptr = start as *mut libc::c_void;
    // SAFETY: [start, end) covers pages that are mapped (they hold `bytes`, which is alive);
    // mlock and madvise(MADV_DONTDUMP) change only residency and dump flags, not contents.
    let rc = unsafe { libc::mlock(ptr, end - start) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::madvise(ptr, end - start, libc::MADV_DONTDUMP) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The system allocator, wiping each block when it is freed (and, through the default
/// `realloc`, the old block when one moves).
pub struct ZeroOnFree;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; `dealloc`
// first writes zeros over exactly the block being freed, which the caller owns until then.
unsafe impl std::alloc::GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (valid, non-zero-size) layout.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` points to a live block of `layout.size()` bytes that the caller is
        // giving up. `write_bytes` is a memset; `black_box` makes the zeroed memory count as
        // read, so the wipe is not removed as a dead store before the free.
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            std::hint::black_box(ptr);
            std::alloc::System.dealloc(ptr, layout);
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

/// Returns freed heap memory to the system (after startup's parsing, a large local vault's
/// text and intermediates would otherwise stay resident).
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory held by the allocator; no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Marks the process non-dumpable: no core dumps, and only root may ptrace it or read its
/// memory through /proc.
pub(crate) fn forbid_dumps() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The agent's effective uid: the admin socket also serves its own user (`kvbroker dev`
/// run by a non-root user), besides root.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_and_hide_a_heap_buffer() {
        let v = vec![7u8; 10_000];
        // As root (tests and CI) mlock succeeds; elsewhere RLIMIT_MEMLOCK may refuse.
        match lock_and_hide(&v) {
            Ok(()) => {}
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOMEM), "{e}"),
        }
        assert!(lock_and_hide(&[]).is_ok());
    }

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

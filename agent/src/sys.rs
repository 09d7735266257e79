//! The agent's only `unsafe` code: syscalls that have no safe wrapper in std or tokio.
//!
//! - `setsockopt(SO_PASSCRED, SO_PASSPIDFD)` and `recvmsg`: who wrote each run of bytes on a
//!   Unix stream socket (`SCM_CREDENTIALS`, and `SCM_PIDFD` on Linux 6.5+).
//! - `fstat` of a pidfd: its pidfs inode, unique per process for the whole boot (Linux 6.9+).
//! - `pidfd_send_signal(fd, 0)`: is the process behind a pidfd still alive?
//! - `getgrnam_r`: a group name to its gid (through NSS, so LDAP groups work too).
//! - `inotify_init1`, `inotify_add_watch`, `poll` and `read` of the inotify descriptor: the
//!   audit log's directory tells us when the log's name is removed, renamed or replaced.
//! - `socket(AF_NETLINK, NETLINK_CONNECTOR)`, `bind`, `sendto`, `recvfrom` and `poll`: the
//!   kernel's proc connector, which reports every `execve` and exit on the host
//!   (`peer::events`).
//! - `mlock` + `madvise(MADV_DONTDUMP)`: keep cached secret values out of swap and core
//!   dumps; `prctl(PR_SET_DUMPABLE, 0)`: no core dumps or ptrace by non-root at all.
//! - `mallopt(M_ARENA_MAX)` and `malloc_trim`: fewer malloc arenas, and freed startup memory
//!   given back, so a large cache costs less resident memory.
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

/// `SCM_PIDFD`: the control message type `SO_PASSPIDFD` adds (not yet in the libc crate).
const SCM_PIDFD: libc::c_int = 0x04;

/// Asks the kernel to label every message received on `sock` (and on every socket accepted
/// from it, which inherit the options) with its sender: `SO_PASSCRED` always, `SO_PASSPIDFD`
/// where the kernel has it. Returns whether pidfds will come (Linux 6.5+).
pub(crate) fn pass_sender_credentials(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let set = |opt: libc::c_int| {
        let on: libc::c_int = 1;
        // SAFETY: `sock` is valid for the call; the option value is a live int of the size
        // passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    };
    set(libc::SO_PASSCRED)?;
    match set(libc::SO_PASSPIDFD) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Stops `SO_PASSPIDFD` on one connection (its first writer's pidfd is in hand; later
/// messages carry credentials only).
pub(crate) fn stop_passing_pidfds(sock: BorrowedFd<'_>) -> io::Result<()> {
    let off: libc::c_int = 0;
    // SAFETY: `sock` is valid for the call; the option value is a live int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSPIDFD,
            (&raw const off).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Who sent the bytes one `recvmsg` returned.
#[derive(Debug, Default)]
pub(crate) struct Sender {
    /// pid, uid, gid from `SCM_CREDENTIALS` (pid 0: the sender is in a pid namespace we
    /// cannot see into). `None`: the bytes came unlabelled.
    pub(crate) cred: Option<(u32, u32, u32)>,
    /// A pidfd of that exact process (`SCM_PIDFD`), if the kernel sent one.
    pub(crate) pidfd: Option<OwnedFd>,
    /// How many bytes this call read (0: end of stream).
    pub(crate) len: usize,
}

/// Reads from a Unix stream socket into `buf`'s unfilled part, advancing it, and says who
/// sent those bytes. The kernel never returns bytes of two senders in one call while
/// `SO_PASSCRED` is set. File descriptors a caller sends us (`SCM_RIGHTS`) are closed at
/// once: nobody can make the agent hold their descriptors.
pub(crate) fn recv_labelled(sock: BorrowedFd<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> io::Result<Sender> {
    // Room for credentials, one pidfd, and a few stray descriptors (closed below); anything
    // that does not fit is discarded by the kernel (MSG_CTRUNC), which closes those fds.
    const CONTROL: usize = 128;
    #[repr(C, align(8))]
    struct Control([u8; CONTROL]);
    let mut control = Control([0; CONTROL]);
    // SAFETY: `unfilled_mut` is memory we may write (not necessarily initialized); the
    // kernel writes at most its length and we only mark as filled what it reports.
    let unfilled = unsafe { buf.unfilled_mut() };
    let mut iov = libc::iovec { iov_base: unfilled.as_mut_ptr().cast(), iov_len: unfilled.len() };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL as _;
    // SAFETY: `msg` points at live stack buffers (iov into `buf`, control) of the lengths it
    // states, valid for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let mut sender = Sender { len: n, ..Sender::default() };
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control messages into
    // `control`; CMSG_FIRSTHDR/NXTHDR stay within that length, and each payload is read
    // unaligned with the size its type defines.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if len >= size_of::<libc::ucred>() => {
                    let c = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                    sender.cred = Some((u32::try_from(c.pid).unwrap_or(0), c.uid, c.gid));
                }
                (libc::SOL_SOCKET, SCM_PIDFD) if len >= size_of::<libc::c_int>() => {
                    let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    if fd >= 0 {
                        sender.pidfd = Some(OwnedFd::from_raw_fd(fd));
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..len / size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                        if fd >= 0 {
                            drop(OwnedFd::from_raw_fd(fd));
                        }
                    }
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
        // SAFETY (assume_init): the kernel initialized the first `n` bytes it returned.
        buf.assume_init(n);
    }
    buf.advance(n);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 && sender.cred.is_none() {
        // Credentials did not fit: the bytes stay unlabelled, and are refused as such.
        sender.pidfd = None;
    }
    Ok(sender)
}

/// Registers a connected Unix stream with the tokio reactor as an `AsyncFd`, whose read
/// readiness can be cleared after a successful read (tokio's own stream clears it only on
/// `EAGAIN` or a short read, and reads with plain `recv`). Must run inside the runtime.
pub(crate) fn register_stream(
    stream: std::os::unix::net::UnixStream,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::unix::net::UnixStream>> {
    stream.set_nonblocking(true)?;
    // SAFETY: the `UnixStream` owns its descriptor: it stays open, and `as_raw_fd` returns
    // the same one, until the `AsyncFd` (its only owner) drops it.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(stream) }?)
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

/// A netlink socket on the kernel connector (`NETLINK_CONNECTOR`), bound to the proc
/// connector's multicast group (`CN_IDX_PROC`; needs `CAP_NET_ADMIN`), non-blocking, with a
/// receive buffer of `rcvbuf` bytes where the kernel allows it (`SO_RCVBUFFORCE` as root,
/// else `SO_RCVBUF` up to `rmem_max`): the larger it is, the rarer an overflow.
pub(crate) fn proc_connector_socket(rcvbuf: usize) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; the descriptor is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_CONNECTOR,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid descriptor; the option value is a live int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                owned.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
    }
    // SAFETY: an all-zero sockaddr_nl is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = libc::CN_IDX_PROC;
    // SAFETY: `addr` is a live sockaddr_nl of the length passed.
    let rc = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Connected to the kernel (port 0): the kernel refuses another process's unicast to our
    // port (`ECONNREFUSED`), so nobody but the kernel can fill the queue a request drains.
    // Multicast events still arrive through the group bound above.
    // SAFETY: an all-zero sockaddr_nl is valid: port 0, no groups, is the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `kernel` is a live sockaddr_nl of the length passed.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// Sends one netlink message (`bytes`, header included) to the kernel.
pub(crate) fn netlink_send_to_kernel(sock: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    netlink_send(sock, bytes, 0)
}

/// Sends one netlink datagram to port `port` (0: the kernel).
pub(crate) fn netlink_send(sock: BorrowedFd<'_>, bytes: &[u8], port: u32) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_nl is valid; the port is set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_pid = port;
    // SAFETY: `bytes` and `addr` are live for the call and their lengths are the ones passed.
    let rc = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The port id the kernel gave a bound netlink socket.
#[cfg(test)]
pub(crate) fn netlink_port(sock: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: an all-zero sockaddr_nl is valid; the kernel overwrites it.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are live for the call; the kernel writes at most `len` bytes.
    let rc = unsafe { libc::getsockname(sock.as_raw_fd(), (&raw mut addr).cast(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(addr.nl_pid)
}

/// Receives one netlink datagram into `buf` without blocking: its length and the sender's
/// port id (0: the kernel). `WouldBlock` when the queue is empty; `ENOBUFS` when the kernel
/// dropped messages since the last call (the socket's buffer overflowed).
pub(crate) fn netlink_recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u32)> {
    // SAFETY: an all-zero sockaddr_nl is valid; the kernel overwrites it.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `buf`, `addr` and `len` are live for the call; the kernel writes at most
    // `buf.len()` bytes into `buf` and at most `len` bytes into `addr`.
    let n = unsafe {
        libc::recvfrom(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&raw mut addr).cast(),
            &raw mut len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n.unsigned_abs(), addr.nl_pid))
}

/// Waits up to `timeout_ms` until `fd` is readable (or has an error to report); returns
/// whether it is. An interrupted wait counts as not readable.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid, initialised pollfd, and its count.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(err) };
    }
    Ok(rc > 0)
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

/// Caps glibc malloc at two arenas. By default each thread that allocates may get its own
/// arena (up to 8 per core), and cached entries installed from different worker threads then
/// half-fill pages in several heaps: measured with 10,000 cached secrets, 2.5 MiB more RSS
/// than with two arenas (issue 19). Call before the runtime starts its threads.
pub(crate) fn limit_malloc_arenas() {
    // SAFETY: mallopt takes two integers and only changes the allocator's tuning; glibc
    // ignores a value it does not accept (it returns 0, which we need not act on).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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

/// Test support: sends `bytes` with `SCM_CREDENTIALS` naming `pid` (another process's pid
/// needs `CAP_SYS_ADMIN`: the tests run as root), as a second writer on a connection would.
#[cfg(test)]
pub(crate) fn send_as_pid(sock: BorrowedFd<'_>, bytes: &[u8], pid: u32) -> io::Result<()> {
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    let cred = libc::ucred {
        pid: libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        // SAFETY: getuid/getgid cannot fail.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
    };
    // SAFETY: test code; every pointer is to a live local of the stated size, and the one
    // control message fits the 64-byte buffer.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<libc::ucred>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_CREDENTIALS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::ucred>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::ucred>(), cred);
        libc::sendmsg(sock.as_raw_fd(), &raw const msg, 0)
    };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
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

    fn fd_count() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Sends `bytes` on `sock` with `fd` attached as SCM_RIGHTS, as a hostile caller would.
    fn send_with_fd(sock: BorrowedFd<'_>, bytes: &[u8], fd: BorrowedFd<'_>) {
        #[repr(C, align(8))]
        struct Control([u8; 64]);
        let mut control = Control([0; 64]);
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
        // SAFETY: test code; all pointers are to live locals of the stated sizes.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
            assert_eq!(libc::sendmsg(sock.as_raw_fd(), &raw const msg, 0), bytes.len() as isize);
        }
    }

    #[test]
    fn received_bytes_carry_their_sender_and_passed_fds_are_closed() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pidfds = pass_sender_credentials(a.as_fd()).unwrap();
        b.write_all(b"hello").unwrap();
        let mut storage = [0u8; 16];
        let mut buf = tokio::io::ReadBuf::new(&mut storage);
        let got = recv_labelled(a.as_fd(), &mut buf).unwrap();
        assert_eq!(buf.filled(), b"hello");
        assert_eq!(got.len, 5);
        let me = std::process::id();
        assert_eq!(got.cred.map(|c| c.0), Some(me));
        if pidfds {
            let fd = got.pidfd.as_ref().expect("SO_PASSPIDFD gives a pidfd");
            assert!(pidfd_alive(fd.as_fd()).unwrap());
            // After the first message, pidfds can be turned off: credentials still come.
            stop_passing_pidfds(a.as_fd()).unwrap();
            b.write_all(b"x").unwrap();
            let mut storage = [0u8; 4];
            let mut buf = tokio::io::ReadBuf::new(&mut storage);
            let again = recv_labelled(a.as_fd(), &mut buf).unwrap();
            assert_eq!(again.cred.map(|c| c.0), Some(me));
            assert!(again.pidfd.is_none());
        }
        drop(got);
        // A file descriptor sent along with request bytes never stays open in the agent.
        let before = fd_count();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        send_with_fd(b.as_fd(), b"GET", file.as_fd());
        drop(file);
        let mut storage = [0u8; 16];
        let mut buf = tokio::io::ReadBuf::new(&mut storage);
        let got = recv_labelled(a.as_fd(), &mut buf).unwrap();
        assert_eq!(buf.filled(), b"GET");
        drop(got);
        assert_eq!(fd_count(), before, "the passed descriptor was closed");
    }
}

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

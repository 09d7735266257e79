//! Sockets and their senders: `SO_PASSCRED`/`SO_PASSPIDFD`, `recvmsg` with
//! `SCM_CREDENTIALS`/`SCM_PIDFD`, and registering a stream with the tokio reactor.

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

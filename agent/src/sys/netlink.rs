//! The kernel's proc connector: a `NETLINK_CONNECTOR` socket, sending and receiving its
//! datagrams, and waiting for it to be readable.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

//! The agent's only `unsafe` code: syscalls that have no safe wrapper in std or tokio.
//!
//! - `setsockopt(SO_PASSCRED, SO_PASSPIDFD)` and `recvmsg`: who wrote each run of bytes on a
//!   Unix stream socket (`SCM_CREDENTIALS`, and `SCM_PIDFD` on Linux 6.5+).
//! - `fstat` of a pidfd: its pidfs inode, unique per process for the whole boot (Linux 6.9+).
//! - `pidfd_send_signal(fd, 0)`: is the process behind a pidfd still alive?
//! - `fcntl(F_SETFL)`: a file opened without blocking (a FIFO's open would wait) read with
//!   blocking reads once it is known to be a regular file.
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

mod credentials;
mod inotify;
mod memory;
mod netlink;
mod process;

#[cfg(test)]
pub(crate) use credentials::send_as_pid;
pub(crate) use credentials::{
    Sender, pass_sender_credentials, recv_labelled, register_stream, stop_passing_pidfds,
};
pub(crate) use inotify::{read_dir_events, watch_dir_entries};
pub use memory::ZeroOnFree;
pub(crate) use memory::{forbid_dumps, limit_malloc_arenas, lock_and_hide, trim_heap};
#[cfg(test)]
pub(crate) use netlink::{netlink_port, netlink_send};
pub(crate) use netlink::{netlink_recv, netlink_send_to_kernel, proc_connector_socket, wait_readable};
pub(crate) use process::{
    effective_uid, group_id, ignore_sigpipe, pidfd_alive, raise_nofile_limit, send_signal, set_blocking,
};

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, BorrowedFd};

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

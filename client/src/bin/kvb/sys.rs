//! Every system call `kvb` makes that std does not wrap: `kill(2)` and a sealed `memfd`.
//! The library crate forbids `unsafe`; the binary keeps it to this one module, each block
//! with a `// SAFETY:` comment. No dependency was added for two calls: `libc` is already in
//! the tree.
#![allow(unsafe_code, reason = "the one module of kvb with system calls std does not wrap")]

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Sends `sig` to `pid`. The caller makes sure `pid` is its own unreaped child, or a
/// process the user named (`--pid`), so the number cannot have been reused by kvb's doing.
pub(crate) fn kill(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    if pid <= 0 {
        return Err(std::io::Error::other("refusing to signal a process group"));
    }
    // SAFETY: kill(2) takes no pointers; a positive pid names one process.
    let r = unsafe { libc::kill(pid, sig) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// An anonymous, sealed in-memory file holding `bytes`: it never touches a disk, cannot be
/// written, grown or shrunk by anyone (seals), and is close-on-exec, so no process kvb starts
/// has it: a command opens it by path (`/proc/KVB_PID/fd/N`).
pub(crate) fn sealed_memfd(label: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let name =
        CString::new(format!("kvb-{label}")).map_err(|_| std::io::Error::other("NUL in memfd name"))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are
    // constants. The returned fd, if any, is ours alone and is wrapped at once.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(owned);
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl(F_ADD_SEALS) on an fd we own, with an integer argument; no pointers.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// A signal given by name (`HUP`, `SIGHUP`, case-insensitive) or number.
pub(crate) fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("HUP"), Some(libc::SIGHUP));
        assert_eq!(parse_signal("sigusr1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("15"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("0"), None);
        assert_eq!(parse_signal("NOPE"), None);
    }

    /// The memfd holds the bytes, and its seals refuse any write.
    #[test]
    fn sealed_memfd_cannot_be_written() {
        use std::io::Read;
        let fd = sealed_memfd("t", b"canary-memfd").unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let mut s = String::new();
        std::fs::File::open(&path).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "canary-memfd");
        let w = std::fs::OpenOptions::new().append(true).open(&path).and_then(|mut f| f.write_all(b"x"));
        assert!(w.is_err(), "a sealed memfd refused a write");
        assert!(kill(0, 0).is_err());
    }
}

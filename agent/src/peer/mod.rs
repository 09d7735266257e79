//! Who is calling: kernel-attested facts about the process at the other end of a connection.
//!
//! At accept we take `SO_PEERCRED` (pid, uid, gid as of `connect()`) and a pidfd
//! (`SO_PEERPIDFD`). For each request we read the rest from `/proc/PID` and then confirm,
//! through the pidfd and the process start time, that `/proc/PID` still named the same live
//! process while we read it, so a recycled pid cannot lend its facts to a caller that exited.
//! Facts are read per request, not per connection: a process may `execve` between two
//! requests on one kept-alive connection, and its exe must be judged as it is now.
//!
//! Never read `cmdline` or `environ`: the process can rewrite them.

mod proc;
pub(crate) mod sys;

use std::os::fd::{AsFd, OwnedFd};

use kvbroker_proto::PeerInfo;

/// What the kernel told us at `accept()`.
pub(crate) struct ConnPeer {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pidfd: Option<OwnedFd>,
}

/// Facts about a caller, read for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PeerFacts {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    pub(crate) exe: Option<String>,
    pub(crate) cgroup: Option<String>,
}

/// Why a caller's facts could not be established. Each is a denial reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("peer in another pid namespace")]
    OtherNamespace,
    #[error("peer exited")]
    Exited,
    #[error("peer facts unreadable: {0}")]
    Unreadable(String),
}

impl ConnPeer {
    /// Takes the peer credentials of an accepted connection.
    pub(crate) fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Self> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid().map_or(0, |p| u32::try_from(p).unwrap_or(0));
        // Without SO_PEERPIDFD (kernels before 6.5) the start-time check still guards reuse.
        let pidfd = sys::peer_pidfd(stream.as_fd()).ok();
        Ok(Self { pid, uid: cred.uid(), gid: cred.gid(), pidfd })
    }

    /// Reads the caller's facts now, and checks the process is the one that connected.
    pub(crate) fn facts(&self) -> Result<PeerFacts, PeerError> {
        if self.pid == 0 {
            return Err(PeerError::OtherNamespace);
        }
        let before = proc::start_time(self.pid)?;
        let status = proc::status(self.pid)?;
        let exe = proc::exe(self.pid)?;
        let cgroup = proc::cgroup(self.pid)?;
        let after = proc::start_time(self.pid)?;
        if before != after {
            return Err(PeerError::Exited);
        }
        if let Some(fd) = &self.pidfd {
            match sys::pidfd_alive(fd.as_fd()) {
                Ok(true) => {}
                Ok(false) => return Err(PeerError::Exited),
                Err(e) => return Err(PeerError::Unreadable(format!("pidfd: {e}"))),
            }
        }
        Ok(PeerFacts { pid: self.pid, uid: self.uid, gid: self.gid, groups: status.groups, exe, cgroup })
    }

    /// What we can record about a caller whose facts could not be read.
    pub(crate) fn info(&self) -> PeerInfo {
        PeerInfo { pid: self.pid, uid: self.uid, gid: self.gid, ..PeerInfo::default() }
    }
}

impl PeerFacts {
    /// The facts as written to the audit record.
    pub(crate) fn info(&self) -> PeerInfo {
        PeerInfo {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            exe: self.exe.clone(),
            exe_sha256: None,
            cgroup: self.cgroup.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn facts_of_ourselves() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let peer = ConnPeer::of(&a).unwrap();
        assert_eq!(peer.pid, std::process::id());
        let f = peer.facts().unwrap();
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(f.exe.as_deref(), me.to_str());
        assert!(f.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
    }

    #[test]
    fn pid_zero_is_another_namespace() {
        let p = ConnPeer { pid: 0, uid: 0, gid: 0, pidfd: None };
        assert_eq!(p.facts(), Err(PeerError::OtherNamespace));
    }
}

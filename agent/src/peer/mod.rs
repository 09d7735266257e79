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

pub(crate) mod cgroup;
pub(crate) mod exe_hash;
mod proc;
pub(crate) mod sys;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use kvbroker_proto::PeerInfo;

/// What the kernel told us at `accept()`.
pub(crate) struct ConnPeer {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pidfd: Option<OwnedFd>,
}

/// Facts about a caller, read for one request.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerFacts {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    pub(crate) exe: Option<String>,
    pub(crate) cgroup: Option<String>,
    /// The file to hash for `exe_sha256` (`/proc/PID/exe` for a live caller).
    pub(crate) exe_file: Option<String>,
    /// Computed on first use only: hashing is the one expensive fact.
    exe_sha256: OnceLock<Result<String, String>>,
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
        Ok(PeerFacts {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            groups: status.groups,
            exe,
            cgroup,
            exe_file: Some(format!("/proc/{}/exe", self.pid)),
            exe_sha256: OnceLock::new(),
        })
    }

    /// What we can record about a caller whose facts could not be read.
    pub(crate) fn info(&self) -> PeerInfo {
        PeerInfo { pid: self.pid, uid: self.uid, gid: self.gid, ..PeerInfo::default() }
    }
}

/// Facts of a running process by pid, read from `/proc` (`kvbroker policy explain --pid`).
/// uid and gid are the effective ones from `/proc/PID/status`.
pub(crate) fn facts_of_pid(pid: u32) -> Result<PeerFacts, PeerError> {
    let status = proc::status(pid)?;
    let (Some(uid), Some(gid)) = (status.uid, status.gid) else {
        return Err(PeerError::Unreadable("status: no Uid/Gid".into()));
    };
    Ok(PeerFacts {
        pid,
        uid,
        gid,
        groups: status.groups,
        exe: proc::exe(pid)?,
        cgroup: proc::cgroup(pid)?,
        exe_file: Some(format!("/proc/{pid}/exe")),
        exe_sha256: OnceLock::new(),
    })
}

impl PeerFacts {
    /// Facts given by hand (`kvbroker policy explain --uid …`).
    pub(crate) fn given(
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
        exe: Option<String>,
        cgroup: Option<String>,
    ) -> Self {
        let exe_file = exe.clone();
        Self { pid: 0, uid, gid, groups, exe, cgroup, exe_file, exe_sha256: OnceLock::new() }
    }

    /// The executable's SHA-256, computed on first use.
    pub(crate) fn exe_sha256(&self) -> Result<&str, &str> {
        self.exe_sha256
            .get_or_init(|| match &self.exe_file {
                Some(f) => exe_hash::sha256_of(f),
                None => Err("caller has no exe".into()),
            })
            .as_deref()
            .map_err(String::as_str)
    }

    pub(crate) fn systemd_unit(&self) -> Option<&str> {
        self.cgroup.as_deref().and_then(cgroup::systemd_unit)
    }

    pub(crate) fn container_id(&self) -> Option<&str> {
        self.cgroup.as_deref().and_then(cgroup::container_id)
    }

    /// The facts as written to the audit record (the hash only if a rule needed it).
    pub(crate) fn info(&self) -> PeerInfo {
        PeerInfo {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            exe: self.exe.clone(),
            exe_sha256: self.exe_sha256.get().and_then(|r| r.as_ref().ok()).cloned(),
            cgroup: self.cgroup.clone(),
            unit: self.systemd_unit().map(str::to_owned),
            container_id: self.container_id().map(str::to_owned),
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
        let own = exe_hash::sha256_of(me.to_str().unwrap()).unwrap();
        assert_eq!(f.exe_sha256(), Ok(own.as_str()));
    }

    #[test]
    fn pid_zero_is_another_namespace() {
        let p = ConnPeer { pid: 0, uid: 0, gid: 0, pidfd: None };
        assert!(matches!(p.facts(), Err(PeerError::OtherNamespace)));
    }
}

//! Who is calling: kernel-attested facts about the process at the other end of a connection.
//!
//! At accept we take `SO_PEERCRED` (pid, uid, gid as of `connect()`) and a pidfd
//! (`SO_PEERPIDFD`). On a connection's first request we read the rest from `/proc/PID` and
//! then confirm through the pidfd that the process that connected is still alive — so
//! `/proc/PID` named it the whole time, and a recycled pid cannot lend its facts to a caller
//! that exited. (Without `SO_PEERPIDFD`, on kernels before 6.5, the process start time read
//! before and after stands in.)
//!
//! The connection is then bound to those facts. Each later request on it re-checks that
//! the process is alive and that its exe is unchanged; a process that `execve`d is denied
//! and the connection closed, so it must reconnect and be judged as what it is now. Facts
//! that only root can change for a running process (groups, cgroup) are not re-read.
//!
//! Never read `cmdline` or `environ`: the process can rewrite them.

pub(crate) mod ancestry;
pub(crate) mod cgroup;
pub(crate) mod exe_hash;
mod proc;

use std::os::fd::{AsFd, OwnedFd};

use crate::sys;
use std::sync::OnceLock;

use kvbroker_proto::PeerInfo;

/// What the kernel told us at `accept()`.
pub(crate) struct ConnPeer {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pidfd: Option<OwnedFd>,
    /// The facts of this connection's first request.
    bound: std::sync::Mutex<Option<std::sync::Arc<PeerFacts>>>,
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
    /// Verified ancestors, walked on first use.
    ancestors: OnceLock<Vec<ancestry::Ancestor>>,
}

/// Why a caller's facts could not be established. Each is a denial reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("peer in another pid namespace")]
    OtherNamespace,
    #[error("peer exited")]
    Exited,
    #[error("peer executable changed since this connection's first request: reconnect")]
    ExeChanged,
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
        Ok(Self { pid, uid: cred.uid(), gid: cred.gid(), pidfd, bound: std::sync::Mutex::new(None) })
    }

    /// Reads the caller's facts now, and checks the process is the one that connected.
    pub(crate) fn facts(&self) -> Result<std::sync::Arc<PeerFacts>, PeerError> {
        if self.pid == 0 {
            return Err(PeerError::OtherNamespace);
        }
        let bound = self.bound.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(facts) = bound {
            // A later request on this connection: same process, same exe?
            self.check_alive()?;
            if proc::exe(self.pid)? != facts.exe {
                return Err(PeerError::ExeChanged);
            }
            return Ok(facts);
        }
        let facts = std::sync::Arc::new(self.read_facts()?);
        *self.bound.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(std::sync::Arc::clone(&facts));
        Ok(facts)
    }

    /// The process that connected is still alive (so `/proc/PID` is still it).
    fn check_alive(&self) -> Result<(), PeerError> {
        match &self.pidfd {
            Some(fd) => match sys::pidfd_alive(fd.as_fd()) {
                Ok(true) => Ok(()),
                Ok(false) => Err(PeerError::Exited),
                Err(e) => Err(PeerError::Unreadable(format!("pidfd: {e}"))),
            },
            None => Ok(()),
        }
    }

    fn read_facts(&self) -> Result<PeerFacts, PeerError> {
        // Without a pidfd, the start time read before and after must agree.
        let before = if self.pidfd.is_none() { Some(proc::start_time(self.pid)?) } else { None };
        let status = proc::status(self.pid)?;
        let exe = proc::exe(self.pid)?;
        let cgroup = proc::cgroup(self.pid)?;
        if let Some(before) = before
            && proc::start_time(self.pid)? != before
        {
            return Err(PeerError::Exited);
        }
        self.check_alive()?;
        Ok(PeerFacts {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            groups: status.groups,
            exe,
            cgroup,
            exe_file: Some(format!("/proc/{}/exe", self.pid)),
            exe_sha256: OnceLock::new(),
            ancestors: OnceLock::new(),
        })
    }

    /// What we can record about a caller whose facts could not be read.
    pub(crate) fn info(&self) -> PeerInfo {
        PeerInfo { pid: self.pid, uid: self.uid, gid: self.gid, ..PeerInfo::default() }
    }
}

/// A process's start time (clock ticks since boot), to pin a pid to one process.
pub(crate) fn start_time_of(pid: u32) -> Result<u64, PeerError> {
    proc::start_time(pid)
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
        ancestors: OnceLock::new(),
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
        Self {
            pid: 0,
            uid,
            gid,
            groups,
            exe,
            cgroup,
            exe_file,
            exe_sha256: OnceLock::new(),
            ancestors: OnceLock::new(),
        }
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

    /// The caller's verified ancestors, nearest first (none for facts given by hand).
    pub(crate) fn ancestors(&self) -> &[ancestry::Ancestor] {
        self.ancestors.get_or_init(|| {
            if self.pid == 0 { Vec::new() } else { ancestry::ancestors(self.pid).unwrap_or_default() }
        })
    }

    /// Whether the caller is the process (`pid`, `start`) or a verified descendant of it.
    pub(crate) fn descends_from(&self, pid: u32, start: u64) -> bool {
        if self.pid == pid {
            return proc::parent_and_start(pid).is_ok_and(|(_, s)| s == start);
        }
        self.ancestors().iter().any(|a| a.pid == pid && a.start == start)
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
        let p = ConnPeer { pid: 0, uid: 0, gid: 0, pidfd: None, bound: std::sync::Mutex::new(None) };
        assert!(matches!(p.facts(), Err(PeerError::OtherNamespace)));
    }
}

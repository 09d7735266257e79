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
//! the process is alive and that its exe is unchanged — unless the kernel's exec/exit
//! events ([`events`]) vouch that nothing of the kind happened to it since the last check;
//! a process that `execve`d is denied and the connection closed, so it must reconnect and
//! be judged as what it is now. Facts that only root can change for a running process
//! (groups, cgroup) are not re-read, except the cgroup when a rule reads it.
//!
//! Never read `cmdline` or `environ`: the process can rewrite them.

pub(crate) mod ancestry;
pub(crate) mod cgroup;
pub(crate) mod events;
pub(crate) mod exe_hash;
mod proc;
pub(crate) mod sender;

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use kvbroker_proto::PeerInfo;

use crate::sys;
use sender::{NotOneWriter, SenderLog, Writer};

/// One connection's caller: who connected (`SO_PEERCRED` at `accept()`, for connection caps
/// and logs) and who writes on it (per-message credentials, for every decision).
pub(crate) struct ConnPeer {
    /// The process that called `connect()`, as of then.
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    senders: Arc<SenderLog>,
    /// The kernel's exec/exit events, when the agent listens to them.
    events: Option<Arc<events::Source>>,
    /// The facts of this connection's writer, read at its first request.
    bound: Mutex<Option<Bound>>,
}

/// A connection's writer's facts, and what vouches for them on later requests.
struct Bound {
    facts: Arc<PeerFacts>,
    /// Registered before the facts were read.
    watch: Option<events::Watch>,
    /// The watch as it was when the facts were last checked.
    mark: Option<events::Mark>,
    /// When they were last checked ([`events::now`], taken before the check).
    checked_at: u64,
}

/// However clean its watch, a kept-alive caller is re-checked at least this often: the
/// kernel drops an event without telling anyone when it cannot allocate its message (see
/// docs/security.md), and this bounds how long such a loss could go unnoticed.
const RECHECK_AT_LEAST_EVERY_NS: u64 = 1_000_000_000;

/// Facts about a caller, read for one request.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerFacts {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    pub(crate) exe: Option<String>,
    /// Why `exe` is not trusted (see `proc::exe_checked`); `None` when it is verified.
    pub(crate) exe_unverified: Option<String>,
    /// The process that called `connect()`, when another one wrote the request.
    pub(crate) connected_pid: Option<u32>,
    pub(crate) cgroup: Option<String>,
    /// The file to hash for `exe_sha256` (`/proc/PID/exe` for a live caller).
    pub(crate) exe_file: Option<String>,
    /// Computed on first use only: hashing is the one expensive fact.
    exe_sha256: OnceLock<Result<String, String>>,
    /// Verified ancestors, walked on first use.
    ancestors: OnceLock<Vec<ancestry::Ancestor>>,
    /// Unit and container from the cgroup path, checked on first use.
    cgroup_names: OnceLock<cgroup::CgroupNames>,
    /// The audit record's `peer` for these facts, serialized at the first allowed read that
    /// needs it: without and with `exe_sha256` (computed later, on first use). Filled by
    /// the request path (`server::routes`), which knows the record's form.
    pub(crate) audit_json: [OnceLock<Box<serde_json::value::RawValue>>; 2],
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
    #[error("peer moved to another cgroup since this connection's first request: reconnect")]
    CgroupChanged,
    #[error("peer changed its uid or gid since this connection's first request: reconnect")]
    IdsChanged,
    #[error(
        "process {other} wrote on a connection process {first} was using: each process must \
         open its own connection"
    )]
    SecondWriter { first: u32, other: u32 },
    #[error("request bytes arrived without sender credentials")]
    Unlabelled,
    #[error("peer facts unreadable: {0}")]
    Unreadable(String),
}

impl ConnPeer {
    /// Takes the connector's credentials of an accepted connection; `senders` is filled in
    /// by the connection's [`sender::LabelledStream`]; `events`, when given, may vouch for
    /// the writer on later requests.
    pub(crate) fn of(
        stream: &tokio::net::UnixStream,
        senders: Arc<SenderLog>,
        events: Option<Arc<events::Source>>,
    ) -> std::io::Result<Self> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid().map_or(0, |p| u32::try_from(p).unwrap_or(0));
        Ok(Self { pid, uid: cred.uid(), gid: cred.gid(), senders, events, bound: Mutex::new(None) })
    }

    /// The facts of the process that wrote this request, read at the connection's first
    /// request and re-checked at each later one: alive, same exe, and — when the policy
    /// reads cgroups (`recheck_cgroup`) — same cgroup, since a process can move itself into
    /// any cgroup it owns.
    pub(crate) fn facts(&self, recheck_cgroup: bool) -> Result<Arc<PeerFacts>, PeerError> {
        let writer = self.senders.writer().map_err(|e| match e {
            NotOneWriter::Mixed { first, other } => {
                PeerError::SecondWriter { first: first.pid, other: other.pid }
            }
            NotOneWriter::Unlabelled | NotOneWriter::Nothing => PeerError::Unlabelled,
        })?;
        if writer.pid == 0 {
            return Err(PeerError::OtherNamespace);
        }
        // Requests on one connection are decided one at a time: the lock is never contended.
        let mut bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = bound.as_mut() {
            // A later request from the same writer: still alive, same exe? Asked of /proc
            // and the pidfd unless the kernel's events vouch that nothing changed.
            let stamp = self.senders.received_at();
            let vouched = match (&b.watch, b.mark) {
                (Some(w), Some(m)) => {
                    stamp.saturating_sub(b.checked_at) < RECHECK_AT_LEAST_EVERY_NS && w.vouches(m, stamp)
                }
                _ => false,
            };
            if !vouched {
                crate::metrics::get().peer_recheck();
                // Taken before the check: an event during it still counts against it.
                let (mark, at) = (b.watch.as_ref().map(events::Watch::mark), events::now());
                check_alive(&writer)?;
                if proc::exe(writer.pid)? != b.facts.exe {
                    return Err(PeerError::ExeChanged);
                }
                // The events also report uid and gid changes (`setuid` and kin), which the
                // messages' credentials (real ids) miss when only the effective ones change:
                // a watch made dirty by one must not be made clean again without them.
                if b.watch.is_some() {
                    let status = proc::status(writer.pid)?;
                    if (status.uid, status.gid) != (Some(b.facts.uid), Some(b.facts.gid)) {
                        return Err(PeerError::IdsChanged);
                    }
                }
                (b.mark, b.checked_at) = (mark, at);
            }
            if recheck_cgroup && proc::cgroup(writer.pid)? != b.facts.cgroup {
                return Err(PeerError::CgroupChanged);
            }
            return Ok(Arc::clone(&b.facts));
        }
        // Watching before reading: an exec or exit after this is counted against the facts.
        let watch = self.events.as_ref().map(|e| e.watch(writer.pid));
        let (mark, checked_at) = (watch.as_ref().map(events::Watch::mark), events::now());
        let mut facts = read_facts(&writer)?;
        facts.connected_pid = (self.pid != writer.pid).then_some(self.pid);
        let facts = Arc::new(facts);
        *bound = Some(Bound { facts: Arc::clone(&facts), watch, mark, checked_at });
        Ok(facts)
    }

    /// What the audit record says about the caller when [`facts`](Self::facts) failed: the
    /// process that wrote last if a second one did (read afresh, best effort), else the
    /// connector.
    pub(crate) fn info(&self) -> PeerInfo {
        let connected_pid = |pid: u32| (pid != self.pid).then_some(self.pid);
        match self.senders.writer() {
            Err(NotOneWriter::Mixed { other, .. }) => match read_facts(&other) {
                Ok(f) => PeerInfo { connected_pid: connected_pid(other.pid), ..f.info() },
                // Gone already: what the kernel said about it with its bytes still stands.
                Err(_) => PeerInfo {
                    pid: other.pid,
                    uid: other.uid,
                    gid: other.gid,
                    connected_pid: connected_pid(other.pid),
                    ..PeerInfo::default()
                },
            },
            Ok(w) => PeerInfo {
                pid: w.pid,
                uid: w.uid,
                gid: w.gid,
                connected_pid: connected_pid(w.pid),
                ..PeerInfo::default()
            },
            Err(_) => PeerInfo { pid: self.pid, uid: self.uid, gid: self.gid, ..PeerInfo::default() },
        }
    }
}

/// The writer is still alive (so `/proc/PID` is still it).
fn check_alive(w: &Writer) -> Result<(), PeerError> {
    match w.pidfd.as_ref().map(|fd| sys::pidfd_alive(fd.as_fd())) {
        Some(Ok(true)) => Ok(()),
        Some(Ok(false)) => Err(PeerError::Exited),
        Some(Err(e)) => Err(PeerError::Unreadable(format!("pidfd: {e}"))),
        None => Ok(()),
    }
}

/// Reads a writer's facts from `/proc/PID`, confirming afterwards through its pidfd (or,
/// without one, its start time before and after) that the pid named it the whole time.
fn read_facts(w: &Writer) -> Result<PeerFacts, PeerError> {
    let pidfd: Option<BorrowedFd<'_>> = w.pidfd.as_ref().map(AsFd::as_fd);
    let before = if pidfd.is_none() { Some(proc::start_time(w.pid)?) } else { None };
    let facts = facts_of_pid(w.pid)?;
    if let Some(before) = before
        && proc::start_time(w.pid)? != before
    {
        return Err(PeerError::Exited);
    }
    check_alive(w)?;
    Ok(facts)
}

/// A process's start time (clock ticks since boot), to pin a pid to one process.
pub(crate) fn start_time_of(pid: u32) -> Result<u64, PeerError> {
    proc::start_time(pid)
}

/// Facts of a running process by pid, read from `/proc` (for a caller: by [`read_facts`],
/// which pins the pid to the writer; for `kvbroker policy explain --pid`: as is). uid and
/// gid are the effective ones from `/proc/PID/status`.
pub(crate) fn facts_of_pid(pid: u32) -> Result<PeerFacts, PeerError> {
    let status = proc::status(pid)?;
    let (Some(uid), Some(gid)) = (status.uid, status.gid) else {
        return Err(PeerError::Unreadable("status: no Uid/Gid".into()));
    };
    let (exe, exe_unverified) = proc::exe_checked(pid)?;
    Ok(PeerFacts {
        pid,
        uid,
        gid,
        groups: status.groups,
        exe,
        exe_unverified,
        connected_pid: None,
        cgroup: proc::cgroup(pid)?,
        exe_file: Some(format!("/proc/{pid}/exe")),
        exe_sha256: OnceLock::new(),
        ancestors: OnceLock::new(),
        cgroup_names: OnceLock::new(),
        audit_json: Default::default(),
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
            exe_unverified: None,
            connected_pid: None,
            cgroup,
            exe_file,
            exe_sha256: OnceLock::new(),
            ancestors: OnceLock::new(),
            cgroup_names: OnceLock::new(),
            audit_json: Default::default(),
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

    /// The executable's SHA-256 if a rule already needed it (the audit record's), else `None`.
    pub(crate) fn exe_sha256_if_computed(&self) -> Option<&str> {
        self.exe_sha256.get().and_then(|r| r.as_deref().ok())
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

    /// Sets the cgroup path, taking every directory on it as root's (tests of policy logic,
    /// where the paths do not exist on the test machine).
    #[cfg(test)]
    pub(crate) fn set_cgroup_trusted(&mut self, path: &str) {
        self.cgroup = Some(path.to_owned());
        self.cgroup_names = OnceLock::from(cgroup::names_with(path, &|_| Ok(())));
        // The record's `peer` serialized before the change would name the old cgroup.
        self.audit_json = Default::default();
    }

    /// What the cgroup path names (unit, container), anchored and ownership-checked once.
    pub(crate) fn cgroup_names(&self) -> &cgroup::CgroupNames {
        self.cgroup_names.get_or_init(|| match (&self.cgroup, self.pid) {
            (None, _) => cgroup::CgroupNames::default(),
            // Facts given by hand: the path may not exist on this node.
            (Some(path), 0) => cgroup::names_hypothetical(path),
            (Some(path), _) => cgroup::names(path),
        })
    }

    pub(crate) fn systemd_unit(&self) -> Option<&str> {
        self.cgroup_names().unit.as_ref().map(|n| n.name.as_str())
    }

    pub(crate) fn container_id(&self) -> Option<&str> {
        self.cgroup_names().container.as_ref().map(|n| n.name.as_str())
    }

    /// The Kubernetes pod UID, when the cgroup path is a kubelet container's.
    pub(crate) fn pod_uid(&self) -> Option<&str> {
        self.cgroup_names().pod_uid.as_ref().map(|n| n.name.as_str())
    }

    /// The facts as written to the audit record (the hash only if a rule needed it).
    pub(crate) fn info(&self) -> PeerInfo {
        PeerInfo {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            exe: self.exe.clone(),
            exe_unverified: self.exe_unverified.clone(),
            connected_pid: self.connected_pid,
            exe_sha256: self.exe_sha256_if_computed().map(str::to_owned),
            cgroup: self.cgroup.clone(),
            unit: self.systemd_unit().map(str::to_owned),
            container_id: self.container_id().map(str::to_owned),
            k8s_pod_uid: self.pod_uid().map(str::to_owned),
            ..PeerInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn facts_of_the_writer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        assert!(sys::pass_sender_credentials(a.as_fd()).is_ok());
        let log = Arc::new(SenderLog::default());
        let peer = ConnPeer::of(&a, Arc::clone(&log), None).unwrap();
        assert_eq!(peer.pid, std::process::id());
        assert!(matches!(peer.facts(true), Err(PeerError::Unlabelled)), "nothing written yet");
        b.write_all(b"GET").await.unwrap();
        let mut stream = sender::LabelledStream::new(a, log).unwrap();
        let mut got = [0u8; 3];
        stream.read_exact(&mut got).await.unwrap();
        let f = peer.facts(true).unwrap();
        assert_eq!(f.pid, std::process::id());
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(f.exe.as_deref(), me.to_str());
        assert!(f.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
        let own = exe_hash::sha256_of(me.to_str().unwrap()).unwrap();
        assert_eq!(f.exe_sha256(), Ok(own.as_str()));
    }

    #[test]
    fn pid_zero_is_another_namespace() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        let a = tokio::net::UnixStream::from_std(a).unwrap();
        let log = Arc::new(SenderLog::default());
        log.record(sys::Sender { cred: Some((0, 1000, 1000)), pidfd: None, len: 1 });
        let p = ConnPeer::of(&a, log, None).unwrap();
        assert!(matches!(p.facts(true), Err(PeerError::OtherNamespace)));
    }
}

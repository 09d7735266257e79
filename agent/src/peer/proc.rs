//! Reading `/proc/PID`: start time, groups, exe and cgroup v2 path. Only files the process
//! cannot rewrite about itself.

use super::PeerError;

pub(super) struct Status {
    pub(super) groups: Vec<u32>,
    /// Effective uid and gid (second field of `Uid:` / `Gid:`).
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
}

fn read(pid: u32, file: &str) -> Result<String, PeerError> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| gone_or(e, file))
}

fn gone_or(e: std::io::Error, what: &str) -> PeerError {
    match e.kind() {
        std::io::ErrorKind::NotFound => PeerError::Exited,
        // ESRCH from a /proc file of a process being reaped.
        _ if e.raw_os_error() == Some(libc::ESRCH) => PeerError::Exited,
        _ => PeerError::Unreadable(format!("{what}: {e}")),
    }
}

/// Fields 4 and 22 of `/proc/PID/stat`: parent pid and start time.
pub(super) fn parent_and_start(pid: u32) -> Result<(u32, u64), PeerError> {
    let stat = read(pid, "stat")?;
    let malformed = || PeerError::Unreadable("stat: malformed".into());
    let rest = &stat[stat.rfind(')').ok_or_else(malformed)? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let ppid = fields.get(1).and_then(|f| f.parse().ok()).ok_or_else(malformed)?;
    let start = fields.get(19).and_then(|f| f.parse().ok()).ok_or_else(malformed)?;
    Ok((ppid, start))
}

/// Field 22 of `/proc/PID/stat`: start time in clock ticks since boot.
pub(super) fn start_time(pid: u32) -> Result<u64, PeerError> {
    let stat = read(pid, "stat")?;
    parse_start_time(&stat).ok_or_else(|| PeerError::Unreadable("stat: malformed".into()))
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // `comm` (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

pub(super) fn status(pid: u32) -> Result<Status, PeerError> {
    let text = read(pid, "status")?;
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name));
    let groups = field("Groups:")
        .map(|g| g.split_ascii_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let effective =
        |name: &str| field(name).and_then(|v| v.split_ascii_whitespace().nth(1)).and_then(|v| v.parse().ok());
    Ok(Status { groups, uid: effective("Uid:"), gid: effective("Gid:") })
}

pub(super) fn exe(pid: u32) -> Result<Option<String>, PeerError> {
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(p) => Ok(Some(p.to_string_lossy().into_owned())),
        // A process that has exited and not been reaped yet (a zombie) still has its pid
        // and its pidfd answers as alive, but no exe: it wrote and is gone, and whoever
        // reads the answer is not it (SPEC: facts that cannot be read deny).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && exited(pid) => Err(PeerError::Exited),
        // Kernel threads have no exe; such a caller just has no exe fact.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && proc_exists(pid) => Ok(None),
        Err(e) => Err(gone_or(e, "exe")),
    }
}

/// The exe path and, if it cannot be trusted, why: the path must name, in the agent's own
/// mount namespace, the very file (device and inode) the process runs. A caller in its own
/// mount namespace can bind-mount anything over an allowed path, and `/proc/PID/exe` then
/// reads as that path.
pub(super) fn exe_checked(pid: u32) -> Result<(Option<String>, Option<String>), PeerError> {
    use std::os::unix::fs::MetadataExt;
    let Some(path) = exe(pid)? else { return Ok((None, None)) };
    let running = std::fs::File::open(format!("/proc/{pid}/exe"))
        .and_then(|f| f.metadata())
        .map_err(|e| gone_or(e, "exe"))?;
    let why = match std::fs::metadata(&path) {
        Ok(named) if (named.dev(), named.ino()) == (running.dev(), running.ino()) => None,
        Ok(_) => Some(format!("{path} is, in the agent's mount namespace, not the file the process runs")),
        Err(e) => Some(format!("{path} cannot be opened in the agent's mount namespace ({e})")),
    };
    Ok((Some(path), why))
}

/// Whether `pid` is a process that has exited: state `Z` (zombie) or `X` (being reaped) in
/// `/proc/PID/stat`, or no such process.
fn exited(pid: u32) -> bool {
    match read(pid, "stat") {
        Ok(stat) => parse_state(&stat).is_none_or(|s| s == 'Z' || s == 'X'),
        Err(e) => e == PeerError::Exited,
    }
}

/// Field 3 of `/proc/PID/stat`: the process state.
fn parse_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].split_ascii_whitespace().next()?.chars().next()
}

fn proc_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The cgroup v2 path: the `0::` line of `/proc/PID/cgroup`.
pub(super) fn cgroup(pid: u32) -> Result<Option<String>, PeerError> {
    let text = read(pid, "cgroup")?;
    Ok(text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that has exited but is not reaped yet (a zombie) is gone, not a caller
    /// without an exe; a kernel thread is one without an exe.
    #[test]
    fn a_zombie_has_exited_and_a_kernel_thread_has_no_exe() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !read(pid, "stat").is_ok_and(|s| parse_state(&s) == Some('Z')) {
            assert!(std::time::Instant::now() < deadline, "child {pid} never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(exe(pid), Err(PeerError::Exited), "zombie");
        child.wait().unwrap();
        assert_eq!(exe(pid), Err(PeerError::Exited), "reaped");
        // kthreadd, pid 2 in the initial pid namespace, where the agent runs.
        if read(2, "stat").is_ok_and(|s| s.contains("(kthreadd)")) {
            assert_eq!(exe(2), Ok(None), "kernel thread");
        }
        assert_eq!(exe(std::process::id()).map(|e| e.is_some()), Ok(true), "a live process");
        assert_eq!(parse_state("7 (a) b) Z 1 2"), Some('Z'));
        assert_eq!(parse_state("garbage"), None);
    }

    #[test]
    fn start_time_survives_odd_comm() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1 2";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn reads_own_facts() {
        let me = std::process::id();
        assert!(start_time(me).unwrap() > 0);
        assert!(exe(me).unwrap().is_some());
        assert!(status(me).is_ok());
    }

    #[test]
    fn missing_process_is_exited() {
        assert_eq!(start_time(u32::MAX - 7).err(), Some(PeerError::Exited));
    }
}

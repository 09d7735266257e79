//! A caller's ancestry, walked through `/proc/PID/stat` (parent pid, start time), with a
//! check at every step that the parent started no later than its child: a recycled pid
//! always starts later than the processes it would pose as the parent of, so it cannot make
//! a stranger look like a descendant.

use super::{PeerError, proc};

/// One verified ancestor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ancestor {
    pub(crate) pid: u32,
    pub(crate) start: u64,
    pub(crate) exe: Option<String>,
}

/// The ancestors of `pid` (nearest first, not including `pid`), as far as they verify.
pub(crate) fn ancestors(pid: u32) -> Result<Vec<Ancestor>, PeerError> {
    let (mut ppid, mut child_start) = proc::parent_and_start(pid)?;
    let mut out = Vec::new();
    while ppid > 1 && out.len() < 256 {
        let Ok((grand, start)) = proc::parent_and_start(ppid) else { break };
        if start > child_start {
            // The "parent" started after its child: the real parent exited and its pid was
            // recycled. The chain ends here.
            break;
        }
        // An ancestor's exe counts only if verified like the caller's own.
        let exe = match proc::exe_checked(ppid) {
            Ok((Some(exe), None)) => Some(exe),
            _ => None,
        };
        out.push(Ancestor { pid: ppid, start, exe });
        child_start = start;
        ppid = grand;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_ancestry_includes_our_parent() {
        let me = std::process::id();
        let a = ancestors(me).unwrap();
        let parent = std::os::unix::process::parent_id();
        if parent > 1 {
            assert_eq!(a.first().map(|x| x.pid), Some(parent));
        }
        assert!(a.windows(2).all(|w| w[1].start <= w[0].start));
    }
}

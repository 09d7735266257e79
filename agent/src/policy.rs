//! Per-process policy: which caller may read which secret. Deny by default.
//!
//! A request is allowed when some rule's every selector fits the caller and one of its
//! `secrets` patterns fits `VAULT/NAME` (lowercase). Rules are tried in file order; the first
//! that allows names itself in the audit record. Deciding is pure: the facts come in, a
//! [`Decision`] comes out; [`Policy::explain_with`] gives the same verdict with every reason, for
//! `kvbroker policy explain`. Loading checks the file's permissions and refuses rules that
//! could match everyone (no selector) or nothing (empty lists).
//!
//! Selectors read only facts the caller cannot forge: uid and gid from the kernel, groups,
//! exe and cgroup from `/proc`, and what the cgroup path names (systemd unit, container,
//! pod). Never `cmdline` or `environ`. The `k8s_*` selectors read what the node's kubelet
//! says about that pod ([`k8s`]); they are checked last in a rule, and the pod is asked for
//! only when a rule that has them is considered ([`Decision::NeedPod`]).

mod decide;
mod glob;
mod k8s;
mod load;

use std::path::PathBuf;

pub(crate) use glob::Glob;

use crate::kube::PodLookup;
use crate::peer::PeerFacts;

/// A loaded policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    rules: Vec<Rule>,
    /// SHA-256 of the file's text, for the audit record of its loading.
    sha256: String,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Shared with every decision it makes (no copy per allowed read).
    name: std::sync::Arc<str>,
    selectors: Vec<Selector>,
    secrets: Vec<Glob>,
}

/// One condition on the caller. New selectors slot in here and in [`Selector::check`].
#[derive(Debug, Clone)]
enum Selector {
    Uids(Vec<u32>),
    Gids(Vec<u32>),
    Exe(Vec<Glob>),
    ExeSha256(Vec<String>),
    Cgroup(Vec<Glob>),
    SystemdUnit(Vec<Glob>),
    ContainerId(Vec<Glob>),
    AncestorExe(Vec<Glob>),
    K8s(k8s::K8sSelector),
}

/// The result of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Allow {
        rule: std::sync::Arc<str>,
    },
    Deny {
        reason: String,
    },
    /// A rule with `k8s_*` selectors is next and the caller's pod has not been asked for:
    /// look it up and decide again with [`Policy::decide_with`].
    NeedPod,
    /// No rule allows, and a rule that might have could not be judged: the kubelet did not
    /// answer. Fails closed (502), unlike a denial.
    KubeletUnavailable {
        reason: String,
    },
}

/// Why each rule did or did not allow a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleVerdict {
    pub(crate) rule: String,
    /// (selector key, fits?, why) in the rule's order, then `secrets`.
    pub(crate) checks: Vec<(&'static str, bool, String)>,
}

impl RuleVerdict {
    pub(crate) fn allows(&self) -> bool {
        self.checks.iter().all(|(_, ok, _)| *ok)
    }
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("{path}: cannot read policy: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Untrusted(#[from] crate::trust::Untrusted),
    #[error("{path}:{line}: {message}")]
    At { path: PathBuf, line: usize, message: String },
}

impl Selector {
    fn key(&self) -> &'static str {
        match self {
            Selector::Uids(_) => "uids",
            Selector::Gids(_) => "gids",
            Selector::Exe(_) => "exe",
            Selector::ExeSha256(_) => "exe_sha256",
            Selector::Cgroup(_) => "cgroup",
            Selector::SystemdUnit(_) => "systemd_unit",
            Selector::ContainerId(_) => "container_id",
            Selector::AncestorExe(_) => "ancestor_exe",
            Selector::K8s(k) => k.key(),
        }
    }

    fn is_k8s(&self) -> bool {
        matches!(self, Selector::K8s(_))
    }

    fn is_empty(&self) -> bool {
        match self {
            Selector::Uids(v) | Selector::Gids(v) => v.is_empty(),
            Selector::ExeSha256(v) => v.is_empty(),
            Selector::Exe(v)
            | Selector::Cgroup(v)
            | Selector::SystemdUnit(v)
            | Selector::ContainerId(v)
            | Selector::AncestorExe(v) => v.is_empty(),
            Selector::K8s(k) => k.is_empty(),
        }
    }

    /// Whether the caller fits: [`check`](Self::check)'s verdict without its explanation,
    /// so a decision formats no text.
    fn fits(&self, f: &PeerFacts, pod: &PodLookup) -> bool {
        let glob_fact =
            |globs: &[Glob], fact: Option<&str>| fact.is_some_and(|v| globs.iter().any(|g| g.matches(v)));
        let fits = if f.exe_unverified.is_some()
            && matches!(self, Selector::Exe(_) | Selector::ExeSha256(_) | Selector::AncestorExe(_))
        {
            false
        } else {
            match self {
                Selector::Uids(uids) => uids.contains(&f.uid),
                Selector::Gids(gids) => gids.contains(&f.gid) || f.groups.iter().any(|g| gids.contains(g)),
                Selector::Exe(globs) => glob_fact(globs, f.exe.as_deref()),
                Selector::Cgroup(globs) => glob_fact(globs, f.cgroup.as_deref()),
                Selector::SystemdUnit(globs) => glob_fact(globs, f.systemd_unit()),
                Selector::ContainerId(globs) => glob_fact(globs, f.container_id()),
                Selector::AncestorExe(globs) => f
                    .ancestors()
                    .iter()
                    .any(|a| a.exe.as_deref().is_some_and(|exe| globs.iter().any(|g| g.matches(exe)))),
                Selector::ExeSha256(hashes) => f.exe_sha256().is_ok_and(|h| hashes.iter().any(|x| x == h)),
                // Rare (pod callers only): the explained check.
                Selector::K8s(k) => k.check(f, pod).is_ok(),
            }
        };
        // Every test that decides also proves the two agree.
        debug_assert_eq!(fits, self.check(f, pod).is_ok(), "fits and check disagree");
        fits
    }

    /// `Ok(why it fits)` or `Err(why not)`.
    fn check(&self, f: &PeerFacts, pod: &PodLookup) -> Result<String, String> {
        let glob_fact = |globs: &[Glob], fact: Option<&str>, what: &str| match fact {
            Some(v) => match globs.iter().find(|g| g.matches(v)) {
                Some(g) => Ok(format!("{what} {v} fits {:?}", g.0)),
                None => Err(format!("{what} {v} fits no pattern")),
            },
            None => Err(format!("caller has no {what}")),
        };
        if let Some(why) = &f.exe_unverified
            && matches!(self, Selector::Exe(_) | Selector::ExeSha256(_) | Selector::AncestorExe(_))
        {
            return Err(format!("exe unverified: {why}"));
        }
        match self {
            Selector::Uids(uids) => {
                if uids.contains(&f.uid) {
                    Ok(format!("uid {}", f.uid))
                } else {
                    Err(format!("uid {} is not listed", f.uid))
                }
            }
            Selector::Gids(gids) => {
                if gids.contains(&f.gid) {
                    Ok(format!("primary gid {}", f.gid))
                } else if let Some(g) = f.groups.iter().find(|g| gids.contains(g)) {
                    Ok(format!("supplementary group {g}"))
                } else {
                    Err(format!("gid {} and groups {:?} are not listed", f.gid, f.groups))
                }
            }
            Selector::Exe(globs) => glob_fact(globs, f.exe.as_deref(), "exe"),
            Selector::Cgroup(globs) => glob_fact(globs, f.cgroup.as_deref(), "cgroup"),
            Selector::SystemdUnit(globs) => glob_fact(globs, f.systemd_unit(), "systemd unit"),
            Selector::ContainerId(globs) => glob_fact(globs, f.container_id(), "container id"),
            Selector::AncestorExe(globs) => {
                let hit = f.ancestors().iter().find_map(|a| {
                    let exe = a.exe.as_deref()?;
                    globs.iter().find(|g| g.matches(exe)).map(|g| (a.pid, exe, g))
                });
                match hit {
                    Some((pid, exe, g)) => Ok(format!("ancestor {pid} ({exe}) fits {:?}", g.0)),
                    None => Err("no verified ancestor's exe fits".into()),
                }
            }
            Selector::ExeSha256(hashes) => match f.exe_sha256() {
                Ok(h) if hashes.iter().any(|x| x == h) => Ok(format!("exe sha256 {h}")),
                Ok(h) => Err(format!("exe sha256 {h} is not listed")),
                Err(why) => Err(why.to_owned()),
            },
            Selector::K8s(k) => k.check(f, pod),
        }
    }
}

#[cfg(test)]
mod tests;

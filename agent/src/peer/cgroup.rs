//! What a cgroup v2 path says about a job: its systemd unit and its container id — taken
//! only from where systemd and the container runtimes put them, and only when no one but
//! root could have made the directories.
//!
//! Parsed segment by segment, from the path the kernel reports in `/proc/PID/cgroup` (never
//! from `mountinfo`, which a workload can spoof). A name counts only at these positions:
//!
//! | manager | path | what is taken |
//! | --- | --- | --- |
//! | systemd services and scopes | `/system.slice/train.service`, `/user.slice/user-1000.slice/session-3.scope` | the first segment after the leading `*.slice` segments, if it ends in `.service` or `.scope` |
//! | Slurm (cgroup v2) | `/system.slice/slurmstepd.scope/job_42/step_0/…` | unit `slurmstepd.scope` (the job's own subtree below it never names a unit) |
//! | Docker, systemd driver | `/system.slice/docker-<64 hex>.scope` | container id: that first non-slice segment, `docker-`, `cri-containerd-`, `crio-`, `libpod-` prefixes |
//! | Kubernetes, systemd driver (containerd, CRI-O) | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<64 hex>.scope` | the same |
//! | Docker, cgroupfs driver | `/docker/<64 hex>` | the second segment under `/docker` |
//! | Kubernetes, cgroupfs driver | `/kubepods/[burstable\|besteffort/]pod<uid>/<64 hex>` | the segment right after `pod<uid>` |
//!
//! For Kubernetes the pod UID is taken too, and only from the exact layouts the kubelet's
//! two cgroup drivers make, anchored at the root: `/kubepods.slice/kubepods-<qos>.slice/
//! kubepods-<qos>-pod<uid, _ for ->.slice/<runtime>-<64 hex>.scope` (qos `burstable` or
//! `besteffort`) or `/kubepods.slice/kubepods-pod<uid>.slice/<runtime>-<64 hex>.scope`
//! (guaranteed) for `systemd`, and `/kubepods/[burstable|besteffort/]pod<uid>/<64 hex>` for
//! `cgroupfs`. The pod UID and the container id come as a pair, both from root-owned
//! directories, or not at all.
//!
//! Anything deeper — where systemd delegates a subtree to a user (`user@1000.service/…`),
//! to Slurm jobs or to a container runtime — never names a unit or container, because the
//! delegate can create any name there. On top of the position, the directory of the segment
//! and every directory above it (below the cgroup root) must be owned by root and writable
//! by no one else; a delegated subtree fails that even where a layout would fit.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, PoisonError};

/// A name read from the cgroup path, and the segment it came from (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Named {
    pub(crate) name: String,
    pub(crate) segment: usize,
}

/// What the cgroup path names, decided once per caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CgroupNames {
    pub(crate) unit: Option<Named>,
    pub(crate) container: Option<Named>,
    /// The Kubernetes pod UID (with `-`, as the kubelet reports it), set only together with
    /// `container` from a kubelet layout.
    pub(crate) pod_uid: Option<Named>,
    /// Why a name in the right place was not taken (a directory not owned by root).
    pub(crate) refused: Option<String>,
}

/// Reads the names from `path`, checking directory ownership on the live cgroup tree.
pub(crate) fn names(path: &str) -> CgroupNames {
    names_with(path, &|prefix| directory_is_roots(prefix))
}

/// [`names`] for a caller given by hand (`policy explain --cgroup`): directories that do not
/// exist on this node are taken as they would be made there (by root); existing ones are
/// checked.
pub(crate) fn names_hypothetical(path: &str) -> CgroupNames {
    names_with(path, &|prefix| {
        if cgroup_root().join(prefix.trim_start_matches('/')).exists() {
            directory_is_roots(prefix)
        } else {
            Ok(())
        }
    })
}

/// [`names`] with the ownership check given (tests).
pub(crate) fn names_with(path: &str, roots: &dyn Fn(&str) -> Result<(), String>) -> CgroupNames {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut out = CgroupNames::default();
    let mut take = |found: Option<(usize, String)>| -> Option<Named> {
        let (i, name) = found?;
        let prefix = format!("/{}", segs[..=i].join("/"));
        match roots(&prefix) {
            Ok(()) => Some(Named { name, segment: i + 1 }),
            Err(why) => {
                out.refused.get_or_insert(why);
                None
            }
        }
    };
    let unit = systemd_position(&segs).filter(|&i| is_unit(segs[i])).map(|i| (i, segs[i].to_owned()));
    let container = container_position(&segs);
    let pod = kube_position(&segs);
    let unit = take(unit);
    let container = take(container);
    // The pod needs its container: a name from a kubelet layout, and the container
    // directory root's (checked through `container`, which covers every directory above).
    let pod_uid = match (pod, &container) {
        (Some((i, uid, ctr)), Some(c)) if c.segment == ctr + 1 => Some(Named { name: uid, segment: i + 1 }),
        _ => None,
    };
    CgroupNames { unit, container, pod_uid, refused: out.refused }
}

/// A kubelet layout: (pod segment, pod UID, container segment).
fn kube_position(segs: &[&str]) -> Option<(usize, String, usize)> {
    let (pod_at, uid) = match segs {
        ["kubepods.slice", qos @ ("kubepods-burstable.slice" | "kubepods-besteffort.slice"), pod, _, ..] => {
            let prefix = format!("{}-pod", qos.strip_suffix(".slice")?);
            let uid = pod.strip_prefix(prefix.as_str())?.strip_suffix(".slice")?;
            (2, uid.replace('_', "-"))
        }
        ["kubepods.slice", pod, _, ..] => {
            let uid = pod.strip_prefix("kubepods-pod")?.strip_suffix(".slice")?;
            (1, uid.replace('_', "-"))
        }
        ["kubepods", "burstable" | "besteffort", pod, _, ..] => (2, pod.strip_prefix("pod")?.to_owned()),
        ["kubepods", pod, _, ..] => (1, pod.strip_prefix("pod")?.to_owned()),
        _ => return None,
    };
    is_pod_uid(&uid).then_some((pod_at, uid, pod_at + 1))
}

/// A pod UID as the kubelet writes it: a UUID (API pods) or 32 hex digits (static pods'
/// hash), lowercase.
fn is_pod_uid(s: &str) -> bool {
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    match s.len() {
        32 => s.bytes().all(hex),
        36 => {
            s.bytes().enumerate().all(|(i, b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { hex(b) })
        }
        _ => false,
    }
}

/// The first segment after the leading `*.slice` segments.
fn systemd_position(segs: &[&str]) -> Option<usize> {
    let i = segs.iter().position(|s| !s.ends_with(".slice"))?;
    // Slices must be systemd's: `-.slice` naming follows the parent (`a.slice/a-b.slice`).
    (i > 0).then_some(i)
}

fn is_unit(seg: &str) -> bool {
    seg.ends_with(".service") || seg.ends_with(".scope")
}

/// Where a container id may be, and the id.
fn container_position(segs: &[&str]) -> Option<(usize, String)> {
    if let Some(i) = systemd_position(segs) {
        let seg = segs[i].strip_suffix(".scope")?;
        let id =
            ["docker-", "cri-containerd-", "crio-", "libpod-"].iter().find_map(|p| seg.strip_prefix(p))?;
        return is_id(id).then(|| (i, id.to_owned()));
    }
    match segs {
        ["docker", id, ..] if is_id(id) => Some((1, (*id).to_owned())),
        ["kubepods", pod, id, ..] if pod.starts_with("pod") && is_id(id) => Some((2, (*id).to_owned())),
        ["kubepods", "burstable" | "besteffort", pod, id, ..] if pod.starts_with("pod") && is_id(id) => {
            Some((3, (*id).to_owned()))
        }
        _ => None,
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones.
fn cgroup_root() -> &'static Path {
    static ROOT: LazyLock<PathBuf> = LazyLock::new(|| {
        let pure = Path::new("/sys/fs/cgroup");
        if pure.join("cgroup.controllers").exists() { pure.to_owned() } else { pure.join("unified") }
    });
    &ROOT
}

/// Directories already found safe. Only root can change a root-owned directory's owner or
/// mode, or remove and re-create one under a root-owned parent, so a "yes" stays true.
static SAFE: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// `prefix` (a cgroup path) and every directory above it, below the cgroup root, are owned
/// by root and writable by no one else.
fn directory_is_roots(prefix: &str) -> Result<(), String> {
    let root = cgroup_root();
    let mut at = String::new();
    for seg in prefix.split('/').filter(|s| !s.is_empty()) {
        at.push('/');
        at.push_str(seg);
        if SAFE.lock().unwrap_or_else(PoisonError::into_inner).contains(&at) {
            continue;
        }
        let dir = root.join(&at[1..]);
        let m = std::fs::symlink_metadata(&dir).map_err(|e| format!("cgroup {at}: {e}"))?;
        if m.uid() != 0 {
            return Err(format!(
                "cgroup {at} is owned by uid {} (a delegated subtree): its names do not count",
                m.uid()
            ));
        }
        if m.mode() & 0o022 != 0 {
            return Err(format!("cgroup {at} is writable by group or others: its names do not count"));
        }
        let mut safe = SAFE.lock().unwrap_or_else(PoisonError::into_inner);
        if safe.len() > 65_536 {
            safe.clear();
        }
        safe.insert(at.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f9c8e1d2b3a4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    fn all_root(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn unit(path: &str) -> Option<String> {
        names_with(path, &all_root).unit.map(|n| n.name)
    }

    fn container(path: &str) -> Option<String> {
        names_with(path, &all_root).container.map(|n| n.name)
    }

    #[test]
    fn systemd_services_and_scopes() {
        assert_eq!(unit("/system.slice/train.service").as_deref(), Some("train.service"));
        assert_eq!(unit("/user.slice/user-1000.slice/session-3.scope").as_deref(), Some("session-3.scope"));
        assert_eq!(
            unit("/system.slice/slurmstepd.scope/job_42/step_0/user/task_0").as_deref(),
            Some("slurmstepd.scope")
        );
        assert_eq!(unit("/"), None);
        assert_eq!(unit("/kvbtest"), None);
        assert_eq!(container("/system.slice/train.service"), None);
        let seg = names_with("/system.slice/train.service", &all_root).unit.unwrap().segment;
        assert_eq!(seg, 2);
    }

    /// Issue 12: names made inside a delegated subtree never count, wherever they sit.
    #[test]
    fn names_below_a_unit_do_not_count() {
        let delegated = "/user.slice/user-1000.slice/user@1000.service/app.slice/train.service";
        assert_eq!(unit(delegated).as_deref(), Some("user@1000.service"));
        assert_eq!(
            unit("/system.slice/slurmstepd.scope/job_1/train.service").as_deref(),
            Some("slurmstepd.scope")
        );
        assert_eq!(
            container(&format!("/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope")),
            None
        );
        assert_eq!(container(&format!("/system.slice/slurmstepd.scope/docker-{ID}.scope")), None);
        assert_eq!(container(&format!("/mine/docker/{ID}")), None);
        assert_eq!(unit("/mine/train.service"), None, "no slice above: not systemd's");
    }

    #[test]
    fn a_directory_not_owned_by_root_refuses_the_name() {
        let owned = |p: &str| {
            if p.starts_with("/system.slice/train") { Err(format!("{p}: uid 1000")) } else { Ok(()) }
        };
        let n = names_with("/system.slice/train.service", &owned);
        assert_eq!(n.unit, None);
        assert_eq!(n.refused.as_deref(), Some("/system.slice/train.service: uid 1000"));
    }

    #[test]
    fn docker_both_drivers() {
        let systemd = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(container(&systemd).as_deref(), Some(ID));
        assert_eq!(unit(&systemd), Some(format!("docker-{ID}.scope")));
        assert_eq!(container(&format!("/docker/{ID}")).as_deref(), Some(ID));
    }

    #[test]
    fn kubernetes_layouts() {
        let cri = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(container(&cri).as_deref(), Some(ID));
        let guaranteed = format!("/kubepods.slice/kubepods-pod1a2b.slice/crio-{ID}.scope");
        assert_eq!(container(&guaranteed).as_deref(), Some(ID));
        assert_eq!(container(&format!("/kubepods/besteffort/pod1a2b3c4d-5e6f/{ID}")).as_deref(), Some(ID));
        assert_eq!(container(&format!("/kubepods/pod1a2b3c4d-5e6f/{ID}")).as_deref(), Some(ID));
    }

    const UID: &str = "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d";

    fn pod(path: &str) -> Option<(String, String)> {
        let n = names_with(path, &all_root);
        n.pod_uid.map(|p| (p.name, n.container.map(|c| c.name).unwrap_or_default()))
    }

    /// Issue 18: pod UID and container id from both kubelet drivers and every QoS class.
    #[test]
    fn pod_uid_from_every_kubelet_layout() {
        let u = UID.replace('-', "_");
        let want = Some((UID.to_owned(), ID.to_owned()));
        for path in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
            // A container's own sub-cgroups are still that container.
            format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope/init"),
        ] {
            assert_eq!(pod(&path), want, "{path}");
        }
        let segment = names_with(&format!("/kubepods/pod{UID}/{ID}"), &all_root).pod_uid.unwrap().segment;
        assert_eq!(segment, 2);
    }

    /// Look-alikes: not at the root, wrong QoS pairing, no container, a bad UID, a
    /// directory someone else owns.
    #[test]
    fn pod_uid_only_at_anchored_root_owned_positions() {
        let u = UID.replace('-', "_");
        for path in [
            format!("/user.slice/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
            format!("/mine/kubepods/pod{UID}/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-abc.scope"),
            format!("/kubepods.slice/kubepods-podNOT-A-UID.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods/pod{UID}/x/{ID}"),
            format!("/kubepods/burstable/pod{}/{ID}", UID.to_uppercase()),
        ] {
            assert_eq!(pod(&path), None, "{path}");
        }
        let path = format!("/kubepods/pod{UID}/{ID}");
        let delegated = |p: &str| if p.ends_with(ID) { Err("uid 1000".to_owned()) } else { Ok(()) };
        let n = names_with(&path, &delegated);
        assert_eq!((n.pod_uid, n.container), (None, None));
        assert!(is_pod_uid("0123456789abcdef0123456789abcdef"), "static pod hash");
    }

    #[test]
    fn not_an_id() {
        assert_eq!(container("/docker/abc"), None);
        assert_eq!(container(&format!("/docker/{}", "g".repeat(64))), None);
    }

    #[test]
    fn the_live_root_cgroup_is_roots() {
        assert_eq!(directory_is_roots("/"), Ok(()));
    }
}

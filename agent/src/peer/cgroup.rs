//! What a cgroup v2 path says about a job: its systemd unit and its container id.
//!
//! Parsed segment by segment, from the path the kernel reports in `/proc/PID/cgroup` (never
//! from `mountinfo`, which a workload can spoof). Layouts handled:
//! - systemd services and scopes: `/system.slice/train.service`, `…/session-3.scope`
//! - Docker: `/system.slice/docker-<64 hex>.scope` (systemd driver), `/docker/<64 hex>`
//! - Kubernetes (containerd / CRI-O, systemd driver):
//!   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<64 hex>.scope`;
//!   cgroupfs driver: `/kubepods/burstable/pod<uid>/<64 hex>`
//! - Slurm: `/system.slice/slurmstepd.scope/job_<id>/step_<s>/…` → unit `slurmstepd.scope`

/// The deepest segment that names a systemd service or scope.
pub(crate) fn systemd_unit(path: &str) -> Option<&str> {
    path.rsplit('/').find(|s| s.ends_with(".service") || s.ends_with(".scope"))
}

/// The deepest container id (64 hex characters) in the path, without runtime prefixes.
pub(crate) fn container_id(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(segment_container_id)
}

fn segment_container_id(seg: &str) -> Option<&str> {
    let seg = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = ["docker-", "cri-containerd-", "crio-", "containerd-", "libpod-"]
        .iter()
        .find_map(|p| seg.strip_prefix(p))
        .unwrap_or(seg);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f9c8e1d2b3a4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    #[test]
    fn systemd_services_and_scopes() {
        assert_eq!(systemd_unit("/system.slice/train.service"), Some("train.service"));
        assert_eq!(systemd_unit("/user.slice/user-1000.slice/session-3.scope"), Some("session-3.scope"));
        assert_eq!(
            systemd_unit("/system.slice/slurmstepd.scope/job_42/step_0/user/task_0"),
            Some("slurmstepd.scope")
        );
        assert_eq!(systemd_unit("/"), None);
        assert_eq!(systemd_unit("/kvbtest"), None);
        assert_eq!(container_id("/system.slice/train.service"), None);
    }

    #[test]
    fn docker_both_drivers() {
        let systemd = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(container_id(&systemd), Some(ID));
        assert_eq!(systemd_unit(&systemd), Some(format!("docker-{ID}.scope").as_str()));
        assert_eq!(container_id(&format!("/docker/{ID}")), Some(ID));
    }

    #[test]
    fn kubernetes_layouts() {
        let cri = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(container_id(&cri), Some(ID));
        let guaranteed = format!("/kubepods.slice/kubepods-pod1a2b.slice/crio-{ID}.scope");
        assert_eq!(container_id(&guaranteed), Some(ID));
        let cgroupfs = format!("/kubepods/besteffort/pod1a2b3c4d-5e6f/{ID}");
        assert_eq!(container_id(&cgroupfs), Some(ID));
    }

    #[test]
    fn not_an_id() {
        assert_eq!(container_id("/docker/abc"), None);
        assert_eq!(container_id(&format!("/docker/{}", "g".repeat(64))), None);
    }
}

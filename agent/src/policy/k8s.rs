//! Kubernetes selectors: facts about the caller's pod, as the node's kubelet reports them for
//! the pod UID and container id the caller's cgroup path names (`peer::cgroup`).
//!
//! Pure like the rest of policy: the pod comes in as a [`PodLookup`], already asked of the
//! kubelet by the caller of [`Policy::decide_with`](super::Policy::decide_with), and only
//! when a rule that has these selectors is considered. A caller outside any pod fits none.

use crate::kube::{Container, Pod, PodLookup};
use crate::peer::PeerFacts;

use super::Glob;

/// One `k8s_*` key of a rule.
#[derive(Debug, Clone)]
pub(super) enum K8sSelector {
    Namespace(Vec<Glob>),
    ServiceAccount(Vec<Glob>),
    PodName(Vec<Glob>),
    /// Every `key=value-glob` must fit (like a Kubernetes `matchLabels`).
    PodLabel(Vec<(String, Glob)>),
    ContainerName(Vec<Glob>),
    ContainerImage(Vec<ImagePattern>),
}

/// A `k8s_container_image` entry.
#[derive(Debug, Clone)]
pub(super) enum ImagePattern {
    /// A glob on the image the pod spec names (`registry/repo:tag`).
    Name(Glob),
    /// `sha256:<64 hex>`, optionally after `REPO-GLOB@`: matched against the image the
    /// runtime actually resolved (the kubelet's `imageID`), which a tag cannot move.
    Digest { repo: Option<Glob>, digest: String },
}

/// The rule keys, for messages.
pub(super) const KEYS: &str = "or one of k8s_namespace, k8s_service_account, k8s_pod_name, \
                               k8s_pod_label, k8s_container_name, k8s_container_image";

impl K8sSelector {
    pub(super) fn key(&self) -> &'static str {
        match self {
            K8sSelector::Namespace(_) => "k8s_namespace",
            K8sSelector::ServiceAccount(_) => "k8s_service_account",
            K8sSelector::PodName(_) => "k8s_pod_name",
            K8sSelector::PodLabel(_) => "k8s_pod_label",
            K8sSelector::ContainerName(_) => "k8s_container_name",
            K8sSelector::ContainerImage(_) => "k8s_container_image",
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            K8sSelector::Namespace(v)
            | K8sSelector::ServiceAccount(v)
            | K8sSelector::PodName(v)
            | K8sSelector::ContainerName(v) => v.is_empty(),
            K8sSelector::PodLabel(v) => v.is_empty(),
            K8sSelector::ContainerImage(v) => v.is_empty(),
        }
    }

    /// `Ok(why it fits)` or `Err(why not)`.
    pub(super) fn check(&self, f: &PeerFacts, pod: &PodLookup) -> Result<String, String> {
        let Some(uid) = f.pod_uid() else {
            return Err(
                "caller is not in a Kubernetes pod (its cgroup path is no kubelet container's)".into()
            );
        };
        let p: &Pod = match pod {
            PodLookup::Found(p) => p,
            PodLookup::NotAsked => return Err(format!("pod {uid} was not looked up")),
            PodLookup::NotFound => return Err(format!("pod {uid} not found on this node")),
            PodLookup::Unavailable(why) => return Err(format!("kubelet unavailable: {why}")),
        };
        let globs = |globs: &[Glob], v: &str, what: &str| match globs.iter().find(|g| g.matches(v)) {
            Some(g) => Ok(format!("{what} {v} fits {:?}", g.0)),
            None => Err(format!("{what} {v} fits no pattern")),
        };
        let container = || -> Result<&Container, String> {
            let id = f.container_id().unwrap_or("-");
            p.container(id).ok_or_else(|| {
                format!("container {id} is not in the status of pod {}/{}", p.namespace, p.name)
            })
        };
        match self {
            K8sSelector::Namespace(g) => globs(g, &p.namespace, "namespace"),
            K8sSelector::ServiceAccount(g) => globs(g, &p.service_account, "service account"),
            K8sSelector::PodName(g) => globs(g, &p.name, "pod"),
            K8sSelector::PodLabel(want) => {
                let mut fit = Vec::with_capacity(want.len());
                for (key, g) in want {
                    match p.labels.get(key) {
                        Some(v) if g.matches(v) => fit.push(format!("{key}={v}")),
                        Some(v) => return Err(format!("label {key}={v} does not fit {key}={}", g.0)),
                        None => return Err(format!("pod has no label {key}")),
                    }
                }
                Ok(format!("labels {}", fit.join(", ")))
            }
            K8sSelector::ContainerName(g) => globs(g, &container()?.name, "container"),
            K8sSelector::ContainerImage(patterns) => {
                let c = container()?;
                let id = c.image_id.as_deref();
                let hit = patterns.iter().find(|pat| match pat {
                    ImagePattern::Name(g) => g.matches(&c.image),
                    ImagePattern::Digest { repo, digest } => {
                        id.is_some_and(|id| image_id_fits(id, repo.as_ref(), digest))
                    }
                });
                match hit {
                    Some(ImagePattern::Name(g)) => Ok(format!("image {} fits {:?}", c.image, g.0)),
                    Some(ImagePattern::Digest { digest, .. }) => {
                        Ok(format!("image id {} has digest {digest}", id.unwrap_or("-")))
                    }
                    None => Err(format!("image {} (id {}) fits no pattern", c.image, id.unwrap_or("-"))),
                }
            }
        }
    }
}

/// Whether the kubelet's `imageID` (`repo@sha256:…`, or a bare `sha256:…` from some
/// runtimes) has `digest`, and — when a repository was given — that repository.
fn image_id_fits(image_id: &str, repo: Option<&Glob>, digest: &str) -> bool {
    let (id_repo, id_digest) = match image_id.rsplit_once('@') {
        Some((r, d)) => (Some(r), d),
        None => (None, image_id),
    };
    // `docker-pullable://repo@sha256:…` (dockershim-era runtimes).
    let id_repo = id_repo.map(|r| r.rsplit_once("://").map_or(r, |(_, r)| r));
    id_digest.eq_ignore_ascii_case(digest)
        && match repo {
            None => true,
            Some(g) => id_repo.is_some_and(|r| g.matches(r)),
        }
}

/// Parses a `k8s_pod_label` entry: `key=value-glob`.
pub(super) fn label(s: &str) -> Result<(String, Glob), String> {
    let bad = || format!("k8s_pod_label {s:?} needs the form KEY=VALUE-GLOB, like \"app=trainer\"");
    let (k, v) = s.split_once('=').ok_or_else(bad)?;
    let key_ok = !k.is_empty()
        && k.len() <= 317
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !key_ok {
        return Err(bad());
    }
    Ok((k.to_owned(), Glob::new(v)))
}

/// Parses a `k8s_container_image` entry: a glob, or a digest form.
pub(super) fn image(s: &str) -> Result<ImagePattern, String> {
    let Some(at) = s.find("sha256:") else {
        return Ok(ImagePattern::Name(Glob::new(s)));
    };
    let (before, digest) = s.split_at(at);
    let hex = &digest["sha256:".len()..];
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "k8s_container_image {s:?}: a digest is sha256: and 64 hexadecimal characters, like \"sha256:4f9c…\" or \"registry/repo@sha256:4f9c…\""
        ));
    }
    let repo = match before {
        "" => None,
        r => match r.strip_suffix('@') {
            Some(r) if !r.is_empty() => Some(Glob::new(r)),
            _ => return Err(format!("k8s_container_image {s:?}: write REPOSITORY@sha256:… or sha256:…")),
        },
    };
    Ok(ImagePattern::Digest { repo, digest: digest.to_ascii_lowercase() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "4f9c8e1d2b3a4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    #[test]
    fn digest_forms() {
        let id = format!("reg.example/ml/train@sha256:{D}");
        let digest = format!("sha256:{D}");
        assert!(image_id_fits(&id, None, &digest));
        assert!(image_id_fits(&digest, None, &digest), "bare image id");
        assert!(image_id_fits(
            &format!("docker-pullable://{id}"),
            Some(&Glob::new("reg.example/ml/*")),
            &digest
        ));
        assert!(!image_id_fits(&id, Some(&Glob::new("reg.example/other")), &digest));
        assert!(!image_id_fits(&digest, Some(&Glob::new("*")), &digest), "a repository was asked for");
        assert!(!image_id_fits(&id, None, &format!("sha256:{}", "0".repeat(64))));
        assert!(matches!(
            image(&format!("reg/x@sha256:{D}")),
            Ok(ImagePattern::Digest { repo: Some(_), .. })
        ));
        assert!(matches!(image("reg/x:1.*"), Ok(ImagePattern::Name(_))));
        for bad in ["sha256:abc", "@sha256:", &format!("x:sha256:{D}")] {
            assert!(image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_forms() {
        let (k, g) = label("app.kubernetes.io/name=train*").unwrap();
        assert_eq!(k, "app.kubernetes.io/name");
        assert!(g.matches("trainer"));
        assert!(label("app").is_err());
        assert!(label("=x").is_err());
        assert!(label("a b=x").is_err());
        assert!(label("app=").is_ok(), "an empty value is a value");
    }
}

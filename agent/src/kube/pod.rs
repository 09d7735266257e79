//! What the kubelet says about a pod: the few fields of its `/pods` answer (a `PodList`) that
//! policy reads, parsed strictly enough that a malformed answer is an error, never a panic.
//!
//! The answer holds more than we want: every container's `env`, including literal values a
//! pod spec may carry. Only the fields below are deserialized, and the caller wipes the
//! answer's bytes once parsed (`client.rs`). A parse error names where it failed, never
//! what it read there (serde's messages can quote the input).

use std::collections::BTreeMap;

use serde::Deserialize;

/// One pod on this node, as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pod {
    pub(crate) uid: String,
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) containers: Vec<Container>,
}

/// One container of a pod (regular, init or ephemeral), joined from spec and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Container {
    pub(crate) name: String,
    /// The image as the spec names it (`registry/repo:tag` or `…@sha256:…`).
    pub(crate) image: String,
    /// The image the runtime resolved (`status.containerStatuses[].imageID`), when running.
    pub(crate) image_id: Option<String>,
    /// The runtime's id (the 64 hex digits after `containerd://`), when running.
    pub(crate) id: Option<String>,
}

impl Pod {
    /// The container whose runtime id is `id` (from the caller's cgroup path).
    pub(crate) fn container(&self, id: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.id.as_deref() == Some(id))
    }
}

/// Why a `/pods` answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PodListError {
    #[error(
        "the kubelet's /pods answer is not a PodList ({what} at line {line}, column {column}): \
         check kubelet_url points at the kubelet's port 10250"
    )]
    Parse { what: &'static str, line: usize, column: usize },
    #[error("the kubelet's /pods answer lists a pod without metadata.uid")]
    NoUid,
}

/// Parses a kubelet `/pods` answer.
pub(crate) fn parse_pod_list(bytes: &[u8]) -> Result<Vec<Pod>, PodListError> {
    let list: RawPodList = serde_json::from_slice(bytes).map_err(|e| PodListError::Parse {
        what: match e.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected value",
            serde_json::error::Category::Eof => "truncated",
        },
        line: e.line(),
        column: e.column(),
    })?;
    let mut pods = Vec::with_capacity(list.items.len());
    for item in list.items {
        let uid = item.metadata.uid.filter(|u| !u.is_empty()).ok_or(PodListError::NoUid)?;
        let spec = item.spec.unwrap_or_default();
        let status = item.status.unwrap_or_default();
        let specs = spec.containers.into_iter().chain(spec.init_containers).chain(spec.ephemeral_containers);
        let statuses: Vec<RawContainerStatus> = status
            .container_statuses
            .into_iter()
            .chain(status.init_container_statuses)
            .chain(status.ephemeral_container_statuses)
            .collect();
        let containers = specs
            .map(|c| {
                let st = statuses.iter().find(|s| s.name == c.name);
                Container {
                    image: c.image.unwrap_or_default(),
                    image_id: st.and_then(|s| s.image_id.clone()).filter(|s| !s.is_empty()),
                    id: st.and_then(|s| s.container_id.as_deref()).and_then(runtime_id),
                    name: c.name,
                }
            })
            .collect();
        pods.push(Pod {
            uid,
            name: item.metadata.name.unwrap_or_default(),
            namespace: item.metadata.namespace.unwrap_or_default(),
            // The API server fills in "default" when a pod names none; a kubelet answer
            // without it (a static pod) means the same.
            service_account: spec
                .service_account_name
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            labels: item.metadata.labels.unwrap_or_default(),
            containers,
        });
    }
    Ok(pods)
}

/// `containerd://<64 hex>` (or `cri-o://`, `docker://`) → the 64 hex digits, as the cgroup
/// path spells them.
fn runtime_id(s: &str) -> Option<String> {
    let (_, id) = s.split_once("://")?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

#[derive(Deserialize)]
struct RawPodList {
    #[serde(default)]
    items: Vec<RawPod>,
}

#[derive(Deserialize)]
struct RawPod {
    metadata: RawMeta,
    spec: Option<RawSpec>,
    status: Option<RawStatus>,
}

#[derive(Deserialize)]
struct RawMeta {
    uid: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    service_account_name: Option<String>,
    #[serde(default)]
    containers: Vec<RawContainer>,
    #[serde(default)]
    init_containers: Vec<RawContainer>,
    #[serde(default)]
    ephemeral_containers: Vec<RawContainer>,
}

#[derive(Deserialize)]
struct RawContainer {
    name: String,
    image: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawStatus {
    #[serde(default)]
    container_statuses: Vec<RawContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<RawContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<RawContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainerStatus {
    name: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
    #[serde(rename = "imageID")]
    image_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f9c8e1d2b3a4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    fn list(status_id: &str) -> String {
        format!(
            r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[{{
              "metadata":{{"name":"trainer-0","namespace":"ml-prod","uid":"u-1","labels":{{"app":"trainer"}}}},
              "spec":{{"serviceAccountName":"trainer","containers":[{{"name":"train","image":"reg/ml/train:1.4",
                "env":[{{"name":"X","value":"not-for-us"}}]}}]}},
              "status":{{"phase":"Running","containerStatuses":[{{"name":"train","containerID":"{status_id}",
                "imageID":"reg/ml/train@sha256:{ID}"}}]}}}}]}}"#
        )
    }

    #[test]
    fn parses_a_kubelet_pod_list() {
        let pods = parse_pod_list(list(&format!("containerd://{ID}")).as_bytes()).unwrap();
        let p = &pods[0];
        assert_eq!((p.uid.as_str(), p.name.as_str(), p.namespace.as_str()), ("u-1", "trainer-0", "ml-prod"));
        assert_eq!(p.service_account, "trainer");
        assert_eq!(p.labels.get("app").map(String::as_str), Some("trainer"));
        let c = p.container(ID).unwrap();
        assert_eq!((c.name.as_str(), c.image.as_str()), ("train", "reg/ml/train:1.4"));
        assert_eq!(c.image_id.as_deref(), Some(format!("reg/ml/train@sha256:{ID}").as_str()));
    }

    #[test]
    fn a_container_not_running_has_no_id() {
        let pods = parse_pod_list(list("").as_bytes()).unwrap();
        assert_eq!(pods[0].containers[0].id, None);
        assert!(pods[0].container(ID).is_none());
    }

    /// Malformed answers are errors that never quote what they read.
    #[test]
    fn malformed_answers_are_errors_without_their_text() {
        for bad in [
            &b"<html>SECRETLY-HTML</html>"[..],
            b"{\"items\":[{\"metadata\":{\"uid\":\"SECRETLY-NUMBER\"},\"spec\":{\"containers\":7}}]}",
            b"{\"items\":[{\"metadata\":{\"name\":\"no-uid\"}}]}",
            b"{\"items\":[",
            b"",
        ] {
            let e = parse_pod_list(bad).unwrap_err().to_string();
            assert!(!e.contains("SECRETLY"), "{e}");
        }
        assert!(parse_pod_list(b"{\"items\":[{\"metadata\":{}}]}").is_err());
        assert_eq!(parse_pod_list(b"{\"kind\":\"PodList\"}").unwrap(), vec![]);
    }
}

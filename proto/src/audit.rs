//! The audit record (SPEC.md, "The audit log"; docs/audit.md).
//!
//! No field of these types can hold a secret value or a token: they carry names, versions,
//! ids, process facts and hashes only. The hash chain itself (`prev`, `hash`) is computed by
//! the agent over the bytes of each line as written; see docs/audit.md.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1, never reset across restarts or rotation.
    pub seq: u64,
    /// When the event happened (RFC 3339, microseconds, UTC).
    pub ts: String,
    /// What happened.
    pub event: Event,
    /// For decisions: allowed, denied, error; for other events: ok, failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// The request id sent to the caller in `X-Request-Id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Kernel-attested facts about the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerInfo>,
    /// The secret asked for or changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
    /// The policy rule that allowed the read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why a read was denied or failed, or why an event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The error code answered, for outcome `error` and `denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
    /// Whether a read was served from cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheState>,
    /// `x-ms-client-request-id` of the Key Vault call behind this event, if one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_request_id: Option<String>,
    /// For a read that failed upstream: what Key Vault or the identity endpoint answered
    /// (status and error codes; its message is in `reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    /// For `agent.start` / `agent.stop`: facts about the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    /// For `agent.start` and `policy.reload`: SHA-256 of the policy file that was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
    /// A summary record: this many refused reads alike (same uid, pid, outcome, reason and
    /// secret) within one second, past the caller's budget of individual refusal records.
    /// Absent on a record of one event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// For `agent.start`: `sha256` (plain chain) or `hmac-sha256` (keyed chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// The `hash` of the record before this one (64 zeros for the first of a chain).
    pub prev: String,
    /// This record's hash; see docs/audit.md. Always the last field of the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

impl AuditRecord {
    /// A record of `event` with every optional field empty; `seq`, `ts`, `prev` and `hash`
    /// are filled in by the writer.
    pub fn new(event: Event) -> Self {
        Self {
            seq: 0,
            ts: String::new(),
            event,
            outcome: None,
            request_id: None,
            peer: None,
            secret: None,
            rule: None,
            reason: None,
            error: None,
            cache: None,
            upstream_request_id: None,
            upstream: None,
            agent: None,
            policy_sha256: None,
            count: None,
            chain: None,
            prev: String::new(),
            hash: None,
        }
    }
}

/// The kinds of audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// The agent started (first record of every run).
    #[serde(rename = "agent.start")]
    AgentStart,
    /// The agent stopped cleanly.
    #[serde(rename = "agent.stop")]
    AgentStop,
    /// A caller asked for a secret.
    #[serde(rename = "secret.read")]
    SecretRead,
    /// A refresh found a new current version.
    #[serde(rename = "secret.version_changed")]
    SecretVersionChanged,
    /// The policy was reloaded (or a reload failed).
    #[serde(rename = "policy.reload")]
    PolicyReload,
    /// The audit file was rotated (or reopened after being removed).
    #[serde(rename = "audit.rotated")]
    AuditRotated,
    /// A periodic record of the chain head, also written to the agent's log.
    #[serde(rename = "audit.checkpoint")]
    AuditCheckpoint,
}

impl Event {
    /// The event name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::AgentStart => "agent.start",
            Event::AgentStop => "agent.stop",
            Event::SecretRead => "secret.read",
            Event::SecretVersionChanged => "secret.version_changed",
            Event::PolicyReload => "policy.reload",
            Event::AuditRotated => "audit.rotated",
            Event::AuditCheckpoint => "audit.checkpoint",
        }
    }
}

/// The result recorded for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Outcome {
    /// Policy allowed the read and the value was sent.
    Allowed,
    /// Policy denied the read.
    Denied,
    /// Policy allowed the read but it failed (not found, not usable, upstream down).
    Error,
    /// A non-read event succeeded.
    Ok,
    /// A non-read event failed.
    Failed,
}

impl Outcome {
    /// The outcome as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
        }
    }
}

/// How a read was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CacheState {
    /// From the agent's cache.
    Hit,
    /// Fetched from the vault for this read.
    Miss,
    /// The last good value while the vault fails.
    Stale,
}

/// Kernel-attested facts about a caller, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Process id, as the agent sees it, of the process that wrote the request (0: another
    /// PID namespace).
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
    /// Resolved executable path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Why `exe` could not be verified (the path, seen from the agent's mount namespace, is
    /// not the file the process runs): then no exe, exe_sha256 or ancestor_exe selector fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_unverified: Option<String>,
    /// The process that called `connect()`, when it is not the one that wrote the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_pid: Option<u32>,
    /// SHA-256 of the executable, when a rule needed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<String>,
    /// cgroup v2 path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The systemd unit named by the cgroup path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The container id named by the cgroup path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Kubernetes namespace of the caller's pod, as the node's kubelet reported it (set only
    /// when a rule with `k8s_*` selectors looked the pod up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<String>,
    /// The pod's service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_service_account: Option<String>,
    /// The pod's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_name: Option<String>,
    /// The pod's UID, from the caller's cgroup path (set whenever the path is a kubelet
    /// container's, even if the pod was not looked up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_uid: Option<String>,
    /// The container's name in the pod (from the kubelet's status for `container_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_container_name: Option<String>,
}

/// What an upstream service answered when a read failed there. Codes and status only: the
/// service's message goes in the record's `reason`, and neither ever holds a value or token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Upstream {
    /// `key_vault`, or the identity endpoint (`imds`, `azure_ml`, `app_service`, …).
    pub service: String,
    /// The HTTP status it answered; absent when it was not reached or did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Key Vault's `error.code` (`Forbidden`), or the identity endpoint's `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Key Vault's `error.innererror.code` (`ForbiddenByFirewall`, `SecretDisabled`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_code: Option<String>,
}

impl Upstream {
    /// An answer (or the lack of one) from `service`.
    pub fn new(service: &str, status: Option<u16>, code: Option<String>, inner_code: Option<String>) -> Self {
        Self { service: service.to_owned(), status, code, inner_code }
    }
}

/// Which secret a record is about. Never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    /// Vault alias.
    pub vault: String,
    /// Name as the vault spells it (or as asked, if the read did not reach the vault).
    pub name: String,
    /// Version served or asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// For `secret.version_changed`: the version it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
}

/// Facts about the agent in `agent.start` / `agent.stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's version.
    pub version: String,
    /// The agent's pid.
    pub pid: u32,
    /// The config file in use, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The Azure ML run id (`AZUREML_RUN_ID`), when launched for a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// `kvbroker launch` only: whether the job's stdout and stderr are masked (`false` after
    /// `--no-mask`). Absent for a node agent, which does not run the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_masking: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_parses() {
        let line = r#"{"seq":42,"ts":"2026-11-22T10:00:00.123456Z","event":"secret.read","outcome":"allowed",
 "request_id":"abc","peer":{"pid":1234,"uid":1000,"gid":1000,"exe":"/usr/bin/python3.11",
 "exe_sha256":"00","cgroup":"/system.slice/train.service"},
 "secret":{"vault":"default","name":"db-password","version":"9f1c"},
 "rule":"train-jobs","cache":"hit","prev":"p","hash":"h"}"#;
        let r: AuditRecord = serde_json::from_str(line).unwrap();
        assert_eq!(r.event, Event::SecretRead);
        assert_eq!(r.outcome, Some(Outcome::Allowed));
        assert_eq!(r.cache, Some(CacheState::Hit));
        assert_eq!(r.peer.unwrap().uid, 1000);
    }

    #[test]
    fn hash_is_last_and_optional_fields_are_skipped() {
        let mut r = AuditRecord::new(Event::AgentStart);
        r.prev = "0".repeat(64);
        r.hash = Some("h".into());
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.ends_with(r#","hash":"h"}"#), "{s}");
        assert!(!s.contains("null"), "{s}");
    }
}

#[cfg(test)]
mod doc_tests {
    /// Drift test: every JSON example in docs/ parses as what it claims to be.
    #[test]
    fn docs_json_examples_parse() {
        let audit_md = include_str!("../../docs/audit.md");
        let api_md = include_str!("../../docs/api.md");
        let blocks = |md: &'static str| -> Vec<String> {
            md.split("```json\n").skip(1).map(|b| b.split("```").next().unwrap().to_owned()).collect()
        };
        let audit = blocks(audit_md);
        assert!(!audit.is_empty());
        for b in &audit {
            let r: super::AuditRecord = serde_json::from_str(b).unwrap();
            assert_eq!(r.hash.as_deref().map(str::len), Some(64));
        }
        let api = blocks(api_md);
        assert_eq!(api.len(), 2);
        let secret: crate::SecretResponse = serde_json::from_str(&api[0]).unwrap();
        assert_eq!(secret.name.as_str(), "db-password");
        let err: crate::ErrorBody = serde_json::from_str(&api[1]).unwrap();
        assert_eq!(err.error.code, crate::ErrorCode::PermissionDenied);
    }
}

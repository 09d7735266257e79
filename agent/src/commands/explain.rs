//! `kvbroker policy explain`: the facts used, each rule and why it does or does not allow
//! the read, and the decision — the same code path the agent decides with.

use std::fmt::Write;

use kvbroker_proto::{NameError, SecretPath};

use crate::Error;
use crate::cli::ExplainArgs;
use crate::config::Config;
use crate::kube::{KubeletClient, PodLookup, Pods};
use crate::peer::{self, PeerFacts};
use crate::policy::{Decision, Policy};
use crate::terminal::escape;

/// Why `kvbroker policy explain` could not judge the request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExplainError {
    #[error("policy explain: --pid {pid}: {source}")]
    Pid { pid: u32, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("policy explain: give --pid PID, or --uid U with optional --gid, --groups, --exe, --cgroup")]
    NoCaller,
    #[error("policy explain: {secret}: {source}")]
    BadSecret { secret: String, source: NameError },
    /// The same words the agent answers a read with (400 `InvalidRequest`).
    #[error("policy explain: the agent would answer 400 InvalidRequest: {0}")]
    Vault(crate::config::UnknownVault),
}

/// `kvbroker policy explain`: print the facts, each rule's verdict and the decision.
pub(crate) fn command(a: ExplainArgs) -> Result<(), Error> {
    let config = Config::load(&a.config)?;
    let policy = Policy::load_for(&config.policy.file, config.kubernetes.is_some())?;
    let facts = match (a.pid, a.uid) {
        (Some(pid), None) => {
            peer::facts_of_pid(pid).map_err(|e| ExplainError::Pid { pid, source: e.into() })?
        }
        (None, Some(uid)) => PeerFacts::given(uid, a.gid.unwrap_or(uid), a.groups, a.exe, a.cgroup),
        _ => return Err(ExplainError::NoCaller.into()),
    };
    let path: SecretPath =
        a.secret.parse().map_err(|source| ExplainError::BadSecret { secret: a.secret.clone(), source })?;
    let vault = config.resolve_vault(path.vault()).map_err(ExplainError::Vault)?;
    let name = path.name();
    // The pod, asked of the kubelet as the agent would: for a pod caller, when a rule needs it.
    let pod = match (&config.kubernetes, facts.pod_uid()) {
        (Some(k), Some(uid)) if policy.uses_k8s() => {
            let client = KubeletClient::new(k, config.agent.loopback_only)?;
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
            rt.block_on(Pods::new(std::sync::Arc::new(client), k.pod_cache_ttl).lookup(uid))
        }
        _ => PodLookup::NotAsked,
    };
    let (text, _) = render(&policy, &facts, &pod, vault.as_str(), name.as_str());
    print!("{text}");
    Ok(())
}

/// Renders an explanation (stable text: tests and operators' scripts read it).
pub(crate) fn render(
    policy: &Policy,
    facts: &PeerFacts,
    pod: &PodLookup,
    vault: &str,
    name: &str,
) -> (String, bool) {
    let (verdicts, decision) = policy.explain_with(facts, pod, vault, &name.to_ascii_lowercase());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}:",
        if facts.pid == 0 { "facts (given)".to_owned() } else { format!("facts (pid {})", facts.pid) }
    );
    // Facts come from the caller (its exe path, its cgroup names): escaped, so a process
    // named with a newline or a terminal escape cannot add lines to, or recolour, root's
    // screen (as `audit query` escapes the same facts).
    let row = |out: &mut String, k: &str, v: &str| {
        let _ = writeln!(out, "  {k:<13} {}", escape(v));
    };
    row(&mut out, "uid", &facts.uid.to_string());
    row(&mut out, "gid", &facts.gid.to_string());
    let groups: Vec<String> = facts.groups.iter().map(ToString::to_string).collect();
    row(&mut out, "groups", &if groups.is_empty() { "-".to_owned() } else { groups.join(" ") });
    match &facts.exe_unverified {
        None => row(&mut out, "exe", facts.exe.as_deref().unwrap_or("-")),
        Some(why) => {
            row(&mut out, "exe", &format!("{} (UNVERIFIED: {why})", facts.exe.as_deref().unwrap_or("-")))
        }
    }
    if policy.uses_exe_sha256() {
        let h = match facts.exe_sha256() {
            Ok(h) => h.to_owned(),
            Err(why) => format!("- ({why})"),
        };
        row(&mut out, "exe_sha256", &h);
    }
    row(&mut out, "cgroup", facts.cgroup.as_deref().unwrap_or("-"));
    let names = facts.cgroup_names();
    let named = |n: &Option<peer::cgroup::Named>| match n {
        Some(n) => format!("{} (cgroup segment {})", n.name, n.segment),
        None => "-".to_owned(),
    };
    row(&mut out, "systemd_unit", &named(&names.unit));
    row(&mut out, "container_id", &named(&names.container));
    if let Some(why) = &names.refused {
        row(&mut out, "cgroup names", &format!("not used: {why}"));
    }
    if let Some(uid) = &names.pod_uid {
        row(&mut out, "k8s_pod_uid", &format!("{} (cgroup segment {})", uid.name, uid.segment));
        let mut info = kvbroker_proto::PeerInfo {
            container_id: facts.container_id().map(str::to_owned),
            ..Default::default()
        };
        pod.annotate(&mut info);
        let shown = |v: Option<String>| match (v, pod) {
            (Some(v), _) => v,
            (None, PodLookup::NotAsked) => "- (no rule asks the kubelet)".to_owned(),
            (None, PodLookup::NotFound) => "- (pod not found on this node)".to_owned(),
            (None, PodLookup::Unavailable(why)) => format!("- (kubelet unavailable: {why})"),
            (None, PodLookup::Found(_)) => "-".to_owned(),
        };
        row(&mut out, "k8s_namespace", &shown(info.k8s_namespace));
        row(&mut out, "k8s_service_account", &shown(info.k8s_service_account));
        row(&mut out, "k8s_pod_name", &shown(info.k8s_pod_name));
        row(&mut out, "k8s_container_name", &shown(info.k8s_container_name));
    }
    let _ = writeln!(out, "secret: {vault}/{name}\n");
    if verdicts.is_empty() {
        let _ = writeln!(out, "(the policy has no rules)");
    }
    for v in &verdicts {
        let _ = writeln!(out, "rule {:?}: {}", v.rule, if v.allows() { "allows" } else { "does not allow" });
        for (key, ok, why) in &v.checks {
            let _ = writeln!(out, "  {key:<13} {:<4} {}", if *ok { "yes" } else { "no" }, escape(why));
        }
    }
    let allowed = matches!(decision, Decision::Allow { .. });
    let _ = match decision {
        Decision::Allow { rule } => writeln!(out, "\ndecision: allowed by rule {rule:?}"),
        Decision::Deny { reason } => writeln!(out, "\ndecision: denied ({})", escape(&reason)),
        Decision::KubeletUnavailable { reason } => {
            writeln!(out, "\ndecision: 502, fails closed ({})", escape(&reason))
        }
        Decision::NeedPod => {
            writeln!(
                out,
                "\ndecision: undecided (a rule needs the caller's pod: add [kubernetes] to the config)"
            )
        }
    };
    (out, allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process's exe path is the caller's to choose: one named with newlines and a terminal
    /// escape added fake lines ("decision: allowed …") and colours to root's output.
    #[test]
    fn facts_from_the_caller_cannot_add_lines_or_escapes() {
        let evil = "/tmp/evil\n  uids          yes\n\ndecision: allowed by rule \u{1b}[32m\"x\"";
        let policy = Policy::from_toml(
            std::path::Path::new("policy.toml"),
            "[[rule]]\nname = \"py\"\nexe = [\"/usr/bin/python3\"]\nsecrets = [\"default/*\"]\n",
        )
        .unwrap();
        let facts = PeerFacts::given(1000, 1000, vec![], Some(evil.into()), Some("/a\nb".into()));
        let (text, allowed) = render(&policy, &facts, &PodLookup::NotAsked, "default", "db");
        assert!(!allowed);
        assert!(!text.contains('\u{1b}'), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("decision:")).count(), 1, "{text}");
        assert!(text.trim_end().ends_with("decision: denied (no rule matches)"), "{text}");
        let exe_rows: Vec<&str> = text.lines().filter(|l| l.contains("/tmp/evil")).collect();
        assert!(!exe_rows.is_empty() && exe_rows.iter().all(|l| l.contains("decision: allowed")), "{text}");
    }
}

//! `kvbroker policy explain`: the facts used, each rule and why it does or does not allow
//! the read, and the decision — the same code path the agent decides with.

use std::fmt::Write;

use crate::peer::PeerFacts;
use crate::policy::{Decision, Policy};

/// Renders an explanation (stable text: tests and operators' scripts read it).
pub(crate) fn render(policy: &Policy, facts: &PeerFacts, vault: &str, name: &str) -> (String, bool) {
    let (verdicts, decision) = policy.explain(facts, vault, &name.to_ascii_lowercase());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}:",
        if facts.pid == 0 { "facts (given)".to_owned() } else { format!("facts (pid {})", facts.pid) }
    );
    let row = |out: &mut String, k: &str, v: &str| {
        let _ = writeln!(out, "  {k:<13} {v}");
    };
    row(&mut out, "uid", &facts.uid.to_string());
    row(&mut out, "gid", &facts.gid.to_string());
    let groups: Vec<String> = facts.groups.iter().map(ToString::to_string).collect();
    row(&mut out, "groups", &if groups.is_empty() { "-".to_owned() } else { groups.join(" ") });
    row(&mut out, "exe", facts.exe.as_deref().unwrap_or("-"));
    if policy.uses_exe_sha256() {
        let h = match facts.exe_sha256() {
            Ok(h) => h.to_owned(),
            Err(why) => format!("- ({why})"),
        };
        row(&mut out, "exe_sha256", &h);
    }
    row(&mut out, "cgroup", facts.cgroup.as_deref().unwrap_or("-"));
    row(&mut out, "systemd_unit", facts.systemd_unit().unwrap_or("-"));
    row(&mut out, "container_id", facts.container_id().unwrap_or("-"));
    let _ = writeln!(out, "secret: {vault}/{name}\n");
    if verdicts.is_empty() {
        let _ = writeln!(out, "(the policy has no rules)");
    }
    for v in &verdicts {
        let _ = writeln!(out, "rule {:?}: {}", v.rule, if v.allows() { "allows" } else { "does not allow" });
        for (key, ok, why) in &v.checks {
            let _ = writeln!(out, "  {key:<13} {:<4} {why}", if *ok { "yes" } else { "no" });
        }
    }
    let allowed = matches!(decision, Decision::Allow { .. });
    let _ = match decision {
        Decision::Allow { rule } => writeln!(out, "\ndecision: allowed by rule {rule:?}"),
        Decision::Deny { reason } => writeln!(out, "\ndecision: denied ({reason})"),
    };
    (out, allowed)
}

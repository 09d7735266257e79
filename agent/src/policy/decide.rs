//! Deciding: a request's facts against the rules, in file order ([`Policy::decide_with`]),
//! the same with every reason ([`Policy::explain_with`]), and what the rules need to know.

use super::{Decision, Policy, RuleVerdict, Selector};
use crate::kube::PodLookup;
use crate::peer::PeerFacts;

impl Policy {
    /// Decides whether `facts` may read `vault/name` (`name` in lowercase), the caller's pod
    /// not yet looked up.
    #[cfg(test)]
    pub(crate) fn decide(&self, facts: &PeerFacts, vault: &str, name_key: &str) -> Decision {
        self.decide_with(facts, &PodLookup::NotAsked, vault, name_key)
    }

    /// Decides with what the kubelet said about the caller's pod. Stops at the first failing
    /// selector, so an expensive fact (the exe hash, the pod) is fetched only when a rule's
    /// cheaper selectors already fit: `k8s_*` selectors come last, and with the pod
    /// [`PodLookup::NotAsked`] a rule that needs it answers [`Decision::NeedPod`].
    pub(crate) fn decide_with(
        &self,
        facts: &PeerFacts,
        pod: &PodLookup,
        vault: &str,
        name_key: &str,
    ) -> Decision {
        // `VAULT/NAME` on the stack: deciding allocates nothing on a read's hot path.
        let mut buf = [0u8; 256];
        let joined;
        let target = match join_on_stack(&mut buf, vault, name_key) {
            Some(t) => t,
            None => {
                joined = format!("{vault}/{name_key}");
                &joined
            }
        };
        let mut missing = None;
        let mut unavailable = None;
        for rule in &self.rules {
            if !rule.secrets.iter().any(|g| g.matches(target))
                || !rule.selectors.iter().filter(|s| !s.is_k8s()).all(|s| s.fits(facts, pod))
            {
                continue;
            }
            let k8s = rule.selectors.iter().any(Selector::is_k8s);
            if k8s && let Some(uid) = facts.pod_uid() {
                match pod {
                    PodLookup::NotAsked => return Decision::NeedPod,
                    PodLookup::NotFound => missing = Some(uid),
                    PodLookup::Unavailable(why) => unavailable = Some(why),
                    PodLookup::Found(_) => {}
                }
            }
            if rule.selectors.iter().filter(|s| s.is_k8s()).all(|s| s.fits(facts, pod)) {
                return Decision::Allow { rule: rule.name.clone() };
            }
        }
        if let Some(why) = unavailable {
            return Decision::KubeletUnavailable {
                reason: format!("cannot judge the caller's pod: the kubelet is unavailable: {why}"),
            };
        }
        match missing {
            Some(uid) => {
                Decision::Deny { reason: format!("no rule matches: pod {uid} not found on this node") }
            }
            None => Decision::Deny { reason: "no rule matches".into() },
        }
    }

    /// Every rule's verdict, with every reason (`kvbroker policy explain`), the pod not
    /// looked up.
    #[cfg(test)]
    pub(crate) fn explain(
        &self,
        facts: &PeerFacts,
        vault: &str,
        name_key: &str,
    ) -> (Vec<RuleVerdict>, Decision) {
        self.explain_with(facts, &PodLookup::NotAsked, vault, name_key)
    }

    /// Every rule's verdict with every reason, and the decision [`Policy::decide_with`]
    /// makes on the same facts.
    pub(crate) fn explain_with(
        &self,
        facts: &PeerFacts,
        pod: &PodLookup,
        vault: &str,
        name_key: &str,
    ) -> (Vec<RuleVerdict>, Decision) {
        let target = format!("{vault}/{name_key}");
        let verdicts: Vec<RuleVerdict> = self
            .rules
            .iter()
            .map(|rule| {
                let mut checks: Vec<(&'static str, bool, String)> = rule
                    .selectors
                    .iter()
                    .map(|s| match s.check(facts, pod) {
                        Ok(why) => (s.key(), true, why),
                        Err(why) => (s.key(), false, why),
                    })
                    .collect();
                let secret = match rule.secrets.iter().find(|g| g.matches(&target)) {
                    Some(g) => (true, format!("{target} fits {:?}", g.0)),
                    None => (false, format!("{target} fits no pattern")),
                };
                checks.push(("secrets", secret.0, secret.1));
                RuleVerdict { rule: rule.name.to_string(), checks }
            })
            .collect();
        (verdicts, self.decide_with(facts, pod, vault, name_key))
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }

    /// `(rule, VAULT/NAME)` for every secret pattern with no wildcard: what `doctor` can
    /// check exists.
    pub(crate) fn exact_secrets(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for r in &self.rules {
            for g in &r.secrets {
                if !g.0.contains(['*', '?', '[']) && !out.iter().any(|(_, s)| s.eq_ignore_ascii_case(&g.0)) {
                    out.push((&r.name, &g.0));
                }
            }
        }
        out
    }

    /// Whether any rule reads the caller's cgroup (cgroup, systemd_unit, container_id, the
    /// pod of k8s_*): then
    /// a kept-alive connection's cgroup is re-read at every request.
    pub(crate) fn uses_cgroup(&self) -> bool {
        self.rules.iter().any(|r| {
            r.selectors.iter().any(|s| {
                matches!(
                    s,
                    Selector::Cgroup(_)
                        | Selector::SystemdUnit(_)
                        | Selector::ContainerId(_)
                        | Selector::K8s(_)
                )
            })
        })
    }

    /// Whether any rule has a `k8s_*` selector.
    pub(crate) fn uses_k8s(&self) -> bool {
        self.rules.iter().any(|r| r.selectors.iter().any(Selector::is_k8s))
    }

    /// Whether any rule needs the exe hash (so `explain` knows to show it).
    pub(crate) fn uses_exe_sha256(&self) -> bool {
        self.rules.iter().any(|r| r.selectors.iter().any(|s| matches!(s, Selector::ExeSha256(_))))
    }
}

/// `VAULT/NAME` in `buf`, or `None` if it does not fit.
fn join_on_stack<'b>(buf: &'b mut [u8; 256], vault: &str, name: &str) -> Option<&'b str> {
    let n = vault.len() + 1 + name.len();
    if n > buf.len() {
        return None;
    }
    buf[..vault.len()].copy_from_slice(vault.as_bytes());
    buf[vault.len()] = b'/';
    buf[vault.len() + 1..n].copy_from_slice(name.as_bytes());
    std::str::from_utf8(&buf[..n]).ok()
}

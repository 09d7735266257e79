//! Per-process policy: which caller may read which secret. Deny by default.
//!
//! A request is allowed when some rule's every selector fits the caller and one of its
//! `secrets` patterns fits `VAULT/NAME` (lowercase). Rules are tried in file order; the first
//! that allows names itself in the audit record. Deciding is pure: the facts come in, a
//! [`Decision`] comes out; [`Policy::explain`] gives the same verdict with every reason, for
//! `kvbroker policy explain`. Loading checks the file's permissions and refuses rules that
//! could match everyone (no selector) or nothing (empty lists).
//!
//! Selectors read only facts the caller cannot forge: uid and gid from the kernel, groups,
//! exe and cgroup from `/proc`, and what the cgroup path names (systemd unit, container,
//! pod). Never `cmdline` or `environ`. The `k8s_*` selectors read what the node's kubelet
//! says about that pod ([`k8s`]); they are checked last in a rule, and the pod is asked for
//! only when a rule that has them is considered ([`Decision::NeedPod`]).

mod k8s;

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    name: String,
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
        rule: String,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    uids: Option<Vec<u32>>,
    gids: Option<Vec<u32>>,
    exe: Option<Vec<String>>,
    exe_sha256: Option<Vec<String>>,
    cgroup: Option<Vec<String>>,
    systemd_unit: Option<Vec<String>>,
    container_id: Option<Vec<String>>,
    ancestor_exe: Option<Vec<String>>,
    k8s_namespace: Option<Vec<String>>,
    k8s_service_account: Option<Vec<String>>,
    k8s_pod_name: Option<Vec<String>>,
    k8s_pod_label: Option<Vec<String>>,
    k8s_container_name: Option<Vec<String>>,
    k8s_container_image: Option<Vec<String>>,
    secrets: Vec<String>,
}

const SELECTOR_KEYS: &str = "uids, gids, exe, exe_sha256, cgroup, systemd_unit, container_id or ancestor_exe";

impl Policy {
    /// Loads a policy file, refusing one that group or others can write. `k8s_*` selectors
    /// are accepted only when `kubernetes` (the agent config has a `[kubernetes]` section to
    /// ask the kubelet with).
    pub(crate) fn load_for(path: &Path, kubernetes: bool) -> Result<Policy, PolicyError> {
        let read_err = |source| PolicyError::Read { path: path.to_owned(), source };
        crate::trust::check_file(path, "policy file")?;
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Policy::from_toml_for(path, &text, kubernetes)
    }

    /// SHA-256 (hex) of the text this policy was loaded from.
    pub(crate) fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Parses and validates policy text (no `[kubernetes]`: `k8s_*` selectors refused).
    pub(crate) fn from_toml(path: &Path, text: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml_for(path, text, false)
    }

    /// Parses and validates policy text; `kubernetes`: whether `k8s_*` selectors can work.
    pub(crate) fn from_toml_for(path: &Path, text: &str, kubernetes: bool) -> Result<Policy, PolicyError> {
        let at = |line: usize, message: String| PolicyError::At { path: path.to_owned(), line, message };
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| match crate::config::toml_error(path, text, &e) {
                crate::config::ConfigError::At { line, message, .. } => at(line, message),
                other => at(0, other.to_string()),
            })?;
        let mut rules = Vec::with_capacity(raw.rule.len());
        for spanned in raw.rule {
            let line = crate::config::line_at(text, spanned.span().start);
            let r = spanned.into_inner();
            let rule_at = |m: &str| at(line, format!("rule {:?}: {m}", r.name));
            if r.name.trim().is_empty() {
                return Err(at(line, "rule has an empty name: give each rule a name".into()));
            }
            if rules.iter().any(|o: &Rule| o.name == r.name) {
                return Err(rule_at("name is used by an earlier rule"));
            }
            let globs = |v: &[String]| v.iter().map(|p| Glob::new(p)).collect::<Vec<_>>();
            let mut selectors = Vec::new();
            if let Some(u) = &r.uids {
                selectors.push(Selector::Uids(u.clone()));
            }
            if let Some(g) = &r.gids {
                selectors.push(Selector::Gids(g.clone()));
            }
            if let Some(e) = &r.exe {
                selectors.push(Selector::Exe(globs(e)));
            }
            if let Some(h) = &r.exe_sha256 {
                let mut hashes = Vec::with_capacity(h.len());
                for x in h {
                    if x.len() != 64 || !x.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(rule_at(&format!("exe_sha256 {x:?} is not 64 hexadecimal characters")));
                    }
                    hashes.push(x.to_ascii_lowercase());
                }
                selectors.push(Selector::ExeSha256(hashes));
            }
            if let Some(c) = &r.cgroup {
                selectors.push(Selector::Cgroup(globs(c)));
            }
            if let Some(u) = &r.systemd_unit {
                selectors.push(Selector::SystemdUnit(globs(u)));
            }
            if let Some(c) = &r.container_id {
                selectors.push(Selector::ContainerId(globs(c)));
            }
            if let Some(a) = &r.ancestor_exe {
                selectors.push(Selector::AncestorExe(globs(a)));
            }
            let plain = selectors.len();
            let k8s_globs = [
                (&r.k8s_namespace, k8s::K8sSelector::Namespace as fn(Vec<Glob>) -> k8s::K8sSelector),
                (&r.k8s_service_account, k8s::K8sSelector::ServiceAccount),
                (&r.k8s_pod_name, k8s::K8sSelector::PodName),
                (&r.k8s_container_name, k8s::K8sSelector::ContainerName),
            ];
            for (v, make) in k8s_globs {
                if let Some(v) = v {
                    selectors.push(Selector::K8s(make(globs(v))));
                }
            }
            if let Some(l) = &r.k8s_pod_label {
                let labels = l.iter().map(|s| k8s::label(s)).collect::<Result<Vec<_>, _>>();
                selectors.push(Selector::K8s(k8s::K8sSelector::PodLabel(labels.map_err(|m| rule_at(&m))?)));
            }
            if let Some(i) = &r.k8s_container_image {
                let images = i.iter().map(|s| k8s::image(s)).collect::<Result<Vec<_>, _>>();
                selectors
                    .push(Selector::K8s(k8s::K8sSelector::ContainerImage(images.map_err(|m| rule_at(&m))?)));
            }
            if selectors.len() > plain && !kubernetes {
                let key = selectors[plain].key();
                return Err(rule_at(&format!(
                    "{key} needs the agent config's [kubernetes] section (how to ask the node's kubelet): \
                     add it, or remove the k8s_* selectors"
                )));
            }
            if selectors.is_empty() {
                let keys = if kubernetes {
                    format!("{SELECTOR_KEYS}, {}", k8s::KEYS)
                } else {
                    SELECTOR_KEYS.to_owned()
                };
                return Err(rule_at(&format!("has no selector, so it would match every caller: add {keys}")));
            }
            if let Some(empty) = selectors.iter().find(|s| s.is_empty()) {
                return Err(rule_at(&format!("{} is an empty list: it can never match", empty.key())));
            }
            if r.secrets.is_empty() {
                return Err(rule_at("secrets is empty: list patterns like \"default/db-*\""));
            }
            let mut secrets = Vec::with_capacity(r.secrets.len());
            for s in &r.secrets {
                secrets.push(secret_pattern(s).map_err(|m| rule_at(&m))?);
            }
            rules.push(Rule { name: r.name, selectors, secrets });
        }
        let sha256 = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(text.as_bytes()))
        };
        Ok(Policy { rules, sha256 })
    }

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
                RuleVerdict { rule: rule.name.clone(), checks }
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

fn secret_pattern(s: &str) -> Result<Glob, String> {
    let Some((vault, name)) = s.split_once('/') else {
        return Err(format!("secret pattern {s:?} needs the form VAULT/NAME, like \"default/db-*\""));
    };
    let ok_vault =
        !vault.is_empty() && vault.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_*?".contains(&b));
    let ok_name = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-*?".contains(&b));
    if !ok_vault || !ok_name {
        return Err(format!(
            "secret pattern {s:?}: use vault aliases and secret names with * and ? wildcards"
        ));
    }
    // Secret names are case-insensitive: match the lowercase form. Aliases are exact.
    Ok(Glob::new(&format!("{vault}/{}", name.to_ascii_lowercase())))
}

/// A glob that behaves like a shell's: `*` matches any run of characters but `/`, `?` any
/// one character but `/`, and `**` any run including `/` (`**/` also matches no directory
/// at all, so `/opt/**/python3` fits `/opt/python3`). Hand-written rather than taken from a
/// crate: it is twenty lines, allocation-free on the hot path, and its exact semantics are
/// part of the policy contract (docs/config.md), which a dependency could change under us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob(String);

impl Glob {
    pub(crate) fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }
}

/// Backtracking over the last `*` and the last `**` only: linear for patterns without `**`,
/// and at most (text length)² steps with it — patterns and paths are short.
fn glob_match(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    // The last single `*`: (pattern index after it, text index it stands up to).
    let mut star: Option<(usize, usize)> = None;
    // The last `**`: (pattern index after it, text index it stands up to, whether it was
    // `**/` and so must stand for whole directories: a run that ends with `/`).
    let mut globstar: Option<(usize, usize, bool)> = None;
    loop {
        if pi < p.len() && p[pi] == b'*' {
            if p.get(pi + 1) == Some(&b'*') {
                let mut after = pi + 2;
                // `**/` may stand for no directory at all: try that first.
                let dirs = p.get(after) == Some(&b'/') && (pi == 0 || p[pi - 1] == b'/');
                if dirs {
                    after += 1;
                }
                globstar = Some((after, ti, dirs));
                star = None;
                pi = after;
            } else {
                star = Some((pi + 1, ti));
                pi += 1;
            }
            continue;
        }
        if ti == t.len() {
            if pi == p.len() {
                return true;
            }
        } else if pi < p.len() && (p[pi] == t[ti] || (p[pi] == b'?' && t[ti] != b'/')) {
            pi += 1;
            ti += 1;
            continue;
        }
        // Mismatch: let the last `*` take one more character (never a `/`), else the last
        // `**` (any character), else fail.
        if let Some((sp, st)) = star
            && st < t.len()
            && t[st] != b'/'
        {
            star = Some((sp, st + 1));
            pi = sp;
            ti = st + 1;
            continue;
        }
        if let Some((gp, gt, dirs)) = globstar {
            // `**/` resumes only just after a `/`; plain `**` after any character.
            let next =
                if dirs { t[gt..].iter().position(|&c| c == b'/').map(|i| gt + i + 1) } else { Some(gt + 1) };
            if let Some(next) = next.filter(|&n| n <= t.len()) {
                globstar = Some((gp, next, dirs));
                star = None;
                pi = gp;
                ti = next;
                continue;
            }
        }
        return false;
    }
}

#[cfg(test)]
mod tests;

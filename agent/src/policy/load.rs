//! Loading a policy file: its permissions, the TOML, and the checks that refuse a rule
//! that could match everyone or nothing.

use std::path::Path;

use serde::Deserialize;

use super::{Glob, Policy, PolicyError, Rule, Selector, k8s};

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

/// The largest policy file read: ten thousand rules are about 1 MiB.
const MAX_POLICY_BYTES: u64 = 16 << 20;

const SELECTOR_KEYS: &str = "uids, gids, exe, exe_sha256, cgroup, systemd_unit, container_id or ancestor_exe";

impl Policy {
    /// Loads a policy file, refusing one that group or others can write. `k8s_*` selectors
    /// are accepted only when `kubernetes` (the agent config has a `[kubernetes]` section to
    /// ask the kubelet with).
    pub(crate) fn load_for(path: &Path, kubernetes: bool) -> Result<Policy, PolicyError> {
        let read_err = |source| PolicyError::Read { path: path.to_owned(), source };
        crate::trust::check_file(path, "policy file")?;
        let text = crate::trust::read_regular(path, MAX_POLICY_BYTES).map_err(read_err)?;
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
        // Rules come in file order: their lines are counted on from the last one's, and
        // names are looked up in a set — a policy of many rules loads in linear time (it
        // was quadratic: 82 s for 10,000 rules).
        let (mut counted_to, mut counted_line) = (0, 1);
        let mut names = std::collections::HashSet::with_capacity(raw.rule.len());
        for spanned in raw.rule {
            let start = spanned.span().start.min(text.len()).max(counted_to);
            counted_line += text.as_bytes()[counted_to..start].iter().filter(|&&b| b == b'\n').count();
            counted_to = start;
            let line = counted_line;
            let r = spanned.into_inner();
            let rule_at = |m: &str| at(line, format!("rule {:?}: {m}", r.name));
            if r.name.trim().is_empty() {
                return Err(at(line, "rule has an empty name: give each rule a name".into()));
            }
            if !names.insert(r.name.clone()) {
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
            rules.push(Rule { name: r.name.into(), selectors, secrets });
        }
        let sha256 = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(text.as_bytes()))
        };
        Ok(Policy { rules, sha256 })
    }
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

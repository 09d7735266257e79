//! Per-process policy: which caller may read which secret. Deny by default.
//!
//! A request is allowed when some rule's every selector fits the caller and one of its
//! `secrets` patterns fits `VAULT/NAME` (lowercase). Rules are tried in file order; the first
//! that allows names itself in the audit record. Deciding is pure: the facts come in, a
//! [`Decision`] comes out. Loading checks the file's permissions and refuses rules that
//! could match everyone (no selector) or nothing (no secrets).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::peer::PeerFacts;

/// A loaded policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    rules: Vec<Rule>,
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
    Cgroup(Vec<Glob>),
}

/// The result of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Allow { rule: String },
    Deny { reason: String },
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("{path}: cannot read policy: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: policy is writable by group or others (mode {mode:04o}): \
         run chmod go-w on it"
    )]
    Permissions { path: PathBuf, mode: u32 },
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
    cgroup: Option<Vec<String>>,
    secrets: Vec<String>,
}

impl Policy {
    /// Loads a policy file, refusing one that group or others can write.
    pub(crate) fn load(path: &Path) -> Result<Policy, PolicyError> {
        let read_err = |source| PolicyError::Read { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(PolicyError::Permissions { path: path.to_owned(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Policy::from_toml(path, &text)
    }

    /// Parses and validates policy text.
    pub(crate) fn from_toml(path: &Path, text: &str) -> Result<Policy, PolicyError> {
        let at = |line: usize, message: String| PolicyError::At { path: path.to_owned(), line, message };
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| match crate::config::toml_error(path, text, &e) {
                crate::config::ConfigError::At { line, message, .. } => at(line, message),
                other => at(0, other.to_string()),
            })?;
        let mut rules = Vec::with_capacity(raw.rule.len());
        for spanned in raw.rule {
            let line = line_of(text, spanned.span().start);
            let r = spanned.into_inner();
            let rule_at = |m: &str| at(line, format!("rule {:?}: {m}", r.name));
            if r.name.trim().is_empty() {
                return Err(at(line, "rule has an empty name: give each rule a name".into()));
            }
            if rules.iter().any(|o: &Rule| o.name == r.name) {
                return Err(rule_at("name is used by an earlier rule"));
            }
            let mut selectors = Vec::new();
            if let Some(u) = r.uids {
                selectors.push(Selector::Uids(u));
            }
            if let Some(g) = r.gids {
                selectors.push(Selector::Gids(g));
            }
            if let Some(e) = r.exe {
                selectors.push(Selector::Exe(e.iter().map(|p| Glob::new(p)).collect()));
            }
            if let Some(c) = r.cgroup {
                selectors.push(Selector::Cgroup(c.iter().map(|p| Glob::new(p)).collect()));
            }
            if selectors.is_empty() {
                return Err(rule_at(
                    "has no selector, so it would match every caller: \
                     add uids, gids, exe or cgroup",
                ));
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
        Ok(Policy { rules })
    }

    /// Decides whether `facts` may read `vault/name` (`name` in lowercase).
    pub(crate) fn decide(&self, facts: &PeerFacts, vault: &str, name_key: &str) -> Decision {
        let target = format!("{vault}/{name_key}");
        for rule in &self.rules {
            if rule.selectors.iter().all(|s| s.check(facts).is_ok())
                && rule.secrets.iter().any(|g| g.matches(&target))
            {
                return Decision::Allow { rule: rule.name.clone() };
            }
        }
        Decision::Deny { reason: "no rule matches".into() }
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }
}

impl Selector {
    fn key(&self) -> &'static str {
        match self {
            Selector::Uids(_) => "uids",
            Selector::Gids(_) => "gids",
            Selector::Exe(_) => "exe",
            Selector::Cgroup(_) => "cgroup",
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Selector::Uids(v) | Selector::Gids(v) => v.is_empty(),
            Selector::Exe(v) | Selector::Cgroup(v) => v.is_empty(),
        }
    }

    /// `Ok` if the caller fits, else why not.
    fn check(&self, f: &PeerFacts) -> Result<(), String> {
        match self {
            Selector::Uids(uids) => {
                uids.contains(&f.uid).then_some(()).ok_or_else(|| format!("uid {} not in {uids:?}", f.uid))
            }
            Selector::Gids(gids) => {
                let hit = gids.contains(&f.gid) || f.groups.iter().any(|g| gids.contains(g));
                hit.then_some(()).ok_or_else(|| format!("no group of the caller in {gids:?}"))
            }
            Selector::Exe(globs) => match &f.exe {
                Some(exe) if globs.iter().any(|g| g.matches(exe)) => Ok(()),
                Some(exe) => Err(format!("exe {exe} fits no pattern")),
                None => Err("caller has no exe".into()),
            },
            Selector::Cgroup(globs) => match &f.cgroup {
                Some(cg) if globs.iter().any(|g| g.matches(cg)) => Ok(()),
                Some(cg) => Err(format!("cgroup {cg} fits no pattern")),
                None => Err("caller has no cgroup v2 path".into()),
            },
        }
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

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// A glob where `*` matches any run of characters (including `/`) and `?` any one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob(String);

impl Glob {
    pub(crate) fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        let (p, t) = (self.0.as_bytes(), text.as_bytes());
        let (mut pi, mut ti) = (0, 0);
        // Where the last `*` was, and the text position it is currently standing for.
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            match p.get(pi) {
                Some(b'*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(&c) if c == b'?' || c == t[ti] => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

#[cfg(test)]
mod tests;

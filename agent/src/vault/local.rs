//! `kind = "local"`: secrets from a TOML file of `name = "value"`, for development and
//! tests. The file must not be readable by group or others. A value gets a random version id
//! when it is first loaded (or the one its `version = "…"` attribute names). Parse errors
//! give the line, never the text.
//!
//! A secret may also carry Key Vault's attributes, to try how the agent enforces them:
//! `name = { value = "…", enabled = false, not_before = "2030-01-01T00:00:00Z",
//! expires_on = "…", content_type = "…", version = "32 hex" }`.
//!
//! The file is read again whenever it changed (its inode, size, mtime or ctime differ) before
//! a fetch, so an edit or `kvbroker dev rotate` is picked up by the next refresh, long poll
//! wake-up or `kvbroker ctl refresh`, as a Key Vault rotation is. A value that did not change
//! keeps its version; a file that no longer loads is reported and the last good one served.
//!
//! The table is also the cache's copy: each secret is held as the [`Fetched`] the cache
//! serves ([`Backend::get_shared`]), so a cached local secret costs no second copy of its
//! name, version, value or built answer (issue 19). An unchanged secret keeps its `Fetched`
//! across re-reads of the file.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use subtle::ConstantTimeEq;

use kvbroker_proto::{SecretName, SecretValue, VaultAlias, VersionId};
use zeroize::Zeroize;

use super::{Backend, BoxFuture, Budget, Fetched, VaultError};

pub(crate) struct LocalBackend {
    alias: VaultAlias,
    path: PathBuf,
    latency: Duration,
    loaded: Mutex<Loaded>,
}

/// The file as last read.
struct Loaded {
    /// Found by the lowercase name.
    secrets: HashSet<Shared>,
    /// What the file looked like when read (or when a read last failed): a reload happens
    /// only when this changes.
    stamp: Option<Stamp>,
}

/// Enough of a file's metadata to notice an edit or a rename over it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// One secret of the file, as served, found by its lowercase name (which it already holds,
/// so the table stores no second copy of the name).
struct Shared(Arc<Fetched>);

impl Borrow<str> for Shared {
    fn borrow(&self) -> &str {
        self.0.name.key()
    }
}

// Hashes and compares as the `str` it borrows as, as `HashSet::get(&str)` requires.
impl Hash for Shared {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name.key().hash(state);
    }
}

impl PartialEq for Shared {
    fn eq(&self, other: &Self) -> bool {
        self.0.name.key() == other.0.name.key()
    }
}

impl Eq for Shared {}

#[derive(Default)]
struct Attrs {
    /// `version = "…"`: the version id to serve (as `kvbroker dev rotate` writes it).
    version: Option<VersionId>,
    enabled: bool,
    not_before: Option<SystemTime>,
    expires_on: Option<SystemTime>,
    content_type: Option<String>,
}

impl Attrs {
    /// Whether `f` was made from these same attributes (the version aside).
    fn same_as(&self, f: &Fetched) -> bool {
        self.enabled == f.enabled
            && self.not_before == f.not_before
            && self.expires_on == f.expires_on
            && self.content_type.as_deref() == f.content_type.as_deref()
    }
}

/// Why a local secrets file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    #[error(transparent)]
    Untrusted(#[from] crate::trust::Untrusted),
    #[error("{path}: cannot read secrets file: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: secrets file is readable by group or others (mode {mode:04o}): \
         run chmod 600 on it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}:{line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{path}: {key:?} is not a valid secret name: use 1 to 127 of 0-9, a-z, A-Z and '-'")]
    Name { path: PathBuf, key: String },
    #[error(
        "{path}: secret {name}: write name = \"value\" or name = {{ value = \"…\", enabled = …, \
         not_before = \"RFC 3339\", expires_on = \"RFC 3339\", content_type = \"…\" }} ({detail})"
    )]
    NotString { path: PathBuf, name: String, detail: &'static str },
    #[error("{path}: secret {name} appears twice (names are case-insensitive)")]
    Duplicate { path: PathBuf, name: String },
}

impl LocalBackend {
    pub(crate) fn load(alias: VaultAlias, path: &Path, latency: Duration) -> Result<Self, LocalError> {
        let (secrets, stamp) = read_file(path, None)?;
        Ok(Self {
            alias,
            path: path.to_owned(),
            latency,
            loaded: Mutex::new(Loaded { secrets, stamp: Some(stamp) }),
        })
    }

    /// Reads the file again if it changed since the last read. Values that did not change
    /// keep their version. On failure the last good secrets stay and the error is logged
    /// (names, lines and paths only), once per change of the file.
    fn reload_if_changed(&self) {
        let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::fs::metadata(&self.path).ok().map(|m| Stamp::of(&m));
        if now.is_some() && now == loaded.stamp {
            return;
        }
        match read_file(&self.path, Some(&loaded.secrets)) {
            Ok((secrets, stamp)) => {
                tracing::info!(vault = %self.alias, file = %self.path.display(), secrets = secrets.len(), "local vault file read again");
                *loaded = Loaded { secrets, stamp: Some(stamp) };
            }
            Err(e) => {
                if loaded.stamp.is_some() {
                    tracing::warn!(vault = %self.alias, error = %e, "local vault file changed but cannot be read; serving what it held before");
                }
                loaded.stamp = now;
            }
        }
    }
}

/// The largest local vault file read: ten thousand secrets of 25 KiB (Key Vault's largest)
/// fit.
const MAX_VAULT_FILE_BYTES: u64 = 256 << 20;

/// Reads and checks the file: its secrets and its stamp. `before`: the secrets it held, whose
/// versions are kept for values that did not change.
#[expect(
    clippy::mutable_key_type,
    reason = "`Shared` hashes only the name, which never changes; the built answer is what is mutable"
)]
fn read_file(path: &Path, before: Option<&HashSet<Shared>>) -> Result<(HashSet<Shared>, Stamp), LocalError> {
    let read_err = |source| LocalError::Read { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.mode() & 0o777;
    crate::trust::check_file(path, "local vault file")?;
    if mode & 0o077 != 0 {
        return Err(LocalError::Permissions { path: path.to_owned(), mode });
    }
    let mut text =
        zeroize::Zeroizing::new(crate::trust::read_regular(path, MAX_VAULT_FILE_BYTES).map_err(read_err)?);
    let parsed: Result<toml::Table, _> = toml::from_str(&text);
    let mut table = parsed.map_err(|e| {
        let line = e.span().map_or(0, |s| crate::config::line_at(&text, s.start));
        // The parser's message can quote the text around the error: give only the line.
        LocalError::Parse {
            path: path.to_owned(),
            line,
            message: "not a valid TOML file of name = \"value\" lines".into(),
        }
    })?;
    text.zeroize();

    let loaded_at = SystemTime::now();
    let mut secrets = HashSet::with_capacity(table.len());
    let mut result = Ok(());
    for (key, value) in std::mem::take(&mut table) {
        if result.is_err() {
            wipe(value);
            continue;
        }
        let name: SecretName = match key.parse() {
            Ok(n) => n,
            Err(_) => {
                wipe(value);
                result = Err(LocalError::Name { path: path.to_owned(), key });
                continue;
            }
        };
        let (value, mut attrs) = match split_entry(value) {
            Ok(v) => v,
            Err(detail) => {
                result = Err(LocalError::NotString { path: path.to_owned(), name: key, detail });
                continue;
            }
        };
        let old = before.and_then(|b| b.get(name.key())).map(|o| &o.0);
        let same_bytes =
            old.is_some_and(|o| bool::from(o.value.expose_secret().ct_eq(value.expose_secret())));
        let same_value = same_bytes && attrs.version.is_none();
        let (version, at) = match (attrs.version.take(), old) {
            (Some(v), Some(o)) if v == o.version => (v, o.fetched_at),
            (Some(v), _) => (v, loaded_at),
            (None, Some(o)) if same_value => (o.version.clone(), o.fetched_at),
            (None, _) => (VersionId::from_bytes(fastrand::u128(..).to_le_bytes()), loaded_at),
        };
        let fetched = match old {
            // Nothing changed: keep the `Fetched` the cache may hold, with its built answer.
            Some(o)
                if same_bytes
                    && o.version == version
                    && attrs.same_as(o)
                    && o.name.as_str() == name.as_str() =>
            {
                Arc::clone(o)
            }
            _ => Arc::new(Fetched {
                name,
                version,
                value: Arc::new(value),
                content_type: attrs.content_type.map(Into::into),
                enabled: attrs.enabled,
                not_before: attrs.not_before,
                expires_on: attrs.expires_on,
                fetched_at: at,
                upstream_request_id: None,
                answer: super::Answer::default(),
            }),
        };
        if !secrets.insert(Shared(fetched)) {
            result = Err(LocalError::Duplicate { path: path.to_owned(), name: key });
        }
    }
    result.map(|()| (secrets, Stamp::of(&meta)))
}

/// Wipes whatever strings a refused entry held.
fn wipe(value: toml::Value) {
    match value {
        toml::Value::String(mut s) => s.zeroize(),
        toml::Value::Table(t) => t.into_iter().for_each(|(_, v)| wipe(v)),
        toml::Value::Array(a) => a.into_iter().for_each(wipe),
        _ => {}
    }
}

/// A plain string, or a table of value and attributes. Every string that is not kept is
/// wiped, including on error.
fn split_entry(value: toml::Value) -> Result<(SecretValue, Attrs), &'static str> {
    let mut table = match value {
        toml::Value::String(s) => {
            return Ok((SecretValue::from_string(s), Attrs { enabled: true, ..Attrs::default() }));
        }
        toml::Value::Table(t) => t,
        other => {
            wipe(other);
            return Err("not a string or table");
        }
    };
    let secret = match table.remove("value") {
        Some(toml::Value::String(s)) => SecretValue::from_string(s),
        Some(other) => {
            wipe(other);
            wipe(toml::Value::Table(table));
            return Err("value is not a string");
        }
        None => {
            wipe(toml::Value::Table(table));
            return Err("value is missing");
        }
    };
    let mut attrs = Attrs { enabled: true, ..Attrs::default() };
    let time = |v: toml::Value| match v {
        toml::Value::String(s) => humantime::parse_rfc3339_weak(&s).map_err(|_| "bad RFC 3339 time"),
        _ => Err("times are RFC 3339 strings"),
    };
    for (k, v) in table {
        match (k.as_str(), v) {
            ("enabled", toml::Value::Boolean(b)) => attrs.enabled = b,
            ("not_before", v) => attrs.not_before = Some(time(v)?),
            ("expires_on", v) => attrs.expires_on = Some(time(v)?),
            ("content_type", toml::Value::String(s)) => attrs.content_type = Some(s),
            ("version", toml::Value::String(s)) => {
                attrs.version = Some(s.parse().map_err(|_| "version is not 32 hex characters")?);
            }
            (_, v) => {
                wipe(v);
                return Err("unknown or mistyped attribute");
            }
        }
    }
    Ok((secret, attrs))
}

impl Backend for LocalBackend {
    fn get<'a>(
        &'a self,
        name: &'a SecretName,
        version: Option<&'a VersionId>,
        budget: Budget,
    ) -> BoxFuture<'a, Result<Fetched, VaultError>> {
        Box::pin(async move {
            let f = self.get_shared(name, version, budget).await?;
            Ok(Fetched {
                name: f.name.clone(),
                version: f.version.clone(),
                value: Arc::clone(&f.value),
                content_type: f.content_type.clone(),
                enabled: f.enabled,
                not_before: f.not_before,
                expires_on: f.expires_on,
                fetched_at: f.fetched_at,
                upstream_request_id: None,
                answer: super::Answer::default(),
            })
        })
    }

    /// The table's own `Fetched`: the cache keeps no second copy (issue 19).
    fn get_shared<'a>(
        &'a self,
        name: &'a SecretName,
        version: Option<&'a VersionId>,
        _budget: Budget,
    ) -> BoxFuture<'a, Result<Arc<Fetched>, VaultError>> {
        Box::pin(async move {
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let not_found = || VaultError::NotFound {
                vault: self.alias.clone(),
                name: name.to_string(),
                upstream_request_id: None,
            };
            self.reload_if_changed();
            let loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = &loaded.secrets.get(name.key()).ok_or_else(not_found)?.0;
            if version.is_some_and(|v| *v != entry.version) {
                return Err(not_found());
            }
            // As Key Vault does: a disabled secret is refused by the vault itself.
            if !entry.enabled {
                return Err(VaultError::Disabled {
                    vault: self.alias.clone(),
                    name: entry.name.to_string(),
                    upstream_request_id: None,
                });
            }
            Ok(Arc::clone(entry))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(format!("s{}.toml", fastrand::u32(..)));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn alias() -> VaultAlias {
        "default".parse().unwrap()
    }

    #[tokio::test]
    async fn serves_values_case_insensitively() {
        let dir = std::env::temp_dir();
        let p = write(&dir, "Db-Password = \"canary-local-1\"\n", 0o600);
        let b = LocalBackend::load(alias(), &p, Duration::ZERO).unwrap();
        let f = b.get(&"db-password".parse().unwrap(), None, Budget::Caller).await.unwrap();
        assert_eq!(f.name.as_str(), "Db-Password");
        assert_eq!(f.value.expose_secret(), b"canary-local-1");
        let other = VersionId::from_bytes([0; 16]);
        assert!(b.get(&"db-password".parse().unwrap(), Some(&other), Budget::Caller).await.is_err());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn refuses_group_readable_file() {
        let p = write(&std::env::temp_dir(), "a = \"b\"\n", 0o640);
        let e = LocalBackend::load(alias(), &p, Duration::ZERO).err().unwrap();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn parse_error_names_line_not_text() {
        let p = write(&std::env::temp_dir(), "a = \"ok\"\nb = canary-unquoted-77\n", 0o600);
        let e = LocalBackend::load(alias(), &p, Duration::ZERO).err().unwrap().to_string();
        assert!(e.contains(":2: "), "{e}");
        assert!(!e.contains("canary"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[tokio::test]
    async fn attributes_are_carried_and_disabled_is_refused() {
        let p = write(
            &std::env::temp_dir(),
            "a = { value = \"x\", expires_on = \"2001-01-01T00:00:00Z\", content_type = \"text/plain\" }\n\
             b = { value = \"y\", enabled = false }\n",
            0o600,
        );
        let b = LocalBackend::load(alias(), &p, Duration::ZERO).unwrap();
        let f = b.get(&"a".parse().unwrap(), None, Budget::Caller).await.unwrap();
        assert!(f.expires_on.is_some());
        assert_eq!(f.content_type.as_deref(), Some("text/plain"));
        assert!(matches!(
            b.get(&"b".parse().unwrap(), None, Budget::Caller).await,
            Err(VaultError::Disabled { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn refuses_bad_names_and_non_strings() {
        let p = write(&std::env::temp_dir(), "a_b = \"x\"\n", 0o600);
        assert!(matches!(LocalBackend::load(alias(), &p, Duration::ZERO), Err(LocalError::Name { .. })));
        std::fs::remove_file(p).unwrap();
        let p = write(&std::env::temp_dir(), "ab = 3\n", 0o600);
        assert!(matches!(LocalBackend::load(alias(), &p, Duration::ZERO), Err(LocalError::NotString { .. })));
        std::fs::remove_file(p).unwrap();
    }

    /// Issue 19: the cache keeps the table's own `Fetched` (no second copy of name, version,
    /// value or answer), and an unchanged secret keeps it across a re-read of the file.
    #[tokio::test]
    async fn the_cache_shares_the_tables_copy_until_the_secret_changes() {
        let dir = std::env::temp_dir();
        let p = write(&dir, "a = \"canary-s1\"\nb = \"canary-s2\"\n", 0o600);
        let b = LocalBackend::load(alias(), &p, Duration::ZERO).unwrap();
        let a: SecretName = "a".parse().unwrap();
        let first = b.get_shared(&a, None, Budget::Caller).await.unwrap();
        let again = b.get_shared(&a, None, Budget::Caller).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));

        let tmp = p.with_extension("new");
        std::fs::write(&tmp, "a = \"canary-s1\"\nb = \"canary-s3\"\n").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        let after = b.get_shared(&a, None, Budget::Caller).await.unwrap();
        assert!(Arc::ptr_eq(&first, &after), "unchanged secret, same Fetched");
        let changed = b.get_shared(&"b".parse().unwrap(), None, Budget::Caller).await.unwrap();
        assert_eq!(changed.value.expose_secret(), b"canary-s3");
        std::fs::remove_file(p).unwrap();
    }

    /// Issue 17: `ctl refresh` on a local vault re-read nothing, so there was no way to
    /// rotate in dev. An edited file is read again at the next fetch: an unchanged value keeps
    /// its version, a changed one gets a new version (or the one its `version` names), and a
    /// file that no longer parses leaves the last good values in service.
    #[tokio::test]
    async fn an_edited_file_is_read_again_keeping_unchanged_versions() {
        let dir = std::env::temp_dir();
        let p = write(&dir, "a = \"canary-a1\"\nb = \"canary-b1\"\n", 0o600);
        let b = LocalBackend::load(alias(), &p, Duration::ZERO).unwrap();
        let (na, nb): (SecretName, SecretName) = ("a".parse().unwrap(), "b".parse().unwrap());
        let (a1, b1) = (
            b.get(&na, None, Budget::Caller).await.unwrap().version,
            b.get(&nb, None, Budget::Caller).await.unwrap().version,
        );

        let replace = |text: &str| {
            let tmp = p.with_extension("new");
            std::fs::write(&tmp, text).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::rename(&tmp, &p).unwrap();
        };
        replace("a = \"canary-a2\"\nb = \"canary-b1\"\n");
        let a2 = b.get(&na, None, Budget::Caller).await.unwrap();
        assert_ne!(a2.version, a1);
        assert_eq!(a2.value.expose_secret(), b"canary-a2");
        assert_eq!(
            b.get(&nb, None, Budget::Caller).await.unwrap().version,
            b1,
            "unchanged value, same version"
        );

        let named = "0123456789abcdef0123456789abcdef";
        replace(&format!("a = {{ value = \"canary-a3\", version = \"{named}\" }}\nb = \"canary-b1\"\n"));
        assert_eq!(b.get(&na, None, Budget::Caller).await.unwrap().version.to_string(), named);

        replace("a = not toml\n");
        let kept = b.get(&na, None, Budget::Caller).await.unwrap();
        assert_eq!(kept.value.expose_secret(), b"canary-a3", "last good value kept");
        std::fs::remove_file(p).unwrap();
    }
}

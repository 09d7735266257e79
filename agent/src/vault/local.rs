//! `kind = "local"`: secrets from a TOML file of `name = "value"`, for development and
//! tests. The file must not be readable by group or others. Each value gets a random
//! version id when the file is loaded. Parse errors give the line, never the text.
//!
//! A secret may also carry Key Vault's attributes, to try how the agent enforces them:
//! `name = { value = "…", enabled = false, not_before = "2030-01-01T00:00:00Z",
//! expires_on = "…", content_type = "…" }`.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kvbroker_proto::{SecretName, SecretValue, VaultAlias, VersionId};
use zeroize::Zeroize;

use super::{Backend, BoxFuture, Budget, Fetched, VaultError};

pub(crate) struct LocalBackend {
    alias: VaultAlias,
    /// Keyed by the lowercase name.
    secrets: HashMap<String, Entry>,
    latency: Duration,
}

struct Entry {
    name: SecretName,
    version: VersionId,
    value: Arc<SecretValue>,
    loaded_at: SystemTime,
    attrs: Attrs,
}

#[derive(Default)]
struct Attrs {
    enabled: bool,
    not_before: Option<SystemTime>,
    expires_on: Option<SystemTime>,
    content_type: Option<String>,
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
        let read_err = |source| LocalError::Read { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.mode() & 0o777;
        crate::trust::check_file(path, "local vault file")?;
        if mode & 0o077 != 0 {
            return Err(LocalError::Permissions { path: path.to_owned(), mode });
        }
        let mut text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(read_err)?);
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
        let mut secrets = HashMap::new();
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
            let (value, attrs) = match split_entry(value) {
                Ok(v) => v,
                Err(detail) => {
                    result = Err(LocalError::NotString { path: path.to_owned(), name: key, detail });
                    continue;
                }
            };
            let entry = Entry {
                version: VersionId::from_bytes(fastrand::u128(..).to_le_bytes()),
                value: Arc::new(value),
                name,
                loaded_at,
                attrs,
            };
            if secrets.insert(entry.name.key().to_owned(), entry).is_some() {
                result = Err(LocalError::Duplicate { path: path.to_owned(), name: key });
            }
        }
        result.map(|()| Self { alias, secrets, latency })
    }
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
        _budget: Budget,
    ) -> BoxFuture<'a, Result<Fetched, VaultError>> {
        Box::pin(async move {
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let not_found = || VaultError::NotFound {
                vault: self.alias.clone(),
                name: name.to_string(),
                upstream_request_id: None,
            };
            let entry = self.secrets.get(name.key()).ok_or_else(not_found)?;
            if version.is_some_and(|v| *v != entry.version) {
                return Err(not_found());
            }
            // As Key Vault does: a disabled secret is refused by the vault itself.
            if !entry.attrs.enabled {
                return Err(VaultError::Disabled {
                    vault: self.alias.clone(),
                    name: entry.name.to_string(),
                    upstream_request_id: None,
                });
            }
            Ok(Fetched {
                name: entry.name.clone(),
                version: entry.version.clone(),
                value: Arc::clone(&entry.value),
                content_type: entry.attrs.content_type.clone(),
                enabled: entry.attrs.enabled,
                not_before: entry.attrs.not_before,
                expires_on: entry.attrs.expires_on,
                fetched_at: entry.loaded_at,
                upstream_request_id: None,
            })
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
}

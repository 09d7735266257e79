//! `kvbroker rotate`: write a new version of a secret to Key Vault with the operator's
//! credential (the Azure CLI by default, or the environment's identity), and print the new
//! version id — never the value. Generated values come from the OS's random source.
//!
//! The new version carries forward the current version's `contentType`, tags and expiry
//! (`--content-type`, `--tag`, `--expires` change them): Key Vault starts each version
//! bare, and a rotation that silently dropped an expiry would defeat it. Failures name the
//! step: a credential that gave no token (Key Vault was never asked), or Key Vault's own
//! refusal with its codes and advice (soft-deleted name, RBAC, firewall, …).

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use azure_core::http::RequestContent;
use azure_security_keyvault_secrets::SecretClient;
use azure_security_keyvault_secrets::models::{SecretAttributes, SetSecretParameters};
use kvbroker_proto::SecretName;
use zeroize::Zeroizing;

use crate::config::{ConnectTo, IdentityConfig, IdentitySource};
use crate::identity::{self, IdentityEnv};
use crate::transport::{HyperTransport, TransportConfig};
use crate::vault::KvError;

/// What `rotate` writes.
pub(crate) enum NewValue {
    File(PathBuf),
    Generate(usize),
}

/// Where and as whom.
pub(crate) struct RotateTarget {
    pub(crate) vault_url: String,
    pub(crate) name: String,
    pub(crate) source: IdentitySource,
    pub(crate) client_id: Option<String>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) connect_to: Vec<ConnectTo>,
    pub(crate) loopback_only: bool,
    pub(crate) content_type: Option<String>,
    /// `Some(None)`: `--expires never`.
    pub(crate) expires: Option<Option<i64>>,
    pub(crate) tags: Vec<(String, String)>,
}

/// Why a rotation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotateError {
    #[error("give exactly one of --from-file FILE or --generate BYTES")]
    OneValueSource,
    #[error("{name:?}: {source}")]
    Name { name: String, source: kvbroker_proto::NameError },
    #[error("--vault {url}: must start with https://")]
    NotHttps { url: String },
    #[error("{path}: {source} (the value must be UTF-8 text)")]
    File { path: PathBuf, source: std::io::Error },
    #[error("--generate {bytes}: choose 16 to 4096 bytes")]
    GenerateSize { bytes: usize },
    #[error("the value must be 1 byte to 25 KB (Key Vault's limit)")]
    ValueSize,
    #[error("cannot set up {what}: {reason}")]
    Setup { what: &'static str, reason: String },
    #[error("Key Vault refused the new version of {name}: {reason}")]
    Vault { name: String, reason: String },
    #[error(
        "Key Vault refused to show the current version of {name} (needed to carry its content type, tags and expiry forward): {reason}"
    )]
    ReadCurrent { name: String, reason: String },
    #[error("{who} could not get a token, so Key Vault was not asked: {reason}; {fix}")]
    Credential { who: String, reason: String, fix: &'static str },
    #[error("cannot reach Key Vault {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("--expires {0:?}: write an RFC 3339 time like 2027-01-01T00:00:00Z, or never")]
    Expires(String),
    #[error("--tag {0:?}: write KEY=VALUE")]
    Tag(String),
}

/// `kvbroker rotate`: writes the new version and prints its id.
pub(crate) fn command(a: crate::cli::RotateArgs) -> Result<(), crate::Error> {
    let value = match (a.from_file, a.generate) {
        (Some(f), None) => NewValue::File(f),
        (None, Some(n)) => NewValue::Generate(n),
        _ => return Err(RotateError::OneValueSource.into()),
    };
    let target = RotateTarget {
        vault_url: a.vault,
        name: a.name,
        source: a.identity,
        client_id: a.client_id,
        ca_file: a.ca_file,
        connect_to: a.connect_to,
        loopback_only: a.loopback_only,
        content_type: a.content_type,
        expires: match a.expires.as_deref() {
            None => None,
            Some("never") => Some(None),
            Some(t) => Some(Some(
                humantime::parse_rfc3339_weak(t)
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .and_then(|d| i64::try_from(d.as_secs()).ok())
                    .ok_or_else(|| RotateError::Expires(t.to_owned()))?,
            )),
        },
        tags: a
            .tag
            .iter()
            .map(|t| {
                t.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| RotateError::Tag(t.clone()))
            })
            .collect::<Result<_, _>>()?,
    };
    let version = super::runtime()?.block_on(rotate(target, value))?;
    println!("{version}");
    Ok(())
}

/// Writes the new version; returns its id.
pub(crate) async fn rotate(target: RotateTarget, value: NewValue) -> Result<String, RotateError> {
    let name: SecretName =
        target.name.parse().map_err(|source| RotateError::Name { name: target.name.clone(), source })?;
    if !target.vault_url.starts_with("https://") {
        return Err(RotateError::NotHttps { url: target.vault_url });
    }
    let value = match value {
        NewValue::File(path) => {
            let mut s = Zeroizing::new(String::new());
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_string(&mut s))
                .map_err(|source| RotateError::File { path, source })?;
            s
        }
        NewValue::Generate(n) if (16..=4096).contains(&n) => generate(n)
            .map_err(|e| RotateError::Setup { what: "the random source", reason: e.to_string() })?,
        NewValue::Generate(n) => {
            return Err(RotateError::GenerateSize { bytes: n });
        }
    };
    if value.is_empty() || value.len() > 25 * 1024 {
        return Err(RotateError::ValueSize);
    }
    let http = HyperTransport::new(TransportConfig {
        ca_file: target.ca_file.clone(),
        connect_to: target.connect_to.clone(),
        loopback_only: target.loopback_only,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        proxy: crate::transport::Proxy::from_settings(None, &[], &|k| std::env::var(k).ok())
            .map_err(|reason| RotateError::Setup { what: "the proxy", reason })?,
    })
    .map_err(|e| RotateError::Setup { what: "the HTTP transport", reason: e.to_string() })?;
    let id_cfg = IdentityConfig {
        source: target.source,
        client_id: target.client_id.clone(),
        ca_file: target.ca_file.clone(),
        connect_to: target.connect_to.clone(),
        arc_token_dir: None,
        azure_ml_endpoint: None,
        azure_ml_secret_file: None,
    };
    let identity = identity::build(&id_cfg, &IdentityEnv::from_process(), Arc::clone(&http))
        .map_err(|e| RotateError::Setup { what: "the identity", reason: e.to_string() })?;
    let client = crate::vault::secret_client(&target.vault_url, &identity.credential, http)
        .map_err(|e| RotateError::Setup { what: "the Key Vault client", reason: e.to_string() })?;
    let current = current(&client, &name, &target.vault_url, &identity.description).await?;
    let mut attributes = SecretAttributes::default();
    let expires = match target.expires {
        Some(e) => e,
        None => current.as_ref().and_then(|c| c.attributes.as_ref()).and_then(|a| a.exp),
    };
    attributes.expires = expires.and_then(|s| azure_core::time::OffsetDateTime::from_unix_timestamp(s).ok());
    let mut tags: HashMap<String, String> = current.as_ref().and_then(|c| c.tags.clone()).unwrap_or_default();
    tags.extend(target.tags.iter().cloned());
    let params = SetSecretParameters {
        value: Some(value.to_string()),
        content_type: target
            .content_type
            .clone()
            .or_else(|| current.as_ref().and_then(|c| c.content_type.clone())),
        tags: (!tags.is_empty()).then_some(tags),
        secret_attributes: expires.is_some().then_some(attributes),
    };
    let content: RequestContent<SetSecretParameters> = params
        .try_into()
        .map_err(|e: azure_core::Error| RotateError::Setup { what: "the request", reason: e.to_string() })?;
    let resp = client.set_secret(name.as_str(), content, None).await.map_err(|e| {
        failure(&e, &target.vault_url, &identity.description, |reason| RotateError::Vault {
            name: name.to_string(),
            reason,
        })
    })?;
    let body: bytes::Bytes = resp.into_body().into();
    let mut owned = Zeroizing::new(body.to_vec());
    let id = serde_json::from_slice::<serde_json::Value>(&owned)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
        .and_then(|id| id.rsplit('/').next().map(str::to_owned))
        .ok_or_else(|| RotateError::Vault {
            name: name.to_string(),
            reason: "the answer has no version id".into(),
        });
    zeroize::Zeroize::zeroize(&mut *owned);
    id
}

/// What carries forward from the current version (never its value: serde skips it).
#[derive(serde::Deserialize)]
struct Current {
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    tags: Option<HashMap<String, String>>,
    attributes: Option<CurrentAttributes>,
}

#[derive(serde::Deserialize)]
struct CurrentAttributes {
    exp: Option<i64>,
}

/// The current version's metadata; `None` for a new name.
async fn current(
    client: &SecretClient,
    name: &SecretName,
    url: &str,
    who: &str,
) -> Result<Option<Current>, RotateError> {
    match client.get_secret(name.as_str(), None).await {
        Ok(resp) => {
            let body: bytes::Bytes = resp.into_body().into();
            let mut owned = Zeroizing::new(body.to_vec());
            let c = serde_json::from_slice::<Current>(&owned).ok();
            zeroize::Zeroize::zeroize(&mut *owned);
            Ok(c)
        }
        Err(e) => match e.kind() {
            azure_core::error::ErrorKind::HttpResponse { status, .. } if u16::from(*status) == 404 => {
                Ok(None)
            }
            _ => Err(failure(&e, url, who, |reason| RotateError::ReadCurrent {
                name: name.to_string(),
                reason,
            })),
        },
    }
}

/// Names the step that failed: the credential (Key Vault never asked), the network, or Key
/// Vault's refusal with its status, codes, message and advice.
fn failure(
    e: &azure_core::Error,
    url: &str,
    who: &str,
    refused: impl FnOnce(String) -> RotateError,
) -> RotateError {
    use azure_core::error::ErrorKind;
    match e.kind() {
        ErrorKind::HttpResponse { status, raw_response, .. } => {
            let code = u16::from(*status);
            let kv = KvError::of_response(code, raw_response.as_deref());
            let advice = match (code, kv.inner.as_deref()) {
                (403, Some("ForbiddenByRbac")) => format!(
                    "writing needs a role that allows setting secrets: assign {who} Key Vault Secrets Officer on the vault"
                ),
                (403, Some("AccessDenied")) => {
                    format!(
                        "add an access policy with secret Get and Set for {who}, or switch the vault to Azure RBAC"
                    )
                }
                (404, _) => "check --vault: that URL has no Key Vault secrets endpoint".to_owned(),
                _ => kv.advice(who),
            };
            refused(format!("{} (as {who}); {advice}", kv.summary()))
        }
        ErrorKind::Credential => {
            let reason = identity::one_line(&identity::error_chain(e));
            let fix = if reason.contains("Azure CLI") || reason.contains("az ") || who.contains("Azure CLI") {
                "install the Azure CLI and run az login, or pass --identity auto on a node with a managed identity"
            } else {
                "check the identity (kvbroker doctor shows which source and variables are in use)"
            };
            RotateError::Credential { who: who.to_owned(), reason, fix }
        }
        ErrorKind::Io | ErrorKind::Connection => RotateError::Unreachable {
            url: url.to_owned(),
            reason: identity::one_line(&identity::error_chain(e)),
        },
        _ => refused(identity::one_line(&identity::error_chain(e))),
    }
}

/// `n` random bytes from the OS, as unpadded base64url text.
pub(crate) fn generate(n: usize) -> std::io::Result<Zeroizing<String>> {
    let mut raw = Zeroizing::new(vec![0u8; n]);
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    base64url(&raw)
}

/// Unpadded base64url, written straight into a zeroizing buffer of the exact size:
/// `encode_slice` uses no buffer of its own (unlike `encode_string`'s stack chunks), and the
/// `String` takes over the same allocation, so no copy of the text is left behind.
fn base64url(bytes: &[u8]) -> std::io::Result<Zeroizing<String>> {
    use base64::Engine as _;
    let too_long = || std::io::Error::other("too many bytes to encode");
    let mut out = Zeroizing::new(vec![0u8; base64::encoded_len(bytes.len(), false).ok_or_else(too_long)?]);
    let written = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode_slice(bytes, &mut out)
        .map_err(|_| too_long())?;
    out.truncate(written);
    match String::from_utf8(std::mem::take(&mut *out)) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            // Not reached (base64 is ASCII); wipe the bytes all the same.
            drop(Zeroizing::new(e.into_bytes()));
            Err(std::io::Error::other("base64 output was not text"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_known_vectors() {
        let b64 = |b: &[u8]| base64url(b).unwrap();
        assert_eq!(b64(b"").as_str(), "");
        assert_eq!(b64(b"f").as_str(), "Zg");
        assert_eq!(b64(b"fo").as_str(), "Zm8");
        assert_eq!(b64(b"foo").as_str(), "Zm9v");
        assert_eq!(b64(&[0xfb, 0xff]).as_str(), "-_8");
        // The buffer is exactly the text: no slack left over to reallocate into.
        assert_eq!(b64(b"foob").capacity(), "Zm9vYg".len());
        assert_eq!(generate(32).unwrap().len(), 43);
    }
}

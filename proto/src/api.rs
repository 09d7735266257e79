//! Request and response bodies of the agent socket (SPEC.md, "The agent socket").

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::name::{NameError, SecretName, VaultAlias, VersionId};
use crate::value::{self, SecretValue};

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `degraded`; on `/v1/health?ready`, `ready`, `starting` or `degraded`.
    pub status: String,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why the agent is degraded (empty when ok).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// The JSON answer to `GET /v1/secrets/{name}`. Holds the value: no derived `Debug`.
#[derive(Serialize, Deserialize)]
pub struct SecretResponse {
    /// The vault alias the secret came from.
    pub vault: VaultAlias,
    /// The name as the vault spells it.
    pub name: SecretName,
    /// The version served.
    pub version: VersionId,
    /// The value.
    #[serde(serialize_with = "value::serialize_exposed")]
    #[serde(deserialize_with = "value::deserialize_exposed")]
    pub value: SecretValue,
    /// Key Vault's `contentType`, if set.
    pub content_type: Option<String>,
    /// Not valid before (RFC 3339), if set.
    pub not_before: Option<String>,
    /// Expires on (RFC 3339), if set.
    pub expires_on: Option<String>,
    /// When the agent fetched this version from the vault (RFC 3339).
    pub fetched_at: String,
    /// True when the vault is failing and this is the last good value.
    pub stale: bool,
}

impl fmt::Debug for SecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretResponse")
            .field("vault", &self.vault)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("value", &self.value)
            .field("content_type", &self.content_type)
            .field("not_before", &self.not_before)
            .field("expires_on", &self.expires_on)
            .field("fetched_at", &self.fetched_at)
            .field("stale", &self.stale)
            .finish()
    }
}

/// Headers that carry the metadata of an `application/octet-stream` answer.
pub mod headers {
    /// The vault alias.
    pub const VAULT: &str = "x-secret-vault";
    /// The secret name as the vault spells it.
    pub const NAME: &str = "x-secret-name";
    /// The version id.
    pub const VERSION: &str = "x-secret-version";
    /// `contentType`, when set.
    pub const CONTENT_TYPE: &str = "x-secret-content-type";
    /// Not valid before (RFC 3339), when set.
    pub const NOT_BEFORE: &str = "x-secret-not-before";
    /// Expires on (RFC 3339), when set.
    pub const EXPIRES_ON: &str = "x-secret-expires-on";
    /// When the agent fetched it (RFC 3339).
    pub const FETCHED_AT: &str = "x-secret-fetched-at";
    /// `true` when served stale.
    pub const STALE: &str = "x-secret-stale";
    /// The request id.
    pub const REQUEST_ID: &str = "x-request-id";
}

/// The longest long poll the agent honours, in seconds.
pub const MAX_WAIT_SECS: u32 = 300;

/// The query of `GET /v1/secrets/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretQuery {
    /// `vault=ALIAS`.
    pub vault: Option<VaultAlias>,
    /// `version=ID`.
    pub version: Option<VersionId>,
    /// `changed_from=ID` (long poll).
    pub changed_from: Option<VersionId>,
    /// `wait=SECONDS` (long poll), at most [`MAX_WAIT_SECS`].
    pub wait: Option<u32>,
}

/// Why a query string was refused. Safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// A parameter the API does not know.
    #[error("unknown query parameter {0:?}: expected vault, version, changed_from or wait")]
    Unknown(String),
    /// A parameter given twice.
    #[error("query parameter {0:?} given more than once")]
    Repeated(&'static str),
    /// A malformed name, version or alias.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `wait` is not a whole number of seconds up to 300.
    #[error("invalid wait: a whole number of seconds from 0 to 300")]
    Wait,
    /// `wait` without `changed_from`, or the reverse.
    #[error("changed_from and wait go together")]
    LongPollPair,
    /// Bad percent-encoding.
    #[error("malformed query string")]
    Malformed,
}

impl SecretQuery {
    /// Parses a query string (without the `?`).
    ///
    /// ```
    /// use kvbroker_proto::SecretQuery;
    /// let q = SecretQuery::parse("vault=prod&version=0123456789abcdef0123456789abcdef").unwrap();
    /// assert_eq!(q.vault.unwrap().as_str(), "prod");
    /// assert!(SecretQuery::parse("colour=blue").is_err());
    /// ```
    pub fn parse(query: &str) -> Result<Self, QueryError> {
        let mut q = SecretQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or(QueryError::Malformed)?;
            match k {
                "vault" => set_once(&mut q.vault, "vault", v.parse()?)?,
                "version" => set_once(&mut q.version, "version", v.parse()?)?,
                "changed_from" => set_once(&mut q.changed_from, "changed_from", v.parse()?)?,
                "wait" => {
                    let secs: u32 = v.parse().map_err(|_| QueryError::Wait)?;
                    if secs > MAX_WAIT_SECS {
                        return Err(QueryError::Wait);
                    }
                    set_once(&mut q.wait, "wait", secs)?;
                }
                other => {
                    let shown: String = other.chars().take(32).collect();
                    return Err(QueryError::Unknown(shown));
                }
            }
        }
        if q.changed_from.is_some() != q.wait.is_some() {
            return Err(QueryError::LongPollPair);
        }
        Ok(q)
    }

    /// Renders the query string (without the `?`), the inverse of [`SecretQuery::parse`].
    pub fn to_query_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(v) = &self.vault {
            parts.push(format!("vault={v}"));
        }
        if let Some(v) = &self.version {
            parts.push(format!("version={v}"));
        }
        if let Some(v) = &self.changed_from {
            parts.push(format!("changed_from={v}"));
        }
        if let Some(w) = self.wait {
            parts.push(format!("wait={w}"));
        }
        parts.join("&")
    }
}

fn set_once<T>(slot: &mut Option<T>, name: &'static str, v: T) -> Result<(), QueryError> {
    if slot.is_some() {
        return Err(QueryError::Repeated(name));
    }
    *slot = Some(v);
    Ok(())
}

/// Decodes a query value: `+` is a space, `%XX` a byte, and the result must be UTF-8.
/// `percent_decode_str` passes a `%` without two hex digits through as text; here that is
/// malformed, so it is checked first (which also refuses `%+f`, that a radix parse accepts).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let escapes_ok = b
        .iter()
        .enumerate()
        .filter(|&(_, &c)| c == b'%')
        .all(|(i, _)| b.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)));
    if !escapes_ok {
        return None;
    }
    // A literal `+` is a space; an encoded one (`%2B`) is decoded after, so it stays a `+`.
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced).decode_utf8().ok().map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders() {
        let s = "vault=a&changed_from=0123456789abcdef0123456789abcdef&wait=30";
        let q = SecretQuery::parse(s).unwrap();
        assert_eq!(q.wait, Some(30));
        assert_eq!(q.to_query_string(), s);
        assert_eq!(SecretQuery::parse("").unwrap(), SecretQuery::default());
    }

    #[test]
    fn refuses_bad_queries() {
        assert_eq!(SecretQuery::parse("x=1"), Err(QueryError::Unknown("x".into())));
        assert_eq!(SecretQuery::parse("vault=a&vault=b"), Err(QueryError::Repeated("vault")));
        assert!(matches!(SecretQuery::parse("version=12"), Err(QueryError::Name(_))));
        assert_eq!(SecretQuery::parse("wait=301"), Err(QueryError::Wait));
        assert_eq!(SecretQuery::parse("wait=5"), Err(QueryError::LongPollPair));
        assert_eq!(SecretQuery::parse("vault=%zz"), Err(QueryError::Malformed));
        assert_eq!(SecretQuery::parse("vault=%2"), Err(QueryError::Malformed));
        assert!(SecretQuery::parse("vault=a%2Db").is_ok());
    }

    /// `%+f` once decoded to 0x0f: a radix parse takes `+f` as a signed hex number.
    #[test]
    fn refuses_escapes_that_are_not_two_hex_digits() {
        for bad in ["vault=%+f", "vault=a%-1", "vault=%", "vault=a%4", "wait=%g0", "vault=%ff"] {
            assert_eq!(SecretQuery::parse(bad), Err(QueryError::Malformed), "{bad}");
        }
        assert_eq!(percent_decode("%+f"), None);
        assert_eq!(percent_decode("a%2Db%5f").as_deref(), Some("a-b_"));
        assert_eq!(percent_decode("a+b%2B").as_deref(), Some("a b+"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(SecretQuery::parse("vault=my%5Fvault").unwrap().vault.unwrap().as_str(), "my_vault");
    }
}

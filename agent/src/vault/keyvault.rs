//! `url = "https://….vault.azure.net"`: Azure Key Vault through the official
//! `azure_security_keyvault_secrets` client, over our own transport.
//!
//! The value never passes through a plain `String` of ours: we take the raw answer body,
//! find the value with serde_json's `RawValue` (a borrowed slice of the body), unescape it
//! straight into zeroizing memory and wipe the body buffer we were handed. (The SDK and
//! hyper hold copies of their own; docs/security.md lists them.)
//!
//! Each call carries a fresh `x-ms-client-request-id`, which Key Vault logs as its
//! `correlationId`; we keep it for the audit record. Retries (5xx, 429, network errors) are
//! ours, bounded by the vault's `deadline` so a caller never waits longer. A 429 pauses every
//! call to the vault for its `Retry-After` (any form, see [`transport::retry_after`](crate::transport::retry_after)) or else
//! 1, 2, 4, 8, 16 s. A refusal keeps Key Vault's own status, codes and message, with advice
//! that fits the cause ([`kv_error::KvError`]); a token failure names the identity endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use azure_core::http::request::options::ClientRequestId;
use azure_core::http::{ClientMethodOptions, ClientOptions, Context, RetryOptions, Transport};
use azure_security_keyvault_secrets::models::SecretClientGetSecretOptions;
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use kvbroker_proto::{SecretName, SecretValue, Upstream, VaultAlias, VersionId};
use serde::Deserialize;
use serde_json::value::RawValue;
use zeroize::{Zeroize, Zeroizing};

use super::kv_error::{self, KvError};
use super::{Backend, BoxFuture, Budget, Fetched, VaultError};
use crate::identity::{Identity, IdentityFailure};
use crate::metrics::VaultStatus;
use crate::rate::TokenBucket;
use crate::transport::HyperTransport;

pub(crate) struct KeyVaultBackend {
    alias: VaultAlias,
    url: String,
    client: SecretClient,
    identity: String,
    deadline: Duration,
    pace: Pace,
}

/// Protects the vault: at most `rate` calls per second (a token bucket with a burst of one
/// second's worth), and no call at all while a 429's `Retry-After` runs. Every call to this
/// vault — misses, refreshes, retries — passes here, so many failing secrets cannot storm it.
struct Pace {
    state: std::sync::Mutex<PaceState>,
}

struct PaceState {
    bucket: TokenBucket,
    blocked_until: Option<Instant>,
    /// 429s in a row, for the backoff when Key Vault sends no `Retry-After`.
    throttles: u32,
}

impl Pace {
    fn new(rate: u32) -> Self {
        let bucket = TokenBucket::full(rate, rate, Instant::now());
        Self { state: std::sync::Mutex::new(PaceState { bucket, blocked_until: None, throttles: 0 }) }
    }

    /// Reserves the next call; returns how long to wait before making it.
    fn reserve(&self) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let mut wait = s.bucket.reserve(now);
        if let Some(until) = s.blocked_until {
            wait = wait.max(until.saturating_duration_since(now));
        }
        wait
    }

    /// A 429: stops all calls for its `Retry-After`, or else 1, 2, 4, 8, 16 s by how many
    /// 429s came in a row. Returns the pause.
    fn throttled(&self, retry_after: Option<Duration>) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.throttles = s.throttles.saturating_add(1);
        let d = retry_after.unwrap_or_else(|| kv_error::throttle_backoff(s.throttles));
        let until = Instant::now() + d;
        s.blocked_until = Some(s.blocked_until.map_or(until, |b| b.max(until)));
        d
    }

    fn is_paused(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.blocked_until.is_some_and(|u| u > Instant::now())
    }

    /// Any answer but a 429 ends a run of throttling.
    fn answered(&self) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.throttles = 0;
    }
}

/// The SDK's secrets client over our transport, with the SDK's own retries off: reads retry
/// in [`KeyVaultBackend`] (bounded by the deadline, Retry-After honoured), and a retried
/// `set` (`kvbroker rotate`) could create two versions.
pub(crate) fn secret_client(
    url: &str,
    credential: &Arc<dyn azure_core::credentials::TokenCredential>,
    http: Arc<HyperTransport>,
) -> azure_core::Result<SecretClient> {
    let options = SecretClientOptions {
        client_options: ClientOptions {
            transport: Some(Transport::new(http)),
            retry: RetryOptions::none(),
            ..ClientOptions::default()
        },
        ..SecretClientOptions::default()
    };
    SecretClient::new(url, Arc::clone(credential), Some(options))
}

impl KeyVaultBackend {
    pub(crate) fn new(
        alias: VaultAlias,
        url: &str,
        identity: &Identity,
        http: Arc<HyperTransport>,
        deadline: Duration,
        max_calls_per_second: u32,
    ) -> Result<Self, String> {
        let client = secret_client(url, &identity.credential, http).map_err(|e| e.to_string())?;
        Ok(Self {
            alias,
            url: url.to_owned(),
            client,
            identity: identity.description.clone(),
            deadline,
            pace: Pace::new(max_calls_per_second),
        })
    }

    async fn fetch(
        &self,
        name: &SecretName,
        version: Option<&VersionId>,
        request_id: &str,
        last: &Last,
        deadline: Duration,
    ) -> Result<Fetched, VaultError> {
        let start = Instant::now();
        let mut attempt = 0u32;
        loop {
            let wait = self.pace.reserve();
            if !wait.is_zero() {
                if start.elapsed() + wait >= deadline {
                    return Err(VaultError::Unavailable {
                        vault: self.alias.clone(),
                        reason: format!(
                            "calls to Key Vault {} are paused for {:.1}s (throttled, or over max_calls_per_second)",
                            self.url,
                            wait.as_secs_f64()
                        ),
                        upstream_request_id: None,
                        upstream: None,
                    });
                }
                tokio::time::sleep(wait).await;
            }
            let options = SecretClientGetSecretOptions {
                method_options: ClientMethodOptions {
                    context: Context::new().with_value(ClientRequestId::new(request_id.to_owned())),
                },
                secret_version: version.map(|v| v.as_str().to_owned()),
                ..Default::default()
            };
            let asked = Instant::now();
            let err = match self.client.get_secret(name.as_str(), Some(options)).await {
                Ok(resp) => {
                    self.pace.answered();
                    let body: bytes::Bytes = resp.into_body().into();
                    let parsed = self.parse(body, name, request_id);
                    let status = if parsed.is_ok() { VaultStatus::Ok } else { VaultStatus::Unavailable };
                    crate::metrics::get().vault_call(self.alias.as_str(), status, asked.elapsed());
                    return parsed;
                }
                Err(e) => e,
            };
            let (failure, retry_after) = self.classify(&err, name, request_id);
            // Every request sent is a call, retries included: a background refresh may retry
            // for 90 s, and its failures must show while it does.
            crate::metrics::get().vault_call(self.alias.as_str(), VaultStatus::of(&failure), asked.elapsed());
            let Some(mut delay) = retry_after else { return Err(failure) };
            if let VaultError::Unavailable { reason, upstream, .. } = &failure {
                *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((reason.clone(), upstream.as_deref().cloned()));
            }
            attempt += 1;
            if delay.is_zero() && !self.pace.is_paused() {
                // Exponential backoff with jitter: 200 ms, 400 ms, 800 ms, … ± 25 %.
                let base = 200u64.saturating_mul(1 << attempt.min(6));
                delay = Duration::from_millis(base * (75 + fastrand::u64(..50)) / 100);
            }
            if start.elapsed() + delay >= deadline {
                return Err(failure);
            }
            tracing::debug!(vault = %self.alias, secret = %name, attempt, delay_ms = delay.as_millis() as u64, "retrying Key Vault");
            tokio::time::sleep(delay).await;
        }
    }

    /// Maps an SDK error to ours; `Some(delay)` if it is worth retrying (zero: use backoff).
    fn classify(
        &self,
        e: &azure_core::Error,
        name: &SecretName,
        rid: &str,
    ) -> (VaultError, Option<Duration>) {
        use azure_core::error::ErrorKind;
        let unavailable = |reason: String, upstream: Option<Upstream>| VaultError::Unavailable {
            vault: self.alias.clone(),
            reason,
            upstream_request_id: Some(rid.to_owned()),
            upstream: upstream.map(Box::new),
        };
        match e.kind() {
            ErrorKind::HttpResponse { status, raw_response, .. } => {
                let code = u16::from(*status);
                let kv = KvError::of_response(code, raw_response.as_deref());
                let retry_after = raw_response
                    .as_ref()
                    .and_then(|r| crate::transport::retry_after(r.headers(), SystemTime::now()));
                if code != 429 {
                    self.pace.answered();
                }
                let answered =
                    Some(Upstream::new("key_vault", Some(code), kv.code.clone(), kv.inner.clone()));
                let explained = |verb: &str| {
                    unavailable(
                        format!(
                            "Key Vault {} {verb}: {}; {}",
                            self.url,
                            kv.summary(),
                            kv.advice(&self.identity)
                        ),
                        answered.clone(),
                    )
                };
                match code {
                    404 => (
                        VaultError::NotFound {
                            vault: self.alias.clone(),
                            name: name.to_string(),
                            upstream_request_id: Some(rid.to_owned()),
                        },
                        None,
                    ),
                    403 if kv.inner.as_deref() == Some("SecretDisabled") => (
                        VaultError::Disabled {
                            vault: self.alias.clone(),
                            name: name.to_string(),
                            upstream_request_id: Some(rid.to_owned()),
                        },
                        None,
                    ),
                    401 | 403 => (explained(&format!("refused {}", self.identity)), None),
                    429 => {
                        // Honoured for every call to this vault, not just this one.
                        let pause = self.pace.throttled(retry_after);
                        (
                            unavailable(
                                format!(
                                    "Key Vault {} is throttling requests ({}); calls to it are paused for {:.1}s",
                                    self.url,
                                    kv.summary(),
                                    pause.as_secs_f64()
                                ),
                                answered,
                            ),
                            Some(Duration::ZERO),
                        )
                    }
                    500..=599 => (explained("failed"), Some(retry_after.unwrap_or(Duration::ZERO))),
                    _ => (explained("answered"), None),
                }
            }
            ErrorKind::Credential => {
                let failure = identity_failure(e);
                let permanent = failure.is_some_and(|f| f.permanent);
                // Microsoft's IMDS guidance: retry transient answers after at least 1 s, or
                // after the endpoint's own `Retry-After` when it sends one.
                let delay =
                    failure.and_then(|f| f.retry_after).unwrap_or(Duration::ZERO).max(Duration::from_secs(1));
                let why = failure.map_or_else(|| crate::identity::error_chain(e), ToString::to_string);
                (
                    unavailable(
                        format!("{} could not get a token for Key Vault {}: {why}", self.identity, self.url),
                        failure.map(IdentityFailure::upstream),
                    ),
                    (!permanent).then_some(delay),
                )
            }
            ErrorKind::Io | ErrorKind::Connection => (
                unavailable(
                    format!("cannot reach Key Vault {}: {}", self.url, crate::identity::error_chain(e)),
                    Some(Upstream::new("key_vault", None, None, None)),
                ),
                Some(Duration::ZERO),
            ),
            _ => (
                unavailable(
                    format!("Key Vault {} call failed: {}", self.url, crate::identity::error_chain(e)),
                    None,
                ),
                None,
            ),
        }
    }

    fn parse(&self, body: bytes::Bytes, asked: &SecretName, rid: &str) -> Result<Fetched, VaultError> {
        let bad = |what: &str| VaultError::Unavailable {
            vault: self.alias.clone(),
            reason: format!("Key Vault {} sent a malformed secret: {what}", self.url),
            upstream_request_id: Some(rid.to_owned()),
            upstream: Some(Box::new(Upstream::new("key_vault", Some(200), None, None))),
        };
        // Own the body so it can be wiped; `Bytes` that are not unique are copied once.
        let mut owned = Zeroizing::new(Vec::from(body));
        let wire: WireSecret<'_> =
            serde_json::from_slice(&owned).map_err(|_| bad("not the expected JSON"))?;
        let raw = wire.value.ok_or_else(|| bad("no value"))?;
        let value = unescape_json_string(raw.get()).ok_or_else(|| bad("value is not a JSON string"))?;
        let (name, version) =
            wire.id.as_deref().and_then(parse_id).ok_or_else(|| bad("id is not …/secrets/NAME/VERSION"))?;
        let attrs = wire.attributes.unwrap_or_default();
        let time = |s: Option<i64>| {
            s.and_then(|s| u64::try_from(s).ok()).map(|s| UNIX_EPOCH + Duration::from_secs(s))
        };
        let fetched = Fetched {
            name: name.parse().unwrap_or_else(|_| asked.clone()),
            version,
            value: Arc::new(value),
            content_type: wire.content_type.map(Into::into),
            enabled: attrs.enabled.unwrap_or(true),
            not_before: time(attrs.nbf),
            expires_on: time(attrs.exp),
            fetched_at: SystemTime::now(),
            upstream_request_id: Some(rid.into()),
            answer: super::Answer::default(),
        };
        owned.zeroize();
        Ok(fetched)
    }
}

impl Backend for KeyVaultBackend {
    fn counts_own_calls(&self) -> bool {
        true
    }

    fn get<'a>(
        &'a self,
        name: &'a SecretName,
        version: Option<&'a VersionId>,
        budget: Budget,
    ) -> BoxFuture<'a, Result<Fetched, VaultError>> {
        Box::pin(async move {
            let rid = client_request_id();
            let deadline = budget.deadline(self.deadline);
            // The last failure seen before the deadline, so a timeout says what kept failing
            // (a refused identity endpoint, a 5xx) rather than only "did not answer".
            let last: Last = std::sync::Mutex::new(None);
            let result = match tokio::time::timeout(
                deadline,
                self.fetch(name, version, &rid, &last, deadline),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => {
                    let last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                    let (reason, upstream) = match last {
                        Some((why, upstream)) => (
                            format!(
                                "{why} (still failing after {deadline:?}, the {} deadline)",
                                if budget == Budget::Caller { "vault's" } else { "background refresh's" }
                            ),
                            upstream,
                        ),
                        None => (
                            format!("Key Vault {} did not answer within {deadline:?}", self.url),
                            Some(Upstream::new("key_vault", None, None, None)),
                        ),
                    };
                    Err(VaultError::Unavailable {
                        vault: self.alias.clone(),
                        reason,
                        upstream_request_id: Some(rid),
                        upstream: upstream.map(Box::new),
                    })
                }
            };
            if let Err(e @ VaultError::Unavailable { .. }) = &result {
                let up = e.upstream();
                tracing::warn!(
                    vault = %self.alias,
                    secret = %name,
                    upstream_request_id = e.upstream_request_id().unwrap_or(""),
                    upstream_service = up.map_or("", |u| u.service.as_str()),
                    upstream_status = up.and_then(|u| u.status).unwrap_or(0),
                    upstream_code = up.and_then(|u| u.code.as_deref()).unwrap_or(""),
                    upstream_inner_code = up.and_then(|u| u.inner_code.as_deref()).unwrap_or(""),
                    error = %e,
                    "Key Vault read failed"
                );
            }
            result
        })
    }
}

/// The last failure seen before the deadline, and what the upstream service answered.
type Last = std::sync::Mutex<Option<(String, Option<Upstream>)>>;

#[derive(Deserialize)]
struct WireSecret<'a> {
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    id: Option<String>,
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    attributes: Option<WireAttrs>,
}

#[derive(Deserialize, Default)]
struct WireAttrs {
    enabled: Option<bool>,
    nbf: Option<i64>,
    exp: Option<i64>,
}

/// The identity endpoint's failure inside a credential error, wherever the SDK put it.
fn identity_failure(e: &azure_core::Error) -> Option<&IdentityFailure> {
    if let Some(f) = e.downcast_ref::<IdentityFailure>() {
        return Some(f);
    }
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(f) = c.downcast_ref::<IdentityFailure>() {
            return Some(f);
        }
        cur = c.source();
    }
    None
}

/// `https://x.vault.azure.net/secrets/NAME/VERSION` → (NAME, VERSION).
fn parse_id(id: &str) -> Option<(String, VersionId)> {
    let path = id.split_once("://").map_or(id, |(_, rest)| rest);
    let mut parts = path.split('/').skip(1);
    match (parts.next(), parts.next(), parts.next()) {
        (Some("secrets"), Some(name), Some(version)) => Some((name.to_owned(), version.parse().ok()?)),
        _ => None,
    }
}

/// Unescapes a JSON string literal (with its quotes) into a zeroizing buffer sized so it
/// never reallocates.
///
/// Hand-written on purpose: serde_json (and every JSON crate we know) unescapes into a
/// `String` it grows as it goes, leaving freed copies of the value that nothing wipes. Here
/// the output is never larger than the literal, so one zeroizing buffer of that size holds
/// every byte the value ever occupies. The unit test checks it agrees with serde_json.
pub(crate) fn unescape_json_string(lit: &str) -> Option<SecretValue> {
    let inner = lit.strip_prefix('"')?.strip_suffix('"')?.as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(inner.len()));
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let esc = *inner.get(i + 1)?;
        i += 2;
        let c = match esc {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let mut cp = hex4(inner.get(i..i + 4)?)?;
                i += 4;
                if (0xD800..0xDC00).contains(&cp) {
                    if inner.get(i..i + 2)? != b"\\u" {
                        return None;
                    }
                    let lo = hex4(inner.get(i + 2..i + 6)?)?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return None;
                    }
                    i += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                let ch = char::from_u32(cp)?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                buf.zeroize();
                continue;
            }
            _ => return None,
        };
        out.push(c);
    }
    let v = std::mem::take(&mut *out);
    Some(SecretValue::from_vec(v))
}

fn hex4(h: &[u8]) -> Option<u32> {
    u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
}

/// A random UUID (v4) string, the form Key Vault expects for `x-ms-client-request-id`.
fn client_request_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_json_strings() {
        let cases = [
            (r#""plain""#, "plain"),
            (r#""a\"b\\c\/d\n\t""#, "a\"b\\c/d\n\t"),
            (r#""\u00e9\u20ac""#, "é€"),
            (r#""\ud83d\ude00""#, "😀"),
            (r#""é raw""#, "é raw"),
        ];
        for (lit, want) in cases {
            let v = unescape_json_string(lit).unwrap();
            assert_eq!(v.expose_secret(), want.as_bytes(), "{lit}");
            // Agrees with serde_json.
            let s: String = serde_json::from_str(lit).unwrap();
            assert_eq!(s.as_bytes(), v.expose_secret());
        }
        for bad in [r#""\x""#, r#""\u12""#, r#""\ud83d""#, "nope", r#""\"#] {
            assert!(unescape_json_string(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parses_secret_ids() {
        let (n, v) =
            parse_id("https://x.vault.azure.net/secrets/Db-Pw/0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(n, "Db-Pw");
        assert_eq!(v.as_str(), "0123456789abcdef0123456789abcdef");
        assert!(parse_id("https://x.vault.azure.net/keys/a/0123456789abcdef0123456789abcdef").is_none());
        assert!(parse_id("https://x.vault.azure.net/secrets/a").is_none());
    }

    #[test]
    fn client_request_ids_are_fresh_v4_uuids() {
        let u = client_request_id();
        assert_eq!(u.len(), 36);
        let parsed = uuid::Uuid::parse_str(&u).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.hyphenated().to_string(), u, "lowercase, hyphenated");
        assert_ne!(client_request_id(), u);
    }
}

//! What Key Vault said when it refused: the status, `error.code`, `innererror.code` and its
//! own message, kept whole, with advice that fits the cause. A firewall refusal
//! (`ForbiddenByFirewall`) must not send an operator to fix a role they already have.
//!
//! Pure functions: the wire body and headers in, text out. Key Vault's error bodies hold
//! names, object ids and addresses, never a secret value; the message is still made one line
//! and capped, since it reaches terminals and logs.

use std::time::Duration;

use crate::identity::one_line;

/// The parts of `{"error":{"code","message","innererror":{"code"}}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KvError {
    pub(crate) status: u16,
    pub(crate) code: Option<String>,
    pub(crate) inner: Option<String>,
    pub(crate) message: Option<String>,
}

impl KvError {
    /// From an SDK response error: its status, and its body when the SDK kept one.
    pub(crate) fn of_response(status: u16, raw: Option<&azure_core::http::RawResponse>) -> Self {
        raw.map_or_else(|| KvError { status, ..KvError::default() }, |r| KvError::parse(status, r.body()))
    }

    pub(crate) fn parse(status: u16, body: &[u8]) -> Self {
        let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let err = v.as_ref().and_then(|v| v.get("error"));
        let s = |x: Option<&serde_json::Value>| x.and_then(|x| x.as_str()).map(str::to_owned);
        Self {
            status,
            code: s(err.and_then(|e| e.get("code"))),
            inner: s(err.and_then(|e| e.get("innererror")).and_then(|i| i.get("code"))),
            message: s(err.and_then(|e| e.get("message"))).map(|m| one_line(&m)),
        }
    }

    /// `HTTP 403 Forbidden/ForbiddenByFirewall: "Client address is not authorized…"`.
    pub(crate) fn summary(&self) -> String {
        let mut s = format!("HTTP {}", self.status);
        if let Some(c) = &self.code {
            s.push_str(&format!(" {}", one_line(c)));
        }
        if let Some(i) = &self.inner {
            s.push_str(&format!("/{}", one_line(i)));
        }
        if let Some(m) = &self.message {
            s.push_str(&format!(": \"{m}\""));
        }
        s
    }

    fn is(&self, code: &str) -> bool {
        self.inner.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(code))
            || self.code.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(code))
    }

    fn message_has(&self, needle: &str) -> bool {
        self.message.as_deref().is_some_and(|m| m.to_ascii_lowercase().contains(needle))
    }

    /// What to do about it, naming the identity that asked.
    pub(crate) fn advice(&self, identity: &str) -> String {
        match self.status {
            403 if self.is("ForbiddenByFirewall")
                || self.message_has("client address is not authorized")
                || self.message_has("public network access is disabled") =>
            {
                "the vault's firewall or private endpoint refused this node's network address \
                 (a role assignment will not help): add the node's subnet or public IP to the vault's \
                 networking rules, or reach the vault through its private endpoint (check that the \
                 vault name resolves to the private IP on this node)"
                    .to_owned()
            }
            403 if self.is("ForbiddenByRbac") => format!(
                "the vault uses Azure RBAC and {identity} has no role that allows reading secrets: \
                 assign it Key Vault Secrets User on the vault (role changes can take up to 10 \
                 minutes, and tokens cached by the platform up to 8 hours, to apply)"
            ),
            403 if self.is("AccessDenied") || self.message_has("does not have secrets get permission") => {
                format!(
                    "the vault uses access policies and {identity} has none allowing secret Get: add \
                     an access policy with secret Get (and List) for it, or switch the vault to Azure RBAC"
                )
            }
            403 if self.is("SecretDisabled") => {
                "the secret is disabled: enable it (az keyvault secret set-attributes --enabled true)"
                    .to_owned()
            }
            403 => format!(
                "give {identity} read access to secrets on this vault (for example the Key Vault \
                 Secrets User role), and check the vault's networking rules"
            ),
            401 if self.message_has("akv10032")
                || self.message_has("invalid issuer")
                || self.message_has("tenant") =>
            {
                format!(
                    "the token of {identity} was issued by a different Entra tenant than the vault's: \
                     use an identity from the vault's tenant (or move the vault)"
                )
            }
            401 => format!(
                "Key Vault rejected the token of {identity}: check that it is a token for \
                 https://vault.azure.net from the vault's tenant"
            ),
            409 if self.is("ObjectIsDeletedButRecoverable")
                || self.message_has("deleted but recoverable") =>
            {
                "the secret's name belongs to a soft-deleted secret: recover it (az keyvault secret \
                 recover) or purge it (az keyvault secret purge) before using the name again"
                    .to_owned()
            }
            409 => "Key Vault reports a conflict with the secret's current state; retry, or check \
                    for a concurrent change or a soft-deleted secret of that name"
                .to_owned(),
            404 => "no such secret or version in this vault".to_owned(),
            400 => "Key Vault refused the request as malformed: this is a kvbroker bug or an \
                    unsupported api-version; report it with the message above"
                .to_owned(),
            429 => "Key Vault is throttling this vault: kvbroker pauses all calls to it".to_owned(),
            _ => "Key Vault failed; kvbroker retries within the vault's deadline".to_owned(),
        }
    }
}

/// Microsoft's advice for 429s without a `Retry-After`: 1, 2, 4, 8, 16 s.
pub(crate) fn throttle_backoff(consecutive: u32) -> Duration {
    Duration::from_secs(1 << consecutive.saturating_sub(1).min(4))
}

#[cfg(test)]
mod tests {
    use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
    use std::time::SystemTime;

    use crate::transport::retry_after;

    use super::*;

    fn kv(status: u16, body: &str) -> KvError {
        KvError::parse(status, body.as_bytes())
    }

    /// The issue's first bug: every 403 said "give that identity Key Vault Secrets User".
    #[test]
    fn advice_fits_the_cause() {
        let id = "imds managed identity (system-assigned)";
        let fw = kv(
            403,
            r#"{"error":{"code":"Forbidden","message":"Client address is not authorized and caller is not a trusted service.\r\nClient address: 10.0.0.4","innererror":{"code":"ForbiddenByFirewall"}}}"#,
        );
        assert_eq!(
            fw.summary(),
            "HTTP 403 Forbidden/ForbiddenByFirewall: \"Client address is not authorized and caller is not a trusted service. Client address: 10.0.0.4\""
        );
        assert!(fw.advice(id).contains("firewall or private endpoint"), "{}", fw.advice(id));
        assert!(!fw.advice(id).contains("Secrets User"));
        let rbac = kv(
            403,
            r#"{"error":{"code":"Forbidden","message":"Caller is not authorized","innererror":{"code":"ForbiddenByRbac"}}}"#,
        );
        assert!(rbac.advice(id).contains("Key Vault Secrets User") && rbac.advice(id).contains(id));
        let ap = kv(
            403,
            r#"{"error":{"code":"Forbidden","message":"The user, group or application 'appid=x' does not have secrets get permission on key vault 'v'","innererror":{"code":"AccessDenied"}}}"#,
        );
        assert!(ap.advice(id).contains("access policy"));
        let off = kv(
            403,
            r#"{"error":{"code":"Forbidden","message":"Operation get is not allowed on a disabled secret.","innererror":{"code":"SecretDisabled"}}}"#,
        );
        assert!(off.advice(id).contains("disabled"));
        let tenant = kv(
            401,
            r#"{"error":{"code":"Unauthorized","message":"AKV10032: Invalid issuer. Expected one of https://sts.windows.net/a/, found https://sts.windows.net/b/."}}"#,
        );
        assert!(tenant.advice(id).contains("different Entra tenant"));
        let gone = kv(
            409,
            r#"{"error":{"code":"Conflict","message":"Secret s is currently in a deleted but recoverable state","innererror":{"code":"ObjectIsDeletedButRecoverable"}}}"#,
        );
        assert!(gone.advice(id).contains("soft-deleted") && gone.advice(id).contains("recover"));
        let bare = kv(502, "<html>bad gateway</html>");
        assert_eq!(bare.summary(), "HTTP 502");
    }

    #[test]
    fn retry_after_in_every_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |pairs: &[(&'static str, String)]| {
            let mut h = Headers::new();
            for (k, v) in pairs {
                h.insert(HeaderName::from_static(k), HeaderValue::from(v.clone()));
            }
            retry_after(&h, now)
        };
        assert_eq!(h(&[("retry-after", "7".into())]), Some(Duration::from_secs(7)));
        assert_eq!(h(&[("retry-after-ms", "1500".into())]), Some(Duration::from_millis(1500)));
        assert_eq!(
            h(&[("x-ms-retry-after-ms", "250".into()), ("retry-after", "9".into())]),
            Some(Duration::from_millis(250))
        );
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        assert_eq!(
            h(&[("retry-after", "Tue, 14 Nov 2023 22:13:30 GMT".into())]),
            Some(Duration::from_secs(10))
        );
        assert_eq!(h(&[("retry-after", "Tue, 14 Nov 2023 22:13:00 GMT".into())]), Some(Duration::ZERO));
        assert_eq!(h(&[("retry-after", "86400".into())]), Some(Duration::from_secs(300)));
        assert_eq!(h(&[("retry-after", "soon".into())]), None);
        assert_eq!(h(&[]), None);
    }

    #[test]
    fn throttle_backoff_is_one_two_four_eight_sixteen() {
        let d: Vec<u64> = (1..=7).map(|n| throttle_backoff(n).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 16, 16]);
    }
}

//! Calling a managed identity token endpoint (IMDS, Azure ML, Arc) and what its failures
//! mean: [`IdentityFailure`] names the endpoint, its status and its own message, and says
//! whether asking again can help.
//!
//! Retry rules follow Microsoft's IMDS guidance (FACTS.md): 404 and 410 (IMDS is updating;
//! ready within 70 s), 429 and 5xx and network failures are transient; every other 4xx is
//! permanent and answered at once, so a cold read with an unassigned identity fails in
//! milliseconds instead of spending the caller's whole deadline. One call here is one
//! request: the vault layer retries transient failures with backoff within its deadline,
//! and reports the last failure if the deadline passes (a retry loop here would hide it).
//!
//! Never quotes a token: a failure's message is the endpoint's `error_description` (or
//! `error.message`) from an error answer, which holds none.

use azure_core::http::{HttpClient, Request, Url};
use bytes::Bytes;

use crate::transport::HyperTransport;

/// Why an identity endpoint gave no token. Travels inside an `azure_core::Error` (kind
/// `Credential`) through the SDK's bearer policy, so the vault layer can find it again.
#[derive(Debug, Clone)]
pub(crate) struct IdentityFailure {
    /// `IMDS`, `Azure ML`, `Arc`, `App Service`, ….
    pub(crate) source_name: &'static str,
    /// Scheme, host, port and path: never the query.
    pub(crate) endpoint: String,
    /// `None`: the endpoint was not reached (or did not answer).
    pub(crate) status: Option<u16>,
    /// The endpoint's own message, or the network error.
    pub(crate) message: String,
    /// The endpoint's error code (`error`, or `error.code`), when it sent one.
    pub(crate) code: Option<String>,
    /// Asking again will not help (an unassigned identity, a bad request, a refusal).
    pub(crate) permanent: bool,
    /// How long the endpoint asked us to wait (`Retry-After` in any form, on a 429 or 5xx).
    pub(crate) retry_after: Option<std::time::Duration>,
}

impl std::fmt::Display for IdentityFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (who, at) = (self.source_name, &self.endpoint);
        match self.status {
            Some(s) => write!(f, "the {who} identity endpoint {at} answered HTTP {s}: {}", self.message)?,
            None if self.permanent => {
                write!(f, "the {who} identity endpoint {at} refused: {}", self.message)?
            }
            None => write!(f, "cannot reach the {who} identity endpoint {at}: {}", self.message)?,
        }
        if let Some(advice) = self.advice() {
            write!(f, " ({advice})")?;
        }
        Ok(())
    }
}

impl std::error::Error for IdentityFailure {}

impl IdentityFailure {
    pub(crate) fn answered(source_name: &'static str, endpoint: &Url, status: u16, body: &[u8]) -> Self {
        Self {
            source_name,
            endpoint: endpoint_of(endpoint),
            status: Some(status),
            message: error_message(body),
            code: error_code(body),
            permanent: !transient_status(status),
            retry_after: None,
        }
    }

    pub(crate) fn with_retry_after(mut self, retry_after: Option<std::time::Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    pub(crate) fn unreachable(source_name: &'static str, endpoint: &Url, e: &azure_core::Error) -> Self {
        // The loopback guard's refusal (kind Other) is configuration: asking again cannot help.
        let permanent =
            !matches!(e.kind(), azure_core::error::ErrorKind::Io | azure_core::error::ErrorKind::Connection);
        Self {
            source_name,
            endpoint: endpoint_of(endpoint),
            status: None,
            message: one_line(&e.to_string()),
            code: None,
            permanent,
            retry_after: None,
        }
    }

    pub(crate) fn with_permanent(mut self, permanent: bool) -> Self {
        self.permanent = permanent;
        self
    }

    /// The audit record's `upstream` for this failure.
    pub(crate) fn upstream(&self) -> kvbroker_proto::Upstream {
        kvbroker_proto::Upstream::new(&service_name(self.source_name), self.status, self.code.clone(), None)
    }

    pub(crate) fn into_error(self) -> azure_core::Error {
        azure_core::Error::new(azure_core::error::ErrorKind::Credential, self)
    }

    /// What to do, for the answers an operator can act on.
    fn advice(&self) -> Option<&'static str> {
        let m = self.message.to_ascii_lowercase();
        match self.status? {
            400 if m.contains("identity not found")
                || m.contains("no managed identity")
                || m.contains("not assigned") =>
            {
                Some(
                    "no managed identity with that client id is assigned to this machine: assign one, or fix [identity] client_id",
                )
            }
            400 if m.contains("aadsts") => {
                Some("Entra ID refused the request: check the client id and tenant")
            }
            401 | 403 => Some(
                "the endpoint refused the request's credentials: check the identity environment variables",
            ),
            404 | 410 => Some("the endpoint is starting or updating; kvbroker retries"),
            429 => Some("the endpoint is throttling token requests; kvbroker backs off"),
            _ => None,
        }
    }
}

/// Whether a token endpoint's status is worth retrying (Microsoft's IMDS guidance).
pub(crate) fn transient_status(status: u16) -> bool {
    matches!(status, 404 | 408 | 410 | 429 | 500..=599)
}

/// GETs `req`: the body of a 200, or an [`IdentityFailure`] (inside an `azure_core::Error`).
pub(crate) async fn get_token_body(
    http: &HyperTransport,
    source_name: &'static str,
    endpoint: &Url,
    req: &Request,
) -> azure_core::Result<Bytes> {
    match http.execute_request(req).await {
        Ok(resp) => {
            let status = u16::from(resp.status());
            let retry_after = crate::transport::retry_after(resp.headers(), std::time::SystemTime::now());
            let body = resp.into_body().collect().await?;
            if status == 200 {
                return Ok(body);
            }
            Err(IdentityFailure::answered(source_name, endpoint, status, &body)
                .with_retry_after(retry_after)
                .into_error())
        }
        Err(e) => Err(IdentityFailure::unreachable(source_name, endpoint, &e).into_error()),
    }
}

/// Scheme, host, port and path of a URL (a query can hold a client id, never needed here).
pub(crate) fn endpoint_of(u: &Url) -> String {
    let mut s = format!("{}://{}", u.scheme(), u.host_str().unwrap_or("?"));
    if let Some(p) = u.port() {
        s.push_str(&format!(":{p}"));
    }
    s.push_str(u.path());
    s
}

/// The message of an identity endpoint's error answer: `error_description` (IMDS, App
/// Service, Entra), `error.message`, `message`, or the `error` code alone. Never the raw
/// body beyond those fields.
pub(crate) fn error_message(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return "(no JSON error body)".to_owned();
    };
    let s = |v: Option<&serde_json::Value>| v.and_then(|x| x.as_str()).map(str::to_owned);
    let err = v.get("error");
    let msg = s(v.get("error_description"))
        .or_else(|| s(err.and_then(|e| e.get("message"))))
        .or_else(|| s(v.get("message")))
        .or_else(|| s(v.get("Message")));
    let code = s(err.filter(|e| e.is_string())).or_else(|| s(err.and_then(|e| e.get("code"))));
    match (code, msg) {
        (Some(c), Some(m)) => one_line(&format!("{c}: {m}")),
        (None, Some(m)) => one_line(&m),
        (Some(c), None) => one_line(&c),
        (None, None) => "(no error message)".to_owned(),
    }
}

/// The error code of an identity endpoint's error answer: `error` (IMDS, Entra) or
/// `error.code`, made one line.
pub(crate) fn error_code(body: &[u8]) -> Option<String> {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let err = v.get("error")?;
    err.as_str().or_else(|| err.get("code").and_then(|c| c.as_str())).map(one_line)
}

/// The service name of an identity source for the audit record's `upstream.service`:
/// `IMDS` → `imds`, `Azure ML` → `azure_ml`.
pub(crate) fn service_name(source_name: &str) -> String {
    source_name.to_ascii_lowercase().replace([' ', '-'], "_")
}

/// Collapses whitespace and control characters, and caps the length: these messages come
/// from outside and end up on terminals and in single-line logs.
pub(crate) fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(400));
    let mut space = false;
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() {
            if !space && !out.is_empty() {
                out.push(' ');
            }
            space = true;
        } else {
            out.push(c);
            space = false;
        }
        if out.len() >= 400 {
            out.push('…');
            break;
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_identity_statuses_per_microsoft_guidance() {
        for s in [404, 408, 410, 429, 500, 503] {
            assert!(transient_status(s), "{s}");
        }
        for s in [400, 401, 403, 405] {
            assert!(!transient_status(s), "{s}");
        }
    }

    #[test]
    fn an_unassigned_identity_400_is_permanent_and_says_what_to_do() {
        let url = Url::parse("http://169.254.169.254/metadata/identity/oauth2/token?client_id=x").unwrap();
        let body = br#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        let f = IdentityFailure::answered("IMDS", &url, 400, body);
        assert!(f.permanent);
        assert_eq!(
            f.to_string(),
            "the IMDS identity endpoint http://169.254.169.254/metadata/identity/oauth2/token answered \
             HTTP 400: invalid_request: Identity not found (no managed identity with that client id is \
             assigned to this machine: assign one, or fix [identity] client_id)"
        );
        assert!(!IdentityFailure::answered("IMDS", &url, 410, b"{}").permanent);
    }

    #[test]
    fn error_messages_are_one_line_and_never_the_raw_body() {
        assert_eq!(error_message(br#"{"error":{"code":"C","message":"a\r\nb"}}"#), "C: a b");
        assert_eq!(error_message(b"access_token=abc"), "(no JSON error body)");
        assert_eq!(error_message(br#"{"access_token":"abc"}"#), "(no error message)");
    }
}

//! `azure_identity`'s credentials, labelled: their failures become [`IdentityFailure`]s that
//! name the endpoint, so a refused connection to the identity endpoint is not reported as
//! "cannot reach Key Vault", and a permanent 4xx is not retried for the caller's deadline.
//!
//! [`Fresh`] renews them our way: the SDK's own cache renews a token only five minutes before
//! it expires and cannot be told otherwise, so each renewal asks a newly built SDK credential
//! (building one is local work, no request), and [`super::token::Cached`] keeps the token and
//! renews long-lived ones at half-life, as MSAL does.

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::http::Url;

use super::endpoint::{IdentityFailure, endpoint_of, error_message, one_line, transient_status};

#[derive(Debug)]
pub(super) struct Labelled<C: ?Sized> {
    source_name: &'static str,
    endpoint: String,
    inner: std::sync::Arc<C>,
}

impl<C: ?Sized> Labelled<C> {
    pub(super) fn new(inner: std::sync::Arc<C>, source_name: &'static str, endpoint: &str) -> Self {
        let endpoint = Url::parse(endpoint).map_or_else(|_| one_line(endpoint), |u| endpoint_of(&u));
        Self { source_name, endpoint, inner }
    }
}

/// Whether an I/O or connection error lies under `e`.
fn network_cause(e: &azure_core::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(inner) = c.downcast_ref::<azure_core::Error>()
            && matches!(inner.kind(), ErrorKind::Io | ErrorKind::Connection)
        {
            return true;
        }
        if c.is::<std::io::Error>() {
            return true;
        }
        cur = c.source();
    }
    false
}

#[async_trait::async_trait]
impl<C: TokenCredential + ?Sized> TokenCredential for Labelled<C> {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        // Counted in the metrics by `token::Cached`, which asks through here only when it
        // needs a new token.
        self.inner.get_token(scopes, options).await.map_err(|e| self.label(e))
    }
}

impl<C: ?Sized> Labelled<C> {
    fn label(&self, e: azure_core::Error) -> azure_core::Error {
        let failure = |status: Option<u16>, message: String, permanent: bool| IdentityFailure {
            source_name: self.source_name,
            endpoint: self.endpoint.clone(),
            status,
            message,
            code: None,
            permanent,
            retry_after: None,
        };
        let f = match e.kind() {
            ErrorKind::HttpResponse { status, raw_response, error_code } => {
                let code = u16::from(*status);
                let message = raw_response.as_ref().map_or_else(
                    || error_code.clone().unwrap_or_else(|| "(no error message)".into()),
                    |r| error_message(r.body()),
                );
                let retry_after = raw_response
                    .as_ref()
                    .and_then(|r| crate::transport::retry_after(r.headers(), std::time::SystemTime::now()));
                failure(Some(code), message, !transient_status(code)).with_retry_after(retry_after)
            }
            ErrorKind::Io | ErrorKind::Connection => failure(None, one_line(&e.to_string()), false),
            // The SDK wraps Entra's refusals (AADSTS…), a missing `az` or token file as
            // Credential errors: permanent, unless a network error lies underneath.
            ErrorKind::Credential => {
                let network = network_cause(&e);
                failure(None, one_line(&super::error_chain(&e)), false).with_permanent(!network)
            }
            _ => return e,
        };
        f.into_error()
    }
}

/// Builds an SDK credential with an empty cache.
pub(super) type Build =
    Box<dyn Fn() -> azure_core::Result<std::sync::Arc<dyn TokenCredential>> + Send + Sync>;

/// A [`super::token::Fetch`] over an SDK credential built afresh for every token, so the
/// renewal time is ours ([`super::token::Cached`]), not the SDK cache's.
pub(super) struct Fresh {
    build: Build,
    source_name: &'static str,
    endpoint: String,
}

impl std::fmt::Debug for Fresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fresh")
            .field("source_name", &self.source_name)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Fresh {
    pub(super) fn new(build: Build, source_name: &'static str, endpoint: &str) -> Self {
        Self { build, source_name, endpoint: endpoint.to_owned() }
    }
}

#[async_trait::async_trait]
impl super::token::Fetch for Fresh {
    async fn fetch(&self, resource: &str) -> azure_core::Result<AccessToken> {
        let inner = (self.build)()?;
        let labelled = Labelled::new(inner, self.source_name, &self.endpoint);
        let scope = format!("{resource}/.default");
        labelled.get_token(&[scope.as_str()], None).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use std::time::Duration;

    use azure_core::time::OffsetDateTime;

    use super::*;
    use crate::identity::token::Fetch;

    /// A stand-in for an SDK credential: like the SDK's, it keeps the first token it got
    /// and hands it out until it is near expiry.
    #[derive(Debug)]
    struct SdkLike {
        issued: Arc<AtomicU32>,
        kept: std::sync::Mutex<Option<AccessToken>>,
    }

    #[async_trait::async_trait]
    impl TokenCredential for SdkLike {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let mut kept = self.kept.lock().unwrap();
            let t = kept.get_or_insert_with(|| {
                let n = self.issued.fetch_add(1, Ordering::SeqCst);
                AccessToken::new(
                    format!("token-{n}"),
                    OffsetDateTime::now_utc() + Duration::from_secs(24 * 3600),
                )
            });
            Ok(t.clone())
        }
    }

    /// Issue 15: SDK-held tokens (App Service, workload identity, CLI) were renewed by the
    /// SDK's cache five minutes before expiry, never at half-life. Each renewal through
    /// [`Fresh`] asks a newly built credential, so the SDK's cache cannot hand back the old
    /// token, and the renewal time is `token::Cached`'s.
    #[tokio::test]
    async fn each_renewal_asks_a_new_sdk_credential() {
        let issued = Arc::new(AtomicU32::new(0));
        let builds = Arc::new(AtomicU32::new(0));
        let (i, b) = (Arc::clone(&issued), Arc::clone(&builds));
        let build: Build = Box::new(move || {
            b.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(SdkLike { issued: Arc::clone(&i), kept: std::sync::Mutex::new(None) })
                as Arc<dyn TokenCredential>)
        });
        let fresh = Fresh::new(build, "App Service", "http://127.0.0.1:1/msi/token");
        let first = fresh.fetch("https://vault.azure.net").await.unwrap();
        let second = fresh.fetch("https://vault.azure.net").await.unwrap();
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        assert_ne!(first.token.secret(), second.token.secret(), "a renewal got the SDK's cached token");
        assert!(!format!("{fresh:?}").contains("token-"), "Debug shows no token");
    }
}

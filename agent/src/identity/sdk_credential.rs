//! `azure_identity`'s credentials, labelled: their failures become [`IdentityFailure`]s that
//! name the endpoint, so a refused connection to the identity endpoint is not reported as
//! "cannot reach Key Vault", and a permanent 4xx is not retried for the caller's deadline.

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

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
    /// The `[identity] source` name token requests are counted under (metrics).
    counted_as: &'static str,
    /// The expiry of the last token handed out: the SDK caches tokens itself, so a token is
    /// counted as newly acquired when its expiry differs from the last one's.
    last_expiry: std::sync::Mutex<Option<azure_core::time::OffsetDateTime>>,
    inner: std::sync::Arc<C>,
}

impl<C: ?Sized> Labelled<C> {
    pub(super) fn new(inner: std::sync::Arc<C>, source_name: &'static str, endpoint: &str) -> Self {
        let endpoint = Url::parse(endpoint).map_or_else(|_| one_line(endpoint), |u| endpoint_of(&u));
        Self { source_name, endpoint, counted_as: "unknown", last_expiry: std::sync::Mutex::new(None), inner }
    }

    /// Counts this credential's token acquisitions under `source` in the metrics.
    pub(super) fn counted_as(mut self, source: &'static str) -> Self {
        self.counted_as = source;
        self
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
        let got = self.inner.get_token(scopes, options).await;
        match &got {
            Ok(t) => {
                let mut last = self.last_expiry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.replace(t.expires_on) != Some(t.expires_on) {
                    crate::metrics::get().token(self.counted_as, true);
                }
            }
            Err(_) => crate::metrics::get().token(self.counted_as, false),
        }
        got.map_err(|e| self.label(e))
    }
}

impl<C: ?Sized> Labelled<C> {
    fn label(&self, e: azure_core::Error) -> azure_core::Error {
        let failure = |status: Option<u16>, message: String, permanent: bool| IdentityFailure {
            source_name: self.source_name,
            endpoint: self.endpoint.clone(),
            status,
            message,
            permanent,
        };
        let f = match e.kind() {
            ErrorKind::HttpResponse { status, raw_response, error_code } => {
                let code = u16::from(*status);
                let message = raw_response.as_ref().map_or_else(
                    || error_code.clone().unwrap_or_else(|| "(no error message)".into()),
                    |r| error_message(r.body()),
                );
                failure(Some(code), message, !transient_status(code))
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

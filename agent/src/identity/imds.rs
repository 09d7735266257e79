//! The VM / VMSS Instance Metadata Service token endpoint, our own credential (the SDK's
//! `ManagedIdentityCredential` re-detects the environment and would pick App Service or
//! refuse Azure ML even when `[identity] source = "imds"` was named):
//! `GET http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=R`
//! with `Metadata: true`, and `client_id` for a user-assigned identity.
//!
//! The address is fixed; tests reach the emulator through the transport's `connect_to`
//! table (`169.254.169.254:80:127.0.0.1:PORT`), and the loopback guard refuses it otherwise.

use std::sync::Arc;

use azure_core::credentials::AccessToken;
use azure_core::http::{Method, Request, Url};

use super::endpoint::get_token_body;
use super::token::{Fetch, TokenAnswer};
use crate::transport::HyperTransport;

pub(super) const ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

#[derive(Debug)]
pub(super) struct ImdsCredential {
    endpoint: Url,
    client_id: Option<String>,
    http: Arc<HyperTransport>,
}

impl ImdsCredential {
    pub(super) fn new(client_id: Option<String>, http: Arc<HyperTransport>) -> azure_core::Result<Self> {
        let endpoint = Url::parse(ENDPOINT).map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                format!("IMDS URL: {e}"),
            )
        })?;
        Ok(Self { endpoint, client_id, http })
    }
}

#[async_trait::async_trait]
impl Fetch for ImdsCredential {
    async fn fetch(&self, resource: &str) -> azure_core::Result<AccessToken> {
        let req = {
            let mut url = self.endpoint.clone();
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("api-version", "2018-02-01").append_pair("resource", resource);
                if let Some(id) = &self.client_id {
                    q.append_pair("client_id", id);
                }
            }
            let mut req = Request::new(url, Method::Get);
            req.insert_header("metadata", "true");
            req
        };
        let body = get_token_body(&self.http, "IMDS", &self.endpoint, &req).await?;
        TokenAnswer::parse(&body, "IMDS")
    }
}

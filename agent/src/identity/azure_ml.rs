//! Azure Machine Learning compute's managed identity protocol, which `azure_identity`
//! detects and refuses: `GET {MSI_ENDPOINT}?api-version=2017-09-01&resource=R&clientid=C`
//! with header `secret: {MSI_SECRET}`; `expires_on` comes back as a number. Note `clientid`,
//! not `client_id`, and that it is required even for the system-assigned identity.

use std::sync::Arc;

use azure_core::credentials::{AccessToken, Secret};
use azure_core::http::{Method, Request, Url};

use super::endpoint::get_token_body;
use super::token::{Fetch, TokenAnswer};
use crate::transport::HyperTransport;

#[derive(Debug)]
pub(super) struct AzureMlCredential {
    endpoint: Url,
    secret: Secret,
    client_id: String,
    http: Arc<HyperTransport>,
}

impl AzureMlCredential {
    pub(super) fn new(
        endpoint: &str,
        secret: &str,
        client_id: &str,
        http: Arc<HyperTransport>,
    ) -> azure_core::Result<Self> {
        let endpoint = Url::parse(endpoint).map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                format!("MSI_ENDPOINT is not a URL: {e}"),
            )
        })?;
        Ok(Self { endpoint, secret: Secret::new(secret.to_owned()), client_id: client_id.to_owned(), http })
    }
}

#[async_trait::async_trait]
impl Fetch for AzureMlCredential {
    async fn fetch(&self, resource: &str) -> azure_core::Result<AccessToken> {
        let req = {
            let mut url = self.endpoint.clone();
            url.query_pairs_mut()
                .append_pair("api-version", "2017-09-01")
                .append_pair("resource", resource)
                .append_pair("clientid", &self.client_id);
            let mut req = Request::new(url, Method::Get);
            req.insert_header("secret", self.secret.secret().to_owned());
            req.insert_header("metadata", "true");
            req
        };
        let body = get_token_body(&self.http, "Azure ML", &self.endpoint, &req).await?;
        TokenAnswer::parse(&body, "Azure ML identity endpoint")
    }
}

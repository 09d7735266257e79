//! Azure Arc servers' managed identity: a challenge-file protocol. The first `GET` (with
//! `Metadata: true`) answers 401 with `WWW-Authenticate: Basic realm=<file>`; the file must
//! sit in the Arc agent's token directory, end in `.key` and be at most 4096 bytes; its
//! contents go back as `Authorization: Basic <contents>`. The file's contents are a secret:
//! read into wiped memory, never logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use azure_core::credentials::AccessToken;
use azure_core::http::{HttpClient, Method, Request, Url};
use zeroize::Zeroizing;

use super::endpoint::IdentityFailure;
use super::token::{Fetch, TokenAnswer};
use crate::transport::HyperTransport;

pub(super) const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:40342/metadata/identity/oauth2/token";
pub(super) const TOKEN_DIR: &str = "/var/opt/azcmagent/tokens";
const MAX_KEY_FILE: u64 = 4096;

#[derive(Debug)]
pub(super) struct ArcCredential {
    endpoint: Url,
    token_dir: PathBuf,
    http: Arc<HyperTransport>,
}

fn cred_err(message: String) -> azure_core::Error {
    azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, message)
}

impl ArcCredential {
    pub(super) fn new(
        endpoint: &str,
        token_dir: PathBuf,
        http: Arc<HyperTransport>,
    ) -> azure_core::Result<Self> {
        let endpoint =
            Url::parse(endpoint).map_err(|e| cred_err(format!("IDENTITY_ENDPOINT is not a URL: {e}")))?;
        Ok(Self { endpoint, token_dir, http })
    }

    fn request(&self, resource: &str) -> Request {
        let mut url = self.endpoint.clone();
        url.query_pairs_mut().append_pair("api-version", "2020-06-01").append_pair("resource", resource);
        let mut req = Request::new(url, Method::Get);
        req.insert_header("metadata", "true");
        req
    }

    /// Reads the challenge file after checking where it is, its name and its size.
    fn read_key(&self, realm: &str) -> azure_core::Result<Zeroizing<String>> {
        let path = Path::new(realm);
        let dir = self.token_dir.canonicalize().map_err(|e| {
            cred_err(format!("Arc token directory {} is not readable: {e}", self.token_dir.display()))
        })?;
        let file = path.canonicalize().map_err(|e| cred_err(format!("Arc challenge file {realm}: {e}")))?;
        if file.parent() != Some(dir.as_path()) {
            return Err(cred_err(format!(
                "Arc challenge file {realm} is not in {}: refusing to read it",
                self.token_dir.display()
            )));
        }
        if file.extension().and_then(|e| e.to_str()) != Some("key") {
            return Err(cred_err(format!("Arc challenge file {realm} does not end in .key: refusing")));
        }
        let len =
            std::fs::metadata(&file).map_err(|e| cred_err(format!("Arc challenge file {realm}: {e}")))?.len();
        if len > MAX_KEY_FILE {
            return Err(cred_err(format!("Arc challenge file {realm} is larger than 4096 bytes: refusing")));
        }
        std::fs::read_to_string(&file)
            .map(Zeroizing::new)
            .map_err(|e| cred_err(format!("Arc challenge file {realm}: {e}")))
    }
}

#[async_trait::async_trait]
impl Fetch for ArcCredential {
    async fn fetch(&self, resource: &str) -> azure_core::Result<AccessToken> {
        let first = self
            .http
            .execute_request(&self.request(resource))
            .await
            .map_err(|e| IdentityFailure::unreachable("Arc", &self.endpoint, &e).into_error())?;
        let status = u16::from(first.status());
        if status != 401 {
            let body = first.into_body().collect().await?;
            return Err(IdentityFailure::answered("Arc", &self.endpoint, status, &body).into_error());
        }
        let realm = first
            .headers()
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static("www-authenticate"))
            .and_then(|h| h.trim().strip_prefix("Basic realm="))
            .map(|r| r.trim_matches('"').to_owned())
            .ok_or_else(|| cred_err("Arc identity endpoint sent no Basic realm challenge".into()))?;
        let key = self.read_key(&realm)?;
        let mut req = self.request(resource);
        req.insert_header("authorization", format!("Basic {}", key.as_str()));
        let resp = self
            .http
            .execute_request(&req)
            .await
            .map_err(|e| IdentityFailure::unreachable("Arc", &self.endpoint, &e).into_error())?;
        let status = u16::from(resp.status());
        let body = resp.into_body().collect().await?;
        if status != 200 {
            return Err(IdentityFailure::answered("Arc", &self.endpoint, status, &body).into_error());
        }
        TokenAnswer::parse(&body, "Arc identity endpoint")
    }
}

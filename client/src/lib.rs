//! Read secrets from a kvbroker agent over its Unix socket.
//!
//! The agent decides from the kernel who is calling, so the client carries no credential:
//! it only needs the socket path (`KVBROKER_SOCKET`, else `/run/kvbroker/agent.sock`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvbroker_client::Error> {
//! let client = kvbroker_client::Client::new();
//! let secret = client.get("db-password").await?;
//! let password: &[u8] = secret.expose_secret();
//! # let _ = password; Ok(()) }
//! ```
//!
//! A [`Secret`] holds its value in zeroizing memory; its `Debug` shows no byte of it. The
//! value is reached only through [`Secret::expose_secret`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod blocking;
mod error;
mod transport;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kvbroker_proto::api::headers;
use kvbroker_proto::{ErrorBody, Health, SecretName, SecretQuery, SecretResponse, VaultAlias, VersionId};

pub use error::{ApiError, Error, Group, Remedy};
pub use kvbroker_proto::{ErrorCode, SecretValue};

use transport::{Answer, Transport};

/// A client of one agent socket. Cheap to clone; keeps a few connections alive.
#[derive(Clone)]
pub struct Client {
    transport: Arc<Transport>,
}

/// Builds a [`Client`].
#[derive(Debug, Default, Clone)]
pub struct ClientBuilder {
    socket: Option<PathBuf>,
}

impl ClientBuilder {
    /// Uses this socket path instead of `KVBROKER_SOCKET` or the default.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Builds the client. Nothing is connected until the first request.
    pub fn build(self) -> Client {
        let socket = self.socket.unwrap_or_else(default_socket);
        Client { transport: Arc::new(Transport::new(socket)) }
    }
}

/// `KVBROKER_SOCKET`, else `/run/kvbroker/agent.sock`.
pub fn default_socket() -> PathBuf {
    std::env::var_os(kvbroker_proto::SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(kvbroker_proto::DEFAULT_SOCKET), PathBuf::from)
}

/// Which vault and version to read.
#[derive(Debug, Default, Clone)]
pub struct GetOptions {
    vault: Option<String>,
    version: Option<String>,
}

impl GetOptions {
    /// Reads from the vault with this alias instead of the agent's default.
    pub fn vault(mut self, alias: impl Into<String>) -> Self {
        self.vault = Some(alias.into());
        self
    }

    /// Reads this version (32 hex characters) instead of the current one.
    pub fn version(mut self, id: impl Into<String>) -> Self {
        self.version = Some(id.into());
        self
    }
}

/// A secret as served by the agent. The value is wiped when this is dropped.
pub struct Secret {
    inner: SecretResponse,
}

impl Secret {
    /// The value's bytes. Hand them to what needs them; do not log them.
    pub fn expose_secret(&self) -> &[u8] {
        self.inner.value.expose_secret()
    }

    /// The value, moved out (still zeroizing).
    pub fn into_value(self) -> SecretValue {
        self.inner.value
    }

    /// The name as the vault spells it.
    pub fn name(&self) -> &str {
        self.inner.name.as_str()
    }

    /// The vault alias it came from.
    pub fn vault(&self) -> &str {
        self.inner.vault.as_str()
    }

    /// The version id served.
    pub fn version(&self) -> &str {
        self.inner.version.as_str()
    }

    /// Key Vault's `contentType`, if set.
    pub fn content_type(&self) -> Option<&str> {
        self.inner.content_type.as_deref()
    }

    /// Expiry (RFC 3339), if set.
    pub fn expires_on(&self) -> Option<&str> {
        self.inner.expires_on.as_deref()
    }

    /// Not valid before (RFC 3339), if set.
    pub fn not_before(&self) -> Option<&str> {
        self.inner.not_before.as_deref()
    }

    /// When the agent fetched it (RFC 3339).
    pub fn fetched_at(&self) -> &str {
        &self.inner.fetched_at
    }

    /// True if the vault is failing and this is the last good value.
    pub fn is_stale(&self) -> bool {
        self.inner.stale
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret").field("inner", &self.inner).finish()
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// A client of `KVBROKER_SOCKET`, else `/run/kvbroker/agent.sock`.
    pub fn new() -> Client {
        ClientBuilder::default().build()
    }

    /// A builder, to set the socket path.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        self.transport.socket()
    }

    /// Reads the current version of `name` from the default vault.
    pub async fn get(&self, name: &str) -> Result<Secret, Error> {
        self.get_with(name, &GetOptions::default()).await
    }

    /// Reads `name` with the given vault and version.
    pub async fn get_with(&self, name: &str, opts: &GetOptions) -> Result<Secret, Error> {
        let (name, query) = request_parts(name, opts)?;
        let path = path_for(&name, &query);
        let answer = self.transport.get(&path, "application/json").await?;
        if !answer.status.is_success() {
            return Err(error_of(&answer));
        }
        let inner: SecretResponse = serde_json::from_slice(&answer.body)
            .map_err(|e| Error::Protocol(format!("malformed secret answer: {}", e.classify_name())))?;
        Ok(Secret { inner })
    }

    /// Follows a secret's versions: the first [`Watch::next`] returns the current version,
    /// each later one returns the next new version as soon as the agent caches it (a long
    /// poll, renewed every 5 minutes while nothing changes).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kvbroker_client::Error> {
    /// let client = kvbroker_client::Client::new();
    /// let mut watch = client.watch("db-password");
    /// loop {
    ///     let secret = watch.next().await?;
    ///     println!("now at version {}", secret.version()); // reconnect with the new value
    /// }
    /// # }
    /// ```
    pub fn watch(&self, name: &str) -> Watch {
        self.watch_with(name, &GetOptions::default())
    }

    /// [`Client::watch`] on a chosen vault.
    pub fn watch_with(&self, name: &str, opts: &GetOptions) -> Watch {
        Watch { client: self.clone(), name: name.to_owned(), opts: opts.clone(), last: None }
    }

    /// Asks the agent whether it is healthy. A degraded agent answers `Ok` with its reasons.
    pub async fn health(&self) -> Result<Health, Error> {
        let answer = self.transport.get("/v1/health", "application/json").await?;
        serde_json::from_slice(&answer.body)
            .map_err(|e| Error::Protocol(format!("malformed health answer: {e}")))
    }
}

/// A secret's versions as they change; see [`Client::watch`].
pub struct Watch {
    client: Client,
    name: String,
    opts: GetOptions,
    last: Option<String>,
}

impl Watch {
    /// Skips the first read: the caller already has `version`, so [`next`](Self::next)
    /// waits for the first version after it.
    pub fn after_version(mut self, version: &str) -> Watch {
        self.last = Some(version.to_owned());
        self
    }

    /// The current version first, then each new version as it is cached.
    ///
    /// Once a version has been seen, a lost agent (stopped, restarting, socket gone) or a
    /// passing failure (rate limit, vault or audit trouble) is waited out: the watch
    /// reconnects with a growing pause (from 50 ms up to 5 s, or the agent's
    /// `Retry-After`) and resumes from the last version it returned, so a version is neither
    /// missed nor returned twice across an agent restart. Errors that will not pass by
    /// waiting (denied, no such secret, bad request, no access to the socket) are returned.
    /// The very first read is never retried: a watch of an agent that is not there fails.
    pub async fn next(&mut self) -> Result<Secret, Error> {
        let Some(last) = self.last.clone() else {
            let s = self.client.get_with(&self.name, &self.opts).await?;
            self.last = Some(s.version().to_owned());
            return Ok(s);
        };
        let mut pause = RECONNECT_FIRST;
        loop {
            match self.poll_once(&last).await {
                Ok(Some(inner)) => {
                    self.last = Some(inner.version.as_str().to_owned());
                    return Ok(Secret { inner });
                }
                Ok(None) => pause = RECONNECT_FIRST,
                Err(e) => match reconnect_wait(&e, pause) {
                    Some(wait) => {
                        tokio::time::sleep(wait).await;
                        pause = (pause * 2).min(RECONNECT_MAX);
                    }
                    None => return Err(e),
                },
            }
        }
    }

    /// One long poll from `last`: `Ok(None)` when it ended with no new version (304).
    async fn poll_once(&self, last: &str) -> Result<Option<SecretResponse>, Error> {
        let (name, mut query) = request_parts(&self.name, &self.opts)?;
        query.changed_from =
            Some(last.parse().map_err(|_| Error::Protocol("agent sent a bad version id".into()))?);
        query.wait = Some(kvbroker_proto::api::MAX_WAIT_SECS);
        let answer = self.client.transport.get(&path_for(&name, &query), "application/json").await?;
        if answer.status == http::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if !answer.status.is_success() {
            return Err(error_of(&answer));
        }
        serde_json::from_slice(&answer.body)
            .map(Some)
            .map_err(|e| Error::Protocol(format!("malformed secret answer: {}", e.classify_name())))
    }
}

/// The first pause before a watch reconnects; it doubles up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two reconnects of a watch.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// How long a watch waits before trying again after `e`, or `None` if waiting will not help.
fn reconnect_wait(e: &Error, pause: Duration) -> Option<Duration> {
    match e {
        Error::AgentStopping { retry_after, .. } | Error::TooManyRequests { retry_after, .. } => {
            Some(retry_after.map_or(pause, |r| r.min(RECONNECT_MAX)))
        }
        Error::Unreachable { .. }
        | Error::Protocol(_)
        | Error::UpstreamUnavailable(_)
        | Error::AuditUnavailable(_)
        | Error::RequestTimeout(_) => Some(pause),
        _ => None,
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// serde_json's messages can quote input; name only the kind of problem.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "unexpected fields",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

fn request_parts(name: &str, opts: &GetOptions) -> Result<(SecretName, SecretQuery), Error> {
    let bad = |m: String| Error::InvalidRequest(ApiError { message: m, request_id: "-".into() });
    let name: SecretName = name.parse().map_err(|e| bad(format!("{e}")))?;
    let vault =
        opts.vault.as_deref().map(str::parse::<VaultAlias>).transpose().map_err(|e| bad(format!("{e}")))?;
    let version =
        opts.version.as_deref().map(str::parse::<VersionId>).transpose().map_err(|e| bad(format!("{e}")))?;
    Ok((name, SecretQuery { vault, version, ..SecretQuery::default() }))
}

fn path_for(name: &SecretName, query: &SecretQuery) -> String {
    let q = query.to_query_string();
    if q.is_empty() { format!("/v1/secrets/{name}") } else { format!("/v1/secrets/{name}?{q}") }
}

fn error_of(a: &Answer) -> Error {
    let retry_after = a
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    match serde_json::from_slice::<ErrorBody>(&a.body) {
        Ok(b) => Error::from_code(
            b.error.code,
            ApiError { message: b.error.message, request_id: b.error.request_id },
            retry_after,
        ),
        Err(_) => {
            let request_id =
                a.headers.get(headers::REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
            Error::Protocol(format!("status {} without an error body (request {request_id})", a.status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> ApiError {
        ApiError { message: "m".into(), request_id: "r".into() }
    }

    /// Issue 17: a watch died when the agent restarted. Passing failures are waited out
    /// (Retry-After first, capped); refusals end the watch.
    #[test]
    fn watch_waits_out_passing_failures_and_stops_on_refusals() {
        let p = Duration::from_millis(200);
        let gone = Error::Unreachable { path: "/x".into(), source: std::io::ErrorKind::NotFound.into() };
        assert_eq!(reconnect_wait(&gone, p), Some(p));
        let stopping = Error::AgentStopping { error: api(), retry_after: Some(Duration::from_secs(1)) };
        assert_eq!(reconnect_wait(&stopping, p), Some(Duration::from_secs(1)));
        let slow = Error::TooManyRequests { error: api(), retry_after: Some(Duration::from_secs(3600)) };
        assert_eq!(reconnect_wait(&slow, p), Some(RECONNECT_MAX));
        assert_eq!(reconnect_wait(&Error::Protocol("reset".into()), p), Some(p));
        assert_eq!(reconnect_wait(&Error::PermissionDenied(api()), p), None);
        assert_eq!(reconnect_wait(&Error::SecretNotFound(api()), p), None);
        assert_eq!(reconnect_wait(&Error::InvalidRequest(api()), p), None);
    }
}

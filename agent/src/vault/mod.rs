//! Vault backends: where secret values come from.
//!
//! A [`Backend`] fetches one secret (latest or a given version) and hands back a [`Fetched`]
//! whose value is already inside [`SecretValue`]. Backends never log values; their errors
//! ([`VaultError`]) carry names, statuses and ids only.

mod keyvault;
mod kv_error;
mod local;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kvbroker_proto::{SecretName, SecretValue, Upstream, VaultAlias, VersionId};

use crate::config::{BackendConfig, Config};

pub(crate) use local::LocalBackend;

use crate::identity::{self, Identity, IdentityEnv};
use crate::transport::{HyperTransport, Proxy, TransportConfig};
use keyvault::KeyVaultBackend;
pub(crate) use keyvault::secret_client;
pub(crate) use kv_error::KvError;

/// The proxy for Key Vault and Entra: `[network]` first, then the environment.
pub(crate) fn proxy(config: &Config) -> Result<Option<Proxy>, VaultSetupError> {
    let env = |k: &str| std::env::var(k).ok();
    let p = Proxy::from_settings(config.network.proxy.as_deref(), &config.network.no_proxy, &env)
        .map_err(VaultSetupError::Proxy)?;
    Ok(p)
}

/// The node identity every Key Vault of this agent uses, with its own transport.
pub(crate) fn build_identity(config: &Config) -> Result<Identity, VaultSetupError> {
    let id = &config.identity;
    let http = HyperTransport::new(TransportConfig {
        ca_file: id.ca_file.clone(),
        connect_to: id.connect_to.clone(),
        loopback_only: config.agent.loopback_only,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        proxy: proxy(config)?,
    })?;
    Ok(identity::build(id, &IdentityEnv::from_process(), http)?)
}

/// One fetched version of a secret.
pub(crate) struct Fetched {
    /// The name as the vault spells it.
    pub(crate) name: SecretName,
    pub(crate) version: VersionId,
    pub(crate) value: Arc<SecretValue>,
    pub(crate) content_type: Option<Box<str>>,
    pub(crate) enabled: bool,
    pub(crate) not_before: Option<SystemTime>,
    pub(crate) expires_on: Option<SystemTime>,
    pub(crate) fetched_at: SystemTime,
    /// `x-ms-client-request-id` of the Key Vault call that fetched it.
    pub(crate) upstream_request_id: Option<Box<str>>,
    /// The JSON body of a fresh answer for this version, built at its first hit (issue 19).
    pub(crate) answer: Answer,
}

/// A version's JSON answer, built once and then shared by every hit: a hit copies no value
/// and serializes nothing. The bytes live in zeroizing memory (wiped when the version leaves
/// the cache and the last answer using them is sent) and are locked like the value.
#[derive(Default)]
pub(crate) struct Answer(std::sync::OnceLock<bytes::Bytes>);

impl Answer {
    /// The answer, building it with `build` the first time. `None` if `build` fails (a
    /// value that is not UTF-8 text); nothing is kept then.
    pub(crate) fn get_or_build(&self, build: impl FnOnce() -> Option<bytes::Bytes>) -> Option<bytes::Bytes> {
        if let Some(b) = self.0.get() {
            return Some(b.clone());
        }
        let built = build()?;
        // Two first hits at once may both build; one is kept, the other is sent and wiped.
        Some(self.0.get_or_init(|| built).clone())
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "Answer(built)" } else { "Answer(not built)" })
    }
}

impl Fetched {
    /// Why the secret may not be used at `now()` (disabled, `nbf`, `exp`), if so. The clock
    /// is read only for a version that has a date to compare (a cached read's hot path
    /// usually has none).
    pub(crate) fn unusable(&self, now: impl FnOnce() -> SystemTime) -> Option<String> {
        if !self.enabled {
            return Some("disabled".to_owned());
        }
        if self.not_before.is_none() && self.expires_on.is_none() {
            return None;
        }
        let now = now();
        if let Some(nbf) = self.not_before.filter(|t| *t > now) {
            Some(format!("not yet valid (nbf {})", humantime::format_rfc3339_seconds(nbf)))
        } else {
            self.expires_on
                .filter(|t| *t <= now)
                .map(|exp| format!("expired (exp {})", humantime::format_rfc3339_seconds(exp)))
        }
    }
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("value", &self.value)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// Why a fetch failed. Never holds a value or a token.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum VaultError {
    #[error("secret {name} not found in vault {vault}")]
    NotFound { vault: VaultAlias, name: String, upstream_request_id: Option<String> },
    #[error("secret {name} in vault {vault} is disabled")]
    Disabled { vault: VaultAlias, name: String, upstream_request_id: Option<String> },
    #[error("vault {vault} is unavailable: {reason}")]
    Unavailable {
        vault: VaultAlias,
        reason: String,
        upstream_request_id: Option<String>,
        /// What Key Vault or the identity endpoint answered, when one did (for the audit
        /// record and the log; `reason` says the same in words).
        upstream: Option<Box<Upstream>>,
    },
}

impl VaultError {
    /// The Key Vault call behind the error, for the audit record.
    pub(crate) fn upstream_request_id(&self) -> Option<&str> {
        match self {
            VaultError::NotFound { upstream_request_id, .. }
            | VaultError::Disabled { upstream_request_id, .. }
            | VaultError::Unavailable { upstream_request_id, .. } => upstream_request_id.as_deref(),
        }
    }

    /// What the upstream service answered, for an unavailable vault.
    pub(crate) fn upstream(&self) -> Option<&Upstream> {
        match self {
            VaultError::Unavailable { upstream, .. } => upstream.as_deref(),
            _ => None,
        }
    }
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long a fetch may keep retrying transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Budget {
    /// A caller is waiting: the vault's `deadline`.
    Caller,
    /// Nobody is waiting (refresh-ahead, startup): at least [`BACKGROUND_BUDGET`], so a
    /// refresh rides out an IMDS update (410s for up to 70 s) or a long throttle instead of
    /// failing and serving stale values.
    Background,
}

/// The least a background fetch may spend retrying (Microsoft's IMDS guidance: up to 70 s of
/// 410 during an update, plus backoff).
pub(crate) const BACKGROUND_BUDGET: Duration = Duration::from_secs(90);

impl Budget {
    /// The time a fetch under this budget may take, for a vault whose deadline is `deadline`.
    pub(crate) fn deadline(self, deadline: Duration) -> Duration {
        match self {
            Budget::Caller => deadline,
            Budget::Background => deadline.max(BACKGROUND_BUDGET),
        }
    }
}

/// A source of secrets.
pub(crate) trait Backend: Send + Sync {
    /// Fetches `name`, at `version` if given, else the current version, retrying transient
    /// failures within `budget`.
    fn get<'a>(
        &'a self,
        name: &'a SecretName,
        version: Option<&'a VersionId>,
        budget: Budget,
    ) -> BoxFuture<'a, Result<Fetched, VaultError>>;

    /// As [`Backend::get`], sharing the backend's own copy where it keeps one: a `local`
    /// vault's table already holds every secret, so the cache keeps that same `Fetched` (and
    /// the answer built for it) rather than a second copy (issue 19).
    fn get_shared<'a>(
        &'a self,
        name: &'a SecretName,
        version: Option<&'a VersionId>,
        budget: Budget,
    ) -> BoxFuture<'a, Result<Arc<Fetched>, VaultError>> {
        Box::pin(async move { self.get(name, version, budget).await.map(Arc::new) })
    }

    /// Whether the backend counts each request it sends in the metrics itself (Key Vault:
    /// retries are calls too), so the cache does not count its fetches again.
    fn counts_own_calls(&self) -> bool {
        false
    }
}

impl crate::metrics::VaultStatus {
    /// How a fetch that failed with `e` ended, for the metrics.
    pub(crate) fn of(e: &VaultError) -> Self {
        match e {
            VaultError::NotFound { .. } => Self::NotFound,
            VaultError::Disabled { .. } => Self::Disabled,
            VaultError::Unavailable { .. } => Self::Unavailable,
        }
    }
}

/// The configured vaults, by alias.
pub(crate) struct Vaults {
    by_alias: HashMap<VaultAlias, Arc<dyn Backend>>,
    default: Option<VaultAlias>,
}

/// Why the vaults could not be built at startup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultSetupError {
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("vault {alias}: cannot create the Key Vault client: {reason}")]
    Client { alias: VaultAlias, reason: String },
    #[error("proxy setting {0}")]
    Proxy(String),
}

impl Vaults {
    pub(crate) fn from_config(config: &Config) -> Result<Self, VaultSetupError> {
        let mut by_alias: HashMap<VaultAlias, Arc<dyn Backend>> = HashMap::new();
        let mut identity: Option<Identity> = None;
        let proxy = proxy(config)?;
        if let Some(p) = &proxy
            && config.vaults.iter().any(|v| matches!(v.backend, BackendConfig::KeyVault { .. }))
        {
            tracing::info!(proxy = %p.shown(), "Key Vault and Entra ID connections go through the proxy (identity endpoints and loopback go direct)");
        }
        for v in &config.vaults {
            let backend: Arc<dyn Backend> = match &v.backend {
                BackendConfig::Local { file, latency } => {
                    Arc::new(LocalBackend::load(v.alias.clone(), file, *latency)?)
                }
                BackendConfig::KeyVault {
                    url,
                    ca_file,
                    connect_to,
                    connect_timeout,
                    request_timeout,
                    deadline,
                    max_calls_per_second,
                } => {
                    let identity = match &identity {
                        Some(i) => i.clone(),
                        None => {
                            let i = build_identity(config)?;
                            identity = Some(i.clone());
                            i
                        }
                    };
                    let http = HyperTransport::new(TransportConfig {
                        ca_file: ca_file.clone(),
                        connect_to: connect_to.clone(),
                        loopback_only: config.agent.loopback_only,
                        connect_timeout: *connect_timeout,
                        request_timeout: *request_timeout,
                        proxy: proxy.clone(),
                    })?;
                    let kv = KeyVaultBackend::new(
                        v.alias.clone(),
                        url,
                        &identity,
                        http,
                        *deadline,
                        *max_calls_per_second,
                    )
                    .map_err(|reason| VaultSetupError::Client { alias: v.alias.clone(), reason })?;
                    tracing::info!(
                        vault = %v.alias,
                        url = url.as_str(),
                        identity = identity.description.as_str(),
                        "Key Vault configured"
                    );
                    Arc::new(kv)
                }
            };
            by_alias.insert(v.alias.clone(), backend);
        }
        Ok(Self { by_alias, default: config.default_vault().cloned() })
    }

    /// Vaults from ready-made backends (tests).
    #[cfg(test)]
    pub(crate) fn from_backends(backends: Vec<(VaultAlias, Arc<dyn Backend>)>) -> Self {
        let default = backends.first().map(|(a, _)| a.clone());
        Self { by_alias: backends.into_iter().collect(), default }
    }

    /// The alias a request means: the one it names, or the default.
    pub(crate) fn resolve(&self, asked: Option<&VaultAlias>) -> Option<&VaultAlias> {
        match asked {
            // The configuration's own alias (equal to the one asked for), so a request can
            // hold it without a copy.
            Some(a) => self.by_alias.get_key_value(a).map(|(k, _)| k),
            None => self.default.as_ref(),
        }
    }

    pub(crate) fn get(&self, alias: &VaultAlias) -> Option<&Arc<dyn Backend>> {
        self.by_alias.get(alias)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::{Answer, Fetched};

    fn version(enabled: bool, not_before: Option<SystemTime>, expires_on: Option<SystemTime>) -> Fetched {
        Fetched {
            name: "db".parse().unwrap(),
            version: kvbroker_proto::VersionId::from_bytes([1; 16]),
            value: Arc::new(kvbroker_proto::SecretValue::from_slice(b"canary-unusable")),
            content_type: None,
            enabled,
            not_before,
            expires_on,
            fetched_at: UNIX_EPOCH,
            upstream_request_id: None,
            answer: Answer::default(),
        }
    }

    /// `enabled`, `nbf` and `exp` as the agent enforces them; the clock is read only when a
    /// date is there to compare (issue 19: a hit of an undated version reads no clock).
    #[test]
    fn unusable_reads_the_clock_only_for_a_dated_version() {
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let no_clock = || -> SystemTime { panic!("the clock was read") };
        assert_eq!(version(true, None, None).unusable(no_clock), None);
        assert_eq!(version(false, None, Some(t(1))).unusable(no_clock).as_deref(), Some("disabled"));
        let dated = version(true, Some(t(100)), Some(t(200)));
        assert!(dated.unusable(|| t(50)).is_some_and(|w| w.starts_with("not yet valid")));
        assert_eq!(dated.unusable(|| t(150)), None);
        assert!(dated.unusable(|| t(200)).is_some_and(|w| w.starts_with("expired")));
        let mut clock_reads = 0;
        let _ = dated.unusable(|| {
            clock_reads += 1;
            t(150)
        });
        assert_eq!(clock_reads, 1);
    }

    /// Issue 19: a hit reuses the answer built at the first hit; a build that fails (a value
    /// that is not text) keeps nothing, so the next hit tries again.
    #[test]
    fn an_answer_is_built_once_and_a_failed_build_keeps_nothing() {
        let a = Answer::default();
        assert_eq!(a.get_or_build(|| None), None);
        assert_eq!(format!("{a:?}"), "Answer(not built)");
        let mut builds = 0;
        for _ in 0..3 {
            let b = a.get_or_build(|| {
                builds += 1;
                Some(bytes::Bytes::from_static(b"{\"value\":\"x\"}"))
            });
            assert_eq!(b.as_deref(), Some(&b"{\"value\":\"x\"}"[..]));
        }
        assert_eq!(builds, 1);
        assert_eq!(format!("{a:?}"), "Answer(built)", "Debug shows no bytes");
    }
}

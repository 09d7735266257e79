//! The validated sections of [`Config`](super::Config): what the rest of the agent reads,
//! with the names `[identity] source` accepts.

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use kvbroker_proto::{SecretName, VaultAlias};
use serde::Deserialize;

use super::ConnectTo;

/// `[kubernetes]`: the node's kubelet, for the `k8s_*` policy selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// `https://HOST:PORT` (default `https://127.0.0.1:10250`, or `https://$NODE_NAME:10250`).
    pub kubelet_url: String,
    /// The URL's host (an IPv6 address in brackets) and port.
    pub host: String,
    pub port: u16,
    /// The only CA the kubelet's serving certificate is checked against.
    pub ca_file: PathBuf,
    /// The service account token, read again at every kubelet call.
    pub token_file: PathBuf,
    /// How long a pod list is used before the kubelet is asked again.
    pub pod_cache_ttl: Duration,
}

/// `[network]`: the HTTP proxy for Key Vault and Entra ID (the environment's
/// `HTTPS_PROXY`/`NO_PROXY` apply when `proxy` is absent; see `transport::Proxy`).
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    /// `http://[user:pass@]host:port`; validated at load.
    pub proxy: Option<String>,
    /// Hosts that go direct, added to `NO_PROXY`.
    pub no_proxy: Vec<String>,
}

#[cfg(test)]
impl AuditConfig {
    /// The defaults of `[audit]` at `path`, checkpoints an hour apart (unit tests).
    pub(crate) fn for_tests(path: PathBuf) -> Self {
        Self {
            path,
            durability: Durability::Write,
            rotate_bytes: NonZeroU64::new(1 << 30).unwrap_or(NonZeroU64::MIN),
            rotate_keep: 10,
            write_timeout: Duration::from_secs(5),
            checkpoint_interval: Duration::from_secs(3600),
            hmac_key_file: None,
            hmac_key_secret: None,
        }
    }
}

/// Per-caller limits (`[limits]`).
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Secret reads per second per caller key, sustained.
    pub rate_per_second: u32,
    /// Reads a caller may make at once before the rate applies.
    pub burst: u32,
    pub rate_key: RateKey,
    /// Open connections per uid.
    pub connections_per_uid: usize,
}

/// What a rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateKey {
    /// The caller's uid.
    Uid,
    /// The policy rule that allowed the read.
    Rule,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub admin_socket: PathBuf,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Refuse any outbound connection that is not to 127.0.0.0/8 or ::1 (tests, dev).
    pub loopback_only: bool,
}

/// `[identity] source` and `kvbroker rotate --identity`. Each name is written once, in
/// [`IdentitySource::as_str`]; parsing, messages and the config all go through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    Auto,
    Imds,
    AppService,
    AzureMl,
    WorkloadIdentity,
    AzureArc,
    AzureCli,
}

impl IdentitySource {
    /// Every source, in the order messages list them.
    pub const ALL: [IdentitySource; 7] = [
        Self::Auto,
        Self::Imds,
        Self::AppService,
        Self::AzureMl,
        Self::WorkloadIdentity,
        Self::AzureArc,
        Self::AzureCli,
    ];

    /// The name as written in the config and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Imds => "imds",
            Self::AppService => "app-service",
            Self::AzureMl => "azure-ml",
            Self::WorkloadIdentity => "workload-identity",
            Self::AzureArc => "azure-arc",
            Self::AzureCli => "azure-cli",
        }
    }
}

/// A name that is not one of [`IdentitySource::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown identity source {0:?}: use one of {names}", names = source_names())]
pub struct UnknownIdentitySource(String);

fn source_names() -> String {
    IdentitySource::ALL.map(IdentitySource::as_str).join(", ")
}

impl std::str::FromStr for IdentitySource {
    type Err = UnknownIdentitySource;

    fn from_str(s: &str) -> Result<Self, UnknownIdentitySource> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownIdentitySource(s.to_owned()))
    }
}

impl std::fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for IdentitySource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub source: IdentitySource,
    pub client_id: Option<String>,
    /// Extra CA and overrides for the identity endpoints' connections.
    pub ca_file: Option<PathBuf>,
    pub connect_to: Vec<ConnectTo>,
    /// Where an Arc challenge file may live (default `/var/opt/azcmagent/tokens`).
    pub arc_token_dir: Option<PathBuf>,
    /// Azure ML's token endpoint given explicitly (a compute instance's systemd agent does
    /// not see `MSI_ENDPOINT`); with `azure_ml_secret_file`.
    pub azure_ml_endpoint: Option<String>,
    /// A file (0600, owned by root or the agent) holding `MSI_SECRET`.
    pub azure_ml_secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub alias: VaultAlias,
    pub default: bool,
    pub backend: BackendConfig,
}

#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// `kind = "local"`: a TOML file of `name = "value"`, for development and tests.
    Local {
        file: PathBuf,
        /// Added to every read, to try timeouts and shutdown drain without Key Vault.
        latency: Duration,
    },
    /// `url = "https://….vault.azure.net"`.
    KeyVault {
        url: String,
        ca_file: Option<PathBuf>,
        connect_to: Vec<ConnectTo>,
        connect_timeout: Duration,
        request_timeout: Duration,
        /// The longest a caller waits for this vault, retries included.
        deadline: Duration,
        /// Calls to this vault per second, at most (refreshes and misses together).
        max_calls_per_second: u32,
    },
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub refresh_interval: Duration,
    pub max_stale: Duration,
    /// Entries not read for this long are dropped (and their values wiped).
    pub evict_idle: Duration,
    /// How long a version replaced by a rotation stays readable by its id.
    pub version_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Each record is written (`write(2)`) before its answer is sent.
    Write,
    /// Each record is also fsynced before its answer is sent.
    Fsync,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub durability: Durability,
    pub rotate_bytes: NonZeroU64,
    /// Rotated files kept (`audit.jsonl.1` … `.N`).
    pub rotate_keep: u32,
    /// How long a request waits for its record before failing closed.
    pub write_timeout: Duration,
    /// How often a checkpoint record is written.
    pub checkpoint_interval: Duration,
    /// Keyed mode: the chain uses HMAC-SHA-256 with this key.
    pub hmac_key_file: Option<PathBuf>,
    /// Keyed mode, the key being a secret (`VAULT/NAME`) read through the agent's vault.
    pub hmac_key_secret: Option<(VaultAlias, SecretName)>,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub file: PathBuf,
}

/// A request names a vault no `[[vault]]` has, or none with no default: the agent's 400
/// message, which `policy explain` repeats word for word.
#[derive(Debug, thiserror::Error)]
pub enum UnknownVault {
    #[error("unknown vault {0}: check the vault parameter against [[vault]] alias")]
    Alias(VaultAlias),
    #[error("no default vault: pass vault=ALIAS")]
    NoDefault,
}

/// What `kvbroker launch` puts in place of a missing `[audit]` or `[policy]`.
#[derive(Debug, Clone)]
pub(crate) struct LaunchDefaults {
    pub(crate) audit: PathBuf,
    pub(crate) policy: PathBuf,
}

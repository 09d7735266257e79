//! Agent configuration: raw TOML (unknown keys refused) → validated [`Config`].
//!
//! Every error names the file, the line and the key, and says what is expected. Values from
//! the config file are not secret (secrets never live in it), so messages may quote them.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvbroker_proto::{SecretName, SecretPath, VaultAlias};
use serde::Deserialize;

pub use crate::transport::ConnectTo;
pub use telemetry::{LogConfig, LogFormat, MetricsConfig};

mod telemetry;

/// A configuration problem, with where it is and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A syntax error, unknown key or bad value at a known place.
    #[error("{path}:{line}: {message}")]
    At { path: PathBuf, line: usize, message: String },
    /// A problem with the file as a whole, or across keys.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (for messages and `agent.start`).
    pub path: PathBuf,
    pub agent: AgentConfig,
    pub identity: IdentityConfig,
    pub vaults: Vec<VaultConfig>,
    pub cache: CacheConfig,
    pub audit: AuditConfig,
    pub policy: PolicyConfig,
    pub limits: LimitsConfig,
    pub network: NetworkConfig,
    /// `[kubernetes]`: how to ask the node's kubelet about pods; `None` refuses `k8s_*`
    /// selectors.
    pub kubernetes: Option<KubernetesConfig>,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

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

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

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

// === raw TOML ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    vault: Vec<RawVault>,
    #[serde(default)]
    cache: RawCache,
    audit: Option<RawAudit>,
    policy: Option<RawPolicy>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    network: RawNetwork,
    kubernetes: Option<RawKubernetes>,
    #[serde(default)]
    metrics: telemetry::RawMetrics,
    #[serde(default)]
    log: telemetry::RawLog,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    kubelet_url: Option<String>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    pod_cache_ttl: Option<HumanDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    proxy: Option<String>,
    no_proxy: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    rate_per_second: Option<std::num::NonZeroU32>,
    burst: Option<std::num::NonZeroU32>,
    rate_key: Option<RateKey>,
    connections_per_uid: Option<std::num::NonZeroU32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    socket: Option<PathBuf>,
    socket_mode: Option<FileMode>,
    socket_group: Option<String>,
    admin_socket: Option<PathBuf>,
    shutdown_grace: Option<HumanDuration>,
    loopback_only: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    source: Option<IdentitySource>,
    client_id: Option<String>,
    ca_file: Option<PathBuf>,
    connect_to: Option<Vec<ConnectToEntry>>,
    arc_token_dir: Option<PathBuf>,
    azure_ml_endpoint: Option<String>,
    azure_ml_secret_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVault {
    alias: VaultAlias,
    #[serde(default)]
    default: bool,
    url: Option<String>,
    kind: Option<VaultKind>,
    file: Option<PathBuf>,
    latency: Option<HumanDuration>,
    ca_file: Option<PathBuf>,
    connect_to: Option<Vec<ConnectToEntry>>,
    connect_timeout: Option<HumanDuration>,
    request_timeout: Option<HumanDuration>,
    deadline: Option<HumanDuration>,
    max_calls_per_second: Option<std::num::NonZeroU32>,
}

/// One `connect_to` string, parsed where it stands so errors point at its line.
#[derive(Debug, Clone)]
struct ConnectToEntry(ConnectTo);

impl<'de> Deserialize<'de> for ConnectToEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(ConnectToEntry).map_err(serde::de::Error::custom)
    }
}

fn connect_to(v: Option<Vec<ConnectToEntry>>) -> Vec<ConnectTo> {
    v.unwrap_or_default().into_iter().map(|e| e.0).collect()
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum VaultKind {
    Local,
    KeyVault,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    refresh_interval: Option<HumanDuration>,
    max_stale: Option<HumanDuration>,
    evict_idle: Option<HumanDuration>,
    version_grace: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: PathBuf,
    durability: Option<Durability>,
    rotate_bytes: Option<NonZeroU64>,
    rotate_keep: Option<std::num::NonZeroU32>,
    write_timeout: Option<HumanDuration>,
    checkpoint_interval: Option<HumanDuration>,
    hmac_key_file: Option<PathBuf>,
    hmac_key_secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    file: PathBuf,
}

/// What `kvbroker launch` puts in place of a missing `[audit]` or `[policy]`.
#[derive(Debug, Clone)]
pub(crate) struct LaunchDefaults {
    pub(crate) audit: PathBuf,
    pub(crate) policy: PathBuf,
}

/// A duration written like `30s`, `5m`, `1h` or `250ms`.
#[derive(Debug, Clone, Copy)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = parse_duration(&s).map_err(serde::de::Error::custom)?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {s:?} is longer than 10 years: write a shorter one"
            )));
        }
        Ok(HumanDuration(d))
    }
}

/// The longest duration any setting accepts. Longer values are mistakes, and would overflow
/// time arithmetic (a `refresh_interval` of centuries once panicked the first read).
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses `30s`, `5m`, `1h`, `250ms`, `1h30m`. A bare number is refused: the unit is
/// what makes `refresh_interval = "300"` unambiguous.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: write a number and a unit, like 30s, 5m, 1h or 250ms");
    if s.trim().is_empty() || s.trim().bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    humantime::parse_duration(s.trim()).map_err(|_| bad())
}

/// A Unix permission mode written in octal, like `"0660"`.
#[derive(Debug, Clone, Copy)]
struct FileMode(u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s.strip_prefix("0o").unwrap_or(&s);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(FileMode(m)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid mode {s:?}: write octal permission bits as a string, like \"0660\""
            ))),
        }
    }
}

// === loading ===

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(path, &text)
    }

    /// Validates config text; `path` is used for messages and to resolve relative paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse(path, text, None, &|k| std::env::var(k).ok())
    }

    /// [`Config::from_toml`] with the environment given (tests: `NODE_NAME`).
    #[cfg(test)]
    pub(crate) fn from_toml_env(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::parse(path, text, None, env)
    }

    /// The `[log]` section of the config at `path`, read before logging is set up. Any
    /// problem gives the defaults: loading the config properly reports it a moment later.
    pub fn log_settings(path: &Path) -> LogConfig {
        #[derive(Deserialize)]
        struct OnlyLog {
            #[serde(default)]
            log: telemetry::RawLog,
        }
        let Ok(text) = std::fs::read_to_string(path) else { return LogConfig::default() };
        // Other sections are skipped here (and checked by `load`).
        toml::from_str::<OnlyLog>(&text).ok().and_then(|o| o.log.validate().ok()).unwrap_or_default()
    }

    /// Reads a config for `kvbroker launch`, which supplies the audit log and policy a file
    /// may leave out (`[audit]`, `[policy]`); given sections apply as they are.
    pub(crate) fn load_for_launch(path: &Path, defaults: &LaunchDefaults) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(path, &text, Some(defaults), &|k| std::env::var(k).ok())
    }

    fn parse(
        path: &Path,
        text: &str,
        launch: Option<&LaunchDefaults>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut raw: Raw = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        if let Some(d) = launch {
            raw.audit.get_or_insert_with(|| RawAudit {
                path: d.audit.clone(),
                durability: None,
                rotate_bytes: None,
                rotate_keep: None,
                write_timeout: None,
                checkpoint_interval: None,
                hmac_key_file: None,
                hmac_key_secret: None,
            });
            raw.policy.get_or_insert_with(|| RawPolicy { file: d.policy.clone() });
        }
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let agent = AgentConfig {
            socket: resolve(raw.agent.socket.unwrap_or_else(|| kvbroker_proto::DEFAULT_SOCKET.into())),
            socket_mode: raw.agent.socket_mode.map_or(0o660, |m| m.0),
            socket_group: raw.agent.socket_group,
            admin_socket: resolve(
                raw.agent.admin_socket.unwrap_or_else(|| kvbroker_proto::DEFAULT_ADMIN_SOCKET.into()),
            ),
            shutdown_grace: raw.agent.shutdown_grace.map_or(Duration::from_secs(10), |d| d.0),
            loopback_only: raw.agent.loopback_only.unwrap_or(false),
        };
        let identity = IdentityConfig {
            source: raw.identity.source.unwrap_or(IdentitySource::Auto),
            client_id: raw.identity.client_id,
            ca_file: raw.identity.ca_file.map(&resolve),
            connect_to: connect_to(raw.identity.connect_to),
            arc_token_dir: raw.identity.arc_token_dir.map(&resolve),
            azure_ml_endpoint: raw.identity.azure_ml_endpoint,
            azure_ml_secret_file: raw.identity.azure_ml_secret_file.map(&resolve),
        };
        if identity.azure_ml_endpoint.is_some() != identity.azure_ml_secret_file.is_some() {
            return Err(invalid(
                "[identity]: give azure_ml_endpoint and azure_ml_secret_file together (the endpoint needs its secret)".into(),
            ));
        }

        if raw.vault.is_empty() {
            return Err(invalid(
                "no [[vault]] configured: add one with alias and url (or kind = \"local\" and file)".into(),
            ));
        }
        let mut vaults = Vec::with_capacity(raw.vault.len());
        for v in raw.vault {
            let alias = v.alias.clone();
            let remote_only = v.ca_file.is_some()
                || v.connect_to.is_some()
                || v.connect_timeout.is_some()
                || v.request_timeout.is_some()
                || v.deadline.is_some()
                || v.max_calls_per_second.is_some();
            if v.kind == Some(VaultKind::Local) && remote_only {
                return Err(invalid(format!(
                    "[[vault]] {alias}: ca_file, connect_to and the timeouts are only for Key Vault (url = …)"
                )));
            }
            let backend = match (v.kind, v.url, v.file) {
                (Some(VaultKind::Local), None, Some(file)) => BackendConfig::Local {
                    file: resolve(file),
                    latency: v.latency.map_or(Duration::ZERO, |d| d.0),
                },
                (Some(VaultKind::Local), Some(_), _) => {
                    return Err(invalid(format!(
                        "[[vault]] {alias}: kind = \"local\" cannot have a url: remove one of them"
                    )));
                }
                (Some(VaultKind::Local), None, None) => {
                    return Err(invalid(format!(
                        "[[vault]] {alias}: kind = \"local\" needs file = \"secrets.toml\""
                    )));
                }
                (None | Some(VaultKind::KeyVault), Some(url), None) => {
                    if v.latency.is_some() {
                        return Err(invalid(format!(
                            "[[vault]] {alias}: latency is only for kind = \"local\""
                        )));
                    }
                    if !url.starts_with("https://") {
                        return Err(invalid(format!(
                            "[[vault]] {alias}: url {url:?} must start with https:// (Key Vault only speaks TLS)"
                        )));
                    }
                    BackendConfig::KeyVault {
                        url,
                        ca_file: v.ca_file.map(&resolve),
                        connect_to: connect_to(v.connect_to),
                        connect_timeout: v.connect_timeout.map_or(Duration::from_secs(5), |d| d.0),
                        request_timeout: v.request_timeout.map_or(Duration::from_secs(10), |d| d.0),
                        deadline: v.deadline.map_or(Duration::from_secs(15), |d| d.0),
                        max_calls_per_second: v.max_calls_per_second.map_or(20, std::num::NonZeroU32::get),
                    }
                }
                (None | Some(VaultKind::KeyVault), _, Some(_)) => {
                    return Err(invalid(format!("[[vault]] {alias}: file is only for kind = \"local\"")));
                }
                (None | Some(VaultKind::KeyVault), None, None) => {
                    return Err(invalid(format!(
                        "[[vault]] {alias}: needs url = \"https://NAME.vault.azure.net\""
                    )));
                }
            };
            if vaults.iter().any(|o: &VaultConfig| o.alias == alias) {
                return Err(invalid(format!("[[vault]] alias {alias} is used twice")));
            }
            vaults.push(VaultConfig { alias, default: v.default, backend });
        }
        if vaults.iter().filter(|v| v.default).count() > 1 {
            return Err(invalid("more than one [[vault]] has default = true".into()));
        }

        let cache = CacheConfig {
            refresh_interval: raw.cache.refresh_interval.map_or(Duration::from_secs(300), |d| d.0),
            max_stale: raw.cache.max_stale.map_or(Duration::from_secs(3600), |d| d.0),
            evict_idle: raw.cache.evict_idle.map_or(Duration::from_secs(3600), |d| d.0),
            version_grace: raw.cache.version_grace.map_or(Duration::from_secs(600), |d| d.0),
        };
        if cache.refresh_interval < Duration::from_secs(1) {
            return Err(invalid("[cache] refresh_interval must be at least 1s".into()));
        }
        let audit = raw.audit.ok_or_else(|| {
            invalid("missing [audit] section: add path = \"/var/log/kvbroker/audit.jsonl\"".into())
        })?;
        let audit = AuditConfig {
            path: resolve(audit.path),
            durability: audit.durability.unwrap_or(Durability::Write),
            rotate_bytes: audit
                .rotate_bytes
                .unwrap_or(NonZeroU64::new(100 * 1024 * 1024).unwrap_or(NonZeroU64::MIN)),
            rotate_keep: audit.rotate_keep.map_or(10, std::num::NonZeroU32::get),
            write_timeout: audit.write_timeout.map_or(Duration::from_secs(5), |d| d.0),
            checkpoint_interval: audit.checkpoint_interval.map_or(Duration::from_secs(300), |d| d.0),
            hmac_key_file: audit.hmac_key_file.map(&resolve),
            hmac_key_secret: match audit.hmac_key_secret {
                None => None,
                Some(s) => {
                    let bad = |why: String| {
                        invalid(format!(
                            "[audit] hmac_key_secret {s:?}: {why}; write VAULT/NAME, like \"default/audit-key\""
                        ))
                    };
                    match s.parse::<SecretPath>().map_err(|e| bad(e.to_string()))?.into_parts() {
                        (Some(vault), name) => Some((vault, name)),
                        (None, _) => return Err(bad("no vault given".into())),
                    }
                }
            },
        };
        if audit.hmac_key_file.is_some() && audit.hmac_key_secret.is_some() {
            return Err(invalid("[audit]: give hmac_key_file or hmac_key_secret, not both".into()));
        }
        let policy = raw.policy.ok_or_else(|| {
            invalid("missing [policy] section: add file = \"/etc/kvbroker/policy.toml\"".into())
        })?;
        let policy = PolicyConfig { file: resolve(policy.file) };

        let limits = LimitsConfig {
            rate_per_second: raw.limits.rate_per_second.map_or(500, std::num::NonZeroU32::get),
            burst: raw.limits.burst.map_or(1000, std::num::NonZeroU32::get),
            rate_key: raw.limits.rate_key.unwrap_or(RateKey::Uid),
            connections_per_uid: raw.limits.connections_per_uid.map_or(256, |n| n.get() as usize),
        };
        if let Some(p) = &raw.network.proxy {
            crate::transport::Proxy::from_settings(Some(p), &[], &|_| None).map_err(|why| {
                invalid(format!("{why} (the URL's password, if any, is not shown)").replace(p, "…"))
            })?;
        }
        let network =
            NetworkConfig { proxy: raw.network.proxy, no_proxy: raw.network.no_proxy.unwrap_or_default() };
        let kubernetes = match raw.kubernetes {
            None => None,
            Some(k) => Some(kubernetes(k, env, &resolve).map_err(invalid)?),
        };
        let refused = |(at, message): telemetry::Refused| ConfigError::At {
            path: path.to_owned(),
            line: line_at(text, at),
            message,
        };
        let metrics = raw.metrics.validate().map_err(refused)?;
        let log = raw.log.validate().map_err(refused)?;
        Ok(Config {
            path: path.to_owned(),
            agent,
            identity,
            vaults,
            cache,
            audit,
            policy,
            limits,
            network,
            kubernetes,
            metrics,
            log,
        })
    }

    /// The vault used when a request names none: the one marked `default`, else the only
    /// one, else the one aliased `default`.
    pub fn default_vault(&self) -> Option<&VaultAlias> {
        if let Some(v) = self.vaults.iter().find(|v| v.default) {
            return Some(&v.alias);
        }
        if let [only] = self.vaults.as_slice() {
            return Some(&only.alias);
        }
        self.vaults.iter().find(|v| v.alias.as_str() == "default").map(|v| &v.alias)
    }

    /// The vault a request means: the one it names, if configured, else the default.
    pub(crate) fn resolve_vault<'a>(
        &'a self,
        asked: Option<&'a VaultAlias>,
    ) -> Result<&'a VaultAlias, UnknownVault> {
        match asked {
            Some(a) if self.vaults.iter().any(|v| v.alias == *a) => Ok(a),
            Some(a) => Err(UnknownVault::Alias(a.clone())),
            None => self.default_vault().ok_or(UnknownVault::NoDefault),
        }
    }
}

/// Validates `[kubernetes]`; the kubelet's URL defaults from `NODE_NAME` (the DaemonSet sets
/// it from `spec.nodeName`), else loopback.
fn kubernetes(
    k: RawKubernetes,
    env: &dyn Fn(&str) -> Option<String>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<KubernetesConfig, String> {
    let url = match (k.kubelet_url, env("NODE_NAME").filter(|n| !n.is_empty())) {
        (Some(u), _) => u,
        (None, Some(node)) => {
            let ok = node.len() <= 253
                && node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(format!(
                    "[kubernetes]: NODE_NAME {:?} is not a host name: set kubelet_url instead",
                    node.escape_debug().to_string()
                ));
            }
            format!("https://{node}:10250")
        }
        (None, None) => "https://127.0.0.1:10250".to_owned(),
    };
    let bad = || {
        format!("[kubernetes] kubelet_url {url:?}: write https://HOST:PORT, like \"https://127.0.0.1:10250\"")
    };
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https")
        || !uri.path().trim_start_matches('/').is_empty()
        || uri.query().is_some()
    {
        return Err(bad());
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?.to_owned();
    let pod_cache_ttl = k.pod_cache_ttl.map_or(Duration::from_secs(10), |d| d.0);
    if pod_cache_ttl < Duration::from_secs(1) {
        return Err("[kubernetes] pod_cache_ttl must be at least 1s".into());
    }
    Ok(KubernetesConfig {
        port: uri.port_u16().unwrap_or(10250),
        host,
        kubelet_url: url,
        ca_file: resolve(k.ca_file.unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt"))),
        token_file: resolve(k.token_file.unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("token"))),
        pod_cache_ttl,
    })
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

/// Turns a TOML error into `file:line: key "k": message`, without quoting the file's text
/// (so the same function is safe for files that hold secrets).
pub(crate) fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_owned();
    let Some(span) = e.span() else {
        return ConfigError::Invalid { path: path.to_owned(), message };
    };
    let line = line_at(text, span.start);
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    let message = match key_of_line(line_text) {
        Some(key) if !message.contains(&format!("`{key}`")) => format!("key `{key}`: {message}"),
        _ => message,
    };
    ConfigError::At { path: path.to_owned(), line, message }
}

/// The 1-based line holding byte `offset` of `text` (an offset past the end counts as the
/// last line), for TOML spans in config, policy and local-vault errors.
pub(crate) fn line_at(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

fn key_of_line(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    plain.then_some(key)
}

#[cfg(test)]
mod tests;

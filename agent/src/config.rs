//! Agent configuration: raw TOML (unknown keys refused) → validated [`Config`].
//!
//! Every error names the file, the line and the key, and says what is expected. Values from
//! the config file are not secret (secrets never live in it), so messages may quote them.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvbroker_proto::VaultAlias;
use serde::Deserialize;

pub use crate::transport::ConnectTo;
pub(crate) use sections::LaunchDefaults;
pub use sections::{
    AgentConfig, AuditConfig, BackendConfig, CacheConfig, Durability, IdentityConfig, IdentitySource,
    KubernetesConfig, LimitsConfig, NetworkConfig, PolicyConfig, RateKey, UnknownIdentitySource,
    UnknownVault, VaultConfig,
};
pub use telemetry::{LogConfig, LogFormat, MetricsConfig};

mod load;
mod sections;
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

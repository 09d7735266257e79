//! Loading: raw TOML → validated [`Config`], with defaults, paths resolved against the
//! file's directory, and the checks across keys.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvbroker_proto::{SecretPath, VaultAlias};
use serde::Deserialize;

use super::{
    AgentConfig, AuditConfig, BackendConfig, CacheConfig, Config, ConfigError, Durability, IdentityConfig,
    IdentitySource, KubernetesConfig, LaunchDefaults, LimitsConfig, LogConfig, NetworkConfig, PolicyConfig,
    RateKey, Raw, RawAudit, RawKubernetes, RawPolicy, UnknownVault, VaultConfig, VaultKind, connect_to,
    line_at, telemetry, toml_error,
};

/// The largest config file read (a config of hundreds of vaults is a few hundred KiB).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::trust::read_regular(path, MAX_CONFIG_BYTES)
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
        let Ok(text) = crate::trust::read_regular(path, MAX_CONFIG_BYTES) else {
            return LogConfig::default();
        };
        // Other sections are skipped here (and checked by `load`).
        toml::from_str::<OnlyLog>(&text).ok().and_then(|o| o.log.validate().ok()).unwrap_or_default()
    }

    /// Reads a config for `kvbroker launch`, which supplies the audit log and policy a file
    /// may leave out (`[audit]`, `[policy]`); given sections apply as they are.
    pub(crate) fn load_for_launch(path: &Path, defaults: &LaunchDefaults) -> Result<Config, ConfigError> {
        let text = crate::trust::read_regular(path, MAX_CONFIG_BYTES)
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
        // A checkpoint is a record and a log line: every few milliseconds they would fill the
        // disk (0s wrote 95,000 records in 3 s).
        if audit.checkpoint_interval.is_some_and(|d| d.0 < Duration::from_secs(1)) {
            return Err(invalid("[audit] checkpoint_interval must be at least 1s".into()));
        }
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

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

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

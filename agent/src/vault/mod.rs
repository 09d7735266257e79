//! Vault backends: where secret values come from.
//!
//! A [`Backend`] fetches one secret (latest or a given version) and hands back a [`Fetched`]
//! whose value is already inside [`SecretValue`]. Backends never log values; their errors
//! ([`VaultError`]) carry names, statuses and ids only.

mod local;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use kvbroker_proto::{SecretName, SecretValue, VaultAlias, VersionId};

use crate::config::{BackendConfig, Config};

pub(crate) use local::LocalBackend;

/// One fetched version of a secret.
pub(crate) struct Fetched {
    /// The name as the vault spells it.
    pub(crate) name: SecretName,
    pub(crate) version: VersionId,
    pub(crate) value: Arc<SecretValue>,
    pub(crate) content_type: Option<String>,
    pub(crate) enabled: bool,
    pub(crate) not_before: Option<SystemTime>,
    pub(crate) expires_on: Option<SystemTime>,
    pub(crate) fetched_at: SystemTime,
}

/// Why a fetch failed. Never holds a value or a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum VaultError {
    #[error("secret {name} not found in vault {vault}")]
    NotFound { vault: VaultAlias, name: String },
    #[error("secret {name} in vault {vault} is disabled")]
    Disabled { vault: VaultAlias, name: String },
    #[expect(
        dead_code,
        reason = "raised by the Key Vault backend, which comes next"
    )]
    #[error("vault {vault} is unavailable: {reason}")]
    Unavailable { vault: VaultAlias, reason: String },
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of secrets.
pub(crate) trait Backend: Send + Sync {
    /// Fetches `name`, at `version` if given, else the current version.
    fn get<'a>(
        &'a self,
        name: &'a SecretName,
        version: Option<&'a VersionId>,
    ) -> BoxFuture<'a, Result<Fetched, VaultError>>;
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
    #[error(
        "vault {alias}: Key Vault backends are not available in this build yet; \
         use kind = \"local\" for now"
    )]
    KeyVaultUnavailable { alias: VaultAlias },
}

impl Vaults {
    pub(crate) fn from_config(config: &Config) -> Result<Self, VaultSetupError> {
        let mut by_alias: HashMap<VaultAlias, Arc<dyn Backend>> = HashMap::new();
        for v in &config.vaults {
            let backend: Arc<dyn Backend> = match &v.backend {
                BackendConfig::Local { file, latency } => {
                    Arc::new(LocalBackend::load(v.alias.clone(), file, *latency)?)
                }
                BackendConfig::KeyVault { .. } => {
                    return Err(VaultSetupError::KeyVaultUnavailable {
                        alias: v.alias.clone(),
                    });
                }
            };
            by_alias.insert(v.alias.clone(), backend);
        }
        Ok(Self {
            by_alias,
            default: config.default_vault().cloned(),
        })
    }

    /// The alias a request means: the one it names, or the default.
    pub(crate) fn resolve<'a>(&'a self, asked: Option<&'a VaultAlias>) -> Option<&'a VaultAlias> {
        match asked {
            Some(a) => self.by_alias.contains_key(a).then_some(a),
            None => self.default.as_ref(),
        }
    }

    pub(crate) fn get(&self, alias: &VaultAlias) -> Option<&Arc<dyn Backend>> {
        self.by_alias.get(alias)
    }
}

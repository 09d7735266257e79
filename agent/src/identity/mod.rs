//! Where the agent's Key Vault tokens come from: the node's managed identity.
//!
//! `[identity] source` picks one, and a named source is the one used; `auto` follows the
//! Azure SDKs' environment order (FACTS.md): App Service → Azure ML → Azure Arc → workload
//! identity → IMDS, and logs which it chose and from which variables. IMDS, Azure ML (which
//! the SDK refuses) and Arc (whose challenge-file protocol the SDK 1.0 refuses) are our own
//! credentials ([`imds`], [`azure_ml`], [`arc`]) behind one token cache ([`token`]): the
//! SDK's `ManagedIdentityCredential` re-detects the environment, so `source = "imds"` with
//! Azure ML's `MSI_ENDPOINT` set would not use IMDS. App Service, workload identity and the
//! Azure CLI go through `azure_identity`, wrapped so their failures name the endpoint too.
//! Every failure reaches the vault layer as an [`IdentityFailure`].
//!
//! Tokens are `azure_core` secrets: never logged, never in an error or audit record.

mod arc;
mod azure_ml;
mod endpoint;
mod imds;
mod sdk_credential;
mod token;

pub(crate) use endpoint::{IdentityFailure, one_line};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_identity::{
    AzureCliCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};

use crate::config::{IdentityConfig, IdentitySource};
use crate::transport::HyperTransport;

/// A credential and how to name it in messages (so an operator knows which identity needs
/// a role assignment).
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub(crate) credential: Arc<dyn TokenCredential>,
    pub(crate) description: String,
}

/// Why no credential could be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("identity source {source_name}: {missing} is not set; {hint}")]
    Missing { source_name: &'static str, missing: &'static str, hint: &'static str },
    #[error("identity source {source_name}: {reason}")]
    Sdk { source_name: &'static str, reason: String },
    #[error(
        "identity: Service Fabric managed identity (IDENTITY_SERVER_THUMBPRINT) is not supported; \
         set [identity] source explicitly"
    )]
    ServiceFabric,
    #[error("identity source {source_name}: {from} is {value:?}, not a client id (a GUID){why}")]
    NotAGuid { source_name: &'static str, from: &'static str, value: String, why: &'static str },
    #[error("[identity] azure_ml_secret_file {}: {reason}", path.display())]
    SecretFile { path: PathBuf, reason: String },
}

/// The identity-related environment, read once at startup (the SDK reads the same
/// variables itself; we read them to choose and to describe).
#[derive(Debug, Clone, Default)]
pub(crate) struct IdentityEnv {
    vars: HashMap<&'static str, String>,
    arc_agent_installed: bool,
}

const VARS: [&str; 11] = [
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "DEFAULT_IDENTITY_CLIENT_ID",
    "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_AUTHORITY_HOST",
];

impl IdentityEnv {
    pub(crate) fn from_process() -> Self {
        let vars = VARS
            .iter()
            .filter_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()).map(|v| (*k, v)))
            .collect();
        let arc_agent_installed = std::path::Path::new("/opt/azcmagent/bin/himds").exists();
        Self { vars, arc_agent_installed }
    }

    #[cfg(test)]
    pub(crate) fn from_pairs(pairs: &[(&'static str, &str)]) -> Self {
        Self { vars: pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(), arc_agent_installed: false }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars.get(k).map(String::as_str)
    }

    fn has(&self, k: &str) -> bool {
        self.vars.contains_key(k)
    }
}

/// `auto`: the SDKs' order, with the reason (which variables decided) for the log.
pub(crate) fn detect(env: &IdentityEnv) -> Result<(IdentitySource, String), IdentityError> {
    if env.has("IDENTITY_ENDPOINT") && env.has("IDENTITY_HEADER") {
        if env.has("IDENTITY_SERVER_THUMBPRINT") {
            return Err(IdentityError::ServiceFabric);
        }
        return Ok((IdentitySource::AppService, "IDENTITY_ENDPOINT and IDENTITY_HEADER are set".into()));
    }
    if env.has("MSI_ENDPOINT") && env.has("MSI_SECRET") {
        return Ok((IdentitySource::AzureMl, "MSI_ENDPOINT and MSI_SECRET are set".into()));
    }
    if env.has("IDENTITY_ENDPOINT") && env.has("IMDS_ENDPOINT") {
        return Ok((IdentitySource::AzureArc, "IDENTITY_ENDPOINT and IMDS_ENDPOINT are set".into()));
    }
    if env.arc_agent_installed {
        return Ok((
            IdentitySource::AzureArc,
            "the Arc agent is installed (/opt/azcmagent/bin/himds)".into(),
        ));
    }
    if env.has("AZURE_FEDERATED_TOKEN_FILE") && env.has("AZURE_CLIENT_ID") && env.has("AZURE_TENANT_ID") {
        return Ok((
            IdentitySource::WorkloadIdentity,
            "AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID and AZURE_TENANT_ID are set".into(),
        ));
    }
    Ok((IdentitySource::Imds, "no App Service, Azure ML, Arc or workload identity variables are set".into()))
}

/// The identity variables that are set, for messages (names only: values can be secrets).
pub(crate) fn set_vars(env: &IdentityEnv) -> Vec<&'static str> {
    VARS.iter().copied().filter(|k| env.has(k)).collect()
}

/// `MSI_SECRET` from a file the agent alone can read (it grants tokens of the compute's
/// identity): owned by root or the agent, not readable by others. Trimmed; wiped on drop.
fn read_secret_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, IdentityError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |reason: String| IdentityError::SecretFile { path: path.to_owned(), reason };
    crate::trust::check_file(path, "the Azure ML secret file").map_err(|e| bad(e.to_string()))?;
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.mode() & 0o044 != 0 {
        return Err(bad(format!("mode {:04o} lets others read it: chmod 0600", meta.mode() & 0o7777)));
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    let trimmed = zeroize::Zeroizing::new(text.trim().to_owned());
    if trimmed.is_empty() {
        return Err(bad("is empty".into()));
    }
    Ok(trimmed)
}

/// A client id must be a GUID. Azure ML without an assigned identity sets
/// `DEFAULT_IDENTITY_CLIENT_ID` to the literal `clientid`, and its endpoint then answers
/// with a *user* token: refuse rather than act as someone else.
fn check_guid(source_name: &'static str, from: &'static str, value: &str) -> Result<(), IdentityError> {
    if uuid::Uuid::parse_str(value).is_ok() && value.len() == 36 {
        return Ok(());
    }
    let why = if from == "DEFAULT_IDENTITY_CLIENT_ID" {
        ": Azure ML sets it to the literal \"clientid\" when no managed identity is assigned to the \
         compute; assign a system- or user-assigned identity to the compute (and set [identity] \
         client_id for a user-assigned one)"
    } else {
        ": write the managed identity's client id (az identity show --query clientId)"
    };
    Err(IdentityError::NotAGuid { source_name, from, value: one_line(value), why })
}

/// Builds the credential `cfg` asks for, sending every request through `http`.
pub(crate) fn build(
    cfg: &IdentityConfig,
    env: &IdentityEnv,
    http: Arc<HyperTransport>,
) -> Result<Identity, IdentityError> {
    let source = match cfg.source {
        IdentitySource::Auto if cfg.azure_ml_endpoint.is_some() => {
            tracing::info!(
                source = "azure-ml",
                "identity source auto chose azure-ml: [identity] azure_ml_endpoint is set"
            );
            IdentitySource::AzureMl
        }
        IdentitySource::Auto => {
            let (s, why) = detect(env)?;
            tracing::info!(source = s.as_str(), "identity source auto chose {}: {why}", s.as_str());
            s
        }
        IdentitySource::Imds => {
            let others: Vec<_> = set_vars(env)
                .into_iter()
                .filter(|v| !matches!(*v, "AZURE_AUTHORITY_HOST" | "AZURE_CLIENT_ID" | "AZURE_TENANT_ID"))
                .collect();
            if !others.is_empty() {
                tracing::warn!(
                    "identity source imds is configured: using IMDS (169.254.169.254) and ignoring {}",
                    others.join(", ")
                );
            }
            IdentitySource::Imds
        }
        s => s,
    };
    let name = source.as_str();
    if let Some(id) = cfg.client_id.as_deref() {
        check_guid(name, "[identity] client_id", id)?;
    }
    let sdk = |e: azure_core::Error| IdentityError::Sdk { source_name: name, reason: e.to_string() };
    let client_options = ClientOptions {
        transport: Some(Transport::new(http.clone())),
        retry: RetryOptions::exponential(ExponentialRetryOptions { max_retries: 3, ..Default::default() }),
        ..ClientOptions::default()
    };
    let who = |client_id: Option<&str>| match client_id {
        Some(id) => format!("{name} managed identity (client id {id})"),
        None => format!("{name} managed identity (system-assigned)"),
    };
    let (credential, description): (Arc<dyn TokenCredential>, String) = match source {
        IdentitySource::Imds => {
            let cred = imds::ImdsCredential::new(cfg.client_id.clone(), http).map_err(sdk)?;
            (Arc::new(token::Cached::new(cred).counted_as(name)), who(cfg.client_id.as_deref()))
        }
        IdentitySource::AppService => {
            let (Some(endpoint), true) = (env.get("IDENTITY_ENDPOINT"), env.has("IDENTITY_HEADER")) else {
                return Err(IdentityError::Missing {
                    source_name: name,
                    missing: "IDENTITY_ENDPOINT or IDENTITY_HEADER",
                    hint: "App Service, Functions and Container Apps set both",
                });
            };
            let client_id = cfg.client_id.clone();
            let build: sdk_credential::Build = Box::new(move || {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: client_options.clone(),
                };
                Ok(ManagedIdentityCredential::new(Some(options))? as Arc<dyn TokenCredential>)
            });
            build().map_err(sdk)?;
            let fresh = sdk_credential::Fresh::new(build, "App Service", endpoint);
            (Arc::new(token::Cached::new(fresh).counted_as(name)), who(cfg.client_id.as_deref()))
        }
        IdentitySource::AzureMl => {
            // Config first: a compute instance's systemd agent does not see the job's variables.
            let endpoint = cfg.azure_ml_endpoint.as_deref().or(env.get("MSI_ENDPOINT")).ok_or(
                IdentityError::Missing {
                    source_name: name,
                    missing: "MSI_ENDPOINT (or [identity] azure_ml_endpoint)",
                    hint: "Azure ML compute sets it for every job process; a node agent gets it from the config",
                },
            )?;
            let from_file = match &cfg.azure_ml_secret_file {
                Some(path) => Some(read_secret_file(path)?),
                None => None,
            };
            let secret = match from_file.as_deref() {
                Some(s) => s.as_str(),
                None => env.get("MSI_SECRET").ok_or(IdentityError::Missing {
                    source_name: name,
                    missing: "MSI_SECRET (or [identity] azure_ml_secret_file)",
                    hint: "Azure ML compute sets it for every job process; a node agent reads it from a file",
                })?,
            };
            // `clientid` is required even for the system-assigned identity.
            let client_id = cfg.client_id.as_deref().or(env.get("DEFAULT_IDENTITY_CLIENT_ID")).ok_or(
                IdentityError::Missing {
                    source_name: name,
                    missing: "[identity] client_id or DEFAULT_IDENTITY_CLIENT_ID",
                    hint: "Azure ML needs a client id even for the compute's system-assigned identity",
                },
            )?;
            if cfg.client_id.is_none() {
                check_guid(name, "DEFAULT_IDENTITY_CLIENT_ID", client_id)?;
            }
            let cred = azure_ml::AzureMlCredential::new(endpoint, secret, client_id, http).map_err(sdk)?;
            (Arc::new(token::Cached::new(cred).counted_as(name)), who(Some(client_id)))
        }
        IdentitySource::AzureArc => {
            let endpoint = env.get("IDENTITY_ENDPOINT").unwrap_or(arc::DEFAULT_ENDPOINT);
            let dir = cfg.arc_token_dir.clone().unwrap_or_else(|| PathBuf::from(arc::TOKEN_DIR));
            let cred = arc::ArcCredential::new(endpoint, dir, http).map_err(sdk)?;
            (Arc::new(token::Cached::new(cred).counted_as(name)), who(None))
        }
        IdentitySource::WorkloadIdentity => {
            let client_id = cfg.client_id.clone();
            let build: sdk_credential::Build = Box::new(move || {
                let options = WorkloadIdentityCredentialOptions {
                    credential_options: azure_identity::ClientAssertionCredentialOptions {
                        client_options: client_options.clone(),
                    },
                    client_id: client_id.clone(),
                    ..Default::default()
                };
                Ok(WorkloadIdentityCredential::new(Some(options))? as Arc<dyn TokenCredential>)
            });
            build().map_err(sdk)?;
            let id = cfg.client_id.as_deref().or(env.get("AZURE_CLIENT_ID")).map(str::to_owned);
            let authority = env.get("AZURE_AUTHORITY_HOST").unwrap_or("https://login.microsoftonline.com");
            let fresh = sdk_credential::Fresh::new(build, "Entra ID (workload identity)", authority);
            (
                Arc::new(token::Cached::new(fresh).counted_as(name)),
                format!("workload identity (client id {})", id.as_deref().unwrap_or("?")),
            )
        }
        IdentitySource::AzureCli => {
            let build: sdk_credential::Build =
                Box::new(|| Ok(AzureCliCredential::new(None)? as Arc<dyn TokenCredential>));
            build().map_err(sdk)?;
            let fresh = sdk_credential::Fresh::new(build, "Azure CLI", "az account get-access-token");
            (
                Arc::new(token::Cached::new(fresh).counted_as(name)),
                "the Azure CLI's signed-in account".to_owned(),
            )
        }
        IdentitySource::Auto => unreachable_auto(),
    };
    Ok(Identity { credential, description })
}

#[expect(clippy::panic, reason = "detect() never returns Auto; this arm only satisfies the match")]
fn unreachable_auto() -> ! {
    panic!("identity source auto was not resolved")
}

/// An error and its causes, one line: the SDK's top message often hides the cause (the
/// loopback guard, a refused connection). These errors never carry values or tokens.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string().replace('\n', " ");
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string().replace('\n', " ");
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_sdk_order() {
        let d = |pairs: &[(&'static str, &str)]| detect(&IdentityEnv::from_pairs(pairs)).unwrap().0;
        assert_eq!(d(&[]), IdentitySource::Imds);
        assert_eq!(d(&[("IDENTITY_ENDPOINT", "x"), ("IDENTITY_HEADER", "y")]), IdentitySource::AppService);
        assert_eq!(
            d(&[("MSI_ENDPOINT", "x"), ("MSI_SECRET", "y"), ("AZURE_FEDERATED_TOKEN_FILE", "f")]),
            IdentitySource::AzureMl
        );
        assert_eq!(d(&[("IDENTITY_ENDPOINT", "x"), ("IMDS_ENDPOINT", "y")]), IdentitySource::AzureArc);
        assert_eq!(
            d(&[("AZURE_FEDERATED_TOKEN_FILE", "f"), ("AZURE_CLIENT_ID", "c"), ("AZURE_TENANT_ID", "t")]),
            IdentitySource::WorkloadIdentity
        );
        let sf = detect(&IdentityEnv::from_pairs(&[
            ("IDENTITY_ENDPOINT", "x"),
            ("IDENTITY_HEADER", "y"),
            ("IDENTITY_SERVER_THUMBPRINT", "z"),
        ]));
        assert!(matches!(sf, Err(IdentityError::ServiceFabric)));
    }

    /// Azure ML without an assigned identity sets DEFAULT_IDENTITY_CLIENT_ID=clientid; the
    /// endpoint then hands out a user token. Refused at start with the explanation.
    #[test]
    fn a_non_guid_default_identity_client_id_is_refused_with_the_reason() {
        let env = IdentityEnv::from_pairs(&[
            ("MSI_ENDPOINT", "http://127.0.0.1:1/token"),
            ("MSI_SECRET", "s"),
            ("DEFAULT_IDENTITY_CLIENT_ID", "clientid"),
        ]);
        let cfg = IdentityConfig {
            source: IdentitySource::Auto,
            client_id: None,
            ca_file: None,
            connect_to: Vec::new(),
            arc_token_dir: None,
            azure_ml_endpoint: None,
            azure_ml_secret_file: None,
        };
        let http = HyperTransport::new(crate::transport::TransportConfig {
            ca_file: None,
            connect_to: Vec::new(),
            loopback_only: true,
            connect_timeout: std::time::Duration::from_secs(1),
            request_timeout: std::time::Duration::from_secs(1),
            proxy: None,
        })
        .unwrap();
        let e = build(&cfg, &env, http.clone()).unwrap_err().to_string();
        assert!(e.starts_with("identity source azure-ml: DEFAULT_IDENTITY_CLIENT_ID is \"clientid\", not a client id (a GUID): Azure ML sets it to the literal \"clientid\" when no managed identity is assigned"), "{e}");
        let cfg = IdentityConfig { client_id: Some("not-a-guid".into()), ..cfg };
        let e = build(&cfg, &env, http).unwrap_err().to_string();
        assert!(e.contains("[identity] client_id is \"not-a-guid\", not a client id"), "{e}");
    }

    #[test]
    fn auto_says_which_variables_decided() {
        let (s, why) =
            detect(&IdentityEnv::from_pairs(&[("MSI_ENDPOINT", "x"), ("MSI_SECRET", "y")])).unwrap();
        assert_eq!((s, why.as_str()), (IdentitySource::AzureMl, "MSI_ENDPOINT and MSI_SECRET are set"));
    }
}

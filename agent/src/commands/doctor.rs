//! `kvbroker doctor`: the checks an operator runs on a new node, each printed as it runs
//! with ok or FAIL and what to do. Exit 0 only if every check passes.
//!
//! Order: config → policy → identity source (and the variables that chose it) → a token
//! (never printed) → per vault: DNS, TCP (direct or through the proxy), TLS and Key Vault's
//! bearer challenge, with no token sent → every secret a rule names exactly: exists,
//! enabled, valid for `--min-validity` → the socket directory and the audit directory.
//! A check that cannot run because an earlier one failed is skipped, not failed twice.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use azure_core::http::{HttpClient, Method, Request, Url};
use kvbroker_proto::{SecretName, VaultAlias};

use crate::Error;
use crate::cli::DoctorArgs;
use crate::config::{BackendConfig, Config, IdentitySource};
use crate::identity::{self, IdentityEnv};
use crate::policy::Policy;
use crate::terminal::escape;
use crate::transport::{HyperTransport, TransportConfig};
use crate::vault::{self, Budget, VaultError, Vaults};

/// The resource whose token Key Vault takes.
const KEY_VAULT_SCOPE: &str = "https://vault.azure.net/.default";

struct Report {
    json: bool,
    failed: usize,
}

impl Report {
    fn ok(&mut self, check: &str, detail: &str) {
        self.line(check, true, detail, None);
    }

    fn fail(&mut self, check: &str, detail: &str, fix: &str) {
        self.failed += 1;
        self.line(check, false, detail, Some(fix));
    }

    fn line(&self, check: &str, ok: bool, detail: &str, fix: Option<&str>) {
        if self.json {
            let v = serde_json::json!({"check": check, "ok": ok, "detail": detail, "fix": fix});
            println!("{v}");
        } else {
            println!("{:<4}  {:<22}  {}", if ok { "ok" } else { "FAIL" }, escape(check), escape(detail));
            if let Some(f) = fix {
                println!("{:<4}  {:<22}  fix: {}", "", "", escape(f));
            }
        }
    }
}

pub(crate) fn command(args: &DoctorArgs) -> Result<ExitCode, Error> {
    let rt = super::runtime()?;
    let mut r = Report { json: args.json, failed: 0 };
    rt.block_on(run(args, &mut r));
    if !args.json {
        if r.failed == 0 {
            println!("all checks passed");
        } else {
            println!("{} check(s) failed", r.failed);
        }
    }
    Ok(if r.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn run(args: &DoctorArgs, r: &mut Report) {
    let config = match Config::load(&args.config) {
        Ok(c) => {
            r.ok("config", &format!("{} loaded ({} vault(s))", c.path.display(), c.vaults.len()));
            c
        }
        Err(e) => {
            r.fail(
                "config",
                &e.to_string(),
                "fix the file and key named above (kvbroker check-config shows the same)",
            );
            return;
        }
    };
    let policy = match Policy::load_for(&config.policy.file, config.kubernetes.is_some()) {
        Ok(p) => {
            r.ok("policy", &format!("{} loaded ({} rule(s))", config.policy.file.display(), p.len()));
            Some(p)
        }
        Err(e) => {
            r.fail("policy", &e.to_string(), "fix the policy file named above");
            None
        }
    };
    let uses_key_vault = config.vaults.iter().any(|v| matches!(v.backend, BackendConfig::KeyVault { .. }));
    if uses_key_vault {
        identity_checks(&config, r).await;
        for v in &config.vaults {
            if let BackendConfig::KeyVault {
                url,
                ca_file,
                connect_to,
                connect_timeout,
                request_timeout,
                ..
            } = &v.backend
            {
                let t = TransportConfig {
                    ca_file: ca_file.clone(),
                    connect_to: connect_to.clone(),
                    loopback_only: config.agent.loopback_only,
                    connect_timeout: *connect_timeout,
                    request_timeout: *request_timeout,
                    proxy: None,
                };
                reach(&config, &v.alias, url, t, r).await;
            }
        }
    }
    if let Some(p) = &policy {
        secrets(&config, p, args.min_validity, r).await;
    }
    files(&config, r);
}

async fn identity_checks(config: &Config, r: &mut Report) {
    let env = IdentityEnv::from_process();
    let set = identity::set_vars(&env);
    let vars = if set.is_empty() { "none".to_owned() } else { set.join(", ") };
    match config.identity.source {
        IdentitySource::Auto => match identity::detect(&env) {
            Ok((s, why)) => {
                r.ok("identity source", &format!("auto chose {} because {why} (set: {vars})", s.as_str()))
            }
            Err(e) => {
                r.fail("identity source", &e.to_string(), "set [identity] source to the one this node uses");
                return;
            }
        },
        s => r.ok("identity source", &format!("{} (configured; identity variables set: {vars})", s.as_str())),
    }
    let id = match vault::build_identity(config) {
        Ok(i) => i,
        Err(e) => {
            r.fail("token", &e.to_string(), "fix the identity settings named above");
            return;
        }
    };
    match id.credential.get_token(&[KEY_VAULT_SCOPE], None).await {
        Ok(t) => r.ok(
            "token",
            &format!(
                "{} got a token for https://vault.azure.net (expires {}; not shown)",
                id.description,
                u64::try_from(t.expires_on.unix_timestamp()).map_or_else(
                    |_| "?".to_owned(),
                    |s| humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                        .to_string()
                )
            ),
        ),
        Err(e) => {
            let why = identity_error(&e);
            r.fail(
                "token",
                &format!("{} could not get a token: {why}", id.description),
                "see docs/troubleshooting.md#identity: assign the identity to this machine, or fix [identity] source/client_id",
            );
        }
    }
}

fn identity_error(e: &azure_core::Error) -> String {
    let mut out = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let m = c.to_string();
        if !out.contains(&m) {
            out = format!("{out}: {m}");
        }
        cur = c.source();
    }
    identity::one_line(&out)
}

/// DNS, TCP (through the proxy if one applies), TLS and the 401 bearer challenge, with no
/// token: proves the network path and the vault's identity before any credential is used.
async fn reach(config: &Config, alias: &VaultAlias, url: &str, mut t: TransportConfig, r: &mut Report) {
    let check = format!("vault {alias}");
    let proxy = match vault::proxy(config) {
        Ok(p) => p,
        Err(e) => {
            r.fail(&check, &e.to_string(), "fix the proxy URL (http://[user:pass@]host:port)");
            return;
        }
    };
    let via = proxy.as_ref().map_or_else(|| "direct".to_owned(), |p| format!("through proxy {}", p.shown()));
    t.proxy = proxy;
    let http = match HyperTransport::new(t) {
        Ok(h) => h,
        Err(e) => {
            r.fail(&check, &e.to_string(), "fix ca_file");
            return;
        }
    };
    let Ok(mut u) = Url::parse(url) else {
        r.fail(&check, &format!("{url} is not a URL"), "write url = \"https://NAME.vault.azure.net\"");
        return;
    };
    u.set_path("/secrets");
    u.set_query(Some("api-version=7.5&maxresults=1"));
    match http.execute_request(&Request::new(u, Method::Get)).await {
        Ok(resp) => {
            let status = u16::from(resp.status());
            let challenge = resp
                .headers()
                .get_optional_str(&azure_core::http::headers::HeaderName::from_static("www-authenticate"))
                .map(str::to_owned);
            match (status, challenge) {
                (401, Some(c)) if c.trim_start().starts_with("Bearer") => r.ok(
                    &check,
                    &format!("{url}: resolved, connected ({via}), TLS verified, bearer challenge received"),
                ),
                (s, _) => r.fail(
                    &check,
                    &format!("{url} ({via}) answered HTTP {s} without a bearer challenge"),
                    "check that url names a Key Vault (https://NAME.vault.azure.net) and that no proxy rewrites the answer",
                ),
            }
        }
        Err(e) => {
            let why = identity_error(&e);
            let fix = if why.contains("TLS") {
                "trust the vault's certificate chain (ca_file for a private CA or a TLS-inspecting proxy)"
            } else if why.contains("resolve") {
                "check DNS for the vault name (a private endpoint needs the privatelink zone linked to this network)"
            } else if why.contains("proxy") {
                "check the proxy URL, its credentials and that it allows CONNECT to the vault (or add the vault to NO_PROXY)"
            } else {
                "check the route and firewall from this node to the vault on port 443 (HTTPS_PROXY if egress needs a proxy)"
            };
            r.fail(&check, &format!("{url} ({via}): {why}"), fix);
        }
    }
}

async fn secrets(config: &Config, policy: &Policy, min_validity: Duration, r: &mut Report) {
    let exact = policy.exact_secrets();
    if exact.is_empty() {
        r.ok("secrets", "no rule names a secret exactly (only patterns): nothing to check");
        return;
    }
    let vaults = match Vaults::from_config(config) {
        Ok(v) => v,
        Err(e) => {
            r.fail("secrets", &e.to_string(), "fix the vault settings named above");
            return;
        }
    };
    let until = SystemTime::now() + min_validity;
    for (rule, pattern) in exact {
        let check = format!("secret {pattern}");
        let Some((alias, name)) = pattern.split_once('/') else { continue };
        let (Ok(alias), Ok(name)) = (alias.parse::<VaultAlias>(), name.parse::<SecretName>()) else {
            r.fail(
                &check,
                &format!("rule {rule} names {pattern:?}, not VAULT/NAME"),
                "fix the rule's secrets pattern",
            );
            continue;
        };
        let Some(backend) = vaults.get(&alias) else {
            r.fail(
                &check,
                &format!("rule {rule} names vault {alias}, which is not configured"),
                "add the [[vault]] or fix the rule",
            );
            continue;
        };
        match backend.get(&name, None, Budget::Caller).await {
            Ok(f) => match f.unusable(|| until) {
                None => r.ok(
                    &check,
                    &format!(
                        "exists (version {}), enabled, valid for at least {}",
                        f.version,
                        humantime::format_duration(min_validity)
                    ),
                ),
                Some(why) => r.fail(
                    &check,
                    &format!("version {} is {why} within {}", f.version, humantime::format_duration(min_validity)),
                    "set a new version or extend its dates (az keyvault secret set-attributes --expires …), or enable it",
                ),
            },
            Err(VaultError::NotFound { .. }) => r.fail(
                &check,
                &format!("rule {rule} names it, but the vault has no such secret"),
                "create the secret, or fix the name in the policy",
            ),
            Err(VaultError::Disabled { .. }) => r.fail(&check, "the secret is disabled", "enable it (az keyvault secret set-attributes --enabled true)"),
            Err(e) => r.fail(&check, &e.to_string(), "see the advice in the message and docs/troubleshooting.md"),
        }
    }
}

fn files(config: &Config, r: &mut Report) {
    let socket_dir = config.agent.socket.parent().unwrap_or(Path::new("/"));
    dir_check(r, "socket directory", socket_dir, true);
    let audit_dir = config.audit.path.parent().unwrap_or(Path::new("/"));
    dir_check(r, "audit directory", audit_dir, false);
}

fn dir_check(r: &mut Report, check: &str, dir: &Path, created_at_start: bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        if created_at_start {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            match crate::trust::check_dir_chain(parent, "socket directory's parent") {
                Ok(()) => r.ok(
                    check,
                    &format!(
                        "{} does not exist yet; the agent (or systemd RuntimeDirectory=) creates it",
                        dir.display()
                    ),
                ),
                Err(e) => r.fail(
                    check,
                    &e.to_string(),
                    "make every directory above it owned by root and not writable by others",
                ),
            }
        } else {
            r.fail(
                check,
                &format!("{} does not exist", dir.display()),
                "create it: install -d -m 0750 DIR (owned by the agent's user)",
            );
        }
        return;
    };
    if let Err(e) = crate::trust::check_dir_chain(
        dir,
        if created_at_start { "socket directory" } else { "audit directory" },
    ) {
        r.fail(check, &e.to_string(), "chown root and chmod go-w the directory named above");
        return;
    }
    let probe = dir.join(format!(".kvbroker-doctor-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            r.ok(
                check,
                &format!(
                    "{} (mode {:04o}, owner uid {}) is writable by the agent",
                    dir.display(),
                    meta.mode() & 0o7777,
                    meta.uid()
                ),
            );
        }
        Err(e) => r.fail(
            check,
            &format!("{} is not writable: {e}", dir.display()),
            "run the agent as root, or give its user write access to the directory",
        ),
    }
}

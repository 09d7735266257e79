//! Wiring: build every part from a [`Config`], run until a stop signal, then drain.
//!
//! The order matters: the audit log opens first (nothing may be served that cannot be
//! recorded), then vaults and policy, then the socket; `agent.start` is written before the
//! first connection is accepted and `agent.stop` after the last answer has gone.

use std::future::Future;
use std::sync::{Arc, RwLock};

use kvbroker_proto::{AgentInfo, AuditRecord, Event, Outcome};

use crate::Error;
use crate::audit::Auditor;
use crate::cache::Cache;
use crate::config::Config;
use crate::policy::Policy;
use crate::server::{self, Ctx};
use crate::shutdown;
use crate::vault::Vaults;

/// Extra facts for `agent.start` (e.g. the Azure ML run id in launch mode).
#[derive(Debug, Default, Clone)]
pub struct RunInfo {
    pub run_id: Option<String>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config, info: RunInfo) -> Result<(), Error> {
    run_until(config, info, None, |_| async { Ok(((), shutdown::terminate().await)) }).await
}

/// The launched command's (pid, start time), once it runs (`kvbroker launch`).
pub(crate) type LaunchRoot = Arc<std::sync::OnceLock<(u32, u64)>>;

/// Runs the agent until `body` (given the running agent) finishes, then drains and stops.
/// `launch`: serve only the launched command and its verified descendants.
pub(crate) async fn run_until<T, F, Fut>(
    config: Config,
    info: RunInfo,
    launch: Option<LaunchRoot>,
    body: F,
) -> Result<T, Error>
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = Result<(T, &'static str), Error>>,
{
    if let Err(e) = crate::peer::sys::forbid_dumps() {
        tracing::warn!(error = %e, "cannot mark the agent non-dumpable; core dumps could hold secrets");
    }
    let vaults = Arc::new(Vaults::from_config(&config)?);
    let (auditor, resumed) = match &config.audit.hmac_key_secret {
        None => Auditor::open(&config.audit)?,
        Some((vault, name)) => {
            let key = audit_key_from_vault(&vaults, vault, name).await?;
            Auditor::open_with_key(&config.audit, Some(key))?
        }
    };
    if let Some(note) = &resumed.note {
        tracing::warn!(note = note.as_str(), "audit log tail handled");
    }
    let auditor = Arc::new(auditor);
    let policy = Policy::load(&config.policy.file)?;
    let (listener, socket_file) =
        server::bind(&config.agent.socket, config.agent.socket_mode, config.agent.socket_group.as_deref())?;
    let (admin_listener, admin_file) = server::bind(&config.agent.admin_socket, 0o600, None)?;

    let agent = AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        config: Some(config.path.display().to_string()),
        run_id: info.run_id,
    };
    let mut start = AuditRecord::new(Event::AgentStart);
    start.outcome = Some(Outcome::Ok);
    start.agent = Some(agent.clone());
    start.reason = resumed.note;
    auditor.append(start).await?;
    tracing::info!(
        socket = %config.agent.socket.display(),
        audit = %config.audit.path.display(),
        rules = policy.len(),
        vaults = config.vaults.len(),
        "kvbroker agent ready"
    );
    crate::peer::sys::trim_heap();
    notify_systemd("READY=1");

    let cache = Cache::new(config.cache.clone(), vaults, Arc::clone(&auditor));
    let refresher = cache.spawn_refresher();
    let limits = server::limits::Limits::new(config.limits.clone());
    let ctx = Arc::new(Ctx {
        launch_root: launch,
        limits,
        cache: cache.clone(),
        policy: RwLock::new(Arc::new(policy)),
        auditor: Arc::clone(&auditor),
    });
    let reload = tokio::spawn(reload_on_hangup(Arc::clone(&ctx), config.policy.file.clone()));
    let admin = crate::admin::spawn(admin_listener, Arc::clone(&ctx), config.policy.file.clone());
    let outcome = server::serve(listener, Arc::clone(&ctx), body(ctx), config.agent.shutdown_grace).await;
    let why = match &outcome {
        Ok((_, why)) => *why,
        Err(_) => "startup of the launched command failed",
    };
    reload.abort();
    admin.abort();
    drop(admin_file);
    refresher.abort();
    // Every cached value is wiped once the last in-flight answer has let go of it.
    cache.clear();
    notify_systemd("STOPPING=1");

    let mut stop = AuditRecord::new(Event::AgentStop);
    stop.outcome = Some(Outcome::Ok);
    stop.reason = Some(why.into());
    stop.agent = Some(agent);
    if let Err(e) = auditor.append(stop).await {
        tracing::error!(error = %e, "cannot write agent.stop");
    }
    drop(socket_file);
    tracing::info!(reason = why, "kvbroker agent stopped");
    outcome.map(|(t, _)| t)
}

/// The audit chain's HMAC key, read from a vault before anything is served.
async fn audit_key_from_vault(
    vaults: &Vaults,
    vault: &kvbroker_proto::VaultAlias,
    name: &kvbroker_proto::SecretName,
) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
    let key_err = |reason: String| {
        Error::Audit(crate::audit::AuditError::Key { path: format!("{vault}/{name}").into(), reason })
    };
    let backend = vaults.get(vault).ok_or_else(|| key_err(format!("no vault with alias {vault}")))?;
    let fetched = backend.get(name, None).await.map_err(|e| key_err(e.to_string()))?;
    let mut key = zeroize::Zeroizing::new(fetched.value.expose_secret().to_vec());
    while key.last().is_some_and(u8::is_ascii_whitespace) {
        key.pop();
    }
    Ok(key)
}

async fn reload_on_hangup(ctx: Arc<Ctx>, path: std::path::PathBuf) {
    let Some(mut hup) = shutdown::hangups() else {
        return;
    };
    while hup.recv().await.is_some() {
        reload_policy(&ctx, &path).await;
    }
}

/// Loads the policy again; on failure the old one stays in force. Audited either way.
/// Returns whether it loaded, and what happened.
pub(crate) async fn reload_policy(ctx: &Ctx, path: &std::path::Path) -> (bool, String) {
    let mut rec = AuditRecord::new(Event::PolicyReload);
    let (ok, message) = match Policy::load(path) {
        Ok(p) => {
            let m = format!("{} rule(s) in force", p.len());
            ctx.set_policy(p);
            tracing::info!("policy reloaded");
            (true, m)
        }
        Err(e) => {
            tracing::error!(error = %e, "policy reload failed; the previous policy stays in force");
            (false, format!("{e}; the previous policy stays in force"))
        }
    };
    rec.outcome = Some(if ok { Outcome::Ok } else { Outcome::Failed });
    rec.reason = Some(message.clone());
    if let Err(e) = ctx.auditor.append(rec).await {
        tracing::error!(error = %e, "cannot write policy.reload");
    }
    (ok, message)
}

/// Tells systemd (`Type=notify`) about our state, if it is listening.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

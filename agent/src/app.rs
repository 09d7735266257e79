//! Wiring: build every part from a [`Config`], run until a stop signal, then drain.
//!
//! The order matters: the audit log opens first (nothing may be served that cannot be
//! recorded), then vaults and policy, then the socket; `agent.start` is written before the
//! first connection is accepted and `agent.stop` after the last answer has gone.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvbroker_proto::mask::MaskValues;
use kvbroker_proto::{AgentInfo, AuditRecord, Event, Outcome};

use crate::Error;
use crate::admin::server::AdminSocket;
use crate::audit::Auditor;
use crate::cache::Cache;
use crate::config::Config;
use crate::policy::Policy;
use crate::server::{self, AgentSocket};
use crate::shutdown;
use crate::state::limits::conn_budget;
use crate::state::{LaunchRoot, Limits, State};
use crate::supervise::supervise;
use crate::vault::{Budget, Vaults};

/// Extra facts for `agent.start` (e.g. the Azure ML run id in launch mode).
#[derive(Debug, Default, Clone)]
pub(crate) struct RunInfo {
    pub(crate) run_id: Option<String>,
    /// Launch mode: the job's output masker, taught every value as it is served; `None` with
    /// `--no-mask` (and for a node agent).
    pub(crate) mask: Option<Arc<MaskValues>>,
    /// Launch mode: whether output masking is on, for `agent.start`.
    pub(crate) output_masking: Option<bool>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub(crate) async fn run(config: Config, info: RunInfo) -> Result<(), Error> {
    run_until(config, info, None, |state| async move {
        // Nothing to prefetch: serving from the first accepted connection.
        state.set_ready();
        Ok(((), shutdown::terminate().await))
    })
    .await
}

/// Runs the agent until `body` (given the running agent) finishes, then drains and stops.
/// `launch`: serve only the launched command and its verified descendants.
pub(crate) async fn run_until<T, F, Fut>(
    config: Config,
    info: RunInfo,
    launch: Option<LaunchRoot>,
    body: F,
) -> Result<T, Error>
where
    F: FnOnce(Arc<State>) -> Fut,
    Fut: Future<Output = Result<(T, &'static str), Error>>,
{
    if let Err(e) = crate::sys::forbid_dumps() {
        tracing::warn!(error = %e, "cannot mark the agent non-dumpable; core dumps could hold secrets");
    }
    let notifier = crate::notify::Notifier::from_env().map(Arc::new);
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
    let policy = Policy::load_for(&config.policy.file, config.kubernetes.is_some())?;
    let kube = match &config.kubernetes {
        Some(k) => {
            let client = crate::kube::KubeletClient::new(k, config.agent.loopback_only)?;
            Some(crate::kube::Pods::new(Arc::new(client), k.pod_cache_ttl))
        }
        None => None,
    };
    let (listener, socket_file) = server::bind(
        &config.agent.socket,
        config.agent.socket_mode,
        config.agent.socket_group.as_deref(),
        true,
    )?;
    let (admin_listener, admin_file) = server::bind(&config.agent.admin_socket, 0o600, None, false)?;
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| server::SocketError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    crate::metrics::get().set_per_secret(config.metrics.per_secret);
    for v in &config.vaults {
        crate::metrics::get().register_vault(v.alias.as_str());
    }
    // The kernel's exec/exit events, so kept-alive callers need not be re-checked through
    // /proc on every request; the reader thread logs whether they are in use.
    crate::peer::events::start();
    let agent = AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        config: Some(config.path.display().to_string()),
        run_id: info.run_id,
        output_masking: info.output_masking,
    };
    let mut start = AuditRecord::new(Event::AgentStart);
    start.outcome = Some(Outcome::Ok);
    start.agent = Some(agent.clone());
    start.reason = match (resumed.note, info.output_masking) {
        (note, Some(false)) => Some(
            note.into_iter()
                .chain(["job output masking is off (--no-mask): values the job prints reach its log".into()])
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (note, _) => note,
    };
    start.policy_sha256 = Some(policy.sha256().to_owned());
    start.chain = Some(auditor.chain_mode().to_owned());
    auditor.append(start).await?;
    tracing::info!(
        socket = %config.agent.socket.display(),
        audit = %config.audit.path.display(),
        rules = policy.len(),
        vaults = config.vaults.len(),
        "kvbroker agent ready"
    );
    crate::sys::trim_heap();

    let cache = Cache::new(config.cache.clone(), vaults, Arc::clone(&auditor));
    let nofile = match crate::sys::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE; assuming 1024");
            1024
        }
    };
    let limits = Limits::new(config.limits.clone(), conn_budget(nofile));
    let (budget, per_uid) = limits.budgets();
    tracing::info!(nofile, connections = budget, per_uid, "connection budget");
    let state = Arc::new(
        State::new(launch, info.mask, cache.clone(), limits, policy, Arc::clone(&auditor)).with_kube(kube),
    );
    let refresher = {
        let cache = cache.clone();
        supervise(Arc::clone(&state.tasks), "refresher", move || cache.refresher())
    };
    let reload = {
        let (state, file) = (Arc::clone(&state), config.policy.file.clone());
        supervise(Arc::clone(&state.tasks), "policy reloader", move || {
            reload_on_hangup(Arc::clone(&state), file.clone())
        })
    };
    let summaries = {
        let refusals = Arc::clone(&state.refusals);
        supervise(Arc::clone(&state.tasks), "refusal summaries", move || Arc::clone(&refusals).run())
    };
    let admin_socket = AdminSocket {
        state: Arc::clone(&state),
        policy_file: config.policy.file.clone(),
        started: Instant::now(),
        open: Default::default(),
    };
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(server::serve(
        admin_listener,
        Arc::new(admin_socket),
        async move {
            let _ = admin_stopped.await;
        },
        ADMIN_GRACE,
    ));
    // READY=1 (and the watchdog) once the socket answers through itself: docs/deploy.md.
    let watchdog = notifier.as_ref().map(|n| {
        let summary = format!(
            "{} rule(s), {} vault(s), socket {}",
            state.policy().len(),
            config.vaults.len(),
            config.agent.socket.display()
        );
        tokio::spawn(crate::notify::serve(
            Arc::clone(n),
            config.agent.socket.clone(),
            Arc::clone(&state),
            summary,
        ))
    });
    let stop_watchdog = watchdog.as_ref().map(tokio::task::JoinHandle::abort_handle);
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_tcp = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving /metrics over TCP");
        }
        tokio::spawn(crate::admin::scrape::serve_tcp(listener, Arc::clone(&state), async move {
            let _ = metrics_stopped.await;
        }))
    });
    let state_for_stop = Arc::clone(&state);
    let agent_socket = Arc::new(AgentSocket(Arc::clone(&state)));
    let body = body(state);
    let stopper = Arc::clone(&state_for_stop);
    let until_stop = async move {
        let r = body.await;
        // Before the drain starts: open long polls answer 503 now, not after the grace.
        stopper.begin_stop();
        // Told at once, before the drain: systemd then knows the stop is under way.
        if let Some(w) = stop_watchdog {
            w.abort();
        }
        if let Some(n) = &notifier {
            n.send("STOPPING=1\nSTATUS=stopping: draining in-flight requests");
        }
        r
    };
    let outcome = server::serve(listener, agent_socket, until_stop, config.agent.shutdown_grace).await;
    let why = match &outcome {
        Ok((_, why)) => *why,
        Err(_) => "startup of the launched command failed",
    };
    reload.abort();
    let _ = stop_admin.send(());
    let _ = admin.await;
    let _ = stop_metrics.send(());
    if let Some(t) = metrics_tcp {
        let _ = t.await;
    }
    drop(admin_file);
    refresher.abort();
    summaries.abort();
    // Refusals counted since the last summary are written before agent.stop.
    state_for_stop.refusals.flush().await;
    // Every cached value is wiped once the last in-flight answer has let go of it.
    cache.clear();

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
    let fetched = backend.get(name, None, Budget::Background).await.map_err(|e| key_err(e.to_string()))?;
    let key = zeroize::Zeroizing::new(fetched.value.expose_secret().to_vec());
    crate::audit::key_from_bytes(key).map_err(|e| key_err(e.to_string()))
}

/// How long admin requests in flight (a `ctl refresh` waiting on Key Vault) may run on at
/// shutdown.
const ADMIN_GRACE: Duration = Duration::from_secs(2);

async fn reload_on_hangup(state: Arc<State>, path: std::path::PathBuf) {
    let Some(mut hup) = shutdown::hangups() else {
        // Returning would look like a death to the supervisor: wait quietly instead.
        tracing::warn!("cannot listen for SIGHUP; reload the policy with `kvbroker ctl reload`");
        return std::future::pending().await;
    };
    while hup.recv().await.is_some() {
        state.reload_policy(&path).await;
    }
}

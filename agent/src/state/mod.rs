//! What a running agent's parts share: the policy in force, the cache, the auditor and the
//! per-caller limits. Both the agent socket (`server`) and the admin socket (`admin`) work
//! on a [`State`]; it lives below both, so neither reaches up into the other or into `app`.
//!
//! Never holds a value itself: values live in the cache's `SecretValue`s.

pub(crate) mod limits;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use kvbroker_proto::mask::MaskValues;
use kvbroker_proto::{AuditRecord, Event, Outcome};

use crate::audit::Auditor;
use crate::audit::refusals::Refusals;
use crate::cache::Cache;
use crate::kube::Pods;
use crate::policy::{Policy, PolicyError};
use crate::supervise::Tasks;

pub(crate) use limits::Limits;

/// What `/v1/health?ready` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readiness {
    Ready,
    /// Not yet able to serve (startup, prefetch pending).
    Starting(String),
    /// Running, but nothing can be served (the audit log cannot be written).
    Degraded(String),
}

/// In `kvbroker launch`: the launched command's (pid, start time), once it runs. Only it
/// and its verified descendants are served.
pub(crate) type LaunchRoot = Arc<OnceLock<(u32, u64)>>;

/// Shared state of a running agent.
pub(crate) struct State {
    pub(crate) launch_root: Option<LaunchRoot>,
    /// In `kvbroker launch`: the job's output masker, taught each value before it is sent.
    pub(crate) mask: Option<Arc<MaskValues>>,
    pub(crate) cache: Cache,
    pub(crate) limits: Arc<Limits>,
    policy: RwLock<Arc<Policy>>,
    /// One reload at a time, from reading the file to its audit record: two reloads (a
    /// SIGHUP and `ctl reload`) never install their policies out of order.
    reloading: tokio::sync::Mutex<()>,
    pub(crate) auditor: Arc<Auditor>,
    /// Refused reads: individual records within a per-uid budget, summaries past it.
    pub(crate) refusals: Arc<Refusals>,
    /// Supervised background tasks (refresher, reloader): a death shows in health.
    pub(crate) tasks: Arc<Tasks>,
    /// Set once when the agent starts to stop: open long polls answer 503 at once, so a
    /// stop never waits out `shutdown_grace` for watchers (issue 17).
    stopping: tokio::sync::watch::Sender<bool>,
    /// `[kubernetes]`: the node's pods, for `k8s_*` selectors (and reloads accept them).
    pub(crate) kube: Option<Pods>,
    /// Able to serve (`/v1/health?ready`): set once serving (run), after prefetch (launch).
    ready: AtomicBool,
}

impl State {
    pub(crate) fn new(
        launch_root: Option<LaunchRoot>,
        mask: Option<Arc<MaskValues>>,
        cache: Cache,
        limits: Arc<Limits>,
        policy: Policy,
        auditor: Arc<Auditor>,
    ) -> Self {
        Self {
            launch_root,
            mask,
            cache,
            limits,
            policy: RwLock::new(Arc::new(policy)),
            reloading: tokio::sync::Mutex::new(()),
            refusals: Refusals::new(Arc::clone(&auditor)),
            auditor,
            tasks: Arc::new(Tasks::default()),
            stopping: tokio::sync::watch::Sender::new(false),
            kube: None,
            ready: AtomicBool::new(false),
        }
    }

    /// With the node's pods (`[kubernetes]`).
    pub(crate) fn with_kube(mut self, kube: Option<Pods>) -> Self {
        self.kube = kube;
        self
    }

    /// Tells every open and future long poll that the agent is stopping.
    pub(crate) fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`begin_stop`](Self::begin_stop) was called (at once if it was already).
    pub(crate) async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// From now on `/v1/health?ready` answers ready (unless the audit log cannot be written).
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// What `/v1/health?ready` says: `Err(why)` while the agent cannot serve yet (or at all).
    pub(crate) fn readiness(&self) -> Readiness {
        if !self.ready.load(Ordering::Acquire) {
            let why = if self.launch_root.is_some() {
                "starting: the launched job's secrets are being prefetched"
            } else {
                "starting: not serving yet"
            };
            return Readiness::Starting(why.to_owned());
        }
        if !self.auditor.healthy() {
            return Readiness::Degraded(self.audit_reason());
        }
        Readiness::Ready
    }

    fn audit_reason(&self) -> String {
        format!(
            "audit log {} is not writable: reads are refused until it is (check its disk and permissions)",
            self.auditor.path().display()
        )
    }

    /// The gauges `/metrics` reads from the agent's state.
    pub(crate) fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let (cache_entries, stale_entries) = self.cache.counts();
        crate::metrics::Snapshot { cache_entries, stale_entries }
    }

    /// The policy in force now (a reload swaps it; requests in flight keep the one they took).
    pub(crate) fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set_policy(&self, p: Policy) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(p);
    }

    /// Why `/v1/health` should say "degraded" (empty when healthy).
    pub(crate) fn health_reasons(&self) -> Vec<String> {
        let mut r = Vec::new();
        if !self.auditor.healthy() {
            r.push(self.audit_reason());
        }
        r.extend(self.tasks.health_reasons());
        let stale = self.cache.stale_count();
        if stale > 0 {
            r.push(format!("{stale} cached secret(s) served stale: refresh from the vault is overdue"));
        }
        let max_stale = self.cache.max_stale();
        for f in crate::metrics::get().vaults_failing_for(max_stale) {
            r.push(format!(
                "vault {} has had no successful fetch for {}s (max_stale is {}s; last attempt {}s ago): \
                 check its reachability and the identity's access",
                f.vault,
                f.failing_for.as_secs(),
                max_stale.as_secs(),
                f.last_attempt.as_secs()
            ));
        }
        r
    }

    /// Loads the policy again (SIGHUP, `kvbroker ctl reload`); on failure the old one stays in
    /// force. Audited either way. Returns whether it loaded, and what happened.
    pub(crate) async fn reload_policy(&self, path: &Path) -> (bool, String) {
        let _one_at_a_time = self.reloading.lock().await;
        let mut rec = AuditRecord::new(Event::PolicyReload);
        // Read and parsed on a blocking thread: a large policy takes a while, and the
        // runtime's workers go on serving meanwhile (the file itself must be a regular file
        // of bounded size: `trust::read_regular`).
        let (file, kube) = (path.to_owned(), self.kube.is_some());
        let loaded =
            tokio::task::spawn_blocking(move || Policy::load_for(&file, kube)).await.unwrap_or_else(|e| {
                let stopped = format!("the policy loader stopped before it finished ({e})");
                Err(PolicyError::Read { path: path.to_owned(), source: std::io::Error::other(stopped) })
            });
        let (ok, message) = match loaded {
            Ok(p) => {
                let m = format!("{} rule(s) in force", p.len());
                rec.policy_sha256 = Some(p.sha256().to_owned());
                self.set_policy(p);
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
        if let Err(e) = self.auditor.append(rec).await {
            tracing::error!(error = %e, "cannot write policy.reload");
        }
        (ok, message)
    }
}
